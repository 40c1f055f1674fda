//! Integration tests of the HTTP API (docs/api.md) against a real `verge node` process.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::sync::{ChunkList, Message, MessageVersion, State as SyncState, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};
use serde_json::{Value, json};

use common::{Node, Resp, SseStream, assert_heads, heads_of};

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Percent-encodes a query value (everything but unreserved characters).
fn qenc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// GETs a document, asserts 200 and the shape, returns (doc, sorted heads, whole body).
fn read_doc(node: &Node, id: &str) -> (Value, Vec<String>, Value) {
    let r = node.get_doc(id);
    let body = r.ok_json(&format!("GET /v1/docs/{id}"));
    assert_eq!(body["id"], json!(id), "GET {id}: id field: {body}");
    let heads = heads_of(&body, &format!("GET {id}"));
    assert!(
        body.get("doc").is_some_and(Value::is_object),
        "GET {id}: doc is not an object: {body}"
    );
    (body["doc"].clone(), heads, body)
}

/// PATCHes, asserts 200, checks the response's id and heads, returns the sorted heads.
fn patch_ok(node: &Node, id: &str, ops: Value) -> Vec<String> {
    let r = node.patch_doc(id, ops.clone());
    let body = r.ok_json(&format!("PATCH {id} {ops}"));
    assert_eq!(body["id"], json!(id), "PATCH {id}: id field: {body}");
    heads_of(&body, &format!("PATCH {id}"))
}

/// PUTs, asserts 200, returns the sorted heads.
fn put_ok(node: &Node, id: &str, doc: &Value) -> Vec<String> {
    let r = node.put_doc(id, doc);
    let body = r.ok_json(&format!("PUT {id} {doc}"));
    assert_eq!(body["id"], json!(id), "PUT {id}: id field: {body}");
    heads_of(&body, &format!("PUT {id}"))
}

/// Applies `ops` and asserts the document then reads exactly `expected`, with the heads the
/// PATCH answered.
fn patch_expect(node: &Node, id: &str, ops: Value, expected: Value) {
    let heads = patch_ok(node, id, ops.clone());
    let (doc, got_heads, _) = read_doc(node, id);
    assert_eq!(doc, expected, "after PATCH {id} {ops}");
    assert_eq!(
        got_heads, heads,
        "GET heads differ from PATCH response heads after {ops}"
    );
}

/// Collects mismatches of bad-input requests so one run reports all of them.
struct BadInputs<'a> {
    node: &'a Node,
    failures: Vec<String>,
}

impl<'a> BadInputs<'a> {
    fn new(node: &'a Node) -> Self {
        BadInputs {
            node,
            failures: Vec::new(),
        }
    }

    /// Sends the request, checks the error, then checks the node still answers `/healthz`.
    fn expect(
        &mut self,
        label: &str,
        method: &str,
        target: &str,
        body: &[u8],
        status: u16,
        code: &str,
    ) -> Option<Resp> {
        // A watch request that wrongly opens a stream never ends: give it less time.
        let timeout = if target.starts_with("/v1/watch") {
            Duration::from_secs(2)
        } else {
            common::REQUEST_TIMEOUT
        };
        let resp = match common::http(self.node.addr, method, target, body, &[], timeout) {
            Ok(r) => {
                if let Some(m) = r.error_mismatch(status, code) {
                    self.failures
                        .push(format!("{label}: {method} {target}: {m}"));
                }
                Some(r)
            }
            Err(e) => {
                self.failures.push(format!(
                    "{label}: {method} {target}: no complete response within {timeout:?}: {e}"
                ));
                None
            }
        };
        match self.node.try_req("GET", "/healthz", b"") {
            Ok(h) if h.status == 200 => {}
            other => panic!(
                "node stopped serving after {label} ({method} {target}): /healthz gave {:?}\nfailures so far:\n{}\n--- node output (tail) ---\n{}",
                other.map(|r| r.describe()),
                self.failures.join("\n"),
                common::tail(&self.node.output(), 4000)
            ),
        }
        resp
    }

    /// Records a failure unless `cond`.
    fn check(&mut self, cond: bool, what: String) {
        if !cond {
            self.failures.push(what);
        }
    }

