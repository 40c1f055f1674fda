//! HTTP over turmoil's simulated TCP: a listener for `axum::serve` and a client for simulated
//! users.
//!
//! ```ignore
//! // On a server host:
//! axum::serve(SimListener::bind("0.0.0.0:8080".parse()?).await?, router).await?;
//! // With `ConnectInfo<SocketAddr>` extractors (axum implements `Connected` for `TapIo`):
//! axum::serve(
//!     SimListener::bind(addr).await?.tap_io(|_| {}),
//!     router.into_make_service_with_connect_info::<SocketAddr>(),
//! ).await?;
//! // On a client host:
//! let (status, body) = SimHttp::new(Duration::from_secs(2))
//!     .request("server", 8080, Method::GET, "/health", None, HeaderMap::new())
//!     .await?;
//! ```
//!
//! # How turmoil's TCP fails
//!
//! turmoil's TCP never retransmits. Under a partition a new connection is refused at once (the
//! SYN is dropped, and with it the handshake's reply channel), but data sent on an open
//! connection is dropped silently and the reader waits forever. A held link (`hold`) delays the
//! SYN until `release`. A crashed host does not refuse either: turmoil does not deliver to a
//! host that is down, so the SYN waits in the network (and reaches the host after its restart,
//! long after the client gave up); connections open at the crash are closed, and a request on
//! one fails with an unexpected end of file. turmoil's random `fail_rate` drops segments of
//! open connections too, which then hang like a partition. [`SimHttp`] therefore opens one connection per request, bounds the
//! whole exchange with a timeout on the simulated clock, and reports refusal and timeout as
//! their own errors: to a simulated client both mean "unreachable".

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use turmoil::net::{TcpListener, TcpStream};

/// A turmoil TCP listener for `axum::serve`.
pub struct SimListener {
    inner: TcpListener,
}

impl SimListener {
    /// Binds on the current turmoil host. turmoil accepts only unspecified (`0.0.0.0`, `::`)
    /// and loopback addresses; port 0 picks an ephemeral port.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self::from_listener(TcpListener::bind(addr).await?))
    }

    /// Wraps an already bound turmoil listener.
    pub fn from_listener(inner: TcpListener) -> Self {
        Self { inner }
    }

    /// The turmoil listener.
    pub fn into_inner(self) -> TcpListener {
        self.inner
    }
}

impl fmt::Debug for SimListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimListener")
            .field("local_addr", &self.inner.local_addr().ok())
            .finish()
    }
}

impl axum::serve::Listener for SimListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok(accepted) => return accepted,
                // turmoil's accept does not fail today; if it does, back off as axum's own
                // listener does rather than spin.
                Err(error) => {
                    tracing::debug!(%error, "simulated accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Largest response body [`SimHttp`] reads; a larger one fails as a protocol error.
pub const RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Why a simulated HTTP request got no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The connection was refused (a partition, or nothing listening): the request was never
    /// sent.
    #[error("connection to {0} refused")]
    Refused(String),
    /// No complete response within the timeout: a held link, a partition after the
    /// connection opened, a crashed host, or a server that does not answer. The request may
    /// have been applied.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// An I/O error on the connection: `UnexpectedEof` when the server closed it before a
    /// whole response (turmoil closes the connections of a crashed host), `ConnectionReset`
    /// and the like.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The request could not be built, or the peer broke HTTP.
    #[error("HTTP error: {0}")]
    Protocol(String),
}

impl HttpError {
    /// Whether the request certainly never reached the server ([`HttpError::Refused`]).
    pub fn not_sent(&self) -> bool {
        matches!(self, Self::Refused(_))
    }

    /// Whether the server could not be reached at all ([`HttpError::Refused`] or
    /// [`HttpError::Timeout`]): the request may or may not have been applied when it timed out.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Refused(_) | Self::Timeout(_))
    }
}

impl From<hyper::Error> for HttpError {
    fn from(error: hyper::Error) -> Self {
        // The server closed (or crashed) before a whole response: an I/O failure, not a
        // protocol violation.
        if error.is_incomplete_message() {
            return Self::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                error.to_string(),
            ));
        }
        // Keep the kind of an underlying I/O error (a reset, say) visible to callers.
        let mut source = std::error::Error::source(&error);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return Self::Io(io::Error::new(io.kind(), error.to_string()));
            }
            source = e.source();
        }
        Self::Protocol(error.to_string())
    }
}

