//! Slow start end to end (SPEC §3): a recovered primary and a failed-back tier take a
//! growing share of a steady stream of new clients over real loopback sockets, and a
//! tier that dies mid-ramp never slows anyone down.
//!
//! Shares are counted over hundreds of clients and compared with generous bounds: the
//! ramp's clock runs in the proxy, the clients' on a loaded machine.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use common::*;
use switchyard::drill::{ClientRecord, ClientStream, Probe, Stop, Timeline};
use switchyard::events::{Event, EventKind};

/// One new client this often: ~500 over a 2 s ramp when the machine keeps up.
const EVERY: Duration = Duration::from_millis(4);

/// A stream of clients until `stop`, each reading which upstream greets it.
fn stream(addr: SocketAddr, stop: CancellationToken) -> tokio::task::JoinHandle<Timeline> {
    let clients = ClientStream {
        addr,
        every: EVERY,
        limit: 6 * SOON,
        client_timeout: SOON,
        probe: Probe::Greeting {
            speaks_first: false,
        },
    };
    tokio::spawn(clients.run(Stop::On(stop)))
}

/// The clients of `timeline` with the Unix ms at which each started.
fn started_unix_ms(timeline: &Timeline) -> Vec<(u64, &ClientRecord)> {
    // The stream's start in Unix ms, from how long ago it was.
    let start = unix_ms().saturating_sub(timeline.start.elapsed().as_millis() as u64);
    timeline
        .records
        .iter()
        .map(|r| (start + r.started.as_millis() as u64, r))
        .collect()
}

/// Of the clients that started in [from, to) (Unix ms): how many, and the share served
/// by `name`.
fn share_between(clients: &[(u64, &ClientRecord)], from: u64, to: u64, name: &str) -> (usize, f64) {
    let window: Vec<_> = clients
        .iter()
        .filter(|(at, _)| (from..to).contains(at))
        .collect();
    let by = window.iter().filter(|(_, r)| r.is_served_by(name)).count();
    (window.len(), by as f64 / window.len().max(1) as f64)
}

fn failures(timeline: &Timeline) -> Vec<String> {
    timeline
        .records
        .iter()
        .filter_map(|r| {
            r.served_by.as_ref().err().map(|e| {
                format!(
                    "client started at +{} ms failed after {} ms: {e}",
                    r.started.as_millis(),
                    r.latency.as_millis()
                )
            })
        })
        .collect()
}

