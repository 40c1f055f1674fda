//! Generations: a document's history folded into one root change at a point every member
//! holds, and the changes made concurrently with that point carried onto it exactly once.
//!
//! The protocol (who compacts, when, and why every member builds the same generation) and its
//! correctness argument are in `docs/compaction.md`. This module is the part every node must
//! compute byte for byte alike:
//!
//! - [`Compaction::start`] builds the root change `G(g+1, W)` of the next generation from the
//!   document at `closure(W)`: a canonical re-creation of the state there, by an actor derived
//!   from the incarnation, the generation number and `W`;
//! - [`Compaction::carry`] rebuilds a change made outside `closure(W)` on the new generation.
//!   The result depends only on the change, the state at `closure(W)` and the carried forms of
//!   the change's own ancestors, so every node that carries it builds the same change and
//!   Automerge sees it once.
//!
//! Ids of the old generation map to the new one through what the root re-created: an object,
//! list element or value visible at `W` maps to the op that re-created it; an element deleted
//! before `W` maps to the nearest surviving element before it, so an insert after it lands
//! where it would have; a value overwritten before `W` maps to nothing, and an op that needs
//! it (an increment, a delete, a write into a removed object) is dropped, as it had no visible
//! effect on the old generation either. Implicit creations ([`crate::implicit`]) are rebuilt in
//! the new generation rather than translated, so that a creation carried from the old
//! generation and one made concurrently in the new generation are the same change.

use std::collections::HashMap;
use std::num::NonZeroU64;

use automerge::legacy::{ElementId, Key, ObjectId, Op as LegacyOp, OpId, OpType, SortedVec};
use automerge::{
    ActorId, Automerge, AutomergeError, Change, ChangeHash, Cursor, ExpandedChange, ObjId, ObjType,
    ROOT, ReadDoc, ScalarValue, Value,
};
use sha2::{Digest, Sha256};

use crate::implicit::{self, CreateError, Kind};

/// Root key holding the document's generation number (absent in generation 0).
pub const GENERATION_KEY: &str = "_verge_generation";
/// Root key holding the hash of the change the generation was compacted at (`W`).
pub const GENERATION_POINT_KEY: &str = "_verge_generation_point";
/// Root key of a proposal to start the generation it holds (see `docs/compaction.md`).
pub const PROPOSAL_KEY: &str = "_verge_compact";

/// Why a generation could not be built or a change not carried onto it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerationError {
    /// The compaction point is not a change of this document.
    #[error("the compaction point {0} is not in this document")]
    UnknownPoint(ChangeHash),
    /// A change to carry depends on a change that is neither before the point nor carried
    /// yet: changes are carried in causal order.
    #[error("change {0} is carried before its dependency {1}")]
    OutOfOrder(ChangeHash, ChangeHash),
    /// Automerge refused a change built here (a bug: every built change is well-formed).
    #[error("automerge: {0}")]
    Automerge(#[from] Box<AutomergeError>),
    /// An implicit creation could not be rebuilt in the new generation.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// The change offered as a generation root is not one.
    #[error("change {0} is not a generation root")]
    NotARoot(ChangeHash),
    /// The root starts a generation other than the next one of this document.
    #[error(
        "the document is in generation {have}; a root of generation {offered} does not follow it"
    )]
    NotNext {
        /// This document's generation.
        have: u64,
        /// The root's.
        offered: u64,
    },
    /// The root is not the one this node builds from the same point: the sender's document at
    /// the point differs from this one (a defect, or a forged root), so it is not adopted.
    #[error("generation root {0} differs from the one rebuilt here")]
    RootMismatch(ChangeHash),
}

impl From<AutomergeError> for GenerationError {
    fn from(e: AutomergeError) -> Self {
        GenerationError::Automerge(Box::new(e))
    }
}

/// The generation `doc` is in (0 without a marker).
pub fn of(doc: &impl ReadDoc) -> u64 {
    crate::incarnation::marker_number(doc, GENERATION_KEY)
}

/// Commits a proposal to start generation `of(doc) + 1` (`docs/compaction.md`): an ordinary
/// change over every head that puts [`PROPOSAL_KEY`], so that one change names the whole
/// history this replica holds as the compaction point. Returns its hash.
pub fn propose(doc: &mut Automerge, time_s: i64) -> Result<ChangeHash, AutomergeError> {
    use automerge::transaction::{CommitOptions, Transactable};
    // A generation number beyond i64 cannot occur: each needs a compaction.
    let next = i64::try_from(of(doc) + 1).unwrap_or(i64::MAX);
    let mut tx = doc.transaction();
    tx.put(ROOT, PROPOSAL_KEY, next)?;
    let (hash, _) = tx.commit_with(CommitOptions::default().with_time(time_s));
    hash.ok_or(AutomergeError::Fail)
}

/// The root change of `doc`'s generation and its highest op, `None` in generation 0.
pub fn root_of(doc: &Automerge) -> Option<(ChangeHash, u64)> {
    let (_, id) = doc.get(ROOT, GENERATION_KEY).ok()??;
    let hash = doc.hash_for_opid(&id)?;
    let meta = doc.get_change_meta_by_hash(&hash)?;
    Some((hash, meta.max_op))
}

/// What a generation's root says about itself: its generation and the point it was compacted
/// at. Read from a change with no deps that puts [`GENERATION_KEY`] and
/// [`GENERATION_POINT_KEY`]; whether it is the root every member builds is checked by
/// rebuilding it ([`Compaction::adopt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootClaim {
    /// The generation the root starts.
    pub number: u64,
    /// The change of the previous generation it was compacted at.
    pub point: ChangeHash,
}

