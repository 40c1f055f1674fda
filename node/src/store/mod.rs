//! Durable storage of documents in one redb file.
//!
//! Three tables hold a document: its latest snapshot, the incremental changes written since,
//! and a small [`DocMeta`] record. A write appends one change row and rewrites the meta record;
//! compaction replaces the snapshot and drops the rows it folded in. All writes go through
//! [`Store::commit`], called by the single writer task, one durable transaction per batch.

mod meta;
pub mod writer;

use std::fs;
use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use verge_core::DocId;

pub use meta::{DocMeta, META_HEADS_MAX, MetaDecodeError};

const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
const CHANGES: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("changes");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const NODE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("node");

/// The database file inside the data directory.
pub const DB_FILE: &str = "verge.redb";
/// Layout of the tables; a node refuses a file with another layout instead of misreading it.
const STORAGE_FORMAT: &[u8] = b"verge-store-1";

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
}

/// The redb database of one node.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens the database in `data_dir`, creating the directory and the file when missing.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
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
        let store = Self { db, path };
        store.check_format()?;
        Ok(store)
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
            match found {
                None => {
                    node.insert("format", STORAGE_FORMAT)?;
                }
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
    pub fn load(&self, id: &DocId) -> Result<Option<StoredDoc>, StoreError> {
        let tx = self.db.begin_read()?;
        let meta_table = tx.open_table(META)?;
        let Some(meta) = meta_table.get(id.as_str())? else {
            return Ok(None);
        };
        let meta = DocMeta::decode(meta.value())?;
        let mut bytes = Vec::with_capacity(usize::try_from(meta.size_bytes).unwrap_or(0));
        if let Some(snapshot) = tx.open_table(SNAPSHOTS)?.get(id.as_str())? {
            bytes.extend_from_slice(snapshot.value());
        }
        let changes = tx.open_table(CHANGES)?;
        for row in changes.range((id.as_str(), 0)..=(id.as_str(), u64::MAX))? {
            let (_, change) = row?;
            bytes.extend_from_slice(change.value());
        }
        Ok(Some(StoredDoc { meta, bytes }))
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
            if !visit(key, DocMeta::decode(value.value())?) {
                break;
            }
        }
        Ok(())
    }

    /// Number of documents stored, tombstones included.
    pub fn doc_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(META)?.len()?)
    }

    /// Applies a batch of mutations in one durable transaction. Either all of them are on disk
    /// when this returns `Ok`, or none is.
    pub fn commit(&self, batch: &[&Mutation]) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut snapshots = tx.open_table(SNAPSHOTS)?;
            let mut changes = tx.open_table(CHANGES)?;
            let mut metas = tx.open_table(META)?;
            for m in batch {
                match m {
                    Mutation::Append {
                        id,
                        first_seq,
                        changes: rows,
                        meta,
                    } => {
                        for (i, change) in rows.iter().enumerate() {
                            changes
                                .insert((id.as_str(), first_seq + i as u64), change.as_slice())?;
                        }
                        metas.insert(id.as_str(), meta.encode().as_slice())?;
                    }
                    Mutation::Compact {
                        id,
                        snapshot,
                        up_to_seq,
                        meta,
                    } => {
                        snapshots.insert(id.as_str(), snapshot.as_slice())?;
                        changes
                            .retain_in((id.as_str(), 0)..=(id.as_str(), *up_to_seq), |_, _| {
                                false
                            })?;
                        metas.insert(id.as_str(), meta.encode().as_slice())?;
                    }
                    Mutation::Purge { id } => {
                        snapshots.remove(id.as_str())?;
                        changes
                            .retain_in((id.as_str(), 0)..=(id.as_str(), u64::MAX), |_, _| false)?;
                        metas.remove(id.as_str())?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// fsyncs a directory so that entries created in it survive a power cut.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
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

    #[test]
    fn append_compact_purge_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
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
        let store = Store::open(dir.path()).expect("reopen");
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
    fn scan_respects_prefix_and_cursor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
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
