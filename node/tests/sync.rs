//! A document edited over HTTP and through a separate Rust Automerge replica syncing with
//! `POST /v1/sync/{id}` converges.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Barrier;
use std::thread;

use automerge::sync::{Message, State as SyncState, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{
    AutoCommit, AutoSerde, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value as AmValue,
};
use serde_json::{Value, json};

use common::{Node, heads_of};

/// Rounds of the sync loop before the test gives up.
const MAX_ROUNDS: usize = 10;

/// Syncs `replica` with document `id` on the node until the replica has nothing more to send.
/// Returns the number of round trips.
///
/// Each call is a new sync session, as for a client that syncs now and then (an edge function
/// invocation): the state is reloaded from its persisted form, which keeps the shared heads and
/// forgets in-flight bookkeeping. Without that, a replica with no local changes whose previous
/// session ended in agreement generates no message at all and never learns of changes made on
/// the node since (Automerge expects the peer to push them on a live connection).
fn sync(node: &Node, id: &str, replica: &mut AutoCommit, state: &mut SyncState) -> usize {
    *state = SyncState::decode(&state.encode()).expect("sync state round-trips");
    for round in 0..MAX_ROUNDS {
        let Some(msg) = replica.sync().generate_sync_message(state) else {
            return round;
        };
        let r = node.req("POST", &format!("/v1/sync/{id}"), &msg.encode());
        assert_eq!(
            r.status,
            200,
            "sync round {round} of {id}: {}",
            r.describe()
        );
        let ct = r.header("content-type").unwrap_or("");
        assert!(
            ct.starts_with("application/octet-stream"),
            "sync response content-type {ct:?}"
        );
        let reply = Message::decode(&r.body).unwrap_or_else(|e| {
            panic!(
                "sync round {round}: the node's reply does not decode: {e:?} ({} bytes)",
                r.body.len()
            )
        });
        replica
            .sync()
            .receive_sync_message(state, reply)
            .unwrap_or_else(|e| {
                panic!("sync round {round}: the replica rejects the node's reply: {e}")
            });
    }
    panic!("sync of {id} did not finish in {MAX_ROUNDS} rounds");
}

/// Syncs a peer whose copy predates the document's current incarnation until the node answers
/// anything but 200, and returns that status.
fn stale_sync_status(
    node: &Node,
    id: &str,
    replica: &mut AutoCommit,
    state: &mut SyncState,
) -> u16 {
    // As `sync` does: a peer keeps only the persistent part of its state between syncs.
    *state = SyncState::decode(&state.encode()).expect("sync state round-trips");
    for _ in 0..MAX_ROUNDS {
        let msg = replica
            .sync()
            .generate_sync_message(state)
            .expect("a stale peer has something to say");
        let r = node.req("POST", &format!("/v1/sync/{id}"), &msg.encode());
        if r.status != 200 {
            assert!(r.text().contains("document_replaced"), "{}", r.describe());
            return r.status;
        }
        let reply = Message::decode(&r.body).expect("decodes");
        replica
            .sync()
            .receive_sync_message(state, reply)
            .expect("receives");
    }
    panic!("the node kept answering a stale peer with 200");
}

/// The replica's document as JSON, without Verge's reserved root keys (`_verge…`, which hold
/// the tombstone and expiry and which the HTTP view hides).
fn replica_json(replica: &AutoCommit) -> Value {
    let mut v = serde_json::to_value(AutoSerde::from(replica)).unwrap();
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| !k.starts_with("_verge"));
    }
    v
}

/// The replica's heads as sorted hex strings.
fn replica_heads(replica: &mut AutoCommit) -> Vec<String> {
    let mut h: Vec<String> = replica.get_heads().iter().map(|h| h.to_string()).collect();
    h.sort();
    h
}

/// GET over HTTP: (doc JSON, sorted heads).
fn http_doc(node: &Node, id: &str) -> (Value, Vec<String>) {
    let body = node.get_doc(id).ok_json(&format!("GET {id}"));
    (body["doc"].clone(), heads_of(&body, &format!("GET {id}")))
}

