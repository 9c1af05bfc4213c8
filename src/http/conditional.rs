//! Conditional requests and byte ranges answered from a stored response
//! (RFC 9110 §13, §14).

use std::time::SystemTime;

use super::{Headers, Request, ResponseHead};

/// A date field (IMF-fixdate and the obsolete forms).
pub fn http_date(headers: &Headers, name: &str) -> Option<SystemTime> {
    headers
        .get_str(name)
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
}

/// Would the client's conditional request get 304 from this stored response?
/// If-None-Match (weak comparison) wins over If-Modified-Since (RFC 9110 §13.2.2).
pub fn not_modified(stored: &ResponseHead, req: &Request) -> bool {
    if req.headers.contains("if-none-match") {
        let Some(etag) = stored.headers.get("etag") else {
            return false;
        };
        return req
            .headers
            .list("if-none-match")
            .any(|tag| tag == b"*" || weak_eq(tag, etag));
    }
    match (
        http_date(&req.headers, "if-modified-since"),
        http_date(&stored.headers, "last-modified"),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// The single byte range a GET asks of a stored 200 of `total` bytes (RFC 9110
/// §14): `None` to send it whole (no Range, several ranges, a failed If-Range,
/// not bytes), `Some(None)` when unsatisfiable, else the inclusive range.
pub fn requested_range(
    stored: &ResponseHead,
    total: usize,
    req: &Request,
) -> Option<Option<(usize, usize)>> {
    if req.method != "GET" || stored.status != 200 {
        return None;
    }
    let spec = req
        .headers
        .get_str("range")?
        .trim()
        .strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    if let Some(validator) = req.headers.get("if-range") {
        // Strong comparison for an entity tag, exact match for a date.
        let etag_matches =
            !validator.starts_with(b"W/") && stored.headers.get("etag") == Some(validator);
        let date_matches = stored.headers.get("last-modified") == Some(validator);
        if !(etag_matches || date_matches) {
            return None;
        }
    }
    let (first, last) = spec.split_once('-')?;
    let range = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let n: usize = suffix.parse().ok()?;
            (n > 0 && total > 0).then(|| (total.saturating_sub(n), total - 1))
        }
        (first, last) => {
            let first: usize = first.parse().ok()?;
            let last = if last.is_empty() {
                usize::MAX
            } else {
                last.parse().ok()?
            };
            (first <= last && first < total).then(|| (first, last.min(total - 1)))
        }
    };
    Some(range)
}

/// Weak comparison of entity tags: equal opaque tags, W/ or not (RFC 9110 §8.8.3.2).
fn weak_eq(a: &[u8], b: &[u8]) -> bool {
    let opaque = |t: &[u8]| t.strip_prefix(b"W/").unwrap_or(t).to_vec();
    opaque(a) == opaque(super::headers::trim(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fields: &[(&str, &str)]) -> Request {
        let mut headers = Headers::new();
        for (n, v) in fields {
            headers.append(n, v);
        }
        Request {
            method: "GET".into(),
            target: "/".into(),
            version: super::super::Version::Http11,
            headers,
        }
    }

    fn stored() -> ResponseHead {
        let mut head = ResponseHead::new(200);
        head.headers.append("ETag", "W/\"v1\"");
        head.headers
            .append("Last-Modified", "Sat, 01 Nov 2025 10:00:00 GMT");
        head
    }

    #[test]
    fn if_none_match_wins_over_if_modified_since() {
        assert!(not_modified(
            &stored(),
            &request(&[("If-None-Match", "\"v1\"")])
        ));
        assert!(!not_modified(
            &stored(),
            &request(&[
                ("If-None-Match", "\"v2\""),
                ("If-Modified-Since", "Sun, 02 Nov 2025 10:00:00 GMT")
            ])
        ));
        assert!(not_modified(
            &stored(),
            &request(&[("If-Modified-Since", "Sun, 02 Nov 2025 10:00:00 GMT")])
        ));
        assert!(!not_modified(&stored(), &request(&[])));
    }

    #[test]
    fn ranges() {
        let range = |spec: &str| requested_range(&stored(), 10, &request(&[("Range", spec)]));
        assert_eq!(range("bytes=2-5"), Some(Some((2, 5))));
        assert_eq!(range("bytes=-3"), Some(Some((7, 9))));
        assert_eq!(range("bytes=9-"), Some(Some((9, 9))));
        assert_eq!(range("bytes=10-"), Some(None));
        assert_eq!(range("bytes=5-2"), Some(None));
        assert_eq!(range("bytes=0-1,3-4"), None);
        // A weak ETag never satisfies If-Range.
        let weak = request(&[("Range", "bytes=0-0"), ("If-Range", "W/\"v1\"")]);
        assert_eq!(requested_range(&stored(), 10, &weak), None);
    }
}
