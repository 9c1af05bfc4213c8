//! Message body framing: how long a body is, and pulling it off a socket in
//! bounded pieces so nothing ever holds a whole body.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use super::chunked::{ChunkError, ChunkedDecoder, Step};

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    /// Only for responses: the body ends when the upstream closes.
    UntilClose,
}

/// Bytes read from a socket but not yet used: the rest of a head, a body, or
/// a pipelined request. Storage is dropped while a connection idles.
#[derive(Default)]
pub struct ReadBuf {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read took all the socket had (it left room, or found
    /// nothing): what arrives next will be announced by a new event.
    drained: bool,
}

/// One read asks the kernel for this much: a 64 KiB body and its head in
/// one read, and so in one write onward. At exactly 64 KiB, such a response
/// took two reads and two writes, the second of a few hundred bytes, which
/// woke the client twice: twice the context switches per response for the
/// proxy and for wrk (docs/PERFORMANCE.md, step 36).
const READ_SIZE: usize = 68 * 1024;

impl ReadBuf {
    pub fn filled(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn consume(&mut self, n: usize) {
        self.take(n);
    }

    /// Consumes `n` bytes and returns them; they stay valid until the next read.
    pub fn take(&mut self, n: usize) -> &[u8] {
        let start = self.start;
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        &self.bytes[start..start + n]
    }

    /// One `read` into free space; `Ok(0)` is end of stream.
    pub fn read_from(&mut self, src: &mut impl Read) -> io::Result<usize> {
        if self.bytes.len() < READ_SIZE {
            // No storage, or only the leftover `release` kept: a full buffer again.
            let mut storage = spare::take();
            let kept = self.end - self.start;
            storage[..kept].copy_from_slice(self.filled());
            self.bytes = storage;
            self.start = 0;
            self.end = kept;
        }
        if self.bytes.len() - self.end < READ_SIZE / 2 {
            if self.start > 0 {
                self.bytes.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.bytes.len() - self.end < READ_SIZE / 2 {
                self.bytes.resize(self.end + READ_SIZE, 0);
            }
        }
        let room = self.bytes.len() - self.end;
        let read = src.read(&mut self.bytes[self.end..]);
        self.drained = match &read {
            Ok(n) => *n < room,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        };
        let n = read?;
        self.end += n;
        Ok(n)
    }

    /// One read of what has already arrived on `stream`: `WouldBlock` rather
    /// than waiting, for sockets that may be reported readable spuriously.
    pub fn read_ready(&mut self, stream: &TcpStream) -> io::Result<usize> {
        self.read_from(&mut Arrived(stream))
    }

    /// Whether the last read emptied the socket (see `drained`).
    pub fn drained(&self) -> bool {
        self.drained
    }

    /// Gives up the storage of a buffer that holds little, so a connection
    /// that idles or waits costs little memory: bytes still unread (part of a
    /// head, a pipelined request) move to an allocation of their own size.
    /// A full-size buffer goes to the spares for the next connection that
    /// has bytes to read: no allocation or zeroing per request.
    pub fn release(&mut self) {
        let kept = self.end - self.start;
        if self.bytes.len() < READ_SIZE || kept > MAX_KEPT {
            return; // already small, or too much to copy
        }
        let unread = self.filled().to_vec();
        let storage = std::mem::replace(&mut self.bytes, unread);
        self.start = 0;
        self.end = kept;
        if storage.len() == READ_SIZE {
            spare::give_back(storage);
        }
    }
}

/// Reads a socket without waiting, whatever its blocking mode.
struct Arrived<'s>(&'s TcpStream);

impl Read for Arrived<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receives into a valid buffer of `out.len()` bytes from a socket we hold.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                out.as_mut_ptr().cast(),
                out.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// A buffer released with more unread bytes than this keeps its storage.
const MAX_KEPT: usize = READ_SIZE / 4;

/// Full-size read buffers not in use. Each thread keeps a few of its own, so
/// the usual take and give-back touch nothing another core holds (a shared
/// list cost two contended locks per read buffer); a shared list evens out
/// threads that take more than they give back, or the other way round.
mod spare {
    use std::cell::RefCell;

    use super::READ_SIZE;

    /// Kept per thread: a worker holds a client's and an upstream's buffer at most.
    const PER_THREAD: usize = 4;
    /// Kept in the shared list at most: enough for every worker to be reading at once.
    const SHARED: usize = 256;

    thread_local! {
        static MINE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }
    static SHARED_SPARES: parking_lot::Mutex<Vec<Vec<u8>>> = parking_lot::Mutex::new(Vec::new());

    pub fn take() -> Vec<u8> {
        MINE.with_borrow_mut(Vec::pop)
            .or_else(|| SHARED_SPARES.lock().pop())
            .unwrap_or_else(|| vec![0; READ_SIZE])
    }

