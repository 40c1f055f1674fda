//! Durable storage of documents in one redb file.
//!
//! Three tables hold a document: its latest snapshot, the incremental changes written since,
//! and a small [`DocMeta`] record. A write appends one change row and rewrites the meta record;
//! compaction replaces the snapshot and drops the rows it folded in. All writes go through
//! [`Store::commit`], called by the single writer task, one durable transaction per batch.
//!
//! With an encryption key (see [`crypt`]), every snapshot, change row and metadata record is
//! stored sealed; document ids (the table keys) and node-level values stay readable. An
//! encrypted canary in the `node` table tells at open whether the key is the store's.

pub mod backup;
pub mod crypt;
pub mod feed;
pub mod idempotency;
mod meta;
pub mod writer;

use std::borrow::Cow;
use std::fs;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use verge_core::DocId;

use crypt::{Cipher, Row};
pub use crypt::{EncryptionKey, FrameCipher, KeyError};
pub mod space;
pub use feed::{FeedBounds, FeedEvent, FeedRecord};
pub use idempotency::Remembered;
pub use meta::{DocMeta, META_HEADS_MAX, MetaDecodeError};

const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
const CHANGES: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("changes");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const NODE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("node");
/// Snapshots of generations a document left, by document and generation (`docs/compaction.md`).
const RETAINED: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("retained");
/// When each retained generation was left, in Unix milliseconds: read by the release sweep
/// without unsealing the snapshots.
const RETAINED_AT: TableDefinition<'_, (&str, u64), i64> = TableDefinition::new("retained_at");

/// The database file inside the data directory.
pub const DB_FILE: &str = "verge.redb";
/// Layout of the tables; a node refuses a file with another layout instead of misreading it.
const STORAGE_FORMAT: &[u8] = b"verge-store-1";
/// `node` table entry holding [`CANARY`] sealed under the key of an encrypted store.
const CANARY_KEY: &str = "encryption_canary";
/// The plaintext of the canary.
const CANARY: &[u8] = b"verge-encryption-canary-1";
/// Rows rewritten per read of a table while re-keying (all in one transaction).
const REKEY_CHUNK: usize = 1024;

/// A storage failure. The write it belonged to was not acknowledged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// redb failed (I/O error, corruption, full disk).
    #[error("storage engine: {0}")]
    Engine(#[from] redb::Error),
    /// A file operation around the database failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Stored bytes are not what this version wrote.
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
    /// The encryption key does not match the store: another key, a key for a plaintext
    /// store, or none for an encrypted one.
    #[error("encryption at rest: {0}")]
    Key(KeyMismatch),
}

/// How the encryption key given disagrees with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyMismatch {
    /// The store is encrypted with another key.
    #[error("the encryption key given is not the key this store was encrypted with")]
    WrongKey,
    /// The store is encrypted and no key was given.
    #[error(
        "this store is encrypted and no encryption key was given (use --encryption-key-file, [storage] encryption_key_file or VERGE_ENCRYPTION_KEY)"
    )]
    KeyMissing,
    /// A key was given for a plaintext store.
    #[error(
        "an encryption key was given but this store is not encrypted; start without the key, or encrypt the stopped node's store first with `verge rekey --new-key-file`"
    )]
    NotEncrypted,
}

macro_rules! engine_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Engine(e.into())
            }
        }
    )*};
}
engine_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<MetaDecodeError> for StoreError {
    fn from(e: MetaDecodeError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// Everything stored for one document, as loaded.
#[derive(Debug, Default)]
pub struct StoredDoc {
    /// The metadata record.
    pub meta: DocMeta,
    /// The snapshot followed by every change row, ready for `Automerge::load`.
    pub bytes: Vec<u8>,
}

/// One unit of a write batch.
#[derive(Debug)]
pub enum Mutation {
    /// Append change rows and replace the meta record.
    Append {
        /// The document.
        id: DocId,
        /// Sequence number of the first change; the rest follow consecutively.
        first_seq: u64,
        /// Encoded Automerge changes.
        changes: Vec<Vec<u8>>,
        /// The record after this write.
        meta: DocMeta,
    },
    /// Replace the snapshot and drop change rows up to and including `up_to_seq`.
    Compact {
        /// The document.
        id: DocId,
        /// The new snapshot (`Automerge::save`).
        snapshot: Vec<u8>,
        /// Last change row folded into the snapshot.
        up_to_seq: u64,
        /// The record after compaction.
        meta: DocMeta,
    },
    /// Remove every trace of the document.
    Purge {
        /// The document.
        id: DocId,
    },
    /// Replace the document's whole history (snapshot and change rows) by `snapshot`: a new
    /// incarnation or generation replaced the old one.
    Replace {
        /// The document.
        id: DocId,
        /// The new history (`Automerge::save`).
        snapshot: Vec<u8>,
        /// The record after the replacement.
        meta: DocMeta,
        /// What becomes of the histories the document left before.
        previous: Previous,
    },
}

/// What a replaced history leaves behind.
#[derive(Debug)]
pub enum Previous {
    /// Nothing: a new incarnation ends the old one, and a document that took a newer generation
    /// whole held nothing of its own to carry.
    Forget,
    /// The generation the document leaves, kept beside the ones it left before (the last
    /// `keep`), so that changes a client still holds of it can be carried onto the new one by
    /// the same rules as everywhere (`verge_core::lineage::carry_stale`).
    Retain {
        /// Its number.
        generation: u64,
        /// How many generations the document keeps, this one included.
        keep: u64,
        /// It, as this node held it (`Automerge::save`).
        snapshot: Vec<u8>,
        /// When it was left, in Unix milliseconds.
        at_ms: i64,
    },
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Encrypt values at rest under this key; `None` stores them in plain form. A store keeps
    /// the choice made at its creation: it refuses to open with another key, without its
    /// key, or with a key when it was created without one.
    pub encryption_key: Option<EncryptionKey>,
    /// Seed of the random source of encryption nonces. It must differ on every open (the
    /// node draws it from the OS); a simulator may fix it to replay a run.
    pub nonce_seed: [u8; 32],
}

impl StoreOptions {
    /// A plaintext store.
    pub fn plain() -> Self {
        Self {
            encryption_key: None,
            nonce_seed: [0; 32],
        }
    }
}

/// What [`Store::rekey`] rewrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RekeyReport {
    /// Snapshot rows.
    pub snapshots: u64,
    /// Change rows.
    pub changes: u64,
    /// Retained generations.
    pub retained: u64,
    /// Metadata records.
    pub metas: u64,
    /// Change feed records.
    pub feed: u64,
    /// Idempotency records.
    pub idempotency: u64,
}

/// The redb database of one node.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
    cipher: Option<Cipher>,
}

