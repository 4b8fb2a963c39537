//! The controller driven by hand on paused time: check results and passive reports go
//! straight in, no checker touches the network, and every assertion reads what the
//! hot path and operators would see, the published snapshot and the event ring.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::*;
use crate::events::Event;
use crate::metrics::ConnectFailure;

/// Starts checkers that run nothing, and remembers them in order.
#[derive(Default, Clone)]
struct ManualChecks {
    started: Arc<Mutex<Vec<Started>>>,
    /// The controller's routing, once it exists.
    snapshot: Arc<std::sync::OnceLock<SharedSnapshot>>,
}

/// One checker started: for which upstream, what would wake it, when its first check
/// was due, and whether routing already had its upstream.
#[derive(Clone)]
struct Started {
    address: SocketAddr,
    woken: Arc<Notify>,
    checked_within: Option<Duration>,
    routed: bool,
}

impl SpawnChecker for ManualChecks {
    fn spawn(
        &self,
        upstream: Arc<Upstream>,
        _: Arc<PoolConfig>,
        _: CheckReports,
        checked_within: Option<Duration>,
    ) -> Checker {
        let checker = Checker::new();
        let routed = self.snapshot.get().is_some_and(|snapshot| {
            snapshot
                .load()
                .pool(&upstream.pool)
                .is_some_and(|route| route.upstreams.iter().any(|u| u.id == upstream.id))
        });
        if let Ok(mut started) = self.started.lock() {
            started.push(Started {
                address: upstream.config.address,
                woken: checker.woken(),
                checked_within,
                routed,
            });
        }
        checker
    }
}

impl ManualChecks {
    fn started(&self) -> Vec<Started> {
        self.started.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

struct Harness {
    controller: Controller,
    snapshot: SharedSnapshot,
    events: Arc<EventLog>,
    checks: ManualChecks,
}

/// Pool `p` with `[pools.p]` settings `pool` and upstream entries `upstreams`; rise and
/// fall are 1 unless `pool` sets a health table.
fn config(pool: &str, upstreams: &str) -> Config {
    let health = if pool.contains("[pools.p.health]") {
        ""
    } else {
        "[pools.p.health]\nrise = 1\nfall = 1\n"
    };
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[listeners.l]
bind = "127.0.0.1:1"
pool = "p"
[pools.p]
upstreams = [{upstreams}]
{pool}
{health}
"#
    );
    match Config::parse(&text, Path::new("t.toml")) {
        Ok(config) => config,
        Err(e) => panic!("test config: {e}"),
    }
}

/// a and b on priority 0, c on 1, d on 2.
const FOUR: &str = r#"
  { address = "127.0.0.1:10", name = "a" },
  { address = "127.0.0.1:11", name = "b" },
  { address = "127.0.0.1:12", name = "c", priority = 1 },
  { address = "127.0.0.1:13", name = "d", priority = 2 },
"#;

/// a on priority 0, c on 1.
const TWO: &str = r#"
  { address = "127.0.0.1:10", name = "a" },
  { address = "127.0.0.1:12", name = "c", priority = 1 },
"#;

// === impl Harness ===

impl Harness {
    fn start(config: &Config) -> Self {
        let events = Arc::new(EventLog::new());
        let checks = ManualChecks::default();
        let controller =
            Controller::with_checkers(config, events.clone(), Box::new(checks.clone()));
        let _ = checks.snapshot.set(controller.snapshot());
        Self {
            snapshot: controller.snapshot(),
            controller,
            events,
            checks,
        }
    }

    fn route(&self) -> Arc<PoolRoute> {
        match self.snapshot.load().pool("p") {
            Some(route) => route.clone(),
            None => panic!("pool p is not published"),
        }
    }

    fn upstream(&self, label: &str) -> Arc<Upstream> {
        let route = self.route();
        match route.upstream_index(label) {
            Some(i) => route.upstreams[i].clone(),
            None => panic!("no upstream {label}"),
        }
    }

    /// One active check result, as a checker reports it; returns the next interval.
    fn check(&mut self, label: &str, passed: bool) -> Duration {
        let (reply, interval) = oneshot::channel();
        self.controller.on_check(CheckReport {
            upstream: self.upstream(label).id,
            result: if passed {
                Ok(())
            } else {
                Err(CheckFailure::Connect(ConnectFailure::Refused))
            },
            reply,
        });
        answered(interval)
    }

    /// Failed connects on real traffic, sent through the published route's feedback
    /// as the hot path sends them, then delivered.
    fn connects_fail(&mut self, label: &str, times: u32) {
        let route = self.route();
        let upstream = self.upstream(label);
        for _ in 0..times {
            route
                .feedback
                .connect_failed(upstream.id, &upstream.stats, ConnectFailure::Refused);
        }
        self.deliver_passive();
    }

    /// Applies what the hot path has reported so far, as the loop would.
    fn deliver_passive(&mut self) {
        while let Ok(report) = self.controller.passive.try_recv() {
            self.controller.on_passive(report);
        }
    }

    /// Lets `by` pass, waking the controller at each deadline on the way as its loop
    /// does.
    async fn advance(&mut self, by: Duration) {
        let until = Instant::now() + by;
        while let Some(due) = self.controller.next_deadline().filter(|&due| due <= until) {
            tokio::time::advance(due.saturating_duration_since(Instant::now())).await;
            self.controller.on_timer();
        }
        tokio::time::advance(until.saturating_duration_since(Instant::now())).await;
    }

    fn failback(&mut self) -> Result<u32, ControlError> {
        let (reply, answer) = oneshot::channel();
        let _ = self.controller.on_command(Message::Failback {
            pool: "p".to_string(),
            reply,
        });
        answered(answer)
    }

