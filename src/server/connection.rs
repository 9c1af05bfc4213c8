//! One client connection: parse each request head, run the pipeline, write
//! the response, and decide whether the connection goes on.
//!
//! A worker serves a connection only while it can make progress. When the
//! next head has not (fully) arrived it parks the connection; when a module
//! awaits an upstream response, or more of the request body, it suspends
//! the exchange. Either way the worker moves on, so neither idle or slow
//! clients nor slow upstreams hold a thread.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::downstream::{Downstream, RequestBody};
use super::outgoing::{send_some, Hooks, Outgoing, Progress};
use super::{OpenSlot, Shared};
use crate::http::{request, Framing, HttpError, ReadBuf, Request};
use crate::logging::AccessRecord;
use crate::outbox::Outbox;
use crate::pipeline::{Body, Context, Handled, PendingResponse, Response, Resumed, WaitOn};

pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub buf: ReadBuf,
    pub token: u64,
    /// The client closed its side: what is buffered is all there will be.
    pub hung_up: bool,
    /// Set while a request head is arriving: past it the client gets 408.
    pub head_deadline: Option<Instant>,
    /// Its place within `max_connections`; `None` when accepted beyond it,
    /// to be answered 503 and closed.
    pub slot: Option<OpenSlot>,
    /// The worker's epoll set it was accepted into, and stays in.
    pub home: usize,
    /// Set once the connection is answered and closing with input unread.
    pub linger: Option<Linger>,
    /// Bytes its socket had no room for yet (an interim or error
    /// response), to go out before any others. Never waited for: a client
    /// that reads nothing must not hold a worker.
    pub owed: Outbox,
}

/// Closing a socket with unread input sends RST, and an RST can make the
/// client drop our response before reading it. So a connection answered
/// before its request was read whole stops writing (once what it owes is
/// written), then reads and drops what the client still sends, until it
/// closes, for a bounded time and amount; it waits for those bytes parked,
/// like any other connection.
pub struct Linger {
    until: Instant,
    left: usize,
}

/// How long, and how much, a closing connection reads and drops.
const LINGER_TIME: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;

impl Conn {
    /// Gives up on a parked connection whose deadline passed.
    pub fn expire(self) {
        if self.head_deadline.is_some() && self.linger.is_none() {
            log::info!("{}: request head not received in time", self.peer);
            // Best effort and never waiting: the housekeeping thread calls this.
            let timed_out = HttpError::new(408, "request head not received in time");
            let _ = send_some(&self.stream, &error_response(timed_out));
        }
    }
}

/// A request between its head and its response.
struct Exchange {
    req: Request,
    /// How the request is framed, for the stages still to run; its
    /// `keep_alive` is what the request asked (the response may still close).
    framing: Framing,
    /// A body left unread leaves no way to find the next request.
    body: RequestBody,
    ctx: Context,
    /// Pipeline stages whose `handle` ran.
    ran: usize,
}

/// An exchange waiting: for a stage's pending response, or with its
/// response part written.
pub struct Suspended {
    exchange: Exchange,
    awaiting: Awaiting,
    pub deadline: Instant,
}

enum Awaiting {
    /// A stage's pending response (an upstream's, typically).
    Stage(Box<dyn PendingResponse>),
    /// The rest of the response: room in a slow reader's socket, or the
    /// next piece of its body (on what it waits on).
    Response(Box<Outgoing>, WaitOn),
}

impl Suspended {
    fn new(exchange: Exchange, awaiting: Awaiting, timeout: Duration) -> Box<Suspended> {
        Box::new(Suspended {
            exchange,
            awaiting,
            deadline: Instant::now() + timeout,
        })
    }

    pub fn wait_on(&self) -> WaitOn {
        match &self.awaiting {
            Awaiting::Stage(pending) => pending.wait_on(),
            Awaiting::Response(_, wait_on) => *wait_on,
        }
    }
}

/// What became of a connection after a worker served it.
pub enum Next {
    /// Wait for more bytes from the client, until the deadline.
    Park(Box<Conn>, Instant),
    /// Wait for what the exchange awaits.
    Suspend(Box<Conn>, Box<Suspended>),
    Close,
}