/// The generation root `change` claims to be, if it looks like one.
pub fn root_claim(change: &Change) -> Option<RootClaim> {
    if !change.deps().is_empty() || change.seq() != 1 || change.timestamp() != 0 {
        return None;
    }
    let expanded = change.decode();
    let (mut number, mut point) = (None, None);
    // The markers are the root's last two ops.
    for op in expanded.operations.iter().rev().take(2) {
        match (&op.obj, &op.key, &op.action) {
            (ObjectId::Root, Key::Map(k), OpType::Put(ScalarValue::Int(n)))
                if k.as_str() == GENERATION_KEY =>
            {
                number = u64::try_from(*n).ok();
            }
            (ObjectId::Root, Key::Map(k), OpType::Put(ScalarValue::Bytes(b)))
                if k.as_str() == GENERATION_POINT_KEY =>
            {
                point = <[u8; 32]>::try_from(b.as_slice()).ok().map(ChangeHash);
            }
            _ => {}
        }
    }
    Some(RootClaim {
        number: number.filter(|n| *n >= 1)?,
        point: point?,
    })
}

/// The actor of the root of generation `generation` compacted at `point`.
fn root_actor(incarnation: u64, generation: u64, point: &ChangeHash) -> ActorId {
    let mut h = Sha256::new();
    h.update(b"verge/generation/v1\0");
    h.update(incarnation.to_be_bytes());
    h.update(generation.to_be_bytes());
    h.update(point.0);
    let digest: [u8; 32] = h.finalize().into();
    ActorId::from(&digest[..16])
}

/// Bytes a generation adds to an actor id: the generation number, big-endian.
const GENERATION_SUFFIX_BYTES: usize = 8;
/// The length of actor ids Verge makes (nodes, clients): a derived actor is this plus the suffix.
const BASE_ACTOR_BYTES: usize = 16;

/// The actor that writes, in generation `generation`, what `actor` wrote in the one before.
///
/// An actor must write in one generation only (Automerge numbers an actor's changes from 1 in
/// each history), so the derived actor differs from `actor` and from those of other
/// generations. It is `actor`'s base (the actor it was derived from, if it was) followed by the
/// generation number, so derived actors sort as their bases do: concurrent inserts at one
/// position, which Automerge orders by op id, keep their order when carried.
pub fn generation_actor(actor: &ActorId, generation: u64) -> ActorId {
    let bytes = actor.to_bytes();
    let base = if bytes.len() == BASE_ACTOR_BYTES + GENERATION_SUFFIX_BYTES {
        &bytes[..BASE_ACTOR_BYTES]
    } else {
        bytes
    };
    let mut derived = Vec::with_capacity(base.len() + GENERATION_SUFFIX_BYTES);
    derived.extend_from_slice(base);
    derived.extend_from_slice(&generation.to_be_bytes());
    ActorId::from(derived)
}

/// An op id as Automerge's external ids and legacy ops both spell it.
type OpKey = (u64, ActorId);

fn key_of(id: &ObjId) -> Option<OpKey> {
    match id {
        ObjId::Root => None,
        ObjId::Id(counter, actor, _) => Some((*counter, actor.clone())),
    }
}

fn legacy_key(id: &OpId) -> OpKey {
    (id.0, id.1.clone())
}

/// A cursor on element `element` that resolves, when the element is gone, to the next
/// surviving element (or the sequence's end).
fn cursor_after(element: &OpKey) -> Option<Cursor> {
    let actor = element.1.to_bytes();
    let mut bytes = vec![1, 3];
    write_uleb128(&mut bytes, actor.len() as u64);
    bytes.extend_from_slice(actor);
    write_uleb128(&mut bytes, element.0);
    bytes.push(2); // MoveCursor::After
    Cursor::try_from(bytes.as_slice()).ok()
}

fn write_uleb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Where the root re-created what was visible at the point.
#[derive(Debug, Default)]
struct IdMap {
    /// Objects (by the op that made them) to the root's make op.
    objects: HashMap<OpKey, OpId>,
    /// The old external id of each re-created sequence, for resolving gone elements.
    sequences: HashMap<OpKey, ObjId>,
    /// Sequence elements (by their insert op) to the root's insert op.
    elements: HashMap<OpKey, OpId>,
    /// Element ids of each re-created sequence in order, by the old sequence.
    order: HashMap<OpKey, Vec<OpId>>,
    /// Values visible at the point (the ops that set them) to the op that re-created them.
    values: HashMap<OpKey, OpId>,
}

/// Builds the root's ops.
struct RootBuilder<'a> {
    doc: &'a Automerge,
    actor: ActorId,
    ops: Vec<LegacyOp>,
    ids: IdMap,
    /// Changes decoded to find which element an overwriting op wrote to.
    decoded: HashMap<ChangeHash, ExpandedChange>,
}

