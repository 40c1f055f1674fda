//! The `PATCH` op parser on arbitrary bytes, decoded as JSON the way the HTTP handler does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_core::Op;

fuzz_target!(|body: &[u8]| {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let _ = Op::parse_patch(&value);
    }
});
