//! Continuous backup of a node's store to object storage (docs/operations.md).
//!
//! A **snapshot** holds every document row as of one read transaction, at a position of the
//! node's change feed; **segments** follow it, each holding the rows of the documents changed
//! since the previous one, read in one transaction too. A document's rows in a segment are
//! its whole stored state, so a restore applies segments in order without replaying history,
//! and a segment never depends on how the document was compacted in between. Snapshots are
//! taken every `snapshot_interval_s`, segments shipped every `ship_interval_ms` (the loss
//! window), both from read transactions that never block the writer, and streamed: memory is
//! bounded by a frame and the upload buffer, whatever the store's size.

pub mod format;
pub mod restore;
pub mod target;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::config::BackupConfig;
use crate::metrics::Metrics;
use crate::store::backup::ChangedError;
use crate::store::{EncryptionKey, FrameCipher, Store, StoreError};
use format::{Entry, Kind, ObjectEncoder};
use target::{DESCRIPTOR, SEGMENTS, SNAPSHOTS, SegmentName, SnapshotName, Target};

/// Most feed records one segment covers; a node further behind ships several back to back.
pub const SEGMENT_RECORDS_MAX: usize = 100_000;
/// Chunks encoded ahead of the upload (each at most a frame).
const UPLOAD_QUEUE: usize = 4;
/// Bytes an upload buffers before it becomes a multipart upload.
const UPLOAD_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Parts of a multipart upload in flight at once.
const UPLOAD_CONCURRENCY: usize = 2;
/// `backup now` requests waiting for the shipper.
const REQUEST_QUEUE: usize = 16;
/// Longest wait between retries after a failure.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Largest descriptor read.
const DESCRIPTOR_BYTES_MAX: usize = 64 * 1024;
/// `node` table key of the store's backup identity.
const STORE_ID_KEY: &str = "backup_store_id";
/// Version of the layout under a location.
const LAYOUT_VERSION: u32 = 1;

/// Why a backup step failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The object store failed.
    #[error("object storage: {0}")]
    Remote(#[from] object_store::Error),
    /// The local store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The location holds another store's backups.
    #[error(
        "{url} holds the backups of another store (node {node_id}); give each node its own location"
    )]
    Foreign {
        /// The location.
        url: String,
        /// The node the descriptor names.
        node_id: String,
    },
    /// The descriptor is not one this version reads.
    #[error("{url}/{DESCRIPTOR} is unreadable: {why}")]
    Descriptor {
        /// The location.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// Backups are not configured.
    #[error("backups are not configured ([backup] to in the config)")]
    NotConfigured,
    /// The node is stopping.
    #[error("the node is stopping")]
    Stopping,
    /// A background task failed.
    #[error("backup task failed: {0}")]
    Task(String),
}

/// The descriptor object: which store writes to a location.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Descriptor {
    layout: u32,
    store_id: String,
    node_id: String,
    encrypted: bool,
    /// The fingerprint of the store's key ([`EncryptionKey::fingerprint`]): a chain is
    /// sealed under one key, so a re-keyed store starts a new one.
    #[serde(default)]
    key: Option<String>,
}

/// An object written.
#[derive(Debug, Clone, Serialize)]
pub struct Shipped {
    /// Its path under the location.
    pub name: String,
    /// Its size.
    pub bytes: u64,
    /// Documents it holds.
    pub documents: u64,
    /// The feed position it brings a restore to.
    pub seq: u64,
    /// When its view was taken, Unix milliseconds.
    pub at_ms: i64,
    /// A segment that left records for the next one.
    #[serde(skip)]
    pub partial: bool,
}

/// What status reports of backups.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupStatus {
    /// The location.
    pub to: String,
    /// `ok`, `starting` or `failing`.
    pub state: &'static str,
    /// The last failure, while failing.
    pub error: Option<String>,
    /// The feed position shipped so far.
    pub shipped_seq: Option<u64>,
    /// When the last object was written, Unix milliseconds.
    pub last_shipped_at_ms: Option<i64>,
    /// The last snapshot written.
    pub last_snapshot: Option<Shipped>,
}

