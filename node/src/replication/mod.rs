//! Replication: every change committed here reaches every peer, and anti-entropy repairs what
//! a broadcast missed.
//!
//! - **Broadcast.** Changes made through this node's API are batched for a short window and
//!   sent to peers, each batch on its own QUIC stream: to all of them in a small cluster; in a
//!   large one to a relay that every node picks alike and that forwards them, merged over its
//!   own window, to everyone else. The receiver applies and persists; it acknowledges only
//!   when a writer waits for replicas (`?replicas=N`), and those batches go to every peer.
//! - **Anti-entropy.** On every new connection and periodically, a node reconciles its
//!   document digests with a peer's (negentropy) and runs an Automerge sync session on its own
//!   stream for each document that differs. A node that was down or new catches up this way.
//! - **Members.** Seed peers come from configuration; SWIM (foca) detects failures and spreads
//!   membership, so a node that joins through one seed becomes known to all. A node that
//!   leaves ([`Replication::leave`]) or that an operator forgets ([`Replication::forget`])
//!   departs: every member drops it and stops dialling it until it starts again.
//!
//! The decisions (routing, batching, reconciliation) live in `verge_core`; this module drives
//! them with sockets, tasks and the clock.

pub mod follow;
mod session;
mod stability;
pub mod transport;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::Connection;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use verge_core::gossip::{
    Batcher, BroadcastPolicy, HOPS_FINAL, HOPS_TO_RELAY, RelayBatcher, Route, forwards,
};
use verge_core::membership::{
    self, Departure, ForgetError, MemberId, Membership, Output as MembershipOutput,
};
use verge_core::replication::deliveries::{Deliveries, Expired};
pub use verge_core::replication::peers::CLOCK_SKEW_WARN_MS;
use verge_core::replication::peers::{Action, ClockStanding, Learned, Peers};
use verge_core::replication::timers::TimerQueue;
use verge_core::wire::{ChangeBatch, DocChanges, PeerMessage};

use crate::clock::Clock;
use crate::documents::{DocError, Documents};
use crate::metrics::Metrics;
pub use follow::{FEED_CAPACITY, Follower, LocalChange, ReplicaWaiter};
pub use session::SessionError;
pub use transport::{Transport, TransportError};

/// How long a broadcast waits for a peer's acknowledgement, and a send without one for the
/// stream to take its frame.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Received batches waiting to be merged into the relay's window; when full, the changes are
/// left to anti-entropy (counted in `verge_broadcast_dropped_total`).
const RELAY_QUEUE: usize = verge_core::limits::RELAY_QUEUE_MAX;
/// How often peers are dialled, members exchanged and liveness checked.
const TICK: Duration = Duration::from_millis(500);
/// Most anti-entropy document sessions run at once per peer.
pub const SYNC_SESSIONS_PER_PEER_MAX: usize = verge_core::limits::SYNC_SESSIONS_PER_PEER_MAX;

/// Replication settings.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// The address peers reach this node at, when it is not the bound one (listening on
    /// every interface, NAT): it is this node's identity among its peers.
    pub advertise_addr: Option<SocketAddr>,
    /// Seed peers.
    pub peers: Vec<SocketAddr>,
    /// How long changes wait to be batched.
    pub batch_window: Duration,
    /// A batch (also a relay's) is sent at once when it holds this many bytes.
    pub batch_bytes_max: usize,
    /// Time between anti-entropy rounds with each peer.
    pub anti_entropy_interval: Duration,
    /// How long a relay merges the changes it forwards.
    pub relay_window: Duration,
    /// How long a batch sent to the relay may go unconfirmed by QUIC (the relay's transport
    /// acknowledging the whole stream, about one round trip) before the origin sends it to
    /// every peer itself: a relay that died keeps its cached connection until the idle
    /// timeout, and its batches would otherwise wait for anti-entropy.
    pub relay_delivery_timeout: Duration,
    /// Who gets a batch.
    pub policy: BroadcastPolicy,
    /// This start's SWIM generation: above every earlier start's of the same data directory
    /// (see `node::next_generation`), so that peers take the node back whatever its clock did.
    pub generation: u64,
}

/// What `GET /v1/status` shows of a peer.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    /// The peer's gossip address.
    pub addr: String,
    /// `up` with a live connection, `down` otherwise.
    pub state: &'static str,
    /// Smoothed round-trip time.
    pub rtt_ms: Option<f64>,
    /// Broadcast batches sent to the peer and not yet acknowledged (only batches of writes
    /// waiting for replicas ask for an acknowledgement).
    pub lag_batches: usize,
    /// When anti-entropy last started with the peer, ms since the epoch.
    pub last_sync_ms: Option<i64>,
    /// How far the peer's wall clock is ahead of this node's (negative: behind), as last
    /// measured; `None` until measured.
    pub clock_offset_ms: Option<i64>,
    /// Whether the peer is a configured seed (else it was learned from other members).
    pub seed: bool,
    /// The peer's node name, once known.
    pub name: Option<String>,
}

/// How long a clock comparison waits for the peer's answer.
const CLOCK_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a leaving node tries to hand its announcement to each member it tells (dial
/// included), before it stops anyway: the members that miss it declare it down as they would
/// a crashed node.
const LEAVE_DELIVERY_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a leaving node spends handing its writes to the members.
const HAND_OFF_TIMEOUT: Duration = Duration::from_secs(10);

/// A membership packet and where it goes.
type Packet = (SocketAddr, Vec<u8>);

/// Input of the membership task.
#[derive(Debug)]
enum MembershipInput {
    /// A packet from a peer.
    Data(Vec<u8>),
    /// Leave the cluster; answers the packets that announce it, for the caller to deliver.
    Leave(oneshot::Sender<Result<Vec<Packet>, String>>),
    /// Forget a member; answers once this node dropped it.
    Forget(SocketAddr, oneshot::Sender<Result<Departure, ForgetError>>),
}

/// What [`Replication::leave`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LeaveReport {
    /// Members whose QUIC stack confirmed receiving the announcement.
    pub told: Vec<String>,
    /// Members the announcement was sent to without a confirmation in time; they learn it
    /// from the others, or declare the node down.
    pub unconfirmed: Vec<String>,
}

