//! The server's one error type for chat operations, and its single mapping to wire codes.
//!
//! Inner layers have their own enums ([`StoreError`], [`AuthError`]); they convert into
//! [`ChatError`], which both edges (REST responses, WebSocket `error` events) map to an
//! [`ErrorCode`] through [`ChatError::code`] and nowhere else.

use confab_proto::ErrorCode;

use crate::auth::AuthError;
use crate::store::StoreError;

/// Why a chat operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The request is malformed or breaks a rule of the protocol.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or invalid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// No such room or user.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create already exists.
    #[error("{0}")]
    Conflict(String),
    /// Over a size limit.
    #[error("{0}")]
    TooLarge(String),
    /// Over a rate limit.
    #[error("{0}")]
    RateLimited(String),
    /// The store failed; details are logged, not sent.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    /// The node is shutting down and takes no new work.
    #[error("server is shutting down")]
    ShuttingDown,
}

impl ChatError {
    /// The wire code for this error: the one place where internal errors meet the protocol.
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::BadRequest(_) => ErrorCode::BadRequest,
            ChatError::Unauthorized(_) => ErrorCode::Unauthorized,
            ChatError::Forbidden(_) => ErrorCode::Forbidden,
            ChatError::NotFound(_) => ErrorCode::NotFound,
            ChatError::Conflict(_) => ErrorCode::Conflict,
            ChatError::TooLarge(_) => ErrorCode::TooLarge,
            ChatError::RateLimited(_) => ErrorCode::RateLimited,
            ChatError::Store(StoreError::Conflict(_)) => ErrorCode::Conflict,
            ChatError::Store(StoreError::NotFound(_)) => ErrorCode::NotFound,
            ChatError::Store(StoreError::NotMember(_)) => ErrorCode::Forbidden,
            ChatError::Store(_) | ChatError::ShuttingDown => ErrorCode::Internal,
        }
    }

    /// The text sent to the client: internal details stay in the log.
    pub fn public_message(&self) -> String {
        match self {
            ChatError::Store(
                StoreError::Conflict(what)
                | StoreError::NotFound(what)
                | StoreError::NotMember(what),
            ) => what.clone(),
            ChatError::Store(err) => {
                tracing::error!(error = %err, "store failure");
                "internal error, please retry".to_string()
            }
            other => other.to_string(),
        }
    }

    /// The usual "no such room" error.
    pub fn room_not_found(room: &str) -> ChatError {
        ChatError::NotFound(format!("room {room:?} does not exist"))
    }
}

impl From<AuthError> for ChatError {
    fn from(err: AuthError) -> Self {
        ChatError::Unauthorized(err.to_string())
    }
}
