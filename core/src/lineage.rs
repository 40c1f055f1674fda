//! Lineages: which history a document's changes belong to, and how a replica keeps to one
//! history when changes of another arrive.
//!
//! A document's life is a sequence of incarnations (`crate::incarnation`: deleted or expired and
//! written again), and each incarnation a sequence of generations (`crate::generation`: its
//! history folded into one root change). Each `(incarnation, generation)` pair is a separate
//! Automerge history starting at its own root change, and nothing of two is ever merged: a
//! replica that meets a newer one moves to it, and changes of an older one are dropped (their
//! sender holds them and moves itself). Moving to the next generation of the same incarnation
//! carries the replica's own changes onto it ([`crate::generation::Compaction::adopt`]); moving
//! to a newer incarnation leaves the old one behind, as deleting it meant.

use std::collections::HashSet;

use automerge::legacy::{Key, ObjectId, OpType};
use automerge::{ActorId, Automerge, AutomergeError, Change, ChangeHash, ReadDoc, ScalarValue};

use crate::document::new_document;
use crate::generation::{self, Compaction, GenerationError};
use crate::incarnation::{self, INCARNATION_KEY};

/// Which history a replica is in, ordered: a later incarnation is newer than any generation of
/// an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lineage {
    /// The incarnation.
    pub incarnation: u64,
    /// The generation within it.
    pub generation: u64,
}

impl Lineage {
    /// The lineage `doc` is in.
    pub fn of(doc: &Automerge) -> Self {
        Lineage {
            incarnation: incarnation::of(doc),
            generation: generation::of(doc),
        }
    }
}

impl std::fmt::Display for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "incarnation {} generation {}",
            self.incarnation, self.generation
        )
    }
}

/// The actor a replica whose own actor is `base` writes as in `lineage`. Every lineage gets
/// its own actor: Automerge numbers an actor's changes from 1 in each history, and two
/// histories meet for a moment when a replica receives a newer one.
pub fn writer_actor(base: &ActorId, lineage: Lineage) -> ActorId {
    let actor = incarnation::actor_for(base, lineage.incarnation);
    match lineage.generation {
        0 => actor,
        g => generation::generation_actor(&actor, g),
    }
}

/// A replica's history before it received changes: what [`settle`] keeps it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    /// Its lineage.
    pub lineage: Lineage,
    /// The root change its history starts at; `None` in incarnation 0, generation 0, which has
    /// no root (its changes may start several histories, one per replica that created it).
    pub root: Option<ChangeHash>,
}

impl Local {
    /// `doc`'s history, read before changes from elsewhere are applied to it.
    pub fn of(doc: &Automerge) -> Self {
        let lineage = Lineage::of(doc);
        let root = match lineage.generation {
            0 => incarnation::root_of(doc),
            _ => generation::root_of(doc).map(|(hash, _)| hash),
        };
        Local { lineage, root }
    }
}

/// The lineage a change with no deps starts: a root's, or incarnation 0 generation 0 for any
/// other first change.
pub fn started_by(change: &Change) -> Lineage {
    if let Some(j) = incarnation::root_number(change) {
        return Lineage {
            incarnation: j,
            generation: 0,
        };
    }
    match generation::root_claim(change) {
        Some(claim) => Lineage {
            incarnation: root_incarnation(change),
            generation: claim.number,
        },
        None => Lineage::default(),
    }
}

/// The incarnation a generation root re-creates (the root carries the incarnation marker over).
fn root_incarnation(root: &Change) -> u64 {
    root.decode()
        .operations
        .iter()
        .find_map(|op| match (&op.obj, &op.key, &op.action) {
            (ObjectId::Root, Key::Map(k), OpType::Put(ScalarValue::Int(n)))
                if k.as_str() == INCARNATION_KEY =>
            {
                u64::try_from(*n).ok()
            }
            _ => None,
        })
        .unwrap_or(0)
}

/// How a replica moves to the next generation of its incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// It rebuilds the generation's root from its own history and carries its own changes onto
    /// it (nodes: every acknowledged write stays in the cluster).
    Carry,
    /// It takes the new generation as it is (clients: they replay their unacknowledged
    /// operations themselves, `docs/compaction.md`). The caller then writes as a fresh actor:
    /// a node may yet carry this replica's older changes under the actor the new generation
    /// would derive for it.
    Replace,
}

