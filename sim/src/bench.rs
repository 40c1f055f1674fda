//! `bench broadcast`: how many messages a write costs and how long it takes to reach every
//! node, in a simulated cluster with fixed link latency.
//!
//! A watcher client per node follows `GET /v1/watch?prefix=bench/` and notes when each
//! document first shows there; a writer creates one new document per write at a random node,
//! at a fixed rate. A write's latency is the time from its acknowledgement to its arrival at
//! the last node. Messages are every replication frame the nodes send each other in the
//! measured window (`verge_peer_messages_sent_total`: broadcast batches and their
//! acknowledgements, membership, anti-entropy), divided by the writes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Method;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::api::NodeApi;
use crate::cluster::{Cluster, SimError, host_name};
use crate::lock;

/// Simulated time the cluster gets to form (membership, connections, first anti-entropy)
/// before the measurement.
const WARM_UP: Duration = Duration::from_secs(15);
/// How long after the last write the bench waits for stragglers.
const DRAIN: Duration = Duration::from_secs(2);
/// The counter of replication frames sent.
pub const MESSAGES_METRIC: &str = "verge_peer_messages_sent_total";

/// The bench's settings.
#[derive(Debug, Clone)]
pub struct BroadcastConfig {
    /// Nodes.
    pub nodes: usize,
    /// One-way link latency.
    pub latency: Duration,
    /// Writes per second, over the whole cluster.
    pub rate: u32,
    /// How long writes go on.
    pub duration: Duration,
    /// The seed.
    pub seed: u64,
}

/// What the bench measured.
#[derive(Debug, Clone)]
pub struct BroadcastReport {
    /// Writes acknowledged.
    pub writes: usize,
    /// Writes seen on every node.
    pub complete: usize,
    /// Replication frames sent in the measured window.
    pub messages: f64,
    /// The same by kind (`{kind="changes"}` …).
    pub by_kind: BTreeMap<String, f64>,
    /// Latencies from acknowledgement to the last node, sorted, in ms.
    pub latencies_ms: Vec<u64>,
}

impl BroadcastReport {
    /// Messages per acknowledged write.
    pub fn messages_per_write(&self) -> f64 {
        self.messages / self.writes.max(1) as f64
    }

    /// The `q` quantile of latency in ms (0 when nothing completed).
    pub fn quantile_ms(&self, q: f64) -> u64 {
        if self.latencies_ms.is_empty() {
            return 0;
        }
        let i = ((self.latencies_ms.len() - 1) as f64 * q).round() as usize;
        self.latencies_ms[i.min(self.latencies_ms.len() - 1)]
    }
}

#[derive(Debug, Default)]
struct Observed {
    acked: BTreeMap<u64, Duration>,
    /// Per write, per node: when it first showed.
    seen: BTreeMap<u64, BTreeMap<usize, Duration>>,
    messages: Vec<BTreeMap<String, f64>>,
}

async fn watch(node: usize, observed: Arc<Mutex<Observed>>) {
    let api = NodeApi::of(&host_name(node)).with_timeout(Duration::from_secs(3600));
    let Ok(response) = api.send(Method::GET, "/v1/watch?prefix=bench/", None).await else {
        return;
    };
    let mut body = response.into_body();
    let mut pending = String::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(event) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(event.trim()) else {
                continue;
            };
            let Some(k) = event
                .get("id")
                .and_then(|v| v.as_str())
                .and_then(|id| id.strip_prefix("bench/"))
                .and_then(|k| k.parse::<u64>().ok())
            else {
                continue;
            };
            lock(&observed)
                .seen
                .entry(k)
                .or_default()
                .entry(node)
                .or_insert_with(crate::now);
        }
    }
}

async fn messages(nodes: usize) -> BTreeMap<String, f64> {
    let mut total = BTreeMap::new();
    for i in 0..nodes {
        let series = NodeApi::of(&host_name(i))
            .metric_series(MESSAGES_METRIC)
            .await
            .unwrap_or_default();
        for (labels, value) in series {
            *total.entry(labels).or_insert(0.0) += value;
        }
    }
    total
}

/// Runs the broadcast bench.
pub fn broadcast(config: &BroadcastConfig) -> Result<BroadcastReport, SimError> {
    let mut cluster = Cluster::builder()
        .nodes(config.nodes)
        .seed(config.seed)
        .latency(config.latency)
        .build()?;
    cluster.run_for(WARM_UP)?;
    let observed = Arc::new(Mutex::new(Observed::default()));
    for i in 0..config.nodes {
        let observed = Arc::clone(&observed);
        cluster.client(format!("watch{i}"), async move {
            watch(i, observed).await;
            Ok(())
        });
    }
    cluster.run_for(Duration::from_secs(1))?;
    let (nodes, rate, duration, seed) = (
        config.nodes,
        config.rate.max(1),
        config.duration,
        config.seed,
    );
    let writer_observed = Arc::clone(&observed);
    cluster.client("writer", async move {
        let before = messages(nodes).await;
        lock(&writer_observed).messages.push(before);
        let mut rng = StdRng::seed_from_u64(seed);
        let interval = Duration::from_secs(1) / rate;
        let writes = (duration.as_secs_f64() * f64::from(rate)) as u64;
        let mut tasks = Vec::new();
        for k in 0..writes {
            let node = rng.random_range(0..nodes);
            let observed = Arc::clone(&writer_observed);
            tasks.push(tokio::spawn(async move {
                let api = NodeApi::of(&host_name(node));
                let ops = json!([{"op": "set", "path": ["v"], "value": k}]);
                if let Ok(a) = api.patch(&format!("bench/{k}"), ops).await
                    && a.status.is_success()
                {
                    lock(&observed).acked.insert(k, crate::now());
                }
            }));
            tokio::time::sleep(interval).await;
        }
        for t in tasks {
            let _ = t.await;
        }
        tokio::time::sleep(DRAIN).await;
        let after = messages(nodes).await;
        lock(&writer_observed).messages.push(after);
        Ok(())
    });
    let limit = config.duration + DRAIN + Duration::from_secs(120);
    let until = cluster.elapsed() + limit;
    while cluster.elapsed() < until {
        cluster.run_for(Duration::from_millis(100))?;
        if lock(&observed).messages.len() == 2 {
            break;
        }
    }
    let observed = lock(&observed);
    let by_kind: BTreeMap<String, f64> = match observed.messages.as_slice() {
        [before, after] => after
            .iter()
            .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
            .collect(),
        _ => return Err(SimError::Invalid("the bench did not finish in time".into())),
    };
    let messages = by_kind.values().sum();
    let mut latencies_ms = Vec::new();
    for (k, acked) in &observed.acked {
        let Some(seen) = observed.seen.get(k) else {
            continue;
        };
        if seen.len() < config.nodes {
            continue;
        }
        let last = seen.values().max().copied().unwrap_or(*acked);
        latencies_ms.push(last.saturating_sub(*acked).as_millis() as u64);
    }
    latencies_ms.sort_unstable();
    Ok(BroadcastReport {
        writes: observed.acked.len(),
        complete: latencies_ms.len(),
        messages,
        by_kind,
        latencies_ms,
    })
}
