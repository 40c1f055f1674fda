//! Starting, running and stopping a node.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::net::SocketAddr;

use axum::serve::ListenerExt;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::documents::{Documents, DocumentsConfig};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::replication::{Replication, ReplicationConfig, Transport};
use crate::store::space::{DiskSpace, SPACE_CHECK_INTERVAL};
use crate::store::writer::{self, WriterMode};
use crate::store::{Store, StoreError, StoreOptions};
use crate::tls;
use verge_core::gossip::BroadcastPolicy;

/// File in the data directory holding the API's bound address while the node runs.
pub const API_ADDR_FILE: &str = "api.addr";
/// How long shutdown waits for open requests before it stops waiting.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the writer to commit what is queued.
const WRITER_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the last backup segment.
const BACKUP_FINISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The backup location is unusable.
    #[error("backups: {0}")]
    Backup(String),
    /// Storage could not be opened.
    #[error("opening storage in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: PathBuf,
        /// The error.
        source: StoreError,
    },
    /// The cluster TLS files could not be created or loaded.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The API's TLS files could not be loaded.
    #[error("API TLS: {0}")]
    ApiTls(#[from] crate::http::tls::ApiTlsError),
    /// The gossip endpoint or replication could not start.
    #[error("{context}: {source}")]
    Replication {
        /// What was being done.
        context: String,
        /// The error.
        source: crate::replication::TransportError,
    },
    /// Reading or writing the node's own state in the store failed at start.
    #[error("{context}: {source}")]
    State {
        /// What was being done.
        context: String,
        /// The error.
        source: StoreError,
    },
    /// The stored documents could not be indexed at start.
    #[error("indexing stored documents: {0}")]
    Index(#[source] crate::documents::DocError),
    /// A commit failed: the node stopped, and a restart reopens (and repairs) the database.
    /// Writes acknowledged before it are durable; the failed ones were never acknowledged.
    #[error("storage failed, node stopped (restart it): {0}")]
    Storage(#[source] crate::store::writer::CommitError),
    /// A socket or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// What a node runs on besides its configuration. [`run`] builds it from the operating system
/// (files, sockets, the system clock and randomness); the simulator builds it from its virtual
/// disk, network and clock with a seed, and calls [`run_on`], so both run the same code.
#[derive(Debug)]
pub struct Platform {
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Seed of every random choice the node makes (actors, batch ids, peer choice, SWIM);
    /// `None` draws from the operating system.
    pub seed: Option<u64>,
    /// The opened store.
    pub store: Store,
    /// The node's name among its peers.
    pub node_id: String,
    /// The QUIC endpoint for peers, already bound.
    pub transport: Transport,
    /// Where the writer runs.
    pub writer: WriterMode,
    /// A file to hold the API's address while the node serves (`DATA_DIR/api.addr`).
    pub addr_file: Option<PathBuf>,
}

/// Random numbers from the platform's seed, or from the operating system without one.
#[derive(Debug)]
struct Draw(Option<StdRng>);

impl Draw {
    fn new(seed: Option<u64>) -> Self {
        Self(seed.map(StdRng::seed_from_u64))
    }

    fn next_u64(&mut self) -> u64 {
        match &mut self.0 {
            Some(rng) => rng.next_u64(),
            None => rand::rng().next_u64(),
        }
    }

    fn bytes32(&mut self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        match &mut self.0 {
            Some(rng) => rng.fill_bytes(&mut bytes),
            None => rand::rng().fill_bytes(&mut bytes),
        }
        bytes
    }
}

/// Runs a node on the operating system until `shutdown` resolves, then drains: stops accepting
/// requests, lets open ones finish, commits every queued write and closes the store.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let store_err = |source| NodeError::Store {
        dir: config.data_dir.clone(),
        source,
    };
    let store = Store::open(
        &config.data_dir,
        StoreOptions {
            encryption_key: config.encryption_key.clone(),
            nonce_seed: Draw::new(None).bytes32(),
        },
    );
    let store = store.map_err(store_err)?;
    let node_id = resolve_node_id(&config, &store).map_err(store_err)?;
    let addr_file = config.data_dir.join(API_ADDR_FILE);
    let _ = std::fs::remove_file(&addr_file);
    let tls_files =
        tls::ensure_node_files(config.tls.clone(), &config.data_dir.join("tls"), &node_id)?;
    let node_tls = tls::NodeTls::load(&tls_files)?;
    let transport = Transport::bind(config.gossip_addr, &node_tls).map_err(|source| {
        NodeError::Replication {
            context: format!("binding the gossip endpoint to {}", config.gossip_addr),
            source,
        }
    })?;
    let listener = TcpListener::bind(config.api_addr)
        .await
        .map_err(|source| NodeError::Io {
            context: format!("binding the API to {}", config.api_addr),
            source,
        })?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    let platform = Platform {
        clock: Arc::new(SystemClock),
        seed: None,
        store,
        node_id,
        transport,
        writer: WriterMode::Thread,
        addr_file: Some(addr_file),
    };
    run_on(config, platform, listener, shutdown).await
}

/// Runs a node on `platform`, serving the API on `listener`, until `shutdown` resolves; then
/// drains as [`run`] does.
pub async fn run_on<L>(
    config: Config,
    platform: Platform,
    listener: L,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Platform {
        clock,
        seed,
        store,
        node_id,
        transport,
        writer: writer_mode,
        addr_file,
    } = platform;
    let mut draw = Draw::new(seed);
    let store = Arc::new(store);
    let metrics = Arc::new(Metrics::new());
    let space = Arc::new(DiskSpace::new(
        &config.data_dir,
        config.storage.min_free_bytes,
        Arc::clone(&metrics),
    ));
    let (events, _) = tokio::sync::broadcast::channel(crate::documents::WATCH_BUFFER);
    if let Ok(bounds) = store.feed_bounds() {
        metrics.feed_last_seq.set(bounds.last as i64);
    }
    let (writer, writer_join, mut storage_failure) = writer::spawn(
        Arc::clone(&store),
        Arc::clone(&space),
        config.storage.write_queue,
        config.storage.batch_max,
        Arc::clone(&metrics),
        writer_mode,
        writer::FeedSink {
            events: events.clone(),
            retain_events: config.feed.retain_events,
        },
    )
    .map_err(|source| NodeError::Io {
        context: "starting the writer".into(),
        source,
    })?;
    let (docs, compaction_rx) = Documents::new(
        Arc::clone(&store),
        writer,
        events,
        Arc::clone(&clock),
        Arc::clone(&metrics),
        DocumentsConfig {
            cache_bytes: config.storage.cache_bytes,
            compact_after_changes: config.storage.compact_after_changes,
            generation_after_changes: config.compaction.after_changes,
            generation_after_bytes: config.compaction.after_bytes,
            retain_generations: config.compaction.retain_generations,
            space: Arc::clone(&space),
        },
        draw.next_u64(),
    );
    let mut background = vec![
        tokio::spawn(Arc::clone(&docs).run_compactor(compaction_rx)),
        spawn_purger(Arc::clone(&docs), &config),
    ];
    if space.min_free_bytes() > 0 {
        let space = Arc::clone(&space);
        background.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SPACE_CHECK_INTERVAL);
            loop {
                ticker.tick().await;
                space.check();
            }
        }));
    }
    let (follower, feed, indexed) =
        crate::replication::Follower::start(&docs, Arc::clone(&metrics))
            .map_err(NodeError::Index)?;

    let generation = if space.full() {
        // A write to a full disk would latch redb's failure and take reads down with it.
        let generation = last_generation(&store).map_or(0, |g| g.saturating_add(1));
        tracing::warn!(
            "the disk is nearly full: this start's membership generation is not kept (peers may \
             keep the node down until it restarts with space)"
        );
        generation.max(u64::try_from(clock.now_ms()).unwrap_or(0))
    } else {
        next_generation(&store, clock.now_ms()).map_err(|source| NodeError::State {
            context: "keeping the membership generation".into(),
            source,
        })?
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (replication, replication_tasks) = Replication::start(
        ReplicationConfig {
            advertise_addr: config.advertise_addr,
            peers: config.peers.clone(),
            batch_window: Duration::from_millis(config.replication.batch_window_ms),
            batch_bytes_max: config.replication.batch_bytes_max,
            anti_entropy_interval: Duration::from_secs(config.replication.anti_entropy_interval_s),
            relay_window: Duration::from_millis(config.replication.relay_window_ms),
            relay_delivery_timeout: Duration::from_millis(
                config.replication.relay_delivery_timeout_ms.max(1),
            ),
            policy: BroadcastPolicy {
                full_fanout_max: config.replication.full_fanout_max,
            },
            generation,
        },
        node_id.clone(),
        transport,
        Arc::clone(&docs),
        (follower, feed),
        Arc::clone(&metrics),
        Arc::clone(&clock),
        draw.next_u64(),
        stop_rx.clone(),
    )
    .map_err(|source| NodeError::Replication {
        context: "starting replication".into(),
        source,
    })?;
    background.extend(replication_tasks);
    let (subscriptions, subscription_tasks) = crate::subscriptions::start(
        config.subscriptions.clone(),
        &docs,
        &store,
        &metrics,
        &node_id,
        stop_rx.clone(),
    );
    background.extend(subscription_tasks);
    let backup = crate::backup::start(
        &config.backup,
        Arc::clone(&store),
        config.encryption_key.as_ref(),
        Arc::clone(&clock),
        Arc::clone(&metrics),
        &node_id,
        // Drawn only when used, so a run without backups draws what it always drew.
        if config.backup.to.is_some() {
            draw.bytes32()
        } else {
            [0; 32]
        },
    )
    .map_err(|e| NodeError::Backup(e.to_string()))?;
    let (backup, backup_task, backup_finish) = match backup {
        Some((backup, task, finish)) => (Some(backup), Some(task), Some(finish)),
        None => (None, None, None),
    };
    docs.set_membership(&(Arc::clone(&replication) as Arc<dyn crate::documents::Membership>));

    let api_tls = match &config.api_tls {
        Some(files) => Some(http::tls::server_config(files)?),
        None => None,
    };
    let api_addr = listener.local_addr().map_err(|source| NodeError::Io {
        context: "reading the API address".into(),
        source,
    })?;
    let body_timeouts = metrics.api_timeout("body");
    let leave_requested = Arc::new(tokio::sync::Notify::new());
    let state = Arc::new(AppState {
        docs: Arc::clone(&docs),
        metrics,
        node_id: node_id.clone(),
        api_addr: api_addr.to_string(),
        started_at_ms: clock.now_ms(),
        clock,
        ready: AtomicBool::new(false),
        replication: Some(Arc::clone(&replication)),
        rate_limits: http::limits::RateLimits::new(
            &config.auth,
            config.limits.requests_per_second_per_token,
        ),
        auth: config.auth.clone(),
        body_deadline: http::serve::BodyDeadline {
            timeout: Duration::from_secs(config.limits.body_timeout_s),
            timed_out: body_timeouts,
            stop: stop_rx.clone(),
        },
        cors: Arc::new(config.cors.clone()),
        idempotency: Arc::default(),
        subscriptions,
        backup,
        leave_requested: Arc::clone(&leave_requested),
    });
    if let Some(addr_file) = &addr_file {
        // A convenience for tools: a full disk must not keep the node from serving.
        if let Err(e) = std::fs::write(addr_file, format!("{api_addr}\n")) {
            tracing::warn!(path = %addr_file.display(), error = %e, "could not write the API address file");
        }
    }
    state.ready.store(true, Ordering::Release);
    tracing::info!(
        node_id = %node_id,
        api_addr = %api_addr,
        data_dir = %config.data_dir.display(),
        gossip_addr = %replication.local_addr(),
        peers = config.peers.len(),
        documents = indexed,
        actor = %docs.actor(),
        config = ?config.source,
        api_tls = api_tls.is_some(),
        encrypted_at_rest = store.encrypted(),
        auth = auth_summary(&config.auth),
        "node serving"
    );
    if matches!(config.auth, crate::auth::Auth::Open { .. }) && !api_addr.ip().is_loopback() {
        tracing::warn!(
            api_addr = %api_addr,
            "the API is served without authentication beyond loopback ([auth] mode = \"none\")"
        );
    }
    let drain_state = Arc::clone(&state);
    let serve_metrics = Arc::clone(&state.metrics);
    let serve_limits = http::serve::ServeLimits {
        connections_max: config.limits.api_connections_max,
        per_client_max: config.limits.api_connections_per_client_max,
        header_timeout: Duration::from_secs(config.limits.header_timeout_s),
        idle_timeout: Duration::from_secs(config.limits.idle_timeout_s),
    };
    let router = http::router(Arc::clone(&state), stop_rx.clone());
    let probes = http::probes_router(Arc::clone(&state));
    let mut failure = storage_failure.clone();
    let leave_on_shutdown = config.replication.leave_on_shutdown;
    let leaving = Arc::clone(&replication);
    let mut server = tokio::spawn(async move {
        let drain = async move {
            let signalled = tokio::select! {
                biased;
                () = shutdown => true,
                () = leave_requested.notified() => {
                    tracing::info!("left the cluster; shutting down: draining requests and the write queue");
                    false
                }
                failed = failure.wait_for(Option::is_some) => {
                    drop(failed);
                    tracing::error!("storage failed; stopping so that a restart repairs the database");
                    false
                }
            };
            if signalled {
                if leave_on_shutdown {
                    // Before the drain, while the endpoint and membership still run.
                    tracing::info!("shutting down: leaving the cluster first (leave_on_shutdown)");
                    match leaving.leave().await {
                        Ok(_) | Err(crate::replication::MembersError::AlreadyLeft) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "leaving the cluster failed; stopping anyway");
                        }
                    }
                }
                tracing::info!("shutting down: draining requests and the write queue");
            }
            drop(leaving);
            drain_state.ready.store(false, Ordering::Release);
            let _ = stop_tx.send(true);
        };
        match api_tls {
            None => {
                http::serve::serve(listener, router, probes, serve_limits, serve_metrics, drain)
                    .await;
            }
            Some(tls_config) => {
                let tls = http::TlsListener::new(listener, tls_config)?;
                http::serve::serve(tls, router, probes, serve_limits, serve_metrics, drain).await;
            }
        }
        Ok(())
    });
    let mut stop_rx = stop_rx;
    tokio::select! {
        biased;
        result = &mut server => report_server_end(result),
        _ = stop_rx.wait_for(|stop| *stop) => {
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
                Ok(result) => report_server_end(result),
                Err(_) => {
                    tracing::warn!("open requests did not finish in {DRAIN_TIMEOUT:?}; closing them");
                    server.abort();
                }
            }
        }
    }
    replication.close();
    for task in background {
        task.abort();
    }
    drop(state);
    drop(docs);
    drop(replication);
    // Once every handle to the writer is gone, it commits what is queued and stops. Tasks of
    // closed peer connections let go of theirs within moments.
    match tokio::time::timeout(WRITER_DRAIN_TIMEOUT, writer_join.join()).await {
        Ok(true) => {}
        Ok(false) => tracing::error!("the writer failed while draining"),
        Err(_) => tracing::error!(
            "the write queue did not drain in {WRITER_DRAIN_TIMEOUT:?}; unacknowledged writes are lost"
        ),
    }
    // What the drained writer committed last goes to the backup before the node stops.
    if let Some(finish) = backup_finish {
        finish.run(BACKUP_FINISH_TIMEOUT).await;
    }
    if let Some(task) = backup_task {
        task.abort();
    }
    if let Some(addr_file) = &addr_file {
        let _ = std::fs::remove_file(addr_file);
    }
    let failed = storage_failure.borrow_and_update().clone();
    if let Some(error) = failed {
        tracing::error!(error = %error, "node stopped: storage failed");
        return Err(NodeError::Storage(error));
    }
    tracing::info!("node stopped");
    Ok(())
}

