//! `GET /v1/watch`: the change feed as server-sent events, resumable.
//!
//! Each event carries the feed's sequence number as its SSE `id`. A watcher that resumes with
//! `?since=SEQ` or the `Last-Event-ID` header (which browsers' `EventSource` sends on
//! reconnect) gets every change after SEQ, in order, without gap or repeat, also across a
//! restart of the node: what it missed is read from the store, then it follows the live
//! broadcast. A watcher that falls behind the live broadcast reads the store again, so a slow
//! watcher is never told to re-read everything while the feed still holds what it missed. Only a
//! resume point the feed no longer holds (older than `[feed]` retention, or a number this node
//! never gave) gets `event: reset`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::json;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use verge_core::{DocId, heads_to_hex};

use super::{ApiError, AppState};
use crate::documents::{DocError, Documents};
use crate::metrics::Metrics;
use crate::store::{FeedBounds, FeedEvent};

/// Interval of keep-alive comments on an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Feed records read from the store at a time while a watcher catches up.
const CATCH_UP_PAGE: usize = 256;
/// Bytes of events gathered into one chunk of the stream: what is ready is sent in one write,
/// not one per event (a busy node with many watchers would otherwise spend itself on writes).
const CHUNK_BYTES: usize = 64 * 1024;
/// Under load, the least time between two chunks of one stream: a busy node sends each
/// watcher what gathered in this time in one write (and wakes it once), instead of a write per
/// commit. An event after a quiet spell goes at once.
const COALESCE: Duration = Duration::from_millis(10);
/// Longest sequence number accepted in `since` or `Last-Event-ID` (`u64::MAX` has 20 digits).
const SEQ_DIGITS_MAX: usize = 20;

/// Decrements the watcher gauge when a stream ends.
struct WatcherGuard(Arc<Metrics>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.dec();
    }
}

/// What a watch stream sends.
#[derive(Debug, Clone)]
enum WatchItem {
    /// A change to a document under the prefix.
    Change(Arc<FeedEvent>),
    /// The resume point asked is not in the feed: re-read, then follow from `last`.
    Reset(FeedBounds),
}

/// Where a stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// After this number, reading what follows from the store first.
    After(u64),
    /// Told to reset, then after `bounds.last`.
    Reset(FeedBounds),
}

/// Where a stream asking to resume after `since` (or to follow from now, `None`) starts, given
/// what the feed holds.
fn start(since: Option<u64>, bounds: FeedBounds) -> Start {
    let Some(since) = since else {
        return Start::After(bounds.last);
    };
    // The feed holds `first..=last`; a resume point before `first - 1` lost records to
    // retention, one past `last` is another node's (or another store's) number.
    let oldest_resumable = bounds.first.map_or(bounds.last, |first| first - 1);
    if since < oldest_resumable || since > bounds.last {
        Start::Reset(bounds)
    } else {
        Start::After(since)
    }
}

/// A stream's state between items.
struct Follow {
    docs: Arc<Documents>,
    rx: broadcast::Receiver<Arc<FeedEvent>>,
    prefix: String,
    /// The last number seen (sent or filtered out).
    after: u64,
    /// Whether what follows `after` is read from the store (catching up) rather than the
    /// live broadcast.
    from_store: bool,
    queued: VecDeque<WatchItem>,
    stop: tokio::sync::watch::Receiver<bool>,
    /// When the last chunk was sent.
    sent_at: Option<tokio::time::Instant>,
}

impl Follow {
    /// The next item, or `None` when the node stops or the store cannot be read.
    async fn next(&mut self) -> Option<WatchItem> {
        loop {
            if let Some(item) = self.ready()? {
                return Some(item);
            }
            if self.from_store {
                // A page outside the prefix: let other tasks run before the next (a watcher
                // scanning a long feed must not hold a runtime thread).
                tokio::task::yield_now().await;
                continue;
            }
            let received = tokio::select! {
                biased;
                _ = self.stop.wait_for(|stop| *stop) => return None,
                received = self.rx.recv() => received,
            };
            if let Some(item) = self.take(received)? {
                return Some(item);
            }
        }
    }

    /// The next item if one is ready without waiting: `Some(None)` when none is, `None` when
    /// the stream ends.
    fn try_next(&mut self) -> Option<Option<WatchItem>> {
        loop {
            if let Some(item) = self.ready()? {
                return Some(Some(item));
            }
            if self.from_store {
                return Some(None);
            }
            let received = match self.rx.try_recv() {
                Ok(event) => Ok(event),
                Err(TryRecvError::Empty) => return Some(None),
                Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => Err(RecvError::Closed),
            };
            if let Some(item) = self.take(received)? {
                return Some(Some(item));
            }
        }
    }

    /// A queued item, or one page of the store read while catching up: `Some(None)` when
    /// nothing is ready yet, `None` when the store cannot be read.
    fn ready(&mut self) -> Option<Option<WatchItem>> {
        if let Some(item) = self.queued.pop_front() {
            return Some(Some(item));
        }
        if self.from_store {
            self.catch_up().ok()?;
        }
        Some(self.queued.pop_front())
    }

