//! The client side of one exchange, as modules see it.

use std::io::{self, Write};
use std::net::TcpStream;

use crate::http::body::{Arrived, BodyError, BodyReader};
use crate::http::{BodyKind, Framing, ReadBuf, ResponseHead, Version};
use crate::splice::{splice, SpliceError};

/// Where the request body stands. It lives with the exchange, so a module
/// can forward the body as it arrives and wait for the rest in between.
pub struct RequestBody {
    kind: BodyKind,
    reader: BodyReader,
    /// `Expect: 100-continue` not yet answered. Answered on the first body
    /// read, so a module that refuses the request never invites the upload.
    continue_owed: bool,
    /// The client socket was made non-blocking to splice what has arrived;
    /// responses are written to it blocking, so it is set back.
    nonblocking: bool,
}

impl RequestBody {
    pub fn new(framing: Framing, max_body_size: u64) -> RequestBody {
        RequestBody {
            kind: framing.body,
            reader: BodyReader::new(framing.body, max_body_size),
            continue_owed: framing.expect_continue,
            nonblocking: false,
        }
    }

    /// True once the whole request body has been read (or there was none).
    pub fn is_done(&self) -> bool {
        self.reader.is_done()
    }

    /// Makes the client socket blocking again, if a splice left it not.
    pub fn restore_blocking(&mut self, stream: &TcpStream) -> io::Result<()> {
        if std::mem::take(&mut self.nonblocking) {
            stream.set_nonblocking(false)?;
        }
        Ok(())
    }
}

/// What has arrived of the request body.
pub enum BodyPart<'b> {
    Data(&'b [u8]),
    /// The body is complete.
    End,
    /// Nothing more for now: the rest has not arrived yet.
    NotYet,
}

pub struct Downstream<'c> {
    stream: &'c mut TcpStream,
    buf: &'c mut ReadBuf,
    body: &'c mut RequestBody,
    version: Version,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl<'c> Downstream<'c> {
    pub fn new(
        stream: &'c mut TcpStream,
        buf: &'c mut ReadBuf,
        body: &'c mut RequestBody,
        version: Version,
    ) -> Downstream<'c> {
        Downstream {
            stream,
            buf,
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
        match self.body.reader.next(&mut Arrived(self.stream), self.buf) {
            Ok(Some(data)) => Ok(BodyPart::Data(data)),
            Ok(None) => {
                self.body.restore_blocking(self.stream)?;
                Ok(BodyPart::End)
            }
            Err(BodyError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(BodyPart::NotYet),
            Err(e) => Err(e),
        }
    }

    /// Moves what has arrived of a fixed-length body from the client socket
    /// straight to `to`, once none of it is left in the buffer: `End` or
    /// `NotYet`. `None` when that does not apply (buffered bytes, other
    /// framing): use `read_body`.
    pub fn splice_body(
        &mut self,
        to: &TcpStream,
    ) -> Result<Option<BodyPart<'static>>, SpliceError> {
        let Some(left) = self.body.reader.length_remaining() else {
            return Ok(None);
        };
        if !self.buf.is_empty() {
            return Ok(None);
        }
        self.invite_body().map_err(SpliceError::From)?;
        if !self.body.nonblocking {
            // splice(2) waits on a blocking socket whatever its flags say.
            self.stream
                .set_nonblocking(true)
                .map_err(SpliceError::From)?;
            self.body.nonblocking = true;
        }
        let moved = splice(self.stream, to, left)?;
        self.body.reader.bypassed(moved);
        if moved < left {
            return Ok(Some(BodyPart::NotYet));
        }
        self.body
            .restore_blocking(self.stream)
            .map_err(SpliceError::From)?;
        Ok(Some(BodyPart::End))
    }

    fn invite_body(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.body.continue_owed) && !self.body.is_done() {
            self.stream.write_all(CONTINUE)?;
        }
        Ok(())
    }

    /// Raw trailer lines of a chunked request body, valid once it is read.
    pub fn trailers(&self) -> &[u8] {
        self.body.reader.trailers()
    }

    /// Forwards an interim (1xx) response. HTTP/1.0 clients get none (RFC 9110 §15.2).
    pub fn send_interim(&mut self, head: &ResponseHead) -> io::Result<()> {
        if self.version == Version::Http10 {
            return Ok(());
        }
        if head.status == 100 {
            // We answer Expect ourselves; the upstream's 100 would be a second one.
            if !std::mem::take(&mut self.body.continue_owed) {
                return Ok(());
            }
        }
        let mut out = Vec::with_capacity(256);
        head.write_to(&mut out);
        self.stream.write_all(&out)
    }
}