/// How the API authenticates, for the start-up log line (token names and counts only).
fn auth_summary(auth: &crate::auth::Auth) -> String {
    match auth {
        crate::auth::Auth::Open { explicit: true } => "none (configured)".into(),
        crate::auth::Auth::Open { explicit: false } => "none (loopback only)".into(),
        crate::auth::Auth::Tokens(tokens) => format!("{} token(s)", tokens.len()),
    }
}

fn report_server_end(result: Result<std::io::Result<()>, tokio::task::JoinError>) {
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the API server failed"),
        Err(e) => tracing::error!(error = %e, "the API server task failed"),
    }
}

fn spawn_purger(docs: Arc<Documents>, config: &Config) -> JoinHandle<()> {
    let interval = Duration::from_secs(config.storage.purge_interval_s);
    let retention_ms = i64::try_from(config.storage.tombstone_retention_s.saturating_mul(1000))
        .unwrap_or(i64::MAX);
    let retain_previous_ms =
        i64::try_from(config.compaction.retain_previous_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let feed_retain_ms =
        i64::try_from(config.feed.retain_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
    let idempotency_retain_ms =
        i64::try_from(config.idempotency.retain_hours.saturating_mul(3_600_000))
            .unwrap_or(i64::MAX);
    let idempotency_keys_max = config.idempotency.keys_max;
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match docs.purge_expired(retention_ms).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(purged = n, "purged expired documents and old tombstones"),
                Err(e) => tracing::warn!(error = %e, "purge failed"),
            }
            match docs.release_retained(retain_previous_ms) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(released = n, "released retained generations"),
                Err(e) => tracing::warn!(error = %e, "releasing retained generations failed"),
            }
            let dropped =
                in_batches(|| docs.trim_remembered(idempotency_retain_ms, idempotency_keys_max))
                    .await;
            log_trim(dropped, "idempotency records");
            log_trim(
                in_batches(|| docs.trim_feed(feed_retain_ms)).await,
                "change feed records",
            );
        }
    })
}