impl Store {
    /// Opens the database in `data_dir`, creating the directory and the file when missing.
    ///
    /// A new store is encrypted when `options` holds a key; an existing one is checked against
    /// the key (or its absence) and refused with [`StoreError::Key`] on a mismatch.
    pub fn open(data_dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
            context: format!("creating data directory {}", data_dir.display()),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        let created = !path.exists();
        let db = Database::create(&path)?;
        if created {
            // A new file is only durable once its directory entry is.
            sync_dir(data_dir)?;
        }
        Self::from_database(db, path, options)
    }

    /// Wraps a database opened by the caller: the simulator opens redb over its own simulated
    /// disk (a `redb::StorageBackend`) and hands it here, so the node's storage code runs
    /// unchanged on it. `path` only names the store in messages.
    pub fn from_database(
        db: Database,
        path: PathBuf,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        let cipher = options
            .encryption_key
            .as_ref()
            .map(|key| Cipher::new(key, options.nonce_seed));
        let store = Self { db, path, cipher };
        store.check_format()?;
        Ok(store)
    }

    /// Whether values are stored encrypted.
    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// Re-encrypts every stored value of the (stopped) node's store in `data_dir` in one
    /// durable transaction: from `old_key` (`None`: the store is plaintext) to `new_key`
    /// (`None`: store plaintext from now on). Either every value is rewritten or none is.
    pub fn rekey(
        data_dir: &Path,
        old_key: Option<EncryptionKey>,
        new_key: Option<EncryptionKey>,
        nonce_seed: [u8; 32],
    ) -> Result<RekeyReport, StoreError> {
        if !data_dir.join(DB_FILE).is_file() {
            return Err(StoreError::Io {
                context: format!("opening {}", data_dir.join(DB_FILE).display()),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let store = Self::open(
            data_dir,
            StoreOptions {
                encryption_key: old_key,
                nonce_seed,
            },
        )?;
        let mut next_seed = nonce_seed;
        // A different seed for the new cipher than the one the old cipher was given.
        next_seed[0] ^= 0x5a;
        let to = new_key.as_ref().map(|k| Cipher::new(k, next_seed));
        let from = store.cipher.as_ref();
        let to = to.as_ref();
        let mut tx = store.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let report = RekeyReport {
            snapshots: rewrite_by_id(&tx, SNAPSHOTS, from, to, |id: &str| Row::Snapshot(id))?,
            changes: rewrite_changes(&tx, CHANGES, from, to, |id, seq| Row::Change(id, seq))?,
            retained: rewrite_changes(&tx, RETAINED, from, to, |id, generation| {
                Row::Retained(id, generation)
            })?,
            metas: rewrite_by_id(&tx, META, from, to, |id: &str| Row::Meta(id))?,
            feed: feed::rewrite_feed(&tx, from, to)?,
            idempotency: rewrite_by_id(&tx, idempotency::KEYS, from, to, |key: &str| {
                Row::Idempotency(key)
            })?,
        };
        {
            let mut node = tx.open_table(NODE)?;
            match to {
                Some(c) => {
                    node.insert(CANARY_KEY, c.seal(Row::Node(CANARY_KEY), CANARY).as_slice())?;
                }
                None => {
                    node.remove(CANARY_KEY)?;
                }
            }
        }
        tx.commit()?;
        Ok(report)
    }

    fn seal<'a>(&self, row: Row<'_>, plain: &'a [u8]) -> Cow<'a, [u8]> {
        seal_with(self.cipher.as_ref(), row, plain)
    }

    fn unseal<'a>(&self, row: Row<'_>, stored: &'a [u8]) -> Result<Cow<'a, [u8]>, StoreError> {
        unseal_with(self.cipher.as_ref(), row, stored)
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_format(&self) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut node = tx.open_table(NODE)?;
            let found = node.get("format")?.map(|v| v.value().to_vec());
            let canary = node.get(CANARY_KEY)?.map(|v| v.value().to_vec());
            match found {
                None => {
                    node.insert("format", STORAGE_FORMAT)?;
                    if let Some(cipher) = &self.cipher {
                        let sealed = cipher.seal(Row::Node(CANARY_KEY), CANARY);
                        node.insert(CANARY_KEY, sealed.as_slice())?;
                    }
                }
                Some(f) if f == STORAGE_FORMAT => check_canary(self.cipher.as_ref(), canary)?,
                Some(f) if f == STORAGE_FORMAT => {}
                Some(f) => {
                    return Err(StoreError::Corrupt(format!(
                        "storage format {:?}, this build reads {:?}",
                        String::from_utf8_lossy(&f),
                        String::from_utf8_lossy(STORAGE_FORMAT)
                    )));
                }
            }
            tx.open_table(SNAPSHOTS)?;
            tx.open_table(CHANGES)?;
            tx.open_table(META)?;
            tx.open_table(RETAINED)?;
            tx.open_table(RETAINED_AT)?;
            tx.open_table(feed::FEED)?;
            tx.open_table(feed::FEED_STATE)?;
            tx.open_table(idempotency::KEYS)?;
            tx.open_table(idempotency::KEYS_AT)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Reads a node-level value (for example the persisted node id).
    pub fn node_value(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(NODE)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Writes a node-level value durably.
    pub fn set_node_value(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.open_table(NODE)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    /// Loads a document's bytes and metadata; `None` when the store has never seen it.
    ///
    /// A damaged file can make redb panic while decoding a page (an out-of-range length in a
    /// key, found by flipping bytes of a store): the panic is caught here and answered as
    /// [`StoreError::Corrupt`], so one unreadable document fails its own requests only.
    pub fn load(&self, id: &DocId) -> Result<Option<StoredDoc>, StoreError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load_rows(id)))
            .unwrap_or_else(|panic| {
                Err(StoreError::Corrupt(format!(
                    "reading {id} failed inside the storage engine: {}",
                    panic_message(panic.as_ref())
                )))
            })
    }

    fn load_rows(&self, id: &DocId) -> Result<Option<StoredDoc>, StoreError> {
        let tx = self.db.begin_read()?;
        let meta_table = tx.open_table(META)?;
        let Some(meta) = meta_table.get(id.as_str())? else {
            return Ok(None);
        };
        let meta = DocMeta::decode(&self.unseal(Row::Meta(id.as_str()), meta.value())?)?;
        let mut bytes = Vec::with_capacity(usize::try_from(meta.size_bytes).unwrap_or(0));
        if let Some(snapshot) = tx.open_table(SNAPSHOTS)?.get(id.as_str())? {
            bytes.extend_from_slice(&self.unseal(Row::Snapshot(id.as_str()), snapshot.value())?);
        }
        let changes = tx.open_table(CHANGES)?;
        for row in changes.range((id.as_str(), 0)..=(id.as_str(), u64::MAX))? {
            let (key, change) = row?;
            let (_, seq) = key.value();
            bytes.extend_from_slice(&self.unseal(Row::Change(id.as_str(), seq), change.value())?);
        }
        Ok(Some(StoredDoc { meta, bytes }))
    }

    /// The generations `id` retains, oldest first: each its number and its snapshot.
    pub fn retained(&self, id: &DocId) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(RETAINED)?;
        let mut out = Vec::new();
        for row in table.range((id.as_str(), 0)..=(id.as_str(), u64::MAX))? {
            let (key, value) = row?;
            let (_, generation) = key.value();
            let plain = self.unseal(Row::Retained(id.as_str(), generation), value.value())?;
            out.push((generation, plain.into_owned()));
        }
        Ok(out)
    }

    /// Deletes the retained generations left before `before_ms` (Unix milliseconds), in one
    /// durable transaction. Returns how many.
    pub fn release_retained(&self, before_ms: i64) -> Result<usize, StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let released = {
            let mut at = tx.open_table(RETAINED_AT)?;
            let mut old: Vec<(String, u64)> = Vec::new();
            for row in at.iter()? {
                let (key, value) = row?;
                if value.value() < before_ms {
                    let (id, generation) = key.value();
                    old.push((id.to_owned(), generation));
                }
            }
            let mut retained = tx.open_table(RETAINED)?;
            for (id, generation) in &old {
                at.remove((id.as_str(), *generation))?;
                retained.remove((id.as_str(), *generation))?;
            }
            old.len()
        };
        tx.commit()?;
        Ok(released)
    }

    /// Reads the metadata of the documents after `after` (exclusive) whose ids start with
    /// `prefix`, in id order, calling `visit` until it returns `false`.
    pub fn scan_meta(
        &self,
        prefix: &str,
        after: Option<&str>,
        mut visit: impl FnMut(&str, DocMeta) -> bool,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(META)?;
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        for row in table.range(start..)? {
            let (key, value) = row?;
            let key = key.value();
            if Some(key) == after {
                continue;
            }
            if !key.starts_with(prefix) {
                break;
            }
            if !visit(
                key,
                DocMeta::decode(&self.unseal(Row::Meta(key), value.value())?)?,
            ) {
                break;
            }
        }
        Ok(())
    }

    /// The ids of every stored document, in order.
    fn ids(&self) -> Result<Vec<String>, StoreError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(META)?;
            let mut ids = Vec::new();
            for row in table.iter()? {
                ids.push(row?.0.value().to_owned());
            }
            Ok(ids)
        }))
        .unwrap_or_else(|panic| {
            Err(StoreError::Corrupt(format!(
                "the document index is unreadable: {}; start the node on an empty data \
                 directory to fetch every document from its peers, or restore a backup",
                panic_message(panic.as_ref())
            )))
        })
    }

    /// Loads every stored document as the node would, and lists those that do not load.
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        let mut report = CheckReport::default();
        for id in self.ids()? {
            report.checked += 1;
            let doc = match DocId::new(&id) {
                Ok(doc) => doc,
                Err(e) => {
                    report.unreadable.push((id, format!("not a valid id: {e}")));
                    continue;
                }
            };
            let loaded = self.load(&doc).and_then(|stored| {
                let stored = stored.ok_or_else(|| StoreError::Corrupt("no rows".into()))?;
                std::panic::catch_unwind(|| automerge::Automerge::load(&stored.bytes))
                    .map_err(|panic| StoreError::Corrupt(panic_message(panic.as_ref())))?
                    .map_err(|e| StoreError::Corrupt(format!("its history does not load: {e}")))
            });
            if let Err(e) = loaded {
                report.unreadable.push((id, e.to_string()));
            }
        }
        Ok(report)
    }

    /// Writes a new store holding everything of this one but the documents in `skip`, in one
    /// durable transaction, then puts it in place of this one's file and keeps the old file
    /// beside it as `verge.redb.damaged-<unix seconds>`. The node must be stopped.
    pub fn rebuild_without(
        &self,
        data_dir: &Path,
        skip: &std::collections::HashSet<String>,
        options: StoreOptions,
    ) -> Result<Rebuilt, StoreError> {
        let io = |context: String| move |source| StoreError::Io { context, source };
        let new_path = data_dir.join(format!("{DB_FILE}.rebuild"));
        if new_path.exists() {
            fs::remove_file(&new_path).map_err(io(format!("removing {}", new_path.display())))?;
        }
        let ids = self.ids()?;
        let new_db = Database::create(&new_path)?;
        let mut tx = new_db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let read = self.db.begin_read()?;
        let mut documents = 0;
        {
            let mut node = tx.open_table(NODE)?;
            for row in read.open_table(NODE)?.iter()? {
                let (key, value) = row?;
                node.insert(key.value(), value.value())?;
            }
            let (mut metas, mut snapshots, mut changes) = (
                tx.open_table(META)?,
                tx.open_table(SNAPSHOTS)?,
                tx.open_table(CHANGES)?,
            );
            let (old_metas, old_snapshots, old_changes) = (
                read.open_table(META)?,
                read.open_table(SNAPSHOTS)?,
                read.open_table(CHANGES)?,
            );
            for id in ids.iter().filter(|id| !skip.contains(*id)) {
                let id = id.as_str();
                let rows = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let meta = old_metas.get(id)?.map(|v| v.value().to_vec());
                    let snapshot = old_snapshots.get(id)?.map(|v| v.value().to_vec());
                    let mut rows = Vec::new();
                    for row in old_changes.range((id, 0)..=(id, u64::MAX))? {
                        let (key, value) = row?;
                        rows.push((key.value().1, value.value().to_vec()));
                    }
                    Ok::<_, StoreError>((meta, snapshot, rows))
                }))
                .unwrap_or_else(|panic| {
                    Err(StoreError::Corrupt(format!(
                        "copying {id}: {}",
                        panic_message(panic.as_ref())
                    )))
                })?;
                let (meta, snapshot, rows) = rows;
                if let Some(meta) = meta {
                    metas.insert(id, meta.as_slice())?;
                }
                if let Some(snapshot) = snapshot {
                    snapshots.insert(id, snapshot.as_slice())?;
                }
                for (seq, row) in rows {
                    changes.insert((id, seq), row.as_slice())?;
                }
                documents += 1;
            }
        }
        tx.commit()?;
        drop(new_db);
        // The new file must open as a store (format, key) before it replaces the old one.
        drop(Store::from_database(
            Database::open(&new_path)?,
            new_path.clone(),
            options,
        )?);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let damaged = data_dir.join(format!("{DB_FILE}.damaged-{stamp}"));
        fs::rename(&self.path, &damaged)
            .map_err(io(format!("moving {} aside", self.path.display())))?;
        fs::rename(&new_path, &self.path)
            .map_err(io(format!("putting {} in place", new_path.display())))?;
        sync_dir(data_dir)?;
        Ok(Rebuilt { documents, damaged })
    }

    /// Number of documents stored, tombstones included.
    pub fn doc_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(META)?.len()?)
    }

    /// Applies a batch of mutations in one durable transaction. Either all of them are on disk
    /// when this returns `Ok`, or none is.
    pub fn commit(&self, batch: &[&Mutation]) -> Result<(), StoreError> {
        self.commit_with_feed(batch, &mut [], &[], u64::MAX)
    }

    /// [`Store::commit`], numbering `records` into the change feed in the same transaction
    /// (their `seq` is set) and keeping the newest `retain_events` records of it, and keeping
    /// what the writes made with idempotency keys answered (`remember`).
    pub fn commit_with_feed(
        &self,
        batch: &[&Mutation],
        records: &mut [&mut FeedRecord],
        remember: &[&Remembered],
        retain_events: u64,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        self.append_feed(&tx, records, retain_events)?;
        self.remember(&tx, remember)?;
        {
            let mut snapshots = tx.open_table(SNAPSHOTS)?;
            let mut changes = tx.open_table(CHANGES)?;
            let mut metas = tx.open_table(META)?;
            let mut retained = tx.open_table(RETAINED)?;
            let mut retained_at = tx.open_table(RETAINED_AT)?;
            for m in batch {
                match m {
                    Mutation::Append {
                        id,
                        first_seq,
                        changes: rows,
                        meta,
                    } => {
                        for (i, change) in rows.iter().enumerate() {
                            let seq = first_seq + i as u64;
                            let value = self.seal(Row::Change(id.as_str(), seq), change);
                            changes.insert((id.as_str(), seq), &*value)?;
                        }
                        let meta = meta.encode();
                        metas.insert(id.as_str(), &*self.seal(Row::Meta(id.as_str()), &meta))?;
                    }
                    Mutation::Compact {
                        id,
                        snapshot,
                        up_to_seq,
                        meta,
                    } => {
                        let value = self.seal(Row::Snapshot(id.as_str()), snapshot);
                        snapshots.insert(id.as_str(), &*value)?;
                        changes
                            .retain_in((id.as_str(), 0)..=(id.as_str(), *up_to_seq), |_, _| {
                                false
                            })?;
                        let meta = meta.encode();
                        metas.insert(id.as_str(), &*self.seal(Row::Meta(id.as_str()), &meta))?;
                    }
                    Mutation::Purge { id } => {
                        let all = (id.as_str(), 0)..=(id.as_str(), u64::MAX);
                        retained.retain_in(all.clone(), |_, _| false)?;
                        retained_at.retain_in(all, |_, _| false)?;
                        snapshots.remove(id.as_str())?;
                        changes
                            .retain_in((id.as_str(), 0)..=(id.as_str(), u64::MAX), |_, _| false)?;
                        metas.remove(id.as_str())?;
                    }
                    Mutation::Replace {
                        id,
                        snapshot,
                        meta,
                        previous,
                    } => {
                        changes
                            .retain_in((id.as_str(), 0)..=(id.as_str(), u64::MAX), |_, _| false)?;
                        // The generations kept: none, or the last ones up to the one just left.
                        let keep_from = match previous {
                            Previous::Forget => u64::MAX,
                            Previous::Retain {
                                generation,
                                keep,
                                snapshot,
                                at_ms,
                            } => {
                                let row = Row::Retained(id.as_str(), *generation);
                                let value = self.seal(row, snapshot);
                                retained.insert((id.as_str(), *generation), &*value)?;
                                retained_at.insert((id.as_str(), *generation), *at_ms)?;
                                (generation + 1).saturating_sub(*keep)
                            }
                        };
                        let dropped = (id.as_str(), 0)..(id.as_str(), keep_from);
                        retained.retain_in(dropped.clone(), |_, _| false)?;
                        retained_at.retain_in(dropped, |_, _| false)?;
                        let value = self.seal(Row::Snapshot(id.as_str()), snapshot);
                        snapshots.insert(id.as_str(), &*value)?;
                        let meta = meta.encode();
                        metas.insert(id.as_str(), &*self.seal(Row::Meta(id.as_str()), &meta))?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// What a panic carried, for an error message.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Flags of `verge check`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The stopped node's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The store's encryption key, if it is encrypted.
    #[arg(long, value_name = "FILE")]
    pub encryption_key_file: Option<PathBuf>,
    /// Rebuild the store without the unreadable documents, keeping the damaged file aside, so
    /// that the node fetches them again from its peers.
    #[arg(long)]
    pub repair: bool,
}

/// Runs `verge check`: the report on success (every document loads, or `--repair` rebuilt the
/// store), or the report of what does not load.
pub fn check_command(args: &CheckArgs) -> Result<String, String> {
    let key = args
        .encryption_key_file
        .as_deref()
        .map(EncryptionKey::from_file)
        .transpose()
        .map_err(|e| e.to_string())?;
    let path = args.data_dir.join(DB_FILE);
    if !path.is_file() {
        return Err(format!("no store at {}", path.display()));
    }
    let mut nonce_seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce_seed);
    let options = StoreOptions {
        encryption_key: key,
        nonce_seed,
    };
    let store = Store::open(&args.data_dir, options.clone())
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let report = store
        .check()
        .map_err(|e| format!("checking {}: {e}", path.display()))?;
    let mut text = format!(
        "checked {} document(s) in {}: {} unreadable\n",
        report.checked,
        path.display(),
        report.unreadable.len()
    );
    for (id, why) in &report.unreadable {
        text.push_str(&format!("  unreadable: {id}: {why}\n"));
    }
    if report.unreadable.is_empty() {
        return Ok(text);
    }
    if !args.repair {
        text.push_str(
            "run `verge check --repair` with the node stopped to rebuild the store without them; \
             the node then fetches them from its peers\n",
        );
        return Err(text);
    }
    let skip: std::collections::HashSet<String> =
        report.unreadable.iter().map(|(id, _)| id.clone()).collect();
    let kept = store
        .rebuild_without(&args.data_dir, &skip, options)
        .map_err(|e| format!("{text}rebuilding {}: {e}", path.display()))?;
    text.push_str(&format!(
        "rebuilt {} with {} document(s); the damaged file is kept as {}; start the node: it \
         fetches the {} unreadable document(s) from its peers (a document no peer holds is \
         lost: restore it from a backup)\n",
        path.display(),
        kept.documents,
        kept.damaged.display(),
        report.unreadable.len()
    ));
    Ok(text)
}

/// What [`Store::check`] found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Documents looked at.
    pub checked: usize,
    /// Documents that do not load, with why.
    pub unreadable: Vec<(String, String)>,
}

/// What [`Store::rebuild_without`] did.
#[derive(Debug)]
pub struct Rebuilt {
    /// Documents copied into the new file.
    pub documents: usize,
    /// Where the damaged file was moved.
    pub damaged: PathBuf,
}

/// Flags of `verge rekey`.
#[derive(Debug, Clone, clap::Args)]
pub struct RekeyArgs {
    /// The stopped node's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The store's current key; omit it for a plaintext store (to encrypt it).
    #[arg(long, value_name = "FILE")]
    pub old_key_file: Option<PathBuf>,
    /// The key to encrypt with from now on; omit it to store values in plain form.
    #[arg(long, value_name = "FILE")]
    pub new_key_file: Option<PathBuf>,
}

/// Runs `verge rekey`: the line to print on success.
pub fn rekey_command(args: &RekeyArgs) -> Result<String, String> {
    if args.old_key_file.is_none() && args.new_key_file.is_none() {
        return Err("give --old-key-file, --new-key-file or both".into());
    }
    let read = |path: &Option<PathBuf>| {
        path.as_deref()
            .map(EncryptionKey::from_file)
            .transpose()
            .map_err(|e| e.to_string())
    };
    let old = read(&args.old_key_file)?;
    let new = read(&args.new_key_file)?;
    let mut nonce_seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce_seed);
    let report = Store::rekey(&args.data_dir, old, new, nonce_seed)
        .map_err(|e| format!("re-keying the store in {}: {e}", args.data_dir.display()))?;
    Ok(format!(
        "rewrote {} snapshot(s), {} change row(s), {} retained generation(s), {} metadata \
         record(s) and {} feed record(s) in {}; the store is now {}\n",
        report.snapshots,
        report.changes,
        report.retained,
        report.metas,
        report.feed,
        args.data_dir.join(DB_FILE).display(),
        if args.new_key_file.is_some() {
            "encrypted with the new key"
        } else {
            "in plain form"
        }
    ))
}

fn seal_with<'a>(cipher: Option<&Cipher>, row: Row<'_>, plain: &'a [u8]) -> Cow<'a, [u8]> {
    match cipher {
        Some(c) => Cow::Owned(c.seal(row, plain)),
        None => Cow::Borrowed(plain),
    }
}

fn unseal_with<'a>(
    cipher: Option<&Cipher>,
    row: Row<'_>,
    stored: &'a [u8],
) -> Result<Cow<'a, [u8]>, StoreError> {
    match cipher {
        Some(c) => c
            .open(row, stored)
            .map(Cow::Owned)
            .map_err(|e| StoreError::Corrupt(format!("{row:?}: {e}"))),
        None => Ok(Cow::Borrowed(stored)),
    }
}

