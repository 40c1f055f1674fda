//! The workload: clients at every node editing shared documents, recording what was
//! acknowledged. It comes in two modes ([`Creation`]):
//!
//! - **Upfront.** Each document starts with a counter `n`, a list `log` and a text `t`, created
//!   once before the clients start. Then every client, bound to one node, repeatedly picks a
//!   document and an operation: set or delete its own key (`c<i>`), increment the shared
//!   counter, push a unique item to the list, insert a unique token at the start of the text,
//!   or read.
//! - **Racing.** Nothing exists in advance: every write lands on a document and a path that
//!   may not exist yet, so every node creates the same containers at the same moment. Time is
//!   cut into rounds, each with a fresh document (`race/<round>`); at a round's start every
//!   client fires one push, one increment, one map entry and one splice into it without
//!   pausing, then keeps writing, and now and then deletes the round's deletable container so
//!   that it is created again (generation after generation) while others write into it.
//! - **Revival.** Documents written with a short TTL expire (or are deleted) and are written
//!   again, cycle after cycle, by clients at several nodes at once; see [`crate::revival`].
//!
//! Every write's outcome is recorded: acknowledged, refused (never reached the node), or
//! unknown (timed out, broke, or failed on the node).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use hyper::Method;

use crate::api::{Answer, ApiError, NodeApi};
use crate::lock;
use crate::trace::Trace;

/// The workload's shape.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Upfront mode: documents shared by all clients (`sim/0` … `sim/{docs-1}`).
    pub docs: usize,
    /// Clients per node.
    pub clients_per_node: usize,
    /// Upfront mode: pause between a client's operations, a random duration in this range, in
    /// ms.
    pub pause_ms: (u64, u64),
    /// Racing mode: how long the clients write into one document before all move to a fresh
    /// one (whose containers they then create at the same moment).
    pub round: Duration,
    /// Racing mode: pause between a client's operations after a round's opening burst, in ms.
    /// Shorter than upfront: the more writes land while creations replicate, the more races.
    pub race_pause_ms: (u64, u64),
    /// Revival mode: cycles per document (at least 2): each but the last ends by expiry or
    /// delete, and each after the first revives the document.
    pub revival_cycles: usize,
    /// Revival mode: pause between a client's writes in a cycle's write window, in ms.
    pub revival_pause_ms: (u64, u64),
    /// Upfront mode: clients per node that write through a local replica and sync it
    /// ([`crate::replica_client`]), beside the HTTP clients.
    pub replicas_per_node: usize,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            docs: 4,
            clients_per_node: 1,
            pause_ms: (20, 200),
            round: Duration::from_secs(1),
            race_pause_ms: (30, 150),
            revival_cycles: 4,
            revival_pause_ms: (50, 200),
            replicas_per_node: 1,
        }
    }
}

/// How the documents and their containers come to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// One client creates every document with its counter, list and text on every node before
    /// the clients start: no container is ever created concurrently.
    Upfront,
    /// Nothing is created in advance: clients at every node create the documents and their
    /// containers concurrently, round after round, and delete and re-create containers.
    Racing,
    /// Nothing is created in advance either: documents are written with a short TTL, expire
    /// or are deleted, and are revived by writes at several nodes at once, cycle after cycle
    /// ([`crate::revival`]).
    Revival,
}

impl Creation {
    /// The id of document `i` in this mode.
    pub fn doc_id(self, i: usize) -> String {
        match self {
            Creation::Upfront => doc_id(i),
            Creation::Racing => race_doc_id(i),
            Creation::Revival => crate::revival::doc_id(i),
        }
    }

    /// How many documents a workload of `duration` writes: the shared ones, or one per round.
    pub fn docs(self, config: &WorkloadConfig, duration: Duration) -> usize {
        match self {
            Creation::Upfront => config.docs,
            Creation::Racing => rounds(config.round, duration),
            Creation::Revival => crate::revival::docs(duration),
        }
    }

    /// Whether the clients create the documents and their containers (as opposed to a setup
    /// that creates them first).
    pub fn creates_containers(self) -> bool {
        self != Creation::Upfront
    }
}

