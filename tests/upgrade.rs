//! Binary upgrade without downtime (SIGUSR2) and the pid file, on real child processes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::time::Instant;

/// A config for a child proxy: listener `front` on `front`, the admin API on `admin`,
/// pool `p` over `upstreams` with quick health checks, and `runtime` lines.
fn child_config(
    front: SocketAddr,
    admin: SocketAddr,
    upstreams: &[(&str, SocketAddr, u32)],
    runtime: &str,
) -> String {
    format!(
        "[runtime]\nshutdown_grace = \"5s\"\n{runtime}\n[admin]\nlisten = \"{admin}\"\n\n{}",
        pool_config(upstreams, "", FAST_HEALTH)
    )
    .replace("bind = \"127.0.0.1:0\"", &format!("bind = \"{front}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pid_file_holds_the_serving_pid_and_goes_at_exit() {
    let backend = Backend::start("a").await;
    let (front, admin) = (closed_port(), closed_port());
    let dir = TestDir::new();
    let pid_path = dir.join("run/switchyard.pid");
    std::fs::create_dir_all(pid_path.parent().unwrap()).unwrap();
    let runtime = format!("pid_file = \"{}\"\n", pid_path.display());
    let mut proxy = ChildProxy::start(
        &child_config(front, admin, &[("a", backend.addr, 0)], &runtime),
        admin,
    )
    .await;
    assert_eq!(read_pid(&pid_path), Some(proxy.child.id()));
    proxy.signal(libc::SIGTERM);
    let status = wait_exit(&mut proxy.child, SOON).await;
    assert!(status.success(), "{status}: {}", proxy.stderr());
    assert!(!pid_path.exists(), "the pid file is removed at exit");
}

/// Whether process `pid` has accepted the connection from `client` to `server`
/// (IPv4): the kernel gives a connection a socket inode only when it is accepted, and
/// the process then holds a descriptor to it. Counting the process's descriptors
/// instead raced with the close of the start-up probe's connection.
fn accepted(pid: u32, server: SocketAddr, client: SocketAddr) -> bool {
    let hex = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => String::new(),
    };
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()))
            .then(|| fields.get(9).map(|i| i.to_string()))
            .flatten()
    });
    let Some(inode) = inode.filter(|i| i != "0") else {
        return false;
    };
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|link| link.to_string_lossy() == wanted)
        })
    })
}

