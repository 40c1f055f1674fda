//! Per-document metadata kept beside the Automerge bytes.
//!
//! Listings, the TTL purge and status read this small record instead of loading documents, so
//! it is a fixed binary layout that decodes without allocation beyond the heads.

use automerge::ChangeHash;

/// Layout version written as the first byte; bumped when the layout changes.
const META_VERSION: u8 = 2;
/// The layout before generations (read, never written): no generation fields.
const META_VERSION_1: u8 = 1;
/// Most heads a record stores; a document with more concurrent heads is still fine, listings
/// just show the first ones. Bounds the record size.
pub const META_HEADS_MAX: usize = 64;

const FLAG_DELETED: u8 = 1;
const FLAG_EXPIRES: u8 = 2;
const FLAG_STUB: u8 = 4;
const FIXED_LEN_V1: usize = 1 + 1 + 8 * 6 + 2;
const FIXED_LEN: usize = 1 + 1 + 8 * 9 + 2;

/// What the store knows about a document without loading it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DocMeta {
    /// The document's current heads.
    pub heads: Vec<ChangeHash>,
    /// Bytes stored for the document: snapshot plus incremental changes.
    pub size_bytes: u64,
    /// Bytes of the snapshot alone.
    pub snapshot_bytes: u64,
    /// Wall-clock time of the last committed write, milliseconds since the Unix epoch.
    pub updated_at_ms: i64,
    /// The document is deleted (tombstone).
    pub deleted: bool,
    /// When the document expires, milliseconds since the Unix epoch.
    pub expires_at_ms: Option<i64>,
    /// Sequence number the next incremental change row gets.
    pub next_seq: u64,
    /// Incremental change rows not yet folded into the snapshot.
    pub change_rows: u64,
    /// The document is what a purge leaves: the bare root of its next incarnation (see
    /// `verge_core::incarnation`), which the purge skips.
    pub stub: bool,
    /// The document's generation (`verge_core::generation`): how often its history was folded
    /// into a new root.
    pub generation: u64,
    /// Changes in the current generation, its root included: what a load replays.
    pub history_changes: u64,
    /// `size_bytes` when the current generation started: the history grew by the difference.
    pub generation_bytes: u64,
}

