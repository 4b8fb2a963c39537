//! How fast switchyard fails over and back, side by side with HAProxy (SPEC §3, "Failover
//! latency, as measured by the benchmarks").
//!
//! Each run starts, on loopback, a primary and a backup upstream that greet every
//! connection with `hello <name>\n` and then echo, and a proxy in front of them:
//! switchyard in this process but on a tokio runtime of its own, or HAProxy as a child
//! process, both with the same settings (printed at the start). A stream of new client
//! connections, one every 2 ms, runs from 1 s before a failure is injected into the
//! primary until 2 s after it; each client connects through the proxy and reads the
//! greeting, which tells who served it and how long it took. No greeting within 2 s (or
//! a close) is a failure. The failures injected:
//!
//! - killed: the primary's listener and connections close, like a process dying, so
//!   connects are refused;
//! - hung: the primary accepts but never answers; only the check's `expect` can tell;
//! - hung, client speaks first: the same, but the upstreams greet a client only after it
//!   sent a line, and each client sends one first (as PostgreSQL, Redis and HTTP clients
//!   do), so the clients caught by the hang have sent bytes; with switchyard also with
//!   `first_byte_timeout` and `replay_unanswered`;
//! - black-holed: the primary stops accepting and its small accept queue is filled, so
//!   the kernel drops new SYNs and connects time out.
//!
//! And with real servers behind the proxies, each client a real client library making
//! one request (`redis` crate: SET, GET it back and GET `whoami`, one round trip;
//! `tokio-postgres`: log in, `SELECT 1` and the server's port), any error counting as a
//! failure; switchyard with its protocol check (`kind = "redis"`, `kind = "postgres"`),
//! `first_byte_timeout` and `replay_unanswered`, HAProxy with `option redis-check` /
//! `option pgsql-check`:
//!
//! - Redis SIGSTOPped (thawed for the failback) and SIGKILLed (a new redis-server on its
//!   port for the failback);
//! - PostgreSQL SIGKILLed with all its processes after writing WAL, then restarted: it
//!   refuses logins during its crash recovery (about a second), which the failback
//!   includes.
//!
//! The real servers are the tests' launchers and clients (tests/common, included with
//! `#[path]`); their rows are left out, said so, when redis-server or PostgreSQL is not
//! installed.
//!
//! Then the primary serves again on the same port, and the stream runs until a client
//! is served by it (at most 5 s). The injection and the restart each wait a random part
//! of a check interval first, so that the rounds do not all hit the same phase of the
//! proxies' check schedules. Reported per scenario and proxy, as the median of the
//! rounds (failures: the worst round):
//!
//! - detection: injection → the primary marked down. For switchyard the timestamp of its
//!   `down` or `ejected` event; for HAProxy the first `show stat` answer (stats socket,
//!   polled every 5 ms) with the primary `DOWN`, so it is late by up to about 5 ms;
//! - switch: injection → the greeting of the first client started after it that the
//!   backup served (clients start 2 ms apart, so this is up to 2 ms late);
//! - failed: clients started within 2 s after the injection, or in flight at it, that
//!   got no greeting;
//! - connect latency p50/p99/max: connect → greeting of the clients of that window that
//!   were served (failed ones are only counted);
//! - failback: the primary serving again → the first client greeted by the primary;
//!   "fb failed": the clients that failed meanwhile.
//!
//! The upstreams and the client stream are the library's `drill` module, the same the
//! demo shows. HAProxy is looked up on PATH (and in /usr/sbin); when it is missing the
//! bench says how to install it and runs switchyard only: it installs nothing itself.
//! Nothing leaves 127.0.0.1; the HAProxy child is stopped by its PID.
//!
//! `FAILOVER_BENCH_ROUNDS` (default 3) sets the rounds; a round starts only if it can
//! finish within about 10 minutes from the first one. `FAILOVER_BENCH_FILTER` keeps only
//! the cases whose "scenario / proxy" name contains it (e.g. `black-holed`). Every wait
//! has a deadline.

use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{Instant, MissedTickBehavior, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use switchyard::Proxy;
use switchyard::config::Config;
use switchyard::drill::upstream::GreetingUpstream;
use switchyard::drill::{ClientStream, Probe, Stop, Timeline, ask_greeting};
use switchyard::shutdown::Shutdown;

// The real-server launchers and clients of the tests, not a copy of them.
#[path = "../tests/common/mod.rs"]
mod common;

use common::{
    PgCluster, PgServer, PgTools, RealRecord, RealStream, RealTimeline, Redis, WAL_FILLER,
    closed_port, crash, find_program, pg_execute, pg_request_named, redis_name_server,
    redis_request, restart_after_crash, signal,
};

type BoxError = Box<dyn Error + Send + Sync>;
#[path = "shared/failover_settings.rs"]
mod failover_settings;
use failover_settings::*;

type Result<T, E = BoxError> = std::result::Result<T, E>;

/// switchyard only: HAProxy has no hedged connects.
const HEDGE_AFTER_MS: u64 = 50;
/// switchyard only: HAProxy has no replay of a client's unanswered bytes.
const FIRST_BYTE_TIMEOUT_MS: u64 = 150;
const REPLAY_KIB: u64 = 16;
/// The PostgreSQL rows' check timeout (both proxies): its check forks a backend.
const POSTGRES_CHECK_TIMEOUT_MS: u64 = 300;

const FAILBACK_LIMIT: Duration = Duration::from_secs(5);
/// PostgreSQL forks a backend for every connection: fewer clients than the others.
const POSTGRES_CLIENT_EVERY: Duration = Duration::from_millis(5);

const READY_LIMIT: Duration = Duration::from_secs(5);
/// After the proxy serves: lets the first checks of both upstreams finish.
const SETTLE: Duration = Duration::from_millis(300);
const STATS_POLL_EVERY: Duration = Duration::from_millis(5);
const STATS_QUERY_LIMIT: Duration = Duration::from_secs(1);
/// One scenario run, set-up and teardown included.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// A new round starts only if it should end within this from the first round's start.
const ROUNDS_BUDGET: Duration = Duration::from_secs(600);
const DEFAULT_ROUNDS: usize = 3;
const HAPROXY_COMMAND_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Killed,
    Hung,
    /// Hung, in a protocol where the client speaks first (PostgreSQL, Redis, HTTP): its
    /// clients have sent bytes by the time the hang is noticed.
    HungClientFirst,
    BlackHoled,
    /// A real redis-server SIGSTOPped; thawed (SIGCONT) for the failback.
    RedisFrozen,
    /// A real redis-server SIGKILLed; a new one on its port for the failback.
    RedisKilled,
    /// A real PostgreSQL SIGKILLed with all its processes; restarted for the failback,
    /// it goes through crash recovery first.
    PostgresKilled,
}

