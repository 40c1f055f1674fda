//! The JSON a document shows, kept beside it and updated by each write's ops directly.
//!
//! A replica that reads and writes often (the Wasm client in an edge function) cannot afford
//! Automerge on every read and write: a write is a transaction, a commit and a hash, and a read
//! materialises JSON from the op tree (a counter's value walks every increment). A [`Shadow`]
//! holds the state as plain values that still know what they are (a counter is not a number, a
//! text is not a string, for what later ops may do to them), applies [`Op`]s with exactly the
//! checks and effects of [`crate::document::apply`], and answers reads in the time of a map
//! lookup. The replica applies the same ops to Automerge later, in one change; a property test
//! holds the two to the same results, errors included.

use std::collections::BTreeMap;

use automerge::{ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue, Value};
use serde_json::{Map, Value as Json};

use crate::document::{ApplyError, Lifecycle, value_json};
use crate::limits::JSON_DEPTH_MAX;
use crate::ops::{Op, PathSegment, RESERVED_KEY_PREFIX};

/// One value of the document.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A map.
    Map(BTreeMap<String, Node>),
    /// A list.
    List(Vec<Node>),
    /// A text (collaborative string), by Unicode scalar value.
    Text(Vec<char>),
    /// A counter.
    Counter(i64),
    /// Any other value, as its JSON.
    Scalar(Json),
    /// Several values written concurrently, shown as the one Automerge picks (a counter among
    /// them takes no increments; writing the shown value again still resolves the conflict).
    Conflicted(Json),
}

impl Node {
    fn from_json(value: &Json) -> Node {
        match value {
            Json::Object(map) => Node::Map(
                map.iter()
                    .map(|(k, v)| (k.clone(), Node::from_json(v)))
                    .collect(),
            ),
            Json::Array(items) => Node::List(items.iter().map(Node::from_json).collect()),
            scalar => Node::Scalar(scalar.clone()),
        }
    }

    /// The value as JSON (counters as numbers, texts as strings).
    pub fn to_json(&self) -> Json {
        match self {
            Node::Map(map) => Json::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect::<Map<String, Json>>(),
            ),
            Node::List(items) => Json::Array(items.iter().map(Node::to_json).collect()),
            Node::Text(chars) => Json::String(chars.iter().collect()),
            Node::Counter(n) => Json::from(*n),
            Node::Scalar(v) | Node::Conflicted(v) => v.clone(),
        }
    }

    /// One value in [`Shadow::to_wire`]'s form: an object with one key that says what it is.
    fn to_wire(&self) -> Json {
        let (tag, value) = match self {
            Node::Map(map) => (
                "m",
                Json::Object(map.iter().map(|(k, v)| (k.clone(), v.to_wire())).collect()),
            ),
            Node::List(items) => ("l", Json::Array(items.iter().map(Node::to_wire).collect())),
            Node::Text(chars) => ("t", Json::String(chars.iter().collect())),
            Node::Counter(n) => ("c", Json::from(*n)),
            Node::Scalar(v) => ("v", v.clone()),
            Node::Conflicted(v) => ("x", v.clone()),
        };
        let mut out = Map::new();
        out.insert(tag.into(), value);
        Json::Object(out)
    }

    fn from_wire(wire: &Json, depth: usize) -> Result<Node, String> {
        if depth > JSON_DEPTH_MAX {
            return Err(format!("the state nests deeper than {JSON_DEPTH_MAX}"));
        }
        let Json::Object(tagged) = wire else {
            return Err("a value of the state is not a tagged object".into());
        };
        let mut entries = tagged.iter();
        let (Some((tag, value)), None) = (entries.next(), entries.next()) else {
            return Err("a value of the state does not have exactly one tag".into());
        };
        Ok(match (tag.as_str(), value) {
            ("m", Json::Object(map)) => Node::Map(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), Node::from_wire(v, depth + 1)?)))
                    .collect::<Result<_, String>>()?,
            ),
            ("l", Json::Array(items)) => Node::List(
                items
                    .iter()
                    .map(|v| Node::from_wire(v, depth + 1))
                    .collect::<Result<_, String>>()?,
            ),
            ("t", Json::String(s)) => Node::Text(s.chars().collect()),
            ("c", n) => Node::Counter(n.as_i64().ok_or("a counter is not an integer")?),
            ("v", v) if !v.is_object() && !v.is_array() => Node::Scalar(v.clone()),
            ("x", v) => Node::Conflicted(v.clone()),
            (tag, _) => return Err(format!("a value of the state has a bad tag \"{tag}\"")),
        })
    }

    fn is_object(&self) -> bool {
        matches!(self, Node::Map(_) | Node::List(_) | Node::Text(_))
    }
}

