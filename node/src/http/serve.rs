//! Serving the API's connections, each bounded in number and in time.
//!
//! A connection is admitted under two limits: `api_connections_max` for the node and
//! `api_connections_per_client_max` for one client address, so that one client cannot take
//! every slot. An admitted connection is served by hyper under three deadlines:
//!
//! - **header**: a request's complete head must arrive within `header_timeout_s` of the
//!   connection opening or of its previous response ending (hyper's header read timeout). This
//!   closes slowloris connections that trickle a header byte at a time, and kept-alive
//!   connections nobody uses.
//! - **body**: a request's body must arrive within `body_timeout_s` of its head
//!   ([`body_deadline`]); the request is answered `408 request_timeout`.
//! - **idle**: a connection on which no byte moves either way for `idle_timeout_s` is closed
//!   ([`Idle`]): a client that stops reading its answer or its watch stream.
//!
//! A connection beyond a limit is not dropped unanswered: it is served one request by a router
//! of the probes alone ([`super::probes_router`]), so that a load balancer still sees
//! `/healthz` and `/readyz` while the node is full, and anything else gets
//! `503 too_many_connections`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::Listener;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// How long a connection beyond a limit gets to send its one request and read the answer.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections beyond a limit being answered at once; further ones are closed unanswered.
const REFUSALS_MAX: usize = 64;

/// The limits on the API's connections (from `[limits]`).
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Connections open at once.
    pub connections_max: usize,
    /// Connections open at once from one client address.
    pub per_client_max: usize,
    /// See the module documentation.
    pub header_timeout: Duration,
    /// See the module documentation.
    pub idle_timeout: Duration,
}

/// Serves `app` on the connections `listener` accepts until `shutdown` resolves, then lets
/// every open connection finish its request in flight and close.
///
/// Dropping the returned future closes every connection at once: the caller bounds the drain
/// that way.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    probes: Router,
    limits: ServeLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) where
    L: Listener<Addr = SocketAddr>,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let admission = Admission::new(&limits, Arc::clone(&metrics));
    let refusing = Arc::new(Semaphore::new(REFUSALS_MAX));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Connections run in this set, not detached: they end with it.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match admission.admit(addr.ip()) {
            Ok(slot) => {
                let io = Idle::new(io, limits.idle_timeout, metrics.api_timeout("idle"));
                connections.spawn(serve_connection(
                    io,
                    app.clone(),
                    limits.header_timeout,
                    metrics.api_timeout("header"),
                    stop_rx.clone(),
                    slot,
                ));
            }
            Err(limit) => {
                metrics.api_connection_refused(limit);
                let Ok(permit) = Arc::clone(&refusing).try_acquire_owned() else {
                    continue;
                };
                let probes = probes.clone();
                connections.spawn(async move {
                    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refuse(io, probes)).await;
                    drop(permit);
                });
            }
        }
    }
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
}

/// Serves one admitted connection until the client closes it, a deadline passes, or the node
/// drains (then the request in flight finishes first).
async fn serve_connection<I>(
    io: I,
    app: Router,
    header_timeout: Duration,
    header_timeouts: Counter,
    mut stop: watch::Receiver<bool>,
    slot: Slot,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let service = {
        let app = TowerToHyperService::new(app);
        let in_flight = Arc::clone(&in_flight);
        service_fn(move |request: Request<Incoming>| {
            let guard = InFlight::enter(&in_flight);
            let answer = hyper::service::Service::call(&app, request);
            async move {
                let response = answer.await?;
                // The request stays in flight until its answer's body is written.
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(Guarded {
                        body,
                        _guard: guard,
                    })
                }))
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = async { drop(stop.wait_for(|stop| *stop).await) } => {
            if in_flight.load(Ordering::Acquire) == 0 {
                // Between requests, or partway through a head: nothing was asked of the node
                // yet, so nothing is cut short. (Waiting would hold the drain for as long as
                // the client takes to finish its head.)
                return;
            }
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            header_timeouts.inc();
        }
        tracing::debug!(error = %e, "API connection ended with an error");
    }
    drop(slot);
}

