//! One client connection: parse each request head, run the pipeline, write
//! the response, and decide whether the connection goes on.
//!
//! A worker serves a connection only while bytes are at hand. When the next
//! head has not (fully) arrived it parks the connection instead of waiting, so
//! neither idle keep-alive clients nor slow senders hold a thread.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::downstream::Downstream;
use super::{OpenSlot, Shared};
use crate::http::chunked::{encode_chunk_header, encode_last_chunk, CHUNK_END};
use crate::http::{request, HttpError, ReadBuf, Request, Version};
use crate::logging::AccessRecord;
use crate::pipeline::{Body, Context, Response};

pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub buf: ReadBuf,
    pub token: u64,
    /// Already in the epoll set (re-arm rather than add).
    pub registered: bool,
    /// When a parked connection is given up.
    pub deadline: Instant,
    /// Set while a request head is arriving: past it the client gets 408.
    pub head_deadline: Option<Instant>,
    /// Its place within `max_connections`; `None` when accepted beyond it,
    /// to be answered 503 and closed.
    pub slot: Option<OpenSlot>,
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

/// What became of a connection after a worker served it.
pub enum Next {
    Park(Conn),
    Close,
}

/// Serves a connection that epoll reported readable.
pub fn serve(mut conn: Conn, shared: &Shared) -> Next {
    match conn.buf.read_from(&mut conn.stream) {
        Ok(0) => return Next::Close,
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return park(conn, shared),
        Err(_) => return Next::Close,
    }
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
        if !exchange(&mut conn, req, framing, shared) || shared.shutting_down.load(Relaxed) {
            return Next::Close;
        }
        if conn.buf.is_empty() {
            return park(conn, shared);
        }
        // Pipelined: the next head is already (partly) here.
    }
}

fn park(mut conn: Conn, shared: &Shared) -> Next {
    conn.deadline = match conn.head_deadline {
        Some(deadline) => deadline,
        None => {
            conn.buf.release();
            Instant::now() + shared.keepalive_timeout
        }
    };
    Next::Park(conn)
}

/// One request and its response. Returns whether the connection may go on.
fn exchange(conn: &mut Conn, mut req: Request, framing: request::Framing, shared: &Shared) -> bool {
    let mut ctx = Context::new(conn.peer);
    let mut downstream = Downstream::new(
        &mut conn.stream,
        &mut conn.buf,
        framing,
        req.version,
        shared.limits.max_body_size,
    );
    let (mut resp, ran) = shared.pipeline.handle(&mut req, &mut downstream, &mut ctx);
    shared.pipeline.on_response(ran, &req, &mut resp, &mut ctx);
    // A body left unread leaves no way to find the next request.
    let body_read = downstream.body_done();
    let keep_alive = framing.keep_alive && body_read && !shared.shutting_down.load(Relaxed);

    let status = resp.head.status;
    let written = write_response(
        &mut conn.stream,
        &req,
        resp,
        keep_alive,
        shared,
        ran,
        &mut ctx,
    );
    crate::logging::access(&AccessRecord {
        client: conn.peer,
        method: &req.method,
        target: &req.target,
        status,
        bytes: written.as_ref().map_or(0, |w| w.bytes),
        duration: ctx.started.elapsed(),
        upstream: ctx.upstream,
        request_id: &ctx.request_id,
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
                ctx.request_id,
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
    if !bodyless {
        head.headers.remove("transfer-encoding");
        match &resp.body {
            Body::Empty => head.headers.set("Content-Length", "0"),
            Body::Bytes(bytes) => head.headers.set("Content-Length", bytes.len().to_string()),
            Body::Stream(stream) => match stream.length() {
                Some(n) => head.headers.set("Content-Length", n.to_string()),
                None if req.version == Version::Http11 => {
                    head.headers.remove("content-length");
                    head.headers.append("Transfer-Encoding", "chunked");
                    chunked = true;
                }
                None => {
                    head.headers.remove("content-length");
                    keep_alive = false; // the end of the body is the end of the connection
                }
            },
        }
    }
    head.headers.remove("connection");
    if !keep_alive {
        head.headers.append("Connection", "close");
    } else if req.version == Version::Http10 {
        head.headers.append("Connection", "keep-alive");
    }

    let mut out = Vec::with_capacity(1024);
    head.write_to(&mut out);
    let mut bytes = 0u64;
    match resp.body {
        _ if bodyless => stream.write_all(&out)?,
        Body::Empty => stream.write_all(&out)?,
        Body::Bytes(body) => {
            bytes = body.len() as u64;
            shared
                .pipeline
                .on_body_chunk(ran, &body, ctx)
                .map_err(|f| io::Error::other(format!("module `{}` failed", f.module)))?;
            out.extend_from_slice(&body);
            stream.write_all(&out)?;
        }
        Body::Stream(mut body) => {
            loop {
                let chunk = body
                    .next_chunk()
                    .map_err(|e| io::Error::other(format!("upstream body: {e}")))?;
                let Some(chunk) = chunk else { break };
                bytes += chunk.len() as u64;
                shared
                    .pipeline
                    .on_body_chunk(ran, chunk, ctx)
                    .map_err(|f| io::Error::other(format!("module `{}` failed", f.module)))?;
                if chunked {
                    encode_chunk_header(&mut out, chunk.len());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(CHUNK_END);
                    stream.write_all(&out)?;
                } else if out.is_empty() {
                    stream.write_all(chunk)?;
                } else {
                    out.extend_from_slice(chunk);
                    stream.write_all(&out)?;
                }
                out.clear();
            }
            if chunked {
                encode_last_chunk(&mut out, body.trailers());
            }
            stream.write_all(&out)?;
        }
    }
    Ok(Written { bytes, keep_alive })
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