/// What a path's parent segments lead to, before anything is created.
enum Parent {
    /// Every step exists: the object at the end.
    Found,
    /// Steps from this depth on are missing and will be created.
    Missing(usize),
    /// A step is missing and the op creates nothing (a `del`): the op is a no-op.
    Absent,
}

/// The state of a document's user keys and lifecycle, as [`crate::document::to_json`] and
/// [`Lifecycle::of`] would read them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Shadow {
    root: BTreeMap<String, Node>,
    lifecycle: Lifecycle,
}

impl Shadow {
    /// The shadow of `doc` as it is. One pass over each object's range; only keys and elements
    /// with conflicting values are looked up one by one.
    pub fn of(doc: &impl ReadDoc) -> Shadow {
        Shadow {
            root: read_map(doc, &ROOT, true),
            lifecycle: Lifecycle::of(doc),
        }
    }

    /// The document's user keys as JSON.
    pub fn to_json(&self) -> Json {
        Json::Object(
            self.root
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect(),
        )
    }

    /// The value at `path` (`None` when absent); the whole document for an empty path.
    pub fn get(&self, path: &[PathSegment]) -> Option<&Node> {
        let (first, rest) = path.split_first()?;
        let PathSegment::Key(k) = first else {
            return None;
        };
        let mut node = self.root.get(k)?;
        for seg in rest {
            node = match (node, seg) {
                (Node::Map(m), PathSegment::Key(k)) => m.get(k)?,
                (Node::List(items), PathSegment::Index(i)) => items.get(*i)?,
                _ => return None,
            };
        }
        Some(node)
    }

