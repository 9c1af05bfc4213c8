//! Everything waiting for a socket to become readable: idle keep-alive
//! connections, connections whose request head is still arriving, and
//! exchanges waiting for their upstream. Each lives here, keyed by the token
//! its epoll registration carries, until a worker takes it on that event or
//! its deadline passes.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use parking_lot::Mutex;

use super::connection::{Conn, Suspended};
use super::reactor::Reactor;
use crate::pipeline::Signal;

/// Sharded so workers parking and taking different connections rarely meet on one lock.
const SHARDS: usize = 16;

pub enum Waiting {
    /// For the client's next bytes.
    Client(Conn),
    /// For the upstream's response; the client connection waits with it.
    Upstream(Conn, Box<Suspended>),
    /// An upstream wait past its deadline, for a worker to time out: the
    /// housekeeping thread only notices, workers do the work. The signal is
    /// already notified, so the next free worker takes it.
    TimedOut(Conn, Box<Suspended>, Signal),
}

struct Entry {
    waiting: Waiting,
    deadline: Instant,
}

pub struct Parked {
    shards: [Mutex<HashMap<u64, Entry>>; SHARDS],
    next_token: AtomicU64,
    /// Exchanges in flight while suspended: shutdown waits for them.
    suspended: AtomicUsize,
}

impl Parked {
    pub fn new() -> Parked {
        Parked {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            // Tokens below this are reserved (the listener's).
            next_token: AtomicU64::new(16),
            suspended: AtomicUsize::new(0),
        }
    }

    pub fn new_token(&self) -> u64 {
        self.next_token.fetch_add(1, Relaxed)
    }

    fn shard(&self, token: u64) -> &Mutex<HashMap<u64, Entry>> {
        &self.shards[token as usize % SHARDS]
    }

    /// Stores `entry` and only then arms its event, so the event can never
    /// find it missing. If arming fails the entry is dropped (closed).
    fn insert(&self, token: u64, entry: Entry, arm: impl FnOnce() -> std::io::Result<()>) {
        self.shard(token).lock().insert(token, entry);
        if let Err(e) = arm() {
            log::error!("cannot watch a socket: {e}");
            self.take(token);
        }
    }

    /// Waits for the client's next bytes until `deadline`.
    pub fn park(&self, mut conn: Conn, deadline: Instant, reactor: &Reactor) {
        let token = conn.token;
        let fd = conn.stream.as_raw_fd();
        let first_time = !std::mem::replace(&mut conn.registered, true);
        let entry = Entry {
            waiting: Waiting::Client(conn),
            deadline,
        };
        self.insert(token, entry, || {
            if first_time {
                reactor.add(fd, token)
            } else {
                reactor.rearm(fd, token)
            }
        });
    }

    /// Waits for the upstream's response; the client stays unwatched meanwhile.
    pub fn suspend(&self, conn: Conn, suspended: Box<Suspended>, reactor: &Reactor) {
        let token = self.new_token();
        let fd = suspended.fd();
        let entry = Entry {
            deadline: suspended.deadline,
            waiting: Waiting::Upstream(conn, suspended),
        };
        self.suspended.fetch_add(1, Relaxed);
        self.insert(token, entry, || reactor.watch(fd, token));
    }

    /// Hands an upstream wait whose deadline passed over to the workers.
    pub fn time_out(&self, conn: Conn, suspended: Box<Suspended>, reactor: &Reactor) {
        let signal = match Signal::new() {
            Ok(signal) => signal,
            Err(e) => {
                log::error!(
                    "{}: cannot time out a wait ({e}); connection closed",
                    conn.peer
                );
                return;
            }
        };
        signal.notify();
        let token = self.new_token();
        let fd = signal.fd();
        let entry = Entry {
            deadline: Instant::now(),
            waiting: Waiting::TimedOut(conn, suspended, signal),
        };
        self.suspended.fetch_add(1, Relaxed);
        self.insert(token, entry, || reactor.add(fd, token));
    }

    /// What waited behind an event; `None` if it expired meanwhile.
    pub fn take(&self, token: u64) -> Option<Waiting> {
        let entry = self.shard(token).lock().remove(&token)?;
        Some(self.leaving(entry))
    }

    fn leaving(&self, entry: Entry) -> Waiting {
        if matches!(entry.waiting, Waiting::Upstream(..) | Waiting::TimedOut(..)) {
            self.suspended.fetch_sub(1, Relaxed);
        }
        entry.waiting
    }

    /// Removes and returns every client or upstream wait whose deadline has
    /// passed (never a `TimedOut` hand-over: a worker takes those).
    pub fn expired(&self, now: Instant) -> Vec<Waiting> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut map = shard.lock();
            let tokens: Vec<u64> = map
                .iter()
                .filter(|(_, e)| e.deadline <= now && !matches!(e.waiting, Waiting::TimedOut(..)))
                .map(|(t, _)| *t)
                .collect();
            for token in tokens {
                if let Some(entry) = map.remove(&token) {
                    out.push(self.leaving(entry));
                }
            }
        }
        out
    }

    /// Removes and returns every connection waiting for its client (shutdown).
    pub fn drain_clients(&self) -> Vec<Conn> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut map = shard.lock();
            let idle: Vec<u64> = map
                .iter()
                .filter(|(_, e)| matches!(e.waiting, Waiting::Client(_)))
                .map(|(t, _)| *t)
                .collect();
            for token in idle {
                if let Some(Entry {
                    waiting: Waiting::Client(conn),
                    ..
                }) = map.remove(&token)
                {
                    out.push(conn);
                }
            }
        }
        out
    }

    /// Exchanges waiting for an upstream right now.
    pub fn suspended(&self) -> usize {
        self.suspended.load(Relaxed)
    }
}
