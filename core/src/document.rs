//! Applying writes to an Automerge document and reading it back as JSON.
//!
//! Both the node and the Wasm client go through these functions, so a document edited on either
//! side has the same shape: a root map of user keys plus Verge's reserved root keys for the
//! tombstone and the expiry. Time comes in as an argument (`now_ms`); nothing here reads a clock
//! or draws randomness, so the same inputs always produce the same change.

use std::collections::{HashMap, HashSet};

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{
    ActorId, Automerge, AutomergeError, Change, ChangeHash, LoadOptions, ObjId, ObjType, Prop,
    ROOT, ReadDoc, ScalarValue, TextEncoding, Value,
};
use serde_json::{Map, Value as Json};

use crate::implicit::{self, Kind};
use crate::incarnation::{self, INCARNATION_KEY};
use crate::limits::{JSON_DEPTH_MAX, KEY_BYTES_MAX};
use crate::ops::{Op, PathSegment, RESERVED_KEY_PREFIX, check_depth};

/// Root key holding `true` while the document is deleted. Replicates like any key, so a delete
/// reaches every replica, and a later write sets it back to `false`.
pub const DELETED_KEY: &str = "_verge_deleted";
/// Root key holding the expiry as milliseconds since the Unix epoch.
pub const EXPIRES_AT_KEY: &str = "_verge_expires_at";

/// Text indexes count Unicode scalar values on every platform (Automerge's default differs
/// between native and JavaScript builds).
pub const TEXT_ENCODING: TextEncoding = TextEncoding::UnicodeCodePoint;

/// A new empty document writing as `actor`.
pub fn new_document(actor: ActorId) -> Automerge {
    Automerge::new_with_encoding(TEXT_ENCODING).with_actor(actor)
}

/// Loads saved bytes (a snapshot, changes, or both concatenated), writing as `actor` (or, in
/// later incarnations and generations, as the actor [`crate::lineage::writer_actor`] derives
/// from it).
///
/// Malformed bytes are an error, never a panic: Automerge 0.12 panics on some malformed input
/// (found by fuzzing: a bundle chunk with a truncated column), so a panic while loading is
/// caught and reported as [`AutomergeError::Fail`]. Nothing outlives a failed load, so no
/// half-built state is observed.
pub fn load_document(bytes: &[u8], actor: ActorId) -> Result<Automerge, AutomergeError> {
    let doc = std::panic::catch_unwind(|| {
        Automerge::load_with_options(bytes, LoadOptions::new().text_encoding(TEXT_ENCODING))
    })
    .map_err(|_| AutomergeError::Fail)??;
    let actor = crate::lineage::writer_actor(&actor, crate::lineage::Lineage::of(&doc));
    Ok(doc.with_actor(actor))
}

/// Applies saved bytes (changes or a snapshot) to `doc`, like `Automerge::load_incremental`,
/// returning an error where Automerge 0.12 would panic on malformed input (the bytes of
/// [`load_document`]'s note panic here too). After an error `doc` may be half-updated: the
/// caller must discard it and reload it from storage.
pub fn load_incremental(doc: &mut Automerge, bytes: &[u8]) -> Result<usize, AutomergeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.load_incremental(bytes)))
        .map_err(|_| AutomergeError::Fail)?
}

/// Receives a sync message into `doc`, returning an error where Automerge 0.12 would panic on
/// malformed changes inside the message (the same truncated chunks as [`load_document`]).
/// After an error `doc` may be half-updated: the caller must discard it and reload it.
pub fn receive_sync_message(
    doc: &mut Automerge,
    state: &mut automerge::sync::State,
    message: automerge::sync::Message,
) -> Result<(), AutomergeError> {
    use automerge::sync::SyncDoc;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.receive_sync_message(state, message)
    }))
    .map_err(|_| AutomergeError::Fail)?
}

/// Generates the next sync message for the peer of `state`, returning an error where Automerge
/// 0.12 would panic: a peer's `have` with a malformed Bloom filter (zero bits per entry, found
/// by fuzzing) divides by zero when matched against this document's changes.
pub fn generate_sync_message(
    doc: &Automerge,
    state: &mut automerge::sync::State,
) -> Result<Option<automerge::sync::Message>, AutomergeError> {
    use automerge::sync::SyncDoc;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.generate_sync_message(state)
    }))
    .map_err(|_| AutomergeError::Fail)
}

/// Lists whose length was last seen, per thread: a hint [`list_len`] checks before using.
const LIST_LENGTH_HINTS_MAX: usize = 256;

thread_local! {
    static LIST_LENGTH_HINTS: std::cell::RefCell<HashMap<ObjId, usize>> =
        std::cell::RefCell::new(HashMap::new());
}

/// The length of list `obj`. Automerge 0.12 counts a list's elements on every `length` (473 µs
/// at 100,000 items), while looking one up by index costs a few microseconds; so the length is
/// found by lookups: two confirm a hint (the length last seen of this list, kept per thread and
/// never trusted unchecked, so the answer is the same with or without it), and without one a
/// galloping search takes about twice log2 of the length.
fn list_len(doc: &impl ReadDoc, obj: &ObjId) -> usize {
    let has = |i: usize| matches!(doc.get(obj, i), Ok(Some(_)));
    let is_len = |n: usize| (n == 0 || has(n - 1)) && !has(n);
    let hint = LIST_LENGTH_HINTS.with(|h| h.borrow().get(obj).copied());
    if let Some(hint) = hint {
        for guess in [hint, hint.saturating_add(1), hint.saturating_sub(1)] {
            if is_len(guess) {
                return guess;
            }
        }
    }
    if !has(0) {
        return 0;
    }
    // has(lo - 1), and !has(hi) once found.
    let (mut lo, mut hi) = (1usize, 2usize);
    while has(hi - 1) {
        lo = hi;
        hi = hi.saturating_mul(2);
    }
    // Now has(lo - 1) and !has(hi - 1): the length is in [lo, hi - 1].
    let mut hi = hi - 1;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if has(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Notes `len` as the length of list `obj`, for [`list_len`].
fn remember_list_len(obj: &ObjId, len: usize) {
    LIST_LENGTH_HINTS.with(|h| {
        let mut h = h.borrow_mut();
        if h.len() >= LIST_LENGTH_HINTS_MAX && !h.contains_key(obj) {
            h.clear();
        }
        h.insert(obj.clone(), len);
    });
}

/// What a write does besides its ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expiry {
    /// Leave the expiry as it is.
    #[default]
    Keep,
    /// Remove the expiry.
    Clear,
    /// Expire at this time, milliseconds since the Unix epoch.
    At(i64),
}

/// A write to one document, as one atomic change.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Apply ops in order.
    Ops(Vec<Op>),
    /// Make the document equal to this object, changing only what differs.
    Replace(Map<String, Json>),
    /// Remove every key and mark the document deleted.
    Delete,
}

/// The lifecycle state Verge keeps inside a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lifecycle {
    /// The document was deleted and not written since.
    pub deleted: bool,
    /// When the document expires, milliseconds since the Unix epoch.
    pub expires_at_ms: Option<i64>,
}

impl Lifecycle {
    /// Reads the lifecycle keys of `doc`.
    ///
    /// A delete and a concurrent write that revived the document in place (a write into a
    /// purged stub) leave both values at the tombstone key: the delete wins, on every replica
    /// alike. Every replica then sees a later write as a revival and starts the same next
    /// incarnation with it; were the write to win where it was made and the delete elsewhere,
    /// writes made after seeing both would land in different incarnations.
    pub fn of(doc: &impl ReadDoc) -> Self {
        let deleted = doc.get_all(ROOT, DELETED_KEY).is_ok_and(|values| {
            values.iter().any(|(v, _)| {
                matches!(v, Value::Scalar(s) if matches!(s.as_ref(), ScalarValue::Boolean(true)))
            })
        });
        let expires_at_ms = match doc.get(ROOT, EXPIRES_AT_KEY) {
            Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
                ScalarValue::Int(n) | ScalarValue::Timestamp(n) => Some(*n),
                ScalarValue::Uint(n) => i64::try_from(*n).ok(),
                _ => None,
            },
            _ => None,
        };
        Self {
            deleted,
            expires_at_ms,
        }
    }

    /// Whether the document has expired at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }

    /// Whether a document in this state reads as present at `now_ms`.
    pub fn live(&self, now_ms: i64) -> bool {
        !self.deleted && !self.expired(now_ms)
    }
}

/// Whether `doc` exists for readers at `now_ms`: it has history, is not deleted and not expired.
pub fn is_live(doc: &Automerge, now_ms: i64) -> bool {
    !doc.get_heads().is_empty() && Lifecycle::of(doc).live(now_ms)
}

/// Why a write could not be applied to a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A well-formed op does not fit the document's current shape.
    #[error("ops[{index}] at {path}: {reason}")]
    NotApplicable {
        /// Position of the op in the write.
        index: usize,
        /// The op's path.
        path: String,
        /// What did not fit.
        reason: String,
    },
    /// A `PUT` body is not a valid document.
    #[error("{0}")]
    InvalidDocument(String),
}