    pub fn give_back(storage: Vec<u8>) {
        let Some(storage) = MINE.with_borrow_mut(|mine| {
            if mine.len() < PER_THREAD {
                mine.push(storage);
                return None;
            }
            Some(storage)
        }) else {
            return;
        };
        let mut shared = SHARED_SPARES.lock();
        if shared.len() < SHARED {
            shared.push(storage);
        }
    }
}

/// What has arrived of a body.
pub enum BodyPart<'b> {
    Data(&'b [u8]),
    /// The body is complete.
    End,
    /// Nothing more for now: the rest has not arrived yet.
    NotYet,
}

/// Why a body could not be read to its end.
#[derive(Debug)]
pub enum BodyError {
    /// Read error or timeout (`WouldBlock` / `TimedOut`).
    Io(io::Error),
    /// The peer closed before the body was complete.
    Closed,
    Malformed(ChunkError),
    /// More than the configured maximum.
    TooLarge,
}

impl From<io::Error> for BodyError {
    /// A read error; `UnexpectedEof` is the peer closing early.
    fn from(e: io::Error) -> BodyError {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => BodyError::Closed,
            _ => BodyError::Io(e),
        }
    }
}

impl BodyError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, BodyError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Io(e) if self.is_timeout() => write!(f, "timed out ({e})"),
            BodyError::Io(e) => write!(f, "{e}"),
            BodyError::Closed => f.write_str("connection closed before the body ended"),
            BodyError::Malformed(e) => write!(f, "malformed chunked body: {e:?}"),
            BodyError::TooLarge => f.write_str("body too large"),
        }
    }
}

/// Where a body stands: the explicit state machine over the framing kinds.
enum State {
    Length { remaining: u64 },
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// Pulls one body off a connection, piece by piece.
pub struct BodyReader {
    state: State,
    received: u64,
    /// 0: no limit.
    limit: u64,
}

/// Bounds chunk extensions per line and the whole trailer section.
const MAX_CHUNK_META: usize = 16 * 1024;

impl BodyReader {
    pub fn new(kind: BodyKind, limit: u64) -> BodyReader {
        let state = match kind {
            BodyKind::Empty | BodyKind::Length(0) => State::Done,
            BodyKind::Length(remaining) => State::Length { remaining },
            BodyKind::Chunked => State::Chunked(ChunkedDecoder::new(MAX_CHUNK_META)),
            BodyKind::UntilClose => State::UntilClose,
        };
        BodyReader {
            state,
            received: 0,
            limit,
        }
    }

    pub fn is_done(&self) -> bool {
        match &self.state {
            State::Done => true,
            State::Chunked(decoder) => decoder.is_done(),
            State::Length { .. } | State::UntilClose => false,
        }
    }

    /// Body bytes delivered so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// What is left of a fixed-length body, for a caller that can move it
    /// without reading it (see `bypassed`).
    pub fn length_remaining(&self) -> Option<u64> {
        match self.state {
            State::Length { remaining } => Some(remaining),
            _ => None,
        }
    }

    /// Records that `n` bytes of a fixed-length body went past the buffer.
    pub fn bypassed(&mut self, n: u64) {
        if let State::Length { remaining } = &mut self.state {
            *remaining -= n;
            self.received += n;
            if *remaining == 0 {
                self.state = State::Done;
            }
        }
    }

    /// Raw trailer lines of a chunked body (each ending in CRLF); empty otherwise.
    pub fn trailers(&self) -> &[u8] {
        match &self.state {
            State::Chunked(decoder) => decoder.trailers(),
            _ => &[],
        }
    }

