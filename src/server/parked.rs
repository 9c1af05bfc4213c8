//! Everything waiting for a socket to become ready: idle keep-alive
//! connections, connections whose request head is still arriving, and
//! exchanges waiting for their upstream (its response, or the next piece of
//! its body) or for their client (more of the request body, or room for the
//! response). Each lives here, keyed by the token its epoll registration
//! carries, until a worker takes it on that event or its deadline passes.
//!
//! Client sockets and pooled upstream connections are registered
//! edge-triggered once, for their whole life, so no wait costs a system call
//! to re-arm. An edge is reported once: an event that finds its socket busy
//! (being served, or a pooled connection between waits) is kept as a mark in
//! its slot, and whoever parks that socket next serves it again instead.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::time::Instant;

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use super::connection::{Conn, Suspended};
use super::reactor::{Reactor, Ready};
use crate::pipeline::{Signal, WaitOn};

/// Shards per home. Each home (a worker's epoll set) has its own, since a
/// token's slot is mostly taken and parked by that home's worker: the locks
/// and slots stay in its core's cache. Within a home, sharded so a helper
/// worker rarely meets the worker on one lock.
const SHARDS: usize = 16;

/// A token's low bits say which home its events come to.
const HOME_BITS: u32 = 16;
pub const MAX_HOMES: usize = 1 << HOME_BITS;

/// Tokens of pooled upstream connections: this bit, the descriptor and the
/// home, so a connection keeps its token from pool to pool-mate without any
/// bookkeeping.
const UPSTREAM: u64 = 1 << 63;

/// The token a pooled upstream connection is registered with in `home`.
pub fn upstream_token(fd: RawFd, home: usize) -> u64 {
    UPSTREAM | (fd as u64) << HOME_BITS | home as u64
}

pub enum Waiting {
    /// For the client's next bytes.
    Client(Box<Conn>),
    /// An exchange waiting on a socket: the upstream's, or the client's (for
    /// more of the request body, or room for the response). The client
    /// connection waits with it.
    Exchange(Box<Conn>, Box<Suspended>),
    /// A wait past its deadline, for a worker to time out: the
    /// housekeeping thread only notices, workers do the work. The signal is
    /// already notified, so the next free worker takes it.
    TimedOut(Box<Conn>, Box<Suspended>, Signal),
}

impl Waiting {
    /// The client connection, whatever it waits for.
    pub fn conn(&self) -> &Conn {
        match self {
            Waiting::Client(conn) | Waiting::Exchange(conn, _) | Waiting::TimedOut(conn, _, _) => {
                conn
            }
        }
    }

    fn conn_mut(&mut self) -> &mut Conn {
        match self {
            Waiting::Client(conn) | Waiting::Exchange(conn, _) | Waiting::TimedOut(conn, _, _) => {
                conn
            }
        }
    }
}

/// What a token stands for now.
enum Slot {
    /// Waiting for its event until the deadline.
    Parked(Waiting, Instant),
    /// Not waiting: a client connection a worker is serving (or whose
    /// exchange waits on an upstream), or a pooled upstream connection
    /// between waits; with what came for it meanwhile.
    Busy(Mark),
    /// A pooled connection whose exchange waits under the client's token
    /// (`WaitOn::ClientOrPooled`): its event wakes that client. Left behind
    /// when the client wakes first, it costs at most one spurious wake.
    Watching(u64),
}

/// What came for a busy socket, kept for whoever parks it next.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mark {
    Nothing,
    Event,
    /// An event that said the peer closed its side.
    HungUp,
}

/// Tokens are ours (a counter, or a tag and a descriptor), never a
/// client's choice: a multiply spreads them without SipHash's cost, which
/// every event, park and wait would otherwise pay.
#[derive(Default, Clone, Copy)]
struct TokenHash(u64);