/// The outcome of [`apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Every change the write added, in causal order: the implicit creations it needed (see
    /// [`crate::implicit`]), its own change, and the increments of counters left conflicting by
    /// older versions. Empty when the write changed nothing.
    pub changes: Vec<ChangeHash>,
    /// The document's lifecycle after the write (saves reading it back).
    pub lifecycle: Lifecycle,
    /// The write revived a deleted or expired document, which starts a new incarnation (see
    /// [`crate::incarnation`]): the document was replaced by a new history, beginning with the
    /// first of `changes`, and whoever stores it must replace the stored history too.
    pub replaced: bool,
}

impl Applied {
    /// Whether the write changed the document.
    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// How many times [`apply`] runs a write: once to find the containers it creates, once more
/// after creating them. A third run would mean the first missed one, which is a bug.
const ATTEMPTS_MAX: usize = 3;

/// Applies `write` to `doc` stamped with `now_ms`. On error nothing is changed.
///
/// The write's ops form one change. Containers its ops create implicitly are created first, each
/// by a change of its own that every replica builds identically ([`crate::implicit`]), so the
/// write's ops land in the same objects wherever they are applied. A write to a deleted or
/// expired document revives it as a new incarnation, starting from empty
/// ([`crate::incarnation`]); `doc` is then replaced.
pub fn apply(
    doc: &mut Automerge,
    write: &Write,
    expiry: Expiry,
    now_ms: i64,
) -> Result<Applied, ApplyError> {
    if let Write::Replace(map) = write {
        validate_document(map)?;
    }
    let lifecycle = Lifecycle::of(doc);
    let revives = (lifecycle.deleted || lifecycle.expired(now_ms))
        && !matches!(write, Write::Delete)
        && !doc.get_heads().is_empty()
        && !incarnation::is_stub(doc);
    if !revives {
        return apply_in_place(doc, write, expiry, lifecycle, now_ms);
    }
    let next = incarnation::of(doc) + 1;
    let mut revived = incarnation::stub(doc.get_actor(), next).map_err(internal)?;
    let before = Lifecycle::of(&revived);
    let mut applied = apply_in_place(&mut revived, write, expiry, before, now_ms)?;
    applied
        .changes
        .insert(0, incarnation::root_change(next).hash());
    applied.replaced = true;
    *doc = revived;
    Ok(applied)
}

/// [`apply`] within the document's current history; `lifecycle` is the document's.
fn apply_in_place(
    doc: &mut Automerge,
    write: &Write,
    expiry: Expiry,
    lifecycle: Lifecycle,
    now_ms: i64,
) -> Result<Applied, ApplyError> {
    let expired = lifecycle.expired(now_ms);
    let time_s = now_ms.div_euclid(1000);
    let mut changes = Vec::new();
    // Ops that found nothing to do on the first run, when every op ran in order against what
    // the ones before it had made. Later runs skip them: by then the containers later ops
    // create exist from the start, and a `del` that found no key must not find (and delete,
    // or trip over) one that a later op of the same write creates.
    let mut idle: Vec<bool> = Vec::new();
    for attempt in 0..ATTEMPTS_MAX {
        let mut scope = Scope::default();
        if attempt > 0 {
            scope.idle = idle.clone();
        }
        let mut tx = doc.transaction();
        if let Err(e) = run(&mut tx, &mut scope, write, expiry, lifecycle, expired) {
            tx.rollback();
            // Creations made for this write are kept only when it succeeds; a failure on the
            // run after them (which saw the same state) cannot happen, so there are none here.
            return Err(e);
        }
        if !scope.needs.is_empty() {
            tx.rollback();
            if attempt == 0 {
                idle = scope.idle;
            }
            create_needed(doc, &scope.needs, &mut changes)?;
            continue;
        }
        let (change, _) = tx.commit_with(CommitOptions::default().with_time(time_s));
        changes.extend(change);
        if !scope.legacy_incs.is_empty() {
            changes.push(commit_legacy_incs(doc, &scope.legacy_incs, change, time_s)?);
        }
        return Ok(Applied {
            changes,
            lifecycle: lifecycle_after(write, expiry, lifecycle, expired),
            replaced: false,
        });
    }
    Err(ApplyError::NotApplicable {
        index: 0,
        path: String::new(),
        reason: "implicit creation did not settle".to_owned(),
    })
}

/// Runs `write`'s ops in `tx`.
fn run(
    tx: &mut Transaction<'_>,
    scope: &mut Scope,
    write: &Write,
    expiry: Expiry,
    lifecycle: Lifecycle,
    expired: bool,
) -> Result<(), ApplyError> {
    match write {
        Write::Ops(ops) => {
            let first_run = scope.idle.is_empty();
            for (index, op) in ops.iter().enumerate() {
                if scope.idle.get(index).copied().unwrap_or(false) && !first_run {
                    continue;
                }
                let did = apply_op(tx, scope, op).map_err(|reason| ApplyError::NotApplicable {
                    index,
                    path: op.path().to_string(),
                    reason,
                })?;
                if first_run {
                    scope.ran.push(!did);
                }
            }
            if first_run {
                scope.idle = std::mem::take(&mut scope.ran);
            }
        }
        Write::Replace(map) => replace_map(tx, scope, &ROOT, map, true)
            .map_err(|e| ApplyError::InvalidDocument(e.to_string()))?,
        Write::Delete => {
            let keys: Vec<String> = tx.keys(ROOT).collect();
            for key in keys
                .iter()
                .filter(|k| k.as_str() != DELETED_KEY && k.as_str() != INCARNATION_KEY)
            {
                delete_key(tx, scope, &ROOT, key).map_err(internal)?;
            }
            tx.put(ROOT, DELETED_KEY, true).map_err(internal)?;
            return Ok(());
        }
    }
    if lifecycle.deleted {
        tx.put(ROOT, DELETED_KEY, false).map_err(internal)?;
    }
    match expiry {
        Expiry::Keep => {}
        Expiry::Clear if lifecycle.expires_at_ms.is_some() && !expired => {
            tx.delete(ROOT, EXPIRES_AT_KEY).map_err(internal)?
        }
        Expiry::Clear => {}
        Expiry::At(ms) => tx.put(ROOT, EXPIRES_AT_KEY, ms).map_err(internal)?,
    }
    Ok(())
}

/// The lifecycle after a successful write: its ops supersede every lifecycle value this
/// replica has seen, so the new state follows from the old one and the write alone.
fn lifecycle_after(write: &Write, expiry: Expiry, before: Lifecycle, expired: bool) -> Lifecycle {
    match (write, expiry) {
        (Write::Delete, _) => Lifecycle {
            deleted: true,
            expires_at_ms: None,
        },
        (_, Expiry::At(at)) => Lifecycle {
            deleted: false,
            expires_at_ms: Some(at),
        },
        (_, Expiry::Clear) => Lifecycle {
            deleted: false,
            expires_at_ms: None,
        },
        (_, Expiry::Keep) => Lifecycle {
            deleted: false,
            expires_at_ms: if expired { None } else { before.expires_at_ms },
        },
    }
}

/// Makes the creation changes a write needs, parents first, recording their hashes.
fn create_needed(
    doc: &mut Automerge,
    needs: &[Need],
    changes: &mut Vec<ChangeHash>,
) -> Result<(), ApplyError> {
    let fail = |reason: String| ApplyError::NotApplicable {
        index: 0,
        path: String::new(),
        reason,
    };
    let mut made: Vec<Option<ObjId>> = Vec::with_capacity(needs.len());
    for need in needs {
        let parent = match &need.parent {
            NeedParent::Existing(id) => id.clone(),
            NeedParent::Need(i) => made
                .get(*i)
                .cloned()
                .flatten()
                .ok_or_else(|| fail("an implicit parent was not created".to_owned()))?,
        };
        let hash = implicit::create(doc, &parent, &need.key, need.kind)
            .map_err(|e| fail(e.to_string()))?;
        changes.push(hash);
        made.push(match doc.get(&parent, need.key.as_str()) {
            Ok(Some((Value::Object(_), id))) => Some(id),
            _ => None,
        });
    }
    Ok(())
}

/// Commits increments of counters that older versions let replicas create concurrently, each
/// adding to one of them only (Automerge's own increment adds to all, counting it once per
/// counter). Reads sum them, so the total moves by exactly the increment.
fn commit_legacy_incs(
    doc: &mut Automerge,
    incs: &[LegacyInc],
    last_own: Option<ChangeHash>,
    time_s: i64,
) -> Result<ChangeHash, ApplyError> {
    let fail = |reason: &str| ApplyError::NotApplicable {
        index: 0,
        path: String::new(),
        reason: reason.to_owned(),
    };
    let seq = match last_own {
        Some(hash) => doc.get_change_meta_by_hash(&hash).map(|m| m.seq),
        None => doc.get_last_local_change().map(|c| c.seq()),
    }
    .unwrap_or(0)
        + 1;
    let deps = doc.get_heads();
    let max_op = deps
        .iter()
        .filter_map(|h| doc.get_change_meta_by_hash(h).map(|m| m.max_op))
        .max()
        .unwrap_or(0);
    let mut operations = Vec::with_capacity(incs.len());
    for inc in incs {
        let (ObjId::Id(counter, actor, _), obj) = (&inc.target, &inc.obj) else {
            return Err(fail("a counter has no op id"));
        };
        let obj = match obj {
            ObjId::Root => automerge::legacy::ObjectId::Root,
            ObjId::Id(c, a, _) => {
                automerge::legacy::ObjectId::Id(automerge::legacy::OpId(*c, a.clone()))
            }
        };
        operations.push(automerge::legacy::Op {
            action: automerge::legacy::OpType::Increment(inc.by),
            obj,
            key: automerge::legacy::Key::Map(inc.key.as_str().into()),
            pred: vec![automerge::legacy::OpId(*counter, actor.clone())].into(),
            insert: false,
        });
    }
    let change = Change::from(automerge::ExpandedChange {
        operations,
        actor_id: doc.get_actor().clone(),
        hash: None,
        seq,
        start_op: std::num::NonZeroU64::new(max_op + 1).unwrap_or(std::num::NonZeroU64::MIN),
        time: time_s,
        message: None,
        deps,
        extra_bytes: Vec::new(),
        author: None,
    });
    let hash = change.hash();
    doc.apply_changes([change])
        .map_err(|e| fail(&e.to_string()))?;
    Ok(hash)
}

fn internal(e: AutomergeError) -> ApplyError {
    ApplyError::NotApplicable {
        index: 0,
        path: String::new(),
        reason: e.to_string(),
    }
}

/// What one run of a write in a transaction learned.
#[derive(Default)]
struct Scope {
    /// Objects this run created in its own change: nothing made inside them can race.
    fresh: HashSet<ObjId>,
    /// Map keys this run deleted: a container made there again is this write's own.
    deleted: HashSet<(ObjId, String)>,
    /// Containers to create as changes of their own before the write's change.
    needs: Vec<Need>,
    /// The objects standing in for `needs` during this run, by need index.
    stand_ins: HashMap<ObjId, usize>,
    /// Increments of counters left conflicting by older versions.
    legacy_incs: Vec<LegacyInc>,
    /// By op index: the op had nothing to do on the first run (see `apply_in_place`).
    idle: Vec<bool>,
    /// The same, being recorded by the first run.
    ran: Vec<bool>,
}

/// A container an op creates at a key nothing occupied before the write.
struct Need {
    parent: NeedParent,
    key: String,
    kind: Kind,
}

enum NeedParent {
    /// An object that exists before the write.
    Existing(ObjId),
    /// The container of an earlier need.
    Need(usize),
}

/// One increment of one of several concurrent counters at a map key.
struct LegacyInc {
    obj: ObjId,
    key: String,
    /// The counter that takes the increment (the one Automerge shows).
    target: ObjId,
    by: i64,
}

fn delete_key<T: Transactable>(
    tx: &mut T,
    scope: &mut Scope,
    obj: &ObjId,
    key: &str,
) -> Result<(), AutomergeError> {
    tx.delete(obj, key)?;
    scope.deleted.insert((obj.clone(), key.to_owned()));
    Ok(())
}

/// Creates `kind` at `key` of `parent`, where nothing is. Returns the new object (none for a
/// counter).
///
/// Inside an object this write created, or at a key it emptied, the container is the write's
/// own and is created in its change. Anywhere else replicas may race to create it, so it is
/// recorded as a need (and a stand-in created so the rest of the run can go on).
fn ensure<T: Transactable>(
    tx: &mut T,
    scope: &mut Scope,
    parent: &ObjId,
    key: &str,
    kind: Kind,
) -> Result<Option<ObjId>, String> {
    let err = |e: AutomergeError| e.to_string();
    let made = match kind {
        Kind::Counter => {
            tx.put(parent, key, ScalarValue::counter(0)).map_err(err)?;
            None
        }
        Kind::Map => Some(tx.put_object(parent, key, ObjType::Map).map_err(err)?),
        Kind::List => Some(tx.put_object(parent, key, ObjType::List).map_err(err)?),
        Kind::Text => Some(tx.put_object(parent, key, ObjType::Text).map_err(err)?),
    };
    let own =
        scope.fresh.contains(parent) || scope.deleted.contains(&(parent.clone(), key.to_owned()));
    if own {
        if let Some(id) = &made {
            scope.fresh.insert(id.clone());
        }
    } else {
        let parent = match scope.stand_ins.get(parent) {
            Some(i) => NeedParent::Need(*i),
            None => NeedParent::Existing(parent.clone()),
        };
        scope.needs.push(Need {
            parent,
            key: key.to_owned(),
            kind,
        });
        if let Some(id) = &made {
            scope.stand_ins.insert(id.clone(), scope.needs.len() - 1);
        }
    }
    Ok(made)
}

/// Checks a `PUT` body: no reserved root keys, bounded depth and key length.
pub fn validate_document(map: &Map<String, Json>) -> Result<(), ApplyError> {
    if let Some(key) = map.keys().find(|k| k.starts_with(RESERVED_KEY_PREFIX)) {
        return Err(ApplyError::InvalidDocument(format!(
            "key {key:?} is reserved: keys starting with {RESERVED_KEY_PREFIX:?} belong to Verge"
        )));
    }
    fn keys_ok(v: &Json) -> Result<(), String> {
        match v {
            Json::Object(m) => m.iter().try_for_each(|(k, v)| {
                if k.len() > KEY_BYTES_MAX {
                    Err(format!(
                        "a key is {} bytes, more than {KEY_BYTES_MAX}",
                        k.len()
                    ))
                } else {
                    keys_ok(v)
                }
            }),
            Json::Array(items) => items.iter().try_for_each(keys_ok),
            _ => Ok(()),
        }
    }
    let root = Json::Object(map.clone());
    check_depth(&root, JSON_DEPTH_MAX)
        .map_err(|e| ApplyError::InvalidDocument(format!("document {e}")))?;
    keys_ok(&root).map_err(ApplyError::InvalidDocument)
}

/// Where a path leads: the object holding the last segment, its type, and the last segment.
struct Target {
    obj: ObjId,
    obj_type: ObjType,
}

fn describe(seg: &PathSegment) -> String {
    match seg {
        PathSegment::Key(k) => format!("key {k:?}"),
        PathSegment::Index(n) => format!("index {n}"),
    }
}

/// Walks the path's parent segments from the root. Missing map keys are created when `create`
/// (maps, except a last parent of kind `last`); otherwise a missing step yields `None`.
fn resolve_parent<T: Transactable>(
    tx: &mut T,
    scope: &mut Scope,
    parents: &[PathSegment],
    create: bool,
    last: Kind,
) -> Result<Option<Target>, String> {
    let mut obj = ROOT;
    let mut obj_type = ObjType::Map;
    for (i, seg) in parents.iter().enumerate() {
        let next = match (obj_type, seg) {
            (ObjType::Map | ObjType::Table, PathSegment::Key(k)) => {
                match tx.get(&obj, k.as_str()).map_err(|e| e.to_string())? {
                    Some((Value::Object(t), id)) => Some((id, t)),
                    Some((Value::Scalar(_), _)) => {
                        return Err(format!("{} holds a scalar, not an object", describe(seg)));
                    }
                    None if create => {
                        let kind = if i + 1 == parents.len() {
                            last
                        } else {
                            Kind::Map
                        };
                        let id = ensure(tx, scope, &obj, k, kind)?
                            .ok_or_else(|| "a path step cannot be a counter".to_owned())?;
                        let t = match kind {
                            Kind::List => ObjType::List,
                            Kind::Text => ObjType::Text,
                            Kind::Map | Kind::Counter => ObjType::Map,
                        };
                        Some((id, t))
                    }
                    None => None,
                }
            }
            (ObjType::List, PathSegment::Index(n)) => {
                let len = tx.length(&obj);
                if *n >= len {
                    return Err(format!("index {n} is out of range for a list of {len}"));
                }
                match tx.get(&obj, *n).map_err(|e| e.to_string())? {
                    Some((Value::Object(t), id)) => Some((id, t)),
                    _ => return Err(format!("{} holds a scalar, not an object", describe(seg))),
                }
            }
            (ObjType::Text, _) => return Err("cannot address inside a text".to_owned()),
            (ObjType::List, PathSegment::Key(k)) => {
                return Err(format!("key {k:?} used on a list: expected an index"));
            }
            (_, PathSegment::Index(n)) => {
                return Err(format!("index {n} used on a map: expected a key"));
            }
        };
        match next {
            Some((id, t)) => {
                obj = id;
                obj_type = t;
            }
            None => return Ok(None),
        }
    }
    Ok(Some(Target { obj, obj_type }))
}

fn prop_of(target: &Target, last: &PathSegment) -> Result<Prop, String> {
    match (target.obj_type, last) {
        (ObjType::Map | ObjType::Table, PathSegment::Key(k)) => Ok(Prop::Map(k.clone())),
        (ObjType::List, PathSegment::Index(n)) => Ok(Prop::Seq(*n)),
        (ObjType::Text, _) => Err("cannot address inside a text".to_owned()),
        (ObjType::List, PathSegment::Key(k)) => {
            Err(format!("key {k:?} used on a list: expected an index"))
        }
        (_, PathSegment::Index(n)) => Err(format!("index {n} used on a map: expected a key")),
    }
}

/// The container of kind `kind` at `prop` of `target`, created when the key is missing.
fn container_at<T: Transactable>(
    tx: &mut T,
    scope: &mut Scope,
    target: &Target,
    prop: Prop,
    kind: Kind,
) -> Result<ObjId, String> {
    let (want, name) = match kind {
        Kind::List => (ObjType::List, "push needs a list"),
        Kind::Text => (ObjType::Text, "splice needs a text"),
        Kind::Map | Kind::Counter => (ObjType::Map, "needs a map"),
    };
    match tx
        .get(&target.obj, prop.clone())
        .map_err(|e| e.to_string())?
    {
        Some((Value::Object(t), id)) if t == want => Ok(id),
        Some(_) => Err(format!("{name}, the value there is not one")),
        None => match prop {
            Prop::Map(key) => ensure(tx, scope, &target.obj, &key, kind)?
                .ok_or_else(|| format!("{name}, and none was created")),
            Prop::Seq(_) => Err(format!("{name}, the index is out of range")),
        },
    }
}

/// The sum of the counters at `prop` of `obj` and the one Automerge shows, or `None` when the
/// values there are not all counters (or there are none).
fn counters_at<T: Transactable>(
    tx: &T,
    obj: &ObjId,
    prop: Prop,
) -> Result<Option<(i64, usize, ObjId)>, String> {
    let values = tx.get_all(obj, prop).map_err(|e| e.to_string())?;
    let mut sum = 0i64;
    for (v, _) in &values {
        match v {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Counter(c) => sum = sum.wrapping_add(i64::from(c)),
                _ => return Ok(None),
            },
            Value::Object(_) => return Ok(None),
        }
    }
    // `get_all` lists conflicting values in Automerge's order; the last one is the winner.
    Ok(values.last().map(|(_, id)| (sum, values.len(), id.clone())))
}

