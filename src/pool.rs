//! The global pool of upstream connections.
//!
//! Per upstream address: idle connections in LIFO stacks (the most recently
//! used is the one most likely still open and warm), a cap on idle and on
//! total connections, and an idle timeout. A connection is checked for
//! liveness right before it is handed out, on that very socket.
//!
//! Each connection belongs to the *home* (the server's worker event loop)
//! of the thread that opened it, where its replies are announced, and idles
//! on that home's stack. A checkout takes from the caller's home first, so an
//! exchange stays on one thread, and each home's stack has its own lock,
//! which stays in that worker's core's cache; only when its own stack is
//! empty does a worker take another home's connection.
//!
//! A checkout never waits: a new connection is handed out before its
//! handshake ends, and at `max_conns_per_host` the request joins the
//! address's line (a [`Place`]); either way it waits on the event loop.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, RwLock};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::http::ReadBuf;
use crate::wait::{Place, Waiters};

pub struct Pool {
    /// Keyed by backend addresses, which come from the config: foldhash,
    /// not SipHash, is enough.
    hosts: RwLock<HashMap<SocketAddr, Arc<Host>, foldhash::fast::RandomState>>,
    homes: usize,
    /// Called with every connection the pool opens, before it is used: the
    /// server registers it with its event loop for the connection's life.
    on_open: OnceLock<OnOpen>,
    limits: PoolLimits,
    misses: AtomicU64,
    evictions: AtomicU64,
}

type OnOpen = Box<dyn Fn(RawFd, usize) -> io::Result<()> + Send + Sync>;

thread_local! {
    static HOME: Cell<usize> = const { Cell::new(0) };
}

/// Tells the pool which home the calling thread serves (0 until told).
pub fn set_home(home: usize) {
    HOME.set(home);
}

#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Per home, like nginx's `keepalive` per worker.
    pub max_idle_per_host: usize,
    /// 0: no limit.
    pub max_conns_per_host: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
}

impl PoolLimits {
    pub fn from_config(config: &Config) -> PoolLimits {
        PoolLimits {
            max_idle_per_host: config.pool.max_idle_per_host,
            max_conns_per_host: config.pool.max_conns_per_host,
            idle_timeout: config.pool.idle_timeout.0,
            connect_timeout: config.upstream.connect_timeout.0,
            read_timeout: config.upstream.read_timeout.0,
            write_timeout: config.upstream.write_timeout.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Checkouts served by an idle connection.
    pub hits: u64,
    /// Checkouts that opened a new connection.
    pub misses: u64,
    /// Idle connections closed: expired, found dead, or over `max_idle_per_host`.
    pub evictions: u64,
}

struct Host {
    /// Per home, a cache line each.
    idle: Box<[CachePadded<Mutex<Idle>>]>,
    /// Idle plus checked-out connections; changes only when one opens or closes.
    open: Mutex<usize>,
    /// Requests waiting at `max_conns_per_host`: one is woken whenever a
    /// connection goes idle or closes.
    waiters: Arc<Waiters>,
}

#[derive(Default)]
struct Idle {
    stack: Vec<(Upstream, Instant)>,
    /// Checkouts this stack served, counted under its lock.
    hits: u64,
}

/// An upstream connection with the bytes read from it but not yet used.
pub struct Upstream {
    pub stream: TcpStream,
    pub buf: ReadBuf,
    /// The home of the thread that opened it (below the pool's number of homes).
    home: usize,
    /// Opened without waiting, and its handshake not yet seen done.
    connecting: bool,
}

#[derive(Debug)]
pub enum PoolError {
    Connect(io::Error),
    /// `max_conns_per_host` connections are open and none is idle: wait
    /// for one with [`Pool::wait_turn`].
    Exhausted,
}

/// A checked-out connection. Dropping it closes it; [`Pooled::release`] returns it.
pub struct Pooled {
    conn: Option<Upstream>,
    host: Arc<Host>,
    pool: Arc<Pool>,
    /// True if it served an earlier request (it may have been closed meanwhile).
    pub reused: bool,
}

impl Pool {
    /// A pool for `homes` worker event loops (homes are numbered from 0).
    pub fn new(limits: PoolLimits, homes: usize) -> Arc<Pool> {
        Arc::new(Pool {
            hosts: RwLock::new(HashMap::default()),
            homes: homes.max(1),
            on_open: OnceLock::new(),
            limits,
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        })
    }

    /// Has `watch` called with each connection opened from now on, and the
    /// opener's home (once per pool).
    pub fn watch_opened(
        &self,
        watch: impl Fn(RawFd, usize) -> io::Result<()> + Send + Sync + 'static,
    ) {
        if self.on_open.set(Box::new(watch)).is_err() {
            log::error!("the pool's connections are already watched");
        }
    }

    pub fn limits(&self) -> &PoolLimits {
        &self.limits
    }

    pub fn stats(&self) -> PoolStats {
        let hosts = self.hosts.read();
        let idle = hosts.values().flat_map(|host| host.idle.iter());
        PoolStats {
            hits: idle.map(|stack| stack.lock().hits).sum(),
            misses: self.misses.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
        }
    }

    /// The calling thread's home, within this pool's homes.
    fn caller_home(&self) -> usize {
        HOME.get() % self.homes
    }

    fn host(&self, addr: SocketAddr) -> Arc<Host> {
        if let Some(host) = self.hosts.read().get(&addr) {
            return host.clone();
        }
        self.hosts
            .write()
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(Host {
                    idle: (0..self.homes).map(|_| CachePadded::default()).collect(),
                    open: Mutex::new(0),
                    waiters: Arc::default(),
                })
            })
            .clone()
    }