type Reply = oneshot::Sender<Result<Shipped, String>>;

/// A running backup: status and `backup now`.
#[derive(Debug)]
pub struct Backup {
    target: Target,
    status: Mutex<BackupStatus>,
    requests: mpsc::Sender<Reply>,
}

/// Everything the shipper works with.
struct Shipper {
    backup: Arc<Backup>,
    store: Arc<Store>,
    cipher: Option<Arc<FrameCipher>>,
    key_fingerprint: Option<String>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    node_id: String,
    config: BackupConfig,
    /// The feed position shipped; `None` until known (or when a snapshot must come next).
    shipped: Option<u64>,
    last_snapshot_at_ms: Option<i64>,
    /// The time of the last object written: names never go back in time, even when the
    /// clock does.
    last_at_ms: i64,
    /// This store's backup identity.
    store_id: String,
}

/// Tells the shipper to ship what the drained writer committed last, and waits for it.
#[derive(Debug)]
pub struct Finish(oneshot::Sender<oneshot::Sender<()>>);

impl Finish {
    /// Ships the last segment, waiting at most `timeout`.
    pub async fn run(self, timeout: Duration) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.0.send(done_tx).is_ok() && tokio::time::timeout(timeout, done_rx).await.is_err() {
            tracing::warn!("the last backup segment was not shipped in {timeout:?}");
        }
    }
}

/// A started backup: its handle, its task and the signal that finishes it.
pub type Started = (Arc<Backup>, tokio::task::JoinHandle<()>, Finish);

/// Starts backups when `[backup] to` is set: the handle, the task and its finishing signal.
pub fn start(
    config: &BackupConfig,
    store: Arc<Store>,
    key: Option<&EncryptionKey>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    node_id: &str,
    nonce_seed: [u8; 32],
) -> Result<Option<Started>, target::TargetError> {
    let Some(to) = &config.to else {
        return Ok(None);
    };
    let target = Target::open(to)?;
    let (requests, requests_rx) = mpsc::channel(REQUEST_QUEUE);
    let backup = Arc::new(Backup {
        status: Mutex::new(BackupStatus {
            to: target.url.clone(),
            state: "starting",
            ..BackupStatus::default()
        }),
        target,
        requests,
    });
    let shipper = Shipper {
        backup: Arc::clone(&backup),
        store,
        cipher: key.map(|k| Arc::new(FrameCipher::new(k, nonce_seed))),
        key_fingerprint: key.map(EncryptionKey::fingerprint),
        clock,
        metrics,
        node_id: node_id.to_owned(),
        config: config.clone(),
        shipped: None,
        last_snapshot_at_ms: None,
        last_at_ms: i64::MIN,
        store_id: String::new(),
    };
    let (finish_tx, finish_rx) = oneshot::channel();
    let task = tokio::spawn(shipper.run(requests_rx, finish_rx));
    Ok(Some((backup, task, Finish(finish_tx))))
}

impl Backup {
    /// What status shows.
    pub fn status(&self) -> BackupStatus {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut BackupStatus)) {
        f(&mut self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    /// Takes a snapshot now and waits until it is written.
    pub async fn now(&self) -> Result<Shipped, BackupError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .await
            .map_err(|_| BackupError::Stopping)?;
        rx.await
            .map_err(|_| BackupError::Stopping)?
            .map_err(BackupError::Task)
    }

    /// The objects at the location.
    pub async fn list(&self) -> Result<Listing, BackupError> {
        Listing::read(self.target.store.as_ref()).await
    }
}

/// What a location holds, oldest first.
#[derive(Debug, Default, Clone)]
pub struct Listing {
    /// Snapshots, with their sizes.
    pub snapshots: Vec<(SnapshotName, u64)>,
    /// Segments, with their sizes.
    pub segments: Vec<(SegmentName, u64)>,
}

