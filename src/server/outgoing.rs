//! A response on its way to the client: framed once, then written as far
//! as the socket takes it, its body pulled as far as it has arrived. Client
//! sockets are non-blocking, so when one is full, or the next piece of a
//! streamed body is still on its way, the exchange waits like any other
//! wait: neither a slow reader nor a slow upstream holds a worker.

use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::http::chunked::{encode_chunk_header, encode_last_chunk, CHUNK_END};
use crate::http::{decimal_in, Request, Version};
use crate::memfile::MemFile;
use crate::pipeline::{
    Body, BodyPart, BodyStream, Context, ModuleFailed, Pipeline, Response, WaitOn,
};

/// Bodies up to this size are copied behind the head for one plain write;
/// larger ones go out with the head by one vectored write, uncopied.
const COPY_LIMIT: usize = 8 * 1024;

/// The stages that see the body as it goes out (`on_body_chunk`, `on_body_end`).
pub struct Hooks<'a> {
    pub pipeline: &'a Pipeline,
    pub ran: usize,
    pub ctx: &'a mut Context,
}

impl Hooks<'_> {
    fn chunk(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.pipeline
            .on_body_chunk(self.ran, chunk, self.ctx)
            .map_err(failed)
    }

    fn end(&mut self) -> io::Result<()> {
        self.pipeline
            .on_body_end(self.ran, self.ctx)
            .map_err(failed)
    }
}

fn failed(f: ModuleFailed) -> io::Error {
    io::Error::other(format!("module `{}` failed", f.module))
}

pub struct Outgoing {
    /// Framed bytes to write, from `sent` on.
    out: Vec<u8>,
    sent: usize,
    rest: Rest,
    chunked: bool,
    /// Body bytes taken from the response so far.
    pub bytes: u64,
    pub status: u16,
    pub keep_alive: bool,
}

/// The body still to go once `out` is written.
enum Rest {
    Nothing,
    /// A large shared body, written from this offset (never copied).
    Bytes(Arc<[u8]>, usize),
    /// Sent by `sendfile` from this offset, past user space.
    File(Arc<MemFile>, usize),
    /// Pulled piece by piece, each framed into `out`.
    Stream(Box<dyn BodyStream>),
}

/// Where writing stopped.
pub enum Progress {
    Done,
    /// Until this is ready, for at most this long: the client's socket is
    /// full, or the body's next piece has not arrived.
    Waits(WaitOn, Duration),
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        crate::spare::give_back_bytes(std::mem::take(&mut self.out));
    }
}

impl Outgoing {
    /// Frames `resp`, to go out after the bytes `ahead` (an interim response
    /// the client had no room for): its
    /// own framing fields go, ours (Content-Length or chunked, Connection)
    /// come in. A body known whole is shown to the stages at once; a stream
    /// is shown piece by piece as it is written.
    pub fn new(
        req: &Request,
        mut resp: Response,
        mut keep_alive: bool,
        hooks: &mut Hooks,
        ahead: Vec<u8>,
    ) -> io::Result<Outgoing> {
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
        // What the client is owed goes first.
        let mut out = if ahead.is_empty() {
            crate::spare::bytes(1024)
        } else {
            ahead
        };
        out.reserve(1024);
        head.write_to(&mut out);

        let (rest, bytes) = match resp.body {
            _ if bodyless => (Rest::Nothing, 0),
            Body::Empty => (Rest::Nothing, 0),
            Body::Bytes(body) => {
                hooks.chunk(&body)?;
                let len = body.len() as u64;
                if body.len() <= COPY_LIMIT {
                    out.extend_from_slice(&body);
                    (Rest::Nothing, len)
                } else {
                    (Rest::Bytes(body, 0), len)
                }
            }
            Body::File(file) => {
                hooks.chunk(file.as_slice())?;
                let len = file.len() as u64;
                (Rest::File(file, 0), len)
            }
            // Counted as its pieces are pulled.
            Body::Stream(stream) => (Rest::Stream(stream), 0),
        };
        let streamed = matches!(rest, Rest::Stream(_));
        let mut outgoing = Outgoing {
            out,
            sent: 0,
            rest,
            chunked,
            bytes,
            status: resp.head.status,
            keep_alive,
        };
        if streamed {
            // The head goes out with the first piece of body, if it is here.
            outgoing.pull(hooks)?;
        } else {
            hooks.end()?;
        }
        Ok(outgoing)
    }

