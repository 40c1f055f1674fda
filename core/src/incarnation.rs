//! Incarnations: a document that is written again after it was deleted or expired starts a new
//! history, which every replica recognises and which replaces the old one.
//!
//! Why: a node purges an expired or long-deleted document's history to reclaim its space, while
//! another node may still hold it. If a later write started an unrelated history, the node that
//! kept the old one would merge the two: the old expiry (or tombstone) would still be visible
//! and hide the new write, and purging again would delete it. Instead the life of a document is
//! a sequence of incarnations `0, 1, 2, …`, each a separate Automerge history:
//!
//! - Incarnation 0 is any history without a root marker (documents from older versions, those
//!   created by plain Automerge peers, and every new document).
//! - Incarnation `j ≥ 1` starts with the root change `R(j)`, which every replica builds byte for
//!   byte: a fixed actor derived from `j`, `seq` 1, no deps, time 0, and two ops that put
//!   [`INCARNATION_KEY`] = `j` and the tombstone [`DELETED_KEY`] = `true`. Every other change of
//!   incarnation `j` descends from `R(j)`.
//! - Reviving a deleted or expired document (writing to it) starts incarnation `k + 1` from
//!   `R(k + 1)`; purging one replaces it by the bare `R(k + 1)`, a stub that reads as deleted,
//!   and a write to a stub goes into the stub's own incarnation. A revival and a purge of the
//!   same incarnation `k`, wherever and in whatever order they happen, therefore land in the
//!   same incarnation `k + 1`, and so do revivals on several replicas at once.
//! - Changes meet by incarnation ([`crate::lineage::settle`]): a replica that receives `R(j)` for a `j` above its
//!   own drops its history and takes the newer one; changes rooted in an older incarnation are
//!   dropped. Nothing from two incarnations is ever merged.

use std::num::NonZeroU64;

use automerge::legacy::{Key, ObjectId, Op as LegacyOp, OpType, SortedVec};
use automerge::{
    ActorId, Automerge, AutomergeError, Change, ChangeHash, ExpandedChange, ObjId, ROOT, ReadDoc,
    ScalarValue, Value,
};
use sha2::{Digest, Sha256};

use crate::document::{DELETED_KEY, new_document};

/// Root key holding the document's incarnation number (absent in incarnation 0).
pub const INCARNATION_KEY: &str = "_verge_incarnation";

fn root_actor(incarnation: u64) -> ActorId {
    let mut h = Sha256::new();
    h.update(b"verge/incarnation/v1\0");
    h.update(incarnation.to_be_bytes());
    let digest: [u8; 32] = h.finalize().into();
    ActorId::from(&digest[..16])
}

/// The root change of incarnation `incarnation` (at least 1).
pub fn root_change(incarnation: u64) -> Change {
    let put = |key: &str, value: ScalarValue| LegacyOp {
        action: OpType::Put(value),
        obj: ObjectId::Root,
        key: Key::Map(key.into()),
        pred: SortedVec::new(),
        insert: false,
    };
    // Incarnation numbers beyond i64 cannot occur: each needs a write or a purge.
    let number = i64::try_from(incarnation).unwrap_or(i64::MAX);
    Change::from(ExpandedChange {
        operations: vec![
            put(INCARNATION_KEY, ScalarValue::Int(number)),
            put(DELETED_KEY, ScalarValue::Boolean(true)),
        ],
        actor_id: root_actor(incarnation),
        hash: None,
        seq: 1,
        start_op: NonZeroU64::MIN,
        time: 0,
        message: None,
        deps: Vec::new(),
        extra_bytes: Vec::new(),
        author: None,
    })
}

/// The incarnation `doc` belongs to (0 without a marker).
pub fn of(doc: &impl ReadDoc) -> u64 {
    marker_number(doc, INCARNATION_KEY)
}

