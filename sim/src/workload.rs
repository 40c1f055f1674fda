//! The workload: clients at every node editing a shared set of documents, recording what was
//! acknowledged.
//!
//! Each document starts with a counter `n`, a list `log` and a text `t`, created once before
//! the clients start (containers created concurrently on two replicas would be two different
//! objects, one of which loses: see docs/client.md). Then every client, bound to one node,
//! repeatedly picks a document and an operation: set or delete its own key (`c<i>`), increment
//! the shared counter, push a unique item to the list, insert a unique token at the start of
//! the text, or read. Every write's outcome is recorded: acknowledged, refused (never reached
//! the node), or unknown (timed out, broke, or failed on the node).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::api::{Answer, ApiError, NodeApi};
use crate::lock;
use crate::trace::Trace;

/// The workload's shape.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Documents shared by all clients (`sim/0` … `sim/{docs-1}`).
    pub docs: usize,
    /// Clients per node.
    pub clients_per_node: usize,
    /// Pause between a client's operations: a random duration in this range, in ms.
    pub pause_ms: (u64, u64),
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            docs: 4,
            clients_per_node: 1,
            pause_ms: (20, 200),
        }
    }
}

/// The id of shared document `i`.
pub fn doc_id(i: usize) -> String {
    format!("sim/{i}")
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
    /// What it did.
    pub op: WriteOp,
    /// How it ended.
    pub outcome: Outcome,
}

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
}

/// Everything the clients did, in order.
#[derive(Debug, Default)]
pub struct History {
    /// Writes in the order they finished.
    pub writes: Vec<Write>,
    /// Reads answered.
    pub reads: u64,
    /// Whether the documents were created (the clients wait for it).
    pub ready: bool,
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

/// Runs client `client` against `node` until the simulated time `until` (since the start of
/// the simulation).
pub async fn client(
    client: usize,
    node: NodeApi,
    config: WorkloadConfig,
    seed: u64,
    until: Duration,
    history: SharedHistory,
    trace: Trace,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (client as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    while !lock(&history).ready {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seq = 0u64;
    while crate::now() < until {
        let pause = rng.random_range(config.pause_ms.0..=config.pause_ms.1);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        seq += 1;
        let doc = rng.random_range(0..config.docs);
        let id = doc_id(doc);
        let key = format!("c{client}");
        let unique = format!("c{client}.{seq}");
        let (op, ops) = match rng.random_range(0..100) {
            0..30 => (
                WriteOp::Set(unique.clone()),
                json!([{"op": "set", "path": [key], "value": unique}]),
            ),
            30..40 => (WriteOp::Del, json!([{"op": "del", "path": [key]}])),
            40..65 => {
                let by = rng.random_range(1..=5);
                (
                    WriteOp::Inc(by),
                    json!([{"op": "inc", "path": ["n"], "by": by}]),
                )
            }
            65..80 => (
                WriteOp::Push(unique.clone()),
                json!([{"op": "push", "path": ["log"], "value": unique}]),
            ),
            80..90 => {
                let token = format!("<{unique}>");
                (
                    WriteOp::Splice(token.clone()),
                    json!([{"op": "splice", "path": ["t"], "index": 0, "text": token}]),
                )
            }
            90..95 => {
                let result = node.list("sim/", 100).await;
                if matches!(&result, Ok(a) if a.status.is_success()) {
                    lock(&history).reads += 1;
                }
                trace.event(format!(
                    "c{client} list -> {}",
                    result
                        .map(|a| a.status.as_u16().to_string())
                        .unwrap_or_else(|e| e.to_string())
                ));
                continue;
            }
            _ => {
                let result = node.get(&id).await;
                if matches!(&result, Ok(a) if a.status.is_success()) {
                    lock(&history).reads += 1;
                }
                trace.event(format!(
                    "c{client} get {id} -> {}",
                    result
                        .map(|a| a.status.as_u16().to_string())
                        .unwrap_or_else(|e| e.to_string())
                ));
                continue;
            }
        };
        let result = node.patch(&id, ops).await;
        let outcome = Outcome::of(&result);
        trace.event(format!(
            "c{client} {op:?} {id} -> {outcome:?} ({})",
            match &result {
                Ok(a) => a.status.as_u16().to_string(),
                Err(e) => e.to_string(),
            }
        ));
        lock(&history).writes.push(Write {
            client,
            doc,
            op,
            outcome,
        });
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
}

/// What the history allows, per document index.
pub fn expectations(history: &History, docs: usize) -> Vec<Expectations> {
    let mut out = vec![Expectations::default(); docs];
    for w in &history.writes {
        let Some(e) = out.get_mut(w.doc) else {
            continue;
        };
        match (&w.op, w.outcome) {
            (_, Outcome::Refused) => {}
            (WriteOp::Set(_) | WriteOp::Del, outcome) => {
                let value = match &w.op {
                    WriteOp::Set(v) => Some(v.clone()),
                    _ => None,
                };
                let entry = e.keys.entry(format!("c{}", w.client)).or_default();
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
            (WriteOp::Inc(by), Outcome::Acked) => e.counter_acked += by,
            (WriteOp::Inc(by), Outcome::Unknown) => e.counter_unknown += by,
            (WriteOp::Push(item), Outcome::Acked) => e.items_acked.push(item.clone()),
            (WriteOp::Push(item), Outcome::Unknown) => e.items_unknown.push(item.clone()),
            (WriteOp::Splice(t), Outcome::Acked) => e.tokens_acked.push(t.clone()),
            (WriteOp::Splice(t), Outcome::Unknown) => e.tokens_unknown.push(t.clone()),
        }
    }
    out
}
