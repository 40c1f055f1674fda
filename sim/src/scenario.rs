//! Scenarios: named fault schedules. Each one draws the timing and the nodes it hits from the
//! run's seed, so a seed names one exact schedule.

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

use crate::workload::Creation;

/// One fault action, applied between simulation steps.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Cut every link between two groups, both ways.
    Partition(Vec<usize>, Vec<usize>),
    /// Cut the links from the first group to the second only.
    OneWay(Vec<usize>, Vec<usize>),
    /// Repair every link and restore latency and loss.
    Heal,
    /// Lose this fraction of packets between nodes.
    Loss(f64),
    /// Send this fraction of packets between nodes twice.
    Duplicate(f64),
    /// Give every link of a node this one-way latency.
    Slow(usize, Duration),
    /// Power-cut a node: unsynced writes are lost.
    Crash(usize),
    /// Cut a node's power at its `k`-th next disk write, in the middle of whatever commit is
    /// under way (a `Crash` follows shortly).
    PowerCutAfterWrites(usize, u64),
    /// Start a crashed node again.
    Restart(usize),
    /// Fail a node's next disk syncs (its commits fail).
    DiskErrors(usize, u32),
    /// A node leaves the cluster gracefully (`POST /v1/admin/leave` at the node), while its
    /// clients write, and stops; it is never started again.
    Leave(usize),
    /// A survivor forgets a node that lost its power (`POST /v1/admin/members/forget` at
    /// `via`): the node is never started again.
    Forget {
        /// The node forgotten (crashed before).
        node: usize,
        /// The survivor asked to forget it.
        via: usize,
    },
}

/// Network conditions for the whole run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Network {
    /// One-way latency.
    pub latency: Duration,
    /// Extra random latency per packet (reorders packets).
    pub jitter: Duration,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(2),
            jitter: Duration::ZERO,
        }
    }
}

/// A named fault schedule.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name on the command line.
    pub name: &'static str,
    /// What it does, one line.
    pub about: &'static str,
    /// Least nodes it needs.
    pub nodes_min: usize,
    /// Broadcast through a relay even in a small cluster (as clusters above
    /// `full_fanout_max` peers do).
    pub relay: bool,
    /// Whether the workload's documents exist before the clients start, or the clients create
    /// them (and everything in them) concurrently.
    pub creation: Creation,
    plan: fn(&mut StdRng, usize, Duration) -> Vec<(Duration, Fault)>,
    network: fn(&mut StdRng) -> Network,
}

impl Scenario {
    /// The faults and when they happen, relative to the start of the workload, for `nodes`
    /// nodes and a workload of `duration`. Every schedule ends healed, with every node up.
    pub fn plan(
        &self,
        rng: &mut StdRng,
        nodes: usize,
        duration: Duration,
    ) -> Vec<(Duration, Fault)> {
        let mut plan = (self.plan)(rng, nodes, duration);
        plan.sort_by_key(|(at, _)| *at);
        plan
    }

    /// The run's network conditions.
    pub fn network(&self, rng: &mut StdRng) -> Network {
        (self.network)(rng)
    }
}

fn ms(rng: &mut StdRng, from: Duration, to: Duration) -> Duration {
    let (a, b) = (from.as_millis() as u64, to.as_millis() as u64);
    Duration::from_millis(if b > a { rng.random_range(a..b) } else { a })
}

/// A fault window inside the workload: starts in its first third, lasts a third to a half.
fn window(rng: &mut StdRng, duration: Duration) -> (Duration, Duration) {
    let start = ms(rng, duration / 10, duration / 3);
    let end = start + ms(rng, duration / 3, duration / 2);
    (start, end.min(duration))
}

fn steady(_: &mut StdRng) -> Network {
    Network::default()
}

fn shuffled(rng: &mut StdRng, nodes: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..nodes).collect();
    for i in (1..all.len()).rev() {
        let j = rng.random_range(0..=i);
        all.swap(i, j);
    }
    all
}

