//! The controller: the only writer of routing state.
//!
//! It owns every upstream's live state, applies what health checks, passive failures
//! and operators report, decides each pool's active tier, records an event for every
//! transition, closes connections where policy says so, and publishes a new routing
//! snapshot when anything routing-relevant changed. One writer means no lost updates
//! and no compare-and-swap loops; the hot path only ever reads.
//!
//! It holds the receiving ends of three channels whose message types are defined by the
//! modules that send them: operators' commands ([`Message`], here), check results
//! ([`CheckReport`], from `health`) and passive reports ([`PassiveReport`], from
//! `health::passive`, sent by the hot path through the snapshot). This file is the
//! message loop and the upstream transitions; `reconcile` applies a reload, `tiers`
//! switches tiers and drains, `view` renders the status.

mod deadlines;
mod ramps;
mod reconcile;
mod tiers;
mod view;

#[cfg(test)]
mod tests;

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
use crate::discovery::{self, Membership};
use crate::events::{EventKind, EventLog};
use crate::health::passive::{Feedback, PassiveReport};
use crate::health::state::{AdminOverride, CarriedState, State, UpstreamState};
use crate::health::{
    CheckFailure, CheckReport, CheckReports, Checker, NetworkChecks, SpawnChecker,
};
use crate::metrics::PoolStats;
use crate::shutdown::Shutdown;
use crate::snapshot::{
    CLOSE_BUCKETS, Closer, ListenerRoute, PoolRoute, RouteParts, RoutingSnapshot, SharedSnapshot,
    Upstream,
};
use crate::status::PoolView;
use deadlines::Deadlines;
use tiers::GradualClose;

/// What operators (admin API, reload) ask of the controller; each carries its reply.
#[derive(Debug)]
pub enum Message {
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
        first_checks: FirstChecks,
        reply: oneshot::Sender<()>,
    },
    /// The live view of every pool for the admin API.
    Status {
        reply: oneshot::Sender<Vec<PoolView>>,
    },
    /// Every pool's state, for the new process of a binary upgrade.
    Carried {
        reply: oneshot::Sender<Vec<CarriedPool>>,
    },
}

/// What answering a [`Message`] leaves to do.
#[must_use]
enum Applied {
    Answered,
    /// A new configuration is in force; its new upstreams' checkers are yet to start.
    Reload,
}

/// A pool's state as a binary upgrade hands it over, keyed as a reload keys it (pool
/// name, upstream addresses).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CarriedPool {
    pub pool: String,
    /// The active tier's priority: kept as a reload keeps it, so that an upgrade never
    /// fails back on its own (a manual failback still pending, say).
    pub active_tier: Option<u32>,
    pub upstreams: Vec<CarriedUpstream>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CarriedUpstream {
    pub address: SocketAddr,
    pub state: CarriedState,
    /// What the status showed as the reason, so that it goes on saying why.
    pub reason: String,
}

/// The first check of each upstream a reload adds, by (pool, address).
pub type FirstChecks = HashMap<(String, SocketAddr), Result<(), CheckFailure>>;

/// Why an operator's request to the controller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("no pool named {0:?}")]
    NoSuchPool(String),
    #[error("pool {pool:?} has no upstream named or addressed {upstream:?}")]
    NoSuchUpstream { pool: String, upstream: String },
    /// A host name or SRV name as written in the config that DNS resolves to several
    /// upstreams: acting on any one of them would be a guess.
    #[error("{upstream:?} is {} upstreams of pool {pool:?} now; name one by its label: {}", labels.len(), labels.join(", "))]
    AmbiguousUpstream {
        pool: String,
        upstream: String,
        labels: Vec<String>,
    },
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

