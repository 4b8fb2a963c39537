//! The proxy's own limits under attack: running out of file descriptors must not be
//! blamed on upstreams, and transfers cut mid-splice must not drain the pipe pool.
//!
//! Both tests run `switchyard run` as a child process: one needs a low descriptor
//! limit, and the splice counts are process-wide, so only a process of its own gives
//! counts that no parallel test disturbs. Both read the counts from `/metrics`.

use std::net::SocketAddr;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// `switchyard run` on `toml` under a descriptor limit of `nofile`, logging warnings
/// only (400 clients would otherwise fill the log this test reads).
async fn start_limited(toml: &str, admin: SocketAddr, nofile: u64) -> ChildProxy {
    ChildProxy::start_limited(toml, admin, &["--log-level", "warn"], Some(nofile)).await
}

/// Polls until `GET /livez` answers 200 and an echo round trip through `front` works
/// (the upstream behind it greets with one line first).
async fn still_serving(admin: SocketAddr, front: SocketAddr, what: &str) {
    let deadline = Instant::now() + SOON;
    loop {
        let livez =
            tokio::time::timeout(Duration::from_secs(2), http("GET", admin, "/livez", None));
        let live = matches!(livez.await, Ok((200, _, _)));
        if live && greeted_echo(front, b"well-behaved").await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "not serving {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Through a [`Backend`]: reads its greeting, then one echo round trip.
async fn greeted_echo(addr: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let mut stream = TcpStream::connect(addr).await?;
        read_line(&mut stream).await?;
        stream.write_all(payload).await?;
        let mut back = vec![0u8; payload.len()];
        stream.read_exact(&mut back).await?;
        if back != payload {
            return Err(std::io::Error::other("echo mismatch"));
        }
        Ok(())
    })
    .await
    .map_err(|_| std::io::Error::other("echo timed out"))?
}