fn none(_: &mut StdRng, _: usize, _: Duration) -> Vec<(Duration, Fault)> {
    Vec::new()
}

fn isolate(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let node = rng.random_range(0..nodes);
    let rest: Vec<usize> = (0..nodes).filter(|i| *i != node).collect();
    let (start, end) = window(rng, duration);
    vec![
        (start, Fault::Partition(vec![node], rest)),
        (end, Fault::Heal),
    ]
}

fn majority(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let order = shuffled(rng, nodes);
    let (minority, majority) = order.split_at(nodes / 2);
    let (start, end) = window(rng, duration);
    vec![
        (
            start,
            Fault::Partition(minority.to_vec(), majority.to_vec()),
        ),
        (end, Fault::Heal),
    ]
}

fn one_way(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let node = rng.random_range(0..nodes);
    let rest: Vec<usize> = (0..nodes).filter(|i| *i != node).collect();
    let (start, end) = window(rng, duration);
    // The node hears everyone, but nothing it sends arrives.
    vec![(start, Fault::OneWay(vec![node], rest)), (end, Fault::Heal)]
}

fn flapping(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let mut plan = Vec::new();
    let mut at = ms(rng, Duration::from_millis(200), Duration::from_secs(1));
    while at + Duration::from_secs(1) < duration {
        let order = shuffled(rng, nodes);
        let cut = rng.random_range(1..nodes);
        plan.push((
            at,
            Fault::Partition(order[..cut].to_vec(), order[cut..].to_vec()),
        ));
        at += ms(rng, Duration::from_millis(300), Duration::from_millis(1500));
        plan.push((at, Fault::Heal));
        at += ms(rng, Duration::from_millis(100), Duration::from_millis(800));
    }
    plan
}

fn lossy(rng: &mut StdRng, _: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let loss = [0.02, 0.05, 0.1, 0.2][rng.random_range(0..4)];
    let duplicate = [0.0, 0.01, 0.05][rng.random_range(0..3)];
    let (start, end) = window(rng, duration);
    vec![
        (start, Fault::Loss(loss)),
        (start, Fault::Duplicate(duplicate)),
        (end, Fault::Heal),
    ]
}

fn jittery(rng: &mut StdRng) -> Network {
    Network {
        latency: Duration::from_millis(rng.random_range(1..10)),
        jitter: Duration::from_millis(rng.random_range(5..50)),
    }
}

fn crash_restart(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let mut plan = Vec::new();
    let crashes = rng.random_range(1..=2);
    let slot = duration / (crashes + 1);
    for k in 0..crashes {
        let node = rng.random_range(0..nodes);
        let at = slot * k + ms(rng, Duration::ZERO, slot / 2);
        let down = ms(
            rng,
            Duration::from_millis(500),
            slot / 2 + Duration::from_millis(500),
        );
        plan.push((at, Fault::Crash(node)));
        plan.push((at + down, Fault::Restart(node)));
    }
    plan
}

fn relay_crash(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let addrs: Vec<_> = (0..nodes).map(crate::cluster::gossip_addr).collect();
    let relay = verge_core::gossip::relay(addrs[0], &addrs[1..]);
    let node = addrs.iter().position(|a| *a == relay).unwrap_or(0);
    let (start, end) = window(rng, duration);
    vec![(start, Fault::Crash(node)), (end, Fault::Restart(node))]
}

fn disk_errors(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let node = rng.random_range(0..nodes);
    let at = ms(rng, duration / 10, duration / 2);
    vec![(at, Fault::DiskErrors(node, rng.random_range(1..=5)))]
}

fn slow(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let node = rng.random_range(0..nodes);
    let (start, end) = window(rng, duration);
    let latency = Duration::from_millis(rng.random_range(200..1500));
    vec![(start, Fault::Slow(node, latency)), (end, Fault::Heal)]
}