pub struct Controller {
    pools: Vec<PoolState>,
    /// Listener name → its settings (pool, access lists), published with the pools.
    listeners: HashMap<String, Arc<ListenerRoute>>,
    /// Closers to fire once the snapshot that excludes their upstream is published.
    closing: Vec<Arc<Closer>>,
    /// Events of changes not yet published: recorded only after the swap, so that
    /// whoever sees an event (the admin API, a drill, a test) finds routing already
    /// changed.
    unpublished: Vec<PendingEvent>,
    snapshot: SharedSnapshot,
    events: Arc<EventLog>,
    checkers: Checkers,
    /// The sender every published route carries, for the hot path's reports.
    feedback: Feedback,
    handle: ControllerHandle,
    commands: mpsc::UnboundedReceiver<Message>,
    checks: mpsc::UnboundedReceiver<CheckReport>,
    passive: mpsc::UnboundedReceiver<PassiveReport>,
    discovery: Discovery,
    /// Upstream id → (pool, slot), for the reports of checks and traffic: a scan of
    /// every pool per report is what 1,000 checked pools cannot afford. A hint, checked
    /// at each use and rebuilt when it is wrong, so that nothing that moves slots has to
    /// remember to update it.
    where_is: HashMap<u64, (usize, usize)>,
    /// When each pool next changes by itself: what the run loop sleeps until.
    deadlines: Deadlines,
}

/// The pools' DNS discovery tasks, restarted with every configuration.
struct Discovery {
    tasks: Vec<tokio::task::AbortHandle>,
    /// Counts configurations; a membership from an older one is stale.
    epoch: u64,
    sender: discovery::MembershipSender,
    found: mpsc::UnboundedReceiver<Membership>,
}

/// An event waiting for the snapshot that carries its change.
struct PendingEvent {
    kind: EventKind,
    pool: String,
    upstream: Option<String>,
    old: String,
    new: String,
    reason: String,
}

impl PendingEvent {
    fn new(
        kind: EventKind,
        pool: &str,
        upstream: Option<&str>,
        old: &str,
        new: &str,
        reason: &str,
    ) -> Self {
        Self {
            kind,
            pool: pool.to_string(),
            upstream: upstream.map(str::to_string),
            old: old.to_string(),
            new: new.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// How the controller starts checkers, and where their reports go.
struct Checkers {
    spawn: Box<dyn SpawnChecker>,
    reports: CheckReports,
}

struct PoolState {
    config: Arc<PoolConfig>,
    stats: Arc<PoolStats>,
    slots: Vec<Slot>,
    /// Index into the pool's tiers (best first).
    active_tier: Option<usize>,
    better_since: Option<Instant>,
    drains: Vec<GradualClose>,
    /// Slow start of the active tier after a failback.
    failback_ramp: Option<ramps::TierRamp>,
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
    /// Since when it ramps up (slow start).
    ramp: Option<Instant>,
    /// Why a ramp should start at the next refresh: it became usable again, or a reload
    /// added it.
    ramp_due: Option<String>,
}

// === impl Discovery ===

impl Drop for Discovery {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
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
        first_checks: FirstChecks,
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
    pub async fn carried(&self) -> Result<Vec<CarriedPool>, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::Carried { reply });
        answer.await.map_err(|_| ControlError::Stopped)
    }

    pub async fn failback(&self, pool: &str) -> Result<u32, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::Failback {
            pool: pool.to_string(),
            reply,
        });
        answer.await.map_err(|_| ControlError::Stopped)?
    }
}

// === impl Controller ===

impl Controller {
    /// Live state for every pool of `config`, every upstream up (SPEC §3: until its
    /// first check completes), health checks started over the network and the first
    /// snapshot published. Needs a running tokio runtime.
    pub fn new(config: &Config, events: Arc<EventLog>) -> Self {
        Self::with_checkers(config, events, Box::new(NetworkChecks))
    }

