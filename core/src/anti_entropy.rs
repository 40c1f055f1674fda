//! Finding which documents two nodes disagree on, at a cost that grows with the difference.
//!
//! Each document is summarised by a 32-byte digest of its id and heads. Two nodes reconcile
//! their digest sets with range-based set reconciliation (negentropy): equal ranges are
//! dismissed by one fingerprint, so 100,000 documents of which 10 differ cost a few kilobytes.
//! The digests that differ name the documents to run Automerge sync on. Everything here is
//! pure: the node owns the sockets and decides when to reconcile.

use std::collections::{BTreeMap, HashMap};

use automerge::ChangeHash;
use negentropy::{Id, Negentropy, NegentropyStorageVector};
use sha2::{Digest, Sha256};

use crate::doc_id::DocId;

/// Largest negentropy message; more differences take more round trips, never bigger frames.
pub const RECONCILE_FRAME_BYTES: u64 = 60 * 1024;
/// Most reconciliation round trips in one session before it gives up (and retries later).
pub const RECONCILE_ROUNDS_MAX: usize = 64;

/// A document's digest: equal digests mean equal id and equal heads.
pub fn digest(doc: &DocId, heads: &[ChangeHash]) -> [u8; 32] {
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    h.update((doc.as_str().len() as u64).to_be_bytes());
    h.update(doc.as_str().as_bytes());
    for head in sorted {
        h.update(head.0);
    }
    h.finalize().into()
}

/// Where a document sorts in reconciliation: a hash of its id alone, so the two versions of a
/// document that differs between nodes sit side by side and one range split finds both (this
/// cuts the bytes exchanged nearly in half against sorting by digest). Shifted to stay below
/// `u64::MAX`, which negentropy reserves as its upper bound.
fn sort_key(doc: &DocId) -> u64 {
    let h: [u8; 32] = Sha256::digest(doc.as_str().as_bytes()).into();
    let mut k = [0u8; 8];
    k.copy_from_slice(&h[..8]);
    u64::from_be_bytes(k) >> 1
}

/// How long a document must go unchanged before anti-entropy syncs it (see
/// [`DigestIndex::settled_doc_for`]). Broadcast delivers within a few hundred ms even over
/// 100 ms links; a change that it missed is repaired one round later.
pub const SETTLE_MS: i64 = 2_000;

/// The digests of every document a node holds, kept current as documents change.
#[derive(Debug, Default, Clone)]
pub struct DigestIndex {
    /// Per document: its sort key, its digest, and when it last changed here (ms since the
    /// epoch; `i64::MIN` when unknown, as for documents loaded at start-up).
    by_doc: BTreeMap<DocId, (u64, [u8; 32], i64)>,
    by_digest: HashMap<[u8; 32], DocId>,
}

impl DigestIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a document's current heads, as of a time long past.
    pub fn update(&mut self, doc: &DocId, heads: &[ChangeHash]) {
        self.update_at(doc, heads, i64::MIN);
    }

    /// Records a document's current heads, changed at `now_ms`.
    pub fn update_at(&mut self, doc: &DocId, heads: &[ChangeHash], now_ms: i64) {
        let d = digest(doc, heads);
        let key = self
            .by_doc
            .get(doc)
            .map_or_else(|| sort_key(doc), |(k, _, _)| *k);
        if let Some((_, old, _)) = self.by_doc.insert(doc.clone(), (key, d, now_ms)) {
            self.by_digest.remove(&old);
        }
        self.by_digest.insert(d, doc.clone());
    }

    /// Forgets a purged document.
    pub fn remove(&mut self, doc: &DocId) {
        if let Some((_, old, _)) = self.by_doc.remove(doc) {
            self.by_digest.remove(&old);
        }
    }

    /// The document with this digest, if held here.
    pub fn doc_for(&self, digest: &[u8; 32]) -> Option<&DocId> {
        self.by_digest.get(digest)
    }

    /// The document with this digest, if held here and unchanged for [`SETTLE_MS`] before
    /// `now_ms`. A document that just changed is usually still on its way to the peers by
    /// broadcast: syncing it now would send what the broadcast is about to deliver. The next
    /// round checks it again.
    pub fn settled_doc_for(&self, digest: &[u8; 32], now_ms: i64) -> Option<&DocId> {
        let doc = self.by_digest.get(digest)?;
        let (_, _, changed) = self.by_doc.get(doc)?;
        (now_ms.saturating_sub(*changed) >= SETTLE_MS).then_some(doc)
    }

    /// Documents held.
    pub fn len(&self) -> usize {
        self.by_doc.len()
    }

    /// Whether no document is held.
    pub fn is_empty(&self) -> bool {
        self.by_doc.is_empty()
    }

    /// A sealed negentropy storage of every digest.
    pub fn storage(&self) -> NegentropyStorageVector {
        let mut storage = NegentropyStorageVector::with_capacity(self.by_doc.len());
        for (key, d, _) in self.by_doc.values() {
            // Inserting into an unsealed storage cannot fail.
            let _ = storage.insert(*key, Id::from_byte_array(*d));
        }
        let _ = storage.seal();
        storage
    }
}

