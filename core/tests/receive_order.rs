//! Broadcast batches arrive duplicated and out of order (a relay and a fallback both deliver,
//! streams overtake each other): what a node applies must come to the same document whatever
//! the order, each change counted once, with a change whose dependencies are missing held
//! back until they arrive.

use automerge::{ActorId, ReadDoc};
use serde_json::json;
use verge_core::document::{load_incremental, new_document};
use verge_core::{Expiry, Op, Write, apply, to_json};

/// A small xorshift, so the shuffles are the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn write(doc: &mut automerge::Automerge, ops: serde_json::Value, at: i64) {
    let ops = Op::parse_list(&ops).expect("ops");
    apply(doc, &Write::Ops(ops), Expiry::Keep, at).expect("apply");
}

#[test]
fn batches_received_duplicated_and_reordered_converge_to_the_same_document() {
    // The sender's history: creations, increments, pushes and text edits, 40 writes.
    let mut sender = new_document(ActorId::from([1u8; 16]));
    for i in 0..40 {
        let ops = match i % 4 {
            0 => json!([{"op": "inc", "path": ["n"], "by": i}]),
            1 => json!([{"op": "push", "path": ["log"], "value": i}]),
            2 => json!([{"op": "splice", "path": ["t"], "index": 0, "text": "x"}]),
            _ => json!([{"op": "set", "path": ["m", format!("k{i}")], "value": i}]),
        };
        write(&mut sender, ops, i64::from(i));
    }
    let changes: Vec<Vec<u8>> = sender
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    let expected = to_json(&sender);
    assert_eq!(expected["n"], json!((0..40).step_by(4).sum::<i64>()));

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..50 {
        // Every change once to three times, in a random order.
        let mut deliveries: Vec<&Vec<u8>> = changes
            .iter()
            .flat_map(|c| std::iter::repeat_n(c, 1 + rng.below(3)))
            .collect();
        for i in (1..deliveries.len()).rev() {
            deliveries.swap(i, rng.below(i + 1));
        }
        let mut receiver = new_document(ActorId::from([2u8; 16]));
        let mut held_back = false;
        for change in deliveries {
            load_incremental(&mut receiver, change).expect("a change applies");
            held_back |= !receiver.get_missing_deps(&[]).is_empty();
        }
        assert!(
            receiver.get_missing_deps(&[]).is_empty(),
            "everything arrived"
        );
        assert_eq!(receiver.get_heads(), sender.get_heads());
        assert_eq!(to_json(&receiver), expected, "each change counted once");
        assert!(
            held_back,
            "some change came before its dependencies and waited"
        );
    }
}
