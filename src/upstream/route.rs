//! `[[routes]]`: which upstream group a request goes to, and how its path
//! is rewritten on the way. All parts a route gives must match.

use std::sync::Arc;

use super::config::RouteConfig;
use super::Group;
use crate::http::Request;

pub struct Route {
    /// Lower-case; a leading `*.` matches any subdomain.
    host: Option<String>,
    path: PathMatch,
    method: Option<String>,
    headers: Vec<(String, String)>,
    pub group: Arc<Group>,
    rewrite: Option<Rewrite>,
}

enum PathMatch {
    Any,
    Prefix(String),
    Exact(String),
    Regex(regex::Regex),
}

/// What takes the place of the matched prefix.
struct Rewrite {
    prefix_len: usize,
    with: String,
}

impl Route {
    pub fn new(c: &RouteConfig, group: Arc<Group>) -> Route {
        let path = match (&c.path_prefix, &c.path_exact, &c.path_regex) {
            (Some(p), _, _) => PathMatch::Prefix(p.clone()),
            (_, Some(p), _) => PathMatch::Exact(p.clone()),
            (_, _, Some(r)) => PathMatch::Regex(r.0.clone()),
            _ => PathMatch::Any,
        };
        let rewrite = c.path_prefix.as_ref().and_then(|prefix| {
            let with = match (&c.replace_prefix, c.strip_prefix) {
                (Some(with), _) => with.clone(),
                (None, true) => "/".into(),
                (None, false) => return None,
            };
            Some(Rewrite {
                prefix_len: prefix.len(),
                with,
            })
        });
        Route {
            host: c.host.as_ref().map(|h| h.to_ascii_lowercase()),
            path,
            method: c.method.as_ref().map(|m| m.to_ascii_uppercase()),
            headers: c
                .header
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            group,
            rewrite,
        }
    }

    pub fn matches(&self, req: &Request) -> bool {
        let path = req.target.split('?').next().unwrap_or_default();
        self.method.as_ref().is_none_or(|m| *m == req.method)
            && self
                .host
                .as_ref()
                .is_none_or(|h| host_matches(h, req.host()))
            && match &self.path {
                PathMatch::Any => true,
                PathMatch::Prefix(p) => path.starts_with(p.as_str()),
                PathMatch::Exact(p) => path == p,
                PathMatch::Regex(r) => r.is_match(path),
            }
            && self
                .headers
                .iter()
                .all(|(name, value)| req.headers.get_all(name).any(|v| v == value.as_bytes()))
    }

    /// Strips or replaces the matched prefix in `req.target`.
    pub fn rewrite(&self, req: &mut Request) {
        let Some(rw) = &self.rewrite else { return };
        let rest = &req.target[rw.prefix_len..];
        let mut target = String::with_capacity(rw.with.len() + rest.len() + 1);
        target.push_str(&rw.with);
        // "/v1/" + "users" and "/v1" + "/users" both become "/users"; "" becomes "/".
        match (target.ends_with('/'), rest.starts_with('/')) {
            (true, true) => target.push_str(&rest[1..]),
            (false, false) if !rest.is_empty() && !rest.starts_with('?') => {
                target.push('/');
                target.push_str(rest);
            }
            _ => target.push_str(rest),
        }
        if !target.starts_with('/') {
            target.insert(0, '/');
        }
        req.target = target;
    }
}

/// `host` against a Host field, port and case aside.
fn host_matches(pattern: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !host.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    };
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            name.len() > domain.len() + 1
                && name[name.len() - domain.len()..].eq_ignore_ascii_case(domain)
                && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
        }
        None => name.eq_ignore_ascii_case(pattern),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_without_port_or_case() {
        assert!(host_matches(
            "api.example.com",
            Some("API.example.com:8080")
        ));
        assert!(host_matches("api.example.com", Some("api.example.com")));
        assert!(!host_matches("api.example.com", Some("www.example.com")));
        assert!(!host_matches("api.example.com", None));
        assert!(host_matches("*.example.com", Some("a.b.example.com")));
        assert!(!host_matches("*.example.com", Some("example.com")));
        assert!(!host_matches("*.example.com", Some("badexample.com")));
    }
}
