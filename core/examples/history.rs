//! What a document costs as its history grows, with generations (`docs/compaction.md`) and
//! without: the document code a node runs, natively, on one core.
//!
//! ```sh
//! cargo run --release -p verge-core --example history            # 1,000,000 writes
//! cargo run --release -p verge-core --example history -- 200000   # fewer
//! cargo run --release -p verge-core --example history -- 200000 counter   # only the counter runs
//! ```
//!
//! Prints, for a counter incremented N times, a document of map puts written N times and a list
//! of N/10 items: the latency of each write by window of history (p50, p99, p99.9, max), the
//! cost of a read, of a compaction, of a cold load, the bytes stored beside the snapshot, and
//! what a sync from an empty peer (a client's open, anti-entropy of a new member) sends.
//! Without generations the same runs stop early: their cost grows with history.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use automerge::sync::{State, SyncDoc};
use automerge::{ActorId, Automerge, ChangeHash, ROOT, ReadDoc};
use serde_json::json;
use verge_core::document::{self, Expiry, load_document, new_document};
use verge_core::generation::{self, Compaction};
use verge_core::{Op, Write};

/// Changes per generation: the node's default (`[compaction] after_changes`).
const AFTER_CHANGES: usize = 1000;
/// Writes per reported window.
const WINDOWS: usize = 10;
/// History length at which runs without generations stop.
const UNCOMPACTED_MAX: usize = 50_000;
/// Change rows after which the node rewrites a document's snapshot (`[storage]
/// compact_after_changes`).
const REWRITE_AFTER_ROWS: usize = 256;
/// The node's floor for rewriting a snapshot because its rows weigh half of it
/// (`SNAPSHOT_REWRITE_BYTES_MIN`).
const REWRITE_BYTES_MIN: usize = 4096;

/// What the node stores for a document: its snapshot and the change rows since.
#[derive(Default)]
struct Stored {
    snapshot: Vec<u8>,
    rows: Vec<u8>,
    row_count: usize,
    /// The most bytes stored, relative to the document's own snapshot at that moment, over the
    /// second half of the run (once the document has its size).
    worst_ratio: f64,
    measuring: bool,
}

impl Stored {
    fn append(&mut self, doc: &Automerge, before: &[ChangeHash]) {
        for c in doc.get_changes(before) {
            self.rows.extend_from_slice(c.raw_bytes());
            self.row_count += 1;
        }
        if self.row_count >= REWRITE_AFTER_ROWS
            || self.rows.len() >= (self.snapshot.len() / 2).max(REWRITE_BYTES_MIN)
        {
            self.rewrite(doc);
        }
    }

    fn rewrite(&mut self, doc: &Automerge) {
        let snapshot = doc.save_nocompress();
        let ratio = (self.snapshot.len() + self.rows.len()) as f64 / snapshot.len() as f64;
        if self.measuring {
            self.worst_ratio = self.worst_ratio.max(ratio);
        }
        self.snapshot = snapshot;
        self.rows.clear();
        self.row_count = 0;
    }

    fn bytes(&self) -> Vec<u8> {
        let mut all = self.snapshot.clone();
        all.extend_from_slice(&self.rows);
        all
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N: a number of writes"))
        .unwrap_or(1_000_000);
    let only = std::env::args().nth(2);
    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.starts_with(o));
    println!("history bench: {n} writes, a generation every {AFTER_CHANGES} changes");
    let inc = Op::parse_list(&json!([{"op": "inc", "path": ["n"], "by": 1}])).unwrap();
    if wanted("counter") {
        run(
            "counter: inc",
            n,
            true,
            |_| inc.clone(),
            |doc| {
                let _ = doc.get(ROOT, "n").unwrap();
            },
        );
        run(
            "counter: inc, no generations",
            n.min(UNCOMPACTED_MAX),
            false,
            |_| inc.clone(),
            |doc| {
                let _ = doc.get(ROOT, "n").unwrap();
            },
        );
    }
    // Device state: 1,000 keys, each rewritten over and over.
    let put = |i: usize| {
        Op::parse_list(&json!([{"op": "set", "path": [format!("k{}", i % 1000)], "value": i}]))
            .unwrap()
    };
    if wanted("map") {
        run("map: set", n, true, put, |doc| {
            let _ = document::to_json(doc);
        });
    }
    let push =
        |i: usize| Op::parse_list(&json!([{"op": "push", "path": ["l"], "value": i}])).unwrap();
    if !wanted("list") {
        return;
    }
    run("list: push", n / 10, true, push, |doc| {
        let _ = doc.get(ROOT, "l").unwrap();
    });
    run(
        "list: push, no generations",
        (n / 10).min(UNCOMPACTED_MAX),
        false,
        push,
        |doc| {
            let _ = doc.get(ROOT, "l").unwrap();
        },
    );
}

