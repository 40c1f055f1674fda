//! Idempotency keys: what a write made with `Idempotency-Key` answered, kept so that a retry
//! with the same key answers the same and writes nothing.
//!
//! The record is written in the same transaction as the write itself: a write is durable with
//! its key or not at all, so a retry after a crash finds either both or neither.

use automerge::ChangeHash;
use redb::{
    ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};

use super::crypt::Row;
use super::{Store, StoreError, seal_with, unseal_with};

/// Records by key hash (hex, the associated data of its sealed value).
pub(super) const KEYS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("idempotency");
/// Key hashes by the time they were written, for trimming the oldest.
pub(super) const KEYS_AT: TableDefinition<'_, (i64, &str), ()> =
    TableDefinition::new("idempotency_at");
/// Most heads kept with a record (a write's heads are bounded by `META_HEADS_MAX` already).
const HEADS_MAX: usize = super::META_HEADS_MAX;

/// What a write made with an idempotency key answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    /// SHA-256 of the key and of who sent it, hex: the record's name.
    pub key: String,
    /// SHA-256 of the request (method, document, query, preconditions, body): a retry must
    /// be the same request.
    pub fingerprint: [u8; 32],
    /// When the write was made, in Unix milliseconds.
    pub at_ms: i64,
    /// The document's heads the write answered.
    pub heads: Vec<ChangeHash>,
}

impl Remembered {
    fn encode(&self) -> Vec<u8> {
        let heads = &self.heads[..self.heads.len().min(HEADS_MAX)];
        let mut out = Vec::with_capacity(40 + heads.len() * 32);
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        for h in heads {
            out.extend_from_slice(&h.0);
        }
        out
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() < 40
            || !(bytes.len() - 40).is_multiple_of(32)
            || (bytes.len() - 40) / 32 > HEADS_MAX
        {
            return Err(StoreError::Corrupt(format!(
                "idempotency record {key}: {} bytes",
                bytes.len()
            )));
        }
        Ok(Self {
            key: key.to_owned(),
            fingerprint: bytes[..32].try_into().expect("32 bytes"),
            at_ms: i64::from_be_bytes(bytes[32..40].try_into().expect("8 bytes")),
            heads: bytes[40..]
                .chunks_exact(32)
                .map(|h| ChangeHash(h.try_into().expect("32 bytes")))
                .collect(),
        })
    }
}

impl Store {
    /// Writes `records` in `tx`.
    pub(super) fn remember(
        &self,
        tx: &WriteTransaction,
        records: &[&Remembered],
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut keys = tx.open_table(KEYS)?;
        let mut keys_at = tx.open_table(KEYS_AT)?;
        for r in records {
            let value =
                seal_with(self.cipher.as_ref(), Row::Idempotency(&r.key), &r.encode()).into_owned();
            if let Some(old) = keys.insert(r.key.as_str(), value.as_slice())? {
                // The same key again (only after its record was trimmed and the key reused):
                // its old time goes with it.
                let old = unseal_with(self.cipher.as_ref(), Row::Idempotency(&r.key), old.value())
                    .and_then(|plain| Remembered::decode(&r.key, &plain));
                if let Ok(old) = old {
                    keys_at.remove((old.at_ms, r.key.as_str()))?;
                }
            }
            keys_at.insert((r.at_ms, r.key.as_str()), ())?;
        }
        Ok(())
    }

    /// The record of `key`, if kept.
    pub fn remembered(&self, key: &str) -> Result<Option<Remembered>, StoreError> {
        let tx = self.db.begin_read()?;
        let keys = match tx.open_table(KEYS) {
            Ok(keys) => keys,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(value) = keys.get(key)? else {
            return Ok(None);
        };
        let plain = unseal_with(self.cipher.as_ref(), Row::Idempotency(key), value.value())?;
        Remembered::decode(key, &plain).map(Some)
    }

    /// Drops the records written before `before_ms`, then the oldest beyond `keep_max`, at
    /// most `limit` in one transaction. Returns how many were dropped.
    pub fn trim_remembered(
        &self,
        before_ms: i64,
        keep_max: u64,
        limit: u64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(redb::Durability::Immediate)?;
        let mut dropped = 0;
        {
            let mut keys = tx.open_table(KEYS)?;
            let mut keys_at = tx.open_table(KEYS_AT)?;
            let excess = keys.len()?.saturating_sub(keep_max);
            let mut gone: Vec<(i64, String)> = Vec::new();
            for item in keys_at.iter()? {
                let (k, _) = item?;
                let (at_ms, key) = k.value();
                if (at_ms >= before_ms && gone.len() as u64 >= excess) || gone.len() as u64 >= limit
                {
                    break;
                }
                gone.push((at_ms, key.to_owned()));
            }
            for (at_ms, key) in &gone {
                keys_at.remove((*at_ms, key.as_str()))?;
                keys.remove(key.as_str())?;
                dropped += 1;
            }
        }
        tx.commit()?;
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    fn record(key: &str, at_ms: i64) -> Remembered {
        Remembered {
            key: key.into(),
            fingerprint: [7; 32],
            at_ms,
            heads: vec![ChangeHash([1; 32]), ChangeHash([2; 32])],
        }
    }

    fn write(store: &Store, records: &[Remembered]) {
        let mut tx = store.db.begin_write().expect("tx");
        tx.set_durability(redb::Durability::Immediate)
            .expect("durability");
        let refs: Vec<&Remembered> = records.iter().collect();
        store.remember(&tx, &refs).expect("remember");
        tx.commit().expect("commit");
    }

    #[test]
    fn records_survive_reopening_and_are_trimmed_by_age_then_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), StoreOptions::plain()).expect("open");
            write(&store, &[record("a", 10), record("b", 20), record("c", 30)]);
        }
        let store = Store::open(dir.path(), StoreOptions::plain()).expect("reopen");
        assert_eq!(store.remembered("b").expect("read"), Some(record("b", 20)));
        assert_eq!(store.remembered("z").expect("read"), None);
        assert_eq!(
            store.trim_remembered(15, 100, 10).expect("trim"),
            1,
            "a by age"
        );
        assert_eq!(store.remembered("a").expect("read"), None);
        write(&store, &[record("d", 40)]);
        assert_eq!(
            store.trim_remembered(0, 2, 10).expect("trim"),
            1,
            "b by count"
        );
        assert_eq!(store.remembered("b").expect("read"), None);
        assert!(store.remembered("c").expect("read").is_some());
        assert!(store.remembered("d").expect("read").is_some());
    }

    #[test]
    fn damaged_records_are_corrupt_not_a_panic() {
        let bytes = record("k", 1).encode();
        assert_eq!(
            Remembered::decode("k", &bytes).expect("decodes"),
            record("k", 1)
        );
        for cut in [0, 39, 41, 71] {
            assert!(Remembered::decode("k", &bytes[..cut]).is_err(), "{cut}");
        }
    }
}