/// Reads a counter at a root key of the replica.
fn replica_counter(replica: &AutoCommit, key: &str) -> Option<i64> {
    match replica.get(ROOT, key).unwrap() {
        Some((AmValue::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Counter(c) => Some(i64::from(c)),
            _ => None,
        },
        _ => None,
    }
}

/// The list at a root key of the replica and its items, which must be strings.
fn replica_strings(replica: &AutoCommit, key: &str) -> (ObjId, Vec<String>) {
    let list = match replica.get(ROOT, key).expect("read the replica") {
        Some((AmValue::Object(ObjType::List), obj)) => obj,
        other => panic!("{key} is not a list in the replica: {other:?}"),
    };
    let items = (0..replica.length(&list))
        .map(|i| match replica.get(&list, i).expect("read a list item") {
            Some((AmValue::Scalar(s), _)) => match s.as_ref() {
                ScalarValue::Str(t) => t.to_string(),
                other => panic!("{key}[{i}] is not a string: {other:?}"),
            },
            other => panic!("{key}[{i}] is not a scalar: {other:?}"),
        })
        .collect();
    (list, items)
}

#[test]
fn http_edits_and_replica_edits_converge() {
    let node = Node::start("test-sync1");
    let id = "s/1";
    let r = node.patch_doc(
        id,
        json!([
            { "op": "set", "path": ["title"], "value": "hello" },
            { "op": "inc", "path": ["n"], "by": 5 },
            { "op": "push", "path": ["items"], "value": "a" }
        ]),
    );
    r.ok_json("PATCH s/1");

    // A fresh replica pulls the document.
    let mut replica = AutoCommit::new();
    let mut state = SyncState::new();
    sync(&node, id, &mut replica, &mut state);
    let (http, http_heads) = http_doc(&node, id);
    assert_eq!(http, json!({ "title": "hello", "n": 5, "items": ["a"] }));
    assert_eq!(replica_json(&replica), http, "replica after the first sync");
    assert_eq!(
        replica_heads(&mut replica),
        http_heads,
        "heads after the first sync"
    );
    assert_eq!(
        replica_counter(&replica, "n"),
        Some(5),
        "the HTTP inc must arrive as an Automerge counter"
    );

    // The replica edits locally: a new key, the HTTP-created counter, the list.
    replica.put(ROOT, "from_replica", "yes").unwrap();
    replica.increment(ROOT, "n", 3).unwrap();
    let items = match replica.get(ROOT, "items").unwrap() {
        Some((AmValue::Object(ObjType::List), obj)) => obj,
        other => panic!("items is not a list in the replica: {other:?}"),
    };
    replica.insert(&items, 1, "b").unwrap();
    replica.commit();
    sync(&node, id, &mut replica, &mut state);
    let (http, http_heads) = http_doc(&node, id);
    assert_eq!(
        http,
        json!({ "title": "hello", "n": 8, "items": ["a", "b"], "from_replica": "yes" }),
        "HTTP must show the replica's edits"
    );
    assert_eq!(
        replica_heads(&mut replica),
        http_heads,
        "heads after pushing the replica's edits"
    );

    // HTTP keeps working on the synced document.
    node.patch_doc(id, json!([{ "op": "inc", "path": ["n"], "by": 1 }]))
        .ok_json("PATCH after sync");
    sync(&node, id, &mut replica, &mut state);
    assert_eq!(replica_counter(&replica, "n"), Some(9));
    let (http, http_heads) = http_doc(&node, id);
    assert_eq!(replica_json(&replica), http);
    assert_eq!(replica_heads(&mut replica), http_heads);
}

#[test]
fn concurrent_edits_on_both_sides_converge() {
    let node = Node::start("test-sync2");
    let id = "s/conc";
    node.put_doc(id, &json!({ "base": 1 })).ok_json("PUT");
    node.patch_doc(id, json!([{ "op": "inc", "path": ["n"], "by": 5 }]))
        .ok_json("PATCH inc");
    let mut replica = AutoCommit::new();
    let mut state = SyncState::new();
    sync(&node, id, &mut replica, &mut state);
    assert_eq!(replica_counter(&replica, "n"), Some(5));

    // Both sides edit without syncing: different keys, the same counter, the same key.
    node.patch_doc(
        id,
        json!([
            { "op": "set", "path": ["h"], "value": "http" },
            { "op": "inc", "path": ["n"], "by": 10 },
            { "op": "set", "path": ["both"], "value": "from-http" }
        ]),
    )
    .ok_json("concurrent PATCH");
    replica.put(ROOT, "r", "rep").unwrap();
    replica.increment(ROOT, "n", 1).unwrap();
    replica.put(ROOT, "both", "from-replica").unwrap();
    replica.delete(ROOT, "base").unwrap();
    replica.commit();
    // And a second round of edits on both sides before syncing.
    node.patch_doc(id, json!([{ "op": "set", "path": ["h2"], "value": 2 }]))
        .ok_json("second concurrent PATCH");
    replica.put(ROOT, "r2", 2).unwrap();
    replica.commit();

    sync(&node, id, &mut replica, &mut state);
    let (http, http_heads) = http_doc(&node, id);
    let rep = replica_json(&replica);
    assert_eq!(rep, http, "replica and node must materialise the same JSON");
    for key in ["h", "r", "h2", "r2"] {
        assert!(
            http.get(key).is_some(),
            "key {key} missing after convergence: {http}"
        );
    }
    assert!(
        http.get("base").is_none(),
        "the replica's delete must reach the node: {http}"
    );
    assert_eq!(
        http["n"],
        json!(16),
        "counter increments from both sides add up: {http}"
    );
    assert!(
        http["both"] == json!("from-http") || http["both"] == json!("from-replica"),
        "conflicting key: {http}"
    );
    assert_eq!(
        replica_heads(&mut replica),
        http_heads,
        "heads after the final round"
    );
    assert!(
        http_heads.len() == 1 || http_heads.len() == 2,
        "heads: {http_heads:?}"
    );

    // A second, independent replica starting from nothing gets the same state.
    let mut other = AutoCommit::new();
    let mut other_state = SyncState::new();
    sync(&node, id, &mut other, &mut other_state);
    assert_eq!(replica_json(&other), http);
    assert_eq!(replica_heads(&mut other), http_heads);
}

#[test]
fn syncing_a_new_document_from_the_replica_creates_it() {
    let node = Node::start("test-sync3");
    let id = "new/doc-1";
    node.get_doc(id)
        .assert_error(404, "not_found", "before the sync");

    // Syncing an empty replica does not create the document.
    let mut empty = AutoCommit::new();
    let mut empty_state = SyncState::new();
    sync(&node, id, &mut empty, &mut empty_state);
    node.get_doc(id)
        .assert_error(404, "not_found", "after syncing an empty replica");

    let mut replica = AutoCommit::new();
    replica.put(ROOT, "made_by", "replica").unwrap();
    let list = replica.put_object(ROOT, "list", ObjType::List).unwrap();
    replica.insert(&list, 0, 1).unwrap();
    replica.insert(&list, 1, 2).unwrap();
    let text = replica.put_object(ROOT, "text", ObjType::Text).unwrap();
    replica.splice_text(&text, 0, 0, "hi there").unwrap();
    replica.put(ROOT, "c", ScalarValue::counter(7)).unwrap();
    replica.commit();
    let mut state = SyncState::new();
    sync(&node, id, &mut replica, &mut state);

    let (http, http_heads) = http_doc(&node, id);
    assert_eq!(
        http,
        json!({ "made_by": "replica", "list": [1, 2], "text": "hi there", "c": 7 })
    );
    assert_eq!(replica_heads(&mut replica), http_heads);
    let listed = node.get("/v1/docs?prefix=new%2F").ok_json("list");
    let ids: Vec<&str> = listed["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id]);

    // HTTP ops work on what the replica created: the text and the counter.
    node.patch_doc(
        id,
        json!([
            { "op": "splice", "path": ["text"], "index": 2, "text": "," },
            { "op": "inc", "path": ["c"], "by": 3 },
            { "op": "push", "path": ["list"], "value": 3 }
        ]),
    )
    .ok_json("PATCH the replica-created doc");
    sync(&node, id, &mut replica, &mut state);
    let (http, http_heads) = http_doc(&node, id);
    assert_eq!(
        http,
        json!({ "made_by": "replica", "list": [1, 2, 3], "text": "hi, there", "c": 10 })
    );
    assert_eq!(replica_json(&replica), http);
    assert_eq!(replica_heads(&mut replica), http_heads);
}

#[test]
fn sync_survives_a_node_restart() {
    let mut node = Node::start("test-sync4");
    let id = "s/restart";
    let mut replica = AutoCommit::new();
    replica.put(ROOT, "a", 1).unwrap();
    replica.commit();
    let mut state = SyncState::new();
    sync(&node, id, &mut replica, &mut state);
    node.restart_after_kill();
    // The replica's sync state refers to the previous process; the node keeps no state, so
    // the same client state must still work.
    replica.put(ROOT, "b", 2).unwrap();
    replica.commit();
    sync(&node, id, &mut replica, &mut state);
    let (http, http_heads) = http_doc(&node, id);
    assert_eq!(http, json!({ "a": 1, "b": 2 }));
    assert_eq!(replica_heads(&mut replica), http_heads);
}

/// A list and a counter created implicitly by concurrent PATCHes (creation changes Verge builds
/// itself, not through an Automerge transaction) reach a plain Automerge peer, which reads and
/// extends them. After a delete, the document written again (a new incarnation, see
/// `verge_core::incarnation`) reaches a new peer with only the re-created objects.
#[test]
fn implicitly_created_list_and_counter_sync_to_a_plain_peer() {
    const WRITERS: usize = 4;
    let node = Node::start("test-sync5");
    let id = "s/implicit";
    let barrier = Barrier::new(WRITERS);
    thread::scope(|s| {
        for w in 0..WRITERS {
            let (node, barrier) = (&node, &barrier);
            s.spawn(move || {
                barrier.wait();
                node.patch_doc(
                    id,
                    json!([
                        { "op": "push", "path": ["items"], "value": format!("w{w}") },
                        { "op": "inc", "path": ["n"], "by": 1 }
                    ]),
                )
                .ok_json(&format!("concurrent PATCH {w}"));
            });
        }
    });

    let mut replica = AutoCommit::new();
    let mut state = SyncState::new();
    sync(&node, id, &mut replica, &mut state);
    let (http, http_heads) = http_doc(&node, id);
    assert_eq!(replica_json(&replica), http, "replica after the first sync");
    assert_eq!(replica_heads(&mut replica), http_heads);
    assert_eq!(replica_counter(&replica, "n"), Some(4), "in {http}");
    let (items, mut got) = replica_strings(&replica, "items");
    got.sort();
    assert_eq!(got, ["w0", "w1", "w2", "w3"], "in {http}");

    // The peer writes into both objects.
    replica
        .insert(&items, WRITERS, "peer")
        .expect("append to the list");
    replica.increment(ROOT, "n", 10).expect("increment");
    replica.commit();
    sync(&node, id, &mut replica, &mut state);
    let (http, http_heads) = http_doc(&node, id);
    assert_eq!(
        http["n"],
        json!(14),
        "the peer's increment at the node: {http}"
    );
    assert_eq!(
        http["items"][WRITERS], "peer",
        "the peer's item at the node: {http}"
    );
    assert_eq!(replica_json(&replica), http);
    assert_eq!(replica_heads(&mut replica), http_heads);

    // Deleted and written again: a new peer sees only the re-created objects.
    let r = node.delete_doc(id);
    assert_eq!(r.status, 200, "DELETE: {}", r.describe());
    node.patch_doc(
        id,
        json!([
            { "op": "push", "path": ["items"], "value": "again" },
            { "op": "inc", "path": ["n"], "by": 1 }
        ]),
    )
    .ok_json("PATCH after the delete");
    // The peer that held the document before cannot merge its copy into the new incarnation:
    // within a few rounds the node answers 409 document_replaced, and never a merge.
    assert_eq!(stale_sync_status(&node, id, &mut replica, &mut state), 409);
    let mut fresh = AutoCommit::new();
    let mut fresh_state = SyncState::new();
    sync(&node, id, &mut fresh, &mut fresh_state);
    let (http, http_heads) = http_doc(&node, id);
    assert_eq!(http, json!({ "items": ["again"], "n": 1 }));
    assert_eq!(
        replica_json(&fresh),
        http,
        "a new peer after the re-creation"
    );
    assert_eq!(replica_counter(&fresh, "n"), Some(1));
    assert_eq!(replica_strings(&fresh, "items").1, ["again"]);
    assert_eq!(replica_heads(&mut fresh), http_heads);
}
