//! `verge bench-replication`: how long a write acknowledged at one node takes to become
//! visible at another, under a steady write rate, and how many gossip messages it costs.
//!
//! Each write goes to its own document, so the heads the writer's node acknowledges are exactly
//! the heads the watched node reports in its change event; the difference of the two instants is
//! the replication latency. Both run on this machine's clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use hyper::Method;

use super::http::{ApiClient, Endpoint};
use super::sse::SseParser;

/// Options of the replication benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplicationBenchArgs {
    /// API of the node that takes the writes.
    #[arg(long, value_name = "URL")]
    pub write_url: String,
    /// API of the node watched for the writes to arrive.
    #[arg(long, value_name = "URL")]
    pub watch_url: String,
    /// APIs of every node, to count gossip messages per write from their metrics.
    #[arg(long = "metrics-url", value_name = "URL")]
    pub metrics_urls: Vec<String>,
    /// Writes per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
}

type Pending = Mutex<HashMap<String, Instant>>;

/// Every frame a node wrote to a peer, one series per message kind.
const PEER_MESSAGES: &str = "verge_peer_messages_sent_total{";

fn key(heads: &serde_json::Value) -> Option<String> {
    let heads = heads.as_array()?;
    let mut v: Vec<&str> = heads.iter().filter_map(|h| h.as_str()).collect();
    v.sort();
    Some(v.join(","))
}

/// The sum over every node of the series whose name starts with `name` (every label set of a
/// family when `name` ends with `{`).
async fn metric_sum(urls: &[String], name: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for url in urls {
        let client = ApiClient::new(Endpoint::parse(url).map_err(anyhow::Error::msg)?, None);
        let resp = client
            .send(Method::GET, "/metrics", None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let text = String::from_utf8_lossy(&resp.body);
        total += text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = if name.ends_with('{') {
                    rest.split_once("} ")?.1
                } else {
                    rest
                };
                value.trim().parse::<f64>().ok()
            })
            .sum::<f64>();
    }
    Ok(total)
}

/// Runs the benchmark and prints its report.
pub async fn bench_replication(args: ReplicationBenchArgs) -> anyhow::Result<()> {
    if args.rate == 0 || args.duration == 0 {
        bail!("--rate and --duration must be at least 1");
    }
    let run = std::process::id();
    let prefix = format!("rbench/{run}/");
    let writer = Arc::new(ApiClient::new(
        Endpoint::parse(&args.write_url).map_err(anyhow::Error::msg)?,
        None,
    ));
    let watcher = ApiClient::new(
        Endpoint::parse(&args.watch_url).map_err(anyhow::Error::msg)?,
        None,
    );
    let batches_before = metric_sum(&args.metrics_urls, "verge_gossip_batches_sent_total").await?;
    let messages_before = metric_sum(&args.metrics_urls, PEER_MESSAGES).await?;

    let acked: Arc<Pending> = Arc::default();
    let arrived: Arc<Pending> = Arc::default();
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));

    let stream = watcher
        .open_stream(&format!("/v1/watch?prefix={prefix}"))
        .await
        .map_err(|e| anyhow::anyhow!("opening the watch stream: {e}"))?;
    let mut body = stream.into_body();
    let (acked_w, arrived_w, lat_w) = (
        Arc::clone(&acked),
        Arc::clone(&arrived),
        Arc::clone(&latencies),
    );
    let watch_task = tokio::spawn(async move {
        let mut parser = SseParser::new(1 << 20);
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            let now = Instant::now();
            let Ok(events) = parser.push(&chunk) else {
                return;
            };
            for event in events.into_iter().filter(|e| e.event == "change") {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&event.data) else {
                    continue;
                };
                let Some(k) = key(&v["heads"]) else { continue };
                let sent = acked_w.lock().map(|mut m| m.remove(&k)).ok().flatten();
                match sent {
                    Some(at) => {
                        let us = now.saturating_duration_since(at).as_micros().max(1);
                        if let Ok(mut h) = lat_w.lock() {
                            let _ = h.record(u64::try_from(us).unwrap_or(u64::MAX));
                        }
                    }
                    None => {
                        if let Ok(mut m) = arrived_w.lock() {
                            m.insert(k, now);
                        }
                    }
                }
            }
        }
    });

    println!(
        "bench-replication: {} writes/s for {} s at {}, watching {}",
        args.rate, args.duration, args.write_url, args.watch_url
    );
    let total = u64::from(args.rate) * args.duration;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let started = Instant::now();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let (writer, acked, arrived, latencies, errors) = (
            Arc::clone(&writer),
            Arc::clone(&acked),
            Arc::clone(&arrived),
            Arc::clone(&latencies),
            Arc::clone(&errors),
        );
        let path = format!("/v1/docs/{prefix}{i}");
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(format!(
                "{{\"ops\":[{{\"op\":\"set\",\"path\":[\"v\"],\"value\":{i}}}]}}"
            ));
            let resp = writer.send(Method::PATCH, &path, Some(body)).await;
            let at = Instant::now();
            let Ok(resp) =
                resp.map_err(|_| errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            else {
                return;
            };
            let Some(k) = serde_json::from_slice::<serde_json::Value>(&resp.body)
                .ok()
                .and_then(|v| key(&v["heads"]))
            else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            };
            // The event can beat the acknowledgement to this process: then it counts as zero.
            let early = arrived.lock().map(|mut m| m.remove(&k)).ok().flatten();
            match early {
                Some(_) => {
                    if let Ok(mut h) = latencies.lock() {
                        let _ = h.record(1);
                    }
                }
                None => {
                    if let Ok(mut m) = acked.lock() {
                        m.insert(k, at);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    // Let the last writes arrive.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && acked.lock().map(|m| !m.is_empty()).unwrap_or(false) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch_task.abort();
    let missing = acked.lock().map(|m| m.len()).unwrap_or(0);
    let batches_after = metric_sum(&args.metrics_urls, "verge_gossip_batches_sent_total").await?;
    let messages_after = metric_sum(&args.metrics_urls, PEER_MESSAGES).await?;
    let h = latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("latency histogram poisoned"))?
        .clone();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    let seen = h.len();
    let per_write = |before: f64, after: f64| {
        if args.metrics_urls.is_empty() || seen == 0 {
            "n/a".to_owned()
        } else {
            format!("{:.2}", (after - before) / total as f64)
        }
    };
    let all_per_write = per_write(messages_before, messages_after);
    let per_write = per_write(batches_before, batches_after);
    println!(
        "  writes      {total} ({errors} failed, {missing} not seen at the watched node within 5 s)"
    );
    println!(
        "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
    println!("  gossip messages per write {per_write}");
    println!(
        "  peer messages per write (all kinds: broadcast, acknowledgements, anti-entropy, membership) {all_per_write}"
    );
    println!(
        "writes={total} errors={errors} missing={missing} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} messages_per_write={per_write} all_messages_per_write={all_per_write}",
        ms(0.5),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
    if seen == 0 {
        bail!("no write was seen at {}", args.watch_url);
    }
    Ok(())
}