/// Why a leave or a forget did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MembersError {
    /// This node already left (or is leaving).
    #[error("this node already left the cluster")]
    AlreadyLeft,
    /// The forget was refused.
    #[error(transparent)]
    Forget(#[from] ForgetError),
    /// Replication is stopping.
    #[error("replication is stopping")]
    Stopping,
    /// The membership state machine refused.
    #[error("membership: {0}")]
    Membership(String),
}

/// Membership packets and timers waiting for the membership task.
const MEMBERSHIP_QUEUE: usize = verge_core::limits::MEMBERSHIP_QUEUE_MAX;

/// Changes a peer sent to this node as its relay, new here, to forward to everyone else.
#[derive(Debug)]
struct Relayed {
    /// The origin, which does not get them back.
    from: SocketAddr,
    docs: Vec<DocChanges>,
}

/// The replication side of a node.
#[derive(Debug)]
pub struct Replication {
    config: ReplicationConfig,
    local_addr: SocketAddr,
    transport: Transport,
    docs: Arc<Documents>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// The monotonic origin of every schedule (batch windows, anti-entropy rounds, clock
    /// checks): a wall clock that steps back must not stall them.
    started: tokio::time::Instant,
    /// Who the members are and what to do with them next.
    peers: Mutex<Peers>,
    /// The digest index and the feed of local changes, following the node's commits.
    follower: Arc<Follower>,
    /// Acknowledged batches in flight per member (`lag_batches` in status).
    in_flight: Mutex<BTreeMap<SocketAddr, Arc<AtomicUsize>>>,
    next_batch_id: AtomicU64,
    membership_tx: mpsc::Sender<MembershipInput>,
    /// To the broadcast task, which owns the relay's window.
    relay_tx: mpsc::Sender<Relayed>,
    /// To the broadcast task, which owns the deliveries in flight: what streams did.
    delivery_tx: mpsc::Sender<Delivery>,
    /// Whether this node left the cluster (or is leaving).
    left: AtomicBool,
}

/// What a stream carrying a batch did, for the deliveries in flight.
#[derive(Debug, Clone, Copy)]
enum Delivery {
    /// The relay's transport confirmed the batch.
    RelayTook(u64),
    /// The batch could not be sent to the relay.
    RelayRefused(u64),
    /// The peer answered `Persisted` for the batch.
    Acked(u64, SocketAddr),
}

/// Stream outcomes waiting for the broadcast task; beyond it one is lost: an acknowledgement
/// (the writer waiting for it times out, its write durable all the same) or a relay's
/// confirmation (the batch is then sent to everyone too, which is harmless).
const DELIVERY_EVENTS_MAX: usize = verge_core::limits::DELIVERY_EVENTS_MAX;

/// The deliveries in flight, owned by the broadcast task.
type InFlight = Deliveries<Vec<DocChanges>, Arc<ReplicaWaiter>>;