    /// What a received broadcast gives: `Some(None)` for nothing to send (another prefix, a
    /// number already sent, a lag to catch up from the store), `None` when the node stops.
    fn take(&mut self, received: Result<Arc<FeedEvent>, RecvError>) -> Option<Option<WatchItem>> {
        match received {
            Ok(event) if event.record.seq <= self.after => {}
            Ok(event) if event.record.seq == self.after + 1 => {
                self.after = event.record.seq;
                if event.record.id.starts_with(&self.prefix) {
                    return Some(Some(WatchItem::Change(event)));
                }
            }
            // A gap (records missed while lagging): the store has them.
            Ok(_) | Err(RecvError::Lagged(_)) => self.from_store = true,
            Err(RecvError::Closed) => return None,
        }
        Some(None)
    }

    /// Reads the next page after `after` from the store into `queued`; at the end of what the
    /// store holds, goes back to the live broadcast.
    fn catch_up(&mut self) -> Result<(), DocError> {
        let page = self
            .docs
            .feed_after(self.after, CATCH_UP_PAGE)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "reading the change feed failed; the watch stream ends");
            })?;
        let Some(first) = page.first() else {
            let bounds = self.docs.feed_bounds()?;
            if bounds.last > self.after {
                // Retention emptied the feed past this watcher while it caught up.
                self.queued.push_back(WatchItem::Reset(bounds));
                self.after = bounds.last;
            }
            self.from_store = false;
            return Ok(());
        };
        if first.seq != self.after + 1 {
            // Retention dropped records while this watcher was catching up.
            let bounds = self.docs.feed_bounds()?;
            self.queued.push_back(WatchItem::Reset(bounds));
            self.after = bounds.last;
            return Ok(());
        }
        for record in page {
            self.after = record.seq;
            if record.id.starts_with(&self.prefix) {
                self.queued
                    .push_back(WatchItem::Change(Arc::new(FeedEvent::new(record))));
            }
        }
        Ok(())
    }
}

/// Parses a sequence number given by a client.
fn parse_seq(raw: &str, what: &str) -> Result<u64, ApiError> {
    raw.trim()
        .parse::<u64>()
        .ok()
        .filter(|_| raw.trim().len() <= SEQ_DIGITS_MAX)
        .ok_or_else(|| {
            ApiError::invalid_query(format!(
                "{what} must be a sequence number (an event's id), got {:?}",
                raw.chars().take(40).collect::<String>()
            ))
        })
}

/// The data of a `change` event, with the document's JSON when asked.
fn change_data(docs: &Documents, event: &FeedEvent, include_doc: bool) -> Bytes {
    if !include_doc {
        return event.json().clone();
    }
    let record = &event.record;
    let mut data = json!({
        "seq": record.seq,
        "id": record.id,
        "heads": heads_to_hex(&record.heads),
        "deleted": record.deleted,
    });
    let doc = DocId::new(&record.id)
        .ok()
        .and_then(|id| match docs.read(&id) {
            Ok(body) => serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|mut body| body.get_mut("doc").map(serde_json::Value::take)),
            Err(DocError::NotFound(_)) => None,
            Err(e) => {
                tracing::warn!(id = %record.id, error = %e, "a watched document cannot be read");
                None
            }
        });
    data["doc"] = doc.unwrap_or(serde_json::Value::Null);
    Bytes::from(data.to_string())
}