/// Adds `by` to the counter at `prop` of `obj` (`current` is its value, `count` how many
/// conflicting counters make it up, `winner` the one Automerge shows).
fn add_to_counter<T: Transactable>(
    tx: &mut T,
    scope: &mut Scope,
    obj: &ObjId,
    prop: Prop,
    counter: (i64, usize, ObjId),
    by: i64,
) -> Result<(), String> {
    let (current, count, winner) = counter;
    let pending: i64 = scope
        .legacy_incs
        .iter()
        .filter(|inc| &inc.obj == obj && Prop::Map(inc.key.clone()) == prop)
        .fold(0i64, |sum, inc| sum.wrapping_add(inc.by));
    if current
        .checked_add(pending)
        .and_then(|c| c.checked_add(by))
        .is_none()
    {
        return Err(format!(
            "inc by {by} would take the counter at {current} outside the 64-bit integer range"
        ));
    }
    match (count, prop) {
        (1, prop) => tx.increment(obj, prop, by).map_err(|e| e.to_string()),
        (_, Prop::Map(key)) => {
            scope.legacy_incs.push(LegacyInc {
                obj: obj.clone(),
                key,
                target: winner,
                by,
            });
            Ok(())
        }
        // Conflicting counters in a list element come only from other Automerge writers; the
        // increment adds to each of them, as Automerge's own does.
        (_, prop) => tx.increment(obj, prop, by).map_err(|e| e.to_string()),
    }
}

