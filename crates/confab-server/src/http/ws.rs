//! `GET /ws`: authenticate, check the origin and the connection cap, then answer the WebSocket
//! handshake ourselves and hand the upgraded connection to a session task owned by the node's
//! task tracker (see [`crate::websocket`] for why the framing is our own).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::auth::origin_allowed;
use crate::error::ChatError;
use crate::node::Node;
use crate::session;
use crate::websocket::WebSocket;

/// Query parameters of `/ws`.
#[derive(Debug, Deserialize)]
pub(crate) struct WsParams {
    token: Option<String>,
}

pub(crate) async fn upgrade(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    params: Result<Query<WsParams>, QueryRejection>,
    mut request: Request,
) -> Response {
    // Credentials and origin are checked before anything else, so a bad token is always a 401.
    let query_token = params
        .ok()
        .and_then(|Query(p)| p.token)
        .filter(|t| !t.is_empty());
    let Some(token) = query_token.or_else(|| super::token_from_headers(&headers)) else {
        return ChatError::Unauthorized("missing token".into()).into_response();
    };
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !origin_allowed(origin, host, &node.config.allowed_origins) {
        return ChatError::Forbidden("origin not allowed".into()).into_response();
    }
    let user = match node.authenticate(&token).await {
        Ok(user) => user,
        Err(err) => return err.into_response(),
    };
    if node.presence.connections(&user.id) >= node.config.max_connections_per_user {
        return ChatError::RateLimited(format!(
            "at most {} connections per user",
            node.config.max_connections_per_user
        ))
        .into_response();
    }
    let accept = match handshake_key(&headers) {
        Ok(key) => tungstenite::handshake::derive_accept_key(key.as_bytes()),
        Err(why) => return ChatError::BadRequest(why.into()).into_response(),
    };
    if request
        .extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_none()
    {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        )
            .into_response();
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    let max_frame = node.config.max_frame_bytes;
    let write_limit = node.config.write_timeout();
    let session_node = Arc::clone(&node);
    node.tasks.spawn(async move {
        // The 101 response is sent when this handler returns; the upgrade completes after.
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        // Our accept loop serves plain TCP streams, so this is the socket itself.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let socket = WebSocket::new(parts.io.into_inner(), parts.read_buf, max_frame);
                let tasks = session_node.tasks.clone();
                match session::start(session_node, socket, user) {
                    // A task of its own: this one carried the upgrade's state, and every
                    // byte of a session's future is paid once per connection.
                    Ok(session) => drop(tasks.spawn(session.run())),
                    Err(refused) => Box::pin(refused.close(write_limit)).await,
                }
            }
            Err(_) => tracing::error!("an upgraded connection is not a TCP stream"),
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let out = response.headers_mut();
    out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// Checks that the request asks for a WebSocket (RFC 6455 §4.2.1) and returns its key.
fn handshake_key(headers: &HeaderMap) -> Result<&str, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err("not a WebSocket handshake: Connection must include \"upgrade\"");
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err("not a WebSocket handshake: Upgrade must be \"websocket\"");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err("unsupported WebSocket version: Sec-WebSocket-Version must be 13");
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|key| !key.is_empty())
        .ok_or("not a WebSocket handshake: Sec-WebSocket-Key is missing")
}
