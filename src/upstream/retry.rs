//! When a failed attempt may be tried again on another server: the method,
//! the failure, a retry budget so retries cannot multiply an overload, and
//! backoff with full jitter between attempts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use super::config::RetryConfig;

pub struct RetryPolicy {
    /// Further attempts after the first.
    pub retries: u32,
    methods: Vec<String>,
    statuses: Vec<u16>,
    budget: Budget,
    backoff_ms: u64,
    backoff_max_ms: u64,
}

/// A token bucket in thousandths of a retry: each request adds `deposit`,
/// each retry takes a whole one, and it holds at most `cap`.
struct Budget {
    tokens: AtomicU64,
    deposit: u64,
    cap: u64,
}

impl RetryPolicy {
    pub fn from_config(c: &RetryConfig) -> RetryPolicy {
        let cap = u64::from(c.budget_burst) * 1000;
        RetryPolicy {
            retries: c.retries,
            methods: c.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            statuses: c.statuses.clone(),
            budget: Budget {
                tokens: AtomicU64::new(cap),
                deposit: (c.budget.max(0.0) * 1000.0) as u64,
                cap,
            },
            backoff_ms: c.backoff.0.as_millis() as u64,
            backoff_max_ms: c.backoff_max.0.as_millis() as u64,
        }
    }

    /// Every request earns the budget its share of a retry.
    pub fn on_request(&self) {
        if self.retries == 0 {
            return;
        }
        let b = &self.budget;
        let _ = b.tokens.fetch_update(Relaxed, Relaxed, |t| {
            (t < b.cap).then(|| (t + b.deposit).min(b.cap))
        });
    }

    pub fn allows_method(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    pub fn retries_status(&self, status: u16) -> bool {
        self.statuses.contains(&status)
    }

    /// Takes one retry from the budget, if it has one.
    pub fn withdraw(&self) -> bool {
        self.budget
            .tokens
            .fetch_update(Relaxed, Relaxed, |t| t.checked_sub(1000))
            .is_ok()
    }

    /// Full jitter: anywhere up to `backoff × 2^(retry-1)`, capped.
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .backoff_ms
            .saturating_mul(1 << retry.saturating_sub(1).min(20))
            .min(self.backoff_max_ms);
        Duration::from_millis(fastrand::u64(0..=ceiling))
    }
}

/// A Retry-After field (RFC 9110 §10.2.3): delay-seconds or an HTTP-date.
pub fn retry_after(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(budget: f64, burst: u32) -> RetryPolicy {
        RetryPolicy::from_config(&RetryConfig {
            budget,
            budget_burst: burst,
            ..RetryConfig::default()
        })
    }

    #[test]
    fn the_budget_allows_its_share_of_requests() {
        let p = policy(0.2, 2);
        assert!(p.withdraw() && p.withdraw(), "the burst");
        assert!(!p.withdraw());
        let mut retried = 0;
        for _ in 0..1000 {
            p.on_request();
            if p.withdraw() {
                retried += 1;
            }
        }
        assert_eq!(retried, 200);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        let p = RetryPolicy::from_config(&RetryConfig {
            backoff: crate::config::Dur(Duration::from_millis(10)),
            backoff_max: crate::config::Dur(Duration::from_millis(35)),
            ..RetryConfig::default()
        });
        let most = |retry| (0..500).map(|_| p.backoff(retry)).max().unwrap();
        assert!(most(1) <= Duration::from_millis(10));
        assert!(most(2) <= Duration::from_millis(20) && most(2) > Duration::from_millis(10));
        assert!(most(6) <= Duration::from_millis(35) && most(6) > Duration::from_millis(20));
        assert!(
            (0..500).map(|_| p.backoff(3)).min().unwrap() < Duration::from_millis(10),
            "jittered"
        );
    }

    #[test]
    fn methods_and_statuses() {
        let p = RetryPolicy::from_config(&RetryConfig {
            statuses: vec![503],
            ..RetryConfig::default()
        });
        assert!(p.allows_method("GET") && p.allows_method("PUT"));
        assert!(!p.allows_method("POST") && !p.allows_method("PATCH"));
        assert!(p.retries_status(503) && !p.retries_status(500));
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(retry_after(b"120"), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        let d = retry_after(later.as_bytes()).unwrap();
        assert!(
            d > Duration::from_secs(58) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        assert_eq!(retry_after(b"soon"), None);
    }
}
