//! Forwards the request upstream over a pooled connection and streams the
//! response back, as an intermediary must (RFC 9110 §7.6): hop-by-hop fields
//! are dropped both ways, forwarding fields and Via are added, everything
//! else (order, repeats, the raw target) passes unchanged.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::http::body::{BodyError, BodyReader};
use crate::http::chunked::{encode_chunk_header, encode_last_chunk, CHUNK_END};
use crate::http::headers::list_items;
use crate::http::{ip_in, response, BodyKind, Headers, Request, ResponseHead, Version};
use crate::pipeline::{
    Body, BodyPart, BodyStream, BuildEnv, Context, Downstream, Flow, Module, PendingResponse, Response, Resumed, Timer, WaitOn,
};
use crate::upstream::retry::retry_after;
use crate::upstream::{Lease, Outcome};
use crate::pool::{Pool, PoolError, Pooled};
use crate::outbox::Outbox;
use crate::splice::SpliceError;
use crate::wait::Place;

/// Last: it answers every request that reaches it.
pub const PRIORITY: i32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Our name in the Via field (RFC 9110 §7.6.3).
    pub via: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            via: "proxycache".into(),
        }
    }
}

pub fn build(settings: &Settings, env: &BuildEnv) -> Result<Box<dyn Module>, String> {
    if settings.via.is_empty() || settings.via.bytes().any(|b| b.is_ascii_whitespace() || b == b',') {
        return Err(format!("via {:?} must be one token with no spaces or commas", settings.via));
    }
    Ok(Box::new(ProxyCore {
        backend: env.config.server.backend_addr,
        pool: env.pool.clone(),
        via: Arc::new(Via {
            http10: format!("1.0 {}", settings.via),
            http11: format!("1.1 {}", settings.via),
        }),
        max_head: env.config.server.max_header_size.get(),
        body_timeout: env.config.server.body_timeout.0,
    }))
}

struct ProxyCore {
    backend: SocketAddr,
    pool: Arc<Pool>,
    via: Arc<Via>,
    max_head: usize,
    body_timeout: Duration,
}

/// Why forwarding failed: the status the client gets and a reason for the log.
struct Failure {
    status: u16,
    reason: String,
    /// Nothing came back yet, so a retry cannot duplicate a response.
    before_response: bool,
    /// Its outcome is already on the lease.
    recorded: bool,
}

impl Failure {
    fn new(status: u16, reason: impl Into<String>) -> Failure {
        Failure {
            status,
            reason: reason.into(),
            before_response: false,
            recorded: false,
        }
    }

    fn upstream_io(action: &str, e: &io::Error, before_response: bool) -> Failure {
        let timed_out = matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
        Failure {
            before_response: before_response && !timed_out,
            ..Failure::new(
                if timed_out { 504 } else { 502 },
                format!("upstream {action} {}", if timed_out { "timed out".into() } else { e.to_string() }),
            )
        }
    }

    fn pool(e: PoolError) -> Failure {
        match e {
            PoolError::Exhausted => Failure::new(503, "upstream connection limit reached"),
            PoolError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                Failure::new(502, "upstream refused the connection")
            }
            PoolError::Connect(e) => Failure::upstream_io("connect", &e, false),
        }
    }

    /// The client's body failed: nothing to hold against the upstream, so
    /// nothing goes on the lease (passive health counts servers' failures).
    fn client(e: BodyError) -> Failure {
        let status = match &e {
            _ if e.is_timeout() => 408,
            BodyError::TooLarge => 413,
            BodyError::Malformed(_) | BodyError::Closed | BodyError::Io(_) => 400,
        };
        Failure {
            recorded: true,
            ..Failure::new(status, format!("request body: {e}"))
        }
    }
}

