//! Prometheus metrics of a node, served at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a request counter: route template and status code.
pub type RequestLabels = Vec<(&'static str, String)>;
/// Labels of the HTTP request counter: route template and status code, both static.
pub type HttpLabels = [(&'static str, &'static str); 2];
/// Labels naming what kind of input failed to decode.
pub type KindLabels = Vec<(&'static str, &'static str)>;

/// Every metric a node exports. Cheap to update from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Acknowledged document writes (PUT, PATCH, DELETE).
    pub writes: Counter,
    /// Document reads.
    pub reads: Counter,
    /// Sync requests served.
    pub sync_requests: Counter,
    /// Thin replicas' pushes served (`POST /v1/ops/{id}`).
    pub thin_pushes: Counter,
    /// Changes built from thin replicas' ops (a retried push builds its changes again).
    pub thin_changes_built: Counter,
    /// Thin pushes whose changes did not apply (answered `catching_up`).
    pub thin_not_applied: Counter,
    /// Thin pushes made again because the document moved to a new generation while they were
    /// made (built a second time on the generation it left).
    pub thin_rebuilt: Counter,
    /// Sync message bytes received.
    pub sync_bytes_received: Counter,
    /// Sync message bytes sent.
    pub sync_bytes_sent: Counter,
    /// Inputs rejected while decoding, by kind (json, ops, sync, id, query).
    pub decode_errors: Family<KindLabels, Counter>,
    /// Writes with an idempotency key that did not write: `replayed` (the same request again),
    /// `reused` (the key on another request), `in_flight` (its first request still writing).
    pub idempotency: Family<KindLabels, Counter>,
    /// Idempotency records dropped by age or count.
    pub idempotency_trimmed: Counter,
    /// Events delivered to each webhook subscription.
    pub subscription_delivered: Family<crate::subscriptions::SubLabels, Counter>,
    /// Failed tries of webhook deliveries, per subscription.
    pub subscription_failures: Family<crate::subscriptions::SubLabels, Counter>,
    /// Times a subscription's cursor was older than the feed keeps (events lost to retention).
    pub subscription_resets: Family<crate::subscriptions::SubLabels, Counter>,
    /// Feed records after each subscription's cursor.
    pub subscription_lag: Family<crate::subscriptions::SubLabels, Gauge>,
    /// Jobs waiting for the writer.
    pub write_queue_depth: Gauge,
    /// Writes refused because the queue was full.
    pub write_queue_full: Counter,
    /// Durable transactions: how many writes each carried.
    pub commit_batch_size: Histogram,
    /// Durable transactions: how long each took, fsync included.
    pub commit_seconds: Histogram,
    /// Transactions that failed.
    pub commit_errors: Counter,
    /// Documents held in memory.
    pub cache_docs: Gauge,
    /// Estimated bytes of documents held in memory.
    pub cache_bytes: Gauge,
    /// Document lookups served from memory.
    pub cache_hits: Counter,
    /// Document lookups that loaded from disk.
    pub cache_misses: Counter,
    /// Snapshots rewritten: a document's change rows folded into its stored snapshot.
    pub snapshot_rewrites: Counter,
    /// Generations started here: a document's history folded into a new root.
    pub compactions: Counter,
    /// Generations another node started that this node moved to.
    pub generation_adoptions: Counter,
    /// Changes carried onto a new generation (compacting or adopting).
    pub carried_changes: Counter,
    /// New generations this node could not move to (it lacks their compaction point while it
    /// holds changes of its own generation): the document waits on the older generation.
    pub compaction_stragglers: Counter,
    /// Sync messages that carried changes of an older generation (refused; the sender carries
    /// them when it moves).
    pub sync_stale_generation: Counter,
    /// Client syncs whose changes of an earlier generation this node carried onto the current
    /// one (answered `changes_carried`).
    pub stale_carried: Counter,
    /// Client syncs and thin pushes whose changes of an earlier generation could not be carried
    /// (generation not retained, or a dependency missing; answered `document_compacted`).
    pub stale_not_carried: Counter,
    /// `GET ?after=` reads answered `504 not_yet_replicated`.
    pub not_yet_replicated: Counter,
    /// Retained generations deleted once `[compaction] retain_previous_s` passed.
    pub retained_released: Counter,
    /// Client syncs refused because the client's copy is of a generation this node has not
    /// reached yet.
    pub sync_generation_ahead: Counter,
    /// Documents purged after expiry or tombstone retention.
    pub purged_docs: Counter,
    /// Purge passes completed (each scans every document once).
    pub purge_rounds: Counter,
    /// Documents whose history a newer incarnation replaced (a revival, or one received).
    pub incarnations_replaced: Counter,
    /// Sync messages that carried changes of an older incarnation (dropped).
    pub sync_stale_incarnation: Counter,
    /// Open watch streams.
    pub watchers: Gauge,
    /// Watch streams told to `reset`: they asked to resume before the oldest record the feed
    /// keeps, or after a number this node never gave.
    pub watch_resets: Counter,
    /// The last number the change feed gave.
    pub feed_last_seq: Gauge,
    /// Feed records dropped by age (`[feed] retain_hours`).
    pub feed_trimmed: Counter,
    /// Backup snapshots written.
    pub backup_snapshots: Counter,
    /// Backup segments written.
    pub backup_segments: Counter,
    /// Bytes of backup objects written.
    pub backup_bytes: Counter,
    /// Failed backup steps (each is retried).
    pub backup_failures: Counter,
    /// The feed position backups reached.
    pub backup_shipped_seq: Gauge,
    /// Feed records committed but not yet shipped, as of the last shipping.
    pub backup_lag_records: Gauge,
    /// When a backup object was last written, Unix seconds.
    pub backup_last_success: Gauge,
    /// Changes not broadcast because a replication queue (local changes, or batches waiting
    /// for the relay's window) was full.
    pub broadcast_dropped: Counter,
    /// Broadcast batches sent to peers.
    pub gossip_batches_sent: Counter,
    /// Broadcast batches received from peers.
    pub gossip_batches_received: Counter,
    /// Changes received from peers that were new here.
    pub gossip_changes_applied: Counter,
    /// Frames written to peers, by message kind: the cost of replication in messages
    /// (`changes` over `writes` is the broadcast's messages per write).
    pub peer_messages_sent: Family<KindLabels, Counter>,
    /// Frames or connections from peers refused (bad TLS, malformed frames), by kind.
    pub peer_refused: Family<KindLabels, Counter>,
    /// Anti-entropy sessions run, by outcome.
    pub anti_entropy_sessions: Family<KindLabels, Counter>,
    /// Documents synced by anti-entropy.
    pub anti_entropy_docs: Counter,
    /// Bytes of reconciliation messages exchanged.
    pub anti_entropy_bytes: Counter,
    /// Duration of digest reconciliation (finding what differs), per session.
    pub anti_entropy_reconcile_seconds: Histogram,
    /// Peers currently reachable.
    pub peers_up: Gauge,
    /// Peers currently unreachable. A departed member (left, or forgotten) is not a peer: it
    /// counts neither up nor down.
    pub peers_down: Gauge,
    /// Members that departed, by reason (`left`: announced their own departure; `forgotten`:
    /// an operator declared them gone), as this node learned of them.
    pub members_departed: Family<KindLabels, Counter>,
    /// QUIC connections this node attempted to peers (successful or not): it stays flat while
    /// every member is connected, and a departed member is never dialled.
    pub peer_dials: Counter,
    /// Batches the relay did not take in time, sent to every peer by their origin instead.
    pub relay_fallbacks: Counter,
    /// Reads of stored documents that did not load (a damaged store).
    pub documents_unreadable: Counter,
    /// API requests whose handler panicked (answered `500 internal`).
    pub api_panics: Counter,
    /// Free bytes on the data directory's filesystem, as last measured.
    pub storage_free_bytes: Gauge,
    /// 1 while writes are refused for lack of free space.
    pub storage_read_only: Gauge,
    /// The largest distance between a peer's wall clock and this node's, as last measured.
    pub peer_clock_offset_max_ms: Gauge,
    /// Times a peer's clock was found beyond the warning bound.
    pub peer_clock_skews: Counter,
    /// API requests refused with 401 or 403, by reason.
    pub auth_failures: Family<KindLabels, Counter>,
    /// Open API connections.
    pub api_connections: Gauge,
    /// API connections refused, by the limit they met (`node` or `client`).
    pub api_connections_refused: Family<KindLabels, Counter>,
    /// API connections and requests cut off by a timeout, by kind (`header`, `body`, `idle`).
    pub api_timeouts: Family<KindLabels, Counter>,
    /// API requests refused with 429, by token name.
    pub rate_limited: Family<RequestLabels, Counter>,
}