    /// Asserts no failures were recorded and the node still serves writes.
    fn finish(self, context: &str) {
        self.node.assert_serving(context);
        assert!(
            self.failures.is_empty(),
            "{} bad-input expectation(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// documents
// ---------------------------------------------------------------------------------------------

#[test]
fn put_then_get_returns_same_json_and_heads() {
    let node = Node::start("test-putget");
    let doc = json!({
        "a": 1,
        "neg": -7,
        "f": 1.5,
        "s": "str",
        "t": true,
        "nul": null,
        "b": { "c": [1, 2, { "d": "x" }], "empty": {} },
        "arr": []
    });
    let put_heads = put_ok(&node, "pg/1", &doc);
    let (got, heads, body) = read_doc(&node, "pg/1");
    assert_eq!(got, doc, "GET returned a different document");
    assert_eq!(heads, put_heads, "GET heads differ from PUT heads");
    assert!(
        body.get("expires_at_ms").is_some_and(Value::is_null),
        "expires_at_ms should be null: {body}"
    );

    // A GET of a document that never existed.
    node.get_doc("pg/never")
        .assert_error(404, "not_found", "GET of a missing document");
}

#[test]
fn put_is_a_diff_against_the_current_document() {
    let node = Node::start("test-putdiff");
    let h1 = put_ok(
        &node,
        "diff/1",
        &json!({ "a": 1, "b": 2, "c": { "x": 1, "y": 2 }, "keep": "k" }),
    );
    let second = json!({ "a": 1, "b": 3, "c": { "x": 1 }, "keep": "k", "new": [1] });
    let h2 = put_ok(&node, "diff/1", &second);
    assert_ne!(h1, h2, "a PUT that changes values must produce new heads");
    let (got, heads, _) = read_doc(&node, "diff/1");
    assert_eq!(got, second, "second PUT must leave exactly the new object");
    assert_eq!(heads, h2);
    // Removing everything leaves an empty object, not a missing document.
    let h3 = put_ok(&node, "diff/1", &json!({}));
    let (got, heads, _) = read_doc(&node, "diff/1");
    assert_eq!(got, json!({}));
    assert_eq!(heads, h3);
}

#[test]
fn patch_supports_every_op() {
    let node = Node::start("test-patchops");
    let id = "ops/1";
    // set with missing parents
    patch_expect(
        &node,
        id,
        json!([{ "op": "set", "path": ["a", "b", "c"], "value": 1 }]),
        json!({ "a": { "b": { "c": 1 } } }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "set", "path": ["a", "b", "d"], "value": { "e": [1, "two", null, true] } }]),
        json!({ "a": { "b": { "c": 1, "d": { "e": [1, "two", null, true] } } } }),
    );
    // del a map key
    patch_expect(
        &node,
        id,
        json!([{ "op": "del", "path": ["a", "b", "c"] }]),
        json!({ "a": { "b": { "d": { "e": [1, "two", null, true] } } } }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "del", "path": ["a"] }]),
        json!({}),
    );

    // inc: creates a counter at 0, default by 1, then adds, negative too
    patch_expect(
        &node,
        id,
        json!([{ "op": "inc", "path": ["n"] }]),
        json!({ "n": 1 }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "inc", "path": ["n"], "by": 5 }]),
        json!({ "n": 6 }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "inc", "path": ["n"], "by": -2 }]),
        json!({ "n": 4 }),
    );

    // push creates a list; insert before an index, at the length (append), at 0
    patch_expect(
        &node,
        id,
        json!([{ "op": "push", "path": ["l"], "value": 1 }, { "op": "push", "path": ["l"], "value": 3 }]),
        json!({ "n": 4, "l": [1, 3] }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "insert", "path": ["l", 1], "value": 2 }]),
        json!({ "n": 4, "l": [1, 2, 3] }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "insert", "path": ["l", 3], "value": 4 }]),
        json!({ "n": 4, "l": [1, 2, 3, 4] }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "insert", "path": ["l", 0], "value": 0 }]),
        json!({ "n": 4, "l": [0, 1, 2, 3, 4] }),
    );
    // set replaces a list element; del removes one
    patch_expect(
        &node,
        id,
        json!([{ "op": "set", "path": ["l", 0], "value": "zero" }]),
        json!({ "n": 4, "l": ["zero", 1, 2, 3, 4] }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "del", "path": ["l", 1] }]),
        json!({ "n": 4, "l": ["zero", 2, 3, 4] }),
    );
    // push an object, then edit inside it through a list index
    patch_expect(
        &node,
        id,
        json!([{ "op": "push", "path": ["l"], "value": { "x": 1 } }, { "op": "set", "path": ["l", 4, "y"], "value": 2 }]),
        json!({ "n": 4, "l": ["zero", 2, 3, 4, { "x": 1, "y": 2 }] }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "del", "path": ["l"] }, { "op": "del", "path": ["n"] }]),
        json!({}),
    );

    // splice creates a text and edits it
    patch_expect(
        &node,
        id,
        json!([{ "op": "splice", "path": ["t"], "index": 0, "text": "hello world" }]),
        json!({ "t": "hello world" }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "splice", "path": ["t"], "index": 6, "delete": 5, "text": "there" }]),
        json!({ "t": "hello there" }),
    );
    // delete without text (text defaults to "")
    patch_expect(
        &node,
        id,
        json!([{ "op": "splice", "path": ["t"], "index": 5, "delete": 6 }]),
        json!({ "t": "hello" }),
    );
    // indexes count Unicode scalar values
    patch_expect(
        &node,
        id,
        json!([{ "op": "splice", "path": ["u"], "index": 0, "text": "héllo wörld" }]),
        json!({ "t": "hello", "u": "héllo wörld" }),
    );
    patch_expect(
        &node,
        id,
        json!([{ "op": "splice", "path": ["u"], "index": 7, "delete": 1, "text": "O" }]),
        json!({ "t": "hello", "u": "héllo wOrld" }),
    );
    // several ops in one PATCH, in order
    patch_expect(
        &node,
        id,
        json!([
            { "op": "set", "path": ["m"], "value": { "k": 1 } },
            { "op": "set", "path": ["m", "k"], "value": 2 },
            { "op": "inc", "path": ["m", "c"], "by": 3 },
            { "op": "del", "path": ["t"] }
        ]),
        json!({ "u": "héllo wOrld", "m": { "k": 2, "c": 3 } }),
    );
}

#[test]
fn patch_example_from_the_docs_applies_to_a_new_document() {
    let node = Node::start("test-patchexample");
    let ops = json!([
        { "op": "set", "path": ["owner"], "value": "u-42" },
        { "op": "inc", "path": ["items", "sku-1", "qty"], "by": 2 },
        { "op": "push", "path": ["log"], "value": { "at": 1, "what": "added sku-1" } },
        { "op": "splice", "path": ["note"], "index": 0, "text": "leave at door" }
    ]);
    patch_expect(
        &node,
        "cart/u-42",
        ops,
        json!({
            "owner": "u-42",
            "items": { "sku-1": { "qty": 2 } },
            "log": [{ "at": 1, "what": "added sku-1" }],
            "note": "leave at door"
        }),
    );
}

#[test]
fn concurrent_increments_all_count() {
    let node = Node::start("test-concinc");
    let threads = 4;
    let per_thread = 25;
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..per_thread {
                    patch_ok(
                        &node,
                        "cnt/1",
                        json!([{ "op": "inc", "path": ["n"], "by": 1 }]),
                    );
                }
            });
        }
    });
    let (doc, _, _) = read_doc(&node, "cnt/1");
    assert_eq!(doc, json!({ "n": threads * per_thread }));
}

#[test]
fn an_inc_past_the_64_bit_range_is_refused_and_changes_nothing() {
    let node = Node::start("test-overflow");
    patch_ok(
        &node,
        "cnt/max",
        json!([{ "op": "inc", "path": ["n"], "by": i64::MAX }]),
    );
    let (_, heads, _) = read_doc(&node, "cnt/max");
    let r = node.patch_doc(
        "cnt/max",
        json!([{ "op": "set", "path": ["other"], "value": 1 }, { "op": "inc", "path": ["n"] }]),
    );
    r.assert_error(422, "op_not_applicable", "inc past i64::MAX");
    assert!(r.text().contains("64-bit"), "{}", r.describe());
    let (doc, after, _) = read_doc(&node, "cnt/max");
    assert_eq!(doc, json!({ "n": i64::MAX }), "the whole PATCH was refused");
    assert_eq!(after, heads);
    // Downwards too, and a counter the same PATCH creates.
    let r = node.patch_doc(
        "cnt/min",
        json!([{ "op": "inc", "path": ["m"], "by": i64::MIN }, { "op": "inc", "path": ["m"], "by": -1 }]),
    );
    r.assert_error(422, "op_not_applicable", "inc past i64::MIN");
    assert_eq!(node.get_doc("cnt/min").status, 404, "nothing was created");
}

