//! Both `runtime.scheduler`s on real child processes over loopback. With `per_thread`
//! (the default) every worker thread accepts on its own socket of every listener (seen
//! in the threads' context switches, which count each wake-up). With either,
//! `max_connections` holds across the threads, reload adds and removes listeners,
//! SIGTERM drains, SIGUSR2 hands the sockets over without a failed client, and the
//! threads end with the process. The rest of the suite runs with the default.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const WORKERS: usize = 2;
const WORKER_THREAD: &str = "sy-worker-";

const SCHEDULERS: [&str; 2] = ["per_thread", "shared"];

/// Listeners `(name, address)` into pool `p` over `upstream`, per-thread runtimes with
/// [`WORKERS`] threads, health checks off (their timers would wake threads by
/// themselves) and `runtime` lines.
fn config(
    listeners: &[(&str, SocketAddr)],
    admin: SocketAddr,
    upstream: SocketAddr,
    runtime: &str,
) -> String {
    config_with("per_thread", listeners, admin, upstream, runtime)
}

/// [`config`] with the scheduler named.
fn config_with(
    scheduler: &str,
    listeners: &[(&str, SocketAddr)],
    admin: SocketAddr,
    upstream: SocketAddr,
    runtime: &str,
) -> String {
    let mut text = format!(
        "[runtime]\nworker_threads = {WORKERS}\nscheduler = \"{scheduler}\"\n{runtime}\n[admin]\nlisten = \"{admin}\"\n\n"
    );
    for (name, addr) in listeners {
        text.push_str(&format!(
            "[listeners.{name}]\nbind = \"{addr}\"\npool = \"p\"\n\n"
        ));
    }
    text.push_str(&format!(
        "[pools.p]\nupstreams = [{{ name = \"a\", address = \"{upstream}\" }}]\n\n[pools.p.health]\nenabled = false\n"
    ));
    text
}

/// Context switches (voluntary and not) of each thread of `pid`, by thread name: a
/// thread blocked in epoll counts one each time something wakes it.
fn switches_by_thread(pid: u32) -> HashMap<String, u64> {
    let mut by_name = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let switches: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        *by_name.entry(name.trim().to_string()).or_default() += switches;
    }
    by_name
}

fn worker_names() -> Vec<String> {
    (0..WORKERS)
        .map(|i| format!("{WORKER_THREAD}{i}"))
        .collect()
}

/// Waits within [`SOON`] until process `pid` has every worker thread, by name: a new
/// thread names itself once it runs, which on a loaded machine may be after the process
/// already answers.
async fn wait_for_worker_threads(pid: u32) {
    wait_until(SOON, "every worker thread, by name", || {
        let threads = switches_by_thread(pid);
        worker_names().iter().all(|name| threads.contains_key(name))
    })
    .await;
}

/// How many times each worker thread woke, and every other thread together, while
/// `load` ran.
async fn wake_ups_during<F: Future<Output = ()>>(pid: u32, load: F) -> (Vec<u64>, u64) {
    let before = switches_by_thread(pid);
    load.await;
    let after = switches_by_thread(pid);
    let delta = |name: &String| {
        after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
    };
    let workers = worker_names().iter().map(delta).collect();
    let others = after
        .keys()
        .filter(|name| !name.starts_with(WORKER_THREAD))
        .map(delta)
        .sum();
    (workers, others)
}