    /// A live idle connection to `addr`, or a new one.
    pub fn checkout(self: &Arc<Self>, addr: SocketAddr) -> Result<Pooled, PoolError> {
        self.checkout_with(addr, Reuse::Checked)
    }

    /// An idle connection handed out without the liveness peek (a syscall),
    /// for a request the caller sends again on a fresh connection if this
    /// one turns out closed.
    pub fn checkout_unchecked(self: &Arc<Self>, addr: SocketAddr) -> Result<Pooled, PoolError> {
        self.checkout_with(addr, Reuse::Unchecked)
    }

    /// A newly opened connection, for retrying after a reused one failed.
    pub fn checkout_fresh(self: &Arc<Self>, addr: SocketAddr) -> Result<Pooled, PoolError> {
        self.checkout_with(addr, Reuse::Never)
    }

    fn checkout_with(
        self: &Arc<Self>,
        addr: SocketAddr,
        reuse: Reuse,
    ) -> Result<Pooled, PoolError> {
        let host = self.host(addr);
        let home = self.caller_home();
        if reuse != Reuse::Never {
            // The liveness check is a syscall: not under a lock.
            while let Some((conn, since)) = host.take_idle(home) {
                let fresh_enough = since.elapsed() < self.limits.idle_timeout;
                if fresh_enough && (reuse == Reuse::Unchecked || is_alive(&conn.stream)) {
                    return Ok(self.pooled(conn, host, true));
                }
                // Counted as a hit when taken (from its home's stack): it was not one.
                let from = conn.home;
                drop(conn);
                host.idle[from].lock().hits -= 1;
                self.evictions.fetch_add(1, Relaxed);
                host.closed();
            }
        }
        let mut open = host.open.lock();
        let max = self.limits.max_conns_per_host;
        if max != 0 && *open >= max {
            return Err(PoolError::Exhausted);
        }
        *open += 1;
        drop(open);
        self.misses.fetch_add(1, Relaxed);
        match self.connect(addr) {
            Ok(conn) => Ok(self.pooled(conn, host, false)),
            Err(e) => {
                host.closed();
                Err(PoolError::Connect(e))
            }
        }
    }

    /// Joins the line for a connection to `addr`, after a checkout met
    /// `max_conns_per_host`: the turn's signal fires when one goes idle or
    /// closes. Check out once more after joining: one freed just before
    /// woke nobody.
    pub fn wait_turn(&self, addr: SocketAddr) -> io::Result<Place> {
        let joined = self.host(addr).waiters.join(usize::MAX)?;
        Ok(joined.expect("a line without a bound takes everyone"))
    }

    fn pooled(self: &Arc<Self>, conn: Upstream, host: Arc<Host>, reused: bool) -> Pooled {
        Pooled {
            conn: Some(conn),
            host,
            pool: self.clone(),
            reused,
        }
    }