/// When to reconcile with one peer: at once on every new connection (a peer that was down, or
/// is new, catches up as soon as it is reachable), and every `interval_ms` on a connection that
/// stays up. Driven with the connection's id and the current time; holds no clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerSchedule {
    connection: Option<u64>,
    last_started_ms: Option<i64>,
}

impl PeerSchedule {
    /// Whether a session should start now on `connection`; if so it is recorded as started.
    /// Whether a session on `connection` would be the first on it (a catch-up).
    pub fn is_new(&self, connection: u64) -> bool {
        self.connection != Some(connection)
    }

    /// Whether to start a session now; records the start.
    pub fn poll_start(&mut self, connection: u64, now_ms: i64, interval_ms: i64) -> bool {
        let new_connection = self.connection != Some(connection);
        let stale = self
            .last_started_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= interval_ms);
        if new_connection || stale {
            self.connection = Some(connection);
            self.last_started_ms = Some(now_ms);
            true
        } else {
            false
        }
    }

    /// The session failed: the next poll starts another.
    pub fn failed(&mut self) {
        self.connection = None;
    }

    /// When the last session started.
    pub fn last_started_ms(&self) -> Option<i64> {
        self.last_started_ms
    }
}

/// Why reconciliation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// The peer's message is malformed, or this side's digest index cannot be built into a
    /// session (the negentropy library says which).
    #[error("reconciliation: {0}")]
    Protocol(#[from] negentropy::Error),
    /// The session went on past [`RECONCILE_ROUNDS_MAX`] round trips (a misbehaving peer: a
    /// real difference settles in a handful); anti-entropy tries again in its next round.
    #[error("reconciliation took more than {RECONCILE_ROUNDS_MAX} rounds")]
    TooManyRounds,
}

/// The initiating side of a reconciliation session.
pub struct Initiator {
    ne: Negentropy<'static, NegentropyStorageVector>,
    rounds: usize,
    /// Digests held here and not by the peer.
    pub have: Vec<[u8; 32]>,
    /// Digests held by the peer and not here.
    pub need: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Initiator")
            .field("rounds", &self.rounds)
            .finish_non_exhaustive()
    }
}

impl Initiator {
    /// Starts a session over `storage`; returns the session and the first message.
    pub fn start(storage: NegentropyStorageVector) -> Result<(Self, Vec<u8>), ReconcileError> {
        let mut ne = Negentropy::owned(storage, RECONCILE_FRAME_BYTES)?;
        let first = ne.initiate()?;
        Ok((
            Self {
                ne,
                rounds: 0,
                have: Vec::new(),
                need: Vec::new(),
            },
            first,
        ))
    }

