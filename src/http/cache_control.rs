//! Cache-Control and the fields that share its syntax (RFC 9111 §5.2).

use super::Headers;

/// Cache-Control directives (RFC 9111 §5.2, RFC 5861) that a cache acts on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub only_if_cached: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub min_fresh: Option<u64>,
    /// `Some(None)`: any staleness is acceptable.
    pub max_stale: Option<Option<u64>>,
    pub stale_if_error: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
}

impl Directives {
    /// The Cache-Control field (and Pragma: no-cache from HTTP/1.0 clients).
    pub fn parse(headers: &Headers) -> Directives {
        Directives::parse_field(headers, "cache-control")
    }

    /// A field with Cache-Control syntax (also CDN-Cache-Control, Surrogate-Control).
    pub fn parse_field(headers: &Headers, field: &str) -> Directives {
        let mut d = Directives::default();
        for item in headers.list(field) {
            let item = String::from_utf8_lossy(item);
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (item.trim(), None),
            };
            let seconds = value.and_then(|v| v.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                "only-if-cached" => d.only_if_cached = true,
                "max-age" => d.max_age = seconds,
                "s-maxage" => d.s_maxage = seconds,
                "min-fresh" => d.min_fresh = seconds,
                "max-stale" => d.max_stale = Some(seconds),
                "stale-if-error" => d.stale_if_error = seconds,
                "stale-while-revalidate" => d.stale_while_revalidate = seconds,
                _ => {}
            }
        }
        // HTTP/1.0 clients say Pragma: no-cache (§5.4), when Cache-Control is absent.
        if !headers.contains("cache-control") && headers.has_token("pragma", "no-cache") {
            d.no_cache = true;
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Directives {
        let mut headers = Headers::new();
        headers.append("Cache-Control", value);
        Directives::parse(&headers)
    }

    #[test]
    fn directives_and_values() {
        let d = parse("public, max-age=60, s-maxage=\"120\", MUST-REVALIDATE, stale-if-error=5");
        assert!(d.public && d.must_revalidate);
        assert_eq!(
            (d.max_age, d.s_maxage, d.stale_if_error),
            (Some(60), Some(120), Some(5))
        );
        assert_eq!(parse("max-stale").max_stale, Some(None));
        assert_eq!(parse("max-stale=30").max_stale, Some(Some(30)));
        assert_eq!(
            parse("max-age=soon").max_age,
            None,
            "a malformed value is ignored"
        );
        assert_eq!(
            parse("private, no-store, x-unknown=1"),
            Directives {
                private: true,
                no_store: true,
                ..Directives::default()
            }
        );
    }

    #[test]
    fn pragma_no_cache_only_without_cache_control() {
        let mut headers = Headers::new();
        headers.append("Pragma", "no-cache");
        assert!(Directives::parse(&headers).no_cache);
        headers.append("Cache-Control", "max-age=5");
        assert!(!Directives::parse(&headers).no_cache);
    }
}
