//! Pure routing decisions for one pool: which tier is preferred, and in which order a
//! new client connection tries upstreams. No I/O, and the time comes in as an argument,
//! so every rule is a table test.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::time::Instant;

use crate::config::{Failback, PoolConfig, WhenAllDown};
use crate::health::passive::Feedback;
use crate::health::state::State;
use crate::snapshot::{PoolRoute, RouteParts, Upstream};

/// The controller's choice of active tier and the failback hold clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierDecision {
    pub active: Option<usize>,
    /// Since when a better tier than `active` has been preferred (failback duration).
    pub better_since: Option<Instant>,
}

/// Usable upstreams per tier, in the order of `priorities` (the pool's tiers, best
/// first), from each upstream's priority and state.
pub fn usable_counts(
    priorities: &[u32],
    upstreams: impl IntoIterator<Item = (u32, State)>,
) -> Vec<usize> {
    let mut counts = vec![0; priorities.len()];
    for (priority, state) in upstreams {
        if state.is_usable()
            && let Some(tier) = priorities.iter().position(|&p| p == priority)
        {
            counts[tier] += 1;
        }
    }
    counts
}

/// SPEC §3: the lowest tier with at least `min_usable` usable upstreams; if none has
/// that many, the lowest with any; `None` when nothing is usable. `usable_counts` is
/// per tier, best first.
pub fn preferred_tier(usable_counts: &[usize], min_usable: usize) -> Option<usize> {
    usable_counts
        .iter()
        .position(|&n| n >= min_usable.max(1))
        .or_else(|| usable_counts.iter().position(|&n| n > 0))
}

/// SPEC §3 failover and failback for one pool. `current` is the active tier, `counts`
/// the usable upstreams per tier (best first). Survival is never delayed: when the
/// current tier has nothing usable or a worse tier is preferred, the move is immediate.
/// Only moving to a *better* tier obeys `failback`; with a duration, that tier must stay
/// preferred for the whole duration, and any interruption restarts the clock.
pub fn decide_active_tier(
    current: Option<usize>,
    counts: &[usize],
    min_usable: usize,
    failback: Failback,
    better_since: Option<Instant>,
    now: Instant,
) -> TierDecision {
    let settle = |active| TierDecision {
        active,
        better_since: None,
    };
    let preferred = preferred_tier(counts, min_usable);
    let (Some(current), Some(preferred)) = (current, preferred) else {
        return settle(preferred);
    };
    if counts.get(current).copied().unwrap_or(0) == 0 || preferred >= current {
        return settle(Some(preferred));
    }
    match failback {
        Failback::Immediate => settle(Some(preferred)),
        Failback::Manual => settle(Some(current)),
        Failback::After(hold) => {
            let since = better_since.unwrap_or(now);
            if now.saturating_duration_since(since) >= hold {
                settle(Some(preferred))
            } else {
                TierDecision {
                    active: Some(current),
                    better_since: Some(since),
                }
            }
        }
    }
}

/// Upstream indices (into `route.upstreams`) to try for a client, best first, at most
/// `connect_attempts` long, each upstream once: the balancer's choice in the active
/// tier, the rest of that tier, then lower tiers in priority order, then better tiers
/// that are usable but not active (held by failback), as a last resort before failing
/// the client. With nothing usable: every upstream in priority order (`try_all`) or
/// nothing (`reject`).
///
/// An upstream that has just failed `consecutive_failures` attempts in a row goes last:
/// the controller is about to eject it, and clients arriving before the new snapshot
/// is published should not pay for it again.
///
/// `tried` are upstream ids this client already gave up on (they left its bytes
/// unanswered): they are left out, and the next candidates take their places.
pub fn attempt_order(route: &PoolRoute, client: IpAddr, tried: &[u64]) -> Vec<usize> {
    let mut order = candidates(route, client, tried.len());
    if !tried.is_empty() {
        order.retain(|&i| !tried.contains(&route.upstreams[i].id));
    }
    let threshold = route.config.outlier.consecutive_failures;
    let failing = |&i: &usize| {
        route.upstreams[i]
            .stats
            .connect_failures_in_a_row
            .load(Relaxed)
            >= threshold
    };
    if order.iter().any(failing) {
        let (mut healthy, suspects): (Vec<usize>, Vec<usize>) =
            order.iter().copied().partition(|i| !failing(i));
        healthy.extend(suspects);
        order = healthy;
    }
    order.truncate(route.config.connect_attempts);
    order
}

fn candidates(route: &PoolRoute, client: IpAddr, excluded: usize) -> Vec<usize> {
    // One more than the limit, so that demoting a failing upstream can bring in the
    // next candidate instead of shortening the list; as many more as will be left out.
    let limit = route.config.connect_attempts + 1 + excluded;
    let mut order = Vec::with_capacity(limit);
    let Some(active) = route.active_tier else {
        if route.config.when_all_down == WhenAllDown::TryAll {
            // Health checks can be wrong; an operator who took an upstream out (drain,
            // maint) is not: those stay out even now.
            let in_service = |&i: &usize| !matches!(route.states[i], State::Drain | State::Maint);
            for tier in route.tiers.iter() {
                let members: Vec<usize> = tier.members.iter().copied().filter(in_service).collect();
                if members.is_empty() {
                    continue;
                }
                let n = members.len();
                let start = fastrand::usize(..n);
                order.extend((0..n).map(|k| members[(start + k) % n]));
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

/// A route for `config` with the given states, fresh counters and closers, no
/// controller, and the tier SPEC §3 prefers (no failback hold). For tests and tools.
pub fn standalone_route(config: Arc<PoolConfig>, states: Vec<State>) -> PoolRoute {
    let upstreams: Vec<Arc<Upstream>> = config
        .upstreams
        .iter()
        .map(|u| Arc::new(Upstream::new(&config.name, u.clone())))
        .collect();
    let counts = usable_counts(
        &config.priorities(),
        config
            .upstreams
            .iter()
            .map(|u| u.priority)
            .zip(states.iter().copied()),
    );
    PoolRoute::new(RouteParts {
        closers: upstreams.iter().map(|_| Arc::default()).collect(),
        stats: Arc::default(),
        upstreams,
        states,
        active_tier: preferred_tier(&counts, config.min_usable),
        feedback: Feedback::detached(),
        config,
    })
}

#[cfg(test)]
mod tests;
