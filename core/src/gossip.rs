//! Broadcast decisions: which peers get a batch of changes, and when a batch is sent.
//!
//! In a small cluster (up to [`BroadcastPolicy::full_fanout_max`] peers) the node that took a
//! write sends it straight to every peer. In a larger one that would cost a message per peer and
//! per batch, so the cluster broadcasts through a **relay**, a star with a deterministic hub:
//! every node computes the same relay from the members it believes alive plus itself (the one
//! whose address hashes lowest, see [`relay`]), sends its batches to the relay only, and the
//! relay forwards what is new to it to every other member, merging everything it has to
//! forward over its own, longer window ([`RelayBatcher`]) so that one message carries the writes
//! of many nodes. A write then costs about one message to the relay plus
//! `peers / writes per relay window` messages from it, at the price of a second link delay and
//! up to one relay window.
//!
//! The `hops` of a batch tell its receiver what to do: [`HOPS_TO_RELAY`] means "you are my
//! relay, forward this", [`HOPS_FINAL`] means "apply it, do not forward". Every batch that does
//! not go to the relay is sent with [`HOPS_FINAL`], so two nodes that disagree about the
//! cluster's size or its relay (membership is eventually consistent) never make a batch travel
//! more than two hops, and never make everyone forward. Anti-entropy repairs whatever a
//! broadcast misses, so a wrong choice costs latency, never data.
//!
//! Pure logic, driven by the node with the current time, so the simulator replays it exactly.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use sha2::{Digest, Sha256};

use crate::doc_id::DocId;
use crate::limits::WIRE_CHANGES_PER_BATCH_MAX;
use crate::wire::DocChanges;

/// `hops` of a batch sent to the relay: its receiver forwards the changes new to it to every
/// other member.
pub const HOPS_TO_RELAY: u8 = 0;
/// `hops` of a batch that has reached its last receiver: applied, never forwarded.
pub const HOPS_FINAL: u8 = 1;

/// Whether the receiver of a batch with these `hops` forwards it (as the sender's relay).
pub fn forwards(hops: u8) -> bool {
    hops == HOPS_TO_RELAY
}

/// The open window of a batcher and its caps: bytes, and changes per wire batch.
#[derive(Debug)]
struct Window {
    window_ms: i64,
    bytes_max: usize,
    bytes: usize,
    changes: usize,
    opened_at_ms: Option<i64>,
}

impl Window {
    fn new(window_ms: i64, bytes_max: usize) -> Self {
        Self {
            window_ms,
            bytes_max,
            bytes: 0,
            changes: 0,
            opened_at_ms: None,
        }
    }

    fn add(&mut self, now_ms: i64, bytes: usize, changes: usize) {
        self.opened_at_ms.get_or_insert(now_ms);
        self.bytes += bytes;
        self.changes += changes;
    }

    fn full(&self) -> bool {
        self.bytes >= self.bytes_max || self.changes >= WIRE_CHANGES_PER_BATCH_MAX
    }

    /// An empty window takes anything (one oversized write still goes out, alone); an open
    /// one only what keeps it under both caps, so a merged message never outgrows a frame.
    fn fits(&self, bytes: usize, changes: usize) -> bool {
        self.opened_at_ms.is_none()
            || (self.bytes + bytes <= self.bytes_max
                && self.changes + changes <= WIRE_CHANGES_PER_BATCH_MAX)
    }

    fn poll_timeout(&self) -> Option<i64> {
        self.opened_at_ms.map(|t| t.saturating_add(self.window_ms))
    }

    fn due(&self, now_ms: i64) -> bool {
        self.poll_timeout().is_some_and(|t| t <= now_ms) || self.full()
    }

    fn close(&mut self) {
        self.opened_at_ms = None;
        self.bytes = 0;
        self.changes = 0;
    }
}

fn size(changes: &[Vec<u8>]) -> usize {
    changes.iter().map(Vec::len).sum()
}

/// Accumulates committed changes for a short window so that many writes share one message.
#[derive(Debug)]
pub struct Batcher {
    window: Window,
    pending: BTreeMap<DocId, Vec<Vec<u8>>>,
}

