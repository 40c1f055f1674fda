//! The change feed: every commit that changes a document, numbered in commit order.
//!
//! A watcher (or a webhook subscription) that was away resumes after the last number it saw and
//! gets exactly what it missed, in order, also after the node restarted: the record of a change
//! is written in the same transaction as the change itself, under the next number. The
//! numbers are this node's own (another node numbers its commits differently) and never reused:
//! the last one given is kept beside the records, so that a feed trimmed to nothing goes on
//! from where it was.

use std::ops::Bound;
use std::sync::OnceLock;

use automerge::ChangeHash;
use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::crypt::{Cipher, Row};
use super::{Store, StoreError, seal_with, unseal_with};

/// Records by sequence number.
pub(super) const FEED: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("feed");
/// `last`: the last sequence number given (the feed's records may have been trimmed past it).
pub(super) const FEED_STATE: TableDefinition<'_, &str, u64> = TableDefinition::new("feed_state");
const LAST: &str = "last";

/// Most heads a record keeps (a document's heads are bounded by `META_HEADS_MAX` already).
const RECORD_HEADS_MAX: usize = super::META_HEADS_MAX;
/// Version byte of the record encoding.
const RECORD_VERSION: u8 = 1;

/// One committed change to a document, as the feed keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRecord {
    /// Its number; 0 until the writer commits it.
    pub seq: u64,
    /// The document.
    pub id: String,
    /// The document's heads after the change.
    pub heads: Vec<ChangeHash>,
    /// Whether the change deleted the document.
    pub deleted: bool,
    /// When it was committed, in Unix milliseconds (for retention by age).
    pub at_ms: i64,
}

impl FeedRecord {
    fn encode(&self) -> Vec<u8> {
        let heads = &self.heads[..self.heads.len().min(RECORD_HEADS_MAX)];
        let mut out = Vec::with_capacity(12 + heads.len() * 32 + self.id.len());
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out.push(u8::from(self.deleted));
        out.extend_from_slice(&(heads.len() as u16).to_be_bytes());
        for h in heads {
            out.extend_from_slice(&h.0);
        }
        out.extend_from_slice(self.id.as_bytes());
        out
    }

    pub(super) fn decode(seq: u64, bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("feed record {seq}: {what}"));
        let (&version, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
        if version != RECORD_VERSION {
            return Err(corrupt(&format!("version {version}")));
        }
        if rest.len() < 11 {
            return Err(corrupt("truncated"));
        }
        let at_ms = i64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
        let deleted = match rest[8] {
            0 => false,
            1 => true,
            b => return Err(corrupt(&format!("deleted flag {b}"))),
        };
        let count = usize::from(u16::from_be_bytes([rest[9], rest[10]]));
        if count > RECORD_HEADS_MAX {
            return Err(corrupt("too many heads"));
        }
        let rest = &rest[11..];
        let heads_len = count * 32;
        if rest.len() < heads_len {
            return Err(corrupt("truncated heads"));
        }
        let heads = rest[..heads_len]
            .chunks_exact(32)
            .map(|h| ChangeHash(h.try_into().expect("32 bytes")))
            .collect();
        let id = std::str::from_utf8(&rest[heads_len..])
            .map_err(|_| corrupt("id is not UTF-8"))?
            .to_owned();
        Ok(Self {
            seq,
            id,
            heads,
            deleted,
            at_ms,
        })
    }
}

/// A committed record as published to live followers, with its JSON rendered once for all of
/// them (a hundred watchers of a busy node would otherwise each render every record).
#[derive(Debug)]
pub struct FeedEvent {
    /// The record.
    pub record: FeedRecord,
    json: OnceLock<Bytes>,
}

impl FeedEvent {
    /// An event of `record`.
    pub fn new(record: FeedRecord) -> Self {
        Self {
            record,
            json: OnceLock::new(),
        }
    }

