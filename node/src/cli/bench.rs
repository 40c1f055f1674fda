//! `verge bench`: a closed-loop load generator for the HTTP API.
//!
//! Each client is one task with its own keep-alive HTTP/1.1 connection (a bare
//! `hyper::client::conn::http1` handshake over a `TcpStream`, so the tool adds little overhead
//! of its own) that sends its next request as soon as the previous one answered. Requests that
//! complete during the warm-up are not counted; the measured window is exactly `--duration`
//! seconds, and requests still in flight when it closes are abandoned, so the run always stops
//! on time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::ClientOpts;
use super::http::{
    ApiClient, CONNECT_TIMEOUT, Endpoint, MAX_RESPONSE_BYTES, REQUEST_TIMEOUT, bearer, encode_id,
    read_limited,
};

/// The id of the document that read mode reads.
const HOT_DOC: &str = "bench/hot";
/// The id of the document counter mode increments.
const COUNTER_DOC: &str = "bench/counter";
/// Counter mode's request body.
const INC_BODY: &[u8] = br#"{"ops":[{"op":"inc","path":["n"],"by":1}]}"#;

/// Latencies are recorded in microseconds, up to an hour.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// What the bench sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    /// Every request is a `PATCH` setting one key of the client's own document.
    Write,
    /// Every request is a `GET` of one shared hot document.
    Read,
    /// 90% reads of the hot document, 10% writes to the client's own documents.
    Mixed,
    /// Every request is a `PATCH` incrementing one counter all clients share
    /// (`bench/counter`): the hottest document there is, whose history grows with every
    /// request (docs/compaction.md).
    Counter,
}

impl BenchMode {
    fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Read => "read",
            Self::Mixed => "mixed",
            Self::Counter => "counter",
        }
    }
}

/// Load-test a node over its HTTP API and report throughput and latency.
///
/// Closed loop: each client sends its next request as soon as the previous one answered. The
/// last line of the report is machine-readable (`mode=... p99_ms=...`).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Concurrent clients, each with its own keep-alive connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub clients: u32,
    /// Seconds to measure, after the warm-up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duration: u64,
    /// Seconds to run before measuring, so connections and caches are warm.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=3_600))]
    pub warmup: u64,
    /// What to send: writes, reads of one hot document, or 90% reads and 10% writes.
    #[arg(long, value_enum, default_value_t = BenchMode::Write)]
    pub mode: BenchMode,
    /// Documents each client writes to in turn (`bench/{client}/{k}`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub docs_per_client: u32,
    /// Requests per second, shared by the clients (open loop: each client sends on its own
    /// schedule, whether or not the previous answer came); 0 sends as fast as answers come.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub rate: u32,
}

/// What every client task needs to know.
struct Plan {
    endpoint: Endpoint,
    host: HeaderValue,
    token: Option<HeaderValue>,
    mode: BenchMode,
    docs_per_client: u32,
    hot: Uri,
    /// When the run started.
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// With `--rate`, the time between two requests of one client.
    period: Option<Duration>,
}

/// One client's counts, merged into the report at the end.
struct Stats {
    /// Latency of successful requests, in microseconds.
    latency: Histogram<u64>,
    /// Requests completed in the measured window, successful or not.
    requests: u64,
    reads: u64,
    writes: u64,
    /// Failed requests by kind: an HTTP status (`503`) or `connect`, `io`, `timeout`.
    errors: BTreeMap<String, u64>,
    /// Whether a request was still in flight when the window closed.
    in_flight_at_end: bool,
}

impl Stats {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .context("creating a latency histogram")?,
            requests: 0,
            reads: 0,
            writes: 0,
            errors: BTreeMap::new(),
            in_flight_at_end: false,
        })
    }
}

/// The numbers the report prints.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    mode: &'static str,
    clients: u32,
    duration_s: f64,
    requests: u64,
    reads: u64,
    writes: u64,
    errors: u64,
    errors_by_kind: BTreeMap<String, u64>,
    in_flight_at_end: u64,
    /// Successful requests per second.
    throughput_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

