//! Load-balancing algorithms: which eligible server takes the next request.
//!
//! Each takes the servers, a predicate saying which may be chosen now (up,
//! healthy, room left, not tried yet) and the weights as they stand (slow
//! start included), so eligibility lives in one place, the group.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use parking_lot::Mutex;

use super::config::Algorithm;
use super::server::Server;

pub enum Balancer {
    RoundRobin(AtomicUsize),
    /// nginx's smooth weighted round-robin: the current weight of each server.
    Weighted(Mutex<Vec<i64>>),
    /// Fewest requests in flight per unit of weight; ties by smooth weighted round-robin.
    LeastConn(Mutex<Vec<i64>>),
    /// The less loaded of two servers drawn at random by weight.
    PowerOfTwo,
    /// A hash ring; requests without a key rotate.
    Hash(Ring, AtomicUsize),
}

impl Balancer {
    pub fn new(algorithm: Algorithm, servers: &[Server]) -> Balancer {
        match algorithm {
            Algorithm::RoundRobin => Balancer::RoundRobin(AtomicUsize::new(0)),
            Algorithm::WeightedRoundRobin => Balancer::Weighted(Mutex::new(vec![0; servers.len()])),
            Algorithm::LeastConn => Balancer::LeastConn(Mutex::new(vec![0; servers.len()])),
            Algorithm::P2c => Balancer::PowerOfTwo,
            Algorithm::IpHash | Algorithm::ConsistentHash => {
                Balancer::Hash(Ring::new(servers), AtomicUsize::new(0))
            }
        }
    }

    /// The chosen server's index, or `None` if no server is eligible.
    /// `weight(i)` is server i's current weight in thousandths.
    pub fn pick(
        &self,
        servers: &[Server],
        hash: Option<u64>,
        weight: impl Fn(usize) -> u64,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = servers.len();
        match self {
            Balancer::RoundRobin(next) => rotation(next, n).find(|&i| eligible(i)),
            Balancer::Weighted(current) => {
                smooth_weighted(&mut current.lock(), n, &weight, eligible)
            }
            Balancer::LeastConn(current) => {
                let least = (0..n)
                    .filter(|&i| eligible(i))
                    .map(|i| load(servers, i, &weight))
                    .min()?;
                // Ties (all idle, say) go by weight, as in nginx.
                smooth_weighted(&mut current.lock(), n, &weight, |i| {
                    eligible(i) && load(servers, i, &weight) == least
                })
            }
            Balancer::PowerOfTwo => {
                let mut candidates: Vec<(usize, u64)> = (0..n)
                    .filter(|&i| eligible(i))
                    .map(|i| (i, weight(i).max(1)))
                    .collect();
                // Two different servers, each drawn in proportion to weight.
                let a = candidates.swap_remove(draw_weighted(&candidates)?);
                let Some(b) = draw_weighted(&candidates).map(|k| candidates[k]) else {
                    return Some(a.0);
                };
                Some(
                    if load(servers, b.0, &weight) < load(servers, a.0, &weight) {
                        b.0
                    } else {
                        a.0
                    },
                )
            }
            Balancer::Hash(ring, next) => match hash {
                Some(hash) => ring.lookup(hash, eligible),
                None => rotation(next, n).find(|&i| eligible(i)),
            },
        }
    }
}

/// nginx's smooth weighted round-robin over the eligible servers: each
/// gains its weight, the highest is chosen and loses the total.
fn smooth_weighted(
    current: &mut [i64],
    n: usize,
    weight: &impl Fn(usize) -> u64,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for i in (0..n).filter(|&i| eligible(i)) {
        let w = weight(i) as i64;
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let best = best?;
    current[best] -= total;
    Some(best)
}

/// The position of one `(server, weight)` drawn with probability by weight.
fn draw_weighted(candidates: &[(usize, u64)]) -> Option<usize> {
    let total: u64 = candidates.iter().map(|&(_, w)| w).sum();
    let mut r = fastrand::u64(..total.max(1));
    candidates.iter().position(|&(_, w)| {
        let hit = r < w;
        r = r.saturating_sub(w);
        hit
    })
}

/// All indices once, starting one further each call.
fn rotation(next: &AtomicUsize, n: usize) -> impl Iterator<Item = usize> {
    let start = if n == 0 {
        0
    } else {
        next.fetch_add(1, Relaxed) % n
    };
    (0..n).map(move |k| (start + k) % n)
}

/// In-flight requests per unit of weight, comparable without division.
fn load(servers: &[Server], i: usize, weight: &impl Fn(usize) -> u64) -> Load {
    Load {
        active: servers[i].active() as u128,
        weight: weight(i).max(1) as u128,
    }
}

/// Compared as the fraction active / weight: 0/5 equals 0/3.
#[derive(Eq)]
struct Load {
    active: u128,
    weight: u128,
}

impl PartialEq for Load {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl PartialOrd for Load {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Load {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.active * other.weight).cmp(&(other.active * self.weight))
    }
}

/// Consistent hashing: each server owns many points on a ring, placed by a
/// hash of its name, so a server leaving moves only the keys it owned.
pub struct Ring {
    points: Vec<(u64, usize)>,
}

/// Points per unit of weight: enough for an even spread of keys.
const POINTS_PER_WEIGHT: u32 = 160;

impl Ring {
    fn new(servers: &[Server]) -> Ring {
        let mut points: Vec<(u64, usize)> = servers
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                (0..s.weight * POINTS_PER_WEIGHT)
                    .map(move |p| (hash_bytes(format!("{}#{p}", s.name).as_bytes()), i))
            })
            .collect();
        points.sort_unstable();
        Ring { points }
    }

    /// The first eligible server clockwise from `hash`.
    fn lookup(&self, hash: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.points.partition_point(|&(p, _)| p < hash);
        let len = self.points.len();
        (0..len)
            .map(|k| self.points[(start + k) % len].1)
            .find(|&i| eligible(i))
    }
}

