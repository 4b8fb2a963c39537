//! The routing snapshot: an immutable picture of every pool's tiers, upstream states,
//! usable upstreams and pickers, published through one `ArcSwap`.
//!
//! The hot path loads it once per connection and never locks; the controller is the
//! only writer and replaces it whole. Per-upstream objects ([`Upstream`]) are shared
//! between snapshots so counters survive every swap.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::balance::{Draws, Member, Picker, Ramp, member_key};
use crate::config::{ListenerConfig, PoolConfig};
use crate::health::passive::Feedback;
// The upstream object outlives snapshots; it lives below them.
use crate::health::state::State;
use crate::metrics::PoolStats;
use crate::names::SniRoutes;
pub use crate::upstream::Upstream;

/// Where the hot path reads routing state from.
pub type SharedSnapshot = Arc<ArcSwap<RoutingSnapshot>>;

/// Connections of one upstream are spread over this many close buckets, so that
/// `drain_after_failback` can close them in even waves.
pub const CLOSE_BUCKETS: usize = 32;

#[derive(Debug, Default, Clone)]
pub struct RoutingSnapshot {
    pools: HashMap<String, Arc<PoolRoute>>,
    /// Listener name → pool name, swapped together with the pools so that a reload that
    /// re-points a listener never shows it a pool that does not exist yet.
    listeners: HashMap<String, Arc<ListenerRoute>>,
}

/// A listener's settings and its SNI routes, as of one snapshot.
#[derive(Debug)]
pub struct ListenerRoute {
    pub config: ListenerConfig,
    /// Server name → pool name; empty unless the listener has `routes`.
    pub sni: SniRoutes<String>,
    /// `[log] connections`: write an access-log line per finished connection.
    pub access_log: bool,
}

/// Closes the established connections of one upstream, all at once or bucket by bucket.
/// Each connection holds one bucket's token, chosen at random when it starts.
///
/// A bucket's token is made when first needed: every upstream has a closer, and 32
/// tokens each (an allocation apiece) made a reload adding 1,000 upstreams allocate
/// 32,000 of them, a third of its swap (perf), for upstreams most of which never
/// carry a connection before the next reload.
#[derive(Debug)]
pub struct Closer {
    buckets: [OnceLock<CancellationToken>; CLOSE_BUCKETS],
}

/// One pool as routing sees it at one moment.
#[derive(Debug)]
pub struct PoolRoute {
    pub config: Arc<PoolConfig>,
    pub stats: Arc<PoolStats>,
    /// In config order; every other index in this struct points here.
    pub upstreams: Box<[Arc<Upstream>]>,
    pub states: Box<[State]>,
    pub closers: Box<[Arc<Closer>]>,
    /// Best priority first.
    pub tiers: Box<[Tier]>,
    /// Index into `tiers`; `None` when no upstream is usable.
    pub active_tier: Option<usize>,
    /// Slow start of each upstream, in config order: `Some` while it ramps up.
    pub ramps: Box<[Option<Ramp>]>,
    /// Slow start of the active tier after a failback.
    pub failback_ramp: Option<FailbackRamp>,
    /// Whether any ramp is on: only then does routing read the clock.
    pub ramping: bool,
    /// The failback ramp's draws.
    pub failback_draws: Draws,
    pub(crate) feedback: Feedback,
}

/// After a failback, the active tier takes a growing share of new connections and the
/// tier that served until then the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailbackRamp {
    /// Index into `tiers` of the tier that served before the failback.
    pub from: usize,
    pub ramp: Ramp,
}

#[derive(Debug)]
pub struct Tier {
    pub priority: u32,
    /// Every upstream of this priority.
    pub members: Box<[usize]>,
    /// The usable ones; the picker's positions index this list.
    pub usable: Box<[usize]>,
    pub picker: Picker,
    /// While some usable members ramp up and others do not: positions in `usable` of
    /// those that do not, and a picker over them (its positions index this list), for
    /// the connections a ramping member does not take.
    pub steady: Option<(Box<[usize]>, Picker)>,
    /// The draws of its ramping members.
    pub draws: Draws,
}

// === impl RoutingSnapshot ===