    /// [`new`](Self::new), with checkers started by `spawn` instead.
    pub fn with_checkers(
        config: &Config,
        events: Arc<EventLog>,
        spawn: Box<dyn SpawnChecker>,
    ) -> Self {
        let (tx, commands) = mpsc::unbounded_channel();
        let (reports, checks) = mpsc::unbounded_channel();
        let (feedback, passive) = Feedback::channel();
        let (sender, found) = mpsc::unbounded_channel();
        let checkers = Checkers { spawn, reports };
        let pools = config
            .pools
            .iter()
            .map(|pool| {
                let mut pool = PoolState::fresh(pool.clone());
                pool.active_tier = pool.initial_tier(None);
                pool
            })
            .collect();
        let mut controller = Self {
            pools,
            listeners: reconcile::listener_routes(config),
            closing: Vec::new(),
            unpublished: Vec::new(),
            snapshot: Arc::new(ArcSwap::from_pointee(RoutingSnapshot::default())),
            events,
            checkers,
            feedback,
            handle: ControllerHandle { tx },
            commands,
            checks,
            passive,
            discovery: Discovery {
                tasks: Vec::new(),
                epoch: 0,
                sender,
                found,
            },
            where_is: HashMap::new(),
            deadlines: Deadlines::default(),
        };
        controller.publish_all();
        controller.start_checkers();
        debug!(pools = controller.pools.len(), "controller ready");
        controller
    }

    pub fn snapshot(&self) -> SharedSnapshot {
        self.snapshot.clone()
    }

    pub fn handle(&self) -> ControllerHandle {
        self.handle.clone()
    }

    /// Applies messages, reports and timers until the shutdown's drain has ended: while
    /// connections drain, the admin API still answers and upstreams that go down still
    /// have their connections closed.
    pub async fn run(mut self, shutdown: Shutdown) {
        self.restart_discovery();
        self.reset_deadlines();
        loop {
            debug_assert_eq!(self.deadlines.earliest(), self.next_deadline());
            let deadline = self.deadlines.earliest();
            // The controller holds a sender of each channel, so none of them closes.
            // Reports change one pool; everything else may change any.
            let changed = tokio::select! {
                biased;
                _ = shutdown.drained() => return,
                Some(message) = self.commands.recv() => {
                    if let Applied::Reload = self.on_command(message) {
                        // The reload's caller finishes the swap (new listeners, its log
                        // line) first: with `per_thread` it runs on this thread, and
                        // starting 1,000 checkers took 3.5 ms of the swap it reported.
                        tokio::task::yield_now().await;
                        self.start_checkers();
                    }
                    None
                }
                Some(report) = self.checks.recv() => Some(self.on_check(report)),
                Some(report) = self.passive.recv() => Some(self.on_passive(report)),
                Some(found) = self.discovery.found.recv() => {
                    self.on_membership(found);
                    None
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.on_timer();
                    None
                }
                else => return,
            };
            match changed {
                Some(Some(p)) => self.deadlines.set(p, self.pools[p].next_deadline()),
                Some(None) => {}
                None => self.reset_deadlines(),
            }
        }
    }

