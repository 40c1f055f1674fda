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