impl Hasher for TokenHash {
    fn finish(&self) -> u64 {
        // A product's high bits depend on every bit of the token; the table
        // indexes by the low ones (all tokens in a shard share their low 20
        // bits: home and shard).
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.write_u64(u64::from(b)));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Slots = HashMap<u64, Slot, BuildHasherDefault<TokenHash>>;

pub struct Parked {
    /// `SHARDS` per home, home by home, a cache line each.
    shards: Box<[CachePadded<Mutex<Slots>>]>,
    next_token: AtomicU64,
    /// What `soonest` counts milliseconds from.
    epoch: Instant,
    /// No wait parked since the last sweep has a deadline before this
    /// (milliseconds from `epoch`, rounded up), so housekeeping can sweep
    /// on time without scanning every slot on every tick. It may be early
    /// (that wait was served since): the sweep then finds nothing and
    /// learns the next one. One parked while a sweep runs may be missed by
    /// both: the sweep housekeeping makes every `SWEEP_EVERY` ticks anyway
    /// finds it.
    soonest: CachePadded<AtomicU64>,
}

impl Parked {
    pub fn new(homes: usize) -> Parked {
        assert!(
            (1..=MAX_HOMES).contains(&homes),
            "homes within a token's bits"
        );
        Parked {
            shards: (0..homes * SHARDS)
                .map(|_| CachePadded::default())
                .collect(),
            // Counted from 1: token 0 is the listener's.
            next_token: AtomicU64::new(1),
            epoch: Instant::now(),
            soonest: CachePadded::new(AtomicU64::new(u64::MAX)),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.epoch);
        // In u64: a u128 division per park would cost more than the rest.
        (since.as_micros() as u64).div_ceil(1000)
    }

    /// A slot waiting until `deadline`, which `soonest` now covers. Read
    /// before written: deadlines mostly come later than the soonest, so
    /// parking rarely writes the line every worker reads.
    fn waiting_until(&self, waiting: Waiting, deadline: Instant) -> Slot {
        let at = self.millis(deadline);
        if at < self.soonest.load(Relaxed) {
            self.soonest.fetch_min(at, Relaxed);
        }
        Slot::Parked(waiting, deadline)
    }

    /// Whether a wait may have passed its deadline by `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.millis(now) >= self.soonest.load(Relaxed)
    }

    /// A token whose events come to `home`.
    pub fn new_token(&self, home: usize) -> u64 {
        self.next_token.fetch_add(1, Relaxed) << HOME_BITS | home as u64
    }

    fn shard(&self, token: u64) -> &Mutex<Slots> {
        let home = (token & ((1 << HOME_BITS) - 1)) as usize;
        let within = (token >> HOME_BITS) as usize % SHARDS;
        &self.shards[home * SHARDS + within]
    }

    /// Parks a newly accepted connection and registers its socket for life.
    /// Stored first, so its first event can never find it missing.
    pub fn admit(&self, conn: Box<Conn>, deadline: Instant, reactor: &Reactor) {
        let token = conn.token;
        let fd = conn.stream.as_raw_fd();
        self.store(token, self.waiting_until(Waiting::Client(conn), deadline));
        if let Err(e) = reactor.add_socket(fd, token) {
            log::error!("cannot watch a client socket: {e}");
            self.close(token);
        }
    }

    /// Waits for the client's next bytes until `deadline`. Gives the
    /// connection back if an event came while it was busy: serve it again.
    pub fn park(&self, conn: Box<Conn>, deadline: Instant) -> Option<Waiting> {
        self.wait_for_client(Waiting::Client(conn), deadline)
    }

    /// Parks what waits on the client's socket under the client's token.
    fn wait_for_client(&self, mut waiting: Waiting, deadline: Instant) -> Option<Waiting> {
        let token = waiting.conn().token;
        let mut shard = self.shard(token).lock();
        if let Some(Slot::Busy(mark)) = shard.get_mut(&token) {
            if *mark != Mark::Nothing {
                waiting.conn_mut().hung_up |= *mark == Mark::HungUp;
                *mark = Mark::Nothing;
                return Some(waiting);
            }
        }
        shard.insert(token, self.waiting_until(waiting, deadline));
        None
    }

