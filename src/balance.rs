//! Choosing one upstream within a tier: weighted round robin, least connections,
//! power-of-two random choices and consistent source hashing (Maglev).
//!
//! A [`Picker`] is built once per routing snapshot over a tier's usable members and
//! then only read, so `pick` takes `&self`, never locks and never allocates.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Balance;

/// Maglev lookup table size: a prime well above 100× any realistic tier size, which keeps
/// the share of each upstream within ~1% and the disruption on membership change minimal.
const MAGLEV_TABLE_SIZE: usize = 16_411;

/// One member of a tier as the picker sees it.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// Stable identity (hash of pool and address) so that source hashing survives the
    /// tier's membership changing around it.
    pub key: u64,
    pub weight: u32,
}

#[derive(Debug)]
pub enum Picker {
    /// A precomputed smooth weighted cycle of member positions.
    RoundRobin {
        cycle: Box<[u32]>,
        next: AtomicUsize,
    },
    LeastConnections {
        weights: Box<[u32]>,
        next: AtomicUsize,
    },
    RandomTwo {
        weights: Box<[u32]>,
        total: u64,
    },
    SourceHash {
        table: Box<[u32]>,
    },
}

/// Slow start: the share of new connections that something coming back (an upstream
/// within its tier, or a tier failed back to) takes, growing linearly from
/// [`Ramp::FLOOR`] of what it would get at full weight to all of it over `duration`.
///
/// The share is computed from the clock where a connection is routed, so the snapshot
/// that carries a ramp stays valid for its whole length: nothing is republished while
/// it grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ramp {
    pub started: Instant,
    pub duration: Duration,
}

// === impl Ramp ===

impl Ramp {
    /// Where the share starts: small enough to spare a cold server, large enough that
    /// its first clients warm it up.
    pub const FLOOR: f64 = 0.1;

    /// The fraction of its full share, from `FLOOR` at the start to 1 at the end.
    pub fn share(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.started).as_secs_f64();
        let progress = elapsed / self.duration.as_secs_f64().max(f64::MIN_POSITIVE);
        (Self::FLOOR + (1.0 - Self::FLOOR) * progress).min(1.0)
    }

    pub fn ends(&self) -> Instant {
        self.started + self.duration
    }

    /// Whether one new connection goes to the ramping side: the next of `draws`, except
    /// with `source_hash`, where the client's address decides against a threshold that
    /// only grows, so a client that moved to the ramping side stays there and the
    /// clients that move are only as many as the share calls for. `salt` makes the
    /// address draws of different ramps independent.
    pub fn admits(
        &self,
        now: Instant,
        balance: Balance,
        client: IpAddr,
        salt: u64,
        draws: &Draws,
    ) -> bool {
        let share = self.share(now);
        if share >= 1.0 {
            return true;
        }
        let draw = match balance {
            Balance::SourceHash => unit_interval(mix64(hash_ip(client) ^ salt)),
            _ => draws.next(),
        };
        draw < share
    }
}

/// Draws in [0, 1) for one ramp's connections: multiples of the golden ratio, mod 1
/// (a Weyl sequence), so that of any run of connections the share admitted is within a
/// connection or two of the ramp's, without a random draw's noise. Shared by the
/// connections of one snapshot: an atomic counter, no lock.
#[derive(Debug)]
pub struct Draws {
    next: AtomicU64,
}

// === impl Draws ===

impl Draws {
    pub fn new() -> Self {
        // A random start, so that pools rebuilt together do not draw in step.
        Self {
            next: AtomicU64::new(fastrand::u64(..)),
        }
    }

    fn next(&self) -> f64 {
        /// 2^64 divided by the golden ratio.
        const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
        unit_interval(self.next.fetch_add(1, Relaxed).wrapping_mul(GOLDEN))
    }
}

impl Default for Draws {
    fn default() -> Self {
        Self::new()
    }
}

