//! Writes after expiry, deletes and purges, across real `verge` processes whose purges run at
//! different times (see "Incarnations: deletes, expiry and purge" in docs/architecture.md).
//!
//! The loss these tests pin down: a node that purged an expired (or deleted) document started
//! the id over with a fresh history; a node that had not purged yet merged a new write into the
//! old history, which still carried the past expiry (or the delete), anti-entropy pushed that
//! history back and the next purge deleted the acknowledged write.
//!
//! Node A purges every second, node B practically never. To make the interleavings exact, a
//! node is paused (SIGSTOP) while the other acts: B does not take A's purge before the write,
//! and writes at A and at B can be made without either seeing the other's. Every wait polls
//! with a deadline: the TTL passing is seen as `404`, the purge in A's
//! `verge_purged_docs_total`, and "the write stays" means it is still served, unchanged, at
//! every poll until A completed three more purge passes (`verge_purge_rounds_total`) and the
//! pair ran two more anti-entropy sessions.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::sync::{Message, State as SyncState, SyncDoc};
use automerge::{AutoCommit, ROOT, ReadDoc};
use serde_json::{Value, json};

use common::cluster::{Cluster, REPLICATION_DEADLINE};
use common::{Node, pause, resume, wait_for};

/// The TTL of the document that expires, in seconds. The writes and their replication must
/// finish within it, and the other nodes be paused, before the purging node can purge (every
/// second) and hand its stub over by anti-entropy: seconds, on a loaded machine.
const TTL_S: u64 = 8;
/// How long the purging node keeps tombstones in the delete tests: as long, for the same reason.
const TOMBSTONE_RETENTION_S: u64 = 8;
/// How long the expiry may take to show as `404` everywhere: the TTL plus slack for a loaded
/// machine.
const EXPIRY_DEADLINE: Duration = Duration::from_secs(TTL_S + 10);
/// How long the purging node may take to purge what expired (it purges every second, a
/// tombstone once it is older than [`TOMBSTONE_RETENTION_S`]).
const PURGE_DEADLINE: Duration = Duration::from_secs(TOMBSTONE_RETENTION_S + 10);
/// How long three purge passes and two anti-entropy sessions may take (about 3 s unloaded).
const STAY_DEADLINE: Duration = Duration::from_secs(20);
/// Purge passes the purging node must complete after the write converged. A pass already
/// running when the count is read may have scanned before the write; the two after it did not.
const STAY_PURGE_ROUNDS: f64 = 3.0;
/// Anti-entropy sessions (summed over the nodes) that must complete after the write converged;
/// the second one started after it.
const STAY_SESSIONS: f64 = 2.0;

const PURGED: &str = "verge_purged_docs_total";
const PURGE_ROUNDS: &str = "verge_purge_rounds_total";
const SESSIONS_OK: &str = "verge_anti_entropy_sessions_total{outcome=\"ok\"}";

/// Node A: purges every second; `tombstone_retention_s`, when given, as configured.
fn purging_config(tombstone_retention_s: Option<u64>) -> String {
    let mut text = String::from(
        "[replication]\nanti_entropy_interval_s = 1\n\n[storage]\npurge_interval_s = 1\n",
    );
    if let Some(s) = tombstone_retention_s {
        text.push_str(&format!("tombstone_retention_s = {s}\n"));
    }
    text
}

/// Node B: purges once at start and then not for an hour.
const LATE_CONFIG: &str =
    "[replication]\nanti_entropy_interval_s = 1\n\n[storage]\npurge_interval_s = 3600\n";

