//! `[upstreams.<name>]` groups and `[[routes]]`: the keys, their defaults,
//! and the checks that need more than one key (reported with a line).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::RangeInclusive;

use serde::{Deserialize, Deserializer};

use crate::config::Dur;

/// One `[upstreams.<name>]` group of servers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    #[serde(default)]
    pub algorithm: Algorithm,
    /// What `consistent_hash` hashes; required by it, unused by the others.
    #[serde(default)]
    pub hash_key: Option<HashKey>,
    pub servers: Vec<ServerConfig>,
    /// A server that comes back ramps its weight up over this long.
    #[serde(default)]
    pub slow_start: Option<Dur>,
    /// Requests waiting for a server below its `max_conns`; past it, 503.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// Longest wait in that queue before 503.
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout: Dur,
    /// How often servers given by name are looked up again.
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: Dur,
    /// Active health checks; none without this section.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// No circuit breaker without this section.
    #[serde(default)]
    pub circuit_breaker: Option<BreakerConfig>,
    #[serde(default)]
    pub retry: RetryConfig,
}

fn default_queue_size() -> usize {
    128
}

fn default_queue_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}

fn default_resolve_interval() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConn,
    P2c,
    IpHash,
    ConsistentHash,
}

/// What a sticky request is recognised by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(String),
    Cookie(String),
    ClientIp,
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.split_once(':') {
            _ if text == "ip" => Ok(HashKey::ClientIp),
            Some(("header", name)) if !name.is_empty() => Ok(HashKey::Header(name.to_owned())),
            Some(("cookie", name)) if !name.is_empty() => Ok(HashKey::Cookie(name.to_owned())),
            _ => Err(serde::de::Error::custom(format!(
                "hash_key {text:?} must be \"header:NAME\", \"cookie:NAME\" or \"ip\""
            ))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `ip:port`, or `name:port`, looked up at start and every `resolve_interval`.
    pub addr: toml::Spanned<String>,
    #[serde(default = "one")]
    pub weight: Weight,
    /// Used only while no other server is available.
    #[serde(default)]
    pub backup: bool,
    #[serde(default)]
    pub state: AdminState,
    /// Requests in flight at once; 0: no limit. Others queue.
    #[serde(default)]
    pub max_conns: usize,
}

fn one() -> Weight {
    Weight(1)
}

/// A server weight, 1 to 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weight(pub u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u32::deserialize(d)? {
            w @ 1..=1000 => Ok(Weight(w)),
            w => Err(serde::de::Error::custom(format!(
                "weight {w} must be from 1 to 1000"
            ))),
        }
    }
}

/// What an operator set: whether a server takes new requests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    #[default]
    Up,
    /// Takes no requests.
    Down,
    /// Takes no new requests; those in flight finish.
    Draining,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// The path probed with HTTP; "" probes by opening a TCP connection.
    pub path: String,
    pub method: String,
    /// Host header of the probe; "" means the server's address.
    pub host: String,
    /// Statuses counted as healthy, e.g. "200-399" or "204".
    pub status: StatusRange,
    /// A string the body must contain; "" for any.
    pub body: String,
    pub interval: Dur,
    pub timeout: Dur,
    /// Passed probes in a row that bring a down server back.
    pub rise: u32,
    /// Failed probes in a row that take a server out.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: String::new(),
            method: "GET".into(),
            host: String::new(),
            status: StatusRange(200..=399),
            body: String::new(),
            interval: Dur(std::time::Duration::from_secs(2)),
            timeout: Dur(std::time::Duration::from_secs(1)),
            rise: 2,
            fall: 3,
        }
    }
}

/// Inclusive status range written "200-399" or "204".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRange(pub RangeInclusive<u16>);

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let (low, high) = text.split_once('-').unwrap_or((&text, &text));
        match (low.trim().parse::<u16>(), high.trim().parse::<u16>()) {
            (Ok(l), Ok(h)) if (100..=599).contains(&l) && (l..=599).contains(&h) => {
                Ok(StatusRange(l..=h))
            }
            _ => Err(serde::de::Error::custom(format!(
                "status {text:?} must be a status or a range like \"200-399\""
            ))),
        }
    }
}