/// Applies one op; `Ok(false)` when it had nothing to do (a `del` of something missing).
fn apply_op<T: Transactable>(tx: &mut T, scope: &mut Scope, op: &Op) -> Result<bool, String> {
    let (parents, last) = op.path().split_last();
    let create = !matches!(op, Op::Del { .. });
    let last_parent = if matches!(op, Op::Insert { .. }) {
        Kind::List
    } else {
        Kind::Map
    };
    let Some(target) = resolve_parent(tx, scope, parents, create, last_parent)? else {
        return Ok(false); // `del` below a missing parent: nothing to delete.
    };
    let err = |e: AutomergeError| e.to_string();
    if let Op::Del { .. } = op
        && let Ok(Prop::Map(key)) = prop_of(&target, last)
        && tx.get(&target.obj, key.as_str()).map_err(err)?.is_none()
    {
        return Ok(false); // A missing key: nothing to delete.
    }
    let done: Result<(), String> = match op {
        Op::Set { value, .. } => match prop_of(&target, last)? {
            Prop::Seq(n) => {
                let len = tx.length(&target.obj);
                if n >= len {
                    return Err(format!("index {n} is out of range for a list of {len}"));
                }
                write_value(tx, scope, &target.obj, Prop::Seq(n), value, false)
            }
            prop => write_value(tx, scope, &target.obj, prop, value, false),
        },
        Op::Del { .. } => match prop_of(&target, last)? {
            Prop::Seq(n) if n >= tx.length(&target.obj) => {
                let len = tx.length(&target.obj);
                Err(format!("index {n} is out of range for a list of {len}"))
            }
            Prop::Map(key) => {
                if tx.get(&target.obj, key.as_str()).map_err(err)?.is_some() {
                    delete_key(tx, scope, &target.obj, &key).map_err(err)?;
                }
                Ok(())
            }
            prop => tx.delete(&target.obj, prop).map_err(err),
        },
        Op::Inc { by, .. } => {
            let prop = prop_of(&target, last)?;
            // One read answers both whether anything is there and whether it is all counters
            // (every read of a counter walks its increments).
            let mut counter = counters_at(tx, &target.obj, prop.clone())?;
            if counter.is_none()
                && tx
                    .get_all(&target.obj, prop.clone())
                    .map_err(err)?
                    .is_empty()
            {
                match &prop {
                    Prop::Seq(n) => return Err(format!("index {n} is out of range")),
                    Prop::Map(key) => {
                        ensure(tx, scope, &target.obj, key, Kind::Counter)?;
                    }
                }
                counter = counters_at(tx, &target.obj, prop.clone())?;
            }
            let counter = counter.ok_or_else(|| {
                "inc needs a counter; the value there is not one (numbers written by set or PUT are plain numbers: create counters with inc)".to_owned()
            })?;
            add_to_counter(tx, scope, &target.obj, prop, counter, *by)
        }
        Op::Insert { value, .. } => {
            let PathSegment::Index(n) = last else {
                return Err("insert needs a path ending in a list index".to_owned());
            };
            if target.obj_type != ObjType::List {
                return Err("insert needs a list".to_owned());
            }
            let len = tx.length(&target.obj);
            if *n > len {
                return Err(format!(
                    "index {n} is out of range for inserting into a list of {len}"
                ));
            }
            write_value(tx, scope, &target.obj, Prop::Seq(*n), value, true)
        }
        Op::Push { value, .. } => {
            let prop = prop_of(&target, last)?;
            let list = container_at(tx, scope, &target, prop, Kind::List)?;
            let len = list_len(tx, &list);
            let written = write_value(tx, scope, &list, Prop::Seq(len), value, true);
            if written.is_ok() {
                remember_list_len(&list, len + 1);
            }
            written
        }
        Op::Splice {
            index,
            delete,
            text,
            ..
        } => {
            let prop = prop_of(&target, last)?;
            let obj = container_at(tx, scope, &target, prop, Kind::Text)?;
            let len = tx.length(&obj);
            let end = index.checked_add(*delete);
            if *index > len || end.is_none_or(|end| end > len) {
                return Err(format!(
                    "splice of {delete} at {index} is out of range for a text of {len} characters"
                ));
            }
            let delete =
                isize::try_from(*delete).map_err(|_| "delete count too large".to_owned())?;
            tx.splice_text(&obj, *index, delete, text).map_err(err)
        }
    };
    done.map(|()| true)
}