/// Runs `trim` until a call drops less than a full batch ([`crate::documents::TRIM_BATCH`]),
/// letting other tasks run between batches. Returns the total dropped.
async fn in_batches(
    mut trim: impl FnMut() -> Result<u64, crate::documents::DocError>,
) -> Result<u64, crate::documents::DocError> {
    let mut total = 0;
    loop {
        let n = trim()?;
        total += n;
        if n < crate::documents::TRIM_BATCH {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

fn log_trim(dropped: Result<u64, crate::documents::DocError>, what: &str) {
    match dropped {
        Ok(0) => {}
        Ok(n) => tracing::debug!(dropped = n, "dropped old {what}"),
        Err(e) => tracing::warn!(error = %e, "trimming {what} failed"),
    }
}

/// Where the last start's membership generation is kept.
const GENERATION_KEY: &str = "swim_generation";

/// The membership generation of this start, kept before it is used: the wall clock, but always
/// above the last start's. Peers take the higher generation of a member as the current one, so
/// a node that ran with its clock ahead and restarts with the right clock is still taken back
/// (with the wall clock alone its peers kept it `down` until they restarted). The wall clock
/// still counts so that a node rebuilt on an empty data directory, under the same address,
/// normally wins over its former self.
fn next_generation(store: &Store, now_ms: i64) -> Result<u64, StoreError> {
    let previous = last_generation(store);
    let wall = u64::try_from(now_ms).unwrap_or(0);
    let generation = previous.map_or(wall, |previous| wall.max(previous.saturating_add(1)));
    store.set_node_value(GENERATION_KEY, &generation.to_be_bytes())?;
    Ok(generation)
}

/// The generation the last start kept, if any.
fn last_generation(store: &Store) -> Option<u64> {
    store
        .node_value(GENERATION_KEY)
        .ok()
        .flatten()
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
        .map(u64::from_be_bytes)
}

/// The configured node id, else the one kept in the store, else a new one kept from now on.
fn resolve_node_id(config: &Config, store: &Store) -> Result<String, StoreError> {
    if let Some(id) = &config.node_id {
        return Ok(id.clone());
    }
    if let Some(id) = store.node_value("node_id")? {
        return Ok(String::from_utf8_lossy(&id).into_owned());
    }
    let id = format!("node-{:08x}", rand::rng().next_u32());
    store.set_node_value("node_id", id.as_bytes())?;
    Ok(id)
}