fn chaos(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let mut plan = Vec::new();
    for f in [isolate, majority, crash_restart, lossy, slow, disk_errors] {
        if rng.random_bool(0.5) {
            plan.extend(f(rng, nodes, duration));
        }
    }
    // Overlapping windows may heal each other early; a crash may hit a node that is down.
    // Both are part of the chaos. The run heals everything and restarts every node at the end.
    plan
}

/// Splits that come and go while packets are lost, duplicated and reordered: creations and
/// deletes reach the other nodes late, out of order or after a heal, while those nodes create
/// the same containers again on their own.
fn race_faults(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let splits = flapping(rng, nodes, duration);
    with_loss(rng, splits)
}

/// `splits` with 2-10% packet loss and 0-5% duplication from the start, applied again after
/// each heal.
fn with_loss(rng: &mut StdRng, splits: Vec<(Duration, Fault)>) -> Vec<(Duration, Fault)> {
    let loss = [0.02, 0.05, 0.1][rng.random_range(0..3)];
    let duplicate = [0.0, 0.01, 0.05][rng.random_range(0..3)];
    let lossy = |at: Duration| [(at, Fault::Loss(loss)), (at, Fault::Duplicate(duplicate))];
    // A heal also ends loss and duplication: start them again right after each one (the plan's
    // sort is stable, so they follow the heal they share a time with).
    let mut plan: Vec<(Duration, Fault)> = lossy(Duration::ZERO).into();
    for (at, fault) in splits {
        let healed = fault == Fault::Heal;
        plan.push((at, fault));
        if healed {
            plan.extend(lossy(at));
        }
    }
    plan
}

/// The revival workload's faults, all before the documents' last cycles (`duration` is the time
/// until then): in half the runs, splits that come and go; in the other half, one node cut off
/// (or a minority from the majority) for a third to a half of that time, long enough to miss
/// whole cycles, revivals and purges of the others. Both with packet loss and duplication, on
/// jittery links; everything heals at the end.
fn revival_faults(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let splits = if rng.random_bool(0.5) {
        flapping(rng, nodes, duration)
    } else if rng.random_bool(0.5) {
        isolate(rng, nodes, duration)
    } else {
        majority(rng, nodes, duration)
    };
    // A split may heal after `duration`, and loss returns after every heal: cut the plan
    // there, so that the last event is the heal and nothing is broken once the last cycles
    // start.
    let mut plan: Vec<(Duration, Fault)> = with_loss(rng, splits)
        .into_iter()
        .filter(|(at, _)| *at < duration)
        .collect();
    plan.push((duration, Fault::Heal));
    plan
}

/// A node leaves gracefully between a quarter and half of the workload, while every client
/// writes (its own clients included, up to the moment it stops).
fn leave(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let node = rng.random_range(0..nodes);
    let at = ms(rng, duration / 4, duration / 2);
    vec![(at, Fault::Leave(node))]
}

/// A node loses its power between a quarter and half of the workload, and 0.5-2 s later a
/// random survivor forgets it.
fn forget(rng: &mut StdRng, nodes: usize, duration: Duration) -> Vec<(Duration, Fault)> {
    let order = shuffled(rng, nodes);
    let (node, via) = (order[0], order[1]);
    let at = ms(rng, duration / 4, duration / 2);
    let later = at + ms(rng, Duration::from_millis(500), Duration::from_secs(2));
    vec![
        (at, Fault::Crash(node)),
        (later, Fault::Forget { node, via }),
    ]
}

