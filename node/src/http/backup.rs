//! `POST /v1/admin/backup` (a snapshot now) and `GET /v1/admin/backups` (what the location
//! holds): what `verge backup now|list` call.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::backup::restore::rfc3339;
use crate::backup::{Backup, BackupError};

fn configured(state: &AppState) -> Result<&Arc<Backup>, ApiError> {
    state.backup.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "backup_not_configured",
            BackupError::NotConfigured.to_string(),
        )
    })
}

fn failed(e: &BackupError) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "backup_failed", e.to_string())
}

/// Takes a snapshot and answers once it is written.
pub async fn now(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let backup = configured(&state)?;
    let shipped = backup.now().await.map_err(|e| failed(&e))?;
    Ok(Json(json!({
        "snapshot": shipped.name,
        "bytes": shipped.bytes,
        "documents": shipped.documents,
        "seq": shipped.seq,
        "at": rfc3339(shipped.at_ms),
    })))
}

/// Lists the location's snapshots and sums up its segments.
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let backup = configured(&state)?;
    let listing = backup.list().await.map_err(|e| failed(&e))?;
    let snapshots: Vec<Value> = listing
        .snapshots
        .iter()
        .map(|(n, bytes)| {
            json!({
                "name": n.path().to_string(),
                "seq": n.seq,
                "at": rfc3339(n.at_ms),
                "bytes": bytes,
            })
        })
        .collect();
    let segment_bytes: u64 = listing.segments.iter().map(|(_, b)| b).sum();
    Ok(Json(json!({
        "to": backup.status().to,
        "status": backup.status(),
        "snapshots": snapshots,
        "segments": {
            "count": listing.segments.len(),
            "bytes": segment_bytes,
            "first_at": listing.segments.first().map(|(n, _)| rfc3339(n.at_ms)),
            "last_at": listing.segments.last().map(|(n, _)| rfc3339(n.at_ms)),
            "last_seq": listing.segments.iter().map(|(n, _)| n.to).max(),
        },
    })))
}