/// Checks the key given (or its absence) against the canary of an existing store.
fn check_canary(cipher: Option<&Cipher>, canary: Option<Vec<u8>>) -> Result<(), StoreError> {
    match (cipher, canary) {
        (None, None) => Ok(()),
        (Some(c), Some(sealed)) => match c.open(Row::Node(CANARY_KEY), &sealed) {
            Ok(plain) if plain == CANARY => Ok(()),
            _ => Err(StoreError::Key(KeyMismatch::WrongKey)),
        },
        (None, Some(_)) => Err(StoreError::Key(KeyMismatch::KeyMissing)),
        (Some(_), None) => Err(StoreError::Key(KeyMismatch::NotEncrypted)),
    }
}

/// Re-seals every value of a table keyed by document id, `REKEY_CHUNK` rows per read.
fn rewrite_by_id(
    tx: &WriteTransaction,
    table: TableDefinition<'_, &str, &[u8]>,
    from: Option<&Cipher>,
    to: Option<&Cipher>,
    row: fn(&str) -> Row<'_>,
) -> Result<u64, StoreError> {
    let mut table = tx.open_table(table)?;
    let mut cursor: Option<String> = None;
    let mut rewritten = 0;
    loop {
        let mut chunk: Vec<(String, Vec<u8>)> = Vec::with_capacity(REKEY_CHUNK);
        {
            let start = match &cursor {
                Some(c) => Bound::Excluded(c.as_str()),
                None => Bound::Unbounded,
            };
            for item in table
                .range::<&str>((start, Bound::Unbounded))?
                .take(REKEY_CHUNK)
            {
                let (k, v) = item?;
                chunk.push((k.value().to_owned(), v.value().to_vec()));
            }
        }
        let Some((last, _)) = chunk.last() else {
            return Ok(rewritten);
        };
        cursor = Some(last.clone());
        for (id, value) in &chunk {
            let plain = unseal_with(from, row(id), value)?;
            table.insert(id.as_str(), &*seal_with(to, row(id), &plain))?;
            rewritten += 1;
        }
    }
}

