//! The registry's HTTP error type: every failure leaves through here, as a spec error body
//! with the status from `thaw_schema::ErrorCode`'s one table.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use thaw_schema::{ErrorCode, ErrorResponse};

use crate::storage::StoreError;

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    status: Option<StatusCode>,
    message: String,
    detail: Option<serde_json::Value>,
    headers: Vec<(&'static str, String)>,
}

impl ApiError {
    /// An error with the code's usual status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, status: None, message: message.into(), detail: None, headers: Vec::new() }
    }
    /// Overrides the status (413, 416).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }
    /// Adds a structured detail.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }
    /// Adds a response header.
    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
    /// The OCI code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }
    /// The HTTP status sent.
    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        })
    }

    pub(crate) fn digest_invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::DigestInvalid, message)
    }
    pub(crate) fn too_large(what: &str, limit: usize) -> Self {
        Self::new(ErrorCode::SizeInvalid, format!("{what} is larger than the limit of {limit} bytes"))
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status().as_u16(), self.code.as_str(), self.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage failure");
        match e {
            StoreError::Backend(_) => Self::new(ErrorCode::Unavailable, format!("storage unavailable: {e}")),
            StoreError::Corrupt { .. } | StoreError::ChunkLength { .. } => {
                Self::new(ErrorCode::Unknown, e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(%status, code = self.code.as_str(), message = %self.message, "request failed");
        } else {
            tracing::debug!(%status, code = self.code.as_str(), message = %self.message, "request rejected");
        }
        let body = ErrorResponse::single(self.code, self.message, self.detail);
        let mut response = (status, axum::Json(body)).into_response();
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, v);
            }
        }
        response
    }
}

/// Result type of request handlers.
pub type ApiResult<T> = Result<T, ApiError>;
