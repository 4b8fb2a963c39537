//! Clients that stall or cut the steps before routing (PROXY header, ClientHello peek,
//! TLS handshake), and stop signals that arrive at awkward moments.
//!
//! The proxy runs as a child process: a bug that freezes its runtime must fail the test
//! in bounded time instead of freezing the test's own runtime with it.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::common::*;

/// The first bytes of a TLS record announcing a ClientHello, cut short.
const TRUNCATED_HELLO: &[u8] = b"\x16\x03\x01\x00\x80\x01";

/// A child proxy with an echo pool `p`, a plain listener `front`, and a listener
/// `edge` configured by `edge` (its settings after `bind`); `extra` is appended.
struct Fixture {
    proxy: ChildProxy,
    front: SocketAddr,
    edge: SocketAddr,
    _upstream: Server,
}

impl Fixture {
    async fn start(edge_settings: &str, extra: &str) -> Self {
        let upstream = Server::echo().await;
        let (admin, front, edge) = (closed_port(), closed_port(), closed_port());
        let toml = format!(
            "[runtime]\nworker_threads = 2\n{extra}\n\
             [admin]\nlisten = \"{admin}\"\n\n\
             [listeners.front]\nbind = \"{front}\"\npool = \"p\"\n\n\
             [listeners.edge]\nbind = \"{edge}\"\n{edge_settings}\n\n\
             [pools.p]\nupstreams = [{{ address = \"{}\" }}]\n\n[pools.p.health]\nenabled = false\n",
            upstream.addr
        );
        let proxy = ChildProxy::start(&toml, admin).await;
        Self {
            proxy,
            front,
            edge,
            _upstream: upstream,
        }
    }

    /// A well-behaved client gets its echo, and `/livez` answers, both promptly.
    async fn assert_serving(&self) {
        let served = tokio::time::timeout(SOON, async {
            echo_round_trip(self.front, b"still serving").await?;
            let (status, _, _) = http("GET", self.proxy.admin, "/livez", None).await;
            Ok::<_, std::io::Error>(status)
        })
        .await;
        match served {
            Ok(Ok(200)) => {}
            other => panic!(
                "the proxy stopped serving others: {other:?}\n{}",
                self.proxy.stderr()
            ),
        }
    }

    async fn rejected(&self, listener: &str, reason: &str) -> f64 {
        metric_sum(
            self.proxy.admin,
            "switchyard_connections_rejected_total",
            &[("listener", listener), ("reason", reason)],
        )
        .await
    }
}

/// Waits for the proxy to close `stream`; how long that took.
async fn closed_after(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout_at(started + limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the proxy did not close the client within {limit:?}"),
        }
    }
}

/// The reproduction from the issue: the first bytes of a TLS record, then FIN. The
/// peek used to spin on the unchanged bytes without yielding: a core at 100 %, every
/// listener and the admin API frozen, SIGTERM ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_client_hello_then_fin_closes_that_client_only() {
    let fixture = Fixture::start(
        "pool = \"p\"\nhandshake_timeout = \"5s\"\n[listeners.edge.routes]\n\"a.example\" = \"p\"",
        "",
    )
    .await;
    // More hostile clients than worker threads: each used to take one.
    let mut hostile = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(fixture.edge).await.unwrap();
        stream.write_all(TRUNCATED_HELLO).await.unwrap();
        stream.shutdown().await.unwrap();
        hostile.push(stream);
    }
    fixture.assert_serving().await;
    for stream in &mut hostile {
        // Closed as soon as the FIN shows the hello can never complete, well within
        // handshake_timeout.
        let took = closed_after(stream, Duration::from_secs(4)).await;
        assert!(took < Duration::from_secs(4), "closed after {took:?}");
    }
    assert_eq!(fixture.rejected("edge", "client_hello").await, 4.0);
    fixture.assert_serving().await;
}

