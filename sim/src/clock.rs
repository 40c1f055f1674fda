//! Wall-clock time for simulated nodes: the simulation's logical time since a fixed epoch,
//! shifted by the host's own offset (clock skew between hosts, drawn from the seed).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use verge_node::clock::Clock;

/// The wall-clock instant every simulation starts at (2026-01-01T00:00:00Z), so that change
/// timestamps, expiry and member generations replay exactly.
pub const EPOCH_MS: u64 = 1_767_225_600_000;

/// The fixed epoch as a `SystemTime`, for turmoil's builder.
pub fn epoch() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(EPOCH_MS)
}

/// Reads the simulated clock of the host it runs on, off by a fixed number of milliseconds
/// (positive: the host's clock runs ahead of the simulation's).
#[derive(Debug, Default, Clone, Copy)]
pub struct SimClock {
    /// How far this host's wall clock is from the simulation's, in ms.
    pub offset_ms: i64,
}

impl SimClock {
    /// A clock off by `offset_ms` (0: the simulation's own).
    pub fn with_offset(offset_ms: i64) -> Self {
        Self { offset_ms }
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        let since_epoch = turmoil::since_epoch().unwrap_or(Duration::from_millis(EPOCH_MS));
        i64::try_from(since_epoch.as_millis())
            .unwrap_or(i64::MAX)
            .saturating_add(self.offset_ms)
    }
}
