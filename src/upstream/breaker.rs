//! A circuit breaker per upstream group: closed → open → half-open → closed.
//!
//! The whole state (which state, since when, probes let through and passed,
//! a generation) is one `AtomicU64` changed only by compare-and-swap, so
//! concurrent requests cannot both take the last probe or both trip it: a
//! transition built on a stale view fails and is recomputed. The failure
//! window is a second packed word, updated the same way.

use std::sync::atomic::{
    AtomicU32, AtomicU64, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed,
};
use std::time::Duration;

use super::clock;
use super::config::BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

pub struct CircuitBreaker {
    word: AtomicU64,
    /// epoch (24 bits) | requests (20) | failures (20) of the current window.
    window: AtomicU64,
    consecutive: AtomicU32,
    trips: AtomicU64,
    window_ms: u64,
    min_requests: u64,
    failure_ratio: f64,
    consecutive_failures: u32,
    open_ms: u32,
    probes: u8,
}

/// A request let through, to be reported with [`CircuitBreaker::record`].
#[derive(Debug, Clone, Copy)]
pub struct Permit {
    generation: u16,
    probe: bool,
}

pub enum Admission {
    Allowed(Permit),
    /// Open: try again after this.
    Rejected(Duration),
}

/// state (2 bits) | generation (14) | admitted (8) | succeeded (8) | since, in clock ms (32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word {
    state: BreakerState,
    generation: u16,
    admitted: u8,
    succeeded: u8,
    since: u32,
}

impl Word {
    fn pack(self) -> u64 {
        let state = match self.state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        state << 62
            | u64::from(self.generation & 0x3fff) << 48
            | u64::from(self.admitted) << 40
            | u64::from(self.succeeded) << 32
            | u64::from(self.since)
    }

    fn unpack(v: u64) -> Word {
        Word {
            state: match v >> 62 {
                0 => BreakerState::Closed,
                1 => BreakerState::Open,
                _ => BreakerState::HalfOpen,
            },
            generation: (v >> 48) as u16 & 0x3fff,
            admitted: (v >> 40) as u8,
            succeeded: (v >> 32) as u8,
            since: v as u32,
        }
    }

    /// The next state, a new generation, counts cleared.
    fn enter(self, state: BreakerState, now: u32, admitted: u8) -> Word {
        Word {
            state,
            generation: self.generation.wrapping_add(1) & 0x3fff,
            admitted,
            succeeded: 0,
            since: now,
        }
    }
}

const COUNT_MAX: u64 = (1 << 20) - 1;

fn now32() -> u32 {
    clock::now_ms() as u32
}

impl CircuitBreaker {
    pub fn new(c: &BreakerConfig) -> CircuitBreaker {
        CircuitBreaker {
            word: AtomicU64::new(
                Word {
                    state: BreakerState::Closed,
                    generation: 0,
                    admitted: 0,
                    succeeded: 0,
                    since: 0,
                }
                .pack(),
            ),
            window: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            trips: AtomicU64::new(0),
            window_ms: c.window.0.as_millis().max(1) as u64,
            min_requests: u64::from(c.min_requests.max(1)),
            failure_ratio: c.failure_ratio,
            consecutive_failures: c.consecutive_failures,
            open_ms: c.open_for.0.as_millis().min(u128::from(u32::MAX / 2)) as u32,
            probes: c.half_open_probes.clamp(1, 255) as u8,
        }
    }

    pub fn state(&self) -> BreakerState {
        Word::unpack(self.word.load(Acquire)).state
    }

    /// Times it went from closed or half-open to open.
    pub fn trips(&self) -> u64 {
        self.trips.load(Relaxed)
    }

