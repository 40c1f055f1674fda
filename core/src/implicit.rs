//! Containers that ops create implicitly, created identically on every replica.
//!
//! A `push` onto a missing list, a `splice` into a missing text, an `inc` of a missing counter
//! and a `set` below missing maps all create something first. If each replica created it in its
//! own change, Automerge would keep one of the concurrent objects at the key and hide the others
//! with everything written into them (and an `inc` would count once per hidden counter). So
//! the creation is a change of its own whose every byte follows from where it is made: the
//! parent object, the key, the kind and a generation number. Concurrent creators build the same
//! bytes, Automerge sees one change by hash, and every write lands in one object.
//!
//! A creation change `C(parent, key, kind, n)` has:
//! - actor: the first 16 bytes of SHA-256 over those four inputs and generation 0's deps, so it
//!   is fresh for every generation (and incarnation) and its only change has `seq` 1 (Automerge
//!   refuses two changes with one actor and sequence number);
//! - one op at `key` of `parent`: make a map, list or text, or put a counter at 0;
//! - generation 0: deps on the change that created `parent` (for the root: none, or the root of
//!   the document's incarnation, see [`crate::incarnation`]), `start_op` one past that change's
//!   highest op, no predecessor;
//! - generation n > 0: deps on generation n−1 and overwrites its object (pred), `start_op` one
//!   past it. A replica holding generation n therefore never shows generation n−1, even before
//!   the delete that ended it arrives;
//! - time 0 and no message.
//!
//! `start_op` is one past the highest op in the change's causal past, as Automerge's own changes
//! are (Lamport order), so it sorts after what it overwrites.
//!
//! A creator takes the lowest generation not yet in its document: when something is visible at
//! the key there is nothing to create, and otherwise every generation it holds was removed.
//! Replicas that have seen the same removals pick the same generation. The argument in full is
//! in `docs/architecture.md` ("Implicit creation").

use std::num::NonZeroU64;

use automerge::legacy::{Key, ObjectId, Op as LegacyOp, OpId, OpType, SortedVec};
use automerge::{ActorId, Automerge, Change, ChangeHash, ExpandedChange, ObjId};
use sha2::{Digest, Sha256};

use crate::limits::IMPLICIT_GENERATIONS_MAX;

/// What an op creates when it finds nothing at its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A map: the parents of a `set`, `inc`, `push` or `splice` path.
    Map,
    /// A list: the target of `push`, or of `insert` at index 0.
    List,
    /// A text: the target of `splice`.
    Text,
    /// A counter at 0: the target of `inc`.
    Counter,
}

impl Kind {
    fn tag(self) -> u8 {
        match self {
            Kind::Map => 1,
            Kind::List => 2,
            Kind::Text => 3,
            Kind::Counter => 4,
        }
    }

    fn action(self) -> OpType {
        match self {
            Kind::Map => OpType::Make(automerge::ObjType::Map),
            Kind::List => OpType::Make(automerge::ObjType::List),
            Kind::Text => OpType::Make(automerge::ObjType::Text),
            Kind::Counter => OpType::Put(automerge::ScalarValue::counter(0)),
        }
    }
}

/// Why a creation change could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// The parent object is not in the document (a caller bug: parents are resolved first).
    #[error("the parent object is not in this document")]
    UnknownParent,
    /// The key was emptied and re-created more often than Verge scans for.
    #[error(
        "the key was re-created more than {IMPLICIT_GENERATIONS_MAX} times; set it explicitly instead"
    )]
    TooManyGenerations,
    /// Automerge refused the change.
    #[error("automerge refused the creation change: {0}")]
    Automerge(String),
}

/// Where generation 0 of a key starts: its deps and first op counter.
struct Base {
    deps: Vec<ChangeHash>,
    start_op: u64,
}

fn base(doc: &Automerge, parent: &ObjId) -> Result<Base, CreateError> {
    match parent {
        // Every change of a generation descends from its root (see `crate::generation`).
        ObjId::Root if let Some((hash, max_op)) = crate::generation::root_of(doc) => Ok(Base {
            deps: vec![hash],
            start_op: max_op + 1,
        }),
        // Every change of an incarnation descends from its root (see `crate::incarnation`).
        ObjId::Root => Ok(match crate::incarnation::root_of(doc) {
            None => Base {
                deps: Vec::new(),
                start_op: 1,
            },
            Some(root) => Base {
                deps: vec![root],
                start_op: crate::incarnation::root_change(1).max_op() + 1,
            },
        }),
        ObjId::Id(..) => {
            let hash = doc
                .hash_for_opid(parent)
                .ok_or(CreateError::UnknownParent)?;
            let meta = doc
                .get_change_meta_by_hash(&hash)
                .ok_or(CreateError::UnknownParent)?;
            Ok(Base {
                deps: vec![hash],
                start_op: meta.max_op + 1,
            })
        }
    }
}

