//! `GET /ws`: authenticate, check the origin and the connection cap, then upgrade and hand the
//! socket to a session task owned by the node's task tracker.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::auth::origin_allowed;
use crate::error::ChatError;
use crate::node::Node;
use crate::session;

/// Query parameters of `/ws`.
#[derive(Debug, Deserialize)]
pub(crate) struct WsParams {
    token: Option<String>,
}

/// Read buffer per connection: chat commands are small, and idle connections should cost
/// little (larger frames are still read, in several reads).
const READ_BUFFER: usize = 1024;

pub(crate) async fn upgrade(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    params: Result<Query<WsParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
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
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let max_frame = node.config.max_frame_bytes;
    let session_node = Arc::clone(&node);
    upgrade
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| {
            let tasks = session_node.tasks.clone();
            tasks.track_future(session::serve(session_node, socket, user))
        })
}