impl Module for ProxyCore {
    fn handle(&self, req: &mut Request, downstream: &mut Downstream, ctx: &mut Context) -> Flow {
        let addr = *ctx.upstream.get_or_insert(self.backend);
        let body = downstream.body_kind();
        let mut forward = Forward {
            head: self.upstream_head(req, body, ctx.client_addr),
            bodiless: body == BodyKind::Empty,
            phase: Phase::Idle,
            replay: false,
            pool: self.pool.clone(),
            addr,
            via: self.via.clone(),
            max_head: self.max_head,
            body_timeout: self.body_timeout,
            head_request: req.method == "HEAD",
            received_any: false,
        };
        match forward.send(req, downstream, ctx) {
            Ok(()) => Flow::Await(Box::new(forward)),
            Err(f) => match forward.failed(f, req, ctx) {
                Some(resp) => Flow::Respond(resp),
                None => Flow::Await(Box::new(forward)),
            },
        }
    }
}

/// Logs a failure with the request id and turns it into the client's answer.
fn answer(f: Failure, ctx: &Context, addr: SocketAddr) -> Response {
    log::warn!("{} upstream {addr}: {} → {}", ctx.request_id, f.reason, f.status);
    Response::text(f.status, &f.reason)
}

/// Notes an attempt's outcome on the request's lease, if a balancer gave one.
fn record(ctx: &mut Context, outcome: Outcome) {
    if let Some(lease) = ctx.get_mut::<Lease>() {
        lease.record(outcome);
    }
}