/// Health settings that notice a failing upstream in well under a second, with a
/// timeout lenient enough for a loaded machine.
const QUICK_LENIENT_HEALTH: &str = "[pools.p.health]\ninterval = \"200ms\"\nfast_interval = \"100ms\"\ntimeout = \"2s\"\nrise = 2\nfall = 2\nsend = \"PING\\r\\n\"\nexpect = \"hello\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_no_healthy_upstream_is_blamed_and_no_failover_happens() {
    let primary = Backend::start("primary").await;
    let backup = Backend::start("backup").await;
    let (admin, front) = (closed_port(), closed_port());
    let config = format!("[runtime]\nworker_threads = 2\n\n[admin]\nlisten = \"{admin}\"\n\n")
        + &pool_config(
            &[("primary", primary.addr, 0), ("backup", backup.addr, 1)],
            "",
            QUICK_LENIENT_HEALTH,
        )
        .replace("127.0.0.1:0", &front.to_string());
    let proxy = start_limited(&config, admin, 256).await;

    wait_until_async(SOON, "both upstreams passed a health check", || async {
        let status = get_json(admin, "/status").await;
        ["primary", "backup"].iter().all(|name| {
            upstream_status(&status, "p", name)
                .is_some_and(|u| u["last_check"]["result"] == "ok" && u["state"] == "up")
        })
    })
    .await;
    still_serving(admin, front, "before the load").await;
    let events = get_json(admin, "/events").await;
    let last_startup_event = events["events"]
        .as_array()
        .and_then(|e| e.last())
        .map_or(0, |e| e["id"].as_u64().unwrap_or(0));

    // 400 clients at once, each needing two descriptors in a proxy that has 256.
    let started = Instant::now();
    let release = CancellationToken::new();
    let closed_by_proxy = Arc::new(AtomicUsize::new(0));
    let mut clients = JoinSet::new();
    for _ in 0..400 {
        let release = release.clone();
        let closed_by_proxy = closed_by_proxy.clone();
        clients.spawn(async move {
            let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(front));
            let Ok(Ok(mut stream)) = connect.await else {
                return;
            };
            tokio::select! {
                _ = release.cancelled() => {}
                greeting = read_line(&mut stream) => {
                    if !matches!(greeting, Ok(ref line) if line.starts_with("hello")) {
                        closed_by_proxy.fetch_add(1, Relaxed);
                        return;
                    }
                    // Served: hold the connection (and its two descriptors).
                    release.cancelled().await;
                }
            }
        });
    }
    wait_until(
        SOON,
        "the proxy closed a client it could not connect",
        || closed_by_proxy.load(Relaxed) > 0,
    )
    .await;
    // Exposure, not synchronisation: keep the proxy out of descriptors for several
    // health intervals and well past `consecutive_failures`, long enough for any
    // blame to turn into a down state, an ejection or a failover.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    release.cancel();
    tokio::time::timeout(SOON, async { while clients.join_next().await.is_some() {} })
        .await
        .expect("clients finished");

    still_serving(admin, front, "after the clients left").await;
    let status = get_json(admin, "/status").await;
    for name in ["primary", "backup"] {
        let upstream = upstream_status(&status, "p", name).expect("upstream in /status");
        assert_eq!(
            upstream["state"], "up",
            "{name} was blamed for our own descriptor shortage: {upstream:#}"
        );
        assert_eq!(upstream["ejected_until_unix_ms"], serde_json::Value::Null);
        assert_eq!(upstream["connect_failures_in_a_row"], 0, "{upstream:#}");
    }
    let pool = &status["pools"][0];
    assert_eq!(pool["active_tier"], 0, "the active tier moved: {pool:#}");
    assert_eq!(pool["failovers"], 0, "a failover happened: {pool:#}");
    let since = get_json(admin, &format!("/events?since={last_startup_event}")).await;
    assert_eq!(
        since["events"].as_array().map_or(0, Vec::len),
        0,
        "events recorded for a shortage of our own: {since:#}"
    );
    let blamed = metric_sum(admin, "switchyard_upstream_connect_failures_total", &[]).await;
    assert_eq!(blamed, 0.0, "connect failures counted against upstreams");
    let failed_checks = metric_sum(
        admin,
        "switchyard_health_checks_total",
        &[("result", "failure")],
    )
    .await;
    assert_eq!(failed_checks, 0.0, "health checks counted as failed");
    let local = metric_sum(
        admin,
        "switchyard_connections_failed_total",
        &[("listener", "front"), ("reason", "local_resources")],
    )
    .await;
    assert!(
        local > 0.0,
        "no client failure counted as local_resources: {}",
        proxy.stderr()
    );
    let upstreams_failed = metric_sum(
        admin,
        "switchyard_connections_failed_total",
        &[("listener", "front"), ("reason", "upstreams_failed")],
    )
    .await;
    assert_eq!(upstreams_failed, 0.0);

    // One warning per 10 s at most, however many clients and checks hit the shortage.
    let log = proxy.stderr();
    let warnings = log.matches("out of local resources").count();
    let allowed = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        (1..=allowed).contains(&warnings),
        "{warnings} shortage warnings in {:?} (allowed 1..={allowed}):\n{log}",
        started.elapsed()
    );
}

/// Polls an async `condition` every 20 ms until it holds; panics with `what` after
/// `limit`.
async fn wait_until_async<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bytes each firehose connection sends at most.
const FIREHOSE_BYTES: usize = 64 << 20;

/// An upstream that streams bytes to every connection as fast as it can (up to
/// [`FIREHOSE_BYTES`]) until the connection fails.
async fn firehose() -> Server {
    Server::start(|mut stream: TcpStream| async move {
        let block = vec![0x5Au8; 64 * 1024];
        let mut sent = 0;
        while sent < FIREHOSE_BYTES {
            if stream.write_all(&block).await.is_err() {
                return;
            }
            sent += block.len();
        }
    })
    .await
}

/// Connects with a small receive buffer, so that the proxy's writes to us block soon
/// after we stop reading.
async fn connect_small_window(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(64 * 1024)?;
    socket.connect(addr).await
}

