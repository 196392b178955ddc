//! The accept loop: every TCP connection is served by hyper's HTTP/1 server with upgrades, in a
//! task owned by the node's task tracker.
//!
//! Our own loop rather than `axum::serve` for two reasons. The connection hyper hands back on
//! a WebSocket upgrade is then exactly our `TcpStream` ([`hyper::upgrade::Upgraded::downcast`]),
//! so a session reads and writes the socket directly: no boxed I/O object, no buffer kept while
//! idle, readiness-based reads (see [`crate::websocket`]). And each accepted socket gets
//! `TCP_NODELAY`: without it the kernel holds a small frame back until the previous one is
//! acknowledged, and a client's delayed ACK turns that into tens of milliseconds of latency.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::node::Node;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause after a failed `accept` (out of file descriptors, typically), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections until the node's shutdown token is cancelled. Connections already
/// accepted finish their current request and close; upgraded ones are sessions, which close
/// themselves on the same token.
pub(crate) async fn serve(listener: TcpListener, router: Router, node: Arc<Node>) {
    let shutdown = node.shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        node.tasks
            .spawn(serve_connection(stream, peer, router.clone(), node.clone()));
    }
}

/// Serves one connection's HTTP requests (and its upgrade, if it asks for one).
async fn serve_connection(stream: TcpStream, peer: SocketAddr, router: Router, node: Arc<Node>) {
    // Chat frames are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let router = router.clone();
        async move {
            let response = router
                .oneshot(request.map(Body::new))
                .await
                .unwrap_or_else(|never: Infallible| match never {});
            Ok::<_, Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = node.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
