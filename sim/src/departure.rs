//! Members that leave for good: a node that leaves the cluster gracefully (`POST
//! /v1/admin/leave`, the route an operator calls) and a node that lost its power and is
//! forgotten by a survivor (`POST /v1/admin/members/forget`). The departed node's host is not
//! started again (see [`crate::Cluster::leave`] and [`crate::Cluster::forget`]).
//!
//! Invariants, once the survivors agree:
//! - the admin route answered 200;
//! - no survivor lists the departed node among its members (`GET /v1/status`, `members`), and
//!   every survivor lists it under `departed`;
//! - compaction goes on at every survivor after the departure: its compactions (started or
//!   adopted) grow after the route answered (it no longer waits for the departed node to
//!   confirm a generation);
//! - every write the leaving node acknowledged before it stopped is in the survivors' final
//!   state (the workload's own checks, which cover every acknowledged write). A node that lost
//!   its power may take the writes it acknowledged last with it: those acknowledged within
//!   [`LOST_WITH_NODE`] of the power cut count as unknown.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};

use crate::api::NodeApi;
use crate::check::Violation;
use crate::lock;

/// How long the status of every survivor gets to show the departure, once the survivors agree
/// on the documents.
pub const SPREAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Writes a node acknowledged this shortly before it lost its power may not have left it (a
/// broadcast waits up to its 2 ms batch window, then goes out over QUIC; anti-entropy, which
/// would repair a lost one, runs only every 5 s): the checker counts them as unknown when the
/// node is forgotten instead of restarted. With no allowance at all, no forget run has lost
/// one yet (3 nodes, seeds 1-100; 5 nodes, seeds 1-20).
pub const LOST_WITH_NODE: Duration = Duration::from_millis(100);
/// How long the leave route may take to answer (it waits up to 3 s for the members to
/// confirm the announcement).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a node departed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// It left through `POST /v1/admin/leave`.
    Left,
    /// It lost its power at `crashed` (simulated time since the start) and survivor `via`
    /// forgot it.
    Forgotten {
        /// The survivor that was asked.
        via: usize,
        /// When its power was cut, if it was.
        crashed: Option<Duration>,
    },
}

/// One departure and what the survivors said of it.
#[derive(Debug, Clone)]
pub struct Departure {
    /// The node.
    pub node: usize,
    /// Its gossip address, as status lists members.
    pub addr: SocketAddr,
    /// How.
    pub how: How,
    /// When the admin route was called.
    pub at: Duration,
    /// The route's status and body, or why it did not answer.
    pub answer: Result<(u16, Value), String>,
    /// Per survivor (node index): its compactions started and adopted when the route answered,
    /// `None` when its metrics did not answer.
    pub compactions: Vec<(usize, Option<f64>)>,
}

/// The departures of a run, filled by the clients that call the admin routes.
pub type SharedDepartures = Arc<Mutex<Vec<Departure>>>;

/// A survivor's compactions so far: started and adopted generations, from its metrics.
pub async fn compactions(api: &NodeApi) -> Option<f64> {
    let mut total = 0.0;
    for name in [
        "verge_compactions_total",
        "verge_generation_adoptions_total",
    ] {
        let series = api.metric_series(name).await?;
        total += series.values().sum::<f64>();
    }
    Some(total)
}

/// Calls the admin route for `departure` (`Left`: leave at the node itself; `Forgotten`:
/// forget at the survivor), then reads the survivors' compactions, and records it all.
pub async fn call(
    mut departure: Departure,
    survivors: Vec<usize>,
    out: SharedDepartures,
    trace: crate::trace::Trace,
) {
    let node = departure.node;
    let answer = match departure.how {
        How::Left => {
            let api = NodeApi::of(&crate::cluster::host_name(node)).with_timeout(LEAVE_TIMEOUT);
            api.request(Method::POST, "/v1/admin/leave", None).await
        }
        How::Forgotten { via, .. } => {
            let api = NodeApi::of(&crate::cluster::host_name(via));
            let body = json!({ "addr": departure.addr.to_string() });
            api.request(Method::POST, "/v1/admin/members/forget", Some(body))
                .await
        }
    };
    departure.answer = answer
        .map(|a| (a.status.as_u16(), a.json()))
        .map_err(|e| e.to_string());
    trace.event(format!(
        "departure n{node} {:?} -> {}",
        departure.how,
        match &departure.answer {
            Ok((status, body)) => format!("{status} {body}"),
            Err(e) => e.clone(),
        }
    ));
    for i in survivors {
        let api = NodeApi::of(&crate::cluster::host_name(i));
        departure.compactions.push((i, compactions(&api).await));
    }
    lock(&out).push(departure);
}

