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
    let plan = config
        .scenario
        .plan(&mut rng, config.nodes, config.duration);
    let relay = config.scenario.relay;
    let mut cluster = Cluster::builder()
        .nodes(config.nodes)
        .seed(config.seed)
        .latency(network.latency)
        .jitter(network.jitter)
        .configure(move |_, config| {
            // Anti-entropy every 5 s instead of 30: repairs after a fault show within a short
            // run.
            config.replication.anti_entropy_interval_s = 5;
            if relay {
                config.replication.full_fanout_max = 1;
            }
        })
        .build()?;
    let trace = cluster.trace().clone();
    trace.event(format!(
        "run scenario={} duration={:?}",
        config.scenario.name, config.duration
    ));
    let history: workload::SharedHistory = Arc::new(Mutex::new(History::default()));
    let creation = config.scenario.creation;
    let docs = creation.docs(&config.workload, config.duration);

    setup(&mut cluster, config, &history)?;
    let start = cluster.elapsed();
    let until = start + config.duration;
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
            cluster.client(format!("c{index}"), async move {
                match creation {
                    Creation::Upfront => {
                        let node = NodeApi::of(&host_name(i));
                        workload::client(index, node, wl, seed, until, history, trace).await
                    }
                    Creation::Racing => workload::race_client(racer, wl, history, trace).await,
                }
                Ok(())
            });
        }
    }

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
    let history = lock(&history);
    let violations = check::verify(&state, &history, docs, creation);
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
    let mut needles: Vec<&str> = vec!["fault", "restart", "heal", "start boot", "exited"];
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

/// Readies the cluster for the clients. Upfront: creates the shared documents, replicated to
/// every node. Racing: creates nothing, and waits until every node answers, so that the first
/// round races between all of them.
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
            Creation::Racing => workload::await_nodes(all, history, trace).await,
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
