//! Upstream groups: the servers requests are spread over and what decides
//! which one takes a request.
//!
//! The state lives here, shared by the pipeline stages that act on it:
//! `router` picks a group by `[[routes]]`, `circuit_breaker` guards the
//! group, `load_balancer` leases a server, `proxy_core` records each
//! attempt's outcome on the lease and retries through it, and
//! `outlier_detection` and `active_health` take failing servers out.

pub mod balance;
pub mod breaker;
pub mod config;
pub mod health;
pub mod resolve;
pub mod retry;
pub mod route;
pub mod server;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use self::balance::{hash_bytes, Balancer};
use self::breaker::CircuitBreaker;
use self::config::{AdminState, Algorithm, GroupConfig, HashKey, HealthConfig, RetryConfig};
use self::retry::RetryPolicy;
use self::route::Route;
use self::server::{Ejection, Server};
use crate::config::Config;
use crate::http::Request;
use crate::pipeline::Context;
use crate::wait::{Place, Waiters};

/// Every group, the routes to them, and the group of `server.backend_addr`
/// that takes what no route matches.
pub struct Upstreams {
    groups: BTreeMap<String, Arc<Group>>,
    routes: Vec<Route>,
    default: Arc<Group>,
}

impl Upstreams {
    /// Builds the groups; a server name that does not resolve is an error naming it.
    pub fn from_config(config: &Config) -> Result<Arc<Upstreams>, String> {
        let mut groups = BTreeMap::new();
        for (name, c) in &config.upstreams {
            let group =
                Group::from_config(name, c).map_err(|e| format!("upstreams.{name}: {e}"))?;
            groups.insert(name.clone(), Arc::new(group));
        }
        let routes = config
            .routes
            .iter()
            .map(|r| Route::new(r, groups[r.upstream.get_ref()].clone()))
            .collect();
        Ok(Arc::new(Upstreams {
            groups,
            routes,
            default: Arc::new(Group::single(config.server.backend_addr)),
        }))
    }

    /// The first route `req` matches, if any.
    pub fn route(&self, req: &Request) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(req))
    }

    /// The group the router chose for this request, else that of `server.backend_addr`.
    pub fn group_for(&self, ctx: &mut Context) -> Arc<Group> {
        match ctx.get_mut::<Routed>() {
            Some(Routed(group)) => group.clone(),
            None => self.default.clone(),
        }
    }

    /// The configured groups, then the default one.
    pub fn groups(&self) -> impl Iterator<Item = &Arc<Group>> {
        self.groups.values().chain(std::iter::once(&self.default))
    }

    /// Sets a server's state by group and configured address (an admin action).
    pub fn set_state(&self, group: &str, server: &str, state: AdminState) -> Result<(), String> {
        let g = self
            .groups
            .get(group)
            .ok_or_else(|| format!("no upstream group {group:?}"))?;
        let s = g
            .servers
            .iter()
            .find(|s| s.name == server)
            .ok_or_else(|| format!("upstream group {group:?} has no server {server:?}"))?;
        s.set_admin_state(state);
        log::info!("upstream {group} server {server}: now {state:?}");
        Ok(())
    }
}

/// The group a routing stage chose for this request (per-request state).
pub struct Routed(pub Arc<Group>);

pub struct Group {
    pub name: String,
    pub servers: Vec<Server>,
    balancer: Balancer,
    hash_key: Option<HashKey>,
    slow_start: Option<Duration>,
    pub ejection: Ejection,
    pub breaker: Option<CircuitBreaker>,
    pub retry: RetryPolicy,
    pub health: Option<HealthConfig>,
    pub resolve_interval: Duration,
    pub queue_timeout: Duration,
    queue_size: usize,
    queue: Arc<Waiters>,
}

/// Where a new request can go.
pub enum Choice {
    Server(usize),
    /// Servers are up but at `max_conns`: wait in the queue.
    Full,
    /// No server is up, healthy and in rotation.
    Unavailable,
}

