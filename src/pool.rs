//! Pure routing decisions for one pool: which tier is preferred, and in which order a
//! new client connection tries upstreams. No I/O and no clock, so every rule is a table
//! test.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;

use crate::config::WhenAllDown;
use crate::snapshot::PoolRoute;

/// SPEC §3: the lowest tier with at least `min_usable` usable upstreams; if none has
/// that many, the lowest with any; `None` when nothing is usable. `usable_counts` is
/// per tier, best first.
pub fn preferred_tier(usable_counts: &[usize], min_usable: usize) -> Option<usize> {
    usable_counts
        .iter()
        .position(|&n| n >= min_usable.max(1))
        .or_else(|| usable_counts.iter().position(|&n| n > 0))
}

/// Upstream indices (into `route.upstreams`) to try for a client, best first, at most
/// `connect_attempts` long, each upstream once: the balancer's choice in the active
/// tier, the rest of that tier, then lower tiers in priority order, then better tiers
/// that are usable but not active (held by failback), as a last resort before failing
/// the client. With nothing usable: every upstream in priority order (`try_all`) or
/// nothing (`reject`).
pub fn attempt_order(route: &PoolRoute, client: IpAddr) -> Vec<usize> {
    let limit = route.config.connect_attempts;
    let mut order = Vec::with_capacity(limit);
    let Some(active) = route.active_tier else {
        if route.config.when_all_down == WhenAllDown::TryAll {
            for tier in route.tiers.iter() {
                let n = tier.members.len();
                let start = fastrand::usize(..n);
                order.extend((0..n).map(|k| tier.members[(start + k) % n]));
            }
            order.truncate(limit);
        }
        return order;
    };
    let load = |i: usize| route.upstreams[i].stats.connections_active.load(Relaxed);
    let tiers_in_order = std::iter::once(active)
        .chain(active + 1..route.tiers.len())
        .chain(0..active);
    for t in tiers_in_order {
        let tier = &route.tiers[t];
        let n = tier.usable.len();
        if n == 0 {
            continue;
        }
        let first = tier.picker.pick(client, |p| load(tier.usable[p]));
        for k in 0..n {
            if order.len() == limit {
                return order;
            }
            order.push(tier.usable[(first + k) % n]);
        }
    }
    order
}

#[cfg(test)]
mod tests;
