//! The members a node replicates with, and when to dial them, reconcile with them and compare
//! clocks with them.
//!
//! Sans-IO: the driver says what it saw (a member learned, SWIM's verdicts, which connections
//! are open, a dial or a session that ended, a clock measured) and calls [`Peers::tick`] with a
//! monotonic `now` in milliseconds; the tick answers with [`Action`]s. Nothing here reads a
//! clock, so a wall clock that steps back cannot stall a schedule, and every decision is tested
//! on virtual time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::anti_entropy::PeerSchedule;
use crate::limits::{DEPARTED_MEMBERS_MAX, WIRE_MEMBERS_MAX};

/// How often a node compares its wall clock with each connected peer's (also on every new
/// connection). Clocks drift slowly; every 30 s it cost 1.2 messages per write in the 25-node
/// broadcast bench (two frames per pair and round), every 5 minutes nothing measurable.
pub const CLOCK_CHECK_INTERVAL_MS: i64 = 300_000;
/// A peer whose wall clock is further than this from this node's is warned about: expiry,
/// purges and tombstone retention each run on their node's own clock.
pub const CLOCK_SKEW_WARN_MS: i64 = 2_000;

/// What this node knows of one member.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// A configured seed (else learned from other members).
    pub seed: bool,
    /// Its node name, once SWIM told it.
    pub name: Option<String>,
    /// What SWIM says: `None` until it has an opinion, then alive or not.
    pub alive: Option<bool>,
    /// How far its wall clock is ahead of this node's, as last measured.
    pub clock_offset_ms: Option<i64>,
    clock_skewed: bool,
    clock_checked_at: Option<i64>,
    clock_connection: Option<u64>,
    dialing: bool,
    schedule: PeerSchedule,
}

impl Peer {
    /// Whether the member shows as up (in status and in the peer gauges alike): what SWIM
    /// says once it has an opinion, else whether a connection is open.
    pub fn shown_up(&self, connected: bool) -> bool {
        self.alive.unwrap_or(connected)
    }

    /// When anti-entropy last started with it, on the driver's monotonic clock.
    pub fn last_sync_at(&self) -> Option<i64> {
        self.schedule.last_started_ms()
    }
}

/// What the driver must do after a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Dial the member; report the end with [`Peers::dial_ended`].
    Dial(SocketAddr),
    /// Run an anti-entropy session with the member; `catch_up` on a new connection's first
    /// (the peer may have missed any broadcast). Report a failure with
    /// [`Peers::session_failed`].
    AntiEntropy {
        /// The member.
        peer: SocketAddr,
        /// The connection is new.
        catch_up: bool,
    },
    /// Compare wall clocks with the member; report with [`Peers::clock_measured`].
    CheckClock(SocketAddr),
}

/// What [`Peers::learn`] did with an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A new member.
    New,
    /// Already a member.
    Known,
    /// The table holds [`WIRE_MEMBERS_MAX`] members: not added.
    Full,
    /// This node's own address.
    Itself,
    /// A member that departed (left or forgotten): not added until SWIM sees a new start of
    /// it ([`Peers::member_up`]).
    Departed,
}

/// How a clock measurement changed a member's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockStanding {
    /// Its clock crossed beyond [`CLOCK_SKEW_WARN_MS`]: warn.
    Skewed,
    /// Its clock came back within the bound.
    Back,
    /// No change.
    Same,
}

/// The outcome of a tick.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tick {
    /// What to do, in member order.
    pub actions: Vec<Action>,
    /// Members shown up.
    pub up: usize,
    /// Members shown down.
    pub down: usize,
}

/// The member table of one node.
#[derive(Debug, Clone)]
pub struct Peers {
    local: SocketAddr,
    members: BTreeMap<SocketAddr, Peer>,
    /// Addresses of departed members (seeds among them): never dialled, not learned again
    /// from a connection, until SWIM declares a new start of them alive.
    departed: BTreeSet<SocketAddr>,
    anti_entropy_interval_ms: i64,
}

impl Peers {
    /// The table of the node at `local`, starting from its `seeds`.
    pub fn new(local: SocketAddr, seeds: &[SocketAddr], anti_entropy_interval_ms: i64) -> Self {
        let members = seeds
            .iter()
            .filter(|a| **a != local)
            .take(WIRE_MEMBERS_MAX)
            .map(|a| {
                let peer = Peer {
                    seed: true,
                    ..Peer::default()
                };
                (*a, peer)
            })
            .collect();
        Self {
            local,
            members,
            departed: BTreeSet::new(),
            anti_entropy_interval_ms,
        }
    }