/// What [`settle`] did.
#[derive(Debug)]
pub enum Settled {
    /// Every new change belongs to the document's history.
    Kept,
    /// Some new changes were of an older history and were removed. The sender holds an old
    /// history and must move to the current one.
    Dropped {
        /// The new changes that stayed.
        kept: Vec<Change>,
        /// The newest of the histories dropped: of this incarnation, the sender missed a
        /// compaction (and carries its changes when it moves); of an older one, a delete.
        older: Lineage,
    },
    /// A newer history replaced the document; nothing of the old one was kept.
    Replaced {
        /// The lineage it was in.
        from: Lineage,
    },
    /// The document moved to its next generation, carrying its own changes onto it.
    Adopted {
        /// The changes of the old generation carried.
        carried: usize,
        /// The generation it left, as it held it (it holds the new generation's point): a node
        /// retains it to carry changes that clients still hold of it ([`carry_stale`]).
        previous: Box<Automerge>,
    },
}

/// Why changes could not be settled. The document must be discarded and reloaded: it may hold
/// changes of two histories.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettleError {
    /// Automerge refused a rebuilt history (a bug: every change in it was applied before).
    #[error("automerge: {0}")]
    Automerge(#[from] Box<AutomergeError>),
    /// The next generation could not be adopted: its root does not match the one rebuilt here,
    /// or a change does not carry.
    #[error(transparent)]
    Generation(#[from] GenerationError),
    /// The next generation was compacted at a change this replica does not hold, while it
    /// holds changes of its own generation: they cannot be carried without the state at that
    /// point, and taking the new generation as it is would drop them. The newer changes are
    /// refused; the replica needs the previous generation from a member that retains it.
    #[error(
        "generation {generation} was compacted at {point}, which this replica does not hold: its own changes cannot be carried yet"
    )]
    PointMissing {
        /// The generation offered.
        generation: u64,
        /// Its compaction point.
        point: ChangeHash,
    },
    /// A generation more than one past this replica's arrived while it holds changes of its
    /// own generation, which cannot be carried across two compactions.
    #[error(
        "the document is in {have}; {offered} is more than one generation ahead and its own changes cannot be carried"
    )]
    GenerationGap {
        /// This replica's lineage.
        have: Lineage,
        /// The lineage offered.
        offered: Lineage,
    },
}

impl From<AutomergeError> for SettleError {
    fn from(e: AutomergeError) -> Self {
        SettleError::Automerge(Box::new(e))
    }
}

/// Of a document's `changes` (in causal order), those of the history starting at `root` (or,
/// without a root, at any first change that is not a root). A change with deps in two
/// histories belongs to neither.
fn history_of(changes: &[Change], root: Option<ChangeHash>) -> Vec<Change> {
    let mut kept: HashSet<ChangeHash> = HashSet::new();
    let mut out = Vec::new();
    for change in changes {
        let member = if change.deps().is_empty() {
            match root {
                Some(root) => change.hash() == root,
                None => started_by(change) == Lineage::default(),
            }
        } else {
            change.deps().iter().all(|d| kept.contains(d))
        };
        if member {
            kept.insert(change.hash());
            out.push(change.clone());
        }
    }
    out
}

/// A document of `changes` alone, writing as `actor`.
fn rebuild(actor: ActorId, changes: Vec<Change>) -> Result<Automerge, SettleError> {
    let mut doc = new_document(actor);
    doc.apply_changes(changes)?;
    Ok(doc)
}