    /// Starts opening a connection and returns without waiting for the
    /// handshake: a server that drops SYNs would otherwise hold the caller's
    /// thread for the whole connect timeout. The event loop reports the
    /// connection writable once open (see [`Pooled::connected`]).
    fn connect(&self, addr: SocketAddr) -> io::Result<Upstream> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&addr.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            other => other?,
        }
        // Non-blocking for life: reads take what has arrived, writes what
        // fits, and the exchange waits on the event loop for the rest.
        let stream = TcpStream::from(socket);
        let home = self.caller_home();
        if let Some(watch) = self.on_open.get() {
            watch(stream.as_raw_fd(), home)?;
        }
        Ok(Upstream {
            stream,
            buf: ReadBuf::default(),
            home,
            connecting: true,
        })
    }

    /// Closes idle connections past `idle_timeout`; run periodically.
    pub fn evict_expired(&self) {
        let hosts: Vec<Arc<Host>> = self.hosts.read().values().cloned().collect();
        let timeout = self.limits.idle_timeout;
        for host in hosts {
            let mut evicted = 0;
            for stack in host.idle.iter() {
                let mut idle = stack.lock();
                let before = idle.stack.len();
                idle.stack.retain(|(_, since)| since.elapsed() < timeout);
                evicted += before - idle.stack.len();
            }
            if evicted > 0 {
                self.evictions.fetch_add(evicted as u64, Relaxed);
                (0..evicted).for_each(|_| host.closed());
            }
        }
    }
}

impl Host {
    /// The most recently used idle connection of `home`, or else of the
    /// next home that has one. Counted as a hit in its stack.
    fn take_idle(&self, home: usize) -> Option<(Upstream, Instant)> {
        let homes = self.idle.len();
        (0..homes).find_map(|i| {
            let mut idle = self.idle[(home + i) % homes].lock();
            let taken = idle.stack.pop()?;
            idle.hits += 1;
            Some(taken)
        })
    }