    fn reload(&mut self, config: Config, first_checks: FirstChecks) {
        let (reply, done) = oneshot::channel();
        // As the message loop does: the checkers start once the swap is answered.
        if let Applied::Reload = self.controller.on_command(Message::Reload {
            config: Arc::new(config),
            first_checks,
            reply,
        }) {
            self.controller.start_checkers();
        }
        answered(done);
    }

    /// The published active tier's priority.
    fn active(&self) -> Option<u32> {
        self.route().active_priority()
    }

    /// The published usable upstreams, in config order.
    fn usable(&self) -> Vec<String> {
        let route = self.route();
        (0..route.upstreams.len())
            .filter(|&i| route.states[i].is_usable())
            .map(|i| route.upstreams[i].label().to_string())
            .collect()
    }

    fn state(&self, label: &str) -> State {
        let route = self.route();
        match route.upstream_index(label) {
            Some(i) => route.states[i],
            None => panic!("no upstream {label}"),
        }
    }

    /// Tier events as (old, new, reason).
    fn tier_events(&self) -> Vec<(String, String, String)> {
        self.events_of(EventKind::Tier)
            .into_iter()
            .map(|e| (e.old, e.new, e.reason))
            .collect()
    }

    /// Upstream events as (upstream, old, new).
    fn upstream_events(&self) -> Vec<(String, String, String)> {
        self.events_of(EventKind::Upstream)
            .into_iter()
            .map(|e| (e.upstream.unwrap_or_default(), e.old, e.new))
            .collect()
    }

