//! Cache-Control and the fields that share its syntax (RFC 9111 §5.2).

use super::headers::{list_items, trim};
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
    /// One pass over the fields, no allocation: this runs twice per request.
    pub fn parse_field(headers: &Headers, field: &str) -> Directives {
        let mut d = Directives::default();
        let mut cache_control = false;
        let mut pragma_no_cache = false;
        for (name, value) in headers.iter() {
            cache_control |= name.eq_ignore_ascii_case(b"cache-control");
            if name.eq_ignore_ascii_case(field.as_bytes()) {
                list_items(value).for_each(|item| d.apply(item));
            } else if name.eq_ignore_ascii_case(b"pragma") {
                pragma_no_cache |=
                    list_items(value).any(|item| item.eq_ignore_ascii_case(b"no-cache"));
            }
        }
        // HTTP/1.0 clients say Pragma: no-cache (§5.4), when Cache-Control is absent.
        if !cache_control && pragma_no_cache {
            d.no_cache = true;
        }
        d
    }

    /// Takes in one directive, `name` or `name=value`; unknown ones are ignored.
    fn apply(&mut self, item: &[u8]) {
        let (name, value) = match item.iter().position(|&b| b == b'=') {
            Some(eq) => (trim(&item[..eq]), Some(trim(&item[eq + 1..]))),
            None => (trim(item), None),
        };
        let seconds = value.and_then(|v| {
            let v = v.strip_prefix(b"\"").unwrap_or(v);
            let v = v.strip_suffix(b"\"").unwrap_or(v);
            std::str::from_utf8(v).ok()?.parse::<u64>().ok()
        });
        let is = |directive: &str| name.eq_ignore_ascii_case(directive.as_bytes());
        if is("no-store") {
            self.no_store = true;
        } else if is("no-cache") {
            self.no_cache = true;
        } else if is("private") {
            self.private = true;
        } else if is("public") {
            self.public = true;
        } else if is("must-revalidate") || is("proxy-revalidate") {
            self.must_revalidate = true;
        } else if is("only-if-cached") {
            self.only_if_cached = true;
        } else if is("max-age") {
            self.max_age = seconds;
        } else if is("s-maxage") {
            self.s_maxage = seconds;
        } else if is("min-fresh") {
            self.min_fresh = seconds;
        } else if is("max-stale") {
            self.max_stale = Some(seconds);
        } else if is("stale-if-error") {
            self.stale_if_error = seconds;
        } else if is("stale-while-revalidate") {
            self.stale_while_revalidate = seconds;
        }
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
