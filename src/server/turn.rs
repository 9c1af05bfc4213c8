//! When a worker gives up its CPU without waiting for an event.
//!
//! Serving cache hits, a worker's every wait finds events ready, so it never
//! sleeps and the kernel takes its CPU only at a scheduler tick (4 ms at
//! `CONFIG_HZ=250`): a client thread sharing its core waits that long, with
//! responses it has not read. Two ticks were the hits' p99. So a worker that
//! has run for [`LONGEST_TURN`] without sleeping yields once, unless it
//! handed an exchange to a wait (on an upstream, say) or took one back in
//! that time: proxied traffic has its turns ended by those waits, and a
//! yield there made small responses' p99 worse (docs/PERFORMANCE.md, step 37).

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Running this long without sleeping ends a worker's turn.
const LONGEST_TURN: Duration = Duration::from_millis(1);
/// A wait that took longer than this slept (a wait that finds events ready
/// takes a few microseconds).
const SLEPT: Duration = Duration::from_micros(30);

/// One worker's turn on its CPU: since when it has run without sleeping, and
/// whether an exchange went to a wait or came back from one meanwhile.
pub struct Turn {
    since: Cell<Instant>,
    awaited: Cell<bool>,
}

impl Turn {
    pub fn new() -> Turn {
        Turn {
            since: Cell::new(Instant::now()),
            awaited: Cell::new(false),
        }
    }

    /// An exchange went to wait on something outside this worker, or came
    /// back from such a wait.
    pub fn awaited(&self) {
        self.awaited.set(true);
    }

    /// Waits by `wait`, first yielding the CPU if this turn is over.
    pub fn wait<T>(&self, wait: impl FnOnce() -> T) -> T {
        let before = Instant::now();
        if self.over(before) {
            // SAFETY: plain syscall without arguments.
            unsafe { libc::sched_yield() };
        }
        let waited = wait();
        let after = Instant::now();
        if after - before > SLEPT {
            self.begin(after);
        }
        waited
    }

    /// True if the worker should yield at `now`: it has run for
    /// [`LONGEST_TURN`] with no exchange awaited. A turn that long starts
    /// over either way.
    fn over(&self, now: Instant) -> bool {
        if now - self.since.get() < LONGEST_TURN {
            return false;
        }
        let over = !self.awaited.get();
        self.begin(now);
        over
    }

    fn begin(&self, at: Instant) {
        self.since.set(at);
        self.awaited.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn_from(start: Instant) -> Turn {
        let turn = Turn::new();
        turn.begin(start);
        turn
    }

    #[test]
    fn a_long_turn_with_nothing_awaited_is_over_and_starts_again() {
        let start = Instant::now();
        let turn = turn_from(start);
        assert!(!turn.over(start + LONGEST_TURN / 2));
        let end = start + LONGEST_TURN;
        assert!(turn.over(end));
        assert!(!turn.over(end + LONGEST_TURN / 2));
        assert!(turn.over(end + LONGEST_TURN));
    }

    #[test]
    fn an_awaited_exchange_keeps_the_turn_going() {
        let start = Instant::now();
        let turn = turn_from(start);
        turn.awaited();
        assert!(!turn.over(start + LONGEST_TURN));
        // Only for that turn: the next one without an exchange is over.
        assert!(turn.over(start + 2 * LONGEST_TURN));
    }

    #[test]
    fn a_wait_that_slept_starts_a_new_turn() {
        let turn = Turn::new();
        let slept = turn.wait(|| {
            std::thread::sleep(2 * LONGEST_TURN);
            Instant::now()
        });
        assert!(!turn.over(slept + LONGEST_TURN / 2));
    }
}
