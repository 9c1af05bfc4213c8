//! Request heads: parsing (httparse) plus the checks RFC 9112 asks of a server.

use std::mem::MaybeUninit;

use super::{
    check_line_endings, chunked_is_last, content_length, BodyKind, Headers, HttpError, Version,
};

/// How many header fields a head may carry at most, whatever the config says.
pub const MAX_HEADERS: usize = 255;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The target as received in origin-form (`/path?query`), or `*`.
    /// An absolute-form target is reduced to origin-form and its authority becomes Host.
    pub target: String,
    pub version: Version,
    pub headers: Headers,
}

impl Request {
    /// RFC 9110 §9.2.2: safe to send twice.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method.as_str(),
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }

    pub fn host(&self) -> Option<&str> {
        self.headers.get_str("host")
    }
}

/// What the head says about the exchange around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub body: BodyKind,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_request_line: usize,
    pub max_header_size: usize,
    pub max_headers: usize,
    /// 0: no limit.
    pub max_body_size: u64,
}

const fn bad(reason: &'static str) -> HttpError {
    HttpError::new(400, reason)
}

/// Parses one request head from the front of `buf`.
///
/// `Ok(None)`: the head is not complete yet (and within limits).
/// `Ok(Some((request, framing, len)))`: `len` bytes of `buf` were the head.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(Request, Framing, usize)>, HttpError> {
    // RFC 9112 §2.2: ignore empty lines before the request-line.
    let skipped = buf.chunks(2).take_while(|pair| *pair == b"\r\n").count() * 2;
    let buf = &buf[skipped..];

    let line_end = memchr::memchr(b'\n', buf);
    if line_end.unwrap_or(buf.len()) > limits.max_request_line {
        return Err(HttpError::new(414, "request line too long"));
    }

    let mut storage = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let slots = &mut storage[..limits.max_headers.min(MAX_HEADERS)];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_header_size => {
            return Err(HttpError::new(431, "request header section too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(431, "too many header fields"))
        }
        Err(httparse::Error::Version) => return Err(version_error(&buf[..line_end.unwrap_or(0)])),
        Err(e) => return Err(bad(parse_error_reason(e))),
    };
    if len > limits.max_header_size {
        return Err(HttpError::new(431, "request header section too large"));
    }
    check_line_endings(&buf[..len]).map_err(bad)?;

    let method = req.method.unwrap_or_default();
    let version = Version::from_minor(req.version.unwrap_or(1));
    let mut headers = Headers::from_parsed(&buf[..len], req.headers);
    let target = normalize_target(method, req.path.unwrap_or_default(), version, &mut headers)?;
    let framing = framing(version, &headers, limits)?;
    let request = Request {
        method: method.to_owned(),
        target,
        version,
        headers,
    };
    Ok(Some((request, framing, skipped + len)))
}

/// 505 for a well-formed version we do not speak (HTTP/2.0 in an HTTP/1 head), 400 for garbage.
fn version_error(request_line: &[u8]) -> HttpError {
    let line = request_line.strip_suffix(b"\r").unwrap_or(request_line);
    match line.rsplit(|&b| b == b' ').next() {
        Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor])
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            HttpError::new(505, "HTTP version not supported")
        }
        _ => bad("malformed HTTP version"),
    }
}

fn parse_error_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header field name",
        httparse::Error::HeaderValue => "invalid header field value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid method or request target",
        _ => "malformed request head",
    }
}

/// Checks the target's form against the method and settles Host (RFC 9112 §3.2).
fn normalize_target(
    method: &str,
    target: &str,
    version: Version,
    headers: &mut Headers,
) -> Result<String, HttpError> {
    if method == "CONNECT" {
        return Err(HttpError::new(501, "CONNECT is not supported"));
    }
    let hosts = headers.get_all("host").count();
    if hosts > 1 {
        return Err(bad("more than one Host field"));
    }
    if let Some(rest) = strip_scheme(target) {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() || authority.contains('@') || !valid_host(authority.as_bytes()) {
            return Err(bad("invalid authority in absolute-form target"));
        }
        headers.set("Host", authority);
        return Ok(match path.as_bytes().first() {
            Some(b'/') => path.to_owned(),
            _ => format!("/{path}"),
        });
    }
    if hosts == 0 && version == Version::Http11 {
        return Err(bad("missing Host field"));
    }
    if headers.get("host").is_some_and(|h| !valid_host(h)) {
        return Err(bad("invalid Host field"));
    }
    match target.as_bytes().first() {
        Some(b'/') => Ok(target.to_owned()),
        Some(b'*') if target == "*" && method == "OPTIONS" => Ok(target.to_owned()),
        _ => Err(bad("invalid request target")),
    }
}