    /// Handles the responder's reply: `Some(next)` to send, or `None` when reconciliation is
    /// complete and [`Initiator::have`] and [`Initiator::need`] are final.
    pub fn step(&mut self, reply: &[u8]) -> Result<Option<Vec<u8>>, ReconcileError> {
        self.rounds += 1;
        if self.rounds > RECONCILE_ROUNDS_MAX {
            return Err(ReconcileError::TooManyRounds);
        }
        let (mut have, mut need) = (Vec::new(), Vec::new());
        let next = self.ne.reconcile_with_ids(reply, &mut have, &mut need)?;
        self.have.extend(have.iter().map(|id| *id.as_bytes()));
        // negentropy hands the peer's ids over from a `HashSet`, in an order that changes from
        // process to process; the documents are synced in this order, so sort them (a
        // simulated run must replay exactly).
        let mut need: Vec<[u8; 32]> = need.iter().map(|id| *id.as_bytes()).collect();
        need.sort_unstable();
        self.need.extend(need);
        Ok(next)
    }

    /// Round trips so far.
    pub fn rounds(&self) -> usize {
        self.rounds
    }
}

/// The responding side: answers each message of a session over its own storage.
pub struct Responder {
    ne: Negentropy<'static, NegentropyStorageVector>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder").finish_non_exhaustive()
    }
}

impl Responder {
    /// A responder over `storage`.
    pub fn new(storage: NegentropyStorageVector) -> Result<Self, ReconcileError> {
        Ok(Self {
            ne: Negentropy::owned(storage, RECONCILE_FRAME_BYTES)?,
        })
    }

