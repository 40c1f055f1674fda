//! The change feed's checker: once the cluster agreed, each node's feed (`GET
//! /v1/watch?since=0`) is read whole and held against what the clients were told.
//!
//! Invariants, per node:
//! - the feed numbers its records `1..=last` with no gap and no repeat, across every crash
//!   and restart of the node (nothing is trimmed: a run stays far below retention);
//! - every write the node acknowledged is in its feed: a record of that document with the heads
//!   the write answered;
//! - the document's final heads at the node are in one of its records (a change that moved the
//!   document without a record would leave a watcher behind for good). Not necessarily the last
//!   one: a compaction may commit after the final state was read. Revival runs are left out of
//!   this one: a purge moves a document to a stub without a change to tell.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::Method;
use serde_json::Value;

use crate::api::NodeApi;
use crate::check::{FinalState, Violation};
use crate::lock;

/// How long reading one node's feed may take, in simulated time.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Most records read from one node's feed (a run commits far fewer).
const RECORDS_MAX: usize = 1_000_000;

/// A write a node acknowledged, with the heads it answered.
#[derive(Debug, Clone)]
pub struct AckedAt {
    /// The node's address.
    pub node: IpAddr,
    /// The document.
    pub id: String,
    /// The heads answered, sorted.
    pub heads: Vec<String>,
}

/// One record as a watcher received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number.
    pub seq: u64,
    /// The document.
    pub id: String,
    /// The document's heads after the change, sorted.
    pub heads: Vec<String>,
}

/// One node's whole feed, or why it could not be read.
pub type NodeFeed = Result<Vec<Record>, String>;

/// Reads the node's whole feed, up to the last number it gave when the read started.
pub async fn read(api: &NodeApi) -> NodeFeed {
    let last = api
        .metric("verge_feed_last_seq")
        .await
        .ok_or("no metrics")? as u64;
    if last == 0 {
        return Ok(Vec::new());
    }
    let api = api.clone().with_timeout(READ_TIMEOUT);
    let response = api
        .send(Method::GET, "/v1/watch?since=0", None)
        .await
        .map_err(|e| format!("watch: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("watch answered {}", response.status()));
    }
    let mut body = response.into_body();
    let mut pending = String::new();
    let mut records = Vec::new();
    let deadline = crate::now() + READ_TIMEOUT;
    loop {
        let left = deadline.saturating_sub(crate::now());
        let frame = tokio::time::timeout(left, body.frame())
            .await
            .map_err(|_| {
                format!(
                    "{} of {last} records within {READ_TIMEOUT:?}",
                    records.len()
                )
            })?;
        let Some(Ok(frame)) = frame else {
            return Err(format!(
                "the stream ended after {} of {last}",
                records.len()
            ));
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            if let Some(record) = parse_event(&block)? {
                let seq = record.seq;
                records.push(record);
                if seq >= last || records.len() >= RECORDS_MAX {
                    return Ok(records);
                }
            }
        }
    }
}

/// A `change` event's record; `None` for comments; an error for anything else.
fn parse_event(block: &str) -> Result<Option<Record>, String> {
    let mut event = "message";
    let mut data = None;
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            event = v.trim();
        } else if let Some(v) = line.strip_prefix("data:") {
            data = Some(v.trim());
        }
    }
    let Some(data) = data else { return Ok(None) };
    if event != "change" {
        return Err(format!("unexpected {event} event: {data}"));
    }
    let value: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
    let mut heads: Vec<String> = value["heads"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| h.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    heads.sort();
    Ok(Some(Record {
        seq: value["seq"].as_u64().ok_or("no seq")?,
        id: value["id"].as_str().ok_or("no id")?.to_owned(),
        heads,
    }))
}

/// Reads every node's feed, as a client inside the simulation.
pub async fn read_all(nodes: Vec<NodeApi>, out: Arc<Mutex<Vec<NodeFeed>>>) {
    for api in nodes {
        let feed = read(&api).await;
        lock(&out).push(feed);
    }
}

