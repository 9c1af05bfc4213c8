//! Chunked transfer coding (RFC 9112 §7.1): a streaming decoder and encoder helpers.
//!
//! The decoder walks the framing one byte at a time through an explicit state
//! machine, so input may be split anywhere, and hands body data back as ranges
//! of the caller's buffer instead of copying it. It is strict where leniency
//! would let two parsers disagree about where a message ends (bare LF, bare CR,
//! size overflow), because a proxy that disagrees with its upstream is open to
//! request smuggling.

use std::ops::Range;

/// Why decoding failed; every variant means "answer 400 (or 502 upstream) and close".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// chunk-size is not hex, is empty, or has junk after it
    InvalidSize,
    /// chunk-size does not fit in u64 (more than 16 hex digits after leading zeros, or overflow)
    SizeOverflow,
    /// a line that should end in CRLF does not (bare LF, bare CR, missing CRLF after data)
    InvalidLineEnding,
    /// chunk extension contains bytes that are not allowed (control chars other than HTAB)
    InvalidExtension,
    /// the trailer section is malformed (no colon, whitespace before colon, control bytes, obs-fold)
    InvalidTrailer,
    /// extensions on one chunk line, or the whole trailer section, exceed the limit given to `new`
    TooLarge,
}

/// One decoding step over the bytes the caller has buffered.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    /// how many bytes of `input` this step used (framing plus data)
    pub consumed: usize,
    /// body data found, as a range into `input` (always within `..consumed`)
    pub data: Option<Range<usize>>,
}

/// Where the decoder is in the grammar; each state names what the next byte may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Start of a chunk line: a hex digit must come first (no leading whitespace).
    SizeStart,
    /// Inside chunk-size.
    Size,
    /// BWS after chunk-size; only more BWS, `;` or CR may follow.
    SizeBws,
    /// Skipping chunk-ext up to CR; extensions carry no meaning for a proxy.
    Extension,
    /// Saw the CR ending a chunk line.
    SizeLf,
    /// Inside chunk-data; `size` bytes remain.
    Data,
    /// Expecting the CR after chunk-data.
    DataCr,
    /// Expecting the LF after chunk-data.
    DataLf,
    /// Start of a trailer field line, or of the final CRLF.
    TrailerStart,
    /// Inside a trailer field-name.
    TrailerName,
    /// Inside a trailer field-value (after the colon).
    TrailerValue,
    /// Saw the CR ending a trailer field line.
    TrailerLf,
    /// Saw the CR of the final CRLF.
    EndLf,
    /// The message is complete; later bytes belong to the next message.
    Done,
}

/// Streaming decoder for one chunked message body.
///
/// After `decode` returns an error the message is unrecoverable; drop the decoder.
pub struct ChunkedDecoder {
    state: State,
    /// The chunk-size while parsing it, then the data bytes left in the chunk.
    size: u64,
    /// Bytes after chunk-size on the current chunk line (BWS and extensions).
    meta: usize,
    max_meta: usize,
    /// Raw trailer field lines; its length is what `max_meta` bounds.
    trailers: Vec<u8>,
}

impl ChunkedDecoder {
    /// `max_meta` bounds the bytes of extensions on a single chunk line and the bytes of the whole trailer section.
    pub fn new(max_meta: usize) -> Self {
        ChunkedDecoder {
            state: State::SizeStart,
            size: 0,
            meta: 0,
            max_meta,
            trailers: Vec::new(),
        }
    }