/// Reads until `at_least` bytes arrived.
async fn read_at_least(stream: &mut TcpStream, at_least: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < at_least {
        match stream.read(&mut buf).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_reset_mid_splice_give_every_pipe_back_and_splicing_goes_on() {
    const CLIENTS: usize = 300;
    const BATCH: usize = 10;
    let echo = Backend::start("echo").await;
    let bulk = firehose().await;
    let (admin, front, bulk_front) = (closed_port(), closed_port(), closed_port());
    let config = format!(
        "[runtime]\nworker_threads = 2\n\n[admin]\nlisten = \"{admin}\"\n\n\
         [listeners.front]\nbind = \"{front}\"\npool = \"p\"\n\n\
         [listeners.bulk]\nbind = \"{bulk_front}\"\npool = \"bulk\"\n\n\
         [pools.p]\nupstreams = [{{ address = \"{}\" }}]\n\n[pools.p.health]\nenabled = false\n\n\
         [pools.bulk]\nupstreams = [{{ address = \"{}\" }}]\n\n[pools.bulk.health]\nenabled = false\n",
        echo.addr, bulk.addr
    );
    // 512 descriptors: a pool of 64 pipes, which leaked counts would soon use up.
    let mut proxy = start_limited(&config, admin, 512).await;
    still_serving(admin, front, "before the resets").await;
    let in_use = || metric_sum(admin, "switchyard_splice_pipes", &[("state", "in_use")]);
    let spliced = || metric_sum(admin, "switchyard_splice_bytes_total", &[]);

    for batch in 0..CLIENTS / BATCH {
        let mut streams = Vec::new();
        for _ in 0..BATCH {
            let mut stream = connect_small_window(bulk_front).await.expect("connect");
            // 1 MiB is many full 64 KiB reads in a row: the proxy splices by now.
            tokio::time::timeout(SOON, read_at_least(&mut stream, 1 << 20))
                .await
                .expect("bulk bytes in time")
                .expect("bulk bytes");
            streams.push(stream);
        }
        // We stopped reading: each transfer soon waits for our window, most with a pipe
        // in hand. Best effort (the assertions below do not depend on it): cut them
        // once they stalled, i.e. the count of pipes in use stopped moving.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = -1.0;
        loop {
            let now = in_use().await;
            if (now > 0.0 && now == last) || Instant::now() >= deadline {
                break;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for stream in streams {
            SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .expect("SO_LINGER 0");
            drop(stream); // RST
        }
        if batch % 10 == 9 {
            still_serving(admin, front, "during the resets").await;
        }
    }
    wait_until_async(SOON, "every reset connection closed", || async {
        metric_sum(
            admin,
            "switchyard_connections_active",
            &[("listener", "bulk")],
        )
        .await
            == 0.0
    })
    .await;
    wait_until_async(SOON, "every pipe given back after the resets", || async {
        in_use().await == 0.0
    })
    .await;

    // New transfers still get pipes. Any spliced byte proves one was handed out; a
    // transfer switches to splice only once it sees full reads in a row, which a
    // starved upstream on a loaded machine may not give it, hence a few tries. With
    // the pool used up, none splices a byte.
    let before = spliced().await;
    let mut tries = 0;
    while spliced().await == before {
        tries += 1;
        assert!(
            tries <= 5,
            "no byte of 5 transfers of 8 MiB went through splice: the pipe pool is used up"
        );
        let mut stream = connect_small_window(bulk_front).await.expect("connect");
        tokio::time::timeout(SOON, read_at_least(&mut stream, 8 << 20))
            .await
            .expect("8 MiB in time")
            .expect("8 MiB");
    }
    wait_until_async(SOON, "the last transfers' pipes given back", || async {
        in_use().await == 0.0
    })
    .await;
    let open = metric_sum(admin, "switchyard_splice_pipes", &[("state", "open")]).await;
    // Nothing in use: what is open is cached, and idle pipes must leave room under
    // the cap of 64 for a thread whose cache is empty.
    assert!(open < 64.0, "{open} idle pipes fill the whole cap of 64");
    still_serving(admin, front, "after the resets").await;
    assert!(
        proxy.child.try_wait().expect("child status").is_none(),
        "the proxy exited: {}",
        proxy.stderr()
    );
}