/// Keeps `doc` in one history after changes from elsewhere were applied to it: `local` is its
/// history before (read with [`Local::of`]), `new` the changes that applied.
///
/// The common case costs a look at each new change's deps: only a change with none can start
/// another history. Moving or dropping rebuilds the document from its history.
pub fn settle(
    doc: &mut Automerge,
    local: &Local,
    new: &[Change],
    moving: Move,
) -> Result<Settled, SettleError> {
    let roots: Vec<(&Change, Lineage)> = new
        .iter()
        .filter(|c| c.deps().is_empty())
        .map(|c| (c, started_by(c)))
        .collect();
    if roots.is_empty() {
        return Ok(Settled::Kept);
    }
    let newest = roots
        .iter()
        .map(|(_, l)| *l)
        .max()
        .unwrap_or_default()
        .max(local.lineage);
    let foreign = |root: &Change, lineage: Lineage| match local.root {
        Some(own) => root.hash() != own,
        None => lineage != local.lineage,
    };
    if newest == local.lineage {
        let Some(older) = roots
            .iter()
            .filter(|(c, l)| foreign(c, *l))
            .map(|(_, l)| *l)
            .max()
        else {
            return Ok(Settled::Kept);
        };
        let history = history_of(&doc.get_changes(&[]), local.root);
        let kept: HashSet<ChangeHash> = history.iter().map(Change::hash).collect();
        *doc = rebuild(doc.get_actor().clone(), history)?;
        let kept_new = new
            .iter()
            .filter(|c| kept.contains(&c.hash()))
            .cloned()
            .collect();
        return Ok(Settled::Dropped {
            kept: kept_new,
            older,
        });
    }
    // The newest history's root: an incarnation's is known; a generation's is among the new
    // changes (the smallest hash, should two claim one generation: at most one is genuine).
    let root = if newest.generation == 0 {
        incarnation::root_change(newest.incarnation)
    } else {
        let mut candidates: Vec<&Change> = roots
            .iter()
            .filter(|(_, l)| *l == newest)
            .map(|(c, _)| *c)
            .collect();
        candidates.sort_by_key(|c| c.hash());
        match candidates.first() {
            Some(c) => (*c).clone(),
            None => return Err(SettleError::Automerge(Box::new(AutomergeError::Fail))),
        }
    };
    let all = doc.get_changes(&[]);
    let next = history_of(&all, Some(root.hash()));
    let own = history_of(&all, local.root);
    let same_incarnation = newest.incarnation == local.lineage.incarnation;
    // The replica's own actor goes on in the new generation after the changes carried for it
    // (`generation_actor` keeps the actor's base); a new incarnation derives one afresh.
    let actor = if same_incarnation {
        generation::generation_actor(doc.get_actor(), newest.generation)
    } else {
        writer_actor(doc.get_actor(), newest)
    };
    if !same_incarnation || own.is_empty() || moving == Move::Replace {
        // A newer incarnation ends the old one; an empty replica has nothing to carry; a client
        // replays its own operations.
        let mut rebuilt = rebuild(actor, vec![root])?;
        rebuilt.apply_changes(next)?;
        *doc = rebuilt;
        return Ok(Settled::Replaced {
            from: local.lineage,
        });
    }
    if newest.generation != local.lineage.generation + 1 {
        return Err(SettleError::GenerationGap {
            have: local.lineage,
            offered: newest,
        });
    }
    let old = rebuild(doc.get_actor().clone(), own)?;
    let claim = generation::root_claim(&root).ok_or(GenerationError::NotARoot(root.hash()))?;
    if old.get_change_meta_by_hash(&claim.point).is_none() {
        return Err(SettleError::PointMissing {
            generation: claim.number,
            point: claim.point,
        });
    }
    let compaction = Compaction::adopt(&old, &root)?;
    let carried = compaction.carried();
    let mut adopted = compaction.into_document().with_actor(actor);
    // The new generation's own changes (the carried ones are shared, by hash).
    adopted.apply_changes(next)?;
    *doc = adopted;
    Ok(Settled::Adopted {
        carried,
        previous: Box::new(old),
    })
}

