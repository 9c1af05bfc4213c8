//! Response heads: parsing what an upstream sends, and writing what we send.

use std::mem::MaybeUninit;

use super::{
    check_line_endings, chunked_is_last, content_length, reason_phrase, BodyKind, Headers,
    HttpError, Version,
};

#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    /// The upstream's reason phrase; `None` writes the canonical one.
    pub reason: Option<String>,
    pub version: Version,
    pub headers: Headers,
}

impl ResponseHead {
    pub fn new(status: u16) -> ResponseHead {
        ResponseHead {
            status,
            reason: None,
            version: Version::Http11,
            headers: Headers::new(),
        }
    }

    pub fn is_informational(&self) -> bool {
        (100..200).contains(&self.status)
    }

    /// Status line and fields, up to and including the blank line.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let reason = self.reason.as_deref().unwrap_or(reason_phrase(self.status));
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(itoa3(self.status).as_slice());
        out.push(b' ');
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        self.headers.write_to(out);
        out.extend_from_slice(b"\r\n");
    }

    /// Whether the upstream lets us reuse its connection after this response.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.headers.has_token("connection", "close"),
            Version::Http10 => self.headers.has_token("connection", "keep-alive"),
        }
    }
}

fn itoa3(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

const fn bad(reason: &'static str) -> HttpError {
    HttpError::new(502, reason)
}

/// More header fields than this in an upstream response is a 502.
const MAX_RESPONSE_HEADERS: usize = 128;

/// Parses an upstream response head from the front of `buf`.
/// `Ok(None)`: incomplete. Errors carry 502.
pub fn parse(buf: &[u8], max_size: usize) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let mut storage = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut storage,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_size => {
            return Err(bad("upstream response head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(bad("malformed upstream response head")),
    };
    check_line_endings(&buf[..len]).map_err(|_| bad("malformed upstream response head"))?;
    let headers = Headers::from_parsed(&buf[..len], res.headers);
    let status = res.code.unwrap_or_default();
    let reason = res.reason.unwrap_or_default();
    let head = ResponseHead {
        status,
        reason: (reason != reason_phrase(status)).then(|| reason.to_owned()),
        version: Version::from_minor(res.version.unwrap_or(1)),
        headers,
    };
    Ok(Some((head, len)))
}

/// How the body of an upstream response is delimited (RFC 9112 §6.3).
pub fn body_kind(head: &ResponseHead, head_request: bool) -> Result<BodyKind, HttpError> {
    if head_request || head.is_informational() || matches!(head.status, 204 | 304) {
        return Ok(BodyKind::Empty);
    }
    let length = content_length(&head.headers).map_err(bad)?;
    if head.headers.contains("transfer-encoding") {
        if length.is_some() {
            return Err(bad(
                "upstream sent both Transfer-Encoding and Content-Length",
            ));
        }
        return Ok(if chunked_is_last(&head.headers) {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        });
    }
    Ok(match length {
        Some(0) => BodyKind::Empty,
        Some(n) => BodyKind::Length(n),
        None => BodyKind::UntilClose,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_writes_back() {
        let raw =
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a\r\nSet-Cookie: b\r\nContent-Length: 2\r\n\r\nhi";
        let (head, len) = parse(raw, 1024).unwrap().unwrap();
        assert_eq!(len, raw.len() - 2);
        assert_eq!(body_kind(&head, false).unwrap(), BodyKind::Length(2));
        assert_eq!(body_kind(&head, true).unwrap(), BodyKind::Empty);
        let mut out = Vec::new();
        head.write_to(&mut out);
        assert_eq!(out, &raw[..len]);
    }

    #[test]
    fn keeps_custom_reason() {
        let (head, _) = parse(b"HTTP/1.1 404 Gone Fishing\r\n\r\n", 1024)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        head.write_to(&mut out);
        assert!(out.starts_with(b"HTTP/1.1 404 Gone Fishing\r\n"));
    }

    #[test]
    fn framing_of_upstream_bodies() {
        let kind = |raw: &[u8]| body_kind(&parse(raw, 1024).unwrap().unwrap().0, false);
        assert_eq!(
            kind(b"HTTP/1.1 200 OK\r\n\r\n").unwrap(),
            BodyKind::UntilClose
        );
        assert_eq!(kind(b"HTTP/1.1 204 No\r\n\r\n").unwrap(), BodyKind::Empty);
        assert_eq!(
            kind(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap(),
            BodyKind::Chunked
        );
        assert_eq!(
            kind(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
                .unwrap_err()
                .status,
            502
        );
        assert_eq!(
            kind(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
                .unwrap_err()
                .status,
            502
        );
        assert!(parse(b"HTTP/1.1 200 OK\nA: b\r\n\r\n", 1024).is_err());
    }
}