impl ProxyCore {
    /// The head we send upstream. Changes `req` to what was forwarded.
    fn upstream_head(&self, req: &mut Request, body: BodyKind, client: SocketAddr) -> Vec<u8> {
        let headers = &mut req.headers;
        // We answer Expect ourselves, when the body is first read; the
        // X-Forwarded fields below are ours to write.
        strip_hop_by_hop(headers, &["expect", "x-forwarded-proto", "x-forwarded-host"]);
        let mut ip = [0u8; 64];
        headers.add_to_list("X-Forwarded-For", ip_in(&mut ip, client.ip()));
        headers.append("X-Forwarded-Proto", "http");
        headers.append_copy("X-Forwarded-Host", "host");
        add_via(headers, req.version, &self.via);
        if body == BodyKind::Chunked {
            headers.append("Transfer-Encoding", "chunked");
        }

        let mut out = crate::spare::bytes(512);
        out.extend_from_slice(req.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(req.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        req.headers.write_to(&mut out);
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn add_via(headers: &mut Headers, received: Version, via: &Via) {
    let ours = match received {
        Version::Http10 => &via.http10,
        Version::Http11 => &via.http11,
    };
    headers.add_to_list("Via", ours.as_bytes());
}

/// Our Via entry for each protocol version we receive (RFC 9110 §7.6.3).
struct Via {
    http10: String,
    http11: String,
}

/// A request on its way upstream: its body being forwarded as the client
/// sends it, sent and awaiting the response head, or backing off before a
/// retry on another server.
struct Forward {
    head: Vec<u8>,
    /// No request body: the head alone can be sent again.
    bodiless: bool,
    phase: Phase,
    /// The connection was reused: if it fails before any response byte,
    /// once more on a new connection to the same server.
    replay: bool,
    pool: Arc<Pool>,
    addr: SocketAddr,
    via: Arc<Via>,
    max_head: usize,
    /// Longest wait for the client's next piece of body.
    body_timeout: Duration,
    head_request: bool,
    received_any: bool,
}

impl Drop for Forward {
    fn drop(&mut self) {
        crate::spare::give_back_bytes(std::mem::take(&mut self.head));
    }
}

enum Phase {
    Idle,
    /// In line for a connection at `max_conns_per_host`, until the
    /// deadline (the connect timeout).
    Queued(Place, Instant),
    /// A new connection opening, until the deadline (the connect timeout).
    Connecting(Pooled, Instant),
    /// The head is on its way; the body follows as it arrives from the
    /// client. What the upstream had no room for waits in `outbox`, and
    /// goes before anything more; `body_taken`: all of the body is in it
    /// or upstream.
    Sending {
        conn: Pooled,
        outbox: Outbox,
        body_taken: bool,
    },
    Waiting(Pooled),
    Backoff(Timer),
}

impl PendingResponse for Forward {
    fn wait_on(&self) -> WaitOn {
        match &self.phase {
            Phase::Connecting(conn, _) | Phase::Waiting(conn) => WaitOn::Pooled {
                fd: conn.stream().as_raw_fd(),
                home: conn.home(),
            },
            Phase::Sending { conn, outbox, .. } if !outbox.is_empty() => WaitOn::Pooled {
                fd: conn.stream().as_raw_fd(),
                home: conn.home(),
            },
            Phase::Sending { conn, .. } => WaitOn::ClientOrPooled {
                fd: conn.stream().as_raw_fd(),
                home: conn.home(),
            },
            Phase::Backoff(timer) => WaitOn::Fd(timer.fd()),
            Phase::Queued(place, _) => WaitOn::Fd(place.fd()),
            Phase::Idle => unreachable!("awaited only when queued, connecting, sending, sent or backing off"),
        }
    }

    fn timeout(&self) -> Duration {
        match self.phase {
            Phase::Queued(_, by) | Phase::Connecting(_, by) => by.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
            Phase::Sending { ref outbox, .. } if !outbox.is_empty() => self.pool.limits().write_timeout,
            Phase::Sending { .. } => self.body_timeout,
            _ => self.pool.limits().read_timeout,
        }
    }

    fn poll(&mut self, req: &Request, client: &mut Downstream, ctx: &mut Context) -> Option<Resumed> {
        let step = match self.phase {
            Phase::Backoff(_) | Phase::Queued(..) => self.send(req, client, ctx).map(|()| None),
            Phase::Connecting(..) => {
                let Phase::Connecting(conn, by) = std::mem::replace(&mut self.phase, Phase::Idle) else {
                    unreachable!("matched just above")
                };
                self.when_open(conn, by, req, client, ctx).map(|()| None)
            }
            Phase::Sending { .. } => match self.send_body(client) {
                Ok(true) => self.progress(req, client, ctx),
                sent => sent.map(|_| None),
            },
            _ => self.progress(req, client, ctx),
        };
        match step {
            Ok(None) => None,
            Ok(Some(resp)) => Some(Resumed::Respond(resp)),
            Err(f) => self.failed(f, req, ctx).map(Resumed::Respond),
        }
    }

    fn timed_out(mut self: Box<Self>, req: &Request, ctx: &mut Context) -> Resumed {
        match self.phase {
            Phase::Sending { ref outbox, .. } if !outbox.is_empty() => {
                record(ctx, Outcome::Failed);
                return Resumed::Respond(answer(Failure::new(504, "upstream write timed out"), ctx, self.addr));
            }
            // The client's fault: the upstream connection, mid-request, closes.
            Phase::Sending { .. } => {
                return Resumed::Respond(answer(Failure::new(408, "request body timed out"), ctx, self.addr));
            }
            // Nothing was sent: another server may take it. Our own
            // connection limit says nothing about the server's health.
            Phase::Queued(..) | Phase::Connecting(..) => {
                let f = if let Phase::Queued(..) = self.phase {
                    Failure::pool(PoolError::Exhausted)
                } else {
                    record(ctx, Outcome::Failed);
                    Failure::new(504, "upstream connect timed out")
                };
                return match self.retry_or_answer(f, req, ctx) {
                    None => Resumed::Await(self),
                    Some(resp) => Resumed::Respond(resp),
                };
            }
            _ => {}
        }
        // Not retried: the request may still be in progress upstream.
        record(ctx, Outcome::Failed);
        Resumed::Respond(answer(Failure::new(504, "upstream read timed out"), ctx, self.addr))
    }
}

impl Forward {
    /// Connects (moving on to another server at once when a connection
    /// cannot be opened: nothing reached the first) and sends the request.
    fn send(&mut self, req: &Request, downstream: &mut Downstream, ctx: &mut Context) -> Result<(), Failure> {
        // Woken in line: the same connect timeout bounds the whole wait.
        let (mut place, mut queued_until) = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Queued(place, until) => (Some(place), Some(until)),
            _ => (None, None),
        };
        // A request that can be sent twice is, on a fresh connection, if a
        // reused one turns out closed: no need to peek at it first.
        let replayable = req.is_idempotent() && self.bodiless;
        let conn = loop {
            let checkout = match replayable {
                true => self.pool.checkout_unchecked(self.addr),
                false => self.pool.checkout(self.addr),
            };
            match checkout {
                Ok(conn) => {
                    if let Some(mut place) = place {
                        place.served();
                    }
                    break conn;
                }
                // The deadline is set by the first refusal, not read per checkout.
                Err(PoolError::Exhausted) if Instant::now() < *queued_until.get_or_insert_with(|| self.connect_deadline()) => match place.take() {
                    Some(place) => {
                        place.wait_again();
                        self.phase = Phase::Queued(place, queued_until.expect("set by the guard"));
                        return Ok(());
                    }
                    None => {
                        let joined = self.pool.wait_turn(self.addr);
                        place = Some(joined.map_err(|e| Failure::new(503, format!("cannot wait for a connection: {e}")))?);
                    }
                },
                Err(e) => {
                    // Our own connection limit says nothing about the server's health.
                    if !matches!(e, PoolError::Exhausted) {
                        record(ctx, Outcome::Failed);
                    }
                    self.move_on(Failure::pool(e), req, ctx)?;
                    (place, queued_until) = (None, None);
                }
            }
        };
        self.replay = conn.reused && replayable;
        self.when_open(conn, self.connect_deadline(), req, downstream, ctx)
    }

    fn connect_deadline(&self) -> Instant {
        Instant::now() + self.pool.limits().connect_timeout
    }

    /// Sends the request on `conn` once it is open; until then (a new
    /// connection's handshake) waits for it, up to `connect_by`.
    fn when_open(
        &mut self,
        mut conn: Pooled,
        connect_by: Instant,
        req: &Request,
        downstream: &mut Downstream,
        ctx: &mut Context,
    ) -> Result<(), Failure> {
        match conn.connected() {
            Ok(true) => self.write_request(conn, req, downstream, ctx),
            Ok(false) => {
                self.phase = Phase::Connecting(conn, connect_by);
                Ok(())
            }
            Err(e) => {
                drop(conn);
                record(ctx, Outcome::Failed);
                self.move_on(Failure::pool(PoolError::Connect(e)), req, ctx)?;
                self.send(req, downstream, ctx)
            }
        }
    }

    /// Writes the head on an open connection (once more on a new one if a
    /// reused one turns out closed), then the body as it arrives.
    fn write_request(&mut self, conn: Pooled, req: &Request, downstream: &mut Downstream, ctx: &mut Context) -> Result<(), Failure> {
        let mut outbox = Outbox::default();
        let written = outbox.send(conn.stream(), &self.head).map_err(|e| Failure::upstream_io("write", &e, true));
        if let Err(f) = written {
            if !(f.before_response && self.replay) {
                return Err(f);
            }
            log::debug!("{} reused connection to {} failed ({}); retrying", ctx.request_id, self.addr, f.reason);
            self.replay = false;
            let fresh = self.pool.checkout_fresh(self.addr).map_err(Failure::pool)?;
            return self.when_open(fresh, self.connect_deadline(), req, downstream, ctx);
        }
        self.received_any = false;
        self.phase = Phase::Sending {
            conn,
            outbox,
            body_taken: false,
        };
        // What the upstream may have said already wakes the wait at once.
        self.send_body(downstream).map(drop)
    }

    /// After `f`, on to another server if the lease allows one; else `f` stands.
    fn move_on(&mut self, f: Failure, req: &Request, ctx: &mut Context) -> Result<(), Failure> {
        let Some(next) = next_server(ctx, req) else {
            return Err(Failure { recorded: true, ..f });
        };
        log::debug!("{} upstream {}: {}; trying {next}", ctx.request_id, self.addr, f.reason);
        self.addr = next;
        Ok(())
    }

    /// Sends what waits in the outbox, forwards what has arrived of the
    /// request body, and once all of it is sent, waits for the response.
    /// Neither a client that sends its body slowly nor an upstream slow to
    /// read it holds a worker meanwhile. True if the upstream has sent
    /// something before it has the whole body: read it now (see `respond`).
    fn send_body(&mut self, downstream: &mut Downstream) -> Result<bool, Failure> {
        let Phase::Sending {
            conn,
            mut outbox,
            mut body_taken,
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            unreachable!("sends a body only after the head")
        };
        let upstream = conn.stream();
        let flushed = outbox.flush(upstream).map_err(|e| Failure::upstream_io("write", &e, false))?;
        if flushed && !body_taken {
            body_taken = matches!(forward_body(downstream, upstream, &mut outbox)?, BodyPart::End);
        }
        let sent = body_taken && outbox.is_empty();
        // An upstream may answer before it has the whole body (413, say),
        // and stop reading: that answer goes to the client now, not a 504
        // once the write times out, nor once the client has sent all (RFC
        // 9112 §9.5 has clients watch for it). A 1xx is no answer: the body
        // goes on.
        let spoken = !sent && conn.has_spoken();
        self.phase = match sent {
            true => Phase::Waiting(conn),
            false => Phase::Sending {
                conn,
                outbox,
                body_taken,
            },
        };
        Ok(spoken)
    }

    /// After a failed attempt: back off, then retry on another server if the
    /// request can be sent again; otherwise the client's answer.
    fn failed(&mut self, f: Failure, req: &Request, ctx: &mut Context) -> Option<Response> {
        if !f.recorded {
            record(ctx, Outcome::Failed);
        }
        if self.bodiless && f.before_response {
            return self.retry_or_answer(f, req, ctx);
        }
        self.phase = Phase::Idle;
        Some(answer(f, ctx, self.addr))
    }

    /// Backs off before another server if the lease allows one (`None`:
    /// wait for the timer); otherwise the client's answer for `f`.
    fn retry_or_answer(&mut self, f: Failure, req: &Request, ctx: &mut Context) -> Option<Response> {
        match self.back_off(req, ctx, &f.reason) {
            Retry::BackingOff => None,
            Retry::Failed(resp) => Some(resp),
            Retry::NotAllowed => {
                self.phase = Phase::Idle;
                Some(answer(f, ctx, self.addr))
            }
        }
    }

    /// Moves the lease to another server and arms the backoff timer.
    fn back_off(&mut self, req: &Request, ctx: &mut Context, why: &str) -> Retry {
        let previous = self.addr;
        let Some(next) = next_server(ctx, req) else {
            return Retry::NotAllowed;
        };
        let lease = ctx.get_mut::<Lease>().expect("a retry needs a lease");
        let delay = lease.group().retry.backoff(lease.retries());
        log::info!("{} upstream {previous}: {why}; retrying on {next} in {delay:?}", ctx.request_id);
        self.addr = next;
        match Timer::new(delay) {
            Ok(timer) => {
                self.phase = Phase::Backoff(timer);
                Retry::BackingOff
            }
            Err(e) => Retry::Failed(answer(Failure::new(502, format!("cannot wait to retry: {e}")), ctx, next)),
        }
    }

    /// Reads what arrived; the response once its head is complete.
    fn progress(&mut self, req: &Request, client: &mut Downstream, ctx: &mut Context) -> Result<Option<Response>, Failure> {
        match self.read_head(client) {
            Ok(None) => Ok(None),
            Ok(Some((head, kind))) => {
                record(ctx, Outcome::Status(head.status));
                if self.bodiless && self.retries_status(&head, ctx) {
                    match self.back_off(req, ctx, &format!("status {}", head.status)) {
                        Retry::BackingOff => return Ok(None),
                        Retry::Failed(resp) => return Ok(Some(resp)),
                        Retry::NotAllowed => {}
                    }
                }
                Ok(Some(self.respond(head, kind)))
            }
            Err(f) if f.before_response && self.replay => {
                self.replay = false;
                log::debug!("{} reused connection to {} closed; retrying", ctx.request_id, self.addr);
                let conn = self.pool.checkout_fresh(self.addr).map_err(Failure::pool)?;
                self.when_open(conn, self.connect_deadline(), req, client, ctx)?;
                Ok(None)
            }
            Err(f) => Err(f),
        }
    }

    /// Whether the lease's group retries this status; a Retry-After it
    /// carries keeps the server out of rotation that long.
    fn retries_status(&self, head: &ResponseHead, ctx: &mut Context) -> bool {
        let Some(lease) = ctx.get_mut::<Lease>() else { return false };
        if !lease.group().retry.retries_status(head.status) {
            return false;
        }
        if let Some(hold) = head.headers.get("retry-after").and_then(retry_after) {
            lease.server().hold_for(hold.min(MAX_RETRY_AFTER));
        }
        true
    }

    /// Reads what has arrived (without waiting: the wake-up may be spurious)
    /// and parses as much of the head as that completes, until the socket
    /// has nothing more (edge-triggered: only bytes still to come, or the
    /// end, will be reported; an end already here is found by reading on).
    /// 1xx responses go on to the client.
    fn read_head(&mut self, client: &mut Downstream) -> Result<Option<(ResponseHead, BodyKind)>, Failure> {
        let (Phase::Waiting(conn) | Phase::Sending { conn, .. }) = &mut self.phase else {
            unreachable!("read only once the head is sent")
        };
        let up = conn.conn();
        loop {
            match up.buf.read_ready(&up.stream) {
                Ok(0) => {
                    return Err(Failure {
                        before_response: !self.received_any,
                        ..Failure::new(502, "upstream closed the connection without a response")
                    })
                }
                Ok(_) => self.received_any = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::upstream_io("read", &e, !self.received_any)),
            }
            while let Some((head, len)) = response::parse(up.buf.filled(), self.max_head).map_err(|e| Failure::new(502, e.reason))? {
                up.buf.consume(len);
                if head.status == 101 {
                    return Err(Failure::new(502, "upstream switched protocols unasked"));
                }
                if !head.is_informational() {
                    let kind = response::body_kind(&head, self.head_request).map_err(|e| Failure::new(502, e.reason))?;
                    return Ok(Some((head, kind)));
                }
                let mut interim = head;
                strip_hop_by_hop(&mut interim.headers, &[]);
                client
                    .send_interim(&interim)
                    .map_err(|e| Failure::new(502, format!("client write failed: {e}")))?;
            }
        }
    }

    /// The response as the client gets it, its body read straight off the upstream.
    fn respond(&mut self, mut head: ResponseHead, kind: BodyKind) -> Response {
        let (conn, body_sent) = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Waiting(conn) => (conn, true),
            // Answered before it had the whole body, it still expects the rest.
            Phase::Sending { conn, .. } => (conn, false),
            _ => unreachable!("a response comes only once the head is sent"),
        };
        let reusable = body_sent && head.keep_alive() && kind != BodyKind::UntilClose;
        strip_hop_by_hop(&mut head.headers, &[]);
        add_via(&mut head.headers, head.version, &self.via);
        let body = match kind {
            BodyKind::Empty => {
                if reusable {
                    conn.release();
                }
                Body::Empty
            }
            _ => Body::Stream(Box::new(UpstreamBody {
                conn: Some(conn),
                reader: BodyReader::new(kind, 0),
                length: match kind {
                    BodyKind::Length(n) => Some(n),
                    _ => None,
                },
                reusable,
                timeout: self.pool.limits().read_timeout,
            })),
        };
        Response { head, body }
    }
}

/// What came of trying to retry a failed attempt.
enum Retry {
    /// On another server, once the backoff timer fires.
    BackingOff,
    /// Policy, budget or servers allow none: the failure stands.
    NotAllowed,
    Failed(Response),
}

/// A Retry-After longer than this is held to it: the server may recover sooner.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Another server for a retry, when the request has a lease that allows one.
fn next_server(ctx: &mut Context, req: &Request) -> Option<SocketAddr> {
    let next = ctx.get_mut::<Lease>()?.retry(&req.method)?;
    ctx.upstream = Some(next);
    Some(next)
}

/// Streams what has arrived of the request body upstream, re-framing
/// chunked bodies: `End` once all of it is taken (sent, or in `outbox`),
/// `NotYet` if the client has more to send or the upstream no room (then
/// `outbox` holds bytes). Past the bytes already buffered, a fixed-length
/// body is spliced.
fn forward_body(downstream: &mut Downstream, upstream: &TcpStream, outbox: &mut Outbox) -> Result<BodyPart<'static>, Failure> {
    let chunked = downstream.body_kind() == BodyKind::Chunked;
    let mut frame = Vec::new();
    let write_failed = |e: io::Error| Failure::upstream_io("write", &e, false);
    loop {
        if !outbox.is_empty() {
            return Ok(BodyPart::NotYet);
        }
        match downstream.splice_body(upstream, outbox.spliced()) {
            Ok(None) => {}
            Ok(Some(progress)) => return Ok(progress),
            Err(SpliceError::From(e)) => return Err(Failure::client(e.into())),
            Err(SpliceError::To(e)) => return Err(write_failed(e)),
        }
        match downstream.read_body().map_err(Failure::client)? {
            BodyPart::NotYet => return Ok(BodyPart::NotYet),
            BodyPart::End => break,
            BodyPart::Data(data) if chunked => {
                frame.clear();
                encode_chunk_header(&mut frame, data.len());
                frame.extend_from_slice(data);
                frame.extend_from_slice(CHUNK_END);
                outbox.send(upstream, &frame).map_err(write_failed)?;
            }
            BodyPart::Data(data) => outbox.send(upstream, data).map_err(write_failed)?,
        }
    }
    if chunked {
        frame.clear();
        encode_last_chunk(&mut frame, downstream.trailers());
        outbox.send(upstream, &frame).map_err(write_failed)?;
    }
    Ok(BodyPart::End)
}

