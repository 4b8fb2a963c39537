//! Reload reconciliation (SPEC §4): the new configuration's pools and upstreams matched
//! against the live ones by (pool name, address), so that what stays keeps its state,
//! counters, connections and checker, and what is new starts from its first check.
//! DNS discovery changes a pool's membership through the same path.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::Instant;
use tracing::debug;

use super::{Controller, FirstChecks, PoolState, Slot, unix_ms};
use crate::config::{Config, PoolConfig};
use crate::discovery::{self, Membership};
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
        for pool_config in &config.pools {
            let previous = old.remove(&pool_config.name);
            let pool =
                self.reloaded_pool(pool_config.clone(), previous, first_checks, now, "reload");
            self.pools.push(pool);
        }
        for name in old.keys() {
            debug!(pool = %name, "pool removed by reload");
        }
        self.listeners = listener_routes(config);
        for p in 0..self.pools.len() {
            self.refresh_without_publish(p);
        }
        self.publish_all();
        self.record_published_events();
        self.close_pending();
        self.restart_discovery();
    }

    /// One discovery task per pool with DNS entries, for the configuration now live.
    pub(super) fn restart_discovery(&mut self) {
        for task in self.discovery.tasks.drain(..) {
            task.abort();
        }
        self.discovery.epoch += 1;
        for pool in &self.pools {
            let task = discovery::spawn(
                pool.config.clone(),
                pool.stats.clone(),
                self.discovery.epoch,
                self.discovery.sender.clone(),
            );
            self.discovery.tasks.extend(task);
        }
    }

    /// A DNS entry's new members: those that appear are added after their first check,
    /// those gone are removed (no new connections; established ones finish on their
    /// own), as a reload would.
    pub(super) fn on_membership(&mut self, found: Membership) {
        if found.epoch != self.discovery.epoch || found.members.is_empty() {
            return;
        }
        let Some(p) = self.pools.iter().position(|p| p.config.name == found.pool) else {
            return;
        };
        let current = &self.pools[p].config;
        let mut upstreams: Vec<_> = current
            .upstreams
            .iter()
            .filter(|u| u.discovered.is_none() || u.target != found.target)
            .cloned()
            .collect();
        for member in found.members {
            // An address another entry already holds stays that entry's upstream.
            if upstreams.iter().all(|u| u.address != member.address) {
                upstreams.push(member);
            }
        }
        if upstreams == current.upstreams {
            return;
        }
        let config = Arc::new(PoolConfig {
            upstreams,
            ..(**current).clone()
        });
        debug!(pool = %found.pool, target = %found.target, upstreams = config.upstreams.len(), "membership from DNS");
        let previous = self.pools.remove(p);
        let pool = self.reloaded_pool(
            config,
            Some(previous),
            &found.first_checks,
            Instant::now(),
            "DNS",
        );
        self.pools.insert(p, pool);
        self.refresh_without_publish(p);
        self.publish_all();
        self.record_published_events();
        self.close_pending();
        self.start_checkers();
    }

    fn reloaded_pool(
        &self,
        config: Arc<PoolConfig>,
        previous: Option<PoolState>,
        first_checks: &FirstChecks,
        now: Instant,
        cause: &str,
    ) -> PoolState {
        let Some(mut previous) = previous else {
            let mut pool = PoolState::fresh(config.clone());
            for slot in &mut pool.slots {
                slot.apply_first_check(&config, first_checks, now, cause);
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
                    slot.apply_first_check(&config, first_checks, now, cause);
                    slot.ramp_due = Some(format!("added by {cause}"));
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
                cause,
            );
        }
        // The active tier is kept by priority, since tier indices may have shifted.
        let kept_priority = previous
            .active_tier
            .and_then(|t| previous.config.priorities().get(t).copied());
        let mut pool = PoolState::with_slots(config, previous.stats.clone(), carried);
        pool.active_tier = pool.initial_tier(kept_priority);
        pool.better_since = previous.better_since;
        pool.drains = std::mem::take(&mut previous.drains);
        pool.failback_ramp = previous.failback_ramp;
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
    fn apply_first_check(
        &mut self,
        config: &PoolConfig,
        first_checks: &FirstChecks,
        now: Instant,
        cause: &str,
    ) {
        let key = (config.name.clone(), self.upstream.config.address);
        let Some(result) = first_checks.get(&key) else {
            return;
        };
        self.state
            .on_check(result.is_ok(), config.health.rise, config.health.fall, now);
        self.shown = self.state.state(now);
        self.shown_reason = match result {
            Ok(()) => format!("added by {cause}; first check passed"),
            Err(failure) => format!("added by {cause}; first check: {failure}"),
        };
        self.last_check = Some((unix_ms(), result.clone()));
    }
}
