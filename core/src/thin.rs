//! Thin replicas: a client that holds the JSON state and its own ops, and lets the node build
//! the Automerge changes.
//!
//! A full replica pays Automerge's cost for every write it makes: in Wasm, tens of microseconds
//! an op before it can sync. An edge request that makes a few dozen writes spends milliseconds
//! there. A thin replica keeps only a [`Shadow`] (reads and writes at the cost of a map lookup)
//! and the ops it made since the heads it last read (its *base*). A [`Push`] sends them; the node
//! makes them on a copy of the document at exactly that base ([`build`]) and takes the
//! resulting changes as it takes a full replica's.
//!
//! # Why a push is exactly once
//! The changes [`build`] makes follow from the push alone: the history at its base (the same on
//! every node that holds it), the actors, the ops and their times. Automerge numbers an actor's
//! changes and ops from that history, and stamps the given time. So the same push, sent again
//! after a lost answer, to this node or any other, makes changes with the same hashes, which a
//! document holds once. A replica therefore never changes a batch once it has sent it: later
//! writes are appended as new batches, and a push always resends the whole list since its base.
//!
//! # Groups
//! Ops are made in groups, each as one actor. A replica normally has one group. A replica
//! loaded from another's `save()` holds the saver's unsent batches as the saver's group, which
//! it must send unchanged (the saver, or another copy of the save, may send them too), and
//! writes its own ops as a group of its own actor after them.

use automerge::{ActorId, Automerge, ChangeHash};
use serde_json::{Map, Value as Json};

use crate::document::{self, ApplyError, Expiry, Lifecycle, Write};
use crate::heads::{heads_from_hex, heads_to_hex};
use crate::lineage::{self, Lineage};
use crate::ops::{Op, OpError};
use crate::shadow::Shadow;

/// Most groups (actors) in one push.
pub const THIN_GROUPS_MAX: usize = 16;
/// Most batches (changes a replica made locally) in one push.
pub const THIN_BATCHES_MAX: usize = 1000;
/// Most ops in one push, across its batches; each batch holds at most
/// [`crate::limits::OPS_PER_WRITE_MAX`].
pub const THIN_OPS_MAX: usize = 10_000;
/// Most heads in a push's base.
pub const THIN_BASE_HEADS_MAX: usize = crate::limits::WIRE_REPORT_HEADS_MAX;

/// The writes of one local `apply`: one change.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// When they were made, milliseconds since the Unix epoch (the change's time).
    pub at_ms: i64,
    /// The ops, in order.
    pub ops: Vec<Op>,
}

/// Batches made as one actor.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The actor the replica chose; the changes are made as its writer actor for the
    /// document's lineage ([`lineage::writer_actor`]), as a full replica's would be.
    pub actor: ActorId,
    /// In the order they were made.
    pub batches: Vec<Batch>,
}

/// What a thin replica sends: its writes since `base`. A push with no groups asks for the
/// state only.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// The heads of the state the writes were made on; empty for a replica that never read.
    pub base: Vec<ChangeHash>,
    /// The history `base` is in, as the node's answer named it; `None` when unknown. A node
    /// that holds `base` nowhere tells by it whether the replica is behind (its generation was
    /// compacted away, or the document replaced: the replica starts over) or ahead (the node
    /// has not caught up yet: a retry or another node will do).
    pub lineage: Option<Lineage>,
    /// The writes, in order.
    pub groups: Vec<Group>,
}

/// The node's answer to a [`Push`].
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The document's heads, which hold the pushed writes: the replica's next base.
    pub heads: Vec<ChangeHash>,
    /// The history `heads` are in: the replica's next [`Push::lineage`].
    pub lineage: Lineage,
    /// The state at `heads`, present unless it is exactly the base with the pushed writes made
    /// on it (which the replica already shows).
    pub state: Option<Shadow>,
}

/// Why a push or an answer could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Not JSON, or not the expected shape.
    #[error("{0}")]
    Malformed(String),
    /// Over one of this module's bounds.
    #[error("{0}")]
    TooLarge(String),
    /// An op is malformed.
    #[error(transparent)]
    Op(#[from] OpError),
}

