//! Cluster membership: SWIM failure detection and dissemination (foca), sans-IO.
//!
//! Each node is a [`MemberId`]: its gossip address, its name and a generation that grows at
//! every start, so a restarted node wins over its former self. The node feeds in packets and
//! due timers, and drains [`Output`]s: packets to send, timers to schedule, members that came
//! up, went down or departed. foca draws its randomness from a generator seeded by the caller,
//! so a simulated run replays exactly.
//!
//! **Departures.** SWIM's `Down` says nothing of why: a crashed node and one that left look
//! alike, and a crashed node must stay listed (and dialled) until it returns. So a node that
//! leaves ([`Membership::leave`]) or is forgotten by an operator ([`Membership::forget`]) is
//! also announced as a [`Departure`], a custom broadcast that foca piggybacks on its messages
//! and every member passes on once. A departure covers an address up to a generation: the
//! members drop it, never dial it, and take no gossip about it (however stale) for a return;
//! only a later start of a node at that address (a higher generation) is a member again.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{
    AccumulatingRuntime, BroadcastHandler, Config, Foca, Invalidates, Member, OwnedNotification,
    PeriodicParams, PostcardCodec, Timer,
};
use rand_foca::SeedableRng;
use rand_foca::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use crate::limits::DEPARTED_MEMBERS_MAX;

/// Longest node name carried in membership packets.
pub const NODE_NAME_BYTES_MAX: usize = 64;
/// Largest membership packet: it travels as one QUIC datagram, whose payload is at least about
/// 1,150 bytes on any path QUIC runs over (1,200-byte packets), with room for the datagram's
/// own header ([`DATAGRAM_HEADER`]).
pub const MEMBERSHIP_PACKET_BYTES_MAX: usize = 1100;
/// The bytes before a membership packet in a QUIC datagram: the wire protocol version and the
/// datagram's kind (1: membership). Peers accept only these.
pub const DATAGRAM_HEADER: [u8; 2] = [crate::wire::PROTOCOL_VERSION, 1];

/// A member of the cluster as SWIM knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberId {
    /// Gossip address.
    pub addr: SocketAddr,
    /// Node name (empty for a seed known only by address).
    pub name: String,
    /// Grows at every start of the node; the higher one wins an address conflict.
    pub generation: u64,
}

impl foca::Identity for MemberId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            generation: self.generation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// Something the node must do for membership.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send a packet to a member.
    Send {
        /// Destination address.
        to: SocketAddr,
        /// The packet.
        data: Vec<u8>,
    },
    /// Call [`Membership::handle_timer`] with `timer` after `after`.
    Schedule {
        /// Delay.
        after: Duration,
        /// The timer to hand back.
        timer: Timer<MemberId>,
    },
    /// A member is alive (new, or back).
    Up(MemberId),
    /// A member was declared down.
    Down(MemberId),
    /// This node lost contact with every member and re-announced itself to the seeds.
    Isolated,
    /// A member left or was forgotten: drop it and stop dialling it. No output about it
    /// follows until a node at its address starts again (a higher generation, then
    /// [`Output::Up`]).
    Departed(Departure),
}

/// Why a membership input was refused.
#[derive(Debug, thiserror::Error)]
#[error("membership: {0}")]
pub struct MembershipError(String);

/// Why [`Membership::forget`] refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForgetError {
    /// A node cannot forget itself: stop it with a leave instead.
    #[error("{0} is this node's own address; to retire this node, make it leave")]
    Itself(SocketAddr),
    /// The address is not a member (never was, or already departed).
    #[error("{0} is not a member of the cluster")]
    NotMember(SocketAddr),
    /// foca refused the broadcast.
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

/// How a member came to depart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DepartureReason {
    /// It announced its own departure.
    Left,
    /// An operator declared it gone for good.
    Forgotten,
}

impl DepartureReason {
    /// The label used in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Left => "left",
            Self::Forgotten => "forgotten",
        }
    }
}