impl Fault {
    fn is_real(self) -> bool {
        matches!(
            self,
            Self::RedisFrozen | Self::RedisKilled | Self::PostgresKilled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyKind {
    Switchyard,
    /// switchyard with `hedge_after`.
    SwitchyardHedged,
    /// switchyard with `first_byte_timeout` and `replay_unanswered`.
    SwitchyardReplay,
    Haproxy,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    fault: Fault,
    proxy: ProxyKind,
}

const CASES: [Case; 16] = [
    Case {
        fault: Fault::Killed,
        proxy: ProxyKind::Switchyard,
    },
    Case {
        fault: Fault::Killed,
        proxy: ProxyKind::Haproxy,
    },
    Case {
        fault: Fault::Hung,
        proxy: ProxyKind::Switchyard,
    },
    Case {
        fault: Fault::Hung,
        proxy: ProxyKind::Haproxy,
    },
    Case {
        fault: Fault::HungClientFirst,
        proxy: ProxyKind::Switchyard,
    },
    Case {
        fault: Fault::HungClientFirst,
        proxy: ProxyKind::SwitchyardReplay,
    },
    Case {
        fault: Fault::HungClientFirst,
        proxy: ProxyKind::Haproxy,
    },
    Case {
        fault: Fault::BlackHoled,
        proxy: ProxyKind::Switchyard,
    },
    Case {
        fault: Fault::BlackHoled,
        proxy: ProxyKind::SwitchyardHedged,
    },
    Case {
        fault: Fault::BlackHoled,
        proxy: ProxyKind::Haproxy,
    },
    Case {
        fault: Fault::RedisFrozen,
        proxy: ProxyKind::SwitchyardReplay,
    },
    Case {
        fault: Fault::RedisFrozen,
        proxy: ProxyKind::Haproxy,
    },
    Case {
        fault: Fault::RedisKilled,
        proxy: ProxyKind::SwitchyardReplay,
    },
    Case {
        fault: Fault::RedisKilled,
        proxy: ProxyKind::Haproxy,
    },
    Case {
        fault: Fault::PostgresKilled,
        proxy: ProxyKind::SwitchyardReplay,
    },
    Case {
        fault: Fault::PostgresKilled,
        proxy: ProxyKind::Haproxy,
    },
];

/// The HAProxy to compare with.
#[derive(Debug, Clone)]
struct Haproxy {
    binary: PathBuf,
    /// e.g. "2.6.12".
    version: String,
}

/// One run of one case.
#[derive(Debug, Clone, Default)]
struct RunResult {
    detection: Option<Duration>,
    /// How the proxy explained the detection (event reason or HAProxy's log).
    detected_by: Option<String>,
    switch: Option<Duration>,
    failed: usize,
    /// Of them, clients that started after the injection: new connections, rather than
    /// sessions the fault cut.
    failed_new: usize,
    /// Why they failed: (why, how many).
    failed_why: Vec<(String, usize)>,
    /// Failures of clients that ended before the injection: should be none.
    failed_before: Vec<(String, usize)>,
    /// Clients started in the window that were served.
    served: usize,
    p50: Option<Duration>,
    p99: Option<Duration>,
    max: Option<Duration>,
    failback: Option<Duration>,
    failback_failed: usize,
    /// Why they failed during the failback.
    failback_why: Vec<(String, usize)>,
    /// Printed with the run, e.g. what switchyard did instead of failing back.
    note: Option<String>,
}

/// switchyard running in this process, on a runtime of its own (as if it were a process
/// of its own, like HAProxy).
struct InProcess {
    proxy: Proxy,
    shutdown: Shutdown,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

/// An HAProxy child process, killed by its PID on drop.
struct HaproxyChild {
    child: Child,
    addr: SocketAddr,
    stats_socket: PathBuf,
    log: PathBuf,
}

enum RunningProxy {
    Switchyard(InProcess),
    Haproxy(HaproxyChild),
}

/// A directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

fn main() {
    let started = std::time::Instant::now();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("failover bench: cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        tokio::spawn(run())
            .await
            .unwrap_or_else(|e| Err(format!("the bench task failed: {e}").into()))
    });
    // Upstream accept loops and leftover client tasks end with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => println!("wall time: {:.1} s", started.elapsed().as_secs_f64()),
        Err(e) => {
            eprintln!("failover bench: {e}");
            std::process::exit(1);
        }
    }
}

async fn run() -> Result<()> {
    let rounds = rounds_from_env()?;
    let dir = TempDir::new()?;
    println!("switchyard failover bench: rounds: {rounds}");
    let haproxy = haproxy().await;
    if haproxy.is_none() {
        println!("running switchyard only");
    }
    println!();
    print_settings(haproxy.as_ref());

    let filter = std::env::var("FAILOVER_BENCH_FILTER").unwrap_or_default();
    let cases: Vec<Case> = CASES
        .iter()
        .copied()
        .filter(|c| c.proxy != ProxyKind::Haproxy || haproxy.is_some())
        .filter(|c| case_name(*c, haproxy.as_ref()).contains(filter.as_str()))
        .collect();
    let real = if cases.iter().any(|c| c.fault.is_real()) {
        RealServers::find()
    } else {
        RealServers::none()
    };
    let cases: Vec<Case> = cases.into_iter().filter(|c| real.has(c.fault)).collect();
    let mut results: Vec<(Case, Vec<RunResult>, Vec<String>)> = cases
        .iter()
        .map(|&case| (case, Vec::new(), Vec::new()))
        .collect();
    let first_round = Instant::now();
    let mut rounds_done = 0;
    for round in 0..rounds {
        if round > 0 {
            let per_round = first_round.elapsed() / round as u32;
            if first_round.elapsed() + per_round > ROUNDS_BUDGET {
                println!(
                    "stopping after {round} rounds: another would end after the {} s budget",
                    ROUNDS_BUDGET.as_secs()
                );
                break;
            }
        }
        println!("round {}/{rounds}", round + 1);
        for (n, (case, runs, errors)) in results.iter_mut().enumerate() {
            let name = case_name(*case, haproxy.as_ref());
            let run_dir = dir.0.join(format!("round{round}-case{n}"));
            let outcome = timeout(
                RUN_LIMIT,
                run_case(*case, haproxy.as_ref(), &run_dir, &real),
            )
            .await
            .unwrap_or_else(|_| Err(format!("did not finish within {RUN_LIMIT:?}").into()));
            match outcome {
                Ok(result) => {
                    println!("  {name}: {}", describe(&result));
                    runs.push(result);
                }
                Err(e) => {
                    println!("  {name}: FAILED: {e}");
                    errors.push(e.to_string());
                }
            }
        }
        rounds_done += 1;
    }
    println!();
    print_table(&results, haproxy.as_ref(), rounds_done);
    Ok(())
}

fn rounds_from_env() -> Result<usize> {
    let text = match std::env::var("FAILOVER_BENCH_ROUNDS") {
        Ok(text) => text,
        Err(std::env::VarError::NotPresent) => return Ok(DEFAULT_ROUNDS),
        Err(e) => return Err(format!("FAILOVER_BENCH_ROUNDS: {e}").into()),
    };
    match text.trim().parse::<usize>() {
        Ok(rounds @ 1..=100) => Ok(rounds),
        _ => Err(format!(
            "FAILOVER_BENCH_ROUNDS must be a whole number from 1 to 100, not {text:?}"
        )
        .into()),
    }
}

// === scenario runs ===

/// The health check both proxies run, in each one's words.
struct Check {
    /// Lines of switchyard's `[pools.p.health]` besides the timings.
    switchyard: &'static str,
    /// HAProxy's check lines in `listen front`.
    haproxy: &'static str,
    timeout_ms: u64,
}

const GREETING_CHECK: Check = Check {
    switchyard: "send = \"PING\\r\\n\"\nexpect = \"hello\"\n",
    haproxy: "    option tcp-check\n    tcp-check connect\n    tcp-check send \"PING\\r\\n\"\n    tcp-check expect string hello\n",
    timeout_ms: CHECK_TIMEOUT_MS,
};

const REDIS_CHECK: Check = Check {
    switchyard: "kind = \"redis\"\n",
    haproxy: "    option redis-check\n",
    timeout_ms: CHECK_TIMEOUT_MS,
};

/// A check that logs in forks a PostgreSQL backend: more than a PING on a loaded machine.
const POSTGRES_CHECK: Check = Check {
    switchyard: "kind = \"postgres\"\nuser = \"postgres\"\n",
    haproxy: "    option pgsql-check user postgres\n",
    timeout_ms: POSTGRES_CHECK_TIMEOUT_MS,
};

fn check_for(fault: Fault) -> &'static Check {
    match fault {
        Fault::RedisFrozen | Fault::RedisKilled => &REDIS_CHECK,
        Fault::PostgresKilled => &POSTGRES_CHECK,
        Fault::Killed | Fault::Hung | Fault::HungClientFirst | Fault::BlackHoled => &GREETING_CHECK,
    }
}

/// The proxy of `kind` in front of `primary` and `backup`, checking them with `check`.
async fn start_proxy(
    kind: ProxyKind,
    haproxy: Option<&Haproxy>,
    dir: &Path,
    (primary, backup): (SocketAddr, SocketAddr),
    check: &Check,
) -> Result<RunningProxy> {
    let (primary_addr, backup_addr) = (primary.to_string(), backup.to_string());
    let pool_extra = match kind {
        ProxyKind::Switchyard | ProxyKind::Haproxy => String::new(),
        ProxyKind::SwitchyardHedged => format!("hedge_after = \"{HEDGE_AFTER_MS}ms\"\n"),
        ProxyKind::SwitchyardReplay => format!(
            "first_byte_timeout = \"{FIRST_BYTE_TIMEOUT_MS}ms\"\nreplay_unanswered = \"{REPLAY_KIB}KiB\"\n"
        ),
    };
    match (kind, haproxy) {
        (ProxyKind::Haproxy, Some(haproxy)) => Ok(RunningProxy::Haproxy(
            HaproxyChild::start(&haproxy.binary, dir, primary, backup, check).await?,
        )),
        (ProxyKind::Haproxy, None) => Err("HAProxy is not available".into()),
        _ => Ok(RunningProxy::Switchyard(InProcess::start(
            &switchyard_config(&primary_addr, &backup_addr, &pool_extra, check),
        )?)),
    }
}

/// Starts fresh upstreams and a fresh proxy, injects `case.fault` under a client stream,
/// then restarts the primary and measures the failback.
async fn run_case(
    case: Case,
    haproxy: Option<&Haproxy>,
    dir: &Path,
    real: &RealServers,
) -> Result<RunResult> {
    if case.fault.is_real() {
        return run_real_case(case, haproxy, dir, real).await;
    }
    let speaks_first = case.fault == Fault::HungClientFirst;
    let upstream = |name| async move {
        if speaks_first {
            GreetingUpstream::client_first_with_backlog(name, UPSTREAM_BACKLOG).await
        } else {
            GreetingUpstream::start_with_backlog(name, UPSTREAM_BACKLOG).await
        }
    };
    let mut primary = upstream("primary").await?;
    let backup = upstream("backup").await?;
    let proxy = start_proxy(
        case.proxy,
        haproxy,
        dir,
        (primary.addr, backup.addr),
        &GREETING_CHECK,
    )
    .await?;
    let addr = proxy.addr();
    wait_served_by(
        addr,
        speaks_first,
        "primary",
        "the proxy serves from the primary",
    )
    .await?;
    sleep(SETTLE).await;

    let stop = CancellationToken::new();
    let stream = tokio::spawn(
        client_stream(addr, LEAD_IN + WINDOW * 2, speaks_first).run(Stop::On(stop.clone())),
    );
    // A random phase against the proxies' check schedules, which would otherwise be
    // locked to the start-up and favour one proxy in every round.
    sleep(LEAD_IN + check_phase()).await;
    let injection = Injection::now(&proxy);
    match case.fault {
        Fault::Killed => primary.kill().await,
        Fault::Hung | Fault::HungClientFirst => primary.hang(),
        Fault::BlackHoled => primary.black_hole().await?,
        Fault::RedisFrozen | Fault::RedisKilled | Fault::PostgresKilled => {
            return Err("a real server's fault on a greeting upstream".into());
        }
    }
    sleep_until(injection.at + WINDOW).await;
    stop.cancel();
    let timeline = stream
        .await
        .map_err(|e| format!("client stream task failed: {e}"))?;
    let mut result = injection.measure(&proxy, &from_drill(&timeline)).await;

    let events_before_restart = proxy.last_event_id();
    sleep(check_phase()).await;
    primary.restart().await?;
    let restarted = Instant::now();
    let failback: Timeline = client_stream(addr, FAILBACK_LIMIT, speaks_first)
        .run(Stop::ServedBy(primary.name().to_string()))
        .await;
    measure_failback(&mut result, &from_drill(&failback), restarted);
    if result.failback.is_none() {
        result.note = no_failback_note(&proxy, events_before_restart);
    }
    drop(proxy);
    Ok(result)
}

/// What the real-server rows need: where redis-server is, and one initdb for every
/// PostgreSQL server; `None` when not installed.
struct RealServers {
    redis: Option<PathBuf>,
    postgres: Option<PgCluster>,
    dir: Arc<common::TempDir>,
}

impl RealServers {
    fn find() -> Self {
        let redis = find_program("redis-server");
        if redis.is_none() {
            println!(
                "redis-server: not found; the Redis rows are left out (Debian: apt-get install redis-server)"
            );
        }
        let postgres = PgTools::find().map(PgCluster::init);
        if postgres.is_none() {
            println!(
                "PostgreSQL: not found; the PostgreSQL rows are left out (Debian: apt-get install postgresql)"
            );
        }
        Self {
            redis,
            postgres,
            dir: common::TempDir::new(),
        }
    }