    /// `{"seq":…,"id":…,"heads":[…],"deleted":…}`, rendered on first use.
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| {
            let r = &self.record;
            Bytes::from(
                serde_json::json!({
                    "seq": r.seq,
                    "id": r.id,
                    "heads": verge_core::heads_to_hex(&r.heads),
                    "deleted": r.deleted,
                })
                .to_string(),
            )
        })
    }
}

/// What the feed holds: records `first..=last`, or none when `first` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeedBounds {
    /// The oldest record kept.
    pub first: Option<u64>,
    /// The last number given (0 before the first commit).
    pub last: u64,
}

impl Store {
    /// Numbers `records` in order after the last number given, and writes them in `tx`, then
    /// drops the oldest records beyond `retain_events`.
    pub(super) fn append_feed(
        &self,
        tx: &WriteTransaction,
        records: &mut [&mut FeedRecord],
        retain_events: u64,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut state = tx.open_table(FEED_STATE)?;
        let mut feed = tx.open_table(FEED)?;
        let mut last = state.get(LAST)?.map_or(0, |v| v.value());
        for record in records.iter_mut() {
            last += 1;
            record.seq = last;
            let value =
                seal_with(self.cipher.as_ref(), Row::Feed(last), &record.encode()).into_owned();
            feed.insert(last, value.as_slice())?;
        }
        state.insert(LAST, last)?;
        let keep_from = last.saturating_sub(retain_events.max(1)) + 1;
        if keep_from > 1 {
            feed.retain_in(..keep_from, |_, _| false)?;
        }
        Ok(())
    }