impl RootBuilder<'_> {
    /// The id the next op gets (the root starts at op 1).
    fn next_id(&self) -> OpId {
        OpId(self.ops.len() as u64 + 1, self.actor.clone())
    }

    fn push(&mut self, action: OpType, obj: ObjectId, key: Key, insert: bool) -> OpId {
        let id = self.next_id();
        self.ops.push(LegacyOp {
            action,
            obj,
            key,
            pred: SortedVec::new(),
            insert,
        });
        id
    }

    fn map(&mut self, old: &ObjId, new: ObjectId) -> Result<(), GenerationError> {
        let mut keys: Vec<String> = self.doc.keys(old).collect();
        keys.sort_unstable();
        for key in keys {
            if *old == ROOT
                && matches!(
                    key.as_str(),
                    GENERATION_KEY | GENERATION_POINT_KEY | PROPOSAL_KEY
                )
            {
                continue;
            }
            let all = self.doc.get_all(old, key.as_str())?;
            let counters: Option<i64> = if all.len() > 1 {
                all.iter()
                    .map(|(v, _)| match v {
                        Value::Scalar(s) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {
                            s.as_i64()
                        }
                        _ => None,
                    })
                    .sum()
            } else {
                None
            };
            let key_op = Key::Map(key.as_str().into());
            if let Some(sum) = counters {
                // Counters left conflicting by older versions read as their sum; so does the
                // one counter that replaces them, and increments of any of them land on it.
                let id = self.push(
                    OpType::Put(ScalarValue::counter(sum)),
                    new.clone(),
                    key_op,
                    false,
                );
                for (_, value_id) in &all {
                    if let Some(k) = key_of(value_id) {
                        self.ids.values.insert(k, id.clone());
                    }
                }
                continue;
            }
            let Some((value, value_id)) = self.doc.get(old, key.as_str())? else {
                continue;
            };
            self.value(value, &value_id, new.clone(), key_op, false)?;
        }
        Ok(())
    }

    fn sequence(&mut self, old: &ObjId, new: ObjectId) -> Result<(), GenerationError> {
        let length = self.doc.length(old);
        let mut previous = ElementId::Head;
        let mut order = Vec::with_capacity(length);
        for index in 0..length {
            let Some((value, value_id)) = self.doc.get(old, index)? else {
                continue;
            };
            let element = self.element_of(&value_id);
            let id = self.value(value, &value_id, new.clone(), Key::Seq(previous), true)?;
            if let Some(element) = element {
                self.ids.elements.insert(element, id.clone());
            }
            order.push(id.clone());
            previous = ElementId::Id(id);
        }
        if let Some(k) = key_of(old) {
            self.ids.sequences.insert(k.clone(), old.clone());
            self.ids.order.insert(k, order);
        }
        Ok(())
    }

    /// The element (its insert op) that op `value_id` set: itself for an insert, the element
    /// it overwrote for a put. Automerge's external ids and cursors name the op, not the
    /// element, so the op is looked up in its change.
    fn element_of(&mut self, value_id: &ObjId) -> Option<OpKey> {
        let op_key = key_of(value_id)?;
        let hash = self.doc.hash_for_opid(value_id)?;
        if !self.decoded.contains_key(&hash) {
            let change = self.doc.get_change_by_hash(&hash)?.decode();
            self.decoded.insert(hash, change);
        }
        let change = self.decoded.get(&hash)?;
        let index = usize::try_from(op_key.0.checked_sub(change.start_op.get())?).ok()?;
        let op = change.operations.get(index)?;
        match &op.key {
            _ if op.insert => Some(op_key),
            Key::Seq(ElementId::Id(element)) => Some(legacy_key(element)),
            _ => None,
        }
    }

    /// Re-creates `value` (set by op `value_id`) at `key` of `obj`; returns the new op.
    fn value(
        &mut self,
        value: Value<'_>,
        value_id: &ObjId,
        obj: ObjectId,
        key: Key,
        insert: bool,
    ) -> Result<OpId, GenerationError> {
        let id = match value {
            Value::Scalar(s) => {
                let scalar = match s.as_ref() {
                    ScalarValue::Counter(_) => ScalarValue::counter(s.as_i64().unwrap_or(0)),
                    other => other.clone(),
                };
                self.push(OpType::Put(scalar), obj, key, insert)
            }
            Value::Object(kind) => {
                let id = self.push(OpType::Make(kind), obj, key, insert);
                if let Some(k) = key_of(value_id) {
                    self.ids.objects.insert(k, id.clone());
                }
                match kind {
                    ObjType::Map | ObjType::Table => {
                        self.map(value_id, ObjectId::Id(id.clone()))?;
                    }
                    ObjType::List | ObjType::Text => {
                        self.sequence(value_id, ObjectId::Id(id.clone()))?;
                    }
                }
                id
            }
        };
        if let Some(k) = key_of(value_id) {
            self.ids.values.insert(k, id.clone());
        }
        Ok(id)
    }
}

/// A change carried onto the new generation: what its dependents need of it.
#[derive(Debug, Clone)]
struct Carried {
    /// What a dependent depends on in its place: the carried change, or, when nothing of it
    /// remained, what it depended on.
    hashes: Vec<ChangeHash>,
    /// The highest op counter in its causal past, itself included.
    max_op: u64,
}

/// The next generation of one document, being built: its root, and the changes carried onto
/// it so far.
pub struct Compaction {
    /// The old generation at the point.
    at: Automerge,
    /// The point.
    point: ChangeHash,
    number: u64,
    root: Change,
    root_hash: ChangeHash,
    root_max_op: u64,
    ids: IdMap,
    /// Old change hash to its carried form.
    carried: HashMap<ChangeHash, Carried>,
    /// Ops of carried changes: old id to new id.
    carried_ids: HashMap<OpKey, OpId>,
    /// How many changes each carried actor has in the new generation so far.
    actor_seq: HashMap<ActorId, u64>,
    /// The new generation: the root and every carried change.
    next: Automerge,
}

impl std::fmt::Debug for Compaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compaction")
            .field("number", &self.number)
            .field("root", &self.root_hash)
            .field("carried", &self.carried.len())
            .finish_non_exhaustive()
    }
}

impl Compaction {
    /// Builds the next generation of `doc` from its state at `point` (which `doc` holds).
    pub fn start(doc: &Automerge, point: ChangeHash) -> Result<Self, GenerationError> {
        if doc.get_change_meta_by_hash(&point).is_none() {
            return Err(GenerationError::UnknownPoint(point));
        }
        // The document at the point; when the point is its only head, that is the document
        // itself, and a copy costs less than replaying the history up to it.
        let at = if doc.get_heads() == [point] {
            doc.fork()
        } else {
            doc.fork_at(&[point])?
        };
        let number = of(&at) + 1;
        let incarnation = crate::incarnation::of(&at);
        let actor = root_actor(incarnation, number, &point);
        let mut builder = RootBuilder {
            doc: &at,
            actor: actor.clone(),
            ops: Vec::new(),
            ids: IdMap::default(),
            decoded: HashMap::new(),
        };
        builder.map(&ROOT, ObjectId::Root)?;
        // Markers last. A generation number beyond i64 cannot occur: each needs a compaction.
        let generation = i64::try_from(number).unwrap_or(i64::MAX);
        builder.push(
            OpType::Put(ScalarValue::Int(generation)),
            ObjectId::Root,
            Key::Map(GENERATION_KEY.into()),
            false,
        );
        builder.push(
            OpType::Put(ScalarValue::Bytes(point.0.to_vec())),
            ObjectId::Root,
            Key::Map(GENERATION_POINT_KEY.into()),
            false,
        );
        let RootBuilder { ops, ids, .. } = builder;
        let root_max_op = ops.len() as u64;
        let root = Change::from(ExpandedChange {
            operations: ops,
            actor_id: actor,
            hash: None,
            seq: 1,
            start_op: NonZeroU64::MIN,
            time: 0,
            message: None,
            deps: Vec::new(),
            extra_bytes: Vec::new(),
            author: None,
        });
        let root_hash = root.hash();
        let mut next = Automerge::new_with_encoding(crate::document::TEXT_ENCODING);
        next.apply_changes([root.clone()])?;
        Ok(Compaction {
            at,
            point,
            number,
            root,
            root_hash,
            root_max_op,
            ids,
            carried: HashMap::new(),
            carried_ids: HashMap::new(),
            actor_seq: HashMap::new(),
            next,
        })
    }