    /// Consumes framing bytes from `input` and returns at most one run of data.
    /// Returns consumed==0 and data==None only when `input` is empty or the decoder is done.
    /// Must accept input split at ANY byte boundary (one byte at a time must work).
    pub fn decode(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        let mut pos = 0;
        while pos < input.len() && self.state != State::Done {
            if self.state == State::Data {
                let avail = input.len() - pos;
                // A chunk may be larger than the address space on 32-bit targets.
                let n = avail.min(usize::try_from(self.size).unwrap_or(usize::MAX));
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Step {
                    consumed: pos + n,
                    data: Some(pos..pos + n),
                });
            }
            self.step(input[pos])?;
            pos += 1;
        }
        Ok(Step {
            consumed: pos,
            data: None,
        })
    }

    /// True once the last-chunk, trailers and final CRLF have all been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Raw trailer field lines received, each ending in "\r\n" (empty when none). Valid once done.
    pub fn trailers(&self) -> &[u8] {
        &self.trailers
    }

    /// Advances the state machine by one framing byte.
    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        use ChunkError::*;

        if let (State::SizeStart | State::Size, Some(d)) = (self.state, char::from(b).to_digit(16))
        {
            // Leading zeros never shift bits out, so this counts significant digits only.
            if self.size >> 60 != 0 {
                return Err(SizeOverflow);
            }
            self.size = self.size << 4 | u64::from(d);
            self.state = State::Size;
            return Ok(());
        }

        self.state = match (self.state, b) {
            // Like hyper, tolerate BWS before `;` and before CR, but never before the size.
            (State::Size | State::SizeBws, b' ' | b'\t') => {
                self.count_meta()?;
                State::SizeBws
            }
            (State::Size | State::SizeBws, b';') => {
                self.count_meta()?;
                State::Extension
            }
            (State::Size | State::SizeBws | State::Extension, b'\r') => State::SizeLf,
            (State::SizeStart | State::Size | State::SizeBws | State::Extension, b'\n') => {
                return Err(InvalidLineEnding);
            }
            (State::SizeStart | State::Size | State::SizeBws, _) => return Err(InvalidSize),
            (State::Extension, _) if is_ctl(b) => return Err(InvalidExtension),
            (State::Extension, _) => {
                self.count_meta()?;
                State::Extension
            }
            (State::SizeLf, b'\n') => {
                self.meta = 0;
                if self.size == 0 {
                    State::TrailerStart
                } else {
                    State::Data
                }
            }
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::SizeStart,
            (State::TrailerStart, b'\r') => State::EndLf,
            (State::TrailerStart | State::TrailerName, _) if is_tchar(b) => {
                self.push_trailer(b)?;
                State::TrailerName
            }
            (State::TrailerName, b':') => {
                self.push_trailer(b)?;
                State::TrailerValue
            }
            (State::TrailerStart | State::TrailerName | State::TrailerValue, b'\n') => {
                return Err(InvalidLineEnding);
            }
            // Covers obs-fold, empty names, whitespace before the colon and a missing colon.
            (State::TrailerStart | State::TrailerName, _) => return Err(InvalidTrailer),
            (State::TrailerValue, b'\r') => {
                self.push_trailer(b)?;
                State::TrailerLf
            }
            (State::TrailerValue, _) if is_ctl(b) => return Err(InvalidTrailer),
            (State::TrailerValue, _) => {
                self.push_trailer(b)?;
                State::TrailerValue
            }
            (State::TrailerLf, b'\n') => {
                self.push_trailer(b)?;
                State::TrailerStart
            }
            (State::EndLf, b'\n') => State::Done,
            (
                State::SizeLf | State::DataCr | State::DataLf | State::TrailerLf | State::EndLf,
                _,
            ) => {
                return Err(InvalidLineEnding);
            }
            (State::Data | State::Done, _) => {
                unreachable!("decode never steps in {:?}", self.state)
            }
        };
        Ok(())
    }

    /// Counts one byte of BWS/extension so an endless chunk line cannot stall us.
    fn count_meta(&mut self) -> Result<(), ChunkError> {
        self.meta += 1;
        if self.meta > self.max_meta {
            return Err(ChunkError::TooLarge);
        }
        Ok(())
    }

    /// Stores one trailer byte, bounding the memory a peer can make us hold.
    fn push_trailer(&mut self, b: u8) -> Result<(), ChunkError> {
        if self.trailers.len() >= self.max_meta {
            return Err(ChunkError::TooLarge);
        }
        self.trailers.push(b);
        Ok(())
    }
}

/// Control bytes other than HTAB (CR and LF are handled by the caller first).
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// RFC 9110 §5.6.2 tchar.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Appends the framing that goes before `len` bytes of chunk data: "{len:x}\r\n". len must be > 0.
pub fn encode_chunk_header(out: &mut Vec<u8>, len: usize) {
    // A zero-length chunk would be read as the last-chunk and end the body early.
    debug_assert_ne!(len, 0, "a zero-size chunk is the last-chunk");
    out.extend_from_slice(format!("{len:x}\r\n").as_bytes());
}

/// The CRLF that follows each chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";

