//! One client connection: parse each request head, run the pipeline, write
//! the response, and decide whether the connection goes on.
//!
//! A worker serves a connection only while it can make progress. When the
//! next head has not (fully) arrived it parks the connection; when a module
//! awaits an upstream response, or more of the request body, it suspends
//! the exchange. Either way the worker moves on, so neither idle or slow
//! clients nor slow upstreams hold a thread.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::downstream::{Downstream, RequestBody};
use super::{OpenSlot, Shared};
use crate::http::chunked::{encode_chunk_header, encode_last_chunk, CHUNK_END};
use crate::http::{decimal_in, request, Framing, HttpError, ReadBuf, Request, Version};
use crate::logging::AccessRecord;
use crate::pipeline::{
    Body, Context, Handled, ModuleFailed, PendingResponse, Response, Resumed, WaitOn,
};

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
}

impl Conn {
    /// Gives up on a parked connection whose deadline passed.
    pub fn expire(mut self) {
        if self.head_deadline.is_some() {
            log::info!("{}: request head not received in time", self.peer);
            // Best effort and never blocking: the housekeeping thread calls this.
            let _ = self.stream.set_nonblocking(true);
            let _ = write_error(
                &mut self.stream,
                HttpError::new(408, "request head not received in time"),
            );
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

/// An exchange waiting for a stage's pending response (an upstream's, typically).
pub struct Suspended {
    exchange: Exchange,
    pending: Box<dyn PendingResponse>,
    pub deadline: Instant,
}

impl Suspended {
    fn new(exchange: Exchange, pending: Box<dyn PendingResponse>) -> Box<Suspended> {
        let deadline = Instant::now() + pending.timeout();
        Box::new(Suspended {
            exchange,
            pending,
            deadline,
        })
    }

    pub fn wait_on(&self) -> WaitOn {
        self.pending.wait_on()
    }
}

/// What became of a connection after a worker served it.
pub enum Next {
    /// Wait for more bytes from the client, until the deadline.
    Park(Conn, Instant),
    /// Wait for the upstream.
    Suspend(Conn, Box<Suspended>),
    Close,
}

/// Serves a connection that epoll reported readable (perhaps spuriously:
/// the read does not wait).
pub fn serve(mut conn: Conn, shared: &Shared) -> Next {
    match conn.buf.read_ready(&conn.stream) {
        Ok(0) => Next::Close,
        Ok(_) => drive(conn, shared),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => park(conn, shared),
        Err(_) => Next::Close,
    }
}

/// Serves every request already buffered.
fn drive(mut conn: Conn, shared: &Shared) -> Next {
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
                reject(&mut conn.stream, e);
                return Next::Close;
            }
        };
        conn.buf.consume(len);
        conn.head_deadline = None;
        if conn.slot.is_none() {
            log::warn!("{}: over max_connections, answered 503", conn.peer);
            reject(
                &mut conn.stream,
                HttpError::new(503, "too many connections"),
            );
            return Next::Close;
        }
        match start(&mut conn, req, framing, shared) {
            // Pipelined: the next head is already (partly) here.
            Ok(true) if !conn.buf.is_empty() && !shared.shutting_down.load(Relaxed) => {}
            Ok(keep_alive) => return carry_on(conn, keep_alive, shared),
            Err(suspended) => return suspend(conn, suspended),
        }
    }
}

/// Where a connection goes once a response is written: on to the next
/// pipelined request, parked, or closed.
fn carry_on(conn: Conn, keep_alive: bool, shared: &Shared) -> Next {
    if !keep_alive || shared.shutting_down.load(Relaxed) {
        Next::Close
    } else if conn.buf.is_empty() {
        park(conn, shared)
    } else {
        drive(conn, shared)
    }
}

fn park(mut conn: Conn, shared: &Shared) -> Next {
    // Idle, or a head arriving slowly: either way only its bytes so far are kept.
    conn.buf.release();
    let deadline = conn
        .head_deadline
        .unwrap_or_else(|| Instant::now() + shared.keepalive_timeout);
    Next::Park(conn, deadline)
}

