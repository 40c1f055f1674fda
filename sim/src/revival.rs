//! The revival workload (`ttl-revive` scenarios): documents written with a short TTL are left
//! to expire, or are deleted, and are then written again (revived) by clients at several nodes
//! at once, cycle after cycle, while the nodes purge expired documents and tombstones on
//! different schedules and their clocks disagree.
//!
//! Each document `ttl/<i>` lives through [`WorkloadConfig::revival_cycles`] cycles. A cycle is
//! a write window of [`WINDOW`], opened by a burst of writes from a random set of clients (the
//! "openers", each at its own node, within 2 ms of the others: every one of their nodes revives
//! the document and creates its list, counter, text and maps at the same moment), followed by
//! random writes until the window closes, from the openers and some other clients (the
//! "writers"); the clients that do not write in a cycle read, and their nodes learn of the
//! revival from the others. Every write of a cycle but the last carries `?ttl=`[`TTL_S`]. The
//! cycle then ends:
//!
//! - by **expiry**: the next cycle opens only once the document has expired on every host's
//!   clock whatever the skew ([`Cycle::expired_everywhere`]), plus a random wait, so that some
//!   nodes have purged it to a stub by then and others still hold the expired history;
//! - or by a **delete**: one client deletes the document before it expires, and the next
//!   cycle opens 1-4 s later (a node with a short tombstone retention may have purged the
//!   tombstone by then).
//!
//! The cycle before the last always ends by expiry, so that even a delete that failed could
//! not leave earlier writes live under the last cycle. The last cycle has no TTL: its writes
//! must all be there at the end, and nothing of any earlier cycle.
//!
//! Timing, with every host clock off the simulation's by at most [`CLOCK_SKEW_MAX`] either
//! way: a write sent at simulated time `t` reaches its node at `t + ε` and sets the expiry to
//! `t + ε + offset + TTL`; a node with offset `o'` sees it expired from simulated time
//! `t + ε + offset − o' + TTL`. So with the window `[opens, opens + WINDOW)`, the document is
//! live on every clock until `opens + TTL − 2·skew` ([`Cycle::live_until`], less a margin), and
//! expired on every clock from `opens + WINDOW + TTL + 2·skew` ([`Cycle::expired_everywhere`],
//! plus a margin for `ε`). Every write of a cycle lands strictly between the previous cycle's
//! expiry and its own.
//!
//! During a cycle every client reads its node (at random in the window, then every
//! [`PROBE_EVERY`] until the document may expire or is deleted): in the scenario without
//! faults, the checker holds every read to what was acknowledged at least [`VISIBLE_WITHIN`]
//! before it (see `check::verify_revival`).
//!
//! Under faults, a node cut off while the others revive a document may revive an older
//! incarnation on its own, and its writes are then lost by design (as writes concurrent with a
//! delete are): faults only happen before the last cycles, which open together once the
//! faults are healed and every node holds the same history of every document ([`settle`]).

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::api::NodeApi;
use crate::lock;
use crate::trace::Trace;
use crate::workload::{
    Outcome, Session, SharedHistory, WorkloadConfig, WriteOp, client_rng, sleep_until, splitmix,
    wait_ready,
};

/// The TTL of every write before a document's last cycle, in seconds.
pub const TTL_S: u64 = 5;
/// How far each host's wall clock may be off the simulation's, either way (drawn per host
/// from the seed): two nodes disagree by up to twice this.
pub const CLOCK_SKEW_MAX: Duration = Duration::from_millis(800);
/// How long a cycle's clients write.
pub const WINDOW: Duration = Duration::from_millis(1000);
/// Slack for the time a request takes to reach its node, on both ends of the TTL bounds.
pub const MARGIN: Duration = Duration::from_millis(400);
/// The time between the first cycles of consecutive documents (and so the number of
/// documents of a run: one per this much of `--duration`).
pub const STAGGER: Duration = Duration::from_secs(2);
/// Without faults, how soon after it was acknowledged at its node a write must be visible in
/// every read at every node (broadcast takes a few ms; a revival that reached a node without
/// its incarnation's root would read 404 there until anti-entropy, 5 s or more).
pub const VISIBLE_WITHIN: Duration = Duration::from_secs(1);
/// How often each client reads its node after the window, while the document must be live.
pub const PROBE_EVERY: Duration = Duration::from_millis(200);
/// How long after the window closes a delete comes.
const DELETE_AFTER: Duration = Duration::from_millis(1500);
/// How long clients keep reading after the last cycle's window.
const LAST_PROBES: Duration = Duration::from_secs(2);
/// How long [`settle`] waits for the nodes to hold the same histories.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Between the last cycles of consecutive documents, when they open together after [`settle`].
const LAST_STAGGER: Duration = Duration::from_millis(100);