    /// Forgets a client connection that is closing.
    pub fn close(&self, token: u64) {
        self.shard(token).lock().remove(&token);
    }

    /// Parks an exchange until what it waits on is ready (the first of two,
    /// for `ClientOrPooled`); the client stays busy meanwhile unless it
    /// waits on the client's own socket. Gives the exchange back if its
    /// socket already had an event. A descriptor that is neither a pooled
    /// connection nor the client is watched in `home`.
    pub fn suspend(
        &self,
        conn: Box<Conn>,
        suspended: Box<Suspended>,
        home: (usize, &Reactor),
    ) -> Option<Waiting> {
        let deadline = suspended.deadline;
        let wait_on = suspended.wait_on();
        let waiting = Waiting::Exchange(conn, suspended);
        match wait_on {
            WaitOn::Pooled { fd, home } | WaitOn::ClientOrPooled { fd, home } => {
                let token = upstream_token(fd, home);
                let mut shard = self.shard(token).lock();
                if let Some(Slot::Busy(_)) = shard.get(&token) {
                    shard.remove(&token);
                    return Some(waiting);
                }
                if matches!(wait_on, WaitOn::Pooled { .. }) {
                    shard.insert(token, self.waiting_until(waiting, deadline));
                } else {
                    shard.insert(token, Slot::Watching(waiting.conn().token));
                    drop(shard);
                    return self.wait_for_client(waiting, deadline);
                }
            }
            WaitOn::Client => return self.wait_for_client(waiting, deadline),
            WaitOn::Fd(fd) => {
                let (home, reactor) = home;
                let token = self.new_token(home);
                self.store(token, self.waiting_until(waiting, deadline));
                if let Err(e) = reactor.watch(fd, token) {
                    log::error!("cannot watch a socket: {e}");
                    self.abandon(token);
                }
            }
        }
        None
    }

    /// Hands a wait whose deadline passed over to the workers of the
    /// client's home.
    pub fn time_out(&self, conn: Box<Conn>, suspended: Box<Suspended>, reactor: &Reactor) {
        let signal = match Signal::new() {
            Ok(signal) => signal,
            Err(e) => {
                log::error!(
                    "{}: cannot time out a wait ({e}); connection closed",
                    conn.peer
                );
                self.close(conn.token);
                return;
            }
        };
        signal.notify();
        let token = self.new_token(conn.home);
        let fd = signal.fd();
        let timed_out = Waiting::TimedOut(conn, suspended, signal);
        self.store(token, Slot::Parked(timed_out, Instant::now()));
        if let Err(e) = reactor.add(fd, token) {
            log::error!("cannot watch a socket: {e}");
            self.abandon(token);
        }
    }

    /// Drops an exchange that could not be watched, closing its client.
    fn abandon(&self, token: u64) {
        let dropped = self.shard(token).lock().remove(&token);
        if let Some(Slot::Parked(waiting, _)) = dropped {
            self.close(waiting.conn().token);
        }
    }

    fn store(&self, token: u64, slot: Slot) {
        self.shard(token).lock().insert(token, slot);
    }

