//! Thin replicas' pushes (`POST /v1/ops/{id}`) against real `verge` processes: the node makes
//! the ops at the heads the replica read, a retried push counts once (on the node that took it
//! and on another), and what does not fit is refused with a clear code.
#![allow(clippy::unwrap_used)]

mod common;

use serde_json::{Value, json};

use common::cluster::{Cluster, read_doc};
use common::{Node, Resp, metric_value, wait_for};

const ACTOR: &str = "0123456789abcdef0123456789abcdef";

fn push(node: &Node, id: &str, body: &Value) -> Resp {
    node.req(
        "POST",
        &format!("/v1/ops/{id}"),
        body.to_string().as_bytes(),
    )
}

fn push_body(base: &[String], batches: Value) -> Value {
    json!({"base": base, "groups": [{"actor": ACTOR, "batches": batches}]})
}

fn heads(answer: &Value) -> Vec<String> {
    let mut heads: Vec<String> = answer["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_owned())
        .collect();
    heads.sort();
    heads
}

#[test]
fn a_push_is_made_at_its_base_and_a_retry_counts_once() {
    let node = Node::start("thin-1");
    let id = "cart-thin";
    let first = push_body(
        &[],
        json!([
            {"at": 1000, "ops": [{"op": "inc", "path": ["items", "a"], "by": 2}]},
            {"at": 1001, "ops": [{"op": "set", "path": ["owner"], "value": "ann"}]}
        ]),
    );
    let answer = push(&node, id, &first).ok_json("first push");
    // The node holds exactly what the replica made: it already shows that state.
    assert!(answer.get("state").is_none(), "{answer}");
    let base = heads(&answer);
    assert_eq!(base.len(), 1);
    assert_eq!(
        node.get_doc(id).ok_json("read")["doc"],
        json!({"items": {"a": 2}, "owner": "ann"})
    );

    // The answer was lost: the same push again changes nothing.
    let again = push(&node, id, &first).ok_json("retried push");
    assert_eq!(heads(&again), base);
    assert_eq!(
        node.get_doc(id).ok_json("read")["doc"]["items"]["a"],
        json!(2)
    );

    // Someone else writes; the replica pushes from its base and learns the merged state.
    node.patch_doc(id, json!([{"op": "inc", "path": ["items", "b"], "by": 7}]))
        .ok_json("PATCH");
    let second = push_body(
        &base,
        json!([{"at": 2000, "ops": [{"op": "inc", "path": ["items", "a"], "by": 1}]}]),
    );
    let answer = push(&node, id, &second).ok_json("second push");
    let state = &answer["state"];
    assert_eq!(
        state["root"]["items"]["m"]["a"],
        json!({"c": 3}),
        "{answer}"
    );
    assert_eq!(
        state["root"]["items"]["m"]["b"],
        json!({"c": 7}),
        "{answer}"
    );
    let merged = heads(&answer);
    // Retried from the old base after the node moved on: still once.
    let again = push(&node, id, &second).ok_json("retried second push");
    assert_eq!(heads(&again), merged);
    assert_eq!(
        node.get_doc(id).ok_json("read")["doc"]["items"],
        json!({"a": 3, "b": 7})
    );

    // A push without writes reads: no state when the replica is current.
    let read = push(&node, id, &push_body(&merged, json!([]))).ok_json("read-only push");
    assert!(read.get("state").is_none(), "{read}");
    let metrics = node.get("/metrics").text();
    assert!(metric_value(&metrics, "verge_thin_pushes_total").unwrap() >= 5.0);
}

#[test]
fn what_does_not_fit_is_refused_with_a_code() {
    let node = Node::start("thin-2");
    let id = "thin-refusals";
    node.put_doc(id, &json!({"title": "x"})).ok_json("PUT");

    let r = push(&node, id, &json!({"base": [], "groups": "no"}));
    r.assert_error(400, "invalid_push", "groups not an array");
    let r = node.req("POST", &format!("/v1/ops/{id}"), b"{not json");
    r.assert_error(400, "invalid_json", "not JSON");
    let r = push(
        &node,
        id,
        &push_body(
            &[],
            json!([{"at": 1, "ops": [{"op": "nope", "path": ["a"]}]}]),
        ),
    );
    r.assert_error(400, "invalid_op", "unknown op");
    let r = node.req(
        "POST",
        &format!("/v1/ops/{id}"),
        br#"{"base": [], "groups": [{"actor": "01", "batches": [{"at": 1, "ops": [{"op": "set", "path": ["k"], "value": 18446744073709551616}]}]}]}"#,
    );
    r.assert_error(400, "invalid_json", "an integer beyond 64 bits");
    let many: Vec<Value> = (0..17)
        .map(|_| json!({"actor": ACTOR, "batches": []}))
        .collect();
    let r = push(&node, id, &json!({"base": [], "groups": many}));
    r.assert_error(413, "too_large", "too many groups");

    let current = common::heads_of(&node.get_doc(id).ok_json("read"), "read");
    let r = push(
        &node,
        id,
        &push_body(
            &current,
            json!([{"at": 5, "ops": [{"op": "inc", "path": ["title"], "by": 1}]}]),
        ),
    );
    r.assert_error(422, "op_not_applicable", "inc of a string");

    let unknown = vec!["ab".repeat(32)];
    let r = push(
        &node,
        id,
        &push_body(
            &unknown,
            json!([{"at": 5, "ops": [{"op": "set", "path": ["k"], "value": 1}]}]),
        ),
    );
    r.assert_error(503, "catching_up", "a base this node does not hold");

    let tombstone = heads(&node.delete_doc(id).ok_json("DELETE"));
    let r = push(
        &node,
        id,
        &push_body(
            &tombstone,
            json!([{"at": 5, "ops": [{"op": "set", "path": ["k"], "value": 1}]}]),
        ),
    );
    r.assert_error(409, "document_not_live", "a write to a deleted document");
}

#[test]
fn a_push_retried_on_another_node_counts_once_everywhere() {
    let c = Cluster::start_configured(
        "thin-c",
        2,
        0,
        |i| vec![1 - i],
        Some("[replication]\nanti_entropy_interval_s = 1\n"),
    );
    c.wait_connected();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let id = "thin-two-nodes";
    let created = push(
        a,
        id,
        &push_body(
            &[],
            json!([{"at": 1, "ops": [{"op": "set", "path": ["n"], "value": 0}]}]),
        ),
    )
    .ok_json("create");
    let base = heads(&created);
    wait_for(
        common::cluster::REPLICATION_DEADLINE,
        "b to hold the document",
        || match read_doc(b, id) {
            Some((_, h)) if h == base => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // The push reaches a, whose answer is lost; the replica sends it to b.
    let body = push_body(
        &base,
        json!([{"at": 2, "ops": [{"op": "inc", "path": ["hits"], "by": 5}]}]),
    );
    let on_a = heads(&push(a, id, &body).ok_json("push to a"));
    let on_b = heads(&push(b, id, &body).ok_json("push to b"));
    assert_eq!(
        on_a, on_b,
        "the same push made the same change on both nodes"
    );
    for node in [a, b] {
        let (doc, h) =
            wait_for(
                common::cluster::REPLICATION_DEADLINE,
                "convergence",
                || match read_doc(node, id) {
                    Some((doc, h)) if h == on_a => Ok((doc, h)),
                    other => Err(format!("{other:?}")),
                },
            )
            .0;
        assert_eq!(h, on_a);
        assert_eq!(doc, json!({"n": 0, "hits": 5}), "on {}", node.node_id);
    }
}

/// A node alone with the smallest generations allowed (a push of 20 writes starts the next
/// one), keeping `retain` of those its documents left.
fn compacting_node(name: &str, retain: u64) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("verge.toml");
    std::fs::write(
        &config,
        format!(
            "[compaction]\nafter_changes = 16\nafter_bytes = 1048576\nretain_generations = {retain}\n"
        ),
    )
    .unwrap();
    let node = Node::start_with(name, vec!["--config".into(), config.display().to_string()]);
    (node, dir)
}

/// A push of `writes` increments of `n` from `base`, each its own batch (so its own change).
fn increments(
    actor: &str,
    base: &[String],
    lineage: Option<&Value>,
    first_at: usize,
    writes: usize,
) -> Value {
    let batches: Vec<Value> = (0..writes)
        .map(|w| json!({"at": (first_at + w) as i64, "ops": [{"op": "inc", "path": ["n"], "by": 1}]}))
        .collect();
    let mut body = json!({"base": base, "groups": [{"actor": actor, "batches": batches}]});
    if let Some(lineage) = lineage {
        body["lineage"] = lineage.clone();
    }
    body
}

/// A node alone starts its generations itself, so whatever base a thin replica read from it
/// is here while it retains the generation: in the current one, or in one it left, even the one
/// it left a moment ago and has not written down yet, or left between building the push's
/// changes and taking them. Every push lands, and every write counts once across the
/// generations the pushes straddle.
#[test]
fn pushes_across_generations_on_a_node_alone_all_land_once() {
    // The pushes start fewer generations than the node retains, so that however they
    // interleave, no base falls out of what it retains.
    let (node, _config) = compacting_node("thin-gen", 64);
    let id = "thin-generations";
    const REPLICAS: usize = 3;
    const PUSHES: usize = 15;
    const WRITES: usize = 20;
    std::thread::scope(|s| {
        for r in 0..REPLICAS {
            let node = &node;
            s.spawn(move || {
                let actor = format!("{:032x}", 0xa0 + r);
                let mut base: Vec<String> = Vec::new();
                let mut lineage: Option<Value> = None;
                for p in 0..PUSHES {
                    let body = increments(&actor, &base, lineage.as_ref(), p * WRITES, WRITES);
                    let answer = push(node, id, &body);
                    assert_eq!(
                        answer.status,
                        200,
                        "replica {r}, push {p}: {}\n{}",
                        answer.text(),
                        common::tail(&node.output(), 40)
                    );
                    let answer = answer.json();
                    base = heads(&answer);
                    lineage = Some(answer["lineage"].clone());
                }
            });
        }
    });
    let doc = node.get_doc(id).ok_json("read");
    assert_eq!(
        doc["doc"]["n"],
        json!(REPLICAS * PUSHES * WRITES),
        "every write once: {doc}"
    );
    // The pushes did straddle generations: about one started a push, and fewer than the node
    // retains.
    let generation = doc["generation"].as_u64().unwrap();
    assert!(
        (REPLICAS * PUSHES / 2) as u64 <= generation && generation < 64,
        "{generation} generations started: {doc}"
    );
}

/// A base the node holds nowhere is answered by the history the replica says it is in: an
/// earlier generation the node no longer retains gets `document_compacted` (the replica makes
/// its writes again on the current state), an earlier incarnation `document_replaced`, and a
/// later one, or none named, `catching_up`.
#[test]
fn a_base_held_nowhere_is_answered_by_its_lineage() {
    let (node, _config) = compacting_node("thin-lineage", 1);
    let id = "thin-lineage";
    let actor = "0a".repeat(16);
    let first = push(&node, id, &increments(&actor, &[], None, 0, 1)).ok_json("first push");
    let (old_base, old_lineage) = (heads(&first), first["lineage"].clone());
    assert_eq!(
        old_lineage,
        json!({"incarnation": 0, "generation": 0}),
        "{first}"
    );
    // Three generations on: the first one is no longer retained.
    let mut answer = first.clone();
    for p in 0..3 {
        answer = push(
            &node,
            id,
            &increments(
                &actor,
                &heads(&answer),
                Some(&answer["lineage"]),
                1 + p * 20,
                20,
            ),
        )
        .ok_json("push");
    }
    let now = answer["lineage"]["generation"].as_u64().unwrap();
    assert!(now >= 2, "{answer}");

    let stale = increments(&"0b".repeat(16), &old_base, Some(&old_lineage), 100, 1);
    push(&node, id, &stale).assert_error(
        409,
        "document_compacted",
        "a generation no longer retained",
    );
    let mut unnamed = stale.clone();
    unnamed.as_object_mut().unwrap().remove("lineage");
    push(&node, id, &unnamed).assert_error(503, "catching_up", "no lineage named");
    let mut ahead = stale.clone();
    ahead["lineage"]["generation"] = json!(now + 5);
    push(&node, id, &ahead).assert_error(503, "catching_up", "a later generation");
    let metrics = node.get("/metrics").text();
    assert_eq!(
        metric_value(&metrics, "verge_stale_not_carried_total"),
        Some(1.0)
    );

    // Deleted and written again: the document's next incarnation.
    node.delete_doc(id).ok_json("DELETE");
    node.put_doc(id, &json!({"n": 0})).ok_json("PUT");
    let current = heads(&push(&node, id, &json!({"base": [], "groups": []})).ok_json("read"));
    let mut old_incarnation = increments(&actor, &heads(&answer), Some(&answer["lineage"]), 200, 1);
    old_incarnation["lineage"]["generation"] = json!(now + 100);
    push(&node, id, &old_incarnation).assert_error(
        409,
        "document_replaced",
        "an earlier incarnation",
    );
    // Nothing of the refused pushes landed.
    let doc = node.get_doc(id).ok_json("read");
    assert_eq!(doc["doc"], json!({"n": 0}), "{doc}");
    assert_eq!(common::heads_of(&doc, "read"), current);
}

/// A node alone retains every generation there is to retain: once it released one (here after
/// `retain_previous_s`, long before `retain_generations` of them passed), a replica still on it
/// is told `document_compacted` and makes its writes again, instead of waiting for a node that
/// could carry them, which does not exist.
#[test]
fn a_node_alone_lets_go_of_a_replica_on_a_generation_it_released() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("verge.toml");
    std::fs::write(
        &config,
        "[storage]\npurge_interval_s = 1\n\n[compaction]\nafter_changes = 16\n\
         after_bytes = 1048576\nretain_generations = 16\nretain_previous_s = 0\n",
    )
    .unwrap();
    let node = Node::start_with(
        "thin-released",
        vec!["--config".into(), config.display().to_string()],
    );
    let id = "thin-released";
    let actor = "0c".repeat(16);
    let first = push(&node, id, &increments(&actor, &[], None, 0, 1)).ok_json("first push");
    // Others write on (through the API, so that nothing here depends on a base): the document
    // moves on past the first push's generation.
    for _ in 0..60 {
        node.patch_doc(id, json!([{"op": "inc", "path": ["n"], "by": 1}]))
            .ok_json("PATCH");
    }
    let generation = node.get_doc(id).ok_json("read")["generation"]
        .as_u64()
        .unwrap();
    // Two on at least: the generation left last also stays in memory while it is written down.
    assert!(generation >= 2, "generation {generation}");
    wait_for(
        std::time::Duration::from_secs(20),
        "the node to release the generations it left",
        || {
            let released = metric_value(
                &node.get("/metrics").text(),
                "verge_retained_released_total",
            )
            .unwrap_or(0.0);
            if released >= 1.0 {
                Ok(())
            } else {
                Err(format!("{released} released"))
            }
        },
    );
    let stale = increments(
        &"0d".repeat(16),
        &heads(&first),
        Some(&first["lineage"]),
        100,
        1,
    );
    push(&node, id, &stale).assert_error(409, "document_compacted", "a released generation");
    let doc = node.get_doc(id).ok_json("read");
    assert_eq!(
        doc["doc"]["n"],
        json!(61),
        "the refused push wrote nothing: {doc}"
    );
}