    /// The document's tombstone and expiry.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// The shadow as JSON that keeps what each value is (a counter is not a number, a text is
    /// not a string), for a node to send to a thin replica ([`crate::thin`]) and for that
    /// replica's `save()`. [`Shadow::from_wire`] reads it back.
    pub fn to_wire(&self) -> Json {
        let mut out = Map::new();
        out.insert(
            "root".into(),
            Json::Object(
                self.root
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_wire()))
                    .collect(),
            ),
        );
        if self.lifecycle.deleted {
            out.insert("deleted".into(), Json::Bool(true));
        }
        if let Some(at) = self.lifecycle.expires_at_ms {
            out.insert("expires_at_ms".into(), Json::from(at));
        }
        Json::Object(out)
    }

    /// Reads [`Shadow::to_wire`]'s form; an error names what is malformed.
    pub fn from_wire(wire: &Json) -> Result<Shadow, String> {
        let Some(Json::Object(root)) = wire.get("root") else {
            return Err("the state has no \"root\" object".into());
        };
        let root = root
            .iter()
            .map(|(k, v)| Ok((k.clone(), Node::from_wire(v, 0)?)))
            .collect::<Result<BTreeMap<_, _>, String>>()?;
        let deleted = match wire.get("deleted") {
            None => false,
            Some(Json::Bool(b)) => *b,
            Some(_) => return Err("\"deleted\" is not a boolean".into()),
        };
        let expires_at_ms = match wire.get("expires_at_ms") {
            None | Some(Json::Null) => None,
            Some(v) => Some(v.as_i64().ok_or("\"expires_at_ms\" is not an integer")?),
        };
        Ok(Shadow {
            root,
            lifecycle: Lifecycle {
                deleted,
                expires_at_ms,
            },
        })
    }

    /// Applies `ops` as one write stamped `now_ms`, as [`crate::document::apply`] does with
    /// `Write::Ops` and `Expiry::Keep`: all of them or, on an error, none. Returns whether the
    /// write changed anything (a write of only `del`s of missing keys does not).
    pub fn apply(&mut self, ops: &[Op], now_ms: i64) -> Result<bool, ApplyError> {
        let expired = self.lifecycle.expired(now_ms);
        let revives = self.lifecycle.deleted || expired;
        // A write to a deleted or expired document starts its next incarnation, empty.
        let before = if revives {
            Some(std::mem::take(&mut self.root))
        } else {
            None
        };
        // Undo for writes of several ops: the root keys they touch, as they were.
        let mut saved: Vec<(String, Option<Node>)> = Vec::new();
        let mut changed = revives;
        for (index, op) in ops.iter().enumerate() {
            if ops.len() > 1
                && let Some(PathSegment::Key(k)) = op.path().segments().first()
                && !saved.iter().any(|(s, _)| s == k)
            {
                saved.push((k.clone(), self.root.get(k).cloned()));
            }
            let done = self.apply_op(op);
            if let Ok(did) = done {
                changed |= did;
            }
            if let Err(reason) = done {
                for (k, node) in saved.into_iter().rev() {
                    match node {
                        Some(node) => self.root.insert(k, node),
                        None => self.root.remove(&k),
                    };
                }
                if let Some(root) = before {
                    self.root = root;
                }
                return Err(ApplyError::NotApplicable {
                    index,
                    path: op.path().to_string(),
                    reason,
                });
            }
        }
        self.lifecycle = Lifecycle {
            deleted: false,
            expires_at_ms: if expired || revives {
                None
            } else {
                self.lifecycle.expires_at_ms
            },
        };
        Ok(changed)
    }

    /// Walks the parent segments without changing anything.
    fn find_parent(
        &self,
        parents: &[PathSegment],
        create: bool,
        last_kind: ObjType,
    ) -> Result<(Parent, ObjType), String> {
        let mut kind = ObjType::Map;
        let mut map = Some(&self.root);
        let mut node: Option<&Node> = None;
        for (i, seg) in parents.iter().enumerate() {
            let child = match (kind, seg) {
                (ObjType::Map, PathSegment::Key(k)) => {
                    let m = match node {
                        None => map.expect("the root is a map"),
                        Some(Node::Map(m)) => m,
                        Some(_) => unreachable!("kind follows the node"),
                    };
                    match m.get(k) {
                        Some(n) if n.is_object() => n,
                        Some(_) => {
                            return Err(format!("{} holds a scalar, not an object", describe(seg)));
                        }
                        None if create => {
                            // Everything from here on is created: maps, and the last step of
                            // `last_kind`. Only a key can address a new map.
                            if let Some(PathSegment::Index(n)) = parents[i + 1..]
                                .iter()
                                .find(|s| matches!(s, PathSegment::Index(_)))
                            {
                                return Err(format!("index {n} used on a map: expected a key"));
                            }
                            // The target is the last step, made of `last_kind`.
                            return Ok((Parent::Missing(i), last_kind));
                        }
                        None => return Ok((Parent::Absent, ObjType::Map)),
                    }
                }
                (ObjType::List, PathSegment::Index(n)) => {
                    let Some(Node::List(items)) = node else {
                        unreachable!("kind follows the node")
                    };
                    let len = items.len();
                    match items.get(*n) {
                        None => {
                            return Err(format!("index {n} is out of range for a list of {len}"));
                        }
                        Some(n) if n.is_object() => n,
                        Some(_) => {
                            return Err(format!("{} holds a scalar, not an object", describe(seg)));
                        }
                    }
                }
                (ObjType::Text, _) => return Err("cannot address inside a text".to_owned()),
                (ObjType::List, PathSegment::Key(k)) => {
                    return Err(format!("key {k:?} used on a list: expected an index"));
                }
                (_, PathSegment::Index(n)) => {
                    return Err(format!("index {n} used on a map: expected a key"));
                }
                (ObjType::Table, PathSegment::Key(_)) => unreachable!("shadows hold no tables"),
            };
            kind = match child {
                Node::Map(_) => ObjType::Map,
                Node::List(_) => ObjType::List,
                _ => ObjType::Text,
            };
            node = Some(child);
            map = None;
        }
        Ok((Parent::Found, kind))
    }

    /// The parent object, creating missing steps from `missing_from` on (maps, and a last step
    /// of `last_kind`).
    fn parent_mut(
        &mut self,
        parents: &[PathSegment],
        missing_from: Option<usize>,
        last_kind: ObjType,
    ) -> Option<&mut Node> {
        let make = |i: usize| {
            if i + 1 == parents.len() && last_kind == ObjType::List {
                Node::List(Vec::new())
            } else {
                Node::Map(BTreeMap::new())
            }
        };
        let creates = |i: usize| missing_from.is_some_and(|from| i >= from);
        let (first, rest) = parents.split_first()?;
        let PathSegment::Key(k) = first else {
            return None;
        };
        let mut node = if creates(0) {
            self.root.entry(k.clone()).or_insert_with(|| make(0))
        } else {
            self.root.get_mut(k)?
        };
        for (j, seg) in rest.iter().enumerate() {
            let i = j + 1;
            node = match (node, seg) {
                (Node::Map(m), PathSegment::Key(k)) => {
                    if creates(i) {
                        m.entry(k.clone()).or_insert_with(|| make(i))
                    } else {
                        m.get_mut(k)?
                    }
                }
                (Node::List(items), PathSegment::Index(n)) => items.get_mut(*n)?,
                _ => return None,
            };
        }
        Some(node)
    }

    /// Applies one op; `Ok(false)` when it had nothing to do.
    fn apply_op(&mut self, op: &Op) -> Result<bool, String> {
        let (parents, last) = op.path().split_last();
        let create = !matches!(op, Op::Del { .. });
        let last_kind = if matches!(op, Op::Insert { .. }) {
            ObjType::List
        } else {
            ObjType::Map
        };
        let (found, kind) = self.find_parent(parents, create, last_kind)?;
        let missing_from = match found {
            Parent::Absent => return Ok(false),
            Parent::Missing(i) => Some(i),
            Parent::Found => None,
        };
        // Check the op against the target (empty when it is about to be created), then change.
        let empty_map = BTreeMap::new();
        let empty_list = Vec::new();
        let target: Target<'_> = if missing_from.is_some() {
            match kind {
                ObjType::List => Target::List(&empty_list),
                _ => Target::Map(&empty_map),
            }
        } else if parents.is_empty() {
            Target::Map(&self.root)
        } else {
            match self.get(parents) {
                Some(Node::Map(m)) => Target::Map(m),
                Some(Node::List(l)) => Target::List(l),
                _ => Target::Text,
            }
        };
        let effect = check(&target, op, last)?;
        if let Effect::Nothing = effect {
            return Ok(false);
        }
        if parents.is_empty() {
            effect.run(Container::Map(&mut self.root), op);
            return Ok(true);
        }
        match self.parent_mut(parents, missing_from, last_kind) {
            Some(Node::Map(m)) => effect.run(Container::Map(m), op),
            Some(Node::List(l)) => effect.run(Container::List(l), op),
            _ => return Err("the path does not lead to an object".to_owned()),
        }
        Ok(true)
    }
}