/// The id of shared document `i` (upfront mode).
pub fn doc_id(i: usize) -> String {
    format!("sim/{i}")
}

/// The id of round `round`'s document (racing mode).
pub fn race_doc_id(round: usize) -> String {
    format!("race/{round}")
}

/// Rounds in a racing workload of `duration`: the last one may be cut short.
fn rounds(round: Duration, duration: Duration) -> usize {
    let round = round.as_millis().max(1);
    duration.as_millis().div_ceil(round) as usize
}

/// How a write ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node answered 2xx: the write must be visible everywhere in the end.
    Acked,
    /// The request never reached the node, or the node refused it before applying it (4xx,
    /// 503 queue full): the write must not be visible.
    Refused,
    /// No answer, a broken connection or a server error: the write may or may not be visible.
    Unknown,
}

impl Outcome {
    fn of(result: &Result<Answer, ApiError>) -> Self {
        match result {
            Ok(a) if a.status.is_success() => Self::Acked,
            Ok(a) if a.status.is_client_error() || a.status.as_u16() == 503 => Self::Refused,
            Ok(_) => Self::Unknown,
            Err(e) if e.not_sent() => Self::Refused,
            Err(_) => Self::Unknown,
        }
    }
}

/// One recorded write.
#[derive(Debug, Clone)]
pub struct Write {
    /// The client.
    pub client: usize,
    /// The document index.
    pub doc: usize,
    /// Revival mode: the document's cycle the write belongs to (0 in the other modes).
    pub cycle: usize,
    /// What it did.
    pub op: WriteOp,
    /// How it ended.
    pub outcome: Outcome,
    /// When the answer came (or the request gave up), simulated time since the start.
    pub at: Duration,
}

/// The shared counter's key.
pub const COUNTER: &str = "n";
/// The shared list's key.
pub const LOG: &str = "log";
/// The shared text's key.
pub const TEXT: &str = "t";
/// Racing mode: the map of per-node maps of entries (`["by", "n<node>", "c<client>.<seq>"]`).
pub const ENTRIES: &str = "by";

/// A write the checker can verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Set the client's own key to a value (unique per write).
    Set(String),
    /// Delete the client's own key.
    Del,
    /// Add to the shared counter.
    Inc(i64),
    /// Push a unique item to the shared list.
    Push(String),
    /// Insert a unique token at the start of the shared text.
    Splice(String),
    /// Racing mode: set `["by", node, key]` to `value`; the key is unique per write, so the
    /// write creates the entry (and, when missing, the maps above it).
    Entry {
        /// The node's map (`n<node>`).
        node: String,
        /// The entry's key (`c<client>.<seq>`).
        key: String,
        /// Its value, unique per write.
        value: String,
    },
    /// Racing mode: delete the container at this path (and all written into it).
    Remove(Vec<String>),
    /// Revival mode: delete the whole document (`DELETE`, not a `PATCH`).
    DeleteDoc,
}

impl WriteOp {
    /// The ops of the `PATCH` that performs this write for `client`.
    pub fn ops(&self, client: usize) -> serde_json::Value {
        let own = format!("c{client}");
        match self {
            WriteOp::Set(value) => json!([{"op": "set", "path": [own], "value": value}]),
            WriteOp::Del => json!([{"op": "del", "path": [own]}]),
            WriteOp::Inc(by) => json!([{"op": "inc", "path": [COUNTER], "by": by}]),
            WriteOp::Push(item) => json!([{"op": "push", "path": [LOG], "value": item}]),
            WriteOp::Splice(token) => {
                json!([{"op": "splice", "path": [TEXT], "index": 0, "text": token}])
            }
            WriteOp::Entry { node, key, value } => {
                json!([{"op": "set", "path": [ENTRIES, node, key], "value": value}])
            }
            WriteOp::Remove(path) => json!([{"op": "del", "path": path}]),
            WriteOp::DeleteDoc => serde_json::Value::Null,
        }
    }
}

/// Revival mode: one read of a document at a node, kept for the checks during the run.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The node read.
    pub node: usize,
    /// The document index.
    pub doc: usize,
    /// The cycle it was read in.
    pub cycle: usize,
    /// When the read was sent, simulated time since the start.
    pub at: Duration,
    /// The status, `None` when no answer came.
    pub status: Option<u16>,
    /// The document's JSON when the status was 200.
    pub doc_json: serde_json::Value,
}

