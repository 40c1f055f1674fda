//! QUIC between nodes: one endpoint per node, mutual TLS, one cached connection per peer.
//!
//! The endpoint's single UDP socket both accepts and dials, so the remote address of any
//! connection is the peer's gossip address. Dialling a peer that is down backs off
//! exponentially; a dead connection is noticed within [`IDLE_TIMEOUT`] thanks to keep-alives.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    ClientConfig, Connection, Endpoint, EndpointConfig, RecvStream, SendStream, ServerConfig,
    TransportConfig, VarInt,
};
use tokio::time::Instant;
use verge_core::replication::backoff::DialBackoff;
use verge_core::wire::{PeerMessage, WireError};

use crate::metrics::Metrics;
use crate::tls::{CLUSTER_SERVER_NAME, NodeTls};

/// A connection with no traffic for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Keep-alive interval, well under the idle timeout so live links never time out.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Most concurrent streams a peer may open on one connection.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// How long a dial may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A transport failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer is in back-off after failed dials.
    #[error("peer {0} is unreachable (backing off)")]
    BackingOff(SocketAddr),
    /// Dialling failed.
    #[error("connecting to {addr}: {message}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// The connection or stream failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The peer sent a malformed frame.
    #[error("frame: {0}")]
    Wire(#[from] WireError),
    /// Socket setup failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// TLS setup failed.
    #[error("tls: {0}")]
    Tls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The peer did not answer in time.
    #[error("timed out")]
    Timeout,
}

#[derive(Debug)]
struct PeerSlot {
    conn: Option<Connection>,
    /// How many connections to the peer were made so far: numbers the current one.
    dialled: u64,
    backoff: DialBackoff,
    /// Ends the dials under way when the peer departs: a QUIC handshake retransmits its
    /// first packet until it times out.
    cancel: Arc<tokio::sync::Notify>,
}

impl PeerSlot {
    fn new() -> Self {
        Self {
            conn: None,
            dialled: 0,
            backoff: DialBackoff::default(),
            cancel: Arc::new(tokio::sync::Notify::new()),
        }
    }
}

/// The QUIC endpoint of a node and its outgoing connections.
#[derive(Debug)]
pub struct Transport {
    endpoint: Endpoint,
    client: ClientConfig,
    peers: Mutex<HashMap<SocketAddr, PeerSlot>>,
    /// The origin of the back-off's monotonic clock.
    started: Instant,
}

/// Key material: derived from `seed` in simulations, random otherwise.
fn key_material(seed: Option<u64>, label: &[u8; 8]) -> [u8; 64] {
    let mut material = [0u8; 64];
    match seed {
        Some(seed) => {
            material[..8].copy_from_slice(&seed.to_le_bytes());
            material[8..16].copy_from_slice(label);
        }
        None => rand::RngCore::fill_bytes(&mut rand::rng(), &mut material),
    }
    material
}

/// The stateless-reset key (the default would draw from the thread RNG, which a simulation
/// cannot replay).
fn reset_key(seed: Option<u64>) -> Arc<dyn quinn::crypto::HmacKey> {
    let material = key_material(seed, b"qreset!!");
    Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &material))
}

/// The address-validation token key.
fn token_key(seed: Option<u64>) -> Arc<dyn quinn::crypto::HandshakeTokenKey> {
    let material = key_material(seed, b"qtoken!!");
    Arc::new(ring::hkdf::Prk::new_less_safe(
        ring::hkdf::HKDF_SHA256,
        &material,
    ))
}

/// Connection ids drawn from a seed: quinn's default generators draw them from the thread RNG,
/// and they key and address every connection's packets, so a simulated run whose packets are
/// lost and reordered did not replay (a late Initial read with the wrong keys passes or fails
/// the first checks depending on its bytes).
struct SeededCids(rand::rngs::StdRng);

/// The length of the connection ids a node issues (quinn's default).
const CID_LEN: usize = 8;
/// The length of the first destination id of a connection a node dials (quinn's default).
const INITIAL_DST_CID_LEN: usize = 20;

impl quinn::ConnectionIdGenerator for SeededCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        rand::RngCore::fill_bytes(&mut self.0, &mut bytes);
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("a few seconds fit a QUIC idle timeout"),
    ));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_concurrent_bidi_streams(VarInt::from_u32(STREAMS_PER_CONNECTION_MAX));
    t.max_concurrent_uni_streams(VarInt::from_u32(STREAMS_PER_CONNECTION_MAX));
    Arc::new(t)
}

impl Transport {
    /// Binds the endpoint on `addr` (a real UDP socket) with the node's TLS configuration and
    /// keys from the operating system's randomness.
    pub fn bind(addr: SocketAddr, tls: &NodeTls) -> Result<Self, TransportError> {
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let socket = runtime.wrap_udp_socket(std::net::UdpSocket::bind(addr)?)?;
        Self::with_socket(socket, runtime, tls, None)
    }

