//! Replication between real `verge` processes on loopback, over QUIC with mutual TLS.
//!
//! Every test starts its own cluster: certificates from `verge certs`, one temporary data
//! directory per node, fixed gossip ports (free UDP ports picked up front, so a node restarts on
//! the same address) and ephemeral API ports. Nothing waits on a bare sleep: every check polls
//! the API with a deadline and fails with what it saw last.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use automerge::sync::{Message, State as SyncState, SyncDoc};
use automerge::{AutoCommit, ROOT, ReadDoc, ScalarValue, Value as AmValue};
use serde_json::{Value, json};

use common::cluster::{
    Cluster, MEMBERSHIP_DEADLINE, REPLICATION_DEADLINE, Spec, gossip_addr, members, members_up,
    node_args, read_doc,
};
use common::{Node, free_tcp_port, free_udp_port, make_certs, wait_for};

/// The series counting refused handshakes.
const REFUSED_HANDSHAKE: &str = "verge_peer_refused_total{kind=\"handshake\"}";

/// Waits until `node` holds `id` at exactly `heads`; returns the document.
fn wait_doc_heads(node: &Node, id: &str, heads: &[String]) -> Value {
    wait_for(
        REPLICATION_DEADLINE,
        &format!("{id} at {} with heads {heads:?}", node.node_id),
        || match read_doc(node, id) {
            Some((doc, h)) if h == heads => Ok(doc),
            other => Err(format!("{other:?}")),
        },
    )
    .0
}

/// Sorted heads of a write's `200` answer.
fn write_heads(r: &common::Resp, context: &str) -> Vec<String> {
    common::heads_of(&r.ok_json(context), context)
}