/// Counts a request in flight on its connection until dropped.
#[derive(Debug)]
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it ends.
struct Guarded {
    body: Body,
    _guard: InFlight,
}

impl HttpBody for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves one request of a connection beyond a limit with the probes-only router.
async fn refuse<I>(io: I, probes: Router) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_TIMEOUT)
        .keep_alive(false);
    builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(probes))
        .await
}

/// Which limit refused a connection (the `limit` label of
/// `verge_api_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `api_connections_max` connections were open.
    Node,
    /// `api_connections_per_client_max` connections were open from the client's address.
    Client,
}

impl Refused {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Client => "client",
        }
    }
}

/// Counts open connections, for the node and per client address.
#[derive(Debug)]
struct Admission {
    open: Arc<Semaphore>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    per_client_max: usize,
    gauge: Gauge,
}

impl Admission {
    fn new(limits: &ServeLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            open: Arc::new(Semaphore::new(limits.connections_max)),
            per_client: Arc::default(),
            per_client_max: limits.per_client_max,
            gauge: metrics.api_connections.clone(),
        }
    }

    fn admit(&self, client: IpAddr) -> Result<Slot, Refused> {
        let permit = Arc::clone(&self.open)
            .try_acquire_owned()
            .map_err(|_| Refused::Node)?;
        {
            let mut per_client = self
                .per_client
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // The map holds an entry per address with a connection open: at most
            // `connections_max` entries.
            let open = per_client.entry(client).or_insert(0);
            if *open >= self.per_client_max {
                return Err(Refused::Client);
            }
            *open += 1;
        }
        self.gauge.inc();
        Ok(Slot {
            _permit: permit,
            client,
            per_client: Arc::clone(&self.per_client),
            gauge: self.gauge.clone(),
        })
    }
}

/// One open connection's place under the limits, given back when the connection closes.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    client: IpAddr,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    gauge: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
        let mut per_client = self
            .per_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = per_client.get_mut(&self.client) {
            *open -= 1;
            if *open == 0 {
                per_client.remove(&self.client);
            }
        }
    }
}

/// A connection that fails once no byte has moved either way for its timeout.
///
/// The clock runs only while the connection waits on its client: time spent in a handler with
/// the connection untouched does not count, but hyper keeps a read pending between requests
/// and while it answers, so a stalled reader or writer is noticed.
#[derive(Debug)]
pub struct Idle<T> {
    io: T,
    timeout: Duration,
    last: Instant,
    sleep: Pin<Box<Sleep>>,
    timed_out: Counter,
}

impl<T> Idle<T> {
    /// Wraps `io`; `timed_out` counts connections closed for idling.
    pub fn new(io: T, timeout: Duration, timed_out: Counter) -> Self {
        let last = Instant::now();
        Self {
            io,
            timeout,
            last,
            sleep: Box::pin(tokio::time::sleep_until(last + timeout)),
            timed_out,
        }
    }

    /// A write's outcome: bytes written count as progress, a wait as idling.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.last = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }

    /// Called when an operation would wait: fails it once the connection has idled too long.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let deadline = self.last + self.timeout;
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.timed_out.inc();
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the API connection idled past idle_timeout_s",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Idle<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_idle(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Idle<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }
}

/// Why a request body was cut off before it arrived: handlers answer `408 request_timeout`
/// or `503 shutting_down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyCut {
    /// It did not arrive within `body_timeout_s`.
    #[error("the request body did not arrive within body_timeout_s")]
    TimedOut,
    /// The node started draining while it arrived: the request is refused as a whole rather
    /// than holding the drain.
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// What [`body_deadline`] needs.
#[derive(Debug, Clone)]
pub struct BodyDeadline {
    /// `body_timeout_s`.
    pub timeout: Duration,
    /// Counts bodies that missed it.
    pub timed_out: Counter,
    /// Turns `true` when the node starts draining.
    pub stop: watch::Receiver<bool>,
}

