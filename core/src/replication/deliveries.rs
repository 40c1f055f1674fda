//! Batches whose delivery is still in question: sent to the relay and not yet confirmed by it
//! (past a deadline the sender sends them to every other peer itself, since a relay that died
//! keeps its connection until the idle timeout), and batches whose writers wait for peers to
//! acknowledge them (`?replicas=N`).
//!
//! Sans-IO: the driver reports what its streams did and polls with a monotonic `now`; the
//! machine says which batch to send again and which writers a peer's acknowledgement credits.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use super::timers::TimerQueue;

/// A delivery whose deadline passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expired<P> {
    /// The relay did not confirm `batch` in time: send `payload` to every peer but `relay`.
    Fallback {
        /// The batch.
        batch: u64,
        /// The relay it was sent to.
        relay: SocketAddr,
        /// What the batch carried.
        payload: P,
    },
    /// Acknowledgements of `batch` stopped counting; `missing` never answered.
    Acks {
        /// The batch.
        batch: u64,
        /// The peers that did not acknowledge it.
        missing: Vec<SocketAddr>,
    },
}

#[derive(Debug)]
struct AckWait<W> {
    awaiting: BTreeSet<SocketAddr>,
    waiters: Vec<W>,
}

/// The batches in flight of one node: `P` is what a relayed batch carries (to send it again),
/// `W` a handle to credit a waiting writer with.
#[derive(Debug)]
pub struct Deliveries<P, W> {
    relayed: BTreeMap<u64, (SocketAddr, P)>,
    acks: BTreeMap<u64, AckWait<W>>,
    deadlines: TimerQueue<u64>,
}

impl<P, W> Default for Deliveries<P, W> {
    fn default() -> Self {
        Self {
            relayed: BTreeMap::new(),
            acks: BTreeMap::new(),
            deadlines: TimerQueue::new(),
        }
    }
}

impl<P, W: Clone> Deliveries<P, W> {
    /// Nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// `batch` went to `relay` at `now`; it must confirm within `timeout_ms`.
    pub fn via_relay(
        &mut self,
        now: i64,
        timeout_ms: i64,
        batch: u64,
        relay: SocketAddr,
        payload: P,
    ) {
        self.relayed.insert(batch, (relay, payload));
        self.deadlines.schedule(now, timeout_ms, batch);
    }

    /// The relay's transport confirmed `batch`: nothing more to do for it.
    pub fn relay_took(&mut self, batch: u64) {
        self.relayed.remove(&batch);
    }

    /// Sending `batch` to the relay failed outright: send it to every other peer now. `None`
    /// when it was already settled (confirmed, or fallen back at its deadline).
    pub fn relay_refused(&mut self, batch: u64) -> Option<(SocketAddr, P)> {
        self.relayed.remove(&batch)
    }

    /// `batch` went at `now` to `peers`, each asked to acknowledge it within `timeout_ms`;
    /// every acknowledgement credits each of `waiters` once.
    pub fn awaiting_acks(
        &mut self,
        now: i64,
        timeout_ms: i64,
        batch: u64,
        peers: impl IntoIterator<Item = SocketAddr>,
        waiters: Vec<W>,
    ) {
        let awaiting: BTreeSet<SocketAddr> = peers.into_iter().collect();
        if awaiting.is_empty() || waiters.is_empty() {
            return;
        }
        self.acks.insert(batch, AckWait { awaiting, waiters });
        self.deadlines.schedule(now, timeout_ms, batch);
    }

    /// `peer` acknowledged `batch`: the writers to credit (none when the peer was not asked,
    /// already answered, or the wait expired).
    pub fn acked(&mut self, batch: u64, peer: SocketAddr) -> Vec<W> {
        let Some(wait) = self.acks.get_mut(&batch) else {
            return Vec::new();
        };
        if !wait.awaiting.remove(&peer) {
            return Vec::new();
        }
        let credited = wait.waiters.clone();
        if wait.awaiting.is_empty() {
            self.acks.remove(&batch);
        }
        credited
    }