/// A ClientHello that never completes: it announces the largest size and arrives one
/// byte per record, for ever. The proxy stops peeking at its limit and closes the
/// client long before handshake_timeout, instead of holding more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_client_hello_is_refused_at_the_peek_limit() {
    let fixture = Fixture::start(
        "pool = \"p\"\nhandshake_timeout = \"30s\"\n[listeners.edge.routes]\n\"a.example\" = \"p\"",
        "",
    )
    .await;
    let stream = TcpStream::connect(fixture.edge).await.unwrap();
    let (mut from_proxy, mut to_proxy) = stream.into_split();
    let sender = tokio::spawn(async move {
        let message = [&[1u8, 0x00, 0xff, 0xff][..], &[0; 60]].concat();
        let chunk: Vec<u8> = message.iter().flat_map(|&b| [22, 3, 1, 0, 1, b]).collect();
        // Until the proxy closes the connection; 1 MiB is far past any limit.
        for _ in 0..(1 << 20) / chunk.len() {
            if to_proxy.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), from_proxy.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("an endless ClientHello was not refused within 15s"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    sender.abort();
    assert_eq!(fixture.rejected("edge", "client_hello").await, 1.0);
    assert_eq!(fixture.rejected("edge", "handshake_timeout").await, 0.0);
    fixture.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_proxy_header_then_fin_closes_that_client_only() {
    let fixture = Fixture::start(
        "pool = \"p\"\nhandshake_timeout = \"5s\"\naccept_proxy_protocol = \"any\"\nproxy_protocol_from = [\"127.0.0.0/8\"]",
        "",
    )
    .await;
    let mut hostile = Vec::new();
    for header in [&b"PROXY TCP4 10.0.0.1 "[..], b"\r\n\r\n\x00\r\nQUIT\n\x21"] {
        let mut stream = TcpStream::connect(fixture.edge).await.unwrap();
        stream.write_all(header).await.unwrap();
        stream.shutdown().await.unwrap();
        hostile.push(stream);
    }
    fixture.assert_serving().await;
    for stream in &mut hostile {
        let took = closed_after(stream, Duration::from_secs(4)).await;
        assert!(took < Duration::from_secs(4), "closed after {took:?}");
    }
    assert_eq!(fixture.rejected("edge", "proxy_protocol").await, 2.0);
    fixture.assert_serving().await;
}

/// One byte at a time of a valid prefix: every byte is progress, only the deadline can
/// end it. The PROXY header and the ClientHello share that one deadline: a client that
/// spends most of it on the header has only the rest for its hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_at_a_time_trickle_is_cut_at_handshake_timeout_across_steps() {
    let fixture = Fixture::start(
        "pool = \"p\"\nhandshake_timeout = \"2s\"\naccept_proxy_protocol = \"v1\"\nproxy_protocol_from = [\"127.0.0.0/8\"]\n[listeners.edge.routes]\n\"a.example\" = \"p\"",
        "",
    )
    .await;
    let mut stream = TcpStream::connect(fixture.edge).await.unwrap();
    let started = Instant::now();
    let header = b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 443\r\n";
    let mut hello = TRUNCATED_HELLO.to_vec();
    hello.extend_from_slice(&[0x00, 0x00, 0x7c, 0x03, 0x03]);
    hello.extend_from_slice(&[0u8; 32]);
    // The header takes about 1.6 s, the hello would take 4 s more; with a fresh timeout
    // per step the cut would come at 3.6 s.
    let pace = Duration::from_millis(1600) / header.len() as u32;
    let mut cut_at = None;
    for (i, byte) in header.iter().chain(hello.iter()).enumerate() {
        let pause = if i < header.len() {
            pace
        } else {
            Duration::from_millis(100)
        };
        tokio::time::sleep(pause).await;
        if stream.write_all(&[*byte]).await.is_err() {
            cut_at = Some(started.elapsed());
            break;
        }
        if i == header.len() {
            fixture.assert_serving().await;
        }
        if is_closed(&mut stream, Duration::ZERO).await {
            cut_at = Some(started.elapsed());
            break;
        }
    }
    let cut_at = cut_at.expect("the trickling client was never cut off");
    assert!(
        cut_at >= Duration::from_millis(1900) && cut_at < Duration::from_millis(3000),
        "cut after {cut_at:?}, expected at the 2 s deadline shared by both steps"
    );
    assert_eq!(fixture.rejected("edge", "handshake_timeout").await, 1.0);
    fixture.assert_serving().await;
}

/// A TLS-terminating listener's client that never finishes its handshake is a
/// handshake timeout, not a failed handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_on_a_tls_listener_counts_as_a_handshake_timeout() {
    let dir = TestDir::new();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["a.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let fixture = Fixture::start(
        &format!(
            "pool = \"p\"\nhandshake_timeout = \"500ms\"\n[listeners.edge.tls]\ncert = \"{}\"\nkey = \"{}\"",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        ),
        "",
    )
    .await;
    let mut silent = TcpStream::connect(fixture.edge).await.unwrap();
    let took = closed_after(&mut silent, SOON).await;
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    assert_eq!(fixture.rejected("edge", "handshake_timeout").await, 1.0);
    assert_eq!(fixture.rejected("edge", "tls_handshake").await, 0.0);
    fixture.assert_serving().await;
}

/// Waits for the child to exit; its status and how long that took.
async fn exited_within(
    proxy: &mut ChildProxy,
    limit: Duration,
) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        assert!(
            started.elapsed() < limit,
            "the proxy did not exit within {limit:?}: {}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients still in their handshake do not hold the exit past the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshaking_clients_close_at_the_shutdown_grace() {
    let mut fixture = Fixture::start(
        "pool = \"p\"\nhandshake_timeout = \"60s\"\n[listeners.edge.routes]\n\"a.example\" = \"p\"",
        "shutdown_grace = \"1s\"",
    )
    .await;
    let mut handshaking = TcpStream::connect(fixture.edge).await.unwrap();
    handshaking.write_all(&TRUNCATED_HELLO[..3]).await.unwrap();
    fixture.assert_serving().await;
    fixture.proxy.signal(libc::SIGTERM);
    let (status, took) = exited_within(&mut fixture.proxy, SOON).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_secs(5),
        "exit took {took:?} with a 1 s grace"
    );
    assert!(is_closed(&mut handshaking, SOON).await);
}