/// An HTTP/1.1 client for simulated users: one connection per request, every request bounded
/// by a timeout on the simulated clock. Must be used inside a turmoil host or client.
#[derive(Debug, Clone, Copy)]
pub struct SimHttp {
    timeout: Duration,
}

impl Default for SimHttp {
    fn default() -> Self {
        Self::new(Self::DEFAULT_TIMEOUT)
    }
}

impl SimHttp {
    /// The timeout of [`SimHttp::default`].
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A client whose requests (connect, send, and the whole response) must finish within
    /// `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `method path` to `host:port` (a turmoil host name or an IP address) with `body`
    /// and `headers`, and returns the status and the whole body. A `Host` header is added
    /// unless given.
    pub async fn request(
        &self,
        host: &str,
        port: u16,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: HeaderMap,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .body(body.map(Bytes::from).unwrap_or_default())
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        *request.headers_mut() = headers;
        let response = self.send(host, port, request).await?;
        Ok((response.status(), response.into_body()))
    }

    /// `GET path` on `host:port`.
    pub async fn get(
        &self,
        host: &str,
        port: u16,
        path: &str,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        self.request(host, port, Method::GET, path, None, HeaderMap::new())
            .await
    }

    /// Sends a prepared request to `host:port` and returns the response once its headers
    /// arrived, its body still streaming (server-sent events, say). The timeout bounds the
    /// wait for the headers only; the connection lives as long as the body is read.
    pub async fn stream(
        &self,
        host: &str,
        port: u16,
        request: Request<Bytes>,
    ) -> Result<Response<hyper::body::Incoming>, HttpError> {
        let headers = async {
            let (mut sender, connection, request) = connect(host, port, request).await?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(sender.send_request(request).await?)
        };
        match tokio::time::timeout(self.timeout, headers).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout(self.timeout)),
        }
    }

    /// Sends a prepared request (its URI is the path and query) to `host:port` and returns
    /// the whole response, headers included. A `Host` header is added unless present.
    pub async fn send(
        &self,
        host: &str,
        port: u16,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, HttpError> {
        match tokio::time::timeout(self.timeout, exchange(host, port, request)).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout(self.timeout)),
        }
    }
}

/// Connects to `host:port` and adds a `Host` header to `request` unless it has one.
async fn connect(
    host: &str,
    port: u16,
    request: Request<Bytes>,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        hyper::client::conn::http1::Connection<TokioIo<TcpStream>, Full<Bytes>>,
        Request<Full<Bytes>>,
    ),
    HttpError,
> {
    let stream = match TcpStream::connect((host, port)).await {
        Ok(stream) => stream,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(HttpError::Refused(format!("{host}:{port}")));
        }
        Err(e) => return Err(HttpError::Io(e)),
    };
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(HttpError::from)?;

    let (mut parts, body) = request.into_parts();
    if !parts.headers.contains_key(header::HOST) {
        let authority = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        let value =
            HeaderValue::from_str(&authority).map_err(|e| HttpError::Protocol(e.to_string()))?;
        parts.headers.insert(header::HOST, value);
    }
    Ok((
        sender,
        connection,
        Request::from_parts(parts, Full::new(body)),
    ))
}

async fn exchange(
    host: &str,
    port: u16,
    request: Request<Bytes>,
) -> Result<Response<Bytes>, HttpError> {
    let (mut sender, connection, request) = connect(host, port, request).await?;
    let exchange = async move {
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = http_body_util::Limited::new(body, RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => HttpError::from(*e),
                Err(e) => HttpError::Protocol(e.to_string()),
            })?
            .to_bytes();
        Ok::<_, HttpError>(Response::from_parts(parts, body))
    };
    tokio::pin!(exchange);
    tokio::pin!(connection);
    // `biased`: tokio's unbiased select draws from an RNG turmoil does not seed.
    tokio::select! {
        biased;
        result = &mut exchange => result,
        closed = &mut connection => {
            closed?;
            // The connection finished cleanly; whatever response it carried is buffered.
            exchange.await
        }
    }
}

#[cfg(test)]
mod tests;