fn strip_scheme(target: &str) -> Option<&str> {
    ["http://", "https://"].iter().find_map(|scheme| {
        let head = target.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme)
            .then(|| &target[scheme.len()..])
    })
}

/// uri-host [ ":" port ] characters (RFC 3986): no whitespace, '/', '@' or controls.
fn valid_host(host: &[u8]) -> bool {
    host.iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b))
}

/// Decides body length and connection reuse (RFC 9112 §6, §9.3), refusing
/// every ambiguity a smuggling attack could use.
fn framing(version: Version, headers: &Headers, limits: &Limits) -> Result<Framing, HttpError> {
    let length = content_length(headers).map_err(bad)?;
    let body = if headers.contains("transfer-encoding") {
        if length.is_some() {
            return Err(bad("both Transfer-Encoding and Content-Length"));
        }
        if version == Version::Http10 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !chunked_is_last(headers) {
            return Err(bad("final transfer coding is not chunked"));
        }
        if headers.list("transfer-encoding").count() > 1 {
            return Err(HttpError::new(501, "transfer codings other than chunked"));
        }
        BodyKind::Chunked
    } else {
        match length {
            None | Some(0) => BodyKind::Empty,
            Some(n) => BodyKind::Length(n),
        }
    };
    if let BodyKind::Length(n) = body {
        if limits.max_body_size != 0 && n > limits.max_body_size {
            return Err(HttpError::new(413, "request body too large"));
        }
    }

    let keep_alive = match version {
        Version::Http11 => !headers.has_token("connection", "close"),
        Version::Http10 => headers.has_token("connection", "keep-alive"),
    };
    let expect_continue = match headers.get("expect") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case(b"100-continue") => version == Version::Http11,
        Some(_) => return Err(HttpError::new(417, "unsupported expectation")),
    };
    Ok(Framing {
        body,
        keep_alive,
        expect_continue,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_request_line: 64,
        max_header_size: 256,
        max_headers: 8,
        max_body_size: 1000,
    };

    fn parse_ok(head: &str) -> (Request, Framing, usize) {
        parse(head.as_bytes(), &LIMITS).unwrap().unwrap()
    }

    fn status_of(head: &str) -> u16 {
        parse(head.as_bytes(), &LIMITS).unwrap_err().status
    }

    #[test]
    fn simple_get() {
        let (req, framing, len) = parse_ok("GET /a?b HTTP/1.1\r\nHost: x\r\n\r\nNEXT");
        assert_eq!((req.method.as_str(), req.target.as_str()), ("GET", "/a?b"));
        assert_eq!(len, 30);
        assert_eq!(framing.body, BodyKind::Empty);
        assert!(framing.keep_alive);
    }

    #[test]
    fn partial_then_complete() {
        assert!(parse(b"GET / HTTP/1.1\r\nHost:", &LIMITS)
            .unwrap()
            .is_none());
        assert!(parse(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", &LIMITS)
            .unwrap()
            .is_some());
    }

    #[test]
    fn absolute_form_sets_host() {
        let (req, _, _) = parse_ok("GET http://Example.com:81?q HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(req.target, "/?q");
        assert_eq!(req.host(), Some("Example.com:81"));
    }

    #[test]
    fn http10_keep_alive_rules() {
        assert!(!parse_ok("GET / HTTP/1.0\r\n\r\n").1.keep_alive);
        assert!(
            parse_ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .1
                .keep_alive
        );
        assert!(
            !parse_ok("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .1
                .keep_alive
        );
    }

    #[test]
    fn framing_choices() {
        let chunked = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_ok(chunked).1.body, BodyKind::Chunked);
        let same = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n";
        assert_eq!(parse_ok(same).1.body, BodyKind::Length(5));
        let expect =
            "PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-Continue\r\n\r\n";
        assert!(parse_ok(expect).1.expect_continue);
    }

    #[test]
    fn refusals_have_precise_statuses() {
        let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100));
        let big_head = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
            "a".repeat(300)
        );
        let many = format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", "A: b\r\n".repeat(9));
        let cases: &[(&str, u16)] = &[
            (&long_line, 414),
            (&big_head, 431),
            (&many, 431),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
            ("GET x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            ("GET / HTPT/1.1\r\nHost: a\r\n\r\n", 400),
            ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 501),
            ("GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n", 413),
            ("POST / HTTP/1.1\r\nHost: a\r\nExpect: teapot\r\n\r\n", 417),
        ];
        for (head, status) in cases {
            assert_eq!(status_of(head), *status, "{head:?}");
        }
    }
}