    /// Answers `message`. After a reload the new upstreams' checkers are still to start:
    /// the caller starts them once the reload's caller has run.
    fn on_command(&mut self, message: Message) -> Applied {
        match message {
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
                // Routing has swapped: what the checkers do next is an interval away.
                return Applied::Reload;
            }
            Message::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Message::Carried { reply } => {
                let _ = reply.send(self.carried());
            }
        }
        Applied::Answered
    }

    fn carried(&self) -> Vec<CarriedPool> {
        self.pools
            .iter()
            .map(|pool| CarriedPool {
                pool: pool.config.name.clone(),
                active_tier: pool
                    .active_tier
                    .and_then(|t| pool.config.priorities().get(t).copied()),
                upstreams: pool
                    .slots
                    .iter()
                    .map(|slot| CarriedUpstream {
                        address: slot.upstream.config.address,
                        state: slot.state.carried(),
                        reason: slot.shown_reason.clone(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Takes over the pool states a previous process handed over (before [`run`]
    /// applies any check result): no transition and no event, since nothing changed for
    /// the clients; each pool keeps its active tier, as a reload does. Pools and
    /// upstreams the config no longer has are ignored; new ones start as at a fresh
    /// start.
    ///
    /// [`run`]: Self::run
    pub fn inherit(&mut self, carried: &[CarriedPool]) {
        let now = Instant::now();
        for entry in carried {
            let Some(pool) = self.pools.iter_mut().find(|p| p.config.name == entry.pool) else {
                continue;
            };
            for upstream in &entry.upstreams {
                let Some(slot) = pool
                    .slots
                    .iter_mut()
                    .find(|s| s.upstream.config.address == upstream.address)
                else {
                    continue;
                };
                slot.state = UpstreamState::from_carried(upstream.state);
                slot.shown = slot.state.state(now);
                slot.shown_reason.clone_from(&upstream.reason);
            }
            pool.active_tier = pool.initial_tier(entry.active_tier);
        }
        self.publish_all();
    }

    /// Applies one active check result and answers the checker with its next interval.
    /// Returns the pool changed, if any.
    fn on_check(&mut self, report: CheckReport) -> Option<usize> {
        let CheckReport {
            upstream,
            result,
            reply,
        } = report;
        let (p, u) = self.find(upstream)?;
        let now = Instant::now();
        let pool = &mut self.pools[p];
        let health = &pool.config.health;
        let slot = &mut pool.slots[u];
        let stats = &slot.upstream.stats;
        match result {
            Ok(()) => stats.checks_passed.fetch_add(1, Relaxed),
            Err(_) => stats.checks_failed.fetch_add(1, Relaxed),
        };
        if slot.last_check.is_none() && result.is_ok() {
            // The first check confirms the start-up assumption: no transition, but the
            // reason shown should no longer say "until the first check".
            slot.shown_reason = "first check passed".to_string();
        }
        slot.last_check = Some((unix_ms(), result.clone()));
        slot.state
            .on_check(result.is_ok(), health.rise, health.fall, now);
        slot.reason = Some(match (result, slot.state.state(now)) {
            // Ejected while the checks had it down: the ejection is over, but the
            // upstream stays down until `rise` passes in a row.
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
        Some(p)
    }

    /// Applies one report from real traffic: failures may eject, and both wake the
    /// upstream's checker for an immediate check. Returns the pool changed, if any.
    fn on_passive(&mut self, report: PassiveReport) -> Option<usize> {
        let upstream = match report {
            PassiveReport::ConnectFailed { upstream, .. } | PassiveReport::Slow { upstream } => {
                upstream
            }
        };
        let (p, u) = self.find(upstream)?;
        let pool = &mut self.pools[p];
        let slot = &mut pool.slots[u];
        if let Some(checker) = &slot.checker {
            checker.check_now();
        }
        let PassiveReport::ConnectFailed {
            reason, in_a_row, ..
        } = report
        else {
            return None;
        };
        let now = Instant::now();
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
            // Only now that the snapshot excludes it: until then the count keeps it
            // last in attempt orders.
            upstream.stats.connect_failures_in_a_row.store(0, Relaxed);
        }
        Some(p)
    }

    /// Something in [`next_deadline`](Self::next_deadline) is due.
    fn on_timer(&mut self) {
        for p in 0..self.pools.len() {
            self.refresh(p);
        }
    }

    fn set_admin(
        &mut self,
        pool: &str,
        upstream: &str,
        admin: Option<AdminOverride>,
    ) -> Result<State, ControlError> {
        let p = self.pool_index(pool)?;
        let u = self.upstream_index(p, upstream)?;
        let slots = &mut self.pools[p].slots;
        slots[u].state.set_admin(admin);
        slots[u].reason = Some("admin".to_string());
        self.refresh(p);
        Ok(self.pools[p].slots[u].shown)
    }

    /// Applies time and state to pool `p`: ends ejections, announces transitions, closes
    /// connections per policy, decides the active tier, advances gradual closes, and
    /// publishes if routing changed.
    fn refresh(&mut self, p: usize) {
        if self.refresh_without_publish(p) {
            self.publish(p);
        }
        self.record_published_events();
        self.close_pending();
    }

    /// Records the events of what was just published, in the order they happened.
    pub(super) fn record_published_events(&mut self) {
        for e in self.unpublished.drain(..) {
            self.events.record(
                e.kind,
                &e.pool,
                e.upstream.as_deref(),
                &e.old,
                &e.new,
                &e.reason,
            );
        }
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
        let mut changed = self.announce_transitions(p, now);
        changed |= self.decide_tier(p, now);
        changed |= self.advance_ramps(p, now);
        self.advance_gradual_closes(p, now);
        changed
    }

    /// Records an event for every upstream whose state changed since last shown, and
    /// queues the closes its new state calls for. Returns whether any changed.
    fn announce_transitions(&mut self, p: usize, now: Instant) -> bool {
        let pool = &mut self.pools[p];
        let mut changed = false;
        for slot in &mut pool.slots {
            if slot.state.outlier.expire(now) && slot.reason.is_none() {
                slot.reason = Some("ejection time over".to_string());
            }
            let new = slot.state.state(now);
            if new != slot.shown {
                let reason = slot.reason.take().unwrap_or_default();
                self.unpublished.push(PendingEvent::new(
                    EventKind::Upstream,
                    &pool.config.name,
                    Some(slot.upstream.label()),
                    slot.shown.as_str(),
                    new.as_str(),
                    &reason,
                ));
                slot.shown_reason = reason;
                slot.since_unix_ms = unix_ms();
                if new.is_usable()
                    && matches!(slot.shown, State::Down | State::Ejected | State::Maint)
                {
                    slot.ramp_due = Some(format!("{} -> {new}", slot.shown));
                }
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
                    self.closing.push(std::mem::take(&mut slot.closer));
                }
                slot.shown = new;
                changed = true;
            }
            slot.reason = None;
        }
        changed
    }

    /// Starts the checker of every upstream to be checked that has none: after a
    /// reload's or a DNS change's swap, since starting 1,000 checker tasks is most of a
    /// large reload's work in the controller (each spawn from this thread wakes an idle
    /// worker through the I/O driver, a write(2) each) and routing does not need them.
    fn start_checkers(&mut self) {
        for pool in &mut self.pools {
            pool.start_checkers(&self.checkers);
        }
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
            ramps: pool.upstream_ramps(),
            failback_ramp: pool.failback_ramp_route(),
            feedback: self.feedback.clone(),
        })
    }

    /// The earliest moment something changes without a message: an ejection ends, a
    /// failback hold elapses, a gradual close is due or a slow start is over. A scan of
    /// every pool: the run loop keeps [`Deadlines`] instead.
    fn next_deadline(&self) -> Option<Instant> {
        self.pools.iter().filter_map(PoolState::next_deadline).min()
    }

    fn reset_deadlines(&mut self) {
        self.deadlines
            .reset(self.pools.iter().map(PoolState::next_deadline));
    }

    fn find(&mut self, upstream: u64) -> Option<(usize, usize)> {
        let holds = |pools: &[PoolState], (p, u): (usize, usize)| {
            pools
                .get(p)
                .and_then(|pool| pool.slots.get(u))
                .is_some_and(|slot| slot.upstream.id == upstream)
        };
        if let Some(&at) = self.where_is.get(&upstream)
            && holds(&self.pools, at)
        {
            return Some(at);
        }
        self.where_is = self
            .pools
            .iter()
            .enumerate()
            .flat_map(|(p, pool)| {
                pool.slots
                    .iter()
                    .enumerate()
                    .map(move |(u, slot)| (slot.upstream.id, (p, u)))
            })
            .collect();
        self.where_is
            .get(&upstream)
            .copied()
            .filter(|&at| holds(&self.pools, at))
    }

    fn pool_index(&self, pool: &str) -> Result<usize, ControlError> {
        self.pools
            .iter()
            .position(|p| p.config.name == pool)
            .ok_or_else(|| ControlError::NoSuchPool(pool.to_string()))
    }

    /// The upstream of pool `p` that `upstream` names: its label, else its address
    /// (as written or as resolved), else the host name or SRV name it was written as,
    /// provided that names only it.
    fn upstream_index(&self, p: usize, upstream: &str) -> Result<usize, ControlError> {
        let pool = &self.pools[p];
        let configs = pool.slots.iter().map(|s| &s.upstream.config);
        if let Some(u) = configs.clone().position(|c| c.label() == upstream) {
            return Ok(u);
        }
        let matching: Vec<usize> = configs
            .enumerate()
            .filter(|(_, c)| c.target == upstream || c.address.to_string() == upstream)
            .map(|(u, _)| u)
            .collect();
        match matching[..] {
            [u] => Ok(u),
            [] => Err(ControlError::NoSuchUpstream {
                pool: pool.config.name.clone(),
                upstream: upstream.to_string(),
            }),
            _ => Err(ControlError::AmbiguousUpstream {
                pool: pool.config.name.clone(),
                upstream: upstream.to_string(),
                labels: matching
                    .iter()
                    .map(|&u| pool.slots[u].upstream.label().to_string())
                    .collect(),
            }),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// === impl Checkers ===

impl Checkers {
    fn start(
        &self,
        upstream: Arc<Upstream>,
        pool: Arc<PoolConfig>,
        checked_within: Option<Duration>,
    ) -> Checker {
        self.spawn
            .spawn(upstream, pool, self.reports.clone(), checked_within)
    }
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
            ramp: None,
            ramp_due: None,
        }
    }
}

// === impl PoolState ===

impl PoolState {
    /// A pool whose upstreams all start up, without checkers until
    /// [`start_checkers`](Self::start_checkers).
    fn fresh(config: Arc<PoolConfig>) -> Self {
        let slots = config
            .upstreams
            .iter()
            .map(|u| Slot::new(Arc::new(Upstream::new(&config.name, u.clone()))))
            .collect();
        Self::with_slots(config, Arc::default(), slots)
    }

    /// A pool over existing slots, which keep their checkers.
    fn with_slots(config: Arc<PoolConfig>, stats: Arc<PoolStats>, slots: Vec<Slot>) -> Self {
        Self {
            config,
            stats,
            slots,
            active_tier: None,
            better_since: None,
            drains: Vec::new(),
            failback_ramp: None,
        }
    }

    /// A checker for every slot without one, if checks are on.
    fn start_checkers(&mut self, checkers: &Checkers) {
        if !self.config.health.enabled {
            return;
        }
        for slot in self.slots.iter_mut().filter(|s| s.checker.is_none()) {
            // A reload's first check counts as a check: the next follows it as the
            // controller would schedule it.
            let checked_within = slot.last_check.as_ref().map(|_| {
                if slot.state.is_deciding() {
                    self.config.health.fast_interval
                } else {
                    self.config.health.interval
                }
            });
            slot.checker =
                Some(checkers.start(slot.upstream.clone(), self.config.clone(), checked_within));
        }
    }

    /// Usable upstreams per tier, best tier first, from the announced states.
    fn usable_counts(&self) -> Vec<usize> {
        crate::pool::usable_counts(
            &self.config.priorities(),
            self.slots
                .iter()
                .map(|s| (s.upstream.config.priority, s.shown)),
        )
    }

    /// The tier SPEC §3 prefers now, with no failback hold.
    fn preferred_tier(&self) -> Option<usize> {
        crate::pool::preferred_tier(&self.usable_counts(), self.config.min_usable)
    }

    /// When this pool next changes by itself (see [`Controller::next_deadline`]).
    fn next_deadline(&self) -> Option<Instant> {
        let hold = match (self.better_since, self.config.failback) {
            (Some(since), Failback::After(hold)) => Some(since + hold),
            _ => None,
        };
        self.slots
            .iter()
            .filter_map(|s| s.state.outlier.ejected_until())
            .chain(hold)
            .chain(
                self.drains
                    .iter()
                    .filter(|d| d.next_bucket < CLOSE_BUCKETS)
                    .map(|d| d.due(d.next_bucket)),
            )
            .chain(self.ramp_ends())
            .min()
    }

    /// The active tier of a pool that starts (at start-up or added by a reload), or
    /// whose tiers a reload redrew: the tier of priority `kept` if the pool still has
    /// one, or else the preferred tier. Starting is no failover: no event, no count.
    fn initial_tier(&self, kept: Option<u32>) -> Option<usize> {
        kept.and_then(|priority| self.config.priorities().iter().position(|&p| p == priority))
            .or_else(|| self.preferred_tier())
    }
}