/// `Ok(keep_alive)` once a response is written, `Err` while the exchange waits.
type Outcome = Result<bool, Box<Suspended>>;

/// Serves a connection that epoll reported ready (perhaps spuriously:
/// the read does not wait).
pub fn serve(mut conn: Box<Conn>, shared: &Shared) -> Next {
    if conn.linger.is_some() {
        return drain(conn);
    }
    match conn.buf.read_ready(&conn.stream) {
        Ok(0) => Next::Close,
        Ok(_) => drive(conn, shared),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => park(conn, shared),
        Err(_) => Next::Close,
    }
}

/// Serves every request already buffered.
fn drive(mut conn: Box<Conn>, shared: &Shared) -> Next {
    loop {
        if conn.head_deadline.is_some_and(|d| d <= Instant::now()) {
            conn.expire();
            return Next::Close;
        }
        let (req, framing, len) = match request::parse(conn.buf.filled(), &shared.limits) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => {
                let now = Instant::now();
                conn.head_deadline
                    .get_or_insert(now + shared.header_timeout);
                return park(conn, shared);
            }
            Err(e) => {
                log::info!("{}: bad request: {e}", conn.peer);
                return reject(conn, e, shared.write_timeout);
            }
        };
        conn.buf.consume(len);
        conn.head_deadline = None;
        if conn.slot.is_none() {
            log::warn!("{}: over max_connections, answered 503", conn.peer);
            return reject(
                conn,
                HttpError::new(503, "too many connections"),
                shared.write_timeout,
            );
        }
        match start(&mut conn, req, framing, shared) {
            // Pipelined: the next head is already (partly) here.
            Ok(true) if !conn.buf.is_empty() && !shared.shutting_down.load(Relaxed) => {}
            outcome => return after(conn, outcome, shared),
        }
    }
}

/// Where a connection goes once an exchange has stopped: on to the next
/// pipelined request, parked, closed, or suspended with its exchange.
fn after(conn: Box<Conn>, outcome: Outcome, shared: &Shared) -> Next {
    match outcome {
        Ok(_) if conn.linger.is_some() => drain(conn),
        Ok(keep_alive) if !keep_alive || shared.shutting_down.load(Relaxed) => Next::Close,
        Ok(_) if conn.buf.is_empty() => park(conn, shared),
        Ok(_) => drive(conn, shared),
        Err(suspended) => suspend(conn, suspended),
    }
}

fn park(mut conn: Box<Conn>, shared: &Shared) -> Next {
    // Idle, or a head arriving slowly: either way only its bytes so far are kept.
    conn.buf.release();
    let deadline = conn
        .head_deadline
        .unwrap_or_else(|| Instant::now() + shared.keepalive_timeout);
    Next::Park(conn, deadline)
}

/// Starts the request phase of a new request.
fn start(conn: &mut Conn, req: Request, framing: Framing, shared: &Shared) -> Outcome {
    let exchange = Exchange {
        framing,
        body: RequestBody::new(framing, shared.limits.max_body_size),
        ctx: Context::new(conn.peer),
        req,
        ran: 0,
    };
    run(conn, exchange, shared)
}

/// Runs the request phase on from the stage the exchange stands at.
fn run(conn: &mut Conn, mut ex: Exchange, shared: &Shared) -> Outcome {
    let mut downstream = Downstream::new(conn, &mut ex.body, ex.req.version);
    let (handled, ran) = shared
        .pipeline
        .handle(ex.ran, &mut ex.req, &mut downstream, &mut ex.ctx);
    ex.ran = ran;
    match handled {
        Handled::Respond(resp) => finish(conn, ex, resp, shared),
        Handled::Await(pending) => Err(await_stage(ex, pending)),
    }
}

/// Suspends an exchange on a stage's pending response.
fn await_stage(ex: Exchange, pending: Box<dyn PendingResponse>) -> Box<Suspended> {
    let timeout = pending.timeout();
    Suspended::new(ex, Awaiting::Stage(pending), timeout)
}