impl Batcher {
    /// A batcher that sends `window_ms` after the first change, or as soon as `bytes_max`
    /// bytes (or [`WIRE_CHANGES_PER_BATCH_MAX`] changes) are waiting.
    pub fn new(window_ms: i64, bytes_max: usize) -> Self {
        Self {
            window: Window::new(window_ms, bytes_max),
            pending: BTreeMap::new(),
        }
    }

    /// Whether `changes` can join the open batch; if not, take the batch first.
    pub fn fits(&self, changes: &[Vec<u8>]) -> bool {
        self.window.fits(size(changes), changes.len())
    }

    /// Adds changes; returns `true` when the batch is full and should be taken now.
    pub fn push(&mut self, now_ms: i64, doc: DocId, changes: Vec<Vec<u8>>) -> bool {
        self.window.add(now_ms, size(&changes), changes.len());
        self.pending.entry(doc).or_default().extend(changes);
        self.window.full()
    }

    /// When the open batch is due, if one is open.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.window.poll_timeout()
    }

    /// Whether the batch is due at `now_ms` (its window passed, or it is full).
    pub fn due(&self, now_ms: i64) -> bool {
        self.window.due(now_ms)
    }

    /// Takes the batch, leaving the batcher empty.
    pub fn take(&mut self) -> Vec<DocChanges> {
        self.window.close();
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

/// What a relay has to forward, merged over its window: the changes of every origin go out in
/// one message per member, each member getting everything but what it sent itself.
#[derive(Debug)]
pub struct RelayBatcher {
    window: Window,
    /// Changes with the member they came from, in arrival order.
    pending: Vec<(SocketAddr, DocChanges)>,
}

impl RelayBatcher {
    /// A relay batcher that sends `window_ms` after the first change, or as soon as
    /// `bytes_max` bytes (or [`WIRE_CHANGES_PER_BATCH_MAX`] changes) are waiting.
    pub fn new(window_ms: i64, bytes_max: usize) -> Self {
        Self {
            window: Window::new(window_ms, bytes_max),
            pending: Vec::new(),
        }
    }

    /// Whether `docs` can join the open batch; if not, take the batch first.
    pub fn fits(&self, docs: &[DocChanges]) -> bool {
        let bytes = docs.iter().map(|d| size(&d.changes)).sum();
        let changes = docs.iter().map(|d| d.changes.len()).sum();
        self.window.fits(bytes, changes)
    }

    /// Adds changes that came from `origin` (the relay's own address for its own writes);
    /// returns `true` when the batch is full and should be taken now.
    pub fn push(&mut self, now_ms: i64, origin: SocketAddr, docs: Vec<DocChanges>) -> bool {
        for d in docs {
            self.window.add(now_ms, size(&d.changes), d.changes.len());
            self.pending.push((origin, d));
        }
        self.window.full()
    }

    /// When the open batch is due, if one is open.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.window.poll_timeout()
    }

    /// Whether the batch is due at `now_ms` (its window passed, or it is full).
    pub fn due(&self, now_ms: i64) -> bool {
        self.window.due(now_ms)
    }

    /// Takes the batch as one message per member of `peers`: every change except those the
    /// member sent itself, grouped by document in arrival order. Members with nothing to get
    /// are left out.
    pub fn take(&mut self, peers: &[SocketAddr]) -> Vec<(SocketAddr, Vec<DocChanges>)> {
        self.window.close();
        let pending = std::mem::take(&mut self.pending);
        peers
            .iter()
            .filter_map(|peer| {
                let mut docs: BTreeMap<&DocId, Vec<Vec<u8>>> = BTreeMap::new();
                for (_, d) in pending.iter().filter(|(origin, _)| origin != peer) {
                    docs.entry(&d.doc)
                        .or_default()
                        .extend(d.changes.iter().cloned());
                }
                let docs: Vec<DocChanges> = docs
                    .into_iter()
                    .map(|(doc, changes)| DocChanges {
                        doc: doc.clone(),
                        changes,
                    })
                    .collect();
                (!docs.is_empty()).then_some((*peer, docs))
            })
            .collect()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Where a batch of this node's own changes goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Straight to these peers, with [`HOPS_FINAL`]: nobody forwards.
    Direct(Vec<SocketAddr>),
    /// To the relay only, with [`HOPS_TO_RELAY`]: it forwards to everyone else.
    ToRelay(SocketAddr),
    /// This node is the relay: the batch joins its [`RelayBatcher`], which goes to every peer.
    OwnRelay,
}

/// Who receives a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BroadcastPolicy {
    /// Up to this many peers, the origin sends to every peer and nobody forwards; above it the
    /// cluster broadcasts through a relay.
    pub full_fanout_max: usize,
}

