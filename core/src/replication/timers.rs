//! Timers a state machine asked for, kept by its driver in one queue instead of a sleeping
//! task each: the driver sleeps until [`TimerQueue::next_deadline`] and hands back what
//! [`TimerQueue::pop_due`] returns. Times are monotonic milliseconds.

use std::collections::BTreeMap;

/// Most timers waiting at once; beyond it the earliest-due are kept (a machine that schedules
/// this many is broken, and memory must stay bounded).
pub const TIMERS_MAX: usize = 65_536;

/// Pending timers, due in deadline order (and in scheduling order for equal deadlines, so a
/// simulated run replays).
#[derive(Debug, Clone)]
pub struct TimerQueue<T> {
    due: BTreeMap<(i64, u64), T>,
    next_seq: u64,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        Self {
            due: BTreeMap::new(),
            next_seq: 0,
        }
    }
}

impl<T> TimerQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `timer` for `after_ms` after `now`.
    pub fn schedule(&mut self, now: i64, after_ms: i64, timer: T) {
        let at = now.saturating_add(after_ms.max(0));
        self.due.insert((at, self.next_seq), timer);
        self.next_seq += 1;
        if self.due.len() > TIMERS_MAX {
            self.due.pop_last();
        }
    }

    /// When the earliest timer is due.
    pub fn next_deadline(&self) -> Option<i64> {
        self.due.keys().next().map(|(at, _)| *at)
    }

    /// The timers due at `now`, earliest first.
    pub fn pop_due(&mut self, now: i64) -> Vec<T> {
        let later = self.due.split_off(&(now.saturating_add(1), 0));
        std::mem::replace(&mut self.due, later)
            .into_values()
            .collect()
    }

    /// Timers waiting.
    pub fn len(&self) -> usize {
        self.due.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_come_due_in_deadline_then_scheduling_order() {
        let mut q = TimerQueue::new();
        q.schedule(100, 50, "c");
        q.schedule(0, 10, "a");
        q.schedule(5, 5, "b");
        q.schedule(0, 150, "d");
        assert_eq!(q.next_deadline(), Some(10));
        assert!(q.pop_due(9).is_empty());
        assert_eq!(
            q.pop_due(10),
            vec!["a", "b"],
            "equal deadlines in scheduling order"
        );
        assert_eq!(q.next_deadline(), Some(150));
        assert_eq!(q.pop_due(1_000), vec!["c", "d"]);
        assert!(q.is_empty());
        q.schedule(7, -3, "now");
        assert_eq!(q.pop_due(7), vec!["now"], "a negative delay is due at once");
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut q = TimerQueue::new();
        for i in 0..(TIMERS_MAX as i64 + 10) {
            q.schedule(0, TIMERS_MAX as i64 - i, i);
        }
        assert_eq!(q.len(), TIMERS_MAX);
        assert_eq!(q.next_deadline(), Some(0));
        let latest = q.due.keys().last().map(|(at, _)| *at);
        assert_eq!(
            latest,
            Some(TIMERS_MAX as i64 - 10),
            "the 10 latest were dropped"
        );
    }
}