fn suspend(mut conn: Box<Conn>, suspended: Box<Suspended>) -> Next {
    // Waiting may take long and thousands may wait at once: only the
    // unread bytes (a pipelined request) are kept meanwhile.
    conn.buf.release();
    Next::Suspend(conn, suspended)
}

/// Continues an exchange whose awaited socket became ready.
pub fn resume(mut conn: Box<Conn>, mut suspended: Box<Suspended>, shared: &Shared) -> Next {
    let pending = match &mut suspended.awaiting {
        Awaiting::Stage(pending) => pending,
        Awaiting::Response(..) => {
            let Suspended {
                exchange,
                awaiting: Awaiting::Response(outgoing, _),
                ..
            } = *suspended
            else {
                unreachable!("matched just above")
            };
            let outcome = deliver(&mut conn, exchange, *outgoing, shared);
            return after(conn, outcome, shared);
        }
    };
    let exchange = &mut suspended.exchange;
    let mut downstream = Downstream::new(&mut conn, &mut exchange.body, exchange.req.version);
    let polled = shared.pipeline.poll(
        exchange.ran,
        pending.as_mut(),
        &exchange.req,
        &mut downstream,
        &mut exchange.ctx,
    );
    match polled {
        None => {
            suspended.deadline = Instant::now() + pending.timeout();
            Next::Suspend(conn, suspended)
        }
        Some(resumed) => proceed(conn, suspended.exchange, resumed, shared),
    }
}

/// The wait ran past its timeout: the awaiting module decides what follows;
/// a response cut short (its client read nothing for `write_timeout`, or its
/// upstream sent nothing for `read_timeout`) ends the connection.
pub fn time_out(mut conn: Box<Conn>, suspended: Box<Suspended>, shared: &Shared) -> Next {
    let Suspended {
        mut exchange,
        awaiting,
        ..
    } = *suspended;
    match awaiting {
        Awaiting::Stage(pending) => {
            let resumed = pending.timed_out(&exchange.req, &mut exchange.ctx);
            if matches!(resumed, Resumed::Respond(_)) {
                exchange.framing.keep_alive = false;
            }
            proceed(conn, exchange, resumed, shared)
        }
        Awaiting::Response(outgoing, wait_on) => {
            let why = match wait_on {
                WaitOn::Client => "client write timed out",
                _ => "upstream body timed out",
            };
            let timed_out = Err(io::Error::other(why));
            complete(
                &mut conn,
                &exchange,
                (outgoing.status, outgoing.bytes),
                timed_out,
            );
            Next::Close
        }
    }
}

/// Carries an exchange on once its wait is over.
fn proceed(mut conn: Box<Conn>, exchange: Exchange, resumed: Resumed, shared: &Shared) -> Next {
    let outcome = match resumed {
        Resumed::Respond(resp) => finish(&mut conn, exchange, resp, shared),
        Resumed::Continue => run(&mut conn, exchange, shared),
        Resumed::Await(pending) => Err(await_stage(exchange, pending)),
    };
    after(conn, outcome, shared)
}

/// The response phase: modules, then the wire, then the access log.
fn finish(conn: &mut Conn, mut ex: Exchange, mut resp: Response, shared: &Shared) -> Outcome {
    shared
        .pipeline
        .on_response(ex.ran, &ex.req, &mut resp, &mut ex.ctx);
    let keep_alive =
        ex.framing.keep_alive && ex.body.is_done() && !shared.shutting_down.load(Relaxed);
    let status = resp.head.status;
    let mut hooks = Hooks {
        pipeline: &shared.pipeline,
        ran: ex.ran,
        ctx: &mut ex.ctx,
    };
    match Outgoing::new(&ex.req, resp, keep_alive, &mut hooks, conn.owed.take()) {
        Ok(outgoing) => deliver(conn, ex, outgoing, shared),
        Err(e) => Ok(complete(conn, &ex, (status, 0), Err(e))),
    }
}