/// Re-seals every row of a table keyed by document id and number (change rows, retained
/// generations), `REKEY_CHUNK` rows per read.
fn rewrite_changes(
    tx: &WriteTransaction,
    table: TableDefinition<'_, (&str, u64), &[u8]>,
    from: Option<&Cipher>,
    to: Option<&Cipher>,
    row: fn(&str, u64) -> Row<'_>,
) -> Result<u64, StoreError> {
    let mut table = tx.open_table(table)?;
    let mut cursor: Option<(String, u64)> = None;
    let mut rewritten = 0;
    loop {
        let mut chunk: Vec<(String, u64, Vec<u8>)> = Vec::with_capacity(REKEY_CHUNK);
        {
            let start = match &cursor {
                Some((id, seq)) => Bound::Excluded((id.as_str(), *seq)),
                None => Bound::Unbounded,
            };
            for item in table
                .range::<(&str, u64)>((start, Bound::Unbounded))?
                .take(REKEY_CHUNK)
            {
                let (k, v) = item?;
                let (id, seq) = k.value();
                chunk.push((id.to_owned(), seq, v.value().to_vec()));
            }
        }
        let Some((last_id, last_seq, _)) = chunk.last() else {
            return Ok(rewritten);
        };
        cursor = Some((last_id.clone(), *last_seq));
        for (id, seq, value) in &chunk {
            let row = row(id, *seq);
            let plain = unseal_with(from, row, value)?;
            table.insert((id.as_str(), *seq), &*seal_with(to, row, &plain))?;
            rewritten += 1;
        }
    }
}

