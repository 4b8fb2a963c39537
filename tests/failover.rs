//! The failover engine end to end (SPEC §3): real upstreams die, hang, vanish and come
//! back while clients connect through the proxy.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use common::*;
use switchyard::drill::{ClientStream, Stop};
use switchyard::health::state::AdminOverride;

/// Active checks too slow to matter: only the passive path can be what reacts.
const SLOW_HEALTH: &str = "[pools.p.health]\ninterval = \"30s\"\ntimeout = \"2s\"\nfall = 3\n";

/// The setup most tests share: upstreams `primary` (priority 0) and `backup` (1) behind
/// listener `front` → pool `p`, every upstream past its first active check.
struct Scenario {
    primary: Backend,
    /// Held so that it serves for as long as the scenario lives.
    _backup: Backend,
    proxy: TestProxy,
    /// Listener `front`.
    addr: SocketAddr,
}

impl Scenario {
    /// With [`FAST_HEALTH`] and `pool_extra` lines in `[pools.p]`.
    async fn start(pool_extra: &str) -> Self {
        Self::with_health(pool_extra, FAST_HEALTH).await
    }

    /// With `health` as the whole `[pools.p.health]` table.
    async fn with_health(pool_extra: &str, health: &str) -> Self {
        Self::from_config(pool_extra, health, "").await
    }

    /// Also with the admin API, on a port of its own.
    async fn with_admin(pool_extra: &str) -> Self {
        Self::from_config(
            pool_extra,
            FAST_HEALTH,
            "[admin]\nlisten = \"127.0.0.1:0\"\n",
        )
        .await
    }

    async fn from_config(pool_extra: &str, health: &str, prefix: &str) -> Self {
        let primary = Backend::start("primary").await;
        let backup = Backend::start("backup").await;
        let proxy = start_proxy(&format!(
            "{prefix}{}",
            pool_config(
                &[("primary", primary.addr, 0), ("backup", backup.addr, 1)],
                pool_extra,
                health,
            )
        ));
        let addr = proxy.addr("front");
        wait_first_checks(&proxy).await;
        Self {
            primary,
            _backup: backup,
            proxy,
            addr,
        }
    }

    /// The pool's active tier as routing sees it now.
    fn active(&self) -> Option<u32> {
        active_priority(&self.proxy, "p")
    }