/// Every scenario.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "baseline",
        about: "no faults: the workload alone",
        nodes_min: 1,
        relay: false,
        creation: Creation::Upfront,
        plan: none,
        network: steady,
    },
    Scenario {
        name: "partition-isolate",
        about: "one node cut off from all others, then healed",
        nodes_min: 2,
        relay: false,
        creation: Creation::Upfront,
        plan: isolate,
        network: steady,
    },
    Scenario {
        name: "partition-majority",
        about: "a minority cut off from the majority, then healed",
        nodes_min: 3,
        relay: false,
        creation: Creation::Upfront,
        plan: majority,
        network: steady,
    },
    Scenario {
        name: "partition-oneway",
        about: "one node hears the others but nothing it sends arrives",
        nodes_min: 2,
        relay: false,
        creation: Creation::Upfront,
        plan: one_way,
        network: steady,
    },
    Scenario {
        name: "partition-flapping",
        about: "random splits that heal and return every few hundred ms",
        nodes_min: 2,
        relay: false,
        creation: Creation::Upfront,
        plan: flapping,
        network: steady,
    },
    Scenario {
        name: "loss-reorder",
        about: "packet loss of 2-20% and duplication of 0-5% on jittery links that reorder packets",
        nodes_min: 2,
        relay: false,
        creation: Creation::Upfront,
        plan: lossy,
        network: jittery,
    },
    Scenario {
        name: "crash-restart",
        about: "power cuts, some in the middle of a commit: unsynced writes are lost or torn, the node restarts on what its disk kept",
        nodes_min: 1,
        relay: false,
        creation: Creation::Upfront,
        plan: crash_restart,
        network: steady,
    },
    Scenario {
        name: "disk-errors",
        about: "a node's disk fails a few syncs: its commits fail and must not be acknowledged",
        nodes_min: 1,
        relay: false,
        creation: Creation::Upfront,
        plan: disk_errors,
        network: steady,
    },
    Scenario {
        name: "slow-node",
        about: "one node's links slow to 200-1500 ms",
        nodes_min: 2,
        relay: false,
        creation: Creation::Upfront,
        plan: slow,
        network: steady,
    },
    Scenario {
        name: "relay-crash",
        about: "broadcast through a relay, and the relay loses power for a few seconds",
        nodes_min: 3,
        relay: true,
        creation: Creation::Upfront,
        plan: relay_crash,
        network: steady,
    },
    Scenario {
        name: "chaos",
        about: "a random mix of the above, overlapping",
        nodes_min: 3,
        relay: false,
        creation: Creation::Upfront,
        plan: chaos,
        network: jittery,
    },
    Scenario {
        name: "leave",
        about: "one node leaves the cluster gracefully (POST /v1/admin/leave) while clients write, and stays stopped",
        nodes_min: 2,
        relay: false,
        creation: Creation::Upfront,
        plan: leave,
        network: steady,
    },
    Scenario {
        name: "forget",
        about: "one node loses its power for good, and a survivor forgets it (POST /v1/admin/members/forget)",
        nodes_min: 2,
        relay: false,
        creation: Creation::Upfront,
        plan: forget,
        network: steady,
    },
    Scenario {
        name: "create-race",
        about: "nothing created in advance: every node creates each fresh document's list, counter, text and maps at the same moment, deletes and re-creates them",
        nodes_min: 2,
        relay: false,
        creation: Creation::Racing,
        plan: none,
        network: steady,
    },
    Scenario {
        name: "create-race-partition",
        about: "create-race under flapping partitions, with packet loss, duplication and reordering",
        nodes_min: 2,
        relay: false,
        creation: Creation::Racing,
        plan: race_faults,
        network: jittery,
    },
    Scenario {
        name: "ttl-revive",
        about: "documents written with a 5 s TTL expire or are deleted, and are revived by writes at several nodes at once, cycle after cycle, while nodes purge at different times (every 1 s, 5 s, hourly) and their clocks are up to 800 ms apart",
        nodes_min: 2,
        relay: false,
        creation: Creation::Revival,
        plan: none,
        network: steady,
    },
    Scenario {
        name: "ttl-revive-partition",
        about: "ttl-revive with splits (flapping, or a node or minority cut off for several cycles), packet loss and duplication on jittery links before the last cycles",
        nodes_min: 2,
        relay: false,
        creation: Creation::Revival,
        plan: revival_faults,
        network: jittery,
    },
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}