/// The id of document `i`.
pub fn doc_id(i: usize) -> String {
    format!("ttl/{i}")
}

/// Documents in a run whose `--duration` is `duration`: one per [`STAGGER`].
pub fn docs(duration: Duration) -> usize {
    let stagger = STAGGER.as_millis().max(1);
    (duration.as_millis().div_ceil(stagger) as usize).max(1)
}

/// How a cycle ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Its TTL runs out.
    Expire,
    /// `deleter` deletes the document at `at`, before it expires.
    Delete {
        /// When.
        at: Duration,
        /// The client that does it.
        deleter: usize,
    },
    /// The document's last cycle: no TTL, nothing ends it.
    Last,
}

/// One cycle of a document. Times are simulated time since the start of the run, once
/// [`Plan::starting_at`] placed the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    /// When the write window opens.
    pub opens: Duration,
    /// How the cycle ends.
    pub end: End,
    /// The clients that open the window with a burst of writes (at least one).
    pub openers: Vec<usize>,
    /// The clients that write in the window (the openers and some others); the others only
    /// read, so that their nodes learn of the revival from the writers' alone.
    pub writers: Vec<usize>,
}

impl Cycle {
    /// The TTL its writes carry: none in the last cycle.
    pub fn ttl_s(&self) -> Option<u64> {
        (self.end != End::Last).then_some(TTL_S)
    }

    /// When the write window closes: no write is sent from then on.
    pub fn closes(&self) -> Duration {
        self.opens + WINDOW
    }

    /// Until when every host's clock still holds the document live (writes of this cycle
    /// having revived it), whatever the clock skew; the last cycle does not expire, and is
    /// read for a while after its window.
    pub fn live_until(&self) -> Duration {
        match self.end {
            End::Last => self.closes() + LAST_PROBES,
            _ => (self.opens + Duration::from_secs(TTL_S))
                .saturating_sub(2 * CLOCK_SKEW_MAX + MARGIN),
        }
    }

    /// Until when the clients read the document: while it is live, and before it is deleted.
    pub fn probes_until(&self) -> Duration {
        match self.end {
            End::Delete { at, .. } => at.min(self.live_until()),
            _ => self.live_until(),
        }
    }

    /// From when the document is expired on every host's clock, whatever the skew.
    pub fn expired_everywhere(&self) -> Duration {
        self.closes() + Duration::from_secs(TTL_S) + 2 * CLOCK_SKEW_MAX + MARGIN
    }
}

/// Every document's cycles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Per document, its cycles in order.
    pub docs: Vec<Vec<Cycle>>,
}

/// The plan of a run with `seed`: `docs` documents of `cycles` cycles (at least 2), written by
/// `clients` clients, with times counted from the start of the workload. Every client draws
/// the same plan, from the seed alone.
pub fn plan(seed: u64, docs: usize, cycles: usize, clients: usize) -> Plan {
    let cycles = cycles.max(2);
    let clients = clients.max(1);
    let docs = (0..docs)
        .map(|doc| {
            let mut rng = StdRng::seed_from_u64(splitmix(seed ^ splitmix(0x7e11 + doc as u64)));
            let mut opens = STAGGER * doc as u32;
            let mut out = Vec::with_capacity(cycles);
            for c in 0..cycles {
                let mut openers: Vec<usize> =
                    (0..clients).filter(|_| rng.random_bool(0.6)).collect();
                if openers.is_empty() {
                    openers.push(rng.random_range(0..clients));
                }
                let writers: Vec<usize> = (0..clients)
                    .filter(|i| openers.contains(i) || rng.random_bool(0.5))
                    .collect();
                let end = if c + 1 == cycles {
                    End::Last
                } else if c + 2 < cycles && rng.random_ratio(1, 3) {
                    End::Delete {
                        at: opens + WINDOW + DELETE_AFTER,
                        deleter: rng.random_range(0..clients),
                    }
                } else {
                    End::Expire
                };
                let cycle = Cycle {
                    opens,
                    end,
                    openers,
                    writers,
                };
                opens = match cycle.end {
                    End::Delete { at, .. } => at + ms(&mut rng, 1000, 4000),
                    _ => cycle.expired_everywhere() + ms(&mut rng, 0, 2500),
                };
                out.push(cycle);
            }
            out
        })
        .collect();
    Plan { docs }
}

