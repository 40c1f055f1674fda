//! The trace of a run: every fault, every client operation and its outcome, and the final
//! state, each stamped with simulated time. Its hash identifies a run: the same seed must give
//! the same hash, in one process or another.

use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// Most events kept for printing; all of them are hashed.
pub const TRACE_EVENTS_KEPT_MAX: usize = 200_000;

#[derive(Debug)]
struct Inner {
    hasher: Sha256,
    events: Vec<String>,
    count: u64,
}

/// A shared, append-only trace.
#[derive(Debug, Clone)]
pub struct Trace(Arc<Mutex<Inner>>);

impl Default for Trace {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Inner {
            hasher: Sha256::new(),
            events: Vec::new(),
            count: 0,
        })))
    }
}

impl Trace {
    /// Records an event at the current simulated time.
    pub fn event(&self, what: impl AsRef<str>) {
        let line = format!("{:>9.3}s {}", crate::now().as_secs_f64(), what.as_ref());
        let mut inner = crate::lock(&self.0);
        inner.hasher.update(line.as_bytes());
        inner.hasher.update(b"\n");
        inner.count += 1;
        if inner.events.len() < TRACE_EVENTS_KEPT_MAX {
            inner.events.push(line);
        }
    }

    /// The hash of every event so far, in hex.
    pub fn hash(&self) -> String {
        let inner = crate::lock(&self.0);
        hex::encode(inner.hasher.clone().finalize())
    }

    /// Events recorded.
    pub fn len(&self) -> u64 {
        crate::lock(&self.0).count
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kept events containing any of `needles` (all kept events when `needles` is empty).
    pub fn matching(&self, needles: &[&str]) -> Vec<String> {
        let inner = crate::lock(&self.0);
        inner
            .events
            .iter()
            .filter(|e| needles.is_empty() || needles.iter().any(|n| e.contains(n)))
            .cloned()
            .collect()
    }
}