    /// The next piece of body, reading from `src` into `buf` when `buf` runs dry.
    /// `Ok(None)` once the body has ended; bytes after it stay in `buf`.
    pub fn next<'b>(
        &mut self,
        src: &mut impl Read,
        buf: &'b mut ReadBuf,
    ) -> Result<Option<&'b [u8]>, BodyError> {
        loop {
            if self.is_done() {
                return Ok(None);
            }
            if buf.is_empty() {
                match buf.read_from(src) {
                    Ok(0) => return self.end_of_stream().map(|()| None),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(BodyError::Io(e)),
                }
            }
            let step = self.decode(buf.filled())?;
            if let Some(data) = step.data {
                self.received += data.len() as u64;
                if self.limit != 0 && self.received > self.limit {
                    return Err(BodyError::TooLarge);
                }
                return Ok(Some(&buf.take(step.consumed)[data]));
            }
            // Framing only: the decoder always consumes some of a non-empty input.
            buf.consume(step.consumed);
        }
    }

    /// The next piece that has already arrived on `stream` (or is in
    /// `buf`), never waiting. Sockets are watched edge-triggered: `NotYet`
    /// comes only once the socket is drained, so its next bytes are reported.
    pub fn next_arrived<'b>(
        &mut self,
        stream: &TcpStream,
        buf: &'b mut ReadBuf,
    ) -> Result<BodyPart<'b>, BodyError> {
        match self.next(&mut Arrived(stream), buf) {
            Ok(Some(data)) => Ok(BodyPart::Data(data)),
            Ok(None) => Ok(BodyPart::End),
            Err(BodyError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(BodyPart::NotYet),
            Err(e) => Err(e),
        }
    }

    fn decode(&mut self, input: &[u8]) -> Result<Step, BodyError> {
        let step = match &mut self.state {
            State::Done => Step {
                consumed: 0,
                data: None,
            },
            State::Length { remaining } => {
                let n = (*remaining).min(input.len() as u64) as usize;
                *remaining -= n as u64;
                if *remaining == 0 {
                    self.state = State::Done;
                }
                Step {
                    consumed: n,
                    data: Some(0..n),
                }
            }
            State::UntilClose => Step {
                consumed: input.len(),
                data: Some(0..input.len()),
            },
            // Stays in this state when done, to keep its trailers.
            State::Chunked(decoder) => decoder.decode(input).map_err(BodyError::Malformed)?,
        };
        Ok(step)
    }

    fn end_of_stream(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads everything `kind` frames from `input`, a few bytes per read.
    fn read_all(kind: BodyKind, input: &[u8], limit: u64) -> (Result<Vec<u8>, BodyError>, Vec<u8>) {
        let mut src = Trickle(input);
        let mut buf = ReadBuf::default();
        let mut reader = BodyReader::new(kind, limit);
        let mut body = Vec::new();
        let result = loop {
            match reader.next(&mut src, &mut buf) {
                Ok(Some(piece)) => body.extend_from_slice(piece),
                Ok(None) => break Ok(body),
                Err(e) => break Err(e),
            }
        };
        (result, buf.filled().to_vec())
    }

    /// A source that hands out at most 3 bytes per read.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(out.len()).min(3);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn length_stops_at_its_end() {
        let (body, rest) = read_all(BodyKind::Length(5), b"helloGET", 0);
        assert_eq!(body.unwrap(), b"hello");
        assert!(b"GET".starts_with(&rest), "{rest:?}");
    }

    #[test]
    fn chunked_leaves_the_next_request() {
        let input = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        let (body, _) = read_all(BodyKind::Chunked, input, 0);
        assert_eq!(body.unwrap(), b"abcde");
    }

    #[test]
    fn until_close_and_early_close() {
        assert_eq!(
            read_all(BodyKind::UntilClose, b"all of it", 0).0.unwrap(),
            b"all of it"
        );
        assert!(matches!(
            read_all(BodyKind::Length(10), b"short", 0).0,
            Err(BodyError::Closed)
        ));
        assert!(matches!(
            read_all(BodyKind::Chunked, b"5\r\nab", 0).0,
            Err(BodyError::Closed)
        ));
    }

    #[test]
    fn limit_applies_to_decoded_bytes() {
        assert!(matches!(
            read_all(BodyKind::Chunked, b"4\r\nabcd\r\n0\r\n\r\n", 3).0,
            Err(BodyError::TooLarge)
        ));
        assert_eq!(read_all(BodyKind::Length(3), b"abc", 3).0.unwrap(), b"abc");
    }

    #[test]
    fn released_buffers_are_reused() {
        let mut buf = ReadBuf::default();
        buf.read_from(&mut &b"abc"[..]).unwrap();
        buf.consume(3);
        buf.release();
        assert!(buf.bytes.is_empty());
        buf.read_from(&mut &b"xyz"[..]).unwrap();
        assert_eq!(buf.filled(), b"xyz");
        assert_eq!(buf.bytes.len(), READ_SIZE);
    }

    #[test]
    fn a_64_kib_body_and_its_head_come_in_one_read() {
        // The head nginx sends for a static 64 KiB file, and a request id.
        let head = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n\
            Date: Wed, 02 Dec 2026 10:30:41 GMT\r\nContent-Type: application/octet-stream\r\n\
            Content-Length: 65536\r\nLast-Modified: Wed, 02 Dec 2026 10:29:17 GMT\r\n\
            Connection: keep-alive\r\nETag: \"692ebf0d-10000\"\r\nAccept-Ranges: bytes\r\n\
            Cache-Control: no-store\r\nX-Request-Id: 01a2364f-c420-71a9-a149-2a3b76ac2143\r\n\r\n";
        let response = [&head[..], &[b'x'; 64 * 1024]].concat();
        let mut buf = ReadBuf::default();
        let n = buf.read_from(&mut &response[..]).unwrap();
        assert_eq!(n, response.len());
        assert!(buf.drained());
    }

    #[test]
    fn a_released_buffer_keeps_unread_bytes_in_their_own_size() {
        let mut buf = ReadBuf::default();
        buf.read_from(&mut &b"GET /a\r\n\r\nGET /b"[..]).unwrap();
        buf.consume(10);
        buf.release();
        assert_eq!(buf.bytes.len(), 6);
        assert_eq!(buf.filled(), b"GET /b");
        buf.read_from(&mut &b" HTTP/1.1"[..]).unwrap();
        assert_eq!(buf.filled(), b"GET /b HTTP/1.1");
        assert_eq!(buf.bytes.len(), READ_SIZE);

        // Too much left to copy: the buffer stays as it is.
        let mut big = ReadBuf::default();
        big.read_from(&mut &vec![b'x'; MAX_KEPT + 1][..]).unwrap();
        big.release();
        assert_eq!(big.bytes.len(), READ_SIZE);
        assert_eq!(big.filled().len(), MAX_KEPT + 1);
    }
}