    /// Adds a member this node heard of, up to [`WIRE_MEMBERS_MAX`].
    pub fn learn(&mut self, addr: SocketAddr) -> Learned {
        if addr == self.local {
            Learned::Itself
        } else if self.departed.contains(&addr) {
            Learned::Departed
        } else if self.members.contains_key(&addr) {
            Learned::Known
        } else if self.members.len() >= WIRE_MEMBERS_MAX {
            Learned::Full
        } else {
            self.members.insert(addr, Peer::default());
            Learned::New
        }
    }

    /// Every member's address, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.members.keys().copied().collect()
    }

    /// The members SWIM last declared alive: every node's view converges to the same, so
    /// they agree on a relay picked from it.
    pub fn alive(&self) -> Vec<SocketAddr> {
        self.members
            .iter()
            .filter(|(_, p)| p.alive == Some(true))
            .map(|(a, _)| *a)
            .collect()
    }

    /// Every member, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (&SocketAddr, &Peer)> {
        self.members.iter()
    }

    /// One member.
    pub fn get(&self, addr: &SocketAddr) -> Option<&Peer> {
        self.members.get(addr)
    }

    /// SWIM declared the member alive (learning it first, even if it had departed: SWIM
    /// declares alive only a start of it that the departure does not cover); `true` when it
    /// was not before.
    pub fn member_up(&mut self, addr: SocketAddr, name: &str) -> bool {
        self.departed.remove(&addr);
        self.learn(addr);
        let Some(peer) = self.members.get_mut(&addr) else {
            return false;
        };
        let was = peer.alive == Some(true);
        peer.alive = Some(true);
        peer.name = Some(name.to_owned()).filter(|n| !n.is_empty());
        !was
    }

    /// SWIM declared the member down.
    pub fn member_down(&mut self, addr: SocketAddr) {
        if let Some(peer) = self.members.get_mut(&addr) {
            peer.alive = Some(false);
        }
    }

    /// The member departed (it left, or an operator forgot it): dropped, and neither dialled
    /// nor learned again until SWIM declares a new start of it alive. `true` when it was a
    /// member.
    pub fn depart(&mut self, addr: SocketAddr) -> bool {
        if addr == self.local {
            return false;
        }
        if self.departed.len() >= DEPARTED_MEMBERS_MAX
            && let Some(first) = self.departed.first().copied()
        {
            self.departed.remove(&first);
        }
        self.departed.insert(addr);
        self.members.remove(&addr).is_some()
    }

    /// The departed members' addresses, in order.
    pub fn departed(&self) -> impl Iterator<Item = &SocketAddr> {
        self.departed.iter()
    }

    /// A dial the tick asked for ended (whether it connected or not).
    pub fn dial_ended(&mut self, addr: SocketAddr) {
        if let Some(peer) = self.members.get_mut(&addr) {
            peer.dialing = false;
        }
    }

    /// An anti-entropy session failed: the next tick starts another.
    pub fn session_failed(&mut self, addr: SocketAddr) {
        if let Some(peer) = self.members.get_mut(&addr) {
            peer.schedule.failed();
        }
    }

    /// A clock comparison found the member's wall clock `offset_ms` ahead of this node's.
    pub fn clock_measured(&mut self, addr: SocketAddr, offset_ms: i64) -> ClockStanding {
        let Some(peer) = self.members.get_mut(&addr) else {
            return ClockStanding::Same;
        };
        peer.clock_offset_ms = Some(offset_ms);
        let skewed = offset_ms.unsigned_abs() > CLOCK_SKEW_WARN_MS.unsigned_abs();
        let standing = match (peer.clock_skewed, skewed) {
            (false, true) => ClockStanding::Skewed,
            (true, false) => ClockStanding::Back,
            _ => ClockStanding::Same,
        };
        peer.clock_skewed = skewed;
        standing
    }

    /// The widest clock distance measured to any member.
    pub fn widest_clock_offset_ms(&self) -> i64 {
        self.members
            .values()
            .filter_map(|p| p.clock_offset_ms)
            .map(i64::abs)
            .max()
            .unwrap_or(0)
    }

    /// One round at monotonic time `now` (ms): `connection(addr)` numbers the open connection
    /// to a member, if any (a new connection gets a new number). Members without one are
    /// dialled (one dial at a time each); on each connection a catch-up session starts at
    /// once, then periodic ones, started only by the member of the pair with the lower
    /// address (one session reconciles both ways); clocks are compared on each new connection
    /// and every [`CLOCK_CHECK_INTERVAL_MS`].
    pub fn tick(&mut self, now: i64, connection: impl Fn(SocketAddr) -> Option<u64>) -> Tick {
        let mut tick = Tick::default();
        for (addr, peer) in &mut self.members {
            let open = connection(*addr);
            if peer.shown_up(open.is_some()) {
                tick.up += 1;
            } else {
                tick.down += 1;
            }
            let Some(conn) = open else {
                if !std::mem::replace(&mut peer.dialing, true) {
                    tick.actions.push(Action::Dial(*addr));
                }
                continue;
            };
            let clock_due = peer.clock_connection != Some(conn)
                || peer
                    .clock_checked_at
                    .is_none_or(|at| now.saturating_sub(at) >= CLOCK_CHECK_INTERVAL_MS);
            if clock_due {
                peer.clock_connection = Some(conn);
                peer.clock_checked_at = Some(now);
                tick.actions.push(Action::CheckClock(*addr));
            }
            let interval = if self.local < *addr {
                self.anti_entropy_interval_ms
            } else {
                i64::MAX
            };
            let catch_up = peer.schedule.is_new(conn);
            if peer.schedule.poll_start(conn, now, interval) {
                tick.actions.push(Action::AntiEntropy {
                    peer: *addr,
                    catch_up,
                });
            }
        }
        tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    const INTERVAL: i64 = 30_000;

    fn anti_entropy(tick: &Tick) -> Vec<(SocketAddr, bool)> {
        tick.actions
            .iter()
            .filter_map(|a| match a {
                Action::AntiEntropy { peer, catch_up } => Some((*peer, *catch_up)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn unconnected_members_are_dialled_once_until_the_dial_ends() {
        let mut peers = Peers::new(addr(1), &[addr(2), addr(1)], INTERVAL);
        assert_eq!(peers.addrs(), vec![addr(2)], "a node is not its own member");
        let tick = peers.tick(0, |_| None);
        assert_eq!(tick.actions, vec![Action::Dial(addr(2))]);
        assert_eq!((tick.up, tick.down), (0, 1));
        assert!(
            peers.tick(500, |_| None).actions.is_empty(),
            "one dial at a time"
        );
        peers.dial_ended(addr(2));
        assert_eq!(
            peers.tick(1_000, |_| None).actions,
            vec![Action::Dial(addr(2))]
        );
    }

    #[test]
    fn a_new_connection_catches_up_and_the_lower_address_runs_periodic_rounds() {
        let (low, high) = (addr(1), addr(2));
        let mut at_low = Peers::new(low, &[high], INTERVAL);
        let mut at_high = Peers::new(high, &[low], INTERVAL);
        for (peers, other) in [(&mut at_low, high), (&mut at_high, low)] {
            let tick = peers.tick(0, |_| Some(1));
            assert_eq!(
                anti_entropy(&tick),
                vec![(other, true)],
                "catch-up on connection 1"
            );
            assert!(anti_entropy(&peers.tick(1_000, |_| Some(1))).is_empty());
        }
        // Only the lower address starts the periodic round.
        assert_eq!(
            anti_entropy(&at_low.tick(INTERVAL, |_| Some(1))),
            vec![(high, false)]
        );
        assert!(anti_entropy(&at_high.tick(10 * INTERVAL, |_| Some(1))).is_empty());
        // Both catch up on the next connection.
        assert_eq!(
            anti_entropy(&at_high.tick(10 * INTERVAL + 1, |_| Some(2))),
            vec![(low, true)]
        );
    }

    #[test]
    fn a_failed_session_is_started_again_on_the_next_tick() {
        let mut peers = Peers::new(addr(1), &[addr(2)], INTERVAL);
        assert_eq!(anti_entropy(&peers.tick(0, |_| Some(7))).len(), 1);
        peers.session_failed(addr(2));
        assert_eq!(
            anti_entropy(&peers.tick(500, |_| Some(7))),
            vec![(addr(2), true)]
        );
    }

    #[test]
    fn clocks_are_compared_on_each_connection_and_every_interval() {
        let mut peers = Peers::new(addr(1), &[addr(2)], INTERVAL);
        let checks = |tick: &Tick| {
            tick.actions
                .iter()
                .filter(|a| matches!(a, Action::CheckClock(_)))
                .count()
        };
        assert_eq!(checks(&peers.tick(0, |_| Some(1))), 1);
        assert_eq!(checks(&peers.tick(1_000, |_| Some(1))), 0);
        assert_eq!(checks(&peers.tick(CLOCK_CHECK_INTERVAL_MS, |_| Some(1))), 1);
        assert_eq!(
            checks(&peers.tick(CLOCK_CHECK_INTERVAL_MS + 1, |_| Some(2))),
            1
        );
        assert_eq!(
            peers.clock_measured(addr(2), 86_400_000),
            ClockStanding::Skewed
        );
        assert_eq!(
            peers.clock_measured(addr(2), 90_000_000),
            ClockStanding::Same
        );
        assert_eq!(peers.widest_clock_offset_ms(), 90_000_000);
        assert_eq!(peers.clock_measured(addr(2), -5), ClockStanding::Back);
        assert_eq!(
            peers.clock_measured(addr(9), 1),
            ClockStanding::Same,
            "not a member"
        );
    }

    #[test]
    fn members_are_learned_up_to_the_cap() {
        let mut peers = Peers::new(addr(1), &[], INTERVAL);
        assert_eq!(peers.learn(addr(1)), Learned::Itself);
        for port in 0..WIRE_MEMBERS_MAX {
            assert_eq!(peers.learn(addr(1000 + port as u16)), Learned::New);
        }
        assert_eq!(peers.learn(addr(1000)), Learned::Known);
        assert_eq!(peers.learn(addr(9)), Learned::Full);
        assert!(
            !peers.member_up(addr(9), "late"),
            "beyond the cap it stays unknown"
        );
        assert_eq!(peers.addrs().len(), WIRE_MEMBERS_MAX);
    }

    #[test]
    fn status_and_gauges_follow_swim_once_it_has_an_opinion() {
        let mut peers = Peers::new(addr(1), &[addr(2), addr(3)], INTERVAL);
        let tick = peers.tick(0, |a| (a == addr(2)).then_some(1));
        assert_eq!(
            (tick.up, tick.down),
            (1, 1),
            "by connection before SWIM speaks"
        );
        assert!(peers.member_up(addr(3), "c"));
        assert!(!peers.member_up(addr(3), "c"), "already up");
        peers.member_down(addr(2));
        let tick = peers.tick(500, |a| (a == addr(2)).then_some(1));
        assert_eq!((tick.up, tick.down), (1, 1), "SWIM's view: 2 down, 3 up");
        assert_eq!(peers.alive(), vec![addr(3)]);
        assert_eq!(
            peers.get(&addr(3)).and_then(|p| p.name.clone()),
            Some("c".into())
        );
    }

    #[test]
    fn a_departed_member_is_dropped_and_not_dialled_until_it_starts_again() {
        let mut peers = Peers::new(addr(1), &[addr(2), addr(3)], INTERVAL);
        assert!(peers.member_up(addr(3), "c"));
        assert!(peers.depart(addr(2)), "a seed departs");
        assert!(peers.depart(addr(3)));
        assert!(!peers.depart(addr(9)), "not a member");
        assert!(!peers.depart(addr(1)), "never itself");
        assert!(peers.addrs().is_empty());
        assert_eq!(
            peers.learn(addr(2)),
            Learned::Departed,
            "a connection does not bring it back"
        );
        let tick = peers.tick(0, |_| None);
        assert!(
            tick.actions.is_empty(),
            "nothing dialled: {:?}",
            tick.actions
        );
        assert_eq!((tick.up, tick.down), (0, 0), "neither up nor down");
        assert_eq!(peers.departed().count(), 3);
        assert!(peers.member_up(addr(2), "b"), "SWIM saw a new start of it");
        assert_eq!(peers.addrs(), vec![addr(2)]);
        assert_eq!(
            peers.tick(500, |_| None).actions,
            vec![Action::Dial(addr(2))]
        );
    }

    /// A partition of an hour: the member is dialled with each dial's end (the back-off is
    /// the transport's), and the connection that comes back catches up at once, whoever has
    /// the lower address.
    #[test]
    fn a_long_partition_ends_with_a_catch_up() {
        for (local, other) in [(addr(1), addr(2)), (addr(2), addr(1))] {
            let mut peers = Peers::new(local, &[other], INTERVAL);
            assert_eq!(anti_entropy(&peers.tick(0, |_| Some(1))).len(), 1);
            let mut dials = 0;
            let mut now = 500;
            while now < 3_600_000 {
                let tick = peers.tick(now, |_| None);
                assert!(anti_entropy(&tick).is_empty());
                if tick.actions.contains(&Action::Dial(other)) {
                    dials += 1;
                    peers.dial_ended(other);
                }
                now += 500;
            }
            assert_eq!(dials, 7_199, "one dial per tick while it stays unreachable");
            assert_eq!(
                anti_entropy(&peers.tick(now, |_| Some(2))),
                vec![(other, true)],
                "the new connection catches up at once"
            );
        }
    }

    /// The table only ever sees the driver's monotonic time: a wall clock that steps back an
    /// hour (the driver keeps feeding monotonic time) changes nothing, and even a `now` that
    /// went backwards, were a driver to feed one, does not stall a catch-up.
    #[test]
    fn schedules_do_not_stall_when_time_goes_back() {
        let mut peers = Peers::new(addr(1), &[addr(2)], INTERVAL);
        assert_eq!(anti_entropy(&peers.tick(3_600_000, |_| Some(1))).len(), 1);
        assert_eq!(
            anti_entropy(&peers.tick(3_600_000 + INTERVAL, |_| Some(1))).len(),
            1,
            "periodic rounds go on"
        );
        assert_eq!(
            anti_entropy(&peers.tick(0, |_| Some(2))),
            vec![(addr(2), true)],
            "a new connection catches up whatever the time"
        );
    }
}
