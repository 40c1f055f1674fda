//! `GET /v1/watch`: committed changes as server-sent events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::StreamExt;
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, AppState};
use crate::documents::ChangeEvent;
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

/// What a watch stream sends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WatchItem {
    /// A change event's JSON.
    Change(String),
    /// The watcher fell behind by this many changes (to any document).
    Lagged(u64),
}

/// The data of a `lagged` event: the count only when the watcher may know it (it covers every
/// document's changes, so a token that does not reach them all would learn the write volume
/// outside its prefixes).
fn lagged_data(missed: u64, reveal: bool) -> serde_json::Value {
    json!({ "missed": reveal.then_some(missed) })
}

/// The changes under `prefix` from `rx` until `stop`, and a `Lagged` item where the watcher
/// fell behind.
fn watch_items(
    rx: broadcast::Receiver<Arc<ChangeEvent>>,
    prefix: String,
    stop: tokio::sync::watch::Receiver<bool>,
    guard: impl Send + 'static,
) -> impl Stream<Item = WatchItem> {
    stream::unfold(
        (rx, prefix, guard, stop),
        |(mut rx, prefix, guard, mut stop)| async move {
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
                        return Some((WatchItem::Change(data), (rx, prefix, guard, stop)));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => {
                        return Some((WatchItem::Lagged(missed), (rx, prefix, guard, stop)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    )
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
    let metrics = Arc::clone(&state.metrics);
    let events = watch_items(rx, prefix, stop, guard).map(move |item| {
        Ok(match item {
            WatchItem::Change(data) => Event::default().event("change").data(data),
            WatchItem::Lagged(missed) => {
                metrics.watch_lagged.inc_by(missed);
                Event::default()
                    .event("lagged")
                    .data(lagged_data(missed, reveal_missed).to_string())
            }
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Arc<ChangeEvent> {
        Arc::new(ChangeEvent {
            id: id.into(),
            heads: Vec::new(),
            deleted: false,
        })
    }

    /// A watcher 3 events behind a buffer of 2 hears that it lagged, by a count of every
    /// prefix's changes: only a watcher whose token reaches every document is told it.
    #[tokio::test]
    async fn a_lagged_count_is_told_only_to_whom_may_know_it() {
        let (tx, rx) = broadcast::channel(2);
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let items = watch_items(rx, "cart/".into(), stop, ());
        for id in ["user/1", "user/2", "user/3", "cart/1", "user/4"] {
            tx.send(event(id)).expect("a receiver");
        }
        drop(tx);
        let items: Vec<WatchItem> = items.collect().await;
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[0], WatchItem::Lagged(3), "user/1..3 were missed");
        assert!(matches!(&items[1], WatchItem::Change(data) if data.contains("cart/1")));
        assert_eq!(lagged_data(3, true), json!({ "missed": 3 }));
        assert_eq!(lagged_data(3, false), json!({ "missed": null }));
    }
}
