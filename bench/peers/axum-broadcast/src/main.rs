//! Benchmark peer: a minimal axum 0.8 + `tokio::sync::broadcast` room chat, the shape of axum's
//! own chat example with a map of rooms.
//!
//! `axum-broadcast-peer PORT [tuned]`: `GET /ws?room=NAME` upgrades to WebSocket; every text
//! message is broadcast to every connection of the room, the sender included. `tuned` sets 4 KiB
//! WebSocket buffers and a listen backlog of 4096; without it, axum's and tokio's defaults.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::broadcast;

/// Messages a slow receiver may fall behind before it loses the oldest ones.
const ROOM_CAPACITY: usize = 1024;
/// WebSocket buffer size of the `tuned` variant.
const TUNED_BUFFER: usize = 4 * 1024;

#[derive(Default)]
struct AppState {
    rooms: Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>,
    tuned: bool,
}

#[derive(Deserialize)]
struct RoomQuery {
    #[serde(default)]
    room: String,
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .and_then(|p| p.parse().ok())
        .expect("usage: axum-broadcast-peer PORT [tuned]");
    let tuned = args.next().as_deref() == Some("tuned");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    let listener = if tuned {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        socket.listen(4096).unwrap()
    } else {
        TcpListener::bind(addr).await.unwrap()
    };
    // Go, ws and Socket.IO all turn Nagle off by default; axum needs to be told.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });

    let state = Arc::new(AppState {
        tuned,
        ..AppState::default()
    });
    let app = Router::new()
        .route("/ws", get(ws_handler))
        .with_state(state);
    eprintln!(
        "axum-broadcast peer ({}) listening on {addr}",
        if tuned { "tuned" } else { "default" }
    );
    axum::serve(listener, app).await.unwrap();
}

async fn ws_handler(
    ws: WebSocketUpgrade,
    Query(query): Query<RoomQuery>,
    State(state): State<Arc<AppState>>,
) -> Response {
    let ws = if state.tuned {
        ws.read_buffer_size(TUNED_BUFFER)
            .write_buffer_size(TUNED_BUFFER)
            // tungstenite requires max > write_buffer_size; sends flush, so it never fills.
            .max_write_buffer_size(2 * TUNED_BUFFER)
    } else {
        ws
    };
    ws.on_upgrade(move |socket| chat(socket, query.room, state))
}

async fn chat(socket: WebSocket, room: String, state: Arc<AppState>) {
    let tx = state
        .rooms
        .lock()
        .unwrap()
        .entry(room.clone())
        .or_insert_with(|| broadcast::channel(ROOM_CAPACITY).0)
        .clone();
    let mut rx = tx.subscribe();
    let (mut sender, mut receiver) = socket.split();

    let mut send_task = tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(text) => {
                    if sender.send(Message::Text(text)).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("a receiver lagged and lost {n} messages");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    });

    let mut recv_task = tokio::spawn(async move {
        while let Some(Ok(message)) = receiver.next().await {
            match message {
                Message::Text(text) => {
                    let _ = tx.send(text);
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    });

    tokio::select! {
        _ = &mut send_task => recv_task.abort(),
        _ = &mut recv_task => send_task.abort(),
    }

    // Drop the room when its last connection leaves.
    let mut rooms = state.rooms.lock().unwrap();
    if rooms.get(&room).is_some_and(|tx| tx.receiver_count() == 0) {
        rooms.remove(&room);
    }
}