/// What one survivor's status said of the departed members.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Its members' addresses.
    pub members: Vec<String>,
    /// Its departed list.
    pub departed: Vec<String>,
    /// Its compactions started and adopted.
    pub compactions: Option<f64>,
    /// Why its status could not be read.
    pub error: Option<String>,
}

impl Seen {
    fn shows(&self, addr: &str) -> bool {
        self.error.is_none()
            && !self.members.iter().any(|m| m == addr)
            && self.departed.iter().any(|d| d == addr)
    }
}

async fn seen(api: &NodeApi) -> Seen {
    let answer = match api.request(Method::GET, "/v1/status", None).await {
        Ok(a) if a.status.is_success() => a.json(),
        Ok(a) => {
            return Seen {
                error: Some(format!("status answered {}", a.status.as_u16())),
                ..Seen::default()
            };
        }
        Err(e) => {
            return Seen {
                error: Some(e.to_string()),
                ..Seen::default()
            };
        }
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().or_else(|| x.get("addr")?.as_str()))
            .map(str::to_owned)
            .collect()
    };
    Seen {
        members: strings(&answer["members"]),
        departed: strings(&answer["departed"]),
        compactions: compactions(api).await,
        error: None,
    }
}

/// Polls every survivor's status until each shows every departed address among its departed
/// members and none among its members, or [`SPREAD_TIMEOUT`] passes; returns what each showed
/// last, in the order of `survivors`. Runs as a client inside the simulation.
pub async fn observe(survivors: Vec<usize>, addrs: Vec<String>, out: Arc<Mutex<Vec<Seen>>>) {
    let started = crate::now();
    loop {
        let mut all = Vec::with_capacity(survivors.len());
        for i in &survivors {
            all.push(seen(&NodeApi::of(&crate::cluster::host_name(*i))).await);
        }
        let done = all.iter().all(|s| addrs.iter().all(|a| s.shows(a)));
        if done || crate::now().saturating_sub(started) >= SPREAD_TIMEOUT {
            *lock(&out) = all;
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Holds the departures against what the survivors (`survivors[k]` showed `seen[k]`) say.
pub fn verify(departures: &[Departure], survivors: &[usize], seen: &[Seen]) -> Vec<Violation> {
    let mut out = Vec::new();
    let violation = |what: String| Violation {
        doc: None,
        what,
        needles: vec!["departure".into()],
    };
    for d in departures {
        let node = d.node;
        let route = match d.how {
            How::Left => format!("leave at n{node}"),
            How::Forgotten { via, .. } => format!("forget of n{node} at n{via}"),
        };
        match &d.answer {
            Ok((200, _)) => {}
            Ok((status, body)) => {
                out.push(violation(format!("{route} answered {status} {body}")));
            }
            Err(e) => out.push(violation(format!("{route} got no answer: {e}"))),
        }
        let addr = d.addr.to_string();
        for (i, s) in survivors.iter().zip(seen) {
            if let Some(e) = &s.error {
                out.push(violation(format!("n{i}: status cannot be read: {e}")));
                continue;
            }
            if s.members.contains(&addr) {
                out.push(violation(format!(
                    "n{i} still lists departed n{node} ({addr}) among its members {:?} {SPREAD_TIMEOUT:?} after the survivors agreed",
                    s.members
                )));
            }
            if !s.departed.contains(&addr) {
                out.push(violation(format!(
                    "n{i} does not list n{node} ({addr}) as departed: {:?}",
                    s.departed
                )));
            }
            let before = d
                .compactions
                .iter()
                .find(|(j, _)| j == i)
                .and_then(|(_, c)| *c);
            match (before, s.compactions) {
                (Some(before), Some(now)) if now > before => {}
                (Some(before), Some(now)) => out.push(violation(format!(
                    "n{i} made or adopted no generation after n{node} departed ({before} before, {now} at the end)"
                ))),
                _ => out.push(violation(format!(
                    "n{i}: compaction metrics unreadable around n{node}'s departure"
                ))),
            }
        }
    }
    out
}

/// The share of the history a forgotten node may have taken with it: every write its clients
/// (`of_node(client) == node`) saw acknowledged within [`LOST_WITH_NODE`] before its power cut
/// becomes unknown. Returns how many.
pub fn lost_with_nodes(
    departures: &[Departure],
    writes: &mut [crate::workload::Write],
    of_node: impl Fn(usize) -> usize,
) -> usize {
    let mut demoted = 0;
    for d in departures {
        let How::Forgotten {
            crashed: Some(crashed),
            ..
        } = d.how
        else {
            continue;
        };
        let from = crashed.saturating_sub(LOST_WITH_NODE);
        for w in writes.iter_mut() {
            if w.outcome == crate::workload::Outcome::Acked
                && of_node(w.client) == d.node
                && w.at >= from
            {
                w.outcome = crate::workload::Outcome::Unknown;
                demoted += 1;
            }
        }
    }
    demoted
}