/// Fields meant for one connection only (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 6] = ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade"];

fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Drops the hop-by-hop fields, those the Connection field names, and `also`.
/// One pass, unless Connection names fields beyond the usual (rare).
fn strip_hop_by_hop(headers: &mut Headers, also: &[&str]) {
    let mut listed: Vec<Vec<u8>> = Vec::new();
    headers.retain(|name, value| {
        if name.eq_ignore_ascii_case(b"connection") {
            let unusual = list_items(value).filter(|token| !token.eq_ignore_ascii_case(b"close") && !is_hop_by_hop(token));
            listed.extend(unusual.map(<[u8]>::to_vec));
        }
        !is_hop_by_hop(name) && !also.iter().any(|a| name.eq_ignore_ascii_case(a.as_bytes()))
    });
    if !listed.is_empty() {
        headers.retain(|name, _| !listed.iter().any(|l| name.eq_ignore_ascii_case(l)));
    }
}

/// An upstream response body, read straight off the pooled connection as
/// it arrives.
struct UpstreamBody {
    conn: Option<Pooled>,
    reader: BodyReader,
    length: Option<u64>,
    /// The upstream keeps the connection open after this body.
    reusable: bool,
    /// Longest wait for the next piece (the upstream's read timeout).
    timeout: Duration,
}

