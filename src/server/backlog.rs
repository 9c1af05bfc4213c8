//! A home's backlog: events a worker took from its epoll set and has not
//! served yet.
//!
//! A worker takes several events per wait and serves one at a time; the
//! rest wait here, where any worker of the home (a helper, while this one
//! is held by a blocking module hook) can take them. Nothing wakes a worker
//! asleep in its wait when events are left here, so housekeeping watches
//! for a backlog that stays untaken (see [`Backlog::stalled`]).

use std::collections::VecDeque;

use parking_lot::Mutex;

use super::reactor::Ready;

#[derive(Default)]
pub struct Backlog(Mutex<Queue>);

#[derive(Default)]
struct Queue {
    events: VecDeque<Ready>,
    /// Events taken since the start, so housekeeping can tell a backlog
    /// being served from one left behind.
    taken: u64,
}

/// What housekeeping saw of a backlog at its last tick.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    taken: u64,
    waiting: bool,
}

impl Backlog {
    pub fn extend(&self, events: impl Iterator<Item = Ready>) {
        self.0.lock().events.extend(events);
    }

    pub fn pop(&self) -> Option<Ready> {
        let mut queue = self.0.lock();
        let ready = queue.events.pop_front()?;
        queue.taken += 1;
        Some(ready)
    }

    /// True if events have waited here since the last tick (`seen`, updated)
    /// with none taken: whoever left them is held or gone, and the home's
    /// other workers are asleep in their wait.
    pub fn stalled(&self, seen: &mut Seen) -> bool {
        let queue = self.0.lock();
        let now = Seen {
            taken: queue.taken,
            waiting: !queue.events.is_empty(),
        };
        let stalled = now.waiting && *seen == now;
        *seen = now;
        stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(n: u64) -> impl Iterator<Item = Ready> {
        (1..=n).map(|token| Ready {
            token,
            hung_up: false,
        })
    }

    #[test]
    fn events_left_untaken_for_a_tick_have_stalled() {
        let backlog = Backlog::default();
        let mut seen = Seen::default();
        assert!(!backlog.stalled(&mut seen), "empty");
        backlog.extend(events(2));
        assert!(!backlog.stalled(&mut seen), "only just left");
        assert!(backlog.stalled(&mut seen), "a tick untaken");
        assert_eq!(backlog.pop().map(|r| r.token), Some(1));
        assert!(!backlog.stalled(&mut seen), "one was taken");
        assert!(backlog.stalled(&mut seen));
        backlog.pop();
        assert!(!backlog.stalled(&mut seen), "empty again");
        assert!(!backlog.stalled(&mut seen));
    }
}