impl Default for BroadcastPolicy {
    fn default() -> Self {
        Self {
            full_fanout_max: 16,
        }
    }
}

impl BroadcastPolicy {
    /// Where a batch of this node's (`me`) own changes goes. `peers` are the members it knows,
    /// `alive` those it believes alive (a subset), `connected(relay)` whether the relay has a
    /// live connection now. `wants_ack` is set when a writer waits for `N` replicas: such a
    /// batch goes straight to every peer, whose acknowledgements it needs (the relay cannot
    /// answer for the others).
    pub fn route(
        &self,
        me: SocketAddr,
        peers: &[SocketAddr],
        alive: &[SocketAddr],
        wants_ack: bool,
        connected: impl Fn(SocketAddr) -> bool,
    ) -> Route {
        if peers.len() <= self.full_fanout_max || wants_ack {
            return Route::Direct(peers.to_vec());
        }
        let hub = relay(me, alive);
        if hub == me {
            Route::OwnRelay
        } else if connected(hub) {
            Route::ToRelay(hub)
        } else {
            // Without a connection the batch would wait for a dial, or be lost to anti-entropy:
            // this once, pay the full fan-out.
            Route::Direct(peers.to_vec())
        }
    }
}

/// The relay of a node whose address is `me` and which believes `alive` are alive: of these
/// and itself, the member whose address hashes lowest. Every member with the same view picks
/// the same one. A fixed hash (SHA-256 of the address as text, not a per-process random one)
/// keeps the choice identical across nodes and runs, and spreads the role over the addresses
/// instead of always giving it to the lowest port.
pub fn relay(me: SocketAddr, alive: &[SocketAddr]) -> SocketAddr {
    alive
        .iter()
        .copied()
        .chain(std::iter::once(me))
        .min_by_key(|addr| (relay_rank(addr), *addr))
        .unwrap_or(me)
}