fn ms(rng: &mut StdRng, low: u64, high: u64) -> Duration {
    Duration::from_millis(rng.random_range(low..=high))
}

impl Plan {
    /// The same plan with every time moved `start` later (the workload's start).
    pub fn starting_at(&self, start: Duration) -> Plan {
        let docs = self
            .docs
            .iter()
            .map(|cycles| {
                cycles
                    .iter()
                    .map(|c| Cycle {
                        opens: c.opens + start,
                        end: match c.end {
                            End::Delete { at, deleter } => End::Delete {
                                at: at + start,
                                deleter,
                            },
                            ref end => end.clone(),
                        },
                        openers: c.openers.clone(),
                        writers: c.writers.clone(),
                    })
                    .collect()
            })
            .collect();
        Plan { docs }
    }

    /// When every document's cycle before its last has expired everywhere: the faults of a
    /// run with faults happen before this.
    pub fn before_last(&self) -> Duration {
        self.docs
            .iter()
            .filter_map(|cycles| cycles.len().checked_sub(2).map(|i| &cycles[i]))
            .map(Cycle::expired_everywhere)
            .max()
            .unwrap_or_default()
    }

    /// When the last window closes (without faults; with them the last cycles wait for
    /// [`settle`]).
    pub fn last_closes(&self) -> Duration {
        self.docs
            .iter()
            .filter_map(|cycles| cycles.last())
            .map(Cycle::closes)
            .max()
            .unwrap_or_default()
    }
}

/// Per node, how often it purges and how long it keeps tombstones: `(purge_interval_s,
/// tombstone_retention_s)`, drawn from the seed. One node purges every second, one every 5 s,
/// the others hourly (never, within a run); one node keeps tombstones for 1 s, the others for
/// the default week.
pub fn purge_schedules(seed: u64, nodes: usize) -> Vec<(u64, u64)> {
    let mut rng = StdRng::seed_from_u64(splitmix(seed ^ 0x9e_a6e5));
    let mut order: Vec<usize> = (0..nodes).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let week = verge_node::config::StorageConfig::default().tombstone_retention_s;
    let mut out = vec![(3600, week); nodes];
    for (rank, node) in order.iter().enumerate() {
        out[*node].0 = match rank {
            0 => 1,
            1 => 5,
            _ => 3600,
        };
    }
    if nodes > 0 {
        out[rng.random_range(0..nodes)].1 = 1;
    }
    out
}

/// One revival client: who it is and where it writes.
#[derive(Debug, Clone)]
pub struct RevivalClient {
    /// The client's number, unique in the run.
    pub client: usize,
    /// The node it writes to.
    pub node: usize,
    /// The run's seed.
    pub seed: u64,
    /// The plan, placed at the workload's start.
    pub plan: Arc<Plan>,
    /// Whether the last cycles wait for [`settle`] (runs with faults).
    pub settle: bool,
}

/// Runs a revival client: every document's cycles, side by side (each document on a task of
/// its own, the windows of different documents overlapping).
pub async fn client(
    spec: RevivalClient,
    config: WorkloadConfig,
    history: SharedHistory,
    trace: Trace,
) {
    wait_ready(&history).await;
    let mut tasks = tokio::task::JoinSet::new();
    for doc in 0..spec.plan.docs.len() {
        let reviver = Reviver {
            rng: client_rng(spec.seed ^ splitmix(doc as u64 + 1), spec.client),
            session: Session {
                client: spec.client,
                node: NodeApi::of(&crate::cluster::host_name(spec.node)),
                history: Arc::clone(&history),
                trace: trace.clone(),
                sent: Default::default(),
            },
            doc,
            id: doc_id(doc),
            seq: 0,
            spec: spec.clone(),
            config: config.clone(),
        };
        tasks.spawn_local(reviver.run());
    }
    while tasks.join_next().await.is_some() {}
}

