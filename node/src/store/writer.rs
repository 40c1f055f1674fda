//! The single writer: group commit of every mutation into durable redb transactions.
//!
//! Request handlers apply a change in memory, reserve a slot in a bounded queue and wait for an
//! acknowledgement. One thread (a task under the simulator, whose runtime must own every step)
//! drains the queue: everything waiting when it wakes (up to
//! `batch_max`) goes into one transaction, committed with an fsync, and then every job of the
//! batch is acknowledged. Concurrent writes thus share one fsync, and throughput is bound by
//! Automerge CPU rather than by the disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use tokio::time::Instant;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::space::DiskSpace;
use super::{FeedEvent, FeedRecord, Mutation, Remembered, Store, StoreError};
use crate::metrics::Metrics;

/// Why a queued mutation was not made durable.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The batch's transaction failed; nothing of it is on disk.
    #[error("storage commit failed: {0}")]
    Storage(#[source] Arc<StoreError>),
    /// An earlier write to the same document failed, and this one was built on it.
    #[error("an earlier write to this document failed to commit")]
    Poisoned,
    /// The writer has stopped (the node is shutting down).
    #[error("the writer has stopped")]
    Stopped,
    /// Free space fell below `min_free_bytes`: the batch was not attempted (see
    /// [`super::space`]).
    #[error("free space is below min_free_bytes; writes are refused until space returns")]
    StorageFull,
}

/// A mutation waiting for the writer.
#[derive(Debug)]
pub struct Job {
    /// What to write.
    pub mutation: Mutation,
    /// Set by the writer when this document's in-memory state can no longer be trusted
    /// because a write to it failed; later jobs sharing the flag fail without being written.
    pub poisoned: Arc<AtomicBool>,
    /// Receives the outcome once the batch committed (or failed).
    pub ack: Option<oneshot::Sender<Result<(), CommitError>>>,
    /// The change as the feed records it, for a mutation that changes what the document holds
    /// (not for a rewrite of its storage). Numbered and written in the same transaction, then
    /// published to watchers in commit order.
    pub record: Option<FeedRecord>,
    /// What a write made with an idempotency key answered, kept in the same transaction.
    pub remember: Option<Remembered>,
}

/// Where the writer publishes committed feed records, and how many it keeps.
#[derive(Debug, Clone)]
pub struct FeedSink {
    /// Live watchers; a watcher that falls behind reads the store instead.
    pub events: broadcast::Sender<Arc<FeedEvent>>,
    /// The newest records kept (`[feed] retain_events`).
    pub retain_events: u64,
}

/// The sending side of the write queue.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Job>,
}

/// A reserved place in the write queue. Reserving before applying a change in memory means a
/// full queue rejects the write before it touches the document.
pub type QueueSlot = mpsc::OwnedPermit<Job>;

impl WriterHandle {
    /// Reserves a slot, failing at once when the queue is full or the writer stopped.
    pub fn try_reserve(&self) -> Result<QueueSlot, mpsc::error::TrySendError<()>> {
        self.tx.clone().try_reserve_owned().map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => mpsc::error::TrySendError::Full(()),
            mpsc::error::TrySendError::Closed(_) => mpsc::error::TrySendError::Closed(()),
        })
    }

    /// Reserves a slot, waiting for room (used by background work, which may wait).
    pub async fn reserve(&self) -> Option<QueueSlot> {
        self.tx.clone().reserve_owned().await.ok()
    }

    /// Jobs waiting in the queue.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Where the writer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriterMode {
    /// Its own OS thread, so that fsyncs never block the async runtime.
    #[default]
    Thread,
    /// A task on the current runtime. The simulator needs this: every step of a simulated host
    /// must run on the host's runtime, in an order the seed decides.
    Task,
}

/// The running writer, to wait for it to drain.
#[derive(Debug)]
pub enum WriterJoin {
    /// A writer thread.
    Thread(thread::JoinHandle<()>),
    /// A writer task.
    Task(tokio::task::JoinHandle<()>),
}

impl WriterJoin {
    /// Waits until the writer has committed everything queued and stopped; `false` if it
    /// panicked.
    pub async fn join(self) -> bool {
        match self {
            Self::Thread(handle) => tokio::task::spawn_blocking(move || handle.join().is_ok())
                .await
                .unwrap_or(false),
            Self::Task(handle) => handle.await.is_ok(),
        }
    }
}

/// Set to the first commit error. After a failed commit the database handle cannot be
/// trusted (redb refuses further writes on it once an I/O call failed), so the node stops
/// and its supervisor restarts it on a repaired file: fail-stop rather than limping on
/// read-only.
pub type StorageFailure = watch::Receiver<Option<CommitError>>;