/// id → heads of every live document, from `GET /v1/docs` (all pages).
fn listing(node: &Node) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let target = match &cursor {
            Some(c) => format!("/v1/docs?limit=1000&cursor={c}"),
            None => "/v1/docs?limit=1000".to_string(),
        };
        let page = node.get(&target).ok_json("GET /v1/docs");
        for d in page["docs"].as_array().unwrap() {
            let id = d["id"].as_str().unwrap().to_string();
            let heads = common::assert_heads(&d["heads"], &id);
            out.insert(id, heads);
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// Waits until `node` lists exactly `expected`.
fn wait_listing(node: &Node, expected: &BTreeMap<String, Vec<String>>) -> Duration {
    wait_for(
        REPLICATION_DEADLINE,
        &format!("{} to list the {} documents", node.node_id, expected.len()),
        || {
            let got = listing(node);
            if &got == expected {
                Ok(())
            } else {
                let missing = expected.keys().filter(|k| !got.contains_key(*k)).count();
                let differ: Vec<String> = expected
                    .iter()
                    .filter(|(k, h)| got.get(*k).is_some_and(|g| g != *h))
                    .map(|(k, h)| format!("{k}: expected {h:?}, got {:?}", got[k]))
                    .collect();
                let extra: Vec<&String> =
                    got.keys().filter(|k| !expected.contains_key(*k)).take(5).collect();
                Err(format!(
                    "{} listed; {missing} missing, {} at other heads {differ:?}, unexpected: {extra:?}",
                    got.len(),
                    differ.len()
                ))
            }
        },
    )
    .1
}

// ---------------------------------------------------------------------------------------------
// Three nodes
// ---------------------------------------------------------------------------------------------

/// Everyone seeds everyone in the three-node tests.
fn all_others(n: usize) -> impl Fn(usize) -> Vec<usize> {
    move |i| (0..n).filter(|j| *j != i).collect()
}

#[test]
fn three_nodes_write_anywhere_read_everywhere_and_converge() {
    let c = Cluster::start("tri", 3, 0, all_others(3));
    c.wait_connected();
    let n = &c.nodes;

    // A write at any node is readable, at the same heads, at every other.
    let mut slowest = Duration::ZERO;
    for (i, writer) in n.iter().enumerate() {
        let id = format!("anywhere/from-{i}");
        let value = json!({ "from": writer.node_id, "i": i, "nested": { "list": [1, 2, i] } });
        let start = Instant::now();
        let heads = write_heads(&writer.put_doc(&id, &value), &format!("PUT {id}"));
        for reader in n.iter().filter(|r| r.node_id != writer.node_id) {
            let doc = wait_doc_heads(reader, &id, &heads);
            assert_eq!(doc, value, "{id} read at {}", reader.node_id);
        }
        slowest = slowest.max(start.elapsed());
    }
    // Patches and deletes replicate too.
    let heads = write_heads(
        &n[1].patch_doc(
            "anywhere/from-0",
            json!([{ "op": "set", "path": ["patched_by"], "value": "tri-2" }]),
        ),
        "PATCH anywhere/from-0 at tri-2",
    );
    for r in [&n[0], &n[2]] {
        let doc = wait_doc_heads(r, "anywhere/from-0", &heads);
        assert_eq!(doc["patched_by"], "tri-2");
    }
    assert_eq!(n[2].delete_doc("anywhere/from-1").status, 200);
    for r in [&n[0], &n[1]] {
        wait_for(
            REPLICATION_DEADLINE,
            &format!("the delete of anywhere/from-1 at {}", r.node_id),
            || match r.get_doc("anywhere/from-1").status {
                404 => Ok(()),
                s => Err(format!("status {s}")),
            },
        );
    }

    // Concurrent writes to one document at all three nodes: different keys, one counter
    // (created once, then incremented everywhere) and text splices.
    let id = "shared/concurrent";
    let created = write_heads(
        &n[0].patch_doc(
            id,
            json!([
                { "op": "inc", "path": ["n"], "by": 1 },
                { "op": "splice", "path": ["t"], "index": 0, "text": "base" }
            ]),
        ),
        "create the shared document",
    );
    for r in &n[1..] {
        wait_doc_heads(r, id, &created);
    }
    const ROUNDS: usize = 8;
    let barrier = Barrier::new(n.len());
    thread::scope(|s| {
        for (i, node) in n.iter().enumerate() {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for r in 0..ROUNDS {
                    let key = format!("k{i}-{r}");
                    let ops = match r % 3 {
                        // One op per change, and all three kinds in one change.
                        0 => json!([{ "op": "set", "path": [key], "value": r }]),
                        1 => json!([
                            { "op": "set", "path": [key], "value": r },
                            { "op": "inc", "path": ["n"], "by": i + 1 },
                            { "op": "splice", "path": ["t"], "index": 0, "text": format!("<{i}.{r}>") }
                        ]),
                        _ => json!([{ "op": "set", "path": [key], "value": r }]),
                    };
                    let w = node.patch_doc(id, ops);
                    assert_eq!(w.status, 200, "PATCH at {}: {}", node.node_id, w.describe());
                    if r % 3 != 1 {
                        let w = node.patch_doc(id, json!([{ "op": "inc", "path": ["n"], "by": i + 1 }]));
                        assert_eq!(w.status, 200, "inc at {}: {}", node.node_id, w.describe());
                        let w = node.patch_doc(
                            id,
                            json!([{ "op": "splice", "path": ["t"], "index": 0, "text": format!("<{i}.{r}>") }]),
                        );
                        assert_eq!(w.status, 200, "splice at {}: {}", node.node_id, w.describe());
                    }
                }
            });
        }
    });
    let (converged, took) = wait_for(
        REPLICATION_DEADLINE,
        "the three replicas of shared/concurrent to reach the same heads and JSON",
        || {
            let states: Vec<_> = n.iter().map(|r| read_doc(r, id)).collect();
            let first = states[0].clone().ok_or("absent at tri-1")?;
            if states.iter().all(|s| s.as_ref() == Some(&first)) {
                Ok(first)
            } else {
                Err(format!("{states:?}"))
            }
        },
    );
    let (doc, heads) = converged;
    // Counter: the initial 1 plus every node's increments.
    let expected_n = 1 + (0..n.len()).map(|i| (i + 1) * ROUNDS).sum::<usize>();
    assert_eq!(doc["n"], json!(expected_n), "counter in {doc}");
    for i in 0..n.len() {
        for r in 0..ROUNDS {
            assert_eq!(doc[format!("k{i}-{r}")], json!(r), "key k{i}-{r} in {doc}");
        }
    }
    let t = doc["t"]
        .as_str()
        .unwrap_or_else(|| panic!("t is not text: {doc}"));
    assert!(
        t.ends_with("base"),
        "concurrent inserts at 0 keep 'base' last: {t:?}"
    );
    let mut expected_len = "base".len();
    for i in 0..n.len() {
        // Each node's fragments stay whole, and a node's later insert at 0 precedes its earlier.
        let mut last_pos = usize::MAX;
        for r in 0..ROUNDS {
            let frag = format!("<{i}.{r}>");
            expected_len += frag.len();
            assert_eq!(t.matches(&frag).count(), 1, "{frag} once in {t:?}");
            let pos = t.find(&frag).unwrap();
            assert!(
                pos < last_pos,
                "{frag} before <{i}.{}> in {t:?}",
                r.wrapping_sub(1)
            );
            last_pos = pos;
        }
    }
    assert_eq!(t.len(), expected_len, "text {t:?}");
    eprintln!(
        "three nodes: slowest write-to-visible-everywhere {slowest:?}; concurrent writes converged {took:?} after the last answer; {} heads",
        heads.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrent implicit creation
// ---------------------------------------------------------------------------------------------

/// Anti-entropy every second. A broadcast that arrives before a change it depends on waits in
/// memory until a sync completes it; with the 30 s default, convergence would hang on that.
const FAST_ANTI_ENTROPY: &str = "[replication]\nanti_entropy_interval_s = 1\n";
/// Each measurement runs on this many fresh documents: the original loss was intermittent.
const CREATION_ROUNDS: usize = 3;

/// Three connected nodes named `{prefix}-1..=3`, each seeding the others, with fast
/// anti-entropy.
fn three_fast_nodes(prefix: &str) -> Cluster {
    let c = Cluster::start_configured(prefix, 3, 0, all_others(3), Some(FAST_ANTI_ENTROPY));
    c.wait_connected();
    c
}

/// Sends `per_node` PATCHes of `id` to every node at once, each from its own thread, all
/// released by one barrier; the `k`th PATCH at node `i` carries `ops(i, k)`. Asserts that every
/// answer is 200.
fn patch_all_at_once(
    nodes: &[Node],
    id: &str,
    per_node: usize,
    ops: impl Fn(usize, usize) -> Value,
) {
    let barrier = Barrier::new(nodes.len() * per_node);
    let failed: Vec<String> = thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            for k in 0..per_node {
                let body = ops(i, k);
                let barrier = &barrier;
                handles.push(s.spawn(move || {
                    barrier.wait();
                    let r = node.patch_doc(id, body);
                    (r.status != 200)
                        .then(|| format!("PATCH #{k} at {}: {}", node.node_id, r.describe()))
                }));
            }
        }
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("a PATCH thread panicked"))
            .collect()
    });
    assert!(
        failed.is_empty(),
        "{} of {} concurrent PATCHes of {id} failed: {failed:#?}",
        failed.len(),
        nodes.len() * per_node
    );
}

