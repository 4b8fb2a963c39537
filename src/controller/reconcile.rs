//! Reload reconciliation (SPEC §4): the new configuration's pools and upstreams matched
//! against the live ones by (pool name, address), so that what stays keeps its state,
//! counters, connections and checker, and what is new starts from its first check.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::Instant;
use tracing::debug;

use super::{Controller, FirstChecks, PoolState, Slot, unix_ms};
use crate::config::{Config, PoolConfig};
use crate::events::EventKind;
use crate::names::SniRoutes;
use crate::snapshot::{ListenerRoute, Upstream};

// === impl Controller ===

impl Controller {
    /// Swaps to `config`: pools and upstreams that stay keep their live state; new
    /// upstreams start from their first check's result; removed ones stop being checked
    /// while their established connections finish on their own. One snapshot swap at
    /// the end.
    pub(super) fn apply_config(&mut self, config: &Config, first_checks: &FirstChecks) {
        let now = Instant::now();
        let mut old: HashMap<String, PoolState> = self
            .pools
            .drain(..)
            .map(|p| (p.config.name.clone(), p))
            .collect();
        for name in old.keys() {
            if config.pool(name).is_none() {
                debug!(pool = %name, "pool removed by reload");
            }
        }
        for pool_config in &config.pools {
            let previous = old.remove(&pool_config.name);
            let pool = self.reloaded_pool(pool_config.clone(), previous, first_checks, now);
            self.pools.push(pool);
        }
        self.listeners = listener_routes(config);
        for p in 0..self.pools.len() {
            self.refresh_without_publish(p);
        }
        self.publish_all();
        self.record_published_events();
        self.close_pending();
    }

    fn reloaded_pool(
        &self,
        config: Arc<PoolConfig>,
        previous: Option<PoolState>,
        first_checks: &FirstChecks,
        now: Instant,
    ) -> PoolState {
        let Some(mut previous) = previous else {
            let mut pool = PoolState::fresh(config.clone(), &self.checkers);
            for slot in &mut pool.slots {
                slot.apply_first_check(&config, first_checks, now);
            }
            pool.active_tier = pool.initial_tier(None);
            return pool;
        };
        let health_changed = previous.config.health != config.health
            || previous.config.proxy_protocol != config.proxy_protocol;
        let mut carried = Vec::new();
        for upstream in &config.upstreams {
            let kept = previous
                .slots
                .iter()
                .position(|s| s.upstream.config.address == upstream.address);
            match kept {
                Some(i) => {
                    let mut slot = previous.slots.swap_remove(i);
                    if slot.upstream.config != *upstream {
                        slot.upstream = Arc::new(slot.upstream.carried(upstream.clone()));
                    }
                    if health_changed || !config.health.enabled {
                        slot.checker = None;
                    }
                    if !config.health.enabled && previous.config.health.enabled {
                        slot.state.forget_checks();
                        slot.reason = Some("health checks disabled by reload".to_string());
                    }
                    carried.push(slot);
                }
                None => {
                    let mut slot =
                        Slot::new(Arc::new(Upstream::new(&config.name, upstream.clone())));
                    slot.apply_first_check(&config, first_checks, now);
                    carried.push(slot);
                }
            }
        }
        for removed in &previous.slots {
            self.events.record(
                EventKind::Upstream,
                &config.name,
                Some(removed.upstream.label()),
                removed.shown.as_str(),
                "removed",
                "reload",
            );
        }
        // The active tier is kept by priority, since tier indices may have shifted.
        let kept_priority = previous
            .active_tier
            .and_then(|t| previous.config.priorities().get(t).copied());
        let mut pool =
            PoolState::with_slots(config, previous.stats.clone(), carried, &self.checkers);
        pool.active_tier = pool.initial_tier(kept_priority);
        pool.better_since = previous.better_since;
        pool.drains = std::mem::take(&mut previous.drains);
        pool
    }
}

/// Listener name → its settings.
pub(super) fn listener_routes(config: &Config) -> HashMap<String, Arc<ListenerRoute>> {
    config
        .listeners
        .iter()
        .map(|l| {
            let sni = match SniRoutes::new(
                l.routes.iter().map(|(p, pool)| (p.as_str(), pool.clone())),
            ) {
                Ok(sni) => sni,
                // Patterns were validated with the config; should one still fail, the
                // listener loses its SNI routes, never its default pool.
                Err(e) => {
                    tracing::error!(listener = %l.name, error = %e, "invalid SNI routes ignored");
                    SniRoutes::default()
                }
            };
            let route = ListenerRoute {
                config: l.clone(),
                sni,
                access_log: config.log.connections,
            };
            (l.name.clone(), Arc::new(route))
        })
        .collect()
}

// === impl Slot ===

impl Slot {
    /// A new upstream added by a reload starts from its first check's result, so that
    /// no client is sent to an upstream that is already dead.
    fn apply_first_check(&mut self, config: &PoolConfig, first_checks: &FirstChecks, now: Instant) {
        let key = (config.name.clone(), self.upstream.config.address);
        let Some(result) = first_checks.get(&key) else {
            return;
        };
        self.state
            .on_check(result.is_ok(), config.health.rise, config.health.fall, now);
        self.shown = self.state.state(now);
        self.shown_reason = match result {
            Ok(()) => "added by reload; first check passed".to_string(),
            Err(failure) => format!("added by reload; first check: {failure}"),
        };
        self.last_check = Some((unix_ms(), result.clone()));
    }
}
