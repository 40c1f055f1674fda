//! The store's side of backups: reading a consistent view of its rows as stored, and writing
//! such rows into a new store.
//!
//! Rows travel as the store holds them: sealed under the store's key when it is encrypted, so a
//! backup never holds plaintext of an encrypted store, and a restored store opens with the
//! same key (a sealed value's associated data names its table and key, which are kept).

use std::collections::BTreeSet;
use std::ops::Bound;

use redb::{
    Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};

use super::crypt::Row as SealRow;
use super::feed::{FEED, FEED_STATE, FeedRecord};
use super::{CHANGES, META, RETAINED, RETAINED_AT, SNAPSHOTS, Store, StoreError, unseal_with};

/// One stored row of a document, as a backup carries it. `id` is the document; `value` the
/// stored bytes (sealed when the store is encrypted).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum BackupRow {
    /// The document's snapshot.
    Snapshot { id: String, value: Vec<u8> },
    /// One incremental change row, by its sequence number.
    Change {
        id: String,
        seq: u64,
        value: Vec<u8>,
    },
    /// The metadata record.
    Meta { id: String, value: Vec<u8> },
    /// A retained generation's snapshot.
    Retained {
        id: String,
        generation: u64,
        value: Vec<u8>,
    },
    /// When a retained generation was left, Unix milliseconds.
    RetainedAt {
        id: String,
        generation: u64,
        at_ms: i64,
    },
}

/// What changed after a feed position, read in the same transaction as the rows.
#[derive(Debug, Default)]
pub struct Changed {
    /// The documents named by the records read.
    pub ids: BTreeSet<String>,
    /// The last record read.
    pub to: u64,
    /// Records after `to` were left for later (the bound was reached): documents changed only
    /// by them are not among `ids`.
    pub capped: bool,
}

/// Why rows after a feed position cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ChangedError {
    /// The feed no longer holds the records just after the position: they were trimmed.
    #[error("the change feed no longer holds records after {after} (its oldest is {first})")]
    Trimmed {
        /// The position asked for.
        after: u64,
        /// The oldest record kept.
        first: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A read transaction over the whole store: every row it yields is from one committed state.
/// Writers go on meanwhile (redb keeps the pages this view reads until it ends).
pub struct BackupView<'s> {
    store: &'s Store,
    tx: ReadTransaction,
}

impl std::fmt::Debug for BackupView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupView").finish_non_exhaustive()
    }
}

impl Store {
    /// Begins a consistent view for a backup.
    pub fn backup_view(&self) -> Result<BackupView<'_>, StoreError> {
        Ok(BackupView {
            store: self,
            tx: self.db.begin_read()?,
        })
    }
}

impl BackupView<'_> {
    /// The last feed number given as of this view: the position a snapshot of it stands at.
    pub fn feed_last(&self) -> Result<u64, StoreError> {
        let state = self.tx.open_table(FEED_STATE)?;
        Ok(state.get("last")?.map_or(0, |v| v.value()))
    }

    /// The documents changed by the records after `after`, at most `records_max` records.
    pub fn changed_after(&self, after: u64, records_max: usize) -> Result<Changed, ChangedError> {
        let last = self.feed_last()?;
        let mut changed = Changed {
            to: after,
            ..Changed::default()
        };
        if last <= after {
            return Ok(changed);
        }
        let feed = self.tx.open_table(FEED).map_err(StoreError::from)?;
        let first = feed
            .first()
            .map_err(StoreError::from)?
            .map_or(last + 1, |(k, _)| k.value());
        if first > after + 1 {
            return Err(ChangedError::Trimmed { after, first });
        }
        let cipher = self.store.cipher.as_ref();
        for item in feed
            .range::<u64>((Bound::Excluded(after), Bound::Unbounded))
            .map_err(StoreError::from)?
            .take(records_max)
        {
            let (k, v) = item.map_err(StoreError::from)?;
            let seq = k.value();
            let plain = unseal_with(cipher, SealRow::Feed(seq), v.value())?;
            let record = FeedRecord::decode(seq, &plain)?;
            changed.ids.insert(record.id);
            changed.to = seq;
        }
        changed.capped = changed.to < last;
        Ok(changed)
    }

    /// Every row of document `id`, in table order.
    pub fn doc_rows(
        &self,
        id: &str,
        emit: impl FnMut(BackupRow) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.rows(Some(id), emit)
    }

    /// Every document row of the store, table by table.
    pub fn all_rows(
        &self,
        emit: impl FnMut(BackupRow) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.rows(None, emit)
    }

    /// The rows of document `only`, or of every document, table by table.
    fn rows(
        &self,
        only: Option<&str>,
        mut emit: impl FnMut(BackupRow) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let snapshots = self.tx.open_table(SNAPSHOTS)?;
        let metas = self.tx.open_table(META)?;
        let changes = self.tx.open_table(CHANGES)?;
        let retained = self.tx.open_table(RETAINED)?;
        let retained_at = self.tx.open_table(RETAINED_AT)?;
        let (by_id, by_seq) = match only {
            Some(id) => (
                (Bound::Included(id), Bound::Included(id)),
                (Bound::Included((id, 0)), Bound::Included((id, u64::MAX))),
            ),
            None => (
                (Bound::Unbounded, Bound::Unbounded),
                (Bound::Unbounded, Bound::Unbounded),
            ),
        };
        for item in snapshots.range::<&str>(by_id)? {
            let (k, v) = item?;
            emit(BackupRow::Snapshot {
                id: k.value().to_owned(),
                value: v.value().to_vec(),
            })?;
        }
        for item in changes.range::<(&str, u64)>(by_seq)? {
            let (k, v) = item?;
            let (id, seq) = k.value();
            emit(BackupRow::Change {
                id: id.to_owned(),
                seq,
                value: v.value().to_vec(),
            })?;
        }
        for item in metas.range::<&str>(by_id)? {
            let (k, v) = item?;
            emit(BackupRow::Meta {
                id: k.value().to_owned(),
                value: v.value().to_vec(),
            })?;
        }
        for item in retained.range::<(&str, u64)>(by_seq)? {
            let (k, v) = item?;
            let (id, generation) = k.value();
            emit(BackupRow::Retained {
                id: id.to_owned(),
                generation,
                value: v.value().to_vec(),
            })?;
        }
        for item in retained_at.range::<(&str, u64)>(by_seq)? {
            let (k, v) = item?;
            let (id, generation) = k.value();
            emit(BackupRow::RetainedAt {
                id: id.to_owned(),
                generation,
                at_ms: v.value(),
            })?;
        }
        Ok(())
    }

    /// How many documents the view holds (for progress messages).
    pub fn doc_count(&self) -> Result<u64, StoreError> {
        Ok(self.tx.open_table(META)?.len()?)
    }
}

