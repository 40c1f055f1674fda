//! Admin routes that change the node's place in the cluster: `POST /v1/admin/leave` and
//! `POST /v1/admin/members/forget` (docs/operations.md, "Retiring a node").

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use verge_core::membership::ForgetError;

use super::{ApiError, AppState};
use crate::replication::{MembersError, Replication};

/// The body of `POST /v1/admin/members/forget`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgetRequest {
    /// The member's gossip address, as status lists it.
    addr: String,
}

fn replication(state: &AppState) -> Result<&Arc<Replication>, ApiError> {
    state.replication.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_cluster",
            "this node does not replicate",
        )
    })
}

fn members_error(e: MembersError) -> ApiError {
    match e {
        MembersError::AlreadyLeft => ApiError::new(
            StatusCode::CONFLICT,
            "already_left",
            "this node already left the cluster and is stopping",
        ),
        MembersError::Forget(ForgetError::Itself(addr)) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "cannot_forget_self",
            format!(
                "{addr} is this node's own address; to retire this node, run `verge leave` against it"
            ),
        ),
        MembersError::Forget(ForgetError::NotMember(addr)) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_a_member",
            format!("{addr} is not a member of the cluster (see `verge status`)"),
        ),
        MembersError::Stopping => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the node is stopping",
        ),
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            other.to_string(),
        ),
    }
}

/// `POST /v1/admin/leave`: announces this node's departure to the cluster, then stops the
/// node as SIGTERM does (draining requests and the write queue). Answers once the
/// announcement is out, with the members that confirmed it.
pub async fn leave(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let repl = replication(&state)?;
    let report = repl.leave().await.map_err(members_error)?;
    // The drain starts now; this answer still goes out (open requests are let finish).
    state.leave_requested.notify_one();
    Ok(Json(json!({
        "left": true,
        "node_id": state.node_id,
        "addr": repl.local_addr().to_string(),
        "told": report.told,
        "unconfirmed": report.unconfirmed,
        "stopping": true,
    })))
}

/// `POST /v1/admin/members/forget` `{"addr": "IP:PORT"}`: drops a member that will never
/// return, here and, as the news spreads, on every member.
pub async fn forget(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    // Whatever the content type says: `curl -d` sends a form's.
    let request: ForgetRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid_json(format!("the body must be {{\"addr\": \"IP:PORT\"}}: {e}"))
    })?;
    let addr: SocketAddr = request.addr.trim().parse().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_addr",
            format!("{:?} is not an IP:PORT gossip address ({e})", request.addr),
        )
    })?;
    let repl = replication(&state)?;
    let departure = repl.forget(addr).await.map_err(members_error)?;
    Ok(Json(json!({
        "forgotten": addr.to_string(),
        "generation": departure.generation,
    })))
}