#[test]
fn delete_then_get_is_404_and_a_write_revives_from_empty() {
    let node = Node::start("test-delete");
    put_ok(&node, "del/1", &json!({ "a": 1, "b": { "c": 2 } }));
    let r = node.delete_doc("del/1");
    let body = r.ok_json("DELETE del/1");
    assert_heads(&body["heads"], "DELETE response");
    node.get_doc("del/1")
        .assert_error(404, "not_found", "GET after DELETE");
    node.delete_doc("del/1")
        .assert_error(404, "not_found", "second DELETE of the same document");
    node.delete_doc("del/never").assert_error(
        404,
        "not_found",
        "DELETE of a document that never existed",
    );

    // PATCH revives from an empty object: the old keys are gone.
    patch_expect(
        &node,
        "del/1",
        json!([{ "op": "set", "path": ["k"], "value": 1 }]),
        json!({ "k": 1 }),
    );
    let listed = node.get("/v1/docs?prefix=del/").ok_json("list del/");
    let ids: Vec<&str> = listed["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["del/1"], "a revived document is listed again");

    // PUT revives from empty too.
    put_ok(&node, "del/2", &json!({ "x": 1, "y": 2 }));
    node.delete_doc("del/2").ok_json("DELETE del/2");
    put_ok(&node, "del/2", &json!({ "z": 3 }));
    let (doc, _, _) = read_doc(&node, "del/2");
    assert_eq!(doc, json!({ "z": 3 }));
    // A counter revived after delete starts from 0.
    patch_ok(
        &node,
        "del/3",
        json!([{ "op": "inc", "path": ["n"], "by": 5 }]),
    );
    node.delete_doc("del/3").ok_json("DELETE del/3");
    patch_expect(
        &node,
        "del/3",
        json!([{ "op": "inc", "path": ["n"], "by": 1 }]),
        json!({ "n": 1 }),
    );
}

#[test]
fn ids_with_slashes_and_every_allowed_character() {
    let node = Node::start("test-ids");
    for id in [
        "cart/u-42",
        "a/b/c/d",
        "A-z.0_9~x:y@h+k",
        "4NMNnkMhL8jXrdJ9jamS58PAVdXu", // an automerge-repo style bs58 id
        &"x".repeat(256),
    ] {
        let v = json!({ "id_was": id });
        let heads = put_ok(&node, id, &v);
        let (doc, got, _) = read_doc(&node, id);
        assert_eq!(doc, v, "id {id:?}");
        assert_eq!(got, heads, "id {id:?}");
    }
    // `cart/u-42` and `cart` are different documents.
    node.get_doc("cart")
        .assert_error(404, "not_found", "GET cart (only cart/u-42 exists)");
    let listed = node.get("/v1/docs?prefix=cart").ok_json("list cart");
    let ids: Vec<&str> = listed["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["cart/u-42"]);
}

#[test]
fn list_with_prefix_limit_and_cursor() {
    let node = Node::start("test-list");
    let mut expected: Vec<String> = (0..25).map(|i| format!("p/{i:02}")).collect();
    // Write in a scrambled order; the listing must be sorted anyway.
    let mut order = expected.clone();
    order.reverse();
    order.swap(3, 17);
    for id in &order {
        put_ok(&node, id, &json!({ "v": id }));
    }
    for other in ["p", "pa/1", "q/1", "o/1"] {
        put_ok(&node, other, &json!({}));
    }
    let before_ms = now_ms();

    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0..10 {
        let target = match &cursor {
            None => "/v1/docs?prefix=p%2F&limit=10".to_string(),
            Some(c) => format!("/v1/docs?prefix=p%2F&limit=10&cursor={}", qenc(c)),
        };
        let body = node.get(&target).ok_json(&target);
        let docs = body["docs"]
            .as_array()
            .unwrap_or_else(|| panic!("no docs array: {body}"))
            .clone();
        let ids: Vec<String> = docs
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect();
        for d in &docs {
            assert_heads(&d["heads"], &format!("listing entry {d}"));
            assert!(
                d["size_bytes"].as_u64().is_some_and(|n| n > 0),
                "size_bytes: {d}"
            );
            let upd = d["updated_at_ms"]
                .as_u64()
                .unwrap_or_else(|| panic!("updated_at_ms: {d}"));
            assert!(
                upd <= before_ms + 1000 && upd + 600_000 > before_ms,
                "updated_at_ms is not a recent epoch ms: {d}"
            );
            assert!(d["expires_at_ms"].is_null(), "expires_at_ms: {d}");
        }
        pages.push(ids);
        match body.get("next_cursor") {
            Some(Value::Null) => break,
            Some(Value::String(c)) => cursor = Some(c.clone()),
            other => {
                panic!("page {page}: next_cursor must be a string or null, got {other:?} in {body}")
            }
        }
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![10, 10, 5], "pages: {pages:?}");
    let all: Vec<String> = pages.concat();
    expected.sort();
    assert_eq!(
        all, expected,
        "paged listing must be exactly the 25 ids in order"
    );

    // Default limit (100) and no prefix: everything, sorted.
    let body = node.get("/v1/docs").ok_json("list all");
    let ids: Vec<String> = body["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "listing is not in id order");
    assert_eq!(ids.len(), 29, "{ids:?}");
    assert!(body["next_cursor"].is_null(), "{body}");

    // Deleted documents are left out.
    node.delete_doc("p/03").ok_json("DELETE p/03");
    let body = node
        .get("/v1/docs?prefix=p%2F&limit=1000")
        .ok_json("list after delete");
    let ids: Vec<&str> = body["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 24);
    assert!(!ids.contains(&"p/03"));
}

#[test]
fn ttl_expires_documents_and_ttl_zero_clears() {
    /// The ttl of the expiring documents, in seconds.
    const TTL_S: u64 = 5;
    let node = Node::start("test-ttl");
    let t0 = Instant::now();
    let t0_ms = now_ms();
    put_ok(&node, "ttl/a", &json!({ "a": 1 }));
    let after_ms = now_ms();
    let (_, _, body) = read_doc(&node, "ttl/a");
    let exp = body["expires_at_ms"].as_u64();
    assert!(exp.is_none(), "no ttl yet: {body}");

    // Now with a ttl. It must outlast the setup below (a dozen requests, some waiting for the
    // disk) on a loaded machine, so it is seconds, not one.
    let r = node.req(
        "PUT",
        &format!("/v1/docs/ttl/a?ttl={TTL_S}"),
        json!({ "a": 2 }).to_string().as_bytes(),
    );
    r.ok_json("PUT ttl/a with a ttl");
    let (doc, _, body) = read_doc(&node, "ttl/a");
    assert_eq!(doc, json!({ "a": 2 }));
    let exp_a = body["expires_at_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("expires_at_ms after a ttl: {body}"));
    let ttl_ms = TTL_S * 1000;
    assert!(
        exp_a >= t0_ms + ttl_ms - 500 && exp_a <= now_ms() + ttl_ms + 500,
        "expires_at_ms {exp_a} should be about {TTL_S} s after the write ({t0_ms}..{after_ms})"
    );

    // ttl=0 clears an expiry.
    node.req("PUT", &format!("/v1/docs/ttl/b?ttl={TTL_S}"), b"{\"b\":1}")
        .ok_json("PUT ttl/b with a ttl");
    node.req(
        "PATCH",
        "/v1/docs/ttl/b?ttl=0",
        br#"{"ops":[{"op":"inc","path":["n"]}]}"#,
    )
    .ok_json("PATCH ttl/b?ttl=0");
    let (_, _, body) = read_doc(&node, "ttl/b");
    assert!(
        body["expires_at_ms"].is_null(),
        "ttl=0 must clear expires_at_ms: {body}"
    );

    // A write without ttl keeps the expiry.
    node.req("PUT", &format!("/v1/docs/ttl/c?ttl={TTL_S}"), b"{\"c\":1}")
        .ok_json("PUT ttl/c with a ttl");
    let (_, _, body) = read_doc(&node, "ttl/c");
    let exp_c = body["expires_at_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("ttl/c expires_at_ms: {body}"));
    patch_ok(
        &node,
        "ttl/c",
        json!([{ "op": "set", "path": ["c"], "value": 2 }]),
    );
    let (_, _, body) = read_doc(&node, "ttl/c");
    assert_eq!(
        body["expires_at_ms"].as_u64(),
        Some(exp_c),
        "a write without ttl must leave the expiry unchanged: {body}"
    );

    // PATCH takes ttl too.
    node.req(
        "PATCH",
        &format!("/v1/docs/ttl/d?ttl={TTL_S}"),
        br#"{"ops":[{"op":"set","path":["d"],"value":1}]}"#,
    )
    .ok_json("PATCH ttl/d with a ttl");
    // No ttl at all.
    put_ok(&node, "ttl/e", &json!({ "e": 1 }));

    let listed = node.get("/v1/docs?prefix=ttl%2F").ok_json("list ttl/");
    let ids: Vec<&str> = listed["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["ttl/a", "ttl/b", "ttl/c", "ttl/d", "ttl/e"]);

    // Poll until the expiring ones read as absent; they must not vanish before their ttl.
    let deadline = Instant::now() + Duration::from_secs(TTL_S + 10);
    let mut gone: BTreeMap<&str, Duration> = BTreeMap::new();
    while gone.len() < 3 {
        for id in ["ttl/a", "ttl/c", "ttl/d"] {
            if gone.contains_key(id) {
                continue;
            }
            let r = node.get_doc(id);
            match r.status {
                200 => {}
                404 => {
                    r.assert_error(404, "not_found", &format!("GET expired {id}"));
                    gone.insert(id, t0.elapsed());
                }
                _ => panic!("GET {id}: {}", r.describe()),
            }
        }
        assert!(
            Instant::now() < deadline,
            "documents with a {TTL_S} s ttl still readable 10 s after it; gone so far: {gone:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Wait past the ttl of ttl/b, which would have expired had the clear failed.
    while t0.elapsed() < Duration::from_millis(ttl_ms + 500) {
        thread::sleep(Duration::from_millis(50));
    }
    for (id, at) in &gone {
        assert!(
            *at >= Duration::from_millis(ttl_ms - 100),
            "{id} vanished after {at:?}, before its {TTL_S} s ttl"
        );
    }
    let (doc, _, _) = read_doc(&node, "ttl/b");
    assert_eq!(doc, json!({ "b": 1, "n": 1 }));
    read_doc(&node, "ttl/e");
    let listed = node
        .get("/v1/docs?prefix=ttl%2F")
        .ok_json("list ttl/ after expiry");
    let ids: Vec<&str> = listed["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec!["ttl/b", "ttl/e"],
        "expired documents must be left out of listings"
    );
    node.delete_doc("ttl/a")
        .assert_error(404, "not_found", "DELETE of an expired document");
}

// ---------------------------------------------------------------------------------------------
// watch
// ---------------------------------------------------------------------------------------------

#[test]
fn watch_without_prefix_sees_every_document() {
    let node = Node::start("test-watchall");
    let mut sse =
        SseStream::open(node.addr, "/v1/watch", Duration::from_secs(10)).expect("open watch");
    assert_eq!(sse.status, 200, "watch status");
    let mut warmed = false;
    for i in 0..40 {
        put_ok(&node, &format!("warm-{i}"), &json!({ "i": i }));
        if sse.next_event(Duration::from_millis(500)).is_some() {
            warmed = true;
            break;
        }
    }
    assert!(
        warmed,
        "no event on an unfiltered watch stream after 40 writes"
    );
    let mut expected = Vec::new();
    for id in ["a/1", "b/2", "zzz"] {
        expected.push((id.to_string(), put_ok(&node, id, &json!({ "id": id }))));
    }
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let ev = sse
            .next_event(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("watch: events missing; seen {seen:?}"));
        let data: Value = serde_json::from_str(&ev.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {ev:?}"));
        let id = data["id"].as_str().unwrap_or_default().to_string();
        if id.starts_with("warm-") {
            continue;
        }
        assert_eq!(ev.event, "change", "{ev:?}");
        seen.push((id, assert_heads(&data["heads"], "event heads")));
    }
    assert_eq!(seen, expected, "events (id, heads) in commit order");
}

#[test]
fn watch_streams_changes_under_the_prefix_only() {
    let node = Node::start("test-watch");
    let mut sse = SseStream::open(node.addr, "/v1/watch?prefix=w%2F", Duration::from_secs(10))
        .expect("open watch");
    assert_eq!(sse.status, 200, "watch status");
    let ct = sse
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");

    // The subscription may become active a moment after the headers: write warm-up documents
    // until one is seen, so the real check below does not race with it.
    let mut warmed = false;
    for i in 0..40 {
        put_ok(&node, &format!("w/warm-{i}"), &json!({ "i": i }));
        if let Some(ev) = sse.next_event(Duration::from_millis(500)) {
            assert_eq!(ev.event, "change", "{ev:?}");
            warmed = true;
            break;
        }
    }
    assert!(
        warmed,
        "no event on the watch stream after 40 writes under its prefix"
    );

    let heads_a = put_ok(&node, "w/a", &json!({ "x": 1 }));
    put_ok(&node, "x/b", &json!({ "x": 1 }));
    let heads_end = patch_ok(
        &node,
        "w/end",
        json!([{ "op": "set", "path": ["e"], "value": 1 }]),
    );

    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = sse
            .next_event(left)
            .unwrap_or_else(|| panic!("watch: no event for w/end within 10 s; seen {seen:?}"));
        let data: Value = serde_json::from_str(&ev.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {ev:?}"));
        let id = data["id"]
            .as_str()
            .unwrap_or_else(|| panic!("event without id: {ev:?}"))
            .to_string();
        if id.starts_with("w/warm-") {
            continue;
        }
        let done = id == "w/end";
        seen.push((ev.event.clone(), data));
        if done {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "expected exactly the events for w/a and w/end (x/b is outside the prefix): {seen:?}"
    );
    let (event, data) = &seen[0];
    assert_eq!(event, "change");
    assert_eq!(data["id"], json!("w/a"));
    assert_eq!(
        assert_heads(&data["heads"], "event heads"),
        heads_a,
        "event heads must equal the PUT's heads"
    );
    assert_eq!(data["deleted"], json!(false));
    assert_eq!(assert_heads(&seen[1].1["heads"], "event heads"), heads_end);

    // A delete is announced as deleted.
    let del = node.delete_doc("w/a").ok_json("DELETE w/a");
    let del_heads = heads_of(&del, "DELETE w/a");
    loop {
        let ev = sse
            .next_event(Duration::from_secs(10))
            .expect("no event for the delete of w/a");
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        if data["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("w/warm-"))
        {
            continue;
        }
        assert_eq!(ev.event, "change");
        assert_eq!(data["id"], json!("w/a"), "{data}");
        assert_eq!(data["deleted"], json!(true), "{data}");
        assert_eq!(assert_heads(&data["heads"], "delete event"), del_heads);
        break;
    }
}

// ---------------------------------------------------------------------------------------------
// node
// ---------------------------------------------------------------------------------------------

#[test]
fn status_and_probes() {
    let node = Node::start("test-status");
    for i in 0..3 {
        put_ok(&node, &format!("st/{i}"), &json!({ "i": i }));
    }
    let st = node.get("/v1/status").ok_json("GET /v1/status");
    assert_eq!(st["node_id"], json!("test-status"), "{st}");
    assert_eq!(st["docs"], json!(3), "{st}");
    assert!(st["version"].is_string(), "{st}");
    assert!(st["uptime_ms"].is_u64(), "{st}");
    assert!(st["write_queue_depth"].is_u64(), "{st}");
    let members = st["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members: {st}"));
    assert!(
        members
            .iter()
            .any(|m| m["node_id"] == json!("test-status") && m["state"] == json!("self")),
        "members must list this node as self: {st}"
    );

    let h = node.get("/healthz");
    assert_eq!(h.status, 200, "{}", h.describe());
    assert_eq!(h.text().trim(), "ok");
    let r = node.get("/readyz");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.text().trim(), "ready");
}

/// Samples of the Prometheus text: `name{labels}` → value.
fn metric_samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        // `name{labels} value [timestamp]`; label values may contain spaces, so split after `}`.
        let (key, rest) = match line.find('}') {
            Some(p) => (&line[..=p], &line[p + 1..]),
            None => match line.split_once(' ') {
                Some((k, r)) => (k, r),
                None => continue,
            },
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            out.insert(key.to_string(), v);
        }
    }
    out
}

#[test]
fn metrics_expose_a_write_counter_that_increases() {
    let node = Node::start("test-metrics");
    let r = node.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.describe());
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain") || ct.starts_with("application/openmetrics-text"),
        "content-type {ct:?}"
    );
    let before = metric_samples(&r.text());
    assert!(
        before.keys().any(|k| k.starts_with("verge_")),
        "no metric named verge_*:\n{}",
        r.text()
    );

    patch_ok(&node, "m/1", json!([{ "op": "inc", "path": ["n"] }]));
    let after_text = node.get("/metrics").text();
    let after = metric_samples(&after_text);
    let is_write_counter = |k: &str| {
        let name = k.split('{').next().unwrap_or("");
        name.starts_with("verge_")
            && name.contains("write")
            && !name.contains("queue")
            && !name.contains("depth")
    };
    let increased: Vec<(&String, f64, f64)> = after
        .iter()
        .filter(|(k, _)| is_write_counter(k))
        .filter_map(|(k, v)| {
            let b = before.get(k).copied().unwrap_or(0.0);
            (*v >= b + 1.0).then_some((k, b, *v))
        })
        .collect();
    assert!(
        !increased.is_empty(),
        "no verge_*write* sample grew by at least 1 after a write.\nbefore:\n{before:#?}\nafter:\n{after_text}"
    );
}

// ---------------------------------------------------------------------------------------------
// bad inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_json_and_non_object_documents() {
    let node = Node::start("test-badjson");
    put_ok(&node, "bj/1", &json!({ "keep": 1 }));
    let mut b = BadInputs::new(&node);
    b.expect(
        "truncated JSON on PUT",
        "PUT",
        "/v1/docs/bj/1",
        br#"{"a":"#,
        400,
        "invalid_json",
    );
    b.expect(
        "empty PUT body",
        "PUT",
        "/v1/docs/bj/1",
        b"",
        400,
        "invalid_json",
    );
    b.expect(
        "trailing garbage",
        "PUT",
        "/v1/docs/bj/1",
        br#"{"a":1} x"#,
        400,
        "invalid_json",
    );
    b.expect(
        "invalid UTF-8",
        "PUT",
        "/v1/docs/bj/1",
        b"{\"a\":\"\xff\xfe\"}",
        400,
        "invalid_json",
    );
    b.expect(
        "truncated JSON on PATCH",
        "PATCH",
        "/v1/docs/bj/1",
        br#"{"ops":[{"op":"#,
        400,
        "invalid_json",
    );
    let deep = format!("{}1{}", "{\"a\":".repeat(40), "}".repeat(40));
    b.expect(
        "JSON nested 40 levels",
        "PUT",
        "/v1/docs/bj/1",
        deep.as_bytes(),
        400,
        "invalid_document",
    );
    let deep_patch = format!(
        r#"{{"ops":[{{"op":"set","path":["a"],"value":{}1{}}}]}}"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    b.expect(
        "PATCH value nested 40 levels",
        "PATCH",
        "/v1/docs/bj/1",
        deep_patch.as_bytes(),
        400,
        "invalid_op",
    );

    b.expect(
        "PUT of an array",
        "PUT",
        "/v1/docs/bj/1",
        b"[1,2]",
        400,
        "invalid_document",
    );
    b.expect(
        "PUT of a number",
        "PUT",
        "/v1/docs/bj/1",
        b"5",
        400,
        "invalid_document",
    );
    b.expect(
        "PUT of a string",
        "PUT",
        "/v1/docs/bj/1",
        b"\"s\"",
        400,
        "invalid_document",
    );
    b.expect(
        "PUT of null",
        "PUT",
        "/v1/docs/bj/1",
        b"null",
        400,
        "invalid_document",
    );
    b.expect(
        "PUT with the reserved key _verge",
        "PUT",
        "/v1/docs/bj/1",
        br#"{"_verge":1}"#,
        400,
        "invalid_document",
    );
    b.expect(
        "PUT with _verge beside other keys",
        "PUT",
        "/v1/docs/bj/2",
        br#"{"a":1,"_verge":{"x":1}}"#,
        400,
        "invalid_document",
    );
    // Nothing of that was applied.
    let (doc, _, _) = read_doc(&node, "bj/1");
    b.check(
        doc == json!({ "keep": 1 }),
        format!("bj/1 changed by rejected writes: {doc}"),
    );
    let r = node.get_doc("bj/2");
    b.check(
        r.status == 404,
        format!("a rejected PUT created bj/2: {}", r.describe()),
    );
    // A moderately nested document is fine.
    let ok = format!("{}1{}", "{\"a\":".repeat(10), "}".repeat(10));
    let r = node.req("PUT", "/v1/docs/bj/3", ok.as_bytes());
    b.check(
        r.status == 200,
        format!("PUT of a document nested 10 levels: {}", r.describe()),
    );
    b.finish("malformed JSON");
}

#[test]
fn documents_cannot_grow_past_their_limit() {
    // docs/api.md: 413 too_large when "the write would grow the document past its limit". The
    // limit's value is not part of the contract, so write ~900 KiB at a time (each body under
    // the request limit) until the node refuses, within a bound.
    let node = Node::start("test-doclimit");
    let chunk = "y".repeat(900 * 1024);
    let mut accepted = 0;
    let mut refused = None;
    for i in 0..16 {
        let body =
            json!({ "ops": [{ "op": "set", "path": [format!("part{i}")], "value": chunk }] });
        let r = node.req("PATCH", "/v1/docs/grow/1", body.to_string().as_bytes());
        match r.status {
            200 => accepted += 1,
            _ => {
                refused = Some(r);
                break;
            }
        }
    }
    let r = refused.unwrap_or_else(|| {
        panic!("the node accepted {accepted} writes of 900 KiB (~{} MiB) into one document without 413", accepted * 9 / 10)
    });
    r.assert_error(
        413,
        "too_large",
        &format!("write after {accepted} accepted 900 KiB writes"),
    );
    assert!(accepted >= 1, "even the first 900 KiB write was refused");
    // The refused write was not applied, the document still reads, and the node serves.
    let (doc, _, _) = read_doc(&node, "grow/1");
    let keys = doc.as_object().unwrap().len();
    assert_eq!(
        keys, accepted,
        "the document has {keys} parts after {accepted} accepted writes"
    );
    node.assert_serving("a refused oversized document");
}

#[test]
fn oversized_bodies_are_413() {
    let node = Node::start("test-toolarge");
    let mut b = BadInputs::new(&node);
    let big = format!(r#"{{"big":"{}"}}"#, "x".repeat(1536 * 1024));
    b.expect(
        "PUT of 1.5 MiB",
        "PUT",
        "/v1/docs/big/1",
        big.as_bytes(),
        413,
        "too_large",
    );
    let big_patch = format!(
        r#"{{"ops":[{{"op":"set","path":["big"],"value":"{}"}}]}}"#,
        "x".repeat(1536 * 1024)
    );
    b.expect(
        "PATCH of 1.5 MiB",
        "PATCH",
        "/v1/docs/big/1",
        big_patch.as_bytes(),
        413,
        "too_large",
    );
    let big_sync = vec![0x42u8; 5 * 1024 * 1024];
    b.expect(
        "sync body of 5 MiB",
        "POST",
        "/v1/sync/big/1",
        &big_sync,
        413,
        "too_large",
    );
    let r = node.get_doc("big/1");
    b.check(
        r.status == 404,
        format!("a rejected oversized write created big/1: {}", r.describe()),
    );
    b.finish("oversized bodies");
}

#[test]
fn invalid_ids_are_400_on_every_route() {
    let node = Node::start("test-badids");
    let long300 = "a".repeat(300);
    let long257 = "a".repeat(257);
    let bad: Vec<(&str, String)> = vec![
        ("nothing (empty)", String::new()),
        ("a space", "a%20b".to_string()),
        ("a NUL byte", "a%00b".to_string()),
        ("300 bytes", long300),
        ("257 bytes", long257),
        ("non-ASCII", "caf%C3%A9".to_string()),
        ("a quote", "a%22b".to_string()),
        ("a question mark", "a%3Fb".to_string()),
        ("a backslash", "a%5Cb".to_string()),
    ];
    let mut b = BadInputs::new(&node);
    for (what, id) in &bad {
        b.expect(
            &format!("GET id with {what}"),
            "GET",
            &format!("/v1/docs/{id}"),
            b"",
            400,
            "invalid_id",
        );
        b.expect(
            &format!("PUT id with {what}"),
            "PUT",
            &format!("/v1/docs/{id}"),
            b"{\"a\":1}",
            400,
            "invalid_id",
        );
        b.expect(
            &format!("PATCH id with {what}"),
            "PATCH",
            &format!("/v1/docs/{id}"),
            br#"{"ops":[{"op":"inc","path":["n"]}]}"#,
            400,
            "invalid_id",
        );
        b.expect(
            &format!("DELETE id with {what}"),
            "DELETE",
            &format!("/v1/docs/{id}"),
            b"",
            400,
            "invalid_id",
        );
        b.expect(
            &format!("sync id with {what}"),
            "POST",
            &format!("/v1/sync/{id}"),
            &empty_doc_sync_message(),
            400,
            "invalid_id",
        );
    }
    let listed = node.get("/v1/docs?limit=1000").ok_json("list");
    let n = listed["docs"].as_array().unwrap().len();
    b.check(
        n == 0,
        format!("rejected writes created documents: {listed}"),
    );
    b.finish("invalid ids");
}

#[test]
fn invalid_ops_are_400_invalid_op() {
    let node = Node::start("test-badops");
    put_ok(&node, "bo/1", &json!({ "keep": 1 }));
    let mut b = BadInputs::new(&node);
    let cases: Vec<(&str, Value)> = vec![
        (
            "unknown op",
            json!({ "ops": [{ "op": "bump", "path": ["a"] }] }),
        ),
        (
            "op missing",
            json!({ "ops": [{ "path": ["a"], "value": 1 }] }),
        ),
        (
            "set without value",
            json!({ "ops": [{ "op": "set", "path": ["a"] }] }),
        ),
        (
            "set without path",
            json!({ "ops": [{ "op": "set", "value": 1 }] }),
        ),
        (
            "by as a string",
            json!({ "ops": [{ "op": "inc", "path": ["n"], "by": "2" }] }),
        ),
        (
            "by as a float",
            json!({ "ops": [{ "op": "inc", "path": ["n"], "by": 1.5 }] }),
        ),
        (
            "path not an array",
            json!({ "ops": [{ "op": "set", "path": "a", "value": 1 }] }),
        ),
        (
            "path element a bool",
            json!({ "ops": [{ "op": "set", "path": [true], "value": 1 }] }),
        ),
        (
            "path element null",
            json!({ "ops": [{ "op": "set", "path": ["a", null], "value": 1 }] }),
        ),
        (
            "path element an object",
            json!({ "ops": [{ "op": "set", "path": [{ "k": 1 }], "value": 1 }] }),
        ),
        (
            "negative list index",
            json!({ "ops": [{ "op": "set", "path": ["l", -1], "value": 1 }] }),
        ),
        (
            "fractional list index",
            json!({ "ops": [{ "op": "set", "path": ["l", 1.5], "value": 1 }] }),
        ),
        (
            "empty path for set",
            json!({ "ops": [{ "op": "set", "path": [], "value": 1 }] }),
        ),
        (
            "empty path for del",
            json!({ "ops": [{ "op": "del", "path": [] }] }),
        ),
        (
            "splice index as a string",
            json!({ "ops": [{ "op": "splice", "path": ["t"], "index": "0", "text": "x" }] }),
        ),
        (
            "splice text as a number",
            json!({ "ops": [{ "op": "splice", "path": ["t"], "index": 0, "text": 5 }] }),
        ),
        (
            "op as a number",
            json!({ "ops": [{ "op": 3, "path": ["a"], "value": 1 }] }),
        ),
        (
            "path of 33 elements",
            json!({ "ops": [{ "op": "set", "path": (0..33).map(|i| format!("k{i}")).collect::<Vec<_>>(), "value": 1 }] }),
        ),
        (
            "1001 ops",
            json!({ "ops": (0..1001).map(|i| json!({ "op": "set", "path": [format!("k{i}")], "value": i })).collect::<Vec<_>>() }),
        ),
        // A bad op after good ones rejects the whole PATCH.
        (
            "bad op after a good one",
            json!({ "ops": [{ "op": "set", "path": ["x"], "value": 1 }, { "op": "bump", "path": ["a"] }] }),
        ),
    ];
    for (what, body) in &cases {
        b.expect(
            what,
            "PATCH",
            "/v1/docs/bo/1",
            body.to_string().as_bytes(),
            400,
            "invalid_op",
        );
    }
    let (doc, _, _) = read_doc(&node, "bo/1");
    b.check(
        doc == json!({ "keep": 1 }),
        format!("rejected PATCHes changed the document: {doc}"),
    );
    // Exactly 1000 ops is allowed.
    let ops: Vec<Value> = (0..1000)
        .map(|i| json!({ "op": "set", "path": [format!("k{i}")], "value": i }))
        .collect();
    let r = node.patch_doc("bo/2", Value::Array(ops));
    b.check(
        r.status == 200,
        format!("PATCH of exactly 1000 ops: {}", r.describe()),
    );
    b.finish("invalid ops");
}

#[test]
fn ops_that_do_not_fit_the_document_are_422() {
    let node = Node::start("test-422");
    put_ok(
        &node,
        "na/1",
        &json!({ "s": "str", "num": 1, "l": [1, 2], "m": { "k": 1 } }),
    );
    patch_ok(
        &node,
        "na/1",
        json!([{ "op": "splice", "path": ["t"], "index": 0, "text": "abc" }]),
    );
    let (before, heads_before, _) = read_doc(&node, "na/1");
    let mut b = BadInputs::new(&node);
    let cases: Vec<(&str, Value)> = vec![
        (
            "inc on a string",
            json!([{ "op": "inc", "path": ["s"], "by": 1 }]),
        ),
        (
            "inc on a plain number",
            json!([{ "op": "inc", "path": ["num"], "by": 1 }]),
        ),
        (
            "inc on a list",
            json!([{ "op": "inc", "path": ["l"], "by": 1 }]),
        ),
        (
            "set past the end of a list",
            json!([{ "op": "set", "path": ["l", 5], "value": 1 }]),
        ),
        (
            "insert past the end of a list",
            json!([{ "op": "insert", "path": ["l", 3], "value": 1 }]),
        ),
        (
            "del past the end of a list",
            json!([{ "op": "del", "path": ["l", 2] }]),
        ),
        (
            "a path through a scalar",
            json!([{ "op": "set", "path": ["s", "x"], "value": 1 }]),
        ),
        (
            "a string key into a list",
            json!([{ "op": "set", "path": ["l", "x"], "value": 1 }]),
        ),
        (
            "a list index into a map",
            json!([{ "op": "set", "path": ["m", 0], "value": 1 }]),
        ),
        (
            "push onto a string",
            json!([{ "op": "push", "path": ["s"], "value": 1 }]),
        ),
        (
            "splice on a plain string",
            json!([{ "op": "splice", "path": ["s"], "index": 0, "text": "x" }]),
        ),
        (
            "splice on a number",
            json!([{ "op": "splice", "path": ["num"], "index": 0, "text": "x" }]),
        ),
        (
            "splice past the end of a text",
            json!([{ "op": "splice", "path": ["t"], "index": 4, "text": "x" }]),
        ),
        (
            "splice deleting past the end",
            json!([{ "op": "splice", "path": ["t"], "index": 1, "delete": 5 }]),
        ),
        // Atomic: a good op before a failing one is not applied either.
        (
            "good op then inc on a string",
            json!([{ "op": "set", "path": ["new"], "value": 1 }, { "op": "inc", "path": ["s"] }]),
        ),
    ];
    for (what, ops) in &cases {
        let body = json!({ "ops": ops }).to_string();
        b.expect(
            what,
            "PATCH",
            "/v1/docs/na/1",
            body.as_bytes(),
            422,
            "op_not_applicable",
        );
    }
    let (after, heads_after, _) = read_doc(&node, "na/1");
    b.check(
        after == before,
        format!("rejected ops changed the document: {before} -> {after}"),
    );
    b.check(
        heads_after == heads_before,
        "rejected ops changed the heads".to_string(),
    );
    b.finish("op_not_applicable");
}

#[test]
fn unknown_routes_are_404_and_wrong_methods_405() {
    let node = Node::start("test-routes");
    let mut b = BadInputs::new(&node);
    b.expect(
        "unknown /v1 route",
        "GET",
        "/v1/nope",
        b"",
        404,
        "not_found",
    );
    b.expect(
        "unknown top-level route",
        "GET",
        "/nope",
        b"",
        404,
        "not_found",
    );
    b.expect(
        "unknown version",
        "GET",
        "/v2/docs/x",
        b"",
        404,
        "not_found",
    );
    b.expect(
        "POST on a document",
        "POST",
        "/v1/docs/x",
        b"{}",
        405,
        "method_not_allowed",
    );
    b.expect(
        "POST on a document with a slash id",
        "POST",
        "/v1/docs/a/b",
        b"{}",
        405,
        "method_not_allowed",
    );
    b.expect(
        "PUT on the listing",
        "PUT",
        "/v1/docs",
        b"{}",
        405,
        "method_not_allowed",
    );
    b.expect(
        "GET on sync",
        "GET",
        "/v1/sync/x",
        b"",
        405,
        "method_not_allowed",
    );
    b.expect(
        "POST on status",
        "POST",
        "/v1/status",
        b"",
        405,
        "method_not_allowed",
    );
    b.expect(
        "DELETE on healthz",
        "DELETE",
        "/healthz",
        b"",
        405,
        "method_not_allowed",
    );
    b.finish("routes");
}

#[test]
fn malformed_query_parameters_are_invalid_query() {
    let node = Node::start("test-badquery");
    put_ok(&node, "bq/1", &json!({ "a": 1 }));
    let mut b = BadInputs::new(&node);
    for limit in ["0", "5000", "1001", "abc", "-1", "1.5", ""] {
        b.expect(
            &format!("limit={limit:?}"),
            "GET",
            &format!("/v1/docs?limit={limit}"),
            b"",
            400,
            "invalid_query",
        );
    }
    b.expect(
        "cursor with a space",
        "GET",
        "/v1/docs?cursor=a%20b",
        b"",
        400,
        "invalid_query",
    );
    b.expect(
        "prefix with a space",
        "GET",
        "/v1/docs?prefix=a%20b",
        b"",
        400,
        "invalid_query",
    );
    b.expect(
        "watch prefix with a space",
        "GET",
        "/v1/watch?prefix=a%20b",
        b"",
        400,
        "invalid_query",
    );
    for ttl in ["abc", "-1", "315360001", "1.5", ""] {
        b.expect(
            &format!("PUT ttl={ttl:?}"),
            "PUT",
            &format!("/v1/docs/bq/1?ttl={ttl}"),
            b"{\"a\":2}",
            400,
            "invalid_query",
        );
        b.expect(
            &format!("PATCH ttl={ttl:?}"),
            "PATCH",
            &format!("/v1/docs/bq/1?ttl={ttl}"),
            br#"{"ops":[{"op":"set","path":["a"],"value":3}]}"#,
            400,
            "invalid_query",
        );
    }
    let (doc, _, body) = read_doc(&node, "bq/1");
    b.check(
        doc == json!({ "a": 1 }),
        format!("writes with a bad ttl were applied: {doc}"),
    );
    b.check(
        body["expires_at_ms"].is_null(),
        format!("a bad ttl set an expiry: {body}"),
    );
    // The boundaries are accepted.
    for target in ["/v1/docs?limit=1", "/v1/docs?limit=1000"] {
        let r = node.get(target);
        b.check(r.status == 200, format!("GET {target}: {}", r.describe()));
    }
    let r = node.req("PUT", "/v1/docs/bq/2?ttl=315360000", b"{\"a\":1}");
    b.check(
        r.status == 200,
        format!("PUT ttl=315360000 (ten years): {}", r.describe()),
    );
    b.finish("bad query");
}

/// The first sync message of an empty replica.
fn empty_doc_sync_message() -> Vec<u8> {
    let doc = automerge::Automerge::new();
    let mut st = SyncState::new();
    doc.generate_sync_message(&mut st)
        .expect("first message")
        .encode()
}

#[test]
fn bad_sync_messages_are_400_invalid_sync_message() {
    let node = Node::start("test-badsync");
    // A real message carrying changes, to truncate.
    let mut doc = AutoCommit::new();
    for i in 0..20 {
        doc.put(ROOT, format!("k{i}"), "some value that takes a few bytes")
            .unwrap();
        doc.commit();
    }
    let mut st = SyncState::new();
    let first = doc
        .sync()
        .generate_sync_message(&mut st)
        .expect("first message");
    // Give the message changes so it is long: pretend the peer has nothing.
    let mut with_changes = first.clone();
    with_changes.changes = ChunkList::from(doc.save());
    with_changes.version = MessageVersion::V2;
    let full = with_changes.encode();
    let truncated = full[..full.len() / 2].to_vec();
    assert!(
        Message::decode(&truncated).is_err(),
        "test precondition: the truncated message must not decode"
    );

    // A well-formed message whose changes are garbage.
    let bad_changes = Message {
        heads: vec![],
        need: vec![],
        have: vec![],
        changes: ChunkList::from(vec![vec![
            0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 5, 6, 7, 8, 9,
        ]]),
        flags: None,
        version: MessageVersion::V1,
    }
    .encode();
    assert!(
        Message::decode(&bad_changes).is_ok(),
        "test precondition: the bad-changes message decodes"
    );

    let mut b = BadInputs::new(&node);
    b.expect(
        "garbage bytes",
        "POST",
        "/v1/sync/bs/1",
        b"\x00\x01\x02 this is not automerge \xff\xfe",
        400,
        "invalid_sync_message",
    );
    b.expect(
        "empty body",
        "POST",
        "/v1/sync/bs/1",
        b"",
        400,
        "invalid_sync_message",
    );
    b.expect(
        "a JSON body",
        "POST",
        "/v1/sync/bs/1",
        br#"{"ops":[]}"#,
        400,
        "invalid_sync_message",
    );
    b.expect(
        "a truncated real message",
        "POST",
        "/v1/sync/bs/1",
        &truncated,
        400,
        "invalid_sync_message",
    );
    b.expect(
        "only the message type byte",
        "POST",
        "/v1/sync/bs/1",
        &[0x42],
        400,
        "invalid_sync_message",
    );
    b.expect(
        "changes that do not decode",
        "POST",
        "/v1/sync/bs/1",
        &bad_changes,
        400,
        "invalid_sync_message",
    );
    // A change chunk that made Automerge panic under fuzzing (truncated bundle column).
    let crasher = automerge::sync::Message {
        heads: vec![],
        need: vec![],
        have: vec![],
        changes: vec![vec![
            0x85, 0x6f, 0x4a, 0x83, 0x85, 0x6f, 0x4b, 0x83, 0x03, 0x09, 0x00, 0x00, 0x00, 0x01,
            0x23, 0x03, 0x83, 0x6f, 0x00,
        ]]
        .into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    }
    .encode();
    b.expect(
        "a change chunk that once panicked Automerge",
        "POST",
        "/v1/sync/bs/1",
        &crasher,
        400,
        "invalid_sync_message",
    );
    node.assert_serving("after the fuzzed crasher on the sync route");
    // A `have` whose Bloom filter has zero bits per entry, sent for a document with history:
    // it made Automerge divide by zero while answering (found by fuzzing).
    put_ok(&node, "bs/history", &json!({ "a": 1 }));
    b.expect(
        "a Bloom filter with zero bits per entry",
        "POST",
        "/v1/sync/bs/history",
        &[
            0x42, 0x00, 0x00, 0x01, 0x00, 0x08, 0x42, 0x00, 0x00, 0x00, 0x25, 0x00, 0x00, 0x00,
            0x00,
        ],
        400,
        "invalid_sync_message",
    );
    node.assert_serving("after the zero-bit Bloom filter on the sync route");
    let r = node.get_doc("bs/1");
    b.check(
        r.status == 404,
        format!("rejected sync messages created bs/1: {}", r.describe()),
    );
    // The full message is fine and creates the document.
    let r = node.req("POST", "/v1/sync/bs/2", &full);
    b.check(
        r.status == 200,
        format!("POST of the full message: {}", r.describe()),
    );
    if r.status == 200 {
        let (got, _, _) = read_doc(&node, "bs/2");
        b.check(
            got["k0"] == json!("some value that takes a few bytes")
                && got.as_object().map(|o| o.len()) == Some(20),
            format!("document from the full message: {got}"),
        );
    }
    b.finish("bad sync");
}

/// Integers are kept exactly across the whole 64-bit range (beyond JavaScript's 2^53), and a
/// literal beyond it is refused rather than rounded to the nearest float.
#[test]
fn integers_are_exact_in_64_bits_and_refused_beyond() {
    let node = Node::start("test-bigint");
    let body = br#"{"a": 9007199254740993, "b": -9223372036854775808, "c": 18446744073709551615}"#;
    let r = node.req("PUT", "/v1/docs/ints/ok", body);
    assert_eq!(r.status, 200, "{}", r.describe());
    let text = node.get_doc("ints/ok").text();
    for literal in [
        "9007199254740993",
        "-9223372036854775808",
        "18446744073709551615",
    ] {
        assert!(text.contains(literal), "{literal} not kept exactly: {text}");
    }
    let beyond = [
        ("PUT", br#"{"n": 18446744073709551616}"#.to_vec()),
        ("PUT", br#"{"n": [1, -9223372036854775809]}"#.to_vec()),
        (
            "PATCH",
            br#"{"ops": [{"op": "set", "path": ["n"], "value": 100000000000000000000}]}"#.to_vec(),
        ),
        (
            "PATCH",
            br#"{"ops": [{"op": "inc", "path": ["n"], "by": 99999999999999999999}]}"#.to_vec(),
        ),
    ];
    for (method, body) in beyond {
        let r = node.req(method, "/v1/docs/ints/beyond", &body);
        r.assert_error(
            400,
            "invalid_json",
            &format!("{method} with an integer beyond 64 bits"),
        );
        assert!(r.text().contains("64-bit"), "{}", r.text());
    }
    assert_eq!(
        node.get_doc("ints/beyond").status,
        404,
        "nothing was written"
    );
    // Floats stay floats, however large.
    let r = node.req(
        "PUT",
        "/v1/docs/ints/float",
        br#"{"f": 1.5e300, "g": 1e20}"#,
    );
    assert_eq!(r.status, 200, "{}", r.describe());
}
