//! The HTTP edge: the axum router, REST handlers, the WebSocket upgrade, and the mapping of
//! [`ChatError`] to HTTP responses.

mod rest;
mod serve;
mod web;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use confab_proto::{ErrorBody, ErrorCode, ErrorDetail, UserRef};
use serde::de::DeserializeOwned;

use crate::error::ChatError;
use crate::node::Node;

pub(crate) use serve::serve;

/// Largest REST request body.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Builds the router for a node.
pub(crate) fn router(node: Arc<Node>) -> Router {
    let web_client = node.config.web_client;
    let mut router = Router::new()
        .route("/healthz", get(rest::health))
        .route("/api/register", post(rest::register))
        .route("/api/login", post(rest::login))
        .route("/api/rooms", get(rest::list_rooms).post(rest::create_room))
        .route(
            "/api/rooms/{room}",
            axum::routing::delete(rest::delete_room),
        )
        .route("/api/rooms/{room}/join", post(rest::join_room))
        .route("/api/rooms/{room}/leave", post(rest::leave_room))
        .route(
            "/api/rooms/{room}/members",
            get(rest::members).post(rest::add_member),
        )
        .route(
            "/api/rooms/{room}/messages",
            get(rest::messages).post(rest::post_message),
        )
        .route("/api/dm/{username}", post(rest::open_dm))
        .route("/api/presence", get(rest::presence))
        .route("/ws", get(ws::upgrade));
    if web_client {
        router = router
            .route("/", get(web::index))
            .route("/assets/{*path}", get(web::asset));
    }
    router
        .fallback(|| async { ChatError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(node)
}

impl IntoResponse for ChatError {
    fn into_response(self) -> Response {
        let code = self.code();
        let status = match code {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Internal if matches!(self, ChatError::ShuttingDown) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.public_message(),
            },
        };
        (status, axum::Json(body)).into_response()
    }
}

/// A JSON body whose rejections come back in the protocol's error format.
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ChatError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ChatError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ChatError::TooLarge(format!(
            "request body is larger than {MAX_BODY_BYTES} bytes"
        ))
    } else {
        ChatError::BadRequest(rejection.body_text())
    }
}

/// The caller of a REST endpoint, from `Authorization: Bearer` or the `confab_token` cookie.
pub(crate) struct AuthUser(pub(crate) UserRef);

impl FromRequestParts<Arc<Node>> for AuthUser {
    type Rejection = ChatError;

    async fn from_request_parts(
        parts: &mut Parts,
        node: &Arc<Node>,
    ) -> Result<Self, Self::Rejection> {
        let token = token_from_headers(&parts.headers)
            .ok_or_else(|| ChatError::Unauthorized("missing bearer token".into()))?;
        // A cookie rides along with cross-site requests too: for anything that changes state,
        // a cookie-authenticated request must come from an allowed origin (CSRF).
        let by_cookie = bearer_token(&parts.headers).is_none();
        if by_cookie && !parts.method.is_safe() {
            let origin = parts
                .headers
                .get(header::ORIGIN)
                .and_then(|v| v.to_str().ok());
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok());
            if !crate::auth::origin_allowed(origin, host, &node.config.allowed_origins) {
                return Err(ChatError::Forbidden("origin not allowed".into()));
            }
        }
        Ok(AuthUser(node.authenticate(&token).await?))
    }
}

/// The token from an `Authorization: Bearer` header.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The token from an `Authorization: Bearer` header or a `confab_token` cookie.
fn token_from_headers(headers: &HeaderMap) -> Option<String> {
    bearer_token(headers).or_else(|| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == "confab_token")
            .map(|(_, value)| value.to_string())
            .filter(|t| !t.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_from_header_or_cookie() {
        let mut headers = HeaderMap::new();
        assert_eq!(token_from_headers(&headers), None);
        headers.insert(header::COOKIE, "a=b; confab_token=tok1".parse().unwrap());
        assert_eq!(token_from_headers(&headers).as_deref(), Some("tok1"));
        headers.insert(header::AUTHORIZATION, "Bearer tok2".parse().unwrap());
        assert_eq!(token_from_headers(&headers).as_deref(), Some("tok2"));
    }
}