/// Why stored metadata could not be read: the record is from a newer version or damaged.
#[derive(Debug, thiserror::Error)]
#[error("document metadata record is malformed: {0}")]
pub struct MetaDecodeError(&'static str);

impl DocMeta {
    /// Whether the document reads as present at `now_ms`.
    pub fn live(&self, now_ms: i64) -> bool {
        !self.deleted && self.expires_at_ms.is_none_or(|at| at > now_ms) && !self.heads.is_empty()
    }

    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let heads = &self.heads[..self.heads.len().min(META_HEADS_MAX)];
        let mut out = Vec::with_capacity(FIXED_LEN + 32 * heads.len());
        out.push(META_VERSION);
        let mut flags = 0;
        if self.deleted {
            flags |= FLAG_DELETED;
        }
        if self.expires_at_ms.is_some() {
            flags |= FLAG_EXPIRES;
        }
        if self.stub {
            flags |= FLAG_STUB;
        }
        out.push(flags);
        out.extend_from_slice(&self.size_bytes.to_le_bytes());
        out.extend_from_slice(&self.snapshot_bytes.to_le_bytes());
        out.extend_from_slice(&self.updated_at_ms.to_le_bytes());
        out.extend_from_slice(&self.expires_at_ms.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.next_seq.to_le_bytes());
        out.extend_from_slice(&self.change_rows.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.history_changes.to_le_bytes());
        out.extend_from_slice(&self.generation_bytes.to_le_bytes());
        // Bounded by META_HEADS_MAX above, so it fits in u16.
        out.extend_from_slice(&(heads.len() as u16).to_le_bytes());
        for h in heads {
            out.extend_from_slice(&h.0);
        }
        out
    }

    /// Decodes a record written by [`DocMeta::encode`] (or by a version before generations).
    pub fn decode(bytes: &[u8]) -> Result<Self, MetaDecodeError> {
        let fixed_len = match bytes.first() {
            Some(&META_VERSION) => FIXED_LEN,
            Some(&META_VERSION_1) => FIXED_LEN_V1,
            Some(_) => return Err(MetaDecodeError("unknown version")),
            None => return Err(MetaDecodeError("too short")),
        };
        if bytes.len() < fixed_len {
            return Err(MetaDecodeError("too short"));
        }
        let flags = bytes[1];
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[2 + 8 * i..2 + 8 * (i + 1)]);
            u64::from_le_bytes(b)
        };
        let heads_len = usize::from(u16::from_le_bytes([
            bytes[fixed_len - 2],
            bytes[fixed_len - 1],
        ]));
        if heads_len > META_HEADS_MAX || bytes.len() != fixed_len + 32 * heads_len {
            return Err(MetaDecodeError("bad heads length"));
        }
        let heads = bytes[fixed_len..]
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                ChangeHash(h)
            })
            .collect();
        Ok(Self {
            heads,
            size_bytes: u64_at(0),
            snapshot_bytes: u64_at(1),
            updated_at_ms: u64_at(2) as i64,
            deleted: flags & FLAG_DELETED != 0,
            expires_at_ms: (flags & FLAG_EXPIRES != 0).then(|| u64_at(3) as i64),
            next_seq: u64_at(4),
            change_rows: u64_at(5),
            stub: flags & FLAG_STUB != 0,
            // Before generations, the whole history was generation 0; how long it is was not
            // kept, so the rows not yet folded stand for it.
            generation: if fixed_len == FIXED_LEN { u64_at(6) } else { 0 },
            history_changes: if fixed_len == FIXED_LEN {
                u64_at(7)
            } else {
                u64_at(5)
            },
            generation_bytes: if fixed_len == FIXED_LEN {
                u64_at(8)
            } else {
                u64_at(1)
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let meta = DocMeta {
            heads: vec![ChangeHash([1; 32]), ChangeHash([2; 32])],
            size_bytes: 812,
            snapshot_bytes: 700,
            updated_at_ms: 1_795_000_000_000,
            deleted: true,
            expires_at_ms: Some(-5),
            next_seq: 9,
            change_rows: 3,
            stub: true,
            generation: 4,
            history_changes: 17,
            generation_bytes: 640,
        };
        assert_eq!(DocMeta::decode(&meta.encode()).expect("decodes"), meta);
        let plain = DocMeta::default();
        assert_eq!(DocMeta::decode(&plain.encode()).expect("decodes"), plain);
    }

    #[test]
    fn reads_records_from_before_generations() {
        let meta = DocMeta {
            heads: vec![ChangeHash([7; 32])],
            size_bytes: 900,
            snapshot_bytes: 800,
            updated_at_ms: 5,
            deleted: false,
            expires_at_ms: None,
            next_seq: 12,
            change_rows: 6,
            stub: false,
            generation: 3,
            history_changes: 99,
            generation_bytes: 1,
        };
        let current = meta.encode();
        // Version 1: the same fields without the three generation ones.
        let mut v1 = vec![META_VERSION_1];
        v1.extend_from_slice(&current[1..FIXED_LEN_V1 - 2]);
        v1.extend_from_slice(&current[FIXED_LEN - 2..]);
        let read = DocMeta::decode(&v1).expect("decodes");
        assert_eq!(
            read,
            DocMeta {
                generation: 0,
                history_changes: 6,
                generation_bytes: 800,
                ..meta
            }
        );
    }

    #[test]
    fn rejects_damage() {
        let bytes = DocMeta::default().encode();
        assert!(DocMeta::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut wrong = bytes.clone();
        wrong[0] = 99;
        assert!(DocMeta::decode(&wrong).is_err());
        let mut extra = bytes;
        extra.push(0);
        assert!(DocMeta::decode(&extra).is_err());
    }
}