/// Runs the load test described by `args` against the node at `opts.url` and prints a report
/// whose last line is machine-readable. Fails when the node cannot be reached at the start,
/// when read mode cannot create its hot document, or when no request at all succeeded.
pub async fn bench(args: BenchArgs, opts: &ClientOpts) -> anyhow::Result<()> {
    let endpoint = Endpoint::parse(&opts.url).map_err(anyhow::Error::msg)?;
    let token = match opts.token.as_deref() {
        Some(t) if !t.is_empty() => Some(bearer(t).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let host = HeaderValue::from_str(endpoint.authority().as_str())
        .context("the URL's host is not a valid Host header")?;
    let hot: Uri = endpoint
        .target(&format!("/v1/docs/{}", encode_id(HOT_DOC)))
        .parse()
        .context("building the hot document's URL")?;

    // Fail fast with a clear message rather than counting a run full of connect errors.
    connect(&endpoint)
        .await
        .with_context(|| format!("could not reach the node at {endpoint}"))?;
    if matches!(args.mode, BenchMode::Read | BenchMode::Mixed) {
        seed_hot_document(&endpoint, token.clone()).await?;
    }

    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.duration);
    // Progress goes to stderr so stdout holds only the report.
    let _ = writeln!(
        std::io::stderr(),
        "bench: {} clients, mode {}, against {endpoint}: warming up {} s, then measuring {} s",
        args.clients,
        args.mode.name(),
        args.warmup,
        args.duration
    );
    let plan = Arc::new(Plan {
        endpoint,
        host,
        token,
        mode: args.mode,
        docs_per_client: args.docs_per_client,
        hot,
        start,
        measure_from,
        end,
        period: (args.rate > 0)
            .then(|| Duration::from_secs_f64(f64::from(args.clients) / f64::from(args.rate))),
    });

    let tasks: Vec<_> = (0..args.clients)
        .map(|client| tokio::spawn(run_client(client, Arc::clone(&plan))))
        .collect();
    let mut total = Stats::new()?;
    let mut in_flight = 0u64;
    for task in tasks {
        let stats = task.await.context("a bench client task failed")??;
        total
            .latency
            .add(&stats.latency)
            .context("merging latency histograms")?;
        total.requests += stats.requests;
        total.reads += stats.reads;
        total.writes += stats.writes;
        for (kind, n) in stats.errors {
            *total.errors.entry(kind).or_default() += n;
        }
        in_flight += u64::from(stats.in_flight_at_end);
    }

    let summary = summarize(&args, &total, in_flight);
    let mut stdout = std::io::stdout();
    stdout
        .write_all(render_report(&summary).as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing the report")?;
    if summary.requests > 0 && summary.errors == summary.requests {
        bail!(
            "every request failed ({})",
            format_errors(&summary.errors_by_kind)
        );
    }
    if summary.requests == 0 {
        bail!("no request completed within the measured window");
    }
    Ok(())
}

/// A small document with about ten keys of mixed types, for read mode.
fn hot_document() -> serde_json::Value {
    json!({
        "name": "bench hot document",
        "owner": "u-42",
        "count": 42,
        "ratio": 0.5,
        "active": true,
        "tags": ["a", "b", "c"],
        "address": { "city": "Lisbon", "zip": "1100-001" },
        "note": "read by every bench client",
        "created_at_ms": 1_795_000_000_000u64,
        "version": 1
    })
}

async fn seed_hot_document(endpoint: &Endpoint, token: Option<HeaderValue>) -> anyhow::Result<()> {
    let client = ApiClient::new(endpoint.clone(), token);
    let path = format!("/v1/docs/{}", encode_id(HOT_DOC));
    let body = Bytes::from(hot_document().to_string());
    let resp = client
        .send(Method::PUT, &path, Some(body))
        .await
        .map_err(|e| anyhow::anyhow!("writing the hot document {HOT_DOC}: {e}"))?;
    if !resp.status.is_success() {
        bail!(
            "writing the hot document {HOT_DOC} failed with status {}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body).trim()
        );
    }
    Ok(())
}

/// Opens one keep-alive HTTP/1.1 connection and spawns the task that drives it.
async fn connect(endpoint: &Endpoint) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let (host, port) = endpoint.host_port();
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| anyhow::anyhow!("connecting timed out after {CONNECT_TIMEOUT:?}"))??;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes; errors surface on the sender.
        let _ = conn.await;
    });
    Ok(sender)
}

/// Whether request number `n` of client `client` is a write.
fn is_write(mode: BenchMode, client: u32, n: u64) -> bool {
    match mode {
        BenchMode::Write | BenchMode::Counter => true,
        BenchMode::Read => false,
        // Offset by client so the writes of different clients do not all coincide.
        BenchMode::Mixed => (n + u64::from(client)).is_multiple_of(10),
    }
}

fn write_body(counter: u64) -> Bytes {
    Bytes::from(format!(
        "{{\"ops\":[{{\"op\":\"set\",\"path\":[\"v\"],\"value\":{counter}}}]}}"
    ))
}

