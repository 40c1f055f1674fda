//! Broadcast decisions: which peers get a batch of changes, and when a batch is sent.
//!
//! Pure logic, driven by the node with the current time and a source of randomness, so the
//! simulator replays it exactly.

use std::collections::BTreeMap;

use crate::doc_id::DocId;
use crate::wire::DocChanges;

/// Most hops a batch is forwarded in a large cluster.
pub const HOPS_MAX: u8 = 8;

/// Accumulates committed changes for a short window so that many writes share one message.
#[derive(Debug)]
pub struct Batcher {
    window_ms: i64,
    bytes_max: usize,
    pending: BTreeMap<DocId, Vec<Vec<u8>>>,
    bytes: usize,
    opened_at_ms: Option<i64>,
}

impl Batcher {
    /// A batcher that sends `window_ms` after the first change, or as soon as `bytes_max`
    /// bytes are waiting.
    pub fn new(window_ms: i64, bytes_max: usize) -> Self {
        Self {
            window_ms,
            bytes_max,
            pending: BTreeMap::new(),
            bytes: 0,
            opened_at_ms: None,
        }
    }

    /// Adds changes; returns `true` when the batch is full and should be taken now.
    pub fn push(&mut self, now_ms: i64, doc: DocId, changes: Vec<Vec<u8>>) -> bool {
        self.opened_at_ms.get_or_insert(now_ms);
        self.bytes += changes.iter().map(Vec::len).sum::<usize>();
        self.pending.entry(doc).or_default().extend(changes);
        self.bytes >= self.bytes_max
    }

    /// When the open batch is due, if one is open.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.opened_at_ms.map(|t| t + self.window_ms)
    }

    /// Whether the batch is due at `now_ms`.
    pub fn due(&self, now_ms: i64) -> bool {
        self.poll_timeout().is_some_and(|t| t <= now_ms) || self.bytes >= self.bytes_max
    }

    /// Takes the batch, leaving the batcher empty.
    pub fn take(&mut self) -> Vec<DocChanges> {
        self.opened_at_ms = None;
        self.bytes = 0;
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(doc, changes)| DocChanges { doc, changes })
            .collect()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Who receives a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutPolicy {
    /// Up to this many peers, the origin sends to every peer and nobody forwards.
    pub full_fanout_max: usize,
    /// In larger clusters, each holder sends to this many random peers.
    pub fanout: usize,
}

impl Default for FanoutPolicy {
    fn default() -> Self {
        Self {
            full_fanout_max: 16,
            fanout: 4,
        }
    }
}

impl FanoutPolicy {
    /// The peers to send a batch to. `hops` is 0 at the origin; `from` is the peer a forwarded
    /// batch came from; `random(n)` returns a number below `n`.
    pub fn targets<P: Clone + PartialEq>(
        &self,
        peers: &[P],
        from: Option<&P>,
        hops: u8,
        random: &mut impl FnMut(usize) -> usize,
    ) -> Vec<P> {
        if peers.len() <= self.full_fanout_max {
            return if hops == 0 {
                peers.to_vec()
            } else {
                Vec::new()
            };
        }
        if hops >= HOPS_MAX {
            return Vec::new();
        }
        let mut candidates: Vec<P> = peers.iter().filter(|p| Some(*p) != from).cloned().collect();
        let k = self.fanout.min(candidates.len());
        // Partial Fisher-Yates: the first k positions end up a uniform random sample.
        for i in 0..k {
            let j = i + random(candidates.len() - i);
            candidates.swap(i, j);
        }
        candidates.truncate(k);
        candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DocId {
        DocId::new(s).expect("valid")
    }

    #[test]
    fn batches_by_window_and_size() {
        let mut b = Batcher::new(5, 100);
        assert_eq!(b.poll_timeout(), None);
        assert!(!b.push(10, id("a"), vec![vec![0; 10]]));
        assert!(!b.push(12, id("b"), vec![vec![0; 10]]));
        assert!(!b.push(13, id("a"), vec![vec![1; 10]]));
        assert_eq!(b.poll_timeout(), Some(15));
        assert!(!b.due(14));
        assert!(b.due(15));
        let batch = b.take();
        assert_eq!(batch.len(), 2);
        assert_eq!(
            batch[0].changes.len(),
            2,
            "changes of one document stay together, in order"
        );
        assert!(b.is_empty());
        assert!(
            b.push(20, id("c"), vec![vec![0; 100]]),
            "full batches go at once"
        );
    }

    #[test]
    fn small_clusters_get_everything_from_the_origin() {
        let policy = FanoutPolicy::default();
        let peers: Vec<u32> = (0..5).collect();
        let mut rnd = |n: usize| n - 1;
        assert_eq!(policy.targets(&peers, None, 0, &mut rnd), peers);
        assert!(policy.targets(&peers, Some(&1), 1, &mut rnd).is_empty());
    }

    #[test]
    fn large_clusters_get_a_random_subset_excluding_the_sender() {
        let policy = FanoutPolicy {
            full_fanout_max: 16,
            fanout: 4,
        };
        let peers: Vec<u32> = (0..30).collect();
        let mut state = 7usize;
        let mut rnd = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        for _ in 0..100 {
            let t = policy.targets(&peers, Some(&3), 1, &mut rnd);
            assert_eq!(t.len(), 4);
            assert!(!t.contains(&3));
            let mut dedup = t.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(dedup.len(), 4);
        }
        assert!(policy.targets(&peers, None, HOPS_MAX, &mut rnd).is_empty());
    }
}
