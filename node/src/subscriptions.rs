//! Webhook subscriptions: the change feed pushed to an application's URL.
//!
//! Each `[[subscriptions]]` entry follows the node's change feed (`store::feed`) from a
//! cursor kept durably in the store, and POSTs the records under its prefix in batches of JSON,
//! signed with HMAC-SHA256 under the subscription's secret (`Verge-Signature: sha256=<hex>`).
//! A batch is sent again, with capped exponential back-off, until the receiver answers 2xx;
//! only then does the cursor move past it. So delivery is at least once, in feed order (and so
//! in order per document), across restarts of the node; a receiver that was down gets
//! everything the feed still holds when it returns. A receiver should use `Verge-Delivery`
//! (the batch's first and last numbers) or each event's `seq` to skip what it already took.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use verge_core::heads_to_hex;

use crate::documents::Documents;
use crate::metrics::Metrics;
use crate::store::{FeedRecord, Store};

/// Most subscriptions a node may have.
pub const SUBSCRIPTIONS_MAX: usize = 64;
/// Most events in one batch that may be configured.
pub const BATCH_MAX: usize = 1000;
/// Longest `max_delay_ms` that may be configured.
pub const MAX_DELAY_MS_MAX: u64 = 60_000;
/// Longest `timeout_s` that may be configured.
pub const TIMEOUT_S_MAX: u64 = 60;
/// First pause after a failed delivery; it doubles after each failure, up to
/// [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest pause between tries of one batch.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Largest secret file read.
const SECRET_FILE_BYTES_MAX: u64 = 4096;
/// Fewest bytes a secret may have.
const SECRET_BYTES_MIN: usize = 16;
/// Most bytes of a receiver's answer read (to report it; the body is otherwise unused).
const ANSWER_BYTES_MAX: usize = 4096;
/// Least time between two writes of a cursor that moved over records outside the prefix only.
const SKIP_PERSIST_INTERVAL: Duration = Duration::from_secs(1);
/// Feed records read at a time while gathering a batch.
const PAGE: usize = 512;
/// Pages one gathering looks at before the task lets others run.
const GATHER_PAGES: usize = 16;

/// A `[[subscriptions]]` entry as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionFileConfig {
    /// Names the subscription in status, metrics and its durable cursor.
    pub name: String,
    /// Where batches are POSTed (`http://`).
    pub url: String,
    /// Only documents whose id starts with this.
    #[serde(default)]
    pub prefix: String,
    /// File holding the HMAC secret (at least 16 bytes; surrounding whitespace ignored).
    pub secret_file: PathBuf,
    /// Most events in one POST.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Longest an event waits for others to fill its batch, in milliseconds.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// Seconds the receiver has to answer one POST.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// For an `https://` URL: PEM file of the certificate authorities to trust instead of the
    /// system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_batch_max() -> usize {
    100
}
fn default_max_delay_ms() -> u64 {
    1000
}
fn default_timeout_s() -> u64 {
    10
}