    /// Moves `doc` (of generation `g`) onto the generation `root` starts, which another node
    /// built: rebuilds the root from `doc`'s own history at the root's point, refuses a root
    /// that differs from the one this node builds (or one of another generation than `g + 1`),
    /// and carries every change of `doc` outside the point. `doc` must hold the point: a node
    /// that does not syncs the previous generation first (`docs/compaction.md`).
    pub fn adopt(doc: &Automerge, root: &Change) -> Result<Self, GenerationError> {
        let claim = root_claim(root).ok_or(GenerationError::NotARoot(root.hash()))?;
        if claim.number != of(doc) + 1 {
            return Err(GenerationError::NotNext {
                have: of(doc),
                offered: claim.number,
            });
        }
        let mut compaction = Compaction::start(doc, claim.point)?;
        if compaction.root_hash != root.hash() {
            return Err(GenerationError::RootMismatch(root.hash()));
        }
        compaction.carry_all(doc)?;
        Ok(compaction)
    }

    /// The new generation's number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The new generation's root change.
    pub fn root(&self) -> &Change {
        &self.root
    }

    /// Whether `hash` is a change of the old generation up to the point (folded into the root,
    /// never carried).
    pub fn is_before_point(&self, hash: &ChangeHash) -> bool {
        self.at.get_change_meta_by_hash(hash).is_some()
    }

    /// Carries every change of `doc` (the old generation) made outside the point, in causal
    /// order, and returns the carried forms that are new.
    pub fn carry_all(&mut self, doc: &Automerge) -> Result<Vec<Change>, GenerationError> {
        let mut out = Vec::new();
        // The changes outside the point, in causal order.
        for change in doc.get_changes(&[self.point]) {
            if self.is_before_point(&change.hash()) {
                continue;
            }
            if let Some(carried) = self.carry(doc, &change)? {
                out.push(carried);
            }
        }
        Ok(out)
    }

    /// Carries `change` (of the old generation `old_doc`, outside the point) onto the new
    /// generation. Its dependencies outside the point must have been carried first. Returns the carried
    /// change when it is a change of its own (a rebuilt implicit creation may be one the new
    /// generation already has), and applies it to [`Compaction::document`].
    pub fn carry(
        &mut self,
        old_doc: &Automerge,
        change: &Change,
    ) -> Result<Option<Change>, GenerationError> {
        let hash = change.hash();
        if self.carried.contains_key(&hash) || self.is_before_point(&hash) {
            return Ok(None);
        }
        let old = change.decode();
        let mut deps = Vec::new();
        let mut max_op = 0;
        for dep in &old.deps {
            if self.is_before_point(dep) {
                max_op = max_op.max(self.root_max_op);
                if !deps.contains(&self.root_hash) {
                    deps.push(self.root_hash);
                }
                continue;
            }
            let carried = self
                .carried
                .get(dep)
                .ok_or(GenerationError::OutOfOrder(hash, *dep))?;
            max_op = max_op.max(carried.max_op);
            for dep_hash in &carried.hashes {
                if !deps.contains(dep_hash) {
                    deps.push(*dep_hash);
                }
            }
        }
        if deps.is_empty() {
            // A history that started apart from this one (another replica's first change):
            // it still descends from the root in the new generation.
            deps.push(self.root_hash);
            max_op = self.root_max_op;
        }
        deps.sort_unstable();
        if let Some(rebuilt) = self.rebuild_creation(old_doc, change, &old, &deps)? {
            return Ok(rebuilt);
        }
        let actor = generation_actor(&old.actor_id, self.number);
        // Op counters keep their order, shifted past the root's, so concurrent ops compare as
        // they did (Automerge orders them by counter, then actor); still past every op the
        // change depends on in the new generation.
        let start_op = (old.start_op.get() + self.root_max_op).max(max_op + 1);
        let mut ops = Vec::with_capacity(old.operations.len());
        for (i, op) in old.operations.iter().enumerate() {
            let old_id = (old.start_op.get() + i as u64, old.actor_id.clone());
            let Some(op) = self.translate(op) else {
                continue;
            };
            let new_id = OpId(start_op + ops.len() as u64, actor.clone());
            self.carried_ids.insert(old_id, new_id);
            ops.push(op);
        }
        if ops.is_empty() {
            // Nothing of it remains (a proposal, or writes into what was gone at the point):
            // it is not carried as a change, and its dependents depend on what it depended on.
            // (An empty change whose actor's ops stop below its deps' cannot be saved in a
            // document and loaded back: the format keeps a change's last op counter and takes
            // the counters since the actor's previous change as its ops.)
            self.carried.insert(
                hash,
                Carried {
                    hashes: deps,
                    max_op,
                },
            );
            return Ok(None);
        }
        let carried_max = start_op + ops.len() as u64 - 1;
        // An actor's changes number from 1 in each generation, with no gap for the ones that
        // were not carried.
        let seq = {
            let n = self.actor_seq.entry(actor.clone()).or_default();
            *n += 1;
            *n
        };
        let new = Change::from(ExpandedChange {
            operations: ops,
            actor_id: actor,
            hash: None,
            seq,
            start_op: NonZeroU64::new(start_op).unwrap_or(NonZeroU64::MIN),
            time: old.time,
            message: old.message.clone(),
            deps,
            extra_bytes: Vec::new(),
            author: None,
        });
        self.carried.insert(
            hash,
            Carried {
                hashes: vec![new.hash()],
                max_op: carried_max.max(max_op),
            },
        );
        self.next.apply_changes([new.clone()])?;
        Ok(Some(new))
    }

