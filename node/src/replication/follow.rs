//! Following the node's commits ([`crate::documents::CommitListener`]): the index of document
//! digests that anti-entropy reconciles, and the feed of local changes the broadcast sends.
//!
//! The index is updated on the committing task, never dropped: a stale digest could make two
//! nodes that differ look alike. The feed is bounded; a change it cannot take is left to
//! anti-entropy (counted in `verge_broadcast_dropped_total`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use automerge::ChangeHash;
use tokio::sync::mpsc;
use verge_core::DocId;
use verge_core::anti_entropy::DigestIndex;

use crate::documents::{CommitListener, DocError, Documents};
use crate::metrics::Metrics;

/// Local changes waiting to be batched; when full, changes are left to anti-entropy.
pub const FEED_CAPACITY: usize = verge_core::limits::BROADCAST_FEED_MAX;

/// Replication's view of the node's commits.
#[derive(Debug)]
pub struct Follower {
    digests: Mutex<DigestIndex>,
    feed: mpsc::Sender<LocalChange>,
    metrics: Arc<Metrics>,
    /// The origin of the monotonic clock the settle time is measured on.
    started: tokio::time::Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Follower {
    /// Starts following `docs`: from now on every commit reaches the follower, and the index
    /// holds every stored document (it is filled under its lock, so a commit made meanwhile
    /// lands after the stored heads). Returns the follower, the receiving end of the feed and
    /// the number of documents indexed.
    pub fn start(
        docs: &Documents,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Self>, mpsc::Receiver<LocalChange>, usize), DocError> {
        let (feed, feed_rx) = mpsc::channel(FEED_CAPACITY);
        let follower = Arc::new(Self {
            digests: Mutex::new(DigestIndex::new()),
            feed,
            metrics,
            started: tokio::time::Instant::now(),
        });
        docs.set_listener(Arc::clone(&follower) as Arc<dyn CommitListener>);
        let indexed = {
            let mut index = lock(&follower.digests);
            docs.scan_heads(|id, heads| index.update(id, heads))?;
            index.len()
        };
        Ok((follower, feed_rx, indexed))
    }

    /// Milliseconds since following started, on the monotonic clock: when a document last
    /// changed, for anti-entropy's settle time (a wall clock stepping back must not hold
    /// documents out of repair).
    fn mono_ms(&self) -> i64 {
        i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// A sealed negentropy storage of every document's digest, for anti-entropy.
    pub fn digest_storage(&self) -> negentropy::NegentropyStorageVector {
        lock(&self.digests).storage()
    }

    /// The document with this digest, if this node holds it at those heads.
    pub fn doc_for_digest(&self, digest: &[u8; 32]) -> Option<DocId> {
        lock(&self.digests).doc_for(digest).cloned()
    }

    /// The document with this digest, if this node holds it at those heads and it has not
    /// changed for a moment (see `verge_core::anti_entropy::SETTLE_MS`).
    pub fn settled_doc_for_digest(&self, digest: &[u8; 32]) -> Option<DocId> {
        lock(&self.digests)
            .settled_doc_for(digest, self.mono_ms())
            .cloned()
    }
}

impl CommitListener for Follower {
    fn committed(&self, doc: &DocId, heads: &[ChangeHash], local: Option<LocalChange>) {
        lock(&self.digests).update_at(doc, heads, self.mono_ms());
        if let Some(change) = local
            && self.feed.try_send(change).is_err()
        {
            // Anti-entropy repairs what the broadcast misses.
            self.metrics.broadcast_dropped.inc();
        }
    }
}

/// Changes committed through this node's API or a client's sync, for the broadcast.
#[derive(Debug)]
pub struct LocalChange {
    /// The document.
    pub doc: DocId,
    /// The encoded changes.
    pub changes: Vec<Vec<u8>>,
    /// Counts the peers that persisted the changes, for `?replicas=N`.
    pub waiter: Option<Arc<ReplicaWaiter>>,
}

/// Counts peer acknowledgements of one write.
#[derive(Debug, Default)]
pub struct ReplicaWaiter {
    acked: std::sync::atomic::AtomicUsize,
    notify: tokio::sync::Notify,
}

impl ReplicaWaiter {
    /// Records that one more peer persisted the write.
    pub fn ack(&self) {
        self.acked.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// Peers that persisted the write so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Acquire)
    }

    /// Waits until `n` peers persisted the write or `timeout` passes; returns the count.
    pub async fn wait(&self, n: usize, timeout: std::time::Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if self.acked() >= n {
                return self.acked();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.acked();
            }
        }
    }
}
