//! HTTP/1.1 message syntax (RFC 9112): heads, body framing, serialisation.

pub mod body;
pub mod cache_control;
pub mod chunked;
pub mod conditional;
pub mod headers;
pub mod request;
pub mod response;

pub use body::{BodyKind, ReadBuf};
pub use headers::Headers;
pub use request::{Framing, Limits, Request};
pub use response::ResponseHead;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }

    fn from_minor(minor: u8) -> Version {
        if minor == 0 {
            Version::Http10
        } else {
            Version::Http11
        }
    }
}

/// A message we refuse: the status to answer with and why, for the log and the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub reason: &'static str,
}

impl HttpError {
    pub const fn new(status: u16, reason: &'static str) -> HttpError {
        HttpError { status, reason }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

/// The canonical reason phrase for a status code.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Rejects a head with a bare CR or LF, or a NUL anywhere: httparse tolerates
/// bare LF line endings, and a peer that disagrees about line ends is the
/// classic way to smuggle a second request past us.
fn check_line_endings(head: &[u8]) -> Result<(), &'static str> {
    // Every head of every request and response comes through here, and almost
    // all are fine: one branch-free pass over byte pairs (which the compiler
    // turns into SIMD), and the reason looked for only when something is off.
    let Some((&first, rest)) = head.split_first() else {
        return Ok(());
    };
    let off = head.iter().zip(rest).fold(
        first == 0 || first == b'\n' || head.last() == Some(&b'\r'),
        |off, (&prev, &b)| {
            off | (b == 0) | ((b == b'\n') & (prev != b'\r')) | ((prev == b'\r') & (b != b'\n'))
        },
    );
    if off {
        return Err(line_ending_error(head));
    }
    Ok(())
}

/// What `check_line_endings` found wrong, the first rule broken in this order.
fn line_ending_error(head: &[u8]) -> &'static str {
    if memchr::memchr(0, head).is_some() {
        return "NUL byte in head";
    }
    let bare_lf = memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r');
    if bare_lf {
        "bare LF line ending"
    } else {
        "bare CR in head"
    }
}

/// Parses a Content-Length field set: every value must be digits and all must agree.
fn content_length(headers: &Headers) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    let mut present = false;
    for value in headers.get_all("content-length") {
        present = true;
        for item in headers::list_items(value) {
            if !item.iter().all(u8::is_ascii_digit) {
                return Err("malformed Content-Length");
            }
            let n = item
                .iter()
                .try_fold(0u64, |n, &d| {
                    n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
                })
                .ok_or("Content-Length too large")?;
            if length.is_some_and(|prev| prev != n) {
                return Err("conflicting Content-Length values");
            }
            length = Some(n);
        }
    }
    if length.is_none() && present {
        return Err("empty Content-Length");
    }
    Ok(length)
}

/// True if the last transfer coding is chunked, as framing requires (RFC 9112 §6.1).
fn chunked_is_last(headers: &Headers) -> bool {
    headers
        .list("transfer-encoding")
        .last()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
}

/// An IP address as text, in `buf`. IPv4 (nearly every client) is written
/// digit by digit: the `fmt` machinery would cost more than the rest of the
/// forwarding headers together.
pub fn ip_in(buf: &mut [u8; 64], ip: std::net::IpAddr) -> &[u8] {
    let std::net::IpAddr::V4(v4) = ip else {
        return display_in(buf, ip);
    };
    let mut n = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    &buf[..n]
}

/// `n` in decimal, in `buf`: a Content-Length on every response, so written
/// digit by digit rather than through `fmt`.
pub fn decimal_in(buf: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

/// `value` formatted into `buf` without allocating (numbers and addresses
/// in header values); cut short if `buf` is too small.
pub fn display_in(buf: &mut [u8], value: impl std::fmt::Display) -> &[u8] {
    let size = buf.len();
    let mut rest = &mut buf[..];
    let _ = std::io::Write::write_fmt(&mut rest, format_args!("{value}"));
    let written = size - rest.len();
    &buf[..written]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_in_writes_what_display_writes() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "192.168.100.255",
            "9.99.100.199",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let addr: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_in(&mut [0; 64], addr), ip.as_bytes());
        }
    }

    #[test]
    fn content_length_fields_must_be_digits_and_agree() {
        let length = |values: &[&str]| {
            let mut h = Headers::new();
            for v in values {
                h.append("Content-Length", v);
            }
            content_length(&h)
        };
        assert_eq!(length(&[]), Ok(None));
        assert_eq!(length(&["0"]), Ok(Some(0)));
        assert_eq!(length(&["18446744073709551615"]), Ok(Some(u64::MAX)));
        assert_eq!(length(&["5, 5", "5"]), Ok(Some(5)));
        assert_eq!(length(&["", "7"]), Ok(Some(7)));
        assert_eq!(
            length(&["5", "6"]),
            Err("conflicting Content-Length values")
        );
        assert_eq!(length(&["5,6"]), Err("conflicting Content-Length values"));
        assert_eq!(length(&["5x"]), Err("malformed Content-Length"));
        assert_eq!(length(&["-1"]), Err("malformed Content-Length"));
        assert_eq!(
            length(&["18446744073709551616"]),
            Err("Content-Length too large")
        );
        assert_eq!(length(&[""]), Err("empty Content-Length"));
    }

    #[test]
    fn line_ending_check_agrees_with_the_rules_on_any_bytes() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let head: Vec<u8> = (0..rng.usize(0..24))
                .map(|_| *rng.choice(b"a \r\n\0").unwrap())
                .collect();
            let nul = head.contains(&0);
            let bare_lf =
                (0..head.len()).any(|i| head[i] == b'\n' && (i == 0 || head[i - 1] != b'\r'));
            let bare_cr =
                (0..head.len()).any(|i| head[i] == b'\r' && head.get(i + 1) != Some(&b'\n'));
            let expected = match () {
                _ if nul => Err("NUL byte in head"),
                _ if bare_lf => Err("bare LF line ending"),
                _ if bare_cr => Err("bare CR in head"),
                _ => Ok(()),
            };
            assert_eq!(check_line_endings(&head), expected, "{head:?}");
        }
    }

    #[test]
    fn decimal_in_writes_what_display_writes() {
        for n in [0, 7, 10, 65_536, 1 << 40, u64::MAX] {
            assert_eq!(decimal_in(&mut [0; 20], n), n.to_string().as_bytes());
        }
    }

    #[test]
    fn line_endings_must_be_crlf() {
        assert_eq!(
            check_line_endings(b"GET / HTTP/1.1\r\nA: b\r\n\r\n"),
            Ok(())
        );
        assert_eq!(
            check_line_endings(b"GET / HTTP/1.1\nA: b\r\n\r\n"),
            Err("bare LF line ending")
        );
        assert_eq!(
            check_line_endings(b"\nGET / HTTP/1.1\r\n\r\n"),
            Err("bare LF line ending")
        );
        assert_eq!(
            check_line_endings(b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n"),
            Err("bare CR in head")
        );
        assert_eq!(
            check_line_endings(b"GET / HTTP/1.1\r\n\r\n\r"),
            Err("bare CR in head")
        );
        assert_eq!(
            check_line_endings(b"GET / HTTP/1.1\r\nA: \0\r\n\r\n"),
            Err("NUL byte in head")
        );
    }
}