/// The first SIGTERM drains; the second means now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_exits_at_once() {
    let mut fixture = Fixture::start("pool = \"p\"", "shutdown_grace = \"1h\"").await;
    let mut held = TcpStream::connect(fixture.front).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).await.unwrap();
    fixture.proxy.signal(libc::SIGTERM);
    // Draining: the listener is closed, the established connection still works.
    wait_until(SOON, "the listener closed", || {
        std::net::TcpStream::connect(fixture.front).is_err()
    })
    .await;
    held.write_all(b"y").await.unwrap();
    held.read_exact(&mut one).await.unwrap();
    assert!(fixture.proxy.child.try_wait().unwrap().is_none());
    fixture.proxy.signal(libc::SIGINT);
    let (status, _) = exited_within(&mut fixture.proxy, SOON).await;
    assert_eq!(status.code(), Some(1), "exit status {status:?}");
    assert!(is_closed(&mut held, SOON).await);
}

/// A SIGHUP while the proxy is still reading its config used to kill it (SIGHUP's
/// default action). The config file is a FIFO here, so the signal lands exactly while
/// the process is blocked reading it, before any runtime exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_during_start_up_does_not_kill_the_proxy() {
    let upstream = Server::echo().await;
    let (admin, front) = (closed_port(), closed_port());
    let dir = TestDir::new();
    let fifo = dir.join("switchyard.toml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "-c"])
        .arg(&fifo)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let toml = format!(
        "[admin]\nlisten = \"{admin}\"\n[listeners.front]\nbind = \"{front}\"\npool = \"p\"\n[pools.p]\nupstreams = [{{ address = \"{}\" }}]\n",
        upstream.addr
    );
    // Opening the FIFO for writing returns once the proxy opened it for reading.
    let writer = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::OpenOptions::new().write(true).open(&fifo)?;
        // SAFETY: kill(2) with plain integers on our own unreaped child.
        let sent = unsafe { libc::kill(pid, libc::SIGHUP) };
        assert_eq!(sent, 0);
        std::io::Write::write_all(&mut file, toml.as_bytes())
    });
    tokio::time::timeout(SOON, writer)
        .await
        .expect("the proxy never opened its config")
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + SOON;
    while echo_round_trip(front, b"alive").await.is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the proxy died: {status:?} (signal {:?})", status.signal());
        }
        assert!(Instant::now() < deadline, "the proxy never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}