    /// The numbers the feed holds.
    pub fn feed_bounds(&self) -> Result<FeedBounds, StoreError> {
        let tx = self.db.begin_read()?;
        let last = match tx.open_table(FEED_STATE) {
            Ok(state) => state.get(LAST)?.map_or(0, |v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(FeedBounds::default()),
            Err(e) => return Err(e.into()),
        };
        let feed = tx.open_table(FEED)?;
        let first = feed.first()?.map(|(k, _)| k.value());
        Ok(FeedBounds { first, last })
    }

    /// Up to `limit` records after `after`, in order.
    pub fn feed_after(&self, after: u64, limit: usize) -> Result<Vec<FeedRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let feed = match tx.open_table(FEED) {
            Ok(feed) => feed,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for item in feed
            .range::<u64>((Bound::Excluded(after), Bound::Unbounded))?
            .take(limit)
        {
            let (k, v) = item?;
            let seq = k.value();
            let plain = unseal_with(self.cipher.as_ref(), Row::Feed(seq), v.value())?;
            out.push(FeedRecord::decode(seq, &plain)?);
        }
        Ok(out)
    }

    /// Drops the records committed before `before_ms`, at most `limit` of them in one
    /// transaction (the last number given is kept apart). Returns how many were dropped.
    pub fn trim_feed_before(&self, before_ms: i64, limit: u64) -> Result<u64, StoreError> {
        let mut cut: Option<u64> = None;
        {
            let tx = self.db.begin_read()?;
            let feed = match tx.open_table(FEED) {
                Ok(feed) => feed,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
                Err(e) => return Err(e.into()),
            };
            for item in feed
                .iter()?
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
            {
                let (k, v) = item?;
                let seq = k.value();
                let plain = unseal_with(self.cipher.as_ref(), Row::Feed(seq), v.value())?;
                if FeedRecord::decode(seq, &plain)?.at_ms >= before_ms {
                    break;
                }
                cut = Some(seq);
            }
        }
        let Some(cut) = cut else { return Ok(0) };
        let mut tx = self.db.begin_write()?;
        tx.set_durability(redb::Durability::Immediate)?;
        let mut dropped = 0;
        {
            let mut feed = tx.open_table(FEED)?;
            feed.retain_in(..=cut, |_, _| {
                dropped += 1;
                false
            })?;
        }
        tx.commit()?;
        Ok(dropped)
    }
}

/// Re-seals every feed record (re-keying a store).
pub(super) fn rewrite_feed(
    tx: &WriteTransaction,
    from: Option<&Cipher>,
    to: Option<&Cipher>,
) -> Result<u64, StoreError> {
    let mut feed = tx.open_table(FEED)?;
    let mut after = 0u64;
    let mut rewritten = 0;
    loop {
        let mut chunk: Vec<(u64, Vec<u8>)> = Vec::with_capacity(super::REKEY_CHUNK);
        for item in feed
            .range::<u64>((Bound::Excluded(after), Bound::Unbounded))?
            .take(super::REKEY_CHUNK)
        {
            let (k, v) = item?;
            chunk.push((k.value(), v.value().to_vec()));
        }
        let Some(&(last, _)) = chunk.last() else {
            return Ok(rewritten);
        };
        after = last;
        for (seq, value) in &chunk {
            let plain = unseal_with(from, Row::Feed(*seq), value)?;
            feed.insert(*seq, &*seal_with(to, Row::Feed(*seq), &plain))?;
            rewritten += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    fn record(id: &str, at_ms: i64) -> FeedRecord {
        FeedRecord {
            seq: 0,
            id: id.into(),
            heads: vec![ChangeHash([3; 32]), ChangeHash([4; 32])],
            deleted: id.ends_with('d'),
            at_ms,
        }
    }

    fn append(store: &Store, ids: &[&str], at_ms: i64, retain: u64) -> Vec<u64> {
        let mut records: Vec<FeedRecord> = ids.iter().map(|id| record(id, at_ms)).collect();
        let mut tx = store.db.begin_write().expect("tx");
        tx.set_durability(redb::Durability::Immediate)
            .expect("durability");
        let mut refs: Vec<&mut FeedRecord> = records.iter_mut().collect();
        store.append_feed(&tx, &mut refs, retain).expect("append");
        tx.commit().expect("commit");
        records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn records_round_trip_and_bad_bytes_are_corrupt_not_a_panic() {
        let r = FeedRecord {
            seq: 9,
            ..record("cart/d", -5)
        };
        assert_eq!(FeedRecord::decode(9, &r.encode()).expect("decodes"), r);
        let bytes = r.encode();
        for cut in 0..bytes.len() - r.id.len() {
            assert!(
                FeedRecord::decode(9, &bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut bad = bytes.clone();
        bad[9] = 7;
        assert!(FeedRecord::decode(9, &bad).is_err(), "deleted flag 7");
        bad = bytes;
        bad[0] = 2;
        assert!(FeedRecord::decode(9, &bad).is_err(), "version 2");
    }

    /// Numbers go on from the last given, across reopening and after retention dropped every
    /// record; a page starts after the number asked.
    #[test]
    fn numbers_are_never_reused_and_pages_resume_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), StoreOptions::plain()).expect("open");
            assert_eq!(store.feed_bounds().expect("bounds"), FeedBounds::default());
            assert_eq!(append(&store, &["a", "b", "c"], 10, 100), vec![1, 2, 3]);
            assert_eq!(append(&store, &["d"], 20, 100), vec![4]);
        }
        let store = Store::open(dir.path(), StoreOptions::plain()).expect("reopen");
        let page = store.feed_after(1, 2).expect("page");
        assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(page[0].id, "b");
        assert_eq!(
            store.trim_feed_before(15, 2).expect("trim"),
            2,
            "at most 2 at once"
        );
        assert_eq!(store.trim_feed_before(15, 2).expect("trim"), 1);
        assert_eq!(
            store.feed_bounds().expect("bounds"),
            FeedBounds {
                first: Some(4),
                last: 4
            }
        );
        assert_eq!(store.trim_feed_before(100, 10).expect("trim"), 1);
        assert_eq!(
            store.feed_bounds().expect("bounds"),
            FeedBounds {
                first: None,
                last: 4
            }
        );
        assert_eq!(append(&store, &["e", "f", "g"], 30, 2), vec![5, 6, 7]);
        assert_eq!(
            store.feed_bounds().expect("bounds"),
            FeedBounds {
                first: Some(6),
                last: 7
            },
            "retain_events = 2 keeps the newest two"
        );
    }
}
