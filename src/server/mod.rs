//! The threaded server: a pool of workers, each with its own epoll set.
//!
//! Each worker loops on [`Reactor::wait`] of its own set, its *home*. The
//! listener, in every set, makes a worker accept pending connections and
//! park each in a home, in turn; a connection stays in its home's set for
//! life, and so does every upstream connection the home's worker opens. A
//! client's event makes the worker take that connection and serve what has
//! arrived ([`connection::serve`]), then park it again or close it. So one exchange stays on one thread, and
//! its state in one core's cache: sharing one set among all workers let any
//! of them take the upstream's answer, which cost 2–3 µs of CPU per request
//! in cache misses and cross-core wake-ups.
//!
//! A housekeeping thread closes idle connections past their deadline and
//! stale pooled ones, hands upstream waits past theirs to the workers (it
//! never serves), and starts a helper on a home whose worker is held (no
//! built-in stage waits on a thread, but a module hook may block), or whose
//! [`Backlog`] has sat untaken for a tick.

mod affinity;
mod backlog;
mod connection;
mod downstream;
mod outgoing;
mod parked;
mod reactor;
mod scheduling;
mod turn;
mod workers;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

pub use downstream::Downstream;
pub(crate) use outgoing::send_some;

use crate::config::Config;
use crate::http::Limits;
use crate::modules;
use crate::pipeline::{BuildEnv, Pipeline, Services, Stage};
use crate::pool::{Pool, PoolLimits};
use crate::upstream::Upstreams;
use backlog::{Backlog, Seen};
use connection::{Conn, Next};
use parked::{Parked, Waiting};
use reactor::{Reactor, Ready};
use turn::Turn;
use workers::Workers;

/// The epoll token of the listening socket.
const LISTENER: u64 = 0;
/// Workers block on upstream I/O, so their stacks stay small and many.
const WORKER_STACK: usize = 256 * 1024;
/// How often housekeeping looks for held workers: a home whose worker is
/// held waits up to two ticks for a helper.
const HOUSEKEEPING_TICK: Duration = Duration::from_millis(25);
/// Ticks between sweeps of the pool's idle connections, and log flushes.
/// Parked waits are swept on the tick their soonest deadline passes.
const SWEEP_EVERY: u64 = 4;
/// Events one worker takes per `epoll_wait`. Those it is not serving yet
/// wait in its home's [`Backlog`], where a helper finds them if the worker
/// is held by a blocking module hook (each event is reported only once).
const EVENTS_PER_WAIT: usize = 32;

/// What every worker shares.
pub struct Shared {
    pipeline: Pipeline,
    limits: Limits,
    header_timeout: Duration,
    keepalive_timeout: Duration,
    write_timeout: Duration,
    max_connections: usize,
    /// Workers (helpers too) run as `SCHED_BATCH`.
    batch_workers: bool,
    shutting_down: AtomicBool,
    /// Each worker's epoll set, indexed by home.
    reactors: Arc<[Reactor]>,
    /// Events taken from a home's set and not served yet, indexed by home
    /// (a cache line each: every worker locks its own per event).
    backlogs: Box<[CachePadded<Backlog>]>,
    /// The home the next accepted connection gets (modulo their number).
    next_home: AtomicUsize,
    /// Client connections within `max_connections` (over-limit ones are not counted).
    open: Arc<AtomicUsize>,
    workers: Workers,
    parked: Parked,
    listener: TcpListener,
    pool: Arc<Pool>,
}

/// A running server. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    upstreams: Arc<Upstreams>,
    services: Services,
}