/// One client: sends requests back to back until the window closes.
async fn run_client(client: u32, plan: Arc<Plan>) -> anyhow::Result<Stats> {
    let mut stats = Stats::new()?;
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut n: u64 = 0;
    let mut writes: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= plan.end {
            break;
        }
        let in_window = |t: Instant| t >= plan.measure_from && t < plan.end;

        let conn = match &mut sender {
            Some(s) => s,
            None => match tokio::time::timeout_at(plan.end, connect(&plan.endpoint)).await {
                Err(_) => break,
                Ok(Ok(s)) => sender.insert(s),
                Ok(Err(_)) => {
                    let done = Instant::now();
                    if in_window(done) {
                        stats.requests += 1;
                        *stats.errors.entry("connect".to_owned()).or_default() += 1;
                    }
                    // Do not spin on a refused connection.
                    tokio::time::sleep_until((done + Duration::from_millis(50)).min(plan.end))
                        .await;
                    continue;
                }
            },
        };
        // A connection the server closed between requests is replaced silently; that is not a
        // failed request.
        match tokio::time::timeout_at(plan.end, conn.ready()).await {
            Err(_) => break,
            Ok(Err(_)) => {
                sender = None;
                continue;
            }
            Ok(Ok(())) => {}
        }

        if let Some(period) = plan.period {
            // Clients start spread over one period (by the golden ratio, even for any count),
            // then keep their own schedule.
            let offset = period.mul_f64((f64::from(client) * 0.618_033_988_75).fract());
            let due =
                plan.start + offset + period.saturating_mul(n.min(u64::from(u32::MAX)) as u32);
            if due >= plan.end {
                break;
            }
            tokio::time::sleep_until(due).await;
        }
        let write = is_write(plan.mode, client, n);
        let mut builder = Request::builder().header(HOST, plan.host.clone());
        if let Some(token) = &plan.token {
            builder = builder.header(AUTHORIZATION, token.clone());
        }
        let request = if write {
            // Built per request rather than kept per document: formatting is cheap next to a
            // round trip, and memory stays flat however large --docs-per-client is.
            let (target, body) = if plan.mode == BenchMode::Counter {
                (
                    format!("/v1/docs/{}", encode_id(COUNTER_DOC)),
                    Bytes::from_static(INC_BODY),
                )
            } else {
                let k = writes % u64::from(plan.docs_per_client);
                (format!("/v1/docs/bench/{client}/{k}"), write_body(n))
            };
            let uri = plan
                .endpoint
                .target(&target)
                .parse::<Uri>()
                .context("building a document URL")?;
            builder
                .method(Method::PATCH)
                .uri(uri)
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(body))
        } else {
            builder
                .method(Method::GET)
                .uri(plan.hot.clone())
                .body(Full::new(Bytes::new()))
        }
        .context("building a request")?;
        n += 1;
        if write {
            writes += 1;
        }

        let started = Instant::now();
        let deadline = (started + REQUEST_TIMEOUT).min(plan.end);
        let exchange = async {
            let response = conn
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            read_limited(response.into_body(), MAX_RESPONSE_BYTES)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(status)
        };
        let outcome = tokio::time::timeout_at(deadline, exchange).await;
        let done = Instant::now();
        let kind = match outcome {
            Err(_) if deadline >= plan.end => {
                stats.in_flight_at_end = true;
                break;
            }
            Err(_) => {
                sender = None; // the connection is in an unknown state
                Some("timeout".to_owned())
            }
            Ok(Err(_)) => {
                sender = None;
                Some("io".to_owned())
            }
            Ok(Ok(status)) if status.is_success() => None,
            Ok(Ok(status)) => Some(status.as_u16().to_string()),
        };
        if !in_window(done) {
            continue;
        }
        stats.requests += 1;
        if write {
            stats.writes += 1;
        } else {
            stats.reads += 1;
        }
        match kind {
            None => {
                let us =
                    u64::try_from(done.duration_since(started).as_micros()).unwrap_or(u64::MAX);
                stats.latency.saturating_record(us.max(1));
            }
            Some(kind) => {
                let overloaded = kind == "503";
                *stats.errors.entry(kind).or_default() += 1;
                if overloaded {
                    // The node asks for back-off when its write queue is full.
                    tokio::time::sleep_until((done + Duration::from_millis(10)).min(plan.end))
                        .await;
                }
            }
        }
    }
    Ok(stats)
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn summarize(args: &BenchArgs, total: &Stats, in_flight_at_end: u64) -> Summary {
    let errors: u64 = total.errors.values().sum();
    let ok = total.requests.saturating_sub(errors);
    let duration_s = args.duration as f64;
    let h = &total.latency;
    let q = |quantile: f64| {
        if h.is_empty() {
            0.0
        } else {
            us_to_ms(h.value_at_quantile(quantile))
        }
    };
    Summary {
        mode: args.mode.name(),
        clients: args.clients,
        duration_s,
        requests: total.requests,
        reads: total.reads,
        writes: total.writes,
        errors,
        errors_by_kind: total.errors.clone(),
        in_flight_at_end,
        throughput_per_s: ok as f64 / duration_s,
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: if h.is_empty() { 0.0 } else { us_to_ms(h.max()) },
    }
}