fn read_map(doc: &impl ReadDoc, obj: &ObjId, is_root: bool) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    for item in doc.map_range(obj, ..) {
        if is_root && item.key.starts_with(RESERVED_KEY_PREFIX) {
            continue;
        }
        let node = if item.conflict {
            read(doc, obj, Prop::Map(item.key.to_string()))
        } else {
            read_ref(doc, &item.value, item.id())
        };
        out.insert(item.key.into_owned(), node);
    }
    out
}

fn read_object(doc: &impl ReadDoc, obj: &ObjId, t: ObjType) -> Node {
    match t {
        ObjType::Map | ObjType::Table => Node::Map(read_map(doc, obj, false)),
        ObjType::List => Node::List(
            doc.list_range(obj, ..)
                .map(|item| {
                    if item.conflict {
                        read(doc, obj, Prop::Seq(item.index))
                    } else {
                        read_ref(doc, &item.value, item.id())
                    }
                })
                .collect(),
        ),
        ObjType::Text => Node::Text(doc.text(obj).unwrap_or_default().chars().collect()),
    }
}

/// A value without conflicts, as a range iterator hands it over.
fn read_ref(doc: &impl ReadDoc, value: &automerge::ValueRef<'_>, id: ObjId) -> Node {
    match value {
        automerge::ValueRef::Object(t) => read_object(doc, &id, *t),
        automerge::ValueRef::Scalar(automerge::ScalarValueRef::Counter(n)) => Node::Counter(*n),
        automerge::ValueRef::Scalar(s) => Node::Scalar(crate::document::scalar_ref_json(s)),
    }
}

