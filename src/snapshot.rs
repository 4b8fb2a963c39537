//! The routing snapshot: an immutable picture of every pool's tiers, usable upstreams
//! and pickers, published through one `ArcSwap`.
//!
//! The hot path loads it once per connection and never locks; whoever changes routing
//! (failover, failback, reload) builds a new snapshot and swaps it whole. Per-upstream
//! objects ([`Upstream`]) are shared between snapshots so counters survive the swap.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::balance::{Member, Picker, member_key};
use crate::config::{Config, PoolConfig, UpstreamConfig};
use crate::metrics::UpstreamStats;
use crate::pool::preferred_tier;

/// Where the hot path reads routing state from.
pub type SharedSnapshot = Arc<ArcSwap<RoutingSnapshot>>;

#[derive(Debug, Default)]
pub struct RoutingSnapshot {
    pools: HashMap<String, Arc<PoolRoute>>,
}

/// One upstream, long-lived: the same object across snapshots while its pool and
/// address stay in the config.
#[derive(Debug)]
pub struct Upstream {
    pub pool: String,
    pub config: UpstreamConfig,
    pub stats: UpstreamStats,
}

/// One pool as routing sees it at one moment.
#[derive(Debug)]
pub struct PoolRoute {
    pub config: Arc<PoolConfig>,
    /// In config order; every other index in this struct points here.
    pub upstreams: Box<[Arc<Upstream>]>,
    pub usable: Box<[bool]>,
    /// Best priority first.
    pub tiers: Box<[Tier]>,
    /// Index into `tiers`; `None` when no upstream is usable.
    pub active_tier: Option<usize>,
}

#[derive(Debug)]
pub struct Tier {
    pub priority: u32,
    /// Every upstream of this priority.
    pub members: Box<[usize]>,
    /// The usable ones; the picker's positions index this list.
    pub usable: Box<[usize]>,
    pub picker: Picker,
}

// === impl RoutingSnapshot ===

impl RoutingSnapshot {
    /// A snapshot where every upstream counts as usable: what the proxy starts with
    /// (SPEC §3: every upstream counts as up until its first check completes).
    pub fn all_up(config: &Config) -> Self {
        let pools = config
            .pools
            .iter()
            .map(|pool| {
                let upstreams: Vec<Arc<Upstream>> = pool
                    .upstreams
                    .iter()
                    .map(|u| Arc::new(Upstream::new(&pool.name, u.clone())))
                    .collect();
                let usable = vec![true; upstreams.len()];
                let route = PoolRoute::with_preferred_tier(pool.clone(), upstreams, usable);
                (pool.name.clone(), Arc::new(route))
            })
            .collect();
        Self { pools }
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<PoolRoute>> {
        self.pools.get(name)
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<PoolRoute>> {
        self.pools.values()
    }
}

// === impl Upstream ===

impl Upstream {
    pub fn new(pool: &str, config: UpstreamConfig) -> Self {
        Self {
            pool: pool.to_string(),
            config,
            stats: UpstreamStats::default(),
        }
    }

    pub fn label(&self) -> &str {
        self.config.label()
    }
}

// === impl PoolRoute ===

impl PoolRoute {
    /// Builds the route with `active_tier` chosen by the controller (failback rules).
    pub fn new(
        config: Arc<PoolConfig>,
        upstreams: Vec<Arc<Upstream>>,
        usable: Vec<bool>,
        active_tier: Option<usize>,
    ) -> Self {
        let tiers = config
            .priorities()
            .into_iter()
            .map(|priority| {
                let members: Box<[usize]> = (0..upstreams.len())
                    .filter(|&i| upstreams[i].config.priority == priority)
                    .collect();
                let usable_members: Box<[usize]> =
                    members.iter().copied().filter(|&i| usable[i]).collect();
                let picker_members: Vec<Member> = usable_members
                    .iter()
                    .map(|&i| Member {
                        key: member_key(&config.name, &upstreams[i].config.address),
                        weight: upstreams[i].config.weight,
                    })
                    .collect();
                Tier {
                    priority,
                    members,
                    picker: Picker::new(config.balance, &picker_members),
                    usable: usable_members,
                }
            })
            .collect();
        Self {
            config,
            upstreams: upstreams.into_boxed_slice(),
            usable: usable.into_boxed_slice(),
            tiers,
            active_tier,
        }
    }

    /// Builds the route with the tier that SPEC §3 prefers for these states, ignoring
    /// failback hold-downs.
    pub fn with_preferred_tier(
        config: Arc<PoolConfig>,
        upstreams: Vec<Arc<Upstream>>,
        usable: Vec<bool>,
    ) -> Self {
        let mut route = Self::new(config, upstreams, usable, None);
        let counts: Vec<usize> = route.tiers.iter().map(|t| t.usable.len()).collect();
        route.active_tier = preferred_tier(&counts, route.config.min_usable);
        route
    }
}
