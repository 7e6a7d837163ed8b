//! HTTP plumbing shared by every Fractal server and client.
//!
//! * [`auth`]: an axum middleware that admits only btauth/1-signed requests
//!   from permitted hotkeys, and the [`Caller`] it leaves for handlers.
//! * [`client`]: a reqwest wrapper that signs every request it sends.
//! * [`ApiError`]: the JSON error body all Fractal node APIs answer with.

pub mod auth;
pub mod client;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

pub use auth::{AllowAll, AllowList, Authorizer, BtAuth, Denied};
pub use client::SignedClient;
pub use fractal_protocol::btauth::Caller;

/// `{"error": {"code": ..., "message": ...}}` with an HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429/503).
    pub retry_after: Option<u64>,
    /// A busy prover's own estimate of the work it holds, ms.
    pub backlog_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    /// On a busy answer: the work the prover holds, ms (its estimate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog_ms: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            backlog_ms: None,
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
    pub fn with_backlog_ms(mut self, ms: Option<u64>) -> Self {
        self.backlog_ms = ms;
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                backlog_ms: self.backlog_ms,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, s.into());
        }
        resp
    }
}

/// Unix time in nanoseconds (btauth nonces and freshness checks).
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