/// A member gone from the cluster: every start of the node at `addr` up to `generation`. A
/// later start (a higher generation) is a new member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Departure {
    /// The member's gossip address.
    pub addr: SocketAddr,
    /// The last generation the departure covers (0 for a seed never heard from).
    pub generation: u64,
    /// Left or forgotten.
    pub reason: DepartureReason,
}

/// The first byte of a departure broadcast: the kind of custom broadcast (room for others).
const DEPARTURE_TAG: u8 = 1;
/// The longest encoded departure (an IPv6 address with its scope).
const DEPARTURE_BYTES_MAX: usize = 1 + 1 + 8 + 2 + 1 + 16 + 4;

impl Departure {
    /// Whether the departure covers that identity.
    pub fn covers(&self, id: &MemberId) -> bool {
        id.addr == self.addr && id.generation <= self.generation
    }

    /// The broadcast's bytes: tag, reason, generation, port, IP version, then the IP (and an
    /// IPv6 scope).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DEPARTURE_BYTES_MAX);
        out.push(DEPARTURE_TAG);
        out.push(match self.reason {
            DepartureReason::Left => 1,
            DepartureReason::Forgotten => 2,
        });
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.addr.port().to_be_bytes());
        match self.addr {
            SocketAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.scope_id().to_be_bytes());
            }
        }
        out
    }

    /// Decodes [`Self::to_bytes`]; anything else (from the network) is refused.
    pub fn from_bytes(data: &[u8]) -> Result<Self, MembershipError> {
        let bad = || MembershipError(format!("malformed departure of {} bytes", data.len()));
        let [tag, reason, rest @ ..] = data else {
            return Err(bad());
        };
        let reason = match (*tag, *reason) {
            (DEPARTURE_TAG, 1) => DepartureReason::Left,
            (DEPARTURE_TAG, 2) => DepartureReason::Forgotten,
            _ => return Err(bad()),
        };
        let (generation, rest) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
        let (port, rest) = rest.split_first_chunk::<2>().ok_or_else(bad)?;
        let port = u16::from_be_bytes(*port);
        let addr = match rest {
            [4, ip @ ..] => {
                let ip = <[u8; 4]>::try_from(ip).map_err(|_| bad())?;
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)
            }
            [6, ip @ ..] => {
                let (ip, scope) = ip.split_first_chunk::<16>().ok_or_else(bad)?;
                let scope = <[u8; 4]>::try_from(scope).map_err(|_| bad())?;
                SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(*ip),
                    port,
                    0,
                    u32::from_be_bytes(scope),
                ))
            }
            _ => return Err(bad()),
        };
        Ok(Self {
            addr,
            generation: u64::from_be_bytes(*generation),
            reason,
        })
    }

    fn key(&self) -> DepartureKey {
        DepartureKey {
            addr: self.addr,
            generation: self.generation,
        }
    }
}

/// What foca's broadcast backlog knows a departure by: a newer one of the same address
/// replaces an older one still being passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DepartureKey {
    addr: SocketAddr,
    generation: u64,
}

impl Invalidates for DepartureKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.addr == other.addr && self.generation >= other.generation
    }
}

/// The departures this node knows of, shared between foca's broadcast handler (which records
/// those it receives) and [`Membership`] (which acts on them).
#[derive(Debug)]
struct Departures {
    me: SocketAddr,
    /// Each departed address, with the order it was recorded in (the oldest goes first when
    /// [`DEPARTED_MEMBERS_MAX`] is reached).
    gone: BTreeMap<SocketAddr, (Departure, u64)>,
    recorded: u64,
    /// Recorded since the last [`Membership::drain`].
    fresh: Vec<Departure>,
}

impl Departures {
    fn covering(&self, id: &MemberId) -> bool {
        self.gone.get(&id.addr).is_some_and(|(d, _)| d.covers(id))
    }

