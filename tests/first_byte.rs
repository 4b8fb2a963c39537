//! A hung server that costs clients nothing (SPEC §3 "First byte" and "Replay"): with
//! `first_byte_timeout` an upstream that leaves a client's bytes unanswered is a failed
//! attempt, and with `replay_unanswered` the client's bytes go again to the next
//! upstream, for protocols where the client speaks first (PostgreSQL, Redis, HTTP).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use common::*;
use switchyard::drill::{ClientError, ClientStream, REQUEST, Stop};
use switchyard::health::state::AdminOverride;
use switchyard::metrics::ConnectFailure;

/// Active checks that cannot see a hang (a TCP connect still succeeds) and run rarely:
/// only the opening exchange can be what reacts.
const BLIND_HEALTH: &str = "[pools.p.health]\ninterval = \"30s\"\ntimeout = \"2s\"\n";

const WATCHED: &str = "first_byte_timeout = \"150ms\"\nreplay_unanswered = \"16KiB\"\n";

/// `primary` (priority 0) and `backup` (1), both greeting only a client that spoke.
struct Pair {
    primary: Backend,
    _backup: Backend,
    proxy: TestProxy,
    addr: SocketAddr,
}

impl Pair {
    async fn start(pool_extra: &str) -> Self {
        let primary = Backend::client_first("primary").await;
        let backup = Backend::client_first("backup").await;
        let proxy = start_proxy(&pool_config(
            &[("primary", primary.addr, 0), ("backup", backup.addr, 1)],
            pool_extra,
            BLIND_HEALTH,
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

    fn primary_failures(&self, reason: ConnectFailure) -> u64 {
        let snapshot = self.proxy.proxy.snapshot.load();
        let route = snapshot.pool("p").expect("pool p");
        route.upstreams[0].stats.connect_failures(reason)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_costs_no_client_that_speaks_first_and_is_detected_by_the_first_one() {
    let pair = Pair::start(WATCHED).await;
    let stream = ClientStream {
        addr: pair.addr,
        every: Duration::from_millis(5),
        limit: Duration::from_millis(1500),
        client_timeout: SOON,
        speaks_first: true,
    };
    let clients = tokio::spawn(stream.run(Stop::AtLimit));
    tokio::time::sleep(Duration::from_millis(300)).await;
    pair.primary.hang();
    let hung_at = unix_ms();
    let timeline = clients.await.expect("client stream");

    let failed: Vec<_> = timeline
        .records
        .iter()
        .filter(|r| r.served_by.is_err())
        .collect();
    assert!(failed.is_empty(), "clients failed: {failed:?}");
    assert!(
        timeline.records.iter().any(|r| r.is_served_by("primary")),
        "the primary served before it hung"
    );
    assert!(
        timeline.records.iter().any(|r| r.is_served_by("backup")),
        "the backup served after the primary hung"
    );
    assert!(
        pair.primary_failures(ConnectFailure::FirstByteTimeout) >= 1,
        "an unanswered client counts as a failed attempt of the primary"
    );
    // Passive detection: the unanswered clients eject the primary, long before the
    // next active check (30 s) could.
    let ejected = wait_event(&pair.proxy, "primary", "ejected", SOON).await;
    assert!(
        ejected.at_unix_ms < hung_at + 5_000,
        "ejected {} ms after the hang",
        ejected.at_unix_ms.saturating_sub(hung_at)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_opening_watch_a_client_of_a_hung_primary_waits_unanswered() {
    let pair = Pair::start("").await;
    pair.primary.hang();
    let seen = switchyard::drill::ask_greeting(pair.addr, Duration::from_millis(800), true).await;
    assert_eq!(seen, Err(ClientError::Timeout));
    assert_eq!(pair.primary_failures(ConnectFailure::FirstByteTimeout), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sent_more_than_the_bound_is_not_replayed() {
    let pair = Pair::start("first_byte_timeout = \"150ms\"\nreplay_unanswered = \"8B\"\n").await;
    pair.primary.hang();
    let mut client = TcpStream::connect(pair.addr).await.expect("connect");
    client.write_all(&[b'x'; 64]).await.expect("send");
    let started = Instant::now();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(SOON, client.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the client is closed, not left waiting");
    assert!(
        reply.is_empty(),
        "no upstream answered: {:?}",
        String::from_utf8_lossy(&reply)
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(pair.primary_failures(ConnectFailure::FirstByteTimeout), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_marked_down_before_answering_hands_the_client_over_with_its_bytes() {
    // No timeout: only the primary going into maintenance ends the wait.
    let pair = Pair::start("replay_unanswered = \"16KiB\"\n").await;
    pair.primary.hang();
    let asked = tokio::spawn(switchyard::drill::ask_greeting(pair.addr, SOON, true));
    // The client has connected to the primary and sent its request.
    wait_until(SOON, "client on the primary", || {
        let snapshot = pair.proxy.proxy.snapshot.load();
        let route = snapshot.pool("p").expect("pool p");
        route.upstreams[0]
            .stats
            .bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            >= REQUEST.len() as u64
    })
    .await;
    pair.proxy
        .proxy
        .controller
        .set_admin("p", "primary", Some(AdminOverride::Maint))
        .await
        .expect("maint");
    let served = asked.await.expect("client task");
    assert_eq!(served.as_deref(), Ok("backup"));
}

/// A server that accepts and never reads; hands out its accepted connections.
async fn silent_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if tx.send(stream).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_bytes_and_the_proxy_header_reach_the_next_upstream_exactly_and_the_first_is_reset()
 {
    let (silent, mut accepted) = silent_server().await;
    const PAYLOAD: usize = 10_000;
    // Answers with everything it received once the header line and the payload are in.
    let recorder = Server::start(|mut stream: TcpStream| async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let complete = seen
                .windows(2)
                .position(|w| w == b"\r\n")
                .is_some_and(|line| seen.len() >= line + 2 + PAYLOAD);
            if complete {
                let _ = stream.write_all(&seen).await;
                return;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let proxy = start_proxy(&pool_config(
        &[("silent", silent, 0), ("recorder", recorder.addr, 1)],
        &format!("{WATCHED}proxy_protocol = \"v1\"\n"),
        "[pools.p.health]\nenabled = false\n",
    ));
    let payload = random_bytes(PAYLOAD, 7);
    let mut client = TcpStream::connect(proxy.addr("front"))
        .await
        .expect("connect");
    let client_addr = client.local_addr().expect("addr");
    client.write_all(&payload).await.expect("send");
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while reply.len() < PAYLOAD + 1 || !reply.contains(&b'\n') {
        let n = tokio::time::timeout(SOON, client.read(&mut buf))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(n > 0, "closed after {} bytes", reply.len());
        reply.extend_from_slice(&buf[..n]);
        let header = reply.windows(2).position(|w| w == b"\r\n");
        if header.is_some_and(|h| reply.len() >= h + 2 + PAYLOAD) {
            break;
        }
    }

    let header_end = reply
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("a PROXY header line")
        + 2;
    let header = String::from_utf8_lossy(&reply[..header_end]).to_string();
    assert!(
        header.starts_with(&format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} ",
            client_addr.port()
        )),
        "the new upstream got the client's PROXY header: {header:?}"
    );
    assert!(
        reply[header_end..] == payload[..],
        "the replay is byte-exact ({} bytes back of {})",
        reply.len() - header_end,
        payload.len()
    );

    // The abandoned connection was reset, not closed: whatever the silent server
    // reads, the connection ends in an error rather than a clean end of stream.
    let mut abandoned = tokio::time::timeout(SOON, accepted.recv())
        .await
        .expect("the silent server was tried")
        .expect("a connection");
    let mut drained = Vec::new();
    let end = tokio::time::timeout(SOON, abandoned.read_to_end(&mut drained))
        .await
        .expect("the abandoned connection ends");
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}