/// Writes what the client's socket takes of a response, as far as its body
/// has arrived; waits for the rest.
fn deliver(conn: &mut Conn, mut ex: Exchange, mut outgoing: Outgoing, shared: &Shared) -> Outcome {
    let mut hooks = Hooks {
        pipeline: &shared.pipeline,
        ran: ex.ran,
        ctx: &mut ex.ctx,
    };
    let written = match outgoing.write(&conn.stream, &mut hooks, shared.write_timeout) {
        Ok(Progress::Waits(wait_on, timeout)) => {
            // Boxed only now: most responses go out whole at once.
            let awaiting = Awaiting::Response(Box::new(outgoing), wait_on);
            return Err(Suspended::new(ex, awaiting, timeout));
        }
        Ok(Progress::Done) => Ok(outgoing.keep_alive),
        Err(e) => Err(e),
    };
    Ok(complete(
        conn,
        &ex,
        (outgoing.status, outgoing.bytes),
        written,
    ))
}

/// Logs the exchange once its response (`status`, body `bytes`) is written
/// or failed; returns whether the connection may go on.
fn complete(
    conn: &mut Conn,
    ex: &Exchange,
    (status, bytes): (u16, u64),
    written: io::Result<bool>,
) -> bool {
    crate::logging::access(&AccessRecord {
        client: conn.peer,
        method: &ex.req.method,
        target: &ex.req.target,
        status,
        bytes,
        started: ex.ctx.started,
        upstream: ex.ctx.upstream,
        request_id: &ex.ctx.request_id,
    });
    if !ex.body.is_done() {
        start_lingering(conn);
    }
    match written {
        Ok(keep_alive) => keep_alive,
        Err(e) => {
            log::info!(
                "{} {}: response not completed: {e}",
                ex.ctx.request_id,
                conn.peer
            );
            false
        }
    }
}

/// Answers a refused request and closes gently, giving the client up to
/// `write_timeout` to make room for the answer.
fn reject(mut conn: Box<Conn>, error: HttpError, write_timeout: Duration) -> Next {
    if conn
        .owed
        .send(&conn.stream, &error_response(error))
        .is_err()
    {
        return Next::Close;
    }
    if conn.owed.is_empty() {
        start_lingering(&mut conn);
    } else {
        // `drain` sends the rest as room appears, then lingers.
        conn.head_deadline = None;
        conn.linger = Some(Linger {
            until: Instant::now() + write_timeout,
            left: LINGER_BYTES,
        });
    }
    drain(conn)
}

/// An error response with `Connection: close`.
fn error_response(error: HttpError) -> Vec<u8> {
    let resp = Response::text(error.status, error.reason);
    let Body::Bytes(body) = resp.body else {
        unreachable!("text responses carry bytes")
    };
    let mut head = resp.head;
    head.headers
        .append("Content-Length", body.len().to_string());
    head.headers.append("Connection", "close");
    let mut out = Vec::with_capacity(256 + body.len());
    head.write_to(&mut out);
    out.extend_from_slice(&body);
    out
}

/// Stops writing to a connection answered with input still unread; see [`Linger`].
fn start_lingering(conn: &mut Conn) {
    let _ = conn.stream.shutdown(Shutdown::Write);
    conn.head_deadline = None;
    conn.linger = Some(Linger {
        until: Instant::now() + LINGER_TIME,
        left: LINGER_BYTES,
    });
}