    /// Kills the primary, waits for the failover, restarts it and waits until it is up.
    /// Returns the Unix ms of the primary's `up` event.
    async fn fail_over_and_restart(&mut self) -> u64 {
        self.primary.kill().await;
        wait_event(&self.proxy, "primary", "down", SOON).await;
        wait_until(SOON, "failover", || self.active() == Some(1)).await;
        let before = self.proxy.proxy.events.all().last().map_or(0, |e| e.id);
        self.primary.restart().await;
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(up) = self
                .proxy
                .proxy
                .events
                .since(before)
                .into_iter()
                .find(|e| e.upstream.as_deref() == Some("primary") && e.new == "up")
            {
                return up.at_unix_ms;
            }
            assert!(Instant::now() < deadline, "primary never came back up");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn tier_events(&self) -> Vec<switchyard::events::Event> {
        tier_events(&self.proxy)
    }
}

/// The active-tier events so far.
fn tier_events(proxy: &TestProxy) -> Vec<switchyard::events::Event> {
    proxy
        .proxy
        .events
        .all()
        .into_iter()
        .filter(|e| e.upstream.is_none())
        .collect()
}

/// Opens one client every `every` until `stop` is cancelled; returns who served each
/// client, in the order the clients started, and one line per failed client saying when
/// it started, how long it took and why it failed.
fn steady_stream(
    addr: SocketAddr,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(Vec<String>, Vec<String>)> {
    let stream = ClientStream {
        addr,
        every,
        // Far beyond any test's stream: `stop` ends it.
        limit: 3 * SOON,
        client_timeout: SOON,
        speaks_first: false,
    };
    tokio::spawn(async move {
        let timeline = stream.run(Stop::On(stop)).await;
        let mut served = Vec::new();
        let mut failures = Vec::new();
        for (n, record) in timeline.records.into_iter().enumerate() {
            match record.served_by {
                Ok(name) => served.push(name),
                Err(e) => failures.push(format!(
                    "client #{n} started at +{} ms, failed after {} ms: {e}",
                    record.started.as_millis(),
                    record.latency.as_millis()
                )),
            }
        }
        (served, failures)
    })
}

/// A long-lived connection that streams chunks and checks every echoed byte until
/// `stop`; returns the upstream's name, or the error that ended it.
async fn stream_until(
    addr: std::net::SocketAddr,
    seed: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(String, usize), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = read_line(&mut stream).await.map_err(|e| e.to_string())?;
    let name = name
        .strip_prefix("hello ")
        .ok_or("no greeting")?
        .to_string();
    let mut chunks = 0;
    let mut back = vec![0u8; 4096];
    while !stop.load(Relaxed) {
        let chunk = random_bytes(4096, seed * 1_000_000 + chunks as u64);
        stream
            .write_all(&chunk)
            .await
            .map_err(|e| format!("{name}: write: {e}"))?;
        match tokio::time::timeout(SOON, stream.read_exact(&mut back)).await {
            Ok(Ok(_)) if back == chunk => {}
            Ok(Ok(_)) => return Err(format!("{name}: corrupted echo")),
            Ok(Err(e)) => return Err(format!("{name}: read: {e}")),
            Err(_) => return Err(format!("{name}: stalled")),
        }
        chunks += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((name, chunks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_under_steady_load_no_new_connection_fails_and_backup_streams_are_untouched()
{
    let mut s = Scenario::start("").await;
    let (proxy, addr) = (&s.proxy, s.addr);

    // Ten streams on the backup (primary drained meanwhile), ten on the primary.
    let stop_streams = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut streams = JoinSet::new();
    proxy
        .proxy
        .controller
        .set_admin("p", "primary", Some(AdminOverride::Drain))
        .await
        .unwrap();
    for i in 0..10 {
        streams.spawn(stream_until(addr, i, stop_streams.clone()));
    }
    let on_backup = proxy.proxy.snapshot.load().pool("p").unwrap().upstreams[1].clone();
    wait_until(SOON, "streams on backup", || {
        on_backup.stats.connections_active.load(Relaxed) == 10
    })
    .await;
    proxy
        .proxy
        .controller
        .set_admin("p", "primary", None)
        .await
        .unwrap();
    for i in 10..20 {
        streams.spawn(stream_until(addr, i, stop_streams.clone()));
    }
    let on_primary = proxy.proxy.snapshot.load().pool("p").unwrap().upstreams[0].clone();
    wait_until(SOON, "streams on primary", || {
        on_primary.stats.connections_active.load(Relaxed) == 10
    })
    .await;

    let stop_clients = CancellationToken::new();
    let clients = steady_stream(addr, Duration::from_millis(2), stop_clients.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.primary.kill().await;
    // Active checks mark it down, or passive ejection gets there first: either way the
    // pool must move to the backup tier, which is what this test is about.
    wait_until(SOON, "the pool failed over to the backup tier", || {
        s.active() == Some(1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_clients.cancel();
    let (served, failures) = clients.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} new connections failed during the failover:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A loaded runtime skips late ticks, so the count varies; what matters is that the
    // stream spanned the kill and went on well after the failover.
    assert!(
        served.len() >= 100,
        "the stream ran: {} clients",
        served.len()
    );
    assert_eq!(served.first().map(String::as_str), Some("primary"));
    assert!(
        served.iter().rev().take(50).all(|s| s == "backup"),
        "clients after the failover went to the backup"
    );

    stop_streams.store(true, Relaxed);
    let mut backup_ok = 0;
    let mut primary_closed = 0;
    while let Some(result) = streams.join_next().await {
        match result.unwrap() {
            Ok((name, chunks)) => {
                assert_eq!(name, "backup", "a stream on the dead primary survived");
                assert!(chunks > 10);
                backup_ok += 1;
            }
            Err(e) => {
                assert!(e.starts_with("primary"), "a backup stream broke: {e}");
                primary_closed += 1;
            }
        }
    }
    assert_eq!((backup_ok, primary_closed), (10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_primary_is_marked_down_within_half_a_second_then_clients_go_to_the_backup() {
    let s = Scenario::start("").await;
    let addr = s.addr;
    assert_eq!(greeted_by(addr).await.unwrap(), "primary");

    let hung_at = unix_ms();
    s.primary.hang();
    let down = wait_event(&s.proxy, "primary", "down", SOON).await;
    let detection = down.at_unix_ms.saturating_sub(hung_at);
    // interval 200 ms + two checks of 100 ms timeout with 100 ms fast interval = 500 ms,
    // plus scheduling slack on a loaded machine.
    assert!(detection <= 700, "detection took {detection} ms");
    assert_eq!(down.reason, "check timeout");
    assert_eq!(s.active(), Some(1));
    for _ in 0..50 {
        assert_eq!(greeted_by(addr).await.unwrap(), "backup");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_primary_costs_at_most_two_clients_a_connect_timeout() {
    let mut s = Scenario::with_health(
        "connect_timeout = \"300ms\"\noutlier = { consecutive_failures = 2, base_ejection = \"30s\" }",
        SLOW_HEALTH,
    )
    .await;
    let addr = s.addr;
    s.primary.black_hole().await;

    let mut latencies = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        assert_eq!(greeted_by(addr).await.unwrap(), "backup");
        latencies.push(started.elapsed());
    }
    let slow = latencies
        .iter()
        .filter(|l| **l >= Duration::from_millis(290))
        .count();
    assert!(
        slow <= 2,
        "{slow} clients paid the connect timeout: {latencies:?}"
    );
    let ejected = wait_event(&s.proxy, "primary", "ejected", SOON).await;
    assert!(
        ejected
            .reason
            .starts_with("2 consecutive failures (connect timeout)"),
        "{}",
        ejected.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_primary_under_a_steady_stream_fails_no_client() {
    let mut s = Scenario::with_health(
        "connect_timeout = \"300ms\"\noutlier = { consecutive_failures = 2 }",
        SLOW_HEALTH,
    )
    .await;
    s.primary.black_hole().await;
    let stop = CancellationToken::new();
    let clients = steady_stream(s.addr, Duration::from_millis(2), stop.clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.cancel();
    let (served, failures) = clients.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} clients failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(served.iter().all(|name| name == "backup"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_primary_with_hedging_no_client_waits_much_more_than_hedge_after() {
    let mut s = Scenario::with_health(
        "connect_timeout = \"300ms\"\nhedge_after = \"50ms\"\noutlier = { consecutive_failures = 2 }",
        SLOW_HEALTH,
    )
    .await;
    let addr = s.addr;
    s.primary.black_hole().await;
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(greeted_by(addr).await.unwrap(), "backup");
        worst = worst.max(started.elapsed());
    }
    assert!(
        worst < Duration::from_millis(200),
        "a client waited {worst:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_immediate_returns_as_soon_as_the_primary_is_up() {
    let mut s = Scenario::start("").await;
    let up_at = s.fail_over_and_restart().await;
    wait_until(SOON, "failback", || s.active() == Some(0)).await;
    let failback = s
        .tier_events()
        .into_iter()
        .find(|e| e.new == "0")
        .expect("failback event");
    assert!(
        failback.at_unix_ms.saturating_sub(up_at) < 100,
        "failback waited"
    );
    assert_eq!(greeted_by(s.addr).await.unwrap(), "primary");
    let route = s.proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    let stats = &route.stats;
    assert_eq!(
        (stats.failovers.load(Relaxed), stats.failbacks.load(Relaxed)),
        (1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_after_a_duration_waits_for_it() {
    let mut s = Scenario::start("failback = \"3s\"").await;
    let up_at = s.fail_over_and_restart().await;
    assert_eq!(
        greeted_by(s.addr).await.unwrap(),
        "backup",
        "still on the backup right after recovery"
    );
    wait_until(Duration::from_secs(15), "failback", || {
        s.active() == Some(0)
    })
    .await;
    let failback = s
        .tier_events()
        .into_iter()
        .find(|e| e.new == "0")
        .expect("failback event");
    let waited = failback.at_unix_ms.saturating_sub(up_at);
    assert!(
        (2990..4500).contains(&waited),
        "failed back after {waited} ms, expected 3 s"
    );
    assert!(
        failback.reason.contains("stayed usable for 3s"),
        "{}",
        failback.reason
    );
    assert_eq!(greeted_by(s.addr).await.unwrap(), "primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_manual_waits_for_the_operator() {
    // Manual failback needs the admin API that performs it.
    let mut s = Scenario::with_admin("failback = \"manual\"").await;
    s.fail_over_and_restart().await;
    // Recovered and healthy, yet traffic stays on the backup for as long as we look.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert_eq!(s.active(), Some(1));
        assert_eq!(greeted_by(s.addr).await.unwrap(), "backup");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.proxy.proxy.controller.failback("p").await, Ok(0));
    assert_eq!(greeted_by(s.addr).await.unwrap(), "primary");
    let failback = s
        .tier_events()
        .into_iter()
        .find(|e| e.new == "0")
        .expect("failback event");
    assert_eq!(failback.reason, "manual failback");
    assert!(
        s.proxy.proxy.controller.failback("p").await.is_err(),
        "nothing better to fail back to"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_primary_never_fails_back_with_a_failback_duration() {
    let health = "[pools.p.health]\ninterval = \"100ms\"\nfast_interval = \"50ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n";
    let mut s = Scenario::with_health("failback = \"3s\"", health).await;
    s.fail_over_and_restart().await;
    // Flap every 300 ms for 4.5 s: up and down many times, never usable for 3 s.
    let until = Instant::now() + Duration::from_millis(4500);
    let mut up = true;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if up {
            s.primary.kill().await;
        } else {
            s.primary.restart().await;
        }
        up = !up;
        assert_eq!(s.active(), Some(1), "failed back while flapping");
    }
    let ups = s
        .proxy
        .proxy
        .events
        .all()
        .iter()
        .filter(|e| e.upstream.as_deref() == Some("primary") && e.new == "up")
        .count();
    assert!(ups >= 4, "the primary did flap ({ups} times up)");
    assert!(
        s.tier_events().iter().all(|e| e.new != "0"),
        "{:#?}",
        s.tier_events()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_usable_two_with_one_of_three_primaries_up_uses_the_backup_tier() {
    let mut a = Backend::start("a").await;
    let mut b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let x = Backend::start("x").await;
    let y = Backend::start("y").await;
    let proxy = start_proxy(&pool_config(
        &[
            ("a", a.addr, 0),
            ("b", b.addr, 0),
            ("c", c.addr, 0),
            ("x", x.addr, 1),
            ("y", y.addr, 1),
        ],
        "min_usable = 2",
        FAST_HEALTH,
    ));
    let addr = proxy.addr("front");
    wait_first_checks(&proxy).await;
    a.kill().await;
    wait_event(&proxy, "a", "down", SOON).await;
    assert_eq!(
        active_priority(&proxy, "p"),
        Some(0),
        "two primaries are still enough"
    );
    b.kill().await;
    wait_event(&proxy, "b", "down", SOON).await;
    wait_until(SOON, "failover", || active_priority(&proxy, "p") == Some(1)).await;
    let failover = tier_events(&proxy)
        .into_iter()
        .find(|e| e.new == "1")
        .unwrap();
    assert!(
        failover.reason.contains("fewer than min_usable 2"),
        "{}",
        failover.reason
    );
    for _ in 0..20 {
        let name = greeted_by(addr).await.unwrap();
        assert!(name == "x" || name == "y", "served by {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_at_start_is_skipped_within_one_check_timeout() {
    let mut primary = Backend::start("primary").await;
    primary.kill().await;
    let backup = Backend::start("backup").await;
    let started = unix_ms();
    let proxy = start_proxy(&pool_config(
        &[("primary", primary.addr, 0), ("backup", backup.addr, 1)],
        "",
        FAST_HEALTH,
    ));
    let down = wait_event(&proxy, "primary", "down", SOON).await;
    assert!(
        down.at_unix_ms - started < 300,
        "first check decided after {} ms",
        down.at_unix_ms - started
    );
    assert_eq!(down.reason, "connect refused");
    assert_eq!(down.old, "up", "counted as up until the first check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_on_real_traffic_triggers_an_immediate_check() {
    let health = "[pools.p.health]\ninterval = \"60s\"\nfast_interval = \"100ms\"\ntimeout = \"200ms\"\nfall = 1\n";
    let mut s = Scenario::with_health("", health).await;
    s.primary.kill().await;
    let killed = unix_ms();
    assert_eq!(greeted_by(s.addr).await.unwrap(), "backup");
    let down = wait_event(&s.proxy, "primary", "down", SOON).await;
    assert!(
        down.at_unix_ms - killed < 1000,
        "no immediate check: down after {} ms",
        down.at_unix_ms - killed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_connections_of_a_down_upstream_are_closed_or_kept_per_policy() {
    for (policy, expect_closed) in [("close", true), ("keep", false)] {
        let s = Scenario::start(&format!("on_upstream_down = \"{policy}\"")).await;
        let mut established = TcpStream::connect(s.addr).await.unwrap();
        assert_eq!(read_line(&mut established).await.unwrap(), "hello primary");
        s.primary.hang();
        wait_event(&s.proxy, "primary", "down", SOON).await;
        let closed = is_closed(&mut established, Duration::from_millis(500)).await;
        assert_eq!(closed, expect_closed, "on_upstream_down = {policy}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maint_closes_established_connections_and_drain_keeps_them() {
    let s = Scenario::start("on_upstream_down = \"keep\"").await;
    let (proxy, addr) = (&s.proxy, s.addr);
    let mut first = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut first).await.unwrap(), "hello primary");

    assert_eq!(
        proxy
            .proxy
            .controller
            .set_admin("p", "primary", Some(AdminOverride::Drain))
            .await,
        Ok(switchyard::health::state::State::Drain)
    );
    assert_eq!(
        greeted_by(addr).await.unwrap(),
        "backup",
        "drain: no new connections"
    );
    first.write_all(b"still").await.unwrap();
    let mut back = [0u8; 5];
    first.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still", "drain: established connections stay");

    proxy
        .proxy
        .controller
        .set_admin(
            "p",
            s.primary.addr.to_string().as_str(),
            Some(AdminOverride::Maint),
        )
        .await
        .unwrap();
    assert!(
        is_closed(&mut first, SOON).await,
        "maint closes established connections"
    );
    let admin = proxy
        .proxy
        .events
        .all()
        .into_iter()
        .filter(|e| e.reason == "admin")
        .count();
    assert_eq!(admin, 2);
    assert!(
        proxy
            .proxy
            .controller
            .set_admin("p", "nosuch", None)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_all_down_try_all_still_attempts_and_reject_closes_at_once() {
    for (mode, expect_served) in [("try_all", true), ("reject", false)] {
        let primary = Backend::start("primary").await;
        // Checks expect something the backend never says: every upstream is "down",
        // though it would serve fine.
        let health =
            "[pools.p.health]\ninterval = \"200ms\"\ntimeout = \"200ms\"\nexpect = \"nope\"\n";
        let proxy = start_proxy(&pool_config(
            &[("primary", primary.addr, 0)],
            &format!("when_all_down = \"{mode}\""),
            health,
        ));
        let down = wait_event(&proxy, "primary", "down", SOON).await;
        assert_eq!(down.reason, "expect mismatch");
        wait_until(SOON, "no active tier", || {
            active_priority(&proxy, "p").is_none()
        })
        .await;
        let served = greeted_by(proxy.addr("front")).await.is_ok();
        assert_eq!(served, expect_served, "when_all_down = {mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_after_failback_closes_lower_tier_connections_gradually() {
    let mut s = Scenario::start("drain_after_failback = \"2s\"").await;
    let addr = s.addr;
    s.primary.kill().await;
    wait_until(SOON, "failover", || s.active() == Some(1)).await;
    let mut on_backup = Vec::new();
    for _ in 0..64 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_line(&mut stream).await.unwrap(), "hello backup");
        on_backup.push(stream);
    }
    s.primary.restart().await;
    wait_until(SOON, "failback", || s.active() == Some(0)).await;
    let failback_at = Instant::now();
    let closed_times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut watchers = JoinSet::new();
    for mut stream in on_backup {
        let closed_times = closed_times.clone();
        watchers.spawn(async move {
            if is_closed(&mut stream, SOON).await {
                closed_times.lock().unwrap().push(failback_at.elapsed());
            }
        });
    }
    while watchers.join_next().await.is_some() {}
    let mut times = closed_times.lock().unwrap().clone();
    times.sort();
    assert_eq!(times.len(), 64, "every lower-tier connection was closed");
    let (first, last) = (times[0], times[63]);
    assert!(
        last >= Duration::from_millis(1800) && last < Duration::from_secs(4),
        "last closed at {last:?}"
    );
    let early = times
        .iter()
        .filter(|t| **t < Duration::from_secs(1))
        .count();
    assert!(
        (16..=48).contains(&early),
        "{early} of 64 closed in the first half: not spread evenly (first at {first:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_primary_that_comes_back_gets_clients_again() {
    let mut s = Scenario::start(
        "connect_timeout = \"300ms\"\noutlier = { consecutive_failures = 2, base_ejection = \"1s\" }",
    )
    .await;
    let addr = s.addr;
    s.primary.black_hole().await;
    // Many clients at once: plenty of attempts are still in flight when it is ejected,
    // and their failures arrive afterwards.
    let mut clients = JoinSet::new();
    for _ in 0..50 {
        clients.spawn(greeted_by(addr));
    }
    while let Some(served) = clients.join_next().await {
        assert_eq!(served.unwrap().unwrap(), "backup");
    }
    s.primary.restart().await;
    wait_until(SOON, "failback", || s.active() == Some(0)).await;
    assert_eq!(
        greeted_by(addr).await.unwrap(),
        "primary",
        "clients go to the recovered primary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_waiting_on_a_hung_primary_move_to_the_backup_when_it_goes_down() {
    let s = Scenario::start("").await;
    s.primary.hang();
    // Connected to the hung primary, waiting for its greeting: nothing has flowed yet.
    let mut clients = JoinSet::new();
    for _ in 0..20 {
        clients.spawn(greeted_by(s.addr));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while let Some(served) = clients.join_next().await {
        assert_eq!(served.unwrap().expect("no client saw an error"), "backup");
    }
    let route = s.proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    assert!(
        route.upstreams[0].stats.connections_total.load(Relaxed) > 0,
        "some clients did start on the hung primary"
    );
}
