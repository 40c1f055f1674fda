//! A cluster of real Verge nodes on turmoil hosts, and the controls to break it.
//!
//! Each host `n<i>` runs `verge_node::node::run_on`: the production node, with QUIC over the
//! simulated UDP network, the HTTP API over simulated TCP, redb over the simulated disk, the
//! simulated clock, and every random choice drawn from the seed. The driver advances time in
//! steps and applies faults between steps; clients (workloads, checks, the user's own) run as
//! turmoil clients calling the nodes' HTTP API.

use std::cell::Cell;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use verge_node::config::Config;
use verge_node::node::{Platform, run_on};
use verge_node::replication::Transport;
use verge_node::store::writer::WriterMode;
use verge_node::store::{Store, StoreOptions};

use crate::api::{API_PORT, GOSSIP_PORT};
use crate::certs::ClusterCerts;
use crate::clock::SimClock;
use crate::disk::{Disk, open_database};
use crate::net::tcp::SimListener;
use crate::net::udp::SimUdpSocket;
use crate::trace::Trace;

/// Where each simulated node keeps its database.
pub const DB_PATH: &str = "/verge/verge.redb";
/// Most nodes in a simulated cluster.
pub const NODES_MAX: usize = 64;
/// How long turmoil may run a simulation at most, beyond what the run asked for.
const SIM_SLACK: Duration = Duration::from_secs(600);

thread_local! {
    /// Simulated time as the driver last saw it, for events recorded outside any host.
    static DRIVER_NOW: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// Simulated time since the start of the run: the host's clock inside a host, the driver's
/// otherwise.
pub fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_else(|| DRIVER_NOW.with(Cell::get))
}

/// Why a cluster could not be built or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The configuration is unusable.
    #[error("invalid simulation: {0}")]
    Invalid(String),
    /// turmoil stopped the simulation (a client failed, a host panicked, or time ran out).
    #[error("simulation failed: {0}")]
    Turmoil(String),
}

/// Adjusts a node's configuration before it starts: `(node index, config)`.
pub type Configure = Arc<dyn Fn(usize, &mut Config) + Send + Sync>;

/// Builds a [`Cluster`].
#[derive(Clone)]
pub struct ClusterBuilder {
    nodes: usize,
    seed: u64,
    latency: Duration,
    jitter: Duration,
    loss: f64,
    configure: Option<Configure>,
    limit: Duration,
    clock_skew: Duration,
}

impl std::fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("nodes", &self.nodes)
            .field("seed", &self.seed)
            .field("latency", &self.latency)
            .field("jitter", &self.jitter)
            .field("loss", &self.loss)
            .field("clock_skew", &self.clock_skew)
            .finish_non_exhaustive()
    }
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            nodes: 3,
            seed: 0,
            latency: Duration::from_millis(1),
            jitter: Duration::ZERO,
            loss: 0.0,
            configure: None,
            limit: Duration::from_secs(3600),
            clock_skew: Duration::ZERO,
        }
    }
}

impl ClusterBuilder {
    /// Number of nodes (`n0` … `n{N-1}`), 1 to [`NODES_MAX`].
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// The seed every random choice of the run derives from.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// One-way latency of every link. Fixed latency keeps packet order; see [`Self::jitter`].
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Extra random latency per packet, up to this much: packets overtake each other.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Probability that a packet is lost, on every link.
    pub fn loss(mut self, loss: f64) -> Self {
        self.loss = loss;
        self
    }

    /// Adjusts each node's configuration (for example a shorter anti-entropy interval).
    pub fn configure(mut self, f: impl Fn(usize, &mut Config) + Send + Sync + 'static) -> Self {
        self.configure = Some(Arc::new(f));
        self
    }

    /// Sets every host's wall clock off from the simulation's by its own fixed amount, drawn
    /// from the seed between `-max` and `+max` (default zero: every clock agrees). The node
    /// reads wall-clock time (expiry, change timestamps) through it; timers and timeouts run on
    /// simulated time, as monotonic clocks do.
    pub fn clock_skew(mut self, max: Duration) -> Self {
        self.clock_skew = max;
        self
    }

