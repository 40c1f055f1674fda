//! Node-level routes: status, probes, metrics and the fallbacks.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use super::{ApiError, AppState};

/// `GET /v1/status`.
pub async fn status(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let docs = state.docs.doc_count().map_err(ApiError::from)?;
    let feed_last = state.docs.feed_bounds().map_err(ApiError::from)?.last;
    let mut members = vec![json!({
        "node_id": state.node_id,
        "addr": state.replication.as_ref().map(|r| r.local_addr().to_string()),
        "api_addr": state.api_addr,
        "state": "self",
        "rtt_ms": null,
        "lag_batches": 0,
    })];
    if let Some(repl) = &state.replication {
        members.extend(repl.members().into_iter().map(|m| {
            json!({
                "node_id": m.name,
                "addr": m.addr,
                "state": m.state,
                "rtt_ms": m.rtt_ms,
                "lag_batches": m.lag_batches,
                "last_sync_ms": m.last_sync_ms,
                "clock_offset_ms": m.clock_offset_ms,
                "seed": m.seed,
            })
        }));
    }
    Ok(Json(json!({
        "node_id": state.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_ms": state.clock.now_ms().saturating_sub(state.started_at_ms),
        "actor": state.docs.actor().to_hex_string(),
        "docs": docs,
        "write_queue_depth": state.docs.queue_depth(),
        "storage": {
            "read_only": state.docs.space().full(),
            "free_bytes": Some(state.docs.space().free_bytes()).filter(|b| *b < u64::MAX),
            "min_free_bytes": state.docs.space().min_free_bytes(),
        },
        "members": members,
        "departed": state.replication.as_ref().map(|r| r.departed()).unwrap_or_default(),
        "feed_last_seq": feed_last,
        "subscriptions": state.subscriptions.status(feed_last),
        "backup": state.backup.as_ref().map(|b| b.status()),
    })))
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: storage is open and the node serves. A node refusing writes for lack of
/// disk space still serves reads, so it stays ready and says so: a load balancer must not turn
/// a full disk into an outage.
pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        if state.docs.space().full() {
            (StatusCode::OK, "ready (read-only: disk nearly full)")
        } else {
            (StatusCode::OK, "ready")
        }
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state
        .metrics
        .write_queue_depth
        .set(state.docs.queue_depth() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Any route that does not exist.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see docs/api.md")
}

/// Any request but a probe on a connection beyond a connection limit (`503`, then the
/// connection closes).
pub async fn too_many_connections() -> impl IntoResponse {
    let error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "the node has too many open API connections",
    );
    (
        [(header::RETRY_AFTER, "1"), (header::CONNECTION, "close")],
        error,
    )
}

/// A route that exists, called with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}
