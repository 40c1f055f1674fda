//! API errors: one JSON shape, one status per code.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::documents::DocError;

/// An error answered to an API client as `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_id`.
    pub fn invalid_id(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_id", message)
    }

    /// 400 `invalid_json`.
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    /// 400 `invalid_op`.
    pub fn invalid_op(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_op", message)
    }

    /// 400 `invalid_document`.
    pub fn invalid_document(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_document", message)
    }

    /// 400 `invalid_query`.
    pub fn invalid_query(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_query", message)
    }

    /// 413 `too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl From<DocError> for ApiError {
    fn from(e: DocError) -> Self {
        let message = e.to_string();
        match e {
            DocError::NotFound(_) => Self::not_found(message),
            DocError::TooLarge(_) => Self::too_large(message),
            DocError::Apply(verge_core::ApplyError::InvalidDocument(_)) => {
                Self::invalid_document(message)
            }
            DocError::Apply(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "op_not_applicable",
                message,
            ),
            DocError::Replaced(_) => Self::new(StatusCode::CONFLICT, "document_replaced", message),
            DocError::Compacted { .. } => {
                Self::new(StatusCode::CONFLICT, "document_compacted", message)
            }
            DocError::PreconditionFailed { .. } => Self::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                message,
            ),
            DocError::ChangesCarried { .. } => {
                Self::new(StatusCode::CONFLICT, "changes_carried", message)
            }
            DocError::NotLive(_) => Self::new(StatusCode::CONFLICT, "document_not_live", message),
            DocError::CatchingUp(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "catching_up", message)
            }
            DocError::InvalidSync(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_sync_message", message)
            }
            DocError::Overloaded => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
            }
            DocError::ShuttingDown => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            DocError::Unreadable(..) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "document_unreadable",
                message,
            ),
            DocError::StorageFull => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                message,
            ),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "request failed");
        }
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}