/// Why changes of an earlier generation could not be carried onto the current one. The
/// client that sent them replays its writes instead (`docs/compaction.md`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StaleError {
    /// No retained generation is the one the changes belong to (never held here, released, or
    /// further back than a node retains).
    #[error("generation {0} is not retained here")]
    NotRetained(u64),
    /// Some of the changes depend on changes the retained generation does not hold.
    #[error("{0} of the changes depend on changes that generation {1} does not hold here")]
    MissingDeps(usize, u64),
    /// A change of theirs starts a history of its own.
    #[error("a change offered as stale starts a history of its own")]
    Foreign,
    /// Carrying failed (the retained generations do not follow one another, or a change does
    /// not carry).
    #[error(transparent)]
    Generation(#[from] GenerationError),
    /// Automerge refused a change.
    #[error("automerge: {0}")]
    Automerge(#[from] Box<AutomergeError>),
}

impl From<AutomergeError> for StaleError {
    fn from(e: AutomergeError) -> Self {
        StaleError::Automerge(Box::new(e))
    }
}

/// Carries `stale`, changes of generation `from` that a client (or any peer that is not a
/// member) still holds, onto the current generation, which `root` starts, through the
/// generations this node retained (`retained`, consecutive, each as this node held it when it
/// left it, so each holds the point of the one after it).
///
/// Each step is the carrying every member does when it moves to the next generation
/// ([`Compaction::adopt`]), applied to the retained generation plus the stale changes, so a
/// stale change gets the same carried form as wherever else it was carried: one the cluster
/// already carried (its sender's last sync reached a node before it compacted, and the answer
/// was lost) takes effect once. Returns every carried form in the current generation, those
/// the document already holds included (applying them again changes nothing).
pub fn carry_stale(
    retained: Vec<Automerge>,
    from: u64,
    root: &Change,
    stale: Vec<Change>,
) -> Result<Vec<Change>, StaleError> {
    let start = retained
        .iter()
        .position(|d| generation::of(d) == from)
        .ok_or(StaleError::NotRetained(from))?;
    let mut docs = retained.into_iter().skip(start);
    let Some(mut scratch) = docs.next() else {
        return Err(StaleError::NotRetained(from));
    };
    // Only changes of that generation: a change without deps must be one of its first ones.
    let lineage = Lineage::of(&scratch);
    let root_hash = generation::root_of(&scratch).map(|(hash, _)| hash);
    let foreign = |c: &Change| match root_hash {
        Some(root) => c.hash() != root,
        None => started_by(c) != lineage,
    };
    if stale.iter().any(|c| c.deps().is_empty() && foreign(c)) {
        return Err(StaleError::Foreign);
    }
    let hashes: Vec<ChangeHash> = stale.iter().map(Change::hash).collect();
    scratch.apply_changes(stale)?;
    // Each must have applied: one whose deps are missing waits in Automerge's queue. (Only
    // theirs count: the retained copy may hold queued changes of its own, sent by some other
    // stale copy, that are no concern of these.)
    let waiting = hashes
        .iter()
        .filter(|h| scratch.get_change_meta_by_hash(h).is_none())
        .count();
    if waiting > 0 {
        return Err(StaleError::MissingDeps(waiting, from));
    }
    loop {
        let next = docs.next();
        let next_root = match &next {
            Some(doc) => generation::root_of(doc)
                .and_then(|(hash, _)| doc.get_change_by_hash(&hash))
                .ok_or(StaleError::NotRetained(generation::of(doc)))?,
            None => root.clone(),
        };
        let compaction = Compaction::adopt(&scratch, &next_root)?;
        let carried: Vec<Change> = compaction
            .document()
            .get_changes(&[])
            .into_iter()
            .filter(|c| c.hash() != next_root.hash())
            .collect();
        match next {
            Some(mut doc) => {
                doc.apply_changes(carried)?;
                scratch = doc;
            }
            None => return Ok(carried),
        }
    }
}

#[cfg(test)]
mod tests {
    use automerge::sync::{State, SyncDoc};
    use serde_json::json;

    use super::*;
    use crate::Write;
    use crate::document::{self, Expiry, to_json};
    use crate::ops::Op;

    fn replica(n: u8) -> Automerge {
        new_document(ActorId::from(vec![n; 16]))
    }

    fn write(doc: &mut Automerge, ops: serde_json::Value) {
        let ops = Op::parse_list(&ops).expect("ops");
        document::apply(doc, &Write::Ops(ops), Expiry::Keep, 0).expect("apply");
    }

    /// Sends every change `from` holds to `to` and settles `to`, as a node does with a sync.
    fn deliver(to: &mut Automerge, from: &Automerge, moving: Move) -> Result<Settled, SettleError> {
        let local = Local::of(to);
        let before = to.get_heads();
        to.apply_changes(from.get_changes(&[])).expect("apply");
        let new = to.get_changes(&before);
        settle(to, &local, &new, moving)
    }

    /// Compacts `doc` at its (single) head.
    fn compact(doc: &mut Automerge) {
        let point = doc.get_heads()[0];
        compact_at(doc, point);
    }

    #[test]
    fn a_replica_moves_to_the_next_generation_and_carries_its_own_writes() {
        let mut a = replica(1);
        write(&mut a, json!([{"op": "inc", "path": ["n"], "by": 5}]));
        let mut b = replica(2);
        deliver(&mut b, &a, Move::Carry).expect("settle");
        // b writes on generation 0 while a compacts.
        write(&mut b, json!([{"op": "inc", "path": ["n"], "by": 2}]));
        compact(&mut a);
        write(&mut a, json!([{"op": "inc", "path": ["n"], "by": 1}]));
        let settled = deliver(&mut b, &a, Move::Carry).expect("settle");
        assert!(
            matches!(settled, Settled::Adopted { carried: 1, .. }),
            "{settled:?}"
        );
        assert_eq!(Lineage::of(&b).generation, 1);
        assert_eq!(to_json(&b)["n"], json!(8));
        // a meets b's carried write, and refuses b's old generation.
        let settled = deliver(&mut a, &b, Move::Carry).expect("settle");
        assert!(matches!(settled, Settled::Kept), "{settled:?}");
        assert_eq!(to_json(&a)["n"], json!(8));
        assert_eq!(a.get_heads(), b.get_heads());
    }

    #[test]
    fn changes_of_an_older_generation_are_dropped() {
        let mut a = replica(1);
        write(&mut a, json!([{"op": "set", "path": ["k"], "value": 1}]));
        let mut old = replica(2);
        deliver(&mut old, &a, Move::Carry).expect("settle");
        write(&mut old, json!([{"op": "set", "path": ["j"], "value": 2}]));
        compact(&mut a);
        let heads = a.get_heads();
        let settled = deliver(&mut a, &old, Move::Carry).expect("settle");
        let Settled::Dropped { kept, older } = settled else {
            panic!("{settled:?}");
        };
        assert!(kept.is_empty());
        assert_eq!(older, Lineage::default());
        assert_eq!(a.get_heads(), heads);
        assert_eq!(to_json(&a), json!({"k": 1}));
    }

    #[test]
    fn a_client_takes_the_next_generation_as_it_is() {
        let mut a = replica(1);
        write(&mut a, json!([{"op": "set", "path": ["k"], "value": 1}]));
        let mut client = replica(9);
        deliver(&mut client, &a, Move::Replace).expect("settle");
        write(
            &mut client,
            json!([{"op": "set", "path": ["mine"], "value": 1}]),
        );
        compact(&mut a);
        let settled = deliver(&mut client, &a, Move::Replace).expect("settle");
        assert!(matches!(settled, Settled::Replaced { .. }), "{settled:?}");
        assert_eq!(to_json(&client), json!({"k": 1}));
        assert_eq!(client.get_heads(), a.get_heads());
    }

    #[test]
    fn an_empty_replica_takes_a_generation_whose_point_it_never_saw() {
        let mut a = replica(1);
        write(&mut a, json!([{"op": "inc", "path": ["n"], "by": 3}]));
        compact(&mut a);
        let mut fresh = replica(2);
        let settled = deliver(&mut fresh, &a, Move::Carry).expect("settle");
        assert!(matches!(settled, Settled::Replaced { .. }), "{settled:?}");
        assert_eq!(to_json(&fresh)["n"], json!(3));
        // It writes as its own actor of that generation.
        assert_eq!(
            fresh.get_actor(),
            &writer_actor(&ActorId::from(vec![2; 16]), Lineage::of(&a))
        );
    }

    #[test]
    fn own_writes_without_the_point_are_not_dropped_silently() {
        let mut a = replica(1);
        write(&mut a, json!([{"op": "inc", "path": ["n"], "by": 3}]));
        compact(&mut a);
        let mut apart = replica(2);
        write(&mut apart, json!([{"op": "inc", "path": ["n"], "by": 4}]));
        let err = deliver(&mut apart, &a, Move::Carry).expect_err("refused");
        assert!(matches!(err, SettleError::PointMissing { .. }), "{err}");
    }

    #[test]
    fn a_newer_incarnation_still_replaces_any_generation() {
        let mut a = replica(1);
        write(&mut a, json!([{"op": "set", "path": ["k"], "value": 1}]));
        compact(&mut a);
        let b = incarnation::stub(&ActorId::from(vec![2; 16]), 1).expect("stub");
        let settled = deliver(&mut a, &b, Move::Carry).expect("settle");
        assert!(matches!(settled, Settled::Replaced { .. }), "{settled:?}");
        assert_eq!(
            Lineage::of(&a),
            Lineage {
                incarnation: 1,
                generation: 0
            }
        );
    }

    #[test]
    fn lineages_order_incarnation_first() {
        let l = |incarnation, generation| Lineage {
            incarnation,
            generation,
        };
        assert!(l(1, 0) > l(0, 9));
        assert!(l(0, 2) > l(0, 1));
        assert_eq!(started_by(&incarnation::root_change(3)), l(3, 0));
    }

    /// One side's step of a node-to-node sync: receive (settling), as the node does.
    fn receive(doc: &mut Automerge, state: &mut State, message: automerge::sync::Message) {
        let local = Local::of(doc);
        let before = doc.get_heads();
        doc.receive_sync_message(state, message).expect("receive");
        let new = doc.get_changes(&before);
        match settle(doc, &local, &new, Move::Carry).expect("settle") {
            Settled::Kept => {}
            // What the state knows of the peer still holds; the heads it takes as shared may
            // be gone.
            Settled::Dropped { .. } => state.shared_heads.clear(),
            Settled::Replaced { .. } | Settled::Adopted { .. } => *state = State::new(),
        }
    }

    /// Runs a sync session between `a` and `b` taking turns, as two nodes do; returns the
    /// messages it took.
    fn session(a: &mut Automerge, b: &mut Automerge) -> usize {
        let (mut sa, mut sb) = (State::new(), State::new());
        let mut quiet = 0;
        for turn in 0..128 {
            let (from, from_state, to, to_state) = if turn % 2 == 0 {
                (&mut *a, &mut sa, &mut *b, &mut sb)
            } else {
                (&mut *b, &mut sb, &mut *a, &mut sa)
            };
            match from.generate_sync_message(from_state) {
                Some(m) => {
                    quiet = 0;
                    receive(to, to_state, m);
                }
                None => {
                    quiet += 1;
                    if quiet == 2 {
                        return turn;
                    }
                }
            }
        }
        panic!("the session did not settle in 128 messages");
    }

    fn compact_at(doc: &mut Automerge, point: ChangeHash) {
        let mut compaction = Compaction::start(doc, point).expect("start");
        compaction.carry_all(doc).expect("carry");
        let actor = generation::generation_actor(doc.get_actor(), compaction.number());
        *doc = compaction.into_document().with_actor(actor);
    }

    #[test]
    fn a_node_behind_by_one_generation_moves_in_one_session() {
        let mut a = crate::document::new_document(ActorId::from(vec![1; 16]));
        write(&mut a, json!([{"op": "inc", "path": ["n"], "by": 1}]));
        let mut b = crate::document::new_document(ActorId::from(vec![2; 16]));
        session(&mut a, &mut b);
        // Generation 1 everywhere.
        let w = generation::propose(&mut a, 0).expect("propose");
        session(&mut a, &mut b);
        compact_at(&mut a, w);
        session(&mut a, &mut b);
        assert_eq!(Lineage::of(&b).generation, 1);
        // Two concurrent proposals for generation 2; a compacts at the winner, b does not yet.
        write(&mut a, json!([{"op": "inc", "path": ["n"], "by": 1}]));
        write(&mut b, json!([{"op": "inc", "path": ["n"], "by": 1}]));
        let pa = generation::propose(&mut a, 0).expect("propose");
        let pb = generation::propose(&mut b, 0).expect("propose");
        session(&mut a, &mut b);
        assert_eq!(a.get_heads(), b.get_heads());
        compact_at(&mut a, pa.min(pb));
        write(&mut a, json!([{"op": "inc", "path": ["n"], "by": 1}]));
        write(&mut b, json!([{"op": "inc", "path": ["n"], "by": 1}]));
        session(&mut a, &mut b);
        assert_eq!(Lineage::of(&b).generation, 2);
        assert_eq!(a.get_heads(), b.get_heads());
        assert_eq!(to_json(&a)["n"], json!(5));
    }

    #[test]
    fn a_compacted_document_loads_elsewhere_as_a_whole() {
        let mut a = crate::document::new_document(ActorId::from(vec![1; 16]));
        write(
            &mut a,
            json!([{"op": "inc", "path": ["n"], "by": 1}, {"op": "push", "path": ["l"], "value": 1}]),
        );
        let mut b = crate::document::new_document(ActorId::from(vec![2; 16]));
        b.merge(&mut a.clone()).expect("merge");
        let pa = generation::propose(&mut a, 0).expect("propose");
        let pb = generation::propose(&mut b, 0).expect("propose");
        a.merge(&mut b.clone()).expect("merge");
        let w = pa.min(pb);
        let mut compaction = Compaction::start(&a, w).expect("start");
        compaction.carry_all(&a).expect("carry");
        let next = compaction.into_document();
        let saved = next.save();
        let loaded = Automerge::load(&saved).expect("load");
        assert_eq!(loaded.get_heads(), next.get_heads(), "load");
        let mut other = b.clone();
        let before = other.get_heads();
        other.load_incremental(&saved).expect("incremental");
        assert_ne!(other.get_heads(), before, "load_incremental added nothing");
    }

    /// A node's document: it compacts at its head and returns the generation it left.
    fn compact_retaining(doc: &mut Automerge) -> Automerge {
        let w = generation::propose(doc, 0).expect("propose");
        let previous = doc.fork();
        compact_at(doc, w);
        previous
    }

    fn root(doc: &Automerge) -> Change {
        let (hash, _) = generation::root_of(doc).expect("a generation root");
        doc.get_change_by_hash(&hash).expect("held")
    }

    /// Applies `carried` to `doc` and returns whether anything was new.
    fn apply_carried(doc: &mut Automerge, carried: Vec<Change>) -> bool {
        let before = doc.get_heads();
        doc.apply_changes(carried).expect("carried changes apply");
        doc.get_heads() != before
    }

    #[test]
    fn a_stale_client_change_is_carried_once_whether_or_not_the_node_held_it() {
        let mut node = replica(1);
        write(&mut node, json!([{"op": "inc", "path": ["n"], "by": 10}]));
        let mut client = replica(2);
        deliver(&mut client, &node, Move::Replace).expect("settle");
        write(&mut client, json!([{"op": "inc", "path": ["n"], "by": 1}]));
        let stale = client.get_changes(&[]);

        // The node never got the client's write before it compacted: carrying adds it.
        let mut never = node.fork();
        let retained = compact_retaining(&mut never);
        let carried = carry_stale(vec![retained], 0, &root(&never), stale.clone()).expect("carry");
        assert!(apply_carried(&mut never, carried));
        assert_eq!(to_json(&never)["n"], json!(11));

        // The node took it (the client's answer was lost), then compacted: carrying it again is
        // the change the compaction made, and nothing is added.
        let mut took = node.fork();
        took.apply_changes(stale.clone()).expect("apply");
        let retained = compact_retaining(&mut took);
        let carried =
            carry_stale(vec![retained.fork()], 0, &root(&took), stale.clone()).expect("carry");
        assert!(!apply_carried(&mut took, carried));
        assert_eq!(to_json(&took)["n"], json!(11));

        // A member that held the write and moved to the generation itself carried it alike.
        let mut compacted_elsewhere = node.fork();
        let w = generation::propose(&mut compacted_elsewhere, 0).expect("propose");
        let retained = compacted_elsewhere.fork();
        let mut member = replica(3);
        member
            .apply_changes(retained.get_changes(&[]))
            .expect("apply");
        member.apply_changes(stale.clone()).expect("apply");
        compact_at(&mut compacted_elsewhere, w);
        let settled = deliver(&mut member, &compacted_elsewhere, Move::Carry).expect("settle");
        assert!(matches!(settled, Settled::Adopted { .. }), "{settled:?}");
        let carried =
            carry_stale(vec![retained], 0, &root(&compacted_elsewhere), stale).expect("carry");
        let mut from_client = compacted_elsewhere.fork();
        apply_carried(&mut from_client, carried);
        apply_carried(&mut compacted_elsewhere, member.get_changes(&[]));
        assert_eq!(from_client.get_heads(), compacted_elsewhere.get_heads());
        assert_eq!(to_json(&compacted_elsewhere)["n"], json!(11));
    }

    #[test]
    fn stale_changes_carry_through_several_retained_generations() {
        let mut node = replica(1);
        write(
            &mut node,
            json!([{"op": "set", "path": ["list"], "value": ["a"]}]),
        );
        let mut client = replica(2);
        deliver(&mut client, &node, Move::Replace).expect("settle");
        write(
            &mut client,
            json!([{"op": "push", "path": ["list"], "value": "c"}]),
        );
        write(&mut client, json!([{"op": "inc", "path": ["n"], "by": 2}]));
        let stale = client.get_changes(&[]);
        let mut retained = Vec::new();
        for i in 0..3 {
            write(
                &mut node,
                json!([{"op": "push", "path": ["list"], "value": i}]),
            );
            retained.push(compact_retaining(&mut node));
        }
        assert_eq!(Lineage::of(&node).generation, 3);
        let current = root(&node);
        // Only the last two retained: the client's generation 0 is gone.
        let err = carry_stale(
            retained[1..].iter().map(Automerge::fork).collect(),
            0,
            &current,
            stale.clone(),
        )
        .expect_err("generation 0 is not retained");
        assert!(matches!(err, StaleError::NotRetained(0)), "{err}");
        let carried = carry_stale(retained, 0, &current, stale).expect("carry");
        assert!(apply_carried(&mut node, carried.clone()));
        assert!(!apply_carried(&mut node, carried), "carrying is idempotent");
        assert_eq!(to_json(&node)["n"], json!(2));
        let list = to_json(&node)["list"].clone();
        assert_eq!(list.as_array().map(Vec::len), Some(5), "{list}");
        assert!(list.as_array().expect("list").contains(&json!("c")));
    }

    #[test]
    fn stale_changes_missing_their_deps_or_from_another_history_are_refused() {
        let mut node = replica(1);
        write(&mut node, json!([{"op": "set", "path": ["k"], "value": 1}]));
        let mut client = replica(2);
        deliver(&mut client, &node, Move::Replace).expect("settle");
        write(
            &mut client,
            json!([{"op": "set", "path": ["j"], "value": 1}]),
        );
        write(
            &mut client,
            json!([{"op": "set", "path": ["j"], "value": 2}]),
        );
        let all = client.get_changes(&[]);
        let retained = compact_retaining(&mut node);
        // Only the client's last change: its predecessor is held nowhere here.
        let last = all.last().cloned().expect("a change");
        let err = carry_stale(vec![retained.fork()], 0, &root(&node), vec![last])
            .expect_err("a dep is missing");
        assert!(matches!(err, StaleError::MissingDeps(1, 0)), "{err}");
        // A retained copy holding a change that waits for its deps (another stale copy sent
        // it alone) still carries changes that are whole.
        let mut cluttered = retained.fork();
        cluttered
            .apply_changes(vec![all.last().cloned().expect("a change")])
            .expect("queued");
        assert!(!cluttered.get_missing_deps(&[]).is_empty());
        let carried = carry_stale(vec![cluttered], 0, &root(&node), all.clone()).expect("carries");
        assert!(apply_carried(&mut node.fork(), carried));
        // A change of a generation-1 history offered as generation 0.
        let err = carry_stale(vec![retained], 0, &root(&node), vec![root(&node)])
            .expect_err("another history");
        assert!(matches!(err, StaleError::Foreign), "{err}");
    }
}