/// The rank of a member in the relay choice: the first 8 bytes of SHA-256 of its address.
fn relay_rank(addr: &SocketAddr) -> u64 {
    let digest = Sha256::digest(addr.to_string().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DocId {
        DocId::new(s).expect("valid")
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn addrs(ports: std::ops::Range<u16>) -> Vec<SocketAddr> {
        ports.map(addr).collect()
    }

    /// A batch as (document, changes) pairs, easy to compare.
    type Plain = Vec<(String, Vec<Vec<u8>>)>;

    fn changes(docs: &[DocChanges]) -> Plain {
        docs.iter()
            .map(|d| (d.doc.as_str().to_string(), d.changes.clone()))
            .collect()
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
        assert!(b.fits(&[vec![0; 1000]]), "an empty batch takes anything");
        assert!(
            b.push(20, id("c"), vec![vec![0; 100]]),
            "full batches go at once"
        );
    }

    #[test]
    fn an_open_batch_refuses_what_would_overflow_it() {
        let mut b = Batcher::new(5, 100);
        b.push(0, id("a"), vec![vec![0; 60]]);
        assert!(b.fits(&[vec![0; 40]]));
        assert!(!b.fits(&[vec![0; 41]]));
        let mut r = RelayBatcher::new(40, 100);
        r.push(
            0,
            addr(1),
            vec![DocChanges {
                doc: id("a"),
                changes: vec![vec![0; 60]],
            }],
        );
        let big = [DocChanges {
            doc: id("b"),
            changes: vec![vec![0; 41]],
        }];
        assert!(!r.fits(&big));
    }

    #[test]
    fn relay_choice_is_the_same_for_every_member_with_the_same_view() {
        let members = addrs(7000..7025);
        let chosen: Vec<SocketAddr> = members
            .iter()
            .map(|me| {
                let others: Vec<SocketAddr> = members.iter().copied().filter(|a| a != me).collect();
                relay(*me, &others)
            })
            .collect();
        assert!(chosen.iter().all(|r| *r == chosen[0]), "{chosen:?}");
        assert!(members.contains(&chosen[0]));
        // The order of the view does not matter.
        let mut reversed: Vec<SocketAddr> = members[1..].to_vec();
        reversed.reverse();
        assert_eq!(relay(members[0], &reversed), chosen[0]);
        // A node alone is its own relay; when the relay leaves the view, another takes over.
        assert_eq!(relay(addr(1), &[]), addr(1));
        let without: Vec<SocketAddr> = members
            .iter()
            .copied()
            .filter(|a| *a != chosen[0])
            .collect();
        let next = relay(without[0], &without[1..]);
        assert_ne!(next, chosen[0]);
        assert!(without.contains(&next));
    }

    #[test]
    fn the_relay_is_not_simply_the_lowest_address() {
        // Over many clusters the hash spreads the role; with the lowest address it would always
        // land on the first port.
        let firsts = (0..20u16)
            .filter(|i| {
                let members = addrs(8000 + i * 10..8000 + i * 10 + 10);
                relay(members[0], &members[1..]) == members[0]
            })
            .count();
        assert!(firsts < 20);
    }

    /// A 25-member cluster as `me` sees it, with its relay.
    fn large_cluster() -> (BroadcastPolicy, Vec<SocketAddr>, SocketAddr) {
        let members = addrs(7000..7025);
        let hub = relay(members[0], &members[1..]);
        (BroadcastPolicy::default(), members, hub)
    }

    fn others(members: &[SocketAddr], me: SocketAddr) -> Vec<SocketAddr> {
        members.iter().copied().filter(|a| *a != me).collect()
    }

    #[test]
    fn a_member_that_is_not_the_relay_sends_to_the_relay_only() {
        let (policy, members, hub) = large_cluster();
        for me in members.iter().copied().filter(|m| *m != hub) {
            let peers = others(&members, me);
            assert_eq!(
                policy.route(me, &peers, &peers, false, |_| true),
                Route::ToRelay(hub)
            );
        }
    }

    #[test]
    fn the_relay_merges_its_own_changes_into_its_window() {
        let (policy, members, hub) = large_cluster();
        let peers = others(&members, hub);
        assert_eq!(
            policy.route(hub, &peers, &peers, false, |_| true),
            Route::OwnRelay
        );
    }

    #[test]
    fn without_a_connection_to_the_relay_the_origin_sends_to_all() {
        let (policy, members, hub) = large_cluster();
        let me = members
            .iter()
            .copied()
            .find(|m| *m != hub)
            .expect("25 members");
        let peers = others(&members, me);
        assert_eq!(
            policy.route(me, &peers, &peers, false, |a| a != hub),
            Route::Direct(peers.clone())
        );
    }

    #[test]
    fn writers_waiting_for_replicas_get_every_peer_directly() {
        let (policy, members, hub) = large_cluster();
        for me in [
            hub,
            members.iter().copied().find(|m| *m != hub).expect("25"),
        ] {
            let peers = others(&members, me);
            assert_eq!(
                policy.route(me, &peers, &peers, true, |_| true),
                Route::Direct(peers.clone())
            );
        }
    }

    #[test]
    fn small_clusters_get_everything_from_the_origin() {
        let policy = BroadcastPolicy::default();
        let members = addrs(7000..7017);
        for me in &members {
            let peers = others(&members, *me);
            assert_eq!(peers.len(), 16);
            assert_eq!(
                policy.route(*me, &peers, &peers, false, |_| true),
                Route::Direct(peers.clone())
            );
        }
        let one = BroadcastPolicy { full_fanout_max: 1 };
        let peers = addrs(7000..7002);
        assert!(matches!(
            one.route(addr(1), &peers, &peers, false, |_| true),
            Route::ToRelay(_) | Route::OwnRelay
        ));
    }

    #[test]
    fn the_relay_view_is_the_alive_members_only() {
        let (policy, members, hub) = large_cluster();
        let me = members
            .iter()
            .copied()
            .find(|m| *m != hub)
            .expect("25 members");
        let peers = others(&members, me);
        let alive: Vec<SocketAddr> = peers.iter().copied().filter(|a| *a != hub).collect();
        let route = policy.route(me, &peers, &alive, false, |_| true);
        assert_ne!(
            route,
            Route::ToRelay(hub),
            "a member believed down is no relay"
        );
        // Nobody believed alive: the node is its own relay and sends to every known peer.
        assert_eq!(
            policy.route(me, &peers, &[], false, |_| true),
            Route::OwnRelay
        );
    }

    #[test]
    fn only_batches_sent_to_a_relay_are_forwarded() {
        assert!(forwards(HOPS_TO_RELAY));
        assert!(!forwards(HOPS_FINAL));
        assert!(!forwards(u8::MAX));
    }

    #[test]
    fn the_relay_forwards_to_every_member_but_the_origin_in_one_message_each() {
        let members = addrs(7000..7005);
        let hub = members[0];
        let peers = others(&members, hub);
        let mut r = RelayBatcher::new(40, 1 << 20);
        assert_eq!(r.poll_timeout(), None);
        let a = |bytes: u8| DocChanges {
            doc: id("doc/a"),
            changes: vec![vec![bytes]],
        };
        assert!(!r.push(100, members[1], vec![a(1)]));
        assert!(!r.push(
            110,
            members[2],
            vec![
                a(2),
                DocChanges {
                    doc: id("doc/b"),
                    changes: vec![vec![3]],
                }
            ]
        ));
        assert!(!r.push(120, hub, vec![a(4)]), "the relay's own changes");
        assert_eq!(r.poll_timeout(), Some(140));
        assert!(!r.due(139));
        assert!(r.due(140));
        let out = r.take(&peers);
        assert!(r.is_empty());
        assert_eq!(r.poll_timeout(), None);
        let by_peer: BTreeMap<SocketAddr, Plain> =
            out.iter().map(|(p, docs)| (*p, changes(docs))).collect();
        assert_eq!(
            by_peer.len(),
            4,
            "one message per member, none to the relay"
        );
        assert_eq!(
            by_peer[&members[1]],
            vec![
                ("doc/a".to_string(), vec![vec![2], vec![4]]),
                ("doc/b".to_string(), vec![vec![3]])
            ],
            "everything but its own change"
        );
        assert_eq!(
            by_peer[&members[2]],
            vec![("doc/a".to_string(), vec![vec![1], vec![4]])]
        );
        for p in &members[3..] {
            assert_eq!(
                by_peer[p],
                vec![
                    ("doc/a".to_string(), vec![vec![1], vec![2], vec![4]]),
                    ("doc/b".to_string(), vec![vec![3]])
                ],
                "changes of one document in arrival order"
            );
        }
    }

    #[test]
    fn a_member_whose_changes_are_the_only_ones_gets_no_message() {
        let members = addrs(7000..7004);
        let mut r = RelayBatcher::new(40, 1 << 20);
        r.push(
            0,
            members[1],
            vec![DocChanges {
                doc: id("x"),
                changes: vec![vec![1]],
            }],
        );
        let out = r.take(&members[1..]);
        let targets: Vec<SocketAddr> = out.iter().map(|(p, _)| *p).collect();
        assert_eq!(targets, vec![members[2], members[3]]);
    }

    #[test]
    fn a_full_relay_batch_goes_at_once() {
        let mut r = RelayBatcher::new(40, 10);
        assert!(r.push(
            0,
            addr(1),
            vec![DocChanges {
                doc: id("x"),
                changes: vec![vec![0; 10]],
            }]
        ));
        assert!(r.due(0));
    }
}