/// Nodes A (`{prefix}-1`, purging every second) and B (`{prefix}-2`, not purging), seeding each
/// other, connected.
fn two_nodes(prefix: &str, tombstone_retention_s: Option<u64>) -> Cluster {
    let a = purging_config(tombstone_retention_s);
    let c = Cluster::start_each_configured(prefix, |i| vec![1 - i], &[&a, LATE_CONFIG]);
    c.wait_connected();
    c
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A document as one node serves it: JSON, sorted heads and expiry; `None` on `404`.
#[derive(Debug, Clone, PartialEq)]
struct Served {
    doc: Value,
    heads: Vec<String>,
    expires_at_ms: Option<i64>,
}

fn served(node: &Node, id: &str) -> Option<Served> {
    let r = node.get_doc(id);
    match r.status {
        404 => None,
        200 => {
            let body = r.json();
            let heads = common::heads_of(&body, &format!("GET {id} at {}", node.node_id));
            Some(Served {
                doc: body["doc"].clone(),
                heads,
                expires_at_ms: body["expires_at_ms"].as_i64(),
            })
        }
        _ => panic!("GET {id} at {}: {}", node.node_id, r.describe()),
    }
}

/// `method target` with a JSON body; asserts `200` and returns the sorted heads.
fn write(node: &Node, method: &str, target: &str, body: &Value) -> Vec<String> {
    let r = node.req(method, target, body.to_string().as_bytes());
    let context = format!("{method} {target} at {}", node.node_id);
    common::heads_of(&r.ok_json(&context), &context)
}

/// What `node` holds of `id`, expired, deleted or not, pulled as a plain Automerge peer through
/// `POST /v1/sync/{id}` (which, unlike `GET`, does not hide expired documents).
fn held(node: &Node, id: &str) -> AutoCommit {
    const ROUNDS_MAX: usize = 10;
    let mut peer = AutoCommit::new();
    let mut state = SyncState::new();
    for round in 0..ROUNDS_MAX {
        let Some(msg) = peer.sync().generate_sync_message(&mut state) else {
            return peer;
        };
        let r = node.req("POST", &format!("/v1/sync/{id}"), &msg.encode());
        assert_eq!(
            r.status,
            200,
            "sync round {round} of {id}: {}",
            r.describe()
        );
        let reply = Message::decode(&r.body).expect("the node's sync reply decodes");
        peer.sync()
            .receive_sync_message(&mut state, reply)
            .expect("the peer takes the node's sync reply");
    }
    panic!(
        "the sync of {id} from {} took over {ROUNDS_MAX} rounds",
        node.node_id
    );
}

/// The incarnation marker of a held copy (0 when absent).
fn incarnation(doc: &AutoCommit) -> i64 {
    match doc.get(ROOT, "_verge_incarnation").unwrap() {
        Some((automerge::Value::Scalar(s), _)) => match s.as_ref() {
            automerge::ScalarValue::Int(i) => *i,
            automerge::ScalarValue::Uint(u) => *u as i64,
            other => panic!("_verge_incarnation is {other:?}"),
        },
        _ => 0,
    }
}

/// Waits until `node` holds the write with `heads` (expired or not). A newer incarnation
/// arriving first (the purging node's stub, when this node was slow to take the write) also
/// ends the wait: the test then covers a replica that purged rather than one holding the old
/// history, and says so.
fn wait_held(node: &Node, id: &str, heads: &[String]) {
    wait_for(
        REPLICATION_DEADLINE,
        &format!("{} to hold {id} at {heads:?}", node.node_id),
        || {
            let mut doc = held(node, id);
            let mut got: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
            got.sort();
            if got == heads {
                Ok(())
            } else if incarnation(&doc) > 0 {
                eprintln!(
                    "note: {} took a newer incarnation of {id} first",
                    node.node_id
                );
                Ok(())
            } else {
                Err(format!("holds {got:?}"))
            }
        },
    );
}

/// Waits until every node reads each of `ids` as `404`.
fn wait_absent(nodes: &[Node], ids: &[String], deadline: Duration, what: &str) -> Duration {
    let start = Instant::now();
    for node in nodes {
        for id in ids {
            wait_for(
                deadline.saturating_sub(start.elapsed()),
                &format!("{id} to read 404 at {} ({what})", node.node_id),
                || match served(node, id) {
                    None => Ok(()),
                    Some(s) => Err(format!("{s:?}")),
                },
            );
        }
    }
    start.elapsed()
}

/// Waits until `node`'s purge counter reaches `count`.
fn wait_purged(node: &Node, count: f64) -> Duration {
    wait_for(
        PURGE_DEADLINE,
        &format!("{} to purge {count} documents", node.node_id),
        || match node.metric(PURGED) {
            n if n >= count => Ok(()),
            n => Err(format!("{PURGED} = {n}")),
        },
    )
    .1
}

/// Writes each of `ids` with `?ttl=TTL_S` at the first node and waits until every node holds
/// it, then until it reads as `404` and the first node purged it. Returns the time to expiry.
///
/// With `pause_others`, every other node is paused before the expiry and stays paused: it holds
/// the expired history and cannot have taken the purge.
fn expire_and_purge(nodes: &[Node], ids: &[String], pause_others: bool) -> Duration {
    let purger = &nodes[0];
    let purged_before = purger.metric(PURGED);
    let start = Instant::now();
    for id in ids {
        let old = json!({ "old": true, "v": format!("old {id}") });
        let heads = write(purger, "PUT", &format!("/v1/docs/{id}?ttl={TTL_S}"), &old);
        for node in nodes {
            wait_held(node, id, &heads);
        }
    }
    let running = if pause_others {
        nodes[1..].iter().for_each(pause);
        &nodes[..1]
    } else {
        nodes
    };
    wait_absent(running, ids, EXPIRY_DEADLINE, "expired");
    let expired = start.elapsed();
    wait_purged(purger, purged_before + ids.len() as f64);
    expired
}

/// Asserts that `node` reads each of `ids` as `404` and holds an incarnation-0 history of it
/// (the expired or deleted one, not a purged stub).
fn assert_holds_old(node: &Node, ids: &[String]) {
    for id in ids {
        assert_eq!(served(node, id), None, "{id} at {}", node.node_id);
        let mut doc = held(node, id);
        let heads = doc.get_heads();
        assert!(
            heads.len() == 1 && incarnation(&doc) == 0,
            "{} should hold the old history of {id}, holds incarnation {} at {heads:?}",
            node.node_id,
            incarnation(&doc),
        );
    }
}

/// Where the write after the purge goes.
#[derive(Debug, Clone, Copy)]
enum At {
    /// Node A, which purged.
    Purger,
    /// Node B, which did not.
    Other,
    /// Both, neither seeing the other's write, each setting its own key.
    Both,
}

/// The query of a write, `?ttl=3600` when `ttl`.
fn ttl_query(ttl: bool) -> &'static str {
    if ttl { "?ttl=3600" } else { "" }
}

