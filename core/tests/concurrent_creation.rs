//! Replicas that create, fill, delete and re-create the same lists, maps, texts and counters
//! concurrently, in any interleaving, keep every write exactly once.
//!
//! A model tracks what each replica has seen (its causal past) and judges every write against
//! the deletes of its path (or of a parent, or of the whole document):
//! - a delete that saw the write removed it: it must be absent;
//! - a delete concurrent with the write may or may not have removed it (Automerge removes an
//!   object with everything written into it, also concurrently): present at most once;
//! - otherwise (every delete came before the write) it must be present exactly once. A list
//!   item appears once, a text token once, a map key with its value, and a counter reads the
//!   exact sum of its increments (plus a subset of the uncertain ones).

use std::collections::{BTreeSet, HashSet};

use automerge::{ActorId, Automerge};
use proptest::prelude::*;
use serde_json::{Value as Json, json};
use verge_core::document::{apply, new_document, to_json};
use verge_core::lineage;
use verge_core::{Expiry, Op, Write};

/// Where the ops go: each container both at the root and inside an implicitly created map.
const LISTS: [&[&str]; 2] = [&["l"], &["m", "l"]];
const COUNTERS: [&[&str]; 2] = [&["n"], &["m", "n"]];
const TEXTS: [&[&str]; 2] = [&["t"], &["m", "t"]];
/// Keys are set under `["s", "a"]`, two maps that do not exist until a `set` creates them.
const KEYED: &[&str] = &["s", "a"];
const DELETABLE: [&[&str]; 9] = [
    &["l"],
    &["n"],
    &["t"],
    &["m"],
    &["s"],
    &["s", "a"],
    &["m", "l"],
    &["m", "n"],
    &["m", "t"],
];

#[derive(Debug, Clone)]
enum OpSpec {
    Push(usize),
    Inc(usize, i64),
    Splice(usize),
    SetKey,
    Del(usize),
    DeleteDoc,
}

#[derive(Debug, Clone)]
enum Step {
    Write(usize, Vec<OpSpec>),
    Merge(usize, usize),
}

fn arb_op() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        6 => (0..LISTS.len()).prop_map(OpSpec::Push),
        6 => (0..COUNTERS.len(), 1i64..10).prop_map(|(p, by)| OpSpec::Inc(p, by)),
        4 => (0..TEXTS.len()).prop_map(OpSpec::Splice),
        4 => Just(OpSpec::SetKey),
        2 => (0..DELETABLE.len()).prop_map(OpSpec::Del),
        1 => Just(OpSpec::DeleteDoc),
    ]
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..5usize, prop::collection::vec(arb_op(), 1..4)).prop_map(|(r, ops)| Step::Write(r, ops)),
        2 => (0..5usize, 0..5usize).prop_map(|(a, b)| Step::Merge(a, b)),
    ]
}

/// What a write did, for the model.
#[derive(Debug)]
struct Effect {
    /// The path of the container it wrote into (for `SetKey`, the parent map).
    path: Vec<&'static str>,
    kind: EffectKind,
    /// Event ids this replica had seen when it wrote (its causal past).
    seen: HashSet<u64>,
    id: u64,
}

#[derive(Debug)]
enum EffectKind {
    Item(String),
    Inc(i64),
    Token(String),
    Key(String, String),
}

#[derive(Debug)]
struct Removal {
    /// The removed path; empty for a whole-document delete.
    path: Vec<&'static str>,
    seen: HashSet<u64>,
    id: u64,
}

struct Replica {
    doc: Automerge,
    seen: HashSet<u64>,
}

/// Whether `removal` ends what lives at `path`.
fn covers(removal: &[&str], path: &[&str]) -> bool {
    path.starts_with(removal)
}

enum Verdict {
    Present,
    Absent,
    Maybe,
}

fn verdict(effect: &Effect, removals: &[Removal]) -> Verdict {
    let mut maybe = false;
    for r in removals.iter().filter(|r| covers(&r.path, &effect.path)) {
        if r.seen.contains(&effect.id) {
            return Verdict::Absent;
        }
        if !effect.seen.contains(&r.id) {
            maybe = true;
        }
    }
    if maybe {
        Verdict::Maybe
    } else {
        Verdict::Present
    }
}

fn at<'a>(doc: &'a Json, path: &[&str]) -> Option<&'a Json> {
    path.iter().try_fold(doc, |v, k| v.get(*k))
}

/// Gives `to` what `from` has, as a sync would, keeping one incarnation (a document deleted and
/// written again starts a new one, see `verge_core::incarnation`).
fn deliver(from: &mut Automerge, to: &mut Automerge) {
    let local = lineage::Local::of(to);
    let before = to.get_heads();
    to.merge(from).expect("merge");
    let new = to.get_changes(&before);
    lineage::settle(to, &local, &new, lineage::Move::Carry).expect("settle");
}