/// Waits until every node holds `id` at the same heads with the same JSON; returns the JSON and
/// how long that took. Called once every write was acknowledged, each by the node that holds it,
/// so equal heads mean every node holds every write.
fn wait_converged(nodes: &[Node], id: &str) -> (Value, Duration) {
    let ((doc, _heads), took) = wait_for(
        REPLICATION_DEADLINE,
        &format!("every replica of {id} to hold the same heads and JSON"),
        || {
            let states: Vec<_> = nodes.iter().map(|n| read_doc(n, id)).collect();
            match &states[0] {
                Some(first) if states.iter().all(|s| s.as_ref() == Some(first)) => {
                    Ok(first.clone())
                }
                _ => Err(format!("{states:?}")),
            }
        },
    );
    (doc, took)
}

/// Waits until every node reads `id` as absent.
fn wait_absent(nodes: &[Node], id: &str) {
    for node in nodes {
        wait_for(
            REPLICATION_DEADLINE,
            &format!("{id} to read 404 at {}", node.node_id),
            || match node.get_doc(id).status {
                404 => Ok(()),
                s => Err(format!("status {s}")),
            },
        );
    }
}

/// Asserts that a plain Automerge peer, pulling `id` from `node` through `POST /v1/sync/{id}`,
/// sees one counter at root key `key`, at `expected`. (Verge's own JSON sums counters that
/// replicas of older versions left conflicting; a plain peer shows only one of them.)
fn assert_peer_sees_one_counter(node: &Node, id: &str, key: &str, expected: i64) {
    let peer = plain_peer_copy(node, id);
    let counters: Vec<i64> = peer
        .get_all(ROOT, key)
        .expect("read the peer's copy")
        .into_iter()
        .map(|(value, _)| match value {
            AmValue::Scalar(s) => match s.as_ref() {
                ScalarValue::Counter(c) => i64::from(c),
                other => panic!("{key} is not a counter in the peer's copy: {other:?}"),
            },
            other => panic!("{key} is not a counter in the peer's copy: {other:?}"),
        })
        .collect();
    assert_eq!(
        counters,
        [expected],
        "the counters at {key} of {id} in a plain Automerge peer's copy from {}",
        node.node_id
    );
}

/// A plain Automerge peer's copy of `id`, pulled from `node` through `POST /v1/sync/{id}`.
fn plain_peer_copy(node: &Node, id: &str) -> AutoCommit {
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
        "the sync of {id} from {} took more than {ROUNDS_MAX} rounds",
        node.node_id
    );
}

/// What node `i` writes in its `k`th PATCH of `round`: unique, and whole in a text.
fn token(round: usize, i: usize, k: usize) -> String {
    format!("<{round}.{i}.{k}>")
}

/// Every token of `round` at `nodes` nodes sending `per_node` PATCHes each, sorted.
fn tokens(round: usize, nodes: usize, per_node: usize) -> Vec<String> {
    let mut all: Vec<String> = (0..nodes)
        .flat_map(|i| (0..per_node).map(move |k| token(round, i, k)))
        .collect();
    all.sort();
    all
}

/// The keys of a JSON object, sorted.
fn keys(doc: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = doc
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {doc}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// The items of a JSON list of strings, sorted.
fn sorted_items(list: &Value) -> Vec<String> {
    let mut items: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v}"))
                .to_string()
        })
        .collect();
    items.sort();
    items
}

/// The `<…>` tokens of a text, sorted (anything else in it shows up as a token of its own).
fn text_tokens(text: &Value) -> Vec<String> {
    let t = text
        .as_str()
        .unwrap_or_else(|| panic!("not a text: {text}"));
    let mut tokens: Vec<String> = t.split_inclusive('>').map(str::to_string).collect();
    tokens.sort();
    tokens
}

/// Measurement (a): push onto a missing list, increment a missing counter, set a key under two
/// missing maps and splice into a missing text, all in one PATCH.
fn creating_ops(node: &Node, round: usize, i: usize, k: usize) -> Value {
    let tok = token(round, i, k);
    json!([
        { "op": "push", "path": ["log"], "value": tok },
        { "op": "inc", "path": ["n"], "by": 1 },
        { "op": "set", "path": ["by", node.node_id, k.to_string()], "value": tok },
        { "op": "splice", "path": ["t"], "index": 0, "text": tok }
    ])
}

/// Asserts `doc` holds exactly what [`creating_ops`] wrote in `round` at every node: each
/// token once in the list and once in the text, each node's keys under its name, and the
/// counter at the number of PATCHes.
fn assert_created_exactly(doc: &Value, nodes: &[Node], round: usize, per_node: usize) {
    let expected = tokens(round, nodes.len(), per_node);
    assert_eq!(keys(doc), ["by", "log", "n", "t"], "keys of {doc}");
    assert_eq!(
        sorted_items(&doc["log"]),
        expected,
        "every push once in log: {doc}"
    );
    assert_eq!(
        text_tokens(&doc["t"]),
        expected,
        "every splice once in t: {doc}"
    );
    assert_eq!(
        doc["n"],
        json!(nodes.len() * per_node),
        "every inc once in n: {doc}"
    );
    let by: serde_json::Map<String, Value> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let under: serde_json::Map<String, Value> = (0..per_node)
                .map(|k| (k.to_string(), json!(token(round, i, k))))
                .collect();
            (node.node_id.clone(), Value::Object(under))
        })
        .collect();
    assert_eq!(
        doc["by"],
        Value::Object(by),
        "every set once under by: {doc}"
    );
}