/// `PUT`s a new body to `id` at `node`; returns the body.
fn put_new(node: &Node, id: &str, ttl: bool) -> Value {
    let body = json!({ "v": format!("new {id}"), "n": 2 });
    write(
        node,
        "PUT",
        &format!("/v1/docs/{id}{}", ttl_query(ttl)),
        &body,
    );
    body
}

/// The key a [`patch_own_key`] at `node` sets.
fn own_key(node: &Node) -> String {
    format!("by {}", node.node_id)
}

/// `PATCH`es `id` at `node`, setting the node's own key.
fn patch_own_key(node: &Node, id: &str, ttl: bool) {
    let ops = json!({ "ops": [
        { "op": "set", "path": [own_key(node)], "value": format!("new {id}") }
    ] });
    write(
        node,
        "PATCH",
        &format!("/v1/docs/{id}{}", ttl_query(ttl)),
        &ops,
    );
}

/// Checks that `node` serves `id` as `expected` (and with an expiry about an hour ahead when
/// `ttl`); the error says what it serves instead.
fn check_served(node: &Node, id: &str, expected: &Value, ttl: bool) -> Result<Served, String> {
    let got = served(node, id);
    match &got {
        Some(s) if &s.doc == expected => {
            let hour_ahead = s.expires_at_ms.is_some_and(|at| at > now_ms() + 3_000_000);
            if ttl == hour_ahead {
                return Ok(s.clone());
            }
        }
        _ => {}
    }
    Err(format!("{} serves {id} as {got:?}", node.node_id))
}

/// Waits until every node serves each of `expected` (id, document, whether revived with a TTL)
/// at the same heads; fails after `deadline`. Returns how long that took, and for each document
/// how long each node took to serve it (its `404` window, or stale content, before that).
fn wait_served(
    nodes: &[Node],
    expected: &[(String, Value, bool)],
    deadline: Duration,
) -> (Duration, Vec<Vec<Duration>>) {
    let start = Instant::now();
    let mut first_ok = vec![vec![None; nodes.len()]; expected.len()];
    let ((), took) = wait_for(
        deadline,
        "every node to serve the write after the purge",
        || {
            let mut errors = Vec::new();
            for (i, node) in nodes.iter().enumerate() {
                for (j, (id, doc, ttl)) in expected.iter().enumerate() {
                    match check_served(node, id, doc, *ttl) {
                        Ok(_) => {
                            first_ok[j][i].get_or_insert(start.elapsed());
                        }
                        Err(e) => errors.push(e),
                    }
                }
            }
            if !errors.is_empty() {
                return Err(errors.join("; "));
            }
            for (id, _, _) in expected {
                let heads: Vec<_> = nodes.iter().map(|n| served(n, id).unwrap().heads).collect();
                if heads.iter().any(|h| h != &heads[0]) {
                    return Err(format!("{id} at different heads: {heads:?}"));
                }
            }
            Ok(())
        },
    );
    let per_doc = first_ok
        .into_iter()
        .map(|t| t.into_iter().map(Option::unwrap).collect())
        .collect();
    (took, per_doc)
}