    /// Records `d`; `false` when it is no news (the address already departed at that
    /// generation or a later one).
    fn record(&mut self, d: Departure) -> bool {
        if self
            .gone
            .get(&d.addr)
            .is_some_and(|(known, _)| known.generation >= d.generation)
        {
            return false;
        }
        if !self.gone.contains_key(&d.addr) && self.gone.len() >= DEPARTED_MEMBERS_MAX {
            let oldest = self
                .gone
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(addr, _)| *addr);
            if let Some(addr) = oldest {
                self.gone.remove(&addr);
            }
        }
        self.recorded += 1;
        self.gone.insert(d.addr, (d, self.recorded));
        self.fresh.push(d);
        true
    }
}

fn lock(book: &Mutex<Departures>) -> std::sync::MutexGuard<'_, Departures> {
    book.lock().unwrap_or_else(|p| p.into_inner())
}

/// foca's handler of custom broadcasts: departures.
struct DepartureBroadcasts(Arc<Mutex<Departures>>);

impl BroadcastHandler<MemberId> for DepartureBroadcasts {
    type Key = DepartureKey;
    type Error = MembershipError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&MemberId>,
    ) -> Result<Option<DepartureKey>, MembershipError> {
        let departure = Departure::from_bytes(data)?;
        let mut book = lock(&self.0);
        // About this node, from another: an earlier start's leave, or an operator forgot this
        // node while it runs. Not passed on; foca, seeing itself declared down, renews this
        // node's identity (a higher generation), which the departure does not cover.
        if sender.is_some() && departure.addr == book.me {
            return Ok(None);
        }
        Ok(book.record(departure).then(|| departure.key()))
    }
}

/// The SWIM state machine of one node.
pub struct Membership {
    foca: Foca<MemberId, PostcardCodec, SmallRng, DepartureBroadcasts>,
    runtime: AccumulatingRuntime<MemberId>,
    seeds: Vec<SocketAddr>,
    departures: Arc<Mutex<Departures>>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("seeds", &self.seeds)
            .finish_non_exhaustive()
    }
}

/// SWIM settings for a LAN-like cluster of about `cluster_size` nodes, with the re-announce to
/// down members shortened so that a healed partition converges in seconds, not a minute.
pub fn config(cluster_size: u32) -> Config {
    let mut c = Config::new_lan(NonZeroU32::new(cluster_size.max(1)).unwrap_or(NonZeroU32::MIN));
    c.max_packet_size =
        std::num::NonZeroUsize::new(MEMBERSHIP_PACKET_BYTES_MAX).unwrap_or(c.max_packet_size);
    c.periodic_announce_to_down_members = Some(PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: std::num::NonZeroUsize::new(2).unwrap_or(std::num::NonZeroUsize::MIN),
    });
    c
}

impl Membership {
    /// A membership for `me`, randomised from `seed`, that announces itself to `seeds`.
    pub fn new(me: MemberId, seeds: Vec<SocketAddr>, rng_seed: u64, config: Config) -> Self {
        let departures = Arc::new(Mutex::new(Departures {
            me: me.addr,
            gone: BTreeMap::new(),
            recorded: 0,
            fresh: Vec::new(),
        }));
        let foca = Foca::with_custom_broadcast(
            me,
            config,
            SmallRng::seed_from_u64(rng_seed),
            PostcardCodec,
            DepartureBroadcasts(Arc::clone(&departures)),
        );
        Self {
            foca,
            runtime: AccumulatingRuntime::new(),
            seeds,
            departures,
        }
    }

    /// Announces this node to every seed (at start, and when isolated), but those that
    /// departed.
    pub fn announce_to_seeds(&mut self) {
        let me = self.foca.identity().addr;
        for addr in self.seeds.clone() {
            if addr == me || lock(&self.departures).gone.contains_key(&addr) {
                continue;
            }
            // Seeds are known by address only; foca learns their identity from the reply.
            let placeholder = MemberId {
                addr,
                name: String::new(),
                generation: 0,
            };
            let _ = self.foca.announce(placeholder, &mut self.runtime);
        }
    }

