//! quinn's [`AsyncUdpSocket`] over turmoil's simulated UDP.
//!
//! ```ignore
//! let socket = Arc::new(SimUdpSocket::bind("0.0.0.0:4433".parse()?).await?);
//! let endpoint = quinn::Endpoint::new_with_abstract_socket(
//!     endpoint_config, Some(server_config), socket, Arc::new(quinn::TokioRuntime),
//! )?;
//! ```
//!
//! The stock [`quinn::TokioRuntime`] is the right runtime: its timers and `now()` are tokio's,
//! and tokio's clock inside a turmoil host is the simulated one.
//!
//! # What the simulated network does to datagrams
//!
//! - turmoil's links drop, delay, hold and (with latency jitter) reorder datagrams; QUIC
//!   retransmits as it would on a real network. Reordering looks like loss to QUIC, so jitter
//!   costs throughput.
//! - turmoil's `fail_rate(p)` is burst loss, not independent loss: each send breaks the link
//!   with probability `p`, dropping that datagram and everything in flight on the link in both
//!   directions, until a later send repairs it (with probability `repair_rate`, 1 by
//!   default). At `p = 0.05` quinn saw over a third of its packets lost.
//! - A host that is down (crashed, not yet bounced) does not receive: datagrams sent to it
//!   wait in the network and are delivered after its restart, to whatever socket is then bound
//!   on the port.
//! - Each bound socket has a receive queue of `udp_capacity` datagrams (64 by default, see
//!   `turmoil::Builder::udp_capacity`). Datagrams that arrive at a full queue are dropped
//!   silently, as a real kernel drops on a full socket buffer. A host whose endpoint task does
//!   not run often enough (a slow or busy host) therefore loses packets.
//! - turmoil has no MTU. This socket drops datagrams larger than its maximum datagram size
//!   ([`DEFAULT_MAX_DATAGRAM`] unless set with [`SimUdpSocket::with_max_datagram_size`]), so
//!   QUIC's path MTU discovery finds a realistic limit instead of growing to its own ceiling.
//!
//! # Sending never fails
//!
//! turmoil has no send-side backpressure, and quinn tears a connection down when `try_send`
//! returns an error other than `WouldBlock`. A datagram that cannot be sent (too large, or to
//! an address no host has, which turmoil reports as `ConnectionRefused`) is therefore counted
//! and dropped, and `try_send` returns `Ok`: quinn sees a lost packet, which is what a real
//! network would show it. `WouldBlock` is never returned, and the [`UdpPoller`] is always
//! ready.
//!
//! GSO and GRO are not simulated: one datagram per transmit and per receive (quinn splits a
//! transmit with a segment size into datagrams of that size anyway, should one arrive). No
//! ECN, no destination IP in the receive metadata, and no fragmentation.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The largest datagram sent by default: a 1500-byte Ethernet MTU less the IPv4 and UDP
/// headers.
pub const DEFAULT_MAX_DATAGRAM: usize = 1472;

/// A wait for the turmoil socket to hold a datagram.
type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A UDP socket on turmoil's simulated network, usable as quinn's socket.
///
/// Must be created and used inside a turmoil host. Cheap counters of what it sent, received and
/// dropped are kept ([`SimUdpSocket::stats`]); keep an `Arc` to read them after handing the
/// socket to quinn.
pub struct SimUdpSocket {
    socket: Arc<turmoil::net::UdpSocket>,
    /// The pending readiness wait, kept across `poll_recv` calls (turmoil offers only an async
    /// `readable()` and a non-blocking `try_recv_from`).
    readable: Mutex<Option<Readable>>,
    max_datagram: usize,
    counters: Counters,
    faults: Option<Arc<Duplication>>,
}

/// Duplicates a fraction of the datagrams a socket sends (turmoil loses, delays and reorders
/// packets but never repeats one). Shared by the simulator and the sockets of one host, and
/// kept across its restarts; the choice of which datagram repeats comes from a seeded
/// generator, so runs replay.
#[derive(Debug)]
pub struct Duplication {
    /// Probability in millionths.
    per_million: AtomicU64,
    /// SplitMix64 state.
    state: AtomicU64,
}

impl Duplication {
    /// No duplication yet; `seed` drives the choices once a rate is set.
    pub fn new(seed: u64) -> Self {
        Self {
            per_million: AtomicU64::new(0),
            state: AtomicU64::new(seed),
        }
    }

    /// Repeats each datagram sent with probability `p` (0 turns it off).
    pub fn set_rate(&self, p: f64) {
        let p = (p.clamp(0.0, 1.0) * 1_000_000.0) as u64;
        self.per_million.store(p, Ordering::Relaxed);
    }