/// The sum of `series` over `nodes`.
fn total(nodes: &[Node], series: &str) -> f64 {
    nodes.iter().map(|n| n.metric(series)).sum()
}

/// Asserts that every node keeps serving `expected`, at every poll, until `purger` completed
/// [`STAY_PURGE_ROUNDS`] more purge passes and, when `sessions`, the nodes ran
/// [`STAY_SESSIONS`] more anti-entropy sessions; and that nothing more was purged.
fn assert_stays(nodes: &[Node], purger: &Node, expected: &[(String, Value, bool)], sessions: bool) {
    let purged = total(nodes, PURGED);
    let rounds = purger.metric(PURGE_ROUNDS);
    let synced = total(nodes, SESSIONS_OK);
    let start = Instant::now();
    wait_for(
        STAY_DEADLINE,
        "purge passes and anti-entropy sessions after the write",
        || {
            for node in nodes {
                for (id, doc, ttl) in expected {
                    if let Err(e) = check_served(node, id, doc, *ttl) {
                        panic!(
                            "{:?} after the write converged (purge passes at {}: {} -> {}): {e}",
                            start.elapsed(),
                            purger.node_id,
                            rounds,
                            purger.metric(PURGE_ROUNDS)
                        );
                    }
                }
            }
            let r = purger.metric(PURGE_ROUNDS);
            let s = total(nodes, SESSIONS_OK);
            if r >= rounds + STAY_PURGE_ROUNDS && (!sessions || s >= synced + STAY_SESSIONS) {
                Ok(())
            } else {
                Err(format!(
                    "purge passes {rounds} -> {r}; sessions {synced} -> {s}"
                ))
            }
        },
    );
    assert_eq!(
        total(nodes, PURGED),
        purged,
        "a node purged again after the write"
    );
}

/// One trial of the measurement: two documents written at A with `?ttl=3` expire, and A
/// purges them while B is paused, holding the expired history. Then A is paused and B resumed
/// (B reads `404`), and each document is written at `at`, one plainly and one with
/// `?ttl=3600`; both nodes run again. Both must serve each write exactly within the replication
/// deadline, and still after A's next purges and the next anti-entropy sessions.
fn revival_after_purge(prefix: &str, at: At) {
    let start = Instant::now();
    let c = two_nodes(prefix, None);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let ids = [format!("{prefix}/plain"), format!("{prefix}/ttl")];
    let ttls = [false, true];
    let expired = expire_and_purge(&c.nodes, &ids, true);
    pause(a);
    resume(b);
    assert_holds_old(b, &ids);
    let docs: Vec<Value> = match at {
        At::Purger => {
            pause(b);
            resume(a);
            let docs = ids
                .iter()
                .zip(ttls)
                .map(|(id, t)| put_new(a, id, t))
                .collect();
            resume(b);
            docs
        }
        At::Other => {
            let docs = ids
                .iter()
                .zip(ttls)
                .map(|(id, t)| put_new(b, id, t))
                .collect();
            resume(a);
            docs
        }
        At::Both => {
            for (id, t) in ids.iter().zip(ttls) {
                patch_own_key(b, id, t);
            }
            pause(b);
            resume(a);
            for (id, t) in ids.iter().zip(ttls) {
                patch_own_key(a, id, t);
            }
            resume(b);
            ids.iter()
                .map(|id| json!({ own_key(a): format!("new {id}"), own_key(b): format!("new {id}") }))
                .collect()
        }
    };
    let expected: Vec<(String, Value, bool)> = ids
        .iter()
        .zip(docs)
        .zip(ttls)
        .map(|((id, doc), t)| (id.clone(), doc, t))
        .collect();
    let (converged, per_node) = wait_served(&c.nodes, &expected, REPLICATION_DEADLINE);
    assert_stays(&c.nodes, a, &expected, true);
    assert_eq!(b.metric(PURGED), 0.0, "B is not to purge");
    eprintln!(
        "{prefix}: expired after {expired:?}, served everywhere {converged:?} after the write \
         (per document, per node: {per_node:?}), {:?} in all",
        start.elapsed()
    );
}

