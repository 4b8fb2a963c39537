//! Active and passive health checking against real upstreams (SPEC §3).

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_towards_fall_uses_fast_interval() {
    let primary = Backend::start("primary").await;
    let backup = Backend::start("backup").await;
    let health = "[pools.p.health]\ninterval = \"2s\"\nfast_interval = \"50ms\"\ntimeout = \"100ms\"\nfall = 3\nsend = \"PING\\r\\n\"\nexpect = \"hello\"\n";
    let proxy = start_proxy(&pool_config(
        &[("primary", primary.addr, 0), ("backup", backup.addr, 1)],
        "",
        health,
    ));
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    let stats = &route.upstreams[0].stats;
    wait_until(SOON, "first check", || {
        stats.checks_passed.load(Relaxed) > 0
    })
    .await;
    primary.hang();
    wait_until(SOON, "a failed check", || {
        stats.checks_failed.load(Relaxed) > 0
    })
    .await;
    let first_failure = Instant::now();
    wait_event(&proxy, "primary", "down", SOON).await;
    // Two more failures at fast_interval + timeout each, not at the 2 s interval.
    let took = first_failure.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "fall took {took:?} after the first failure"
    );
    assert_eq!(stats.checks_failed.load(Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_keep_running_on_an_ejected_upstream_and_a_pass_ends_the_ejection() {
    // Accepts and closes at once: real traffic fails (closed before any byte), while a
    // connect-only health check passes.
    let slammer = Server::start(|stream: TcpStream| async move { drop(stream) }).await;
    let backup = Backend::start("backup").await;
    let health = "[pools.p.health]\ninterval = \"300ms\"\ntimeout = \"200ms\"\n";
    let proxy = start_proxy(&pool_config(
        &[("flaky", slammer.addr, 0), ("backup", backup.addr, 1)],
        "outlier = { consecutive_failures = 2, base_ejection = \"1m\" }",
        health,
    ));
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    let stats = &route.upstreams[0].stats;
    wait_until(SOON, "first check", || {
        stats.checks_passed.load(Relaxed) > 0
    })
    .await;
    for _ in 0..2 {
        assert_eq!(greeted_by(proxy.addr("front")).await.unwrap(), "backup");
    }
    let ejected = wait_event(&proxy, "flaky", "ejected", SOON).await;
    assert!(
        ejected
            .reason
            .starts_with("2 consecutive failures (connect reset)"),
        "{}",
        ejected.reason
    );
    let back = wait_event(&proxy, "flaky", "up", SOON).await;
    assert!(back.id > ejected.id);
    assert_eq!(back.old, "ejected");
    assert_eq!(back.reason, "check passed");
    // Only a check that ran and passed while ejected can end a 1 minute ejection this soon.
    assert!(
        back.at_unix_ms - ejected.at_unix_ms < 5_000,
        "ended early, not after the 1 minute ejection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expect_mismatch_marks_the_upstream_down_with_that_reason() {
    let primary = Backend::start("primary").await;
    let backup = Backend::start("backup").await;
    let health =
        "[pools.p.health]\ninterval = \"200ms\"\ntimeout = \"200ms\"\nexpect = \"+PONG\"\n";
    let proxy = start_proxy(&pool_config(
        &[("primary", primary.addr, 0), ("backup", backup.addr, 1)],
        "",
        health,
    ));
    let down = wait_event(&proxy, "primary", "down", SOON).await;
    assert_eq!(down.reason, "expect mismatch");
    wait_until(SOON, "both fail the same check", || {
        active_priority(&proxy, "p").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_counters_count_every_result() {
    let primary = Backend::start("primary").await;
    let health = "[pools.p.health]\ninterval = \"50ms\"\ntimeout = \"200ms\"\n";
    let proxy = start_proxy(&pool_config(&[("primary", primary.addr, 0)], "", health));
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    let stats = &route.upstreams[0].stats;
    wait_until(SOON, "several checks", || {
        stats.checks_passed.load(Relaxed) >= 5
    })
    .await;
    assert_eq!(stats.checks_failed.load(Relaxed), 0);
    assert!(
        proxy.proxy.events.all().is_empty(),
        "staying up produces no event"
    );
}

/// With `send` and an empty `expect`, any reply byte passes and none fails: a hung
/// server still completes the connect and takes the bytes, but never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_with_an_empty_expect_needs_a_reply_byte() {
    let answering = Backend::start("answering").await;
    let hung = Backend::start("hung").await;
    let health = "[pools.p.health]\ninterval = \"100ms\"\nfast_interval = \"50ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\nsend = \"PING\\r\\n\"\nexpect = \"\"\n";
    let proxy = start_proxy(&pool_config(
        &[("answering", answering.addr, 0), ("hung", hung.addr, 1)],
        "",
        health,
    ));
    wait_first_checks(&proxy).await;
    hung.hang();
    let down = wait_event(&proxy, "hung", "down", SOON).await;
    assert_eq!(down.reason, "check timeout");
    // The answering one keeps passing all along.
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    assert_eq!(route.upstreams[0].stats.checks_failed.load(Relaxed), 0);
    assert!(route.states[0].is_usable());
}