/// Everything the clients did, in order.
#[derive(Debug, Default)]
pub struct History {
    /// Writes in the order they finished.
    pub writes: Vec<Write>,
    /// Reads answered.
    pub reads: u64,
    /// Whether the setup finished (the clients wait for it).
    pub ready: bool,
    /// Revival mode: the reads made during the cycles.
    pub probes: Vec<Probe>,
    /// Revival mode with faults: when the last cycles opened, once every node held the same
    /// history of every document (see [`crate::revival::settle`]).
    pub final_at: Option<Duration>,
    /// Revival mode with faults: why the nodes did not come to hold the same histories.
    pub unsettled: Option<String>,
    /// Every acknowledged write's node and answered heads, for the feed's checker.
    pub acked_at: Vec<crate::feed::AckedAt>,
}

/// The history shared by all clients of a run.
pub type SharedHistory = Arc<Mutex<History>>;

/// Creates the shared documents through `node`, then waits until every one of `nodes` holds
/// each. A create is sent again only when the node does not hold the document: a timed-out
/// `?replicas` write is durable where it was made, and sending it twice would push `init`
/// twice.
pub async fn setup(
    node: NodeApi,
    nodes: Vec<NodeApi>,
    docs: usize,
    history: SharedHistory,
    trace: Trace,
) {
    // The API waits for at most 16 replicas; the loop below waits for the rest.
    let replicas = nodes
        .len()
        .saturating_sub(1)
        .min(verge_node::http::REPLICAS_MAX);
    for i in 0..docs {
        let id = doc_id(i);
        let ops = json!([
            {"op": "inc", "path": ["n"], "by": 0},
            {"op": "push", "path": ["log"], "value": "init"},
            {"op": "splice", "path": ["t"], "index": 0, "text": ""},
        ]);
        loop {
            match node.get(&id).await {
                Ok(a) if a.status.is_success() => break,
                Ok(a) if a.status.as_u16() == 404 => {
                    let result = node.patch_replicated(&id, ops.clone(), replicas).await;
                    if matches!(&result, Ok(a) if a.status.is_success()) {
                        break;
                    }
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for other in &nodes {
            while !matches!(other.get(&id).await, Ok(a) if a.status.is_success()) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        trace.event(format!("setup {id} created on every node"));
    }
    lock(&history).ready = true;
}

/// Racing mode's setup: creates nothing, only waits until every node answers its API, so that
/// round 0 opens with every node able to take part in the race.
pub async fn await_nodes(nodes: Vec<NodeApi>, history: SharedHistory, trace: Trace) {
    for node in &nodes {
        while !matches!(node.list("race/", 1).await, Ok(a) if a.status.is_success()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    trace.event("setup every node answers; nothing created");
    lock(&history).ready = true;
}

/// A client's own random choices: from the run's seed and its number only.
pub(crate) fn client_rng(seed: u64, client: usize) -> StdRng {
    StdRng::seed_from_u64(seed ^ (client as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

pub(crate) async fn wait_ready(history: &SharedHistory) {
    while !lock(history).ready {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client's node and the run's records: performs operations and records each outcome.
pub(crate) struct Session {
    pub(crate) client: usize,
    pub(crate) node: NodeApi,
    pub(crate) history: SharedHistory,
    pub(crate) trace: Trace,
    /// Writes sent so far, naming each write's idempotency key.
    pub(crate) sent: std::sync::atomic::AtomicU64,
}

/// Tries of a write whose outcome is unknown (no answer, a broken connection, a server error):
/// it is sent again with the same `Idempotency-Key`, at the same node, and must then take
/// effect once.
pub const WRITE_TRIES: u32 = 3;
/// Pause before sending a write again.
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// Share of acknowledged writes whose answer the client drops, as if the connection broke after
/// the node answered: it sends the write again with the same key, which must not apply twice.
const LOST_ANSWER_PERCENT: u64 = 5;

impl Session {
    /// Sends `op` to document `id` (index `doc`) and records how it ended.
    async fn write(&self, doc: usize, id: &str, op: WriteOp) {
        self.write_in(doc, None, id, op, None).await;
    }

    /// Sends `op` to document `id` (index `doc`), in revival mode as part of `cycle` and with
    /// `?ttl=` when `ttl_s` is given, and records how it ended and when. Returns the outcome.
    pub(crate) async fn write_in(
        &self,
        doc: usize,
        cycle: Option<usize>,
        id: &str,
        op: WriteOp,
        ttl_s: Option<u64>,
    ) -> Outcome {
        let n = self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("c{}.{id}.{n}", self.client);
        let (method, path, body) = match (&op, ttl_s) {
            (WriteOp::DeleteDoc, _) => (Method::DELETE, format!("/v1/docs/{id}"), None),
            (_, Some(ttl)) => (
                Method::PATCH,
                format!("/v1/docs/{id}?ttl={ttl}"),
                Some(json!({ "ops": op.ops(self.client) })),
            ),
            (_, None) => (
                Method::PATCH,
                format!("/v1/docs/{id}"),
                Some(json!({ "ops": op.ops(self.client) })),
            ),
        };
        let mut result = self
            .node
            .write_keyed(method.clone(), &path, body.clone(), &key)
            .await;
        let mut outcome = Outcome::of(&result);
        // Drawn from the key alone, so that a seed replays the same losses.
        let lost = splitmix(
            key.bytes()
                .fold(self.client as u64, |h, b| splitmix(h ^ u64::from(b))),
        ) % 100
            < LOST_ANSWER_PERCENT;
        if outcome == Outcome::Acked && lost {
            self.trace.event(format!(
                "c{} {op:?} {id}: answer dropped, sent again with its key",
                self.client
            ));
            outcome = Outcome::Unknown;
        }
        let mut tries = 1;
        while outcome == Outcome::Unknown && tries < WRITE_TRIES {
            tokio::time::sleep(RETRY_PAUSE).await;
            tries += 1;
            let retry = self
                .node
                .write_keyed(method.clone(), &path, body.clone(), &key)
                .await;
            let said = match &retry {
                Ok(a) => a.status.as_u16().to_string(),
                Err(e) => e.to_string(),
            };
            self.trace.event(format!(
                "c{} retry {tries} of {op:?} {id} -> {said}",
                self.client
            ));
            // Only an acknowledgement settles it: a refusal now (the node down, the key in
            // flight) says nothing of the first try.
            if Outcome::of(&retry) == Outcome::Acked {
                result = retry;
                outcome = Outcome::Acked;
            }
        }
        let at = match cycle {
            Some(c) => format!("{id}#{c}"),
            None => id.to_owned(),
        };
        let ttl = ttl_s.map(|t| format!(" ttl={t}")).unwrap_or_default();
        self.trace.event(format!(
            "c{} {op:?} {at}{ttl} -> {outcome:?} ({})",
            self.client,
            match &result {
                Ok(a) => a.status.as_u16().to_string(),
                Err(e) => e.to_string(),
            }
        ));
        let mut history = lock(&self.history);
        if let (Outcome::Acked, Ok(answer)) = (outcome, &result)
            && let Some(heads) = answer.json()["heads"].as_array()
        {
            let mut heads: Vec<String> = heads
                .iter()
                .filter_map(|h| h.as_str().map(str::to_owned))
                .collect();
            heads.sort();
            history.acked_at.push(crate::feed::AckedAt {
                node: self.node.ip(),
                id: id.to_owned(),
                heads,
            });
        }
        history.writes.push(Write {
            client: self.client,
            doc,
            cycle: cycle.unwrap_or(0),
            op,
            outcome,
            at: crate::now(),
        });
        outcome
    }

    /// Revival mode: reads document `id` (index `doc`) at node `node` during `cycle`, and keeps
    /// what it answered for the checker.
    pub(crate) async fn probe(&self, node: usize, doc: usize, cycle: usize, id: &str) {
        let at = crate::now();
        let result = self.node.get(id).await;
        self.count_read(&result);
        let (status, doc_json) = match &result {
            Ok(a) => (
                Some(a.status.as_u16()),
                if a.status.is_success() {
                    a.json()
                        .get("doc")
                        .cloned()
                        .unwrap_or(serde_json::Value::Null)
                } else {
                    serde_json::Value::Null
                },
            ),
            Err(_) => (None, serde_json::Value::Null),
        };
        self.trace.event(format!(
            "c{} get {id}#{cycle} -> {}",
            self.client,
            status_text(result)
        ));
        lock(&self.history).probes.push(Probe {
            node,
            doc,
            cycle,
            at,
            status,
            doc_json,
        });
    }

    /// Reads document `id`.
    async fn read(&self, id: &str) {
        let result = self.node.get(id).await;
        self.count_read(&result);
        self.trace.event(format!(
            "c{} get {id} -> {}",
            self.client,
            status_text(result)
        ));
    }

    /// Lists the documents under `prefix`.
    async fn list(&self, prefix: &str) {
        let result = self.node.list(prefix, 100).await;
        self.count_read(&result);
        self.trace
            .event(format!("c{} list -> {}", self.client, status_text(result)));
    }

    fn count_read(&self, result: &Result<Answer, ApiError>) {
        if matches!(result, Ok(a) if a.status.is_success()) {
            lock(&self.history).reads += 1;
        }
    }
}

fn status_text(result: Result<Answer, ApiError>) -> String {
    result
        .map(|a| a.status.as_u16().to_string())
        .unwrap_or_else(|e| e.to_string())
}

/// Runs client `client` against `node` until the simulated time `until` (since the start of
/// the simulation), on the documents [`setup`] created.
pub async fn client(
    client: usize,
    node: NodeApi,
    config: WorkloadConfig,
    seed: u64,
    until: Duration,
    history: SharedHistory,
    trace: Trace,
) {
    let mut rng = client_rng(seed, client);
    wait_ready(&history).await;
    let session = Session {
        client,
        node,
        history,
        trace,
        sent: Default::default(),
    };
    let mut seq = 0u64;
    while crate::now() < until {
        let pause = rng.random_range(config.pause_ms.0..=config.pause_ms.1);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        seq += 1;
        let doc = rng.random_range(0..config.docs);
        let id = doc_id(doc);
        let unique = format!("c{client}.{seq}");
        let op = match rng.random_range(0..100) {
            0..30 => WriteOp::Set(unique),
            30..40 => WriteOp::Del,
            40..65 => WriteOp::Inc(rng.random_range(1..=5)),
            65..80 => WriteOp::Push(unique),
            80..90 => WriteOp::Splice(format!("<{unique}>")),
            90..95 => {
                session.list("sim/").await;
                continue;
            }
            _ => {
                session.read(&id).await;
                continue;
            }
        };
        session.write(doc, &id, op).await;
    }
}

/// One racing client: who it is, where it writes, and when.
#[derive(Debug, Clone)]
pub struct RaceClient {
    /// The client's number, unique in the run.
    pub client: usize,
    /// The node it writes to.
    pub node: usize,
    /// Nodes in the cluster (every node's entry map may be the deletable container).
    pub nodes: usize,
    /// Clients in the run (any of them may be a round's deleter).
    pub clients: usize,
    /// The run's seed.
    pub seed: u64,
    /// When round 0 opens (simulated time since the start of the simulation).
    pub start: Duration,
    /// When the workload ends.
    pub until: Duration,
}

/// Percent of a round's random writes that delete its deletable container. Low, so that most
/// writes land in a container that lives; on top of the deleter's delete at mid-round.
const REMOVE_PERCENT: u32 = 3;

/// Within how long after the mid-round delete every client writes into the deleted container
/// (each at its own random moment): the delete reaches the nodes within a few ms (2 ms links),
/// so some of these writes reach a node that has not seen it (they land in the deleted
/// generation and are lost with it) while others create the next generation, several nodes
/// at once.
const RECREATE_WITHIN_MS: u64 = 8;

/// What every client knows of a round in advance: drawn from the seed and the round alone, so
/// that all agree without talking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundPlan {
    /// The one container that may be deleted in this round: the list, the text, the counter,
    /// the map of entry maps or one node's entry map; none in a fifth of the rounds. One per
    /// round keeps the checker strict about the others (writes under a deleted container may
    /// be lost, see `check`).
    pub deletable: Option<Vec<String>>,
    /// The client that deletes it at the middle of the round.
    pub deleter: usize,
}

/// The plan of round `round` of a run with `seed`, `nodes` nodes and `clients` clients.
pub fn round_plan(seed: u64, round: usize, nodes: usize, clients: usize) -> RoundPlan {
    let mut rng = StdRng::seed_from_u64(splitmix(seed ^ splitmix(round as u64)));
    let deleter = rng.random_range(0..clients.max(1));
    let key = |k: &str| vec![k.to_owned()];
    let deletable = match rng.random_range(0..5) {
        0 => None,
        1 => Some(key(LOG)),
        2 => Some(key(TEXT)),
        3 => Some(key(COUNTER)),
        _ if rng.random_bool(0.5) => Some(key(ENTRIES)),
        _ => {
            let node = format!("n{}", rng.random_range(0..nodes.max(1)));
            Some(vec![ENTRIES.to_owned(), node])
        }
    };
    RoundPlan { deletable, deleter }
}

/// SplitMix64's finaliser: spreads nearby inputs (consecutive rounds) over the whole range, as
/// nearby seeds given to `StdRng::seed_from_u64` turned out not to be.
pub(crate) fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs a racing client: round after round, writes into that round's fresh document, starting
/// with a burst that creates every container at the same moment as every other client does.
pub async fn race_client(
    spec: RaceClient,
    config: WorkloadConfig,
    history: SharedHistory,
    trace: Trace,
) {
    wait_ready(&history).await;
    let mut racer = Racer {
        rng: client_rng(spec.seed, spec.client),
        session: Session {
            client: spec.client,
            node: NodeApi::of(&crate::cluster::host_name(spec.node)),
            history,
            trace,
            sent: Default::default(),
        },
        seq: 0,
        spec,
        config,
    };
    let rounds = rounds(
        racer.config.round,
        racer.spec.until.saturating_sub(racer.spec.start),
    );
    for round in 0..rounds {
        racer.round(round).await;
    }
}

pub(crate) async fn sleep_until(at: Duration) {
    let now = crate::now();
    if at > now {
        tokio::time::sleep(at - now).await;
    }
}

/// A racing client's state across rounds.
struct Racer {
    spec: RaceClient,
    config: WorkloadConfig,
    session: Session,
    rng: StdRng,
    /// The number of the client's last unique token.
    seq: u64,
}

impl Racer {
    /// One round: the opening burst, random writes, the deletable container deleted and
    /// written into again by everyone at mid-round, random writes to the end.
    async fn round(&mut self, round: usize) {
        let opens = self.spec.start + self.config.round * round as u32;
        let closes = (opens + self.config.round).min(self.spec.until);
        let middle = opens + self.config.round / 2;
        let plan = round_plan(self.spec.seed, round, self.spec.nodes, self.spec.clients);
        let id = race_doc_id(round);
        // Every client opens the round within 2 ms of the others: each node creates the
        // round's containers before it can have heard of anyone else's.
        sleep_until(opens + self.jitter()).await;
        if crate::now() >= closes {
            return; // A request that hung (an unknown outcome) overran the whole round.
        }
        for op in self.opening_burst() {
            self.session.write(round, &id, op).await;
        }
        self.wander(round, &id, middle, plan.deletable.as_ref())
            .await;
        if let Some(path) = &plan.deletable
            && crate::now() < middle
        {
            self.recreate(round, &id, path, middle, plan.deleter).await;
        }
        self.wander(round, &id, closes, plan.deletable.as_ref())
            .await;
    }

    /// Random writes and reads, with pauses, until `until`.
    async fn wander(
        &mut self,
        round: usize,
        id: &str,
        until: Duration,
        deletable: Option<&Vec<String>>,
    ) {
        loop {
            let (low, high) = self.config.race_pause_ms;
            let pause = Duration::from_millis(self.rng.random_range(low..=high));
            if crate::now() + pause >= until {
                return;
            }
            tokio::time::sleep(pause).await;
            match self.random_op(deletable) {
                Some(op) => self.session.write(round, id, op).await,
                None => self.session.read(id).await,
            }
        }
    }

    /// The deleter deletes `path` at `middle`; then every client writes into it within
    /// [`RECREATE_WITHIN_MS`], re-creating it at the nodes that have seen the delete.
    async fn recreate(
        &mut self,
        round: usize,
        id: &str,
        path: &[String],
        middle: Duration,
        deleter: usize,
    ) {
        if self.spec.client == deleter {
            sleep_until(middle).await;
            self.session
                .write(round, id, WriteOp::Remove(path.to_vec()))
                .await;
        }
        let after = self.rng.random_range(0..=RECREATE_WITHIN_MS);
        sleep_until(middle + Duration::from_millis(after)).await;
        let op = self.write_into(path);
        self.session.write(round, id, op).await;
    }

    /// 0-2 ms: how far apart the clients' simultaneous writes are.
    fn jitter(&mut self) -> Duration {
        Duration::from_millis(self.rng.random_range(0..=2))
    }

    /// The unique token of the client's next write.
    fn next_unique(&mut self) -> String {
        self.seq += 1;
        format!("c{}.{}", self.spec.client, self.seq)
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
            value: format!("v{}.{}", self.spec.client, self.seq),
            key,
        }
    }

    /// A round's first writes, one per container, in a random order and without pauses:
    /// every client at every node sends them at the same moment, so each container is created
    /// by every node concurrently.
    fn opening_burst(&mut self) -> Vec<WriteOp> {
        let mut burst = vec![self.push(), self.inc(), self.entry(), self.splice()];
        for i in (1..burst.len()).rev() {
            burst.swap(i, self.rng.random_range(0..=i));
        }
        burst
    }

    /// A write into `path`, one of the deletable containers: for one node's entry map, the
    /// writer's own entry map (the same one at that node, a sibling elsewhere, both in `by`).
    fn write_into(&mut self, path: &[String]) -> WriteOp {
        match path.first().map(String::as_str) {
            Some(LOG) => self.push(),
            Some(TEXT) => self.splice(),
            Some(COUNTER) => self.inc(),
            _ => self.entry(),
        }
    }

    /// A write after the opening burst, or `None` for a read.
    fn random_op(&mut self, deletable: Option<&Vec<String>>) -> Option<WriteOp> {
        match self.rng.random_range(0..100) {
            0..REMOVE_PERCENT => deletable.map(|path| WriteOp::Remove(path.clone())),
            REMOVE_PERCENT..28 => Some(self.push()),
            28..48 => Some(self.inc()),
            48..73 => Some(self.entry()),
            73..92 => Some(self.splice()),
            _ => None,
        }
    }
}

/// A key's value: `None` when absent.
pub type KeyValue = Option<String>;

/// What a client's own key may hold at the end.
#[derive(Debug, Default, Clone)]
pub struct KeyExpectation {
    /// The value the last acknowledged write left (`None`: no write was acknowledged, the key
    /// is absent unless an unknown write set it).
    pub acked: Option<KeyValue>,
    /// Values that writes with an unknown outcome after it may have left instead.
    pub unknown: Vec<KeyValue>,
}

/// Per document, what the writes of a history allow the final state to be.
#[derive(Debug, Default, Clone)]
pub struct Expectations {
    /// Per client key.
    pub keys: BTreeMap<String, KeyExpectation>,
    /// Sum of acknowledged increments.
    pub counter_acked: i64,
    /// Sum of increments with an unknown outcome.
    pub counter_unknown: i64,
    /// List items that must be present.
    pub items_acked: Vec<String>,
    /// List items that may be present.
    pub items_unknown: Vec<String>,
    /// Text tokens that must be present.
    pub tokens_acked: Vec<String>,
    /// Text tokens that may be present.
    pub tokens_unknown: Vec<String>,
    /// Racing mode: entries (`(node map, key)` to value) that must be present.
    pub entries_acked: BTreeMap<(String, String), String>,
    /// Racing mode: entries that may be present.
    pub entries_unknown: BTreeMap<(String, String), String>,
    /// Racing mode: containers a write that was not refused deleted.
    pub removed: Vec<Vec<String>>,
}

impl Expectations {
    /// Whether writes at `path` may have been lost to a delete of a container above them (or
    /// of `path` itself), so that their being acknowledged does not oblige them to be visible.
    ///
    /// The exemption covers the whole document, before the first delete as after it: a delete
    /// removes everything written into the container so far, and a write made after it in
    /// simulated time may still land in the deleted generation at a replica the delete has not
    /// reached yet. Telling those apart needs the causal order between nodes, which the clients
    /// do not see. A delete with an unknown outcome may have happened, so it counts; a refused
    /// one did not. Exempt writes are still held to the rest: nothing twice, nothing that no
    /// client wrote, no counter above its increments.
    pub fn may_be_lost(&self, path: &[&str]) -> bool {
        self.removed.iter().any(|removed| {
            removed.len() <= path.len() && removed.iter().zip(path).all(|(a, b)| a == b)
        })
    }
}

/// What the history allows, per document index.
pub fn expectations(history: &History, docs: usize) -> Vec<Expectations> {
    let mut out = vec![Expectations::default(); docs];
    for w in &history.writes {
        if let Some(e) = out.get_mut(w.doc) {
            e.add(w, w.outcome);
        }
    }
    out
}

impl Expectations {
    /// Takes write `w` into account as if it had ended with `outcome` (the checker may count
    /// an acknowledged write as unknown when it need not be visible yet).
    pub fn add(&mut self, w: &Write, outcome: Outcome) {
        match (&w.op, outcome) {
            (_, Outcome::Refused) => {}
            (WriteOp::Set(_) | WriteOp::Del, outcome) => {
                let value = match &w.op {
                    WriteOp::Set(v) => Some(v.clone()),
                    _ => None,
                };
                let entry = self.keys.entry(format!("c{}", w.client)).or_default();
                if outcome == Outcome::Acked {
                    // A client's writes are sequential: an acknowledged one supersedes all
                    // before it.
                    *entry = KeyExpectation {
                        acked: Some(value),
                        unknown: Vec::new(),
                    };
                } else {
                    entry.unknown.push(value);
                }
            }
            (WriteOp::Inc(by), Outcome::Acked) => self.counter_acked += by,
            (WriteOp::Inc(by), Outcome::Unknown) => self.counter_unknown += by,
            (WriteOp::Push(item), Outcome::Acked) => self.items_acked.push(item.clone()),
            (WriteOp::Push(item), Outcome::Unknown) => self.items_unknown.push(item.clone()),
            (WriteOp::Splice(t), Outcome::Acked) => self.tokens_acked.push(t.clone()),
            (WriteOp::Splice(t), Outcome::Unknown) => self.tokens_unknown.push(t.clone()),
            (WriteOp::Entry { node, key, value }, outcome) => {
                let entries = if outcome == Outcome::Acked {
                    &mut self.entries_acked
                } else {
                    &mut self.entries_unknown
                };
                entries.insert((node.clone(), key.clone()), value.clone());
            }
            (WriteOp::Remove(path), _) => self.removed.push(path.clone()),
            // A whole document's delete ends a revival cycle: the revival checker handles it.
            (WriteOp::DeleteDoc, _) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every container is deletable in some rounds, and one run's rounds differ from each
    /// other (nearby seeds once gave a run the same plan round after round).
    #[test]
    fn round_plans_spread_over_every_container() {
        let mut seen = BTreeSet::new();
        for seed in 0..20 {
            let plans: BTreeSet<Option<Vec<String>>> = (0..10)
                .map(|round| round_plan(seed, round, 3, 3).deletable)
                .collect();
            assert!(plans.len() >= 3, "seed {seed}: {plans:?}");
            seen.extend(plans.into_iter().map(|p| p.map(|p| p.join("/"))));
        }
        for family in [
            None,
            Some("log"),
            Some("t"),
            Some("n"),
            Some("by"),
            Some("by/n1"),
        ] {
            assert!(
                seen.contains(&family.map(str::to_owned)),
                "{family:?} never deletable"
            );
        }
    }
}