    /// Simulated time after which the run stops with an error (default one hour).
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// Registers the hosts. Nothing runs until the cluster is stepped.
    pub fn build<'a>(self) -> Result<Cluster<'a>, SimError> {
        if self.nodes == 0 || self.nodes > NODES_MAX {
            return Err(SimError::Invalid(format!(
                "{} nodes: a cluster has 1 to {NODES_MAX}",
                self.nodes
            )));
        }
        if !(0.0..1.0).contains(&self.loss) {
            return Err(SimError::Invalid(format!(
                "loss {} must be in [0, 1)",
                self.loss
            )));
        }
        let certs = Arc::new(
            ClusterCerts::generate(self.seed, self.nodes)
                .map_err(|e| SimError::Invalid(e.to_string()))?,
        );
        let mut builder = turmoil::Builder::new();
        builder
            .rng_seed(self.seed)
            .epoch(crate::clock::epoch())
            .simulation_duration(self.limit + SIM_SLACK)
            .min_message_latency(self.latency)
            .max_message_latency(self.latency + self.jitter)
            .udp_capacity(UDP_QUEUE)
            .tcp_capacity(TCP_QUEUE);
        // A crash keeps a random prefix of whole blocks of each write not yet synced: torn
        // writes, as a disk with 4 KiB sectors gives.
        builder.fs().block_size(TORN_WRITE_BLOCK);
        let mut sim = builder.build();
        // A new run starts at zero (the previous run on this thread left its end time here).
        DRIVER_NOW.with(|n| n.set(Duration::ZERO));
        let trace = Trace::default();
        let mut nodes = Vec::with_capacity(self.nodes);
        for i in 0..self.nodes {
            let clock_offset_ms = clock_offset(self.seed, i, self.clock_skew);
            let host = Arc::new(HostSpec {
                clock_offset_ms,
                index: i,
                nodes: self.nodes,
                seed: self.seed,
                certs: Arc::clone(&certs),
                disk: Disk::new(),
                boots: AtomicU64::new(0),
                configure: self.configure.clone(),
                trace: trace.clone(),
                exited: std::sync::Mutex::new(None),
                duplication: Arc::new(crate::net::udp::Duplication::new(host_seed(
                    self.seed,
                    i,
                    u64::MAX,
                ))),
            });
            let spec = Arc::clone(&host);
            sim.host(host_name(i), move || run_host(Arc::clone(&spec)));
            nodes.push(NodeState {
                spec: host,
                up: true,
                departed: false,
                crashed_at: None,
            });
        }
        for i in 0..self.nodes {
            let ip = sim.lookup(host_name(i).as_str());
            if ip != gossip_addr(i).ip() {
                return Err(SimError::Invalid(format!(
                    "host n{i} got {ip}, not {}",
                    gossip_addr(i).ip()
                )));
            }
        }
        trace.event(format!(
            "cluster nodes={} seed={} latency={:?} jitter={:?} loss={}",
            self.nodes, self.seed, self.latency, self.jitter, self.loss
        ));
        if !self.clock_skew.is_zero() {
            let offsets: Vec<String> = nodes
                .iter()
                .map(|n| format!("n{}={:+}ms", n.spec.index, n.spec.clock_offset_ms))
                .collect();
            trace.event(format!("clock offsets {}", offsets.join(" ")));
        }
        let mut cluster = Cluster {
            sim,
            nodes,
            trace,
            seed: self.seed,
            clients: 0,
            latency: self.latency,
            departures: Arc::default(),
        };
        if self.loss > 0.0 {
            cluster.set_loss(self.loss);
        }
        Ok(cluster)
    }
}

/// Bytes of a write that survive a crash together (or not at all).
pub const TORN_WRITE_BLOCK: u64 = 4096;
/// Datagrams a simulated socket queues before dropping (turmoil drops silently beyond it).
pub const UDP_QUEUE: usize = 4096;
/// Segments a simulated TCP socket queues.
pub const TCP_QUEUE: usize = 4096;

