//! Tier switching and the drains it starts: failover, failback (by rule or by the
//! operator), and the gradual close of connections left on worse tiers.
//!
//! Which tier is preferred is decided in `pool` (pure); this module applies the
//! decision: the event, the counters, the drain.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;

use super::{ControlError, Controller, PoolState};
use crate::config::Failback;
use crate::events::EventKind;
use crate::pool::decide_active_tier;
use crate::snapshot::{CLOSE_BUCKETS, Closer};

/// Closes the connections that stayed on lower tiers after a failback, one bucket at a
/// time, spread evenly over `drain_after_failback`.
pub(super) struct GradualClose {
    closers: Vec<Arc<Closer>>,
    started: Instant,
    duration: Duration,
    pub(super) next_bucket: usize,
}

// === impl Controller ===

impl Controller {
    /// Moves pool `p` to the tier its usable counts and failback rule call for. Returns
    /// whether the active tier changed.
    pub(super) fn decide_tier(&mut self, p: usize, now: Instant) -> bool {
        let pool = &mut self.pools[p];
        let counts = pool.usable_counts();
        let decision = decide_active_tier(
            pool.active_tier,
            &counts,
            pool.config.min_usable,
            pool.config.failback,
            pool.better_since,
            now,
        );
        pool.better_since = decision.better_since;
        if decision.active == pool.active_tier {
            return false;
        }
        let reason = tier_reason(pool, decision.active, &counts);
        self.switch_tier(p, decision.active, reason, now);
        true
    }

    pub(super) fn manual_failback(&mut self, pool: &str) -> Result<u32, ControlError> {
        let p = self.pool_index(pool)?;
        let state = &self.pools[p];
        let priorities = state.config.priorities();
        match (state.active_tier, state.preferred_tier()) {
            (Some(active), Some(preferred)) if preferred < active => {
                self.switch_tier(
                    p,
                    Some(preferred),
                    "manual failback".to_string(),
                    Instant::now(),
                );
                self.publish(p);
                self.record_published_events();
                Ok(priorities[preferred])
            }
            (Some(active), _) => Err(ControlError::AlreadyBest {
                pool: pool.to_string(),
                priority: priorities[active],
            }),
            (None, _) => Err(ControlError::NothingUsable(pool.to_string())),
        }
    }

    fn switch_tier(&mut self, p: usize, to: Option<usize>, reason: String, now: Instant) {
        let pool = &mut self.pools[p];
        let priorities = pool.config.priorities();
        let name = |t: Option<usize>| t.map_or("none".to_string(), |t| priorities[t].to_string());
        self.unpublished.push(super::PendingEvent::new(
            EventKind::Tier,
            &pool.config.name,
            None,
            &name(pool.active_tier),
            &name(to),
            &reason,
        ));
        let from = pool.active_tier;
        pool.active_tier = to;
        pool.better_since = None;
        match (from, to) {
            (Some(from), Some(to)) if to < from => {
                self.pools[p].stats.failbacks.fetch_add(1, Relaxed);
                // A ramp that was running gives way to the new one.
                self.stop_failback_ramp(p, "a failback to a better tier");
                let ramping = self.start_failback_ramp(p, from, to, now);
                let pool = &mut self.pools[p];
                // With slow start, the drain waits for the ramp's end: until then the
                // tier left behind still takes new connections.
                if let (false, Some(duration)) = (ramping, pool.config.drain_after_failback) {
                    pool.start_gradual_close(to, duration, now);
                }
            }
            (Some(from), to) if to.is_none_or(|to| to > from) => {
                self.pools[p].stats.failovers.fetch_add(1, Relaxed);
                self.stop_failback_ramp(p, &format!("failover to tier {}", name(to)));
            }
            _ => self.stop_failback_ramp(p, "the active tier changed"),
        }
    }

    pub(super) fn advance_gradual_closes(&mut self, p: usize, now: Instant) {
        let pool = &mut self.pools[p];
        for drain in &mut pool.drains {
            while drain.next_bucket < CLOSE_BUCKETS && drain.due(drain.next_bucket) <= now {
                for closer in &drain.closers {
                    closer.close_bucket(drain.next_bucket);
                }
                drain.next_bucket += 1;
            }
        }
        pool.drains.retain(|d| d.next_bucket < CLOSE_BUCKETS);
    }
}

/// Why the active tier moves from `pool.active_tier` to `to`.
fn tier_reason(pool: &PoolState, to: Option<usize>, counts: &[usize]) -> String {
    let priorities = pool.config.priorities();
    match (pool.active_tier, to) {
        (Some(from), Some(to)) if to > from => {
            if counts[from] == 0 {
                format!("tier {} has no usable upstream", priorities[from])
            } else {
                format!(
                    "tier {} has {} usable upstream(s), fewer than min_usable {}",
                    priorities[from], counts[from], pool.config.min_usable
                )
            }
        }
        (Some(from), Some(_)) if counts[from] == 0 => {
            format!("tier {} has no usable upstream", priorities[from])
        }
        (Some(_), Some(_)) => match pool.config.failback {
            Failback::Immediate => "failback: a better tier is usable".to_string(),
            Failback::After(hold) => format!(
                "failback: a better tier stayed usable for {}",
                humantime::format_duration(hold)
            ),
            Failback::Manual => "manual failback".to_string(),
        },
        (Some(_), None) => "no usable upstream in any tier".to_string(),
        (None, _) => "an upstream is usable again".to_string(),
    }
}

// === impl PoolState ===

impl PoolState {
    /// After failing back to tier `to`: connections on every worse tier close gradually;
    /// new connections to those upstreams get fresh closers and are not affected.
    pub(super) fn start_gradual_close(&mut self, to: usize, duration: Duration, now: Instant) {
        let priorities = self.config.priorities();
        let mut closers = Vec::new();
        for slot in &mut self.slots {
            let tier = priorities
                .iter()
                .position(|&p| p == slot.upstream.config.priority)
                .unwrap_or(0);
            if tier > to {
                closers.push(std::mem::take(&mut slot.closer));
            }
        }
        if !closers.is_empty() {
            self.drains.push(GradualClose {
                closers,
                started: now,
                duration,
                next_bucket: 0,
            });
        }
    }
}

// === impl GradualClose ===

impl GradualClose {
    /// When bucket `k` closes: the buckets are spread evenly, the last at the end.
    pub(super) fn due(&self, k: usize) -> Instant {
        self.started + self.duration.mul_f64((k + 1) as f64 / CLOSE_BUCKETS as f64)
    }
}