    /// For a run without real-server rows: nothing started.
    fn none() -> Self {
        Self {
            redis: None,
            postgres: None,
            dir: common::TempDir::new(),
        }
    }

    fn has(&self, fault: Fault) -> bool {
        match fault {
            Fault::RedisFrozen | Fault::RedisKilled => self.redis.is_some(),
            Fault::PostgresKilled => self.postgres.is_some(),
            Fault::Killed | Fault::Hung | Fault::HungClientFirst | Fault::BlackHoled => true,
        }
    }
}

/// A real server, named for the clients that ask who answered.
enum RealServer {
    Redis(Redis),
    Postgres(PgServer),
}

impl RealServer {
    async fn start(fault: Fault, real: &RealServers, name: &str) -> Result<Self> {
        match fault {
            Fault::RedisFrozen | Fault::RedisKilled => {
                let program = real
                    .redis
                    .as_deref()
                    .ok_or("redis-server is not installed")?;
                Ok(Self::Redis(
                    start_named_redis(program, &real.dir, closed_port().port(), name).await?,
                ))
            }
            Fault::PostgresKilled => {
                let cluster = real
                    .postgres
                    .as_ref()
                    .ok_or("PostgreSQL is not installed")?;
                let server = cluster
                    .start(&format!("{name}-{}", fastrand::u64(..)))
                    .await;
                Ok(Self::Postgres(server))
            }
            Fault::Killed | Fault::Hung | Fault::HungClientFirst | Fault::BlackHoled => {
                Err("not a real server's fault".into())
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Self::Redis(redis) => redis.addr,
            Self::Postgres(postgres) => postgres.addr,
        }
    }
}

async fn start_named_redis(
    program: &Path,
    dir: &Arc<common::TempDir>,
    port: u16,
    name: &str,
) -> Result<Redis> {
    let redis = Redis::start(program, dir, port).await;
    redis_name_server(redis.addr, name).await?;
    Ok(redis)
}

/// One request of a real client of `fault`'s server through `addr`: who answered.
async fn real_request(
    fault: Fault,
    addr: SocketAddr,
    names: [(u16, &'static str); 2],
    n: u64,
) -> Result<String, String> {
    match fault {
        Fault::PostgresKilled => pg_request_named(addr, &names).await,
        _ => redis_request(addr, n).await,
    }
}

/// Like [`run_case`], with real servers and real clients: a `redis` crate or
/// `tokio-postgres` client a connection, one request each.
async fn run_real_case(
    case: Case,
    haproxy: Option<&Haproxy>,
    dir: &Path,
    real: &RealServers,
) -> Result<RunResult> {
    let fault = case.fault;
    let mut primary = RealServer::start(fault, real, "primary").await?;
    let backup = RealServer::start(fault, real, "backup").await?;
    if let RealServer::Postgres(primary) = &primary {
        // WAL after the last checkpoint: the restart replays it, as a busy server does.
        pg_execute(primary.addr, WAL_FILLER).await?;
    }
    let names = [
        (primary.addr().port(), "primary"),
        (backup.addr().port(), "backup"),
    ];
    let proxy = start_proxy(
        case.proxy,
        haproxy,
        dir,
        (primary.addr(), backup.addr()),
        check_for(fault),
    )
    .await?;
    let addr = proxy.addr();
    let client = move |n| real_request(fault, addr, names, n);
    let deadline = Instant::now() + READY_LIMIT;
    while client(0).await.as_deref() != Ok("primary") {
        if Instant::now() >= deadline {
            return Err(
                format!("the proxy did not serve from the primary within {READY_LIMIT:?}").into(),
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
    sleep(SETTLE).await;

    let every = real_client_every(fault);
    let stop = CancellationToken::new();
    let stream = RealStream {
        every,
        limit: LEAD_IN + WINDOW * 2,
        client_timeout: CLIENT_TIMEOUT,
        stop: Stop::On(stop.clone()),
    };
    let stream = tokio::spawn(stream.run(client));
    sleep(LEAD_IN + check_phase()).await;
    let injection = Injection::now(&proxy);
    let command_line = match &mut primary {
        RealServer::Redis(redis) if fault == Fault::RedisFrozen => {
            signal(&redis.child, libc::SIGSTOP);
            None
        }
        RealServer::Redis(redis) => {
            let _ = redis.child.kill();
            let _ = redis.child.wait();
            None
        }
        RealServer::Postgres(postgres) => Some(crash(postgres)),
    };
    sleep_until(injection.at + WINDOW).await;
    stop.cancel();
    let timeline = stream
        .await
        .map_err(|e| format!("client stream task failed: {e}"))?;
    let mut result = injection.measure(&proxy, &timeline).await;

    let events_before_restart = proxy.last_event_id();
    sleep(check_phase()).await;
    match &mut primary {
        RealServer::Redis(redis) if fault == Fault::RedisFrozen => {
            signal(&redis.child, libc::SIGCONT);
        }
        RealServer::Redis(redis) => {
            let program = real
                .redis
                .as_deref()
                .ok_or("redis-server is not installed")?;
            *redis = start_named_redis(program, &real.dir, redis.addr.port(), "primary").await?;
        }
        RealServer::Postgres(postgres) => {
            let tools = &real
                .postgres
                .as_ref()
                .ok_or("PostgreSQL is not installed")?
                .tools;
            restart_after_crash(postgres, tools, command_line.as_deref().unwrap_or_default());
        }
    }
    let restarted = Instant::now();
    let failback = RealStream {
        every,
        limit: FAILBACK_LIMIT,
        client_timeout: CLIENT_TIMEOUT,
        stop: Stop::ServedBy("primary".to_string()),
    }
    .run(client)
    .await;
    measure_failback(&mut result, &failback, restarted);
    if result.failback.is_none() {
        result.note = no_failback_note(&proxy, events_before_restart);
    }
    drop(proxy);
    Ok(result)
}

fn real_client_every(fault: Fault) -> Duration {
    match fault {
        Fault::PostgresKilled => POSTGRES_CLIENT_EVERY,
        _ => CLIENT_EVERY,
    }
}

/// The moment a fault was injected, and what watches for its detection.
struct Injection {
    at: Instant,
    at_unix_ms: u64,
    events_before: u64,
    watch_stats: Option<tokio::task::JoinHandle<Option<Instant>>>,
}

impl Injection {
    /// Call right before injecting.
    fn now(proxy: &RunningProxy) -> Self {
        let events_before = proxy.last_event_id();
        let at = Instant::now();
        Self {
            at,
            at_unix_ms: unix_ms(),
            events_before,
            watch_stats: proxy
                .stats_socket()
                .map(|socket| tokio::spawn(poll_until_down(socket.to_path_buf(), at + WINDOW))),
        }
    }

    /// Detection, and the clients of the window after the injection.
    async fn measure(self, proxy: &RunningProxy, timeline: &RealTimeline) -> RunResult {
        let mut result = RunResult::default();
        match proxy {
            RunningProxy::Switchyard(switchyard) => {
                if let Some(event) = switchyard
                    .proxy
                    .events
                    .since(self.events_before)
                    .into_iter()
                    .find(|e| {
                        e.upstream.as_deref() == Some("primary")
                            && (e.new == "down" || e.new == "ejected")
                    })
                {
                    result.detection = Some(Duration::from_millis(
                        event.at_unix_ms.saturating_sub(self.at_unix_ms),
                    ));
                    result.detected_by = Some(format!("{}: {}", event.new, event.reason));
                }
            }
            RunningProxy::Haproxy(haproxy) => {
                if let Some(task) = self.watch_stats
                    && let Ok(Some(down_at)) = task.await
                {
                    result.detection = Some(down_at.saturating_duration_since(self.at));
                    result.detected_by = haproxy.down_reason();
                }
            }
        }
        let records = &timeline.records;
        // Offsets from the stream's start, as the records count.
        let injected_at = timeline.offset(self.at);
        let window_end = injected_at + WINDOW;
        let in_window: Vec<&RealRecord> = records
            .iter()
            .filter(|r| r.started >= injected_at && r.started < window_end)
            .collect();
        result.failed_before = failures(records.iter().filter(|r| r.finished() < injected_at));
        // Clients in flight at the injection count too: the fault hit them.
        result.failed_why = failures(
            records
                .iter()
                .filter(|r| r.finished() >= injected_at && r.started < window_end),
        );
        result.failed = result.failed_why.iter().map(|(_, n)| n).sum();
        result.failed_new = in_window.iter().filter(|r| r.served_by.is_err()).count();
        result.switch = in_window
            .iter()
            .filter(|r| r.is_served_by("backup"))
            .map(|r| r.finished().saturating_sub(injected_at))
            .min();
        let mut latencies: Vec<Duration> = in_window
            .iter()
            .filter(|r| r.served_by.is_ok())
            .map(|r| r.latency)
            .collect();
        latencies.sort();
        result.served = latencies.len();
        result.p50 = percentile(&latencies, 0.50);
        result.p99 = percentile(&latencies, 0.99);
        result.max = latencies.last().copied();
        result
    }
}

/// The failback: restart → the first client the primary served, and the failures.
fn measure_failback(result: &mut RunResult, failback: &RealTimeline, restarted: Instant) {
    result.failback = failback
        .records
        .iter()
        .filter(|r| r.is_served_by("primary"))
        .map(|r| (failback.start + r.finished()).saturating_duration_since(restarted))
        .min();
    result.failback_why = failures(failback.records.iter());
    result.failback_failed = result.failback_why.iter().map(|(_, n)| n).sum();
}

/// Why switchyard did not fail back: its events after the restart.
fn no_failback_note(proxy: &RunningProxy, events_before_restart: u64) -> Option<String> {
    let RunningProxy::Switchyard(switchyard) = proxy else {
        return None;
    };
    let events: Vec<String> = switchyard
        .proxy
        .events
        .since(events_before_restart)
        .iter()
        .map(|e| {
            format!(
                "{} {}: {} -> {} ({})",
                e.at_unix_ms,
                e.upstream.as_deref().unwrap_or("tier"),
                e.old,
                e.new,
                e.reason
            )
        })
        .collect();
    let failures_in_a_row = switchyard
        .proxy
        .snapshot
        .load()
        .pool("p")
        .and_then(|route| {
            route
                .upstreams
                .iter()
                .find(|u| u.label() == "primary")
                .map(|u| u.stats.connect_failures_in_a_row.load(SeqCst))
        });
    Some(format!(
        "no failback; the primary's connect failures in a row: {}; switchyard's events \
         after the restart: [{}]",
        failures_in_a_row.map_or_else(|| "?".to_string(), |n| n.to_string()),
        events.join("; ")
    ))
}

/// The greeting clients' records in the real clients' terms.
fn from_drill(timeline: &Timeline) -> RealTimeline {
    Timeline {
        start: timeline.start,
        records: timeline
            .records
            .iter()
            .map(|r| RealRecord {
                started: r.started,
                latency: r.latency,
                served_by: r.served_by.clone().map_err(|why| why.label().to_string()),
            })
            .collect(),
    }
}

/// The bench's stream of clients through `addr`, for at most `limit`.
fn client_stream(addr: SocketAddr, limit: Duration, speaks_first: bool) -> ClientStream {
    ClientStream {
        addr,
        every: CLIENT_EVERY,
        limit,
        client_timeout: CLIENT_TIMEOUT,
        probe: Probe::Greeting { speaks_first },
    }
}

/// How many of `records` failed, by why.
fn failures<'a>(records: impl Iterator<Item = &'a RealRecord>) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for record in records {
        if let Err(why) = &record.served_by {
            *counts.entry(why.clone()).or_insert(0) += 1;
        }
    }
    counts.into_iter().collect()
}

fn describe_failures(failures: &[(String, usize)]) -> String {
    failures
        .iter()
        .map(|(why, n)| format!("{n} {why}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits until a client through `addr` is greeted by `who`.
async fn wait_served_by(addr: SocketAddr, speaks_first: bool, who: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if ask_greeting(addr, CLIENT_TIMEOUT, speaks_first)
            .await
            .as_deref()
            == Ok(who)
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {READY_LIMIT:?} waiting until {what}").into());
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Polls HAProxy's stats until the primary is down; returns when that was seen.
async fn poll_until_down(socket: PathBuf, deadline: Instant) -> Option<Instant> {
    let mut tick = tokio::time::interval(STATS_POLL_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while Instant::now() < deadline {
        tick.tick().await;
        if let Ok(Ok(stats)) = timeout(STATS_QUERY_LIMIT, show_stat(&socket)).await
            && server_status(&stats, "primary").is_some_and(|s| s.starts_with("DOWN"))
        {
            return Some(Instant::now());
        }
    }
    None
}

/// A random delay within one check interval.
fn check_phase() -> Duration {
    Duration::from_micros(fastrand::u64(0..CHECK_INTERVAL_MS * 1000))
}

fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// === configs ===

/// `pool_extra` lines go into `[pools.p]`.
fn switchyard_config(primary: &str, backup: &str, pool_extra: &str, check: &Check) -> String {
    let (check_lines, check_timeout_ms) = (check.switchyard, check.timeout_ms);
    format!(
        r#"[listeners.front]
bind = "127.0.0.1:0"
pool = "p"

[pools.p]
connect_timeout = "{CONNECT_TIMEOUT_MS}ms"
connect_attempts = {CONNECT_ATTEMPTS}
{pool_extra}failback = "immediate"
on_upstream_down = "close"
upstreams = [
  {{ name = "primary", address = "{primary}", priority = 0 }},
  {{ name = "backup", address = "{backup}", priority = 1 }},
]

[pools.p.health]
interval = "{CHECK_INTERVAL_MS}ms"
fast_interval = "{CHECK_FAST_INTERVAL_MS}ms"
timeout = "{check_timeout_ms}ms"
rise = {RISE}
fall = {FALL}
{check_lines}
[pools.p.outlier]
consecutive_failures = {CONSECUTIVE_FAILURES}
"#
    )
}

/// `option redispatch 1` lets every retry go to another server (the default, -1, only
/// the last one): the closest to switchyard's "each attempt on a different upstream".
/// `observe layer4 ... on-error mark-down` is HAProxy's passive check, the counterpart
/// of `outlier.consecutive_failures`.
fn haproxy_config(
    bind: &str,
    primary: &str,
    backup: &str,
    stats_socket: &str,
    check: &Check,
) -> String {
    let retries = CONNECT_ATTEMPTS - 1;
    let (check_lines, check_timeout_ms) = (check.haproxy, check.timeout_ms);
    format!(
        r#"global
    stats socket {stats_socket} mode 600 level admin

defaults
    mode tcp
    timeout connect {CONNECT_TIMEOUT_MS}ms
    timeout client 30s
    timeout server 30s
    retries {retries}
    option redispatch 1

listen front
    bind {bind}
{check_lines}    timeout check {check_timeout_ms}ms
    default-server inter {CHECK_INTERVAL_MS}ms fastinter {CHECK_FAST_INTERVAL_MS}ms downinter {CHECK_INTERVAL_MS}ms rise {RISE} fall {FALL} on-marked-down shutdown-sessions observe layer4 error-limit {CONSECUTIVE_FAILURES} on-error mark-down
    server primary {primary} check
    server backup {backup} check backup
"#
    )
}

fn print_settings(haproxy: Option<&Haproxy>) {
    println!("settings");
    println!(
        "  clients: a new connection every {} ms from {} s before the injection to {} s after; \
         no greeting within {} s = failed",
        CLIENT_EVERY.as_millis(),
        LEAD_IN.as_secs(),
        WINDOW.as_secs(),
        CLIENT_TIMEOUT.as_secs()
    );
    println!(
        "  active checks: every {CHECK_INTERVAL_MS} ms ({CHECK_FAST_INTERVAL_MS} ms while rising \
         or falling), timeout {CHECK_TIMEOUT_MS} ms, rise {RISE}, fall {FALL}, send \"PING\\r\\n\", \
         expect \"hello\""
    );
    println!(
        "  connects: timeout {CONNECT_TIMEOUT_MS} ms, {CONNECT_ATTEMPTS} attempts (HAProxy: \
         retries {}, option redispatch 1)",
        CONNECT_ATTEMPTS - 1
    );
    println!(
        "  passive: {CONSECUTIVE_FAILURES} failed connects in a row take the upstream out \
         (switchyard: outlier.consecutive_failures; HAProxy: observe layer4 error-limit \
         {CONSECUTIVE_FAILURES} on-error mark-down)"
    );
    println!(
        "  failback immediate; connections of a down upstream closed (on_upstream_down = \
         \"close\" / on-marked-down shutdown-sessions)"
    );
    println!(
        "  real servers (redis-server, PostgreSQL {{kill + restart}}): each client a `redis` \
         crate client (SET, GET it back, GET whoami: one round trip; CLIENT SETINFO off) every \
         {} ms, or a tokio-postgres client (login as postgres, SELECT 1 and the port) every {} \
         ms; no answer within {} s or an error = failed. Checks: switchyard kind = \"redis\" / \
         kind = \"postgres\" (login), HAProxy option redis-check / option pgsql-check user \
         postgres; PostgreSQL check timeout {POSTGRES_CHECK_TIMEOUT_MS} ms. switchyard with \
         first_byte_timeout = \"{FIRST_BYTE_TIMEOUT_MS}ms\" and replay_unanswered = \
         \"{REPLAY_KIB}KiB\". PostgreSQL's failback includes its crash recovery.",
        CLIENT_EVERY.as_millis(),
        POSTGRES_CLIENT_EVERY.as_millis(),
        CLIENT_TIMEOUT.as_secs()
    );
    println!(
        "  \"switchyard hedged\": the same with hedge_after = \"{HEDGE_AFTER_MS}ms\" (HAProxy has \
         no hedged connects)"
    );
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    println!(
        "  switchyard runs in this process on a tokio runtime of its own ({workers} worker \
         threads, one per CPU like HAProxy's default nbthread); clients and upstreams on \
         another ({workers})"
    );
    println!();
    println!("switchyard config:");
    for line in switchyard_config("<primary>", "<backup>", "", &GREETING_CHECK).lines() {
        println!("    {line}");
    }
    if let Some(haproxy) = haproxy {
        println!("HAProxy {} config:", haproxy.version);
        for line in haproxy_config(
            "127.0.0.1:<port>",
            "<primary>",
            "<backup>",
            "<dir>/admin.sock",
            &GREETING_CHECK,
        )
        .lines()
        {
            println!("    {line}");
        }
    }
    println!();
}

// === report ===

fn fault_label(fault: Fault) -> &'static str {
    match fault {
        Fault::Killed => "killed primary",
        Fault::Hung => "hung primary",
        Fault::HungClientFirst => "hung primary, client speaks first",
        Fault::BlackHoled => "black-holed primary",
        Fault::RedisFrozen => "Redis primary SIGSTOPped",
        Fault::RedisKilled => "Redis primary SIGKILLed",
        Fault::PostgresKilled => "PostgreSQL primary SIGKILLed + restarted",
    }
}

fn proxy_label(proxy: ProxyKind, haproxy: Option<&Haproxy>) -> String {
    match proxy {
        ProxyKind::Switchyard => "switchyard".to_string(),
        ProxyKind::SwitchyardHedged => format!("switchyard hedged {HEDGE_AFTER_MS}ms"),
        ProxyKind::SwitchyardReplay => format!(
            "switchyard first_byte_timeout {FIRST_BYTE_TIMEOUT_MS}ms + replay {REPLAY_KIB}KiB"
        ),
        ProxyKind::Haproxy => match haproxy {
            Some(h) => format!("HAProxy {}", h.version),
            None => "HAProxy".to_string(),
        },
    }
}

fn case_name(case: Case, haproxy: Option<&Haproxy>) -> String {
    format!(
        "{} / {}",
        fault_label(case.fault),
        proxy_label(case.proxy, haproxy)
    )
}

/// One line for one run.
fn describe(r: &RunResult) -> String {
    let mut line = format!(
        "detection {} ({}), switch {}, failed {}{}, served {}, p50/p99/max {}/{}/{} ms, \
         failback {} ({} failed)",
        opt_ms(r.detection),
        r.detected_by.as_deref().unwrap_or("no down event"),
        opt_ms(r.switch),
        r.failed,
        if r.failed > 0 {
            format!(
                " ({}; {} started after the injection)",
                describe_failures(&r.failed_why),
                r.failed_new
            )
        } else {
            String::new()
        },
        r.served,
        opt_ms(r.p50),
        opt_ms(r.p99),
        opt_ms(r.max),
        opt_ms(r.failback),
        r.failback_failed,
    );
    if r.failback_failed > 0 {
        line.push_str(&format!(
            "; failed during the failback: {}",
            describe_failures(&r.failback_why)
        ));
    }
    if let Some(note) = &r.note {
        line.push_str(&format!("; {note}"));
    }
    if !r.failed_before.is_empty() {
        line.push_str(&format!(
            "; WARNING: clients failed before the injection: {}",
            describe_failures(&r.failed_before)
        ));
    }
    line
}

fn print_table(
    results: &[(Case, Vec<RunResult>, Vec<String>)],
    haproxy: Option<&Haproxy>,
    rounds: usize,
) {
    println!(
        "failover: median of {rounds} round(s); failed = most in one round; times in ms; \
         window = injection to +{} s",
        WINDOW.as_secs()
    );
    let header = [
        "scenario",
        "proxy",
        "runs",
        "detection",
        "switch",
        "failed",
        "p50",
        "p99",
        "max",
        "failback",
        "fb failed",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for (case, runs, errors) in results {
        let med = |f: fn(&RunResult) -> Option<Duration>| opt_ms(median(runs.iter().filter_map(f)));
        let failback = if runs.iter().any(|r| r.failback.is_none()) {
            format!(">{}", FAILBACK_LIMIT.as_millis())
        } else {
            med(|r| r.failback)
        };
        rows.push(vec![
            fault_label(case.fault).to_string(),
            proxy_label(case.proxy, haproxy),
            format!("{}/{}", runs.len(), runs.len() + errors.len()),
            med(|r| r.detection),
            med(|r| r.switch),
            max_count(runs.iter().map(|r| r.failed)),
            med(|r| r.p50),
            med(|r| r.p99),
            med(|r| r.max),
            failback,
            max_count(runs.iter().map(|r| r.failback_failed)),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c < 2 {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            } else {
                line.push_str(&format!("{cell:>w$}  ", w = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
    for (case, _, errors) in results {
        for e in errors {
            println!(
                "error: {} / {}: {e}",
                fault_label(case.fault),
                proxy_label(case.proxy, haproxy)
            );
        }
    }
}

fn median(values: impl Iterator<Item = Duration>) -> Option<Duration> {
    let mut values: Vec<Duration> = values.collect();
    values.sort();
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2),
    }
}

fn max_count(values: impl Iterator<Item = usize>) -> String {
    values
        .max()
        .map_or_else(|| "-".to_string(), |n| n.to_string())
}

fn opt_ms(d: Option<Duration>) -> String {
    let Some(d) = d else {
        return "-".to_string();
    };
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

// === HAProxy ===

/// The HAProxy binary; `None` (with what is missing and how to install it printed) when
/// it is unavailable. A bench installs nothing on its own.
async fn haproxy() -> Option<Haproxy> {
    let Some(binary) = find_haproxy() else {
        println!(
            "haproxy: not found on PATH, in /usr/sbin or /usr/local/sbin; to compare with \
             it, install it (Debian or Ubuntu: `apt-get install haproxy` as root) and run \
             the bench again"
        );
        return None;
    };
    let output = run_bounded(
        tokio::process::Command::new(&binary).arg("-vv"),
        HAPROXY_COMMAND_LIMIT,
    )
    .await;
    let first_line = match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        Ok(out) => {
            println!(
                "haproxy: `{} -vv` failed ({}): {}",
                binary.display(),
                out.status,
                last_lines(&String::from_utf8_lossy(&out.stderr), 3)
            );
            return None;
        }
        Err(e) => {
            println!("haproxy: cannot run `{} -vv`: {e}", binary.display());
            return None;
        }
    };
    // "HAProxy version 2.6.12-1+deb12u3 2025/10/03 - https://haproxy.org/"
    let version = first_line
        .split_whitespace()
        .nth(2)
        .map(|v| v.split('-').next().unwrap_or(v).to_string())
        .unwrap_or_else(|| "?".to_string());
    println!("haproxy: {} ({first_line})", binary.display());
    Some(Haproxy { binary, version })
}

fn find_haproxy() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
}

/// Runs `command` to completion, capturing its output; kills it (by PID, on drop) when
/// it exceeds `limit`.
async fn run_bounded(
    command: &mut tokio::process::Command,
    limit: Duration,
) -> Result<std::process::Output> {
    let child = command.stdin(Stdio::null()).kill_on_drop(true).output();
    match timeout(limit, child).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => Err(format!("cannot run {command:?}: {e}").into()),
        Err(_) => Err(format!("{command:?} did not finish within {limit:?}; killed it").into()),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

// === impl RunningProxy ===

impl RunningProxy {
    fn addr(&self) -> SocketAddr {
        match self {
            Self::Switchyard(s) => s.addr,
            Self::Haproxy(h) => h.addr,
        }
    }

    /// The newest event's id (switchyard); 0 for HAProxy.
    fn last_event_id(&self) -> u64 {
        match self {
            Self::Switchyard(s) => s.proxy.events.all().last().map_or(0, |e| e.id),
            Self::Haproxy(_) => 0,
        }
    }

    fn stats_socket(&self) -> Option<&Path> {
        match self {
            Self::Switchyard(_) => None,
            Self::Haproxy(h) => Some(&h.stats_socket),
        }
    }
}

// === impl InProcess ===

impl InProcess {
    fn start(config_text: &str) -> Result<Self> {
        let config = Config::parse(config_text, Path::new("bench.toml"))
            .map_err(|e| format!("the bench's switchyard config is invalid: {e}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("switchyard")
            .build()?;
        let (proxy, shutdown) = {
            let _context = runtime.enter();
            let listeners = switchyard::bind_all(&config)?.listeners;
            let shutdown = Shutdown::new();
            (Proxy::start(&config, listeners, &shutdown)?, shutdown)
        };
        let addr = proxy
            .listener("front")
            .and_then(|l| l.addrs.first().copied())
            .ok_or("switchyard has no address for listener \"front\"")?;
        Ok(Self {
            proxy,
            shutdown,
            addr,
            runtime: Some(runtime),
        })
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.begin();
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime would block, which an async context must not do.
            runtime.shutdown_background();
        }
    }
}

// === impl HaproxyChild ===

impl HaproxyChild {
    /// Writes the config into `dir`, validates it (`haproxy -c`), starts HAProxy in the
    /// foreground and waits until both servers are up.
    async fn start(
        binary: &Path,
        dir: &Path,
        primary: SocketAddr,
        backup: SocketAddr,
        health: &Check,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        // HAProxy needs a concrete port: take a free one from the kernel.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stats_socket = dir.join("admin.sock");
        let config_path = dir.join("haproxy.cfg");
        std::fs::write(
            &config_path,
            haproxy_config(
                &addr.to_string(),
                &primary.to_string(),
                &backup.to_string(),
                &stats_socket.display().to_string(),
                health,
            ),
        )?;
        let check = run_bounded(
            tokio::process::Command::new(binary)
                .arg("-c")
                .arg("-f")
                .arg(&config_path),
            HAPROXY_COMMAND_LIMIT,
        )
        .await?;
        if !check.status.success() {
            return Err(format!(
                "`haproxy -c` rejects the config ({}): {} {}",
                check.status,
                String::from_utf8_lossy(&check.stdout).trim(),
                String::from_utf8_lossy(&check.stderr).trim()
            )
            .into());
        }
        let log = dir.join("haproxy.log");
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(binary)
            .arg("-f")
            .arg(&config_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut haproxy = Self {
            child,
            addr,
            stats_socket,
            log,
        };
        haproxy.wait_ready().await?;
        Ok(haproxy)
    }

    /// Both servers `UP` in `show stat`.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("haproxy exited ({status}): {}", self.log_tail()).into());
            }
            if let Ok(Ok(stats)) = timeout(STATS_QUERY_LIMIT, show_stat(&self.stats_socket)).await
                && server_status(&stats, "primary").as_deref() == Some("UP")
                && server_status(&stats, "backup").as_deref() == Some("UP")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "haproxy's servers not both UP after {READY_LIMIT:?}: {}",
                    self.log_tail()
                )
                .into());
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// The reason of the last "primary is DOWN" warning in HAProxy's log.
    fn down_reason(&self) -> Option<String> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        let line = log.lines().rev().find(|l| l.contains("/primary is DOWN"))?;
        let reason = line.split("reason: ").nth(1)?;
        Some(format!(
            "DOWN: {}",
            reason.split(", info").next().unwrap_or(reason)
        ))
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log)
            .map(|log| last_lines(&log, 5))
            .unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

impl Drop for HaproxyChild {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `show stat` over HAProxy's stats socket: its CSV text.
async fn show_stat(socket: &Path) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(socket).await?;
    stream.write_all(b"show stat\n").await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

/// The `status` column of server `name` of proxy `front` in `show stat` output.
fn server_status(csv: &str, name: &str) -> Option<String> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
    let column = |key: &str| header.iter().position(|h| *h == key);
    let (proxy, server, status) = (column("pxname")?, column("svname")?, column("status")?);
    lines
        .map(|l| l.split(',').collect::<Vec<&str>>())
        .find(|f| f.get(proxy) == Some(&"front") && f.get(server) == Some(&name))
        .and_then(|f| f.get(status).map(|s| s.to_string()))
}

// === impl TempDir ===

impl TempDir {
    fn new() -> Result<Self> {
        let path =
            std::env::temp_dir().join(format!("switchyard-failover-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
