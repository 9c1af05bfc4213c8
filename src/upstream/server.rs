//! One upstream server and what decides whether it takes a request: the
//! operator's state, active health, passive ejection, slow start and its
//! connection limit. All atomics: the request path never takes a lock here.

use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::time::Duration;

use parking_lot::RwLock;

use super::clock;
use super::config::{AdminState, OutlierConfig, ServerConfig};
use super::resolve::resolve;

pub struct Server {
    /// As configured: `ip:port`, or `name:port` looked up again periodically.
    pub name: String,
    addr: Addr,
    pub weight: u32,
    pub backup: bool,
    admin: AtomicU8,
    /// Active health checks' verdict; true until they say otherwise.
    healthy: AtomicBool,
    /// Passive health or Retry-After keep it out until then (clock ms).
    held_until: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    last_ejected: AtomicU64,
    /// When it last came back, for slow start (clock ms); 0: it never left.
    back_since: AtomicU64,
    /// Requests in flight on it.
    active: AtomicUsize,
    /// 0: no limit.
    max_conns: usize,
}

enum Addr {
    Fixed(SocketAddr),
    Named(RwLock<SocketAddr>),
}

/// How passive health ejects (nginx's max_fails, Envoy's growing ejection).
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    pub max_fails: u32,
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Ejection {
    pub fn from_config(c: &OutlierConfig) -> Ejection {
        Ejection {
            max_fails: c.max_fails,
            base_ms: c.ejection.0.as_millis() as u64,
            max_ms: c.max_ejection.0.as_millis() as u64,
        }
    }

    pub const NEVER: Ejection = Ejection {
        max_fails: 0,
        base_ms: 0,
        max_ms: 0,
    };
}

impl Server {
    pub fn from_config(c: &ServerConfig) -> Result<Server, String> {
        let name = c.addr.get_ref().clone();
        let addr = match name.parse::<SocketAddr>() {
            Ok(addr) => Addr::Fixed(addr),
            Err(_) => Addr::Named(RwLock::new(resolve(&name)?)),
        };
        Ok(Server::new(
            name,
            addr,
            c.weight.0,
            c.backup,
            c.state,
            c.max_conns,
        ))
    }

    /// The single server behind `server.backend_addr`.
    pub fn fixed(addr: SocketAddr) -> Server {
        Server::new(
            addr.to_string(),
            Addr::Fixed(addr),
            1,
            false,
            AdminState::Up,
            0,
        )
    }