/// Holds the feeds of `nodes` (by address, in node order) against the acknowledged writes and
/// the final state.
pub fn verify(
    nodes: &[IpAddr],
    feeds: &[NodeFeed],
    acked: &[AckedAt],
    state: &FinalState,
    final_heads: bool,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let violation = |what: String| Violation {
        doc: None,
        what,
        needles: vec!["feed".into()],
    };
    for (k, (ip, feed)) in nodes.iter().zip(feeds).enumerate() {
        let i = state.host(k);
        let records = match feed {
            Ok(records) => records,
            Err(e) => {
                out.push(violation(format!("n{i}: the feed cannot be read: {e}")));
                continue;
            }
        };
        if let Some((k, r)) = records
            .iter()
            .enumerate()
            .find(|(k, r)| r.seq != *k as u64 + 1)
        {
            out.push(violation(format!(
                "n{i}: record {} of the feed has number {} (a gap or a repeat)",
                k + 1,
                r.seq
            )));
            continue;
        }
        let mut held: BTreeMap<&str, Vec<&Vec<String>>> = BTreeMap::new();
        for r in records {
            held.entry(r.id.as_str()).or_default().push(&r.heads);
        }
        for w in acked.iter().filter(|w| w.node == *ip) {
            let found = held
                .get(w.id.as_str())
                .is_some_and(|heads| heads.contains(&&w.heads));
            if !found {
                out.push(Violation {
                    doc: Some(w.id.clone()),
                    what: format!(
                        "n{i} acknowledged a write with heads {:?} that its feed does not hold",
                        w.heads
                    ),
                    needles: vec![w.id.clone(), "feed".into()],
                });
            }
        }
        if !final_heads {
            continue;
        }
        for (id, view) in state.nodes.get(k).into_iter().flatten() {
            let Some(view) = view.as_ref().filter(|v| !v.is_absent()) else {
                continue;
            };
            let recorded = held
                .get(id.as_str())
                .is_some_and(|heads| heads.contains(&&view.heads));
            if !recorded {
                out.push(Violation {
                    doc: Some(id.clone()),
                    what: format!(
                        "n{i}: no record of the feed has the document's final heads {:?}",
                        view.heads
                    ),
                    needles: vec![id.clone(), "feed".into()],
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::DocView;

    fn rec(seq: u64, id: &str, heads: &[&str]) -> Record {
        Record {
            seq,
            id: id.into(),
            heads: heads.iter().map(|h| (*h).to_owned()).collect(),
        }
    }

    fn state(heads: &[&str]) -> FinalState {
        let view = DocView {
            heads: heads.iter().map(|h| (*h).to_owned()).collect(),
            generation: 0,
            doc: serde_json::json!({}),
        };
        FinalState {
            nodes: vec![BTreeMap::from([("d".to_owned(), Some(view))])],
            converged: true,
            took: Duration::ZERO,
            hosts: Vec::new(),
        }
    }

    #[test]
    fn gaps_missing_writes_and_stale_last_records_are_violations() {
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let acked = vec![AckedAt {
            node: ip,
            id: "d".into(),
            heads: vec!["a".into()],
        }];
        let good: NodeFeed = Ok(vec![rec(1, "d", &["a"]), rec(2, "d", &["b"])]);
        assert!(
            verify(
                &[ip],
                std::slice::from_ref(&good),
                &acked,
                &state(&["b"]),
                true
            )
            .is_empty()
        );
        let gap: NodeFeed = Ok(vec![rec(1, "d", &["a"]), rec(3, "d", &["b"])]);
        assert_eq!(verify(&[ip], &[gap], &acked, &state(&["b"]), true).len(), 1);
        let missing: NodeFeed = Ok(vec![rec(1, "d", &["b"])]);
        assert_eq!(
            verify(&[ip], &[missing], &acked, &state(&["b"]), true).len(),
            1
        );
        assert_eq!(
            verify(
                &[ip],
                std::slice::from_ref(&good),
                &acked,
                &state(&["c"]),
                true
            )
            .len(),
            1
        );
        assert!(verify(&[ip], &[good], &acked, &state(&["c"]), false).is_empty());
        let unread: NodeFeed = Err("down".into());
        assert_eq!(
            verify(&[ip], &[unread], &[], &state(&["c"]), false).len(),
            1
        );
    }

    #[test]
    fn events_parse_and_unexpected_ones_are_errors() {
        let block = "id: 4\nevent: change\ndata: {\"seq\":4,\"id\":\"d\",\"heads\":[\"b\",\"a\"],\"deleted\":false}\n\n";
        assert_eq!(
            parse_event(block).expect("parses"),
            Some(rec(4, "d", &["a", "b"]))
        );
        assert_eq!(parse_event(": keep-alive\n\n").expect("a comment"), None);
        assert!(parse_event("event: reset\ndata: {}\n\n").is_err());
    }
}
