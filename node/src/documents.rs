//! The document service: every read, write and sync of a node goes through here.
//!
//! A write locks the document's slot, applies the change to the in-memory `Automerge`, queues
//! the change bytes for the writer while still holding the lock (so the queue order is the
//! document's change order), releases the lock and waits for the durable commit before it
//! answers. Reads are served from memory and may include writes whose commit is in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use automerge::sync::{BloomFilter, Message, State as SyncState};
use automerge::{ActorId, Automerge, ChangeHash};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use verge_core::document::{self, Lifecycle, load_document, new_document};
use verge_core::limits::{DOC_BYTES_MAX, SYNC_MESSAGE_BYTES_MAX};
use verge_core::lineage::{self, Lineage, Local, Move, SettleError, Settled};
use verge_core::replication::stability;
use verge_core::{ApplyError, DocId, Expiry, Write, heads_to_hex};
use verge_core::{generation, incarnation};

mod thin;

use crate::cache::{DocCache, MEMORY_PER_DOC, MEMORY_PER_STORED_BYTE};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::replication::{LocalChange, ReplicaWaiter};
use crate::store::writer::{CommitError, Job, QueueSlot, WriterHandle};
use crate::store::{
    DocMeta, FeedBounds, FeedEvent, FeedRecord, Mutation, Previous, Remembered, Store, StoreError,
};

/// Most feed or idempotency records dropped in one transaction of the purge pass, which goes
/// on with the next batch after letting other tasks run.
pub const TRIM_BATCH: u64 = 10_000;
/// Feed records buffered for live watchers; one that falls further behind reads what it
/// missed from the store.
pub const WATCH_BUFFER: usize = 4096;
/// Documents waiting for compaction; more are picked up by their next write.
pub const COMPACTION_QUEUE: usize = 1024;
/// Bytes of change rows below which a snapshot is not rewritten for their size alone. Past it,
/// rows are folded once they weigh half the snapshot, so a document stores less than one and a
/// half times its snapshot (plus one change); a smaller one, at most this much more.
pub const SNAPSHOT_REWRITE_BYTES_MIN: u64 = 4096;
/// Documents holding a proposal that replication asks the members about; more are noted again
/// by their next write.
pub const PROPOSALS_PENDING_MAX: usize = 4096;

/// How queued changes relate to the stored history.
#[derive(Debug)]
enum History {
    /// They follow it.
    Extend,
    /// The document moved to a newer incarnation or generation: they are its whole history,
    /// and `Previous` says what is kept of the one it left.
    Replace(Previous),
}

/// Tunables of the document service.
#[derive(Debug, Clone)]
pub struct DocumentsConfig {
    /// Memory budget of loaded documents.
    pub cache_bytes: usize,
    /// Incremental change rows after which a document's snapshot is rewritten.
    pub compact_after_changes: u64,
    /// Changes in a generation after which the document starts the next one.
    pub generation_after_changes: u64,
    /// Bytes of history in a generation after which the document starts the next one.
    pub generation_after_bytes: u64,
    /// Generations a document left that it keeps (the newest), to carry clients' changes of
    /// them.
    pub retain_generations: u64,
    /// Free space on the data directory: writes are refused below its floor.
    pub space: Arc<crate::store::space::DiskSpace>,
}

/// Why a document operation failed. Each maps to one API error code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocError {
    /// The document does not exist, was deleted or expired.
    #[error("document {0} not found")]
    NotFound(DocId),
    /// The message or write is over a size limit.
    #[error(transparent)]
    TooLarge(#[from] SizeLimit),
    /// The write does not fit the document.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The sync message (or broadcast change) is malformed or its changes do not apply.
    #[error("invalid sync message: {0}")]
    InvalidSync(#[from] InvalidSync),
    /// The write queue is full.
    #[error("the write queue is full; retry with back-off")]
    Overloaded,
    /// The node is draining.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// A sync message carried changes of an older incarnation of the document: the sender's
    /// copy is from before the document was deleted or expired and written again.
    #[error(
        "document {0} was deleted or expired and written again since this copy was made; discard the copy and sync from an empty document"
    )]
    Replaced(DocId),
    /// A sync message carried changes of an older generation of the document: the sender's copy
    /// is from before its history was compacted. Its changes were not taken.
    #[error(
        "document {id} was compacted into generation {generation} since this copy was made; sync from an empty document and make again the writes the node did not acknowledge"
    )]
    Compacted {
        /// The document.
        id: DocId,
        /// Its generation here.
        generation: u64,
    },
    /// A client's copy is of a newer generation than this node's, which it has not received
    /// from its peers yet (a node takes a new generation from members only).
    #[error(
        "this node has not yet caught up with the generation of document {0} that this copy is from; retry shortly or sync with another node"
    )]
    CatchingUp(DocId),
    /// A conditional write (`If-Match`) named heads the document is not at: it changed since
    /// the writer read it.
    #[error("document {id} is not at the heads given in If-Match; it is at {heads:?}")]
    PreconditionFailed {
        /// The document.
        id: DocId,
        /// Its heads, in hex.
        heads: Vec<String>,
    },
    /// A sync message carried changes of an older generation, which this node carried onto the
    /// current one (they are durable): the sender starts over from the current generation,
    /// without making its writes again.
    #[error(
        "document {id} was compacted into generation {generation} since this copy was made; the changes this copy sent were carried onto it: sync from an empty document, without making the writes again"
    )]
    ChangesCarried {
        /// The document.
        id: DocId,
        /// Its generation here.
        generation: u64,
    },
    /// A thin replica's writes were made on a deleted or expired document; a thin replica does
    /// not revive one (a `PUT`, or a full replica, does).
    #[error(
        "document {0} is deleted or expired at the heads this replica read; write it with PUT or a full replica to start it again"
    )]
    NotLive(DocId),
    /// Storage failed; the write was not acknowledged.
    #[error("storage error: {0}")]
    Storage(#[source] Arc<StoreError>),
    /// An earlier write to the document failed to commit, and this one was built on the copy
    /// holding it: the copy was dropped, and a retry works on the durable state.
    #[error("an earlier write to this document failed to commit; retry")]
    Poisoned,
    /// Automerge refused a change this node made itself (the purged stub of a document).
    #[error("{context}: {source}")]
    Automerge {
        /// What was being done.
        context: &'static str,
        /// Automerge's error.
        source: Box<automerge::AutomergeError>,
    },
    /// An invariant of this node's own bookkeeping does not hold (a bug): nothing was
    /// acknowledged.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The document's stored form does not load (a damaged store): the other documents are
    /// unaffected, and `verge check --repair` rebuilds the store for the node to fetch it again
    /// from its peers.
    #[error(
        "document {0} cannot be read from this node's store ({1}); its copies on other nodes are unaffected: stop the node and run `verge check --repair` (docs/operations.md)"
    )]
    Unreadable(DocId, String),
    /// Free space is below `min_free_bytes`: the node takes no writes until space returns.
    #[error(
        "the node's disk is nearly full (below min_free_bytes): writes are refused until space returns; reads go on"
    )]
    StorageFull,
}

impl From<StoreError> for DocError {
    fn from(e: StoreError) -> Self {
        DocError::Storage(Arc::new(e))
    }
}

/// Which size limit a message or write is over.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SizeLimit {
    /// A client's sync message is over [`SYNC_MESSAGE_BYTES_MAX`].
    #[error("sync message of {bytes} bytes exceeds {SYNC_MESSAGE_BYTES_MAX} bytes")]
    SyncMessage {
        /// The message's size.
        bytes: usize,
    },
    /// The change could take the document past [`DOC_BYTES_MAX`].
    #[error(
        "document {id} holds {size_bytes} bytes; {incoming} more could take it past the {DOC_BYTES_MAX} byte limit"
    )]
    Document {
        /// The document.
        id: DocId,
        /// Its size now.
        size_bytes: u64,
        /// The bytes the change brings.
        incoming: usize,
    },
}