/// Starts the writer. It runs until every [`WriterHandle`] is dropped and the queue is empty,
/// so dropping the handles is how shutdown drains pending writes.
pub fn spawn(
    store: Arc<Store>,
    space: Arc<DiskSpace>,
    queue_capacity: usize,
    batch_max: usize,
    metrics: Arc<Metrics>,
    mode: WriterMode,
    feed: FeedSink,
) -> std::io::Result<(WriterHandle, WriterJoin, StorageFailure)> {
    let (tx, rx) = mpsc::channel(queue_capacity);
    let (failed_tx, failed_rx) = watch::channel(None);
    let writer = Writer {
        store,
        space,
        batch_max: batch_max.max(1),
        metrics,
        failed: failed_tx,
        feed,
    };
    let join = match mode {
        WriterMode::Thread => WriterJoin::Thread(
            thread::Builder::new()
                .name("verge-writer".into())
                .spawn(move || writer.run_thread(rx))?,
        ),
        WriterMode::Task => WriterJoin::Task(tokio::spawn(writer.run_task(rx))),
    };
    Ok((WriterHandle { tx }, join, failed_rx))
}

struct Writer {
    store: Arc<Store>,
    space: Arc<DiskSpace>,
    batch_max: usize,
    metrics: Arc<Metrics>,
    failed: watch::Sender<Option<CommitError>>,
    feed: FeedSink,
}

impl Writer {
    fn run_thread(self, mut rx: mpsc::Receiver<Job>) {
        let mut batch: Vec<Job> = Vec::with_capacity(self.batch_max);
        while let Some(first) = rx.blocking_recv() {
            take_batch(first, &mut rx, &mut batch, self.batch_max, &self.metrics);
            self.commit(&mut batch);
        }
        tracing::debug!("writer drained and stopped");
    }

    async fn run_task(self, mut rx: mpsc::Receiver<Job>) {
        let mut batch: Vec<Job> = Vec::with_capacity(self.batch_max);
        while let Some(first) = rx.recv().await {
            // Let the writes that are being made right now join this batch, as they would
            // while a writer thread is busy with the previous commit.
            tokio::task::yield_now().await;
            take_batch(first, &mut rx, &mut batch, self.batch_max, &self.metrics);
            self.commit(&mut batch);
        }
        tracing::debug!("writer drained and stopped");
    }

    fn commit(&self, batch: &mut Vec<Job>) {
        if self.space.check() {
            // Not attempted: redb would latch the failure and fail every later read too.
            refuse_batch(batch, CommitError::StorageFull);
            return;
        }
        if let Err(e) = commit_batch(&self.store, batch, &self.metrics, &self.feed) {
            self.failed.send_if_modified(|failed| {
                let first = failed.is_none();
                if first {
                    *failed = Some(e.clone());
                }
                first
            });
        }
    }
}

/// Answers every job of `batch` with `error`; their documents' in-memory copies are dropped.
fn refuse_batch(batch: &mut Vec<Job>, error: CommitError) {
    for mut job in batch.drain(..) {
        job.poisoned.store(true, Ordering::Release);
        if let Some(ack) = job.ack.take() {
            let _ = ack.send(Err(error.clone()));
        }
    }
}

/// Collects `first` and whatever else is queued, up to `batch_max` jobs.
fn take_batch(
    first: Job,
    rx: &mut mpsc::Receiver<Job>,
    batch: &mut Vec<Job>,
    batch_max: usize,
    metrics: &Metrics,
) {
    batch.push(first);
    while batch.len() < batch_max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    metrics.write_queue_depth.set(rx.len() as i64);
}

/// Commits a batch, publishes its feed records and acknowledges its jobs; the commit error, if
/// any.
fn commit_batch(
    store: &Store,
    batch: &mut Vec<Job>,
    metrics: &Metrics,
    feed: &FeedSink,
) -> Result<(), CommitError> {
    let (live, poisoned): (Vec<Job>, Vec<Job>) = batch
        .drain(..)
        .partition(|job| !job.poisoned.load(Ordering::Acquire));
    for job in poisoned {
        if let Some(ack) = job.ack {
            let _ = ack.send(Err(CommitError::Poisoned));
        }
    }
    if live.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let mut live = live;
    let mut records: Vec<FeedRecord> = live.iter_mut().filter_map(|j| j.record.take()).collect();
    let mutations: Vec<&Mutation> = live.iter().map(|j| &j.mutation).collect();
    let remember: Vec<&Remembered> = live.iter().filter_map(|j| j.remember.as_ref()).collect();
    let mut numbered: Vec<&mut FeedRecord> = records.iter_mut().collect();
    let result = store.commit_with_feed(&mutations, &mut numbered, &remember, feed.retain_events);
    metrics
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.commit_batch_size.observe(live.len() as f64);
    let outcome = match result {
        Ok(()) => {
            if let Some(last) = records.last() {
                metrics.feed_last_seq.set(last.seq as i64);
            }
            // Before the acknowledgements: a writer that reads its own write through the feed
            // finds it there.
            for record in records {
                let _ = feed.events.send(Arc::new(FeedEvent::new(record)));
            }
            Ok(())
        }
        Err(e) => {
            metrics.commit_errors.inc();
            tracing::error!(error = %e, jobs = live.len(), "commit failed; the batch's writes are not acknowledged");
            for job in &live {
                job.poisoned.store(true, Ordering::Release);
            }
            Err(CommitError::Storage(Arc::new(e)))
        }
    };
    for job in &mut live {
        if let Some(ack) = job.ack.take() {
            let _ = ack.send(outcome.clone());
        }
    }
    outcome
}
