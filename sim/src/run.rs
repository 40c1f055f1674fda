//! One run: a cluster, the workload, a scenario's faults, healing, and the checker's verdict.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::api::NodeApi;
use crate::check::{self, Violation};
use crate::cluster::{Cluster, SimError, host_name};
use crate::lock;
use crate::panics;
use crate::replica_client::{self, ReplicaClient};
use crate::revival::{self, RevivalClient};
use crate::scenario::{Fault, Scenario};
use crate::workload::{self, Creation, History, RaceClient, WorkloadConfig};

/// How long the cluster gets to agree after the faults healed.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Simulated time given to the setup (creating the shared documents, or waiting for every node
/// to answer) before the workload starts.
const SETUP_LIMIT: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The seed.
    pub seed: u64,
    /// Nodes.
    pub nodes: usize,
    /// The scenario.
    pub scenario: &'static Scenario,
    /// How long the workload runs (faults happen inside it).
    pub duration: Duration,
    /// The workload.
    pub workload: WorkloadConfig,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The scenario's name.
    pub scenario: &'static str,
    /// Nodes.
    pub nodes: usize,
    /// What helps to read the run, one line each: in revival runs, the clock offsets and
    /// purge schedules, and what each node's purges and incarnations did.
    pub notes: Vec<String>,
    /// The faults injected, with their simulated time.
    pub faults: Vec<String>,
    /// Writes acknowledged, refused and unknown.
    pub writes: (usize, usize, usize),
    /// Reads answered.
    pub reads: u64,
    /// Whether and how fast the replicas agreed after healing.
    pub converged: bool,
    /// Time to agree after healing.
    pub converge_took: Duration,
    /// Simulated time of the whole run.
    pub simulated: Duration,
    /// Broken invariants.
    pub violations: Vec<Violation>,
    /// Panics in any task.
    pub panics: Vec<String>,
    /// The hash of the trace.
    pub trace_hash: String,
    /// The whole trace (its first events, up to a bound).
    pub trace: crate::trace::Trace,
    /// Trace events relevant to the violations (all faults, and the writes to the documents
    /// and keys concerned), to replay and read.
    pub evidence: Vec<String>,
}

impl Report {
    /// Whether every invariant held.
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.panics.is_empty()
    }
}

