//! The controller driven by hand on paused time: check results and passive reports go
//! straight in, no checker touches the network, and every assertion reads what the
//! hot path and operators would see, the published snapshot and the event ring.

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
}

/// One checker started: for which upstream, and what would wake it.
#[derive(Clone)]
struct Started {
    address: SocketAddr,
    woken: Arc<Notify>,
}

impl SpawnChecker for ManualChecks {
    fn spawn(&self, upstream: Arc<Upstream>, _: Arc<PoolConfig>, _: CheckReports) -> Checker {
        let checker = Checker::new();
        if let Ok(mut started) = self.started.lock() {
            started.push(Started {
                address: upstream.config.address,
                woken: checker.woken(),
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
        self.controller.on_command(Message::Failback {
            pool: "p".to_string(),
            reply,
        });
        answered(answer)
    }

    fn reload(&mut self, config: Config, first_checks: FirstChecks) {
        let (reply, done) = oneshot::channel();
        self.controller.on_command(Message::Reload {
            config: Arc::new(config),
            first_checks,
            reply,
        });
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

    // The carried state goes on counting: one pass brings a back (rise = 1).
    h.check("a", true);
    assert_eq!(h.active(), Some(0));
    assert_eq!(h.usable(), labels(&["a", "c"]));
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
