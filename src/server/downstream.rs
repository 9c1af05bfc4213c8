//! The client side of one exchange, as modules see it.

use std::io::{self, Write};
use std::net::TcpStream;

use crate::http::body::{BodyError, BodyReader};
use crate::http::{BodyKind, Framing, ReadBuf, ResponseHead, Version};
use crate::splice::{splice, SpliceError};

pub struct Downstream<'c> {
    stream: &'c mut TcpStream,
    buf: &'c mut ReadBuf,
    kind: BodyKind,
    body: BodyReader,
    /// `Expect: 100-continue` not yet answered. Answered on the first body
    /// read, so a module that refuses the request never invites the upload.
    continue_owed: bool,
    version: Version,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl<'c> Downstream<'c> {
    pub fn new(
        stream: &'c mut TcpStream,
        buf: &'c mut ReadBuf,
        framing: Framing,
        version: Version,
        max_body_size: u64,
    ) -> Downstream<'c> {
        Downstream {
            stream,
            buf,
            kind: framing.body,
            body: BodyReader::new(framing.body, max_body_size),
            continue_owed: framing.expect_continue,
            version,
        }
    }

    /// How the request body is framed (never `UntilClose`).
    pub fn body_kind(&self) -> BodyKind {
        self.kind
    }

    /// The next piece of request body, `None` at its end.
    pub fn read_body(&mut self) -> Result<Option<&[u8]>, BodyError> {
        self.invite_body().map_err(BodyError::Io)?;
        self.body.next(self.stream, self.buf)
    }

    /// Moves the rest of a fixed-length body from the client socket straight
    /// to `to`, once none of it is left in the buffer. `Ok(false)` when
    /// that does not apply (buffered bytes, other framing): use `read_body`.
    pub fn splice_body(&mut self, to: &TcpStream) -> Result<bool, SpliceError> {
        match self.body.length_remaining() {
            Some(left) if self.buf.is_empty() => {
                self.invite_body().map_err(SpliceError::From)?;
                splice(self.stream, to, left)?;
                self.body.bypassed();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn invite_body(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.continue_owed) && !self.body.is_done() {
            self.stream.write_all(CONTINUE)?;
        }
        Ok(())
    }

    /// True once the whole request body has been read (or there was none).
    pub fn body_done(&self) -> bool {
        self.body.is_done()
    }

    /// Raw trailer lines of a chunked request body, valid once it is read.
    pub fn trailers(&self) -> &[u8] {
        self.body.trailers()
    }

    /// Forwards an interim (1xx) response. HTTP/1.0 clients get none (RFC 9110 §15.2).
    pub fn send_interim(&mut self, head: &ResponseHead) -> io::Result<()> {
        if self.version == Version::Http10 {
            return Ok(());
        }
        if head.status == 100 {
            // We answer Expect ourselves; the upstream's 100 would be a second one.
            if !std::mem::take(&mut self.continue_owed) {
                return Ok(());
            }
        }
        let mut out = Vec::with_capacity(256);
        head.write_to(&mut out);
        self.stream.write_all(&out)
    }
}