    /// Whether a request may go upstream now.
    pub fn try_acquire(&self) -> Admission {
        let mut current = self.word.load(Acquire);
        loop {
            let w = Word::unpack(current);
            let (next, probe) = match w.state {
                BreakerState::Closed => {
                    return Admission::Allowed(Permit {
                        generation: w.generation,
                        probe: false,
                    })
                }
                BreakerState::Open => {
                    let elapsed = now32().wrapping_sub(w.since);
                    if elapsed < self.open_ms {
                        return Admission::Rejected(Duration::from_millis(u64::from(
                            self.open_ms - elapsed,
                        )));
                    }
                    (w.enter(BreakerState::HalfOpen, now32(), 1), true)
                }
                BreakerState::HalfOpen if w.admitted < self.probes => (
                    Word {
                        admitted: w.admitted + 1,
                        ..w
                    },
                    true,
                ),
                // Every probe is out: wait for their verdict.
                BreakerState::HalfOpen => return Admission::Rejected(Duration::from_secs(1)),
            };
            match self
                .word
                .compare_exchange_weak(current, next.pack(), AcqRel, Acquire)
            {
                Ok(_) => {
                    if next.state != w.state {
                        log::info!(
                            "circuit breaker half-open: letting {} probe(s) through",
                            self.probes
                        );
                    }
                    return Admission::Allowed(Permit {
                        generation: next.generation,
                        probe,
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// The outcome of a request let through. Outcomes from an earlier
    /// generation (before the last transition) change nothing.
    pub fn record(&self, permit: Permit, ok: bool) {
        if permit.probe {
            self.record_probe(permit.generation, ok);
        } else if self.counts_toward_trip(ok) {
            self.transition(permit.generation, BreakerState::Closed, |w| {
                w.enter(BreakerState::Open, now32(), 0)
            });
        }
    }

    fn record_probe(&self, generation: u16, ok: bool) {
        self.transition(generation, BreakerState::HalfOpen, |w| {
            if !ok {
                w.enter(BreakerState::Open, now32(), 0)
            } else if w.succeeded + 1 >= self.probes {
                w.enter(BreakerState::Closed, 0, 0)
            } else {
                Word {
                    succeeded: w.succeeded + 1,
                    ..w
                }
            }
        });
    }

    /// Applies `step` while the breaker is still in `state` of `generation`.
    fn transition(&self, generation: u16, state: BreakerState, step: impl Fn(Word) -> Word) {
        let mut current = self.word.load(Acquire);
        loop {
            let w = Word::unpack(current);
            if w.state != state || w.generation != generation {
                return;
            }
            let next = step(w);
            match self
                .word
                .compare_exchange_weak(current, next.pack(), AcqRel, Acquire)
            {
                Ok(_) => {
                    match next.state {
                        BreakerState::Open => {
                            self.trips.fetch_add(1, Relaxed);
                            log::warn!("circuit breaker open for {} ms", self.open_ms);
                        }
                        BreakerState::Closed if w.state != BreakerState::Closed => {
                            self.window.store(0, Relaxed);
                            self.consecutive.store(0, Relaxed);
                            log::info!("circuit breaker closed");
                        }
                        _ => {}
                    }
                    return;
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Counts a closed-state outcome; true when the thresholds are crossed.
    fn counts_toward_trip(&self, ok: bool) -> bool {
        let consecutive = if ok {
            self.consecutive.store(0, Relaxed);
            0
        } else {
            self.consecutive.fetch_add(1, Relaxed) + 1
        };
        if self.consecutive_failures > 0 && consecutive >= self.consecutive_failures {
            return true;
        }
        let epoch = (clock::now_ms() / self.window_ms) & 0xff_ffff;
        let fail = u64::from(!ok);
        let mut current = self.window.load(Relaxed);
        let (requests, failures) = loop {
            let (e, r, f) = (
                current >> 40,
                (current >> 20) & COUNT_MAX,
                current & COUNT_MAX,
            );
            let (r, f) = if e == epoch {
                ((r + 1).min(COUNT_MAX), (f + fail).min(COUNT_MAX))
            } else {
                (1, fail)
            };
            match self.window.compare_exchange_weak(
                current,
                epoch << 40 | r << 20 | f,
                Relaxed,
                Relaxed,
            ) {
                Ok(_) => break (r, f),
                Err(actual) => current = actual,
            }
        };
        self.failure_ratio > 0.0
            && requests >= self.min_requests
            && failures as f64 >= self.failure_ratio * requests as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use std::sync::{Arc, Barrier};

    fn breaker(open_for: Duration, probes: u32) -> CircuitBreaker {
        CircuitBreaker::new(&BreakerConfig {
            window: Dur(Duration::from_secs(60)),
            min_requests: 10,
            failure_ratio: 0.5,
            consecutive_failures: 0,
            open_for: Dur(open_for),
            half_open_probes: probes,
        })
    }

    fn allowed(b: &CircuitBreaker) -> Option<Permit> {
        match b.try_acquire() {
            Admission::Allowed(p) => Some(p),
            Admission::Rejected(_) => None,
        }
    }

    /// Runs `f` on 64 threads released at the same instant.
    fn at_once<T: Send + 'static>(f: impl Fn() -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let start = Arc::new(Barrier::new(64));
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let (f, start) = (f.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    f()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    fn trip(b: &CircuitBreaker) {
        for _ in 0..10 {
            let p = allowed(b).unwrap();
            b.record(p, false);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn failure_ratio_trips_only_past_min_requests() {
        let b = breaker(Duration::from_secs(30), 1);
        for ok in [false, true].repeat(4) {
            b.record(allowed(&b).unwrap(), ok);
        }
        assert_eq!(b.state(), BreakerState::Closed, "8 requests < min_requests");
        b.record(allowed(&b).unwrap(), true);
        b.record(allowed(&b).unwrap(), false);
        assert_eq!(b.state(), BreakerState::Open, "5 of 10 failed");
        match b.try_acquire() {
            Admission::Rejected(after) => assert!(after > Duration::from_secs(29)),
            Admission::Allowed(_) => panic!("open breaker let a request through"),
        }
    }

    #[test]
    fn consecutive_failures_trip() {
        let b = CircuitBreaker::new(&BreakerConfig {
            consecutive_failures: 3,
            failure_ratio: 0.0,
            ..BreakerConfig::default()
        });
        for ok in [false, false, true, false, false] {
            b.record(allowed(&b).unwrap(), ok);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(allowed(&b).unwrap(), false);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn concurrent_failures_trip_it_once() {
        let b = Arc::new(breaker(Duration::from_secs(30), 1));
        let permits: Vec<Permit> = (0..64).map(|_| allowed(&b).unwrap()).collect();
        let permits = Arc::new(parking_lot::Mutex::new(permits));
        let shared = b.clone();
        at_once(move || {
            let p = permits.lock().pop().unwrap();
            shared.record(p, false);
        });
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.trips(), 1);
    }

    /// A load-then-store breaker lets every thread that read "one probe
    /// left" through; compare-and-swap lets exactly `probes` through.
    #[test]
    fn half_open_admits_exactly_the_probes_under_contention() {
        for _ in 0..20 {
            let b = Arc::new(breaker(Duration::from_millis(1), 3));
            trip(&b);
            std::thread::sleep(Duration::from_millis(5));
            let shared = b.clone();
            let admitted = at_once(move || allowed(&shared).is_some());
            assert_eq!(admitted.iter().filter(|&&a| a).count(), 3);
            assert_eq!(b.state(), BreakerState::HalfOpen);
        }
    }

    #[test]
    fn probes_close_it_once_and_a_failed_probe_reopens_it() {
        let b = Arc::new(breaker(Duration::from_millis(1), 64));
        trip(&b);
        std::thread::sleep(Duration::from_millis(5));
        let probes: Vec<Permit> = (0..64).map(|_| allowed(&b).unwrap()).collect();
        assert!(allowed(&b).is_none(), "all probes out");
        let probes = Arc::new(parking_lot::Mutex::new(probes));
        let shared = b.clone();
        at_once(move || {
            let p = probes.lock().pop().unwrap();
            shared.record(p, true);
        });
        // A lost update on the success count would leave it half-open.
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.trips(), 1);

        trip(&b);
        std::thread::sleep(Duration::from_millis(5));
        let probe = allowed(&b).unwrap();
        let late = allowed(&b).unwrap();
        b.record(probe, false);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.trips(), 3);
        // A probe of the half-open state that is gone changes nothing.
        b.record(late, true);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn the_word_round_trips() {
        let w = Word {
            state: BreakerState::HalfOpen,
            generation: 0x3abc,
            admitted: 200,
            succeeded: 7,
            since: 0xdead_beef,
        };
        assert_eq!(Word::unpack(w.pack()), w);
    }
}
