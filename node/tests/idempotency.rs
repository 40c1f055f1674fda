//! `Idempotency-Key` on a real node: a retried write counts once, also across a SIGKILL and
//! restart; the key on another request is refused; bad keys are refused clearly.

mod common;

use common::{Node, Resp};
use serde_json::{Value, json};

fn with_key(node: &Node, method: &str, target: &str, key: &str, body: &Value) -> Resp {
    let body = body.to_string();
    node.req_with(
        method,
        target,
        &[
            ("Idempotency-Key", key),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
}

fn counter(node: &Node, id: &str) -> i64 {
    let r = node.get_doc(id);
    assert_eq!(r.status, 200, "{}", r.describe());
    r.json()["doc"]["n"].as_i64().expect("a counter")
}

#[test]
fn an_increment_retried_with_one_key_counts_once_across_a_restart() {
    let mut node = Node::start("idem-inc");
    let inc = json!({ "ops": [{ "op": "inc", "path": ["n"], "by": 5 }] });
    let first = with_key(&node, "PATCH", "/v1/docs/idem/c", "order-7f3a", &inc);
    assert_eq!(first.status, 200, "{}", first.describe());
    assert_eq!(first.header("idempotent-replayed"), None, "a first write");
    for attempt in 0..5 {
        if attempt == 2 {
            node.restart_after_kill();
        }
        let retry = with_key(&node, "PATCH", "/v1/docs/idem/c", "order-7f3a", &inc);
        assert_eq!(retry.status, 200, "retry {attempt}: {}", retry.describe());
        assert_eq!(retry.header("idempotent-replayed"), Some("true"));
        assert_eq!(
            retry.json(),
            first.json(),
            "retry {attempt} answers as the first"
        );
    }
    assert_eq!(counter(&node, "idem/c"), 5, "five retries, one increment");
    // Another key is another write.
    let other = with_key(&node, "PATCH", "/v1/docs/idem/c", "order-80b1", &inc);
    assert_eq!(other.status, 200);
    assert_eq!(counter(&node, "idem/c"), 10);
    // Without a key, every request writes.
    assert_eq!(node.patch_doc("idem/c", inc["ops"].clone()).status, 200);
    assert_eq!(counter(&node, "idem/c"), 15);
    let metrics = node.get("/metrics").text();
    assert!(
        metrics.contains("verge_idempotent_writes_total{kind=\"replayed\"} 3"),
        "3 replays since the restart: {}",
        metrics
            .lines()
            .filter(|l| l.contains("idempot"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_key_reused_for_another_request_is_refused_and_writes_nothing() {
    let node = Node::start("idem-reuse");
    let put = json!({ "owner": "u-1" });
    let r = with_key(&node, "PUT", "/v1/docs/idem/d", "k-1", &put);
    assert_eq!(r.status, 200, "{}", r.describe());
    let heads = r.json()["heads"].clone();
    for (method, target, body) in [
        ("PUT", "/v1/docs/idem/d", json!({ "owner": "u-2" })),
        ("PUT", "/v1/docs/idem/other", put.clone()),
        ("PUT", "/v1/docs/idem/d?ttl=60", put.clone()),
        (
            "PATCH",
            "/v1/docs/idem/d",
            json!({ "ops": [{ "op": "set", "path": ["owner"], "value": "u-3" }] }),
        ),
    ] {
        with_key(&node, method, target, "k-1", &body).assert_error(
            422,
            "idempotency_key_reused",
            &format!("{method} {target}"),
        );
    }
    let doc = node.get_doc("idem/d").json();
    assert_eq!(doc["doc"], put, "nothing written");
    assert_eq!(doc["heads"], heads);
    assert_eq!(node.get_doc("idem/other").status, 404);

    // DELETE with a key: once.
    let del = node.req_with(
        "DELETE",
        "/v1/docs/idem/d",
        &[("Idempotency-Key", "k-2")],
        b"",
    );
    assert_eq!(del.status, 200, "{}", del.describe());
    let again = node.req_with(
        "DELETE",
        "/v1/docs/idem/d",
        &[("Idempotency-Key", "k-2")],
        b"",
    );
    assert_eq!(
        again.status,
        200,
        "the first answer, not 404: {}",
        again.describe()
    );
    assert_eq!(again.json(), del.json());
}

#[test]
fn bad_keys_are_refused_before_anything_is_written() {
    let node = Node::start("idem-bad");
    let inc = json!({ "ops": [{ "op": "inc", "path": ["n"], "by": 1 }] });
    let long = "k".repeat(256);
    for key in ["", long.as_str(), "has space"] {
        with_key(&node, "PATCH", "/v1/docs/idem/b", key, &inc).assert_error(
            400,
            "invalid_idempotency_key",
            &format!("key {key:?}"),
        );
    }
    assert_eq!(node.get_doc("idem/b").status, 404, "nothing written");
    let longest = "k".repeat(255);
    assert_eq!(
        with_key(&node, "PATCH", "/v1/docs/idem/b", &longest, &inc).status,
        200
    );
    node.assert_serving("after bad keys");
}