/// `count` echo round trips to each of `addrs`, four at a time, each on a new
/// connection; every one must succeed.
async fn short_connections(addrs: &[SocketAddr], count: usize) {
    let mut clients = tokio::task::JoinSet::new();
    for lane in 0..4 {
        let addrs = addrs.to_vec();
        clients.spawn(async move {
            for n in (lane..count).step_by(4) {
                for addr in &addrs {
                    let payload = format!("{addr} #{n}");
                    tokio::time::timeout(SOON, echo_round_trip(*addr, payload.as_bytes()))
                        .await
                        .expect("round trip in time")
                        .unwrap_or_else(|e| panic!("round trip #{n} through {addr}: {e}"));
                }
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.expect("client task");
    }
}

/// Waits within [`SOON`] until listener `front` has no connection left.
async fn wait_no_active(admin: SocketAddr) {
    let active = || {
        metric_sum(
            admin,
            "switchyard_connections_active",
            &[("listener", "front")],
        )
    };
    let deadline = Instant::now() + SOON;
    while active().await > 0.0 {
        assert!(Instant::now() < deadline, "the connections did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_refused(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + SOON;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "{what} still accepts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn echo_on(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(SOON, stream.read_exact(&mut back))
        .await
        .map_err(std::io::Error::other)??;
    assert_eq!(back, payload);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_connections_through_several_listeners_are_served_on_every_worker_thread() {
    let upstream = Server::echo().await;
    let admin = closed_port();
    let listeners = [
        ("a", closed_port()),
        ("b", closed_port()),
        ("c", closed_port()),
    ];
    let proxy = ChildProxy::start(&config(&listeners, admin, upstream.addr, ""), admin).await;
    let pid = proxy.child.id();
    wait_for_worker_threads(pid).await;
    let threads = switches_by_thread(pid);
    assert!(!threads.contains_key(&format!("{WORKER_THREAD}{WORKERS}")));

    let addrs: Vec<SocketAddr> = listeners.iter().map(|(_, addr)| *addr).collect();
    let connections = 100;
    let (workers, others) = wake_ups_during(pid, short_connections(&addrs, connections)).await;
    let total = (connections * addrs.len()) as u64;
    eprintln!("{total} connections: worker wake-ups {workers:?}, every other thread {others}");
    // The kernel hashes each connection to one socket of its address; every worker
    // owns one of each, so each wakes for its share (half of them, give or take: far
    // more than 20 here however the hash falls).
    for (worker, woke) in worker_names().iter().zip(&workers) {
        assert!(
            *woke >= 20,
            "{worker} woke {woke} times for {total} connections"
        );
    }
    // The main runtime is not woken per connection: it accepts nothing and the
    // connections' tasks never leave their worker.
    assert!(
        others < total / 4,
        "the other threads woke {others} times for {total} connections"
    );
    // The counters every worker adds to are the listeners' own, seen whole.
    for (name, _) in &listeners {
        let accepted =
            metric_sum(admin, "switchyard_connections_total", &[("listener", name)]).await;
        assert_eq!(accepted, connections as f64, "listener {name}");
    }
    let log = proxy.stderr();
    assert!(!log.contains("ERROR") && !log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_across_the_worker_threads() {
    for scheduler in SCHEDULERS {
        max_connections_hold_with(scheduler).await;
    }
}

async fn max_connections_hold_with(scheduler: &str) {
    let upstream = Server::echo().await;
    let (admin, front) = (closed_port(), closed_port());
    let toml = config_with(scheduler, &[("front", front)], admin, upstream.addr, "")
        .replace("pool = \"p\"\n", "pool = \"p\"\nmax_connections = 3\n");
    let proxy = ChildProxy::start(&toml, admin).await;
    // Twelve clients at once, from twelve source ports: the kernel spreads them over
    // both workers' sockets, and only three are admitted, whichever thread took them.
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(TcpStream::connect(front).await.expect("connect"));
    }
    let mut served = 0;
    for client in &mut clients {
        if echo_on(client, b"in?").await.is_ok() {
            served += 1;
        }
    }
    assert_eq!(served, 3, "{scheduler}: {}", proxy.stderr());
    let rejected = metric_sum(
        admin,
        "switchyard_connections_rejected_total",
        &[("listener", "front"), ("reason", "max_connections")],
    )
    .await;
    assert_eq!(rejected, 9.0, "{scheduler}");
    assert_eq!(
        metric_sum(
            admin,
            "switchyard_connections_active",
            &[("listener", "front")]
        )
        .await,
        3.0
    );
    // A place freed on one thread is free for the others.
    clients.clear();
    wait_no_active(admin).await;
    for round in 0..3 {
        let mut again = Vec::new();
        for _ in 0..3 {
            again.push(TcpStream::connect(front).await.expect("connect"));
        }
        for client in &mut again {
            echo_on(client, b"in again")
                .await
                .unwrap_or_else(|e| panic!("round {round}: a freed place was not given: {e}"));
        }
        drop(again);
        wait_no_active(admin).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_listener_on_every_worker_thread_and_a_removed_one_drains() {
    for scheduler in SCHEDULERS {
        listeners_added_and_removed_with(scheduler).await;
    }
}

async fn listeners_added_and_removed_with(scheduler: &str) {
    let upstream = Server::echo().await;
    let (admin, a, b) = (closed_port(), closed_port(), closed_port());
    let proxy = ChildProxy::start(
        &config_with(scheduler, &[("a", a)], admin, upstream.addr, ""),
        admin,
    )
    .await;
    let pid = proxy.child.id();
    let mut held = TcpStream::connect(a).await.expect("connect to a");
    echo_on(&mut held, b"held through a")
        .await
        .expect("a serves");

    assert_eq!(
        proxy
            .reload_with(&config_with(
                scheduler,
                &[("a", a), ("b", b)],
                admin,
                upstream.addr,
                ""
            ))
            .await,
        "ok"
    );
    // Only b's connections now: with per_thread both workers must own one of b's
    // sockets.
    let (workers, _) = wake_ups_during(pid, short_connections(&[b], 200)).await;
    if scheduler == "per_thread" {
        for (worker, woke) in worker_names().iter().zip(&workers) {
            assert!(
                *woke >= 20,
                "{worker} woke {woke} times for b's 200 connections"
            );
        }
    }

    assert_eq!(
        proxy
            .reload_with(&config_with(
                scheduler,
                &[("b", b)],
                admin,
                upstream.addr,
                ""
            ))
            .await,
        "ok"
    );
    wait_refused(a, "the removed listener a").await;
    short_connections(&[b], 20).await;
    // The removed listener's connection goes on.
    echo_on(&mut held, b"still held after a went")
        .await
        .expect("the held connection survives the reload");
    let log = proxy.stderr();
    assert!(log.contains("listener removed"), "{scheduler}: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_held_connection_then_closes_it_and_every_thread_ends() {
    for scheduler in SCHEDULERS {
        sigterm_drains_with(scheduler).await;
    }
}

async fn sigterm_drains_with(scheduler: &str) {
    let upstream = Server::echo().await;
    let (admin, front) = (closed_port(), closed_port());
    let toml = config_with(
        scheduler,
        &[("front", front)],
        admin,
        upstream.addr,
        "shutdown_grace = \"1s\"\n",
    );
    let mut proxy = ChildProxy::start(&toml, admin).await;
    let mut held = TcpStream::connect(front).await.expect("connect");
    echo_on(&mut held, b"before").await.expect("served");

    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM);
    wait_refused(front, "front after SIGTERM").await;
    echo_on(&mut held, b"during the drain")
        .await
        .expect("the held connection is served while draining");
    assert!(
        is_closed(&mut held, SOON).await,
        "closed at the end of the grace period"
    );
    let status = wait_exit(&mut proxy.child, SOON).await;
    let took = signalled.elapsed();
    assert!(status.success(), "{status}: {}", proxy.stderr());
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before the grace period ended"
    );
    let log = proxy.stderr();
    assert!(log.contains("shutdown complete"), "{scheduler}: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigusr2_hands_every_workers_sockets_over_without_a_failed_client() {
    for scheduler in SCHEDULERS {
        sigusr2_hands_over_with(scheduler).await;
    }
}

async fn sigusr2_hands_over_with(scheduler: &str) {
    let backend = Backend::start("a").await;
    let (admin, front) = (closed_port(), closed_port());
    let dir = TestDir::new();
    let pid_path = dir.join("switchyard.pid");
    let runtime = format!(
        "shutdown_grace = \"5s\"\npid_file = \"{}\"\n",
        pid_path.display()
    );
    let mut old = ChildProxy::start(
        &config_with(
            scheduler,
            &[("front", front)],
            admin,
            backend.addr,
            &runtime,
        ),
        admin,
    )
    .await;
    let old_pid = old.child.id();
    let (stop_clients, clients) = greeting_clients(front);
    tokio::time::sleep(Duration::from_millis(300)).await;

    old.signal(libc::SIGUSR2);
    let new_pid = successor_pid(&pid_path, old_pid, || {
        format!("no new process: {}", old.stderr())
    })
    .await;
    let _successor = Successor(Some(new_pid));
    let status = wait_exit(&mut old.child, SOON).await;
    assert!(status.success(), "the old process exits 0: {status}");
    if scheduler == "per_thread" {
        // The new process serves on its own worker threads, from the handed-over
        // sockets.
        wait_for_worker_threads(new_pid).await;
    }
    stop_clients.cancel();
    let timeline = clients.await.expect("client loop");
    let failed: Vec<_> = timeline
        .records
        .iter()
        .filter(|r| r.served_by.is_err())
        .collect();
    eprintln!(
        "upgrade: {} clients, {} failed",
        timeline.records.len(),
        failed.len()
    );
    assert!(timeline.records.len() > 50, "too few clients to tell");
    assert!(failed.is_empty(), "{scheduler}: failed clients: {failed:?}");
    assert!(old.stderr().contains("the new process serves"));
}

#[test]
fn a_bad_scheduler_is_named_with_its_position_and_what_is_allowed() {
    let dir = TestDir::new();
    let path = dir.join("switchyard.toml");
    let binary = env!("CARGO_BIN_EXE_switchyard");
    let body = "\n[listeners.l]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n\n[pools.p]\nupstreams = [{ address = \"127.0.0.1:2\" }]\n";
    let long = format!("\"{}\"", "x".repeat(100_000));
    for value in [
        "\"fast\"",
        "\"per-thread\"",
        "\"\"",
        "7",
        "\"shared\\u0000\"",
        &long,
    ] {
        std::fs::write(&path, format!("[runtime]\nscheduler = {value}\n{body}")).unwrap();
        for command in ["check", "run"] {
            let out = std::process::Command::new(binary)
                .args([command, "-c"])
                .arg(&path)
                .output()
                .expect("run switchyard");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let shown = &value[..value.len().min(20)];
            assert_eq!(out.status.code(), Some(1), "{command} {shown}: {stderr}");
            let located = format!("{}:2:13: runtime.scheduler", path.display());
            assert!(stderr.contains(&located), "{command} {shown}: {stderr}");
            if value != "7" {
                assert!(
                    stderr.contains("use one of: shared, per_thread"),
                    "{command} {shown}: {stderr}"
                );
            }
            assert!(!stderr.contains("panicked"), "{stderr}");
            assert!(
                stderr.len() < 400_000,
                "the error repeats the value at most a few times"
            );
        }
    }
    std::fs::write(
        &path,
        format!("[runtime]\nscheduler = \"per_thread\"\n{body}"),
    )
    .unwrap();
    let out = std::process::Command::new(binary)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run switchyard check");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("scheduler per_thread"));
}