impl Listing {
    /// Lists `store`'s snapshots and segments (other objects are ignored).
    pub async fn read(store: &dyn ObjectStore) -> Result<Self, BackupError> {
        let mut listing = Listing::default();
        let mut snaps = store.list(Some(&ObjectPath::from(SNAPSHOTS)));
        while let Some(meta) = snaps.next().await {
            let meta = meta?;
            if let Some(name) = meta.location.filename().and_then(SnapshotName::parse) {
                listing.snapshots.push((name, meta.size));
            }
        }
        let mut segs = store.list(Some(&ObjectPath::from(SEGMENTS)));
        while let Some(meta) = segs.next().await {
            let meta = meta?;
            if let Some(name) = meta.location.filename().and_then(SegmentName::parse) {
                listing.segments.push((name, meta.size));
            }
        }
        listing.snapshots.sort_by_key(|(n, _)| (n.at_ms, n.seq));
        listing.segments.sort_by_key(|(n, _)| (n.at_ms, n.to));
        Ok(listing)
    }
}

impl Shipper {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Reply>,
        mut finish: oneshot::Receiver<oneshot::Sender<()>>,
    ) {
        let mut retry = Duration::from_millis(500);
        // Until the location is known to be ours, nothing is written to it.
        loop {
            match self.prepare().await {
                Ok(()) => break,
                Err(e) => {
                    self.failed(&e);
                    let sleep = tokio::time::sleep(retry);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            () = &mut sleep => break,
                            Some(reply) = requests.recv() => {
                                let _ = reply.send(Err(e.to_string()));
                            }
                            done = &mut finish => {
                                if let Ok(done) = done {
                                    let _ = done.send(());
                                }
                                return;
                            }
                        }
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
        let interval = Duration::from_millis(self.config.ship_interval_ms);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wait_until: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                done = &mut finish => {
                    // Only what is quick: the last segment, never a snapshot.
                    if let Err(e) = self.ship_segments().await {
                        self.failed(&e);
                    }
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                Some(reply) = requests.recv() => {
                    let result = self.snapshot().await;
                    if let Err(e) = &result {
                        self.failed(e);
                    }
                    let _ = reply.send(result.map_err(|e| e.to_string()));
                }
                _ = ticker.tick() => {
                    if wait_until.is_some_and(|t| tokio::time::Instant::now() < t) {
                        continue;
                    }
                    match self.ship_due().await {
                        Ok(()) => {
                            wait_until = None;
                            retry = Duration::from_millis(500);
                        }
                        Err(e) => {
                            self.failed(&e);
                            wait_until = Some(tokio::time::Instant::now() + retry);
                            retry = (retry * 2).min(RETRY_MAX);
                        }
                    }
                }
            }
        }
    }

    fn failed(&self, e: &BackupError) {
        tracing::warn!(to = %self.backup.target.url, error = %e, "backup failed; retrying");
        self.metrics.backup_failures.inc();
        self.backup.update(|s| {
            s.state = "failing";
            s.error = Some(e.to_string());
        });
    }

    fn succeeded(&self, shipped: &Shipped, kind: Kind) {
        self.metrics.backup_bytes.inc_by(shipped.bytes);
        match kind {
            Kind::Snapshot => self.metrics.backup_snapshots.inc(),
            Kind::Segment => self.metrics.backup_segments.inc(),
        };
        self.metrics.backup_shipped_seq.set(shipped.seq as i64);
        self.metrics
            .backup_last_success
            .set(self.clock.now_ms().div_euclid(1000));
        self.backup.update(|s| {
            s.state = "ok";
            s.error = None;
            s.shipped_seq = Some(shipped.seq);
            s.last_shipped_at_ms = Some(shipped.at_ms);
            if kind == Kind::Snapshot {
                s.last_snapshot = Some(shipped.clone());
            }
        });
    }

    /// Claims the location for this store (or checks it is ours) and finds where shipping
    /// resumes.
    async fn prepare(&mut self) -> Result<(), BackupError> {
        let store = Arc::clone(&self.store);
        // A durable write: off the async workers.
        self.store_id = tokio::task::spawn_blocking(move || -> Result<String, StoreError> {
            match store.node_value(STORE_ID_KEY)? {
                Some(id) => Ok(String::from_utf8_lossy(&id).into_owned()),
                None => {
                    let mut bytes = [0u8; 16];
                    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
                    let id = hex::encode(bytes);
                    store.set_node_value(STORE_ID_KEY, id.as_bytes())?;
                    Ok(id)
                }
            }
        })
        .await
        .map_err(|e| BackupError::Task(e.to_string()))??;
        let ours = self.descriptor();
        let new_chain = match self.read_descriptor().await? {
            None => {
                // Claimed atomically: of two stores starting at once, one wins, the other
                // reads the winner's descriptor next time and refuses.
                let path = ObjectPath::from(DESCRIPTOR);
                let body = serde_json::to_vec_pretty(&ours).unwrap_or_default();
                let opts = object_store::PutOptions::from(object_store::PutMode::Create);
                let put = self
                    .backup
                    .target
                    .store
                    .put_opts(&path, PutPayload::from(body), opts)
                    .await;
                match put {
                    Ok(_) => true,
                    Err(object_store::Error::AlreadyExists { .. }) => {
                        return Err(BackupError::Task(
                            "the location was claimed meanwhile; checking it again".into(),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Some(theirs) => {
                self.check_ours(&theirs)?;
                if theirs.encrypted != ours.encrypted || theirs.key != ours.key {
                    // Re-keyed: the next snapshot starts a chain sealed under the new key.
                    let path = ObjectPath::from(DESCRIPTOR);
                    let body = serde_json::to_vec_pretty(&ours).unwrap_or_default();
                    self.backup
                        .target
                        .store
                        .put(&path, PutPayload::from(body))
                        .await?;
                    true
                } else {
                    false
                }
            }
        };
        self.shipped = None;
        if !new_chain {
            let listing = Listing::read(self.backup.target.store.as_ref()).await?;
            self.last_at_ms = listing
                .snapshots
                .iter()
                .map(|(n, _)| n.at_ms)
                .chain(listing.segments.iter().map(|(n, _)| n.at_ms))
                .max()
                .unwrap_or(i64::MIN);
            // Resume after the newest chain, if it is whole and the store still reaches it;
            // anything else starts a new chain with a snapshot.
            if let Ok(plan) = restore::plan(&listing, None, &self.backup.target.url) {
                let resume = plan.segments.last().map_or(plan.snapshot.seq, |s| s.to);
                let feed_last = self.store.feed_bounds()?.last;
                if resume <= feed_last {
                    self.shipped = Some(resume);
                    self.last_snapshot_at_ms = Some(plan.snapshot.at_ms);
                }
            }
        }
        self.backup.update(|s| {
            s.state = "ok";
            s.error = None;
            s.shipped_seq = self.shipped;
        });
        tracing::info!(to = %self.backup.target.url, resume = ?self.shipped, "backups on");
        Ok(())
    }

    fn descriptor(&self) -> Descriptor {
        Descriptor {
            layout: LAYOUT_VERSION,
            store_id: self.store_id.clone(),
            node_id: self.node_id.clone(),
            encrypted: self.cipher.is_some(),
            key: self.key_fingerprint.clone(),
        }
    }

    async fn read_descriptor(&self) -> Result<Option<Descriptor>, BackupError> {
        let path = ObjectPath::from(DESCRIPTOR);
        let bad = |why: String| BackupError::Descriptor {
            url: self.backup.target.url.clone(),
            why,
        };
        match self.backup.target.store.get(&path).await {
            Ok(found) => {
                if found.meta.size > DESCRIPTOR_BYTES_MAX as u64 {
                    return Err(bad(format!("{} bytes", found.meta.size)));
                }
                let bytes = found.bytes().await?;
                let theirs: Descriptor =
                    serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
                if theirs.layout != LAYOUT_VERSION {
                    return Err(bad(format!(
                        "layout {} (this version writes {LAYOUT_VERSION})",
                        theirs.layout
                    )));
                }
                Ok(Some(theirs))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a descriptor is this store's (a copy of the store under another node id is
    /// not: two writers of one chain would interleave).
    fn check_ours(&self, theirs: &Descriptor) -> Result<(), BackupError> {
        if theirs.store_id != self.store_id || theirs.node_id != self.node_id {
            return Err(BackupError::Foreign {
                url: self.backup.target.url.clone(),
                node_id: theirs.node_id.clone(),
            });
        }
        Ok(())
    }

    /// Before each snapshot: the location is still ours.
    async fn verify_claim(&self) -> Result<(), BackupError> {
        match self.read_descriptor().await? {
            Some(theirs) => self.check_ours(&theirs),
            None => Err(BackupError::Descriptor {
                url: self.backup.target.url.clone(),
                why: "it was removed; restart the node to claim the location again".into(),
            }),
        }
    }

    /// Ships what is due: a snapshot when none stands or the interval passed, else the
    /// changes since the last object.
    async fn ship_due(&mut self) -> Result<(), BackupError> {
        let now = self.clock.now_ms();
        let interval_ms = i64::try_from(self.config.snapshot_interval_s * 1000).unwrap_or(i64::MAX);
        let snapshot_due = match (self.shipped, self.last_snapshot_at_ms) {
            (Some(_), Some(at)) => now.saturating_sub(at) >= interval_ms,
            _ => true,
        };
        if snapshot_due {
            self.snapshot().await?;
            return Ok(());
        }
        self.ship_segments().await
    }

    /// Ships the changes since the last object (several segments when far behind).
    async fn ship_segments(&mut self) -> Result<(), BackupError> {
        if self.shipped.is_none() {
            return Ok(());
        }
        loop {
            match self.segment().await {
                // A node far behind ships the rest back to back; writes made while a segment
                // was written wait for the next tick, so that a busy node ships once an
                // interval, not continuously.
                Ok(Some(shipped)) if shipped.partial => {}
                Ok(_) => break,
                Err(UploadError::Trimmed) => {
                    tracing::warn!(
                        "the change feed was trimmed past what backups shipped; a snapshot comes next"
                    );
                    self.shipped = None;
                    break;
                }
                Err(UploadError::Backup(e)) => return Err(e),
            }
        }
        self.update_lag()
    }

    fn update_lag(&self) -> Result<(), BackupError> {
        let lag = self
            .store
            .feed_bounds()?
            .last
            .saturating_sub(self.shipped.unwrap_or(0));
        self.metrics.backup_lag_records.set(lag as i64);
        Ok(())
    }

    async fn snapshot(&mut self) -> Result<Shipped, BackupError> {
        self.verify_claim().await?;
        let store = Arc::clone(&self.store);
        let clock = Arc::clone(&self.clock);
        let floor = self.last_at_ms;
        let started = self.clock.now_ms();
        let shipped = self
            .upload(Kind::Snapshot, move |emit| {
                let (view, at_ms) = view_at(&store, clock.as_ref(), floor)?;
                let seq = view.feed_last()?;
                let documents = view.doc_count()?;
                let name = SnapshotName { seq, at_ms }.path().to_string();
                emit.begin(name, seq, at_ms)?;
                view.all_rows(|row| emit.entry(&Entry::Row(row)))?;
                Ok(documents)
            })
            .await?;
        tracing::info!(
            name = %shipped.name,
            bytes = shipped.bytes,
            documents = shipped.documents,
            ms = self.clock.now_ms().saturating_sub(started),
            "backup snapshot written"
        );
        self.shipped = Some(shipped.seq);
        self.last_snapshot_at_ms = Some(shipped.at_ms);
        self.last_at_ms = shipped.at_ms;
        self.succeeded(&shipped, Kind::Snapshot);
        self.update_lag()?;
        if let Err(e) = self.expire().await {
            self.metrics.backup_failures.inc();
            tracing::warn!(error = %e, "dropping old backups failed; retrying after the next snapshot");
        }
        Ok(shipped)
    }

    async fn segment(&mut self) -> Result<Option<Shipped>, UploadError> {
        let Some(from) = self.shipped else {
            return Ok(None);
        };
        let store = Arc::clone(&self.store);
        let clock = Arc::clone(&self.clock);
        let floor = self.last_at_ms;
        let partial = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let partial_out = Arc::clone(&partial);
        let shipped = self
            .upload(Kind::Segment, move |emit| {
                let (view, at_ms) = view_at(&store, clock.as_ref(), floor)?;
                let changed = match view.changed_after(from, SEGMENT_RECORDS_MAX) {
                    Ok(changed) => changed,
                    Err(ChangedError::Trimmed { .. }) => return Err(EmitError::Trimmed),
                    Err(ChangedError::Store(e)) => return Err(e.into()),
                };
                if changed.ids.is_empty() {
                    return Ok(0);
                }
                partial_out.store(changed.capped, std::sync::atomic::Ordering::Relaxed);
                let name = SegmentName {
                    from,
                    to: changed.to,
                    at_ms,
                    partial: changed.capped,
                }
                .path()
                .to_string();
                emit.begin(name, changed.to, at_ms)?;
                for id in &changed.ids {
                    emit.entry(&Entry::Clear(id.clone()))?;
                    view.doc_rows(id, |row| emit.entry(&Entry::Row(row)))?;
                }
                Ok(changed.ids.len() as u64)
            })
            .await;
        let mut shipped = shipped?;
        if shipped.name.is_empty() {
            return Ok(None);
        }
        shipped.partial = partial.load(std::sync::atomic::Ordering::Relaxed);
        self.shipped = Some(shipped.seq);
        self.last_at_ms = shipped.at_ms;
        self.succeeded(&shipped, Kind::Segment);
        Ok(Some(shipped))
    }

    /// Drops snapshots beyond `keep_snapshots` and the segments before the oldest kept one,
    /// which no restore can use.
    async fn expire(&self) -> Result<(), BackupError> {
        let remote = self.backup.target.store.as_ref();
        let listing = Listing::read(remote).await?;
        let keep = usize::try_from(self.config.keep_snapshots).unwrap_or(usize::MAX);
        let Some(drop_count) = listing.snapshots.len().checked_sub(keep) else {
            return Ok(());
        };
        let Some((oldest_kept, _)) = listing.snapshots.get(drop_count) else {
            return Ok(());
        };
        for (name, _) in &listing.snapshots[..drop_count] {
            remote.delete(&name.path()).await?;
        }
        for (name, _) in &listing.segments {
            if name.at_ms < oldest_kept.at_ms {
                remote.delete(&name.path()).await?;
            }
        }
        Ok(())
    }

    /// Runs `produce` on a blocking thread, streaming what it encodes into one object.
    async fn upload<F>(&self, kind: Kind, produce: F) -> Result<Shipped, UploadError>
    where
        F: FnOnce(&mut Emit) -> Result<u64, EmitError> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Chunk>(UPLOAD_QUEUE);
        let cipher = self.cipher.clone();
        let producer = tokio::task::spawn_blocking(move || {
            let mut emit = Emit {
                tx,
                kind,
                cipher,
                encoder: None,
            };
            let documents = produce(&mut emit)?;
            emit.finish()?;
            Ok(documents)
        });
        let remote = Arc::clone(&self.backup.target.store);
        let mut writer: Option<BufWriter> = None;
        let mut head: Option<(String, u64, i64)> = None;
        let mut bytes = 0u64;
        let mut failure: Option<BackupError> = None;
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Chunk::Begin { name, seq, at_ms } => {
                    writer = Some(
                        BufWriter::with_capacity(
                            Arc::clone(&remote),
                            ObjectPath::from(name.as_str()),
                            UPLOAD_BUFFER_BYTES,
                        )
                        .with_max_concurrency(UPLOAD_CONCURRENCY),
                    );
                    head = Some((name, seq, at_ms));
                }
                Chunk::Bytes(b) => {
                    bytes += b.len() as u64;
                    if let Some(w) = writer.as_mut()
                        && let Err(e) = w.put(Bytes::from(b)).await
                    {
                        failure = Some(e.into());
                        break;
                    }
                }
            }
        }
        // Stop the producer if the upload failed (its next send fails).
        drop(rx);
        let produced = producer
            .await
            .map_err(|e| UploadError::Backup(BackupError::Task(e.to_string())))?;
        let documents = match (failure, produced) {
            (None, Ok(documents)) => documents,
            (failure, produced) => {
                if let Some(mut w) = writer {
                    let _ = w.abort().await;
                }
                return Err(match (failure, produced) {
                    (_, Err(EmitError::Trimmed)) => UploadError::Trimmed,
                    (Some(e), _) => UploadError::Backup(e),
                    (None, Err(EmitError::Store(e))) => UploadError::Backup(e.into()),
                    (None, Err(EmitError::Closed)) | (None, Ok(_)) => {
                        UploadError::Backup(BackupError::Task("upload stopped".into()))
                    }
                });
            }
        };
        let Some((name, seq, at_ms)) = head else {
            // Nothing to ship.
            return Ok(Shipped {
                name: String::new(),
                bytes: 0,
                documents: 0,
                seq: 0,
                at_ms: 0,
                partial: false,
            });
        };
        if let Some(mut w) = writer {
            // Completes the upload: the object appears whole or not at all.
            if let Err(e) = w.shutdown().await {
                let _ = w.abort().await;
                return Err(UploadError::Backup(BackupError::Task(format!(
                    "completing {name}: {e}"
                ))));
            }
        }
        Ok(Shipped {
            name,
            bytes,
            documents,
            seq,
            at_ms,
            partial: false,
        })
    }
}

/// Most tries at a view begun within one millisecond.
const VIEW_TRIES: usize = 16;

/// Begins a view and the time that names it. Every write acknowledged before that time
/// committed before the view began (so it is in it), and everything in the view committed by
/// that time (so `--at` it includes nothing later): the view is begun within one millisecond
/// of the clock, tried again in the rare case it straddles a tick. Never before `floor`.
fn view_at<'s>(
    store: &'s Store,
    clock: &dyn Clock,
    floor: i64,
) -> Result<(crate::store::backup::BackupView<'s>, i64), StoreError> {
    let mut tries = 0;
    loop {
        let before = clock.now_ms();
        let view = store.backup_view()?;
        let after = clock.now_ms();
        tries += 1;
        if before == after || tries >= VIEW_TRIES {
            return Ok((view, after.max(floor)));
        }
    }
}

enum Chunk {
    Begin { name: String, seq: u64, at_ms: i64 },
    Bytes(Vec<u8>),
}

/// What a producer encodes into; hands chunks to the upload.
struct Emit {
    tx: mpsc::Sender<Chunk>,
    kind: Kind,
    cipher: Option<Arc<FrameCipher>>,
    encoder: Option<ObjectEncoder>,
}

#[derive(Debug)]
enum EmitError {
    Trimmed,
    Closed,
    Store(StoreError),
}

impl From<StoreError> for EmitError {
    fn from(e: StoreError) -> Self {
        EmitError::Store(e)
    }
}

enum UploadError {
    Trimmed,
    Backup(BackupError),
}

impl From<UploadError> for BackupError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::Trimmed => BackupError::Task("the change feed was trimmed".into()),
            UploadError::Backup(e) => e,
        }
    }
}

impl Emit {
    fn begin(&mut self, name: String, seq: u64, at_ms: i64) -> Result<(), EmitError> {
        self.encoder = Some(ObjectEncoder::new(&name, self.kind, self.cipher.clone()));
        self.tx
            .blocking_send(Chunk::Begin { name, seq, at_ms })
            .map_err(|_| EmitError::Closed)
    }

    fn send(&self, chunks: Vec<Vec<u8>>) -> Result<(), EmitError> {
        for c in chunks {
            self.tx
                .blocking_send(Chunk::Bytes(c))
                .map_err(|_| EmitError::Closed)?;
        }
        Ok(())
    }

    fn entry(&mut self, entry: &Entry) -> Result<(), StoreError> {
        let Some(encoder) = self.encoder.as_mut() else {
            return Ok(());
        };
        let chunks = encoder.push(entry);
        self.send(chunks)
            .map_err(|_| StoreError::Corrupt("the upload stopped".into()))
    }

    fn finish(mut self) -> Result<(), EmitError> {
        match self.encoder.take() {
            Some(encoder) => self.send(encoder.finish()),
            None => Ok(()),
        }
    }
}

impl From<EmitError> for StoreError {
    fn from(e: EmitError) -> Self {
        match e {
            EmitError::Store(e) => e,
            other => StoreError::Corrupt(format!("{other:?}")),
        }
    }
}