/// Runs one scenario with one seed.
pub fn run(config: &RunConfig) -> Result<Report, SimError> {
    let panics_before = panics::count();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let network = config.scenario.network(&mut rng);
    let creation = config.scenario.creation;
    let docs = creation.docs(&config.workload, config.duration);
    let clients = config.nodes * config.workload.clients_per_node;
    // Revival: the documents' cycles, from the seed; faults come before their last cycles.
    let revival_plan = (creation == Creation::Revival)
        .then(|| revival::plan(config.seed, docs, config.workload.revival_cycles, clients));
    let fault_span = revival_plan
        .as_ref()
        .map_or(config.duration, revival::Plan::before_last);
    let plan = config.scenario.plan(&mut rng, config.nodes, fault_span);
    let relay = config.scenario.relay;
    let schedules = revival_plan
        .is_some()
        .then(|| revival::purge_schedules(config.seed, config.nodes));
    let node_schedules = schedules.clone();
    let mut builder = Cluster::builder()
        .nodes(config.nodes)
        .seed(config.seed)
        .latency(network.latency)
        .jitter(network.jitter)
        .configure(move |i, config| {
            // Anti-entropy every 5 s instead of 30: repairs after a fault show within a short
            // run.
            config.replication.anti_entropy_interval_s = 5;
            // Generations of the smallest size: a run's few dozen writes per document compact
            // it several times, under every scenario's faults.
            config.compaction.after_changes = verge_node::config::COMPACTION_AFTER_CHANGES_MIN;
            if relay {
                config.replication.full_fanout_max = 1;
            }
            if let Some((purge, retention)) = node_schedules.as_ref().and_then(|s| s.get(i)) {
                config.storage.purge_interval_s = *purge;
                config.storage.tombstone_retention_s = *retention;
            }
        });
    if revival_plan.is_some() {
        builder = builder.clock_skew(revival::CLOCK_SKEW_MAX);
    }
    let mut cluster = builder.build()?;
    let trace = cluster.trace().clone();
    trace.event(format!(
        "run scenario={} duration={:?}",
        config.scenario.name, config.duration
    ));
    let mut notes = Vec::new();
    if let Some(schedules) = &schedules {
        let clocks: Vec<String> = (0..config.nodes)
            .map(|i| format!("n{i} {:+}ms", cluster.clock_offset_ms(i)))
            .collect();
        notes.push(format!("clock offsets: {}", clocks.join(", ")));
        let purges: Vec<String> = schedules
            .iter()
            .enumerate()
            .map(|(i, (purge, retention))| {
                format!("n{i} every {purge}s (tombstones kept {retention}s)")
            })
            .collect();
        notes.push(format!("purges: {}", purges.join(", ")));
    }
    for line in &notes {
        trace.event(format!("setup {line}"));
    }
    let history: workload::SharedHistory = Arc::new(Mutex::new(History::default()));

    setup(&mut cluster, config, &history)?;
    let start = cluster.elapsed();
    let until = start + config.duration;
    let revival_plan = revival_plan.map(|p| Arc::new(p.starting_at(start)));
    let settles = revival_plan.is_some() && !plan.is_empty();
    for i in 0..config.nodes {
        for k in 0..config.workload.clients_per_node {
            let index = i * config.workload.clients_per_node + k;
            let (history, trace, wl) =
                (Arc::clone(&history), trace.clone(), config.workload.clone());
            let seed = config.seed;
            let racer = RaceClient {
                client: index,
                node: i,
                nodes: config.nodes,
                clients: config.nodes * config.workload.clients_per_node,
                seed,
                start,
                until,
            };
            let reviver = revival_plan.as_ref().map(|plan| RevivalClient {
                client: index,
                node: i,
                seed,
                plan: Arc::clone(plan),
                settle: settles,
            });
            cluster.client(format!("c{index}"), async move {
                match (creation, reviver) {
                    (Creation::Upfront, _) => {
                        let node = NodeApi::of(&host_name(i));
                        workload::client(index, node, wl, seed, until, history, trace).await
                    }
                    (Creation::Racing, _) => workload::race_client(racer, wl, history, trace).await,
                    (Creation::Revival, Some(reviver)) => {
                        revival::client(reviver, wl, history, trace).await
                    }
                    (Creation::Revival, None) => {}
                }
                Ok(())
            });
        }
    }
    if creation == Creation::Upfront {
        for i in 0..config.nodes {
            for k in 0..config.workload.replicas_per_node {
                let rc = ReplicaClient {
                    client: clients + i * config.workload.replicas_per_node + k,
                    node: i,
                    nodes: config.nodes,
                    seed: config.seed,
                    until,
                };
                let (history, trace, wl) =
                    (Arc::clone(&history), trace.clone(), config.workload.clone());
                cluster.client(format!("r{}", rc.client), async move {
                    let node = NodeApi::of(&host_name(rc.node));
                    replica_client::replica_client(rc, node, wl, history, trace).await;
                    Ok(())
                });
            }
        }
    }
    if settles {
        // Once the faults are healed, the last cycles wait until every node holds the same
        // history of every document.
        let (history, trace) = (Arc::clone(&history), trace.clone());
        let nodes = config.nodes;
        let from = start + fault_span + Duration::from_millis(100);
        cluster.client("settle", async move {
            let all = (0..nodes).map(|i| NodeApi::of(&host_name(i))).collect();
            revival::settle(all, docs, from, history, trace).await;
            Ok(())
        });
    }
    // How long the clients may take after the workload's nominal end.
    let until = match &revival_plan {
        Some(plan) if settles => {
            plan.last_closes().max(start + fault_span)
                + revival::SETTLE_TIMEOUT
                + revival::WINDOW
                + Duration::from_secs(10)
        }
        Some(plan) => plan.last_closes() + Duration::from_secs(5),
        None => until,
    };

    let plan_empty = plan.is_empty();
    let mut faults = Vec::new();
    let mut down = vec![false; config.nodes];
    for (at, fault) in plan {
        let due = start + at;
        if due > cluster.elapsed() {
            cluster.run_for(due - cluster.elapsed())?;
        }
        faults.push(format!(
            "{:>8.3}s {fault:?}",
            (cluster.elapsed()).as_secs_f64()
        ));
        apply(&mut cluster, &fault, &mut down);
    }
    // Let the clients finish, then heal everything and restart every node that is down.
    cluster.run_clients(until.saturating_sub(cluster.elapsed()) + Duration::from_secs(10))?;
    cluster.heal();
    for (i, is_down) in down.iter().enumerate() {
        if *is_down {
            cluster.restart(i);
        }
    }
    faults.push(format!(
        "{:>8.3}s heal and restart all",
        cluster.elapsed().as_secs_f64()
    ));

    let ids: Vec<String> = (0..docs).map(|i| creation.doc_id(i)).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let state = cluster.converge(&ids, CONVERGE_TIMEOUT)?;
    if revival_plan.is_some() {
        let line = incarnation_counters(&mut cluster)?;
        trace.event(format!("counters {line}"));
        notes.push(line);
    }
    let line = compaction_counters(&mut cluster, &state)?;
    trace.event(format!("counters {line}"));
    notes.push(line);
    let feeds = read_feeds(&mut cluster)?;
    let departures = cluster.departures();
    let seen = if departures.is_empty() {
        Vec::new()
    } else {
        observe_departures(&mut cluster, &departures)?
    };
    let history = lock(&history);
    // A node lost whole may take the writes it acknowledged last with it: those count as
    // unknown (checked on a copy; the counts below are what the clients saw).
    let forgotten = departures
        .iter()
        .any(|d| matches!(d.how, crate::departure::How::Forgotten { .. }));
    let lost_copy = forgotten.then(|| {
        let mut writes = history.writes.clone();
        let per_node = config.workload.clients_per_node;
        let replicas = config.workload.replicas_per_node.max(1);
        let of_node = |client: usize| {
            if client < clients {
                client / per_node.max(1)
            } else {
                (client - clients) / replicas
            }
        };
        let lost = crate::departure::lost_with_nodes(&departures, &mut writes, of_node);
        (
            History {
                writes,
                ..History::default()
            },
            lost,
        )
    });
    let checked: &History = lost_copy.as_ref().map_or(&history, |(h, _)| h);
    let mut violations = match &revival_plan {
        Some(revival_plan) => check::verify_revival(&state, checked, revival_plan, plan_empty),
        None => check::verify(&state, checked, docs, creation),
    };
    if !departures.is_empty() {
        let survivors = cluster.survivors();
        let line = departure_line(&departures, &survivors, &seen, lost_copy.map(|(_, n)| n));
        trace.event(format!("departures {line}"));
        notes.push(line);
        violations.extend(crate::departure::verify(&departures, &survivors, &seen));
    }
    violations.extend(crate::feed::verify(
        &feeds.0,
        &feeds.1,
        &history.acked_at,
        &state,
        revival_plan.is_none(),
    ));
    for (i, node) in state.nodes.iter().enumerate() {
        for (id, view) in node {
            trace.event(format!(
                "final n{i} {id} {}",
                view.as_ref()
                    .map(|v| format!("{:?} {}", v.heads, v.doc))
                    .unwrap_or_else(|| "none".into())
            ));
        }
    }
    for v in &violations {
        trace.event(format!("violation {v}"));
    }
    let panics = panics::since(panics_before);
    let mut needles: Vec<&str> = vec![
        "fault",
        "restart",
        "heal",
        "start boot",
        "exited",
        "departure",
    ];
    for v in &violations {
        needles.extend(v.needles.iter().map(String::as_str));
    }
    let evidence = if violations.is_empty() && panics.is_empty() {
        Vec::new()
    } else {
        trace.matching(&needles)
    };
    let writes = history
        .writes
        .iter()
        .fold((0, 0, 0), |(a, r, u), w| match w.outcome {
            workload::Outcome::Acked => (a + 1, r, u),
            workload::Outcome::Refused => (a, r + 1, u),
            workload::Outcome::Unknown => (a, r, u + 1),
        });
    Ok(Report {
        seed: config.seed,
        scenario: config.scenario.name,
        nodes: config.nodes,
        notes,
        faults,
        writes,
        reads: history.reads,
        converged: state.converged,
        converge_took: state.took,
        simulated: cluster.elapsed(),
        violations,
        panics,
        trace_hash: trace.hash(),
        trace,
        evidence,
    })
}

