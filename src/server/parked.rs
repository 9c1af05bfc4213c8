//! Connections waiting for bytes: idle keep-alive ones and ones whose request
//! head is still arriving. They live here, keyed by the token their epoll
//! registration carries, until a worker takes them or their deadline passes.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use parking_lot::Mutex;

use super::connection::Conn;
use super::reactor::Reactor;

/// Sharded so workers parking and taking different connections rarely meet on one lock.
const SHARDS: usize = 16;

pub struct Parked {
    shards: [Mutex<HashMap<u64, Conn>>; SHARDS],
    next_token: AtomicU64,
}

impl Parked {
    pub fn new() -> Parked {
        Parked {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            // Tokens below this are reserved (the listener's).
            next_token: AtomicU64::new(16),
        }
    }

    pub fn new_token(&self) -> u64 {
        self.next_token.fetch_add(1, Relaxed)
    }

    fn shard(&self, token: u64) -> &Mutex<HashMap<u64, Conn>> {
        &self.shards[token as usize % SHARDS]
    }

    /// Stores `conn` and arms its readable event. Stored first, so the event can
    /// never find it missing. On failure the connection is dropped (closed).
    pub fn park(&self, mut conn: Conn, reactor: &Reactor) {
        let token = conn.token;
        let fd = conn.stream.as_raw_fd();
        let first_time = !std::mem::replace(&mut conn.registered, true);
        self.shard(token).lock().insert(token, conn);
        let armed = if first_time {
            reactor.add(fd, token)
        } else {
            reactor.rearm(fd, token)
        };
        if let Err(e) = armed {
            log::error!("cannot watch connection: {e}");
            self.take(token);
        }
    }

    /// The connection behind an event; `None` if it expired meanwhile.
    pub fn take(&self, token: u64) -> Option<Conn> {
        self.shard(token).lock().remove(&token)
    }

    /// Removes and returns every connection whose deadline has passed.
    pub fn expired(&self, now: Instant) -> Vec<Conn> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut map = shard.lock();
            let tokens: Vec<u64> = map
                .iter()
                .filter(|(_, c)| c.deadline <= now)
                .map(|(t, _)| *t)
                .collect();
            out.extend(tokens.iter().filter_map(|t| map.remove(t)));
        }
        out
    }

    /// Removes and returns every parked connection (shutdown).
    pub fn drain(&self) -> Vec<Conn> {
        self.shards
            .iter()
            .flat_map(|shard| std::mem::take(&mut *shard.lock()).into_values())
            .collect()
    }
}