    fn new(
        name: String,
        addr: Addr,
        weight: u32,
        backup: bool,
        state: AdminState,
        max_conns: usize,
    ) -> Server {
        Server {
            name,
            addr,
            weight,
            backup,
            admin: AtomicU8::new(state as u8),
            healthy: AtomicBool::new(true),
            held_until: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            last_ejected: AtomicU64::new(0),
            back_since: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            max_conns,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match &self.addr {
            Addr::Fixed(addr) => *addr,
            Addr::Named(addr) => *addr.read(),
        }
    }

    pub fn is_named(&self) -> bool {
        matches!(self.addr, Addr::Named(_))
    }

    /// Looks the name up again; returns the new address if it changed.
    pub fn refresh(
        &self,
        lookup: impl Fn(&str) -> Result<SocketAddr, String>,
    ) -> Result<Option<SocketAddr>, String> {
        let Addr::Named(current) = &self.addr else {
            return Ok(None);
        };
        let found = lookup(&self.name)?;
        let mut current = current.write();
        if *current == found {
            return Ok(None);
        }
        *current = found;
        Ok(Some(found))
    }

    pub fn admin_state(&self) -> AdminState {
        match self.admin.load(Relaxed) {
            x if x == AdminState::Down as u8 => AdminState::Down,
            x if x == AdminState::Draining as u8 => AdminState::Draining,
            _ => AdminState::Up,
        }
    }

    pub fn set_admin_state(&self, state: AdminState) {
        let was = self.admin.swap(state as u8, Relaxed);
        if state == AdminState::Up && was != AdminState::Up as u8 {
            self.came_back(clock::now_ms());
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// Active health's verdict; a server coming back starts its slow start.
    pub fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Relaxed) != healthy && healthy {
            self.came_back(clock::now_ms());
        }
    }

    fn came_back(&self, now: u64) {
        self.back_since.store(now.max(1), Relaxed);
    }

    /// Takes new requests: up, healthy, not held out.
    pub fn available(&self, now: u64) -> bool {
        self.admin.load(Relaxed) == AdminState::Up as u8
            && self.healthy.load(Relaxed)
            && self.held_until.load(Relaxed) <= now
    }

    pub fn has_room(&self) -> bool {
        self.max_conns == 0 || self.active.load(Relaxed) < self.max_conns
    }

    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// Counts a request in flight, unless that would pass `max_conns`.
    pub fn take_slot(&self) -> bool {
        if self.max_conns == 0 {
            self.active.fetch_add(1, Relaxed);
            return true;
        }
        self.active
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max_conns).then_some(n + 1))
            .is_ok()
    }

    pub fn release_slot(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    /// Weight in thousandths, ramped up over `slow_start` after coming back.
    pub fn effective_weight(&self, now: u64, slow_start: Option<Duration>) -> u64 {
        let full = u64::from(self.weight) * 1000;
        let since = self.back_since.load(Relaxed);
        match slow_start {
            Some(ramp) if since != 0 && now >= since => {
                let ramp = ramp.as_millis().max(1) as u64;
                let elapsed = now - since;
                if elapsed >= ramp {
                    full
                } else {
                    // Never quite 0, so a recovering server still gets a first request.
                    (full * elapsed / ramp).max(1)
                }
            }
            _ => full,
        }
    }

    /// Keeps it out of rotation for `hold` (a Retry-After it sent).
    pub fn hold_for(&self, hold: Duration) {
        let now = clock::now_ms();
        self.held_until
            .fetch_max(now + hold.as_millis() as u64, Relaxed);
        self.back_since
            .fetch_max(now + hold.as_millis() as u64, Relaxed);
    }

    /// Passive health: one real request's outcome. Returns the ejection's
    /// length when this failure ejected the server.
    pub fn record(&self, ok: bool, policy: Ejection) -> Option<Duration> {
        if ok {
            self.consecutive_failures.store(0, Relaxed);
            return None;
        }
        let failures = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        // Exactly one of the concurrent failures reaches max_fails and ejects.
        if policy.max_fails == 0 || failures != policy.max_fails {
            return None;
        }
        self.consecutive_failures.store(0, Relaxed);
        let now = clock::now_ms();
        // Ejections in a row grow; a server that stayed in for max_ms starts over.
        let last = self.last_ejected.swap(now, Relaxed);
        let count = if last != 0 && now - last <= policy.max_ms + policy.base_ms {
            self.ejections.fetch_add(1, Relaxed) + 1
        } else {
            self.ejections.store(1, Relaxed);
            1
        };
        let length = (policy.base_ms * u64::from(count)).min(policy.max_ms);
        self.held_until.fetch_max(now + length, Relaxed);
        self.back_since.store(now + length, Relaxed);
        Some(Duration::from_millis(length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        Server::fixed("127.0.0.1:1".parse().unwrap())
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_time() {
        let s = server();
        let policy = Ejection {
            max_fails: 3,
            base_ms: 1000,
            max_ms: 2500,
        };
        assert_eq!(s.record(false, policy), None);
        assert_eq!(s.record(false, policy), None);
        assert_eq!(s.record(false, policy), Some(Duration::from_millis(1000)));
        assert!(!s.available(clock::now_ms()));
        for _ in 0..2 {
            s.record(false, policy);
        }
        assert_eq!(s.record(false, policy), Some(Duration::from_millis(2000)));
        for _ in 0..2 {
            s.record(false, policy);
        }
        assert_eq!(
            s.record(false, policy),
            Some(Duration::from_millis(2500)),
            "capped"
        );
    }

    #[test]
    fn a_success_resets_the_count() {
        let s = server();
        let policy = Ejection {
            max_fails: 2,
            base_ms: 1000,
            max_ms: 1000,
        };
        s.record(false, policy);
        s.record(true, policy);
        assert_eq!(s.record(false, policy), None);
        assert!(s.available(clock::now_ms()));
    }

    #[test]
    fn slow_start_ramps_the_weight() {
        let s = server();
        let ramp = Some(Duration::from_secs(10));
        assert_eq!(s.effective_weight(5, ramp), 1000, "never left: full weight");
        s.came_back(1_000);
        assert_eq!(s.effective_weight(1_000, ramp), 1);
        assert_eq!(s.effective_weight(6_000, ramp), 500);
        assert_eq!(s.effective_weight(11_000, ramp), 1000);
        assert_eq!(s.effective_weight(6_000, None), 1000);
    }

    #[test]
    fn slots_stop_at_max_conns() {
        let mut s = server();
        s.max_conns = 2;
        assert!(s.take_slot() && s.take_slot());
        assert!(!s.take_slot());
        s.release_slot();
        assert!(s.take_slot());
    }

    #[test]
    fn a_named_server_follows_its_name() {
        let s = Server::new(
            "backend.internal:80".into(),
            Addr::Named(RwLock::new("10.0.0.1:80".parse().unwrap())),
            1,
            false,
            AdminState::Up,
            0,
        );
        let same = |_: &str| Ok("10.0.0.1:80".parse().unwrap());
        assert_eq!(s.refresh(same).unwrap(), None);
        let moved = |name: &str| {
            assert_eq!(name, "backend.internal:80");
            Ok("10.0.0.2:80".parse().unwrap())
        };
        assert_eq!(
            s.refresh(moved).unwrap(),
            Some("10.0.0.2:80".parse().unwrap())
        );
        assert_eq!(s.addr(), "10.0.0.2:80".parse().unwrap());
        assert!(s.refresh(|_: &str| Err("no such host".into())).is_err());
        assert_eq!(s.addr(), "10.0.0.2:80".parse().unwrap(), "kept on failure");
    }
}