    /// Answers one message.
    pub fn reply(&mut self, message: &[u8]) -> Result<Vec<u8>, ReconcileError> {
        Ok(self.ne.reconcile(message)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(n: usize, differing: &[usize], salt: u8) -> DigestIndex {
        let mut idx = DigestIndex::new();
        for i in 0..n {
            let doc = DocId::new(format!("doc/{i}")).expect("valid");
            let head = if differing.contains(&i) {
                [salt; 32]
            } else {
                [0; 32]
            };
            idx.update(&doc, &[ChangeHash(head)]);
        }
        idx
    }

    fn reconcile(a: &DigestIndex, b: &DigestIndex) -> (Initiator, usize) {
        let (mut init, mut msg) = Initiator::start(a.storage()).expect("start");
        let mut resp = Responder::new(b.storage()).expect("responder");
        let mut bytes = msg.len();
        loop {
            let reply = resp.reply(&msg).expect("reply");
            bytes += reply.len();
            match init.step(&reply).expect("step") {
                Some(next) => {
                    bytes += next.len();
                    msg = next;
                }
                None => return (init, bytes),
            }
        }
    }

    #[test]
    fn finds_exactly_the_differing_documents() {
        let differing = [3, 500, 9_999];
        let a = index(10_000, &differing, 1);
        let b = index(10_000, &differing, 2);
        let (init, bytes) = reconcile(&a, &b);
        let mut docs: Vec<String> = init
            .have
            .iter()
            .map(|d| a.doc_for(d).expect("local digest").to_string())
            .collect();
        docs.sort();
        assert_eq!(docs, ["doc/3", "doc/500", "doc/9999"]);
        let mut theirs: Vec<String> = init
            .need
            .iter()
            .map(|d| b.doc_for(d).expect("remote digest").to_string())
            .collect();
        theirs.sort();
        assert_eq!(theirs, ["doc/3", "doc/500", "doc/9999"]);
        assert!(bytes < 10_000, "{bytes} bytes exchanged");
    }

    /// The target of DESIGN §9: 100,000 documents per node, 10 differ, under 20 KB.
    #[test]
    fn cost_grows_with_the_difference_not_the_store() {
        let differing: Vec<usize> = (0..10).map(|i| i * 9_973).collect();
        let a = index(100_000, &differing, 1);
        let b = index(100_000, &differing, 2);
        let (init, bytes) = reconcile(&a, &b);
        assert_eq!((init.have.len(), init.need.len()), (10, 10));
        assert!(
            bytes < 20_000,
            "{bytes} bytes exchanged for 10 differing documents of 100,000"
        );
        assert!(init.rounds() <= 3, "{} round trips", init.rounds());
    }

    /// The peer's digests come out in the same order every time (negentropy collects them in
    /// a `HashSet`, whose order changes from one set to the next): the simulator needs the
    /// documents synced in one order to replay a run.
    #[test]
    fn the_peers_digests_come_in_one_order() {
        let differing: Vec<usize> = (0..200).map(|i| i * 7).collect();
        let a = index(2_000, &differing, 1);
        let b = index(2_000, &differing, 2);
        let (first, _) = reconcile(&a, &b);
        assert_eq!(first.need.len(), 200);
        for _ in 0..3 {
            let (again, _) = reconcile(&a, &b);
            assert_eq!(again.need, first.need);
        }
    }

    #[test]
    fn documents_only_one_side_holds() {
        let mut a = index(100, &[], 0);
        let b = index(100, &[], 0);
        a.update(
            &DocId::new("only/a").expect("valid"),
            &[ChangeHash([5; 32])],
        );
        let (init, _) = reconcile(&a, &b);
        assert_eq!(init.have.len(), 1);
        assert!(init.need.is_empty());
    }

    #[test]
    fn equal_sets_need_one_round_trip() {
        let a = index(1_000, &[], 0);
        let (init, bytes) = reconcile(&a, &a.clone());
        assert!(init.have.is_empty() && init.need.is_empty());
        assert_eq!(init.rounds(), 1);
        assert!(bytes < 1_000, "{bytes}");
    }

    #[test]
    fn schedule_runs_on_new_connections_and_periodically() {
        let mut s = PeerSchedule::default();
        assert!(s.poll_start(1, 0, 30_000), "first connection");
        assert!(!s.poll_start(1, 500, 30_000));
        assert!(!s.poll_start(1, 29_999, 30_000));
        assert!(s.poll_start(1, 30_000, 30_000), "interval elapsed");
        assert!(s.poll_start(2, 30_500, 30_000), "reconnected");
        assert!(!s.poll_start(2, 31_000, 30_000));
        s.failed();
        assert!(s.poll_start(2, 31_500, 30_000), "retry after a failure");
        assert_eq!(s.last_started_ms(), Some(31_500));
    }

    #[test]
    fn index_tracks_updates_and_removals() {
        let mut idx = DigestIndex::new();
        let doc = DocId::new("x").expect("valid");
        idx.update(&doc, &[ChangeHash([1; 32])]);
        let old = digest(&doc, &[ChangeHash([1; 32])]);
        idx.update(&doc, &[ChangeHash([2; 32])]);
        assert!(idx.doc_for(&old).is_none());
        assert_eq!(idx.len(), 1);
        idx.remove(&doc);
        assert!(idx.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let a = index(10, &[], 0);
        let mut resp = Responder::new(a.storage()).expect("responder");
        for junk in [&[][..], &[0x61], &[0x61, 0xff, 0xff, 0xff], &[0x00; 64]] {
            let _ = resp.reply(junk);
        }
        let (mut init, _) = Initiator::start(a.storage()).expect("start");
        let _ = init.step(&[0x61, 0x00, 0x05]);
    }

    #[test]
    fn recently_changed_documents_wait_for_the_next_round() {
        let mut idx = DigestIndex::new();
        let doc = DocId::new("a").expect("valid id");
        idx.update_at(&doc, &[ChangeHash([1; 32])], 10_000);
        let d = digest(&doc, &[ChangeHash([1; 32])]);
        assert_eq!(idx.doc_for(&d), Some(&doc));
        assert_eq!(idx.settled_doc_for(&d, 10_000 + SETTLE_MS - 1), None);
        assert_eq!(idx.settled_doc_for(&d, 10_000 + SETTLE_MS), Some(&doc));
        let loaded = DocId::new("b").expect("valid id");
        idx.update(&loaded, &[ChangeHash([2; 32])]);
        let d = digest(&loaded, &[ChangeHash([2; 32])]);
        assert_eq!(
            idx.settled_doc_for(&d, 0),
            Some(&loaded),
            "loaded documents are settled"
        );
    }
}