    /// A connection closed: its slot is free.
    fn closed(&self) {
        *self.open.lock() -= 1;
        self.waiters.wake_one();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reuse {
    /// Idle connections, each peeked at first.
    Checked,
    /// Idle connections as they are.
    Unchecked,
    /// A new connection.
    Never,
}

/// An idle upstream socket is alive if reading would block: 0 means the
/// upstream closed it, data means it sent something unasked (unusable).
fn is_alive(stream: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv into one valid byte on a socket we own.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

impl Pooled {
    /// Whether the upstream has sent something or closed: reading would
    /// not block.
    pub fn has_spoken(&self) -> bool {
        !is_alive(self.stream())
    }

    pub fn stream(&self) -> &TcpStream {
        &self
            .conn
            .as_ref()
            .expect("connection present until released")
            .stream
    }

    /// The home it is watched in.
    pub fn home(&self) -> usize {
        self.conn
            .as_ref()
            .expect("connection present until released")
            .home
    }

    pub fn conn(&mut self) -> &mut Upstream {
        self.conn
            .as_mut()
            .expect("connection present until released")
    }

    /// Whether a new connection's handshake is done (always, for a reused
    /// one); the error it failed with, if it did.
    pub fn connected(&mut self) -> io::Result<bool> {
        let conn = self.conn();
        if !conn.connecting {
            return Ok(true);
        }
        if let Some(e) = conn.stream.take_error()? {
            return Err(e);
        }
        match conn.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
            Err(e) => return Err(e),
        }
        conn.connecting = false;
        Ok(true)
    }

    /// Returns a connection whose last response ended cleanly to its home's
    /// idle stack.
    pub fn release(mut self) {
        let mut conn = self.conn.take().expect("released once");
        if !conn.buf.is_empty() {
            return; // unread bytes: the upstream broke framing; Drop closes it
        }
        conn.buf.release();
        let host = &self.host;
        let mut idle = host.idle[conn.home].lock();
        if idle.stack.len() >= self.pool.limits.max_idle_per_host {
            drop(idle);
            self.pool.evictions.fetch_add(1, Relaxed);
            host.closed();
            return;
        }
        idle.stack.push((conn, Instant::now()));
        drop(idle);
        host.waiters.wake_one();
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // Still holding the connection: it is not reusable, so it closes here.
        if self.conn.take().is_some() {
            self.host.closed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wait::readable;
    use std::io::Write;
    use std::net::TcpListener;

    fn limits() -> PoolLimits {
        PoolLimits {
            max_idle_per_host: 1,
            max_conns_per_host: 2,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_millis(200),
            read_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn reuses_lifo_and_counts() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::new(limits(), 1);
        let a = pool.checkout(addr).unwrap();
        let b = pool.checkout(addr).unwrap();
        let (_sa, _) = listener.accept().unwrap();
        let (_sb, _) = listener.accept().unwrap();
        let b_port = b.conn.as_ref().unwrap().stream.local_addr().unwrap();
        a.release();
        b.release(); // over max_idle_per_host = 1: evicted
        let mut again = pool.checkout(addr).unwrap();
        assert!(again.reused);
        assert_ne!(again.conn().stream.local_addr().unwrap(), b_port);
        assert_eq!(
            pool.stats(),
            PoolStats {
                hits: 1,
                misses: 2,
                evictions: 1
            }
        );
    }

    #[test]
    fn each_home_keeps_its_own_idle_connections_and_lends_them() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::new(limits(), 2);
        let port = |c: &Pooled| c.stream().local_addr().unwrap();
        set_home(0);
        let a = pool.checkout(addr).unwrap();
        let a_port = port(&a);
        set_home(1);
        let b = pool.checkout(addr).unwrap();
        let b_port = port(&b);
        set_home(0);
        a.release();
        b.release(); // its home's stack: max_idle_per_host = 1 holds per home
        assert_eq!(pool.stats().evictions, 0);
        set_home(1);
        let own = pool.checkout(addr).unwrap();
        assert_eq!((port(&own), own.home()), (b_port, 1));
        // Home 1 has none idle now: it takes home 0's, which stays home 0's.
        let lent = pool.checkout(addr).unwrap();
        assert_eq!((port(&lent), lent.home()), (a_port, 0));
        assert!(lent.reused);
        lent.release();
        set_home(0);
        assert_eq!(port(&pool.checkout(addr).unwrap()), a_port);
    }

    #[test]
    fn dead_idle_connection_is_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::new(limits(), 1);
        pool.checkout(addr).unwrap().release();
        let (server_side, _) = listener.accept().unwrap();
        drop(server_side); // the upstream closes the idle connection
        std::thread::sleep(Duration::from_millis(50));
        let fresh = pool.checkout(addr).unwrap();
        assert!(!fresh.reused);
        assert_eq!(pool.stats().evictions, 1);
    }

    #[test]
    fn unexpected_bytes_make_a_connection_dead() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::new(limits(), 1);
        pool.checkout(addr).unwrap().release();
        let (mut server_side, _) = listener.accept().unwrap();
        server_side
            .write_all(b"HTTP/1.1 408 Timeout\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pool.checkout(addr).unwrap().reused);
    }

    #[test]
    fn a_new_connection_reports_its_handshake_done_or_refused() {
        let pool = Pool::new(limits(), 1);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut opened = pool.checkout(listener.local_addr().unwrap()).unwrap();
        assert!(!opened.reused);
        let until = Instant::now() + Duration::from_secs(5);
        while !opened.connected().unwrap() {
            assert!(Instant::now() < until, "the handshake never ended");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Non-blocking for life: writes take what fits, the rest waits.
        // SAFETY: reads the flags of a socket we own.
        let flags = unsafe { libc::fcntl(opened.stream().as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);

        let refused = listener.local_addr().unwrap();
        drop(listener);
        let mut refusing = pool.checkout(refused).unwrap();
        let error = loop {
            match refusing.connected() {
                Ok(false) => std::thread::sleep(Duration::from_millis(1)),
                Ok(true) => panic!("connected to a closed port"),
                Err(e) => break e,
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn at_max_conns_requests_wait_their_turn_in_line() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::new(limits(), 1);
        let a = pool.checkout(addr).unwrap();
        let b = pool.checkout(addr).unwrap();
        assert!(matches!(pool.checkout(addr), Err(PoolError::Exhausted)));
        let first = pool.wait_turn(addr).unwrap();
        let second = pool.wait_turn(addr).unwrap();
        assert!(!readable(first.fd()) && !readable(second.fd()));
        b.release();
        assert!(readable(first.fd()), "an idle connection wakes the first");
        assert!(!readable(second.fd()));
        let again = pool.checkout(addr).unwrap();
        assert!(again.reused);
        drop(a);
        assert!(readable(second.fd()), "a closed one wakes the next");
        let opened = pool.checkout(addr).unwrap();
        assert!(!opened.reused);
        let gone = pool.wait_turn(addr).unwrap();
        let next = pool.wait_turn(addr).unwrap();
        drop(gone);
        again.release();
        assert!(readable(next.fd()), "one that left the line is passed over");
        drop((first, second, opened));
    }

    #[test]
    fn idle_timeout_evicts() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::new(
            PoolLimits {
                idle_timeout: Duration::from_millis(20),
                ..limits()
            },
            1,
        );
        pool.checkout(addr).unwrap().release();
        std::thread::sleep(Duration::from_millis(40));
        pool.evict_expired();
        assert_eq!(pool.stats().evictions, 1);
        assert!(!pool.checkout(addr).unwrap().reused);
    }
}
