//! The controller: the only writer of routing state.
//!
//! It owns every upstream's live state, applies what health checks, passive failures
//! and operators report (all by message), decides each pool's active tier, records an
//! event for every transition, closes connections where policy says so, and publishes
//! a new routing snapshot when anything routing-relevant changed. One writer means no
//! lost updates and no compare-and-swap loops; the hot path only ever reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use crate::config::{Config, Failback, OnUpstreamDown, PoolConfig};
use crate::events::{EventKind, EventLog};
use crate::health::state::{AdminOverride, State, UpstreamState};
use crate::health::{CheckFailure, Checker};
use crate::metrics::{ConnectFailure, PoolStats};
use crate::pool::decide_active_tier;
use crate::proxy::sni::SniRoutes;
use crate::shutdown::Shutdown;
use crate::snapshot::{
    CLOSE_BUCKETS, Closer, ListenerRoute, PoolRoute, RouteParts, RoutingSnapshot, SharedSnapshot,
    Upstream,
};
use crate::status::{CheckView, PoolView, UpstreamView};

/// What the controller is told.
#[derive(Debug)]
pub enum Message {
    /// An active check finished; the reply is the interval until the next one.
    CheckResult {
        upstream: u64,
        result: Result<(), CheckFailure>,
        reply: oneshot::Sender<Duration>,
    },
    /// A connect attempt on real traffic failed; `in_a_row` counts since the last success.
    ConnectFailed {
        upstream: u64,
        reason: ConnectFailure,
        in_a_row: u32,
    },
    /// A connect attempt was slow enough to be hedged: check the upstream now.
    Slow { upstream: u64 },
    /// Operator override: `None` returns the upstream to health-check control.
    SetAdmin {
        pool: String,
        upstream: String,
        admin: Option<AdminOverride>,
        reply: oneshot::Sender<Result<State, ControlError>>,
    },
    /// Operator's manual failback; the reply is the new active tier's priority.
    Failback {
        pool: String,
        reply: oneshot::Sender<Result<u32, ControlError>>,
    },
    /// Swap to a new, fully validated configuration. `first_checks` holds the result of
    /// the first health check of every upstream that is new, keyed by (pool, address).
    Reload {
        config: Arc<Config>,
        first_checks: HashMap<(String, SocketAddr), Result<(), CheckFailure>>,
        reply: oneshot::Sender<()>,
    },
    /// The live view of every pool for the admin API.
    Status {
        reply: oneshot::Sender<Vec<PoolView>>,
    },
}

/// Why an operator's request to the controller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("no pool named {0:?}")]
    NoSuchPool(String),
    #[error("pool {pool:?} has no upstream named or addressed {upstream:?}")]
    NoSuchUpstream { pool: String, upstream: String },
    #[error("pool {pool:?} is already on the best usable tier (priority {priority})")]
    AlreadyBest { pool: String, priority: u32 },
    #[error("pool {0:?} has no usable upstream")]
    NothingUsable(String),
    #[error("the controller has stopped")]
    Stopped,
}

/// Sends messages to the controller; cheap to clone.
#[derive(Debug, Clone)]
pub struct ControllerHandle {
    tx: mpsc::UnboundedSender<Message>,
}

/// The hot path's fire-and-forget reports about upstreams. Detached (reporting
/// nowhere) for routes built without a controller.
#[derive(Debug, Clone)]
pub struct Feedback(Option<mpsc::UnboundedSender<Message>>);

pub struct Controller {
    pools: Vec<PoolState>,
    /// Listener name → its settings (pool, access lists), published with the pools.
    listeners: HashMap<String, Arc<ListenerRoute>>,
    /// Closers to fire once the snapshot that excludes their upstream is published.
    closing: Vec<Arc<Closer>>,
    snapshot: SharedSnapshot,
    events: Arc<EventLog>,
    handle: ControllerHandle,
    rx: mpsc::UnboundedReceiver<Message>,
}

struct PoolState {
    config: Arc<PoolConfig>,
    stats: Arc<PoolStats>,
    slots: Vec<Slot>,
    /// Index into the pool's tiers (best first).
    active_tier: Option<usize>,
    better_since: Option<Instant>,
    drains: Vec<GradualClose>,
}