/// Measurement (a): three nodes each send 10 PATCHes at once to a document that does not exist
/// yet, every one creating the same list, counter, maps and text. Nothing is lost or doubled.
#[test]
fn concurrent_creation_of_list_counter_maps_and_text_keeps_every_write() {
    const PER_NODE: usize = 10;
    let c = three_fast_nodes("create");
    for round in 0..CREATION_ROUNDS {
        let id = format!("implicit/all-{round}");
        patch_all_at_once(&c.nodes, &id, PER_NODE, |i, k| {
            creating_ops(&c.nodes[i], round, i, k)
        });
        let (doc, took) = wait_converged(&c.nodes, &id);
        assert_created_exactly(&doc, &c.nodes, round, PER_NODE);
        assert_peer_sees_one_counter(&c.nodes[round % 3], &id, "n", 3 * PER_NODE as i64);
        eprintln!("concurrent creation: {id} converged {took:?} after the last answer");
    }
}

/// Measurement (b): three nodes each increment a counter that does not exist yet 20 times at
/// once; it ends at exactly 60 everywhere.
#[test]
fn concurrent_creation_of_a_counter_by_increments_counts_each_once() {
    const PER_NODE: usize = 20;
    let c = three_fast_nodes("count");
    for round in 0..CREATION_ROUNDS {
        let id = format!("implicit/counter-{round}");
        patch_all_at_once(
            &c.nodes,
            &id,
            PER_NODE,
            |_, _| json!([{ "op": "inc", "path": ["n"], "by": 1 }]),
        );
        let (doc, took) = wait_converged(&c.nodes, &id);
        assert_eq!(doc, json!({ "n": 3 * PER_NODE }), "{id}");
        assert_peer_sees_one_counter(&c.nodes[round % 3], &id, "n", 3 * PER_NODE as i64);
        eprintln!("concurrent counter creation: {id} converged {took:?} after the last answer");
    }
}

/// A document written as in measurement (a) is deleted, and all three nodes write to it again
/// at once: they re-create one list and one counter, which hold exactly the new writes. Three
/// rounds, each deleted at another node, so the containers are re-created three times.
#[test]
fn concurrent_creation_after_a_delete_revives_one_list_and_one_counter() {
    const FIRST_PER_NODE: usize = 10;
    const PER_NODE: usize = 5;
    let c = three_fast_nodes("revive");
    let id = "implicit/revived";
    patch_all_at_once(&c.nodes, id, FIRST_PER_NODE, |i, k| {
        creating_ops(&c.nodes[i], 0, i, k)
    });
    let (doc, _) = wait_converged(&c.nodes, id);
    assert_created_exactly(&doc, &c.nodes, 0, FIRST_PER_NODE);

    for round in 1..=CREATION_ROUNDS {
        let deleter = &c.nodes[(round - 1) % c.nodes.len()];
        let r = deleter.delete_doc(id);
        assert_eq!(
            r.status,
            200,
            "DELETE {id} at {}: {}",
            deleter.node_id,
            r.describe()
        );
        wait_absent(&c.nodes, id);
        patch_all_at_once(&c.nodes, id, PER_NODE, |i, k| {
            json!([
                { "op": "push", "path": ["log"], "value": token(round, i, k) },
                { "op": "inc", "path": ["n"], "by": 1 }
            ])
        });
        let (doc, took) = wait_converged(&c.nodes, id);
        assert_eq!(keys(&doc), ["log", "n"], "round {round}: keys of {doc}");
        assert_eq!(
            sorted_items(&doc["log"]),
            tokens(round, c.nodes.len(), PER_NODE),
            "round {round}: exactly the new pushes in log: {doc}"
        );
        assert_eq!(
            doc["n"],
            json!(c.nodes.len() * PER_NODE),
            "round {round}: exactly the new incs in n: {doc}"
        );
        assert_peer_sees_one_counter(&c.nodes[round % 3], id, "n", 3 * PER_NODE as i64);
        eprintln!("revival {round}: {id} converged {took:?} after the last answer");
    }
}