/// Reads the value at `prop` of `obj` as a node: counters stay counters (conflicting ones
/// summed, as Verge reads them), texts stay texts.
fn read(doc: &impl ReadDoc, obj: &ObjId, prop: Prop) -> Node {
    if let Ok(values) = doc.get_all(obj, prop.clone())
        && values.len() > 1
        && values.iter().all(
            |(v, _)| matches!(v, Value::Scalar(s) if matches!(s.as_ref(), ScalarValue::Counter(_))),
        )
    {
        let sum = values.iter().fold(0i64, |sum, (v, _)| match v {
            Value::Scalar(s) => sum.wrapping_add(s.as_i64().unwrap_or(0)),
            Value::Object(_) => sum,
        });
        return Node::Counter(sum);
    }
    match doc.get(obj, prop.clone()) {
        Ok(Some((Value::Object(t), id))) => read_object(doc, &id, t),
        Ok(Some((Value::Scalar(s), _))) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {
            let value = s.as_i64().unwrap_or(0);
            // A counter that conflicts with something else reads as its value but takes no
            // increments (`inc` needs every value at the key to be a counter).
            match doc.get_all(obj, prop) {
                Ok(values) if values.len() > 1 => Node::Conflicted(Json::from(value)),
                _ => Node::Counter(value),
            }
        }
        Ok(Some((Value::Scalar(_), _))) => {
            let conflicted = doc.get_all(obj, prop.clone()).is_ok_and(|v| v.len() > 1);
            let json = value_json(doc, obj, prop);
            if conflicted {
                Node::Conflicted(json)
            } else {
                Node::Scalar(json)
            }
        }
        _ => Node::Scalar(value_json(doc, obj, prop)),
    }
}

fn describe(seg: &PathSegment) -> String {
    match seg {
        PathSegment::Key(k) => format!("key {k:?}"),
        PathSegment::Index(n) => format!("index {n}"),
    }
}