fn generation_actor(
    parent: &ObjId,
    key: &str,
    kind: Kind,
    generation: u64,
    base: &Base,
) -> ActorId {
    let mut h = Sha256::new();
    h.update(b"verge/implicit/v1\0");
    // The deps tie the actor to one incarnation of the document: an actor must never make two
    // different changes with one sequence number, and a root-level creation is otherwise the
    // same in every incarnation.
    for dep in &base.deps {
        h.update(dep.0);
    }
    match parent {
        ObjId::Root => h.update([0u8]),
        ObjId::Id(counter, actor, _) => {
            h.update([1u8]);
            h.update(counter.to_be_bytes());
            let bytes = actor.to_bytes();
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        }
    }
    h.update((key.len() as u64).to_be_bytes());
    h.update(key.as_bytes());
    h.update([kind.tag()]);
    h.update(generation.to_be_bytes());
    let digest: [u8; 32] = h.finalize().into();
    ActorId::from(&digest[..16])
}

fn legacy_obj(parent: &ObjId) -> ObjectId {
    match parent {
        ObjId::Root => ObjectId::Root,
        ObjId::Id(counter, actor, _) => ObjectId::Id(OpId(*counter, actor.clone())),
    }
}

/// Builds generation `generation` given the op id of generation `generation - 1`, if any.
fn build(
    parent: &ObjId,
    key: &str,
    kind: Kind,
    generation: u64,
    base: &Base,
    previous: Option<(&OpId, ChangeHash)>,
) -> Change {
    let actor = generation_actor(parent, key, kind, generation, base);
    let start_op = base.start_op + generation;
    let (deps, pred) = match previous {
        None => (base.deps.clone(), SortedVec::new()),
        Some((op, hash)) => (vec![hash], SortedVec::from(vec![op.clone()])),
    };
    let op = LegacyOp {
        action: kind.action(),
        obj: legacy_obj(parent),
        key: Key::Map(key.into()),
        pred,
        insert: false,
    };
    Change::from(ExpandedChange {
        operations: vec![op],
        actor_id: actor,
        hash: None,
        seq: 1,
        // `base.start_op` is at least 1.
        start_op: NonZeroU64::new(start_op).unwrap_or(NonZeroU64::MIN),
        time: 0,
        message: None,
        deps,
        extra_bytes: Vec::new(),
        author: None,
    })
}

/// The change creating `kind` at `key` of `parent` in the lowest generation `doc` does not hold
/// yet. The caller has checked that nothing is visible at the key.
pub fn creation_change(
    doc: &Automerge,
    parent: &ObjId,
    key: &str,
    kind: Kind,
) -> Result<Change, CreateError> {
    let base = base(doc, parent)?;
    let mut previous: Option<(OpId, ChangeHash)> = None;
    for generation in 0..IMPLICIT_GENERATIONS_MAX {
        let change = build(
            parent,
            key,
            kind,
            generation,
            &base,
            previous.as_ref().map(|(op, h)| (op, *h)),
        );
        let hash = change.hash();
        if doc.get_change_meta_by_hash(&hash).is_none() {
            return Ok(change);
        }
        previous = Some((
            OpId(change.start_op().get(), change.actor_id().clone()),
            hash,
        ));
    }
    Err(CreateError::TooManyGenerations)
}

/// Whether `change` (decoded: `expanded`) is a creation change of `doc`'s history, and if so
/// what it creates: `(parent, key, kind)`. A creation is recognised by rebuilding it, so a
/// change that merely looks like one is not taken for one.
pub fn identify(
    doc: &Automerge,
    change: &Change,
    expanded: &ExpandedChange,
) -> Option<(ObjectId, String, Kind)> {
    let [op] = expanded.operations.as_slice() else {
        return None;
    };
    if expanded.seq != 1 || expanded.time != 0 || expanded.message.is_some() || op.insert {
        return None;
    }
    let Key::Map(key) = &op.key else {
        return None;
    };
    let kind = match &op.action {
        OpType::Make(automerge::ObjType::Map) => Kind::Map,
        OpType::Make(automerge::ObjType::List) => Kind::List,
        OpType::Make(automerge::ObjType::Text) => Kind::Text,
        OpType::Put(automerge::ScalarValue::Counter(c)) if i64::from(c) == 0 => Kind::Counter,
        _ => return None,
    };
    let parent = match &op.obj {
        ObjectId::Root => ObjId::Root,
        // Automerge finds the actor by its id when the index hint does not match.
        ObjectId::Id(OpId(counter, actor)) => ObjId::Id(*counter, actor.clone(), usize::MAX),
    };
    let base = base(doc, &parent).ok()?;
    let wanted = change.hash();
    let mut previous: Option<(OpId, ChangeHash)> = None;
    for generation in 0..IMPLICIT_GENERATIONS_MAX {
        let built = build(
            &parent,
            key,
            kind,
            generation,
            &base,
            previous.as_ref().map(|(op, h)| (op, *h)),
        );
        let hash = built.hash();
        if hash == wanted {
            return Some((op.obj.clone(), key.to_string(), kind));
        }
        previous = Some((OpId(built.start_op().get(), built.actor_id().clone()), hash));
    }
    None
}