#[test]
fn replicas_2_acknowledges_after_two_peers_persisted_else_times_out() {
    let mut c = Cluster::start("dur", 3, 0, all_others(3));
    c.wait_connected();

    // Right after the 200, both peers already hold the change: no polling here.
    for r in 0..5 {
        let id = format!("durable/{r}");
        let value = json!({ "r": r, "text": "acked by two peers" });
        let w = c.nodes[0].req(
            "PUT",
            &format!("/v1/docs/{id}?replicas=2"),
            value.to_string().as_bytes(),
        );
        let heads = write_heads(&w, &format!("PUT {id}?replicas=2"));
        for peer in &c.nodes[1..] {
            let got = read_doc(peer, &id);
            assert_eq!(
                got,
                Some((value.clone(), heads.clone())),
                "{id} at {} right after the replicas=2 acknowledgement",
                peer.node_id
            );
        }
    }
    let w = c.nodes[1].req(
        "PATCH",
        "/v1/docs/durable/0?replicas=2",
        json!({ "ops": [{ "op": "inc", "path": ["hits"], "by": 5 }] })
            .to_string()
            .as_bytes(),
    );
    let heads = write_heads(&w, "PATCH durable/0?replicas=2 at dur-2");
    for peer in [&c.nodes[0], &c.nodes[2]] {
        let (doc, h) = read_doc(peer, "durable/0").unwrap();
        assert_eq!(
            (doc["hits"].clone(), h),
            (json!(5), heads.clone()),
            "at {}",
            peer.node_id
        );
    }
    let w = c.nodes[2].req("DELETE", "/v1/docs/durable/1?replicas=2", b"");
    assert_eq!(w.status, 200, "DELETE ?replicas=2: {}", w.describe());
    for peer in &c.nodes[..2] {
        assert_eq!(
            peer.get_doc("durable/1").status,
            404,
            "delete at {}",
            peer.node_id
        );
    }

    // One peer down: one acknowledgement is there, two are not.
    c.nodes[2].kill();
    let w = c.nodes[0].req("PUT", "/v1/docs/durable/one-down?replicas=1", br#"{"a":1}"#);
    let heads = write_heads(&w, "PUT ?replicas=1 with one peer down");
    assert_eq!(
        read_doc(&c.nodes[1], "durable/one-down"),
        Some((json!({"a": 1}), heads))
    );
    let start = Instant::now();
    let w = c.nodes[0].req(
        "PUT",
        "/v1/docs/durable/two-asked?replicas=2",
        br#"{"a":2}"#,
    );
    let waited = start.elapsed();
    w.assert_error(
        504,
        "replication_timeout",
        "PUT ?replicas=2 with one of two peers down",
    );
    assert!(
        waited >= Duration::from_millis(4500),
        "504 after {waited:?}, not after ~5 s"
    );
    assert_eq!(
        read_doc(&c.nodes[0], "durable/two-asked").unwrap().0,
        json!({"a": 2})
    );
    // The one live peer still got it.
    wait_for(REPLICATION_DEADLINE, "durable/two-asked at dur-2", || {
        read_doc(&c.nodes[1], "durable/two-asked").ok_or_else(|| "absent".to_string())
    });

    // Two of three nodes down.
    c.nodes[1].kill();
    let w = c.nodes[0].req("PUT", "/v1/docs/durable/alone?replicas=2", br#"{"a":3}"#);
    w.assert_error(
        504,
        "replication_timeout",
        "PUT ?replicas=2 with both peers down",
    );
    let (doc, _) =
        read_doc(&c.nodes[0], "durable/alone").expect("the write is durable on the writer");
    assert_eq!(doc, json!({"a": 3}));
    c.nodes[0].assert_serving("two peers killed");
}

#[test]
fn killed_node_restarts_on_its_data_and_catches_up() {
    let mut c = Cluster::start("crash", 3, 0, all_others(3));
    c.wait_connected();
    let mut kept = Vec::new();
    for i in 0..10 {
        let id = format!("before/{i}");
        let heads = write_heads(&c.nodes[0].put_doc(&id, &json!({ "i": i })), &id);
        kept.push((id, heads));
    }
    for (id, heads) in &kept {
        wait_doc_heads(&c.nodes[2], id, heads);
    }

    c.nodes[2].kill();
    // While it is down: new documents at both survivors, an edit and a delete of documents it
    // holds.
    for i in 0..30 {
        let w = &c.nodes[i % 2];
        let id = format!("while-down/{i}");
        assert_eq!(
            w.put_doc(&id, &json!({ "i": i, "by": w.node_id })).status,
            200
        );
    }
    let edited = write_heads(
        &c.nodes[1].patch_doc(
            "before/3",
            json!([{ "op": "set", "path": ["edited"], "value": true }]),
        ),
        "PATCH before/3",
    );
    assert_eq!(c.nodes[0].delete_doc("before/4").status, 200);
    // What both survivors agree on once they converged.
    let (expected, _) = wait_for(
        REPLICATION_DEADLINE,
        "the two survivors to converge",
        || {
            let (a, b) = (listing(&c.nodes[0]), listing(&c.nodes[1]));
            if a == b && a.len() == 39 && a.get("before/3") == Some(&edited) {
                Ok(a)
            } else {
                Err(format!("{} and {} listed", a.len(), b.len()))
            }
        },
    );

    let restarted = Instant::now();
    c.nodes[2].restart_after_kill();
    let ready = restarted.elapsed();
    let caught_up = wait_listing(&c.nodes[2], &expected);
    assert_eq!(
        read_doc(&c.nodes[2], "before/3").unwrap().0["edited"],
        json!(true)
    );
    assert_eq!(
        c.nodes[2].get_doc("before/4").status,
        404,
        "the delete reached it"
    );
    // It is a full member again: it lists both peers up and its writes reach them.
    c.wait_connected();
    let heads = write_heads(
        &c.nodes[2].put_doc("after/restart", &json!({"back": true})),
        "PUT at the restarted node",
    );
    for peer in &c.nodes[..2] {
        wait_doc_heads(peer, "after/restart", &heads);
    }
    eprintln!("restart: ready after {ready:?}, caught up on 31 changes {caught_up:?} later");
}

#[test]
fn node_with_certificate_from_another_ca_is_refused() {
    let c = Cluster::start("ca1", 2, 0, |i| if i == 0 { vec![] } else { vec![0] });
    c.wait_connected();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let before = write_heads(&a.put_doc("secret/1", &json!({"s": 1})), "PUT secret/1");
    wait_doc_heads(b, "secret/1", &before);
    let refused_before = a.metric(REFUSED_HANDSHAKE);

    // Same node name, another CA; it dials both cluster nodes.
    let foreign_certs = tempfile::Builder::new()
        .prefix("verge-certs-")
        .tempdir()
        .unwrap();
    make_certs(foreign_certs.path(), &["ca1-2"]);
    let foreign_port = free_udp_port();
    let foreign = Node::start_with(
        "intruder",
        node_args(
            foreign_certs.path(),
            &Spec {
                name: "ca1-2".into(),
                gossip_port: foreign_port,
                seeds: c.ports.clone(),
                extra: Vec::new(),
            },
        ),
    );
    let after = write_heads(&a.put_doc("secret/2", &json!({"s": 2})), "PUT secret/2");
    wait_doc_heads(b, "secret/2", &after);
    let foreign_write = foreign.put_doc("foreign/1", &json!({"f": 1}));
    assert_eq!(foreign_write.status, 200, "{}", foreign_write.describe());

    // The cluster node refuses it repeatedly (it keeps retrying), logs it and counts it.
    let (count, _) = wait_for(
        REPLICATION_DEADLINE,
        "ca1-1 to count three refused handshakes from the foreign node",
        || {
            let n = a.metric(REFUSED_HANDSHAKE);
            if n >= refused_before + 3.0 {
                Ok(n)
            } else {
                Err(format!("{REFUSED_HANDSHAKE} = {n}"))
            }
        },
    );
    let log = a.output();
    let line = log
        .lines()
        .find(|l| l.contains("refused a peer connection"))
        .unwrap_or_else(|| panic!("no refusal in ca1-1's log:\n{}", common::tail(&log, 4000)));
    assert!(
        line.contains(&foreign_port.to_string()),
        "the refusal names the foreign peer 127.0.0.1:{foreign_port}: {line}"
    );
    wait_for(REPLICATION_DEADLINE, "ca1-2 to refuse it too", || {
        match b.metric(REFUSED_HANDSHAKE) {
            n if n >= 1.0 => Ok(()),
            n => Err(format!("{REFUSED_HANDSHAKE} = {n}")),
        }
    });

    // Nothing crossed in either direction, and it is no member of the cluster.
    for id in ["secret/1", "secret/2"] {
        assert_eq!(
            foreign.get_doc(id).status,
            404,
            "{id} reached the foreign node"
        );
    }
    let foreign_docs: Vec<String> = listing(&foreign).into_keys().collect();
    assert_eq!(foreign_docs, vec!["foreign/1".to_string()]);
    for node in [a, b] {
        assert_eq!(
            node.get_doc("foreign/1").status,
            404,
            "foreign write at {}",
            node.node_id
        );
        let listed: Vec<Value> = members(node);
        assert!(
            !listed
                .iter()
                .any(|m| m["addr"] == gossip_addr(foreign_port).to_string()),
            "{} lists the foreign node: {listed:?}",
            node.node_id
        );
    }
    assert!(
        members_up(&foreign).is_empty(),
        "the foreign node has no live peer"
    );
    eprintln!("foreign CA: refused {count} handshakes in total");
}

// ---------------------------------------------------------------------------------------------
// Five nodes, and a sixth that joins later
// ---------------------------------------------------------------------------------------------

#[test]
fn five_nodes_through_one_seed_then_a_sixth_joins_and_gets_everything() {
    // Every node knows only the first; membership spreads from it.
    let c = Cluster::start("five", 5, 1, |i| if i == 0 { vec![] } else { vec![0] });
    let joined = c.wait_connected();
    for node in &c.nodes[1..] {
        // Polled: a member may be suspected for a moment on a loaded machine.
        wait_for(
            MEMBERSHIP_DEADLINE,
            &format!("{} to learn the three non-seed peers", node.node_id),
            || {
                let learned = members(node)
                    .into_iter()
                    .filter(|m| m["seed"] == false && m["state"] == "up")
                    .count();
                if learned == 3 {
                    Ok(())
                } else {
                    Err(format!("{learned} learned and up"))
                }
            },
        );
    }

    // A write at each node reaches all five.
    let mut written: Vec<(String, Vec<String>)> = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let id = format!("five/from-{i}");
        let heads = write_heads(&node.put_doc(&id, &json!({ "from": i })), &id);
        written.push((id, heads));
    }
    let start = Instant::now();
    for (id, heads) in &written {
        for node in &c.nodes {
            wait_doc_heads(node, id, heads);
        }
    }
    let spread = start.elapsed();

    // 200 more documents, written at all five nodes at once.
    let bulk: Vec<Vec<(String, Vec<String>)>> = thread::scope(|s| {
        let handles: Vec<_> = c
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                s.spawn(move || {
                    (0..40)
                        .map(|k| {
                            let id = format!("bulk/{i}-{k:02}");
                            let doc = json!({ "node": i, "k": k, "pad": "x".repeat(64) });
                            let heads = write_heads(&node.put_doc(&id, &doc), &format!("PUT {id}"));
                            (id, heads)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let expected: BTreeMap<String, Vec<String>> = written
        .into_iter()
        .chain(bulk.into_iter().flatten())
        .collect();
    assert_eq!(expected.len(), 205);
    for node in &c.nodes {
        wait_listing(node, &expected);
    }

    // A sixth node joins through one seed (not the first) and receives everything.
    let join_start = Instant::now();
    let sixth = c.start_extra("five", 5, &[2]);
    let sixth_addr = gossip_addr(c.ports[5]).to_string();
    let bootstrapped = wait_listing(&sixth, &expected);
    let took = join_start.elapsed();
    // Everyone learns it, and it learns everyone.
    for node in &c.nodes {
        wait_for(
            MEMBERSHIP_DEADLINE,
            &format!("{} to list five-6 up", node.node_id),
            || {
                if members_up(node).contains(&sixth_addr) {
                    Ok(())
                } else {
                    Err(format!("{:?}", members(node)))
                }
            },
        );
    }
    let all: Vec<String> = c
        .ports
        .iter()
        .map(|p| gossip_addr(*p).to_string())
        .collect();
    wait_for(MEMBERSHIP_DEADLINE, "five-6 to list all five up", || {
        let up = members_up(&sixth);
        if all[..5].iter().all(|a| up.contains(a)) {
            Ok(())
        } else {
            Err(format!("{up:?}"))
        }
    });
    // And its own writes reach every other node.
    let heads = write_heads(
        &sixth.put_doc("five/from-5", &json!({"from": 5})),
        "PUT at five-6",
    );
    for node in &c.nodes {
        wait_doc_heads(node, "five/from-5", &heads);
    }
    eprintln!(
        "five nodes: membership complete after {joined:?}; writes at each node visible at all five {spread:?}; \
         five-6 started and held 205 documents after {took:?} ({bootstrapped:?} after it was ready)"
    );
}

// ---------------------------------------------------------------------------------------------
// Relay
// ---------------------------------------------------------------------------------------------

/// Changes messages a node has written to peers.
const CHANGES_SENT: &str = "verge_peer_messages_sent_total{kind=\"changes\"}";
/// Acknowledgements a node has written to peers.
const PERSISTED_SENT: &str = "verge_peer_messages_sent_total{kind=\"persisted\"}";

/// With `full_fanout_max = 1`, four nodes broadcast through the relay: a write at another node
/// costs it one message (to the relay), reaches every node, and nobody acknowledges unless a
/// writer waits for replicas; `?replicas=3` still gets every peer's acknowledgement.
#[test]
fn four_nodes_above_full_fanout_broadcast_through_the_relay() {
    let c = Cluster::start_configured(
        "relay",
        4,
        0,
        all_others(4),
        // A relay that confirms late (a loaded machine) makes the writer fall back to sending
        // to everyone, which the exact message counts below would take for a defect.
        Some("[replication]\nfull_fanout_max = 1\nrelay_delivery_timeout_ms = 10000\n"),
    );
    c.wait_connected();
    let addrs: Vec<SocketAddr> = c.ports.iter().map(|p| gossip_addr(*p)).collect();
    let hub = verge_core::gossip::relay(addrs[0], &addrs[1..]);
    let hub_i = addrs.iter().position(|a| *a == hub).unwrap();
    let writer_i = (hub_i + 1) % addrs.len();
    let (writer, relay) = (&c.nodes[writer_i], &c.nodes[hub_i]);

    // Until SWIM has shown the writer every member alive it may pick another relay (or fall
    // back to all peers): wait until a write costs it exactly one message.
    let mut warm = 0;
    wait_for(
        MEMBERSHIP_DEADLINE,
        "a write at a non-relay node to cost one message",
        || {
            warm += 1;
            let before = writer.metric(CHANGES_SENT);
            let id = format!("relay/warm-{warm}");
            let heads = write_heads(&writer.put_doc(&id, &json!({ "warm": warm })), &id);
            for node in &c.nodes {
                wait_doc_heads(node, &id, &heads);
            }
            match writer.metric(CHANGES_SENT) - before {
                1.0 => Ok(()),
                n => Err(format!("{n} messages")),
            }
        },
    );

    let received = |n: &Node| n.metric("verge_gossip_batches_received_total");
    let sent_before = writer.metric(CHANGES_SENT);
    let relayed_before = relay.metric(CHANGES_SENT);
    let received_before: Vec<f64> = c.nodes.iter().map(received).collect();
    let mut written = Vec::new();
    for i in 0..10 {
        let id = format!("relay/doc-{i}");
        let heads = write_heads(&writer.put_doc(&id, &json!({ "i": i })), &id);
        written.push((id, heads));
    }
    let start = Instant::now();
    for (id, heads) in &written {
        for node in &c.nodes {
            wait_doc_heads(node, id, heads);
        }
    }
    let spread = start.elapsed();
    // Everything the writer sent went to the relay, at most one message per write (writes
    // closer than the batch window share one); the others got only the relay's messages. A
    // sender counts a message once its stream took it, so the counters may trail the reads.
    let (relayed, _) = wait_for(
        REPLICATION_DEADLINE,
        "the writer's messages to reach only the relay",
        || {
            let sent = writer.metric(CHANGES_SENT) - sent_before;
            let relayed = relay.metric(CHANGES_SENT) - relayed_before;
            let got: Vec<f64> = c
                .nodes
                .iter()
                .zip(&received_before)
                .map(|(n, before)| received(n) - before)
                .collect();
            let others: f64 = (0..c.nodes.len())
                .filter(|i| *i != hub_i && *i != writer_i)
                .map(|i| got[i])
                .sum();
            let star = (1.0..=10.0).contains(&sent)
                && got[hub_i] == sent
                && got[writer_i] == 0.0
                && others == relayed
                && relayed <= 20.0;
            if star {
                Ok(relayed)
            } else {
                Err(format!(
                    "writer sent {sent}, relay sent {relayed}, received per node {got:?} (relay {hub_i}, writer {writer_i})"
                ))
            }
        },
    );
    // A write at the relay reaches everyone too.
    let heads = write_heads(
        &relay.put_doc("relay/at-hub", &json!({"hub": true})),
        "PUT at the relay",
    );
    for node in &c.nodes {
        wait_doc_heads(node, "relay/at-hub", &heads);
    }
    for node in &c.nodes {
        assert_eq!(
            node.metric(PERSISTED_SENT),
            0.0,
            "{} acknowledged a batch nobody waited for",
            node.node_id
        );
    }

    // A writer waiting for three replicas gets them, straight from every peer.
    let w = writer.req("PUT", "/v1/docs/relay/durable?replicas=3", br#"{"d":1}"#);
    let heads = write_heads(&w, "PUT ?replicas=3 in relay mode");
    for node in &c.nodes {
        assert_eq!(
            read_doc(node, "relay/durable"),
            Some((json!({"d": 1}), heads.clone())),
            "at {} right after the replicas=3 acknowledgement",
            node.node_id
        );
    }
    wait_for(
        Duration::from_secs(5),
        "one acknowledgement per peer",
        || {
            let persisted: f64 = c.nodes.iter().map(|n| n.metric(PERSISTED_SENT)).sum();
            if persisted == 3.0 {
                Ok(())
            } else {
                Err(format!("{persisted} acknowledgements"))
            }
        },
    );
    eprintln!(
        "relay: 10 writes at a non-relay node visible at all four {spread:?}; the relay sent {relayed} messages for them"
    );
}

// ---------------------------------------------------------------------------------------------
// examples/cluster/run.sh
// ---------------------------------------------------------------------------------------------

/// The example script starts three nodes on the ports it is given, they replicate, and an
/// interrupt stops them all.
#[test]
fn example_script_starts_a_three_node_cluster_and_stops_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let script = root.join("examples/cluster/run.sh");
    let dir = tempfile::Builder::new()
        .prefix("verge-example-")
        .tempdir()
        .unwrap();
    let api: Vec<u16> = (0..3).map(|_| free_tcp_port()).collect();
    let gossip: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let join = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(" ");
    let log_path = dir.path().join("run.log");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .env("CLUSTER_DIR", dir.path().join("cluster"))
        .env("CLUSTER_API_PORTS", join(&api))
        .env("CLUSTER_GOSSIP_PORTS", join(&gossip))
        .env("VERGE_BIN", env!("CARGO_BIN_EXE_verge"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()));
    // A shell cannot trap a signal it was started with ignored (POSIX), and a test run in the
    // background of a shell without job control inherits an ignored SIGINT. Ctrl-C in a
    // terminal reaches the script with the default disposition: start it with that.
    // SAFETY: only async-signal-safe calls (signal(2)) between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("run examples/cluster/run.sh");
    let pid = child.id() as libc::pid_t;

    // The script prints a line saying the cluster is up once all three are ready.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                printed.push_str(&line);
                printed.push('\n');
                if line.trim() == "cluster is up" {
                    break;
                }
            }
            Err(_) if Instant::now() > deadline => {
                let _ = child.kill();
                panic!(
                    "run.sh did not report the cluster up:\n{printed}\n--- stderr ---\n{}",
                    common::read_log(&log_path)
                );
            }
            Err(_) => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "run.sh exited with {status}:\n{printed}\n--- stderr ---\n{}",
                common::read_log(&log_path)
            );
        }
    }
    for port in &api {
        assert!(
            printed.contains(&format!("http://127.0.0.1:{port}")),
            "prints how to reach {port}:\n{printed}"
        );
    }

    // Write at the first node, read at the third.
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let body = json!({"hello": "cluster"}).to_string();
    let w = common::http(
        addr(api[0]),
        "PUT",
        "/v1/docs/example/hello",
        body.as_bytes(),
        &[],
        common::REQUEST_TIMEOUT,
    )
    .unwrap();
    let heads = write_heads(&w, "PUT at the example's first node");
    wait_for(
        REPLICATION_DEADLINE,
        "example/hello at the third node",
        || {
            let r = common::http(
                addr(api[2]),
                "GET",
                "/v1/docs/example/hello",
                b"",
                &[],
                common::REQUEST_TIMEOUT,
            )
            .map_err(|e| e.to_string())?;
            if r.status == 200 && common::heads_of(&r.json(), "GET")[..] == heads[..] {
                Ok(())
            } else {
                Err(r.describe())
            }
        },
    );

    // Ctrl-C: the script stops every node and exits.
    // SAFETY: kill(2) on our own unreaped child.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(rc, 0);
    let status = common::wait_timeout(&mut child, Duration::from_secs(20)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!(
            "run.sh did not exit after SIGINT:\n{}",
            common::read_log(&log_path)
        )
    });
    let _ = reader.join();
    assert!(status.code().is_some(), "run.sh exited normally: {status}");
    for port in &api {
        let gone = common::http(
            addr(*port),
            "GET",
            "/healthz",
            b"",
            &[],
            Duration::from_secs(1),
        );
        assert!(
            gone.is_err(),
            "the node on {port} still answers after Ctrl-C"
        );
    }
}

/// Garbage on the QUIC port: random datagrams, truncated and oversized packets, and a flood of
/// QUIC-looking initial packets leave both nodes serving and replicating, and count nothing as a
/// peer.
#[test]
fn garbage_on_the_gossip_port_leaves_the_cluster_serving() {
    let c = Cluster::start("garbage", 2, 0, all_others(2));
    c.wait_connected();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = gossip_addr(c.ports[0]);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..2_000usize {
        let len = match i % 4 {
            0 => 1,
            1 => 40,
            2 => 1_200,
            _ => 1_500,
        };
        let mut packet: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 3 == 0 {
            // A long-header initial packet of QUIC version 1 with random contents.
            packet[0] = 0xc0 | (packet[0] & 0x0f);
            if packet.len() >= 5 {
                packet[1..5].copy_from_slice(&[0, 0, 0, 1]);
            }
        }
        let _ = socket.send_to(&packet, target);
    }
    for node in &c.nodes {
        node.assert_serving("after garbage datagrams on the gossip port");
    }
    let heads = write_heads(
        &c.nodes[0].put_doc("after/garbage", &json!({ "ok": true })),
        "after/garbage",
    );
    wait_doc_heads(&c.nodes[1], "after/garbage", &heads);
    let heads = write_heads(
        &c.nodes[1].put_doc("after/garbage-2", &json!({ "ok": 2 })),
        "after/garbage-2",
    );
    wait_doc_heads(&c.nodes[0], "after/garbage-2", &heads);
    assert_eq!(
        members(&c.nodes[0]).len(),
        2,
        "garbage senders never become members"
    );
}
