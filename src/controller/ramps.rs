//! Slow start (SPEC §3): when an upstream's ramp or a failed-back tier's ramp begins
//! and ends, and the events that say so.
//!
//! The share itself grows with the clock on the hot path (`balance::Ramp`); the
//! controller publishes a snapshot only when a ramp begins or ends, and keeps a
//! deadline for each end.

use std::time::Duration;

use tokio::time::Instant;

use super::{Controller, PendingEvent, PoolState};
use crate::balance::Ramp;
use crate::events::EventKind;
use crate::snapshot::FailbackRamp;

/// A failed-back tier's slow start, by priority: tier indices shift with a reload.
#[derive(Debug, Clone, Copy)]
pub(super) struct TierRamp {
    /// The tier that served before the failback and takes the rest meanwhile.
    pub(super) from: u32,
    pub(super) started: Instant,
}

/// Event words: a ramp begins (`full` -> `ramp`), ends at full weight (`ramp` ->
/// `full`) or is cut short by a failover or a state change (`ramp` -> `stopped`).
const FULL: &str = "full";
const RAMP: &str = "ramp";
const STOPPED: &str = "stopped";

// === impl Controller ===

impl Controller {
    /// Starts the ramps that are due, ends those that are over or no longer apply.
    /// Returns whether routing changed.
    pub(super) fn advance_ramps(&mut self, p: usize, now: Instant) -> bool {
        let mut changed = self.advance_upstream_ramps(p, now);
        changed |= self.advance_failback_ramp(p, now);
        changed
    }

    fn advance_upstream_ramps(&mut self, p: usize, now: Instant) -> bool {
        let pool = &mut self.pools[p];
        let name = pool.config.name.clone();
        let slow_start = pool.config.slow_start;
        // Upstreams coming back together have only each other: none of them is a peer
        // that could take the rest.
        let coming_back: Vec<bool> = pool.slots.iter().map(|s| s.ramp_due.is_some()).collect();
        let mut changed = false;
        for u in 0..pool.slots.len() {
            let slot = &pool.slots[u];
            let label = slot.upstream.label().to_string();
            let priority = slot.upstream.config.priority;
            let ending = match (slot.ramp, slow_start) {
                (None, _) => None,
                (Some(_), None) => Some((STOPPED, "slow_start turned off by reload".to_string())),
                (Some(_), Some(_)) if !slot.shown.is_usable() => {
                    Some((STOPPED, format!("no longer usable ({})", slot.shown)))
                }
                (Some(started), Some(duration)) if started + duration <= now => {
                    Some((FULL, "slow start over: full weight".to_string()))
                }
                (Some(_), Some(_)) => None,
            };
            if let Some((new, reason)) = ending {
                pool.slots[u].ramp = None;
                self.unpublished.push(PendingEvent::new(
                    EventKind::SlowStart,
                    &name,
                    Some(&label),
                    RAMP,
                    new,
                    &reason,
                ));
                changed = true;
            }
            let Some(why) = pool.slots[u].ramp_due.take() else {
                continue;
            };
            // Alone in its tier, an upstream has nobody to leave the rest to: a failback
            // to that tier ramps instead.
            let peers = pool
                .slots
                .iter()
                .zip(&coming_back)
                .filter(|(s, back)| {
                    !**back && s.upstream.config.priority == priority && s.shown.is_usable()
                })
                .count();
            let (Some(duration), true, true) =
                (slow_start, pool.slots[u].shown.is_usable(), peers > 0)
            else {
                continue;
            };
            pool.slots[u].ramp = Some(now);
            self.unpublished.push(PendingEvent::new(
                EventKind::SlowStart,
                &name,
                Some(&label),
                FULL,
                RAMP,
                &format!(
                    "{why}: its share of tier {priority}'s new connections grows from {}% to full over {}",
                    percent(Ramp::FLOOR),
                    humantime::format_duration(duration)
                ),
            ));
            changed = true;
        }
        changed
    }