/// What compaction did over the run: the highest generation any document reached, and per
/// node, from its metrics, the generations it started and adopted, the changes it carried, the
/// stale syncs it refused, the newer generations it could not take, the client syncs of an
/// older generation whose changes it carried or sent back to be made again, and the thin pushes
/// a compaction overtook (made again on the generation left, or not taken).
fn compaction_counters(
    cluster: &mut Cluster<'_>,
    state: &check::FinalState,
) -> Result<String, SimError> {
    let highest = state
        .nodes
        .iter()
        .flat_map(|n| n.values().flatten().map(|v| v.generation))
        .max()
        .unwrap_or(0);
    let lines = metric_lines(
        cluster,
        "compaction-counters",
        &[
            ("verge_compactions_total", "started"),
            ("verge_generation_adoptions_total", "adopted"),
            ("verge_carried_changes_total", "carried"),
            ("verge_sync_stale_generation_total", "stale"),
            ("verge_compaction_stragglers_total", "stragglers"),
            ("verge_stale_carried_total", "client_carried"),
            ("verge_stale_not_carried_total", "client_replayed"),
            ("verge_thin_rebuilt_total", "thin_rebuilt"),
            ("verge_thin_not_applied_total", "thin_not_applied"),
        ],
    )?;
    Ok(format!("compaction: highest generation {highest}; {lines}"))
}