fn ops(v: Json) -> Write {
    Write::Ops(Op::parse_list(&v).expect("valid ops"))
}

fn run(n: usize, steps: &[Step]) -> Result<(), TestCaseError> {
    let mut replicas: Vec<Replica> = (0..n)
        .map(|i| Replica {
            doc: new_document(ActorId::from(vec![i as u8 + 1; 16])),
            seen: HashSet::new(),
        })
        .collect();
    let mut effects: Vec<Effect> = Vec::new();
    let mut removals: Vec<Removal> = Vec::new();
    let mut next_id = 0u64;
    let mut now_ms = 1_000i64;
    for step in steps {
        now_ms += 1;
        match step {
            Step::Merge(a, b) => {
                let (a, b) = (a % n, b % n);
                if a == b {
                    continue;
                }
                let (from, to) = if a < b {
                    let (l, r) = replicas.split_at_mut(b);
                    (&mut l[a], &mut r[0])
                } else {
                    let (l, r) = replicas.split_at_mut(a);
                    (&mut r[0], &mut l[b])
                };
                deliver(&mut from.doc, &mut to.doc);
                to.seen.extend(from.seen.iter().copied());
            }
            Step::Write(r, specs) => {
                let r = &mut replicas[r % n];
                let mut json_ops = Vec::new();
                let mut pending_effects = Vec::new();
                let mut pending_removals = Vec::new();
                let mut delete_doc = false;
                for spec in specs {
                    next_id += 1;
                    let id = next_id;
                    let seen = r.seen.clone();
                    match spec {
                        OpSpec::Push(p) => {
                            let item = format!("x{id}");
                            json_ops.push(json!({"op": "push", "path": LISTS[*p], "value": item}));
                            pending_effects.push(Effect {
                                path: LISTS[*p].to_vec(),
                                kind: EffectKind::Item(item),
                                seen,
                                id,
                            });
                        }
                        OpSpec::Inc(p, by) => {
                            json_ops.push(json!({"op": "inc", "path": COUNTERS[*p], "by": by}));
                            pending_effects.push(Effect {
                                path: COUNTERS[*p].to_vec(),
                                kind: EffectKind::Inc(*by),
                                seen,
                                id,
                            });
                        }
                        OpSpec::Splice(p) => {
                            let token = format!("<{id}>");
                            json_ops.push(json!({"op": "splice", "path": TEXTS[*p], "index": 0, "text": token}));
                            pending_effects.push(Effect {
                                path: TEXTS[*p].to_vec(),
                                kind: EffectKind::Token(token),
                                seen,
                                id,
                            });
                        }
                        OpSpec::SetKey => {
                            let (key, value) = (format!("k{id}"), format!("v{id}"));
                            let mut path: Vec<&str> = KEYED.to_vec();
                            path.push(&key);
                            json_ops.push(json!({"op": "set", "path": path, "value": value}));
                            pending_effects.push(Effect {
                                path: KEYED.to_vec(),
                                kind: EffectKind::Key(key, value),
                                seen,
                                id,
                            });
                        }
                        OpSpec::Del(p) => {
                            json_ops.push(json!({"op": "del", "path": DELETABLE[*p]}));
                            pending_removals.push(Removal {
                                path: DELETABLE[*p].to_vec(),
                                seen,
                                id,
                            });
                        }
                        OpSpec::DeleteDoc => {
                            delete_doc = true;
                            pending_removals.push(Removal {
                                path: Vec::new(),
                                seen,
                                id,
                            });
                        }
                    }
                    // Later ops of the same write see this one.
                    r.seen.insert(id);
                }
                if delete_doc {
                    // A document delete is a write of its own; the ops before it come first.
                    let before = json_ops.len();
                    if before > 0 {
                        apply(
                            &mut r.doc,
                            &ops(Json::Array(json_ops.clone())),
                            Expiry::Keep,
                            now_ms,
                        )
                        .map_err(|e| TestCaseError::fail(format!("write failed: {e}")))?;
                    }
                    apply(&mut r.doc, &Write::Delete, Expiry::Keep, now_ms)
                        .map_err(|e| TestCaseError::fail(format!("delete failed: {e}")))?;
                    // Ops listed after a document delete in the spec are dropped from the model
                    // and the write alike: only what was applied counts.
                    let delete_id = pending_removals
                        .iter()
                        .find(|r| r.path.is_empty())
                        .map(|r| r.id)
                        .unwrap_or(0);
                    pending_effects.retain(|e| e.id < delete_id);
                    pending_removals.retain(|r| r.id <= delete_id);
                    for id in (delete_id + 1)..=next_id {
                        r.seen.remove(&id);
                    }
                } else {
                    apply(
                        &mut r.doc,
                        &ops(Json::Array(json_ops)),
                        Expiry::Keep,
                        now_ms,
                    )
                    .map_err(|e| TestCaseError::fail(format!("write failed: {e}")))?;
                }
                effects.extend(pending_effects);
                removals.extend(pending_removals);
            }
        }
    }
    // Everyone hears from everyone.
    for _ in 0..2 {
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    let mut other = replicas[b].doc.fork();
                    deliver(&mut other, &mut replicas[a].doc);
                }
            }
        }
    }
    let first = to_json(&replicas[0].doc);
    for r in &replicas[1..] {
        prop_assert_eq!(r.doc.get_heads(), replicas[0].doc.get_heads());
        prop_assert_eq!(&to_json(&r.doc), &first);
    }
    check(&first, &effects, &removals)
}