/// Why [`build`] could not make a push's writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// An op does not fit the document at the base.
    #[error("groups[{group}].batches[{batch}]: {error}")]
    NotApplicable {
        /// Which group.
        group: usize,
        /// Which batch of it.
        batch: usize,
        /// Why.
        error: ApplyError,
    },
    /// The document is deleted or expired where the batch was made; a thin replica does not
    /// start a new incarnation (a `PUT`, or a full replica, does).
    #[error("groups[{group}].batches[{batch}]: the document is deleted or expired there")]
    NotLive {
        /// Which group.
        group: usize,
        /// Which batch of it.
        batch: usize,
    },
}

impl Batch {
    /// The batch as JSON: `{"at": ms, "ops": [...]}`.
    pub fn to_json(&self) -> Json {
        let mut batch = Map::new();
        batch.insert("at".into(), Json::from(self.at_ms));
        batch.insert(
            "ops".into(),
            Json::Array(self.ops.iter().map(Op::to_json).collect()),
        );
        Json::Object(batch)
    }

    /// Reads [`Batch::to_json`]'s form; `at` names the batch in errors. Its ops are bounded by
    /// [`crate::limits::OPS_PER_WRITE_MAX`]; a list of batches is the caller's to bound.
    pub fn from_json(json: &Json, at: &str) -> Result<Batch, WireError> {
        let at_ms = json
            .get("at")
            .and_then(Json::as_i64)
            .ok_or_else(|| WireError::Malformed(format!("{at}.at is not an integer")))?;
        let ops =
            Op::parse_list(json.get("ops").unwrap_or(&Json::Null)).map_err(|e| e.within(at))?;
        Ok(Batch { at_ms, ops })
    }
}

impl Push {
    /// All ops in the push.
    pub fn op_count(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| &g.batches)
            .map(|b| b.ops.len())
            .sum()
    }

    /// The push as JSON: `{"base": [hex], "lineage": {"incarnation": n, "generation": n},
    /// "groups": [{"actor": hex, "batches": [{"at": ms, "ops": [...]}]}]}` (`lineage` absent
    /// when unknown).
    pub fn to_json(&self) -> Json {
        push_json(&self.base, self.lineage, &self.groups)
    }

    /// Reads [`Push::to_json`]'s form, within this module's bounds.
    pub fn from_json(json: &Json) -> Result<Push, WireError> {
        let malformed = |m: &str| WireError::Malformed(m.to_owned());
        let base = heads(json.get("base"), "base")?;
        let lineage = match json.get("lineage") {
            None | Some(Json::Null) => None,
            Some(l) => Some(lineage_from_json(l, "lineage")?),
        };
        let Some(Json::Array(groups)) = json.get("groups") else {
            return Err(malformed("\"groups\" is missing or not an array"));
        };
        if groups.len() > THIN_GROUPS_MAX {
            return Err(WireError::TooLarge(format!(
                "{} groups, more than {THIN_GROUPS_MAX}",
                groups.len()
            )));
        }
        let (mut batches_seen, mut ops_seen) = (0usize, 0usize);
        let mut out = Vec::with_capacity(groups.len());
        for (g, group) in groups.iter().enumerate() {
            let actor = match group.get("actor") {
                Some(Json::String(hex)) if !hex.is_empty() && hex.len() <= 64 => {
                    ActorId::try_from(hex.as_str()).map_err(|_| {
                        WireError::Malformed(format!("groups[{g}].actor is not hex"))
                    })?
                }
                _ => {
                    return Err(WireError::Malformed(format!(
                        "groups[{g}].actor is missing or not 1 to 32 bytes of hex"
                    )));
                }
            };
            let Some(Json::Array(batches)) = group.get("batches") else {
                return Err(WireError::Malformed(format!(
                    "groups[{g}].batches is missing or not an array"
                )));
            };
            batches_seen += batches.len();
            if batches_seen > THIN_BATCHES_MAX {
                return Err(WireError::TooLarge(format!(
                    "more than {THIN_BATCHES_MAX} batches"
                )));
            }
            let mut parsed = Vec::with_capacity(batches.len());
            for (b, batch) in batches.iter().enumerate() {
                let batch = Batch::from_json(batch, &format!("groups[{g}].batches[{b}]"))?;
                ops_seen += batch.ops.len();
                if ops_seen > THIN_OPS_MAX {
                    return Err(WireError::TooLarge(format!("more than {THIN_OPS_MAX} ops")));
                }
                parsed.push(batch);
            }
            out.push(Group {
                actor,
                batches: parsed,
            });
        }
        Ok(Push {
            base,
            lineage,
            groups: out,
        })
    }
}