struct Slot {
    upstream: Arc<Upstream>,
    state: UpstreamState,
    /// The state last published and announced.
    shown: State,
    /// Why the next transition happens, set by whatever caused it.
    reason: Option<String>,
    closer: Arc<Closer>,
    checker: Option<Checker>,
    /// The reason of the last announced transition, and when it happened.
    shown_reason: String,
    since_unix_ms: u64,
    /// When the last active check finished, and its result.
    last_check: Option<(u64, Result<(), CheckFailure>)>,
}

/// Closes the connections that stayed on lower tiers after a failback, one bucket at a
/// time, spread evenly over `drain_after_failback`.
struct GradualClose {
    closers: Vec<Arc<Closer>>,
    started: Instant,
    duration: Duration,
    next_bucket: usize,
}

// === impl ControllerHandle ===

impl ControllerHandle {
    pub fn send(&self, message: Message) {
        // Fails only once the controller has stopped, at shutdown: nothing to do then.
        let _ = self.tx.send(message);
    }

    /// Sets or clears an operator override; returns the upstream's new state.
    pub async fn set_admin(
        &self,
        pool: &str,
        upstream: &str,
        admin: Option<AdminOverride>,
    ) -> Result<State, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::SetAdmin {
            pool: pool.to_string(),
            upstream: upstream.to_string(),
            admin,
            reply,
        });
        answer.await.map_err(|_| ControlError::Stopped)?
    }

    /// Applies a new configuration (see [`Message::Reload`]); returns once swapped.
    pub async fn reload(
        &self,
        config: Arc<Config>,
        first_checks: HashMap<(String, SocketAddr), Result<(), CheckFailure>>,
    ) -> Result<(), ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::Reload {
            config,
            first_checks,
            reply,
        });
        answer.await.map_err(|_| ControlError::Stopped)
    }

    /// Every pool's live state.
    pub async fn status(&self) -> Result<Vec<PoolView>, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::Status { reply });
        answer.await.map_err(|_| ControlError::Stopped)
    }

    /// Manual failback; returns the priority of the new active tier.
    pub async fn failback(&self, pool: &str) -> Result<u32, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::Failback {
            pool: pool.to_string(),
            reply,
        });
        answer.await.map_err(|_| ControlError::Stopped)?
    }

    fn feedback(&self) -> Feedback {
        Feedback(Some(self.tx.clone()))
    }
}

// === impl Feedback ===

impl Feedback {
    pub fn detached() -> Self {
        Self(None)
    }

    pub(crate) fn connect_failed(&self, upstream: &Upstream, reason: ConnectFailure) {
        upstream.stats.count_connect_failure(reason);
        let in_a_row = upstream
            .stats
            .connect_failures_in_a_row
            .fetch_add(1, Relaxed)
            .saturating_add(1);
        if let Some(tx) = &self.0 {
            let _ = tx.send(Message::ConnectFailed {
                upstream: upstream.id,
                reason,
                in_a_row,
            });
        }
    }

    pub(crate) fn connect_succeeded(&self, upstream: &Upstream) {
        // Read first: most connects succeed, and a store on every one would bounce the
        // cache line between cores.
        if upstream.stats.connect_failures_in_a_row.load(Relaxed) != 0 {
            upstream.stats.connect_failures_in_a_row.store(0, Relaxed);
        }
    }

    pub(crate) fn slow(&self, upstream: &Upstream) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Message::Slow {
                upstream: upstream.id,
            });
        }
    }
}

// === impl Controller ===

impl Controller {
    /// Live state for every pool of `config`, every upstream up (SPEC §3: until its
    /// first check completes), health checks started and the first snapshot published.
    /// Needs a running tokio runtime.
    pub fn new(config: &Config, events: Arc<EventLog>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = ControllerHandle { tx };
        let pools = config
            .pools
            .iter()
            .map(|pool| PoolState::fresh(pool.clone(), &handle))
            .collect();
        let mut controller = Self {
            pools,
            listeners: listener_routes(config),
            closing: Vec::new(),
            snapshot: Arc::new(ArcSwap::from_pointee(RoutingSnapshot::default())),
            events,
            handle,
            rx,
        };
        for pool in &mut controller.pools {
            pool.active_tier =
                crate::pool::preferred_tier(&pool.usable_counts(), pool.config.min_usable);
        }
        controller.publish_all();
        debug!(pools = controller.pools.len(), "controller ready");
        controller
    }