    fn advance_failback_ramp(&mut self, p: usize, now: Instant) -> bool {
        let pool = &mut self.pools[p];
        let Some(ramp) = pool.failback_ramp else {
            return false;
        };
        let priorities = pool.config.priorities();
        let to = pool.active_tier.map(|t| priorities[t]);
        let from_usable = pool.usable_in_priority(ramp.from) > 0;
        let reason = match pool.config.slow_start {
            None => "slow_start turned off by reload".to_string(),
            Some(_) if !from_usable => format!(
                "tier {} has no usable upstream left: every new connection goes to tier {} at once",
                ramp.from,
                to.map_or("none".to_string(), |t| t.to_string())
            ),
            Some(duration) if ramp.started + duration <= now => format!(
                "slow start over: tier {} takes every new connection",
                to.map_or("none".to_string(), |t| t.to_string())
            ),
            Some(_) => return false,
        };
        pool.failback_ramp = None;
        let name = pool.config.name.clone();
        // The failed-back tier now takes everything: only now do the connections left
        // on worse tiers start to drain, else they would be closed while new ones still
        // arrive there.
        if let (Some(active), Some(drain)) = (pool.active_tier, pool.config.drain_after_failback) {
            pool.start_gradual_close(active, drain, now);
        }
        self.unpublished.push(PendingEvent::new(
            EventKind::SlowStart,
            &name,
            None,
            RAMP,
            FULL,
            &reason,
        ));
        true
    }

    /// On failback from tier `from` (an index) with slow start on, while `from` still has
    /// a usable upstream: the failed-back tier ramps up. Returns whether it does (a drain
    /// then waits for the ramp's end).
    pub(super) fn start_failback_ramp(
        &mut self,
        p: usize,
        from: usize,
        to: usize,
        now: Instant,
    ) -> bool {
        let pool = &mut self.pools[p];
        let priorities = pool.config.priorities();
        let Some(duration) = pool.config.slow_start else {
            return false;
        };
        // A move off a tier that has nothing usable left is survival, whatever the
        // direction: nothing to ramp against.
        if pool.usable_in_priority(priorities[from]) == 0 {
            return false;
        }
        pool.failback_ramp = Some(TierRamp {
            from: priorities[from],
            started: now,
        });
        let reason = format!(
            "failback to tier {}: its share of new connections grows from {}% to 100% over {}, the rest stay on tier {}",
            priorities[to],
            percent(Ramp::FLOOR),
            humantime::format_duration(duration),
            priorities[from],
        );
        self.unpublished.push(PendingEvent::new(
            EventKind::SlowStart,
            &pool.config.name,
            None,
            FULL,
            RAMP,
            &reason,
        ));
        true
    }

    /// A failover cuts a failback ramp short: survival is never slowed.
    pub(super) fn stop_failback_ramp(&mut self, p: usize, reason: &str) {
        let pool = &mut self.pools[p];
        if pool.failback_ramp.take().is_some() {
            self.unpublished.push(PendingEvent::new(
                EventKind::SlowStart,
                &pool.config.name,
                None,
                RAMP,
                STOPPED,
                reason,
            ));
        }
    }
}

/// `share` (0 to 1) as a whole percentage.
pub(super) fn percent(share: f64) -> u32 {
    (share * 100.0).round() as u32
}

// === impl PoolState ===

impl PoolState {
    /// Each upstream's ramp, in config order, as routing reads it.
    pub(super) fn upstream_ramps(&self) -> Vec<Option<Ramp>> {
        self.slots.iter().map(|s| self.ramp_from(s.ramp)).collect()
    }

    /// The failback ramp as routing reads it: by tier index.
    pub(super) fn failback_ramp_route(&self) -> Option<FailbackRamp> {
        let ramp = self.failback_ramp?;
        let from = self
            .config
            .priorities()
            .iter()
            .position(|&p| p == ramp.from)?;
        Some(FailbackRamp {
            from,
            ramp: self.ramp_from(Some(ramp.started))?,
        })
    }

    fn ramp_from(&self, started: Option<Instant>) -> Option<Ramp> {
        Some(Ramp {
            started: started?,
            duration: self.config.slow_start?,
        })
    }

    /// When the running ramps end.
    pub(super) fn ramp_ends(&self) -> impl Iterator<Item = Instant> + '_ {
        let duration = self.config.slow_start.unwrap_or(Duration::ZERO);
        self.slots
            .iter()
            .filter_map(|s| s.ramp)
            .chain(self.failback_ramp.map(|r| r.started))
            .map(move |started| started + duration)
    }

    fn usable_in_priority(&self, priority: u32) -> usize {
        self.slots
            .iter()
            .filter(|s| s.upstream.config.priority == priority && s.shown.is_usable())
            .count()
    }
}