/// FNV-1a with a final mix: stable across runs, so keys stay on their server.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser spreads FNV's weak low bits over the ring.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::config::{AdminState, ServerConfig, Weight};

    fn servers(weights: &[u32]) -> Vec<Server> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Server::from_config(&ServerConfig {
                    addr: toml::Spanned::new(0..0, format!("10.0.0.{}:80", i + 1)),
                    weight: Weight(w),
                    backup: false,
                    state: AdminState::Up,
                    max_conns: 0,
                })
                .unwrap()
            })
            .collect()
    }

    fn counts(b: &Balancer, s: &[Server], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; s.len()];
        for _ in 0..picks {
            counts[b
                .pick(s, None, |i| u64::from(s[i].weight) * 1000, |_| true)
                .unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves() {
        let s = servers(&[5, 1, 1]);
        let b = Balancer::new(Algorithm::WeightedRoundRobin, &s);
        let order: Vec<usize> = (0..7)
            .map(|_| {
                b.pick(&s, None, |i| u64::from(s[i].weight) * 1000, |_| true)
                    .unwrap()
            })
            .collect();
        // nginx's documented sequence for weights 5, 1, 1: a a b a c a a.
        assert_eq!(order, [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&b, &s, 7000), [5000, 1000, 1000]);
    }

    #[test]
    fn round_robin_skips_ineligible() {
        let s = servers(&[1, 1, 1]);
        let b = Balancer::new(Algorithm::RoundRobin, &s);
        for _ in 0..10 {
            assert_ne!(b.pick(&s, None, |_| 1000, |i| i != 1), Some(1));
        }
        assert_eq!(b.pick(&s, None, |_| 1000, |_| false), None);
    }

    #[test]
    fn least_conn_prefers_fewest_per_weight() {
        let s = servers(&[1, 2]);
        let b = Balancer::new(Algorithm::LeastConn, &s);
        for _ in 0..2 {
            s[0].take_slot();
        }
        for _ in 0..3 {
            s[1].take_slot();
        }
        // 2/1 against 3/2: the second.
        assert_eq!(
            b.pick(&s, None, |i| u64::from(s[i].weight) * 1000, |_| true),
            Some(1)
        );
    }

    #[test]
    fn two_choices_never_picks_the_busiest() {
        let s = servers(&[1, 1, 1]);
        let b = Balancer::new(Algorithm::P2c, &s);
        for _ in 0..5 {
            s[2].take_slot();
        }
        for _ in 0..200 {
            assert_ne!(b.pick(&s, None, |_| 1000, |_| true), Some(2));
        }
    }

    #[test]
    fn the_ring_moves_only_the_keys_of_a_server_that_left() {
        let s = servers(&[1, 1, 1, 1]);
        let b = Balancer::new(Algorithm::ConsistentHash, &s);
        let keys: Vec<u64> = (0..10_000)
            .map(|k| hash_bytes(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|&h| b.pick(&s, Some(h), |_| 1000, |_| true).unwrap())
            .collect();
        let mut spread = [0; 4];
        for &i in &before {
            spread[i] += 1;
        }
        assert!(
            spread.iter().all(|&c| (1_800..=3_200).contains(&c)),
            "{spread:?}"
        );
        let after: Vec<usize> = keys
            .iter()
            .map(|&h| b.pick(&s, Some(h), |_| 1000, |i| i != 2).unwrap())
            .collect();
        for (was, is) in before.iter().zip(&after) {
            if *was != 2 {
                assert_eq!(was, is, "a key of a server that stayed moved");
            } else {
                assert_ne!(*is, 2);
            }
        }
    }
}
