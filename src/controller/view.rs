//! The controller's state as the admin API shows it: plain serializable views, built
//! on request, never the internal types.

use std::sync::atomic::Ordering::Relaxed;

use tokio::time::Instant;

use super::ramps::percent;
use super::{Controller, unix_ms};
use crate::status::{CheckView, PoolView, RampView, TierRampView, UpstreamView};

// === impl Controller ===

impl Controller {
    pub(super) fn status(&self) -> Vec<PoolView> {
        let now = Instant::now();
        let now_unix = unix_ms();
        self.pools
            .iter()
            .map(|pool| {
                let priorities = pool.config.priorities();
                let ramps = pool.upstream_ramps();
                let remaining_ms =
                    |ends: Instant| ends.saturating_duration_since(now).as_millis() as u64;
                let failback_ramp = pool.failback_ramp_route().and_then(|r| {
                    Some(TierRampView {
                        from_tier: priorities[r.from],
                        to_tier: priorities[pool.active_tier?],
                        share_percent: percent(r.ramp.share(now)),
                        remaining_ms: remaining_ms(r.ramp.ends()),
                    })
                });
                PoolView {
                    name: pool.config.name.clone(),
                    balance: pool.config.balance.to_string(),
                    active_tier: pool.active_tier.map(|t| priorities[t]),
                    failback: pool.config.failback.to_string(),
                    failovers: pool.stats.failovers.load(Relaxed),
                    failbacks: pool.stats.failbacks.load(Relaxed),
                    failback_ramp,
                    upstreams: pool
                        .slots
                        .iter()
                        .zip(ramps)
                        .map(|(slot, ramp)| {
                            let u = &slot.upstream;
                            let (passes, failures) = slot.state.counts();
                            UpstreamView {
                                name: u.label().to_string(),
                                // One DNS entry gives many upstreams: each shows
                                // where it resolved to.
                                address: match u.config.discovered {
                                    Some(_) => u.config.address.to_string(),
                                    None => u.config.target.clone(),
                                },
                                priority: u.config.priority,
                                weight: u.config.weight,
                                state: slot.shown.to_string(),
                                reason: slot.shown_reason.clone(),
                                since_unix_ms: slot.since_unix_ms,
                                last_check: slot.last_check.as_ref().map(|(at, result)| {
                                    CheckView {
                                        at_unix_ms: *at,
                                        result: result
                                            .as_ref()
                                            .err()
                                            .map_or("ok".to_string(), |f| f.to_string()),
                                    }
                                }),
                                check_passes: passes,
                                check_failures: failures,
                                connect_failures_in_a_row: u
                                    .stats
                                    .connect_failures_in_a_row
                                    .load(Relaxed),
                                ejected_until_unix_ms: slot
                                    .state
                                    .outlier
                                    .ejected_until()
                                    .filter(|until| *until > now)
                                    .map(|until| {
                                        now_unix + until.duration_since(now).as_millis() as u64
                                    }),
                                connections_active: u.stats.connections_active.load(Relaxed),
                                connections_total: u.stats.connections_total.load(Relaxed),
                                bytes_sent: u.stats.bytes_sent.load(Relaxed),
                                bytes_received: u.stats.bytes_received.load(Relaxed),
                                slow_start: ramp.map(|r| RampView {
                                    share_percent: percent(r.share(now)),
                                    remaining_ms: remaining_ms(r.ends()),
                                }),
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }
}