/// Every node's address and whole change feed, read once the cluster agreed.
fn read_feeds(
    cluster: &mut Cluster<'_>,
) -> Result<(Vec<std::net::IpAddr>, Vec<crate::feed::NodeFeed>), SimError> {
    let out: Arc<Mutex<Vec<crate::feed::NodeFeed>>> = Arc::default();
    let ips: Arc<Mutex<Vec<std::net::IpAddr>>> = Arc::default();
    let (slot, ip_slot) = (Arc::clone(&out), Arc::clone(&ips));
    let hosts = cluster.survivors();
    let nodes = hosts.len();
    cluster.client("feeds", async move {
        let apis: Vec<NodeApi> = hosts.iter().map(|i| NodeApi::of(&host_name(*i))).collect();
        *lock(&ip_slot) = apis.iter().map(NodeApi::ip).collect();
        crate::feed::read_all(apis, slot).await;
        Ok(())
    });
    cluster.run_clients(crate::feed::READ_TIMEOUT * nodes as u32 + Duration::from_secs(30))?;
    let feeds = std::mem::take(&mut *lock(&out));
    let ips = std::mem::take(&mut *lock(&ips));
    Ok((ips, feeds))
}

/// What the survivors' status shows of the departed members, once they agree (polled until
/// it shows every departure, up to [`crate::departure::SPREAD_TIMEOUT`]).
fn observe_departures(
    cluster: &mut Cluster<'_>,
    departures: &[crate::departure::Departure],
) -> Result<Vec<crate::departure::Seen>, SimError> {
    let out: Arc<Mutex<Vec<crate::departure::Seen>>> = Arc::default();
    let slot = Arc::clone(&out);
    let survivors = cluster.survivors();
    let addrs: Vec<String> = departures.iter().map(|d| d.addr.to_string()).collect();
    cluster.client("departed-status", async move {
        crate::departure::observe(survivors, addrs, slot).await;
        Ok(())
    });
    cluster.run_clients(crate::departure::SPREAD_TIMEOUT + Duration::from_secs(30))?;
    let seen = std::mem::take(&mut *lock(&out));
    Ok(seen)
}

/// One line on the departures: who left or was forgotten, what the route answered, what the
/// survivors' status shows, and the writes counted as lost with a forgotten node.
fn departure_line(
    departures: &[crate::departure::Departure],
    survivors: &[usize],
    seen: &[crate::departure::Seen],
    lost: Option<usize>,
) -> String {
    let mut parts = Vec::new();
    for d in departures {
        let how = match d.how {
            crate::departure::How::Left => "left".to_owned(),
            crate::departure::How::Forgotten { via, .. } => format!("forgotten at n{via}"),
        };
        let answer = match &d.answer {
            Ok((status, body)) => match body.get("told") {
                Some(told) => format!("{status}, told {told}"),
                None => status.to_string(),
            },
            Err(e) => e.clone(),
        };
        parts.push(format!(
            "n{} {how} at {:.3}s ({answer})",
            d.node,
            d.at.as_secs_f64()
        ));
    }
    let status: Vec<String> = survivors
        .iter()
        .zip(seen)
        .map(|(i, s)| {
            let compactions = departures
                .first()
                .and_then(|d| d.compactions.iter().find(|(j, _)| j == i))
                .and_then(|(_, c)| *c);
            format!(
                "n{i} members={} departed={:?} compactions {}->{}",
                s.members.len(),
                s.departed,
                compactions.map_or("n/a".into(), |c| c.to_string()),
                s.compactions.map_or("n/a".into(), |c| c.to_string()),
            )
        })
        .collect();
    let lost = lost
        .map(|n| {
            format!(
                "; {n} writes acknowledged within {:?} of a forgotten node's power cut counted as unknown",
                crate::departure::LOST_WITH_NODE
            )
        })
        .unwrap_or_default();
    format!(
        "departures: {}; {}{lost}",
        parts.join(", "),
        status.join(", ")
    )
}