impl RoutingSnapshot {
    pub fn new(pools: Vec<Arc<PoolRoute>>, listeners: HashMap<String, Arc<ListenerRoute>>) -> Self {
        Self {
            pools: pools
                .into_iter()
                .map(|p| (p.config.name.clone(), p))
                .collect(),
            listeners,
        }
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<PoolRoute>> {
        self.pools.get(name)
    }

    /// The route of the pool that listener `name` forwards to.
    pub fn route_for_listener(&self, name: &str) -> Option<&Arc<PoolRoute>> {
        self.listeners
            .get(name)
            .and_then(|l| l.config.pool.as_ref())
            .and_then(|pool| self.pools.get(pool))
    }

    pub fn listener_pool(&self, name: &str) -> Option<&str> {
        self.listeners
            .get(name)
            .and_then(|l| l.config.pool.as_deref())
    }

    /// Listener `name`'s settings as of this snapshot (access lists, PROXY protocol).
    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerRoute>> {
        self.listeners.get(name)
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<PoolRoute>> {
        self.pools.values()
    }

    /// A copy with `route` in place of its pool's previous route.
    pub fn with_pool(&self, route: Arc<PoolRoute>) -> Self {
        let mut next = self.clone();
        next.pools.insert(route.config.name.clone(), route);
        next
    }
}

// === impl Closer ===

impl Closer {
    pub fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// The token a new connection watches.
    pub fn token(&self) -> CancellationToken {
        self.bucket(fastrand::usize(..CLOSE_BUCKETS)).clone()
    }

    pub fn close_all(&self) {
        (0..CLOSE_BUCKETS).for_each(|b| self.close_bucket(b));
    }

    /// A bucket not made yet is made cancelled, so that a connection that takes its
    /// token after the close is closed too.
    pub fn close_bucket(&self, bucket: usize) {
        if bucket < CLOSE_BUCKETS {
            self.bucket(bucket).cancel();
        }
    }

    fn bucket(&self, bucket: usize) -> &CancellationToken {
        self.buckets[bucket].get_or_init(CancellationToken::new)
    }
}

impl Default for Closer {
    fn default() -> Self {
        Self::new()
    }
}

// === impl PoolRoute ===

/// Everything the controller hands over to build a route.
#[derive(Debug)]
pub struct RouteParts {
    pub config: Arc<PoolConfig>,
    pub stats: Arc<PoolStats>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub states: Vec<State>,
    pub closers: Vec<Arc<Closer>>,
    pub active_tier: Option<usize>,
    /// In config order, as `upstreams`.
    pub ramps: Vec<Option<Ramp>>,
    pub failback_ramp: Option<FailbackRamp>,
    pub feedback: Feedback,
}

impl PoolRoute {
    pub fn new(parts: RouteParts) -> Self {
        let RouteParts {
            config,
            stats,
            upstreams,
            states,
            closers,
            active_tier,
            ramps,
            failback_ramp,
            feedback,
        } = parts;
        let ramp_of = |i: usize| ramps.get(i).copied().flatten();
        let member = |i: usize| Member {
            key: member_key(&config.name, &upstreams[i].config.address),
            weight: upstreams[i].config.weight,
        };
        let tiers: Box<[Tier]> = config
            .priorities()
            .into_iter()
            .map(|priority| {
                let members: Box<[usize]> = (0..upstreams.len())
                    .filter(|&i| upstreams[i].config.priority == priority)
                    .collect();
                let usable: Box<[usize]> = members
                    .iter()
                    .copied()
                    .filter(|&i| states[i].is_usable())
                    .collect();
                let picker_members: Vec<Member> = usable.iter().map(|&i| member(i)).collect();
                let steady: Box<[usize]> = (0..usable.len())
                    .filter(|&k| ramp_of(usable[k]).is_none())
                    .collect();
                let steady = (!steady.is_empty() && steady.len() < usable.len()).then(|| {
                    let steady_members: Vec<Member> =
                        steady.iter().map(|&k| member(usable[k])).collect();
                    let picker = Picker::new(config.balance, &steady_members);
                    (steady, picker)
                });
                Tier {
                    priority,
                    members,
                    picker: Picker::new(config.balance, &picker_members),
                    usable,
                    steady,
                    draws: Draws::new(),
                }
            })
            .collect();
        let ramps: Box<[Option<Ramp>]> = (0..upstreams.len()).map(ramp_of).collect();
        // A tier ramp with nowhere for the rest to go would only be shown, never applied.
        let failback_ramp = failback_ramp.filter(|r| {
            Some(r.from) != active_tier
                && tiers
                    .get(r.from)
                    .is_some_and(|t: &Tier| !t.usable.is_empty())
        });
        Self {
            ramping: failback_ramp.is_some() || ramps.iter().any(Option::is_some),
            config,
            stats,
            upstreams: upstreams.into_boxed_slice(),
            states: states.into_boxed_slice(),
            closers: closers.into_boxed_slice(),
            tiers,
            active_tier,
            ramps,
            failback_ramp,
            failback_draws: Draws::new(),
            feedback,
        }
    }

    /// The active tier's priority, if any.
    pub fn active_priority(&self) -> Option<u32> {
        self.active_tier.map(|t| self.tiers[t].priority)
    }

    pub fn upstream_index(&self, label_or_address: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| {
            u.label() == label_or_address
                || u.config.target == label_or_address
                || u.config.address.to_string() == label_or_address
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens are made lazily: a connection that takes a bucket's token after that
    /// bucket was closed must still be closed, and closing one bucket leaves the rest.
    #[test]
    fn a_token_taken_after_its_bucket_closed_is_closed() {
        let closer = Closer::new();
        let before = closer.bucket(3).clone();
        closer.close_bucket(3);
        closer.close_bucket(CLOSE_BUCKETS);
        assert!(before.is_cancelled());
        assert!(closer.bucket(3).is_cancelled(), "taken after the close");
        assert!(!closer.bucket(4).is_cancelled());

        let all = Closer::new();
        all.close_all();
        let taken: Vec<_> = (0..200).map(|_| all.token()).collect();
        assert!(taken.iter().all(CancellationToken::is_cancelled));
    }
}