/// Starts the request phase of a new request.
fn start(
    conn: &mut Conn,
    req: Request,
    framing: Framing,
    shared: &Shared,
) -> Result<bool, Box<Suspended>> {
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
/// `Ok(keep_alive)` once the response is written, `Err` when a stage awaits.
fn run(conn: &mut Conn, mut ex: Exchange, shared: &Shared) -> Result<bool, Box<Suspended>> {
    let mut downstream = Downstream::new(
        &mut conn.stream,
        &mut conn.buf,
        &mut ex.body,
        ex.req.version,
    );
    let (handled, ran) = shared
        .pipeline
        .handle(ex.ran, &mut ex.req, &mut downstream, &mut ex.ctx);
    ex.ran = ran;
    match handled {
        Handled::Respond(resp) => Ok(finish(conn, ex, resp, shared)),
        Handled::Await(pending) => Err(Suspended::new(ex, pending)),
    }
}

fn suspend(mut conn: Conn, suspended: Box<Suspended>) -> Next {
    // Waiting may take long and thousands may wait at once: only the
    // unread bytes (a pipelined request) are kept meanwhile.
    conn.buf.release();
    Next::Suspend(conn, suspended)
}

/// Continues an exchange whose awaited socket became readable.
pub fn resume(mut conn: Conn, mut suspended: Box<Suspended>, shared: &Shared) -> Next {
    let exchange = &mut suspended.exchange;
    let mut downstream = Downstream::new(
        &mut conn.stream,
        &mut conn.buf,
        &mut exchange.body,
        exchange.req.version,
    );
    let polled = shared.pipeline.poll(
        exchange.ran,
        suspended.pending.as_mut(),
        &exchange.req,
        &mut downstream,
        &mut exchange.ctx,
    );
    match polled {
        None => {
            suspended.deadline = Instant::now() + suspended.pending.timeout();
            Next::Suspend(conn, suspended)
        }
        Some(resumed) => proceed(conn, suspended.exchange, resumed, shared),
    }
}

/// The wait ran past its timeout: the awaiting module decides what follows.
pub fn time_out(conn: Conn, suspended: Box<Suspended>, shared: &Shared) -> Next {
    let Suspended {
        mut exchange,
        pending,
        ..
    } = *suspended;
    let resumed = pending.timed_out(&exchange.req, &mut exchange.ctx);
    if matches!(resumed, Resumed::Respond(_)) {
        exchange.framing.keep_alive = false;
    }
    proceed(conn, exchange, resumed, shared)
}

/// Carries an exchange on once its wait is over.
fn proceed(mut conn: Conn, exchange: Exchange, resumed: Resumed, shared: &Shared) -> Next {
    let outcome = match resumed {
        Resumed::Respond(resp) => Ok(finish(&mut conn, exchange, resp, shared)),
        Resumed::Continue => run(&mut conn, exchange, shared),
    };
    match outcome {
        Ok(keep_alive) => carry_on(conn, keep_alive, shared),
        Err(suspended) => suspend(conn, suspended),
    }
}

/// The response phase: modules, then the wire, then the access log.
/// Returns whether the connection may go on.
fn finish(conn: &mut Conn, mut ex: Exchange, mut resp: Response, shared: &Shared) -> bool {
    shared
        .pipeline
        .on_response(ex.ran, &ex.req, &mut resp, &mut ex.ctx);
    let body_read = ex.body.is_done();
    // Answered before its body came whole (an error, most likely).
    let restored = ex.body.restore_blocking(&conn.stream);
    let keep_alive = ex.framing.keep_alive
        && body_read
        && restored.is_ok()
        && !shared.shutting_down.load(Relaxed);
    let status = resp.head.status;
    let written = write_response(
        &mut conn.stream,
        &ex.req,
        resp,
        keep_alive,
        shared,
        ex.ran,
        &mut ex.ctx,
    );
    crate::logging::access(&AccessRecord {
        client: conn.peer,
        method: &ex.req.method,
        target: &ex.req.target,
        status,
        bytes: written.as_ref().map_or(0, |w| w.bytes),
        duration: ex.ctx.started.elapsed(),
        upstream: ex.ctx.upstream,
        request_id: &ex.ctx.request_id,
    });
    if !body_read {
        linger(&mut conn.stream);
    }
    match written {
        Ok(w) => w.keep_alive,
        Err(e) => {
            let timed_out = matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            );
            let why = if timed_out {
                "client write timed out".to_owned()
            } else {
                e.to_string()
            };
            log::info!(
                "{} {}: response not completed: {why}",
                ex.ctx.request_id,
                conn.peer
            );
            false
        }
    }
}

struct Written {
    /// Body bytes sent.
    bytes: u64,
    keep_alive: bool,
}