impl BodyStream for UpstreamBody {
    fn length(&self) -> Option<u64> {
        self.length
    }

    fn next_chunk(&mut self) -> Result<BodyPart<'_>, BodyError> {
        let up = self.conn.as_mut().expect("held until dropped").conn();
        self.reader.next_arrived(&up.stream, &mut up.buf)
    }

    fn wait_on(&self) -> WaitOn {
        let conn = self.conn.as_ref().expect("held until dropped");
        WaitOn::Pooled {
            fd: conn.stream().as_raw_fd(),
            home: conn.home(),
        }
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn trailers(&self) -> &[u8] {
        self.reader.trailers()
    }
}

impl Drop for UpstreamBody {
    /// Back to the pool only if the body was read to its end; otherwise the
    /// connection is mid-message and closes.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.reusable && self.reader.is_done() {
                conn.release();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_hop_by_hop;

    #[test]
    fn hop_by_hop_names_in_any_case_and_nothing_else() {
        for name in ["Connection", "keep-alive", "PROXY-CONNECTION", "TE", "Transfer-Encoding", "upgrade"] {
            assert!(is_hop_by_hop(name.as_bytes()), "{name}");
        }
        for name in ["tee", "t", "connections", "keep-alivf", "x-upgrade", "content-length", "transfer-encodinG2", ""] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
    }
}