/// A checked subscription.
#[derive(Clone)]
pub struct Subscription {
    /// Its name.
    pub name: String,
    /// Where batches go.
    pub url: Uri,
    /// Only documents whose id starts with this.
    pub prefix: String,
    secret: Arc<Vec<u8>>,
    /// Most events in one POST.
    pub batch_max: usize,
    /// Longest an event waits for others to fill its batch.
    pub max_delay: Duration,
    /// How long the receiver has to answer.
    pub timeout: Duration,
    /// For `https://`: the TLS client settings (trusted roots).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Checks the file's entries, reading each secret (relative paths from `base`).
pub fn resolve(
    entries: &[SubscriptionFileConfig],
    base: &Path,
) -> Result<Vec<Subscription>, String> {
    if entries.len() > SUBSCRIPTIONS_MAX {
        return Err(format!("at most {SUBSCRIPTIONS_MAX} subscriptions"));
    }
    let mut names = std::collections::HashSet::new();
    entries
        .iter()
        .map(|e| {
            let context = |m: String| format!("subscription {:?}: {m}", e.name);
            let name_ok = !e.name.is_empty()
                && e.name.len() <= 64
                && e.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok {
                return Err(context("name must be 1 to 64 of [A-Za-z0-9_-]".to_owned()));
            }
            if !names.insert(e.name.clone()) {
                return Err(context("the name is used twice".to_owned()));
            }
            let url: Uri = e
                .url
                .parse()
                .map_err(|err| context(format!("url {:?}: {err}", e.url)))?;
            let tls = match url.scheme_str() {
                Some("http") if url.host().is_some() => {
                    if e.ca_file.is_some() {
                        return Err(context("ca_file is for https:// URLs".to_owned()));
                    }
                    None
                }
                Some("https") if url.host().is_some() => {
                    Some(tls_config(e.ca_file.as_deref().map(|f| base.join(f))).map_err(context)?)
                }
                _ => {
                    return Err(context(format!(
                        "url {:?} is not http://host/... or https://host/...",
                        e.url
                    )));
                }
            };
            if e.prefix.len() > verge_core::limits::DOC_ID_BYTES_MAX
                || !e.prefix.bytes().all(verge_core::doc_id::is_id_byte)
            {
                return Err(context(format!(
                    "prefix {:?} is not the start of a document id",
                    e.prefix
                )));
            }
            if !(1..=BATCH_MAX).contains(&e.batch_max) {
                return Err(context(format!("batch_max must be 1 to {BATCH_MAX}")));
            }
            if e.max_delay_ms > MAX_DELAY_MS_MAX {
                return Err(context(format!(
                    "max_delay_ms must be at most {MAX_DELAY_MS_MAX}"
                )));
            }
            if !(1..=TIMEOUT_S_MAX).contains(&e.timeout_s) {
                return Err(context(format!("timeout_s must be 1 to {TIMEOUT_S_MAX}")));
            }
            let path = base.join(&e.secret_file);
            let secret = read_secret(&path).map_err(context)?;
            Ok(Subscription {
                name: e.name.clone(),
                url,
                prefix: e.prefix.clone(),
                secret: Arc::new(secret),
                batch_max: e.batch_max,
                max_delay: Duration::from_millis(e.max_delay_ms),
                timeout: Duration::from_secs(e.timeout_s),
                tls,
            })
        })
        .collect()
}

/// Where systems keep their bundle of trusted certificate authorities.
const SYSTEM_CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];
/// Largest CA file read.
const CA_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// TLS client settings trusting the authorities in `ca_file`, or the system's.
fn tls_config(ca_file: Option<PathBuf>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let path = match ca_file {
        Some(path) => path,
        None => SYSTEM_CA_BUNDLES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!(
                    "an https:// URL needs trusted authorities: none of {} exists; set ca_file",
                    SYSTEM_CA_BUNDLES.join(", ")
                )
            })?,
    };
    let len = std::fs::metadata(&path)
        .map_err(|e| format!("ca_file {}: {e}", path.display()))?
        .len();
    if len > CA_FILE_BYTES_MAX {
        return Err(format!(
            "ca_file {} is {len} bytes; at most {CA_FILE_BYTES_MAX}",
            path.display()
        ));
    }
    let pem = std::fs::read(&path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        // A bundle may hold certificates this TLS library does not take; the rest still count.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!("ca_file {} holds no certificate", path.display()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("secret_file {}: {e}", path.display()))?
        .len();
    if len > SECRET_FILE_BYTES_MAX {
        return Err(format!(
            "secret_file {} is {len} bytes; at most {SECRET_FILE_BYTES_MAX}",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("secret_file {}: {e}", path.display()))?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < SECRET_BYTES_MIN {
        return Err(format!(
            "secret_file {} holds {} bytes; at least {SECRET_BYTES_MIN} (e.g. `openssl rand -hex 32`)",
            path.display(),
            secret.len()
        ));
    }
    Ok(secret)
}

/// `sha256=<hex>` of HMAC-SHA256 of `body` under `secret`: the `Verge-Signature` header.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// What status tells of a subscription.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SubscriptionStatus {
    /// Its name.
    pub name: String,
    /// Where it delivers.
    pub url: String,
    /// Its prefix.
    pub prefix: String,
    /// The last feed number delivered (or passed over, outside the prefix).
    pub cursor: u64,
    /// Feed records after the cursor (of every prefix).
    pub lag: u64,
    /// Events delivered since the node started.
    pub delivered: u64,
    /// Failed tries since the node started.
    pub failures: u64,
    /// Failed tries of the batch now being sent (0 when none is failing).
    pub failing_for: u64,
    /// Why the last try failed, if the last try failed.
    pub last_error: Option<String>,
    /// When a batch was last delivered, Unix milliseconds.
    pub last_delivery_ms: Option<i64>,
}

/// The running subscriptions.
#[derive(Debug, Default)]
pub struct Subscriptions {
    status: Mutex<Vec<SubscriptionStatus>>,
}

impl Subscriptions {
    /// Every subscription's state, for `GET /v1/status`, with its lag behind `last`.
    pub fn status(&self, last: u64) -> Vec<SubscriptionStatus> {
        let mut all = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for s in &mut all {
            s.lag = last.saturating_sub(s.cursor);
        }
        all
    }

    fn update(&self, index: usize, f: impl FnOnce(&mut SubscriptionStatus)) {
        if let Some(s) = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
        {
            f(s);
        }
    }
}

/// The store key of a subscription's cursor.
fn cursor_key(name: &str) -> String {
    format!("subscription_cursor/{name}")
}

/// Starts one delivery task per subscription; they end when `stop` turns true.
pub fn start(
    subscriptions: Vec<Subscription>,
    docs: &Arc<Documents>,
    store: &Arc<Store>,
    metrics: &Arc<Metrics>,
    node_id: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Arc<Subscriptions>, Vec<tokio::task::JoinHandle<()>>) {
    let running = Arc::new(Subscriptions {
        status: Mutex::new(
            subscriptions
                .iter()
                .map(|s| SubscriptionStatus {
                    name: s.name.clone(),
                    url: s.url.to_string(),
                    prefix: s.prefix.clone(),
                    ..SubscriptionStatus::default()
                })
                .collect(),
        ),
    });
    for sub in &subscriptions {
        // At 0 from the start, for dashboards and alerts.
        let labels = vec![("subscription", sub.name.clone())];
        let _ = metrics.subscription_delivered.get_or_create(&labels);
        let _ = metrics.subscription_failures.get_or_create(&labels);
        let _ = metrics.subscription_resets.get_or_create(&labels);
        let _ = metrics.subscription_lag.get_or_create(&labels);
    }
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let tasks = subscriptions
        .into_iter()
        .enumerate()
        .map(|(index, sub)| {
            let delivery = Delivery {
                index,
                sub,
                docs: Arc::clone(docs),
                store: Arc::clone(store),
                metrics: Arc::clone(metrics),
                running: Arc::clone(&running),
                client: client.clone(),
                node_id: node_id.to_owned(),
                stop: stop.clone(),
            };
            tokio::spawn(delivery.run())
        })
        .collect();
    (running, tasks)
}

struct Delivery {
    index: usize,
    sub: Subscription,
    docs: Arc<Documents>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    running: Arc<Subscriptions>,
    client: Client<HttpConnector, Full<Bytes>>,
    node_id: String,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// A batch gathered from the feed.
struct Batch {
    events: Vec<FeedRecord>,
    /// The last number looked at (the cursor once the batch is delivered).
    scanned_to: u64,
    /// The cursor was older than the feed's oldest record: events were lost to retention.
    reset: bool,
    /// The feed holds records past `scanned_to` not looked at yet.
    more: bool,
}

impl Delivery {
    async fn run(mut self) {
        let name = self.sub.name.clone();
        if let Err(e) = self.deliver_forever().await {
            tracing::error!(subscription = %name, error = %e, "the subscription stopped");
        }
    }

    fn load_cursor(&self) -> Result<u64, String> {
        let key = cursor_key(&self.sub.name);
        match self.store.node_value(&key).map_err(|e| e.to_string())? {
            Some(bytes) => bytes
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| format!("the stored cursor of {:?} is damaged", self.sub.name)),
            None => {
                // A new subscription starts with the changes after it was configured.
                let last = self.docs.feed_bounds().map_err(|e| e.to_string())?.last;
                self.save_cursor(last)?;
                Ok(last)
            }
        }
    }

    fn save_cursor(&self, cursor: u64) -> Result<(), String> {
        self.store
            .set_node_value(&cursor_key(&self.sub.name), &cursor.to_be_bytes())
            .map_err(|e| e.to_string())
    }

    async fn deliver_forever(&mut self) -> Result<(), String> {
        let mut rx = self.docs.subscribe();
        let mut cursor = self.load_cursor()?;
        let mut saved = cursor;
        let mut saved_at = tokio::time::Instant::now();
        self.running.update(self.index, |s| s.cursor = cursor);
        let labels = vec![("subscription", self.sub.name.clone())];
        loop {
            let mut batch = self.gather(cursor)?;
            if batch.events.is_empty() && !batch.reset {
                cursor = batch.scanned_to;
                if cursor != saved && saved_at.elapsed() >= SKIP_PERSIST_INTERVAL {
                    self.save_cursor(cursor)?;
                    (saved, saved_at) = (cursor, tokio::time::Instant::now());
                }
                self.running.update(self.index, |s| s.cursor = cursor);
                if batch.more {
                    tokio::task::yield_now().await;
                    continue;
                }
                // Wait for the next commit (any: the feed is read again from the cursor).
                tokio::select! {
                    _ = self.stop.wait_for(|s| *s) => return Ok(()),
                    received = rx.recv() => match received {
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return Ok(()),
                    },
                    // Retention may trim the feed under a subscription that waits.
                    () = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                continue;
            }
            if !batch.events.is_empty()
                && batch.events.len() < self.sub.batch_max
                && !self.sub.max_delay.is_zero()
            {
                // Let the batch fill for what is left of its first event's delay.
                let age_ms = self
                    .docs
                    .now_ms()
                    .saturating_sub(batch.events[0].at_ms)
                    .max(0) as u64;
                let left = self
                    .sub
                    .max_delay
                    .saturating_sub(Duration::from_millis(age_ms));
                if !left.is_zero() {
                    tokio::select! {
                        _ = self.stop.wait_for(|s| *s) => return Ok(()),
                        () = tokio::time::sleep(left) => {}
                    }
                    let reset = batch.reset;
                    batch = self.gather(cursor)?;
                    batch.reset |= reset;
                }
            }
            if batch.reset {
                self.metrics
                    .subscription_resets
                    .get_or_create(&labels)
                    .inc();
                tracing::warn!(subscription = %self.sub.name, cursor, "the feed no longer holds the changes after this subscription's cursor; the next batch says reset");
            }
            if !self.send_until_delivered(&batch, &labels).await {
                return Ok(());
            }
            cursor = batch.scanned_to;
            self.save_cursor(cursor)?;
            (saved, saved_at) = (cursor, tokio::time::Instant::now());
            let now = self.docs.now_ms();
            let count = batch.events.len() as u64;
            self.running.update(self.index, |s| {
                s.cursor = cursor;
                s.delivered += count;
                s.failing_for = 0;
                s.last_error = None;
                s.last_delivery_ms = Some(now);
            });
            self.metrics
                .subscription_delivered
                .get_or_create(&labels)
                .inc_by(count);
        }
    }

    /// Up to `batch_max` records under the prefix after `cursor`, looking at most
    /// [`GATHER_PAGES`] pages (`more` says whether the feed holds records past what was looked
    /// at).
    fn gather(&self, cursor: u64) -> Result<Batch, String> {
        let bounds = self.docs.feed_bounds().map_err(|e| e.to_string())?;
        self.metrics
            .subscription_lag
            .get_or_create(&vec![("subscription", self.sub.name.clone())])
            .set(bounds.last.saturating_sub(cursor) as i64);
        let mut after = cursor;
        let mut reset = false;
        let oldest_resumable = bounds.first.map_or(bounds.last, |first| first - 1);
        if cursor < oldest_resumable || cursor > bounds.last {
            // Records after the cursor were dropped by retention, or the cursor is another
            // store's number (the data directory was replaced).
            after = oldest_resumable.min(bounds.last);
            reset = true;
        }
        let mut events = Vec::new();
        for _ in 0..GATHER_PAGES {
            let page = self
                .docs
                .feed_after(after, PAGE)
                .map_err(|e| e.to_string())?;
            let Some(first) = page.first() else {
                return Ok(Batch {
                    events,
                    scanned_to: after,
                    reset,
                    more: false,
                });
            };
            if first.seq != after + 1 {
                // Retention dropped records between two reads.
                reset = true;
            }
            for record in page {
                if events.len() == self.sub.batch_max {
                    return Ok(Batch {
                        events,
                        scanned_to: after,
                        reset,
                        more: true,
                    });
                }
                after = record.seq;
                if record.id.starts_with(&self.sub.prefix) {
                    events.push(record);
                }
            }
        }
        Ok(Batch {
            events,
            scanned_to: after,
            reset,
            more: after < bounds.last,
        })
    }

    /// POSTs `batch` until a 2xx; `false` if the node stopped first.
    async fn send_until_delivered(&mut self, batch: &Batch, labels: &SubLabels) -> bool {
        let body = Bytes::from(
            json!({
                "subscription": self.sub.name,
                "node": self.node_id,
                "reset": batch.reset,
                "events": batch.events.iter().map(|r| json!({
                    "seq": r.seq,
                    "id": r.id,
                    "heads": heads_to_hex(&r.heads),
                    "deleted": r.deleted,
                    "at_ms": r.at_ms,
                })).collect::<Vec<_>>(),
            })
            .to_string(),
        );
        let signature = signature(&self.sub.secret, &body);
        let delivery = format!(
            "{}-{}",
            batch.events.first().map_or(0, |r| r.seq),
            batch.events.last().map_or(0, |r| r.seq)
        );
        let mut backoff = BACKOFF_MIN;
        loop {
            let outcome = self.post(body.clone(), &signature, &delivery).await;
            match outcome {
                Ok(()) => return true,
                Err(why) => {
                    self.metrics
                        .subscription_failures
                        .get_or_create(labels)
                        .inc();
                    tracing::warn!(subscription = %self.sub.name, delivery = %delivery, error = %why, retry_in_ms = backoff.as_millis() as u64, "a webhook delivery failed");
                    self.running.update(self.index, |s| {
                        s.failures += 1;
                        s.failing_for += 1;
                        s.last_error = Some(why);
                    });
                    tokio::select! {
                        _ = self.stop.wait_for(|s| *s) => return false,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn post(&self, body: Bytes, signature: &str, delivery: &str) -> Result<(), String> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.sub.url.clone())
            .header("content-type", "application/json")
            .header("user-agent", concat!("verge/", env!("CARGO_PKG_VERSION")))
            .header("verge-signature", signature)
            .header("verge-subscription", &self.sub.name)
            .header("verge-delivery", delivery)
            .body(Full::new(body))
            .map_err(|e| format!("building the request: {e}"))?;
        let answer = tokio::time::timeout(self.sub.timeout, async {
            let response = match &self.sub.tls {
                None => self
                    .client
                    .request(request)
                    .await
                    .map_err(|e| format!("{e}: {}", error_chain(&e)))?,
                Some(tls) => post_tls(tls, request).await?,
            };
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), ANSWER_BYTES_MAX)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, String>((status, body))
        })
        .await
        .map_err(|_| format!("no answer within {} s", self.sub.timeout.as_secs()))??;
        let (status, body) = answer;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "the receiver answered {status}: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ))
        }
    }
}

/// Sends `request` over a new TLS connection (one per batch: batches are few and large).
async fn post_tls(
    tls: &Arc<rustls::ClientConfig>,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let uri = request.uri();
    let host = uri.host().ok_or("the URL has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .map_err(|e| format!("{host}: {e}"))?;
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP with {host}:{port}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // A connection of its own takes the request in origin form, with a Host header.
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|e| format!("{e}"))?;
    parts.headers.insert(
        hyper::header::HOST,
        hyper::header::HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
    );
    sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| format!("{e}: {}", error_chain(&e)))
}

/// Labels of a subscription's metrics.
pub type SubLabels = Vec<(&'static str, String)>;

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        out.push(s.to_string());
        source = s.source();
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231, test case 2.
    #[test]
    fn signatures_are_hmac_sha256() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn bad_entries_are_refused_with_their_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("s"), "0123456789abcdef0123\n").expect("write");
        std::fs::write(dir.path().join("short"), "abc").expect("write");
        let entry = |name: &str, url: &str, secret: &str| SubscriptionFileConfig {
            name: name.into(),
            url: url.into(),
            prefix: "cart/".into(),
            secret_file: secret.into(),
            batch_max: 10,
            max_delay_ms: 100,
            timeout_s: 5,
            ca_file: None,
        };
        let ok = resolve(
            &[entry("orders", "http://127.0.0.1:9/hook", "s")],
            dir.path(),
        )
        .expect("valid");
        assert_eq!(ok[0].secret.as_slice(), b"0123456789abcdef0123");
        for (bad, says) in [
            (vec![entry("a b", "http://x/", "s")], "name"),
            (vec![entry("a", "https://x/", "short")], "at least 16"),
            (vec![entry("a", "ftp://x/", "s")], "http://"),
            (vec![entry("a", "http://x/", "short")], "at least 16"),
            (vec![entry("a", "http://x/", "missing")], "secret_file"),
            (
                vec![entry("a", "http://x/", "s"), entry("a", "http://y/", "s")],
                "twice",
            ),
        ] {
            let e = resolve(&bad, dir.path()).expect_err(says);
            assert!(e.contains(says), "{e}");
        }
        let mut https = entry("a", "https://x/", "s");
        https.ca_file = Some("missing.pem".into());
        assert!(
            resolve(&[https.clone()], dir.path())
                .expect_err("no ca")
                .contains("ca_file")
        );
        std::fs::write(dir.path().join("empty.pem"), "").expect("write");
        https.ca_file = Some("empty.pem".into());
        assert!(
            resolve(&[https.clone()], dir.path())
                .expect_err("empty")
                .contains("no certificate")
        );
        let mut http = entry("a", "http://x/", "s");
        http.ca_file = Some("empty.pem".into());
        assert!(
            resolve(&[http], dir.path())
                .expect_err("http")
                .contains("https")
        );
        let mut big = entry("a", "http://x/", "s");
        big.batch_max = BATCH_MAX + 1;
        assert!(resolve(&[big], dir.path()).is_err());
    }
}
