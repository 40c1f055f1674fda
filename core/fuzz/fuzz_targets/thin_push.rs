//! The thin replica's wire, node side and client side: a `POST /v1/ops` body read as a push and
//! built on a document with history, and an answer read as the client reads it.
//!
//! What is checked beyond "no panic": an accepted push and an accepted answer re-encode to
//! themselves (a push's empty groups are left out on the wire), and building an accepted push
//! twice on copies of the base makes the same changes, which is what makes a resent push land
//! exactly once.
#![no_main]

use automerge::{ActorId, Automerge};
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use verge_core::thin::{Answer, Push, build};
use verge_core::{Expiry, Op, Write, apply};

/// A document with a map, a counter, a list and text, so that pushed ops meet every type.
fn base() -> Automerge {
    let mut doc = Automerge::new();
    doc.set_actor(ActorId::from([9u8; 16].as_slice()));
    let ops = Op::parse_list(&json!([
        {"op": "set", "path": ["title"], "value": "cart"},
        {"op": "inc", "path": ["items", "a"], "by": 1},
        {"op": "push", "path": ["log"], "value": {"n": 1}},
        {"op": "splice", "path": ["note"], "index": 0, "delete": 0, "text": "hi"}
    ]))
    .expect("the base ops parse");
    apply(&mut doc, &Write::Ops(ops), Expiry::Keep, 1).expect("the base ops apply");
    doc
}

fuzz_target!(|body: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    if let Ok(push) = Push::from_json(&json) {
        let mut sent = push.clone();
        sent.groups.retain(|g| !g.batches.is_empty());
        assert_eq!(Push::from_json(&push.to_json()).as_ref(), Ok(&sent));
        let doc = base();
        let mut first = doc.clone();
        let mut again = doc.clone();
        let built = build(&mut first, &push);
        assert_eq!(built, build(&mut again, &push));
        if built.is_ok() {
            assert_eq!(first.get_heads(), again.get_heads());
            let _ = verge_core::to_json(&first);
        }
    }
    if let Ok(answer) = Answer::from_json(&json) {
        assert_eq!(Answer::from_json(&answer.to_json()).as_ref(), Ok(&answer));
    }
});