    /// Handles a packet from a peer.
    pub fn handle_data(&mut self, data: &[u8]) -> Result<(), MembershipError> {
        if data.len() > MEMBERSHIP_PACKET_BYTES_MAX {
            return Err(MembershipError(format!("packet of {} bytes", data.len())));
        }
        self.foca
            .handle_data(data, &mut self.runtime)
            .map_err(|e| MembershipError(e.to_string()))
    }

    /// Handles a timer that came due.
    pub fn handle_timer(&mut self, timer: Timer<MemberId>) {
        let _ = self.foca.handle_timer(timer, &mut self.runtime);
    }

    /// Announces this node's departure to the cluster: foca declares it down and tells a few
    /// members at once (the packets [`Self::drain`] returns next; the node must deliver them
    /// before it closes its endpoint), and the departure rides along so that the members drop
    /// this node instead of listing it as down. The state machine takes no part in the cluster
    /// afterwards.
    pub fn leave(&mut self) -> Result<Departure, MembershipError> {
        let me = self.foca.identity();
        let departure = Departure {
            addr: me.addr,
            generation: me.generation,
            reason: DepartureReason::Left,
        };
        self.foca
            .add_broadcast(&departure.to_bytes())
            .map_err(|e| MembershipError(e.to_string()))?;
        self.foca
            .leave_cluster(&mut self.runtime)
            .map_err(|e| MembershipError(e.to_string()))?;
        Ok(departure)
    }

    /// Declares the member at `addr` gone for good (it will not come back; a node that does
    /// come back at that address with a new start is a new member): dropped here at once, and
    /// the departure spreads to every member. `listed` says whether the node lists the
    /// address among its peers (a seed never heard from is not known to SWIM).
    pub fn forget(&mut self, addr: SocketAddr, listed: bool) -> Result<Departure, ForgetError> {
        if addr == self.foca.identity().addr {
            return Err(ForgetError::Itself(addr));
        }
        let known = self
            .foca
            .iter_membership_state()
            .filter(|m| m.id().addr == addr)
            .map(|m| m.id().generation)
            .max();
        let already = lock(&self.departures)
            .gone
            .get(&addr)
            .is_some_and(|(d, _)| known.is_none_or(|g| g <= d.generation));
        if already || (known.is_none() && !listed && !self.seeds.contains(&addr)) {
            return Err(ForgetError::NotMember(addr));
        }
        let departure = Departure {
            addr,
            generation: known.unwrap_or(0),
            reason: DepartureReason::Forgotten,
        };
        self.foca
            .add_broadcast(&departure.to_bytes())
            .map_err(|e| MembershipError(e.to_string()))?;
        // Out at once rather than on the next probe.
        let _ = self.foca.gossip(&mut self.runtime);
        Ok(departure)
    }

