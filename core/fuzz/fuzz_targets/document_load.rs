//! Loading stored document bytes (snapshot and changes) and rendering what loads as JSON, and
//! applying the same bytes incrementally, as replicated changes are.
//!
//! `load_document` and `load_incremental` turn Automerge's panics on malformed input into
//! errors. libFuzzer's panic hook would abort on those caught panics, so it is replaced by a
//! silent one: a panic that escapes is still caught by libFuzzer and reported as a crash.
#![no_main]

use automerge::ActorId;
use libfuzzer_sys::fuzz_target;
use verge_core::document::{load_document, load_incremental, new_document};

fuzz_target!(
    init: std::panic::set_hook(Box::new(|_| {})),
    |bytes: &[u8]| {
        let actor = ActorId::from([1u8; 16].as_slice());
        if let Ok(doc) = load_document(bytes, actor.clone()) {
            let _ = verge_core::to_json(&doc);
        }
        let mut doc = new_document(actor);
        if load_incremental(&mut doc, bytes).is_ok() {
            let _ = verge_core::to_json(&doc);
        }
    }
);
