//! The checker: once faults have healed, waits for the cluster to agree, then holds the final
//! state against what the clients were told.
//!
//! Invariants:
//! - every replica lists the same documents with the same heads and the same JSON;
//! - every acknowledged write is visible: a client's own key holds its last acknowledged value
//!   (or what a later write with an unknown outcome left), every acknowledged list item and
//!   text token is present exactly once, and nothing appears that no client wrote;
//! - every counter equals the sum of its acknowledged increments, plus at most the increments
//!   whose outcome is unknown;
//! - no task panicked.
//!
//! In the racing workload (nothing created in advance, containers created concurrently by
//! every node) the same hold, with what that mode adds and allows: every acknowledged entry
//! `["by", node, key]` holds its value; a missing counter reads 0; a document no write reached
//! is absent everywhere, which is agreement; and the writes under a container that was deleted
//! in a document may have been lost with it ([`Expectations::may_be_lost`]), though they still
//! must not appear twice or push a counter above its increments.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::api::NodeApi;
use crate::lock;
use crate::revival::{self, Cycle, End, Plan, VISIBLE_WITHIN};
use crate::workload::{
    COUNTER, Creation, ENTRIES, Expectations, History, LOG, Outcome, TEXT, Write, WriteOp,
    expectations,
};

/// One node's view of one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocView {
    /// Its heads, sorted.
    pub heads: Vec<String>,
    /// Its generation (`docs/compaction.md`): replicas that agree are in the same one.
    pub generation: u64,
    /// Its JSON.
    pub doc: Value,
}

impl DocView {
    /// The view of a document the node does not hold (it answered 404): no heads, no JSON.
    /// Nodes that all answer so agree: a document no write reached exists nowhere.
    pub fn absent() -> Self {
        Self {
            heads: Vec::new(),
            generation: 0,
            doc: Value::Null,
        }
    }

    /// Whether the node does not hold the document.
    pub fn is_absent(&self) -> bool {
        self.heads.is_empty() && self.doc.is_null()
    }
}

/// What every node answered for every document, once they agreed (or when time ran out).
#[derive(Debug, Default, Clone)]
pub struct FinalState {
    /// Per node, per document id: its view, `None` when the node did not answer.
    pub nodes: Vec<BTreeMap<String, Option<DocView>>>,
    /// Whether all nodes agreed before the timeout.
    pub converged: bool,
    /// Simulated time the agreement took after the faults healed.
    pub took: Duration,
    /// The node each entry of `nodes` is (empty: `nodes[i]` is node `i`); departed nodes are
    /// left out.
    pub hosts: Vec<usize>,
}

impl FinalState {
    /// The node index of entry `k` of [`Self::nodes`].
    pub fn host(&self, k: usize) -> usize {
        self.hosts.get(k).copied().unwrap_or(k)
    }
}

/// Shared slot the converging client fills.
pub type SharedFinal = Arc<Mutex<FinalState>>;

/// A node's view of document `id`, or `None` when the node did not answer it.
async fn view(node: &NodeApi, id: &str) -> Option<DocView> {
    let answer = node.get(id).await.ok()?;
    if answer.status == hyper::StatusCode::NOT_FOUND {
        return Some(DocView::absent());
    }
    if !answer.status.is_success() {
        return None;
    }
    let json = answer.json();
    let mut heads: Vec<String> = json
        .get("heads")?
        .as_array()?
        .iter()
        .filter_map(|h| h.as_str().map(str::to_owned))
        .collect();
    heads.sort();
    Some(DocView {
        heads,
        generation: json.get("generation").and_then(Value::as_u64).unwrap_or(0),
        doc: json.get("doc").cloned().unwrap_or(Value::Null),
    })
}

