//! `GET /v1/watch`: committed changes as server-sent events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, AppState};
use crate::metrics::Metrics;

/// Interval of keep-alive comments on an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Decrements the watcher gauge when a stream ends.
struct WatcherGuard(Arc<Metrics>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.dec();
    }
}

/// `GET /v1/watch?prefix=P`. Without a prefix, a token with one prefix watches that prefix
/// (`scope`, set by the auth middleware).
pub async fn watch(
    State(state): State<Arc<AppState>>,
    Extension(stop): Extension<tokio::sync::watch::Receiver<bool>>,
    scope: Option<Extension<super::ScopePrefix>>,
    scoped: Option<Extension<super::Scoped>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::invalid_query(e.body_text()))?;
    if let Some(k) = params.keys().find(|k| k.as_str() != "prefix") {
        return Err(ApiError::invalid_query(format!(
            "unknown query parameter {k:?}"
        )));
    }
    let prefix = params
        .get("prefix")
        .filter(|p| !p.is_empty())
        .cloned()
        .or(scope.map(|Extension(super::ScopePrefix(p))| p))
        .unwrap_or_default();
    super::docs::check_prefix(&prefix)?;
    // The buffer is shared by every watcher, so the number missed counts changes to every
    // document: a token that does not reach them all is not told it (it would learn the write
    // volume outside its prefixes).
    let reveal_missed = scoped.is_none();
    let rx = state.docs.subscribe();
    state.metrics.watchers.inc();
    let guard = WatcherGuard(Arc::clone(&state.metrics));
    let events = stream::unfold(
        (rx, prefix, guard, stop),
        move |(mut rx, prefix, guard, mut stop)| async move {
            loop {
                let received = tokio::select! {
                    biased;
                    received = rx.recv() => received,
                    _ = stop.wait_for(|stop| *stop) => return None,
                };
                match received {
                    Ok(event) if event.id.starts_with(&prefix) => {
                        let data = match serde_json::to_string(&*event) {
                            Ok(data) => data,
                            Err(e) => {
                                tracing::error!(error = %e, "a change event does not serialise; skipped");
                                continue;
                            }
                        };
                        let sse = Event::default().event("change").data(data);
                        return Some((Ok(sse), (rx, prefix, guard, stop)));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => {
                        guard.0.watch_lagged.inc_by(missed);
                        let sse = Event::default()
                            .event("lagged")
                            .data(json!({ "missed": reveal_missed.then_some(missed) }).to_string());
                        return Some((Ok(sse), (rx, prefix, guard, stop)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
