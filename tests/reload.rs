//! Hot reload (SPEC §4) through real SIGHUP signals to a real child process, observed
//! through traffic and the admin API.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use common::*;

fn free_addr() -> SocketAddr {
    closed_port()
}

/// A config with the admin API, listener `front` on `front`, and pool `p`.
fn config(
    admin: SocketAddr,
    listeners: &[(&str, SocketAddr)],
    upstreams: &[(&str, SocketAddr, u32)],
    extra: &str,
) -> String {
    let mut text = format!("[admin]\nlisten = \"{admin}\"\n\n");
    for (name, addr) in listeners {
        text.push_str(&format!(
            "[listeners.{name}]\nbind = \"{addr}\"\npool = \"p\"\n\n"
        ));
    }
    let list: Vec<String> = upstreams
        .iter()
        .map(|(name, addr, priority)| {
            format!("{{ name = \"{name}\", address = \"{addr}\", priority = {priority} }}")
        })
        .collect();
    text.push_str(&format!(
        "[pools.p]\n{extra}\nupstreams = [{}]\n\n{FAST_HEALTH}",
        list.join(", ")
    ));
    text
}

async fn stream_until(addr: SocketAddr, seed: u64, stop: Arc<AtomicBool>) -> Result<usize, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    read_line(&mut stream).await.map_err(|e| e.to_string())?;
    let mut back = vec![0u8; 2048];
    let mut chunks = 0;
    while !stop.load(Relaxed) {
        let chunk = random_bytes(2048, seed * 100_000 + chunks as u64);
        stream
            .write_all(&chunk)
            .await
            .map_err(|e| format!("write: {e}"))?;
        match tokio::time::timeout(SOON, stream.read_exact(&mut back)).await {
            Ok(Ok(_)) if back == chunk => {}
            Ok(Ok(_)) => return Err("corrupted".into()),
            Ok(Err(e)) => return Err(format!("read: {e}")),
            Err(_) => return Err("stalled".into()),
        }
        chunks += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adding_an_upstream_and_changing_a_priority_drops_nothing() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let (admin, front) = (free_addr(), free_addr());
    let proxy = ChildProxy::start(
        &config(
            admin,
            &[("front", front)],
            &[("a", a.addr, 0), ("b", b.addr, 1)],
            "",
        ),
        admin,
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = JoinSet::new();
    for i in 0..20 {
        streams.spawn(stream_until(front, i, stop.clone()));
    }
    let stop_clients = Arc::new(AtomicBool::new(false));
    let clients = {
        let stop = stop_clients.clone();
        tokio::spawn(async move {
            let mut clients = JoinSet::new();
            let mut next = Instant::now();
            while !stop.load(Relaxed) {
                clients.spawn(greeted_by(front));
                next += Duration::from_millis(2);
                tokio::time::sleep_until(next).await;
            }
            let mut served = Vec::new();
            let mut failed = 0;
            while let Some(r) = clients.join_next().await {
                match r.expect("client task") {
                    Ok(name) => served.push(name),
                    Err(_) => failed += 1,
                }
            }
            (served, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let result = proxy
        .reload_with(&config(
            admin,
            &[("front", front)],
            &[("a", a.addr, 0), ("b", b.addr, 2), ("c", c.addr, 0)],
            "",
        ))
        .await;
    assert_eq!(result, "ok", "{}", proxy.stderr());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_clients.store(true, Relaxed);
    let (served, failed) = clients.await.unwrap();
    assert_eq!(failed, 0, "new connections failed across the reload");
    assert!(
        served.iter().any(|s| s == "c"),
        "the new upstream serves traffic"
    );

    stop.store(true, Relaxed);
    while let Some(result) = streams.join_next().await {
        let chunks = result.unwrap().expect("a stream broke across the reload");
        assert!(chunks > 5, "the stream made progress: {chunks} chunks");
    }
    let status = get_json(admin, "/status").await;
    assert_eq!(upstream_status(&status, "p", "b").unwrap()["priority"], 2);
    assert_eq!(upstream_status(&status, "p", "c").unwrap()["state"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_keeps_the_old_config_and_counts_the_error() {
    let a = Backend::start("a").await;
    let (admin, front) = (free_addr(), free_addr());
    let good = config(admin, &[("front", front)], &[("a", a.addr, 0)], "");
    let proxy = ChildProxy::start(&good, admin).await;
    assert_eq!(greeted_by(front).await.unwrap(), "a");

    let broken = good.replace("[pools.p]", "[pools.p]\nconnect_timeout = \"soon\"");
    assert_eq!(proxy.reload_with(&broken).await, "error");
    assert_eq!(proxy.reloads().await, (0, 1));
    assert_eq!(
        greeted_by(front).await.unwrap(),
        "a",
        "the old config keeps serving"
    );
    assert!(
        proxy.stderr().contains("reload rejected"),
        "{}",
        proxy.stderr()
    );
    assert!(
        proxy.stderr().contains("\"soon\" is not a duration"),
        "{}",
        proxy.stderr()
    );

    // A reload whose new bind fails is rejected as a whole too.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let clash = config(
        admin,
        &[("front", front), ("second", taken.local_addr().unwrap())],
        &[("a", a.addr, 0)],
        "",
    );
    assert_eq!(proxy.reload_with(&clash).await, "error");
    assert_eq!(greeted_by(front).await.unwrap(), "a");
    assert_eq!(proxy.reloads().await, (0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_listeners() {
    let a = Backend::start("a").await;
    let (admin, front, extra) = (free_addr(), free_addr(), free_addr());
    let proxy = ChildProxy::start(
        &config(admin, &[("front", front)], &[("a", a.addr, 0)], ""),
        admin,
    )
    .await;
    assert!(TcpStream::connect(extra).await.is_err());

    let two = config(
        admin,
        &[("front", front), ("extra", extra)],
        &[("a", a.addr, 0)],
        "",
    );
    assert_eq!(proxy.reload_with(&two).await, "ok");
    assert_eq!(
        greeted_by(extra).await.unwrap(),
        "a",
        "the added listener accepts"
    );

    let mut established = TcpStream::connect(extra).await.unwrap();
    assert_eq!(read_line(&mut established).await.unwrap(), "hello a");
    let one = config(admin, &[("front", front)], &[("a", a.addr, 0)], "");
    assert_eq!(proxy.reload_with(&one).await, "ok");
    assert!(
        TcpStream::connect(extra).await.is_err(),
        "the removed listener refuses new clients"
    );
    established.write_all(b"still flowing").await.unwrap();
    let mut back = [0u8; 13];
    established.read_exact(&mut back).await.unwrap();
    assert_eq!(
        &back, b"still flowing",
        "its established connection keeps flowing"
    );
    assert_eq!(greeted_by(front).await.unwrap(), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_state_survives_a_reload() {
    let mut a = Backend::start("a").await;
    let b = Backend::start("b").await;
    a.kill().await;
    let (admin, front) = (free_addr(), free_addr());
    let before = config(
        admin,
        &[("front", front)],
        &[("a", a.addr, 0), ("b", b.addr, 1)],
        "",
    );
    let proxy = ChildProxy::start(&before, admin).await;
    let deadline = Instant::now() + SOON;
    loop {
        let status = get_json(admin, "/status").await;
        if upstream_status(&status, "p", "a").unwrap()["state"] == "down" {
            break;
        }
        assert!(Instant::now() < deadline, "a never went down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = get_json(admin, "/status").await;
    let since = upstream_status(&status, "p", "a").unwrap()["since_unix_ms"].clone();
    let events_before = get_json(admin, "/events").await["events"]
        .as_array()
        .unwrap()
        .len();

    // Change something else in the pool: `a` stays, so its state must stay.
    let after = before.replace("[pools.p]", "[pools.p]\nconnect_timeout = \"1s\"");
    assert_eq!(proxy.reload_with(&after).await, "ok");
    let status = get_json(admin, "/status").await;
    let a_now = upstream_status(&status, "p", "a").unwrap();
    assert_eq!(
        a_now["state"], "down",
        "no new rise/fall cycle: still down at once"
    );
    assert_eq!(a_now["since_unix_ms"], since, "the same down period");
    assert_eq!(status["pools"][0]["active_tier"], 1);
    for _ in 0..10 {
        assert_eq!(greeted_by(front).await.unwrap(), "b");
    }
    let events = get_json(admin, "/events").await;
    let new_events = &events["events"].as_array().unwrap()[events_before..];
    assert!(
        new_events.iter().all(|e| e["upstream"] != "a"),
        "the reload produced a state change of a: {new_events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_upstream_that_is_already_dead_never_gets_clients() {
    let a = Backend::start("a").await;
    let dead = closed_port();
    let (admin, front) = (free_addr(), free_addr());
    let proxy = ChildProxy::start(
        &config(admin, &[("front", front)], &[("a", a.addr, 0)], ""),
        admin,
    )
    .await;
    let with_dead = config(
        admin,
        &[("front", front)],
        &[("a", a.addr, 0), ("dead", dead, 0)],
        "outlier = { consecutive_failures = 1000 }",
    );
    assert_eq!(proxy.reload_with(&with_dead).await, "ok");
    let status = get_json(admin, "/status").await;
    assert_eq!(
        upstream_status(&status, "p", "dead").unwrap()["state"],
        "down",
        "{status}"
    );
    for _ in 0..20 {
        assert_eq!(greeted_by(front).await.unwrap(), "a");
    }
    let metrics = metrics(admin).await;
    let refused = metrics
        .samples
        .iter()
        .find(|s| {
            s.metric == "switchyard_upstream_connect_failures_total"
                && s.labels.get("upstream") == Some("dead")
                && s.labels.get("reason") == Some("refused")
        })
        .map(|s| format!("{:?}", s.value));
    assert_eq!(
        refused.as_deref(),
        Some("Counter(0.0)"),
        "no client was sent to the dead upstream"
    );
}