/// fsyncs a directory so that entries created in it survive a power cut.
/// fsyncs a directory, so that entries created or renamed in it survive a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        context: format!("syncing directory {}", dir.display()),
        source,
    };
    fs::File::open(dir).map_err(io)?.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::ChangeHash;

    fn id(s: &str) -> DocId {
        DocId::new(s).expect("valid id")
    }

    fn meta(n: u8) -> DocMeta {
        DocMeta {
            heads: vec![ChangeHash([n; 32])],
            size_bytes: 3,
            next_seq: 1,
            change_rows: 1,
            ..DocMeta::default()
        }
    }

    fn feed_record() -> FeedRecord {
        FeedRecord {
            seq: 0,
            id: "cart/3".into(),
            heads: vec![ChangeHash([1; 32])],
            deleted: false,
            at_ms: 5,
        }
    }

    #[test]
    fn append_compact_purge_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), StoreOptions::plain()).expect("open");
            let append = |first_seq, changes: Vec<&[u8]>, m| Mutation::Append {
                id: id("a/1"),
                first_seq,
                changes: changes.into_iter().map(<[u8]>::to_vec).collect(),
                meta: m,
            };
            store
                .commit(&[&append(0, vec![b"x", b"y"], meta(1))])
                .expect("commit");
            store
                .commit(&[&append(2, vec![b"z"], meta(2))])
                .expect("commit");
            assert_eq!(
                store
                    .load(&id("a/1"))
                    .expect("load")
                    .expect("present")
                    .bytes,
                b"xyz"
            );
            let compact = Mutation::Compact {
                id: id("a/1"),
                snapshot: b"S".to_vec(),
                up_to_seq: 1,
                meta: meta(3),
            };
            store.commit(&[&compact]).expect("commit");
            let loaded = store.load(&id("a/1")).expect("load").expect("present");
            assert_eq!(loaded.bytes, b"Sz");
            assert_eq!(loaded.meta, meta(3));
        }
        let store = Store::open(dir.path(), StoreOptions::plain()).expect("reopen");
        assert_eq!(
            store
                .load(&id("a/1"))
                .expect("load")
                .expect("present")
                .bytes,
            b"Sz"
        );
        store
            .commit(&[&Mutation::Purge { id: id("a/1") }])
            .expect("purge");
        assert!(store.load(&id("a/1")).expect("load").is_none());
        assert_eq!(store.doc_count().expect("count"), 0);
    }

    #[test]
    fn a_replaced_history_keeps_the_last_generations_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreOptions::plain()).expect("open");
        let doc = id("hot/1");
        let replace = |generation: u64, previous: Previous| Mutation::Replace {
            id: doc.clone(),
            snapshot: format!("gen {generation}").into_bytes(),
            meta: meta(1),
            previous,
        };
        let retain = |generation: u64| Previous::Retain {
            generation,
            keep: 4,
            snapshot: format!("left {generation}").into_bytes(),
            at_ms: 1_000 * generation as i64,
        };
        let generations = |store: &Store| -> Vec<u64> {
            store
                .retained(&doc)
                .expect("retained")
                .into_iter()
                .map(|(g, bytes)| {
                    assert_eq!(bytes, format!("left {g}").into_bytes());
                    g
                })
                .collect()
        };
        for g in 0..6 {
            store.commit(&[&replace(g + 1, retain(g))]).expect("commit");
        }
        // The last 4 generations left.
        assert_eq!(generations(&store), vec![2, 3, 4, 5]);
        // Released by age: those left before 4 s.
        assert_eq!(store.release_retained(4_000).expect("release"), 2);
        assert_eq!(generations(&store), vec![4, 5]);
        // Survives a reopen.
        drop(store);
        let store = Store::open(dir.path(), StoreOptions::plain()).expect("reopen");
        assert_eq!(generations(&store), vec![4, 5]);
        // A new incarnation forgets them, and so does a purge.
        store
            .commit(&[&replace(0, Previous::Forget)])
            .expect("commit");
        assert!(generations(&store).is_empty());
        store.commit(&[&replace(1, retain(0))]).expect("commit");
        assert_eq!(generations(&store), vec![0]);
        store
            .commit(&[&Mutation::Purge { id: doc.clone() }])
            .expect("purge");
        assert!(generations(&store).is_empty());
        assert_eq!(store.release_retained(i64::MAX).expect("release"), 0);
    }

    fn keyed(k: u8, seed: u8) -> StoreOptions {
        StoreOptions {
            encryption_key: Some(EncryptionKey::from_bytes([k; 32])),
            nonce_seed: [seed; 32],
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn encrypted_store_hides_values_and_checks_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret: &[u8] = b"plaintext-canary-7d1f";
        let snap: &[u8] = b"snapshot-canary-93ab";
        let retained_snap: &[u8] = b"retained-canary-51c0";
        {
            let store = Store::open(dir.path(), keyed(1, 1)).expect("create encrypted");
            assert!(store.encrypted());
            store
                .commit(&[&Mutation::Append {
                    id: id("cart/1"),
                    first_seq: 0,
                    changes: vec![secret.to_vec(), b"-more".to_vec()],
                    meta: meta(1),
                }])
                .expect("commit");
            store
                .commit(&[&Mutation::Compact {
                    id: id("cart/2"),
                    snapshot: snap.to_vec(),
                    up_to_seq: 0,
                    meta: meta(2),
                }])
                .expect("compact");
            let mut record = feed_record();
            store
                .commit_with_feed(
                    &[&Mutation::Replace {
                        id: id("cart/3"),
                        snapshot: b"next".to_vec(),
                        meta: meta(3),
                        previous: Previous::Retain {
                            generation: 0,
                            keep: 4,
                            snapshot: retained_snap.to_vec(),
                            at_ms: 5,
                        },
                    }],
                    &mut [&mut record],
                    &[],
                    10,
                )
                .expect("replace");
            assert_eq!(record.seq, 1);
            let loaded = store.load(&id("cart/1")).expect("load").expect("present");
            assert_eq!(loaded.bytes, [secret, b"-more"].concat());
            assert_eq!(loaded.meta, meta(1));
            let mut seen = 0;
            store
                .scan_meta("cart/", None, |_, m| {
                    assert!(m == meta(1) || m == meta(2) || m == meta(3));
                    seen += 1;
                    true
                })
                .expect("scan");
            assert_eq!(seen, 3);
        }
        let file = fs::read(dir.path().join(DB_FILE)).expect("read file");
        assert!(!contains(&file, secret) && !contains(&file, snap));
        assert!(!contains(&file, retained_snap));
        assert!(!contains(&file, &[1u8; 32]), "heads are sealed too");

        let refused = |options| match Store::open(dir.path(), options) {
            Err(StoreError::Key(kind)) => kind,
            other => panic!("expected a key error, got {other:?}"),
        };
        assert_eq!(refused(keyed(2, 2)), KeyMismatch::WrongKey);
        assert_eq!(refused(StoreOptions::plain()), KeyMismatch::KeyMissing);
        // The right key, a fresh seed: everything reads back.
        let store = Store::open(dir.path(), keyed(1, 3)).expect("reopen");
        let loaded = store.load(&id("cart/2")).expect("load").expect("present");
        assert_eq!(loaded.bytes, snap);
        drop(store);

        // Rotate to key 2, then back to plain form; each step keeps every value.
        let key = |k| Some(EncryptionKey::from_bytes([k; 32]));
        let report = Store::rekey(dir.path(), key(1), key(2), [4; 32]).expect("rekey");
        assert_eq!(
            report,
            RekeyReport {
                snapshots: 2,
                changes: 2,
                retained: 1,
                metas: 3,
                feed: 1,
                idempotency: 0,
            }
        );
        assert_eq!(refused(keyed(1, 5)), KeyMismatch::WrongKey);
        assert!(matches!(
            Store::rekey(dir.path(), key(1), key(3), [6; 32]),
            Err(StoreError::Key(_))
        ));
        let store = Store::open(dir.path(), keyed(2, 7)).expect("new key opens");
        let loaded = store.load(&id("cart/1")).expect("load").expect("present");
        assert_eq!(loaded.bytes, [secret, b"-more"].concat());
        assert_eq!(
            store.retained(&id("cart/3")).expect("retained"),
            vec![(0, retained_snap.to_vec())]
        );
        assert_eq!(
            store.feed_after(0, 10).expect("feed"),
            vec![FeedRecord {
                seq: 1,
                ..feed_record()
            }]
        );
        drop(store);
        Store::rekey(dir.path(), key(2), None, [8; 32]).expect("decrypt");
        assert_eq!(refused(keyed(2, 9)), KeyMismatch::NotEncrypted);
        let store = Store::open(dir.path(), StoreOptions::plain()).expect("plain opens");
        assert_eq!(
            store
                .load(&id("cart/2"))
                .expect("load")
                .expect("present")
                .bytes,
            snap
        );
        drop(store);
        // And a plaintext store can be encrypted in place.
        Store::rekey(dir.path(), None, key(3), [10; 32]).expect("encrypt");
        let store = Store::open(dir.path(), keyed(3, 11)).expect("encrypted again");
        assert_eq!(
            store
                .load(&id("cart/1"))
                .expect("load")
                .expect("present")
                .bytes,
            [secret, b"-more"].concat()
        );
    }

    #[test]
    fn swapped_encrypted_rows_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), keyed(1, 1)).expect("create");
        store
            .commit(&[&Mutation::Append {
                id: id("a"),
                first_seq: 0,
                changes: vec![b"first".to_vec(), b"second".to_vec()],
                meta: meta(1),
            }])
            .expect("commit");
        // Swap the two change rows behind the store's back.
        let tx = store.db.begin_write().expect("tx");
        {
            let mut changes = tx.open_table(CHANGES).expect("table");
            let a = changes
                .get(("a", 0))
                .expect("get")
                .expect("row")
                .value()
                .to_vec();
            let b = changes
                .get(("a", 1))
                .expect("get")
                .expect("row")
                .value()
                .to_vec();
            changes.insert(("a", 0), b.as_slice()).expect("insert");
            changes.insert(("a", 1), a.as_slice()).expect("insert");
        }
        tx.commit().expect("commit");
        assert!(matches!(store.load(&id("a")), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn scan_respects_prefix_and_cursor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreOptions::plain()).expect("open");
        let names = ["a", "b/1", "b/2", "b/3", "c"];
        let batch: Vec<Mutation> = names
            .iter()
            .map(|n| Mutation::Append {
                id: id(n),
                first_seq: 0,
                changes: vec![],
                meta: meta(1),
            })
            .collect();
        store
            .commit(&batch.iter().collect::<Vec<_>>())
            .expect("commit");
        let scan = |prefix: &str, after: Option<&str>| {
            let mut seen = Vec::new();
            store
                .scan_meta(prefix, after, |k, _| {
                    seen.push(k.to_owned());
                    true
                })
                .expect("scan");
            seen
        };
        assert_eq!(scan("b/", None), ["b/1", "b/2", "b/3"]);
        assert_eq!(scan("b/", Some("b/1")), ["b/2", "b/3"]);
        assert_eq!(scan("", Some("b/3")), ["c"]);
        assert_eq!(scan("b/", Some("a")), ["b/1", "b/2", "b/3"]);
        assert!(scan("z", None).is_empty());
    }
}
