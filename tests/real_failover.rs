//! Failover under real servers and real client libraries (issue: a hung or dying server
//! costs clients nothing): a stream of new connections, each a `redis` crate or
//! `tokio-postgres` client making one real request through switchyard, while the
//! primary is frozen (SIGSTOP), killed (SIGKILL), or killed and restarted into crash
//! recovery. Servers come from tests/common/servers.rs (skipped loudly when absent,
//! unless required).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use common::*;
use switchyard::drill::Stop;
use switchyard::events::Event;
use switchyard::metrics::{ConnectFailure, UpstreamStats};

/// A hung primary is detected by its first unanswered client, whose request goes to
/// the backup instead.
/// Pool lines: a server that leaves a client's first bytes unanswered for `first_byte`
/// is a failed attempt, and those bytes are replayed to the next one.
fn watched(first_byte: &str) -> String {
    format!("first_byte_timeout = \"{first_byte}\"\nreplay_unanswered = \"16KiB\"\n")
}

/// Redis answers from memory: anything slower than this is a hung server.
const REDIS_FIRST_BYTE: &str = "150ms";
/// PostgreSQL forks a backend per login, which on a loaded machine (2 cores, busy
/// loops, its own WAL replay beside it) can take longer than a Redis answer: a healthy
/// backup must not be taken for a hung one.
const POSTGRES_FIRST_BYTE: &str = "2s";

const QUICK: &str =
    "interval = \"200ms\"\nfast_interval = \"100ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 2";

/// One client this often: steady, and light enough for a loaded 2-core machine.
const CLIENT_EVERY: Duration = Duration::from_millis(5);
/// Clients served by an upstream, counted by the proxy, that show it really serves.
const SERVED_ENOUGH: u64 = 20;
/// Whole phases (a stream, a recovery) end within this.
const PHASE_LIMIT: Duration = Duration::from_secs(60);

fn health(check: &str) -> String {
    format!("[pools.p.health]\n{QUICK}\n{check}\n")
}

/// `read` of the counters of upstream `label` of pool `p`.
fn counter(proxy: &TestProxy, label: &str, read: impl Fn(&UpstreamStats) -> u64) -> u64 {
    let snapshot = proxy.proxy.snapshot.load();
    let route = snapshot.pool("p").expect("pool p");
    let upstream = route.upstreams.iter().find(|u| u.label() == label);
    read(&upstream.expect("upstream exists").stats)
}

fn connections(proxy: &TestProxy, label: &str) -> u64 {
    counter(proxy, label, |stats| stats.connections_total.load(Relaxed))
}

fn first_byte_timeouts(proxy: &TestProxy, label: &str) -> u64 {
    counter(proxy, label, |stats| {
        stats.connect_failures(ConnectFailure::FirstByteTimeout)
    })
}

/// Waits until `label` has served [`SERVED_ENOUGH`] more client connections.
async fn wait_served(proxy: &TestProxy, label: &str) {
    let start = connections(proxy, label);
    wait_until(PHASE_LIMIT, &format!("{label} serves clients"), || {
        connections(proxy, label) >= start + SERVED_ENOUGH
    })
    .await;
}

/// switchyard in front of `primary` (priority 0) and `backup` (1), replay on, checked
/// with `check`; returns once both passed a check.
async fn proxy_in_front(
    primary: SocketAddr,
    backup: SocketAddr,
    check: &str,
    first_byte: &str,
) -> TestProxy {
    let proxy = start_proxy(&pool_config(
        &[("primary", primary, 0), ("backup", backup, 1)],
        &watched(first_byte),
        &health(check),
    ));
    wait_all_checked(&proxy, "p").await;
    proxy
}

/// The primary's first `down` or `ejected` event after event `after`.
async fn wait_taken_out(proxy: &TestProxy, after: u64) -> Event {
    event_after(proxy, after, SOON, "primary taken out", |e| {
        e.upstream.as_deref() == Some("primary") && (e.new == "down" || e.new == "ejected")
    })
    .await
}