    pub fn snapshot(&self) -> SharedSnapshot {
        self.snapshot.clone()
    }

    pub fn handle(&self) -> ControllerHandle {
        self.handle.clone()
    }

    /// Applies messages and timers until shutdown.
    pub async fn run(mut self, shutdown: Shutdown) {
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                _ = shutdown.stopping() => return,
                message = self.rx.recv() => match message {
                    Some(message) => self.handle_message(message),
                    None => return,
                },
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    for p in 0..self.pools.len() {
                        self.refresh(p);
                    }
                }
            }
        }
    }

    fn handle_message(&mut self, message: Message) {
        let now = Instant::now();
        match message {
            Message::CheckResult {
                upstream,
                result,
                reply,
            } => {
                let Some((p, u)) = self.find(upstream) else {
                    return;
                };
                let pool = &mut self.pools[p];
                let health = &pool.config.health;
                let slot = &mut pool.slots[u];
                let stats = &slot.upstream.stats;
                match result {
                    Ok(()) => stats.checks_passed.fetch_add(1, Relaxed),
                    Err(_) => stats.checks_failed.fetch_add(1, Relaxed),
                };
                if slot.last_check.is_none() && result.is_ok() {
                    // The first check confirms the start-up assumption: no transition,
                    // but the reason shown should no longer say "until the first check".
                    slot.shown_reason = "first check passed".to_string();
                }
                slot.last_check = Some((unix_ms(), result));
                slot.state
                    .on_check(result.is_ok(), health.rise, health.fall, now);
                slot.reason = Some(match (result, slot.state.state(now)) {
                    // Ejected while the checks had it down: the ejection is over, but
                    // the upstream stays down until `rise` passes in a row.
                    (Ok(()), State::Down) => format!(
                        "a passing check ended the ejection; still down until {} passes in a row ({} so far)",
                        health.rise,
                        slot.state.counts().0,
                    ),
                    (Ok(()), _) => "check passed".to_string(),
                    (Err(failure), _) => failure.to_string(),
                });
                let interval = if slot.state.is_deciding() {
                    health.fast_interval
                } else {
                    health.interval
                };
                let _ = reply.send(interval);
                self.refresh(p);
            }
            Message::ConnectFailed {
                upstream,
                reason,
                in_a_row,
            } => {
                let Some((p, u)) = self.find(upstream) else {
                    return;
                };
                let pool = &mut self.pools[p];
                let slot = &mut pool.slots[u];
                if let Some(checker) = &slot.checker {
                    checker.check_now();
                }
                if let Some(ejected_for) =
                    slot.state
                        .outlier
                        .on_failures(in_a_row, &pool.config.outlier, now)
                {
                    slot.reason = Some(format!(
                        "{in_a_row} consecutive failures (connect {reason}); ejected for {}",
                        humantime::format_duration(ejected_for)
                    ));
                    let upstream = slot.upstream.clone();
                    self.refresh(p);
                    // Only now that the snapshot excludes it: until then the count
                    // keeps it last in attempt orders.
                    upstream.stats.connect_failures_in_a_row.store(0, Relaxed);
                }
            }
            Message::Slow { upstream } => {
                if let Some((p, u)) = self.find(upstream)
                    && let Some(checker) = &self.pools[p].slots[u].checker
                {
                    checker.check_now();
                }
            }
            Message::SetAdmin {
                pool,
                upstream,
                admin,
                reply,
            } => {
                let _ = reply.send(self.set_admin(&pool, &upstream, admin));
            }
            Message::Failback { pool, reply } => {
                let _ = reply.send(self.manual_failback(&pool));
            }
            Message::Reload {
                config,
                first_checks,
                reply,
            } => {
                self.apply_config(&config, &first_checks);
                let _ = reply.send(());
            }
            Message::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn set_admin(
        &mut self,
        pool: &str,
        upstream: &str,
        admin: Option<AdminOverride>,
    ) -> Result<State, ControlError> {
        let p = self.pool_index(pool)?;
        let slots = &mut self.pools[p].slots;
        let u = slots
            .iter()
            .position(|s| {
                let c = &s.upstream.config;
                c.label() == upstream || c.target == upstream || c.address.to_string() == upstream
            })
            .ok_or_else(|| ControlError::NoSuchUpstream {
                pool: pool.to_string(),
                upstream: upstream.to_string(),
            })?;
        slots[u].state.set_admin(admin);
        slots[u].reason = Some("admin".to_string());
        self.refresh(p);
        Ok(self.pools[p].slots[u].shown)
    }

    fn manual_failback(&mut self, pool: &str) -> Result<u32, ControlError> {
        let p = self.pool_index(pool)?;
        let state = &self.pools[p];
        let counts = state.usable_counts();
        let preferred = crate::pool::preferred_tier(&counts, state.config.min_usable);
        let priorities = state.config.priorities();
        match (state.active_tier, preferred) {
            (Some(active), Some(preferred)) if preferred < active => {
                self.switch_tier(
                    p,
                    Some(preferred),
                    "manual failback".to_string(),
                    Instant::now(),
                );
                self.publish(p);
                Ok(priorities[preferred])
            }
            (Some(active), _) => Err(ControlError::AlreadyBest {
                pool: pool.to_string(),
                priority: priorities[active],
            }),
            (None, _) => Err(ControlError::NothingUsable(pool.to_string())),
        }
    }

    /// Applies time and state to pool `p`: ends ejections, announces transitions, closes
    /// connections per policy, decides the active tier, advances gradual closes, and
    /// publishes if routing changed.
    fn refresh(&mut self, p: usize) {
        if self.refresh_without_publish(p) {
            self.publish(p);
        }
        self.close_pending();
    }

    /// Closes the connections of upstreams that went down or into maint.
    fn close_pending(&mut self) {
        for closer in self.closing.drain(..) {
            closer.close_all();
        }
    }

    /// [`refresh`](Self::refresh) without the swap; returns whether routing changed.
    fn refresh_without_publish(&mut self, p: usize) -> bool {
        let now = Instant::now();
        let events = self.events.clone();
        let closing = &mut self.closing;
        let pool = &mut self.pools[p];
        let mut changed = false;
        for slot in &mut pool.slots {
            if slot.state.outlier.expire(now) && slot.reason.is_none() {
                slot.reason = Some("ejection time over".to_string());
            }
            let new = slot.state.state(now);
            if new != slot.shown {
                let reason = slot.reason.take().unwrap_or_default();
                events.record(
                    EventKind::Upstream,
                    &pool.config.name,
                    Some(slot.upstream.label()),
                    slot.shown.as_str(),
                    new.as_str(),
                    &reason,
                );
                slot.shown_reason = reason;
                slot.since_unix_ms = unix_ms();
                if new == State::Up {
                    // Usable again: failures counted before (some land long after an
                    // ejection, from attempts that were still in flight) must not keep
                    // it last in attempt orders, where nothing would ever reset them.
                    slot.upstream
                        .stats
                        .connect_failures_in_a_row
                        .store(0, Relaxed);
                }
                let close = new == State::Maint
                    || (new == State::Down
                        && pool.config.on_upstream_down == OnUpstreamDown::Close);
                if close {
                    // Closed only after the new snapshot is published (see `refresh`):
                    // a client moved off this upstream must find it already excluded.
                    closing.push(std::mem::take(&mut slot.closer));
                }
                slot.shown = new;
                changed = true;
            }
            slot.reason = None;
        }

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
        if decision.active != pool.active_tier {
            let reason = tier_reason(pool, decision.active, &counts);
            self.switch_tier(p, decision.active, reason, now);
            changed = true;
        }
        self.advance_gradual_closes(p, now);
        changed
    }

    fn switch_tier(&mut self, p: usize, to: Option<usize>, reason: String, now: Instant) {
        let pool = &mut self.pools[p];
        let priorities = pool.config.priorities();
        let name = |t: Option<usize>| t.map_or("none".to_string(), |t| priorities[t].to_string());
        self.events.record(
            EventKind::Tier,
            &pool.config.name,
            None,
            &name(pool.active_tier),
            &name(to),
            &reason,
        );
        match (pool.active_tier, to) {
            (Some(from), Some(to)) if to < from => {
                pool.stats.failbacks.fetch_add(1, Relaxed);
                if let Some(duration) = pool.config.drain_after_failback {
                    pool.start_gradual_close(to, duration, now);
                }
            }
            (Some(from), Some(to)) if to > from => {
                pool.stats.failovers.fetch_add(1, Relaxed);
            }
            (Some(_), None) => {
                pool.stats.failovers.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        pool.active_tier = to;
        pool.better_since = None;
    }

    fn advance_gradual_closes(&mut self, p: usize, now: Instant) {
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

    fn publish(&mut self, p: usize) {
        let route = Arc::new(self.route(p));
        let next = self.snapshot.load().with_pool(route);
        self.snapshot.store(Arc::new(next));
    }

    /// Builds every pool's route and the listener map, and swaps them in at once.
    fn publish_all(&mut self) {
        let routes = (0..self.pools.len())
            .map(|p| Arc::new(self.route(p)))
            .collect();
        self.snapshot.store(Arc::new(RoutingSnapshot::new(
            routes,
            self.listeners.clone(),
        )));
    }

    fn route(&self, p: usize) -> PoolRoute {
        let pool = &self.pools[p];
        PoolRoute::new(RouteParts {
            config: pool.config.clone(),
            stats: pool.stats.clone(),
            upstreams: pool.slots.iter().map(|s| s.upstream.clone()).collect(),
            states: pool.slots.iter().map(|s| s.shown).collect(),
            closers: pool.slots.iter().map(|s| s.closer.clone()).collect(),
            active_tier: pool.active_tier,
            feedback: self.handle.feedback(),
        })
    }

    /// Swaps to `config` (SPEC §4): pools and upstreams that stay (same pool name and
    /// address) keep their state, counters, connections and checks; new upstreams start
    /// from their first check's result; removed ones stop being checked while their
    /// established connections finish on their own. One snapshot swap at the end.
    fn apply_config(
        &mut self,
        config: &Config,
        first_checks: &HashMap<(String, SocketAddr), Result<(), CheckFailure>>,
    ) {
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
        self.close_pending();
    }

    fn reloaded_pool(
        &self,
        config: Arc<PoolConfig>,
        previous: Option<PoolState>,
        first_checks: &HashMap<(String, SocketAddr), Result<(), CheckFailure>>,
        now: Instant,
    ) -> PoolState {
        let Some(mut previous) = previous else {
            let mut pool = PoolState::fresh(config.clone(), &self.handle);
            for slot in &mut pool.slots {
                slot.apply_first_check(&config, first_checks, now);
            }
            pool.active_tier =
                crate::pool::preferred_tier(&pool.usable_counts(), config.min_usable);
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
        let active_priority = previous
            .active_tier
            .and_then(|t| previous.config.priorities().get(t).copied());
        let mut pool = PoolState::with_slots(
            config.clone(),
            previous.stats.clone(),
            carried,
            &self.handle,
        );
        pool.active_tier = active_priority
            .and_then(|priority| config.priorities().iter().position(|&p| p == priority))
            .or_else(|| crate::pool::preferred_tier(&pool.usable_counts(), config.min_usable));
        pool.better_since = previous.better_since;
        pool.drains = std::mem::take(&mut previous.drains);
        pool
    }

    fn status(&self) -> Vec<PoolView> {
        let now = Instant::now();
        let now_unix = unix_ms();
        self.pools
            .iter()
            .map(|pool| {
                let priorities = pool.config.priorities();
                PoolView {
                    name: pool.config.name.clone(),
                    balance: pool.config.balance.to_string(),
                    active_tier: pool.active_tier.map(|t| priorities[t]),
                    failback: pool.config.failback.to_string(),
                    failovers: pool.stats.failovers.load(Relaxed),
                    failbacks: pool.stats.failbacks.load(Relaxed),
                    upstreams: pool
                        .slots
                        .iter()
                        .map(|slot| {
                            let u = &slot.upstream;
                            let (passes, failures) = slot.state.counts();
                            UpstreamView {
                                name: u.label().to_string(),
                                address: u.config.target.clone(),
                                priority: u.config.priority,
                                weight: u.config.weight,
                                state: slot.shown.to_string(),
                                reason: slot.shown_reason.clone(),
                                since_unix_ms: slot.since_unix_ms,
                                last_check: slot.last_check.map(|(at, result)| CheckView {
                                    at_unix_ms: at,
                                    result: result
                                        .err()
                                        .map_or("ok".to_string(), |f| f.to_string()),
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
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// The earliest moment something changes without a message: an ejection ends, a
    /// failback hold elapses, or a gradual close is due.
    fn next_deadline(&self) -> Option<Instant> {
        let mut deadlines = Vec::new();
        for pool in &self.pools {
            deadlines.extend(
                pool.slots
                    .iter()
                    .filter_map(|s| s.state.outlier.ejected_until()),
            );
            if let (Some(since), Failback::After(hold)) = (pool.better_since, pool.config.failback)
            {
                deadlines.push(since + hold);
            }
            deadlines.extend(
                pool.drains
                    .iter()
                    .filter(|d| d.next_bucket < CLOSE_BUCKETS)
                    .map(|d| d.due(d.next_bucket)),
            );
        }
        deadlines.into_iter().min()
    }

    fn find(&self, upstream: u64) -> Option<(usize, usize)> {
        self.pools.iter().enumerate().find_map(|(p, pool)| {
            pool.slots
                .iter()
                .position(|s| s.upstream.id == upstream)
                .map(|u| (p, u))
        })
    }

    fn pool_index(&self, pool: &str) -> Result<usize, ControlError> {
        self.pools
            .iter()
            .position(|p| p.config.name == pool)
            .ok_or_else(|| ControlError::NoSuchPool(pool.to_string()))
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

/// Listener name → its settings.
fn listener_routes(config: &Config) -> HashMap<String, Arc<ListenerRoute>> {
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

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// === impl Slot ===

impl Slot {
    fn new(upstream: Arc<Upstream>) -> Self {
        Self {
            upstream,
            state: UpstreamState::new(),
            shown: State::Up,
            reason: None,
            closer: Arc::default(),
            checker: None,
            shown_reason: "starting: up until the first check".to_string(),
            since_unix_ms: unix_ms(),
            last_check: None,
        }
    }

    /// A new upstream added by a reload starts from its first check's result, so that
    /// no client is sent to an upstream that is already dead.
    fn apply_first_check(
        &mut self,
        config: &PoolConfig,
        first_checks: &HashMap<(String, SocketAddr), Result<(), CheckFailure>>,
        now: Instant,
    ) {
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
        self.last_check = Some((unix_ms(), *result));
    }
}

// === impl PoolState ===

impl PoolState {
    /// A pool whose upstreams all start up, each with a new health checker.
    fn fresh(config: Arc<PoolConfig>, controller: &ControllerHandle) -> Self {
        let slots = config
            .upstreams
            .iter()
            .map(|u| Slot::new(Arc::new(Upstream::new(&config.name, u.clone()))))
            .collect();
        Self::with_slots(config, Arc::default(), slots, controller)
    }

    /// A pool over existing slots; slots without a checker get one if checks are on.
    fn with_slots(
        config: Arc<PoolConfig>,
        stats: Arc<PoolStats>,
        mut slots: Vec<Slot>,
        controller: &ControllerHandle,
    ) -> Self {
        if config.health.enabled {
            for slot in slots.iter_mut().filter(|s| s.checker.is_none()) {
                slot.checker = Some(Checker::spawn(
                    slot.upstream.clone(),
                    config.clone(),
                    controller.clone(),
                ));
            }
        }
        Self {
            config,
            stats,
            slots,
            active_tier: None,
            better_since: None,
            drains: Vec::new(),
        }
    }

    /// Usable upstreams per tier, best tier first, from the announced states.
    fn usable_counts(&self) -> Vec<usize> {
        self.config
            .priorities()
            .into_iter()
            .map(|priority| {
                self.slots
                    .iter()
                    .filter(|s| s.upstream.config.priority == priority && s.shown.is_usable())
                    .count()
            })
            .collect()
    }

    /// After failing back to tier `to`: connections on every worse tier close gradually;
    /// new connections to those upstreams get fresh closers and are not affected.
    fn start_gradual_close(&mut self, to: usize, duration: Duration, now: Instant) {
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
    fn due(&self, k: usize) -> Instant {
        self.started + self.duration.mul_f64((k + 1) as f64 / CLOSE_BUCKETS as f64)
    }
}