/// One client's work on one document.
struct Reviver {
    spec: RevivalClient,
    config: WorkloadConfig,
    session: Session,
    rng: StdRng,
    doc: usize,
    id: String,
    /// The number of the client's last unique token in this document.
    seq: u64,
}

impl Reviver {
    async fn run(mut self) {
        let cycles = self.spec.plan.docs[self.doc].clone();
        for (c, mut cycle) in cycles.into_iter().enumerate() {
            if cycle.end == End::Last && self.spec.settle {
                let at = wait_final(&self.session.history).await;
                cycle.opens = cycle.opens.max(at + LAST_STAGGER * self.doc as u32);
            }
            self.window(c, &cycle).await;
            let mut at = cycle.closes();
            while at < cycle.probes_until() {
                sleep_until(at).await;
                if crate::now() >= cycle.probes_until() {
                    break;
                }
                self.probe(c).await;
                at += PROBE_EVERY;
            }
            if let End::Delete { at, deleter } = cycle.end
                && deleter == self.spec.client
            {
                sleep_until(at).await;
                self.delete(c).await;
            }
        }
    }

    /// The cycle's write window: the openers' burst, then random writes until it closes; a
    /// client that does not write in this cycle reads instead.
    async fn window(&mut self, c: usize, cycle: &Cycle) {
        let closes = cycle.closes();
        if !cycle.writers.contains(&self.spec.client) {
            let mut at = cycle.opens + ms(&mut self.rng, 0, 100);
            while at < closes {
                sleep_until(at).await;
                self.probe(c).await;
                at += PROBE_EVERY;
            }
            return;
        }
        if cycle.openers.contains(&self.spec.client) {
            // Every opener within 2 ms of the others: each of their nodes revives the document
            // and creates its containers before it can have heard of the others'.
            let jitter = ms(&mut self.rng, 0, 2);
            sleep_until(cycle.opens + jitter).await;
            for op in self.burst() {
                if crate::now() >= closes {
                    return;
                }
                self.write(c, cycle, op).await;
            }
        } else {
            let late = ms(&mut self.rng, 50, 400);
            sleep_until(cycle.opens + late).await;
        }
        loop {
            let (low, high) = self.config.revival_pause_ms;
            let pause = ms(&mut self.rng, low, high);
            if crate::now() + pause >= closes {
                return;
            }
            tokio::time::sleep(pause).await;
            match self.random_op() {
                Some(op) => self.write(c, cycle, op).await,
                None => self.probe(c).await,
            }
        }
    }

    async fn write(&mut self, c: usize, cycle: &Cycle, op: WriteOp) {
        self.session
            .write_in(self.doc, Some(c), &self.id, op, cycle.ttl_s())
            .await;
    }

    async fn probe(&self, c: usize) {
        self.session
            .probe(self.spec.node, self.doc, c, &self.id)
            .await;
    }

