//! Crash safety: a node killed with SIGKILL under concurrent writes keeps every write it
//! acknowledged, five times in a row on the same data directory.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{Node, Rng, http};

const WRITERS: usize = 8;
const DOCS: usize = 4;
const CYCLES: usize = 5;
/// Each writer's request timeout: a request that hangs this long is an unknown outcome.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// doc id → (key → value) of every write answered 200.
type Acked = BTreeMap<String, BTreeMap<String, String>>;

fn doc_id(i: usize) -> String {
    format!("crash/{i}")
}

/// Runs the writers until `stop`; records acknowledged keys into `acked`.
fn run_writers(
    addr: std::net::SocketAddr,
    cycle: usize,
    stop: &AtomicBool,
    acked: &Mutex<Acked>,
    acked_count: &AtomicUsize,
) -> usize {
    let failed = AtomicUsize::new(0);
    thread::scope(|s| {
        for t in 0..WRITERS {
            let failed = &failed;
            s.spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let doc = doc_id((t + n) % DOCS);
                    let key = format!("k-{cycle}-{t}-{n}");
                    let value = format!("v-{cycle}-{t}-{n}");
                    let body = json!({ "ops": [{ "op": "set", "path": [key], "value": value }] })
                        .to_string();
                    match http(
                        addr,
                        "PATCH",
                        &format!("/v1/docs/{doc}"),
                        body.as_bytes(),
                        &[],
                        WRITE_TIMEOUT,
                    ) {
                        Ok(r) if r.status == 200 => {
                            acked
                                .lock()
                                .unwrap()
                                .entry(doc)
                                .or_default()
                                .insert(key, value);
                            acked_count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) if r.status == 503 => {
                            // overloaded or shutting down: not acknowledged, fine
                            thread::sleep(Duration::from_millis(5));
                        }
                        Ok(r) => panic!("unexpected answer to a valid write: {}", r.describe()),
                        Err(_) => {
                            // The node died (or is dying): the outcome is unknown. Back off a
                            // little so a dead node does not make us spin.
                            failed.fetch_add(1, Ordering::Relaxed);
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                    n += 1;
                }
            });
        }
    });
    failed.load(Ordering::Relaxed)
}

/// Asserts every acknowledged key is in the node with its value.
fn verify(node: &Node, acked: &Acked, context: &str) {
    for (doc, keys) in acked {
        let r = node.get_doc(doc);
        assert_eq!(r.status, 200, "{context}: GET {doc}: {}", r.describe());
        let body: Value = r.json();
        let obj = body["doc"]
            .as_object()
            .unwrap_or_else(|| panic!("{context}: {doc} has no doc object"));
        let mut missing = Vec::new();
        for (k, v) in keys {
            if obj.get(k).and_then(Value::as_str) != Some(v.as_str()) {
                missing.push(format!("{k}={v} (found {:?})", obj.get(k)));
            }
        }
        assert!(
            missing.is_empty(),
            "{context}: {} of {} acknowledged keys of {doc} are missing or wrong, e.g. {:?}\n--- node output (tail) ---\n{}",
            missing.len(),
            keys.len(),
            &missing[..missing.len().min(10)],
            common::tail(&node.output(), 4000)
        );
    }
}

#[test]
fn acknowledged_writes_survive_sigkill_five_times() {
    let seed = std::env::var("VERGE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(Rng::seed_from_time);
    println!("crash test seed {seed} (rerun with VERGE_TEST_SEED={seed})");
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut node = Node::start("test-crash");
    let acked: Mutex<Acked> = Mutex::new(BTreeMap::new());

    for cycle in 0..CYCLES {
        let stop = AtomicBool::new(false);
        let acked_count = AtomicUsize::new(0);
        let kill_after = Duration::from_millis(rng.range(150, 1200));
        let min_acks = rng.range(1, 40) as usize;
        let failed = thread::scope(|s| {
            let addr = node.addr;
            let (stop, acked, acked_count) = (&stop, &acked, &acked_count);
            let writers = s.spawn(move || run_writers(addr, cycle, stop, acked, acked_count));
            // Kill at a random moment, but only once some writes were acknowledged so every
            // cycle tests something.
            let t = Instant::now();
            let deadline = t + Duration::from_secs(15);
            while t.elapsed() < kill_after || acked_count.load(Ordering::Relaxed) < min_acks {
                assert!(
                    Instant::now() < deadline,
                    "cycle {cycle}: fewer than {min_acks} writes acknowledged in 15 s"
                );
                thread::sleep(Duration::from_millis(5));
            }
            let pid = node.pid();
            node.kill();
            // Writers now fail and spin until told to stop; give in-flight requests a moment
            // to fail rather than letting them hit the restarted node with stale state.
            stop.store(true, Ordering::Relaxed);
            let failed = writers.join().unwrap();
            println!(
                "cycle {cycle}: killed pid {pid} after {:?}, {} writes acknowledged this cycle, {failed} failed",
                t.elapsed(),
                acked_count.load(Ordering::Relaxed)
            );
            failed
        });
        let _ = failed;
        node.append_log_marker(&format!("cycle {cycle}: SIGKILL, restarting"));
        node.spawn();
        let acked_now = acked.lock().unwrap().clone();
        verify(
            &node,
            &acked_now,
            &format!("after kill {} of {CYCLES} (seed {seed})", cycle + 1),
        );
    }

    let total: usize = acked.lock().unwrap().values().map(BTreeMap::len).sum();
    assert!(total > 0, "no write was acknowledged at all");
    // The node is healthy after all that: it takes a write and answers status.
    node.assert_serving("five crashes");
    let st = node.get("/v1/status").ok_json("status after crashes");
    let docs = st["docs"].as_u64().unwrap_or(0);
    assert!(
        docs >= DOCS as u64,
        "status docs {docs} after writing {DOCS} documents: {st}"
    );
    println!(
        "{total} acknowledged writes survived {CYCLES} crashes in {:?}",
        started.elapsed()
    );
}