impl Server {
    /// Builds the pipeline from the built-in modules plus `extra` stages
    /// (script modules, plugins), binds the listener and starts the workers.
    pub fn start(config: &Config, extra: Vec<Stage>) -> Result<Server, Box<dyn std::error::Error>> {
        let s = &config.server;
        let homes = match s.workers {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n.into(),
        };
        let reactors: Arc<[Reactor]> = (0..homes)
            .map(|_| Reactor::new())
            .collect::<io::Result<_>>()?;
        let pool = Pool::new(PoolLimits::from_config(config), homes);
        // Upstream connections are watched for life, in the set of the worker
        // that opens them (the pool hands them back to that worker first).
        let watchers = reactors.clone();
        pool.watch_opened(move |fd, home| {
            watchers[home].add_socket(fd, parked::upstream_token(fd, home))
        });
        let upstreams = Upstreams::from_config(config)?;
        let services = Services::default();
        let mut stages = modules::build_all(
            &config.modules,
            &BuildEnv {
                config,
                pool: &pool,
                upstreams: &upstreams,
                services: &services,
            },
        )?;
        stages.extend(extra);
        let pipeline = Pipeline::new(stages);

        let addr = config.server.listen_addr;
        let listener =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        listener.set_nonblocking(true)?;
        // std listens with a backlog of 128; bursts of thousands of clients need more.
        // SAFETY: listen(2) on a socket we own.
        unsafe { libc::listen(listener.as_raw_fd(), 4096) };
        let local_addr = listener.local_addr()?;
        for reactor in reactors.iter() {
            reactor.add_listener(listener.as_raw_fd(), LISTENER)?;
        }

        let shared = Arc::new(Shared {
            pipeline,
            limits: Limits {
                max_request_line: s.max_request_line.get(),
                max_header_size: s.max_header_size.get(),
                max_headers: s.max_headers.get().into(),
                max_body_size: s.max_body_size,
            },
            header_timeout: s.header_timeout.0,
            keepalive_timeout: s.keepalive_timeout.0,
            write_timeout: s.write_timeout.0,
            max_connections: s.max_connections.get(),
            batch_workers: s.batch_workers,
            shutting_down: AtomicBool::new(false),
            reactors,
            backlogs: (0..homes).map(|_| CachePadded::default()).collect(),
            next_home: AtomicUsize::new(0),
            open: Arc::new(AtomicUsize::new(0)),
            workers: Workers::new(s.max_workers.get()),
            parked: Parked::new(homes),
            listener,
            pool,
        });
        let pins = match s.pin_workers {
            true => affinity::one_cpu_each(homes)?,
            false => None,
        };
        if s.pin_workers && pins.is_none() {
            log::info!("workers not pinned: pin_workers needs one per CPU this process may use, not {homes}");
        }
        for home in 0..homes {
            spawn_worker(&shared, home, false, pins.as_ref().map(|cpus| cpus[home]))?;
        }
        let housekeeper = shared.clone();
        thread::Builder::new()
            .name("housekeeping".into())
            .spawn(move || housekeeping(&housekeeper))?;

        let stages: Vec<String> = shared
            .pipeline
            .stages()
            .iter()
            .map(|st| format!("{}({})", st.name, st.priority))
            .collect();
        shared.pipeline.on_start(local_addr);
        let on_cpus = pins.map_or_else(String::new, |cpus| format!(" pinned to CPUs {cpus:?}"));
        log::info!(
            "listening on {local_addr}, forwarding to {} with {homes} workers{on_cpus}; pipeline: {}",
            s.backend_addr,
            stages.join(" → ")
        );
        Ok(Server {
            shared,
            local_addr,
            upstreams,
            services,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The upstream groups, for changing a server's state at run time.
    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// A handle a module published, such as `modules::cache::Cache`.
    pub fn service<T: std::any::Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.services.get()
    }

    /// Stops accepting, closes idle connections, and waits up to `timeout`
    /// for in-flight requests (their connections close after the response).
    pub fn shutdown(&self, timeout: Duration) {
        let shared = &self.shared;
        shared.shutting_down.store(true, Relaxed);
        for reactor in shared.reactors.iter() {
            let _ = reactor.remove(shared.listener.as_raw_fd());
        }
        // SAFETY: shutdown(2) on our listening socket: new connections are refused.
        unsafe { libc::shutdown(shared.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let deadline = Instant::now() + timeout;
        loop {
            drop(shared.parked.drain_clients());
            // Suspended first: a worker stamps itself busy before it takes
            // one, and the shard's lock makes that stamp visible here.
            let suspended = shared.parked.suspended();
            let busy = suspended + shared.workers.busy();
            if busy == 0 {
                log::info!("shutdown complete");
                return;
            }
            if Instant::now() >= deadline {
                log::warn!("shutdown_timeout passed with {busy} connection(s) still busy");
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Starts a worker on `home`, pinned to `cpu` if given: a home's first
/// worker may be; a helper (`extra`) never is.
fn spawn_worker(
    shared: &Arc<Shared>,
    home: usize,
    extra: bool,
    cpu: Option<usize>,
) -> io::Result<()> {
    let n = shared.workers.starting();
    let worker_shared = shared.clone();
    let spawned = thread::Builder::new()
        .name(format!("worker-{n}"))
        .stack_size(WORKER_STACK)
        .spawn(move || {
            if let Some(cpu) = cpu {
                if let Err(e) = affinity::pin_current_thread(cpu) {
                    log::warn!("worker-{n} not pinned to CPU {cpu}: {e}");
                }
            }
            if worker_shared.batch_workers {
                if let Err(e) = scheduling::batch_current_thread() {
                    log::warn!("worker-{n} not made SCHED_BATCH: {e}");
                }
            }
            worker(&worker_shared, home, extra)
        });
    if spawned.is_err() {
        shared.workers.not_started();
    }
    spawned.map(drop)
}

fn worker(shared: &Arc<Shared>, home: usize, extra: bool) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    let timeout = if extra { workers::EXTRA_IDLE_MS } else { -1 };
    let stamp = shared.workers.join(home);
    crate::pool::set_home(home);
    let reactor = &shared.reactors[home];
    let backlog = &shared.backlogs[home];
    let turn = Turn::new();
    let serve = |ready| {
        shared.workers.begin(&stamp);
        on_event(shared, home, ready, &turn);
        Workers::end(&stamp);
    };
    let mut idle = false;
    loop {
        if let Some(ready) = backlog.pop() {
            serve(ready);
            continue;
        }
        // A helper ends once its home has another worker free (two threads
        // would only take turns with its connections, and their state would
        // move between cores), or after idling; never with events left in
        // the backlog, which would not wake that worker from its wait.
        if extra && (idle || shared.workers.other_free(home, &stamp)) {
            shared.workers.leave(&stamp);
            return;
        }
        let events = &mut events;
        match turn.wait(move || reactor.wait(events, timeout)) {
            Ok(mut ready) => {
                idle = ready.len() == 0;
                if let Some(first) = ready.next() {
                    if ready.len() > 0 {
                        backlog.extend(ready);
                    }
                    serve(first);
                }
            }
            Err(e) => {
                log::error!("epoll_wait failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn on_event(shared: &Shared, home: usize, ready: Ready, turn: &Turn) {
    if ready.token == LISTENER {
        accept_pending(shared);
        return;
    }
    let Some(mut waiting) = shared.parked.take(ready) else {
        return; // expired, drained, or busy (then marked) between the event and now
    };
    loop {
        let client = waiting.conn().token;
        let resumed = !matches!(waiting, Waiting::Client(_));
        let next = catch_unwind(AssertUnwindSafe(|| match waiting {
            Waiting::Client(conn) => connection::serve(conn, shared),
            Waiting::Exchange(conn, suspended) => connection::resume(conn, suspended, shared),
            Waiting::TimedOut(conn, suspended, _signal) => {
                connection::time_out(conn, suspended, shared)
            }
        }));
        if resumed || matches!(next, Ok(Next::Suspend(..))) {
            turn.awaited();
        }
        let again = match next {
            Ok(next) => settle(shared, home, client, next),
            Err(_) => {
                log::error!("a connection handler panicked; connection closed, worker continues");
                shared.parked.close(client);
                None
            }
        };
        match again {
            Some(more) => waiting = more,
            None => break,
        }
    }
}

/// Puts a served connection where its `Next` says. Returns it instead when
/// it has more to do at once: bytes (or the end) may be left in its socket,
/// or an event came for it while it was busy (edge-triggered sockets report
/// each once).
fn settle(shared: &Shared, home: usize, client: u64, next: Next) -> Option<Waiting> {
    match next {
        Next::Park(conn, _) if !conn.buf.drained() || conn.hung_up => Some(Waiting::Client(conn)),
        Next::Park(conn, deadline) if !shared.shutting_down.load(Relaxed) => {
            shared.parked.park(conn, deadline)
        }
        // In flight: finishes even during shutdown.
        Next::Suspend(conn, suspended) => {
            shared
                .parked
                .suspend(conn, suspended, (home, &shared.reactors[home]))
        }
        Next::Park(..) | Next::Close => {
            shared.parked.close(client);
            None
        }
    }
}

/// Accepts every pending connection, giving each a home in turn: whichever
/// worker happens to accept (an idle one, usually), connections spread evenly
/// over the workers.
fn accept_pending(shared: &Shared) {
    loop {
        match shared.listener.accept() {
            Ok((stream, peer)) => {
                let home = shared.next_home.fetch_add(1, Relaxed) % shared.reactors.len();
                if let Err(e) = admit(shared, home, stream, peer) {
                    log::warn!("{peer}: cannot set up connection: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: leave the rest in the backlog for a moment.
                log::error!("accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
                break;
            }
        }
    }
}

fn admit(shared: &Shared, home: usize, stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_nodelay(true)?;
    // Every read and write of a client socket stops where the socket does:
    // a wait for the client is a wait in the event loop.
    stream.set_nonblocking(true)?;
    let slot = OpenSlot::claim(&shared.open, shared.max_connections);
    // Boxed once for its life: it moves between the worker's functions
    // and `Parked` a dozen times a request, as a pointer rather than 150 bytes.
    let conn = Box::new(Conn {
        stream,
        peer,
        buf: Default::default(),
        token: shared.parked.new_token(home),
        hung_up: false,
        head_deadline: None,
        slot,
        home,
        linger: None,
        owed: Default::default(),
    });
    // A new connection may stay silent for header_timeout.
    let deadline = Instant::now() + shared.header_timeout;
    shared.parked.admit(conn, deadline, &shared.reactors[home]);
    Ok(())
}

/// One of the `max_connections` places; given back when the connection drops.
pub struct OpenSlot(Arc<AtomicUsize>);

impl OpenSlot {
    fn claim(open: &Arc<AtomicUsize>, max: usize) -> Option<OpenSlot> {
        open.fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| OpenSlot(open.clone()))
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn housekeeping(shared: &Arc<Shared>) {
    let mut backlogs_seen = vec![Seen::default(); shared.reactors.len()];
    loop {
        thread::sleep(HOUSEKEEPING_TICK);
        let (tick, held) = shared.workers.held_homes(shared.reactors.len());
        for (home, seen) in backlogs_seen.iter_mut().enumerate() {
            // Looked at every tick, so that `seen` is a tick old.
            let stalled = shared.backlogs[home].stalled(seen);
            if !(held[home] || stalled) || !shared.workers.may_add() {
                continue;
            }
            if held[home] {
                log::debug!("every worker of home {home} held; starting a helper");
            } else {
                log::debug!("events of home {home} left untaken for a tick; starting a helper");
            }
            if let Err(e) = spawn_worker(shared, home, true, None) {
                log::error!("cannot start a worker: {e}");
            }
        }
        let now = Instant::now();
        let sweep = tick % SWEEP_EVERY == 0;
        if !sweep && !shared.parked.due(now) {
            continue;
        }
        for waiting in shared.parked.expired(now) {
            match waiting {
                Waiting::Client(conn) => conn.expire(),
                Waiting::Exchange(conn, suspended) => {
                    let home = &shared.reactors[conn.home];
                    shared.parked.time_out(conn, suspended, home)
                }
                Waiting::TimedOut(..) => unreachable!("expired() leaves hand-overs to the workers"),
            }
        }
        if sweep {
            shared.pool.evict_expired();
            crate::logging::flush();
        }
    }
}