/// Writes backed-up rows into a store, many per transaction; nothing is durable before
/// [`RestoreWriter::finish`], and a writer dropped unfinished leaves what it wrote undurable
/// (the caller discards the whole directory).
pub struct RestoreWriter<'s> {
    store: &'s Store,
    tx: Option<WriteTransaction>,
    rows_in_tx: usize,
    bytes_in_tx: usize,
}

impl std::fmt::Debug for RestoreWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreWriter")
            .field("rows_in_tx", &self.rows_in_tx)
            .finish_non_exhaustive()
    }
}

/// Rows written per transaction while restoring.
const RESTORE_ROWS_PER_TX: usize = 20_000;
/// Bytes written per transaction while restoring.
const RESTORE_BYTES_PER_TX: usize = 64 * 1024 * 1024;

impl Store {
    /// A writer of restored rows into this (new) store.
    pub fn restore_writer(&self) -> RestoreWriter<'_> {
        RestoreWriter {
            store: self,
            tx: None,
            rows_in_tx: 0,
            bytes_in_tx: 0,
        }
    }
}

impl RestoreWriter<'_> {
    fn tx(&mut self) -> Result<&WriteTransaction, StoreError> {
        if self.tx.is_none() {
            let mut tx = self.store.db.begin_write()?;
            tx.set_durability(Durability::None)?;
            self.tx = Some(tx);
        }
        Ok(self.tx.as_ref().expect("just set"))
    }

    fn counted(&mut self, bytes: usize) -> Result<(), StoreError> {
        self.rows_in_tx += 1;
        self.bytes_in_tx += bytes;
        if self.rows_in_tx >= RESTORE_ROWS_PER_TX || self.bytes_in_tx >= RESTORE_BYTES_PER_TX {
            if let Some(tx) = self.tx.take() {
                tx.commit()?;
            }
            self.rows_in_tx = 0;
            self.bytes_in_tx = 0;
        }
        Ok(())
    }

    /// Removes every row of document `id` (a later state of it follows).
    pub fn clear(&mut self, id: &str) -> Result<(), StoreError> {
        let tx = self.tx()?;
        tx.open_table(SNAPSHOTS)?.remove(id)?;
        tx.open_table(META)?.remove(id)?;
        clear_range(tx, CHANGES, id)?;
        clear_range(tx, RETAINED, id)?;
        tx.open_table(RETAINED_AT)?
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        self.counted(0)
    }

    /// Writes one row.
    pub fn put(&mut self, row: &BackupRow) -> Result<(), StoreError> {
        let tx = self.tx()?;
        let bytes = match row {
            BackupRow::Snapshot { id, value } => {
                tx.open_table(SNAPSHOTS)?
                    .insert(id.as_str(), value.as_slice())?;
                value.len()
            }
            BackupRow::Change { id, seq, value } => {
                tx.open_table(CHANGES)?
                    .insert((id.as_str(), *seq), value.as_slice())?;
                value.len()
            }
            BackupRow::Meta { id, value } => {
                tx.open_table(META)?.insert(id.as_str(), value.as_slice())?;
                value.len()
            }
            BackupRow::Retained {
                id,
                generation,
                value,
            } => {
                tx.open_table(RETAINED)?
                    .insert((id.as_str(), *generation), value.as_slice())?;
                value.len()
            }
            BackupRow::RetainedAt {
                id,
                generation,
                at_ms,
            } => {
                tx.open_table(RETAINED_AT)?
                    .insert((id.as_str(), *generation), *at_ms)?;
                8
            }
        };
        self.counted(bytes)
    }

    /// Makes everything written durable.
    pub fn finish(mut self) -> Result<(), StoreError> {
        if let Some(tx) = self.tx.take() {
            tx.commit()?;
        }
        // One durable commit makes every earlier non-durable one durable too.
        let mut tx = self.store.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.commit()?;
        Ok(())
    }

    /// Checks that every meta record opens and decodes (the index a node builds at start reads
    /// them all), and returns the document count. Documents themselves load when first read;
    /// `verge check` loads every one.
    pub fn verify(store: &Store) -> Result<u64, StoreError> {
        let tx = store.db.begin_read()?;
        let metas = tx.open_table(META)?;
        let mut count = 0;
        for item in metas.iter()? {
            let (k, v) = item?;
            let id = k.value();
            let plain = unseal_with(store.cipher.as_ref(), SealRow::Meta(id), v.value())?;
            super::DocMeta::decode(&plain)?;
            count += 1;
        }
        Ok(count)
    }
}

fn clear_range(
    tx: &WriteTransaction,
    table: TableDefinition<'_, (&str, u64), &[u8]>,
    id: &str,
) -> Result<(), StoreError> {
    tx.open_table(table)?
        .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
    Ok(())
}