/// [`Push::to_json`] of a push made of these parts, without assembling one. Empty groups are
/// left out.
pub fn push_json(base: &[ChangeHash], lineage: Option<Lineage>, groups: &[Group]) -> Json {
    let groups = groups
        .iter()
        .filter(|g| !g.batches.is_empty())
        .map(|g| {
            let batches = g.batches.iter().map(Batch::to_json).collect();
            let mut group = Map::new();
            group.insert("actor".into(), Json::String(g.actor.to_hex_string()));
            group.insert("batches".into(), Json::Array(batches));
            Json::Object(group)
        })
        .collect();
    let mut out = Map::new();
    out.insert("base".into(), Json::from(heads_to_hex(base)));
    if let Some(lineage) = lineage {
        out.insert("lineage".into(), lineage_json(lineage));
    }
    out.insert("groups".into(), Json::Array(groups));
    Json::Object(out)
}

fn lineage_json(lineage: Lineage) -> Json {
    let mut out = Map::new();
    out.insert("incarnation".into(), Json::from(lineage.incarnation));
    out.insert("generation".into(), Json::from(lineage.generation));
    Json::Object(out)
}

fn lineage_from_json(json: &Json, field: &str) -> Result<Lineage, WireError> {
    let number = |key: &str| {
        json.get(key).and_then(Json::as_u64).ok_or_else(|| {
            WireError::Malformed(format!(
                "\"{field}\".{key} is missing or not a whole number"
            ))
        })
    };
    Ok(Lineage {
        incarnation: number("incarnation")?,
        generation: number("generation")?,
    })
}

impl Answer {
    /// The answer as JSON: `{"heads": [hex], "lineage": {...}, "state": ...}` (`state` in
    /// [`Shadow::to_wire`]'s form, absent when not needed).
    pub fn to_json(&self) -> Json {
        let mut out = Map::new();
        out.insert("heads".into(), Json::from(heads_to_hex(&self.heads)));
        out.insert("lineage".into(), lineage_json(self.lineage));
        if let Some(state) = &self.state {
            out.insert("state".into(), state.to_wire());
        }
        Json::Object(out)
    }

    /// Reads [`Answer::to_json`]'s form.
    pub fn from_json(json: &Json) -> Result<Answer, WireError> {
        let heads = heads(json.get("heads"), "heads")?;
        let lineage = lineage_from_json(json.get("lineage").unwrap_or(&Json::Null), "lineage")?;
        let state = match json.get("state") {
            None | Some(Json::Null) => None,
            Some(state) => Some(Shadow::from_wire(state).map_err(WireError::Malformed)?),
        };
        Ok(Answer {
            heads,
            lineage,
            state,
        })
    }
}

fn heads(json: Option<&Json>, field: &str) -> Result<Vec<ChangeHash>, WireError> {
    let Some(Json::Array(items)) = json else {
        return Err(WireError::Malformed(format!(
            "\"{field}\" is missing or not an array"
        )));
    };
    if items.len() > THIN_BASE_HEADS_MAX {
        return Err(WireError::TooLarge(format!(
            "\"{field}\" has more than {THIN_BASE_HEADS_MAX} heads"
        )));
    }
    let hex: Option<Vec<&str>> = items.iter().map(Json::as_str).collect();
    hex.as_deref()
        .and_then(heads_from_hex)
        .ok_or_else(|| WireError::Malformed(format!("\"{field}\" holds a head that is not hex")))
}