    /// Declares down, in foca, the members a departure covers that it still holds active
    /// (the departure came before foca's own word, or stale gossip revived one).
    fn bury(&mut self, departure: &Departure) {
        let covered: Vec<MemberId> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() != foca::State::Down && departure.covers(m.id()))
            .map(|m| m.id().clone())
            .collect();
        if !covered.is_empty() {
            let _ = self.foca.apply_many(
                covered.into_iter().map(Member::down),
                true,
                &mut self.runtime,
            );
        }
    }

    /// Whether `id` is covered by a departure.
    fn departed(&self, id: &MemberId) -> bool {
        lock(&self.departures).covering(id)
    }

    /// Takes everything the node must do now.
    pub fn drain(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        let mut isolated = false;
        let me = self.foca.identity().addr;
        let fresh = std::mem::take(&mut lock(&self.departures).fresh);
        for departure in fresh {
            self.bury(&departure);
            if departure.addr != me {
                out.push(Output::Departed(departure));
            }
        }
        let mut revived = Vec::new();
        while let Some(n) = self.runtime.to_notify() {
            match n {
                // Stale gossip about a departed member: it stays departed.
                OwnedNotification::MemberUp(m) if self.departed(&m) => revived.push(m),
                OwnedNotification::MemberUp(m) => out.push(Output::Up(m)),
                // The node dropped it already.
                OwnedNotification::MemberDown(m) if self.departed(&m) => {}
                OwnedNotification::MemberDown(m) => out.push(Output::Down(m)),
                OwnedNotification::Idle => isolated = true,
                _ => {}
            }
        }
        if !revived.is_empty() {
            let _ = self.foca.apply_many(
                revived.into_iter().map(Member::down),
                true,
                &mut self.runtime,
            );
        }
        if isolated && !self.seeds.is_empty() {
            self.announce_to_seeds();
            out.push(Output::Isolated);
        }
        while let Some((to, data)) = self.runtime.to_send() {
            // Nothing goes to a departed member (foca probes and re-announces to the members
            // it holds down): the node would dial it.
            if self.departed(&to) {
                continue;
            }
            out.push(Output::Send {
                to: to.addr,
                data: data.to_vec(),
            });
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            out.push(Output::Schedule { after, timer });
        }
        out
    }

    /// The members currently considered alive or suspect, this node excluded.
    pub fn members(&self) -> Vec<MemberId> {
        self.foca.iter_members().map(|m| m.id().clone()).collect()
    }

    /// This node's identity.
    pub fn identity(&self) -> &MemberId {
        self.foca.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::{BTreeMap, BinaryHeap};

    fn id(port: u16) -> MemberId {
        MemberId {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            name: format!("n{port}"),
            generation: 1,
        }
    }

    /// A virtual network and clock running several memberships.
    struct Net {
        nodes: BTreeMap<SocketAddr, Membership>,
        timers: BinaryHeap<Reverse<(u64, u64, SocketAddr, usize)>>,
        pending: Vec<Timer<MemberId>>,
        now_ms: u64,
        seq: u64,
        down: std::collections::HashSet<SocketAddr>,
        events: Vec<(SocketAddr, Output)>,
        /// Every packet delivered: sender, receiver, bytes (to replay as stale gossip).
        delivered: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
        /// Packets each address was sent (delivered or not).
        sent_to: BTreeMap<SocketAddr, usize>,
    }

    impl Net {
        fn new() -> Self {
            Self {
                nodes: BTreeMap::new(),
                timers: BinaryHeap::new(),
                pending: Vec::new(),
                now_ms: 0,
                seq: 0,
                down: Default::default(),
                events: vec![],
                delivered: vec![],
                sent_to: BTreeMap::new(),
            }
        }

        fn add(&mut self, port: u16, seeds: &[u16]) {
            self.add_member(id(port), seeds, config(8));
        }

        fn add_member(&mut self, me: MemberId, seeds: &[u16], config: Config) {
            let seeds = seeds.iter().map(|p| id(*p).addr).collect();
            let mut m = Membership::new(me.clone(), seeds, u64::from(me.addr.port()), config);
            m.announce_to_seeds();
            self.down.remove(&me.addr);
            self.nodes.insert(me.addr, m);
            self.flush(me.addr);
        }

        fn node(&mut self, port: u16) -> &mut Membership {
            self.nodes
                .get_mut(&id(port).addr)
                .expect("a node of the net")
        }

        /// Delivers `data` to `to` as if it came now, and runs what it causes.
        fn inject(&mut self, to: SocketAddr, data: &[u8]) {
            if let Some(node) = self.nodes.get_mut(&to) {
                let _ = node.handle_data(data);
            }
            self.flush(to);
        }

        fn events_about(&self, port: u16) -> Vec<(u16, Output)> {
            self.events
                .iter()
                .filter(|(_, o)| match o {
                    Output::Up(m) | Output::Down(m) => m.addr.port() == port,
                    Output::Departed(d) => d.addr.port() == port,
                    _ => false,
                })
                .map(|(at, o)| (at.port(), o.clone()))
                .collect()
        }

        fn flush(&mut self, at: SocketAddr) {
            let mut queue = vec![at];
            while let Some(at) = queue.pop() {
                let Some(node) = self.nodes.get_mut(&at) else {
                    continue;
                };
                for o in node.drain() {
                    match o {
                        Output::Send { to, data } => {
                            *self.sent_to.entry(to).or_default() += 1;
                            if self.down.contains(&to) || self.down.contains(&at) {
                                continue;
                            }
                            if let Some(peer) = self.nodes.get_mut(&to) {
                                let _ = peer.handle_data(&data);
                                self.delivered.push((at, to, data));
                                queue.push(to);
                            }
                        }
                        Output::Schedule { after, timer } => {
                            self.seq += 1;
                            let due = self.now_ms + after.as_millis() as u64;
                            self.pending.push(timer);
                            self.timers
                                .push(Reverse((due, self.seq, at, self.pending.len() - 1)));
                        }
                        other => self.events.push((at, other)),
                    }
                }
            }
        }

        fn run_until(&mut self, until_ms: u64) {
            while let Some(Reverse((due, _, at, idx))) = self.timers.peek().cloned() {
                if due > until_ms {
                    break;
                }
                self.timers.pop();
                self.now_ms = due;
                let timer = self.pending[idx].clone();
                if self.down.contains(&at) {
                    continue; // A crashed node's timers are dropped.
                }
                if let Some(node) = self.nodes.get_mut(&at) {
                    node.handle_timer(timer);
                }
                self.flush(at);
            }
            self.now_ms = until_ms;
        }

        fn view(&self, port: u16) -> Vec<u16> {
            let mut v: Vec<u16> = self.nodes[&id(port).addr]
                .members()
                .iter()
                .map(|m| m.addr.port())
                .collect();
            v.sort();
            v
        }
    }

    #[test]
    fn nodes_joining_through_one_seed_learn_everyone() {
        let mut net = Net::new();
        net.add(1, &[]);
        for p in 2..=5 {
            net.add(p, &[1]);
        }
        net.run_until(10_000);
        for p in 1..=5u16 {
            let want: Vec<u16> = (1..=5).filter(|q| *q != p).collect();
            assert_eq!(net.view(p), want, "view of node {p}");
        }
    }

    #[test]
    fn a_dead_node_is_declared_down() {
        let mut net = Net::new();
        for p in 1..=4 {
            net.add(p, &[1]);
        }
        net.run_until(10_000);
        net.down.insert(id(4).addr);
        net.run_until(30_000);
        for p in 1..=3u16 {
            assert!(
                !net.view(p).contains(&4),
                "node {p} still lists the dead node: {:?}",
                net.view(p)
            );
        }
        assert!(
            net.events
                .iter()
                .any(|(_, o)| matches!(o, Output::Down(m) if m.addr.port() == 4))
        );
    }

    #[test]
    fn garbage_packets_are_refused() {
        let mut m = Membership::new(id(1), vec![], 1, config(3));
        assert!(m.handle_data(&[0xff; 40]).is_err());
        assert!(
            m.handle_data(&vec![0; MEMBERSHIP_PACKET_BYTES_MAX + 1])
                .is_err()
        );
    }

    fn sent_to(net: &Net, port: u16) -> usize {
        net.sent_to.get(&id(port).addr).copied().unwrap_or(0)
    }

    #[test]
    fn a_leaving_node_is_removed_from_the_others_views_and_never_contacted_again() {
        let mut net = Net::new();
        for p in 1..=4 {
            net.add(p, &[1]);
        }
        net.run_until(10_000);
        assert_eq!(net.view(1), vec![2, 3, 4]);
        let departure = net.node(4).leave().expect("leave");
        assert_eq!(departure.reason, DepartureReason::Left);
        net.flush(id(4).addr);
        // The process stops right after its announcement went out.
        net.down.insert(id(4).addr);
        let sent_before = sent_to(&net, 4);
        net.run_until(11_000);
        for p in 1..=3u16 {
            assert_eq!(net.view(p), (1..=3).filter(|q| *q != p).collect::<Vec<_>>());
            assert!(
                net.events_about(4).iter().any(|(at, o)| *at == p
                    && matches!(o, Output::Departed(d) if d.reason == DepartureReason::Left)),
                "node {p} was told of the departure: {:?}",
                net.events_about(4)
            );
        }
        let settled = sent_to(&net, 4);
        let told = net.events_about(4).len();
        net.run_until(120_000);
        assert_eq!(
            sent_to(&net, 4),
            settled,
            "nothing is sent to a departed member (it was sent {sent_before} packets before it left)"
        );
        assert_eq!(
            net.events_about(4).len(),
            told,
            "no member reports the departed node down or up afterwards: {:?}",
            net.events_about(4)
        );
        for p in 1..=3u16 {
            assert_eq!(net.view(p).len(), 2, "survivors still see each other");
        }
    }

    #[test]
    fn a_forgotten_member_is_dropped_everywhere_and_not_revived_by_stale_gossip() {
        let mut net = Net::new();
        // foca forgets down members quickly here, so that stale gossip reaches the wrapper.
        let mut c = config(8);
        c.remove_down_after = Some(Duration::from_secs(2));
        for p in 1..=4 {
            net.add_member(id(p), &[1], c.clone());
        }
        net.run_until(10_000);
        let history = net.delivered.clone();
        net.down.insert(id(4).addr);
        let d = net.node(1).forget(id(4).addr, true).expect("forget");
        assert_eq!((d.generation, d.reason), (1, DepartureReason::Forgotten));
        net.flush(id(1).addr);
        net.run_until(12_000);
        for p in 1..=3u16 {
            assert!(!net.view(p).contains(&4), "node {p}: {:?}", net.view(p));
            assert!(
                net.events_about(4)
                    .iter()
                    .any(|(at, o)| *at == p && matches!(o, Output::Departed(_))),
                "node {p} learnt the departure"
            );
        }
        // Every packet of the cluster's first ten seconds, replayed now: stale gossip that
        // says node 4 is alive (its own announcement among it).
        let events_before = net.events_about(4).len();
        net.run_until(20_000);
        for (_, to, data) in history {
            if to != id(4).addr {
                net.inject(to, &data);
            }
        }
        let settled = sent_to(&net, 4);
        net.run_until(60_000);
        for p in 1..=3u16 {
            assert!(
                !net.view(p).contains(&4),
                "node {p} revived it: {:?}",
                net.view(p)
            );
        }
        assert_eq!(
            net.events_about(4).len(),
            events_before,
            "no Up or Down for a forgotten member: {:?}",
            net.events_about(4)
        );
        assert_eq!(sent_to(&net, 4), settled, "nothing is sent to it");
    }

    #[test]
    fn a_departed_node_that_starts_again_rejoins() {
        let mut net = Net::new();
        for p in 1..=3 {
            net.add(p, &[1]);
        }
        net.run_until(10_000);
        net.node(3).leave().expect("leave");
        net.flush(id(3).addr);
        net.down.insert(id(3).addr);
        net.run_until(15_000);
        assert_eq!(net.view(1), vec![2]);
        let again = MemberId {
            generation: 2,
            ..id(3)
        };
        net.add_member(again, &[1], config(8));
        net.run_until(30_000);
        assert_eq!(net.view(1), vec![2, 3]);
        assert_eq!(net.view(2), vec![1, 3]);
        assert!(
            net.events_about(3)
                .iter()
                .any(|(at, o)| *at == 2 && matches!(o, Output::Up(m) if m.generation == 2))
        );
    }

    #[test]
    fn forget_refuses_itself_and_non_members() {
        let mut net = Net::new();
        for p in 1..=3 {
            net.add(p, &[1]);
        }
        net.run_until(10_000);
        assert!(matches!(
            net.node(1).forget(id(1).addr, false),
            Err(ForgetError::Itself(_))
        ));
        assert!(matches!(
            net.node(1).forget(id(9).addr, false),
            Err(ForgetError::NotMember(_))
        ));
        assert!(net.node(1).forget(id(3).addr, true).is_ok());
        assert!(
            matches!(
                net.node(1).forget(id(3).addr, true),
                Err(ForgetError::NotMember(_))
            ),
            "already forgotten"
        );
        // A seed never heard from (generation 0) can be forgotten; a node that then starts
        // at that address is a member.
        let mut lone = Membership::new(id(7), vec![id(8).addr], 7, config(3));
        let d = lone.forget(id(8).addr, false).expect("a seed");
        assert_eq!(d.generation, 0);
        lone.announce_to_seeds();
        assert!(
            lone.drain()
                .iter()
                .all(|o| !matches!(o, Output::Send { to, .. } if *to == id(8).addr)),
            "a forgotten seed is not announced to"
        );
    }

    #[test]
    fn departures_round_trip_and_garbage_is_refused() {
        for addr in [
            "127.0.0.1:7071".parse::<SocketAddr>().expect("an address"),
            "[fe80::1%3]:7071".parse().expect("an address"),
        ] {
            for reason in [DepartureReason::Left, DepartureReason::Forgotten] {
                let d = Departure {
                    addr,
                    generation: u64::MAX - 1,
                    reason,
                };
                let bytes = d.to_bytes();
                assert!(bytes.len() <= DEPARTURE_BYTES_MAX);
                assert_eq!(Departure::from_bytes(&bytes).expect("decodes"), d);
                for cut in 0..bytes.len() {
                    assert!(Departure::from_bytes(&bytes[..cut]).is_err());
                }
            }
        }
        let good = [1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 4, 1, 2, 3, 4];
        assert!(Departure::from_bytes(&good).is_ok());
        for (at, byte) in [(0, 9), (1, 3), (12, 6)] {
            let mut bad = good;
            bad[at] = byte;
            assert!(Departure::from_bytes(&bad).is_err(), "byte {at} = {byte}");
        }
        let mut long = good.to_vec();
        long.push(0);
        assert!(Departure::from_bytes(&long).is_err());
    }

    #[test]
    fn the_departure_book_keeps_the_newest_up_to_its_bound() {
        let mut book = Departures {
            me: id(1).addr,
            gone: BTreeMap::new(),
            recorded: 0,
            fresh: Vec::new(),
        };
        let at = |port: u16, generation| Departure {
            addr: id(port).addr,
            generation,
            reason: DepartureReason::Left,
        };
        assert!(book.record(at(2, 5)));
        assert!(!book.record(at(2, 5)), "no news");
        assert!(!book.record(at(2, 4)), "older");
        assert!(book.record(at(2, 6)), "a later start left too");
        for port in 0..DEPARTED_MEMBERS_MAX as u16 - 1 {
            assert!(book.record(at(10_000 + port, 1)));
        }
        assert_eq!(book.gone.len(), DEPARTED_MEMBERS_MAX);
        assert!(book.covering(&MemberId {
            generation: 6,
            ..id(2)
        }));
        assert!(book.record(at(3, 1)));
        assert_eq!(book.gone.len(), DEPARTED_MEMBERS_MAX);
        assert!(
            !book.covering(&MemberId {
                generation: 6,
                ..id(2)
            }),
            "the oldest went"
        );
    }
}