    fn roll(&self) -> bool {
        let rate = self.per_million.load(Ordering::Relaxed);
        if rate == 0 {
            return false;
        }
        let x = self
            .state
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        z % 1_000_000 < rate
    }
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    dropped_oversize: AtomicU64,
    dropped_unroutable: AtomicU64,
}

/// What a [`SimUdpSocket`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimUdpStats {
    /// Datagrams handed to the simulated network (which may still lose them).
    pub sent: u64,
    /// Datagrams received.
    pub received: u64,
    /// Datagrams dropped because they exceeded the maximum datagram size.
    pub dropped_oversize: u64,
    /// Datagrams dropped because turmoil refused them (no host has the destination address).
    pub dropped_unroutable: u64,
}

impl SimUdpSocket {
    /// Binds a socket on the current turmoil host. turmoil accepts only unspecified
    /// (`0.0.0.0`, `::`) and loopback addresses; port 0 picks an ephemeral port.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self::from_socket(
            turmoil::net::UdpSocket::bind(addr).await?,
        ))
    }

    /// Wraps an already bound turmoil socket.
    pub fn from_socket(socket: turmoil::net::UdpSocket) -> Self {
        Self {
            socket: Arc::new(socket),
            readable: Mutex::new(None),
            max_datagram: DEFAULT_MAX_DATAGRAM,
            counters: Counters::default(),
            faults: None,
        }
    }

    /// Repeats datagrams as `duplication` says.
    pub fn with_duplication(mut self, duplication: Arc<Duplication>) -> Self {
        self.faults = Some(duplication);
        self
    }

    /// Sets the largest datagram sent; larger ones are dropped as lost. quinn's initial
    /// datagrams are 1200 bytes, so a smaller limit keeps connections from being established.
    pub fn with_max_datagram_size(mut self, bytes: usize) -> Self {
        self.max_datagram = bytes;
        self
    }

    /// The bound address (with the unspecified IP if bound to one; the host's own address is
    /// `turmoil::lookup(host_name)`).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The counters so far.
    pub fn stats(&self) -> SimUdpStats {
        let c = &self.counters;
        SimUdpStats {
            sent: c.sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            dropped_oversize: c.dropped_oversize.load(Ordering::Relaxed),
            dropped_unroutable: c.dropped_unroutable.load(Ordering::Relaxed),
        }
    }

    fn send_one(&self, destination: SocketAddr, datagram: &[u8]) {
        if datagram.len() > self.max_datagram {
            self.counters
                .dropped_oversize
                .fetch_add(1, Ordering::Relaxed);
            tracing::trace!(
                %destination,
                len = datagram.len(),
                max = self.max_datagram,
                "dropping oversized datagram"
            );
            return;
        }
        match self.socket.try_send_to(datagram, destination) {
            Ok(_) => {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                if self.faults.as_ref().is_some_and(|d| d.roll())
                    && self.socket.try_send_to(datagram, destination).is_ok()
                {
                    self.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(error) => {
                self.counters
                    .dropped_unroutable
                    .fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%destination, %error, "dropping unsendable datagram");
            }
        }
    }

    /// Moves queued datagrams into `bufs`; `Ok(0)` when none is queued.
    fn drain(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        let mut received = 0;
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
            match self.socket.try_recv_from(buf) {
                Ok((len, addr)) => {
                    *meta = RecvMeta {
                        addr,
                        len,
                        stride: len,
                        ecn: None,
                        dst_ip: None,
                    };
                    received += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if received == 0 => return Err(e),
                Err(_) => break,
            }
        }
        self.counters
            .received
            .fetch_add(received as u64, Ordering::Relaxed);
        Ok(received)
    }
}

impl fmt::Debug for SimUdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimUdpSocket")
            .field("local_addr", &self.socket.local_addr().ok())
            .field("max_datagram", &self.max_datagram)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for SimUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        match transmit.segment_size {
            Some(size) if size > 0 && size < transmit.contents.len() => {
                for datagram in transmit.contents.chunks(size) {
                    self.send_one(transmit.destination, datagram);
                }
            }
            _ => self.send_one(transmit.destination, transmit.contents),
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut readable = self.readable.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            // A pending wait holds turmoil's receive lock, so `try_recv_from` cannot succeed
            // before the wait has completed: finish it first.
            if let Some(wait) = readable.as_mut() {
                let result = ready!(wait.as_mut().poll(cx));
                *readable = None;
                result?;
            }
            let received = self.drain(bufs, meta)?;
            if received > 0 {
                return Poll::Ready(Ok(received));
            }
            let socket = Arc::clone(&self.socket);
            *readable = Some(Box::pin(async move { socket.readable().await }));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// turmoil's UDP has no send-side backpressure: always writable.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