/// The ids a node lists under `prefix`, or `None` when it does not answer.
async fn listed(node: &NodeApi, prefix: &str) -> Option<Vec<String>> {
    let answer = node.list(prefix, 1000).await.ok()?;
    if !answer.status.is_success() {
        return None;
    }
    let mut ids: Vec<String> = answer
        .json()
        .get("docs")?
        .as_array()?
        .iter()
        .filter_map(|d| d.get("id")?.as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Some(ids)
}

/// Polls every node until all hold documents `ids` with equal views (and list the same
/// documents under `prefix`), or `timeout` passes; leaves the last views in `out`. Runs as a
/// client inside the simulation.
pub async fn converge(
    nodes: Vec<NodeApi>,
    ids: Vec<String>,
    prefix: String,
    timeout: Duration,
    out: SharedFinal,
) {
    let started = crate::now();
    loop {
        let mut views = Vec::with_capacity(nodes.len());
        let mut lists = Vec::with_capacity(nodes.len());
        for node in &nodes {
            let mut per_doc = BTreeMap::new();
            for id in &ids {
                per_doc.insert(id.clone(), view(node, id).await);
            }
            views.push(per_doc);
            lists.push(listed(node, &prefix).await);
        }
        let agreed = views
            .iter()
            .all(|v| v.values().all(Option::is_some) && *v == views[0])
            && lists.iter().all(|l| l.is_some() && *l == lists[0]);
        let took = crate::now().saturating_sub(started);
        if agreed || took >= timeout {
            *lock(&out) = FinalState {
                nodes: views,
                converged: agreed,
                took,
                hosts: Vec::new(),
            };
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Checks the final state of documents `0..docs` of a `creation` workload against the history;
/// returns the violations found.
pub fn verify(
    state: &FinalState,
    history: &History,
    docs: usize,
    creation: Creation,
) -> Vec<Violation> {
    let mut out = Vec::new();
    if !state.converged {
        return divergence(state);
    }
    let Some(reference) = state.nodes.first() else {
        return out;
    };
    for (i, exp) in expectations(history, docs).iter().enumerate() {
        let id = creation.doc_id(i);
        match reference.get(&id).and_then(Option::as_ref) {
            // Created upfront, a document must exist; created by the clients, one no write
            // reached is absent and holds nothing, as an empty one does.
            Some(view) if creation.creates_containers() || !view.is_absent() => {
                check_doc(&id, &view.doc, exp, creation, &mut out)
            }
            _ => out.push(Violation {
                doc: Some(id.clone()),
                what: "document missing".into(),
                needles: vec![id],
            }),
        }
    }
    out
}

/// What each node holds of each document, when they did not agree.
fn divergence(state: &FinalState) -> Vec<Violation> {
    let mut out = Vec::new();
    for (id, _) in state.nodes.first().into_iter().flatten() {
        let views: Vec<String> = state
            .nodes
            .iter()
            .enumerate()
            .map(|(k, n)| (state.host(k), n))
            .map(|(i, n)| match n.get(id).and_then(Option::as_ref) {
                Some(v) if v.is_absent() => format!("n{i} absent"),
                Some(v) => format!("n{i} heads={:?}", v.heads),
                None => format!("n{i} no answer"),
            })
            .collect();
        out.push(Violation {
            doc: Some(id.clone()),
            what: format!(
                "replicas did not converge within {:?}: {}",
                state.took,
                views.join("; ")
            ),
            needles: vec![id.clone()],
        });
    }
    out
}

/// Checks a revival workload ([`crate::revival`]) that ran `plan`: the final state, and, when
/// `live` (a run without faults), every read made during the cycles.
///
/// At the end every document holds exactly its last cycle: every acknowledged write of that
/// cycle once (list items and text tokens once, entries with their values, the counter within
/// its acknowledged and unknown increments), nothing of an earlier cycle, and it reads 200 when
/// any of those writes was acknowledged.
///
/// During the run (`live`): every read of a document in cycle `c` made while it is live on
/// every clock (and before its delete) holds only writes of cycle `c`, and every write of
/// cycle `c` acknowledged at least [`VISIBLE_WITHIN`] before the read; a 404 is a violation as
/// soon as one such write exists (a revival that reached a node late). A cycle after a delete
/// that was not acknowledged is left out: its writes may have landed before the delete.
pub fn verify_revival(
    state: &FinalState,
    history: &History,
    plan: &Plan,
    live: bool,
) -> Vec<Violation> {
    let mut out = Vec::new();
    if let Some(what) = &history.unsettled {
        out.push(Violation {
            doc: None,
            what: what.clone(),
            needles: vec!["settled".into()],
        });
    }
    if live {
        for (doc, cycles) in plan.docs.iter().enumerate() {
            for (c, cycle) in cycles.iter().enumerate() {
                check_cycle_reads(history, doc, c, cycle, cycles, &mut out);
            }
        }
    }
    if !state.converged {
        out.extend(divergence(state));
        return out;
    }
    let Some(reference) = state.nodes.first() else {
        return out;
    };
    for (doc, cycles) in plan.docs.iter().enumerate() {
        let id = revival::doc_id(doc);
        let last = cycles.len().saturating_sub(1);
        let mut exp = Expectations::default();
        let mut acked = 0;
        for w in history
            .writes
            .iter()
            .filter(|w| w.doc == doc && w.cycle == last)
        {
            exp.add(w, w.outcome);
            acked += usize::from(w.outcome == Outcome::Acked);
        }
        let view = reference.get(&id).and_then(Option::as_ref);
        let json = match view {
            Some(v) if v.is_absent() && acked > 0 => {
                out.push(Violation {
                    doc: Some(id.clone()),
                    what: format!(
                        "reads 404 on every node, though {acked} writes of its last cycle ({last}) were acknowledged"
                    ),
                    needles: vec![format!("{id}#")],
                });
                continue;
            }
            Some(v) => &v.doc,
            None => continue, // Not converged: reported above.
        };
        let earlier: Vec<&Write> = history
            .writes
            .iter()
            .filter(|w| w.doc == doc && w.cycle < last && w.outcome != Outcome::Refused)
            .collect();
        let before = out.len();
        check_earlier(&id, json, &earlier, &mut out);
        check_doc(&id, json, &exp, Creation::Revival, &mut out);
        for v in &mut out[before..] {
            v.what = format!("last cycle ({last}): {}", v.what);
        }
    }
    out
}

/// The reads of document `doc` in cycle `c` (see [`verify_revival`]); reports the first read
/// that breaks an invariant, and how many more did.
fn check_cycle_reads(
    history: &History,
    doc: usize,
    c: usize,
    cycle: &Cycle,
    cycles: &[Cycle],
    out: &mut Vec<Violation>,
) {
    let id = revival::doc_id(doc);
    let writes: Vec<&Write> = history
        .writes
        .iter()
        .filter(|w| w.doc == doc && w.cycle == c)
        .collect();
    if let Some(previous) = c.checked_sub(1).map(|p| &cycles[p])
        && matches!(previous.end, End::Delete { .. })
        && !history.writes.iter().any(|w| {
            w.doc == doc
                && w.cycle + 1 == c
                && w.op == WriteOp::DeleteDoc
                && w.outcome == Outcome::Acked
        })
    {
        return;
    }
    let mut first: Option<Vec<Violation>> = None;
    let mut more = 0;
    for probe in history
        .probes
        .iter()
        .filter(|p| p.doc == doc && p.cycle == c)
    {
        if probe.at < cycle.opens || probe.at >= cycle.probes_until() {
            continue;
        }
        let mut exp = Expectations::default();
        let mut due = 0;
        for w in &writes {
            let outcome = match w.outcome {
                Outcome::Acked if w.at + VISIBLE_WITHIN <= probe.at => {
                    due += 1;
                    Outcome::Acked
                }
                Outcome::Refused => Outcome::Refused,
                _ => Outcome::Unknown,
            };
            exp.add(w, outcome);
        }
        let mut found = Vec::new();
        match probe.status {
            Some(404) if due > 0 => found.push(Violation {
                doc: Some(id.clone()),
                what: format!(
                    "n{} read 404 at {:.3}s, though {due} writes of cycle {c} had been acknowledged {VISIBLE_WITHIN:?} or more before",
                    probe.node,
                    probe.at.as_secs_f64()
                ),
                needles: vec![format!("{id}#{c}")],
            }),
            Some(200) => {
                check_doc(&id, &probe.doc_json, &exp, Creation::Revival, &mut found);
                for v in &mut found {
                    v.what = format!(
                        "cycle {c}, read at n{} at {:.3}s: {}",
                        probe.node,
                        probe.at.as_secs_f64(),
                        v.what
                    );
                }
            }
            _ => {}
        }
        if found.is_empty() {
            continue;
        }
        if first.is_none() {
            first = Some(found);
        } else {
            more += 1;
        }
    }
    if let Some(mut found) = first {
        if more > 0
            && let Some(last) = found.last_mut()
        {
            last.what = format!("{} (and {more} later reads of cycle {c} failed)", last.what);
        }
        out.extend(found);
    }
}

/// Nothing written in an earlier cycle of the document is visible: no list item, text token or
/// entry (a counter that kept earlier increments exceeds its bound, which `check_doc` reports).
fn check_earlier(id: &str, doc: &Value, earlier: &[&Write], out: &mut Vec<Violation>) {
    let text = doc.get(TEXT).and_then(Value::as_str).unwrap_or_default();
    let items = doc.get(LOG).and_then(Value::as_array);
    for w in earlier {
        let (visible, needle) = match &w.op {
            WriteOp::Push(item) => (
                items.is_some_and(|a| a.iter().any(|v| v.as_str() == Some(item.as_str()))),
                item.clone(),
            ),
            WriteOp::Splice(token) => (text.contains(token.as_str()), token.clone()),
            WriteOp::Entry { node, key, .. } => (
                doc.get(ENTRIES)
                    .and_then(|e| e.get(node))
                    .and_then(|m| m.get(key))
                    .is_some(),
                format!("key: \"{key}\""),
            ),
            _ => continue,
        };
        if visible {
            out.push(Violation {
                doc: Some(id.to_owned()),
                what: format!(
                    "{:?} of cycle {} (c{}, {:?}) is visible",
                    w.op, w.cycle, w.client, w.outcome
                ),
                needles: vec![needle],
            });
        }
    }
}

/// A broken invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The document concerned.
    pub doc: Option<String>,
    /// What is wrong.
    pub what: String,
    /// Strings that pick the trace events relevant to it.
    pub needles: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.doc {
            Some(doc) => write!(f, "{doc}: {}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

/// Reports one broken invariant: what is wrong, and a string that picks its trace events.
type Fail<'a> = dyn FnMut(String, String) + 'a;

fn check_doc(
    id: &str,
    doc: &Value,
    exp: &Expectations,
    creation: Creation,
    out: &mut Vec<Violation>,
) {
    let mut fail = |what: String, needle: String| {
        out.push(Violation {
            doc: Some(id.to_owned()),
            what,
            needles: vec![needle],
        })
    };
    check_own_keys(doc, exp, &mut fail);
    check_counter(doc, exp, creation, &mut fail);
    check_items(doc, exp, creation, &mut fail);
    check_tokens(doc, exp, &mut fail);
    check_entries(doc, exp, &mut fail);
    if creation.creates_containers() {
        check_shape(doc, &mut fail);
    }
}

/// Each client's own key holds what its last acknowledged write left, or what a later write
/// with an unknown outcome did.
fn check_own_keys(doc: &Value, exp: &Expectations, fail: &mut Fail<'_>) {
    for (key, expected) in &exp.keys {
        let (acked, unknown) = (&expected.acked, &expected.unknown);
        let actual = doc
            .get(key)
            .map(|v| v.as_str().map(str::to_owned).unwrap_or(v.to_string()));
        let last: Option<String> = acked.clone().flatten();
        let allowed = actual == last || unknown.contains(&actual);
        if !allowed {
            fail(
                format!(
                    "key {key} is {actual:?}; the last acknowledged write left {last:?}{}",
                    if unknown.is_empty() {
                        String::new()
                    } else {
                        format!(" (later unknown writes: {unknown:?})")
                    }
                ),
                format!("{key} "),
            );
        }
    }
}

/// The counter lies between its acknowledged increments and those plus the unknown ones. A
/// counter the racing workload never created reads 0; one it deleted keeps only the
/// increments of its last generation, so only the upper bound holds (increments are positive).
fn check_counter(doc: &Value, exp: &Expectations, creation: Creation, fail: &mut Fail<'_>) {
    let n = match doc.get(COUNTER) {
        None if creation.creates_containers() => Some(0),
        value => value.and_then(Value::as_i64),
    };
    let high = exp.counter_acked + exp.counter_unknown;
    let (low, lost) = if exp.may_be_lost(&[COUNTER]) {
        (0, " (the counter was deleted: only the upper bound holds)")
    } else {
        (exp.counter_acked, "")
    };
    if n.is_none_or(|n| n < low || n > high) {
        fail(
            format!(
                "counter n is {n:?}; acknowledged increments sum to {}, unknown ones add up to {}{lost}",
                exp.counter_acked, exp.counter_unknown
            ),
            "Inc(".into(),
        );
    }
}

/// Every acknowledged list item is there exactly once, and nothing else is there but items
/// with an unknown outcome (and the upfront workload's `init`).
fn check_items(doc: &Value, exp: &Expectations, creation: Creation, fail: &mut Fail<'_>) {
    let items: Vec<String> = doc
        .get(LOG)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for item in &items {
        *counts.entry(item.as_str()).or_default() += 1;
    }
    if !exp.may_be_lost(&[LOG]) {
        for item in &exp.items_acked {
            match counts.get(item.as_str()) {
                Some(1) => {}
                Some(k) => fail(format!("list item {item} appears {k} times"), item.clone()),
                None => fail(
                    format!("acknowledged list item {item} is missing"),
                    item.clone(),
                ),
            }
        }
    }
    for (item, k) in &counts {
        let known = (creation == Creation::Upfront && *item == "init")
            || exp.items_acked.iter().any(|i| i == item)
            || exp.items_unknown.iter().any(|i| i == item);
        if !known {
            fail(
                format!("list item {item} was never written"),
                (*item).to_owned(),
            );
        } else if *k > 1 {
            fail(
                format!("list item {item} appears {k} times"),
                (*item).to_owned(),
            );
        }
    }
}

/// Every acknowledged text token is there exactly once, and the text holds nothing but tokens.
fn check_tokens(doc: &Value, exp: &Expectations, fail: &mut Fail<'_>) {
    let text = doc.get(TEXT).and_then(Value::as_str).unwrap_or_default();
    if !exp.may_be_lost(&[TEXT]) {
        for token in &exp.tokens_acked {
            match text.matches(token.as_str()).count() {
                1 => {}
                k => fail(
                    format!("acknowledged text token {token} appears {k} times"),
                    token.clone(),
                ),
            }
        }
    }
    // Each token removed once: a token there twice leaves its second copy behind.
    let mut rest = text.to_owned();
    for token in exp.tokens_acked.iter().chain(&exp.tokens_unknown) {
        rest = rest.replacen(token.as_str(), "", 1);
    }
    if !rest.is_empty() {
        fail(
            format!("text holds {rest:?}, which no client wrote"),
            "Splice".into(),
        );
    }
}

/// Every acknowledged entry `["by", node, key]` holds its value, and every entry there was
/// written, with that value.
fn check_entries(doc: &Value, exp: &Expectations, fail: &mut Fail<'_>) {
    let entries = doc.get(ENTRIES);
    for ((node, key), value) in &exp.entries_acked {
        if exp.may_be_lost(&[ENTRIES, node, key]) {
            continue;
        }
        let actual = entries.and_then(|e| e.get(node)).and_then(|m| m.get(key));
        if actual.and_then(Value::as_str) != Some(value.as_str()) {
            fail(
                format!("acknowledged entry {ENTRIES}/{node}/{key} is {actual:?}, not {value:?}"),
                format!("key: \"{key}\""),
            );
        }
    }
    let Some(entries) = entries.and_then(Value::as_object) else {
        return; // Absent; anything else there is reported by `check_shape`.
    };
    for (node, map) in entries {
        let Some(map) = map.as_object() else {
            fail(
                format!("{ENTRIES}/{node} is {map}, which no client wrote"),
                ENTRIES.to_owned(),
            );
            continue;
        };
        for (key, value) in map {
            let at = (node.clone(), key.clone());
            let written = exp
                .entries_acked
                .get(&at)
                .or_else(|| exp.entries_unknown.get(&at));
            if written.is_none_or(|w| value.as_str() != Some(w.as_str())) {
                fail(
                    format!("entry {ENTRIES}/{node}/{key} is {value}, which no client wrote"),
                    format!("key: \"{key}\""),
                );
            }
        }
    }
}

/// The racing workload writes four keys, each with one kind of value: anything else at the
/// root was never written.
fn check_shape(doc: &Value, fail: &mut Fail<'_>) {
    let Some(root) = doc.as_object() else {
        if !doc.is_null() {
            fail(format!("the document is {doc}, not a map"), "final".into());
        }
        return;
    };
    for (key, value) in root {
        let fits = match key.as_str() {
            COUNTER => value.is_i64(),
            LOG => value.is_array(),
            TEXT => value.is_string(),
            ENTRIES => value.is_object(),
            _ => false,
        };
        if !fits {
            fail(
                format!("key {key} holds {value}, which no client wrote"),
                "final".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::workload::{Probe, doc_id, race_doc_id};

    fn write(client: usize, op: WriteOp, outcome: Outcome) -> Write {
        Write {
            client,
            doc: 0,
            cycle: 0,
            op,
            outcome,
            at: Duration::ZERO,
        }
    }

    fn state(docs: &[Value]) -> FinalState {
        let nodes = docs
            .iter()
            .map(|doc| {
                let mut m = BTreeMap::new();
                m.insert(
                    doc_id(0),
                    Some(DocView {
                        heads: vec!["h".into()],
                        generation: 0,
                        doc: doc.clone(),
                    }),
                );
                m
            })
            .collect();
        FinalState {
            nodes,
            converged: true,
            took: Duration::ZERO,
            hosts: Vec::new(),
        }
    }

    fn history() -> History {
        History {
            writes: vec![
                write(0, WriteOp::Set("c0.1".into()), Outcome::Acked),
                write(0, WriteOp::Set("c0.2".into()), Outcome::Unknown),
                write(1, WriteOp::Set("c1.1".into()), Outcome::Acked),
                write(1, WriteOp::Del, Outcome::Acked),
                write(0, WriteOp::Inc(3), Outcome::Acked),
                write(1, WriteOp::Inc(2), Outcome::Unknown),
                write(1, WriteOp::Inc(5), Outcome::Refused),
                write(0, WriteOp::Push("c0.3".into()), Outcome::Acked),
                write(1, WriteOp::Push("c1.3".into()), Outcome::Unknown),
                write(0, WriteOp::Splice("<c0.4>".into()), Outcome::Acked),
            ],
            reads: 0,
            ready: true,
            ..History::default()
        }
    }

    fn good() -> Value {
        json!({"c0": "c0.2", "n": 5, "log": ["init", "c0.3"], "t": "<c0.4>"})
    }

    fn violations(doc: Value) -> Vec<String> {
        verify(&state(&[doc]), &history(), 1, Creation::Upfront)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_state_the_history_allows_passes() {
        assert_eq!(violations(good()), Vec::<String>::new());
        let mut other = good();
        other["c0"] = json!("c0.1");
        other["n"] = json!(3);
        assert_eq!(
            violations(other),
            Vec::<String>::new(),
            "unknown writes may be absent"
        );
    }

    #[test]
    fn every_broken_invariant_is_reported() {
        let mut lost = good();
        lost["log"] = json!(["init"]);
        assert!(violations(lost)[0].contains("acknowledged list item c0.3 is missing"));

        let mut doubled = good();
        doubled["log"] = json!(["init", "c0.3", "c0.3"]);
        assert!(violations(doubled)[0].contains("appears 2 times"));

        let mut invented = good();
        invented["log"] = json!(["init", "c0.3", "zz"]);
        assert!(violations(invented)[0].contains("never written"));

        let mut counter = good();
        counter["n"] = json!(2);
        assert!(violations(counter)[0].contains("counter n is Some(2)"));
        let mut counter = good();
        counter["n"] = json!(10);
        assert!(
            violations(counter)[0].contains("counter n"),
            "a refused increment counted"
        );

        let mut key = good();
        key["c1"] = json!("c1.1");
        assert!(
            violations(key)[0].contains("key c1"),
            "an acknowledged delete undone"
        );

        let mut text = good();
        text["t"] = json!("");
        assert!(violations(text)[0].contains("<c0.4> appears 0 times"));
        let mut text = good();
        text["t"] = json!("<c0.4>x");
        assert!(violations(text)[0].contains("no client wrote"));
    }

    #[test]
    fn replicas_that_differ_are_reported() {
        let mut state = state(&[good(), good()]);
        state.converged = false;
        let found = verify(&state, &history(), 1, Creation::Upfront);
        assert_eq!(found.len(), 1);
        assert!(found[0].what.contains("did not converge"));
    }

    #[test]
    fn an_upfront_document_absent_everywhere_is_missing() {
        let mut state = state(&[good()]);
        state.nodes[0].insert(doc_id(0), Some(DocView::absent()));
        let found = verify(&state, &history(), 1, Creation::Upfront);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].what, "document missing");
    }

    fn entry(client: usize, key: &str, value: &str) -> WriteOp {
        WriteOp::Entry {
            node: format!("n{client}"),
            key: key.into(),
            value: value.into(),
        }
    }

    /// A racing document: created by the writes themselves.
    fn racing_history(removed: &[&[&str]]) -> History {
        let mut writes = vec![
            write(0, entry(0, "c0.1", "v0.1"), Outcome::Acked),
            write(1, entry(1, "c1.1", "v1.1"), Outcome::Unknown),
            write(1, entry(1, "c1.2", "v1.2"), Outcome::Refused),
            write(0, WriteOp::Inc(3), Outcome::Acked),
            write(1, WriteOp::Inc(2), Outcome::Unknown),
            write(0, WriteOp::Push("c0.2".into()), Outcome::Acked),
            write(1, WriteOp::Push("c1.3".into()), Outcome::Refused),
            write(0, WriteOp::Splice("<c0.3>".into()), Outcome::Acked),
        ];
        for path in removed {
            let path = path.iter().map(|s| (*s).to_owned()).collect();
            writes.push(write(0, WriteOp::Remove(path), Outcome::Unknown));
        }
        writes.push(write(
            1,
            WriteOp::Remove(vec!["t".into()]),
            Outcome::Refused,
        ));
        History {
            writes,
            reads: 0,
            ready: true,
            ..History::default()
        }
    }

    fn racing_good() -> Value {
        json!({"by": {"n0": {"c0.1": "v0.1"}}, "n": 3, "log": ["c0.2"], "t": "<c0.3>"})
    }

    fn racing_violations(doc: Option<Value>, removed: &[&[&str]]) -> Vec<String> {
        let view = doc.map_or_else(DocView::absent, |doc| DocView {
            heads: vec!["h".into()],
            generation: 0,
            doc,
        });
        let mut node = BTreeMap::new();
        node.insert(race_doc_id(0), Some(view));
        let state = FinalState {
            nodes: vec![node],
            converged: true,
            took: Duration::ZERO,
            hosts: Vec::new(),
        };
        verify(&state, &racing_history(removed), 1, Creation::Racing)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_racing_state_the_history_allows_passes() {
        assert_eq!(
            racing_violations(Some(racing_good()), &[]),
            Vec::<String>::new()
        );
        let mut more = racing_good();
        more["by"]["n1"] = json!({"c1.1": "v1.1"});
        more["n"] = json!(5);
        assert_eq!(
            racing_violations(Some(more), &[]),
            Vec::<String>::new(),
            "unknown writes may be present"
        );
        let none = History::default();
        let mut node = BTreeMap::new();
        node.insert(race_doc_id(0), Some(DocView::absent()));
        let state = FinalState {
            nodes: vec![node],
            converged: true,
            took: Duration::ZERO,
            hosts: Vec::new(),
        };
        assert!(
            verify(&state, &none, 1, Creation::Racing).is_empty(),
            "a document no write reached is absent"
        );
    }

    #[test]
    fn every_broken_racing_invariant_is_reported() {
        let found = racing_violations(None, &[]);
        assert_eq!(
            found.len(),
            4,
            "an absent document lost every write: {found:?}"
        );

        let mut lost = racing_good();
        lost["by"] = json!({"n0": {}});
        assert!(racing_violations(Some(lost), &[])[0].contains("acknowledged entry by/n0/c0.1"));

        let mut wrong = racing_good();
        wrong["by"]["n0"]["c0.1"] = json!("v0.9");
        assert!(racing_violations(Some(wrong), &[])[0].contains("is Some(String(\"v0.9\"))"));

        let mut refused = racing_good();
        refused["by"]["n1"] = json!({"c1.2": "v1.2"});
        assert!(racing_violations(Some(refused), &[])[0].contains("no client wrote"));

        let mut counter = racing_good();
        if let Some(root) = counter.as_object_mut() {
            root.remove("n");
        }
        assert!(racing_violations(Some(counter), &[])[0].contains("counter n is Some(0)"));

        let mut refused = racing_good();
        refused["log"] = json!(["c0.2", "c1.3"]);
        assert!(racing_violations(Some(refused), &[])[0].contains("c1.3 was never written"));

        let mut stray = racing_good();
        stray["x"] = json!(1);
        assert!(racing_violations(Some(stray), &[])[0].contains("key x holds 1"));
    }

    #[test]
    fn a_deleted_container_excuses_its_lost_writes_only() {
        let mut emptied = racing_good();
        emptied["log"] = json!([]);
        emptied["by"] = json!({});
        emptied["n"] = json!(0);
        emptied["t"] = json!("");
        let all: &[&[&str]] = &[&["log"], &["by"], &["n"], &["t"]];
        assert_eq!(
            racing_violations(Some(emptied.clone()), all),
            Vec::<String>::new()
        );
        assert_eq!(
            racing_violations(Some(emptied.clone()), &[&["by", "n0"], &["log"]]).len(),
            2,
            "the counter and the text were not deleted (and a refused delete counts for nothing)"
        );
        let found = racing_violations(Some(emptied), &[&["by", "n1"], &["n"], &["t"]]);
        assert_eq!(found.len(), 2, "another node's map and the list: {found:?}");

        let mut doubled = racing_good();
        doubled["log"] = json!(["c0.2", "c0.2"]);
        doubled["t"] = json!("<c0.3><c0.3>");
        doubled["n"] = json!(6);
        let found = racing_violations(Some(doubled), all);
        assert_eq!(
            found.len(),
            3,
            "still nothing twice, no counter above its sum: {found:?}"
        );
    }

    /// One document of two cycles: cycle 0 (expired) opened at 10 s, the last at 20 s.
    fn revival_plan() -> Plan {
        let cycle = |opens: u64, end: End| Cycle {
            opens: Duration::from_secs(opens),
            end,
            openers: vec![0],
            writers: vec![0, 1],
        };
        Plan {
            docs: vec![vec![cycle(10, End::Expire), cycle(20, End::Last)]],
        }
    }

    fn revival_write(
        client: usize,
        cycle: usize,
        op: WriteOp,
        outcome: Outcome,
        at_ms: u64,
    ) -> Write {
        Write {
            client,
            doc: 0,
            cycle,
            op,
            outcome,
            at: Duration::from_millis(at_ms),
        }
    }

    fn revival_history(probes: Vec<Probe>) -> History {
        History {
            writes: vec![
                revival_write(0, 0, WriteOp::Push("c0.0.1".into()), Outcome::Acked, 10_010),
                revival_write(0, 0, WriteOp::Inc(4), Outcome::Acked, 10_020),
                revival_write(0, 1, WriteOp::Push("c0.0.2".into()), Outcome::Acked, 20_010),
                revival_write(1, 1, WriteOp::Inc(2), Outcome::Acked, 20_500),
                revival_write(
                    1,
                    1,
                    WriteOp::Splice("<c1.0.1>".into()),
                    Outcome::Unknown,
                    20_600,
                ),
            ],
            probes,
            ..History::default()
        }
    }

    fn revival_final(doc: Option<Value>) -> FinalState {
        let view = doc.map_or_else(DocView::absent, |doc| DocView {
            heads: vec!["h".into()],
            generation: 0,
            doc,
        });
        let mut node = BTreeMap::new();
        node.insert(revival::doc_id(0), Some(view));
        FinalState {
            nodes: vec![node],
            converged: true,
            took: Duration::ZERO,
            hosts: Vec::new(),
        }
    }

    fn revival_violations(doc: Option<Value>, probes: Vec<Probe>) -> Vec<String> {
        verify_revival(
            &revival_final(doc),
            &revival_history(probes),
            &revival_plan(),
            true,
        )
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    fn probe(cycle: usize, at_ms: u64, status: u16, doc: Value) -> Probe {
        Probe {
            node: 1,
            doc: 0,
            cycle,
            at: Duration::from_millis(at_ms),
            status: Some(status),
            doc_json: doc,
        }
    }

    #[test]
    fn a_revived_document_holds_its_last_cycle_alone() {
        let last = json!({"log": ["c0.0.2"], "n": 2});
        assert_eq!(
            revival_violations(Some(last.clone()), vec![]),
            Vec::<String>::new()
        );
        let mut with_token = last.clone();
        with_token["t"] = json!("<c1.0.1>");
        assert_eq!(
            revival_violations(Some(with_token), vec![]),
            Vec::<String>::new(),
            "an unknown write may be there"
        );

        let mut stale = last.clone();
        stale["log"] = json!(["c0.0.1", "c0.0.2"]);
        let found = revival_violations(Some(stale), vec![]);
        assert!(
            found[0].contains("last cycle (1): Push(\"c0.0.1\") of cycle 0"),
            "{found:?}"
        );
        let mut counted = last.clone();
        counted["n"] = json!(6);
        assert!(revival_violations(Some(counted), vec![])[0].contains("counter n is Some(6)"));
        let mut lost = last;
        lost["log"] = json!([]);
        assert!(revival_violations(Some(lost), vec![])[0].contains("c0.0.2 is missing"));
        let found = revival_violations(None, vec![]);
        assert!(
            found[0].contains("reads 404 on every node, though 2 writes"),
            "{found:?}"
        );
    }

    #[test]
    fn reads_during_a_cycle_show_what_was_acknowledged_a_second_before() {
        let last = Some(json!({"log": ["c0.0.2"], "n": 2}));
        let fine = vec![
            // Before anything of cycle 1 was acknowledged a second ago: 404 or a part is fine.
            probe(1, 20_900, 404, Value::Null),
            probe(1, 21_100, 200, json!({"log": ["c0.0.2"]})),
            // Later, everything acknowledged a second before.
            probe(
                1,
                21_600,
                200,
                json!({"log": ["c0.0.2"], "n": 2, "t": "<c1.0.1>"}),
            ),
            // After the cycle may have expired somewhere: not checked.
            probe(0, 13_500, 404, Value::Null),
        ];
        assert_eq!(revival_violations(last.clone(), fine), Vec::<String>::new());

        let late = vec![probe(1, 21_100, 404, Value::Null)];
        let found = revival_violations(last.clone(), late);
        assert!(
            found[0].contains("n1 read 404 at 21.100s, though 1 writes of cycle 1"),
            "{found:?}"
        );
        let partial = vec![
            probe(1, 21_600, 200, json!({"log": ["c0.0.2"]})),
            probe(1, 21_800, 200, json!({"log": ["c0.0.2"]})),
        ];
        let found = revival_violations(last.clone(), partial);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("cycle 1, read at n1 at 21.600s: counter n is Some(0)"));
        assert!(found[0].contains("(and 1 later reads of cycle 1 failed)"));
        let old = vec![probe(1, 20_700, 200, json!({"log": ["c0.0.1"]}))];
        let found = revival_violations(last, old);
        assert!(
            found[0].contains("list item c0.0.1 was never written"),
            "{found:?}"
        );
    }
}
