//! The replication wire decoder on arbitrary frame bodies: it must return a value or an error,
//! never panic, and what it accepts must encode and decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_core::wire::PeerMessage;

fuzz_target!(|body: &[u8]| {
    if let Ok(message) = PeerMessage::from_body(body) {
        let frame = message.to_frame().expect("an accepted message encodes");
        let again = PeerMessage::from_body(&frame[4..]).expect("its encoding decodes");
        assert_eq!(again, message);
    }
});