/// Middleware: a request's body must arrive within the timeout of its head, and before the
/// node starts draining. Requests without a body pass untouched.
pub async fn body_deadline(
    State(deadline): State<BodyDeadline>,
    request: Request,
    next: Next,
) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let mut stop = deadline.stop;
    let body = Body::new(DeadlineBody {
        body,
        sleep: Box::pin(tokio::time::sleep(deadline.timeout)),
        stop: Box::pin(async move { drop(stop.wait_for(|stop| *stop).await) }),
        timed_out: Some(deadline.timed_out),
    });
    next.run(Request::from_parts(parts, body)).await
}

/// A body that fails with a [`BodyCut`] once its deadline passes or the node drains.
struct DeadlineBody {
    body: Body,
    sleep: Pin<Box<Sleep>>,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Taken when the deadline is first missed, to count each body once.
    timed_out: Option<Counter>,
}

impl HttpBody for DeadlineBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(axum::Error::new(BodyCut::ShuttingDown))));
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if let Some(counter) = this.timed_out.take() {
                    counter.inc();
                }
                Poll::Ready(Some(Err(axum::Error::new(BodyCut::TimedOut))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Why the body was cut off, if `error` (a body extractor's) says it was.
pub fn body_cut(error: &(dyn std::error::Error + 'static)) -> Option<BodyCut> {
    std::iter::successors(Some(error), |e| e.source()).find_map(|e| e.downcast_ref().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections_max: usize, per_client_max: usize) -> ServeLimits {
        ServeLimits {
            connections_max,
            per_client_max,
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn admission_counts_per_node_and_per_client() {
        let metrics = Arc::new(Metrics::new());
        let admission = Admission::new(&limits(3, 2), Arc::clone(&metrics));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = admission.admit(a).expect("first of a");
        let a2 = admission.admit(a).expect("second of a");
        assert_eq!(
            admission.admit(a).expect_err("a third of a"),
            Refused::Client
        );
        let b1 = admission.admit(b).expect("first of b");
        assert_eq!(
            admission.admit(b).expect_err("a fourth in all"),
            Refused::Node,
            "3 open"
        );
        assert_eq!(metrics.api_connections.get(), 3);
        drop(a1);
        let a3 = admission.admit(a).expect("a has one open again");
        drop((a2, a3, b1));
        assert_eq!(metrics.api_connections.get(), 0);
        assert!(
            admission.per_client.lock().expect("lock").is_empty(),
            "addresses without connections are forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_fails_and_one_in_use_does_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let counter = Counter::default();
        let (client, server) = tokio::io::duplex(64);
        let mut server = Idle::new(server, Duration::from_secs(10), counter.clone());
        let mut client = client;
        let mut byte = [0u8; 1];
        // A byte every 6 s keeps it open past the timeout.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(6)).await;
            client.write_all(b"x").await.expect("write");
            server.read_exact(&mut byte).await.expect("read");
        }
        let err = server.read_exact(&mut byte).await.expect_err("idled");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(counter.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_past_its_deadline_fails_with_body_timed_out() {
        type Frames = Result<Frame<axum::body::Bytes>, io::Error>;
        let (sender, receiver) = tokio::sync::mpsc::channel::<Frames>(1);
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        let counter = Counter::default();
        let body = Body::new(DeadlineBody {
            body: Body::new(http_body_util::StreamBody::new(stream)),
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(5))),
            stop: Box::pin(std::future::pending()),
            timed_out: Some(counter.clone()),
        });
        sender
            .send(Ok(Frame::data(axum::body::Bytes::from_static(b"{"))))
            .await
            .expect("send");
        let err = axum::body::to_bytes(body, 1024)
            .await
            .expect_err("times out");
        assert_eq!(body_cut(&err), Some(BodyCut::TimedOut), "{err}");
        assert_eq!(counter.get(), 1);
        drop(sender);
    }
}