/// Applies [`creation_change`] to `doc` and returns its hash.
pub fn create(
    doc: &mut Automerge,
    parent: &ObjId,
    key: &str,
    kind: Kind,
) -> Result<ChangeHash, CreateError> {
    let change = creation_change(doc, parent, key, kind)?;
    let hash = change.hash();
    doc.apply_changes([change])
        .map_err(|e| CreateError::Automerge(e.to_string()))?;
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ROOT, ReadDoc, ScalarValue, Value};

    fn doc(n: u8) -> Automerge {
        Automerge::new().with_actor(ActorId::from(vec![n; 16]))
    }

    #[test]
    fn concurrent_creators_build_the_same_change() {
        let mut a = doc(1);
        let mut b = doc(2);
        // Different unrelated histories before the creation.
        a.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "x", 1)?;
            Ok(())
        })
        .expect("tx");
        let ca = creation_change(&a, &ROOT, "log", Kind::List).expect("change");
        let cb = creation_change(&b, &ROOT, "log", Kind::List).expect("change");
        assert_eq!(ca.hash(), cb.hash());
        assert_eq!(ca.raw_bytes(), cb.raw_bytes());
        create(&mut a, &ROOT, "log", Kind::List).expect("create");
        create(&mut b, &ROOT, "log", Kind::List).expect("create");
        a.merge(&mut b).expect("merge");
        assert_eq!(a.get_all(ROOT, "log").expect("get").len(), 1, "one list");
    }

    #[test]
    fn kinds_and_keys_differ() {
        let d = doc(1);
        let hashes: Vec<_> = [
            (ROOT, "a", Kind::Map),
            (ROOT, "a", Kind::List),
            (ROOT, "a", Kind::Text),
            (ROOT, "a", Kind::Counter),
            (ROOT, "b", Kind::Map),
        ]
        .iter()
        .map(|(p, k, kind)| creation_change(&d, p, k, *kind).expect("change").hash())
        .collect();
        let unique: std::collections::HashSet<_> = hashes.iter().collect();
        assert_eq!(unique.len(), hashes.len());
    }

    #[test]
    fn a_removed_container_is_created_again_as_the_next_generation() {
        let mut a = doc(1);
        create(&mut a, &ROOT, "n", Kind::Counter).expect("create");
        let first = a.get(ROOT, "n").expect("get").expect("present").1;
        a.transact::<_, _, automerge::AutomergeError>(|tx| tx.delete(ROOT, "n"))
            .expect("tx");
        let mut b = a.fork().with_actor(ActorId::from(vec![2; 16]));
        create(&mut a, &ROOT, "n", Kind::Counter).expect("create");
        create(&mut b, &ROOT, "n", Kind::Counter).expect("create");
        let (value, second) = a.get(ROOT, "n").expect("get").expect("present");
        assert_ne!(first, second);
        assert!(matches!(value, Value::Scalar(s) if matches!(s.as_ref(), ScalarValue::Counter(_))));
        a.merge(&mut b).expect("merge");
        assert_eq!(a.get_all(ROOT, "n").expect("get").len(), 1);
    }

    #[test]
    fn a_later_generation_hides_the_earlier_one_without_its_delete() {
        let mut a = doc(1);
        create(&mut a, &ROOT, "l", Kind::List).expect("create");
        let mut lagging = a.fork().with_actor(ActorId::from(vec![3; 16]));
        a.transact::<_, _, automerge::AutomergeError>(|tx| tx.delete(ROOT, "l"))
            .expect("tx");
        let hash = create(&mut a, &ROOT, "l", Kind::List).expect("create");
        let change = a.get_change_by_hash(&hash).expect("held");
        lagging.apply_changes([change]).expect("apply");
        let all = lagging.get_all(ROOT, "l").expect("get");
        assert_eq!(all.len(), 1, "generation 1 overwrote generation 0");
    }

    #[test]
    fn nested_creation_depends_on_the_parent() {
        let mut a = doc(1);
        create(&mut a, &ROOT, "m", Kind::Map).expect("create");
        let (_, m) = a.get(ROOT, "m").expect("get").expect("present");
        let mut b = doc(2);
        create(&mut b, &ROOT, "m", Kind::Map).expect("create");
        create(&mut a, &m, "t", Kind::Text).expect("create");
        create(&mut b, &m, "t", Kind::Text).expect("create");
        a.merge(&mut b).expect("merge");
        b.merge(&mut a).expect("merge");
        assert_eq!(a.get_heads(), b.get_heads(), "the same changes on both");
        let all = a.get_all(&m, "t").expect("get");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, Value::Object(ObjType::Text));
    }
}