impl Metrics {
    /// Creates and registers every metric under the `verge_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("verge");
        let m = Self {
            http_requests: Family::default(),
            writes: Counter::default(),
            reads: Counter::default(),
            sync_requests: Counter::default(),
            thin_pushes: Counter::default(),
            thin_changes_built: Counter::default(),
            thin_not_applied: Counter::default(),
            thin_rebuilt: Counter::default(),
            sync_bytes_received: Counter::default(),
            sync_bytes_sent: Counter::default(),
            decode_errors: Family::default(),
            idempotency: Family::default(),
            idempotency_trimmed: Counter::default(),
            subscription_delivered: Family::default(),
            subscription_failures: Family::default(),
            subscription_resets: Family::default(),
            subscription_lag: Family::default(),
            write_queue_depth: Gauge::default(),
            write_queue_full: Counter::default(),
            commit_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            commit_errors: Counter::default(),
            cache_docs: Gauge::default(),
            cache_bytes: Gauge::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            snapshot_rewrites: Counter::default(),
            compactions: Counter::default(),
            generation_adoptions: Counter::default(),
            carried_changes: Counter::default(),
            compaction_stragglers: Counter::default(),
            sync_stale_generation: Counter::default(),
            sync_generation_ahead: Counter::default(),
            stale_carried: Counter::default(),
            stale_not_carried: Counter::default(),
            not_yet_replicated: Counter::default(),
            retained_released: Counter::default(),
            purged_docs: Counter::default(),
            purge_rounds: Counter::default(),
            incarnations_replaced: Counter::default(),
            sync_stale_incarnation: Counter::default(),
            watchers: Gauge::default(),
            watch_resets: Counter::default(),
            feed_last_seq: Gauge::default(),
            feed_trimmed: Counter::default(),
            backup_snapshots: Counter::default(),
            backup_segments: Counter::default(),
            backup_bytes: Counter::default(),
            backup_failures: Counter::default(),
            backup_shipped_seq: Gauge::default(),
            backup_lag_records: Gauge::default(),
            backup_last_success: Gauge::default(),
            broadcast_dropped: Counter::default(),
            gossip_batches_sent: Counter::default(),
            gossip_batches_received: Counter::default(),
            gossip_changes_applied: Counter::default(),
            peer_messages_sent: Family::default(),
            peer_refused: Family::default(),
            anti_entropy_sessions: Family::default(),
            anti_entropy_docs: Counter::default(),
            anti_entropy_bytes: Counter::default(),
            anti_entropy_reconcile_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            peers_up: Gauge::default(),
            peers_down: Gauge::default(),
            members_departed: Family::default(),
            peer_dials: Counter::default(),
            peer_clock_offset_max_ms: Gauge::default(),
            storage_free_bytes: Gauge::default(),
            documents_unreadable: Counter::default(),
            relay_fallbacks: Counter::default(),
            api_panics: Counter::default(),
            storage_read_only: Gauge::default(),
            peer_clock_skews: Counter::default(),
            auth_failures: Family::default(),
            api_connections: Gauge::default(),
            api_connections_refused: Family::default(),
            api_timeouts: Family::default(),
            rate_limited: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            m.http_requests.clone(),
        );
        registry.register("writes", "Acknowledged document writes", m.writes.clone());
        registry.register("reads", "Document reads", m.reads.clone());
        registry.register(
            "sync_requests",
            "Sync requests served",
            m.sync_requests.clone(),
        );
        registry.register(
            "thin_pushes",
            "Thin replicas' pushes served",
            m.thin_pushes.clone(),
        );
        registry.register(
            "thin_changes_built",
            "Changes built from thin replicas' ops",
            m.thin_changes_built.clone(),
        );
        registry.register(
            "thin_not_applied",
            "Thin pushes whose changes did not apply",
            m.thin_not_applied.clone(),
        );
        registry.register(
            "thin_rebuilt",
            "Thin pushes made again after the document moved to a new generation meanwhile",
            m.thin_rebuilt.clone(),
        );
        registry.register(
            "sync_received_bytes",
            "Sync message bytes received",
            m.sync_bytes_received.clone(),
        );
        registry.register(
            "sync_sent_bytes",
            "Sync message bytes sent",
            m.sync_bytes_sent.clone(),
        );
        registry.register(
            "decode_errors",
            "Inputs rejected while decoding, by kind",
            m.decode_errors.clone(),
        );
        registry.register(
            "idempotent_writes",
            "Writes with an Idempotency-Key that wrote nothing, by kind: replayed, reused, in_flight",
            m.idempotency.clone(),
        );
        registry.register(
            "subscription_delivered",
            "Events delivered to each webhook subscription",
            m.subscription_delivered.clone(),
        );
        registry.register(
            "subscription_failures",
            "Failed tries of webhook deliveries, per subscription",
            m.subscription_failures.clone(),
        );
        registry.register(
            "subscription_resets",
            "Times a subscription's cursor was older than the change feed keeps",
            m.subscription_resets.clone(),
        );
        registry.register(
            "subscription_lag",
            "Change feed records after each subscription's cursor",
            m.subscription_lag.clone(),
        );
        registry.register(
            "idempotency_trimmed",
            "Idempotency records dropped by age or count ([idempotency])",
            m.idempotency_trimmed.clone(),
        );
        registry.register(
            "write_queue_depth",
            "Writes waiting for the writer",
            m.write_queue_depth.clone(),
        );
        registry.register(
            "write_queue_full",
            "Writes refused because the queue was full",
            m.write_queue_full.clone(),
        );
        registry.register(
            "commit_batch_size",
            "Writes per durable transaction",
            m.commit_batch_size.clone(),
        );
        registry.register(
            "commit_seconds",
            "Duration of durable transactions",
            m.commit_seconds.clone(),
        );
        registry.register(
            "commit_errors",
            "Failed durable transactions",
            m.commit_errors.clone(),
        );
        registry.register(
            "cache_docs",
            "Documents held in memory",
            m.cache_docs.clone(),
        );
        registry.register(
            "cache_bytes",
            "Estimated bytes of documents in memory",
            m.cache_bytes.clone(),
        );
        registry.register(
            "cache_hits",
            "Document lookups served from memory",
            m.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Document lookups loaded from disk",
            m.cache_misses.clone(),
        );
        registry.register(
            "snapshot_rewrites",
            "Snapshots rewritten: change rows folded into a document's stored snapshot",
            m.snapshot_rewrites.clone(),
        );
        registry.register(
            "compactions",
            "Generations started here: a document's history folded into a new root",
            m.compactions.clone(),
        );
        registry.register(
            "generation_adoptions",
            "Generations another node started that this node moved to",
            m.generation_adoptions.clone(),
        );
        registry.register(
            "carried_changes",
            "Changes carried onto a new generation (compacting or adopting)",
            m.carried_changes.clone(),
        );
        registry.register(
            "compaction_stragglers",
            "New generations this node could not move to yet (it lacks their compaction point)",
            m.compaction_stragglers.clone(),
        );
        registry.register(
            "sync_stale_generation",
            "Sync messages that carried changes of an older generation (refused)",
            m.sync_stale_generation.clone(),
        );
        registry.register(
            "stale_carried",
            "Client syncs whose changes of an earlier generation were carried onto the current one",
            m.stale_carried.clone(),
        );
        registry.register(
            "stale_not_carried",
            "Client syncs and thin pushes whose changes of an earlier generation could not be carried",
            m.stale_not_carried.clone(),
        );
        registry.register(
            "not_yet_replicated",
            "Reads with after= that timed out before this node held the heads",
            m.not_yet_replicated.clone(),
        );
        registry.register(
            "retained_released",
            "Retained generations deleted after compaction.retain_previous_s",
            m.retained_released.clone(),
        );
        registry.register(
            "sync_generation_ahead",
            "Client syncs refused: the copy is of a generation this node has not reached",
            m.sync_generation_ahead.clone(),
        );
        registry.register(
            "purged_docs",
            "Documents purged after expiry or tombstone retention",
            m.purged_docs.clone(),
        );
        registry.register(
            "purge_rounds",
            "Purge passes completed",
            m.purge_rounds.clone(),
        );
        registry.register(
            "incarnations_replaced",
            "Documents whose history a newer incarnation replaced (a revival, or one received)",
            m.incarnations_replaced.clone(),
        );
        registry.register(
            "sync_stale_incarnation",
            "Sync messages and broadcasts carrying changes of an older incarnation, dropped",
            m.sync_stale_incarnation.clone(),
        );
        registry.register("watchers", "Open watch streams", m.watchers.clone());
        registry.register(
            "watch_resets",
            "Watch streams told to reset: their resume point is older than the feed keeps",
            m.watch_resets.clone(),
        );
        registry.register(
            "feed_last_seq",
            "The last sequence number the change feed gave",
            m.feed_last_seq.clone(),
        );
        registry.register(
            "feed_trimmed",
            "Change feed records dropped by age ([feed] retain_hours)",
            m.feed_trimmed.clone(),
        );
        registry.register(
            "backup_snapshots",
            "Backup snapshots written ([backup])",
            m.backup_snapshots.clone(),
        );
        registry.register(
            "backup_segments",
            "Backup segments of shipped changes written",
            m.backup_segments.clone(),
        );
        registry.register(
            "backup_bytes",
            "Bytes of backup objects written",
            m.backup_bytes.clone(),
        );
        registry.register(
            "backup_failures",
            "Failed backup steps; each is retried",
            m.backup_failures.clone(),
        );
        registry.register(
            "backup_shipped_seq",
            "The change feed position backups reached",
            m.backup_shipped_seq.clone(),
        );
        registry.register(
            "backup_lag_records",
            "Feed records committed but not yet shipped to the backup",
            m.backup_lag_records.clone(),
        );
        registry.register(
            "backup_last_success_timestamp_seconds",
            "When a backup object was last written",
            m.backup_last_success.clone(),
        );
        registry.register(
            "broadcast_dropped",
            "Changes not broadcast because a replication queue was full",
            m.broadcast_dropped.clone(),
        );
        registry.register(
            "gossip_batches_sent",
            "Broadcast batches sent to peers",
            m.gossip_batches_sent.clone(),
        );
        registry.register(
            "gossip_batches_received",
            "Broadcast batches received from peers",
            m.gossip_batches_received.clone(),
        );
        registry.register(
            "gossip_changes_applied",
            "Changes from peers that were new here",
            m.gossip_changes_applied.clone(),
        );
        registry.register(
            "peer_messages_sent",
            "Frames written to peers, by message kind",
            m.peer_messages_sent.clone(),
        );
        registry.register(
            "peer_refused",
            "Peer connections or frames refused, by kind",
            m.peer_refused.clone(),
        );
        registry.register(
            "anti_entropy_sessions",
            "Anti-entropy sessions, by outcome",
            m.anti_entropy_sessions.clone(),
        );
        registry.register(
            "members_departed",
            "Members that departed (left, or forgotten by an operator), by reason",
            m.members_departed.clone(),
        );
        registry.register(
            "peer_dials",
            "QUIC connections attempted to peers",
            m.peer_dials.clone(),
        );
        registry.register(
            "anti_entropy_docs",
            "Documents synced by anti-entropy",
            m.anti_entropy_docs.clone(),
        );
        registry.register(
            "anti_entropy_bytes",
            "Bytes of reconciliation messages exchanged",
            m.anti_entropy_bytes.clone(),
        );
        registry.register(
            "anti_entropy_reconcile_seconds",
            "Duration of digest reconciliation per anti-entropy session",
            m.anti_entropy_reconcile_seconds.clone(),
        );
        registry.register("peers_up", "Peers currently reachable", m.peers_up.clone());
        registry.register(
            "relay_fallbacks",
            "Batches the relay did not confirm in time, sent to every peer by their origin instead",
            m.relay_fallbacks.clone(),
        );
        registry.register(
            "documents_unreadable",
            "Reads of stored documents that did not load (a damaged store; see verge check)",
            m.documents_unreadable.clone(),
        );
        registry.register(
            "api_panics",
            "API requests whose handler panicked, answered 500 internal",
            m.api_panics.clone(),
        );
        registry.register(
            "storage_free_bytes",
            "Free bytes on the data directory's filesystem, as last measured",
            m.storage_free_bytes.clone(),
        );
        registry.register(
            "storage_read_only",
            "1 while writes are refused because free space is below min_free_bytes",
            m.storage_read_only.clone(),
        );
        registry.register(
            "peer_clock_offset_max_ms",
            "The largest distance between a peer's wall clock and this node's, as last measured",
            m.peer_clock_offset_max_ms.clone(),
        );
        registry.register(
            "peer_clock_skews",
            "Times a peer's wall clock was found further than 2 s from this node's",
            m.peer_clock_skews.clone(),
        );
        registry.register(
            "peers_down",
            "Peers currently unreachable",
            m.peers_down.clone(),
        );
        registry.register(
            "auth_failures",
            "API requests refused with 401 or 403, by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "api_connections",
            "Open API connections",
            m.api_connections.clone(),
        );
        registry.register(
            "api_connections_refused",
            "API connections refused because api_connections_max (limit=node) or \
             api_connections_per_client_max (limit=client) were open",
            m.api_connections_refused.clone(),
        );
        registry.register(
            "api_timeouts",
            "API connections closed (header, idle) or requests answered 408 (body) for a timeout",
            m.api_timeouts.clone(),
        );
        registry.register(
            "rate_limited",
            "API requests refused with 429 rate_limited, by token",
            m.rate_limited.clone(),
        );
        // Series with known labels start at 0, so that dashboards and alerts see a zero
        // rather than no data before the first event.
        for kind in ["body", "document", "id", "json", "ops", "query", "sync"] {
            let _ = m.decode_errors.get_or_create(&vec![("kind", kind)]);
        }
        for reason in ["missing", "malformed", "unknown_token", "role", "prefix"] {
            let _ = m.auth_failures.get_or_create(&vec![("reason", reason)]);
        }
        for outcome in ["ok", "error"] {
            let _ = m
                .anti_entropy_sessions
                .get_or_create(&vec![("outcome", outcome)]);
        }
        for reason in ["left", "forgotten"] {
            let _ = m.members_departed.get_or_create(&vec![("reason", reason)]);
        }
        Self { registry, ..m }
    }

    /// Counts a refused peer connection or frame.
    pub fn peer_refused(&self, kind: &'static str) {
        self.peer_refused.get_or_create(&vec![("kind", kind)]).inc();
    }

    /// Counts a frame written to a peer, by message kind.
    pub fn peer_message_sent(&self, kind: &'static str) {
        self.peer_messages_sent
            .get_or_create(&vec![("kind", kind)])
            .inc();
    }

    /// Counts a member that departed, by reason.
    pub fn member_departed(&self, reason: &'static str) {
        self.members_departed
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts an anti-entropy session by outcome.
    pub fn anti_entropy_session(&self, outcome: &'static str) {
        self.anti_entropy_sessions
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Counts a served HTTP request.
    pub fn http_request(&self, route: &'static str, status: u16) {
        let status = match status {
            200 => "200",
            400 => "400",
            401 => "401",
            403 => "403",
            404 => "404",
            405 => "405",
            413 => "413",
            422 => "422",
            429 => "429",
            500 => "500",
            503 => "503",
            504 => "504",
            _ => "other",
        };
        self.http_requests
            .get_or_create(&[("route", route), ("status", status)])
            .inc();
    }

    /// Counts a connection refused by `limit`.
    pub fn api_connection_refused(&self, limit: crate::http::serve::Refused) {
        self.api_connections_refused
            .get_or_create(&vec![("limit", limit.label())])
            .inc();
    }

    /// The counter of API timeouts of `kind`, to hand to what enforces them.
    pub fn api_timeout(&self, kind: &'static str) -> Counter {
        self.api_timeouts
            .get_or_create(&vec![("kind", kind)])
            .clone()
    }

    /// Counts a write with an idempotency key that wrote nothing, by why.
    pub fn idempotency(&self, kind: &'static str) {
        self.idempotency.get_or_create(&vec![("kind", kind)]).inc();
    }

    /// Counts an input rejected while decoding.
    pub fn decode_error(&self, kind: &'static str) {
        self.decode_errors
            .get_or_create(&vec![("kind", kind)])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() {
        let m = Metrics::new();
        m.writes.inc();
        m.decode_error("json");
        m.peer_message_sent("changes");
        m.peer_message_sent("changes");
        let text = m.render();
        assert!(text.contains("verge_writes_total 1"), "{text}");
        assert!(
            text.contains("verge_decode_errors_total{kind=\"json\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("verge_peer_messages_sent_total{kind=\"changes\"} 2"),
            "{text}"
        );
        assert!(text.contains("# EOF"));
    }
}