/// The non-negative integer a root marker `key` holds (0 when absent or of another type): the
/// incarnation and generation numbers.
pub(crate) fn marker_number(doc: &impl ReadDoc, key: &str) -> u64 {
    match doc.get(ROOT, key) {
        Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
            ScalarValue::Int(n) => u64::try_from(*n).unwrap_or(0),
            ScalarValue::Uint(n) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

/// The hash of the root change of `doc`'s incarnation, `None` in incarnation 0.
pub fn root_of(doc: &impl ReadDoc) -> Option<ChangeHash> {
    match of(doc) {
        0 => None,
        j => Some(root_change(j).hash()),
    }
}

/// The actor a replica whose own actor is `base` writes as in `incarnation`.
///
/// An actor must write in one incarnation only: two incarnations' histories meet for a moment
/// when a replica receives a newer one (see [`crate::lineage::settle`]), and Automerge refuses two different
/// changes with the same actor and sequence number.
pub fn actor_for(base: &ActorId, incarnation: u64) -> ActorId {
    if incarnation == 0 {
        return base.clone();
    }
    let mut h = Sha256::new();
    h.update(b"verge/incarnation-actor/v1\0");
    h.update(base.to_bytes());
    h.update(incarnation.to_be_bytes());
    let digest: [u8; 32] = h.finalize().into();
    ActorId::from(&digest[..16])
}

/// A document holding only the root of `incarnation`: deleted, no user keys. What a purge
/// leaves, and where a revival starts. It writes as [`actor_for`]`(previous, incarnation)`.
pub fn stub(previous: &ActorId, incarnation: u64) -> Result<Automerge, AutomergeError> {
    let mut doc = new_document(actor_for(previous, incarnation));
    doc.apply_changes([root_change(incarnation)])?;
    Ok(doc)
}

/// Whether nothing has been written into `doc`'s incarnation yet: its tombstone is still its
/// root's own value. That is a bare root (a purged document nobody has written since), or one
/// holding implicit creations (`crate::implicit`) that arrived ahead of the writes that made
/// them: a creation depends on the root alone, the write itself on what its writer had seen, so
/// a replica that missed an earlier write into the stub applies the creation and holds the
/// write back. A write into a stub goes into its incarnation (a revival would start the next
/// one and drop the writes already made in this one), and a purge leaves it alone.
pub fn is_stub(doc: &Automerge) -> bool {
    // Every write into an incarnation supersedes the root's value (the first one at a replica
    // puts `false` over it, later ones build on that), and a delete puts its own.
    let Ok(values) = doc.get_all(ROOT, DELETED_KEY) else {
        return false;
    };
    let [(_, ObjId::Id(_, actor, _))] = values.as_slice() else {
        return false; // No tombstone, or a delete concurrent with a write.
    };
    // A live document answers above; only a deleted one builds the root's actor.
    match of(doc) {
        0 => false,
        incarnation => *actor == root_actor(incarnation),
    }
}

/// The incarnation whose root `change` is, if it is one.
pub fn root_number(change: &Change) -> Option<u64> {
    if !change.deps().is_empty()
        || change.seq() != 1
        || change.len() != 2
        || change.start_op() != NonZeroU64::MIN
        || change.timestamp() != 0
    {
        return None;
    }
    let expanded = change.decode();
    let first = expanded.operations.first()?;
    let number = match (&first.key, &first.action) {
        (Key::Map(k), OpType::Put(ScalarValue::Int(n))) if k.as_str() == INCARNATION_KEY => {
            u64::try_from(*n).ok()?
        }
        _ => return None,
    };
    (number >= 1 && root_change(number).hash() == change.hash()).then_some(number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::{Applied, Lifecycle, apply, to_json};
    use crate::lineage::{Local, Move, Settled, settle};
    use crate::{Expiry, Write};
    use automerge::transaction::Transactable;

    fn actor(n: u8) -> ActorId {
        ActorId::from(vec![n; 16])
    }

    #[test]
    fn roots_are_the_same_everywhere_and_distinct_per_incarnation() {
        assert_eq!(root_change(1).raw_bytes(), root_change(1).raw_bytes());
        assert_ne!(root_change(1).hash(), root_change(2).hash());
        assert_eq!(root_number(&root_change(7)), Some(7));
    }

    #[test]
    fn a_stub_is_deleted_and_empty() {
        let doc = stub(&actor(1), 3).expect("stub");
        assert_ne!(
            doc.get_actor(),
            &actor(1),
            "a new incarnation writes as a new actor"
        );
        assert!(is_stub(&doc));
        assert_eq!(of(&doc), 3);
        assert!(Lifecycle::of(&doc).deleted);
        assert_eq!(to_json(&doc), serde_json::json!({}));
    }

    #[test]
    fn other_roots_are_not_incarnation_roots() {
        let mut doc = new_document(actor(1));
        let mut tx = doc.transaction();
        tx.put(ROOT, INCARNATION_KEY, 1).expect("put");
        tx.put(ROOT, DELETED_KEY, true).expect("put");
        tx.commit();
        let forged = doc.get_last_local_change().expect("change");
        assert_eq!(
            root_number(&forged),
            None,
            "a different actor is a different change"
        );
    }

    fn write(doc: &mut Automerge, ops: serde_json::Value, expiry: Expiry, now_ms: i64) -> Applied {
        let ops = crate::Op::parse_list(&ops).expect("ops");
        apply(doc, &Write::Ops(ops), expiry, now_ms).expect("write")
    }

    /// Applies to `to` what `from` has and `to` lacks, as a sync or broadcast does, then
    /// settles `to`.
    fn deliver(from: &Automerge, to: &mut Automerge) -> bool {
        let local = Local::of(to);
        let before = to.get_heads();
        let changes = from.get_changes(&[]);
        to.apply_changes(changes).expect("apply");
        let new = to.get_changes(&before);
        !matches!(
            settle(to, &local, &new, Move::Carry).expect("settle"),
            Settled::Kept
        )
    }

    fn expiring(actor_n: u8) -> Automerge {
        let mut doc = new_document(actor(actor_n));
        write(
            &mut doc,
            serde_json::json!([{"op": "set", "path": ["old"], "value": 1}, {"op": "push", "path": ["log"], "value": "old"}]),
            Expiry::At(3_000),
            1_000,
        );
        doc
    }

    #[test]
    fn a_revival_replaces_the_old_history_everywhere() {
        let mut a = expiring(1);
        let mut b = a.fork().with_actor(actor(2));
        // a writes after the expiry: a new incarnation.
        let applied = write(
            &mut a,
            serde_json::json!([{"op": "push", "path": ["log"], "value": "new"}]),
            Expiry::Keep,
            8_000,
        );
        assert!(applied.replaced);
        assert_eq!(of(&a), 1);
        assert_eq!(to_json(&a), serde_json::json!({"log": ["new"]}));
        // b, still holding the expired history, takes the new incarnation whole.
        assert!(deliver(&a, &mut b));
        assert_eq!(to_json(&b), to_json(&a));
        assert_eq!(b.get_heads(), a.get_heads());
        assert!(Lifecycle::of(&b).live(8_000));
        // And the old history sent back to a is dropped.
        let old = expiring(3);
        assert!(deliver(&old, &mut a));
        assert_eq!(to_json(&a), serde_json::json!({"log": ["new"]}));
        assert_eq!(a.get_heads(), b.get_heads());
    }

    #[test]
    fn a_purge_and_a_revival_of_one_incarnation_meet_in_the_next() {
        let old = expiring(1);
        // a purges: a stub of incarnation 1.
        let mut a = stub(old.get_actor(), of(&old) + 1).expect("stub");
        // b revives the expired document: incarnation 1 as well.
        let mut b = old.fork().with_actor(actor(2));
        write(
            &mut b,
            serde_json::json!([{"op": "push", "path": ["log"], "value": "b"}]),
            Expiry::Keep,
            8_000,
        );
        // a writes into its stub: the same incarnation, not a later one.
        let applied = write(
            &mut a,
            serde_json::json!([{"op": "push", "path": ["log"], "value": "a"}]),
            Expiry::Keep,
            8_000,
        );
        assert!(!applied.replaced);
        assert_eq!(of(&a), 1);
        assert!(!deliver(&b, &mut a), "one incarnation: a plain merge");
        assert!(!deliver(&a, &mut b));
        assert_eq!(a.get_heads(), b.get_heads());
        let mut log: Vec<serde_json::Value> = to_json(&a)["log"].as_array().expect("list").clone();
        log.sort_by_key(|v| v.to_string());
        assert_eq!(log, vec![serde_json::json!("a"), serde_json::json!("b")]);
    }

    #[test]
    fn a_stale_replica_written_again_cannot_mix_incarnations() {
        // a, in incarnation 1 after a revival, and c, still in incarnation 0 and writing into
        // it: actors never repeat across incarnations, so the histories meet without a clash.
        let mut a = expiring(1);
        let mut c = a.fork().with_actor(actor(1)); // the same base actor, as after a restart.
        write(
            &mut a,
            serde_json::json!([{"op": "set", "path": ["x"], "value": 1}]),
            Expiry::Keep,
            8_000,
        );
        write(
            &mut c,
            serde_json::json!([{"op": "set", "path": ["y"], "value": 2}]),
            Expiry::Clear,
            2_000,
        );
        assert!(deliver(&a, &mut c));
        assert_eq!(to_json(&c), serde_json::json!({"x": 1}));
        assert!(deliver(&c, &mut a) || a.get_heads() == c.get_heads());
        assert_eq!(to_json(&a), serde_json::json!({"x": 1}));
    }

    #[test]
    fn a_deleted_document_revives_as_a_new_incarnation() {
        let mut a = new_document(actor(1));
        write(
            &mut a,
            serde_json::json!([{"op": "push", "path": ["log"], "value": 1}]),
            Expiry::Keep,
            1,
        );
        apply(&mut a, &Write::Delete, Expiry::Keep, 2).expect("delete");
        let mut b = a.fork().with_actor(actor(2));
        write(
            &mut a,
            serde_json::json!([{"op": "push", "path": ["log"], "value": "a"}]),
            Expiry::Keep,
            3,
        );
        write(
            &mut b,
            serde_json::json!([{"op": "push", "path": ["log"], "value": "b"}]),
            Expiry::Keep,
            3,
        );
        assert_eq!((of(&a), of(&b)), (1, 1));
        assert!(
            !deliver(&b, &mut a),
            "both revived into incarnation 1: a plain merge"
        );
        assert!(!deliver(&a, &mut b));
        assert_eq!(a.get_heads(), b.get_heads());
        assert_eq!(
            to_json(&a)["log"].as_array().expect("list").len(),
            2,
            "{}",
            to_json(&a)
        );
    }

    /// Found by the property test: a delete concurrent with a write that revived the document
    /// in place must win on every replica, or writes made after seeing both would land in
    /// different incarnations (and one set be dropped).
    #[test]
    fn a_delete_concurrent_with_a_revival_in_place_wins_everywhere() {
        let mut a = new_document(actor(1));
        apply(&mut a, &Write::Delete, Expiry::Keep, 1).expect("delete");
        let mut b = a.fork().with_actor(actor(2));
        // a revives (incarnation 1) and deletes again; b revives concurrently into the same
        // incarnation 1 (the same root) without seeing a's delete.
        write(
            &mut a,
            serde_json::json!([{"op": "push", "path": ["l"], "value": "a1"}]),
            Expiry::Keep,
            2,
        );
        apply(&mut a, &Write::Delete, Expiry::Keep, 3).expect("delete");
        write(
            &mut b,
            serde_json::json!([{"op": "push", "path": ["l"], "value": "b1"}]),
            Expiry::Keep,
            2,
        );
        assert_eq!((of(&a), of(&b)), (1, 1));
        deliver(&a, &mut b);
        assert!(
            Lifecycle::of(&b).deleted,
            "the delete wins over b's concurrent write"
        );
        // Both now write having seen the delete: both revive into incarnation 2.
        write(
            &mut a,
            serde_json::json!([{"op": "push", "path": ["l"], "value": "a2"}]),
            Expiry::Keep,
            4,
        );
        write(
            &mut b,
            serde_json::json!([{"op": "push", "path": ["l"], "value": "b2"}]),
            Expiry::Keep,
            4,
        );
        assert_eq!((of(&a), of(&b)), (2, 2));
        deliver(&a, &mut b);
        deliver(&b, &mut a);
        assert_eq!(a.get_heads(), b.get_heads());
        let mut l: Vec<serde_json::Value> = to_json(&a)["l"].as_array().expect("list").clone();
        l.sort_by_key(|v| v.to_string());
        assert_eq!(l, vec![serde_json::json!("a2"), serde_json::json!("b2")]);
    }

    /// Found by the simulator (`ttl-revive-partition`, seed 89): every node held the stub of
    /// incarnation 3; a wrote into it, b wrote after a's write reached it, and c received b's
    /// changes but not a's (lost). b's list creation depends on the root alone, so it applied
    /// at c, while b's own change waited for a's: c then held the root and a creation, no longer
    /// a bare root but still deleted by the root's own value. A write at c revived it into
    /// incarnation 4, which replaced a's and b's writes everywhere (and a purge there would
    /// have done the same). Nothing has been written into such an incarnation yet: it is a stub.
    #[test]
    fn a_stub_holding_creations_that_arrived_early_is_written_into() {
        let base = stub(&actor(9), 3).expect("stub");
        let mut a = base.fork().with_actor(actor(1));
        let mut b = base.fork().with_actor(actor(2));
        let mut c = base.fork().with_actor(actor(3));
        write(
            &mut a,
            serde_json::json!([{"op": "inc", "path": ["n"], "by": 2}]),
            Expiry::Keep,
            5,
        );
        assert!(!deliver(&a, &mut b));
        let before = b.get_heads();
        write(
            &mut b,
            serde_json::json!([{"op": "push", "path": ["log"], "value": "b"}]),
            Expiry::Keep,
            6,
        );
        // c gets b's changes alone: the creation of the list applies, the push waits for a's.
        let from_b = b.get_changes(&before);
        assert_eq!(from_b.len(), 2, "the list's creation and the push");
        let c_before = c.get_heads();
        let local = Local::of(&c);
        c.apply_changes(from_b).expect("apply");
        let new = c.get_changes(&c_before);
        assert_eq!(new.len(), 1, "only the creation applies");
        assert!(matches!(
            settle(&mut c, &local, &new, Move::Carry).expect("settle"),
            Settled::Kept
        ));
        assert!(Lifecycle::of(&c).deleted);
        assert!(is_stub(&c), "nothing was written into incarnation 3 yet");
        let applied = write(
            &mut c,
            serde_json::json!([{"op": "push", "path": ["log"], "value": "c"}]),
            Expiry::Keep,
            7,
        );
        assert!(
            !applied.replaced,
            "c writes into incarnation 3, as a and b did"
        );
        assert_eq!(of(&c), 3);
        for _ in 0..2 {
            deliver(&a, &mut c);
            deliver(&b, &mut c);
            deliver(&c, &mut a);
            deliver(&c, &mut b);
        }
        assert_eq!(a.get_heads(), c.get_heads());
        assert_eq!(b.get_heads(), c.get_heads());
        assert_eq!(of(&a), 3);
        let json = to_json(&a);
        assert_eq!(json["n"], serde_json::json!(2));
        let mut log: Vec<serde_json::Value> = json["log"].as_array().expect("list").clone();
        log.sort_by_key(|v| v.to_string());
        assert_eq!(log, vec![serde_json::json!("b"), serde_json::json!("c")]);
    }

    #[test]
    fn a_written_or_deleted_incarnation_is_no_stub() {
        let mut doc = stub(&actor(1), 2).expect("stub");
        write(
            &mut doc,
            serde_json::json!([{"op": "set", "path": ["x"], "value": 1}]),
            Expiry::Keep,
            1,
        );
        assert!(!is_stub(&doc));
        apply(&mut doc, &Write::Delete, Expiry::Keep, 2).expect("delete");
        assert!(Lifecycle::of(&doc).deleted);
        assert!(!is_stub(&doc), "deleted by a delete, not by its root");
        assert!(
            !is_stub(&new_document(actor(1))),
            "incarnation 0 has no root"
        );
    }
}