/// Appends `item` to `out` as one server-sent event.
fn render(out: &mut Vec<u8>, item: &WatchItem, docs: &Documents, include_doc: bool) {
    let (seq, kind, data) = match item {
        WatchItem::Change(event) => (
            event.record.seq,
            "change",
            change_data(docs, event, include_doc),
        ),
        WatchItem::Reset(bounds) => (
            bounds.last,
            "reset",
            Bytes::from(json!({ "oldest": bounds.first, "last": bounds.last }).to_string()),
        ),
    };
    // The JSON holds no raw line break, so one `data:` line carries it.
    out.extend_from_slice(format!("id: {seq}\nevent: {kind}\ndata: ").as_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\n\n");
}

/// The next chunk of the stream: the next event, and whatever else is ready at once (up to
/// [`CHUNK_BYTES`]); a keep-alive comment after [`KEEP_ALIVE`] without one; `None` at the end.
async fn next_chunk(
    follow: &mut Follow,
    docs: &Documents,
    include_doc: bool,
    metrics: &Metrics,
) -> Option<Bytes> {
    let first = match tokio::time::timeout(KEEP_ALIVE, follow.next()).await {
        Err(_) => return Some(Bytes::from_static(b":\n\n")),
        Ok(item) => item?,
    };
    if let Some(sent_at) = follow.sent_at {
        // Busy: let what follows gather until COALESCE after the last chunk.
        tokio::time::sleep_until(sent_at + COALESCE).await;
    }
    follow.sent_at = Some(tokio::time::Instant::now());
    let mut out = Vec::new();
    let mut item = Some(first);
    while let Some(it) = item.take() {
        if matches!(it, WatchItem::Reset(_)) {
            metrics.watch_resets.inc();
        }
        render(&mut out, &it, docs, include_doc);
        if out.len() >= CHUNK_BYTES {
            break;
        }
        // The end of the stream after some events: send them; the next poll ends it.
        item = follow.try_next().flatten();
    }
    Some(Bytes::from(out))
}

/// `GET /v1/watch?prefix=P[&since=SEQ][&include=doc]`. Without a prefix, a token with one
/// prefix watches that prefix (`scope`, set by the auth middleware).
pub async fn watch(
    State(state): State<Arc<AppState>>,
    Extension(stop): Extension<tokio::sync::watch::Receiver<bool>>,
    scope: Option<Extension<super::ScopePrefix>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::invalid_query(e.body_text()))?;
    if let Some(k) = params
        .keys()
        .find(|k| !matches!(k.as_str(), "prefix" | "since" | "include"))
    {
        return Err(ApiError::invalid_query(format!(
            "unknown query parameter {k:?}"
        )));
    }
    let include_doc = match params.get("include").map(String::as_str) {
        None => false,
        Some("doc") => true,
        Some(other) => {
            return Err(ApiError::invalid_query(format!(
                "include must be \"doc\", got {:?}",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    let prefix = params
        .get("prefix")
        .filter(|p| !p.is_empty())
        .cloned()
        .or(scope.map(|Extension(super::ScopePrefix(p))| p))
        .unwrap_or_default();
    super::docs::check_prefix(&prefix)?;
    // A reconnecting `EventSource` repeats the URL it was opened with and adds the last id it
    // saw: the header is the newer resume point.
    let since = match headers.get("last-event-id") {
        Some(value) => Some(parse_seq(
            value
                .to_str()
                .map_err(|_| ApiError::invalid_query("Last-Event-ID is not ASCII"))?,
            "Last-Event-ID",
        )?),
        None => params
            .get("since")
            .map(|raw| parse_seq(raw, "since"))
            .transpose()?,
    };
    // Subscribed before the feed's bounds are read: a record committed in between arrives
    // live, and one already read is skipped by its number.
    let rx = state.docs.subscribe();
    let bounds = state.docs.feed_bounds()?;
    let mut follow = Follow {
        docs: Arc::clone(&state.docs),
        rx,
        prefix,
        after: bounds.last,
        from_store: false,
        queued: VecDeque::new(),
        stop,
        sent_at: None,
    };
    match start(since, bounds) {
        Start::After(after) => {
            follow.from_store = after < bounds.last;
            follow.after = after;
        }
        Start::Reset(bounds) => follow.queued.push_back(WatchItem::Reset(bounds)),
    }
    state.metrics.watchers.inc();
    let guard = WatcherGuard(Arc::clone(&state.metrics));
    let metrics = Arc::clone(&state.metrics);
    let docs = Arc::clone(&state.docs);
    let chunks = stream::unfold((follow, guard), move |(mut follow, guard)| {
        let metrics = Arc::clone(&metrics);
        let docs = Arc::clone(&docs);
        async move {
            let chunk = next_chunk(&mut follow, &docs, include_doc, &metrics).await?;
            Some((Ok::<_, Infallible>(chunk), (follow, guard)))
        }
    });
    let mut response = Body::from_stream(chunks).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(first: Option<u64>, last: u64) -> FeedBounds {
        FeedBounds { first, last }
    }

    /// Resuming inside what the feed holds (or right before its oldest record) goes on from
    /// there; before it, or past the last number given, is a reset.
    #[test]
    fn a_resume_point_the_feed_no_longer_holds_is_a_reset() {
        let held = bounds(Some(11), 20);
        assert_eq!(start(None, held), Start::After(20));
        assert_eq!(start(Some(10), held), Start::After(10));
        assert_eq!(start(Some(15), held), Start::After(15));
        assert_eq!(start(Some(20), held), Start::After(20));
        assert_eq!(start(Some(9), held), Start::Reset(held));
        assert_eq!(start(Some(21), held), Start::Reset(held));
        // A new feed resumes from 0; an emptied one only from its last number.
        assert_eq!(start(Some(0), bounds(None, 0)), Start::After(0));
        assert_eq!(start(Some(0), bounds(Some(1), 5)), Start::After(0));
        assert_eq!(start(Some(5), bounds(None, 5)), Start::After(5));
        assert_eq!(
            start(Some(4), bounds(None, 5)),
            Start::Reset(bounds(None, 5))
        );
    }

    #[test]
    fn sequence_numbers_are_parsed_strictly() {
        assert_eq!(parse_seq("42", "since").expect("a number"), 42);
        assert_eq!(parse_seq(" 7 ", "since").expect("trimmed"), 7);
        for bad in [
            "",
            "-1",
            "1.5",
            "0x10",
            "abc",
            "184467440737095516160",
            "1 2",
        ] {
            let e = parse_seq(bad, "since").expect_err(bad);
            assert_eq!(e.code(), "invalid_query", "{bad}");
        }
    }
}