/// Frames and writes a response. The head and a first piece of body go out in
/// one write; later pieces are written as they arrive, so streams stay live.
fn write_response(
    stream: &mut TcpStream,
    req: &Request,
    mut resp: Response,
    mut keep_alive: bool,
    shared: &Shared,
    ran: usize,
    ctx: &mut Context,
) -> io::Result<Written> {
    let head = &mut resp.head;
    let bodyless =
        req.method == "HEAD" || head.is_informational() || matches!(head.status, 204 | 304);
    let mut chunked = false;
    let mut digits = [0u8; 20];
    if bodyless {
        head.headers.remove("connection");
    } else {
        // The framing is ours to write: the fields of the response as it came go in one pass.
        head.headers
            .remove_each(&["transfer-encoding", "content-length", "connection"]);
        let length = match &resp.body {
            Body::Empty => Some(0),
            Body::Bytes(bytes) => Some(bytes.len() as u64),
            Body::File(file) => Some(file.len() as u64),
            Body::Stream(stream) => stream.length(),
        };
        match length {
            Some(n) => head
                .headers
                .append("Content-Length", decimal_in(&mut digits, n)),
            None if req.version == Version::Http11 => {
                head.headers.append("Transfer-Encoding", "chunked");
                chunked = true;
            }
            // The end of the body is the end of the connection.
            None => keep_alive = false,
        }
    }
    if !keep_alive {
        head.headers.append("Connection", "close");
    } else if req.version == Version::Http10 {
        head.headers.append("Connection", "keep-alive");
    }

    let mut out = Vec::with_capacity(1024);
    head.write_to(&mut out);
    let mut bytes = 0u64;
    let pipeline = &shared.pipeline;
    match resp.body {
        _ if bodyless => {
            pipeline.on_body_end(ran, ctx).map_err(failed)?;
            stream.write_all(&out)?
        }
        Body::Empty => {
            pipeline.on_body_end(ran, ctx).map_err(failed)?;
            stream.write_all(&out)?
        }
        Body::Bytes(body) => {
            bytes = body.len() as u64;
            pipeline.on_body_chunk(ran, &body, ctx).map_err(failed)?;
            pipeline.on_body_end(ran, ctx).map_err(failed)?;
            if body.len() <= COPY_LIMIT {
                out.extend_from_slice(&body);
                stream.write_all(&out)?;
            } else {
                write_both(stream, &out, &body)?;
            }
        }
        Body::File(file) => {
            bytes = file.len() as u64;
            pipeline
                .on_body_chunk(ran, file.as_slice(), ctx)
                .map_err(failed)?;
            pipeline.on_body_end(ran, ctx).map_err(failed)?;
            send_more(stream, &out)?;
            file.send_to(stream.as_raw_fd())?;
        }
        Body::Stream(mut body) => {
            // At the end, the body is dropped (freeing its upstream connection
            // for reuse) and modules are told, before the client can see the
            // end of the response and send its next request.
            let length = body.length();
            loop {
                let chunk = body
                    .next_chunk()
                    .map_err(|e| io::Error::other(format!("upstream body: {e}")))?;
                let Some(chunk) = chunk else {
                    if chunked {
                        encode_last_chunk(&mut out, body.trailers());
                    }
                    drop(body);
                    pipeline.on_body_end(ran, ctx).map_err(failed)?;
                    stream.write_all(&out)?;
                    break;
                };
                bytes += chunk.len() as u64;
                pipeline.on_body_chunk(ran, chunk, ctx).map_err(failed)?;
                let last = length == Some(bytes);
                if chunked {
                    encode_chunk_header(&mut out, chunk.len());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(CHUNK_END);
                } else if out.is_empty() && !last {
                    stream.write_all(chunk)?;
                    continue;
                } else {
                    out.extend_from_slice(chunk);
                }
                if last {
                    drop(body);
                    pipeline.on_body_end(ran, ctx).map_err(failed)?;
                    stream.write_all(&out)?;
                    break;
                }
                stream.write_all(&out)?;
                out.clear();
            }
        }
    }
    Ok(Written { bytes, keep_alive })
}

/// Bodies up to this size are copied behind the head for one plain write;
/// larger ones go out with the head by writev, uncopied.
const COPY_LIMIT: usize = 8 * 1024;

/// Writes `head` then `body` with as few writev calls as the socket allows.
fn write_both(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> io::Result<()> {
    let mut parts = [io::IoSlice::new(head), io::IoSlice::new(body)];
    let mut left: &mut [io::IoSlice] = &mut parts;
    while !left.is_empty() {
        match stream.write_vectored(left) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `head` with MSG_MORE, so it leaves in one segment with what follows.
fn send_more(stream: &mut TcpStream, mut head: &[u8]) -> io::Result<()> {
    while !head.is_empty() {
        // SAFETY: sends from a valid buffer on a socket we own.
        let sent = unsafe {
            libc::send(
                stream.as_raw_fd(),
                head.as_ptr().cast(),
                head.len(),
                libc::MSG_MORE | libc::MSG_NOSIGNAL,
            )
        };
        match sent {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => head = &head[n as usize..],
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn failed(f: ModuleFailed) -> io::Error {
    io::Error::other(format!("module `{}` failed", f.module))
}

/// Answers a refused request and closes gently.
fn reject(stream: &mut TcpStream, error: HttpError) {
    if write_error(stream, error).is_ok() {
        linger(stream);
    }
}

/// Writes an error response with `Connection: close`.
fn write_error(stream: &mut TcpStream, error: HttpError) -> io::Result<()> {
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
    stream.write_all(&out)
}

/// Closing a socket with unread input sends RST, and an RST can make the
/// client drop our response before reading it. So: stop writing, then read
/// and discard what the client still sends, for a bounded time and amount.
fn linger(stream: &mut TcpStream) {
    const MAX_TIME: Duration = Duration::from_millis(500);
    const MAX_BYTES: usize = 1 << 20;
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_nonblocking(false);
    let until = Instant::now() + MAX_TIME;
    let mut scratch = [0u8; 8192];
    let mut discarded = 0;
    while discarded < MAX_BYTES {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(n) => discarded += n,
        }
    }
}
