//! Connect attempts (SPEC §3): a dead upstream costs clients nothing as long as another
//! one answers, hedging bounds the cost of a black hole, and `connect_attempts` caps the
//! tries.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use common::*;
use switchyard::metrics::ConnectFailure;

const NO_EJECTION: &str = "outlier = { consecutive_failures = 1000 }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_primary_port_every_client_is_served_by_the_backup() {
    let primary = closed_port();
    let backup = Backend::start("backup").await;
    // Passive ejection off: the connect retry alone must hide the dead primary.
    let proxy = start_proxy(&one_pool_config(
        &[(primary, 0), (backup.addr, 1)],
        NO_EJECTION,
    ));
    let addr = proxy.addr("front");

    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..100 {
        clients.spawn(async move {
            let mut stream = TcpStream::connect(addr).await?;
            read_line(&mut stream).await
        });
    }
    while let Some(served_by) = clients.join_next().await {
        assert_eq!(served_by.unwrap().expect("client served"), "hello backup");
    }
    let stats = &proxy.proxy.listener("front").unwrap().context.stats;
    assert_eq!(stats.connections_failed.load(Relaxed), 0);
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    assert_eq!(
        route.upstreams[0]
            .stats
            .connect_failures(ConnectFailure::Refused),
        100,
        "every attempt on the dead primary was counted as refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_primary_with_hedging_costs_about_hedge_after() {
    let primary = BlackHole::new();
    let backup = Backend::start("backup").await;
    let proxy = start_proxy(&one_pool_config(
        &[(primary.addr, 0), (backup.addr, 1)],
        "connect_timeout = \"5s\"\nhedge_after = \"50ms\"",
    ));
    let addr = proxy.addr("front");

    let mut latencies = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let served_by = tokio::time::timeout(SOON, read_line(&mut stream))
            .await
            .expect("served before connect_timeout")
            .unwrap();
        latencies.push(started.elapsed());
        assert_eq!(served_by, "hello backup");
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let max = latencies[latencies.len() - 1];
    // Every client first tries the primary, so each pays the hedge delay, and none may
    // pay anything near the 5 s connect timeout.
    assert!(
        median >= Duration::from_millis(45),
        "median {median:?} is below hedge_after: hedging not exercised"
    );
    assert!(
        median < Duration::from_millis(250),
        "median {median:?} far above hedge_after"
    );
    assert!(max < Duration::from_secs(2), "a client waited {max:?}");
    let stats = &proxy.proxy.listener("front").unwrap().context.stats;
    assert_eq!(stats.connections_failed.load(Relaxed), 0);
}

#[tokio::test]
async fn without_hedging_a_black_hole_costs_connect_timeout_then_the_backup_serves() {
    let primary = BlackHole::new();
    let backup = Backend::start("backup").await;
    let proxy = start_proxy(&one_pool_config(
        &[(primary.addr, 0), (backup.addr, 1)],
        "connect_timeout = \"300ms\"",
    ));
    let started = Instant::now();
    let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
    assert_eq!(read_line(&mut stream).await.unwrap(), "hello backup");
    assert!(started.elapsed() >= Duration::from_millis(290));
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    assert_eq!(
        route.upstreams[0]
            .stats
            .connect_failures(ConnectFailure::Timeout),
        1
    );
}

#[tokio::test]
async fn connect_attempts_caps_the_tries_and_the_client_is_closed() {
    // Three dead primaries and a live backup, but only two attempts: the backup is
    // never reached.
    let dead = [closed_port(), closed_port(), closed_port()];
    let backup = Backend::start("backup").await;
    let proxy = start_proxy(&one_pool_config(
        &[(dead[0], 0), (dead[1], 0), (dead[2], 0), (backup.addr, 1)],
        "connect_attempts = 2",
    ));
    let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
    let _ = stream.write_all(b"hello").await;
    assert!(
        is_closed(&mut stream, SOON).await,
        "client closed after all attempts failed"
    );

    let stats = &proxy.proxy.listener("front").unwrap().context.stats;
    wait_until(SOON, "failure counted", || {
        stats.connections_failed.load(Relaxed) == 1
    })
    .await;
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    let tried: u64 = route.upstreams[..3]
        .iter()
        .map(|u| u.stats.connect_failures(ConnectFailure::Refused))
        .sum();
    assert_eq!(tried, 2, "exactly connect_attempts upstreams were tried");
    assert_eq!(route.upstreams[3].stats.connections_total.load(Relaxed), 0);
}

#[tokio::test]
async fn attempts_go_to_distinct_upstreams_of_the_active_tier_before_the_backup() {
    let dead = [closed_port(), closed_port()];
    let backup = Backend::start("backup").await;
    let proxy = start_proxy(&one_pool_config(
        &[(dead[0], 0), (dead[1], 0), (backup.addr, 1)],
        &format!("connect_attempts = 3\n{NO_EJECTION}"),
    ));
    for _ in 0..10 {
        let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
        assert_eq!(read_line(&mut stream).await.unwrap(), "hello backup");
    }
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    for dead in &route.upstreams[..2] {
        assert_eq!(
            dead.stats.connect_failures(ConnectFailure::Refused),
            10,
            "each client tried both primaries once"
        );
    }
}

/// On a current-thread runtime (as `runtime.scheduler = "per_thread"` runs
/// connections) the accept loop clears the readiness tokio assumes of a new socket and
/// the client is not peeked; on the shared runtime it is. Both must move the client.
#[tokio::test]
async fn an_upstream_that_closes_before_any_byte_is_a_failed_attempt_the_client_never_sees() {
    upstream_closes_before_any_byte().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_shared_runtime_too_an_upstream_that_closes_before_any_byte_is_invisible() {
    upstream_closes_before_any_byte().await;
}

async fn upstream_closes_before_any_byte() {
    // Accepts, then closes at once without a word: like a dying server's accept queue.
    let slammer = Server::start(|stream: TcpStream| async move { drop(stream) }).await;
    let backup = Backend::start("backup").await;
    let proxy = start_proxy(&one_pool_config(
        &[(slammer.addr, 0), (backup.addr, 1)],
        NO_EJECTION,
    ));
    for _ in 0..5 {
        let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
        assert_eq!(read_line(&mut stream).await.unwrap(), "hello backup");
    }
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    assert_eq!(
        route.upstreams[0]
            .stats
            .connect_failures(ConnectFailure::Reset),
        5
    );
    let stats = &proxy.proxy.listener("front").unwrap().context.stats;
    assert_eq!(stats.connections_failed.load(Relaxed), 0);
}