/// The gossip address of node `i`: turmoil gives hosts 192.168.0.1, .2, … in the order they
/// are registered, and the nodes are registered first (checked when a cluster is built).
pub fn gossip_addr(i: usize) -> SocketAddr {
    let last = u8::try_from(i + 1).unwrap_or(u8::MAX);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 0, last)), GOSSIP_PORT)
}

/// The host name of node `i`.
pub fn host_name(i: usize) -> String {
    format!("n{i}")
}

struct HostSpec {
    index: usize,
    /// How far the host's wall clock is off the simulation's, in ms.
    clock_offset_ms: i64,
    nodes: usize,
    seed: u64,
    certs: Arc<ClusterCerts>,
    disk: Disk,
    /// Starts so far: each start draws fresh randomness from the seed, as a real restart
    /// would from the OS.
    boots: AtomicU64,
    configure: Option<Configure>,
    trace: Trace,
    /// The duplication knob of the node's gossip socket.
    duplication: Arc<crate::net::udp::Duplication>,
    /// When the node's process exited by itself, until it is restarted.
    exited: std::sync::Mutex<Option<Duration>>,
}

struct NodeState {
    spec: Arc<HostSpec>,
    up: bool,
    /// The node left the cluster or was forgotten: it is never started again.
    departed: bool,
    /// When its power was last cut.
    crashed_at: Option<Duration>,
}

/// The wall-clock offset of node `index`: uniform in `-max..=max` at millisecond resolution,
/// from the seed (and zero when `max` is).
fn clock_offset(seed: u64, index: usize, max: Duration) -> i64 {
    let max = i64::try_from(max.as_millis()).unwrap_or(i64::MAX / 4);
    if max == 0 {
        return 0;
    }
    let draw = host_seed(seed, index, u64::MAX - 1);
    (draw % (2 * max as u64 + 1)) as i64 - max
}

/// The seed of start `boot` of node `index`.
fn host_seed(seed: u64, index: usize, boot: u64) -> u64 {
    let mut x =
        seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ boot.rotate_left(32);
    // splitmix64 finaliser: nearby inputs give unrelated seeds.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

async fn run_host(spec: Arc<HostSpec>) -> turmoil::Result {
    // A node that stops on an error exits, as a process would; the driver restarts it (see
    // `Cluster::supervise`), as a service manager would.
    match run_node(&spec).await {
        Err(e) => spec
            .trace
            .event(format!("{} exited: {e}", host_name(spec.index))),
        // Only a node that left the cluster stops by itself without an error.
        Ok(()) => spec
            .trace
            .event(format!("{} stopped", host_name(spec.index))),
    }
    *crate::lock(&spec.exited) = Some(now());
    Ok(())
}

async fn run_node(spec: &HostSpec) -> turmoil::Result {
    {
        let boot = spec.boots.fetch_add(1, Ordering::Relaxed);
        let seed = host_seed(spec.seed, spec.index, boot);
        let name = host_name(spec.index);
        spec.trace.event(format!("{name} start boot={boot}"));
        let db = open_database(DB_PATH, &spec.disk)?;
        let mut nonce_seed = [0u8; 32];
        nonce_seed[..8].copy_from_slice(&seed.to_le_bytes());
        let store = Store::from_database(
            db,
            DB_PATH.into(),
            StoreOptions {
                encryption_key: None,
                nonce_seed,
            },
        )?;
        let tls = spec.certs.node_tls(spec.index, seed)?;
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let socket = SimUdpSocket::bind(SocketAddr::new(any, GOSSIP_PORT))
            .await?
            .with_duplication(Arc::clone(&spec.duplication));
        let transport = Transport::with_socket(
            Arc::new(socket),
            Arc::new(quinn::TokioRuntime),
            &tls,
            Some(seed),
        )?;
        let listener = SimListener::bind(SocketAddr::new(any, API_PORT)).await?;
        let mut config = Config::defaults()?;
        config.node_id = Some(name.clone());
        config.data_dir = "/verge".into();
        config.api_addr = SocketAddr::new(turmoil::lookup(name.as_str()), API_PORT);
        config.gossip_addr = SocketAddr::new(any, GOSSIP_PORT);
        // The socket reports 0.0.0.0: peers must learn the host's own address.
        config.advertise_addr = Some(SocketAddr::new(turmoil::lookup(name.as_str()), GOSSIP_PORT));
        config.peers = (0..spec.nodes)
            .filter(|j| *j != spec.index)
            .map(|j| SocketAddr::new(turmoil::lookup(host_name(j).as_str()), GOSSIP_PORT))
            .collect();
        config.auth = verge_node::auth::Auth::Open { explicit: true };
        // The store is in memory: no filesystem's free space to watch (and a run must not
        // depend on the host's disk).
        config.storage.min_free_bytes = 0;
        if let Some(configure) = &spec.configure {
            configure(spec.index, &mut config);
        }
        let platform = Platform {
            clock: Arc::new(SimClock::with_offset(spec.clock_offset_ms)),
            seed: Some(seed),
            store,
            node_id: name,
            transport,
            writer: WriterMode::Task,
            addr_file: None,
        };
        run_on(config, platform, listener, std::future::pending()).await?;
        Ok(())
    }
}

/// How long a node that exited stays down before it is started again.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// A simulated cluster.
pub struct Cluster<'a> {
    sim: turmoil::Sim<'a>,
    nodes: Vec<NodeState>,
    trace: Trace,
    seed: u64,
    clients: usize,
    latency: Duration,
    departures: crate::departure::SharedDepartures,
}