/// Appends the last-chunk, the given raw trailer lines (each already ending in "\r\n"), and the final CRLF.
pub fn encode_last_chunk(out: &mut Vec<u8>, trailers: &[u8]) {
    out.extend_from_slice(b"0\r\n");
    out.extend_from_slice(trailers);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 32;

    /// What a full decode produced: body, trailers, bytes used, done.
    type Decoded = (Vec<u8>, Vec<u8>, usize, bool);

    /// Feeds `input` in pieces of `split` bytes, keeping unconsumed bytes
    /// buffered as a real caller would, until input runs out or decoding ends.
    fn run_with(input: &[u8], split: usize, max_meta: usize) -> Result<Decoded, ChunkError> {
        let mut dec = ChunkedDecoder::new(max_meta);
        let (mut body, mut used) = (Vec::new(), 0);
        for end in (split..input.len() + split).step_by(split) {
            loop {
                let buf = &input[used..end.min(input.len())];
                let step = dec.decode(buf)?;
                if let Some(r) = step.data {
                    assert!(r.end <= step.consumed);
                    body.extend_from_slice(&buf[r]);
                }
                if step.consumed == 0 {
                    break;
                }
                used += step.consumed;
            }
        }
        Ok((body, dec.trailers().to_vec(), used, dec.is_done()))
    }

    /// Decodes at every split size and checks they all agree.
    fn run(input: &[u8]) -> Result<Decoded, ChunkError> {
        let whole = run_with(input, input.len().max(1), LIMIT);
        for split in 1..input.len() {
            assert_eq!(run_with(input, split, LIMIT), whole, "split {split}");
        }
        whole
    }

    fn body(input: &[u8]) -> Vec<u8> {
        let (body, _, used, done) = run(input).unwrap();
        assert!(done);
        assert_eq!(used, input.len());
        body
    }

    #[test]
    fn simple_body() {
        assert_eq!(body(b"5\r\nhello\r\n0\r\n\r\n"), b"hello");
    }

    #[test]
    fn empty_body() {
        assert_eq!(body(b"0\r\n\r\n"), b"");
    }

    #[test]
    fn many_chunks() {
        let input =
            b"1\r\na\r\n2\r\nbc\r\nA\r\n0123456789\r\n00010\r\n0123456789abcdef\r\n000\r\n\r\n";
        assert_eq!(body(input), b"abc01234567890123456789abcdef");
    }

    #[test]
    fn extensions_are_skipped() {
        let input = b"5;foo=bar\r\nhello\r\n6 ; a = \"b;c\\\"d\" ;x\r\n world\r\n0;last\t\r\n\r\n";
        assert_eq!(body(input), b"hello world");
        assert_eq!(body(b"5 \r\nhello\r\n0\r\n\r\n"), b"hello");
    }

    #[test]
    fn trailers_collected() {
        let input = b"3\r\nabc\r\n0\r\nExpires: x\r\nX-Sum:\t1 2\r\n\r\n";
        let (body, trailers, used, done) = run(input).unwrap();
        assert!(done);
        assert_eq!(used, input.len());
        assert_eq!(body, b"abc");
        assert_eq!(trailers, b"Expires: x\r\nX-Sum:\t1 2\r\n");
    }

    #[test]
    fn one_byte_at_a_time() {
        let input = b"4;e=1\r\nwiki\r\n5\r\npedia\r\n0\r\nA: b\r\n\r\n";
        let mut dec = ChunkedDecoder::new(LIMIT);
        let mut body = Vec::new();
        for (i, b) in input.iter().enumerate() {
            assert!(!dec.is_done(), "done early at {i}");
            let step = dec.decode(std::slice::from_ref(b)).unwrap();
            assert_eq!(step.consumed, 1);
            if let Some(r) = step.data {
                body.extend_from_slice(&std::slice::from_ref(b)[r]);
            }
        }
        assert!(dec.is_done());
        assert_eq!(body, b"wikipedia");
        assert_eq!(dec.trailers(), b"A: b\r\n");
    }

    #[test]
    fn stops_at_end_of_message() {
        let input = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        let (body, _, used, done) = run(input).unwrap();
        assert!(done);
        assert_eq!(body, b"abc");
        assert_eq!(&input[used..], b"GET / HTTP/1.1\r\n");

        let mut dec = ChunkedDecoder::new(LIMIT);
        let step = dec.decode(input).unwrap();
        assert_eq!(step.consumed, 6);
        assert_eq!(step.data, Some(3..6));
        let step = dec.decode(&input[6..]).unwrap();
        assert_eq!(step.consumed, 7);
        assert_eq!(step.data, None);
        assert!(dec.is_done());
        let step = dec.decode(&input[13..]).unwrap();
        assert_eq!(
            step,
            Step {
                consumed: 0,
                data: None
            }
        );
    }

    #[test]
    fn largest_size_fits() {
        let (body, _, used, done) = run(b"ffffffffffffffff\r\nab").unwrap();
        assert!(!done);
        assert_eq!((body.as_slice(), used), (&b"ab"[..], 20));
        let (_, _, used, _) = run(b"0000ffffffffffffffff\r\n").unwrap();
        assert_eq!(used, 22);
    }

    #[test]
    fn errors() {
        use ChunkError::*;
        let cases: &[(&[u8], ChunkError)] = &[
            (b"5\nhello\r\n", InvalidLineEnding),
            (b"5\rhello\r\n", InvalidLineEnding),
            (b"5;a\nhello\r\n", InvalidLineEnding),
            (b"5\r\nhello\n0\r\n\r\n", InvalidLineEnding),
            (b"5\r\nhelloX", InvalidLineEnding),
            (b"5\r\nhello\rX", InvalidLineEnding),
            (b"0\r\n\n", InvalidLineEnding),
            (b"0\r\n\rX", InvalidLineEnding),
            (b"0\r\nA: b\n\r\n", InvalidLineEnding),
            (b"0\r\nA: b\rX", InvalidLineEnding),
            (b"\n", InvalidLineEnding),
            (b"g\r\n", InvalidSize),
            (b"\r\n", InvalidSize),
            (b" 5\r\n", InvalidSize),
            (b"5x\r\n", InvalidSize),
            (b"5 x\r\n", InvalidSize),
            (b";a\r\n", InvalidSize),
            (b"-5\r\n", InvalidSize),
            (b"10000000000000000\r\n", SizeOverflow),
            (b"00fffffffffffffffff\r\n", SizeOverflow),
            (b"5;a\0b\r\nhello\r\n", InvalidExtension),
            (b"5;a\x7f\r\n", InvalidExtension),
            (b"0\r\nName : v\r\n\r\n", InvalidTrailer),
            (b"0\r\nA: b\r\n c\r\n\r\n", InvalidTrailer),
            (b"0\r\n\tA: b\r\n\r\n", InvalidTrailer),
            (b"0\r\nNoColon\r\n\r\n", InvalidTrailer),
            (b"0\r\n: v\r\n\r\n", InvalidTrailer),
            (b"0\r\nA: b\0c\r\n\r\n", InvalidTrailer),
            (b"0\r\nA(: b\r\n\r\n", InvalidTrailer),
            (b"5;aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n", TooLarge),
            (b"5                                 ;\r\n", TooLarge),
            (
                b"0\r\nA: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n\r\n",
                TooLarge,
            ),
            (
                b"0\r\nA: bbbbbbbbbbbbbb\r\nC: dddddddddddddd\r\n\r\n",
                TooLarge,
            ),
        ];
        for (input, err) in cases {
            assert_eq!(
                run(input),
                Err(*err),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn limits_are_inclusive() {
        // `;` plus 31 bytes is exactly LIMIT bytes of extension.
        let ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(LIMIT - 1));
        assert_eq!(body(ext.as_bytes()), b"hello");
        // "A: " plus value plus CRLF is exactly LIMIT bytes of trailers.
        let trailer = format!("A: {}\r\n", "b".repeat(LIMIT - 5));
        let (_, trailers, _, done) = run(format!("0\r\n{trailer}\r\n").as_bytes()).unwrap();
        assert!(done);
        assert_eq!(trailers, trailer.as_bytes());
    }

    #[test]
    fn encoder_round_trips() {
        let lens = [1, 15, 16, 255, 4096];
        let data: Vec<u8> = (0..=255u8).cycle().take(lens.iter().sum()).collect();
        let trailers = b"X-Checksum: abc\r\nX-N: 1\r\n";
        let mut wire = Vec::new();
        let mut rest = &data[..];
        for len in lens {
            let (chunk, tail) = rest.split_at(len);
            encode_chunk_header(&mut wire, chunk.len());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(CHUNK_END);
            rest = tail;
        }
        encode_last_chunk(&mut wire, trailers);
        assert!(wire.starts_with(b"1\r\n"));
        assert!(wire.ends_with(b"\r\n0\r\nX-Checksum: abc\r\nX-N: 1\r\n\r\n"));

        let (body, got, used, done) = run_with(&wire, 7, LIMIT).unwrap();
        assert!(done);
        assert_eq!(used, wire.len());
        assert_eq!(body, data);
        assert_eq!(got, trailers);
    }

    #[test]
    fn encoder_hex_sizes() {
        let mut out = Vec::new();
        encode_chunk_header(&mut out, 0x1a2b);
        encode_last_chunk(&mut out, b"");
        assert_eq!(out, b"1a2b\r\n0\r\n\r\n");
    }
}