    /// What waited behind an event; `None` if nothing did (it expired, or
    /// its socket is busy: then the event is marked for whoever has it).
    pub fn take(&self, ready: Ready) -> Option<Waiting> {
        let token = ready.token;
        let mut shard = self.shard(token).lock();
        let slot = match shard.get_mut(&token) {
            Some(Slot::Busy(mark)) => {
                let came = if ready.hung_up {
                    Mark::HungUp
                } else {
                    Mark::Event
                };
                *mark = (*mark).max(came);
                return None;
            }
            // A pooled connection between waits: its next wait looks first
            // (and reads on to the end itself, so a hang-up needs no mark).
            None if token & UPSTREAM != 0 => {
                shard.insert(token, Slot::Busy(Mark::Event));
                return None;
            }
            None => return None,
            Some(Slot::Watching(client)) => {
                let client = *client;
                // Its own next wait finds this event, too.
                shard.insert(token, Slot::Busy(Mark::Event));
                drop(shard);
                return self.take(Ready {
                    token: client,
                    hung_up: false,
                });
            }
            Some(slot) => slot,
        };
        // A client connection stays known while it is served; another
        // socket's token is done with.
        let waiting = match slot {
            Slot::Parked(waiting, _) if waiting.conn().token == token => {
                std::mem::replace(slot, Slot::Busy(Mark::Nothing))
            }
            _ => shard.remove(&token)?,
        };
        let Slot::Parked(mut waiting, _) = waiting else {
            unreachable!("busy slots returned above")
        };
        if waiting.conn().token == token {
            waiting.conn_mut().hung_up |= ready.hung_up;
        }
        Some(waiting)
    }

    /// Removes and returns every client or exchange wait whose deadline has
    /// passed (never a `TimedOut` hand-over: a worker takes those), and
    /// learns the soonest deadline of those left.
    pub fn expired(&self, now: Instant) -> Vec<Waiting> {
        // Forgotten before the scan: a wait parked meanwhile lowers it again.
        self.soonest.store(u64::MAX, SeqCst);
        self.remove_where(|waiting, deadline| {
            if matches!(waiting, Waiting::TimedOut(..)) {
                return false;
            }
            if deadline > now {
                let at = self.millis(deadline);
                self.soonest.fetch_min(at, Relaxed);
                return false;
            }
            true
        })
    }

    /// Removes and returns every connection waiting for its client (shutdown).
    pub fn drain_clients(&self) -> Vec<Waiting> {
        self.remove_where(|waiting, _| matches!(waiting, Waiting::Client(_)))
    }

    fn remove_where(&self, doomed: impl Fn(&Waiting, Instant) -> bool) -> Vec<Waiting> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut map = shard.lock();
            let tokens: Vec<u64> = map
                .iter()
                .filter(|(_, slot)| matches!(slot, Slot::Parked(w, d) if doomed(w, *d)))
                .map(|(t, _)| *t)
                .collect();
            for token in tokens {
                if let Some(Slot::Parked(waiting, _)) = map.remove(&token) {
                    out.push(waiting);
                }
            }
        }
        out
    }

    /// Exchanges waiting right now (in flight). Counted when asked (at
    /// shutdown), not kept per wait: a shared count would bounce between
    /// cores twice per request.
    pub fn suspended(&self) -> usize {
        let waits_upstream = |slot: &Slot| {
            matches!(
                slot,
                Slot::Parked(Waiting::Exchange(..) | Waiting::TimedOut(..), _)
            )
        };
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .values()
                    .filter(|slot| waits_upstream(slot))
                    .count()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn client(parked: &Parked) -> Box<Conn> {
        Conn::connected(parked.new_token(0)).0
    }

    #[test]
    fn a_wait_is_due_at_its_deadline_and_the_sweep_learns_the_next() {
        let parked = Parked::new(1);
        let now = Instant::now();
        let ms = |n| now + Duration::from_millis(n);
        assert!(!parked.due(ms(10_000)), "nothing parked");
        assert!(parked.park(client(&parked), ms(60)).is_none());
        assert!(parked.park(client(&parked), ms(30)).is_none());
        assert!(!parked.due(ms(29)));
        assert!(parked.due(ms(30)));

        assert_eq!(parked.expired(ms(30)).len(), 1);
        assert!(!parked.due(ms(59)), "the next deadline is the other's");
        assert!(parked.due(ms(60)));
        assert_eq!(parked.expired(ms(60)).len(), 1);
        assert!(!parked.due(ms(10_000)), "nothing left");
    }
}