fn format_errors(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".to_owned();
    }
    errors
        .iter()
        .map(|(kind, n)| format!("{kind}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last line of the report, for scripts.
fn summary_line(s: &Summary) -> String {
    format!(
        "mode={} clients={} requests={} errors={} throughput_per_s={:.1} p50_ms={:.3} \
         p90_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3}",
        s.mode,
        s.clients,
        s.requests,
        s.errors,
        s.throughput_per_s,
        s.p50_ms,
        s.p90_ms,
        s.p99_ms,
        s.p999_ms,
        s.max_ms
    )
}

/// The whole report: a readable block, then [`summary_line`] as the last line.
fn render_report(s: &Summary) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "verge bench: mode {}, {} clients, {} s measured",
        s.mode, s.clients, s.duration_s
    );
    let _ = writeln!(
        out,
        "  requests    {} ({} reads, {} writes)",
        s.requests, s.reads, s.writes
    );
    let _ = writeln!(
        out,
        "  errors      {} ({})",
        s.errors,
        format_errors(&s.errors_by_kind)
    );
    let _ = writeln!(
        out,
        "  throughput  {:.1} successful requests/s",
        s.throughput_per_s
    );
    let _ = writeln!(
        out,
        "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
    );
    if s.in_flight_at_end > 0 {
        let _ = writeln!(
            out,
            "  in flight   {} requests still running when the window closed (not counted)",
            s.in_flight_at_end
        );
    }
    out.push_str(&summary_line(s));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            mode: "write",
            clients: 64,
            duration_s: 10.0,
            requests: 12_345,
            reads: 0,
            writes: 12_345,
            errors: 5,
            errors_by_kind: BTreeMap::from([("503".to_owned(), 4), ("io".to_owned(), 1)]),
            in_flight_at_end: 64,
            throughput_per_s: 1234.0,
            p50_ms: 1.2345,
            p90_ms: 2.0,
            p99_ms: 3.5,
            p999_ms: 7.25,
            max_ms: 12.0,
        }
    }

    #[test]
    fn summary_line_is_machine_readable() {
        assert_eq!(
            summary_line(&summary()),
            "mode=write clients=64 requests=12345 errors=5 throughput_per_s=1234.0 \
             p50_ms=1.234 p90_ms=2.000 p99_ms=3.500 p999_ms=7.250 max_ms=12.000"
        );
    }

    #[test]
    fn report_ends_with_the_summary_line() {
        let s = summary();
        let report = render_report(&s);
        let last = report.lines().last().expect("the report is not empty");
        assert_eq!(last, summary_line(&s));
        assert!(report.contains("503=4 io=1"));
        assert!(report.contains("64 requests still running"));
        assert_eq!(report.lines().filter(|l| l.starts_with("mode=")).count(), 1);
    }

    #[test]
    fn summarize_computes_throughput_and_quantiles() {
        let args = BenchArgs {
            clients: 2,
            duration: 2,
            warmup: 0,
            mode: BenchMode::Mixed,
            docs_per_client: 1,
            rate: 0,
        };
        let mut stats = Stats::new().expect("histogram");
        for us in 1..=1000u64 {
            stats.latency.saturating_record(us * 10);
        }
        stats.requests = 1010;
        stats.errors.insert("503".to_owned(), 10);
        let s = summarize(&args, &stats, 0);
        assert_eq!(s.errors, 10);
        assert!((s.throughput_per_s - 500.0).abs() < 1e-9);
        assert!((s.p50_ms - 5.0).abs() < 0.01, "{}", s.p50_ms);
        assert!((s.max_ms - 10.0).abs() < 0.01, "{}", s.max_ms);

        let empty = summarize(&args, &Stats::new().expect("histogram"), 0);
        assert_eq!(empty.p99_ms, 0.0);
        assert_eq!(empty.throughput_per_s, 0.0);
    }

    #[test]
    fn mixed_mode_writes_one_in_ten() {
        let writes = (0..1000)
            .filter(|&n| is_write(BenchMode::Mixed, 3, n))
            .count();
        assert_eq!(writes, 100);
        assert!((0..10).all(|n| is_write(BenchMode::Write, 0, n)));
        assert!((0..10).all(|n| is_write(BenchMode::Counter, 0, n)));
        assert!((0..10).all(|n| !is_write(BenchMode::Read, 0, n)));
    }

    #[test]
    fn write_body_is_the_documented_patch() {
        let body: serde_json::Value = serde_json::from_slice(&write_body(7)).expect("valid JSON");
        assert_eq!(body, json!({"ops":[{"op":"set","path":["v"],"value":7}]}));
        assert_eq!(hot_document().as_object().map(|m| m.len()), Some(10));
    }
}