/// A ticker for a loop that runs every `period`; a tick the loop was too busy for is not made
/// up in a burst.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// Waits for `ticker`'s next tick: `false` once `stop` turns true instead.
async fn tick_or_stop(
    ticker: &mut tokio::time::Interval,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        biased;
        _ = ticker.tick() => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replication {
    /// Starts replication tasks over `transport` (bound by the caller: on a UDP socket, or on
    /// the simulator's network); they stop when `stop` turns true.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: ReplicationConfig,
        node_name: String,
        transport: Transport,
        docs: Arc<Documents>,
        (follower, feed_rx): (Arc<Follower>, mpsc::Receiver<LocalChange>),
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        seed: u64,
        stop: watch::Receiver<bool>,
    ) -> Result<(Arc<Self>, Vec<JoinHandle<()>>), TransportError> {
        let (membership_tx, membership_rx) = mpsc::channel(MEMBERSHIP_QUEUE);
        let (relay_tx, relay_rx) = mpsc::channel(RELAY_QUEUE);
        let (delivery_tx, delivery_rx) = mpsc::channel(DELIVERY_EVENTS_MAX);
        let local_addr = match config.advertise_addr {
            Some(addr) => addr,
            None => transport.local_addr()?,
        };
        let interval_ms =
            i64::try_from(config.anti_entropy_interval.as_millis()).unwrap_or(i64::MAX);
        let peers = Peers::new(local_addr, &config.peers, interval_ms);
        let repl = Arc::new(Self {
            config,
            local_addr,
            transport,
            docs: Arc::clone(&docs),
            metrics,
            clock,
            started: tokio::time::Instant::now(),
            peers: Mutex::new(peers),
            follower,
            in_flight: Mutex::default(),
            next_batch_id: AtomicU64::new(seed),
            membership_tx: membership_tx.clone(),
            relay_tx,
            delivery_tx,
            left: AtomicBool::new(false),
        });
        let me = MemberId {
            addr: local_addr,
            name: node_name,
            generation: repl.config.generation,
        };
        let seeds: Vec<SocketAddr> = repl
            .config
            .peers
            .iter()
            .copied()
            .filter(|a| *a != local_addr)
            .collect();
        let membership = Membership::new(
            me,
            seeds.clone(),
            seed,
            membership::config(seeds.len() as u32 + 1),
        );
        let tasks = vec![
            tokio::spawn(Arc::clone(&repl).accept_loop(stop.clone())),
            tokio::spawn(Arc::clone(&repl).broadcast_loop(
                feed_rx,
                relay_rx,
                delivery_rx,
                stop.clone(),
            )),
            tokio::spawn(Arc::clone(&repl).tick_loop(stop.clone())),
            tokio::spawn(Arc::clone(&repl).stability_loop(stop.clone())),
            tokio::spawn(Arc::clone(&repl).membership_loop(membership, membership_rx, stop)),
        ];
        Ok((repl, tasks))
    }

    /// The gossip address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Closes the endpoint.
    pub fn close(&self) {
        self.transport.close();
    }

    /// Leaves the cluster: announces this node's departure to a few members and waits until
    /// their QUIC stacks confirmed it (at most `LEAVE_DELIVERY_TIMEOUT`), so the
    /// announcement is out before the endpoint closes; the members pass it on. The members
    /// then drop this node and stop dialling it, until it starts again (a new generation).
    /// The caller stops the node afterwards: it takes no further part in membership.
    pub async fn leave(self: &Arc<Self>) -> Result<LeaveReport, MembersError> {
        if self.left.swap(true, Ordering::AcqRel) {
            return Err(MembersError::AlreadyLeft);
        }
        self.hand_off().await;
        let (tx, rx) = oneshot::channel();
        self.membership_tx
            .send(MembershipInput::Leave(tx))
            .await
            .map_err(|_| MembersError::Stopping)?;
        let packets = rx
            .await
            .map_err(|_| MembersError::Stopping)?
            .map_err(MembersError::Membership)?;
        let deliveries = packets
            .into_iter()
            .map(|(to, data)| async move { (to, self.deliver_confirmed(to, data).await) });
        let mut report = LeaveReport::default();
        for (to, confirmed) in futures_util::future::join_all(deliveries).await {
            let list = if confirmed {
                &mut report.told
            } else {
                &mut report.unconfirmed
            };
            if !list.contains(&to.to_string()) {
                list.push(to.to_string());
            }
        }
        tracing::info!(told = ?report.told, unconfirmed = ?report.unconfirmed, "left the cluster");
        Ok(report)
    }

    /// Before a departure: refuses further local writes, waits for those under way to be
    /// answered, then runs a catch-up anti-entropy session with every live member, so that
    /// every write this node acknowledged is on the others before they drop it (a broadcast
    /// still in its batch window would otherwise go down with the node).
    async fn hand_off(self: &Arc<Self>) {
        self.docs.stop_local_writes();
        let deadline = tokio::time::Instant::now() + HAND_OFF_TIMEOUT;
        while self.docs.writes_in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let peers: Vec<SocketAddr> = self
            .members()
            .into_iter()
            .filter(|m| m.state == "up")
            .filter_map(|m| m.addr.parse().ok())
            .collect();
        let sessions = peers.iter().map(|&addr| async move {
            let session = async {
                let conn = self.connect(addr).await.ok()?;
                session::run_anti_entropy(self, &conn, true).await.ok()
            };
            let done = tokio::time::timeout_at(deadline, session).await;
            (addr, matches!(done, Ok(Some(_))))
        });
        let results = futures_util::future::join_all(sessions).await;
        let synced = results.iter().filter(|(_, ok)| *ok).count();
        if synced == 0 {
            tracing::warn!(
                peers = peers.len(),
                "leaving without handing writes to any member: writes only this node holds go with it"
            );
        } else {
            tracing::info!(
                synced,
                of = peers.len(),
                "handed writes to the members before leaving"
            );
        }
    }

    /// Sends a membership packet on a stream and waits for the peer's QUIC stack to confirm
    /// it (a datagram may still sit in the endpoint when it closes).
    async fn deliver_confirmed(self: &Arc<Self>, to: SocketAddr, data: Vec<u8>) -> bool {
        let message = PeerMessage::Membership(data);
        let attempt = async {
            let conn = self.connect(to).await.ok()?;
            Some(deliver(&conn, &message, &self.metrics, Some(LEAVE_DELIVERY_TIMEOUT)).await)
        };
        matches!(
            tokio::time::timeout(LEAVE_DELIVERY_TIMEOUT, attempt).await,
            Ok(Some(true))
        )
    }

    /// Forgets the member at `addr`, a node that will not return: this node drops it at once
    /// and stops dialling it, and the departure spreads so that every member does. A node
    /// that starts again at that address later is a new member.
    pub async fn forget(&self, addr: SocketAddr) -> Result<Departure, MembersError> {
        let (tx, rx) = oneshot::channel();
        self.membership_tx
            .send(MembershipInput::Forget(addr, tx))
            .await
            .map_err(|_| MembersError::Stopping)?;
        Ok(rx.await.map_err(|_| MembersError::Stopping)??)
    }

    /// The departed members' addresses (left or forgotten), which this node does not dial.
    pub fn departed(&self) -> Vec<String> {
        lock(&self.peers)
            .departed()
            .map(ToString::to_string)
            .collect()
    }

    /// Whether this node has no members: none configured and none learned.
    pub fn alone(&self) -> bool {
        lock(&self.peers).addrs().is_empty()
    }

    /// Every known peer, for status.
    pub fn members(&self) -> Vec<MemberStatus> {
        // Schedules run on monotonic time; status shows wall time.
        let (now, wall) = (self.mono_ms(), self.clock.now_ms());
        let in_flight = lock(&self.in_flight);
        lock(&self.peers)
            .iter()
            .map(|(addr, peer)| {
                let conn = self.transport.cached(*addr);
                let up = peer.shown_up(conn.is_some());
                MemberStatus {
                    addr: addr.to_string(),
                    state: if up { "up" } else { "down" },
                    rtt_ms: conn.map(|c| c.rtt().as_secs_f64() * 1000.0),
                    lag_batches: in_flight.get(addr).map_or(0, |n| n.load(Ordering::Acquire)),
                    last_sync_ms: peer
                        .last_sync_at()
                        .map(|at| wall.saturating_sub(now.saturating_sub(at))),
                    clock_offset_ms: peer.clock_offset_ms,
                    seed: peer.seed,
                    name: peer.name.clone(),
                }
            })
            .collect()
    }

    /// Milliseconds since replication started, on the monotonic clock.
    fn mono_ms(&self) -> i64 {
        i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    fn peer_addrs(&self) -> Vec<SocketAddr> {
        lock(&self.peers).addrs()
    }

    /// The members SWIM last declared alive, the view the relay is chosen from: every node's
    /// converges to the same, so they agree on the relay.
    fn alive_peers(&self) -> Vec<SocketAddr> {
        lock(&self.peers).alive()
    }

    fn learn(&self, addr: SocketAddr) {
        match lock(&self.peers).learn(addr) {
            Learned::New => tracing::info!(peer = %addr, "learned a new member"),
            Learned::Full => tracing::debug!(peer = %addr, "the member table is full"),
            Learned::Known | Learned::Itself | Learned::Departed => {}
        }
    }

    async fn accept_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let incoming = tokio::select! {
                biased;
                incoming = self.transport.endpoint().accept() => incoming,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Some(incoming) = incoming else { return };
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => {
                        this.learn(remote);
                        this.serve_connection(conn).await;
                    }
                    Err(e) => {
                        this.metrics.peer_refused("handshake");
                        tracing::warn!(peer = %remote, error = %e, "refused a peer connection (TLS handshake failed: is its certificate a member certificate of this cluster's CA, made by `verge certs node`?)");
                    }
                }
            });
        }
    }

    /// Serves the streams a peer opens on `conn` until it closes: bidirectional ones for
    /// exchanges that answer (sessions, acknowledged batches, clock checks), unidirectional
    /// ones for messages that need no answer (broadcasts, membership that missed a datagram).
    async fn serve_connection(self: Arc<Self>, conn: Connection) {
        loop {
            tokio::select! {
                // Biased: an unbiased select draws its order from a random source the simulator
                // does not seed.
                biased;
                stream = conn.accept_bi() => match stream {
                    Ok((send, recv)) => {
                        let this = Arc::clone(&self);
                        let conn = conn.clone();
                        tokio::spawn(async move { this.serve_stream(conn, send, recv).await });
                    }
                    Err(_) => return,
                },
                stream = conn.accept_uni() => match stream {
                    Ok(recv) => {
                        let this = Arc::clone(&self);
                        let conn = conn.clone();
                        tokio::spawn(async move { this.serve_uni_stream(conn, recv).await });
                    }
                    Err(_) => return,
                },
                datagram = conn.read_datagram() => match datagram {
                    Ok(datagram) => self.receive_datagram(&conn, &datagram),
                    Err(_) => return,
                },
            }
        }
    }

    /// A membership packet that came as a QUIC datagram: handed to the membership task, or
    /// dropped (counted) when it is malformed or the task is behind; SWIM copes with loss.
    fn receive_datagram(&self, conn: &Connection, datagram: &[u8]) {
        let Some(packet) = datagram.strip_prefix(&membership::DATAGRAM_HEADER) else {
            self.metrics.peer_refused("datagram");
            tracing::debug!(peer = %conn.remote_address(), "a datagram of an unknown kind or version");
            return;
        };
        if self
            .membership_tx
            .try_send(MembershipInput::Data(packet.to_vec()))
            .is_err()
        {
            self.metrics.peer_refused("membership_queue_full");
        }
    }

    /// Sends a membership packet: as one QUIC datagram on the open connection (no stream, no
    /// task), else on a stream of a connection dialled for it (a peer not connected yet, or
    /// one that takes no datagrams).
    fn send_membership(self: &Arc<Self>, to: SocketAddr, data: Vec<u8>) {
        if let Some(conn) = self.transport.cached(to) {
            let len = membership::DATAGRAM_HEADER.len() + data.len();
            if conn.max_datagram_size().is_some_and(|max| len <= max) {
                let mut datagram = Vec::with_capacity(len);
                datagram.extend_from_slice(&membership::DATAGRAM_HEADER);
                datagram.extend_from_slice(&data);
                if conn.send_datagram(datagram.into()).is_ok() {
                    self.metrics.peer_message_sent("membership");
                }
                return;
            }
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let Ok(conn) = this.connect(to).await else {
                return;
            };
            if let Ok(mut send) = conn.open_uni().await {
                let message = PeerMessage::Membership(data);
                let _ = transport::write_frame(&mut send, &message, &this.metrics).await;
                transport::finish(send);
            }
        });
    }

    async fn serve_stream(
        self: Arc<Self>,
        conn: Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let first = match transport::read_frame(&mut recv).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                self.metrics.peer_refused("frame");
                tracing::warn!(peer = %conn.remote_address(), error = %e, "malformed frame from a peer");
                return;
            }
        };
        let result = match first {
            PeerMessage::Changes(batch) => self
                .receive_batch(&conn, Some(send), batch)
                .await
                .map_err(SessionError::from),
            PeerMessage::Reconcile { message } => {
                session::respond_reconcile(&self, conn.clone(), send, recv, message).await
            }
            PeerMessage::DocSync { doc, message } => {
                session::respond_doc_sync(&self.docs, &self.metrics, send, recv, doc, message).await
            }
            PeerMessage::Membership(data) => {
                self.take_membership(data);
                transport::finish(send);
                Ok(())
            }
            PeerMessage::StabilityQuery { docs } => self
                .answer_stability(send, recv, docs)
                .await
                .map_err(SessionError::from),
            PeerMessage::Clock { .. } => {
                let reply = PeerMessage::Clock {
                    now_ms: self.clock.now_ms(),
                };
                let written = transport::write_frame(&mut send, &reply, &self.metrics).await;
                transport::finish(send);
                written.map_err(SessionError::from)
            }
            other => {
                tracing::debug!(?other, "unexpected first frame on a stream");
                Ok(())
            }
        };
        match result {
            Ok(()) => {}
            // The peer broke a protocol (or sent what does not apply): worth an operator's
            // look, and counted.
            Err(e @ SessionError::Reconcile(_)) => {
                self.metrics.peer_refused("reconcile");
                tracing::warn!(peer = %conn.remote_address(), error = %e, "malformed reconciliation from a peer");
            }
            Err(e @ (SessionError::DocSync(_) | SessionError::Doc(DocError::InvalidSync(_)))) => {
                self.metrics.peer_refused("doc_sync");
                tracing::warn!(peer = %conn.remote_address(), error = %e, "malformed document sync from a peer");
            }
            Err(e) => {
                tracing::debug!(peer = %conn.remote_address(), error = %e, "peer stream ended with an error");
            }
        }
    }

    /// Serves a unidirectional stream: one message that needs no answer.
    async fn serve_uni_stream(self: Arc<Self>, conn: Connection, mut recv: quinn::RecvStream) {
        let result = match transport::read_frame(&mut recv).await {
            Ok(Some(PeerMessage::Changes(batch))) => self.receive_batch(&conn, None, batch).await,
            Ok(Some(PeerMessage::Membership(data))) => {
                self.take_membership(data);
                Ok(())
            }
            Ok(Some(other)) => {
                self.metrics.peer_refused("frame");
                tracing::debug!(
                    kind = other.kind(),
                    "a message that needs an answer came on a one-way stream"
                );
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                self.metrics.peer_refused("frame");
                tracing::warn!(peer = %conn.remote_address(), error = %e, "malformed frame from a peer");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %conn.remote_address(), error = %e, "peer stream ended with an error");
        }
    }

    /// Hands a membership packet to the membership task, or drops it (counted) when the task
    /// is behind; SWIM copes with loss.
    fn take_membership(&self, data: Vec<u8>) {
        if self
            .membership_tx
            .try_send(MembershipInput::Data(data))
            .is_err()
        {
            self.metrics.peer_refused("membership_queue_full");
        }
    }

    /// Applies a batch; answers `Persisted` when asked to (a batch on a bidirectional stream,
    /// `send`), and forwards the changes new here when the sender made this node its relay.
    async fn receive_batch(
        self: &Arc<Self>,
        conn: &Connection,
        send: Option<quinn::SendStream>,
        batch: ChangeBatch,
    ) -> Result<(), TransportError> {
        self.metrics.gossip_batches_received.inc();
        // All documents of the batch are applied concurrently, so their commits share fsyncs.
        let results = futures_util::future::join_all(
            batch
                .docs
                .iter()
                .map(|d| self.docs.apply_remote(&d.doc, &d.changes)),
        )
        .await;
        let mut fresh = Vec::new();
        let mut incomplete = Vec::new();
        let mut durable = true;
        for (DocChanges { doc, .. }, result) in batch.docs.into_iter().zip(results) {
            match result {
                Ok(applied) => {
                    if applied.incomplete {
                        incomplete.push(doc.clone());
                    }
                    if !applied.new.is_empty() {
                        self.metrics
                            .gossip_changes_applied
                            .inc_by(applied.new.len() as u64);
                        fresh.push(DocChanges {
                            doc,
                            changes: applied.new,
                        });
                    }
                }
                Err(e) => {
                    // Not acknowledged: the sender counts no replica, anti-entropy retries.
                    tracing::warn!(doc = %doc, error = %e, "a broadcast change was not applied");
                    durable = false;
                }
            }
        }
        if forwards(batch.hops) && !fresh.is_empty() {
            let relayed = Relayed {
                from: conn.remote_address(),
                docs: fresh,
            };
            if self.relay_tx.try_send(relayed).is_err() {
                self.metrics.broadcast_dropped.inc();
            }
        }
        let Some(mut send) = send else {
            // One-way: nobody waits for an answer.
            return Ok(());
        };
        if batch.ack && durable {
            // A change that depends on one this node lacks (sent earlier through the relay and
            // still on its way) waits in memory, not durable: the writer counts this node as a
            // replica only after a sync with the sender brought what is missing.
            for doc in incomplete {
                let synced =
                    session::initiate_doc_sync(&self.docs, &self.metrics, conn, &doc).await;
                if let Err(e) = synced {
                    tracing::debug!(doc = %doc, error = %e, "completing a broadcast failed");
                    durable = false;
                    break;
                }
            }
            if durable {
                let persisted = PeerMessage::Persisted {
                    batch_id: batch.batch_id,
                };
                transport::write_frame(&mut send, &persisted, &self.metrics).await?;
            }
        }
        transport::finish(send);
        Ok(())
    }

    /// Batches local changes and sends them where the broadcast policy says; as the relay,
    /// also merges and forwards the changes peers sent it.
    async fn broadcast_loop(
        self: Arc<Self>,
        mut feed: mpsc::Receiver<LocalChange>,
        mut relayed: mpsc::Receiver<Relayed>,
        mut deliveries_rx: mpsc::Receiver<Delivery>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut deliveries: InFlight = Deliveries::new();
        let window_ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let bytes_max = self.config.batch_bytes_max;
        let mut local = Batcher::new(window_ms(self.config.batch_window), bytes_max);
        let mut relay = RelayBatcher::new(window_ms(self.config.relay_window), bytes_max);
        let mut waiters: Vec<Arc<ReplicaWaiter>> = Vec::new();
        enum Input {
            Local(LocalChange),
            Relayed(Relayed),
            Delivery(Delivery),
            Due,
        }
        loop {
            let due_at = [
                local.poll_timeout(),
                relay.poll_timeout(),
                deliveries.next_deadline(),
            ]
            .into_iter()
            .flatten()
            .min();
            let now = self.mono_ms();
            let due_in = due_at.map(|t| Duration::from_millis(u64::try_from(t - now).unwrap_or(0)));
            let input = tokio::select! {
                biased;
                change = feed.recv() => match change {
                    Some(change) => Input::Local(change),
                    None => return, // The feed closed: the node is stopping.
                },
                batch = relayed.recv() => match batch {
                    Some(batch) => Input::Relayed(batch),
                    None => return,
                },
                event = deliveries_rx.recv() => match event {
                    Some(event) => Input::Delivery(event),
                    None => return,
                },
                _ = tokio::time::sleep(due_in.unwrap_or(Duration::from_secs(3600))), if due_in.is_some() => Input::Due,
                _ = stop.wait_for(|s| *s) => return,
            };
            let now = self.mono_ms();
            match input {
                Input::Local(change) => {
                    if !local.fits(&change.changes) {
                        let docs = local.take();
                        let waiting = std::mem::take(&mut waiters);
                        self.route_local(now, docs, waiting, &mut relay, &mut deliveries);
                    }
                    waiters.extend(change.waiter);
                    local.push(now, change.doc, change.changes);
                }
                Input::Relayed(Relayed { from, docs }) => {
                    if !relay.fits(&docs) {
                        self.forward(relay.take(&self.peer_addrs()), now, &mut deliveries);
                    }
                    relay.push(now, from, docs);
                }
                Input::Delivery(Delivery::RelayTook(batch)) => deliveries.relay_took(batch),
                Input::Delivery(Delivery::RelayRefused(batch)) => {
                    if let Some((hub, docs)) = deliveries.relay_refused(batch) {
                        self.fall_back(hub, docs, now, &mut deliveries);
                    }
                }
                Input::Delivery(Delivery::Acked(batch, peer)) => {
                    for waiter in deliveries.acked(batch, peer) {
                        waiter.ack();
                    }
                }
                Input::Due => {}
            }
            if local.due(now) {
                let docs = local.take();
                let waiting = std::mem::take(&mut waiters);
                self.route_local(now, docs, waiting, &mut relay, &mut deliveries);
            }
            if relay.due(now) {
                self.forward(relay.take(&self.peer_addrs()), now, &mut deliveries);
            }
            for expired in deliveries.poll(now) {
                match expired {
                    Expired::Fallback {
                        relay: hub,
                        payload,
                        ..
                    } => {
                        tracing::debug!(relay = %hub, "the relay did not confirm a batch in time; sending it to every peer");
                        self.fall_back(hub, payload, now, &mut deliveries);
                    }
                    Expired::Acks { batch, missing } => {
                        tracing::debug!(
                            batch,
                            ?missing,
                            "peers did not acknowledge a batch in time"
                        );
                    }
                }
            }
        }
    }

    /// Sends a batch of this node's own changes where the policy routes it.
    fn route_local(
        self: &Arc<Self>,
        now_ms: i64,
        docs: Vec<DocChanges>,
        waiters: Vec<Arc<ReplicaWaiter>>,
        relay: &mut RelayBatcher,
        deliveries: &mut InFlight,
    ) {
        if docs.is_empty() {
            return;
        }
        let peers = self.peer_addrs();
        let route = self.config.policy.route(
            self.local_addr,
            &peers,
            &self.alive_peers(),
            !waiters.is_empty(),
            |addr| self.transport.cached(addr).is_some(),
        );
        match route {
            Route::Direct(targets) => self.send_direct(targets, docs, waiters, now_ms, deliveries),
            Route::ToRelay(hub) => self.send_to_relay(hub, docs, now_ms, deliveries),
            Route::OwnRelay => {
                if !relay.fits(&docs) {
                    self.forward(relay.take(&peers), now_ms, deliveries);
                }
                relay.push(now_ms, self.local_addr, docs);
            }
        }
    }

    /// Sends what the relay's window gathered, one message per member.
    fn forward(
        self: &Arc<Self>,
        batches: Vec<(SocketAddr, Vec<DocChanges>)>,
        now: i64,
        deliveries: &mut InFlight,
    ) {
        for (peer, docs) in batches {
            self.send_direct(vec![peer], docs, Vec::new(), now, deliveries);
        }
    }

    /// Sends a batch the relay did not take to every other peer.
    fn fall_back(
        self: &Arc<Self>,
        hub: SocketAddr,
        docs: Vec<DocChanges>,
        now: i64,
        deliveries: &mut InFlight,
    ) {
        self.metrics.relay_fallbacks.inc();
        let others = self
            .peer_addrs()
            .into_iter()
            .filter(|a| *a != hub)
            .collect();
        self.send_direct(others, docs, Vec::new(), now, deliveries);
    }

    fn change_batch(&self, docs: Vec<DocChanges>, hops: u8, ack: bool) -> (u64, PeerMessage) {
        let batch_id = self.next_batch_id.fetch_add(1, Ordering::Relaxed);
        let batch = ChangeBatch {
            batch_id,
            hops,
            ack,
            docs,
        };
        (batch_id, PeerMessage::Changes(batch))
    }

    /// Sends a batch to each target on its own stream, for it to apply and not forward. With
    /// waiters, asks for acknowledgements and counts them for the waiters.
    fn send_direct(
        &self,
        targets: Vec<SocketAddr>,
        docs: Vec<DocChanges>,
        waiters: Vec<Arc<ReplicaWaiter>>,
        now: i64,
        deliveries: &mut InFlight,
    ) {
        if targets.is_empty() || docs.is_empty() {
            return;
        }
        let ack = !waiters.is_empty();
        let (batch_id, message) = self.change_batch(docs, HOPS_FINAL, ack);
        let message = Arc::new(message);
        // Down: anti-entropy catches it up when it returns.
        let conns: Vec<(SocketAddr, Connection)> = targets
            .into_iter()
            .filter_map(|addr| Some((addr, self.transport.cached(addr)?)))
            .collect();
        if ack {
            let ack_timeout = i64::try_from(ACK_TIMEOUT.as_millis()).unwrap_or(i64::MAX);
            let asked = conns.iter().map(|(addr, _)| *addr);
            deliveries.awaiting_acks(now, ack_timeout, batch_id, asked, waiters);
        }
        for (addr, conn) in conns {
            let message = Arc::clone(&message);
            let metrics = Arc::clone(&self.metrics);
            self.metrics.gossip_batches_sent.inc();
            if !ack {
                tokio::spawn(async move {
                    let _ = deliver(&conn, &message, &metrics, None).await;
                });
                continue;
            }
            let in_flight = Arc::clone(lock(&self.in_flight).entry(addr).or_default());
            let events = self.delivery_tx.clone();
            in_flight.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(async move {
                let acked = send_and_await_ack(&conn, &message, batch_id, &metrics).await;
                in_flight.fetch_sub(1, Ordering::AcqRel);
                if acked {
                    let _ = events.try_send(Delivery::Acked(batch_id, addr));
                }
            });
        }
    }

    /// Sends a batch to the relay, which forwards it. When the relay's connection is gone, or
    /// its QUIC stack does not confirm the stream within `relay_delivery_timeout` (decided by
    /// the deliveries in flight), the batch goes to every other peer instead.
    fn send_to_relay(
        self: &Arc<Self>,
        hub: SocketAddr,
        docs: Vec<DocChanges>,
        now: i64,
        deliveries: &mut InFlight,
    ) {
        let Some(conn) = self.transport.cached(hub) else {
            self.send_direct(self.peer_addrs(), docs, Vec::new(), now, deliveries);
            return;
        };
        let (batch_id, message) = self.change_batch(docs.clone(), HOPS_TO_RELAY, false);
        let timeout =
            i64::try_from(self.config.relay_delivery_timeout.as_millis()).unwrap_or(i64::MAX);
        deliveries.via_relay(now, timeout, batch_id, hub, docs);
        self.metrics.gossip_batches_sent.inc();
        let metrics = Arc::clone(&self.metrics);
        let events = self.delivery_tx.clone();
        tokio::spawn(async move {
            // Bounded by the acknowledgement timeout only to end the task: the fallback is
            // decided at the relay's deadline.
            let took = deliver(&conn, &message, &metrics, Some(ACK_TIMEOUT)).await;
            let event = if took {
                Delivery::RelayTook(batch_id)
            } else {
                Delivery::RelayRefused(batch_id)
            };
            let _ = events.try_send(event);
        });
    }

    /// Dials peers, starts anti-entropy on new connections and periodically, and tells peers
    /// the members this node knows.
    async fn tick_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut ticker = ticker(TICK);
        while tick_or_stop(&mut ticker, &mut stop).await {
            let conns: BTreeMap<SocketAddr, (Connection, u64)> = self
                .peer_addrs()
                .into_iter()
                .filter_map(|addr| Some((addr, self.transport.cached_numbered(addr)?)))
                .collect();
            let now = self.mono_ms();
            let (tick, widest) = {
                let mut peers = lock(&self.peers);
                let tick = peers.tick(now, |addr| conns.get(&addr).map(|(_, n)| *n));
                (tick, peers.widest_clock_offset_ms())
            };
            self.metrics
                .peers_up
                .set(i64::try_from(tick.up).unwrap_or(i64::MAX));
            self.metrics
                .peers_down
                .set(i64::try_from(tick.down).unwrap_or(i64::MAX));
            self.metrics.peer_clock_offset_max_ms.set(widest);
            for action in tick.actions {
                match action {
                    // Dials run in their own tasks: an unreachable peer's connect timeout must
                    // not hold up anti-entropy with the others.
                    Action::Dial(addr) => {
                        let this = Arc::clone(&self);
                        tokio::spawn(async move {
                            if let Err(TransportError::Connect { message, .. }) =
                                this.connect(addr).await
                            {
                                this.metrics.peer_refused("dial");
                                tracing::debug!(peer = %addr, error = %message, "peer unreachable");
                            }
                            lock(&this.peers).dial_ended(addr);
                        });
                    }
                    Action::CheckClock(addr) => {
                        if let Some((conn, _)) = conns.get(&addr) {
                            tokio::spawn(Arc::clone(&self).check_clock(conn.clone(), addr));
                        }
                    }
                    Action::AntiEntropy { peer, catch_up } => {
                        let Some((conn, _)) = conns.get(&peer) else {
                            continue;
                        };
                        let this = Arc::clone(&self);
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            match session::run_anti_entropy(&this, &conn, catch_up).await {
                                Ok(synced) => {
                                    this.metrics.anti_entropy_session("ok");
                                    if synced > 0 {
                                        tracing::info!(peer = %peer, docs = synced, "anti-entropy synced documents");
                                    }
                                }
                                Err(e) => {
                                    this.metrics.anti_entropy_session("error");
                                    tracing::debug!(peer = %peer, error = %e, "anti-entropy failed");
                                    // Started again on the next tick.
                                    lock(&this.peers).session_failed(peer);
                                }
                            }
                        });
                    }
                }
            }
        }
    }

    /// Measures how far `addr`'s wall clock is from this node's: sends this node's time, reads
    /// the peer's, and takes the peer's as of the middle of the round trip.
    async fn check_clock(self: Arc<Self>, conn: Connection, addr: SocketAddr) {
        let measured = tokio::time::timeout(CLOCK_CHECK_TIMEOUT, async {
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            let sent = self.clock.now_ms();
            let message = PeerMessage::Clock { now_ms: sent };
            transport::write_frame(&mut send, &message, &self.metrics)
                .await
                .ok()?;
            transport::finish(send);
            match transport::read_frame(&mut recv).await {
                Ok(Some(PeerMessage::Clock { now_ms })) => {
                    let received = self.clock.now_ms();
                    let middle = sent.saturating_add(received.saturating_sub(sent) / 2);
                    Some(now_ms.saturating_sub(middle))
                }
                _ => None,
            }
        })
        .await;
        let Ok(Some(offset_ms)) = measured else {
            tracing::debug!(peer = %addr, "no clock answer from a peer");
            return;
        };
        let mut peers = lock(&self.peers);
        match peers.clock_measured(addr, offset_ms) {
            ClockStanding::Skewed => {
                self.metrics.peer_clock_skews.inc();
                let name = peers.get(&addr).and_then(|p| p.name.clone());
                tracing::warn!(
                    peer = %addr,
                    name = name.as_deref().unwrap_or(""),
                    offset_ms,
                    bound_ms = CLOCK_SKEW_WARN_MS,
                    "a peer's wall clock is far from this node's: documents expire and tombstones \
                     are purged by each node's own clock, so check time synchronisation (NTP) on \
                     both"
                );
            }
            ClockStanding::Back => {
                tracing::info!(peer = %addr, offset_ms, "a peer's wall clock is back within the bound");
            }
            ClockStanding::Same => {}
        }
    }

    /// The connection to `addr`, serving the streams the peer opens on it when it is new.
    async fn connect(self: &Arc<Self>, addr: SocketAddr) -> Result<Connection, TransportError> {
        let dialled = self.transport.connection(addr).await;
        if matches!(
            dialled,
            Ok((_, true)) | Err(TransportError::Connect { .. } | TransportError::Timeout)
        ) {
            self.metrics.peer_dials.inc();
        }
        let (conn, new) = dialled?;
        if new {
            tokio::spawn(Arc::clone(self).serve_connection(conn.clone()));
        }
        Ok(conn)
    }

    /// Runs SWIM: feeds packets and due timers to the state machine and carries out its outputs.
    async fn membership_loop(
        self: Arc<Self>,
        mut membership: Membership,
        mut rx: mpsc::Receiver<MembershipInput>,
        mut stop: watch::Receiver<bool>,
    ) {
        // SWIM's timers wait here, not in a sleeping task each.
        let mut timers = TimerQueue::new();
        membership.announce_to_seeds();
        self.carry_out(membership.drain(), &mut timers);
        loop {
            let wake = timers
                .next_deadline()
                .map(|at| self.started + Duration::from_millis(u64::try_from(at).unwrap_or(0)));
            let input = tokio::select! {
                biased;
                input = rx.recv() => match input {
                    Some(input) => Some(input),
                    None => return,
                },
                () = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)),
                    if wake.is_some() => None,
                _ = stop.wait_for(|s| *s) => return,
            };
            match input {
                Some(MembershipInput::Data(data)) => {
                    if let Err(e) = membership.handle_data(&data) {
                        self.metrics.peer_refused("membership");
                        tracing::debug!(error = %e, "refused a membership packet");
                    }
                }
                Some(MembershipInput::Leave(reply)) => {
                    let packets = match membership.leave() {
                        Ok(_) => {
                            // The announcement goes out on streams the caller waits for, not
                            // as datagrams; the rest is carried out as usual.
                            let (sends, rest): (Vec<_>, Vec<_>) = membership
                                .drain()
                                .into_iter()
                                .partition(|o| matches!(o, MembershipOutput::Send { .. }));
                            self.carry_out(rest, &mut timers);
                            Ok(sends
                                .into_iter()
                                .filter_map(|o| match o {
                                    MembershipOutput::Send { to, data } => Some((to, data)),
                                    _ => None,
                                })
                                .collect())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = reply.send(packets);
                    continue;
                }
                Some(MembershipInput::Forget(addr, reply)) => {
                    let listed = lock(&self.peers).get(&addr).is_some();
                    let forgotten = membership.forget(addr, listed);
                    // Dropped here before the answer, so that status agrees with it.
                    self.carry_out(membership.drain(), &mut timers);
                    let _ = reply.send(forgotten);
                    continue;
                }
                None => {
                    for timer in timers.pop_due(self.mono_ms()) {
                        membership.handle_timer(timer);
                    }
                }
            }
            self.carry_out(membership.drain(), &mut timers);
        }
    }

    fn carry_out(
        self: &Arc<Self>,
        outputs: Vec<MembershipOutput>,
        timers: &mut TimerQueue<foca::Timer<MemberId>>,
    ) {
        for output in outputs {
            match output {
                MembershipOutput::Send { to, data } => self.send_membership(to, data),
                MembershipOutput::Schedule { after, timer } => {
                    let after_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
                    timers.schedule(self.mono_ms(), after_ms, timer);
                }
                MembershipOutput::Up(member) => {
                    self.learn(member.addr);
                    if lock(&self.peers).member_up(member.addr, &member.name) {
                        tracing::info!(peer = %member.addr, name = %member.name, "member up");
                    }
                    self.transport.reset_backoff(member.addr);
                }
                MembershipOutput::Down(member) => {
                    lock(&self.peers).member_down(member.addr);
                    tracing::warn!(peer = %member.addr, name = %member.name, "member declared down");
                }
                MembershipOutput::Isolated => {
                    tracing::warn!("lost contact with every member; announcing to the seeds again");
                }
                MembershipOutput::Departed(departure) => self.departed_member(&departure),
            }
        }
    }

    /// A member departed: dropped from the member table (so from status, the gauges,
    /// broadcasts and compaction's stability), its connection closed and never dialled again
    /// until it starts anew.
    fn departed_member(&self, departure: &Departure) {
        let was_member = lock(&self.peers).depart(departure.addr);
        lock(&self.in_flight).remove(&departure.addr);
        self.transport.forget(departure.addr);
        self.metrics.member_departed(departure.reason.as_str());
        tracing::info!(
            peer = %departure.addr,
            generation = departure.generation,
            reason = departure.reason.as_str(),
            was_member,
            "member departed; no longer dialled"
        );
    }

    /// The digest index anti-entropy reconciles.
    pub(crate) fn follower(&self) -> &Follower {
        &self.follower
    }

    pub(crate) fn docs(&self) -> &Arc<Documents> {
        &self.docs
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Documents to sync with a peer after reconciliation, deduplicated.
    /// Unless catching up a new connection, documents that changed in the last moments are
    /// left out: the broadcast is delivering them, and the next round checks them again.
    pub(crate) fn docs_for_digests(
        &self,
        digests: &[[u8; 32]],
        catch_up: bool,
    ) -> Vec<verge_core::DocId> {
        let mut seen = HashSet::new();
        digests
            .iter()
            .filter_map(|d| {
                if catch_up {
                    self.follower.doc_for_digest(d)
                } else {
                    self.follower.settled_doc_for_digest(d)
                }
            })
            .filter(|id| seen.insert(id.clone()))
            .collect()
    }
}

