//! The client side of one exchange, as modules see it.

use std::io;
use std::net::TcpStream;

use super::connection::Conn;

use crate::http::body::{BodyError, BodyPart, BodyReader};
use crate::http::{BodyKind, Framing, ReadBuf, ResponseHead, Version};
use crate::outbox::Outbox;
use crate::splice::{splice, Held, SpliceError};

/// Where the request body stands. It lives with the exchange, so a module
/// can forward the body as it arrives and wait for the rest in between.
pub struct RequestBody {
    kind: BodyKind,
    reader: BodyReader,
    /// `Expect: 100-continue` not yet answered. Answered on the first body
    /// read, so a module that refuses the request never invites the upload.
    continue_owed: bool,
}

impl RequestBody {
    pub fn new(framing: Framing, max_body_size: u64) -> RequestBody {
        RequestBody {
            kind: framing.body,
            reader: BodyReader::new(framing.body, max_body_size),
            continue_owed: framing.expect_continue,
        }
    }

    /// True once the whole request body has been read (or there was none).
    pub fn is_done(&self) -> bool {
        self.reader.is_done()
    }
}

pub struct Downstream<'c> {
    stream: &'c mut TcpStream,
    buf: &'c mut ReadBuf,
    /// Where interim responses wait for room in the client's socket.
    owed: &'c mut Outbox,
    body: &'c mut RequestBody,
    version: Version,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl<'c> Downstream<'c> {
    pub fn new(conn: &'c mut Conn, body: &'c mut RequestBody, version: Version) -> Downstream<'c> {
        Downstream {
            stream: &mut conn.stream,
            buf: &mut conn.buf,
            owed: &mut conn.owed,
            body,
            version,
        }
    }

    /// How the request body is framed (never `UntilClose`).
    pub fn body_kind(&self) -> BodyKind {
        self.body.kind
    }

    /// The next piece of request body that has arrived; never waits for
    /// the client. On `NotYet`, await [`WaitOn::Client`](crate::pipeline::WaitOn::Client).
    pub fn read_body(&mut self) -> Result<BodyPart<'_>, BodyError> {
        self.invite_body().map_err(BodyError::Io)?;
        self.body.reader.next_arrived(self.stream, self.buf)
    }

    /// Moves what has arrived of a fixed-length body from the client socket
    /// straight to `to`, once none of it is left in the buffer: `End` or
    /// `NotYet`. `None` when that does not apply (buffered bytes, other
    /// framing): use `read_body`. What `to` had no room for stays in `held`
    /// (see [`splice`]).
    pub fn splice_body(
        &mut self,
        to: &TcpStream,
        held: &mut Option<Held>,
    ) -> Result<Option<BodyPart<'static>>, SpliceError> {
        let Some(left) = self.body.reader.length_remaining() else {
            return Ok(None);
        };
        if !self.buf.is_empty() {
            return Ok(None);
        }
        self.invite_body().map_err(SpliceError::From)?;
        // Both sockets are non-blocking: this stops where the client has
        // stopped sending or `to` has no room.
        let moved = splice(self.stream, to, left, held)?;
        self.body.reader.bypassed(moved);
        Ok(Some(if moved < left {
            BodyPart::NotYet
        } else {
            BodyPart::End
        }))
    }

    /// Answers `Expect: 100-continue` once, and sends on an interim
    /// response the client had no room for, as far as it now has room.
    fn invite_body(&mut self) -> io::Result<()> {
        self.owed.flush(self.stream)?;
        if std::mem::take(&mut self.body.continue_owed) && !self.body.is_done() {
            self.owed.send(self.stream, CONTINUE)?;
        }
        Ok(())
    }

    /// Raw trailer lines of a chunked request body, valid once it is read.
    pub fn trailers(&self) -> &[u8] {
        self.body.reader.trailers()
    }

    /// Forwards an interim (1xx) response. HTTP/1.0 clients get none (RFC
    /// 9110 §15.2). Nor, but for a 100 it waits for, does a client that has
    /// not taken the last one yet: they are advisory, and keeping every one
    /// for it would let an upstream grow our memory without bound.
    pub fn send_interim(&mut self, head: &ResponseHead) -> io::Result<()> {
        if self.version == Version::Http10 {
            return Ok(());
        }
        if head.status == 100 {
            // We answer Expect ourselves; the upstream's 100 would be a second one.
            if !std::mem::take(&mut self.body.continue_owed) {
                return Ok(());
            }
        } else if !self.owed.flush(self.stream)? {
            return Ok(());
        }
        let mut out = Vec::with_capacity(256);
        head.write_to(&mut out);
        self.owed.send(self.stream, &out)
    }
}
