//! JSON text scanned for integer literals beyond 64 bits (`json_int`): never panics, and what it
//! reports fits neither `i64` nor `u64`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(literal) = verge_core::json_int::first_beyond_64_bits(data) {
        assert!(literal.parse::<i64>().is_err() && literal.parse::<u64>().is_err());
    }
});