/// The object an op's last segment addresses, read-only.
enum Target<'a> {
    Map(&'a BTreeMap<String, Node>),
    List(&'a Vec<Node>),
    Text,
}

/// The same, to change.
enum Container<'a> {
    Map(&'a mut BTreeMap<String, Node>),
    List(&'a mut Vec<Node>),
}

/// What a checked op does.
enum Effect {
    /// Nothing (a `del` of a missing key).
    Nothing,
    /// Set the key or element.
    Set,
    /// Remove the key or element.
    Remove,
    /// Add to the counter there, creating it at 0 first when the key is missing.
    Inc,
    /// Insert at the index.
    Insert,
    /// Append to the list there, creating it when the key is missing.
    Push,
    /// Edit the text there, creating it when the key is missing.
    Splice,
}

/// Checks `op` against `target` with the rules and messages of `document::apply`.
fn check(target: &Target<'_>, op: &Op, last: &PathSegment) -> Result<Effect, String> {
    // `prop_of`: what the last segment may address.
    let prop = || -> Result<(), String> {
        match (target, last) {
            (Target::Map(_), PathSegment::Key(_)) | (Target::List(_), PathSegment::Index(_)) => {
                Ok(())
            }
            (Target::Text, _) => Err("cannot address inside a text".to_owned()),
            (Target::List(_), PathSegment::Key(k)) => {
                Err(format!("key {k:?} used on a list: expected an index"))
            }
            (Target::Map(_), PathSegment::Index(n)) => {
                Err(format!("index {n} used on a map: expected a key"))
            }
        }
    };
    let at = || -> Option<&Node> {
        match (target, last) {
            (Target::Map(m), PathSegment::Key(k)) => m.get(k),
            (Target::List(l), PathSegment::Index(n)) => l.get(*n),
            _ => None,
        }
    };
    let list_len = match target {
        Target::List(l) => l.len(),
        _ => 0,
    };
    match op {
        Op::Set { value, .. } => {
            prop()?;
            if let PathSegment::Index(n) = last
                && *n >= list_len
            {
                return Err(format!(
                    "index {n} is out of range for a list of {list_len}"
                ));
            }
            // Automerge makes no op for a put of the value a key already holds alone.
            if let Some(Node::Scalar(current)) = at()
                && current == value
                && !value.is_object()
                && !value.is_array()
            {
                return Ok(Effect::Nothing);
            }
            Ok(Effect::Set)
        }
        Op::Del { .. } => {
            prop()?;
            match last {
                PathSegment::Index(n) if *n >= list_len => Err(format!(
                    "index {n} is out of range for a list of {list_len}"
                )),
                PathSegment::Key(_) if at().is_none() => Ok(Effect::Nothing),
                _ => Ok(Effect::Remove),
            }
        }
        Op::Inc { by, .. } => {
            prop()?;
            let current = match (at(), last) {
                (None, PathSegment::Index(n)) => return Err(format!("index {n} is out of range")),
                (None, _) => 0,
                (Some(Node::Counter(c)), _) => *c,
                (Some(_), _) => {
                    return Err("inc needs a counter; the value there is not one (numbers written by set or PUT are plain numbers: create counters with inc)".to_owned());
                }
            };
            if current.checked_add(*by).is_none() {
                return Err(format!(
                    "inc by {by} would take the counter at {current} outside the 64-bit integer range"
                ));
            }
            Ok(Effect::Inc)
        }
        Op::Insert { .. } => {
            let PathSegment::Index(n) = last else {
                return Err("insert needs a path ending in a list index".to_owned());
            };
            let Target::List(_) = target else {
                return Err("insert needs a list".to_owned());
            };
            if *n > list_len {
                return Err(format!(
                    "index {n} is out of range for inserting into a list of {list_len}"
                ));
            }
            Ok(Effect::Insert)
        }
        Op::Push { .. } => {
            prop()?;
            match (at(), last) {
                (Some(Node::List(_)), _) => Ok(Effect::Push),
                (Some(_), _) => Err("push needs a list, the value there is not one".to_owned()),
                (None, PathSegment::Key(_)) => Ok(Effect::Push),
                (None, PathSegment::Index(_)) => {
                    Err("push needs a list, the index is out of range".to_owned())
                }
            }
        }
        Op::Splice {
            index,
            delete,
            text,
            ..
        } => {
            prop()?;
            let len = match (at(), last) {
                (Some(Node::Text(chars)), _) => chars.len(),
                (Some(_), _) => {
                    return Err("splice needs a text, the value there is not one".to_owned());
                }
                (None, PathSegment::Key(_)) => 0,
                (None, PathSegment::Index(_)) => {
                    return Err("splice needs a text, the index is out of range".to_owned());
                }
            };
            let end = index.checked_add(*delete);
            if *index > len || end.is_none_or(|end| end > len) {
                return Err(format!(
                    "splice of {delete} at {index} is out of range for a text of {len} characters"
                ));
            }
            if isize::try_from(*delete).is_err() {
                return Err("delete count too large".to_owned());
            }
            // Automerge makes no op for a splice of an existing text that deletes and inserts
            // nothing (a missing text is still created).
            if *delete == 0 && text.is_empty() && matches!(at(), Some(Node::Text(_))) {
                return Ok(Effect::Nothing);
            }
            Ok(Effect::Splice)
        }
    }
}

impl Effect {
    /// Makes the checked change.
    fn run(self, container: Container<'_>, op: &Op) {
        let last = op.path().split_last().1;
        match (container, last) {
            (Container::Map(m), PathSegment::Key(k)) => match (self, op) {
                (Effect::Set, Op::Set { value, .. }) => {
                    m.insert(k.clone(), Node::from_json(value));
                }
                (Effect::Remove, _) => {
                    m.remove(k);
                }
                (Effect::Inc, Op::Inc { by, .. }) => {
                    let counter = m.entry(k.clone()).or_insert(Node::Counter(0));
                    if let Node::Counter(c) = counter {
                        *c += by;
                    }
                }
                (Effect::Push, Op::Push { value, .. }) => {
                    let list = m.entry(k.clone()).or_insert_with(|| Node::List(Vec::new()));
                    if let Node::List(items) = list {
                        items.push(Node::from_json(value));
                    }
                }
                (
                    Effect::Splice,
                    Op::Splice {
                        index,
                        delete,
                        text,
                        ..
                    },
                ) => {
                    let node = m.entry(k.clone()).or_insert_with(|| Node::Text(Vec::new()));
                    if let Node::Text(chars) = node {
                        chars.splice(*index..index + delete, text.chars());
                    }
                }
                _ => {}
            },
            (Container::List(items), PathSegment::Index(n)) => match (self, op) {
                (Effect::Set, Op::Set { value, .. }) => items[*n] = Node::from_json(value),
                (Effect::Remove, _) => {
                    items.remove(*n);
                }
                (Effect::Inc, Op::Inc { by, .. }) => {
                    if let Node::Counter(c) = &mut items[*n] {
                        *c += by;
                    }
                }
                (Effect::Insert, Op::Insert { value, .. }) => {
                    items.insert(*n, Node::from_json(value));
                }
                (Effect::Push, Op::Push { value, .. }) => {
                    if let Node::List(inner) = &mut items[*n] {
                        inner.push(Node::from_json(value));
                    }
                }
                (
                    Effect::Splice,
                    Op::Splice {
                        index,
                        delete,
                        text,
                        ..
                    },
                ) => {
                    if let Node::Text(chars) = &mut items[*n] {
                        chars.splice(*index..index + delete, text.chars());
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use automerge::{ActorId, Automerge};
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::Write;
    use crate::document::{self, Expiry, new_document};

    fn parse(ops: &Json) -> Vec<Op> {
        Op::parse_list(ops).expect("valid ops")
    }

    /// Applies `ops` to both and checks they agree on the outcome and the state after it.
    fn both(doc: &mut Automerge, shadow: &mut Shadow, ops: &[Op], now_ms: i64) -> bool {
        let want = document::apply(doc, &Write::Ops(ops.to_vec()), Expiry::Keep, now_ms);
        let got = shadow.apply(ops, now_ms);
        match (&want, &got) {
            (Ok(applied), Ok(changed)) => {
                assert_eq!(
                    *changed,
                    applied.changed(),
                    "whether {ops:?} changed anything"
                );
            }
            (Err(w), Err(g)) => assert_eq!(g, w, "the same refusal for {ops:?}"),
            _ => panic!("automerge {want:?}, shadow {got:?} for {ops:?}"),
        }
        assert_eq!(shadow.to_json(), document::to_json(doc), "after {ops:?}");
        assert_eq!(*shadow, Shadow::of(doc), "types after {ops:?}");
        want.is_ok()
    }

    #[test]
    fn every_op_kind_and_refusal_matches_automerge() {
        let mut doc = new_document(ActorId::from(vec![1; 16]));
        let mut shadow = Shadow::of(&doc);
        let writes = json!([
            [{"op": "set", "path": ["a", "b", "c"], "value": {"x": [1, 2.5, "s", null, true]}}],
            [{"op": "inc", "path": ["n"], "by": 3}, {"op": "inc", "path": ["n"], "by": -1}],
            [{"op": "push", "path": ["l"], "value": 1}, {"op": "push", "path": ["l"], "value": {"k": 1}}],
            [{"op": "insert", "path": ["l", 0], "value": "first"}],
            [{"op": "insert", "path": ["new", 0], "value": "made a list"}],
            [{"op": "splice", "path": ["t"], "index": 0, "text": "héllo"}],
            [{"op": "splice", "path": ["t"], "index": 1, "delete": 2, "text": "EE"}],
            [{"op": "set", "path": ["l", 2, "k"], "value": 2}],
            [{"op": "inc", "path": ["l", 2, "c"], "by": 1}],
            [{"op": "del", "path": ["l", 0]}],
            [{"op": "del", "path": ["missing", "deep"]}],
            [{"op": "del", "path": ["a", "nope"]}],
            // Refusals: each leaves both unchanged.
            [{"op": "inc", "path": ["a"], "by": 1}],
            [{"op": "set", "path": ["n", "x"], "value": 1}],
            [{"op": "set", "path": ["l", 9], "value": 1}],
            [{"op": "del", "path": ["l", 9]}],
            [{"op": "insert", "path": ["l", 9], "value": 1}],
            [{"op": "insert", "path": ["a", 0], "value": 1}],
            [{"op": "insert", "path": ["t", 0], "value": 1}],
            [{"op": "push", "path": ["n"], "value": 1}],
            [{"op": "splice", "path": ["l"], "index": 0, "text": "x"}],
            [{"op": "splice", "path": ["t"], "index": 9, "text": "x"}],
            [{"op": "set", "path": ["t", 0], "value": 1}],
            [{"op": "set", "path": ["l", "k"], "value": 1}],
            [{"op": "set", "path": ["a", 0], "value": 1}],
            [{"op": "inc", "path": ["n"], "by": i64::MAX}],
            [{"op": "inc", "path": ["l", 7], "by": 1}],
            // A write whose second op fails leaves the first undone too.
            [{"op": "set", "path": ["fresh"], "value": 1}, {"op": "inc", "path": ["a"], "by": 1}],
            [{"op": "push", "path": ["z", "y"], "value": 1}, {"op": "splice", "path": ["z", "y"], "index": 0, "text": "x"}],
        ]);
        let mut refused = 0;
        for write in writes.as_array().expect("writes") {
            if !both(&mut doc, &mut shadow, &parse(write), 1_000) {
                refused += 1;
            }
        }
        assert_eq!(refused, 17, "every refusal above was refused");
        // A deleted document revives empty on the next write, in both.
        document::apply(&mut doc, &Write::Delete, Expiry::Keep, 2_000).expect("delete");
        let mut shadow = Shadow::of(&doc);
        assert!(shadow.lifecycle().deleted);
        assert!(both(
            &mut doc,
            &mut shadow,
            &parse(&json!([{"op": "inc", "path": ["n"]}])),
            3_000
        ));
        assert_eq!(shadow.to_json(), json!({"n": 1}));
        assert!(!shadow.lifecycle().deleted);
    }

    /// A random op over a small state space, valid or not.
    fn arb_op() -> impl Strategy<Value = Json> {
        let seg = prop_oneof![
            prop::sample::select(vec!["a", "b", "c"]).prop_map(Json::from),
            (0usize..3).prop_map(Json::from),
        ];
        let path = (
            prop::sample::select(vec!["a", "b", "c", "l", "t"]),
            prop::collection::vec(seg, 0..3),
        )
            .prop_map(|(first, rest)| {
                let mut p = vec![Json::from(first)];
                p.extend(rest);
                Json::Array(p)
            });
        let value = prop_oneof![
            any::<i8>().prop_map(Json::from),
            "[a-z]{0,2}".prop_map(Json::from),
            Just(json!({"k": 1})),
            Just(json!([1, {"m": [2]}])),
            Just(Json::Null),
        ];
        prop_oneof![
            (path.clone(), value.clone()).prop_map(|(p, v)| json!({"op": "set", "path": p, "value": v})),
            path.clone().prop_map(|p| json!({"op": "del", "path": p})),
            (path.clone(), -3i64..3).prop_map(|(p, by)| json!({"op": "inc", "path": p, "by": by})),
            (path.clone(), value.clone()).prop_map(|(p, v)| json!({"op": "insert", "path": p, "value": v})),
            (path.clone(), value).prop_map(|(p, v)| json!({"op": "push", "path": p, "value": v})),
            (path, 0usize..3, 0usize..2, "[a-zé]{0,2}").prop_map(
                |(p, i, d, t)| json!({"op": "splice", "path": p, "index": i, "delete": d, "text": t})
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random writes of one to three ops, valid or not, interleaved with exchanges between
        /// two replicas: the shadow kept by each write agrees with Automerge on every outcome,
        /// refusal message and value (types included), and with a shadow read afresh.
        #[test]
        fn shadows_agree_with_automerge(
            writes in prop::collection::vec((prop::collection::vec(arb_op(), 1..4), any::<bool>(), any::<bool>()), 1..24)
        ) {
            let mut a = new_document(ActorId::from(vec![1; 16]));
            let mut b = new_document(ActorId::from(vec![2; 16]));
            let mut sa = Shadow::of(&a);
            let mut sb = Shadow::of(&b);
            for (ops, on_b, exchange) in &writes {
                // Ops the parser refuses never reach a document.
                let Ok(ops) = Op::parse_list(&Json::Array(ops.clone())) else {
                    continue;
                };
                if *on_b {
                    both(&mut b, &mut sb, &ops, 1_000);
                } else {
                    both(&mut a, &mut sa, &ops, 1_000);
                }
                if *exchange {
                    a.merge(&mut b).expect("merge");
                    b.merge(&mut a).expect("merge");
                    sa = Shadow::of(&a);
                    sb = Shadow::of(&b);
                    prop_assert_eq!(&sa, &sb);
                }
            }
        }
    }
}