/// Writes `ops(i)` `n` times into one document, starting a generation every
/// [`AFTER_CHANGES`] changes when `generations`; prints latencies by window. Returns the
/// document.
fn run(
    name: &str,
    n: usize,
    generations: bool,
    ops: impl Fn(usize) -> Vec<Op>,
    read: impl Fn(&Automerge),
) -> Automerge {
    println!("\n{name}");
    let mut doc = new_document(ActorId::from([1u8; 16]));
    let mut stored = Stored::default();
    let window = (n / WINDOWS).max(1);
    let mut writes = Vec::with_capacity(window);
    let mut compactions: Vec<Duration> = Vec::new();
    let mut since = 0;
    for i in 0..n {
        let write = Write::Ops(ops(i));
        stored.measuring = i >= n / 2;
        let before = doc.get_heads();
        let started = Instant::now();
        document::apply(&mut doc, &write, Expiry::Keep, 0).unwrap();
        writes.push(started.elapsed());
        stored.append(&doc, &before);
        since += 1;
        if generations && since >= AFTER_CHANGES {
            let started = Instant::now();
            doc = compact(&doc);
            compactions.push(started.elapsed());
            since = 0;
            // The node stores the new generation in place of the old.
            stored.snapshot = doc.save_nocompress();
            stored.rows.clear();
            stored.row_count = 0;
        }
        if (i + 1) % window == 0 {
            let reads = 100;
            let started = Instant::now();
            for _ in 0..reads {
                read(&doc);
            }
            let read_time = started.elapsed() / reads;
            writes.sort_unstable();
            let q = |p: f64| writes[((writes.len() - 1) as f64 * p) as usize];
            compactions.sort_unstable();
            let compaction = match (compactions.len(), compactions.last()) {
                (0, _) | (_, None) => String::new(),
                (c, Some(max)) => format!(
                    "; compaction: {c} x, median {}, max {}",
                    us(compactions[c / 2]),
                    us(*max)
                ),
            };
            println!(
                "  at {:>9}: write p50 {} p99 {} p99.9 {} max {}; read {}{compaction}",
                i + 1,
                us(q(0.5)),
                us(q(0.99)),
                us(q(0.999)),
                us(*writes.last().unwrap()),
                us(read_time),
            );
            writes.clear();
            compactions.clear();
        }
    }
    let bytes = stored.bytes();
    let loads = 10;
    let started = Instant::now();
    for _ in 0..loads {
        load_document(&bytes, ActorId::from([2u8; 16])).unwrap();
    }
    let load = started.elapsed() / loads;
    let snapshot = doc.save_nocompress().len();
    let started = Instant::now();
    let (sent, messages) = sync_from_empty(&doc);
    println!(
        "  stored: {} bytes (its snapshot: {snapshot}), at most {:.2}x its snapshot over the second half; cold load {}; sync from an empty peer: {sent} bytes in {messages} messages, {}",
        bytes.len(),
        stored.worst_ratio,
        us(load),
        us(started.elapsed())
    );
    doc
}

/// The next generation of `doc` at a proposal over its heads, as a node alone makes it.
fn compact(doc: &Automerge) -> Automerge {
    let mut doc = doc.clone();
    let point: ChangeHash = generation::propose(&mut doc, 0).unwrap();
    let mut compaction = Compaction::start(&doc, point).unwrap();
    compaction.carry_all(&doc).unwrap();
    let actor = generation::generation_actor(doc.get_actor(), compaction.number());
    compaction.into_document().with_actor(actor)
}

/// Syncs an empty peer with `doc`; returns the bytes `doc` sent and the messages exchanged.
fn sync_from_empty(doc: &Automerge) -> (usize, usize) {
    let mut peer = new_document(ActorId::from([3u8; 16]));
    let (mut ours, mut theirs) = (State::new(), State::new());
    let (mut sent, mut messages) = (0, 0);
    loop {
        let mut quiet = true;
        if let Some(m) = peer.generate_sync_message(&mut theirs) {
            messages += 1;
            quiet = false;
            let mut d = doc.clone();
            d.receive_sync_message(&mut ours, m).unwrap();
        }
        if let Some(m) = doc.generate_sync_message(&mut ours) {
            let bytes = m.encode();
            sent += bytes.len();
            messages += 1;
            quiet = false;
            peer.receive_sync_message(
                &mut theirs,
                automerge::sync::Message::decode(&bytes).unwrap(),
            )
            .unwrap();
        }
        if quiet || messages > 20 {
            assert_eq!(peer.get_heads(), doc.get_heads());
            return (sent, messages);
        }
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}
