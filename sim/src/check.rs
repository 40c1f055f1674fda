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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::api::NodeApi;
use crate::lock;
use crate::workload::{Expectations, History, doc_id, expectations};

/// One node's view of one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocView {
    /// Its heads, sorted.
    pub heads: Vec<String>,
    /// Its JSON.
    pub doc: Value,
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
}

/// Shared slot the converging client fills.
pub type SharedFinal = Arc<Mutex<FinalState>>;

async fn view(node: &NodeApi, id: &str) -> Option<DocView> {
    let answer = node.get(id).await.ok()?;
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
            };
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Checks the final state against the history; returns the violations found.
pub fn verify(state: &FinalState, history: &History, docs: usize) -> Vec<Violation> {
    let mut out = Vec::new();
    if !state.converged {
        for (id, _) in state.nodes.first().into_iter().flatten() {
            let views: Vec<String> = state
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| match n.get(id).and_then(Option::as_ref) {
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
        return out;
    }
    let Some(reference) = state.nodes.first() else {
        return out;
    };
    for (i, exp) in expectations(history, docs).iter().enumerate() {
        let id = doc_id(i);
        match reference.get(&id).and_then(Option::as_ref) {
            Some(view) => check_doc(&id, &view.doc, exp, &mut out),
            None => out.push(Violation {
                doc: Some(id.clone()),
                what: "document missing".into(),
                needles: vec![id],
            }),
        }
    }
    out
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

fn check_doc(id: &str, doc: &Value, exp: &Expectations, out: &mut Vec<Violation>) {
    let mut fail = |what: String, needle: String| {
        out.push(Violation {
            doc: Some(id.to_owned()),
            what,
            needles: vec![needle],
        })
    };
    // Own keys.
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
    // Counter.
    let n = doc.get("n").and_then(Value::as_i64);
    let (low, high) = (exp.counter_acked, exp.counter_acked + exp.counter_unknown);
    if n.is_none_or(|n| n < low || n > high) {
        fail(
            format!(
                "counter n is {n:?}; acknowledged increments sum to {low}, unknown ones add up to {}",
                exp.counter_unknown
            ),
            "Inc(".into(),
        );
    }
    // List items.
    let items: Vec<String> = doc
        .get("log")
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
    for (item, k) in &counts {
        let known = *item == "init"
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
    // Text tokens.
    let text = doc.get("t").and_then(Value::as_str).unwrap_or_default();
    for token in &exp.tokens_acked {
        match text.matches(token.as_str()).count() {
            1 => {}
            k => fail(
                format!("acknowledged text token {token} appears {k} times"),
                token.clone(),
            ),
        }
    }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::workload::{Outcome, Write, WriteOp};

    fn write(client: usize, op: WriteOp, outcome: Outcome) -> Write {
        Write {
            client,
            doc: 0,
            op,
            outcome,
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
        }
    }

    fn good() -> Value {
        json!({"c0": "c0.2", "n": 5, "log": ["init", "c0.3"], "t": "<c0.4>"})
    }

    fn violations(doc: Value) -> Vec<String> {
        verify(&state(&[doc]), &history(), 1)
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
        let found = verify(&state, &history(), 1);
        assert_eq!(found.len(), 1);
        assert!(found[0].what.contains("did not converge"));
    }
}
