//! The worker pool's bookkeeping: how many run, which home each serves,
//! and since when each has been busy with its current event (its stamp, in
//! housekeeping ticks), so housekeeping can tell a held worker from a busy
//! one and shutdown can tell when all are idle.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

/// A worker's stamp: the tick its current event began, 0 between events.
/// Written by its worker per event, so a cache line of its own.
pub type Stamp = Arc<CachePadded<AtomicU64>>;

/// The worker pool. One worker per home always runs, one home per core by
/// default: more would only contend for the cores (and show in tail latency).
/// No built-in stage holds a worker, but a module hook may block, so when
/// every worker of a home is held (one event for over a housekeeping tick),
/// or events have waited in its backlog for a tick untaken (their worker
/// held, the others asleep), a helper is started there, up to `max` workers
/// in all. A helper ends once the backlog is empty and its home has another
/// worker free again, or when it finds nothing to do for `EXTRA_IDLE_MS`.
pub struct Workers {
    max: usize,
    running: AtomicUsize,
    /// Housekeeping ticks, from 1: the clock workers stamp their events with.
    tick: AtomicU64,
    /// Each running worker's home and stamp: the tick its current event
    /// began, 0 while it waits.
    stamps: Mutex<Vec<(usize, Stamp)>>,
}

impl Workers {
    pub fn new(max: usize) -> Workers {
        Workers {
            max,
            running: AtomicUsize::new(0),
            tick: AtomicU64::new(1),
            stamps: Mutex::new(Vec::new()),
        }
    }

    /// Counts a worker about to start; returns its number, for its name.
    pub fn starting(&self) -> usize {
        self.running.fetch_add(1, Relaxed)
    }

    /// Uncounts a worker whose thread could not start.
    pub fn not_started(&self) {
        self.running.fetch_sub(1, Relaxed);
    }

    /// Whether another helper may start (`max` bounds all workers).
    pub fn may_add(&self) -> bool {
        self.running.load(Relaxed) < self.max
    }

    /// Stamps a worker's event as beginning now.
    pub fn begin(&self, stamp: &AtomicU64) {
        stamp.store(self.tick.load(Relaxed), Relaxed);
    }

    /// Stamps a worker as between events.
    pub fn end(stamp: &AtomicU64) {
        stamp.store(0, Relaxed);
    }

    /// Workers serving an event now. Read from their stamps rather than
    /// counted per event: a shared counter would bounce between cores twice
    /// per request.
    pub fn busy(&self) -> usize {
        let stamps = self.stamps.lock();
        stamps
            .iter()
            .filter(|(_, stamp)| stamp.load(Relaxed) != 0)
            .count()
    }

    /// Advances the clock (returning it) and says, home by home, whether
    /// its every worker has been held by one event since before the last tick.
    pub fn held_homes(&self, homes: usize) -> (u64, Vec<bool>) {
        let now = self.tick.fetch_add(1, Relaxed) + 1;
        let mut held_home = vec![true; homes];
        for (home, stamp) in self.stamps.lock().iter() {
            held_home[*home] &= held(stamp, now);
        }
        (now, held_home)
    }

    /// Whether `home` has a worker other than `me` that is not held.
    pub fn other_free(&self, home: usize, me: &Stamp) -> bool {
        let now = self.tick.load(Relaxed);
        self.stamps
            .lock()
            .iter()
            .any(|(h, stamp)| *h == home && !Arc::ptr_eq(stamp, me) && !held(stamp, now))
    }

    pub fn join(&self, home: usize) -> Stamp {
        let stamp = Stamp::default();
        self.stamps.lock().push((home, stamp.clone()));
        stamp
    }

    pub fn leave(&self, me: &Stamp) {
        self.running.fetch_sub(1, Relaxed);
        self.stamps
            .lock()
            .retain(|(_, stamp)| !Arc::ptr_eq(stamp, me));
    }
}

/// A worker whose event began before the last tick.
fn held(stamp: &AtomicU64, now: u64) -> bool {
    let began = stamp.load(Relaxed);
    began != 0 && began + 2 <= now
}

/// A helper that finds nothing to do for this long ends.
pub const EXTRA_IDLE_MS: i32 = 2000;