/// Reads and drops what a lingering connection's client has sent; parks it
/// for more until its time is up, or closes it.
fn drain(mut conn: Box<Conn>) -> Next {
    if !conn.owed.is_empty() {
        match conn.owed.flush(&conn.stream) {
            Ok(true) => start_lingering(&mut conn),
            Ok(false) => {}
            Err(_) => return Next::Close,
        }
    }
    let Some(linger) = conn.linger.as_mut() else {
        return Next::Close;
    };
    loop {
        match conn.buf.read_ready(&conn.stream) {
            Ok(n) if n > 0 && n < linger.left => {
                linger.left -= n;
                conn.buf.consume(conn.buf.filled().len());
            }
            // Done sending, not yet reading what it is owed: only room is
            // awaited now (its end, seen, must not make it served again).
            Ok(0) if !conn.owed.is_empty() => {
                conn.hung_up = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < linger.until => {
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The end, an error, too much, or too long.
            _ => return Next::Close,
        }
    }
    let until = linger.until;
    conn.buf.release();
    Next::Park(conn, until)
}

#[cfg(test)]
impl Conn {
    /// The server's side of a fresh loopback connection, non-blocking as
    /// accepted ones are, and the client's side.
    pub fn connected(token: u64) -> (Box<Conn>, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, peer) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let conn = Box::new(Conn {
            stream,
            peer,
            buf: Default::default(),
            token,
            hung_up: false,
            head_deadline: None,
            slot: None,
            home: 0,
            linger: None,
            owed: Default::default(),
        });
        (conn, client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{BodyKind, Version};
    use crate::pipeline::BodyPart;
    use std::io::Read;
    use std::thread;

    /// Fills the socket until it takes no more, and still none half a
    /// second on (loopback frees a little room once or twice after a
    /// window closes); what it took.
    fn fill(stream: &TcpStream) -> Vec<u8> {
        let chunk: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
        let mut filled = Vec::new();
        let mut quiet = 0;
        while quiet < 10 {
            let before = filled.len();
            loop {
                let sent = send_some(stream, &chunk).unwrap();
                filled.extend_from_slice(&chunk[..sent]);
                if sent < chunk.len() {
                    break;
                }
            }
            quiet = if filled.len() == before { quiet + 1 } else { 0 };
            thread::sleep(Duration::from_millis(50));
        }
        filled
    }

    /// Reads the client's side to its end, in the background.
    fn read_all(mut client: TcpStream) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            got
        })
    }

    #[test]
    fn an_error_the_client_has_no_room_for_waits_parked_then_goes_out_whole() {
        let (mut conn, client) = Conn::connected(1);
        let filler = fill(&conn.stream);
        let write_timeout = Duration::from_secs(10);
        let started = Instant::now();
        let next = reject(conn, HttpError::new(400, "bad request"), write_timeout);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the worker waited for room"
        );
        let Next::Park(parked, until) = next else {
            panic!("an answer still owed parks its connection")
        };
        assert!(!parked.owed.is_empty());
        assert!(
            until >= started + write_timeout,
            "owed answers get write_timeout"
        );

        let reader = read_all(client);
        conn = parked;
        let mut closed = false;
        for _ in 0..1000 {
            match drain(conn) {
                Next::Park(parked, _) => conn = parked,
                _ => {
                    closed = true;
                    break;
                }
            }
            thread::sleep(Duration::from_millis(5));
        }
        assert!(closed, "the client's close ends the linger");
        let got = reader.join().unwrap();
        let (before, answer) = got.split_at(filler.len());
        assert!(
            before == filler,
            "what was in the socket came first, unchanged"
        );
        let answer = String::from_utf8_lossy(answer);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(answer.ends_with("Bad Request: bad request\n"), "{answer}");
    }

    #[test]
    fn a_100_continue_the_client_has_no_room_for_goes_out_when_it_has() {
        let (mut conn, client) = Conn::connected(1);
        let filler = fill(&conn.stream);
        let framing = Framing {
            body: BodyKind::Length(5),
            keep_alive: true,
            expect_continue: true,
        };
        let mut body = RequestBody::new(framing, 0);
        let started = Instant::now();
        let mut downstream = Downstream::new(&mut conn, &mut body, Version::Http11);
        assert!(matches!(downstream.read_body(), Ok(BodyPart::NotYet)));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the worker waited for room"
        );
        assert!(!conn.owed.is_empty());

        let reader = read_all(client);
        for _ in 0..1000 {
            let _ = Downstream::new(&mut conn, &mut body, Version::Http11).read_body();
            if conn.owed.is_empty() {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        drop(conn);
        let got = reader.join().unwrap();
        assert!(
            got[..filler.len()] == filler,
            "what was in the socket came first"
        );
        assert_eq!(&got[filler.len()..], b"HTTP/1.1 100 Continue\r\n\r\n");
    }
}