/// Sends `message` on a new unidirectional stream: no answer comes. With `confirm`, waits until
/// the peer's QUIC stack acknowledged the whole stream (or stopped it after reading), at most
/// that long. Returns whether the frame went out (and was confirmed).
async fn deliver(
    conn: &Connection,
    message: &PeerMessage,
    metrics: &Metrics,
    confirm: Option<Duration>,
) -> bool {
    let attempt = async {
        let mut send = conn.open_uni().await.map_err(TransportError::from)?;
        transport::write_frame(&mut send, message, metrics).await?;
        if confirm.is_some() {
            let _ = send.finish();
            // Stopped by the receiver after it read the frame, or fully acknowledged: either
            // way the relay has it.
            return Ok::<bool, TransportError>(send.stopped().await.is_ok());
        }
        transport::finish(send);
        Ok(true)
    };
    let limit = confirm.unwrap_or(ACK_TIMEOUT);
    matches!(tokio::time::timeout(limit, attempt).await, Ok(Ok(true)))
}

async fn send_and_await_ack(
    conn: &Connection,
    message: &PeerMessage,
    batch_id: u64,
    metrics: &Metrics,
) -> bool {
    let attempt = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(TransportError::from)?;
        transport::write_frame(&mut send, message, metrics).await?;
        transport::finish(send);
        match transport::read_frame(&mut recv).await? {
            Some(PeerMessage::Persisted { batch_id: id }) if id == batch_id => {
                Ok::<bool, TransportError>(true)
            }
            _ => Ok(false),
        }
    };
    matches!(
        tokio::time::timeout(ACK_TIMEOUT, attempt).await,
        Ok(Ok(true))
    )
}

impl crate::documents::Membership for Replication {
    fn alone(&self) -> bool {
        Replication::alone(self)
    }
}