impl Group {
    fn from_config(name: &str, c: &GroupConfig) -> Result<Group, String> {
        let servers = c
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| Server::from_config(s).map_err(|e| format!("servers[{i}].addr: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        // As nginx: a lone server is never taken out by passive health.
        let ejection = match servers.len() {
            1 => Ejection::NEVER,
            _ => Ejection::from_config(&c.outlier),
        };
        let key = match c.algorithm {
            Algorithm::IpHash => Some(HashKey::ClientIp),
            Algorithm::ConsistentHash => c.hash_key.clone(),
            _ => {
                if c.hash_key.is_some() {
                    log::warn!("upstreams.{name}.hash_key is used only by algorithm consistent_hash; ignored");
                }
                None
            }
        };
        Ok(Group {
            name: name.to_owned(),
            balancer: Balancer::new(c.algorithm, &servers),
            servers,
            hash_key: key,
            slow_start: c.slow_start.map(|d| d.0),
            ejection,
            breaker: c.circuit_breaker.as_ref().map(CircuitBreaker::new),
            retry: RetryPolicy::from_config(&c.retry),
            health: c.health.clone(),
            resolve_interval: c.resolve_interval.0,
            queue_timeout: c.queue_timeout.0,
            queue_size: c.queue_size,
            queue: Arc::default(),
        })
    }

    /// `server.backend_addr` alone: no checks, no ejection, no retries.
    fn single(addr: SocketAddr) -> Group {
        let servers = vec![Server::fixed(addr)];
        Group {
            name: "default".into(),
            balancer: Balancer::new(Algorithm::RoundRobin, &servers),
            servers,
            hash_key: None,
            slow_start: None,
            ejection: Ejection::NEVER,
            breaker: None,
            retry: RetryPolicy::from_config(&RetryConfig {
                retries: 0,
                ..RetryConfig::default()
            }),
            health: None,
            resolve_interval: Duration::from_secs(30),
            queue_timeout: Duration::from_secs(5),
            queue_size: 0,
            queue: Arc::default(),
        }
    }

    /// What sticky requests hash on: the configured header, cookie or client IP.
    pub fn hash(&self, req: &Request, client: IpAddr) -> Option<u64> {
        match self.hash_key.as_ref()? {
            HashKey::ClientIp => Some(match client {
                IpAddr::V4(ip) => hash_bytes(&ip.octets()),
                IpAddr::V6(ip) => hash_bytes(&ip.octets()),
            }),
            HashKey::Header(name) => req.headers.get(name).map(hash_bytes),
            HashKey::Cookie(name) => req
                .headers
                .list("cookie")
                .flat_map(|v| v.split(|&b| b == b';'))
                .find_map(|pair| {
                    let pair = crate::http::headers::trim(pair);
                    let (n, v) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
                    (n == name.as_bytes()).then(|| hash_bytes(&v[1..]))
                }),
        }
    }

    /// A server for a new request (or a retry, avoiding `tried`), its slot
    /// taken. Backups only when no primary is available.
    pub fn choose(&self, hash: Option<u64>, tried: &[usize]) -> Choice {
        let now = clock::now_ms();
        for backup in [false, true] {
            let in_tier = |i: usize| self.servers[i].backup == backup && !tried.contains(&i);
            // A slot taken by someone else between pick and take: pick again.
            for _ in 0..4 {
                let picked = self.balancer.pick(
                    &self.servers,
                    hash,
                    |i| self.servers[i].effective_weight(now, self.slow_start),
                    |i| in_tier(i) && self.servers[i].available(now) && self.servers[i].has_room(),
                );
                match picked {
                    Some(i) if self.servers[i].take_slot() => return Choice::Server(i),
                    Some(_) => continue,
                    None => break,
                }
            }
            if (0..self.servers.len()).any(|i| in_tier(i) && self.servers[i].available(now)) {
                return Choice::Full;
            }
        }
        Choice::Unavailable
    }

    /// Gives a server's slot back and wakes one queued request.
    fn release(&self, server: usize) {
        self.servers[server].release_slot();
        self.queue.wake_one();
    }

    /// Queues a request for a slot; `None` when the queue is full.
    pub fn enqueue(&self) -> std::io::Result<Option<Place>> {
        self.queue.join(self.queue_size)
    }
}

/// What came of one attempt on one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No response: the connection failed, was reset or timed out.
    Failed,
    Status(u16),
}

impl Outcome {
    pub fn ok(self) -> bool {
        matches!(self, Outcome::Status(s) if s < 500)
    }
}

/// A request's hold on a server slot, in its context while it is in
/// flight; moved to another server by a retry, given back when dropped.
pub struct Lease {
    group: Arc<Group>,
    server: usize,
    hash: Option<u64>,
    /// Servers of earlier attempts.
    tried: Vec<usize>,
    outcomes: Vec<(usize, Outcome)>,
}

impl Lease {
    /// A lease on server `server` of `group`, whose slot is already taken.
    pub fn new(group: Arc<Group>, server: usize, hash: Option<u64>) -> Lease {
        group.retry.on_request();
        Lease {
            group,
            server,
            hash,
            tried: Vec::new(),
            outcomes: Vec::new(),
        }
    }

    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }

    pub fn server(&self) -> &Server {
        &self.group.servers[self.server]
    }

    pub fn addr(&self) -> SocketAddr {
        self.server().addr()
    }

    /// Notes the outcome of the attempt on the current server.
    pub fn record(&mut self, outcome: Outcome) {
        self.outcomes.push((self.server, outcome));
    }

    /// Each attempt's server and outcome, in order.
    pub fn outcomes(&self) -> &[(usize, Outcome)] {
        &self.outcomes
    }

    /// Moves to another server for a retry of `method`, if the policy, the
    /// budget and the servers allow; returns its address.
    pub fn retry(&mut self, method: &str) -> Option<SocketAddr> {
        let policy = &self.group.retry;
        if self.tried.len() as u32 >= policy.retries || !policy.allows_method(method) {
            return None;
        }
        self.tried.push(self.server);
        let Choice::Server(next) = self.group.choose(self.hash, &self.tried) else {
            self.tried.pop();
            return None;
        };
        if !policy.withdraw() {
            self.tried.pop();
            self.group.release(next);
            log::debug!("upstream {}: retry budget spent", self.group.name);
            return None;
        }
        self.group.release(self.server);
        self.server = next;
        Some(self.addr())
    }

    /// Retries made so far.
    pub fn retries(&self) -> u32 {
        self.tried.len() as u32
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.group.release(self.server);
    }
}

/// Milliseconds on a monotonic clock of our own, as atomics can hold them.
pub mod clock {
    use std::sync::OnceLock;
    use std::time::Instant;

    static START: OnceLock<Instant> = OnceLock::new();

    /// From 1, since the first call: stored times use 0 for "never", and an
    /// ejection in the clock's first millisecond must not read as none.
    pub fn now_ms() -> u64 {
        START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_clock_never_reads_never() {
            assert_ne!(super::now_ms(), 0);
        }
    }
}