/// Per node, the sum of each metric's series, as `n<i> label=value …`, comma-separated.
fn metric_lines(
    cluster: &mut Cluster<'_>,
    client: &str,
    metrics: &'static [(&'static str, &'static str)],
) -> Result<String, SimError> {
    let out: Arc<Mutex<Vec<String>>> = Arc::default();
    let slot = Arc::clone(&out);
    let hosts = cluster.survivors();
    cluster.client(client, async move {
        for i in hosts {
            let api = NodeApi::of(&host_name(i));
            let mut line = format!("n{i}");
            for (name, what) in metrics {
                let value = api.metric_series(name).await.filter(|s| !s.is_empty());
                match value {
                    Some(series) => {
                        let n: f64 = series.values().sum();
                        line.push_str(&format!(" {what}={n}"));
                    }
                    None => line.push_str(&format!(" {what}=n/a")),
                }
            }
            lock(&slot).push(line);
        }
        Ok(())
    });
    cluster.run_clients(Duration::from_secs(30))?;
    let lines = lock(&out).join(", ");
    Ok(lines)
}

/// What each node's purges and incarnations did over the run, from its metrics: documents
/// purged (to a stub), histories replaced by a newer incarnation (its own revivals and ones
/// received), stale changes dropped, and changes left to anti-entropy because a broadcast
/// queue was full.
fn incarnation_counters(cluster: &mut Cluster<'_>) -> Result<String, SimError> {
    let lines = metric_lines(
        cluster,
        "incarnation-counters",
        &[
            ("verge_purged_docs_total", "purged"),
            ("verge_incarnations_replaced_total", "replaced"),
            ("verge_sync_stale_incarnation_total", "stale"),
            ("verge_broadcast_dropped_total", "unbroadcast"),
        ],
    )?;
    Ok(format!("incarnations: {lines}"))
}

/// Readies the cluster for the clients. Upfront: creates the shared documents, replicated to
/// every node. Racing and revival: creates nothing, and waits until every node answers, so
/// that the first round (or cycle) races between all of them.
fn setup(
    cluster: &mut Cluster<'_>,
    config: &RunConfig,
    history: &workload::SharedHistory,
) -> Result<(), SimError> {
    let (history, trace) = (Arc::clone(history), cluster.trace().clone());
    let nodes = config.nodes;
    let creation = config.scenario.creation;
    let docs = config.workload.docs;
    cluster.client("setup", async move {
        let all = (0..nodes).map(|i| NodeApi::of(&host_name(i))).collect();
        match creation {
            Creation::Upfront => {
                workload::setup(NodeApi::of("n0"), all, docs, history, trace).await
            }
            Creation::Racing | Creation::Revival => {
                workload::await_nodes(all, history, trace).await
            }
        }
        Ok(())
    });
    if !cluster.run_clients(SETUP_LIMIT)? {
        return Err(SimError::Invalid(format!(
            "the setup ({creation:?}) did not finish within {SETUP_LIMIT:?}"
        )));
    }
    Ok(())
}

fn apply(cluster: &mut Cluster<'_>, fault: &Fault, down: &mut [bool]) {
    match fault {
        Fault::Partition(a, b) => cluster.partition(a, b),
        Fault::OneWay(a, b) => cluster.partition_oneway(a, b),
        Fault::Heal => cluster.heal(),
        Fault::Loss(p) => cluster.set_loss(*p),
        Fault::Duplicate(p) => cluster.set_duplication(*p),
        Fault::Slow(i, latency) => cluster.slow_node(*i, *latency),
        Fault::Crash(i) => {
            cluster.crash(*i);
            down[*i] = true;
        }
        Fault::Restart(i) if down[*i] => {
            cluster.restart(*i);
            down[*i] = false;
        }
        Fault::Restart(_) => {}
        Fault::DiskErrors(i, n) => cluster.fail_syncs(*i, *n),
        Fault::Leave(i) => cluster.leave(*i),
        Fault::Forget { node, via } => {
            cluster.forget(*node, *via);
            // Never restarted: it is gone for good.
            down[*node] = false;
        }
        Fault::PowerCutAfterWrites(i, k) => {
            cluster.trace().event(format!(
                "fault power cut of n{i} after {k} more disk writes"
            ));
            if let Some(disk) = cluster.disk(*i) {
                disk.power_cut_after_writes(*k);
            }
        }
    }
}
