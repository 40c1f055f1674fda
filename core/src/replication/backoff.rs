//! When to dial an unreachable peer again: exponential back-off on a monotonic clock.

/// The first wait after a failed dial, in milliseconds.
pub const DIAL_BACKOFF_MIN_MS: i64 = 100;
/// The longest wait between dials.
pub const DIAL_BACKOFF_MAX_MS: i64 = 5_000;

/// The dial back-off of one peer: each failure doubles the wait (from
/// [`DIAL_BACKOFF_MIN_MS`] up to [`DIAL_BACKOFF_MAX_MS`]), a success or a sign of life resets
/// it. Driven with a monotonic `now` in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialBackoff {
    wait_ms: i64,
    retry_at: Option<i64>,
}

impl Default for DialBackoff {
    fn default() -> Self {
        Self {
            wait_ms: DIAL_BACKOFF_MIN_MS,
            retry_at: None,
        }
    }
}

impl DialBackoff {
    /// Whether a dial may start at `now`.
    pub fn allows(&self, now: i64) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    /// A dial failed at `now`: the next waits, longer each time.
    pub fn failed(&mut self, now: i64) {
        self.retry_at = Some(now.saturating_add(self.wait_ms));
        self.wait_ms = self.wait_ms.saturating_mul(2).min(DIAL_BACKOFF_MAX_MS);
    }

    /// A dial succeeded, or the peer was seen alive: the next dial may start at once.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// When the next dial may start, if it must wait.
    pub fn retry_at(&self) -> Option<i64> {
        self.retry_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_reset_on_success() {
        let mut b = DialBackoff::default();
        assert!(b.allows(0));
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            b.failed(now);
            let at = b.retry_at().expect("waits");
            assert!(!b.allows(at - 1));
            assert!(b.allows(at));
            waits.push(at - now);
            now = at;
        }
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1_600, 3_200, 5_000, 5_000, 5_000]
        );
        b.reset();
        assert!(b.allows(now));
        b.failed(now);
        assert_eq!(
            b.retry_at(),
            Some(now + DIAL_BACKOFF_MIN_MS),
            "back to the shortest"
        );
    }
}