/// The race a binary upgrade (or any stop) has with an admin client: a connection the
/// process accepted just before it stopped accepting is answered in full, by a process
/// whose state still answers, while its proxied connections drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_call_accepted_before_a_stop_is_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("a").await;
    let (front, admin) = (closed_port(), closed_port());
    // No health checks: their sockets would make the descriptor count move by itself.
    let toml = child_config(front, admin, &[("a", backend.addr, 0)], "")
        .replace("[pools.p.health]\n", "[pools.p.health]\nenabled = false\n");
    let mut proxy = ChildProxy::start(&toml, admin).await;
    let pid = proxy.child.id();
    // A proxied connection keeps the drain going after the stop.
    let mut held = tokio::net::TcpStream::connect(front)
        .await
        .expect("connect");
    assert_eq!(read_line(&mut held).await.expect("greeting"), "hello a");

    let mut call = tokio::net::TcpStream::connect(admin).await.expect("admin");
    let from = call.local_addr().expect("the call's address");
    let deadline = Instant::now() + SOON;
    while !accepted(pid, admin, from) {
        assert!(
            Instant::now() < deadline,
            "the admin connection was not accepted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.signal(libc::SIGTERM);
    let deadline = Instant::now() + SOON;
    while tokio::net::TcpStream::connect(admin).await.is_ok() {
        assert!(Instant::now() < deadline, "the admin API still accepts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    call.write_all(b"GET /status HTTP/1.1\r\nHost: switchyard\r\n\r\n")
        .await
        .expect("send the request");
    let mut answer = Vec::new();
    tokio::time::timeout(SOON, call.read_to_end(&mut answer))
        .await
        .expect("answered and closed in time")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(&format!("\"pid\": {pid}")), "{answer}");

    drop(held);
    let status = wait_exit(&mut proxy.child, SOON).await;
    assert!(status.success(), "{status}: {}", proxy.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_file_that_cannot_be_written_fails_the_start() {
    let backend = Backend::start("a").await;
    let (front, admin) = (closed_port(), closed_port());
    let dir = TestDir::new();
    let config = dir.join("switchyard.toml");
    let runtime = "pid_file = \"no-such-folder/switchyard.pid\"\n";
    std::fs::write(
        &config,
        child_config(front, admin, &[("a", backend.addr, 0)], runtime),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot write the pid file"), "{stderr}");
}

/// Waits within [`SOON`] until `/status` shows `pid`: the new process answers the admin
/// API.
async fn wait_status_pid(admin: SocketAddr, pid: u32) {
    let deadline = Instant::now() + SOON;
    while status_pid(admin).await != pid {
        assert!(
            Instant::now() < deadline,
            "/status never showed the new process"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn status_pid(admin: SocketAddr) -> u32 {
    let status = get_json(admin, "/status").await;
    status["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .unwrap_or_else(|| panic!("a pid in /status: {status}"))
}

async fn upstream_field(admin: SocketAddr, name: &str, field: &str) -> serde_json::Value {
    let status = get_json(admin, "/status").await;
    status["pools"][0]["upstreams"]
        .as_array()
        .and_then(|list| list.iter().find(|u| u["name"] == name))
        .map(|u| u[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

/// A client that keeps one connection open through the proxy and echoes a chunk every
/// few milliseconds until told to stop; returns how many bytes came back, all checked.
async fn long_stream(
    front: SocketAddr,
    seed: u64,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(front)
        .await
        .expect("long stream connects");
    assert_eq!(read_line(&mut stream).await.expect("greeting"), "hello a");
    let mut echoed = 0;
    let mut round = 0u64;
    while !stop.is_cancelled() {
        let chunk = random_bytes(4096, seed * 1000 + round);
        stream.write_all(&chunk).await.expect("long stream writes");
        let mut back = vec![0u8; chunk.len()];
        tokio::time::timeout(SOON, stream.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("long stream reads");
        assert!(
            back == chunk,
            "long stream {seed}: round {round} came back different"
        );
        echoed += back.len();
        round += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    echoed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_under_load_refuses_nothing_keeps_streams_and_health() {
    let backend = Backend::start("a").await;
    let dead = closed_port();
    let (front, admin) = (closed_port(), closed_port());
    let dir = TestDir::new();
    let pid_path = dir.join("switchyard.pid");
    // Two workers: two SO_REUSEPORT sockets for the address, both handed over.
    let runtime = format!(
        "worker_threads = 2\npid_file = \"{}\"\n",
        pid_path.display()
    );
    let upstreams = [("a", backend.addr, 0), ("dead", dead, 0)];
    let mut old = ChildProxy::start(&child_config(front, admin, &upstreams, &runtime), admin).await;
    let old_pid = old.child.id();
    let deadline = Instant::now() + SOON;
    while upstream_field(admin, "dead", "state").await != "down" {
        assert!(
            Instant::now() < deadline,
            "dead never went down: {}",
            old.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stop_streams = tokio_util::sync::CancellationToken::new();
    let streams: Vec<_> = (0..3)
        .map(|seed| tokio::spawn(long_stream(front, seed, stop_streams.clone())))
        .collect();
    let (stop_clients, clients) = greeting_clients(front);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    old.signal(libc::SIGUSR2);
    let new_pid = successor_pid(&pid_path, old_pid, || {
        format!("no new process took the pid file: {}", old.stderr())
    })
    .await;
    let taken_over = Instant::now();
    let _successor = Successor(Some(new_pid));
    wait_status_pid(admin, new_pid).await;
    // The old process drains: its long streams go on while the new one takes every
    // new client, until the new one has checked both upstreams (its own checks, not
    // counts carried over) for a second and more.
    let switched = unix_ms();
    let deadline = Instant::now() + SOON;
    loop {
        let checked_since = |check: serde_json::Value| check["at_unix_ms"].as_u64().unwrap_or(0);
        let a = checked_since(upstream_field(admin, "a", "last_check").await);
        let dead = checked_since(upstream_field(admin, "dead", "last_check").await);
        if a.min(dead) > switched + 1000 {
            break;
        }
        assert!(Instant::now() < deadline, "the new process does not check");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old process drains while its streams run"
    );
    stop_clients.cancel();
    stop_streams.cancel();
    let timeline = clients.await.unwrap();
    for stream in streams {
        assert!(stream.await.unwrap() > 0);
    }
    let status = wait_exit(&mut old.child, SOON).await;
    assert!(
        status.success(),
        "the old process exits 0 once drained: {status}"
    );

    let failed: Vec<_> = timeline
        .records
        .iter()
        .filter(|r| r.served_by.is_err())
        .collect();
    let served = timeline
        .records
        .iter()
        .filter(|r| r.is_served_by("a"))
        .count();
    let (from, to) = (timeline.offset(signalled), timeline.offset(taken_over));
    let starting = timeline
        .records
        .iter()
        .filter(|r| r.started >= from && r.started <= to)
        .count();
    let draining = timeline.records.iter().filter(|r| r.started > to).count();
    eprintln!(
        "upgrade: {} connections in the run: {starting} in the {:?} from SIGUSR2 to the new process serving, {draining} while the old one drained; {served} served, {} failed",
        timeline.records.len(),
        to - from,
        failed.len()
    );
    assert!(failed.is_empty(), "failed clients: {failed:?}");
    assert_eq!(served, timeline.records.len());

    let events = get_json(admin, "/events").await;
    let upstream_events: Vec<_> = events
        .as_array()
        .or_else(|| events["events"].as_array())
        .map(|list| {
            list.iter()
                .filter(|e| !e["upstream"].is_null())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    assert!(
        upstream_events.is_empty(),
        "the upgrade flapped: {upstream_events:?}"
    );
    assert_eq!(upstream_field(admin, "dead", "state").await, "down");
    assert_eq!(
        read_pid(&pid_path),
        Some(new_pid),
        "the old process left the pid file alone"
    );
    let log = old.stderr();
    assert!(log.contains("the new process serves"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_exits_at_start_leaves_the_old_one_serving() {
    let backend = Backend::start("a").await;
    let (front, admin) = (closed_port(), closed_port());
    let dir = TestDir::new();
    let pid_path = dir.join("switchyard.pid");
    let runtime = format!("pid_file = \"{}\"\n", pid_path.display());
    let toml = child_config(front, admin, &[("a", backend.addr, 0)], &runtime);
    let proxy = ChildProxy::start(&toml, admin).await;
    let old_pid = proxy.child.id();
    // The new process reads the same file: broken, it exits 1 at start.
    std::fs::write(&proxy.config_path, "[runtime]\nno_such_key = 1\n").unwrap();
    proxy.signal(libc::SIGUSR2);
    let deadline = Instant::now() + SOON;
    while !proxy.stderr().contains("binary upgrade failed") {
        assert!(
            Instant::now() < deadline,
            "no failed upgrade logged: {}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = proxy.stderr();
    assert!(log.contains("exited before serving"), "{log}");
    assert!(log.contains("this process keeps serving"), "{log}");
    assert_eq!(greeted_by(front).await.expect("still served"), "a");
    assert_eq!(status_pid(admin).await, old_pid);
    assert_eq!(read_pid(&pid_path), Some(old_pid));

    // It keeps its upgrade handler: a second try with a good file succeeds.
    std::fs::write(&proxy.config_path, &toml).unwrap();
    proxy.signal(libc::SIGUSR2);
    let new_pid = successor_pid(&pid_path, old_pid, || {
        format!("the second upgrade did not happen: {}", proxy.stderr())
    })
    .await;
    let _successor = Successor(Some(new_pid));
    wait_status_pid(admin, new_pid).await;
    assert_eq!(greeted_by(front).await.expect("served by the new one"), "a");
}

/// Under systemd (`Type=notify`): READY=1 once serving, and on an upgrade the old
/// process names the new one as the unit's main process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_and_the_new_main_pid() {
    let backend = Backend::start("a").await;
    let (front, admin) = (closed_port(), closed_port());
    let dir = TestDir::new();
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        child_config(front, admin, &[("a", backend.addr, 0)], ""),
    )
    .unwrap();
    let notify_path = dir.join("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let mut old = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let next = async || {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(SOON, notify.recv(&mut buf))
            .await
            .expect("a notification in time")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next().await, "READY=1");
    assert_eq!(greeted_by(front).await.expect("serves once ready"), "a");
    signal(&old, libc::SIGUSR2);
    let message = next().await;
    let new_pid: u32 = message
        .strip_prefix("MAINPID=")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("not a MAINPID: {message:?}"));
    let _successor = Successor(Some(new_pid));
    assert_ne!(new_pid, old.id());
    wait_status_pid(admin, new_pid).await;
    let status = wait_exit(&mut old, SOON).await;
    assert!(status.success());
}