    /// Builds the endpoint over any socket: the simulator passes one that runs on its virtual
    /// network, and a `seed` from which QUIC's randomness (connection ids) and keys (stateless
    /// reset, address tokens) are derived, so a simulated run replays exactly. Without a seed
    /// they come from the operating system.
    pub fn with_socket(
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        runtime: Arc<dyn quinn::Runtime>,
        tls: &NodeTls,
        seed: Option<u64>,
    ) -> Result<Self, TransportError> {
        let server_crypto = QuicServerConfig::try_from(Arc::clone(&tls.server))?;
        let mut server = ServerConfig::new(Arc::new(server_crypto), token_key(seed));
        server.transport_config(transport_config());
        let client_crypto = QuicClientConfig::try_from(Arc::clone(&tls.client))?;
        let mut client = ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport_config());
        if let Some(seed) = seed {
            // The first destination id of each connection this node dials (20 bytes, as
            // quinn's own): it keys the connection's Initial packets.
            let rng: rand::rngs::StdRng =
                rand::SeedableRng::seed_from_u64(seed ^ u64::from_le_bytes(*b"quic-dst"));
            let rng = Mutex::new(rng);
            client.initial_dst_cid_provider(Arc::new(move || {
                let mut bytes = [0u8; INITIAL_DST_CID_LEN];
                rand::RngCore::fill_bytes(
                    &mut *rng.lock().unwrap_or_else(|p| p.into_inner()),
                    &mut bytes,
                );
                quinn::ConnectionId::new(&bytes)
            }));
        }
        let mut config = EndpointConfig::new(reset_key(seed));
        config.rng_seed(seed.map(|s| {
            let mut rng_seed = [0u8; 32];
            rng_seed[..8].copy_from_slice(&s.to_le_bytes());
            rng_seed
        }));
        if let Some(seed) = seed {
            config.cid_generator(move || {
                Box::new(SeededCids(rand::SeedableRng::seed_from_u64(
                    seed ^ u64::from_le_bytes(*b"quic-cid"),
                )))
            });
        }
        let endpoint = Endpoint::new_with_abstract_socket(config, Some(server), socket, runtime)?;
        Ok(Self {
            endpoint,
            client,
            peers: Mutex::new(HashMap::new()),
            started: Instant::now(),
        })
    }

    /// Milliseconds since the endpoint was bound, on the monotonic clock.
    fn now_ms(&self) -> i64 {
        i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The endpoint, for accepting connections.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The live connection to `addr` if one is cached.
    pub fn cached(&self, addr: SocketAddr) -> Option<Connection> {
        self.cached_numbered(addr).map(|(conn, _)| conn)
    }

    /// [`Self::cached`], with the connection's number: the first connection to `addr` is 1, each
    /// new one the next. (quinn's `stable_id` is the connection's address in memory, which a
    /// later connection may reuse: it cannot tell a new connection from the old one.)
    pub fn cached_numbered(&self, addr: SocketAddr) -> Option<(Connection, u64)> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .get(&addr)
            .and_then(|s| Some((s.conn.clone()?, s.dialled)))
            .filter(|(c, _)| c.close_reason().is_none())
    }

    /// The connection to `addr`: the cached one, or a new one dialled now (then the flag is
    /// `true`, and the caller must serve the streams the peer opens on it). Honours back-off.
    pub async fn connection(&self, addr: SocketAddr) -> Result<(Connection, bool), TransportError> {
        let cancel = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let slot = peers.entry(addr).or_insert_with(PeerSlot::new);
            if let Some(conn) = &slot.conn {
                if conn.close_reason().is_none() {
                    return Ok((conn.clone(), false));
                }
                slot.conn = None;
            }
            if !slot.backoff.allows(self.now_ms()) {
                return Err(TransportError::BackingOff(addr));
            }
            Arc::clone(&slot.cancel)
        };
        // Created before the dial starts, so that a departure during it is seen.
        let cancelled = cancel.notified();
        let result = tokio::select! {
            biased;
            () = cancelled => Err(TransportError::Connect {
                addr,
                message: "the peer departed".into(),
            }),
            result = self.dial(addr) => result,
        };
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let slot = peers.entry(addr).or_insert_with(PeerSlot::new);
        match result {
            Ok(conn) => {
                // Another task may have dialled concurrently; keep one connection.
                if let Some(existing) = slot.conn.as_ref().filter(|c| c.close_reason().is_none()) {
                    conn.close(VarInt::from_u32(0), b"duplicate");
                    return Ok((existing.clone(), false));
                }
                slot.conn = Some(conn.clone());
                slot.dialled += 1;
                slot.backoff.reset();
                Ok((conn, true))
            }
            Err(e) => {
                slot.backoff.failed(self.now_ms());
                Err(e)
            }
        }
    }

    async fn dial(&self, addr: SocketAddr) -> Result<Connection, TransportError> {
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, CLUSTER_SERVER_NAME)
            .map_err(|e| TransportError::Connect {
                addr,
                message: e.to_string(),
            })?;
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(TransportError::Connect {
                addr,
                message: e.to_string(),
            }),
            Err(_) => Err(TransportError::Timeout),
        }
    }

    /// Forgets the back-off of `addr` so the next call dials at once (after a peer is seen
    /// alive again).
    pub fn reset_backoff(&self, addr: SocketAddr) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = peers.get_mut(&addr) {
            slot.backoff.reset();
        }
    }

    /// Closes the connection to `addr` and forgets its back-off: the peer departed.
    pub fn forget(&self, addr: SocketAddr) {
        let slot = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
        if let Some(slot) = slot {
            // Dropping a dial's handshake closes it.
            slot.cancel.notify_waiters();
            if let Some(conn) = slot.conn {
                conn.close(VarInt::from_u32(0), b"departed");
            }
        }
    }

    /// Closes every connection and the endpoint.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"node stopping");
    }
}

/// Writes one frame, counted in `verge_peer_messages_sent_total{kind}` (every frame to a peer
/// goes through here, so the counter is the replication's cost in messages).
pub async fn write_frame(
    send: &mut SendStream,
    message: &PeerMessage,
    metrics: &Metrics,
) -> Result<(), TransportError> {
    let frame = message.to_frame()?;
    send.write_all(&frame).await?;
    metrics.peer_message_sent(message.kind());
    Ok(())
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Option<PeerMessage>, TransportError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = PeerMessage::check_len(prefix)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(Some(PeerMessage::from_body(&body)?))
}

/// Finishes a send stream, ignoring a peer that already went away.
pub fn finish(mut send: SendStream) {
    let _ = send.finish();
}