    /// Writes as much as the socket takes, pulling more of a streamed body
    /// as the socket drains. A full socket waits up to `write_timeout`.
    pub fn write(
        &mut self,
        stream: &TcpStream,
        hooks: &mut Hooks,
        write_timeout: Duration,
    ) -> io::Result<Progress> {
        let fd = stream.as_raw_fd();
        loop {
            let unsent = &self.out[self.sent..];
            let written = match &mut self.rest {
                Rest::Bytes(body, offset) => {
                    let parts = [IoSlice::new(unsent), IoSlice::new(&body[*offset..])];
                    let n = retry(|| send_vectored(fd, &parts));
                    if let Ok(n) = n {
                        let from_out = n.min(unsent.len());
                        self.sent += from_out;
                        *offset += n - from_out;
                        if *offset == body.len() {
                            self.rest = Rest::Nothing;
                        }
                    }
                    n
                }
                _ if !unsent.is_empty() => {
                    // A file's head waits to leave in one segment with its start.
                    let more = matches!(self.rest, Rest::File(..));
                    let n = retry(|| send(fd, unsent, more));
                    if let Ok(n) = n {
                        self.sent += n;
                    }
                    n
                }
                Rest::File(file, offset) => {
                    let n = retry(|| file.send_to(fd, *offset));
                    if let Ok(n) = n {
                        *offset += n;
                        if *offset == file.len() {
                            self.rest = Rest::Nothing;
                        }
                    }
                    n
                }
                Rest::Stream(body) => {
                    let (wait_on, timeout) = (body.wait_on(), body.timeout());
                    if !self.pull(hooks)? {
                        return Ok(Progress::Waits(wait_on, timeout));
                    }
                    continue;
                }
                Rest::Nothing => return Ok(Progress::Done),
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Progress::Waits(WaitOn::Client, write_timeout))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Frames the next piece of a streamed body into `out` (once the
    /// previous one is written); false if it has not arrived yet. At the
    /// end, the body is dropped (freeing its upstream connection for reuse)
    /// and the stages are told, before the client can see the end of the
    /// response and send its next request.
    fn pull(&mut self, hooks: &mut Hooks) -> io::Result<bool> {
        let Rest::Stream(body) = &mut self.rest else {
            return Ok(true);
        };
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
        let length = body.length();
        let piece = body
            .next_chunk()
            .map_err(|e| io::Error::other(format!("upstream body: {e}")))?;
        let chunk = match piece {
            BodyPart::NotYet => return Ok(false),
            BodyPart::Data(chunk) => chunk,
            BodyPart::End => {
                if self.chunked {
                    encode_last_chunk(&mut self.out, body.trailers());
                }
                self.rest = Rest::Nothing;
                hooks.end()?;
                return Ok(true);
            }
        };
        self.bytes += chunk.len() as u64;
        hooks.chunk(chunk)?;
        if self.chunked {
            encode_chunk_header(&mut self.out, chunk.len());
            self.out.extend_from_slice(chunk);
            self.out.extend_from_slice(CHUNK_END);
        } else {
            self.out.extend_from_slice(chunk);
        }
        if length == Some(self.bytes) {
            self.rest = Rest::Nothing;
            hooks.end()?;
        }
        Ok(true)
    }
}

/// Retries `op` when a signal interrupts it.
fn retry(mut op: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn send(fd: RawFd, bytes: &[u8], more: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    // SAFETY: sends from a valid buffer on a socket the caller holds.
    let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn send_vectored(fd: RawFd, parts: &[IoSlice]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid; it then points at `parts`, which
    // outlives the call (IoSlice has iovec's layout).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = parts.len() as _;
    // SAFETY: sendmsg on a socket the caller holds, with the header above.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends as much of `bytes` as a non-blocking socket takes now; how much.
pub fn send_some(stream: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < bytes.len() {
        match retry(|| send(stream.as_raw_fd(), &bytes[sent..], false)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}