    /// Deletes the document; a request whose outcome is unknown is sent again (twice at
    /// most): a 404 then says the document is already gone.
    async fn delete(&mut self, c: usize) {
        for _ in 0..3 {
            let outcome = self
                .session
                .write_in(self.doc, Some(c), &self.id, WriteOp::DeleteDoc, None)
                .await;
            if outcome != Outcome::Unknown {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The unique token of the client's next write.
    fn next_unique(&mut self) -> String {
        self.seq += 1;
        format!("c{}.{}.{}", self.spec.client, self.doc, self.seq)
    }

    fn push(&mut self) -> WriteOp {
        WriteOp::Push(self.next_unique())
    }

    fn inc(&mut self) -> WriteOp {
        WriteOp::Inc(self.rng.random_range(1..=5))
    }

    fn splice(&mut self) -> WriteOp {
        WriteOp::Splice(format!("<{}>", self.next_unique()))
    }

    fn entry(&mut self) -> WriteOp {
        let key = self.next_unique();
        WriteOp::Entry {
            node: format!("n{}", self.spec.node),
            value: format!("v{}", &key[1..]),
            key,
        }
    }

    /// One write into each container, in a random order and without pauses.
    fn burst(&mut self) -> Vec<WriteOp> {
        let mut burst = vec![self.push(), self.inc(), self.entry(), self.splice()];
        for i in (1..burst.len()).rev() {
            burst.swap(i, self.rng.random_range(0..=i));
        }
        burst
    }

    /// A write in the window, or `None` for a read.
    fn random_op(&mut self) -> Option<WriteOp> {
        match self.rng.random_range(0..100) {
            0..25 => Some(self.push()),
            25..45 => Some(self.inc()),
            45..70 => Some(self.entry()),
            70..90 => Some(self.splice()),
            _ => None,
        }
    }
}

/// Waits until [`settle`] opened the last cycles; returns when it did.
async fn wait_final(history: &SharedHistory) -> Duration {
    loop {
        if let Some(at) = lock(history).final_at {
            return at;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs with faults: from `from` (once the faults are healed), polls every node until all
/// hold the same history (the same heads, whatever the state: live, expired, deleted or a
/// purged stub) of every document, then opens the last cycles. A node that had missed
/// revivals while cut off thereby holds the newest incarnation before anyone writes again, so
/// the last cycle's writes all revive the same one. Gives up after [`SETTLE_TIMEOUT`] (the
/// checker reports it) and opens them anyway.
pub async fn settle(
    nodes: Vec<NodeApi>,
    docs: usize,
    from: Duration,
    history: SharedHistory,
    trace: Trace,
) {
    sleep_until(from).await;
    let ids: Vec<String> = (0..docs).map(doc_id).collect();
    loop {
        let mut differ = Vec::new();
        for id in &ids {
            let mut seen = Vec::with_capacity(nodes.len());
            for node in &nodes {
                seen.push(node.stored_heads(id).await);
            }
            if seen.iter().any(Option::is_none) || seen.iter().any(|h| *h != seen[0]) {
                let views: Vec<String> = seen
                    .iter()
                    .enumerate()
                    .map(|(i, h)| match h {
                        Some(h) => format!("n{i} {}", short_heads(h)),
                        None => format!("n{i} no answer"),
                    })
                    .collect();
                differ.push(format!("{id}: {}", views.join(", ")));
            }
        }
        let waited = crate::now().saturating_sub(from);
        if differ.is_empty() || waited >= SETTLE_TIMEOUT {
            let mut h = lock(&history);
            if differ.is_empty() {
                trace.event(format!(
                    "settled: every node holds the same history of every document after {waited:?}; the last cycles open"
                ));
            } else {
                let what = format!(
                    "the nodes did not come to hold the same histories within {SETTLE_TIMEOUT:?} of the heal: {}",
                    differ.join("; ")
                );
                trace.event(format!("unsettled: {what}"));
                h.unsettled = Some(what);
            }
            h.final_at = Some(crate::now());
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn short_heads(heads: &[String]) -> String {
    let short: Vec<&str> = heads.iter().map(|h| &h[..h.len().min(8)]).collect();
    format!("[{}]", short.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every cycle's writes land after the previous cycle expired on every clock and well
    /// before its own expiry on any; the cycle before the last ends by expiry; some cycles end
    /// by a delete.
    #[test]
    fn cycles_are_apart_on_every_clock() {
        let mut deletes = 0;
        for seed in 0..50 {
            let plan = plan(seed, 4, 4, 3);
            for cycles in &plan.docs {
                assert_eq!(cycles.len(), 4);
                assert_eq!(cycles[3].end, End::Last);
                assert_eq!(cycles[2].end, End::Expire);
                for pair in cycles.windows(2) {
                    let (before, after) = (&pair[0], &pair[1]);
                    match before.end {
                        End::Delete { at, .. } => {
                            deletes += 1;
                            assert!(at < before.live_until());
                            assert!(at > before.closes());
                            assert!(after.opens > at + Duration::from_millis(999));
                        }
                        _ => assert!(after.opens >= before.expired_everywhere()),
                    }
                    assert!(before.live_until() > before.closes() + VISIBLE_WITHIN);
                    assert!(!before.openers.is_empty());
                    assert!(before.openers.iter().all(|o| before.writers.contains(o)));
                }
            }
        }
        assert!(deletes > 20, "{deletes} deletes");
    }

    #[test]
    fn schedules_differ_per_node() {
        let s = purge_schedules(7, 3);
        let mut intervals: Vec<u64> = s.iter().map(|x| x.0).collect();
        intervals.sort();
        assert_eq!(intervals, vec![1, 5, 3600]);
        assert_eq!(s.iter().filter(|x| x.1 == 1).count(), 1);
    }
}