#[test]
fn write_at_the_purging_node_after_expiry_is_served_by_both_and_stays() {
    revival_after_purge("exp-a", At::Purger);
}

#[test]
fn write_at_the_node_that_did_not_purge_after_expiry_is_served_by_both_and_stays() {
    revival_after_purge("exp-b", At::Other);
}

#[test]
fn concurrent_writes_at_both_nodes_after_expiry_and_purge_merge_and_stay() {
    revival_after_purge("exp-ab", At::Both);
}

/// Three nodes on the default configuration (anti-entropy every 30 s), but the first purges
/// every second: a document expires and the first node purges it, then node `writer` writes
/// it. Every node must serve the write within the replication deadline (a `404`, or the old
/// content, for longer fails), and it stays.
fn three_default_nodes_one_purging(prefix: &str, writer: usize) {
    let start = Instant::now();
    let purging = "[storage]\npurge_interval_s = 1\n";
    let c = Cluster::start_each_configured(
        prefix,
        |i| (0..3).filter(|j| *j != i).collect(),
        &[purging, "", ""],
    );
    c.wait_connected();
    let a = &c.nodes[0];
    let id = format!("{prefix}/doc");
    let expired = expire_and_purge(&c.nodes, std::slice::from_ref(&id), false);
    let expected = vec![(id.clone(), put_new(&c.nodes[writer], &id, false), false)];
    let (converged, per_node) = wait_served(&c.nodes, &expected, REPLICATION_DEADLINE);
    assert_stays(&c.nodes, a, &expected, false);
    eprintln!(
        "{prefix}: expired after {expired:?}, served everywhere {converged:?} after the write \
         (per node: {:?}), {:?} in all",
        per_node[0],
        start.elapsed()
    );
}

#[test]
fn three_default_nodes_serve_a_write_at_a_node_that_did_not_purge_without_a_404_window() {
    three_default_nodes_one_purging("tri-other", 1);
}

/// The purge is not broadcast: the write into the purged node's stub goes out with the stub's
/// root, so nodes still holding the expired history take the new incarnation at once instead of
/// reading `404` until anti-entropy (26.5 s was measured before the root went along).
#[test]
fn three_default_nodes_serve_a_write_at_the_purging_node_without_a_404_window() {
    three_default_nodes_one_purging("tri-purger", 0);
}

/// The same with a delete instead of an expiry. A keeps tombstones for
/// [`TOMBSTONE_RETENTION_S`] (long enough for B to take the deletes and be paused before A can
/// purge), so its next purge after that replaces the tombstone by the stub. While A is paused, B (holding
/// the tombstone) writes one document; while B is paused, A (holding the stub) writes the
/// other. Both are served by both nodes and stay.
#[test]
fn write_after_a_purged_tombstone_is_served_by_both_and_stays() {
    let start = Instant::now();
    let prefix = "tomb";
    let c = two_nodes(prefix, Some(TOMBSTONE_RETENTION_S));
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let ids = [format!("{prefix}/at-b"), format!("{prefix}/at-a")];
    for id in &ids {
        let heads = write(a, "PUT", &format!("/v1/docs/{id}"), &json!({ "old": true }));
        wait_held(b, id, &heads);
        let r = a.delete_doc(id);
        let deleted = common::heads_of(&r.ok_json(&format!("DELETE {id}")), id);
        wait_held(b, id, &deleted);
    }
    pause(b);
    wait_absent(&c.nodes[..1], &ids, REPLICATION_DEADLINE, "deleted");
    wait_purged(a, ids.len() as f64);
    pause(a);
    resume(b);
    assert_holds_old(b, &ids);
    let at_b = put_new(b, &ids[0], false);
    pause(b);
    resume(a);
    let at_a = put_new(a, &ids[1], false);
    resume(b);
    let expected = vec![(ids[0].clone(), at_b, false), (ids[1].clone(), at_a, false)];
    let (converged, per_node) = wait_served(&c.nodes, &expected, REPLICATION_DEADLINE);
    assert_stays(&c.nodes, a, &expected, true);
    assert_eq!(b.metric(PURGED), 0.0, "B is not to purge");
    eprintln!(
        "{prefix}: served everywhere {converged:?} after the writes (per document, per node: \
         {per_node:?}), {:?} in all",
        start.elapsed()
    );
}