/// Why a sync message or broadcast change was refused. The document is unchanged except for
/// what [`InvalidSync::Answer`] says.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidSync {
    /// The message does not decode.
    #[error("{0}")]
    Decode(#[from] automerge::sync::ReadMessageError),
    /// Its changes do not apply to the document.
    #[error("its changes do not apply: {0}")]
    Receive(#[source] Box<automerge::AutomergeError>),
    /// A broadcast change does not apply to the document.
    #[error("a broadcast change does not apply: {0}")]
    BroadcastChange(#[source] Box<automerge::AutomergeError>),
    /// The received changes cannot be kept in one history of the document (see
    /// `verge_core::lineage`).
    #[error("cannot keep one history: {0}")]
    Lineage(#[source] SettleError),
    /// Automerge cannot answer the message (a malformation it notices only then); the changes
    /// it carried were valid and are durable.
    #[error("cannot answer this message: {0}")]
    Answer(#[source] Box<automerge::AutomergeError>),
}

/// A write made with an idempotency key: what its record is named and what the request was.
#[derive(Debug, Clone)]
pub struct Idempotent {
    /// The record's name (a hash of the key and of who sent it).
    pub key: String,
    /// A hash of the request, which a retry must match.
    pub fingerprint: [u8; 32],
}

/// One page of a listing.
#[derive(Debug, Serialize)]
pub struct ListPage {
    /// The documents, in id order.
    pub docs: Vec<ListedDoc>,
    /// Pass as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// A document in a listing.
#[derive(Debug, Serialize)]
pub struct ListedDoc {
    /// Its id.
    pub id: String,
    /// Its heads.
    pub heads: Vec<String>,
    /// Bytes stored.
    pub size_bytes: u64,
    /// Last write.
    pub updated_at_ms: i64,
    /// Expiry.
    pub expires_at_ms: Option<i64>,
}

/// What a sync request answers.
#[derive(Debug)]
pub struct SyncReply {
    /// The node's sync message, empty when it has nothing to say.
    pub message: Vec<u8>,
    /// Bytes of changes the request carried that were new to the node.
    pub applied_changes: usize,
}

struct Slot {
    doc: Automerge,
    meta: DocMeta,
    /// The serialized `GET` response, rebuilt after a change.
    read_cache: Option<Bytes>,
    compaction_queued: bool,
    /// The generation the document left last here and its snapshot, as queued for the
    /// `retained` table: a client's stale sync may arrive before that commit lands, and its
    /// changes are carried through this copy meanwhile. One per cached document that moved.
    left: Option<(u64, Arc<Vec<u8>>)>,
}

/// What [`Documents::exchange`] did with a message.
struct Exchanged {
    /// The next message for the other side, if any.
    reply: Option<Message>,
    /// Bytes of the changes the message added here.
    applied: usize,
    /// Whether the document held what the caller named in [`Holds`]: when it did not hold
    /// `before`, the message was not received.
    held: bool,
}

/// Changes a caller of [`Documents::exchange`] needs the document to hold.
struct Holds<'a> {
    /// Before the message is received: the history its changes were made on.
    before: &'a [ChangeHash],
    /// After: the message's own heads.
    after: &'a [ChangeHash],
}

/// Whether `doc` holds every change in `hashes`. Not `get_missing_deps`, which also names the
/// deps of changes waiting in Automerge's queue.
fn holds_all(doc: &Automerge, hashes: &[ChangeHash]) -> bool {
    hashes
        .iter()
        .all(|h| doc.get_change_meta_by_hash(h).is_some())
}

/// A document's place in memory. `slot` is `None` until first loaded.
struct Entry {
    id: DocId,
    slot: Mutex<Option<Slot>>,
    poisoned: Arc<AtomicBool>,
}

/// A local write under way, counted until it is answered (see
/// [`Documents::writes_in_flight`]).
struct LocalSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for LocalSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The document service of a node.
pub struct Documents {
    /// Set when the node leaves the cluster: local writes are refused from then on.
    local_writes_stopped: AtomicBool,
    /// Local writes under way.
    local_in_flight: std::sync::atomic::AtomicUsize,
    store: Arc<Store>,
    writer: WriterHandle,
    cache: Mutex<DocCache<Entry>>,
    actor: Mutex<ActorId>,
    rng: Mutex<StdRng>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    events: broadcast::Sender<Arc<FeedEvent>>,
    compaction_tx: mpsc::Sender<DocId>,
    config: DocumentsConfig,
    /// Told of every commit (replication). Set once, when replication starts.
    listener: OnceLock<Arc<dyn CommitListener>>,
    /// Who else holds documents (replication). Set once, when replication starts; until then
    /// no document compacts. Weak: replication holds this service.
    membership: OnceLock<std::sync::Weak<dyn Membership>>,
    /// Documents holding a proposal for their next generation (bounded by
    /// [`PROPOSALS_PENDING_MAX`]).
    proposals: Mutex<std::collections::BTreeSet<DocId>>,
}

/// What the document service needs to know of the cluster to compact a document.
pub trait Membership: Send + Sync + std::fmt::Debug {
    /// Whether this node has no members at all (none configured, none learned): a proposal of
    /// its own is then stable at once (`docs/compaction.md`), and it compacts alone.
    fn alone(&self) -> bool;
}

/// Follows the node's commits: replication keeps its digest index and broadcast feed with
/// them, so that this service knows neither.
pub trait CommitListener: Send + Sync + std::fmt::Debug {
    /// `doc` now stands at `heads` here: durably, after a write or a received change; or
    /// once queued, after a purge left a stub. `local` holds the changes made through this
    /// node's API or a client's sync, for the broadcast. Called on the committing task: it
    /// must not block.
    fn committed(&self, doc: &DocId, heads: &[ChangeHash], local: Option<LocalChange>);
}

impl std::fmt::Debug for Documents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Documents")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a document lock is a bug; the data behind it is still the last
    // consistent state (every mutation completes or rolls back before unlocking).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Documents {
    /// Creates the service. `rng_seed` seeds actor ids; the returned receiver feeds
    /// [`Documents::run_compactor`]. `events` is where the writer publishes the change feed.
    pub fn new(
        store: Arc<Store>,
        writer: WriterHandle,
        events: broadcast::Sender<Arc<FeedEvent>>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        config: DocumentsConfig,
        rng_seed: u64,
    ) -> (Arc<Self>, mpsc::Receiver<DocId>) {
        let mut rng = StdRng::seed_from_u64(rng_seed);
        let actor = ActorId::from(rng.random::<[u8; 16]>());
        let (compaction_tx, compaction_rx) = mpsc::channel(COMPACTION_QUEUE);
        let docs = Arc::new(Self {
            local_writes_stopped: AtomicBool::new(false),
            local_in_flight: std::sync::atomic::AtomicUsize::new(0),
            store,
            writer,
            cache: Mutex::new(DocCache::new(config.cache_bytes)),
            actor: Mutex::new(actor),
            rng: Mutex::new(rng),
            clock,
            metrics,
            events,
            compaction_tx,
            config,
            listener: OnceLock::new(),
            membership: OnceLock::new(),
            proposals: Mutex::new(std::collections::BTreeSet::new()),
        });
        (docs, compaction_rx)
    }

    /// Sets who is told of commits. Set once, when replication starts.
    pub fn set_listener(&self, listener: Arc<dyn CommitListener>) {
        let _ = self.listener.set(listener);
    }

    /// Sets who tells whether this node is alone. Set once, when replication starts.
    pub fn set_membership(&self, membership: &Arc<dyn Membership>) {
        let _ = self.membership.set(Arc::downgrade(membership));
    }

    /// Whether generation `older` is further back from `current` than nodes retain: no node
    /// can carry a client's changes of it any more. The one rule for full and thin replicas.
    fn beyond_retention(&self, current: u64, older: u64) -> bool {
        current.saturating_sub(older) > self.config.retain_generations
    }

    /// The generations of `id` this node retains, oldest first, with `left`, the one it left
    /// last (`Slot::left`), whose retention may not be committed yet.
    fn retained_with(
        &self,
        id: &DocId,
        left: Option<&(u64, Arc<Vec<u8>>)>,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut retained = self.store.retained(id)?;
        if let Some((generation, bytes)) = left
            && !retained.iter().any(|(g, _)| g == generation)
        {
            retained.push((*generation, bytes.as_ref().clone()));
            retained.sort_by_key(|(g, _)| *g);
        }
        Ok(retained)
    }

    fn alone(&self) -> bool {
        self.membership
            .get()
            .and_then(std::sync::Weak::upgrade)
            .is_some_and(|m| m.alone())
    }

    /// Whether `meta`'s document has enough change rows to fold into its snapshot.
    fn rewrite_due(&self, meta: &DocMeta) -> bool {
        let rows_bytes = meta.size_bytes.saturating_sub(meta.snapshot_bytes);
        meta.change_rows >= self.config.compact_after_changes
            || rows_bytes >= (meta.snapshot_bytes / 2).max(SNAPSHOT_REWRITE_BYTES_MIN)
    }

    /// Whether `meta`'s document has outgrown its generation.
    fn generation_due(&self, meta: &DocMeta) -> bool {
        !meta.stub
            && (meta.history_changes >= self.config.generation_after_changes
                || meta.size_bytes.saturating_sub(meta.generation_bytes)
                    >= self.config.generation_after_bytes)
    }
    /// Calls `visit` with every stored document's id and heads (for an index of them).
    pub fn scan_heads(&self, mut visit: impl FnMut(&DocId, &[ChangeHash])) -> Result<(), DocError> {
        self.store.scan_meta("", None, |id, meta| {
            if let Ok(id) = DocId::new(id) {
                visit(&id, &meta.heads);
            }
            true
        })?;
        Ok(())
    }

    /// The actor this node writes new changes as.
    pub fn actor(&self) -> ActorId {
        lock(&self.actor).clone()
    }

    /// Subscribes to committed changes as the writer numbers them (the live end of the feed;
    /// [`Documents::feed_after`] reads what a subscriber missed).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FeedEvent>> {
        self.events.subscribe()
    }

    /// Up to `limit` feed records after `after`, in order.
    pub fn feed_after(&self, after: u64, limit: usize) -> Result<Vec<FeedRecord>, DocError> {
        Ok(self.store.feed_after(after, limit)?)
    }

    /// The numbers the feed holds.
    pub fn feed_bounds(&self) -> Result<FeedBounds, DocError> {
        Ok(self.store.feed_bounds()?)
    }

    /// What the write made with idempotency record `key` answered, if kept.
    pub fn remembered(&self, key: &str) -> Result<Option<Remembered>, DocError> {
        Ok(self.store.remembered(key)?)
    }

    /// Drops the idempotency records older than `retain_ms`, then the oldest beyond
    /// `keep_max`, at most [`TRIM_BATCH`] of them. Returns how many.
    pub fn trim_remembered(&self, retain_ms: i64, keep_max: u64) -> Result<u64, DocError> {
        let before = self.now_ms().saturating_sub(retain_ms);
        let dropped = self.store.trim_remembered(before, keep_max, TRIM_BATCH)?;
        self.metrics.idempotency_trimmed.inc_by(dropped);
        Ok(dropped)
    }

    /// Jobs waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.writer.depth()
    }

    /// Documents stored, tombstones included.
    pub fn doc_count(&self) -> Result<u64, DocError> {
        Ok(self.store.doc_count()?)
    }

    /// The node's wall clock, in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn entry(&self, id: &DocId) -> Arc<Entry> {
        let mut cache = lock(&self.cache);
        if let Some(entry) = cache.get(id) {
            self.metrics.cache_hits.inc();
            return entry;
        }
        self.metrics.cache_misses.inc();
        let entry = Arc::new(Entry {
            id: id.clone(),
            slot: Mutex::new(None),
            poisoned: Arc::new(AtomicBool::new(false)),
        });
        cache.insert(id.clone(), Arc::clone(&entry), MEMORY_PER_DOC);
        self.publish_cache_gauges(&cache);
        entry
    }

    fn publish_cache_gauges(&self, cache: &DocCache<Entry>) {
        self.metrics.cache_docs.set(cache.len() as i64);
        self.metrics.cache_bytes.set(cache.bytes() as i64);
    }

    fn resize(&self, entry: &Entry, meta: &DocMeta) {
        let size = MEMORY_PER_DOC
            + usize::try_from(meta.size_bytes).unwrap_or(usize::MAX / 16) * MEMORY_PER_STORED_BYTE;
        let mut cache = lock(&self.cache);
        cache.resize(&entry.id, size);
        self.publish_cache_gauges(&cache);
    }

    /// Drops an entry whose in-memory state is no longer trusted, and writes as a new actor
    /// from now on: changes of the failed write may have been seen by readers, and reusing
    /// their sequence numbers for different changes would break every replica that saw them.
    fn discard(&self, entry: &Arc<Entry>) {
        entry.poisoned.store(true, Ordering::Release);
        lock(&self.cache).remove_if_same(&entry.id, entry);
        let fresh = ActorId::from(lock(&self.rng).random::<[u8; 16]>());
        *lock(&self.actor) = fresh;
        tracing::warn!(doc = %entry.id, "discarded the in-memory copy of a document after a failed write");
    }

    /// Locks an entry's slot, loading the document from the store on first use.
    fn load<'a>(&self, entry: &'a Entry) -> Result<MutexGuard<'a, Option<Slot>>, DocError> {
        let mut guard = lock(&entry.slot);
        if guard.is_none() {
            let unreadable = |why: String| {
                self.metrics.documents_unreadable.inc();
                tracing::error!(doc = %entry.id, error = %why, "a stored document does not load");
                DocError::Unreadable(entry.id.clone(), why)
            };
            let stored = self.store.load(&entry.id).map_err(|e| match e {
                StoreError::Corrupt(why) => unreadable(why),
                other => DocError::from(other),
            })?;
            let slot = match stored {
                Some(stored) => {
                    let doc = load_document(&stored.bytes, self.actor())
                        .map_err(|e| unreadable(format!("its history does not load: {e}")))?;
                    Slot {
                        doc,
                        meta: stored.meta,
                        read_cache: None,
                        compaction_queued: false,
                        left: None,
                    }
                }
                None => Slot {
                    doc: new_document(self.actor()),
                    meta: DocMeta::default(),
                    read_cache: None,
                    compaction_queued: false,
                    left: None,
                },
            };
            self.resize(entry, &slot.meta);
            *guard = Some(slot);
        }
        Ok(guard)
    }

    /// Locks an entry to change it: loads it, and refuses (dropping the in-memory copy) when an
    /// earlier write to it failed to commit, since that copy holds changes that are not durable.
    fn lock_for_change<'a>(
        &self,
        entry: &'a Arc<Entry>,
    ) -> Result<MutexGuard<'a, Option<Slot>>, DocError> {
        let guard = self.load(entry)?;
        if entry.poisoned.load(Ordering::Acquire) {
            drop(guard);
            self.discard(entry);
            return Err(DocError::Poisoned);
        }
        Ok(guard)
    }

    /// Free space on the data directory, and whether writes are refused for lack of it.
    pub fn space(&self) -> &crate::store::space::DiskSpace {
        &self.config.space
    }

    /// Refuses every later write made here (`503 shutting_down`); changes from peers still
    /// apply. A node leaving the cluster hands its writes to its peers after this, so none is
    /// acknowledged that the others might never get.
    pub fn stop_local_writes(&self) {
        self.local_writes_stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes that reserved their place in the queue and have not been answered, and queued
    /// jobs: zero once every acknowledged local write is committed.
    pub fn writes_in_flight(&self) -> usize {
        self.writer.depth()
            + self
                .local_in_flight
                .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn reserve_local(&self) -> Result<LocalSlot<'_>, DocError> {
        if self
            .local_writes_stopped
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(DocError::ShuttingDown);
        }
        self.local_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let guard = LocalSlot(&self.local_in_flight);
        // Checked again: a leave that began meanwhile waits for this write or refuses it.
        if self
            .local_writes_stopped
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(DocError::ShuttingDown);
        }
        Ok(guard)
    }

    fn reserve(&self) -> Result<QueueSlot, DocError> {
        if self.config.space.full() {
            return Err(DocError::StorageFull);
        }
        self.writer.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => {
                self.metrics.write_queue_full.inc();
                DocError::Overloaded
            }
            mpsc::error::TrySendError::Closed(()) => DocError::ShuttingDown,
        })
    }

    /// Whether this node holds every change of `heads` (heads a write at some node returned):
    /// in its document, or in a generation the document left (`retained`), whose changes are
    /// in the current generation's root or carried onto it. `checked_retained` is the
    /// generation whose retained copies were last looked at, to skip looking again until the
    /// document moves.
    pub fn holds(
        &self,
        id: &DocId,
        heads: &[ChangeHash],
        checked_retained: &mut Option<u64>,
    ) -> Result<bool, DocError> {
        let (missing, generation) = {
            let entry = self.entry(id);
            let guard = self.load(&entry)?;
            let slot = guard.as_ref().expect("load fills the slot");
            let missing: Vec<ChangeHash> = heads
                .iter()
                .filter(|h| slot.doc.get_change_meta_by_hash(h).is_none())
                .copied()
                .collect();
            (missing, slot.meta.generation)
        };
        if missing.is_empty() {
            return Ok(true);
        }
        if generation == 0 || *checked_retained == Some(generation) {
            return Ok(false);
        }
        *checked_retained = Some(generation);
        let mut left: std::collections::HashSet<ChangeHash> = missing.into_iter().collect();
        for (_, bytes) in self.store.retained(id)? {
            let Ok(doc) = load_document(&bytes, self.actor()) else {
                continue;
            };
            left.retain(|h| doc.get_change_meta_by_hash(h).is_none());
            if left.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Reads a live document as the JSON body of `GET /v1/docs/{id}`.
    pub fn read(&self, id: &DocId) -> Result<Bytes, DocError> {
        self.metrics.reads.inc();
        let now = self.now_ms();
        let entry = self.entry(id);
        let mut guard = self.load(&entry)?;
        let slot = guard.as_mut().expect("load fills the slot");
        if !slot.meta.live(now) {
            return Err(DocError::NotFound(id.clone()));
        }
        if let Some(body) = &slot.read_cache {
            return Ok(body.clone());
        }
        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a str,
            heads: Vec<String>,
            doc: serde_json::Value,
            expires_at_ms: Option<i64>,
            generation: u64,
            history_changes: u64,
        }
        let body = Body {
            id: id.as_str(),
            heads: heads_to_hex(&slot.meta.heads),
            doc: document::to_json(&slot.doc),
            expires_at_ms: slot.meta.expires_at_ms,
            generation: slot.meta.generation,
            history_changes: slot.meta.history_changes,
        };
        let bytes = Bytes::from(
            serde_json::to_vec(&body)
                .map_err(|_| DocError::Internal("the body does not serialize"))?,
        );
        slot.read_cache = Some(bytes.clone());
        Ok(bytes)
    }

    /// Applies a write and returns the heads once it is durable.
    ///
    /// `size_hint` is the size of the request that carried the write; a write is refused when
    /// the document plus that much would exceed [`DOC_BYTES_MAX`].
    #[allow(clippy::too_many_arguments)]
    pub async fn write(
        &self,
        id: &DocId,
        write: &Write,
        expiry: Expiry,
        size_hint: usize,
        waiter: Option<Arc<ReplicaWaiter>>,
        if_match: Option<&[ChangeHash]>,
        idempotent: Option<Idempotent>,
    ) -> Result<Vec<ChangeHash>, DocError> {
        let _local = self.reserve_local()?;
        let now = self.now_ms();
        let entry = self.entry(id);
        let queue_slot = self.reserve()?;
        let pending = {
            let mut guard = self.lock_for_change(&entry)?;
            let slot = guard.as_mut().expect("load fills the slot");
            if let Some(expected) = if_match
                && !same_heads(&slot.meta.heads, expected)
            {
                return Err(DocError::PreconditionFailed {
                    id: id.clone(),
                    heads: heads_to_hex(&slot.meta.heads),
                });
            }
            let live = slot.meta.live(now);
            if matches!(write, Write::Delete) && !live {
                return Err(DocError::NotFound(id.clone()));
            }
            check_growth(id, &slot.meta, size_hint)?;
            let into_stub = slot.meta.stub;
            let applied = document::apply(&mut slot.doc, write, expiry, now)?;
            let mut hashes = applied.changes.clone();
            if hashes.is_empty() {
                if live {
                    return Ok(slot.meta.heads.clone());
                }
                // Writing nothing to an absent document still creates it.
                let time_s = now.div_euclid(1000);
                hashes.push(slot.doc.empty_commit(
                    automerge::transaction::CommitOptions::default().with_time(time_s),
                ));
            }
            // The write's changes: the implicit creations it needed, then its own.
            let changes = hashes
                .iter()
                .map(|h| {
                    automerge::ReadDoc::get_change_by_hash(&slot.doc, h)
                        .map(|c| c.raw_bytes().to_vec())
                })
                .collect::<Option<Vec<_>>>()
                .ok_or(DocError::Internal(
                    "a committed change is missing from its document",
                ))?;
            // The first write into a purged stub goes out with the stub's root: other nodes may
            // still hold the old incarnation, the purge itself was not broadcast, and without
            // the root they could not apply the write until anti-entropy. (Stored once more as
            // a change row, which loading ignores as a duplicate.)
            let changes = if into_stub && !applied.replaced {
                let root = incarnation::root_change(incarnation::of(&slot.doc));
                std::iter::once(root.raw_bytes().to_vec())
                    .chain(changes)
                    .collect()
            } else {
                changes
            };
            let history = if applied.replaced {
                self.metrics.incarnations_replaced.inc();
                History::Replace(Previous::Forget)
            } else {
                History::Extend
            };
            self.enqueue_changes(
                &entry,
                slot,
                changes,
                applied.lifecycle,
                now,
                queue_slot,
                history,
                idempotent,
            )
        };
        self.finish(&entry, pending, Origin::Client, waiter).await
    }

    /// Records new in-memory changes of `slot` in its metadata and queues them for the writer.
    /// Called with the slot locked, so queue order is change order.
    ///
    /// `history` says whether the changes extend the stored history or, after a new
    /// incarnation replaced the document (see `verge_core::incarnation`), replace it.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_changes(
        &self,
        entry: &Arc<Entry>,
        slot: &mut Slot,
        changes: Vec<Vec<u8>>,
        lifecycle: Lifecycle,
        now: i64,
        queue_slot: QueueSlot,
        history: History,
        idempotent: Option<Idempotent>,
    ) -> Pending {
        let meta = &mut slot.meta;
        meta.heads = slot.doc.get_heads();
        meta.updated_at_ms = now;
        meta.deleted = lifecycle.deleted;
        meta.expires_at_ms = lifecycle.expires_at_ms;
        meta.stub = incarnation::is_stub(&slot.doc);
        slot.read_cache = None;
        let broadcast = changes.clone();
        let mutation = match history {
            History::Extend => {
                let first_seq = meta.next_seq;
                meta.size_bytes += changes.iter().map(|c| c.len() as u64).sum::<u64>();
                meta.next_seq += changes.len() as u64;
                meta.change_rows += changes.len() as u64;
                meta.history_changes += changes.len() as u64;
                Mutation::Append {
                    id: entry.id.clone(),
                    first_seq,
                    changes,
                    meta: meta.clone(),
                }
            }
            History::Replace(previous) => {
                let snapshot = stored_snapshot(&slot.doc);
                replaced_history(meta, &slot.doc, snapshot.len(), changes.len());
                Mutation::Replace {
                    id: entry.id.clone(),
                    snapshot,
                    meta: meta.clone(),
                    previous,
                }
            }
        };
        let due = self.rewrite_due(meta) || self.generation_due(meta);
        if due && !slot.compaction_queued {
            slot.compaction_queued = self.compaction_tx.try_send(entry.id.clone()).is_ok();
        }
        self.queue(
            entry,
            slot,
            queue_slot,
            mutation,
            broadcast,
            Counted::Write,
            idempotent,
        )
    }

    /// Sends `mutation` of `slot`'s document to the writer; the returned [`Pending`] waits for
    /// its commit, then announces `slot`'s state and `changes`.
    #[allow(clippy::too_many_arguments)]
    fn queue(
        &self,
        entry: &Arc<Entry>,
        slot: &Slot,
        queue_slot: QueueSlot,
        mutation: Mutation,
        changes: Vec<Vec<u8>>,
        counted: Counted,
        idempotent: Option<Idempotent>,
    ) -> Pending {
        let (ack_tx, ack_rx) = oneshot::channel();
        let now = self.now_ms();
        let remember = idempotent.map(|i| Remembered {
            key: i.key,
            fingerprint: i.fingerprint,
            at_ms: now,
            heads: slot.meta.heads.clone(),
        });
        queue_slot.send(Job {
            mutation,
            poisoned: Arc::clone(&entry.poisoned),
            ack: Some(ack_tx),
            record: Some(FeedRecord {
                seq: 0,
                id: entry.id.to_string(),
                heads: slot.meta.heads.clone(),
                deleted: slot.meta.deleted,
                at_ms: now,
            }),
            remember,
        });
        self.resize(entry, &slot.meta);
        Pending {
            ack: ack_rx,
            heads: slot.meta.heads.clone(),
            changes,
            counted,
        }
    }

    /// Waits for the durable commit of queued changes (the writer has published it to the feed
    /// by then), then tells the commit listener (with the changes, when made here).
    async fn finish(
        &self,
        entry: &Arc<Entry>,
        pending: Pending,
        origin: Origin,
        waiter: Option<Arc<ReplicaWaiter>>,
    ) -> Result<Vec<ChangeHash>, DocError> {
        let outcome = pending.ack.await.unwrap_or(Err(CommitError::Stopped));
        match outcome {
            Ok(()) => {
                match pending.counted {
                    Counted::Write => self.metrics.writes.inc(),
                    Counted::Generation => self.metrics.compactions.inc(),
                };
                if let Some(listener) = self.listener.get() {
                    let local = (origin == Origin::Client).then(|| LocalChange {
                        doc: entry.id.clone(),
                        changes: pending.changes,
                        waiter,
                    });
                    listener.committed(&entry.id, &pending.heads, local);
                }
                Ok(pending.heads)
            }
            Err(e) => {
                self.discard(entry);
                Err(commit_failed(e))
            }
        }
    }

    /// Answers one Automerge sync message from a fresh sync state, persisting any changes it
    /// carried before answering.
    pub async fn sync(&self, id: &DocId, body: &[u8]) -> Result<SyncReply, DocError> {
        self.metrics.sync_requests.inc();
        self.metrics.sync_bytes_received.inc_by(body.len() as u64);
        if body.len() > SYNC_MESSAGE_BYTES_MAX {
            return Err(SizeLimit::SyncMessage { bytes: body.len() }.into());
        }
        let message = Message::decode(body).map_err(InvalidSync::from)?;
        let mut state = SyncState::new();
        let Exchanged { reply, applied, .. } = self
            .exchange(id, &mut state, Some(message), Origin::Client, None)
            .await?;
        // When we hold every head the client announced, our answer's `have` has `last_sync` =
        // those heads, and a peer only looks for its own changes *after* `last_sync` that are
        // missing from the Bloom filter: ours never qualify, so the filter is dead weight. From
        // a fresh state it covers every change the client lacks, the whole history (~1.3 B per
        // change) when the client opens from empty. An empty filter means the same to any
        // Automerge peer and costs nothing.
        let knows_their_heads = state.their_heads.as_ref() == Some(&state.shared_heads);
        let reply = reply
            .map(|mut reply| {
                if knows_their_heads {
                    for have in &mut reply.have {
                        have.bloom = BloomFilter::default();
                    }
                }
                reply.encode()
            })
            .unwrap_or_default();
        self.metrics.sync_bytes_sent.inc_by(reply.len() as u64);
        Ok(SyncReply {
            message: reply,
            applied_changes: applied,
        })
    }

    /// One step of a node-to-node sync session: applies the peer's message (durably) and
    /// returns the next message for the peer, if any. The session's state lives with the caller.
    pub async fn peer_sync_step(
        &self,
        id: &DocId,
        state: &mut SyncState,
        incoming: Option<Message>,
    ) -> Result<Option<Message>, DocError> {
        Ok(self
            .exchange(id, state, incoming, Origin::Peer, None)
            .await?
            .reply)
    }

    /// Receives `incoming` (if any) into the document, persists the changes it added, and
    /// generates the next message. `holds` names what the caller needs the document to hold
    /// (a thin push's base before, its changes after), judged under the same lock as the
    /// receipt: a later look could find the history folded into a new generation meanwhile.
    async fn exchange(
        &self,
        id: &DocId,
        state: &mut SyncState,
        incoming: Option<Message>,
        origin: Origin,
        holds: Option<Holds<'_>>,
    ) -> Result<Exchanged, DocError> {
        let incoming_bytes: usize = incoming
            .as_ref()
            .map_or(0, |m| m.changes.iter().map(<[u8]>::len).sum());
        let _local = match origin {
            Origin::Client if incoming_bytes > 0 => Some(self.reserve_local()?),
            _ => None,
        };
        let now = self.now_ms();
        let entry = self.entry(id);
        let queue_slot = if incoming_bytes > 0 {
            Some(self.reserve()?)
        } else {
            None
        };
        let (reply, pending, applied, carried_for_client, held) = {
            let mut guard = self.lock_for_change(&entry)?;
            let slot = guard.as_mut().expect("load fills the slot");
            check_growth(id, &slot.meta, incoming_bytes)?;
            if let Some(holds) = &holds
                && !holds_all(&slot.doc, holds.before)
            {
                // Not received at all: changes whose deps are missing would wait in
                // Automerge's queue, and their deps would read as missing ever after.
                return Ok(Exchanged {
                    reply: None,
                    applied: 0,
                    held: false,
                });
            }
            let before = slot.doc.get_heads();
            let local = Local::of(&slot.doc);
            // A client's copy of an earlier generation: its changes, which may not apply here
            // (their deps are gone), are what this node carries for it.
            let sent: Vec<Vec<u8>> = match (&incoming, origin) {
                (Some(message), Origin::Client) if local.lineage.generation > 0 => {
                    message.changes.iter().map(<[u8]>::to_vec).collect()
                }
                _ => Vec::new(),
            };
            if let Some(message) = incoming
                && let Err(e) = document::receive_sync_message(&mut slot.doc, state, message)
            {
                // Some of the message's changes may have been applied before the failure.
                drop(guard);
                self.discard(&entry);
                return Err(InvalidSync::Receive(Box::new(e)).into());
            }
            let settled = self.settle(&entry, slot, &before, &local, origin, &sent);
            let Settle {
                changes,
                history,
                dropped,
                broadcast,
                carried_for_client,
            } = match settled {
                Ok(settled) => settled,
                Err(Refused { error, intact }) => {
                    if !intact {
                        drop(guard);
                        self.discard(&entry);
                    }
                    return Err(error);
                }
            };
            if matches!(history, History::Replace(_)) {
                // The peer's view of our history no longer holds.
                *state = SyncState::new();
            } else if dropped {
                // The state takes heads of the dropped changes as shared: the peer, which no
                // longer holds them either once it moves, would answer every message naming
                // them with a reset. What it knows of the peer still holds, so that this side
                // goes on to send what the peer lacks.
                state.shared_heads.clear();
            }
            let applied = changes.iter().map(Vec::len).sum();
            let held = holds
                .as_ref()
                .is_none_or(|h| carried_for_client.is_some() || holds_all(&slot.doc, h.after));
            let pending = match (changes.is_empty(), queue_slot) {
                (false, Some(queue_slot)) => {
                    let lifecycle = Lifecycle::of(&slot.doc);
                    Some(self.enqueue_changes(
                        &entry, slot, changes, lifecycle, now, queue_slot, history, None,
                    ))
                }
                (false, None) => {
                    // Unreachable in practice: changes arrive only in a message that carried
                    // bytes. Refuse rather than acknowledge something not durable.
                    drop(guard);
                    self.discard(&entry);
                    return Err(DocError::Internal("changes applied without a queue slot"));
                }
                (true, _) => None,
            };
            let reply = document::generate_sync_message(&slot.doc, state);
            let origin = if broadcast { Origin::Client } else { origin };
            (
                reply,
                pending.map(|p| (p, origin)),
                applied,
                carried_for_client,
                held,
            )
        };
        if let Some((pending, origin)) = pending {
            self.finish(&entry, pending, origin, None).await?;
        }
        if let Some(generation) = carried_for_client {
            // Durable now: the client drops its copy and its writes, which are in the new
            // generation.
            return Err(DocError::ChangesCarried {
                id: id.clone(),
                generation,
            });
        }
        // A message malformed in a way Automerge only notices when answering it; the changes
        // it carried (if any) are valid and already durable.
        let reply = reply.map_err(|e| InvalidSync::Answer(Box::new(e)))?;
        Ok(Exchanged {
            reply,
            applied,
            held,
        })
    }

    /// After received changes were applied to `slot`'s document (whose heads were `before` and
    /// history `local`), keeps it in one history (`verge_core::lineage`) and returns the change
    /// bytes to persist and pass on: the new ones, or, when the document moved to a newer
    /// history, all of its changes.
    fn settle(
        &self,
        entry: &Entry,
        slot: &mut Slot,
        before: &[ChangeHash],
        local: &Local,
        origin: Origin,
        sent: &[Vec<u8>],
    ) -> Result<Settle, Refused> {
        let new = slot.doc.get_changes(before);
        let refused = |error: DocError, intact: bool| Refused { error, intact };
        if origin == Origin::Client && brings_next_generation(local, &new) {
            // Generations come from members, which built them at a point every member holds;
            // this node gets it from them.
            self.metrics.sync_generation_ahead.inc();
            return Err(refused(DocError::CatchingUp(entry.id.clone()), false));
        }
        let settled = match lineage::settle(&mut slot.doc, local, &new, Move::Carry) {
            Ok(settled) => settled,
            Err(e) => {
                if matches!(
                    e,
                    SettleError::PointMissing { .. } | SettleError::GenerationGap { .. }
                ) {
                    self.metrics.compaction_stragglers.inc();
                    tracing::warn!(doc = %entry.id, error = %e, "cannot move to a newer generation of the document yet");
                }
                return Err(refused(InvalidSync::Lineage(e).into(), false));
            }
        };
        let bytes = |changes: Vec<automerge::Change>| {
            changes
                .into_iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect()
        };
        let now = Lineage::of(&slot.doc);
        let broadcast = matches!(settled, Settled::Adopted { carried, .. } if carried > 0);
        let previous = match settled {
            Settled::Kept => {
                if !new.is_empty() && !stability::proposals(&slot.doc).is_empty() {
                    // A member proposed the next generation: this node asks about it too.
                    self.note_proposal(&entry.id);
                }
                return Ok(Settle {
                    changes: bytes(new),
                    history: History::Extend,
                    dropped: false,
                    broadcast: false,
                    carried_for_client: None,
                });
            }
            Settled::Dropped { kept, older } => {
                let compacted = older.incarnation == now.incarnation;
                if compacted {
                    self.metrics.sync_stale_generation.inc();
                } else {
                    self.metrics.sync_stale_incarnation.inc();
                }
                if origin == Origin::Peer {
                    // A peer is answered with the current history, which it takes (carrying
                    // its own changes onto it).
                    return Ok(Settle {
                        changes: bytes(kept),
                        history: History::Extend,
                        dropped: true,
                        broadcast: false,
                        carried_for_client: None,
                    });
                }
                // A client (a Wasm replica or any Automerge peer) holding an old history is
                // told to start over. Its changes of an earlier generation this node retains
                // are carried onto the current one first, so it need not make its writes
                // again. Otherwise the document is as it was unless the message also brought
                // changes of the current history, which are not durable.
                let error = if compacted {
                    match self.carry_stale(entry, slot, &new, sent, older) {
                        Ok(carried) => {
                            self.metrics.stale_carried.inc();
                            let mut changes: Vec<Vec<u8>> = bytes(kept);
                            changes.extend(carried);
                            return Ok(Settle {
                                changes,
                                history: History::Extend,
                                dropped: true,
                                broadcast: true,
                                carried_for_client: Some(now.generation),
                            });
                        }
                        Err(why) => {
                            self.metrics.stale_not_carried.inc();
                            tracing::debug!(doc = %entry.id, error = %why, "a client's changes of an earlier generation were not carried");
                            DocError::Compacted {
                                id: entry.id.clone(),
                                generation: now.generation,
                            }
                        }
                    }
                } else {
                    DocError::Replaced(entry.id.clone())
                };
                return Err(refused(error, kept.is_empty()));
            }
            Settled::Replaced { from } if from.incarnation != now.incarnation => {
                self.metrics.incarnations_replaced.inc();
                tracing::info!(doc = %entry.id, from = %from, to = %now, "a newer incarnation replaced the document");
                Previous::Forget
            }
            Settled::Replaced { from } => {
                self.metrics.generation_adoptions.inc();
                tracing::info!(doc = %entry.id, from = %from, to = %now, "moved to a newer generation of the document (nothing to carry)");
                Previous::Forget
            }
            Settled::Adopted { carried, previous } => {
                self.metrics.generation_adoptions.inc();
                self.metrics.carried_changes.inc_by(carried as u64);
                tracing::info!(doc = %entry.id, from = %local.lineage, to = %now, carried, "moved to a newer generation of the document");
                let snapshot = stored_snapshot(&previous);
                slot.left = Some((local.lineage.generation, Arc::new(snapshot.clone())));
                Previous::Retain {
                    generation: local.lineage.generation,
                    keep: self.config.retain_generations,
                    snapshot,
                    at_ms: self.now_ms(),
                }
            }
        };
        let all = slot
            .doc
            .get_changes(&[])
            .into_iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        Ok(Settle {
            changes: all,
            history: History::Replace(previous),
            dropped: true,
            broadcast,
            carried_for_client: None,
        })
    }

    /// Carries the changes of the `older` generation that a client sent (`new`, those that
    /// applied, and `sent`, the message's chunks, which hold also those whose deps are gone
    /// here) onto `slot`'s current generation through the generations this node retains
    /// (`verge_core::lineage::carry_stale`), and applies them. Returns the bytes of the carried
    /// changes the document did not hold yet (none when the cluster had carried them all).
    fn carry_stale(
        &self,
        entry: &Entry,
        slot: &mut Slot,
        new: &[automerge::Change],
        sent: &[Vec<u8>],
        older: Lineage,
    ) -> Result<Vec<Vec<u8>>, String> {
        let mut stale: Vec<automerge::Change> = new.to_vec();
        for chunk in sent {
            match automerge::Change::from_bytes(chunk.clone()) {
                Ok(change) => stale.push(change),
                // A chunk may be a whole document (Automerge's sync sends one to an empty peer).
                Err(_) => stale.extend(
                    load_document(chunk, self.actor())
                        .map_err(|e| format!("a chunk of the message does not load: {e}"))?
                        .get_changes(&[]),
                ),
            }
        }
        let mut seen = std::collections::HashSet::new();
        stale.retain(|c| {
            seen.insert(c.hash()) && slot.doc.get_change_meta_by_hash(&c.hash()).is_none()
        });
        let current = Lineage::of(&slot.doc);
        if self.beyond_retention(current.generation, older.generation) {
            return Err(format!(
                "generation {} is further back than this node retains",
                older.generation
            ));
        }
        let root = generation::root_of(&slot.doc)
            .and_then(|(hash, _)| automerge::ReadDoc::get_change_by_hash(&slot.doc, &hash))
            .ok_or("the current generation's root is missing")?;
        let retained = self
            .retained_with(&entry.id, slot.left.as_ref())
            .map_err(|e| format!("reading the retained generations: {e}"))?;
        let retained = retained
            .into_iter()
            .filter(|(generation, _)| *generation >= older.generation)
            .map(|(generation, bytes)| {
                load_document(&bytes, self.actor())
                    .map_err(|e| format!("retained generation {generation} does not load: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let carried = lineage::carry_stale(retained, older.generation, &root, stale)
            .map_err(|e| e.to_string())?;
        let before = slot.doc.get_heads();
        slot.doc
            .apply_changes(carried)
            .map_err(|e| format!("applying carried changes: {e}"))?;
        Ok(slot
            .doc
            .get_changes(&before)
            .into_iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect())
    }

    /// Applies changes received from a peer's broadcast and makes the new ones durable.
    pub async fn apply_remote(
        &self,
        id: &DocId,
        changes: &[Vec<u8>],
    ) -> Result<RemoteApplied, DocError> {
        let incoming: usize = changes.iter().map(Vec::len).sum();
        let now = self.now_ms();
        let entry = self.entry(id);
        let queue_slot = self.reserve()?;
        let (pending, incomplete, origin) = {
            let mut guard = self.lock_for_change(&entry)?;
            let slot = guard.as_mut().expect("load fills the slot");
            check_growth(id, &slot.meta, incoming)?;
            let before = slot.doc.get_heads();
            let local = Local::of(&slot.doc);
            for change in changes {
                if let Err(e) = document::load_incremental(&mut slot.doc, change) {
                    drop(guard);
                    self.discard(&entry);
                    return Err(InvalidSync::BroadcastChange(Box::new(e)).into());
                }
            }
            let settled = self.settle(&entry, slot, &before, &local, Origin::Peer, &[]);
            let Settle {
                changes: new,
                history,
                broadcast,
                ..
            } = match settled {
                Ok(settled) => settled,
                Err(Refused { error, intact }) => {
                    if !intact {
                        drop(guard);
                        self.discard(&entry);
                    }
                    return Err(error);
                }
            };
            // Automerge holds back, in memory only, a change whose dependencies it lacks.
            let incomplete = !automerge::ReadDoc::get_missing_deps(&slot.doc, &[]).is_empty();
            if new.is_empty() {
                return Ok(RemoteApplied { new, incomplete });
            }
            let lifecycle = Lifecycle::of(&slot.doc);
            let origin = if broadcast {
                Origin::Client
            } else {
                Origin::Peer
            };
            (
                self.enqueue_changes(&entry, slot, new, lifecycle, now, queue_slot, history, None),
                incomplete,
                origin,
            )
        };
        let new = pending.changes.clone();
        self.finish(&entry, pending, origin, None).await?;
        Ok(RemoteApplied { new, incomplete })
    }

    /// Lists live documents whose ids start with `prefix`, after `cursor`.
    pub fn list(
        &self,
        prefix: &str,
        cursor: Option<&DocId>,
        limit: usize,
    ) -> Result<ListPage, DocError> {
        let now = self.now_ms();
        let mut docs = Vec::with_capacity(limit.min(1024));
        let mut more = false;
        self.store
            .scan_meta(prefix, cursor.map(DocId::as_str), |id, meta| {
                if !meta.live(now) {
                    return true;
                }
                if docs.len() == limit {
                    more = true;
                    return false;
                }
                docs.push(ListedDoc {
                    id: id.to_owned(),
                    heads: heads_to_hex(&meta.heads),
                    size_bytes: meta.size_bytes,
                    updated_at_ms: meta.updated_at_ms,
                    expires_at_ms: meta.expires_at_ms,
                });
                true
            })?;
        let next_cursor = if more {
            docs.last().map(|d| d.id.clone())
        } else {
            None
        };
        Ok(ListPage { docs, next_cursor })
    }

    /// Folds a document's change rows into a new snapshot; and, when its history outgrew its
    /// generation, starts the next one if this node is alone, or proposes it to the members
    /// (`docs/compaction.md`). Runs in the background.
    pub async fn compact(&self, id: &DocId) -> Result<(), DocError> {
        let Some(queue_slot) = self.writer.reserve().await else {
            return Err(DocError::ShuttingDown);
        };
        let entry = self.entry(id);
        let pending = {
            let mut guard = self.load(&entry)?;
            let slot = guard.as_mut().expect("load fills the slot");
            slot.compaction_queued = false;
            if entry.poisoned.load(Ordering::Acquire) {
                return Ok(());
            }
            let due = self.generation_due(&slot.meta);
            let proposed = !stability::proposals(&slot.doc).is_empty();
            let step = if due && self.alone() {
                self.start_generation(&entry, slot, queue_slot)
            } else if proposed {
                // Replication asks the members; meanwhile the rows still fold.
                self.note_proposal(id);
                self.rewrite_snapshot(&entry, slot, queue_slot);
                return Ok(());
            } else if due && !slot.meta.deleted {
                // (A tombstone's history goes with its purge.)
                self.note_proposal(id);
                self.propose(&entry, slot, queue_slot)
            } else {
                self.rewrite_snapshot(&entry, slot, queue_slot);
                return Ok(());
            };
            match step {
                Ok(step) => step,
                Err(e) => {
                    // A proposal may be in memory only.
                    drop(guard);
                    self.discard(&entry);
                    return Err(e);
                }
            }
        };
        // A proposal is an ordinary change, broadcast like one; so is a new generation's root
        // and what was carried onto it (nothing reaches members when this node is alone).
        self.finish(&entry, pending, Origin::Client, None).await?;
        Ok(())
    }

    /// Queues the rewrite of `slot`'s change rows into one snapshot, when they are due.
    fn rewrite_snapshot(&self, entry: &Arc<Entry>, slot: &mut Slot, queue_slot: QueueSlot) {
        if slot.meta.change_rows == 0 || !self.rewrite_due(&slot.meta) {
            return;
        }
        let snapshot = stored_snapshot(&slot.doc);
        let up_to_seq = slot.meta.next_seq.saturating_sub(1);
        slot.meta.snapshot_bytes = snapshot.len() as u64;
        slot.meta.size_bytes = snapshot.len() as u64;
        slot.meta.change_rows = 0;
        queue_slot.send(Job {
            mutation: Mutation::Compact {
                id: entry.id.clone(),
                snapshot,
                up_to_seq,
                meta: slot.meta.clone(),
            },
            poisoned: Arc::clone(&entry.poisoned),
            ack: None,
            record: None,
            remember: None,
        });
        self.metrics.snapshot_rewrites.inc();
        self.resize(entry, &slot.meta);
    }

    /// Commits a proposal to start `slot`'s next generation, as a local change.
    fn propose(
        &self,
        entry: &Arc<Entry>,
        slot: &mut Slot,
        queue_slot: QueueSlot,
    ) -> Result<Pending, DocError> {
        let now = self.now_ms();
        let hash = self.commit_proposal(slot)?;
        let change = automerge::ReadDoc::get_change_by_hash(&slot.doc, &hash)
            .ok_or(DocError::Internal("a committed proposal is missing"))?
            .raw_bytes()
            .to_vec();
        tracing::debug!(doc = %entry.id, proposal = %hash, "proposed a new generation");
        let lifecycle = Lifecycle::of(&slot.doc);
        Ok(self.enqueue_changes(
            entry,
            slot,
            vec![change],
            lifecycle,
            now,
            queue_slot,
            History::Extend,
            None,
        ))
    }

    /// Commits a proposal for `slot`'s next generation into its document (in memory).
    fn commit_proposal(&self, slot: &mut Slot) -> Result<ChangeHash, DocError> {
        let time_s = self.now_ms().div_euclid(1000);
        generation::propose(&mut slot.doc, time_s).map_err(|source| DocError::Automerge {
            context: "proposing a new generation",
            source: Box::new(source),
        })
    }

    /// Remembers that `id` holds a proposal, for replication to ask the members about.
    fn note_proposal(&self, id: &DocId) {
        let mut proposals = lock(&self.proposals);
        if proposals.len() < PROPOSALS_PENDING_MAX {
            proposals.insert(id.clone());
        }
    }

    /// Documents holding a proposal to start their next generation, at most `max`: replication
    /// asks every member for a report on them ([`Documents::compact_if_stable`]).
    pub fn pending_proposals(&self, max: usize) -> Vec<DocId> {
        lock(&self.proposals).iter().take(max).cloned().collect()
    }

    /// What this node says of `id` to a member asking whether a proposal is stable; `None`
    /// when it has too many heads to report.
    pub fn stability_report(
        &self,
        id: &DocId,
        members: [u8; 32],
    ) -> Result<Option<stability::Report>, DocError> {
        let entry = self.entry(id);
        let guard = self.load(&entry)?;
        let slot = guard.as_ref().expect("load fills the slot");
        let report = stability::Report::of(id.clone(), &slot.doc, members);
        Ok((report.heads.len() <= verge_core::limits::WIRE_REPORT_HEADS_MAX).then_some(report))
    }

    /// Starts `id`'s next generation if its winning proposal is stable given every member's
    /// report (`members` lists them, `own_digest` is this node's member digest). The new
    /// generation is durable when this returns `Ok(Ok(()))`; `Ok(Err(_))` says why it is not
    /// stable yet. A document with no proposal left (it compacted, or moved to a generation
    /// another node started) leaves the pending set.
    pub async fn compact_if_stable(
        &self,
        id: &DocId,
        members: &[String],
        reports: &std::collections::BTreeMap<String, stability::Report>,
        own_digest: &[u8; 32],
    ) -> Result<Result<(), stability::NotStable>, DocError> {
        let Some(queue_slot) = self.writer.reserve().await else {
            return Err(DocError::ShuttingDown);
        };
        let entry = self.entry(id);
        let pending = {
            let mut guard = self.lock_for_change(&entry)?;
            let slot = guard.as_mut().expect("load fills the slot");
            let point = match stability::stable_point(&slot.doc, members, reports, own_digest) {
                Ok(point) => point,
                Err(stability::NotStable::NoProposal) => {
                    lock(&self.proposals).remove(id);
                    return Ok(Err(stability::NotStable::NoProposal));
                }
                Err(why) => return Ok(Err(why)),
            };
            match self.fold_at(&entry, slot, point, queue_slot) {
                Ok(pending) => pending,
                Err(e) => {
                    drop(guard);
                    self.discard(&entry);
                    return Err(e);
                }
            }
        };
        lock(&self.proposals).remove(id);
        // Broadcast: the root and the changes carried onto it.
        self.finish(&entry, pending, Origin::Client, None).await?;
        Ok(Ok(()))
    }

    /// Starts the next generation of `slot`'s document on this node alone: proposes it over
    /// every head, which is then stable at once (no member can hold anything else), and folds
    /// the history at the proposal.
    fn start_generation(
        &self,
        entry: &Arc<Entry>,
        slot: &mut Slot,
        queue_slot: QueueSlot,
    ) -> Result<Pending, DocError> {
        let point = self.commit_proposal(slot)?;
        self.fold_at(entry, slot, point, queue_slot)
    }

    /// Builds the next generation of `slot`'s document at `point` (`verge_core::generation`),
    /// carries every change outside it, and queues the new history in place of the old.
    fn fold_at(
        &self,
        entry: &Arc<Entry>,
        slot: &mut Slot,
        point: ChangeHash,
        queue_slot: QueueSlot,
    ) -> Result<Pending, DocError> {
        let from = Lineage::of(&slot.doc);
        let mut compaction = generation::Compaction::start(&slot.doc, point).map_err(|e| {
            tracing::error!(doc = %entry.id, error = %e, "cannot build a new generation");
            DocError::Internal("a new generation could not be built")
        })?;
        let carried = compaction.carry_all(&slot.doc).map_err(|e| {
            tracing::error!(doc = %entry.id, error = %e, "cannot carry changes onto a new generation");
            DocError::Internal("changes could not be carried onto a new generation")
        })?;
        let actor = generation::generation_actor(slot.doc.get_actor(), compaction.number());
        // What the members get at once: the root and the carried changes. Those that compact
        // at the same point build the same; the others move to it on receipt.
        let announced: Vec<Vec<u8>> = std::iter::once(compaction.root().raw_bytes().to_vec())
            .chain(carried.iter().map(|c| c.raw_bytes().to_vec()))
            .collect();
        let left = std::mem::replace(&mut slot.doc, compaction.into_document().with_actor(actor));
        let left_snapshot = stored_snapshot(&left);
        slot.left = Some((from.generation, Arc::new(left_snapshot.clone())));
        let previous = Previous::Retain {
            generation: from.generation,
            keep: self.config.retain_generations,
            snapshot: left_snapshot,
            at_ms: self.now_ms(),
        };
        self.metrics.carried_changes.inc_by(carried.len() as u64);
        let history_before = slot.meta.history_changes;
        let snapshot = stored_snapshot(&slot.doc);
        slot.meta.heads = slot.doc.get_heads();
        replaced_history(&mut slot.meta, &slot.doc, snapshot.len(), 1 + carried.len());
        slot.read_cache = None;
        tracing::debug!(
            doc = %entry.id,
            from = %from,
            history_changes = history_before,
            carried = carried.len(),
            snapshot_bytes = snapshot.len(),
            "started a new generation"
        );
        let mutation = Mutation::Replace {
            id: entry.id.clone(),
            snapshot,
            meta: slot.meta.clone(),
            previous,
        };
        Ok(self.queue(
            entry,
            slot,
            queue_slot,
            mutation,
            announced,
            Counted::Generation,
            None,
        ))
    }

    /// Compacts documents as their ids arrive, until the channel closes.
    pub async fn run_compactor(self: Arc<Self>, mut rx: mpsc::Receiver<DocId>) {
        while let Some(id) = rx.recv().await {
            if let Err(e) = self.compact(&id).await {
                tracing::warn!(doc = %id, error = %e, "compaction failed");
            }
        }
    }

    /// Deletes the generations documents left more than `retain_ms` ago (`docs/compaction.md`).
    /// Returns how many.
    pub fn release_retained(&self, retain_ms: i64) -> Result<usize, DocError> {
        let before = self.now_ms().saturating_sub(retain_ms);
        let released = self.store.release_retained(before)?;
        self.metrics.retained_released.inc_by(released as u64);
        Ok(released)
    }

    /// Drops the feed records older than `retain_ms`, at most [`TRIM_BATCH`] of them. Returns
    /// how many.
    pub fn trim_feed(&self, retain_ms: i64) -> Result<u64, DocError> {
        let before = self.now_ms().saturating_sub(retain_ms);
        let dropped = self.store.trim_feed_before(before, TRIM_BATCH)?;
        self.metrics.feed_trimmed.inc_by(dropped);
        Ok(dropped)
    }

    /// Purges documents expired at `now`, and tombstones older than `tombstone_retention_ms`.
    /// Returns how many were purged; a pass that completes counts in `verge_purge_rounds_total`.
    pub async fn purge_expired(&self, tombstone_retention_ms: i64) -> Result<usize, DocError> {
        let now = self.now_ms();
        let purgeable = |meta: &DocMeta| {
            !meta.stub
                && (meta.expires_at_ms.is_some_and(|at| at <= now)
                    || (meta.deleted
                        && meta.updated_at_ms.saturating_add(tombstone_retention_ms) <= now))
        };
        let mut candidates = Vec::new();
        self.store.scan_meta("", None, |id, meta| {
            if purgeable(&meta) {
                candidates.push(id.to_owned());
            }
            true
        })?;
        let mut purged = 0;
        for id in candidates {
            let Ok(id) = DocId::new(id) else { continue };
            let Some(queue_slot) = self.writer.reserve().await else {
                return Err(DocError::ShuttingDown);
            };
            let entry = self.entry(&id);
            let mut guard = self.load(&entry)?;
            let slot = guard.as_mut().expect("load fills the slot");
            if !purgeable(&slot.meta) {
                continue; // Written since the scan.
            }
            // What remains is the root of the next incarnation: a later write here, a revival
            // elsewhere and the same purge elsewhere all land in that incarnation, and a replica
            // still holding the old history takes it over (see `verge_core::incarnation`).
            let next = incarnation::of(&slot.doc) + 1;
            let stub = incarnation::stub(slot.doc.get_actor(), next).map_err(|source| {
                DocError::Automerge {
                    context: "making the purged stub",
                    source: Box::new(source),
                }
            })?;
            let snapshot = stored_snapshot(&stub);
            let meta = DocMeta {
                heads: stub.get_heads(),
                size_bytes: snapshot.len() as u64,
                snapshot_bytes: snapshot.len() as u64,
                updated_at_ms: now,
                deleted: true,
                expires_at_ms: None,
                next_seq: slot.meta.next_seq,
                change_rows: 0,
                stub: true,
                generation: 0,
                history_changes: 1,
                generation_bytes: snapshot.len() as u64,
            };
            if let Some(listener) = self.listener.get() {
                listener.committed(&id, &meta.heads, None);
            }
            *slot = Slot {
                doc: stub,
                meta: meta.clone(),
                read_cache: None,
                compaction_queued: false,
                left: None,
            };
            queue_slot.send(Job {
                mutation: Mutation::Replace {
                    id: id.clone(),
                    snapshot,
                    meta,
                    previous: Previous::Forget,
                },
                poisoned: Arc::clone(&entry.poisoned),
                ack: None,
                record: None,
                remember: None,
            });
            self.resize(&entry, &slot.meta);
            self.metrics.purged_docs.inc();
            purged += 1;
        }
        self.metrics.purge_rounds.inc();
        Ok(purged)
    }
}

/// Refuses a change of up to `incoming` bytes that could take the document past
/// [`DOC_BYTES_MAX`]; checked before the change touches the document.
fn check_growth(id: &DocId, meta: &DocMeta, incoming: usize) -> Result<(), DocError> {
    if meta.size_bytes.saturating_add(incoming as u64) > DOC_BYTES_MAX as u64 {
        return Err(SizeLimit::Document {
            id: id.clone(),
            size_bytes: meta.size_bytes,
            incoming,
        }
        .into());
    }
    Ok(())
}

/// A document's snapshot as stored. Uncompressed, so that its size is the document's and the
/// [`DOC_BYTES_MAX`] limit bounds what the document holds (a compressed snapshot of repetitive
/// values would let a document grow without bound in memory); loading it needs no inflating.
fn stored_snapshot(doc: &Automerge) -> Vec<u8> {
    doc.save_nocompress()
}

/// The error of a write whose commit failed.
fn commit_failed(e: CommitError) -> DocError {
    match e {
        CommitError::Stopped => DocError::ShuttingDown,
        CommitError::StorageFull => DocError::StorageFull,
        CommitError::Poisoned => DocError::Poisoned,
        CommitError::Storage(e) => DocError::Storage(e),
    }
}

/// What settling received changes left to persist.
struct Settle {
    /// The change bytes to persist and pass on.
    changes: Vec<Vec<u8>>,
    /// Whether they extend the stored history or replace it.
    history: History,
    /// Whether changes the document held a moment ago were dropped or replaced (so a sync
    /// session's state may name them).
    dropped: bool,
    /// Whether this node made changes of its own while settling (it carried its changes onto
    /// a generation it moved to): they are broadcast like a local write, or the members that
    /// refused the originals as stale would see them only at the next anti-entropy round.
    broadcast: bool,
    /// The client's changes of an earlier generation were carried onto this one (of this
    /// number): once they are durable, the client is told to start over without them.
    carried_for_client: Option<u64>,
}

/// Received changes the document did not take.
struct Refused {
    error: DocError,
    /// The in-memory document is as it was before the changes arrived; otherwise it must be
    /// discarded and reloaded.
    intact: bool,
}

/// Whether two sets of heads are the same (in any order).
fn same_heads(a: &[ChangeHash], b: &[ChangeHash]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_unstable();
    b.sort_unstable();
    a.dedup();
    b.dedup();
    a == b
}

/// Whether `new` (received changes) starts a later generation of `local`'s incarnation.
fn brings_next_generation(local: &Local, new: &[automerge::Change]) -> bool {
    new.iter().filter(|c| c.deps().is_empty()).any(|c| {
        let started = lineage::started_by(c);
        started.incarnation == local.lineage.incarnation
            && started.generation > local.lineage.generation
    })
}

struct Pending {
    ack: oneshot::Receiver<Result<(), CommitError>>,
    heads: Vec<ChangeHash>,
    changes: Vec<Vec<u8>>,
    counted: Counted,
}

/// Which metric a commit counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// `verge_writes_total`: a write, a received change, a proposal.
    Write,
    /// `verge_compactions_total`: a generation this node started.
    Generation,
}

/// Records in `meta` that `doc`'s whole history was replaced by one snapshot of
/// `snapshot_bytes` holding `history_changes` changes (a newer incarnation or generation).
fn replaced_history(
    meta: &mut DocMeta,
    doc: &Automerge,
    snapshot_bytes: usize,
    history_changes: usize,
) {
    meta.size_bytes = snapshot_bytes as u64;
    meta.snapshot_bytes = snapshot_bytes as u64;
    meta.change_rows = 0;
    meta.generation = generation::of(doc);
    meta.history_changes = history_changes as u64;
    meta.generation_bytes = snapshot_bytes as u64;
}

/// Where a change came from, which decides whether this node broadcasts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// An API client: this node is the change's origin in the cluster.
    Client,
    /// A peer: replication already carries it.
    Peer,
}

/// What applying a peer's changes did.
#[derive(Debug)]
pub struct RemoteApplied {
    /// The changes that were new here, now durable (empty for a duplicate delivery).
    pub new: Vec<Vec<u8>>,
    /// Some changes of the document wait, in memory only, for changes this node lacks (they
    /// were sent before but are still on their way, e.g. through the relay): the batch is not
    /// durable here yet.
    pub incomplete: bool,
}
