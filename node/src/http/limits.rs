//! Limits on how much of the API one client can take: open connections, and requests per
//! second per token.
//!
//! The connection limit wraps the listener: a connection beyond `api_connections_max` gets a
//! `503 too_many_connections` answer and is closed, without reaching the router. The rate limit
//! is a token bucket per API token, checked by the auth middleware right after the token is
//! recognised: a token may send `rate` requests at once, then `rate` per second on average;
//! beyond that it gets `429 rate_limited` with `Retry-After`.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::auth::Auth;
use crate::metrics::Metrics;

/// How long a refused connection gets to receive its `503` before it is closed.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Refusals being written at once; connections beyond this are closed without an answer.
const REFUSALS_MAX: usize = 64;

/// The `503` written to a connection beyond the limit.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 96\r\n\
\r\n\
{\"error\":{\"code\":\"too_many_connections\",\"message\":\"the node has too many open API connections\"}}";

/// A listener that keeps at most `max` connections open.
#[derive(Debug)]
pub struct ConnectionLimit<L> {
    inner: L,
    open: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl<L> ConnectionLimit<L> {
    /// Limits `inner` to `max` open connections.
    pub fn new(inner: L, max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            open: Arc::new(Semaphore::new(max)),
            refusing: Arc::new(Semaphore::new(REFUSALS_MAX)),
            metrics,
        }
    }
}

impl<L: axum::serve::Listener> axum::serve::Listener for ConnectionLimit<L> {
    type Io = Limited<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            if let Ok(permit) = Arc::clone(&self.open).try_acquire_owned() {
                let open = self.metrics.api_connections.clone();
                open.inc();
                return (
                    Limited {
                        io,
                        _slot: Slot {
                            _permit: permit,
                            open,
                        },
                    },
                    addr,
                );
            }
            self.metrics.api_connections_refused.inc();
            if let Ok(permit) = Arc::clone(&self.refusing).try_acquire_owned() {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refuse(io)).await;
                    drop(permit);
                });
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Answers `503` and closes, reading what the client sent meanwhile so that the close does not
/// turn into a reset that could discard the answer.
async fn refuse<T: AsyncRead + AsyncWrite + Unpin>(mut io: T) -> io::Result<()> {
    io.write_all(REFUSAL).await?;
    io.flush().await?;
    io.shutdown().await?;
    let mut sink = [0u8; 4096];
    while io.read(&mut sink).await? > 0 {}
    Ok(())
}

/// One open connection's place under the limit, given back when the connection closes.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A connection counted against the limit.
#[derive(Debug)]
pub struct Limited<T> {
    io: T,
    _slot: Slot,
}

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    /// Requests per second, and also the most that may be sent at once.
    rate: f64,
    available: f64,
    last: Instant,
}

impl Bucket {
    /// Takes one request's worth, or says how long until one is available.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.available = (self.available + elapsed * self.rate).min(self.rate);
        if self.available >= 1.0 {
            self.available -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.available) / self.rate))
        }
    }
}

/// The request rate limits of the configured tokens.
#[derive(Debug, Default)]
pub struct RateLimits {
    buckets: HashMap<String, Mutex<Bucket>>,
}

impl RateLimits {
    /// A bucket for every token with a rate: its own `requests_per_second`, else `default`.
    /// Tokens without either, and an API without tokens, are not limited.
    pub fn new(auth: &Auth, default: Option<u32>) -> Self {
        let now = Instant::now();
        let buckets = match auth {
            Auth::Open { .. } => HashMap::new(),
            Auth::Tokens(tokens) => tokens
                .iter()
                .filter_map(|t| {
                    let rate = f64::from(t.requests_per_second().or(default)?);
                    let bucket = Bucket {
                        rate,
                        available: rate,
                        last: now,
                    };
                    Some((t.name().to_owned(), Mutex::new(bucket)))
                })
                .collect(),
        };
        Self { buckets }
    }

    /// Admits one request by the token named `token`, or says how long to wait.
    pub fn check(&self, token: &str) -> Result<(), Duration> {
        match self.buckets.get(token) {
            None => Ok(()),
            Some(bucket) => bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut b = Bucket {
            rate: 4.0,
            available: 4.0,
            last: start,
        };
        for _ in 0..4 {
            assert_eq!(b.take(start), Ok(()));
        }
        let wait = b.take(start).expect_err("burst used up");
        assert_eq!(wait, Duration::from_millis(250));
        let later = start + Duration::from_millis(500);
        assert_eq!(b.take(later), Ok(()));
        assert_eq!(b.take(later), Ok(()));
        assert!(b.take(later).is_err());
        // Idle time refills up to the burst, not beyond.
        let much_later = later + Duration::from_secs(60);
        for _ in 0..4 {
            assert_eq!(b.take(much_later), Ok(()));
        }
        assert!(b.take(much_later).is_err());
    }

    #[test]
    fn refusal_is_a_complete_response() {
        let text = std::str::from_utf8(REFUSAL).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let parsed: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(parsed["error"]["code"], "too_many_connections");
    }

    #[test]
    fn limits_follow_the_token_settings() {
        assert_eq!(
            RateLimits::new(&Auth::Open { explicit: false }, Some(1)).check("x"),
            Ok(())
        );
        let entry = |name: &str, rate| crate::auth::TokenFileConfig {
            name: name.into(),
            hash: crate::auth::format_hash(&crate::auth::hash_token(name)),
            role: crate::auth::Role::Read,
            prefixes: vec![String::new()],
            requests_per_second: rate,
        };
        let file = crate::auth::AuthFileConfig {
            mode: None,
            tokens: vec![entry("own", Some(2)), entry("other", None)],
        };
        let auth = Auth::resolve(Some(&file), ([127, 0, 0, 1], 7070).into()).expect("auth");
        let unlimited_default = RateLimits::new(&auth, None);
        assert!(unlimited_default.check("own").is_ok());
        assert!(unlimited_default.check("own").is_ok());
        assert!(unlimited_default.check("own").is_err());
        assert!((0..100).all(|_| unlimited_default.check("other").is_ok()));
        let with_default = RateLimits::new(&auth, Some(1));
        assert!(with_default.check("other").is_ok());
        assert!(with_default.check("other").is_err());
        assert!(with_default.check("own").is_ok());
        assert!(with_default.check("own").is_ok());
    }
}