    /// Acknowledgements still awaited from `peer`.
    pub fn awaited_from(&self, peer: SocketAddr) -> usize {
        self.acks
            .values()
            .filter(|w| w.awaiting.contains(&peer))
            .count()
    }

    /// When the next deadline falls.
    pub fn next_deadline(&self) -> Option<i64> {
        self.deadlines.next_deadline()
    }

    /// The deliveries whose deadline passed at `now`.
    pub fn poll(&mut self, now: i64) -> Vec<Expired<P>> {
        let mut expired = Vec::new();
        for batch in self.deadlines.pop_due(now) {
            if let Some((relay, payload)) = self.relayed.remove(&batch) {
                expired.push(Expired::Fallback {
                    batch,
                    relay,
                    payload,
                });
            } else if let Some(wait) = self.acks.remove(&batch) {
                expired.push(Expired::Acks {
                    batch,
                    missing: wait.awaiting.into_iter().collect(),
                });
            }
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    const RELAY_TIMEOUT: i64 = 1_000;
    const ACK_TIMEOUT: i64 = 5_000;

    #[test]
    fn a_relay_that_dies_mid_batch_makes_the_sender_send_it_to_everyone() {
        let mut d: Deliveries<&str, ()> = Deliveries::new();
        d.via_relay(0, RELAY_TIMEOUT, 1, addr(9), "batch 1");
        d.via_relay(10, RELAY_TIMEOUT, 2, addr(9), "batch 2");
        d.relay_took(2);
        assert!(d.poll(999).is_empty());
        assert_eq!(
            d.poll(1_000),
            vec![Expired::Fallback {
                batch: 1,
                relay: addr(9),
                payload: "batch 1"
            }]
        );
        assert!(
            d.poll(2_000).is_empty(),
            "the confirmed batch stays settled"
        );
        // A confirmation or a refusal after the deadline changes nothing.
        d.relay_took(1);
        assert_eq!(d.relay_refused(1), None);
        // A refusal before the deadline falls back at once, and only once.
        d.via_relay(3_000, RELAY_TIMEOUT, 3, addr(9), "batch 3");
        assert_eq!(d.relay_refused(3), Some((addr(9), "batch 3")));
        assert!(d.poll(10_000).is_empty());
    }

    #[test]
    fn acknowledgements_count_once_per_peer_and_a_dead_peer_expires() {
        let mut d: Deliveries<(), &str> = Deliveries::new();
        d.awaiting_acks(
            0,
            ACK_TIMEOUT,
            7,
            [addr(1), addr(2), addr(3)],
            vec!["w1", "w2"],
        );
        assert_eq!(d.awaited_from(addr(3)), 1);
        assert_eq!(d.acked(7, addr(1)), vec!["w1", "w2"]);
        assert!(
            d.acked(7, addr(1)).is_empty(),
            "a duplicated answer counts once"
        );
        assert!(d.acked(7, addr(4)).is_empty(), "a peer that was not asked");
        assert_eq!(d.acked(7, addr(2)), vec!["w1", "w2"]);
        // Peer 3 died: its acknowledgement never comes, and the wait ends at the deadline.
        assert_eq!(
            d.poll(ACK_TIMEOUT),
            vec![Expired::Acks {
                batch: 7,
                missing: vec![addr(3)]
            }]
        );
        assert!(d.acked(7, addr(3)).is_empty(), "too late");
        assert_eq!(d.awaited_from(addr(3)), 0);
    }

    #[test]
    fn a_wait_every_peer_answered_is_settled_before_its_deadline() {
        let mut d: Deliveries<(), u8> = Deliveries::new();
        d.awaiting_acks(0, ACK_TIMEOUT, 1, [addr(1)], vec![1]);
        d.awaiting_acks(0, ACK_TIMEOUT, 2, [addr(1)], Vec::new());
        assert_eq!(d.acked(1, addr(1)), vec![1]);
        assert!(d.acked(2, addr(1)).is_empty(), "nobody waited for batch 2");
        assert!(d.poll(ACK_TIMEOUT).is_empty());
    }
}
