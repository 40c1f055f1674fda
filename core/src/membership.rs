//! Cluster membership: SWIM failure detection and dissemination (foca), sans-IO.
//!
//! Each node is a [`MemberId`]: its gossip address, its name and a generation that grows at
//! every start, so a restarted node wins over its former self. The node feeds in packets and
//! due timers, and drains [`Output`]s: packets to send, timers to schedule, members that came
//! up or went down. foca draws its randomness from a generator seeded by the caller, so a
//! simulated run replays exactly.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use foca::{
    AccumulatingRuntime, Config, Foca, NoCustomBroadcast, OwnedNotification, PeriodicParams,
    PostcardCodec, Timer,
};
use rand_foca::SeedableRng;
use rand_foca::rngs::SmallRng;
use serde::{Deserialize, Serialize};

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
}

/// Why a membership input was refused.
#[derive(Debug, thiserror::Error)]
#[error("membership: {0}")]
pub struct MembershipError(String);

/// The SWIM state machine of one node.
pub struct Membership {
    foca: Foca<MemberId, PostcardCodec, SmallRng, NoCustomBroadcast>,
    runtime: AccumulatingRuntime<MemberId>,
    seeds: Vec<SocketAddr>,
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
        let foca = Foca::new(me, config, SmallRng::seed_from_u64(rng_seed), PostcardCodec);
        Self {
            foca,
            runtime: AccumulatingRuntime::new(),
            seeds,
        }
    }

    /// Announces this node to every seed (at start, and when isolated).
    pub fn announce_to_seeds(&mut self) {
        let me = self.foca.identity().addr;
        for addr in self.seeds.clone() {
            if addr == me {
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

    /// Takes everything the node must do now.
    pub fn drain(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        let mut isolated = false;
        while let Some(n) = self.runtime.to_notify() {
            match n {
                OwnedNotification::MemberUp(m) => out.push(Output::Up(m)),
                OwnedNotification::MemberDown(m) => out.push(Output::Down(m)),
                OwnedNotification::Idle => isolated = true,
                _ => {}
            }
        }
        if isolated && !self.seeds.is_empty() {
            self.announce_to_seeds();
            out.push(Output::Isolated);
        }
        while let Some((to, data)) = self.runtime.to_send() {
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
            }
        }

        fn add(&mut self, port: u16, seeds: &[u16]) {
            let me = id(port);
            let seeds = seeds.iter().map(|p| id(*p).addr).collect();
            let mut m = Membership::new(me.clone(), seeds, u64::from(port), config(8));
            m.announce_to_seeds();
            self.nodes.insert(me.addr, m);
            self.flush(me.addr);
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
                            if self.down.contains(&to) || self.down.contains(&at) {
                                continue;
                            }
                            if let Some(peer) = self.nodes.get_mut(&to) {
                                let _ = peer.handle_data(&data);
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
}