fn check(doc: &Json, effects: &[Effect], removals: &[Removal]) -> Result<(), TestCaseError> {
    // Counters: the exact sum of the sure increments plus some subset of the uncertain ones.
    for path in COUNTERS {
        let value = at(doc, path).map_or(Some(0), Json::as_i64);
        let Some(value) = value else {
            return Err(TestCaseError::fail(format!(
                "{path:?} is not a number in {doc}"
            )));
        };
        let mut sure = 0i64;
        let mut sums = BTreeSet::from([0i64]);
        for e in effects.iter().filter(|e| e.path == *path) {
            let EffectKind::Inc(by) = e.kind else {
                continue;
            };
            match verdict(e, removals) {
                Verdict::Present => sure += by,
                Verdict::Absent => {}
                Verdict::Maybe => {
                    let more: Vec<i64> = sums.iter().map(|s| s + by).collect();
                    sums.extend(more);
                }
            }
        }
        prop_assert!(
            sums.contains(&(value - sure)),
            "counter {:?} reads {} but the sure increments sum to {} and the uncertain ones can add {:?}",
            path,
            value,
            sure,
            sums
        );
    }
    for e in effects {
        let expect = verdict(e, removals);
        let count = match &e.kind {
            EffectKind::Inc(_) => continue,
            EffectKind::Item(item) => at(doc, &e.path)
                .and_then(Json::as_array)
                .map_or(0, |l| l.iter().filter(|v| v.as_str() == Some(item)).count()),
            EffectKind::Token(token) => at(doc, &e.path)
                .and_then(Json::as_str)
                .map_or(0, |t| t.matches(token.as_str()).count()),
            EffectKind::Key(key, value) => {
                let got = at(doc, &e.path).and_then(|m| m.get(key));
                match got {
                    Some(v) if v.as_str() == Some(value) => 1,
                    Some(other) => {
                        return Err(TestCaseError::fail(format!(
                            "{key} holds {other}, not {value}"
                        )));
                    }
                    None => 0,
                }
            }
        };
        match expect {
            Verdict::Present => {
                prop_assert_eq!(count, 1, "{:?} must be present once in {}", e, doc)
            }
            Verdict::Absent => prop_assert_eq!(
                count,
                0,
                "{:?} was deleted by a delete that saw it: {}",
                e,
                doc
            ),
            Verdict::Maybe => {
                prop_assert!(count <= 1, "{:?} appears {} times in {}", e, count, doc)
            }
        }
    }
    Ok(())
}

proptest! {
    // 256 cases by default; PROPTEST_CASES raises it for a longer search.
    #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)))]

    #[test]
    fn concurrent_creation_keeps_every_write_once(
        n in 2usize..=5,
        steps in prop::collection::vec(arb_step(), 1..40),
    ) {
        run(n, &steps)?;
    }
}

/// The first measurement in miniature: three replicas each write ten times to a document
/// none of them has, then merge.
#[test]
fn three_replicas_creating_the_same_document_keep_all_thirty_writes() {
    let mut replicas: Vec<Automerge> = (0..3)
        .map(|i| new_document(ActorId::from(vec![i as u8 + 1; 16])))
        .collect();
    for (r, doc) in replicas.iter_mut().enumerate() {
        for i in 0..10 {
            let w = ops(json!([
                {"op": "push", "path": ["log"], "value": format!("{r}-{i}")},
                {"op": "inc", "path": ["n"]},
                {"op": "set", "path": ["by", format!("node{r}"), format!("{i}")], "value": i},
                {"op": "splice", "path": ["t"], "index": 0, "text": format!("<{r}.{i}>")},
            ]));
            apply(doc, &w, Expiry::Keep, 1_000).expect("write");
        }
    }
    let (a, rest) = replicas.split_at_mut(1);
    for other in rest {
        a[0].merge(other).expect("merge");
    }
    let doc = to_json(&a[0]);
    assert_eq!(doc["log"].as_array().expect("list").len(), 30, "{doc}");
    assert_eq!(doc["n"], json!(30));
    for r in 0..3 {
        assert_eq!(
            doc["by"][format!("node{r}")]
                .as_object()
                .expect("map")
                .len(),
            10
        );
    }
    let text = doc["t"].as_str().expect("text");
    assert_eq!(text.matches('<').count(), 30, "{text}");
}