/// Writes a JSON value at `prop` of `obj`, inserting into a list when `insert`. Objects and
/// arrays are written whole as new objects: explicit writes are last-writer-wins.
fn write_value<T: Transactable>(
    tx: &mut T,
    scope: &mut Scope,
    obj: &ObjId,
    prop: Prop,
    value: &Json,
    insert: bool,
) -> Result<(), String> {
    let err = |e: AutomergeError| e.to_string();
    let object_type = match value {
        Json::Array(_) => Some(ObjType::List),
        Json::Object(_) => Some(ObjType::Map),
        _ => None,
    };
    let Some(object_type) = object_type else {
        let scalar = json_scalar(value);
        return match (prop, insert) {
            (Prop::Seq(n), true) => tx.insert(obj, n, scalar).map_err(err),
            (prop, _) => tx.put(obj, prop, scalar).map_err(err),
        };
    };
    let child = match (prop, insert) {
        (Prop::Seq(n), true) => tx.insert_object(obj, n, object_type).map_err(err)?,
        (prop, _) => tx.put_object(obj, prop, object_type).map_err(err)?,
    };
    scope.fresh.insert(child.clone());
    match value {
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                write_value(tx, scope, &child, Prop::Seq(i), item, true)?;
            }
        }
        Json::Object(map) => {
            for (k, v) in map {
                write_value(tx, scope, &child, Prop::Map(k.clone()), v, false)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn json_scalar(value: &Json) -> ScalarValue {
    match value {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Array(_) | Json::Object(_) => ScalarValue::Null,
    }
}

/// Makes the map `obj` equal to `want` with the fewest ops: unchanged keys are not touched,
/// nested maps and lists are diffed recursively, texts are diffed, counters are incremented.
fn replace_map<T: Transactable>(
    tx: &mut T,
    scope: &mut Scope,
    obj: &ObjId,
    want: &Map<String, Json>,
    is_root: bool,
) -> Result<(), AutomergeError> {
    let existing: Vec<String> = tx.keys(obj).collect();
    for key in existing {
        if is_root && key.starts_with(RESERVED_KEY_PREFIX) {
            continue;
        }
        if !want.contains_key(&key) {
            delete_key(tx, scope, obj, &key)?;
        }
    }
    for (key, value) in want {
        replace_at(tx, scope, obj, Prop::Map(key.clone()), value)?;
    }
    Ok(())
}

fn replace_at<T: Transactable>(
    tx: &mut T,
    scope: &mut Scope,
    obj: &ObjId,
    prop: Prop,
    want: &Json,
) -> Result<(), AutomergeError> {
    let current = tx.get(obj, prop.clone())?;
    match (current, want) {
        (Some((Value::Object(ObjType::Map | ObjType::Table), id)), Json::Object(map)) => {
            replace_map(tx, scope, &id, map, false)
        }
        (Some((Value::Object(ObjType::List), id)), Json::Array(items)) => {
            replace_list(tx, scope, &id, items)
        }
        (Some((Value::Object(ObjType::Text), id)), Json::String(s)) => tx.update_text(&id, s),
        (Some((Value::Scalar(cur), _)), want) if !want.is_object() && !want.is_array() => {
            match (cur.as_ref(), want.as_i64()) {
                (ScalarValue::Counter(_), Some(n)) => {
                    let Ok(Some(counter)) = counters_at(tx, obj, prop.clone()) else {
                        return write_value(tx, scope, obj, prop, want, false)
                            .map_err(|_| AutomergeError::Fail);
                    };
                    // The difference may not fit in an i64 even though both ends do.
                    let mut delta = i128::from(n) - i128::from(counter.0);
                    let mut counter = counter;
                    while delta != 0 {
                        let step = delta.clamp(i128::from(i64::MIN), i128::from(i64::MAX));
                        // `step` is clamped into the i64 range.
                        let step = i64::try_from(step).unwrap_or_default();
                        add_to_counter(tx, scope, obj, prop.clone(), counter.clone(), step)
                            .map_err(|_| AutomergeError::Fail)?;
                        counter.0 = counter.0.wrapping_add(step);
                        delta -= i128::from(step);
                    }
                    Ok(())
                }
                (cur, _) if scalar_json(cur) == *want => Ok(()),
                _ => {
                    write_value(tx, scope, obj, prop, want, false).map_err(|_| AutomergeError::Fail)
                }
            }
        }
        _ => write_value(tx, scope, obj, prop, want, false).map_err(|_| AutomergeError::Fail),
    }
}

/// Diffs a list by its longest common prefix and suffix and replaces the middle; elements that
/// stay are kept, so concurrent edits inside them survive.
fn replace_list<T: Transactable>(
    tx: &mut T,
    scope: &mut Scope,
    list: &ObjId,
    want: &[Json],
) -> Result<(), AutomergeError> {
    let current: Vec<Json> = (0..tx.length(list))
        .map(|i| value_json(&*tx, list, Prop::Seq(i)))
        .collect();
    let prefix = current.iter().zip(want).take_while(|(a, b)| a == b).count();
    let max_suffix = current.len().min(want.len()) - prefix;
    let suffix = current
        .iter()
        .rev()
        .zip(want.iter().rev())
        .take(max_suffix)
        .take_while(|(a, b)| a == b)
        .count();
    let old_mid = current.len() - prefix - suffix;
    let new_mid = &want[prefix..want.len() - suffix];
    // Elements present on both sides at the same offset are diffed in place.
    let both = old_mid.min(new_mid.len());
    for (i, item) in new_mid.iter().take(both).enumerate() {
        replace_at(tx, scope, list, Prop::Seq(prefix + i), item)?;
    }
    for _ in both..old_mid {
        tx.delete(list, prefix + both)?;
    }
    for (i, item) in new_mid.iter().enumerate().skip(both) {
        write_value(tx, scope, list, Prop::Seq(prefix + i), item, true)
            .map_err(|_| AutomergeError::Fail)?;
    }
    Ok(())
}

/// The document's user keys as a JSON object.
///
/// Counters read as numbers and texts as strings. Where replicas concurrently created a counter
/// at the same key, the value is the sum of those counters, so no increment is lost.
pub fn to_json(doc: &impl ReadDoc) -> Json {
    map_json(doc, &ROOT, true)
}

/// The JSON of the value at `prop` of `obj` (null when absent).
pub fn value_json(doc: &impl ReadDoc, obj: &ObjId, prop: Prop) -> Json {
    if let Some(sum) = conflicting_counters_sum(doc, obj, prop.clone()) {
        return Json::from(sum);
    }
    match doc.get(obj, prop) {
        Ok(Some((Value::Scalar(s), _))) => scalar_json(s.as_ref()),
        Ok(Some((Value::Object(t), id))) => object_json(doc, &id, t),
        _ => Json::Null,
    }
}

/// The sum of the values at `prop` when there are several and all are counters.
fn conflicting_counters_sum(doc: &impl ReadDoc, obj: &ObjId, prop: Prop) -> Option<i64> {
    let values = doc.get_all(obj, prop).ok()?;
    if values.len() < 2 {
        return None;
    }
    values.iter().try_fold(0i64, |sum, (v, _)| match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Counter(c) => Some(sum.wrapping_add(i64::from(c))),
            _ => None,
        },
        Value::Object(_) => None,
    })
}

fn map_json(doc: &impl ReadDoc, obj: &ObjId, is_root: bool) -> Json {
    let mut out = Map::new();
    for item in doc.map_range(obj, ..) {
        if is_root && item.key.starts_with(RESERVED_KEY_PREFIX) {
            continue;
        }
        let value = if item.conflict {
            value_json(doc, obj, Prop::Map(item.key.to_string()))
        } else {
            value_ref_json(doc, &item.value, item.id())
        };
        out.insert(item.key.into_owned(), value);
    }
    Json::Object(out)
}

fn value_ref_json(doc: &impl ReadDoc, value: &automerge::ValueRef<'_>, id: ObjId) -> Json {
    match value {
        automerge::ValueRef::Object(t) => object_json(doc, &id, *t),
        automerge::ValueRef::Scalar(s) => scalar_ref_json(s),
    }
}

fn object_json(doc: &impl ReadDoc, obj: &ObjId, t: ObjType) -> Json {
    match t {
        ObjType::Map | ObjType::Table => map_json(doc, obj, false),
        ObjType::List => Json::Array(
            doc.list_range(obj, ..)
                .map(|item| {
                    if item.conflict {
                        value_json(doc, obj, Prop::Seq(item.index))
                    } else {
                        value_ref_json(doc, &item.value, item.id())
                    }
                })
                .collect(),
        ),
        ObjType::Text => Json::String(doc.text(obj).unwrap_or_default()),
    }
}