    /// An implicit creation is made again in the new generation, in the carried change's
    /// context there (the root and the carried forms of its ancestors): what a node already in
    /// the new generation makes when it creates the same thing. `Ok(Some(_))` when `change`
    /// was one (and is now carried), `Ok(None)` otherwise.
    fn rebuild_creation(
        &mut self,
        old_doc: &Automerge,
        change: &Change,
        old: &ExpandedChange,
        deps: &[ChangeHash],
    ) -> Result<Option<Option<Change>>, GenerationError> {
        let Some((parent, key, kind)) = implicit::identify(old_doc, change, old) else {
            return Ok(None);
        };
        let creation_op = (old.start_op.get(), old.actor_id.clone());
        let new_parent = match &parent {
            ObjectId::Root => Some(ObjId::Root),
            // Automerge finds the actor by its id when the index hint does not match.
            ObjectId::Id(id) => self
                .map_object(&legacy_key(id))
                .map(|id| ObjId::Id(id.0, id.1, usize::MAX)),
        };
        let context = self.next.fork_at(deps)?;
        let Some(new_parent) = new_parent else {
            // The parent is gone in the new generation: nothing written into it shows.
            self.carried.insert(
                change.hash(),
                Carried {
                    hashes: deps.to_vec(),
                    max_op: self.root_max_op,
                },
            );
            return Ok(Some(None));
        };
        if let Some((value, id)) = context.get(&new_parent, key.as_str())?
            && kind_matches(kind, &value)
        {
            // Already there: what was written into the old one goes into this one.
            let creator = context.hash_for_opid(&id).unwrap_or(self.root_hash);
            let max_op = context
                .get_change_meta_by_hash(&creator)
                .map_or(self.root_max_op, |m| m.max_op);
            if let Some(k) = key_of(&id) {
                self.carried_ids.insert(creation_op, OpId(k.0, k.1));
            }
            self.carried.insert(
                change.hash(),
                Carried {
                    hashes: vec![creator],
                    max_op,
                },
            );
            return Ok(Some(None));
        }
        let new = implicit::creation_change(&context, &new_parent, &key, kind)?;
        self.carried_ids.insert(
            creation_op,
            OpId(new.start_op().get(), new.actor_id().clone()),
        );
        self.carried.insert(
            change.hash(),
            Carried {
                hashes: vec![new.hash()],
                max_op: new.max_op(),
            },
        );
        let fresh = self.next.get_change_meta_by_hash(&new.hash()).is_none();
        if !fresh {
            return Ok(Some(None));
        }
        self.next.apply_changes([new.clone()])?;
        Ok(Some(Some(new)))
    }

    fn map_object(&self, old: &OpKey) -> Option<OpId> {
        self.carried_ids
            .get(old)
            .or_else(|| self.ids.objects.get(old))
            .cloned()
    }

    fn map_value(&self, old: &OpKey) -> Option<OpId> {
        self.carried_ids
            .get(old)
            .or_else(|| self.ids.values.get(old))
            .cloned()
    }

    /// The new element an op at `element` of sequence `seq` addresses; for an insert, an
    /// element gone at the point stands for the nearest surviving one before it.
    fn map_element(&self, seq: &OpKey, element: &OpKey, insert: bool) -> Option<ElementId> {
        if let Some(id) = self
            .carried_ids
            .get(element)
            .or_else(|| self.ids.elements.get(element))
        {
            return Some(ElementId::Id(id.clone()));
        }
        if !insert {
            return None;
        }
        let old_seq = self.ids.sequences.get(seq)?;
        let order = self.ids.order.get(seq)?;
        // A gone element resolves to the index of the next surviving one (or the length): the
        // surviving element before that one is the one before the gone element.
        let next = self
            .at
            .get_cursor_position(old_seq, &cursor_after(element)?, None)
            .ok()?;
        Some(match next {
            0 => ElementId::Head,
            n => ElementId::Id(order.get(n - 1)?.clone()),
        })
    }

    /// Translates one op of a carried change; `None` drops it (see the module docs).
    fn translate(&self, op: &LegacyOp) -> Option<LegacyOp> {
        let (obj, obj_key) = match &op.obj {
            ObjectId::Root => {
                if let Key::Map(k) = &op.key
                    && matches!(
                        k.as_str(),
                        GENERATION_KEY | GENERATION_POINT_KEY | PROPOSAL_KEY
                    )
                {
                    return None;
                }
                (ObjectId::Root, None)
            }
            ObjectId::Id(id) => {
                let k = legacy_key(id);
                (ObjectId::Id(self.map_object(&k)?), Some(k))
            }
        };
        let key = match &op.key {
            Key::Map(k) => Key::Map(k.clone()),
            Key::Seq(ElementId::Head) => Key::Seq(ElementId::Head),
            Key::Seq(ElementId::Id(element)) => {
                let seq = obj_key.as_ref()?;
                Key::Seq(self.map_element(seq, &legacy_key(element), op.insert)?)
            }
        };
        let pred: Vec<OpId> = op
            .pred
            .iter()
            .filter_map(|p| self.map_value(&legacy_key(p)))
            .collect();
        let action = match &op.action {
            OpType::MarkBegin(..) | OpType::MarkEnd(..) => return None,
            OpType::Delete | OpType::Increment(_) if pred.is_empty() => return None,
            other => other.clone(),
        };
        Some(LegacyOp {
            action,
            obj,
            key,
            pred: SortedVec::from(pred),
            insert: op.insert,
        })
    }