/// Makes `push`'s writes on `doc`, which holds exactly the history up to the push's base (a
/// copy of the document at those heads), as [`crate::document::apply`] makes a write: each
/// batch one change (after the implicit creations it needs) as its group's writer actor,
/// stamped with the batch's time. The same push on the same history makes the same changes.
/// On error `doc` may hold some of the batches; the caller drops it.
pub fn build(doc: &mut Automerge, push: &Push) -> Result<(), BuildError> {
    for (group, g) in push.groups.iter().enumerate() {
        for (batch, b) in g.batches.iter().enumerate() {
            if !doc.get_heads().is_empty() && !Lifecycle::of(doc).live(b.at_ms) {
                return Err(BuildError::NotLive { group, batch });
            }
            doc.set_actor(lineage::writer_actor(&g.actor, Lineage::of(doc)));
            let applied = document::apply(doc, &Write::Ops(b.ops.clone()), Expiry::Keep, b.at_ms)
                .map_err(|error| BuildError::NotApplicable {
                group,
                batch,
                error,
            })?;
            // A live document is written in place: apply revives only what is not live.
            debug_assert!(!applied.replaced);
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use automerge::ReadDoc;
    use serde_json::json;

    fn ops(v: Json) -> Vec<Op> {
        Op::parse_list(&v).unwrap()
    }

    fn push(base: Vec<ChangeHash>, actor: u8, batches: Vec<(i64, Json)>) -> Push {
        Push {
            base,
            lineage: None,
            groups: vec![Group {
                actor: ActorId::from([actor; 16]),
                batches: batches
                    .into_iter()
                    .map(|(at_ms, v)| Batch { at_ms, ops: ops(v) })
                    .collect(),
            }],
        }
    }

    fn seeded() -> Automerge {
        let mut doc = Automerge::new();
        doc.set_actor(ActorId::from([9u8; 16]));
        let w = Write::Ops(ops(json!([
            {"op": "set", "path": ["title"], "value": "cart"},
            {"op": "inc", "path": ["items", "a"], "by": 1}
        ])));
        document::apply(&mut doc, &w, Expiry::Keep, 1).unwrap();
        doc
    }

    #[test]
    fn a_push_makes_the_same_changes_on_any_copy_of_its_base() {
        let base_doc = seeded();
        let base = base_doc.get_heads();
        let p = push(
            base.clone(),
            1,
            vec![
                (10, json!([{"op": "inc", "path": ["items", "a"], "by": 2}])),
                (
                    11,
                    json!([{"op": "push", "path": ["log"], "value": {"n": 1}},
                           {"op": "set", "path": ["title"], "value": "mine"}]),
                ),
            ],
        );
        // One node has moved on with another writer's change; another is at the base.
        let mut ahead = base_doc.clone();
        ahead.set_actor(ActorId::from([7u8; 16]));
        let w = Write::Ops(ops(
            json!([{"op": "set", "path": ["title"], "value": "theirs"}]),
        ));
        document::apply(&mut ahead, &w, Expiry::Keep, 5).unwrap();

        let mut at_base = base_doc.clone();
        build(&mut at_base, &p).unwrap();
        let mut forked = ahead.fork_at(&base).unwrap();
        build(&mut forked, &p).unwrap();
        let made = |d: &Automerge| -> Vec<ChangeHash> {
            d.get_changes(&base).iter().map(|c| c.hash()).collect()
        };
        assert_eq!(made(&at_base), made(&forked));
        assert!(made(&at_base).len() >= 2);

        // Applied to the node that moved on, twice (a retry), the writes count once.
        let changes = at_base.get_changes(&base);
        ahead.apply_changes(changes.clone()).unwrap();
        ahead.apply_changes(changes).unwrap();
        let json = document::to_json(&ahead);
        assert_eq!(json["items"]["a"], json!(3));
        assert_eq!(json["log"], json!([{"n": 1}]));
    }

    #[test]
    fn the_shadow_shows_what_the_build_makes() {
        let base_doc = seeded();
        let p = push(
            base_doc.get_heads(),
            2,
            vec![(
                20,
                json!([{"op": "inc", "path": ["items", "b"], "by": 5},
                       {"op": "splice", "path": ["note"], "index": 0, "delete": 0, "text": "hi"}]),
            )],
        );
        let mut shadow = Shadow::of(&base_doc);
        for b in &p.groups[0].batches {
            shadow.apply(&b.ops, b.at_ms).unwrap();
        }
        let mut doc = base_doc.clone();
        build(&mut doc, &p).unwrap();
        assert_eq!(Shadow::of(&doc), shadow);
    }

    #[test]
    fn an_op_that_does_not_fit_names_its_batch() {
        let base_doc = seeded();
        let p = push(
            base_doc.get_heads(),
            3,
            vec![
                (1, json!([{"op": "inc", "path": ["items", "a"], "by": 1}])),
                (2, json!([{"op": "inc", "path": ["title"], "by": 1}])),
            ],
        );
        let mut doc = base_doc.clone();
        let err = build(&mut doc, &p).unwrap_err();
        assert!(
            matches!(
                err,
                BuildError::NotApplicable {
                    group: 0,
                    batch: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn push_and_answer_round_trip_and_bounds_hold() {
        let base_doc = seeded();
        let p = push(
            base_doc.get_heads(),
            4,
            vec![(
                7,
                json!([{"op": "set", "path": ["x"], "value": [1, {"y": null}]}]),
            )],
        );
        assert_eq!(Push::from_json(&p.to_json()).unwrap(), p);
        let lineage = Lineage {
            incarnation: 2,
            generation: u64::MAX,
        };
        let with_lineage = Push {
            lineage: Some(lineage),
            ..p.clone()
        };
        assert_eq!(
            Push::from_json(&with_lineage.to_json()).unwrap(),
            with_lineage
        );
        let a = Answer {
            heads: base_doc.get_heads(),
            lineage,
            state: Some(Shadow::of(&base_doc)),
        };
        assert_eq!(Answer::from_json(&a.to_json()).unwrap(), a);
        for bad in [
            json!({"generation": 1}),
            json!({"incarnation": -1, "generation": 1}),
            json!([0, 1]),
        ] {
            let mut j = p.to_json();
            j["lineage"] = bad.clone();
            assert!(
                matches!(Push::from_json(&j), Err(WireError::Malformed(_))),
                "{bad}"
            );
        }
        // An answer names its lineage.
        assert!(Answer::from_json(&json!({"heads": []})).is_err());

        let mut many = p.to_json();
        many["groups"] = Json::Array(vec![many["groups"][0].clone(); THIN_GROUPS_MAX + 1]);
        assert!(matches!(
            Push::from_json(&many),
            Err(WireError::TooLarge(_))
        ));
        let mut bad = p.to_json();
        bad["groups"][0]["actor"] = json!("not hex");
        assert!(matches!(
            Push::from_json(&bad),
            Err(WireError::Malformed(_))
        ));
        let mut bad = p.to_json();
        bad["base"] = json!(["00"]);
        assert!(matches!(
            Push::from_json(&bad),
            Err(WireError::Malformed(_))
        ));
        assert!(
            Answer::from_json(&json!({
                "heads": [],
                "lineage": {"incarnation": 0, "generation": 0},
                "state": {"root": {"k": {"q": 1}}}
            }))
            .is_err()
        );
    }

    #[test]
    fn a_deleted_document_is_not_revived() {
        let mut base_doc = seeded();
        document::apply(&mut base_doc, &Write::Delete, Expiry::Keep, 3).unwrap();
        let p = push(
            base_doc.get_heads(),
            5,
            vec![(9, json!([{"op": "set", "path": ["k"], "value": 1}]))],
        );
        let mut doc = base_doc.clone();
        assert_eq!(
            build(&mut doc, &p),
            Err(BuildError::NotLive { group: 0, batch: 0 })
        );
        assert!(doc.get(automerge::ROOT, "k").unwrap().is_none());
    }
}