fn stream(stop: &CancellationToken) -> RealStream {
    RealStream {
        every: CLIENT_EVERY,
        limit: PHASE_LIMIT,
        client_timeout: SOON,
        stop: Stop::On(stop.clone()),
    }
}

// ---------------------------------------------------------------- Redis

#[derive(Debug, Clone, Copy)]
enum RedisFault {
    Freeze,
    Kill,
}

/// A primary and a backup redis-server behind a `kind = "redis"` check, replay on; a
/// stream of `redis` crate clients (SET, GET it back, GET whoami, one round trip each)
/// while the primary is frozen or killed: no client sees an error, and the backup
/// serves after.
async fn redis_primary_fault_costs_no_client(fault: RedisFault) {
    let Some(program) = find_program("redis-server") else {
        skip("redis-server is not installed (Debian package redis-server)");
        return;
    };
    let dir = TempDir::new();
    let mut primary = Redis::start(&program, &dir, closed_port().port()).await;
    let backup = Redis::start(&program, &dir, closed_port().port()).await;
    redis_name_server(primary.addr, "primary")
        .await
        .expect("name the primary");
    redis_name_server(backup.addr, "backup")
        .await
        .expect("name the backup");
    let proxy = proxy_in_front(
        primary.addr,
        backup.addr,
        "kind = \"redis\"",
        REDIS_FIRST_BYTE,
    )
    .await;
    let addr = proxy.addr("front");

    let stop = CancellationToken::new();
    let clients = tokio::spawn(stream(&stop).run(move |n| redis_request(addr, n)));
    wait_served(&proxy, "primary").await;
    let before = last_event_id(&proxy);
    let fault_at = Instant::now();
    match fault {
        RedisFault::Freeze => signal(&primary.child, libc::SIGSTOP),
        RedisFault::Kill => {
            let _ = primary.child.kill();
            let _ = primary.child.wait();
        }
    }
    let out = wait_taken_out(&proxy, before).await;
    wait_served(&proxy, "backup").await;
    stop.cancel();
    let timeline = clients.await.expect("client stream");

    let failed: Vec<_> = failed(&timeline).collect();
    assert!(
        failed.is_empty(),
        "{fault:?}: {} of {} clients failed: {failed:#?}",
        failed.len(),
        timeline.records.len()
    );
    let fault_offset = timeline.offset(fault_at);
    assert!(
        timeline
            .records
            .iter()
            .any(|r| r.started < fault_offset && r.is_served_by("primary")),
        "the primary served before the fault"
    );
    assert!(
        timeline
            .records
            .iter()
            .any(|r| r.started > fault_offset && r.is_served_by("backup")),
        "the backup served after it"
    );
    eprintln!(
        "{fault:?}: {} clients, 0 failed; primary {} ({}); first-byte timeouts: {}",
        timeline.records.len(),
        out.new,
        out.reason,
        first_byte_timeouts(&proxy, "primary")
    );
    if let RedisFault::Freeze = fault {
        assert!(
            first_byte_timeouts(&proxy, "primary") >= 1,
            "the frozen primary left clients unanswered, who went on to the backup"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_primary_costs_no_client_with_replay() {
    redis_primary_fault_costs_no_client(RedisFault::Freeze).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_primary_costs_no_client_with_replay() {
    redis_primary_fault_costs_no_client(RedisFault::Kill).await;
}

// ---------------------------------------------------------------- PostgreSQL

/// Every login the restarted primary refused before it took one: when it was sent (unix
/// ms) and why.
struct Recovery {
    refusals: Vec<(u64, String)>,
}

/// Logs in to `addr` directly every 10 ms until it takes a login.
async fn watch_recovery(addr: SocketAddr) -> Recovery {
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut refusals = Vec::new();
    loop {
        let sent = unix_ms();
        let answer = tokio::time::timeout(SOON, pg_request(addr))
            .await
            .unwrap_or_else(|_| Err("no answer in time".to_string()));
        match answer {
            Ok(_) => return Recovery { refusals },
            Err(why) => refusals.push((sent, why)),
        }
        assert!(
            Instant::now() < deadline,
            "the restarted primary took no login within {PHASE_LIMIT:?}: {:?}",
            refusals.last()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The primary SIGKILLed with all its processes, then restarted: it goes through crash
/// recovery, refusing logins meanwhile (57P03: "the database system is starting up",
/// "not yet accepting connections"). Through a
/// `kind = "postgres"` check: clients are served by the backup from the kill on, the
/// primary is marked up only after its last refused login, and no new client ever sees
/// an error; only sessions already on the killed server may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_postgres_primary_gets_clients_back_only_once_it_takes_logins() {
    let Some(tools) = PgTools::find() else {
        return;
    };
    let cluster = PgCluster::init(tools);
    let mut primary = cluster.start("primary").await;
    let backup = cluster.start("backup").await;
    // WAL after the last checkpoint: the restart has something to replay, and takes
    // a while before it takes logins.
    pg_execute(primary.addr, WAL_FILLER)
        .await
        .expect("write WAL");
    let names = [
        (primary.addr.port(), "primary"),
        (backup.addr.port(), "backup"),
    ];
    let check = "kind = \"postgres\"\nuser = \"postgres\"";
    let proxy = proxy_in_front(primary.addr, backup.addr, check, POSTGRES_FIRST_BYTE).await;
    let addr = proxy.addr("front");

    let stop = CancellationToken::new();
    let clients = tokio::spawn(
        stream(&stop).run(move |_| async move { pg_request_named(addr, &names).await }),
    );
    wait_served(&proxy, "primary").await;
    let before_kill = last_event_id(&proxy);
    let command_line = crash(&mut primary);
    let killed_at = Instant::now();
    let out = wait_taken_out(&proxy, before_kill).await;
    wait_served(&proxy, "backup").await;

    let before_restart = last_event_id(&proxy);
    restart_after_crash(&mut primary, &cluster.tools, &command_line);
    let restarted_at = Instant::now();
    let recovery = watch_recovery(primary.addr).await;
    let up = event_after(
        &proxy,
        before_restart,
        PHASE_LIMIT,
        "primary up",
        upstream_became("primary", "up"),
    )
    .await;
    let failback = event_after(
        &proxy,
        before_restart,
        SOON,
        "failback to the primary's tier",
        tier_became("0"),
    )
    .await;
    wait_served(&proxy, "primary").await;
    stop.cancel();
    let timeline = clients.await.expect("client stream");

    // 57P03, cannot connect now: "starting up", "not yet accepting connections".
    let starting_up: Vec<&(u64, String)> = recovery
        .refusals
        .iter()
        .filter(|(_, why)| why.contains("57P03"))
        .collect();
    assert!(
        !starting_up.is_empty(),
        "the restarted primary was never seen in crash recovery: {:?}",
        recovery.refusals
    );
    let last_refusal = recovery.refusals.last().map_or(0, |(sent, _)| *sent);
    assert!(
        up.at_unix_ms >= last_refusal,
        "marked up at {} though it refused a login sent at {last_refusal}: {:?}",
        up.at_unix_ms,
        recovery.refusals.last()
    );
    assert!(failback.at_unix_ms >= up.at_unix_ms);

    // Only sessions on the server when it was killed may fail.
    let killed_offset = timeline.offset(killed_at);
    let late: Vec<_> = failed(&timeline)
        .filter(|r| r.started >= killed_offset)
        .collect();
    assert!(
        late.is_empty(),
        "{} clients that started after the kill failed: {late:#?}",
        late.len()
    );
    let restarted_offset = timeline.offset(restarted_at);
    assert!(
        timeline
            .records
            .iter()
            .any(|r| r.started > restarted_offset && r.is_served_by("primary")),
        "clients are served by the primary again"
    );
    eprintln!(
        "PostgreSQL kill + restart: {} clients, {} failed (all on the killed server); primary \
         {} ({}); {} refused logins while restarting ({} of them 57P03, in recovery); up {} ms after the \
         last refusal",
        timeline.records.len(),
        failed(&timeline).count(),
        out.new,
        out.reason,
        recovery.refusals.len(),
        starting_up.len(),
        up.at_unix_ms.saturating_sub(last_refusal),
    );
}