    /// The new generation so far: the root and every carried change.
    pub fn document(&self) -> &Automerge {
        &self.next
    }

    /// The new generation, to go on writing in.
    pub fn into_document(self) -> Automerge {
        self.next
    }

    /// How many changes were carried.
    pub fn carried(&self) -> usize {
        self.carried.len()
    }
}

fn kind_matches(kind: Kind, value: &Value<'_>) -> bool {
    match (kind, value) {
        (Kind::Map, Value::Object(ObjType::Map)) => true,
        (Kind::List, Value::Object(ObjType::List)) => true,
        (Kind::Text, Value::Object(ObjType::Text)) => true,
        (Kind::Counter, Value::Scalar(s)) => matches!(s.as_ref(), ScalarValue::Counter(_)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use proptest::prelude::*;
    use serde_json::{Value as Json, json};

    use super::*;
    use crate::Write;
    use crate::document::{self, Expiry, new_document};
    use crate::ops::Op;

    fn replica(n: u8) -> Automerge {
        new_document(ActorId::from(vec![n; 16]))
    }

    fn write(doc: &mut Automerge, ops: Json) {
        let write = Write::Ops(Op::parse_list(&ops).expect("valid ops"));
        document::apply(doc, &write, Expiry::Keep, 1_000).expect("write applies");
    }

    fn head(doc: &Automerge) -> ChangeHash {
        let heads = doc.get_heads();
        assert_eq!(heads.len(), 1, "one head");
        heads[0]
    }

    /// `to` receives everything `from` holds.
    fn merge(to: &mut Automerge, from: &Automerge) {
        to.apply_changes(from.get_changes(&[]))
            .expect("changes apply");
    }

    fn json_of(doc: &Automerge) -> Json {
        document::to_json(doc)
    }

    /// Compacts `doc` at `point` and carries everything of `doc` outside it.
    fn compact(doc: &Automerge, point: ChangeHash) -> Compaction {
        let mut c = Compaction::start(doc, point).expect("compaction starts");
        c.carry_all(doc).expect("changes carry");
        c
    }

    fn busy_document() -> Automerge {
        let mut a = replica(1);
        write(
            &mut a,
            json!([
                {"op": "set", "path": ["title"], "value": "shop"},
                {"op": "set", "path": ["meta", "flags", "on"], "value": true},
                {"op": "set", "path": ["meta", "none"], "value": null},
                {"op": "set", "path": ["price"], "value": 12.5},
                {"op": "push", "path": ["items"], "value": "a"},
                {"op": "push", "path": ["items"], "value": {"sku": "b", "qty": 1}},
                {"op": "push", "path": ["items"], "value": "c"},
                {"op": "splice", "path": ["note"], "index": 0, "text": "hello"},
            ]),
        );
        for _ in 0..50 {
            write(&mut a, json!([{"op": "inc", "path": ["views"], "by": 2}]));
        }
        write(
            &mut a,
            json!([
                {"op": "del", "path": ["items", 0]},
                {"op": "set", "path": ["items", 1], "value": "C"},
                {"op": "splice", "path": ["note"], "index": 5, "text": " world"},
                {"op": "inc", "path": ["items", 0, "stock"], "by": 4},
            ]),
        );
        a
    }

    #[test]
    fn the_root_rebuilds_the_state_at_the_point_in_one_change() {
        let a = busy_document();
        let c = compact(&a, head(&a));
        assert_eq!(c.number(), 1);
        assert_eq!(c.carried(), 0);
        let next = c.into_document();
        assert_eq!(json_of(&next), json_of(&a));
        assert_eq!(
            next.get_changes(&[]).len(),
            1,
            "the whole history is one change"
        );
        assert_eq!(of(&next), 1);
        assert_eq!(json_of(&next)["views"], json!(100));
    }

    #[test]
    fn every_holder_of_the_point_builds_the_same_root() {
        let a = busy_document();
        let point = head(&a);
        let mut b = replica(2);
        merge(&mut b, &a);
        // Each goes on writing differently after the point.
        let mut a2 = a.clone();
        write(
            &mut a2,
            json!([{"op": "set", "path": ["title"], "value": "a"}]),
        );
        write(
            &mut b,
            json!([{"op": "push", "path": ["items"], "value": "z"}]),
        );
        let ra = Compaction::start(&a2, point).expect("starts");
        let rb = Compaction::start(&b, point).expect("starts");
        assert_eq!(ra.root().raw_bytes(), rb.root().raw_bytes());
        // A different point is a different generation root.
        let other = Compaction::start(&a2, head(&a2)).expect("starts");
        assert_ne!(other.root().hash(), ra.root().hash());
    }

    #[test]
    fn concurrent_changes_are_carried_once_wherever_they_are_carried() {
        let base = busy_document();
        let point = head(&base);
        let mut a = base.clone();
        let mut b = replica(2);
        merge(&mut b, &base);
        // Concurrent writes after the point on two replicas.
        write(&mut a, json!([{"op": "inc", "path": ["views"], "by": 5}]));
        write(
            &mut a,
            json!([{"op": "push", "path": ["items"], "value": "from-a"}]),
        );
        write(
            &mut a,
            json!([{"op": "set", "path": ["meta", "flags", "off"], "value": 1}]),
        );
        write(&mut b, json!([{"op": "inc", "path": ["views"], "by": 7}]));
        write(
            &mut b,
            json!([{"op": "splice", "path": ["note"], "index": 0, "delete": 1, "text": "J"}]),
        );
        write(&mut b, json!([{"op": "del", "path": ["price"]}]));
        let mut merged = a.clone();
        merge(&mut merged, &b);

        // Carried where both are held, and separately where each is.
        let both = compact(&merged, point);
        let only_a = compact(&a, point);
        let only_b = compact(&b, point);
        assert_eq!(both.carried(), 6);
        let mut joined = only_a.into_document();
        merge(&mut joined, &only_b.into_document());
        let both = both.into_document();
        assert_eq!(
            joined.get_heads(),
            both.get_heads(),
            "the same carried changes"
        );
        assert_eq!(json_of(&both), json_of(&merged));
        assert_eq!(
            json_of(&both)["views"],
            json!(112),
            "increments exactly once"
        );
    }

    #[test]
    fn an_insert_after_an_element_gone_at_the_point_lands_after_its_predecessor() {
        let mut a = replica(1);
        write(
            &mut a,
            json!([{"op": "set", "path": ["l"], "value": ["a", "b", "c"]}]),
        );
        let mut b = replica(2);
        merge(&mut b, &a);
        // a deletes "b" (before the point); b, concurrently, inserts after it.
        write(&mut a, json!([{"op": "del", "path": ["l", 1]}]));
        let point = head(&a);
        write(
            &mut b,
            json!([{"op": "insert", "path": ["l", 2], "value": "x"}]),
        );
        let mut merged = a.clone();
        merge(&mut merged, &b);
        assert_eq!(json_of(&merged)["l"], json!(["a", "x", "c"]));
        let next = compact(&merged, point).into_document();
        assert_eq!(json_of(&next)["l"], json!(["a", "x", "c"]));
    }

    #[test]
    fn an_implicit_creation_meets_the_same_creation_in_the_new_generation() {
        let mut a = replica(1);
        write(&mut a, json!([{"op": "set", "path": ["k"], "value": 1}]));
        let point = head(&a);
        // The old generation creates the list after the point...
        let mut old = a.clone();
        write(
            &mut old,
            json!([{"op": "push", "path": ["items"], "value": "old"}]),
        );
        // ...and a replica already in the new generation creates it too.
        let mut new = Compaction::start(&a, point)
            .expect("starts")
            .into_document();
        new.set_actor(ActorId::from(vec![9; 16]));
        write(
            &mut new,
            json!([{"op": "push", "path": ["items"], "value": "new"}]),
        );
        let carried = compact(&old, point);
        let mut met = carried.into_document();
        merge(&mut met, &new);
        let items = json_of(&met)["items"].clone();
        let mut items: Vec<String> = serde_json::from_value(items).expect("a list of strings");
        items.sort();
        assert_eq!(items, ["new", "old"], "both pushes are in one list");
    }

    #[test]
    fn proposals_are_not_carried() {
        let mut a = replica(1);
        write(&mut a, json!([{"op": "set", "path": ["k"], "value": 1}]));
        let point = head(&a);
        let mut tx = a.transaction();
        tx.put(ROOT, PROPOSAL_KEY, 1_i64).expect("put");
        tx.commit();
        let c = compact(&a, point);
        assert_eq!(c.carried(), 1);
        let next = c.into_document();
        assert!(next.get(ROOT, PROPOSAL_KEY).expect("reads").is_none());
        assert_eq!(of(&next), 1);
    }

    #[test]
    fn changes_are_carried_in_causal_order_only() {
        let mut a = replica(1);
        write(&mut a, json!([{"op": "set", "path": ["k"], "value": 1}]));
        let point = head(&a);
        write(&mut a, json!([{"op": "set", "path": ["k"], "value": 2}]));
        write(&mut a, json!([{"op": "set", "path": ["k"], "value": 3}]));
        let changes = a.get_changes(&[point]);
        let mut c = Compaction::start(&a, point).expect("starts");
        let err = c
            .carry(&a, &changes[1])
            .expect_err("its dependency is not carried");
        assert!(matches!(err, GenerationError::OutOfOrder(..)), "{err}");
        assert!(c.carry(&a, &changes[0]).expect("carries").is_some());
        assert!(c.carry(&a, &changes[1]).expect("carries").is_some());
        assert!(c.carry(&a, &changes[1]).expect("idempotent").is_none());
        assert_eq!(json_of(c.document())["k"], json!(3));
    }

    /// A random op over a small key space so that replicas collide often.
    fn arb_op() -> impl Strategy<Value = Json> {
        let key = prop::sample::select(vec!["a", "b", "c"]);
        prop_oneof![
            (key.clone(), any::<i16>())
                .prop_map(|(k, v)| json!({"op": "set", "path": [k], "value": v})),
            (key.clone(), "[a-z]{0,3}")
                .prop_map(|(k, v)| json!({"op": "set", "path": ["m", k], "value": v})),
            key.clone().prop_map(|k| json!({"op": "del", "path": ["m", k]})),
            (-5i64..5).prop_map(|by| json!({"op": "inc", "path": ["counter"], "by": by})),
            key.prop_map(|k| json!({"op": "inc", "path": ["counters", k], "by": 1})),
            any::<u8>().prop_map(|v| json!({"op": "push", "path": ["list"], "value": v})),
            (0usize..4, any::<u8>())
                .prop_map(|(i, v)| json!({"op": "insert", "path": ["list", i], "value": v})),
            (0usize..4).prop_map(|i| json!({"op": "del", "path": ["list", i]})),
            (0usize..3, "[a-z]{0,3}").prop_map(
                |(i, t)| json!({"op": "splice", "path": ["text"], "index": i, "delete": 1, "text": t})
            ),
        ]
    }

    /// Applies the ops that fit (an index past the end, say, is refused whole).
    fn replay(doc: &mut Automerge, batch: &[Json]) {
        for op in batch {
            let write = Write::Ops(Op::parse_list(&json!([op])).expect("valid ops"));
            let _ = document::apply(doc, &write, Expiry::Keep, 1_000);
        }
    }

    /// One round: each replica's ops, and which exchanges follow (bits).
    type Round = (Vec<Json>, Vec<Json>, Vec<Json>, u8);

    /// Rounds of writes at three replicas; each round, each replica may take in another's
    /// changes.
    fn play(replicas: &mut [Automerge], rounds: &[Round]) {
        for (a, b, c, merges) in rounds {
            replay(&mut replicas[0], a);
            replay(&mut replicas[1], b);
            replay(&mut replicas[2], c);
            for (bit, (to, from)) in [(0, 1), (1, 2), (2, 0), (1, 0)].iter().enumerate() {
                if merges & (1 << bit) != 0 {
                    let from = replicas[*from].clone();
                    merge(&mut replicas[*to], &from);
                }
            }
        }
    }

    fn arb_rounds() -> impl Strategy<Value = Vec<Round>> {
        let ops = || prop::collection::vec(arb_op(), 0..4);
        prop::collection::vec((ops(), ops(), ops(), any::<u8>()), 1..5)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Three replicas write concurrently, reach a point all of them hold, and go on writing
        /// concurrently with partial exchanges. Compacting at the point and carrying the rest
        /// gives the same document as the old generation, whether the changes are carried
        /// where all of them are held or separately at each replica: every change is carried
        /// to one and the same change, so it takes effect exactly once.
        #[test]
        fn carrying_preserves_the_document_and_is_the_same_everywhere(
            before in arb_rounds(),
            after in arb_rounds(),
        ) {
            let mut replicas: Vec<Automerge> = (1..=3).map(replica).collect();
            play(&mut replicas, &before);
            // Everyone meets, then one replica's change is the point all of them hold.
            for i in 1..3 {
                let other = replicas[i].clone();
                merge(&mut replicas[0], &other);
            }
            let mut tx = replicas[0].transaction();
            tx.put(ROOT, PROPOSAL_KEY, 1_i64).expect("put");
            tx.commit();
            let point = head(&replicas[0]);
            // A concurrent proposal: nothing of it is carried, yet what follows it is.
            propose(&mut replicas[1], 0).expect("propose");
            for i in 1..3 {
                let first = replicas[0].clone();
                merge(&mut replicas[i], &first);
            }
            play(&mut replicas, &after);
            let mut all = replicas[0].clone();
            for other in &replicas[1..] {
                merge(&mut all, other);
            }

            let everything = compact(&all, point).into_document();
            prop_assert_eq!(json_of(&everything), json_of(&all));
            // The new generation saves and loads back as a whole (as nodes store it and send
            // it in a sync).
            let loaded = Automerge::load(&everything.save()).expect("loads");
            prop_assert_eq!(loaded.get_heads(), everything.get_heads());
            let mut apart = compact(&replicas[0], point).into_document();
            for other in &replicas[1..] {
                merge(&mut apart, &compact(other, point).into_document());
            }
            prop_assert_eq!(apart.get_heads(), everything.get_heads());
            prop_assert_eq!(json_of(&apart), json_of(&all));
        }
    }

    #[test]
    fn a_replica_adopts_a_generation_another_built_and_carries_its_own_writes() {
        let base = busy_document();
        let mut b = replica(2);
        merge(&mut b, &base);
        // a compacts at its head; b, still in the old generation, writes meanwhile.
        let mut a = base.clone();
        let mut tx = a.transaction();
        tx.put(ROOT, PROPOSAL_KEY, 1_i64).expect("put");
        tx.commit();
        let point = head(&a);
        merge(&mut b, &a);
        write(&mut b, json!([{"op": "inc", "path": ["views"], "by": 1}]));
        write(
            &mut b,
            json!([{"op": "push", "path": ["items"], "value": "b"}]),
        );
        let mut old_all = a.clone();
        merge(&mut old_all, &b);

        let built = compact(&a, point);
        let root = built.root().clone();
        let mut a_next = built.into_document();
        a_next.set_actor(generation_actor(&ActorId::from(vec![1; 16]), 1));
        write(
            &mut a_next,
            json!([{"op": "inc", "path": ["views"], "by": 10}]),
        );

        let adopted = Compaction::adopt(&b, &root).expect("b adopts");
        assert_eq!(adopted.root().hash(), root.hash());
        let mut b_next = adopted.into_document();
        merge(&mut b_next, &a_next);
        merge(&mut a_next, &b_next);
        assert_eq!(a_next.get_heads(), b_next.get_heads());
        let mut expected = json_of(&old_all);
        expected["views"] = json!(111);
        assert_eq!(json_of(&b_next), expected);
    }

    #[test]
    fn roots_that_are_not_the_one_built_here_are_refused() {
        let a = busy_document();
        let point = head(&a);
        let root = Compaction::start(&a, point).expect("starts").root().clone();
        assert_eq!(root_claim(&root), Some(RootClaim { number: 1, point }));
        // A replica whose history at the point differs builds another root.
        let mut other = replica(3);
        write(
            &mut other,
            json!([{"op": "set", "path": ["x"], "value": 1}]),
        );
        let forged_point = head(&other);
        let forged = Compaction::start(&other, forged_point)
            .expect("starts")
            .root()
            .clone();
        assert!(matches!(
            Compaction::adopt(&a, &forged),
            Err(GenerationError::UnknownPoint(_))
        ));
        let mut both = a.clone();
        merge(&mut both, &other);
        // The forged root claims a point `both` holds, but `both` builds it from more state.
        let mut tampered = forged.decode();
        tampered
            .operations
            .retain(|op| !matches!(&op.key, Key::Map(k) if k.as_str() == "x"));
        let tampered = Change::from(tampered);
        assert!(matches!(
            Compaction::adopt(&both, &tampered),
            Err(GenerationError::RootMismatch(_))
        ));
        // Not a root at all, and a generation that does not follow.
        let plain = a.get_changes(&[]).last().cloned().expect("a change");
        assert!(matches!(
            Compaction::adopt(&a, &plain),
            Err(GenerationError::NotARoot(_))
        ));
        let next = Compaction::start(&a, point)
            .expect("starts")
            .into_document();
        assert!(matches!(
            Compaction::adopt(&next, &root),
            Err(GenerationError::NotNext {
                have: 1,
                offered: 1
            })
        ));
    }

    #[test]
    fn an_unknown_point_is_refused() {
        let a = busy_document();
        let err = Compaction::start(&a, ChangeHash([7; 32])).expect_err("not a change here");
        assert!(matches!(err, GenerationError::UnknownPoint(_)));
    }
}
