//! The body of `POST /v1/sync/{id}` and of node-to-node sync sessions: decoding an Automerge
//! sync message and receiving it into a document (empty, and one with history), then answering.
//!
//! `receive_sync_message` and `generate_sync_message` turn Automerge's panics on malformed
//! changes and Bloom filters into errors; the silent
//! panic hook keeps libFuzzer from aborting on those caught panics, while a panic that escapes
//! is still reported as a crash.
#![no_main]

use automerge::ActorId;
use automerge::sync::{Message, State};
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use verge_core::Op;
use verge_core::document::{
    Expiry, Write, apply, generate_sync_message, new_document, receive_sync_message,
};

fuzz_target!(
    init: std::panic::set_hook(Box::new(|_| {})),
    |bytes: &[u8]| {
        let Ok(message) = Message::decode(bytes) else { return };
        let actor = ActorId::from([1u8; 16].as_slice());
        let mut empty = new_document(actor.clone());
        let mut state = State::new();
        if receive_sync_message(&mut empty, &mut state, message.clone()).is_ok() {
            let _ = generate_sync_message(&empty, &mut state);
            let _ = verge_core::to_json(&empty);
        }
        let mut doc = new_document(actor);
        if let Ok(ops) = Op::parse_list(&json!([{"op": "set", "path": ["a"], "value": 1}])) {
            let _ = apply(&mut doc, &Write::Ops(ops), Expiry::Keep, 0);
        }
        let mut state = State::new();
        if receive_sync_message(&mut doc, &mut state, message).is_ok() {
            let _ = generate_sync_message(&doc, &mut state);
        }
    }
);
