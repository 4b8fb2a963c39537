//! Access lists (SPEC §8): denied networks are refused at accept, before a byte is read.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::*;
use switchyard::metrics::RejectReason;

fn config_with(upstream: std::net::SocketAddr, access: &str) -> String {
    one_pool_config(&[(upstream, 0)], "").replace(
        "pool = \"p\"\n\n[pools.p]",
        &format!("pool = \"p\"\n{access}\n\n[pools.p]"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_network_is_refused_before_any_byte_is_read() {
    let upstream = Server::echo().await;
    let proxy = start_proxy(&config_with(
        upstream.addr,
        "allow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.1/32\"]",
    ));
    let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
    let _ = stream.write_all(b"let me in").await;
    assert!(
        is_closed(&mut stream, SOON).await,
        "the denied client is closed"
    );
    let stats = &proxy.proxy.listener("front").unwrap().context.stats;
    wait_until(SOON, "rejection counted", || {
        stats.rejected(RejectReason::Denied) == 1
    })
    .await;
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    assert_eq!(
        route.upstreams[0].stats.connections_total.load(Relaxed),
        0,
        "no upstream connection was made"
    );
    assert_eq!(stats.bytes_in.load(Relaxed), 0, "not a byte was forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_network_is_served_and_others_are_not() {
    let upstream = Server::echo().await;
    let allowed = start_proxy(&config_with(
        upstream.addr,
        "allow = [\"127.0.0.0/8\", \"::1/128\"]",
    ));
    echo_round_trip(allowed.addr("front"), b"welcome")
        .await
        .expect("allowed client served");

    let elsewhere = start_proxy(&config_with(upstream.addr, "allow = [\"10.0.0.0/8\"]"));
    let mut stream = TcpStream::connect(elsewhere.addr("front")).await.unwrap();
    assert!(is_closed(&mut stream, Duration::from_secs(5)).await);
    let stats = &elsewhere.proxy.listener("front").unwrap().context.stats;
    wait_until(SOON, "rejection counted", || {
        stats.rejected(RejectReason::Denied) == 1
    })
    .await;
}