    fn events_of(&self, kind: EventKind) -> Vec<Event> {
        self.events
            .all()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }
}

/// A reply the controller must have sent before returning.
fn answered<T>(mut reply: oneshot::Receiver<T>) -> T {
    match reply.try_recv() {
        Ok(answer) => answer,
        Err(e) => panic!("no reply: {e}"),
    }
}

fn tier_event(old: &str, new: &str, reason: &str) -> (String, String, String) {
    (old.to_string(), new.to_string(), reason.to_string())
}

fn upstream_event(upstream: &str, old: &str, new: &str) -> (String, String, String) {
    (upstream.to_string(), old.to_string(), new.to_string())
}

fn labels(labels: &[&str]) -> Vec<String> {
    labels.iter().map(|l| l.to_string()).collect()
}

#[tokio::test(start_paused = true)]
async fn starts_on_the_best_tier_with_every_upstream_up_and_a_checker_each() {
    let h = Harness::start(&config("", FOUR));
    assert_eq!(h.active(), Some(0));
    assert_eq!(h.usable(), labels(&["a", "b", "c", "d"]));
    assert!(h.events.all().is_empty(), "starting is no transition");
    assert_eq!(h.checks.started().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn failover_moves_to_the_best_usable_tier_when_the_active_one_empties() {
    let mut h = Harness::start(&config("", FOUR));
    h.check("a", false);
    assert_eq!(h.active(), Some(0), "b still serves tier 0");
    assert_eq!(h.usable(), labels(&["b", "c", "d"]));
    assert!(h.tier_events().is_empty());

    h.check("b", false);
    assert_eq!(h.active(), Some(1));
    assert_eq!(h.usable(), labels(&["c", "d"]));
    assert_eq!(
        h.tier_events(),
        vec![tier_event("0", "1", "tier 0 has no usable upstream")]
    );
    assert_eq!(
        h.upstream_events(),
        vec![
            upstream_event("a", "up", "down"),
            upstream_event("b", "up", "down")
        ]
    );
    assert_eq!(h.route().stats.failovers.load(Relaxed), 1);

    // Tier 1 empties too: the next usable tier is 2, skipping nothing usable.
    h.check("c", false);
    assert_eq!(h.active(), Some(2));
    h.check("d", false);
    assert_eq!(h.active(), None);
    assert!(h.usable().is_empty());
    assert_eq!(
        h.tier_events().last(),
        Some(&tier_event("2", "none", "no usable upstream in any tier"))
    );
}

#[tokio::test(start_paused = true)]
async fn failback_immediate_returns_as_soon_as_the_better_tier_is_usable() {
    let mut h = Harness::start(&config("failback = \"immediate\"", TWO));
    h.check("a", false);
    assert_eq!(h.active(), Some(1));
    h.check("a", true);
    assert_eq!(h.active(), Some(0));
    assert_eq!(h.usable(), labels(&["a", "c"]));
    assert_eq!(
        h.tier_events(),
        vec![
            tier_event("0", "1", "tier 0 has no usable upstream"),
            tier_event("1", "0", "failback: a better tier is usable"),
        ]
    );
    assert_eq!(h.route().stats.failbacks.load(Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn failback_after_a_hold_down_and_a_flap_restarts_the_clock() {
    let mut h = Harness::start(&config("failback = \"30s\"", TWO));
    h.check("a", false);
    assert_eq!(h.active(), Some(1));

    h.check("a", true);
    h.advance(Duration::from_secs(20)).await;
    assert_eq!(h.active(), Some(1), "held for 20s of 30s");
    assert_eq!(
        h.usable(),
        labels(&["a", "c"]),
        "usable, but not preferred yet"
    );

    // The flap: down and up again restarts the 30 seconds.
    h.check("a", false);
    h.check("a", true);
    h.advance(Duration::from_secs(20)).await;
    assert_eq!(
        h.active(),
        Some(1),
        "40s since the first recovery, but only 20s since the flap"
    );
    h.advance(Duration::from_secs(10)).await;
    assert_eq!(h.active(), Some(0), "30s since the flap, with no message");
    assert_eq!(
        h.tier_events(),
        vec![
            tier_event("0", "1", "tier 0 has no usable upstream"),
            tier_event("1", "0", "failback: a better tier stayed usable for 30s"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn failback_manual_stays_until_the_operator_asks() {
    let mut h = Harness::start(&config("failback = \"manual\"", TWO));
    assert_eq!(
        h.failback(),
        Err(ControlError::AlreadyBest {
            pool: "p".to_string(),
            priority: 0
        })
    );
    h.check("a", false);
    h.check("a", true);
    h.advance(Duration::from_secs(3600)).await;
    assert_eq!(
        h.active(),
        Some(1),
        "an hour later, still where failover left it"
    );
    assert_eq!(h.usable(), labels(&["a", "c"]));

    assert_eq!(h.failback(), Ok(0));
    assert_eq!(h.active(), Some(0));
    assert_eq!(
        h.tier_events().last(),
        Some(&tier_event("1", "0", "manual failback"))
    );
    assert!(matches!(
        h.failback(),
        Err(ControlError::AlreadyBest { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn min_usable_fails_over_before_the_tier_is_empty() {
    let four_two_tiers = r#"
      { address = "127.0.0.1:10", name = "a" },
      { address = "127.0.0.1:11", name = "b" },
      { address = "127.0.0.1:12", name = "c", priority = 1 },
      { address = "127.0.0.1:13", name = "d", priority = 1 },
    "#;
    let mut h = Harness::start(&config("min_usable = 2", four_two_tiers));
    h.check("a", false);
    assert_eq!(
        h.active(),
        Some(1),
        "tier 0 has one usable of the two it needs"
    );
    assert_eq!(h.usable(), labels(&["b", "c", "d"]));
    assert_eq!(
        h.tier_events(),
        vec![tier_event(
            "0",
            "1",
            "tier 0 has 1 usable upstream(s), fewer than min_usable 2"
        )]
    );
    // With no tier at two, the best tier with any is preferred: back to 0.
    h.check("c", false);
    assert_eq!(h.active(), Some(0));
    h.check("a", true);
    assert_eq!(h.active(), Some(0));
    assert_eq!(h.tier_events().len(), 2);
}

const OUTLIER: &str =
    "[pools.p.outlier]\nconsecutive_failures = 3\nbase_ejection = \"10s\"\nmax_ejection = \"1m\"\n";

#[tokio::test(start_paused = true)]
async fn passive_failures_eject_and_a_passing_check_ends_the_ejection() {
    let mut h = Harness::start(&config(OUTLIER, FOUR));
    h.connects_fail("a", 2);
    assert_eq!(
        h.state("a"),
        State::Up,
        "two failures are below the threshold"
    );

    h.connects_fail("a", 1);
    assert_eq!(h.state("a"), State::Ejected);
    assert_eq!(h.usable(), labels(&["b", "c", "d"]));
    assert_eq!(h.active(), Some(0));
    let ejected = h.events_of(EventKind::Upstream);
    assert_eq!(ejected.len(), 1);
    assert_eq!(
        (ejected[0].old.as_str(), ejected[0].new.as_str()),
        ("up", "ejected")
    );
    assert_eq!(
        ejected[0].reason,
        "3 consecutive failures (connect refused); ejected for 10s"
    );
    assert_eq!(
        h.upstream("a")
            .stats
            .connect_failures_in_a_row
            .load(Relaxed),
        0,
        "reset once the snapshot excludes it"
    );

    h.check("a", true);
    assert_eq!(h.state("a"), State::Up);
    assert_eq!(h.usable(), labels(&["a", "b", "c", "d"]));
    assert_eq!(
        h.upstream_events().last(),
        Some(&upstream_event("a", "ejected", "up"))
    );
}

#[tokio::test(start_paused = true)]
async fn passive_reports_wake_the_upstreams_checker() {
    let mut h = Harness::start(&config(OUTLIER, FOUR));
    let woken = |h: &Harness, address: &str| -> Arc<Notify> {
        match h
            .checks
            .started()
            .into_iter()
            .find(|s| s.address.to_string() == address)
        {
            Some(started) => started.woken,
            None => panic!("no checker for {address}"),
        }
    };
    let is_woken = |notify: Arc<Notify>| async move {
        tokio::time::timeout(Duration::ZERO, notify.notified())
            .await
            .is_ok()
    };
    h.connects_fail("a", 1);
    assert!(
        is_woken(woken(&h, "127.0.0.1:10")).await,
        "one failure checks at once"
    );
    assert!(!is_woken(woken(&h, "127.0.0.1:11")).await);

    let route = h.route();
    route.feedback.slow(h.upstream("b").id);
    h.deliver_passive();
    assert!(
        is_woken(woken(&h, "127.0.0.1:11")).await,
        "a hedged attempt checks too"
    );
    assert_eq!(h.state("b"), State::Up);
}

#[tokio::test(start_paused = true)]
async fn an_ejection_ends_by_itself_when_its_time_is_over() {
    let mut h = Harness::start(&config(OUTLIER, FOUR));
    h.connects_fail("a", 3);
    h.connects_fail("b", 3);
    assert_eq!(
        h.active(),
        Some(1),
        "an ejected tier fails over like a down one"
    );

    h.advance(Duration::from_millis(9_999)).await;
    assert_eq!(h.state("a"), State::Ejected);
    h.advance(Duration::from_millis(1)).await;
    assert_eq!(h.state("a"), State::Up);
    assert_eq!(h.state("b"), State::Up);
    assert_eq!(h.active(), Some(0));
    let last = h.events_of(EventKind::Upstream).pop();
    assert_eq!(
        last.map(|e| e.reason),
        Some("ejection time over".to_string())
    );
}

#[tokio::test(start_paused = true)]
async fn a_reload_carries_the_state_of_upstreams_that_stay() {
    let three = r#"
      { address = "127.0.0.1:10", name = "a" },
      { address = "127.0.0.1:11", name = "b" },
      { address = "127.0.0.1:12", name = "c", priority = 1 },
    "#;
    let mut h = Harness::start(&config("", three));
    h.check("a", false);
    assert_eq!(h.active(), Some(0), "b serves tier 0");
    let a_before = h.upstream("a");
    a_before.stats.connections_total.fetch_add(7, Relaxed);

    // b leaves, e joins tier 0 and its first check failed, c gains a weight.
    let reloaded = r#"
      { address = "127.0.0.1:10", name = "a" },
      { address = "127.0.0.1:14", name = "e" },
      { address = "127.0.0.1:12", name = "c", priority = 1, weight = 5 },
    "#;
    let e: SocketAddr = "127.0.0.1:14".parse().unwrap_or_else(|_| unreachable!());
    let first_checks = FirstChecks::from([(
        ("p".to_string(), e),
        Err(CheckFailure::Connect(ConnectFailure::Refused)),
    )]);
    h.reload(config("", reloaded), first_checks);

    assert_eq!(h.state("a"), State::Down, "a stays down across the reload");
    assert_eq!(h.state("e"), State::Down, "e starts from its first check");
    assert_eq!(h.usable(), labels(&["c"]));
    assert_eq!(
        h.active(),
        Some(1),
        "with b gone, tier 0 has nothing usable"
    );
    let a_after = h.upstream("a");
    assert_eq!(a_after.id, a_before.id);
    assert_eq!(a_after.stats.connections_total.load(Relaxed), 7);
    assert_eq!(h.upstream("c").config.weight, 5);
    assert_eq!(
        h.upstream_events(),
        vec![
            upstream_event("a", "up", "down"),
            upstream_event("b", "up", "removed"),
        ]
    );
    assert_eq!(
        h.tier_events(),
        vec![tier_event("0", "1", "tier 0 has no usable upstream")]
    );
    let started = h.checks.started();
    assert_eq!(
        started.len(),
        4,
        "a checker for e only; a and c keep theirs"
    );
    assert_eq!(started.last().map(|s| s.address), Some(e));
    // Checked before the swap, e is next checked an interval later (a settled down
    // upstream: the regular interval); the start-up checkers check at once.
    assert_eq!(
        started.last().map(|s| s.checked_within),
        Some(Some(Duration::from_secs(2)))
    );
    assert!(started[..3].iter().all(|s| s.checked_within.is_none()));

    // The carried state goes on counting: one pass brings a back (rise = 1).
    h.check("a", true);
    assert_eq!(h.active(), Some(0));
    assert_eq!(h.usable(), labels(&["a", "c"]));
}

/// A reload that adds a whole pool checks its upstreams before the swap, and their
/// checkers count that check as done: were they to check again at once, a reload adding
/// 1,000 pools would be followed by a second burst of 1,000 checks, in its swap. And
/// the checkers start once routing has the pool, not within the swap.
#[tokio::test(start_paused = true)]
async fn a_pool_a_reload_adds_is_not_checked_again_at_once_nor_before_the_swap() {
    let mut h = Harness::start(&config("", TWO));
    let q = "[pools.q]\nupstreams = [{ address = \"127.0.0.1:20\" }, \
             { address = \"127.0.0.1:21\" }, { address = \"127.0.0.1:22\" }]\n\
             [pools.q.health]\ninterval = \"3s\"\nfast_interval = \"1s\"\nrise = 1\nfall = 1\n";
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    // 22's check could not run (the proxy was out of descriptors): it has none.
    let first_checks = FirstChecks::from([
        (("q".to_string(), at(20)), Ok(())),
        (
            ("q".to_string(), at(21)),
            Err(CheckFailure::Connect(ConnectFailure::Refused)),
        ),
    ]);
    h.reload(config(q, TWO), first_checks);

    let started = h.checks.started();
    let added: Vec<_> = started[2..]
        .iter()
        .map(|s| (s.address.port(), s.checked_within))
        .collect();
    assert_eq!(
        added,
        vec![
            (20, Some(Duration::from_secs(3))),
            (21, Some(Duration::from_secs(3))),
            (22, None),
        ],
        "checked before the swap: next an interval later; never checked: at once"
    );
    assert!(
        started[2..].iter().all(|s| s.routed),
        "started after the swap"
    );
    let route = h.snapshot.load().pool("q").cloned();
    let states = route.map(|r| r.states.to_vec()).unwrap_or_default();
    assert_eq!(states, vec![State::Up, State::Down, State::Up]);
}

/// Through the message loop, a reload is answered before its new upstreams' checkers
/// start (the caller's swap must not wait for 1,000 spawns), and they do start.
#[tokio::test(start_paused = true)]
async fn the_message_loop_answers_a_reload_then_starts_its_checkers() {
    let h = Harness::start(&config("", TWO));
    let handle = h.controller.handle();
    let shutdown = crate::shutdown::Shutdown::new();
    let running = tokio::spawn(h.controller.run(shutdown.clone()));
    let e = SocketAddr::from(([127, 0, 0, 1], 14));
    let with_e = config(
        "",
        r#"
  { address = "127.0.0.1:10", name = "a" },
  { address = "127.0.0.1:12", name = "c", priority = 1 },
  { address = "127.0.0.1:14", name = "e", priority = 1 },
"#,
    );
    let first_checks = FirstChecks::from([(("p".to_string(), e), Ok(()))]);

    assert_eq!(handle.reload(Arc::new(with_e), first_checks).await, Ok(()));
    let started = |h: &ManualChecks| h.started().iter().any(|s| s.address == e);
    assert!(
        !started(&h.checks),
        "the reload's caller runs before the checkers start"
    );
    let deadline = Instant::now() + Duration::from_secs(1);
    while !started(&h.checks) {
        assert!(Instant::now() < deadline, "no checker for the new upstream");
        tokio::task::yield_now().await;
    }

    shutdown.begin();
    shutdown.drain(Duration::ZERO).await;
    assert!(running.await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn the_message_loop_applies_check_reports_and_answers_commands() {
    let h = Harness::start(&config("", TWO));
    let reports = h.controller.checkers.reports.clone();
    let handle = h.controller.handle();
    let a = h.upstream("a").id;
    let shutdown = crate::shutdown::Shutdown::new();
    let running = tokio::spawn(h.controller.run(shutdown.clone()));

    let (reply, interval) = oneshot::channel();
    let sent = reports.send(CheckReport {
        upstream: a,
        result: Err(CheckFailure::Timeout),
        reply,
    });
    assert!(sent.is_ok());
    assert_eq!(
        interval.await,
        Ok(Duration::from_secs(2)),
        "decided: back to interval"
    );
    // The report was applied before its reply: a status asked after it sees it.
    let status = handle.status().await.unwrap_or_default();
    assert_eq!(status[0].active_tier, Some(1));
    assert_eq!(status[0].upstreams[0].reason, "check timeout");
    assert_eq!(
        h.snapshot
            .load()
            .pool("p")
            .and_then(|r| r.active_priority()),
        Some(1)
    );

    shutdown.begin();
    shutdown.drain(Duration::ZERO).await;
    assert!(running.await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_disables_checks_does_not_leave_an_upstream_down_for_ever() {
    let mut h = Harness::start(&config("", TWO));
    h.check("a", false);
    assert_eq!(h.state("a"), State::Down);
    assert_eq!(h.active(), Some(1));
    h.reload(
        config("[pools.p.health]\nenabled = false\n", TWO),
        FirstChecks::default(),
    );
    assert_eq!(h.state("a"), State::Up, "no check is left to bring it back");
    assert_eq!(h.active(), Some(0));
    assert_eq!(
        h.upstream_events().last(),
        Some(&upstream_event("a", "down", "up"))
    );
}

/// Slow-start events as (upstream, or "tier" for the failback ramp, old, new).
fn slow_start_events(h: &Harness) -> Vec<(String, String, String)> {
    h.events_of(EventKind::SlowStart)
        .into_iter()
        .map(|e| {
            (
                e.upstream.unwrap_or_else(|| "tier".to_string()),
                e.old,
                e.new,
            )
        })
        .collect()
}

/// Of `clients` new connections routed by the published snapshot now, how many go
/// first to each upstream.
fn first_choices(h: &Harness, clients: u32) -> HashMap<String, u32> {
    let route = h.route();
    let mut counts = HashMap::new();
    for i in 0..clients {
        let client = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let first = crate::pool::attempt_order(&route, client, &[])[0];
        *counts
            .entry(route.upstreams[first].label().to_string())
            .or_insert(0) += 1;
    }
    counts
}

fn share(counts: &HashMap<String, u32>, label: &str) -> f64 {
    let total: u32 = counts.values().sum();
    f64::from(counts.get(label).copied().unwrap_or(0)) / f64::from(total.max(1))
}

fn assert_near(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() < 0.04,
        "{what}: {actual:.3}, expected {expected:.3}"
    );
}

const SLOW_START: &str = "slow_start = \"10s\"";

/// a, b and c on priority 0, d on 1.
const THREE_AND_ONE: &str = r#"
  { address = "127.0.0.1:10", name = "a" },
  { address = "127.0.0.1:11", name = "b" },
  { address = "127.0.0.1:12", name = "c" },
  { address = "127.0.0.1:13", name = "d", priority = 1 },
"#;

#[tokio::test(start_paused = true)]
async fn an_upstream_rejoining_a_tier_of_three_ramps_to_its_full_share() {
    let mut h = Harness::start(&config(SLOW_START, THREE_AND_ONE));
    h.check("a", false);
    h.advance(Duration::from_secs(60)).await;
    h.check("a", true);
    assert_eq!(h.state("a"), State::Up);
    assert_eq!(
        slow_start_events(&h),
        vec![upstream_event("a", "full", "ramp")]
    );
    let started = h.events_of(EventKind::SlowStart)[0].reason.clone();
    assert_eq!(
        started,
        "down -> up: its share of tier 0's new connections grows from 10% to full over 10s"
    );
    // A third of tier 0 at full weight: a tenth of that at first, then linearly more.
    for (secs, expected) in [(0.0, 0.1 / 3.0), (5.0, 0.55 / 3.0), (9.0, 0.91 / 3.0)] {
        let status = h.controller.status();
        let ramp = status[0].upstreams[0].slow_start.clone();
        assert_eq!(
            ramp.map(|r| r.share_percent),
            Some(super::ramps::percent(0.1 + 0.09 * secs)),
            "/status at {secs}s"
        );
        assert_near(share(&first_choices(&h, 6_000), "a"), expected, "a's share");
        assert_eq!(
            first_choices(&h, 100).get("d"),
            None,
            "the rest stays in tier 0"
        );
        let next = if secs == 0.0 { 5.0 } else { 4.0 };
        h.advance(Duration::from_secs_f64(next)).await;
    }
    h.advance(Duration::from_secs(1)).await;
    assert_eq!(
        slow_start_events(&h).last(),
        Some(&upstream_event("a", "ramp", "full")),
        "ended by the controller's own deadline, with no message"
    );
    assert!(!h.route().ramping);
    assert_eq!(h.controller.status()[0].upstreams[0].slow_start, None);
    assert_near(
        share(&first_choices(&h, 6_000), "a"),
        1.0 / 3.0,
        "a at full weight",
    );
}

#[tokio::test(start_paused = true)]
async fn a_ramp_is_cut_short_when_its_upstream_fails_again_and_restarts_after() {
    let mut h = Harness::start(&config(SLOW_START, THREE_AND_ONE));
    h.connects_fail("a", 5);
    assert_eq!(h.state("a"), State::Ejected);
    h.check("a", true);
    h.advance(Duration::from_secs(5)).await;
    h.check("a", false);
    assert_eq!(
        slow_start_events(&h),
        vec![
            upstream_event("a", "full", "ramp"),
            upstream_event("a", "ramp", "stopped"),
        ]
    );
    assert!(!h.route().ramping);
    h.check("a", true);
    let status = h.controller.status();
    assert_eq!(
        status[0].upstreams[0]
            .slow_start
            .as_ref()
            .map(|r| r.share_percent),
        Some(10),
        "back again: from the start"
    );
}

#[tokio::test(start_paused = true)]
async fn no_ramp_without_slow_start_or_for_an_upstream_alone_in_its_tier() {
    let mut h = Harness::start(&config("", THREE_AND_ONE));
    h.check("a", false);
    h.check("a", true);
    assert!(slow_start_events(&h).is_empty());
    assert!(!h.route().ramping);

    let mut h = Harness::start(&config(SLOW_START, THREE_AND_ONE));
    h.check("d", false);
    h.check("d", true);
    assert!(
        slow_start_events(&h).is_empty(),
        "d has nobody in its tier to leave the rest to"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failback_moves_new_connections_over_in_the_same_ramp() {
    let mut h = Harness::start(&config(SLOW_START, TWO));
    h.check("a", false);
    assert_eq!(h.active(), Some(1));
    assert!(
        slow_start_events(&h).is_empty(),
        "failover for survival is never slowed"
    );
    assert_eq!(share(&first_choices(&h, 100), "c"), 1.0);

    h.check("a", true);
    assert_eq!(h.active(), Some(0));
    assert_eq!(
        slow_start_events(&h),
        vec![upstream_event("tier", "full", "ramp")]
    );
    assert_eq!(
        h.events_of(EventKind::SlowStart)[0].reason,
        "failback to tier 0: its share of new connections grows from 10% to 100% over 10s, the rest stay on tier 1"
    );
    for (secs, expected) in [(0, 0.1), (5, 0.55), (9, 0.91)] {
        let status = h.controller.status();
        let ramp = status[0].failback_ramp.clone();
        assert_eq!(
            ramp.map(|r| (r.from_tier, r.to_tier, r.share_percent, r.remaining_ms)),
            Some((1, 0, super::ramps::percent(expected), 10_000 - secs * 1000)),
            "/status at {secs}s"
        );
        let counts = first_choices(&h, 4_000);
        assert_near(share(&counts, "a"), expected, &format!("tier 0 at {secs}s"));
        assert_near(
            share(&counts, "c"),
            1.0 - expected,
            &format!("tier 1 at {secs}s"),
        );
        h.advance(Duration::from_secs(if secs == 0 { 5 } else { 4 }))
            .await;
    }
    h.advance(Duration::from_secs(1)).await;
    assert_eq!(
        slow_start_events(&h).last(),
        Some(&upstream_event("tier", "ramp", "full"))
    );
    assert_eq!(share(&first_choices(&h, 100), "a"), 1.0);
    assert_eq!(h.controller.status()[0].failback_ramp, None);
    assert_eq!(h.route().stats.failbacks.load(Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failover_mid_ramp_is_immediate() {
    let mut h = Harness::start(&config(SLOW_START, TWO));
    h.check("a", false);
    h.check("a", true);
    h.advance(Duration::from_secs(3)).await;
    h.check("a", false);
    assert_eq!(h.active(), Some(1));
    assert_eq!(
        slow_start_events(&h),
        vec![
            upstream_event("tier", "full", "ramp"),
            upstream_event("tier", "ramp", "stopped"),
        ]
    );
    assert_eq!(share(&first_choices(&h, 100), "c"), 1.0);
    // The next failback ramps from the start again.
    h.check("a", true);
    let ramp = h.controller.status()[0].failback_ramp.clone();
    assert_eq!(ramp.map(|r| r.share_percent), Some(10));
}

#[tokio::test(start_paused = true)]
async fn the_old_tier_losing_its_last_upstream_mid_ramp_sends_everything_to_the_new() {
    let mut h = Harness::start(&config(SLOW_START, TWO));
    h.check("a", false);
    h.check("a", true);
    h.advance(Duration::from_secs(2)).await;
    assert!(share(&first_choices(&h, 1_000), "c") > 0.5);
    h.check("c", false);
    assert_eq!(h.active(), Some(0));
    assert_eq!(share(&first_choices(&h, 1_000), "a"), 1.0, "at once");
    let ended = h.events_of(EventKind::SlowStart).pop();
    assert_eq!(
        ended.map(|e| (e.old, e.new, e.reason)),
        Some((
            "ramp".to_string(),
            "full".to_string(),
            "tier 1 has no usable upstream left: every new connection goes to tier 0 at once"
                .to_string()
        ))
    );
    assert_eq!(h.controller.status()[0].failback_ramp, None);
}

#[tokio::test(start_paused = true)]
async fn a_failback_hold_down_ramps_from_when_the_hold_ends() {
    let mut h = Harness::start(&config("slow_start = \"10s\"\nfailback = \"30s\"", TWO));
    h.check("a", false);
    h.check("a", true);
    h.advance(Duration::from_secs(29)).await;
    assert_eq!(h.active(), Some(1));
    assert!(slow_start_events(&h).is_empty());
    h.advance(Duration::from_secs(1)).await;
    assert_eq!(h.active(), Some(0));
    let ramp = h.controller.status()[0].failback_ramp.clone();
    assert_eq!(
        ramp.map(|r| (r.share_percent, r.remaining_ms)),
        Some((10, 10_000)),
        "the ramp starts when the hold-down ends, not when a came back"
    );
    assert_near(share(&first_choices(&h, 4_000), "a"), 0.1, "tier 0");
}

#[tokio::test(start_paused = true)]
async fn a_manual_failback_ramps_too() {
    let mut h = Harness::start(&config("slow_start = \"10s\"\nfailback = \"manual\"", TWO));
    h.check("a", false);
    h.check("a", true);
    assert_eq!(h.failback(), Ok(0));
    assert_eq!(
        slow_start_events(&h),
        vec![upstream_event("tier", "full", "ramp")]
    );
    assert_near(share(&first_choices(&h, 4_000), "a"), 0.1, "tier 0");
}

#[tokio::test(start_paused = true)]
async fn drain_after_failback_waits_for_the_ramp_to_reach_full_weight() {
    let mut h = Harness::start(&config(
        "slow_start = \"10s\"\ndrain_after_failback = \"3200ms\"",
        TWO,
    ));
    h.check("a", false);
    // Connections on c before the failback, one per close bucket and more.
    let route = h.route();
    let c = route.upstream_index("c").unwrap_or(1);
    let tokens: Vec<_> = (0..400).map(|_| route.closers[c].token()).collect();
    h.check("a", true);
    h.advance(Duration::from_millis(9_999)).await;
    assert!(
        tokens.iter().all(|t| !t.is_cancelled()),
        "tier 1 still takes new connections: its old ones stay"
    );
    h.advance(Duration::from_millis(1)).await;
    assert_eq!(
        slow_start_events(&h).last(),
        Some(&upstream_event("tier", "ramp", "full"))
    );
    h.advance(Duration::from_millis(1_600)).await;
    let closed = tokens.iter().filter(|t| t.is_cancelled()).count();
    assert!(
        (100..300).contains(&closed),
        "half way through the drain, about half closed: {closed}"
    );
    h.advance(Duration::from_millis(1_600)).await;
    assert!(tokens.iter().all(|t| t.is_cancelled()));
}

#[tokio::test(start_paused = true)]
async fn an_upstream_a_reload_adds_ramps_up() {
    let mut h = Harness::start(&config(SLOW_START, THREE_AND_ONE));
    let with_e = format!("{THREE_AND_ONE}  {{ address = \"127.0.0.1:14\", name = \"e\" }},\n");
    let e: SocketAddr = "127.0.0.1:14".parse().unwrap_or_else(|_| unreachable!());
    h.reload(
        config(SLOW_START, &with_e),
        FirstChecks::from([(("p".to_string(), e), Ok(()))]),
    );
    assert_eq!(
        slow_start_events(&h),
        vec![upstream_event("e", "full", "ramp")]
    );
    assert_eq!(
        h.events_of(EventKind::SlowStart)[0].reason,
        "added by reload: its share of tier 0's new connections grows from 10% to full over 10s"
    );
    assert_near(
        share(&first_choices(&h, 8_000), "e"),
        0.1 / 4.0,
        "e's share",
    );

    // A reload that turns slow start off ends the ramp at once.
    h.reload(config("", &with_e), FirstChecks::default());
    assert_eq!(
        slow_start_events(&h).last(),
        Some(&upstream_event("e", "ramp", "stopped"))
    );
    assert!(!h.route().ramping);
}

#[tokio::test(start_paused = true)]
async fn a_move_to_a_better_tier_because_the_active_one_emptied_is_not_slowed() {
    let mut h = Harness::start(&config("slow_start = \"10s\"\nfailback = \"30s\"", TWO));
    h.check("a", false);
    h.check("a", true);
    assert_eq!(h.active(), Some(1), "held back by the hold-down");
    h.check("c", false);
    assert_eq!(h.active(), Some(0));
    assert!(slow_start_events(&h).is_empty(), "survival: no ramp");
    assert_eq!(share(&first_choices(&h, 100), "a"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn a_second_failback_mid_ramp_ramps_from_the_tier_that_served_last() {
    let mut h = Harness::start(&config(SLOW_START, FOUR));
    for label in ["a", "b", "c"] {
        h.check(label, false);
    }
    assert_eq!(h.active(), Some(2));
    h.check("c", true);
    assert_eq!(h.active(), Some(1));
    h.advance(Duration::from_secs(5)).await;
    h.check("a", true);
    assert_eq!(h.active(), Some(0));
    assert_eq!(
        slow_start_events(&h),
        vec![
            upstream_event("tier", "full", "ramp"),
            upstream_event("tier", "ramp", "stopped"),
            upstream_event("tier", "full", "ramp"),
        ]
    );
    let counts = first_choices(&h, 4_000);
    assert_near(share(&counts, "a"), 0.1, "tier 0 starts over at a tenth");
    assert_near(
        share(&counts, "c"),
        0.9,
        "the rest to tier 1, which served last",
    );
    assert_eq!(counts.get("d"), None);
}

#[tokio::test(start_paused = true)]
async fn dns_memberships_replace_only_their_entrys_members_and_never_empty_it() {
    // localhost resolves to 127.0.0.1 only: one address family per name.
    let mut h = Harness::start(&config(
        "",
        r#"{ address = "127.0.0.1:10", name = "a" }, { address = "localhost:15" }"#,
    ));
    h.controller.discovery.epoch = 1;
    let loaded = dns_labels(&h);
    assert_eq!(loaded, labels(&["a", "localhost:15@127.0.0.1"]));

    // From a task of an older configuration, or empty: nothing changes.
    h.controller
        .on_membership(found(0, vec![localhost_member(2, 1)], FirstChecks::new()));
    h.controller
        .on_membership(found(1, Vec::new(), FirstChecks::new()));
    assert_eq!(dns_labels(&h), loaded);

    // The loaded members vanish, 127.0.0.2 appears with a failed first check: it
    // starts down; the written upstream stays as it was.
    let first = FirstChecks::from([(
        (
            "p".to_string(),
            "127.0.0.2:15".parse().unwrap_or_else(|_| unreachable!()),
        ),
        Err(CheckFailure::Connect(ConnectFailure::Refused)),
    )]);
    h.controller
        .on_membership(found(1, vec![localhost_member(2, 3)], first));
    assert_eq!(dns_labels(&h), labels(&["a", "localhost:15@127.0.0.2"]));
    assert_eq!(h.state("127.0.0.2:15"), State::Down, "checked before use");
    assert_eq!(h.upstream("127.0.0.2:15").config.weight, 3);
    let removed = h
        .events
        .all()
        .into_iter()
        .find(|e| e.upstream.as_deref() == Some("localhost:15@127.0.0.1"))
        .unwrap_or_else(|| panic!("no event for the vanished member"));
    assert_eq!(
        (removed.new.as_str(), removed.reason.as_str()),
        ("removed", "DNS")
    );
}

/// A member of the `localhost:15` entry at 127.0.0.`host`, labelled as DNS discovery
/// labels it.
fn localhost_member(host: u8, weight: u32) -> crate::config::UpstreamConfig {
    let address = SocketAddr::from(([127, 0, 0, host], 15));
    crate::config::UpstreamConfig {
        address,
        target: "localhost:15".to_string(),
        discovered: Some(format!("localhost:15@{}", address.ip())),
        name: None,
        priority: 0,
        weight,
    }
}

fn found(
    epoch: u64,
    members: Vec<crate::config::UpstreamConfig>,
    first: FirstChecks,
) -> Membership {
    Membership {
        pool: "p".to_string(),
        target: "localhost:15".to_string(),
        members,
        first_checks: first,
        epoch,
    }
}

fn dns_labels(h: &Harness) -> Vec<String> {
    h.route()
        .upstreams
        .iter()
        .map(|u| u.label().to_string())
        .collect()
}

/// The admin API names upstreams by label; the `host:port` an entry was written as
/// still names its member while it has one (scripts written before discovery), and is
/// refused, with the labels to use, while it has several.
#[tokio::test(start_paused = true)]
async fn an_admin_call_by_host_name_acts_only_while_the_name_is_one_upstream() {
    let mut h = Harness::start(&config(
        "",
        r#"{ address = "127.0.0.1:10", name = "a" }, { address = "localhost:15" }"#,
    ));
    h.controller.discovery.epoch = 1;
    let maint = Some(AdminOverride::Maint);
    assert_eq!(
        h.controller.set_admin("p", "localhost:15", maint),
        Ok(State::Maint)
    );
    assert_eq!(h.state("localhost:15@127.0.0.1"), State::Maint);
    assert_eq!(
        h.controller.set_admin("p", "localhost:15", None),
        Ok(State::Up)
    );

    let members = vec![localhost_member(1, 1), localhost_member(2, 1)];
    h.controller
        .on_membership(found(1, members, FirstChecks::new()));
    assert_eq!(
        h.controller.set_admin("p", "localhost:15", maint),
        Err(ControlError::AmbiguousUpstream {
            pool: "p".to_string(),
            upstream: "localhost:15".to_string(),
            labels: labels(&["localhost:15@127.0.0.1", "localhost:15@127.0.0.2"]),
        })
    );
    let message = h
        .controller
        .set_admin("p", "localhost:15", maint)
        .map_err(|e| e.to_string());
    assert_eq!(
        message,
        Err("\"localhost:15\" is 2 upstreams of pool \"p\" now; name one by its label: localhost:15@127.0.0.1, localhost:15@127.0.0.2".to_string())
    );
    assert!(
        [1, 2]
            .iter()
            .all(|host| h.state(&format!("127.0.0.{host}:15")) == State::Up),
        "a refused call changes nothing"
    );

    // By label, or by the address it resolves to: that one member only.
    assert_eq!(
        h.controller.set_admin("p", "localhost:15@127.0.0.2", maint),
        Ok(State::Maint)
    );
    assert_eq!(
        h.controller
            .set_admin("p", "127.0.0.1:15", Some(AdminOverride::Drain)),
        Ok(State::Drain)
    );
    assert_eq!(h.state("localhost:15@127.0.0.2"), State::Maint);
    assert_eq!(h.state("localhost:15@127.0.0.1"), State::Drain);
    assert!(matches!(
        h.controller.set_admin("p", "localhost:16", maint),
        Err(ControlError::NoSuchUpstream { .. })
    ));
}

/// A binary upgrade: the old controller's states, taken over by a new one, decide the
/// tier at once, without an event, and the checks go on counting from where they were.
#[tokio::test(start_paused = true)]
async fn inherited_states_choose_the_tier_without_an_event_and_checks_go_on_from_them() {
    let pool = "[pools.p.health]\nrise = 2\nfall = 2\n";
    let mut old = Harness::start(&config(pool, TWO));
    old.check("a", false);
    old.check("a", false);
    old.check("c", true);
    assert_eq!(old.active(), Some(1));
    let carried = old.controller.carried();
    assert_eq!(carried.len(), 1);
    assert_eq!(carried[0].upstreams.len(), 2);

    let mut new = Harness::start(&config(pool, TWO));
    new.controller.inherit(&carried);
    assert_eq!(new.state("a"), State::Down);
    assert_eq!(new.active(), Some(1), "on the backup from the start");
    assert!(new.events.all().is_empty(), "taking over is no transition");

    // Down, it needs `rise` passes in a row (a fresh start's first pass would do).
    new.check("a", true);
    assert_eq!(new.state("a"), State::Down, "a pass out of two");
    new.check("a", true);
    assert_eq!(new.state("a"), State::Up);
    assert_eq!(
        new.upstream_events(),
        vec![upstream_event("a", "down", "up")]
    );
}

/// An upgrade never fails back on its own: with a manual failback pending, the new
/// process stays on the tier the old one served from.
#[tokio::test(start_paused = true)]
async fn an_inherited_active_tier_is_kept_while_a_manual_failback_is_pending() {
    let pool = "failback = \"manual\"";
    let mut old = Harness::start(&config(pool, TWO));
    old.check("a", false);
    old.check("a", true);
    assert_eq!(old.state("a"), State::Up);
    assert_eq!(old.active(), Some(1), "waiting for the operator");

    let mut new = Harness::start(&config(pool, TWO));
    new.controller.inherit(&old.controller.carried());
    assert_eq!(new.active(), Some(1));
    assert!(new.events.all().is_empty());
}