/// The JSON of a scalar read through a range iterator.
pub(crate) fn scalar_ref_json(s: &automerge::ScalarValueRef<'_>) -> Json {
    use automerge::ScalarValueRef as S;
    match s {
        S::Null | S::Unknown { .. } => Json::Null,
        S::Boolean(b) => Json::Bool(*b),
        S::Int(n) | S::Timestamp(n) | S::Counter(n) => Json::from(*n),
        S::Uint(n) => Json::from(*n),
        S::F64(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        S::Str(s) => Json::String(s.to_string()),
        S::Bytes(b) => Json::Array(b.iter().map(|x| Json::from(*x)).collect()),
    }
}

fn scalar_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Int(n) | ScalarValue::Timestamp(n) => Json::from(*n),
        ScalarValue::Uint(n) => Json::from(*n),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::F64(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Bytes(b) => Json::Array(b.iter().map(|x| Json::from(*x)).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn actor(n: u8) -> ActorId {
        ActorId::from(vec![n; 16])
    }

    fn ops(v: Json) -> Write {
        Write::Ops(Op::parse_list(&v).expect("valid ops"))
    }

    #[test]
    fn list_lengths_by_lookup_agree_with_automerge_hint_or_not() {
        let mut doc = new_document(actor(1));
        let mut tx = doc.transaction();
        let list = tx.put_object(ROOT, "l", ObjType::List).expect("list");
        tx.commit();
        let mut sizes = Vec::new();
        for i in 0..300usize {
            let mut tx = doc.transaction();
            let len = tx.length(&list);
            tx.insert(&list, len, i as i64).expect("insert");
            if i % 7 == 3 {
                tx.delete(&list, i % (len + 1)).expect("delete");
            }
            tx.commit();
            sizes.push(doc.length(&list));
            // A hint that is right, off by a lot, or absent gives the same answer.
            assert_eq!(list_len(&doc, &list), doc.length(&list));
            remember_list_len(&list, doc.length(&list) * 3 + 5);
            assert_eq!(list_len(&doc, &list), doc.length(&list));
            LIST_LENGTH_HINTS.with(|h| h.borrow_mut().clear());
            assert_eq!(list_len(&doc, &list), doc.length(&list));
        }
        assert!(sizes.iter().any(|n| *n > 200));
        let mut empty = new_document(actor(2));
        let mut tx = empty.transaction();
        let none = tx.put_object(ROOT, "l", ObjType::List).expect("list");
        tx.commit();
        assert_eq!(list_len(&empty, &none), 0);
    }

    #[test]
    fn pushes_land_at_the_end_after_other_writers_changed_the_list() {
        let mut a = new_document(actor(1));
        apply(
            &mut a,
            &ops(json!([{"op": "push", "path": ["l"], "value": 0}])),
            Expiry::Keep,
            0,
        )
        .expect("push");
        let mut b = new_document(actor(2));
        b.merge(&mut a.clone()).expect("merge");
        for i in 1..5 {
            apply(
                &mut b,
                &ops(json!([{"op": "push", "path": ["l"], "value": i}])),
                Expiry::Keep,
                0,
            )
            .expect("push");
        }
        // a's hint for the list says 1; b made it 5.
        a.merge(&mut b.clone()).expect("merge");
        apply(
            &mut a,
            &ops(json!([{"op": "push", "path": ["l"], "value": 9}])),
            Expiry::Keep,
            0,
        )
        .expect("push");
        assert_eq!(to_json(&a)["l"], json!([0, 1, 2, 3, 4, 9]));
    }

    fn write(doc: &mut Automerge, w: Write) -> Option<ChangeHash> {
        checked_apply(doc, &w, Expiry::Keep, 1_000).expect("write applies")
    }

    /// `apply`, asserting that the lifecycle it reports is the one the document holds.
    fn checked_apply(
        doc: &mut Automerge,
        w: &Write,
        expiry: Expiry,
        now_ms: i64,
    ) -> Result<Option<ChangeHash>, ApplyError> {
        let applied = apply(doc, w, expiry, now_ms)?;
        assert_eq!(
            applied.lifecycle,
            Lifecycle::of(doc),
            "reported lifecycle after {w:?} {expiry:?}"
        );
        Ok(applied.changes.last().copied())
    }

    #[test]
    fn every_op_shapes_the_json() {
        let mut doc = new_document(actor(1));
        write(
            &mut doc,
            ops(json!([
                {"op": "set", "path": ["cart", "owner"], "value": "u-42"},
                {"op": "set", "path": ["cart", "meta"], "value": {"tags": ["a", "b"], "n": 1.5, "ok": true, "x": null}},
                {"op": "inc", "path": ["cart", "qty"], "by": 2},
                {"op": "inc", "path": ["cart", "qty"]},
                {"op": "push", "path": ["log"], "value": "first"},
                {"op": "push", "path": ["log"], "value": {"at": 2}},
                {"op": "insert", "path": ["log", 0], "value": "zeroth"},
                {"op": "splice", "path": ["note"], "index": 0, "text": "hello wörld"},
                {"op": "splice", "path": ["note"], "index": 6, "delete": 5, "text": "there"},
                {"op": "set", "path": ["log", 1], "value": "replaced"},
                {"op": "del", "path": ["cart", "meta", "x"]},
                {"op": "del", "path": ["missing", "deep"]},
            ])),
        );
        assert_eq!(
            to_json(&doc),
            json!({
                "cart": {"owner": "u-42", "qty": 3, "meta": {"tags": ["a", "b"], "n": 1.5, "ok": true}},
                "log": ["zeroth", "replaced", {"at": 2}],
                "note": "hello there",
            })
        );
    }

    #[test]
    fn inapplicable_ops_change_nothing() {
        let mut doc = new_document(actor(1));
        write(
            &mut doc,
            ops(
                json!([{"op": "set", "path": ["s"], "value": "str"}, {"op": "set", "path": ["l"], "value": [1]}]),
            ),
        );
        let heads = doc.get_heads();
        let cases = [
            (json!([{"op": "inc", "path": ["s"]}]), "inc needs a counter"),
            (
                json!([{"op": "set", "path": ["s", "x"], "value": 1}]),
                "holds a scalar",
            ),
            (
                json!([{"op": "set", "path": ["l", 5], "value": 1}]),
                "out of range",
            ),
            (
                json!([{"op": "insert", "path": ["l", 2], "value": 1}]),
                "out of range",
            ),
            (
                json!([{"op": "splice", "path": ["s"], "index": 0, "text": "x"}]),
                "splice needs a text",
            ),
            (
                json!([{"op": "push", "path": ["s"], "value": 1}]),
                "push needs a list",
            ),
            (
                json!([{"op": "set", "path": ["l", "k"], "value": 1}]),
                "used on a list",
            ),
            (
                json!([{"op": "set", "path": ["ok"], "value": 1}, {"op": "splice", "path": ["t"], "index": 3}]),
                "out of range",
            ),
        ];
        for (body, want) in cases {
            let err = apply(&mut doc, &ops(body.clone()), Expiry::Keep, 1).expect_err("must fail");
            assert!(err.to_string().contains(want), "{body}: {err}");
            assert_eq!(
                doc.get_heads(),
                heads,
                "a failed write must leave no change"
            );
        }
        assert_eq!(to_json(&doc), json!({"s": "str", "l": [1]}));
    }

    #[test]
    fn replace_is_a_diff_that_keeps_concurrent_edits() {
        let mut a = new_document(actor(1));
        write(
            &mut a,
            Write::Replace(
                json!({"keep": 1, "gone": 2, "n": {"x": 1}, "list": [1, 2, 3]})
                    .as_object()
                    .expect("obj")
                    .clone(),
            ),
        );
        let mut b = a.fork().with_actor(actor(2));
        // b edits a key that a's next PUT does not change.
        write(
            &mut b,
            ops(json!([{"op": "set", "path": ["n", "y"], "value": 2}])),
        );
        write(
            &mut a,
            Write::Replace(
                json!({"keep": 1, "n": {"x": 1}, "list": [1, 9, 3], "new": "v"})
                    .as_object()
                    .expect("obj")
                    .clone(),
            ),
        );
        a.merge(&mut b).expect("merge");
        assert_eq!(
            to_json(&a),
            json!({"keep": 1, "n": {"x": 1, "y": 2}, "list": [1, 9, 3], "new": "v"})
        );
        // An unchanged PUT writes nothing.
        let before = a.get_heads();
        let same = to_json(&a).as_object().expect("obj").clone();
        assert_eq!(write(&mut a, Write::Replace(same)), None);
        assert_eq!(a.get_heads(), before);
    }

    #[test]
    fn replace_rejects_reserved_keys() {
        let mut doc = new_document(actor(1));
        let err = apply(
            &mut doc,
            &Write::Replace(
                json!({"_verge_deleted": false})
                    .as_object()
                    .expect("obj")
                    .clone(),
            ),
            Expiry::Keep,
            1,
        );
        assert!(matches!(err, Err(ApplyError::InvalidDocument(_))));
    }

    #[test]
    fn delete_writes_a_tombstone_and_a_later_write_revives() {
        let mut doc = new_document(actor(1));
        write(
            &mut doc,
            ops(json!([{"op": "set", "path": ["a"], "value": 1}])),
        );
        assert!(is_live(&doc, 0));
        write(&mut doc, Write::Delete);
        assert!(!is_live(&doc, 0));
        assert_eq!(to_json(&doc), json!({}));
        write(
            &mut doc,
            ops(json!([{"op": "set", "path": ["b"], "value": 2}])),
        );
        assert!(is_live(&doc, 0));
        assert_eq!(to_json(&doc), json!({"b": 2}));
    }

    #[test]
    fn tombstone_replicates() {
        let mut a = new_document(actor(1));
        write(
            &mut a,
            ops(json!([{"op": "set", "path": ["a"], "value": 1}])),
        );
        let mut b = a.fork().with_actor(actor(2));
        write(&mut a, Write::Delete);
        b.merge(&mut a).expect("merge");
        assert!(!is_live(&b, 0));
    }

    #[test]
    fn expiry_is_kept_set_and_cleared() {
        let mut doc = new_document(actor(1));
        apply(
            &mut doc,
            &ops(json!([{"op": "set", "path": ["a"], "value": 1}])),
            Expiry::At(5_000),
            1_000,
        )
        .expect("apply");
        assert_eq!(Lifecycle::of(&doc).expires_at_ms, Some(5_000));
        assert!(is_live(&doc, 4_999));
        assert!(!is_live(&doc, 5_000));
        apply(
            &mut doc,
            &ops(json!([{"op": "set", "path": ["a"], "value": 2}])),
            Expiry::Keep,
            1_000,
        )
        .expect("apply");
        assert_eq!(Lifecycle::of(&doc).expires_at_ms, Some(5_000));
        checked_apply(&mut doc, &ops(json!([])), Expiry::Clear, 1_000).expect("apply");
        assert_eq!(Lifecycle::of(&doc).expires_at_ms, None);
        assert_eq!(to_json(&doc), json!({"a": 2}), "lifecycle keys are hidden");
    }

    #[test]
    fn writing_an_expired_document_starts_from_empty() {
        let mut doc = new_document(actor(1));
        apply(
            &mut doc,
            &ops(json!([{"op": "set", "path": ["a"], "value": 1}])),
            Expiry::At(5_000),
            1_000,
        )
        .expect("apply");
        apply(
            &mut doc,
            &ops(json!([{"op": "set", "path": ["b"], "value": 2}])),
            Expiry::Keep,
            6_000,
        )
        .expect("apply");
        assert!(is_live(&doc, 6_000));
        assert_eq!(to_json(&doc), json!({"b": 2}));
        assert_eq!(Lifecycle::of(&doc).expires_at_ms, None);
    }

    #[test]
    fn concurrently_created_counters_are_one_counter() {
        let base = new_document(actor(9));
        let mut a = base.fork().with_actor(actor(1));
        let mut b = base.fork().with_actor(actor(2));
        write(&mut a, ops(json!([{"op": "inc", "path": ["n"], "by": 3}])));
        write(&mut b, ops(json!([{"op": "inc", "path": ["n"], "by": 5}])));
        a.merge(&mut b).expect("merge");
        b.merge(&mut a).expect("merge");
        assert_eq!(a.get_all(ROOT, "n").expect("get").len(), 1, "one counter");
        assert_eq!(to_json(&a)["n"], json!(8));
        // Concurrent increments after the merge all count, once.
        write(&mut a, ops(json!([{"op": "inc", "path": ["n"], "by": 1}])));
        write(&mut b, ops(json!([{"op": "inc", "path": ["n"], "by": 10}])));
        a.merge(&mut b).expect("merge");
        b.merge(&mut a).expect("merge");
        assert_eq!(to_json(&a)["n"], json!(19));
        assert_eq!(to_json(&b)["n"], json!(19));
    }

    /// Two replicas that each put their own counter at `n`, as versions before implicit
    /// creation did.
    fn legacy_conflicting_counters() -> (Automerge, Automerge) {
        let mut a = new_document(actor(1));
        let mut b = new_document(actor(2));
        for (doc, v) in [(&mut a, 3), (&mut b, 5)] {
            let mut tx = doc.transaction();
            tx.put(ROOT, "n", ScalarValue::counter(v)).expect("put");
            tx.commit();
        }
        a.merge(&mut b).expect("merge");
        b.merge(&mut a).expect("merge");
        (a, b)
    }

    #[test]
    fn legacy_conflicting_counters_take_concurrent_increments_exactly_once() {
        let (mut a, mut b) = legacy_conflicting_counters();
        assert_eq!(a.get_all(ROOT, "n").expect("get").len(), 2);
        assert_eq!(to_json(&a)["n"], json!(8), "reads sum the counters");
        // Each replica increments on its own, several times, then they merge. The old fold put
        // the sum as a new counter and counted the 8 twice when both folded.
        for by in [1, 2] {
            write(&mut a, ops(json!([{"op": "inc", "path": ["n"], "by": by}])));
        }
        write(
            &mut b,
            ops(
                json!([{"op": "inc", "path": ["n"], "by": 10}, {"op": "set", "path": ["x"], "value": 1}]),
            ),
        );
        write(
            &mut b,
            ops(json!([{"op": "inc", "path": ["n"], "by": 100}])),
        );
        a.merge(&mut b).expect("merge");
        b.merge(&mut a).expect("merge");
        assert_eq!(to_json(&a)["n"], json!(121));
        assert_eq!(to_json(&b), json!({"n": 121, "x": 1}));
        // A PUT of the counter moves it by the difference.
        write(
            &mut a,
            Write::Replace(json!({"n": 7, "x": 1}).as_object().expect("obj").clone()),
        );
        assert_eq!(to_json(&a)["n"], json!(7));
        // The hand-made increment changes load back and keep a's actor usable.
        let loaded = load_document(&a.save(), actor(7)).expect("load");
        assert_eq!(to_json(&loaded), to_json(&a));
        write(&mut a, ops(json!([{"op": "inc", "path": ["n"]}])));
        assert_eq!(to_json(&a)["n"], json!(8));
    }

    #[test]
    fn legacy_conflicting_objects_read_and_write() {
        let mut a = new_document(actor(1));
        let mut b = new_document(actor(2));
        for doc in [&mut a, &mut b] {
            let mut tx = doc.transaction();
            let l = tx.put_object(ROOT, "log", ObjType::List).expect("list");
            tx.insert(&l, 0, "old").expect("insert");
            let m = tx.put_object(ROOT, "m", ObjType::Map).expect("map");
            tx.put(&m, "k", 1).expect("put");
            tx.commit();
        }
        a.merge(&mut b).expect("merge");
        write(
            &mut a,
            ops(json!([
                {"op": "push", "path": ["log"], "value": "new"},
                {"op": "set", "path": ["m", "j"], "value": 2},
                {"op": "inc", "path": ["m", "c"]},
            ])),
        );
        assert_eq!(
            to_json(&a),
            json!({"log": ["old", "new"], "m": {"k": 1, "j": 2, "c": 1}})
        );
    }

    #[test]
    fn counters_refuse_to_overflow() {
        let mut doc = new_document(actor(1));
        write(
            &mut doc,
            ops(json!([{"op": "inc", "path": ["n"], "by": i64::MAX}])),
        );
        let heads = doc.get_heads();
        let err = apply(
            &mut doc,
            &ops(json!([{"op": "inc", "path": ["n"]}])),
            Expiry::Keep,
            1,
        )
        .expect_err("overflow");
        assert!(err.to_string().contains("64-bit"), "{err}");
        assert_eq!(doc.get_heads(), heads, "nothing written");
        write(
            &mut doc,
            ops(json!([{"op": "inc", "path": ["m"], "by": i64::MIN}])),
        );
        let err = apply(
            &mut doc,
            &ops(json!([{"op": "inc", "path": ["m"], "by": -1}])),
            Expiry::Keep,
            1,
        )
        .expect_err("overflow");
        assert!(err.to_string().contains("64-bit"), "{err}");
        // Two increments in one write that overflow together are refused as a whole.
        let err = apply(
            &mut doc,
            &ops(json!([{"op": "inc", "path": ["k"], "by": i64::MAX}, {"op": "inc", "path": ["k"], "by": 1}])),
            Expiry::Keep,
            1,
        )
        .expect_err("overflow");
        assert!(err.to_string().contains("ops[1]"), "{err}");
        assert!(
            to_json(&doc).get("k").is_none(),
            "the creation is not kept either"
        );
        // A PUT may move a counter across more than the i64 range in one go.
        write(
            &mut doc,
            Write::Replace(
                json!({"n": i64::MIN, "m": i64::MAX})
                    .as_object()
                    .expect("obj")
                    .clone(),
            ),
        );
        assert_eq!(to_json(&doc), json!({"n": i64::MIN, "m": i64::MAX}));
        assert!(
            doc.get(ROOT, "n")
                .expect("get")
                .is_some_and(|(v, _)| matches!(v, Value::Scalar(s) if s.is_counter()))
        );
    }

    #[test]
    fn insert_at_zero_creates_a_missing_list() {
        let mut a = new_document(actor(1));
        let mut b = new_document(actor(2));
        write(
            &mut a,
            ops(json!([{"op": "insert", "path": ["l", 0], "value": "a"}])),
        );
        write(
            &mut b,
            ops(json!([{"op": "insert", "path": ["l", 0], "value": "b"}])),
        );
        a.merge(&mut b).expect("merge");
        let mut l: Vec<Json> = to_json(&a)["l"].as_array().expect("list").clone();
        l.sort_by_key(|v| v.to_string());
        assert_eq!(l, vec![json!("a"), json!("b")]);
        let err = apply(
            &mut a,
            &ops(json!([{"op": "insert", "path": ["q", 1], "value": "x"}])),
            Expiry::Keep,
            1,
        )
        .expect_err("out of range");
        assert!(err.to_string().contains("out of range"), "{err}");
        assert!(to_json(&a).get("q").is_none());
    }

    #[test]
    fn a_write_that_deletes_and_recreates_keeps_its_own_container() {
        let mut a = new_document(actor(1));
        write(
            &mut a,
            ops(json!([{"op": "push", "path": ["l"], "value": 1}])),
        );
        let mut b = a.fork().with_actor(actor(2));
        write(
            &mut a,
            ops(json!([{"op": "del", "path": ["l"]}, {"op": "push", "path": ["l"], "value": 2}])),
        );
        assert_eq!(to_json(&a)["l"], json!([2]));
        // b, having seen the delete, pushes into what a made.
        b.merge(&mut a).expect("merge");
        write(
            &mut b,
            ops(json!([{"op": "push", "path": ["l"], "value": 3}])),
        );
        a.merge(&mut b).expect("merge");
        assert_eq!(to_json(&a)["l"], json!([2, 3]));
    }

    #[test]
    fn creations_are_changes_of_their_own_reported_first() {
        let mut doc = new_document(actor(1));
        let applied = apply(
            &mut doc,
            &ops(json!([{"op": "set", "path": ["a", "b", "c"], "value": 1}, {"op": "push", "path": ["l"], "value": 1}])),
            Expiry::Keep,
            1_000,
        )
        .expect("write");
        assert_eq!(applied.changes.len(), 4, "a, a.b, l, then the write");
        let own = doc.get_last_local_change().expect("own change");
        assert_eq!(applied.changes.last(), Some(&own.hash()));
        for hash in &applied.changes[..3] {
            let change = doc.get_change_by_hash(hash).expect("held");
            assert_eq!(change.seq(), 1);
            assert_eq!(change.timestamp(), 0, "creation changes carry no time");
            assert_ne!(change.actor_id(), doc.get_actor());
        }
        // A write into what exists creates nothing.
        let applied = apply(
            &mut doc,
            &ops(json!([{"op": "push", "path": ["l"], "value": 2}])),
            Expiry::Keep,
            1_000,
        )
        .expect("write");
        assert_eq!(applied.changes.len(), 1);
    }

    #[test]
    fn save_and_load_round_trip() {
        let mut doc = new_document(actor(1));
        write(
            &mut doc,
            ops(
                json!([{"op": "splice", "path": ["t"], "index": 0, "text": "héllo"}, {"op": "inc", "path": ["c"]}]),
            ),
        );
        let loaded = load_document(&doc.save(), actor(2)).expect("load");
        assert_eq!(to_json(&loaded), to_json(&doc));
        assert_eq!(loaded.get_heads(), doc.get_heads());
        assert!(load_document(b"garbage", actor(2)).is_err());
    }

    /// Found by the `document_load` fuzz target: Automerge panicked (an `unwrap` on a truncated
    /// column of a bundle chunk) instead of returning an error, in `load` and in
    /// `load_incremental`.
    #[test]
    fn fuzz_crash_truncated_bundle_is_an_error() {
        const CRASH: &[u8] = &[
            0x85, 0x6f, 0x4a, 0x83, 0x85, 0x6f, 0x4b, 0x83, 0x03, 0x09, 0x00, 0x00, 0x00, 0x01,
            0x23, 0x03, 0x83, 0x6f, 0x00,
        ];
        assert!(load_document(CRASH, actor(2)).is_err());
        let mut doc = new_document(actor(1));
        assert!(load_incremental(&mut doc, CRASH).is_err());
        // The same bytes inside a sync message.
        let message = automerge::sync::Message {
            heads: vec![],
            need: vec![],
            have: vec![],
            changes: vec![CRASH.to_vec()].into(),
            flags: None,
            version: automerge::sync::MessageVersion::V1,
        };
        let mut state = automerge::sync::State::new();
        let mut doc = new_document(actor(1));
        assert!(receive_sync_message(&mut doc, &mut state, message).is_err());
    }

    /// Found by fuzzing the sync route: a `have` whose Bloom filter has zero bits per entry
    /// makes Automerge divide by zero when it answers a document with history.
    #[test]
    fn fuzz_crash_empty_bloom_filter_is_an_error() {
        const CRASH: &[u8] = &[
            0x42, 0x00, 0x00, 0x01, 0x00, 0x08, 0x42, 0x00, 0x00, 0x00, 0x25, 0x00, 0x00, 0x00,
            0x00,
        ];
        let message = automerge::sync::Message::decode(CRASH).expect("decodes");
        let mut doc = new_document(actor(1));
        write(
            &mut doc,
            ops(json!([{"op": "set", "path": ["a"], "value": 1}])),
        );
        let mut state = automerge::sync::State::new();
        receive_sync_message(&mut doc, &mut state, message).expect("receives");
        assert!(generate_sync_message(&doc, &mut state).is_err());
        assert_eq!(to_json(&doc), json!({"a": 1}), "the document is unchanged");
    }

    #[test]
    fn a_del_of_a_missing_key_ignores_what_later_ops_of_its_write_create() {
        // The `del` runs first and finds nothing; the `inc` creates the shared counter. The
        // write must not delete that counter (a concurrent increment elsewhere would be lost)
        // nor trip over it.
        let base = new_document(actor(9));
        let mut a = base.fork().with_actor(actor(1));
        let mut b = base.fork().with_actor(actor(2));
        write(
            &mut a,
            ops(json!([{"op": "del", "path": ["n"]}, {"op": "inc", "path": ["n"]}])),
        );
        write(&mut b, ops(json!([{"op": "inc", "path": ["n"], "by": 5}])));
        a.merge(&mut b).expect("merge");
        assert_eq!(to_json(&a)["n"], json!(6), "both increments count once");
        // Through a key a later op creates as a counter: still a no-op, not a refusal.
        let mut c = new_document(actor(3));
        write(
            &mut c,
            ops(json!([{"op": "del", "path": ["t", "a"]}, {"op": "inc", "path": ["t"]}])),
        );
        assert_eq!(to_json(&c), json!({"t": 1}));
    }

    /// A random op over a small key space so that replicas collide often.
    fn arb_op() -> impl Strategy<Value = Json> {
        let key = prop::sample::select(vec!["a", "b", "c"]);
        prop_oneof![
            (key.clone(), any::<i32>())
                .prop_map(|(k, v)| json!({"op": "set", "path": [k], "value": v})),
            (key.clone(), "[a-z]{0,3}")
                .prop_map(|(k, v)| json!({"op": "set", "path": ["m", k], "value": v})),
            key.clone().prop_map(|k| json!({"op": "del", "path": [k]})),
            (-5i64..5).prop_map(|by| json!({"op": "inc", "path": ["counter"], "by": by})),
            any::<u8>().prop_map(|v| json!({"op": "push", "path": ["list"], "value": v})),
            "[a-z]{0,3}"
                .prop_map(|t| json!({"op": "splice", "path": ["text"], "index": 0, "text": t})),
        ]
    }

    fn replay(doc: &mut Automerge, batch: &[Json]) {
        for op in batch {
            // Ops that do not fit the current state (e.g. `inc` after a `set`) are rejected
            // whole; convergence must hold either way.
            let _ = checked_apply(doc, &ops(json!([op])), Expiry::Keep, 1_000);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Two replicas apply independent op sequences in any interleaving with merges in
        /// between; after a final exchange both read the same JSON and have the same heads.
        #[test]
        fn replicas_converge(
            rounds in prop::collection::vec((prop::collection::vec(arb_op(), 0..4), prop::collection::vec(arb_op(), 0..4), any::<bool>()), 1..6)
        ) {
            let mut base = new_document(actor(9));
            write(&mut base, ops(json!([{"op": "inc", "path": ["counter"], "by": 0}])));
            let mut a = base.fork().with_actor(actor(1));
            let mut b = base.fork().with_actor(actor(2));
            for (ops_a, ops_b, sync) in &rounds {
                replay(&mut a, ops_a);
                replay(&mut b, ops_b);
                if *sync {
                    a.merge(&mut b).expect("merge");
                }
            }
            a.merge(&mut b).expect("merge");
            b.merge(&mut a).expect("merge");
            prop_assert_eq!(a.get_heads(), b.get_heads());
            prop_assert_eq!(to_json(&a), to_json(&b));
        }

        /// Concurrent increments on replicas that never saw each other's changes all count.
        #[test]
        fn counters_sum_concurrent_increments(incs_a in prop::collection::vec(-100i64..100, 0..8), incs_b in prop::collection::vec(-100i64..100, 0..8)) {
            let mut base = new_document(actor(9));
            write(&mut base, ops(json!([{"op": "inc", "path": ["n"], "by": 0}])));
            let mut a = base.fork().with_actor(actor(1));
            let mut b = base.fork().with_actor(actor(2));
            for by in &incs_a { write(&mut a, ops(json!([{"op": "inc", "path": ["n"], "by": by}]))); }
            for by in &incs_b { write(&mut b, ops(json!([{"op": "inc", "path": ["n"], "by": by}]))); }
            a.merge(&mut b).expect("merge");
            let want: i64 = incs_a.iter().chain(&incs_b).sum();
            prop_assert_eq!(to_json(&a)["n"].clone(), json!(want));
        }
    }
}