/// Waits for a slow-start event of `upstream` (`None`: the failback ramp) whose new
/// value is `new`, after event id `after`.
async fn wait_slow_start(
    proxy: &TestProxy,
    upstream: Option<&str>,
    new: &str,
    after: u64,
    limit: Duration,
) -> Event {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(event) = proxy.proxy.events.since(after).into_iter().find(|e| {
            e.kind == EventKind::SlowStart && e.upstream.as_deref() == upstream && e.new == new
        }) {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no slow-start event {upstream:?} -> {new} within {limit:?}: {:#?}",
            proxy.proxy.events.all()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn last_event_id(proxy: &TestProxy) -> u64 {
    proxy.proxy.events.all().last().map_or(0, |e| e.id)
}

/// `primary` (priority 0) and `backup` (1) behind `front`, with an admin API, `slow_start`
/// set and every upstream past its first check.
async fn two_tiers(slow_start: &str) -> (TestProxy, Backend, Backend) {
    let primary = Backend::start("primary").await;
    let backup = Backend::start("backup").await;
    let proxy = start_proxy(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        pool_config(
            &[("primary", primary.addr, 0), ("backup", backup.addr, 1)],
            &format!("slow_start = \"{slow_start}\""),
            FAST_HEALTH,
        )
    ));
    wait_first_checks(&proxy).await;
    (proxy, primary, backup)
}

/// Kills the primary, waits for the failover, restarts it and returns the failback
/// ramp's start event.
async fn fail_over_and_back(proxy: &TestProxy, primary: &mut Backend) -> Event {
    primary.kill().await;
    wait_until(SOON, "failover", || active_priority(proxy, "p") == Some(1)).await;
    let before = last_event_id(proxy);
    primary.restart().await;
    let started = wait_slow_start(proxy, None, "ramp", before, SOON).await;
    assert_eq!(active_priority(proxy, "p"), Some(0));
    started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_back_primary_takes_new_clients_gradually_and_none_fails() {
    let (proxy, mut primary, _backup) = two_tiers("2s").await;
    let addr = proxy.addr("front");
    let stop = CancellationToken::new();
    let clients = stream(addr, stop.clone());

    let started = fail_over_and_back(&proxy, &mut primary).await;
    assert!(
        started.reason.starts_with(
            "failback to tier 0: its share of new connections grows from 10% to 100% over 2s"
        ),
        "{}",
        started.reason
    );
    // Mid-ramp, /status shows the tier ramping and its share.
    let status = get_json(proxy.admin.unwrap(), "/status").await;
    let ramp = &status["pools"][0]["failback_ramp"];
    assert_eq!(
        (ramp["from_tier"].as_u64(), ramp["to_tier"].as_u64()),
        (Some(1), Some(0))
    );
    let share = ramp["share_percent"].as_u64().unwrap_or(0);
    assert!((10..100).contains(&share), "{status}");
    // And so does the live page (its static snapshot; the script draws the same).
    let (code, page, _) = http("GET", proxy.admin.unwrap(), "/", None).await;
    assert_eq!(code, 200);
    assert!(
        page.contains("slow start: tier 0 takes"),
        "the page shows the ramp"
    );

    let ended = wait_slow_start(
        &proxy,
        None,
        "full",
        started.id,
        SOON + Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        ended.reason,
        "slow start over: tier 0 takes every new connection"
    );
    let length = ended.at_unix_ms - started.at_unix_ms;
    assert!(
        (2000..2000 + 1000).contains(&length),
        "the ramp lasted {length} ms"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.cancel();
    let timeline = clients.await.unwrap();

    let failed = failures(&timeline);
    assert!(
        failed.is_empty(),
        "{} clients failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    let clients = started_unix_ms(&timeline);
    let at = started.at_unix_ms;
    let quarters: Vec<(usize, f64)> = (0..4)
        .map(|q| share_between(&clients, at + q * 500, at + (q + 1) * 500, "primary"))
        .collect();
    for (q, (count, _)) in quarters.iter().enumerate() {
        assert!(
            *count >= 25,
            "too few clients in quarter {q} to judge: {quarters:?}"
        );
    }
    // A linear ramp from 10 % gives 21 % of the first quarter's clients on average and
    // 89 % of the last quarter's.
    assert!(quarters[0].1 <= 0.5, "first quarter: {quarters:?}");
    assert!(quarters[3].1 >= 0.8, "last quarter: {quarters:?}");
    assert!(
        quarters[0].1 < quarters[2].1 && quarters[1].1 < quarters[3].1,
        "{quarters:?}"
    );
    let (after, share) = share_between(&clients, ended.at_unix_ms + 50, u64::MAX, "primary");
    assert!(after >= 25, "the stream went on after the ramp: {after}");
    assert_eq!(
        share, 1.0,
        "after the ramp, every new client goes to the primary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_tier_losing_its_last_upstream_mid_ramp_sends_everything_to_the_new_at_once() {
    // A ramp far longer than the test: its early end can only be the backup's death.
    let (proxy, mut primary, mut backup) = two_tiers("60s").await;
    let addr = proxy.addr("front");
    let stop = CancellationToken::new();
    let clients = stream(addr, stop.clone());

    let started = fail_over_and_back(&proxy, &mut primary).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = unix_ms();
    backup.kill().await;
    let ended = wait_slow_start(&proxy, None, "full", started.id, SOON).await;
    assert_eq!(
        ended.reason,
        "tier 1 has no usable upstream left: every new connection goes to tier 0 at once"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let timeline = clients.await.unwrap();

    let failed = failures(&timeline);
    assert!(
        failed.is_empty(),
        "{} clients failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    let clients = started_unix_ms(&timeline);
    let (during, share) = share_between(&clients, started.at_unix_ms, killed, "primary");
    assert!(
        during >= 25 && share < 0.5,
        "before the kill, most still went to the backup: {share} of {during}"
    );
    // Clients sent to the dead backup before the checks told went on to the primary;
    // once the ramp ended, nobody was sent there.
    let (after, share) = share_between(&clients, ended.at_unix_ms + 50, u64::MAX, "primary");
    assert!(after >= 25, "{after}");
    assert_eq!(share, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_tier_losing_its_last_upstream_mid_ramp_fails_over_at_once() {
    let (proxy, mut primary, _backup) = two_tiers("60s").await;
    let addr = proxy.addr("front");
    let stop = CancellationToken::new();
    let clients = stream(addr, stop.clone());

    let started = fail_over_and_back(&proxy, &mut primary).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    primary.kill().await;
    let stopped = wait_slow_start(&proxy, None, "stopped", started.id, SOON).await;
    assert_eq!(stopped.reason, "failover to tier 1");
    assert_eq!(active_priority(&proxy, "p"), Some(1));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let timeline = clients.await.unwrap();

    let failed = failures(&timeline);
    assert!(
        failed.is_empty(),
        "{} clients failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    let clients = started_unix_ms(&timeline);
    let (after, share) = share_between(&clients, stopped.at_unix_ms + 50, u64::MAX, "backup");
    assert!(after >= 25, "{after}");
    assert_eq!(share, 1.0, "survival is never slowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_rejoining_a_tier_of_three_ramps_up_within_it() {
    let mut a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let proxy = start_proxy(&pool_config(
        &[("a", a.addr, 0), ("b", b.addr, 0), ("c", c.addr, 0)],
        "slow_start = \"2s\"",
        FAST_HEALTH,
    ));
    wait_first_checks(&proxy).await;
    let addr = proxy.addr("front");

    a.kill().await;
    wait_event(&proxy, "a", "down", SOON).await;
    let stop = CancellationToken::new();
    let clients = stream(addr, stop.clone());
    let before = last_event_id(&proxy);
    a.restart().await;
    let started = wait_slow_start(&proxy, Some("a"), "ramp", before, SOON).await;
    assert_eq!(
        started.reason,
        "down -> up: its share of tier 0's new connections grows from 10% to full over 2s"
    );
    let ended = wait_slow_start(
        &proxy,
        Some("a"),
        "full",
        started.id,
        SOON + Duration::from_secs(2),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.cancel();
    let timeline = clients.await.unwrap();

    let failed = failures(&timeline);
    assert!(
        failed.is_empty(),
        "{} clients failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    let clients = started_unix_ms(&timeline);
    let at = started.at_unix_ms;
    let (first, first_share) = share_between(&clients, at, at + 500, "a");
    let (last, last_share) = share_between(&clients, at + 1500, at + 2000, "a");
    let (after, after_share) = share_between(&clients, ended.at_unix_ms + 50, u64::MAX, "a");
    assert!(
        first >= 25 && last >= 25 && after >= 50,
        "{first} {last} {after}"
    );
    // Relative to its full share, a third: 21 % of it in the first quarter on average,
    // 89 % in the last.
    let full = 1.0 / 3.0;
    assert!(first_share <= 0.5 * full, "first quarter: {first_share:.3}");
    assert!(last_share >= 0.7 * full, "last quarter: {last_share:.3}");
    assert!(
        (after_share - full).abs() < 0.1,
        "after the ramp, a third: {after_share:.3}"
    );
}

#[test]
fn the_demo_shows_a_slow_start_failback_quarter_by_quarter() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["demo", "--slow-start", "1s"])
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "failback immediate, with a slow start of 1s",
        "slow start: failback to tier 0: its share of new connections grows from 10% to 100% over 1s",
        "slow start over: tier 0 takes every new connection",
        "slow start 1/4",
        "slow start 4/4",
        "after the ramp",
        "client-visible failures: 0 of",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    let share = |phase: &str| -> u32 {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(phase))
            .and_then(|l| l.split('%').next())
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no share for {phase:?} in:\n{stdout}"))
    };
    assert!(
        share("slow start 1/4") < share("slow start 4/4"),
        "{stdout}"
    );
    assert_eq!(share("after the ramp"), 100, "{stdout}");
}

#[test]
fn the_demo_refuses_a_slow_start_it_cannot_show() {
    let demo = |value: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["demo", "--slow-start", value])
            .output()
            .expect("run the demo")
    };
    let out = demo("soon");
    assert_eq!(out.status.code(), Some(2), "not a duration: bad usage");
    let out = demo("0s");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the demo's slow start must be above 0 and at most 30s, not 0s"),
        "{stderr}"
    );
    assert_eq!(demo("31s").status.code(), Some(1));
}
