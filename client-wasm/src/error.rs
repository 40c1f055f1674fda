//! The client's errors, each with a stable machine-readable code.
//!
//! The codes are the node's HTTP error codes where the fault is the same (`invalid_id`,
//! `invalid_op`, `op_not_applicable`, …), so code handling an error does not care whether the
//! node or the local replica refused a write. JavaScript sees them as `VergeError.code`.

use verge_core::{ApplyError, DocIdError, OpError};

/// Why a client call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The document id is not a valid id.
    #[error(transparent)]
    InvalidId(#[from] DocIdError),
    /// A value or an argument is not valid JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// An op is malformed (unknown, missing field, bad path).
    #[error(transparent)]
    InvalidOp(#[from] OpError),
    /// A well-formed op does not fit the document (for example `inc` on a string).
    #[error("{0}")]
    NotApplicable(String),
    /// A replacement document is not a valid document.
    #[error("{0}")]
    InvalidDocument(String),
    /// Bytes given to `load` are not a saved replica.
    #[error("cannot load replica: {0}")]
    InvalidSave(String),
    /// The node's answer is not a sync message, or its changes do not apply.
    #[error("invalid sync message from the node: {0}")]
    InvalidSyncMessage(String),
    /// The request did not reach the node, or its answer was lost. Retrying is safe.
    #[error("network: {0}")]
    Network(String),
    /// The node answered with an error.
    #[error("node answered {status} {code}: {message}")]
    Node {
        /// HTTP status.
        status: u16,
        /// The node's error code (`too_large`, `overloaded`, …).
        code: String,
        /// The node's message.
        message: String,
    },
    /// The exchange did not converge within the round-trip budget. Retrying is safe.
    #[error("sync did not converge after {0} round trips")]
    SyncIncomplete(u32),
    /// A thin replica does not write to a deleted or expired document (a full replica or a
    /// `PUT` starts it again).
    #[error(
        "document {0} is deleted or expired: a thin replica does not start it again; write it with a full replica or PUT"
    )]
    NotLive(String),
    /// A thin replica holds as many unsynced writes as one push carries: sync first.
    #[error(
        "{ops} ops in {batches} writes wait for a sync, as many as one sync carries: sync first"
    )]
    TooManyUnsynced {
        /// Unsynced ops.
        ops: usize,
        /// Unsynced writes (batches).
        batches: usize,
    },
    /// `sync_receive` was called without a `sync_begin`.
    #[error("no sync in progress")]
    NoSyncInProgress,
}

impl ClientError {
    /// The stable code of this error.
    pub fn code(&self) -> &str {
        match self {
            ClientError::InvalidId(_) => "invalid_id",
            ClientError::InvalidJson(_) => "invalid_json",
            ClientError::InvalidOp(_) => "invalid_op",
            ClientError::NotApplicable(_) => "op_not_applicable",
            ClientError::InvalidDocument(_) => "invalid_document",
            ClientError::InvalidSave(_) => "invalid_save",
            ClientError::InvalidSyncMessage(_) => "invalid_sync_message",
            ClientError::Network(_) => "network",
            ClientError::Node { code, .. } => code,
            ClientError::SyncIncomplete(_) => "sync_incomplete",
            ClientError::NoSyncInProgress => "no_sync_in_progress",
            ClientError::NotLive(_) => "document_not_live",
            ClientError::TooManyUnsynced { .. } => "too_many_unsynced",
        }
    }

    /// The error for a non-`200` answer of the node: its JSON `{"error": {"code", "message"}}`
    /// when the body is one, the status alone otherwise.
    pub fn from_response(status: u16, body: &[u8]) -> Self {
        let parsed: Option<(String, String)> = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?;
                Some((
                    e.get("code")?.as_str()?.to_owned(),
                    e.get("message")?.as_str().unwrap_or_default().to_owned(),
                ))
            });
        let (code, message) = parsed.unwrap_or_else(|| {
            (
                "http".to_owned(),
                String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            )
        });
        ClientError::Node {
            status,
            code,
            message,
        }
    }

    /// Whether retrying the same call may succeed: the fault was on the way, not in the call.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Network(_) | ClientError::SyncIncomplete(_) => true,
            ClientError::Node { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

impl From<ApplyError> for ClientError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::InvalidDocument(m) => ClientError::InvalidDocument(m),
            other => ClientError::NotApplicable(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_node() {
        assert_eq!(
            ClientError::from(DocIdError::Empty).code(),
            "invalid_id",
            "the node answers invalid_id for the same fault"
        );
        let node = ClientError::Node {
            status: 503,
            code: "overloaded".into(),
            message: "later".into(),
        };
        assert_eq!(node.code(), "overloaded");
        assert!(node.is_retryable());
        assert!(!ClientError::InvalidJson("x".into()).is_retryable());
    }
}