/// `x` mapped onto [0, 1) by its top 53 bits.
fn unit_interval(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

// === impl Picker ===

impl Picker {
    pub fn new(balance: Balance, members: &[Member]) -> Self {
        let weights: Box<[u32]> = members.iter().map(|m| m.weight.max(1)).collect();
        match balance {
            Balance::RoundRobin => Picker::RoundRobin {
                cycle: smooth_weighted_cycle(&weights),
                // Start at a random point so that many pools rebuilt together do not all
                // send their first connection to their first upstream.
                next: AtomicUsize::new(fastrand::usize(..)),
            },
            Balance::LeastConnections => Picker::LeastConnections {
                weights,
                next: AtomicUsize::new(0),
            },
            Balance::RandomTwo => Picker::RandomTwo {
                total: weights.iter().map(|&w| u64::from(w)).sum(),
                weights,
            },
            Balance::SourceHash => Picker::SourceHash {
                table: maglev_table(members),
            },
        }
    }

    /// The position (in the member list given to `new`) of the chosen member. `load(i)`
    /// reports member i's active connections. Must not be called on an empty tier.
    pub fn pick(&self, client: IpAddr, load: impl Fn(usize) -> u64) -> usize {
        match self {
            Picker::RoundRobin { cycle, next } => {
                cycle[next.fetch_add(1, Relaxed) % cycle.len()] as usize
            }
            Picker::LeastConnections { weights, next } => {
                // Rotate the scan start so that ties are spread instead of always going to
                // the first member.
                let n = weights.len();
                let start = next.fetch_add(1, Relaxed) % n;
                let mut best = start;
                for step in 1..n {
                    let i = (start + step) % n;
                    if less_loaded(load(i), weights[i], load(best), weights[best]) {
                        best = i;
                    }
                }
                best
            }
            Picker::RandomTwo { weights, total } => {
                let a = weighted_random(weights, *total);
                if weights.len() == 1 {
                    return a;
                }
                let mut b = weighted_random(weights, *total);
                if b == a {
                    b = (a + 1 + fastrand::usize(..weights.len() - 1)) % weights.len();
                }
                if less_loaded(load(b), weights[b], load(a), weights[a]) {
                    b
                } else {
                    a
                }
            }
            Picker::SourceHash { table } => {
                table[(hash_ip(client) % table.len() as u64) as usize] as usize
            }
        }
    }
}

/// `a_load / a_weight < b_load / b_weight` without division.
fn less_loaded(a_load: u64, a_weight: u32, b_load: u64, b_weight: u32) -> bool {
    u128::from(a_load) * u128::from(b_weight) < u128::from(b_load) * u128::from(a_weight)
}

fn weighted_random(weights: &[u32], total: u64) -> usize {
    let mut ticket = fastrand::u64(..total.max(1));
    for (i, &w) in weights.iter().enumerate() {
        if ticket < u64::from(w) {
            return i;
        }
        ticket -= u64::from(w);
    }
    weights.len() - 1
}

/// NGINX's smooth weighted round robin, unrolled into one full cycle: weights 5,1,1 give
/// a a b a c a a rather than a a a a a b c.
fn smooth_weighted_cycle(weights: &[u32]) -> Box<[u32]> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    cycle.into_boxed_slice()
}

/// Maglev (Eisenbud et al., NSDI 2016): each member walks its own permutation of the
/// table, derived from its key alone, claiming free slots in turn (weight turns per
/// round). A member leaving frees only its own slots, which are re-claimed mostly by
/// the others' next preferences, so few clients move.
fn maglev_table(members: &[Member]) -> Box<[u32]> {
    let m = MAGLEV_TABLE_SIZE as u64;
    let mut table = vec![u32::MAX; MAGLEV_TABLE_SIZE];
    if members.is_empty() {
        return table.into_boxed_slice();
    }
    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|member| {
            let offset = mix64(member.key) % m;
            let skip = mix64(member.key ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, member) in members.iter().enumerate() {
            for _ in 0..member.weight.max(1) {
                let (offset, skip) = perms[i];
                let mut slot = ((offset + next[i] * skip) % m) as usize;
                while table[slot] != u32::MAX {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % m) as usize;
                }
                table[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == MAGLEV_TABLE_SIZE {
                    break 'fill;
                }
            }
        }
    }
    table.into_boxed_slice()
}

/// Stable 64-bit identity of an upstream for source hashing.
pub fn member_key(pool: &str, address: &std::net::SocketAddr) -> u64 {
    // FNV-1a: stable across processes and Rust versions, unlike `DefaultHasher`.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let address = address.to_string();
    for byte in pool.bytes().chain([0]).chain(address.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => mix64(u64::from(u32::from(v4))),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            mix64((bits as u64) ^ mix64((bits >> 64) as u64))
        }
    }
}

/// splitmix64 finaliser: spreads nearby inputs (consecutive client IPs) across the table.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests;