/// Passive health: failures seen in real traffic take a server out.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// 5xx responses or connection failures in a row that eject a server; 0: never.
    pub max_fails: u32,
    /// The first ejection's length; each further one in a row adds as much.
    pub ejection: Dur,
    pub max_ejection: Dur,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            max_fails: 5,
            ejection: Dur(std::time::Duration::from_secs(10)),
            max_ejection: Dur(std::time::Duration::from_secs(300)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Outcomes are counted over windows this long.
    pub window: Dur,
    /// Fewest requests in a window before its failure ratio can trip.
    pub min_requests: u32,
    /// Failed share of a window's requests that opens the breaker; 0: off.
    pub failure_ratio: f64,
    /// Failures in a row that open it; 0: off.
    pub consecutive_failures: u32,
    /// How long it stays open before probing.
    pub open_for: Dur,
    /// Requests let through to probe; all must succeed to close it again.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: Dur(std::time::Duration::from_secs(10)),
            min_requests: 20,
            failure_ratio: 0.5,
            consecutive_failures: 5,
            open_for: Dur(std::time::Duration::from_secs(30)),
            half_open_probes: 3,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Further attempts after the first, each on another server; 0: none.
    pub retries: u32,
    /// Methods that may be retried.
    pub methods: Vec<String>,
    /// Response statuses retried besides connection failures, e.g. [502, 503, 504].
    pub statuses: Vec<u16>,
    /// Retries as a share of requests, at most (0.2: 20% extra load).
    pub budget: f64,
    /// Retries allowed before the budget has built up.
    pub budget_burst: u32,
    /// The first backoff; each further retry doubles it, with full jitter.
    pub backoff: Dur,
    pub backoff_max: Dur,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            retries: 1,
            methods: ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"]
                .map(String::from)
                .into(),
            statuses: Vec::new(),
            budget: 0.2,
            budget_burst: 10,
            backoff: Dur(std::time::Duration::from_millis(10)),
            backoff_max: Dur(std::time::Duration::from_millis(250)),
        }
    }
}

/// One `[[routes]]` entry: what it matches (all given parts must) and where it sends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub path_exact: Option<String>,
    pub path_regex: Option<PathRegex>,
    pub method: Option<String>,
    #[serde(default)]
    pub header: HashMap<String, String>,
    pub upstream: toml::Spanned<String>,
    /// Remove `path_prefix` from the forwarded path.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Put this in place of `path_prefix` in the forwarded path.
    pub replace_prefix: Option<String>,
}

/// A compiled `path_regex`; a bad pattern is a config error with its line.
pub struct PathRegex(pub regex::Regex);

impl fmt::Debug for PathRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for PathRegex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        regex::Regex::new(&text)
            .map(PathRegex)
            .map_err(|e| serde::de::Error::custom(format!("path_regex: {e}")))
    }
}

/// Checks that span keys: every route names a group, hash keys fit their
/// algorithm. Errors name the key and its line in `text`.
pub fn validate(
    upstreams: &BTreeMap<String, GroupConfig>,
    routes: &[RouteConfig],
    text: &str,
) -> Result<(), String> {
    let line =
        |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
    for (i, route) in routes.iter().enumerate() {
        let name = route.upstream.get_ref();
        if !upstreams.contains_key(name) {
            return Err(format!(
                "line {}: routes[{i}].upstream: no [upstreams.{name}] section",
                line(route.upstream.span())
            ));
        }
        let paths = [
            route.path_prefix.is_some(),
            route.path_exact.is_some(),
            route.path_regex.is_some(),
        ];
        if paths.iter().filter(|&&p| p).count() > 1 {
            return Err(format!(
                "line {}: routes[{i}]: give one of path_prefix, path_exact, path_regex",
                line(route.upstream.span())
            ));
        }
        if (route.strip_prefix || route.replace_prefix.is_some()) && route.path_prefix.is_none() {
            return Err(format!(
                "line {}: routes[{i}]: strip_prefix and replace_prefix need path_prefix",
                line(route.upstream.span())
            ));
        }
    }
    for (name, group) in upstreams {
        if group.hash_key.is_none() && group.algorithm == Algorithm::ConsistentHash {
            return Err(format!(
                "upstreams.{name}: algorithm consistent_hash needs hash_key"
            ));
        }
        for (i, server) in group.servers.iter().enumerate() {
            let addr = server.addr.get_ref();
            let problem = if !addr.contains(':') {
                Some(format!("{addr:?} needs a port (host:port)"))
            } else if addr.parse::<std::net::SocketAddr>().is_err() {
                super::resolve::resolve(addr).err()
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(format!(
                    "line {}: upstreams.{name}.servers[{i}].addr: {problem}",
                    line(server.addr.span())
                ));
            }
        }
    }
    Ok(())
}