impl std::fmt::Debug for Cluster<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.nodes.len())
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl<'a> Cluster<'a> {
    /// A builder with 3 nodes, seed 0, 1 ms links, no loss.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never: a cluster has at least one).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The trace of the run so far.
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    /// Starts a client: a task on its own host that calls the nodes' API (see
    /// [`crate::api::NodeApi`]). Its failure fails the run.
    pub fn client<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = turmoil::Result> + 'static,
    {
        let name = name.into();
        self.clients += 1;
        self.trace.event(format!("client {name} started"));
        self.sim.client(name.as_str(), task);
    }

    /// Advances the simulation by `duration`.
    pub fn run_for(&mut self, duration: Duration) -> Result<(), SimError> {
        let until = self.sim.elapsed() + duration;
        while self.sim.elapsed() < until {
            self.step()?;
        }
        Ok(())
    }

    /// Advances the simulation until every client has finished, or `limit` passed; `true`
    /// when they finished.
    pub fn run_clients(&mut self, limit: Duration) -> Result<bool, SimError> {
        let until = self.sim.elapsed() + limit;
        while self.sim.elapsed() < until {
            if self.step()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn step(&mut self) -> Result<bool, SimError> {
        DRIVER_NOW.with(|n| n.set(self.sim.elapsed()));
        let done = self
            .sim
            .step()
            .map_err(|e| SimError::Turmoil(e.to_string()))?;
        DRIVER_NOW.with(|n| n.set(self.sim.elapsed()));
        self.supervise();
        Ok(done)
    }

    /// Restarts nodes whose process exited by itself, [`RESTART_DELAY`] after it did.
    fn supervise(&mut self) {
        let now = self.sim.elapsed();
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            let due = {
                let mut exited = crate::lock(&node.spec.exited);
                match *exited {
                    Some(at) if node.up && now >= at + RESTART_DELAY => {
                        *exited = None;
                        true
                    }
                    Some(_) if !node.up => {
                        *exited = None;
                        // A departed node's process ended: nothing of it goes on (no task
                        // left on its host, no write to its disk), as after a real exit.
                        if node.departed {
                            node.spec.disk.power_cut();
                            self.trace.event(format!("n{i} process ended"));
                            self.sim.crash(host_name(i).as_str());
                        }
                        false
                    }
                    _ => false,
                }
            };
            if due {
                self.trace.event(format!("supervisor restarts n{i}"));
                self.sim.bounce(host_name(i).as_str());
            }
        }
    }

    fn names(group: &[usize]) -> Vec<String> {
        group.iter().map(|i| host_name(*i)).collect()
    }

    /// Cuts every link between `a` and `b`, both ways.
    pub fn partition(&mut self, a: &[usize], b: &[usize]) {
        self.trace.event(format!("fault partition {a:?} | {b:?}"));
        for x in Self::names(a) {
            for y in Self::names(b) {
                self.sim.partition(x.as_str(), y.as_str());
            }
        }
    }

    /// Cuts the links from `from` to `to` only: `to` still reaches `from`.
    pub fn partition_oneway(&mut self, from: &[usize], to: &[usize]) {
        self.trace
            .event(format!("fault partition one-way {from:?} -> {to:?}"));
        for x in Self::names(from) {
            for y in Self::names(to) {
                self.sim.partition_oneway(x.as_str(), y.as_str());
            }
        }
    }

    /// Repairs every link between nodes and restores their latency and loss.
    pub fn heal(&mut self) {
        self.trace.event("heal all links");
        let n = self.nodes.len();
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    let (a, b) = (host_name(i), host_name(j));
                    self.sim.repair(a.as_str(), b.as_str());
                    self.sim
                        .set_link_latency(a.as_str(), b.as_str(), self.latency);
                    self.sim.set_link_fail_rate(a.as_str(), b.as_str(), 0.0);
                }
            }
        }
        for node in &self.nodes {
            node.spec.duplication.set_rate(0.0);
        }
    }

    /// Sets the one-way latency of every link of node `i`.
    pub fn slow_node(&mut self, i: usize, latency: Duration) {
        self.trace
            .event(format!("fault slow n{i} latency={latency:?}"));
        for j in 0..self.nodes.len() {
            if j != i {
                self.sim
                    .set_link_latency(host_name(i).as_str(), host_name(j).as_str(), latency);
            }
        }
    }

    /// Sets the packet loss probability of every link between nodes (clients keep reliable
    /// links to their node). turmoil's loss comes in bursts: a lost packet breaks the link
    /// until a later packet repairs it.
    pub fn set_loss(&mut self, loss: f64) {
        self.trace.event(format!("fault loss={loss}"));
        let n = self.nodes.len();
        for i in 0..n {
            for j in (i + 1)..n {
                self.sim
                    .set_link_fail_rate(host_name(i).as_str(), host_name(j).as_str(), loss);
            }
        }
    }

    /// Makes every node repeat this fraction of the datagrams it sends to its peers.
    pub fn set_duplication(&mut self, p: f64) {
        self.trace.event(format!("fault duplication={p}"));
        for node in &self.nodes {
            node.spec.duplication.set_rate(p);
        }
    }

    /// Fails the next `n` disk syncs of node `i`: its commits fail.
    pub fn fail_syncs(&mut self, i: usize, n: u32) {
        let Some(node) = self.nodes.get(i) else {
            return;
        };
        self.trace
            .event(format!("fault disk n{i} fails next {n} syncs"));
        node.spec.disk.fail_next_syncs(u64::from(n));
    }

    /// The fault handle of node `i`'s disk.
    pub fn disk(&self, i: usize) -> Option<&Disk> {
        self.nodes.get(i).map(|n| &n.spec.disk)
    }

    /// Crashes node `i` as a power cut does: whatever was not synced to its disk is lost, and
    /// nothing more is written (the node's destructors do not get to commit).
    pub fn crash(&mut self, i: usize) {
        let Some(node) = self.nodes.get_mut(i) else {
            return;
        };
        if !node.up {
            return;
        }
        self.trace.event(format!("fault crash n{i}"));
        node.spec.disk.power_cut();
        node.up = false;
        node.crashed_at = Some(self.sim.elapsed());
        self.sim.crash(host_name(i).as_str());
    }

    /// Starts node `i` again on what its disk kept.
    pub fn restart(&mut self, i: usize) {
        let Some(node) = self.nodes.get_mut(i) else {
            return;
        };
        if node.departed {
            return;
        }
        self.trace.event(format!("restart n{i}"));
        node.spec.disk.restore();
        node.up = true;
        self.sim.bounce(host_name(i).as_str());
    }

    /// Runs until every node holds documents `ids` with the same heads and JSON, or `timeout`
    /// passes; returns what each node holds, with `converged` telling which.
    pub fn converge(
        &mut self,
        ids: &[&str],
        timeout: Duration,
    ) -> Result<crate::check::FinalState, SimError> {
        let out: crate::check::SharedFinal = Arc::default();
        let hosts = self.survivors();
        let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        let prefix = common_prefix(&ids);
        let slot = Arc::clone(&out);
        let name = format!("converge-{}", self.clients);
        self.client(name, async move {
            let apis = hosts
                .iter()
                .map(|i| crate::api::NodeApi::of(&host_name(*i)))
                .collect();
            crate::check::converge(apis, ids, prefix, timeout, Arc::clone(&slot)).await;
            crate::lock(&slot).hosts = hosts;
            Ok(())
        });
        self.run_clients(timeout + Duration::from_secs(30))?;
        let state = crate::lock(&out).clone();
        Ok(state)
    }

    /// How far node `i`'s wall clock is off the simulation's, in ms (see
    /// [`ClusterBuilder::clock_skew`]).
    pub fn clock_offset_ms(&self, i: usize) -> i64 {
        self.nodes.get(i).map_or(0, |n| n.spec.clock_offset_ms)
    }

    /// Whether node `i` is running.
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes.get(i).is_some_and(|n| n.up)
    }

    /// The nodes that did not depart (left or forgotten), in order.
    pub fn survivors(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].departed)
            .collect()
    }

    /// The departures so far, with what the admin routes answered (filled in as they answer).
    pub fn departures(&self) -> Vec<crate::departure::Departure> {
        crate::lock(&self.departures).clone()
    }

    /// Makes node `i` leave the cluster through `POST /v1/admin/leave`, called by a client
    /// at once: the node announces its departure and stops, and is never started again.
    pub fn leave(&mut self, i: usize) {
        if self.nodes.get(i).is_none_or(|n| n.departed) {
            return;
        }
        self.trace.event(format!("fault leave n{i}"));
        self.depart(i, crate::departure::How::Left);
    }

    /// Makes node `via` forget node `i` through `POST /v1/admin/members/forget`, called by a
    /// client at once; node `i` is never started again (crash it first).
    pub fn forget(&mut self, i: usize, via: usize) {
        if self.nodes.get(i).is_none_or(|n| n.departed) || via >= self.nodes.len() {
            return;
        }
        self.trace.event(format!("fault forget n{i} at n{via}"));
        let crashed = self.nodes[i].crashed_at;
        self.depart(i, crate::departure::How::Forgotten { via, crashed });
    }

    fn depart(&mut self, i: usize, how: crate::departure::How) {
        // Down for the supervisor: the process that exits after leaving stays stopped.
        self.nodes[i].departed = true;
        self.nodes[i].up = false;
        let survivors = self.survivors();
        let departure = crate::departure::Departure {
            node: i,
            addr: gossip_addr(i),
            how,
            at: self.sim.elapsed(),
            answer: Err("not called yet".into()),
            compactions: Vec::new(),
        };
        let (out, trace) = (Arc::clone(&self.departures), self.trace.clone());
        self.client(format!("depart-n{i}"), async move {
            crate::departure::call(departure, survivors, out, trace).await;
            Ok(())
        });
    }
}

/// The longest prefix shared by all `ids` (listing under it shows them all).
fn common_prefix(ids: &[String]) -> String {
    let Some(first) = ids.first() else {
        return String::new();
    };
    let mut len = first.len();
    for id in &ids[1..] {
        len = len.min(
            first
                .bytes()
                .zip(id.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    while !first.is_char_boundary(len) {
        len -= 1;
    }
    first[..len].to_owned()
}
