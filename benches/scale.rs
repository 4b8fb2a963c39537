//! switchyard at scale: what many idle connections, many checked upstreams, a large
//! reload and many pools cost, each as a growth curve or a ratio, measured on the release
//! binary as a child process (the one `cargo bench` builds, started as the tests start
//! it) beside HAProxy where HAProxy has the same feature.
//!
//! ```text
//! cargo bench --bench scale                      # full run, about 5 minutes
//! SCALE_QUICK=1 cargo bench --bench scale        # smoke run, about a minute
//! SCALE_ONLY=idle,reload cargo bench --bench scale
//! ```
//!
//! The figures, each from fresh processes:
//!
//! - idle connections: the proxy's RSS (`VmRSS` of /proc/PID/status) before and after
//!   opening N client connections through it to a loopback echo upstream, each idle
//!   after a 1-byte echo (as benches/compare.sh measures it), divided by N; at 1k, 5k and
//!   9k connections, and the total RSS at the largest N. The same with HAProxy (same
//!   settings as compare.sh: 2 threads, no checks, long timeouts, backlog 4096) for the
//!   ratio. User-space memory only: the kernel's socket buffers are not in RSS.
//! - health checks: 0, 100 and 1,000 pools of one upstream each, every upstream checked
//!   every second with the send/expect check of benches/failover.rs (a line sent, the
//!   greeting expected), and 1,000 with a plain TCP connect check (switchyard's
//!   default); the upstreams are loopback listeners in this process that count the
//!   checks. The proxy's CPU time (utime+stime of /proc/PID/stat) over a window that
//!   starts once every upstream has been checked, as a share of one core, and the
//!   checks per second the upstreams saw. HAProxy with 1,000 backends of one server
//!   each, the same check (`tcp-check`), `inter 1s`, for the ratio (its plain connect
//!   check resets the connection before the upstream accepts it: it cannot be counted).
//! - reload: a SIGHUP that adds 100 or 1,000 such pools to a proxy serving one pool,
//!   and 1,000 unchecked ones (what the new upstreams' first checks cost). The time
//!   from the signal to the swap is the bench's clock at `kill(2)` to the timestamp of
//!   the proxy's `configuration reloaded` log line (JSON logs), which it writes once
//!   routing has swapped (after the first checks of the new upstreams). Meanwhile a new
//!   client connects through the existing pool every 2 ms and reads the upstream's
//!   greeting, from 1 s before the signal to 1 s after the swap, and 50 connections
//!   opened before the signal must still echo after it: every failure is counted.
//! - failover: benches/failover.rs's "killed" scenario (the primary's listener and
//!   connections close) and its "hung" one (the primary accepts and never answers, so
//!   only the active check's timeout tells), with its check and outlier settings, its
//!   greeting upstreams and client stream (the library's `drill` module), with 1 pool
//!   and with 1,000 more pools, each with its own upstream checked every second.
//!   Detection is the injection to the primary's `down`/`ejected` event (`GET
//!   /events`, whole milliseconds); switch is the injection to the first client started
//!   after it that the backup greeted. The sizes alternate within each round; medians
//!   of the rounds, and the difference between the sizes.
//!
//! Prints Markdown tables and writes them to benches/results/scale.md, and every
//! round's values to benches/results/scale.json. The machine's load average at the start
//! and end is part of both: timings taken while other work runs are noisy, ratios less.
//!
//! Settings (environment): `SCALE_QUICK=1` (fewer and smaller steps, 5 s CPU windows,
//! one round), `SCALE_ROUNDS` (reload and failover rounds, default 5),
//! `SCALE_ONLY` (a comma-separated subset of `idle,checks,reload,failover`). HAProxy is
//! looked up on PATH and in /usr/sbin; without it the HAProxy cells are "-" (install
//! it with `apt-get install haproxy`; the bench installs nothing).
//!
//! Descriptors: the bench raises its soft RLIMIT_NOFILE to the hard limit, and the
//! proxies inherit it. N idle connections take 2N descriptors in the proxy (client and
//! upstream side) and 2N in this process (clients and the echo upstream), so the largest
//! N is cut to what the hard limit allows, and said so. Everything listens on 127.0.0.1;
//! every child is stopped by its PID; every wait has a deadline.

use std::error::Error;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use switchyard::drill::upstream::GreetingUpstream;
use switchyard::drill::{ClientStream, Probe, Stop, Timeline, ask_greeting};

// The tests' launcher of the binary and their loopback servers, not a copy of them.
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "shared/failover_settings.rs"]
mod failover_settings;
use failover_settings::*;

use common::{ChildProxy, Server, closed_port, get_json};

type BoxError = Box<dyn Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

// Idle connections.
const IDLE_COUNTS: [usize; 3] = [1_000, 5_000, 9_000];
const QUICK_IDLE_COUNTS: [usize; 2] = [200, 1_000];
/// Clients that open the idle connections side by side.
const OPENERS: usize = 16;
const OPEN_ONE_LIMIT: Duration = Duration::from_secs(10);
const OPEN_ALL_LIMIT: Duration = Duration::from_secs(180);
/// Descriptors besides the connections, in each process.
const SPARE_FDS: u64 = 1_200;
/// Lets a fresh process finish starting, and the last connections their bookkeeping.
const SETTLE: Duration = Duration::from_millis(500);

// Health checks.
const CHECK_COUNTS: [usize; 3] = [0, 100, 1_000];
const QUICK_CHECK_COUNTS: [usize; 2] = [0, 1_000];
/// The most upstreams any part checks: the check targets are opened once.
const MOST_TARGETS: usize = 1_000;
const CHECK_WINDOW: Duration = Duration::from_secs(20);
const QUICK_CHECK_WINDOW: Duration = Duration::from_secs(5);
const FIRST_CHECKS_LIMIT: Duration = Duration::from_secs(30);

// Reload.
/// Pools added, and whether their upstreams are checked (their first checks run before
/// the swap): the unchecked case tells what the checks cost.
const RELOAD_CASES: [(usize, bool); 3] = [(100, true), (1_000, true), (1_000, false)];
const QUICK_RELOAD_CASES: [(usize, bool); 1] = [(1_000, true)];
const HELD_ACROSS_RELOAD: usize = 50;
const RELOAD_LIMIT: Duration = Duration::from_secs(30);
const LOG_POLL_EVERY: Duration = Duration::from_millis(5);

// Failover: benches/failover.rs's check, connect and client-stream settings
// (benches/shared/failover_settings.rs), with 0 and 1,000 extra pools.
const EXTRA_POOLS: [usize; 2] = [0, 1_000];
const FAULTS: [Fault; 2] = [Fault::Killed, Fault::Hung];
const READY_LIMIT: Duration = Duration::from_secs(10);

const DEFAULT_ROUNDS: usize = 5;
const HAPROXY_COMMAND_LIMIT: Duration = Duration::from_secs(10);
const TEARDOWN_LIMIT: Duration = Duration::from_secs(10);

/// What this run measures, from the environment.
#[derive(Debug, Clone, Serialize)]
struct Settings {
    quick: bool,
    rounds: usize,
    idle_counts: Vec<usize>,
    check_counts: Vec<usize>,
    check_window_s: f64,
    /// (pools added, checked).
    reload_cases: Vec<(usize, bool)>,
    extra_pools: Vec<usize>,
    faults: Vec<Fault>,
    parts: Vec<String>,
    /// The soft RLIMIT_NOFILE after raising it.
    nofile: u64,
    /// Idle counts left out for lack of descriptors.
    idle_left_out: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
struct IdleResult {
    proxy: String,
    connections: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    kib_per_connection: f64,
}

#[derive(Debug, Clone, Serialize)]
struct ChecksResult {
    proxy: String,
    upstreams: usize,
    check: String,
    window_s: f64,
    /// CPU seconds per second: 0.05 is 5 % of one core.
    cpu_share: f64,
    checks_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
struct ReloadRound {
    pools_added: usize,
    /// The new upstreams' check.
    check: String,
    /// The bench's kill(2) → the `configuration reloaded` log line.
    signal_to_swap_ms: f64,
    /// The proxy's own `SIGHUP received` line → its `configuration reloaded` line.
    logged_ms: f64,
    /// The parts of the reload, as that line gives them: reading the file, the new
    /// upstreams' first checks, the controller's swap.
    read_ms: f64,
    first_checks_ms: f64,
    swap_ms: f64,
    clients: usize,
    failed: usize,
    /// Why they failed: (why, how many).
    failed_why: Vec<(String, usize)>,
    held: usize,
    held_broken: usize,
}

#[derive(Debug, Clone, Serialize)]
struct FailoverRound {
    fault: String,
    pools: usize,
    detection_ms: Option<f64>,
    detected_by: Option<String>,
    switch_ms: Option<f64>,
    failed: usize,
    clients: usize,
}

#[derive(Debug, Default, Serialize)]
struct Results {
    idle: Vec<IdleResult>,
    checks: Vec<ChecksResult>,
    reload: Vec<ReloadRound>,
    failover: Vec<FailoverRound>,
    errors: Vec<String>,
}

/// The HAProxy to compare with.
#[derive(Debug, Clone)]
struct Haproxy {
    binary: PathBuf,
    version: String,
}

/// An HAProxy child process, killed by its PID on drop, with its folder.
struct HaproxyChild {
    child: Child,
    /// Dropped after `drop` has killed the child.
    dir: common::TestDir,
}

/// How the primary fails in the failover part (benches/failover.rs's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Fault {
    /// Its listener and connections close: connects are refused.
    Killed,
    /// It accepts and never answers: only a check's timeout tells.
    Hung,
}

/// The health check of the extra pools' upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckKind {
    /// Send a line, expect the greeting: benches/failover.rs's check, which both proxies
    /// run alike. The upstreams see every such check, so they count them.
    Greeting,
    /// A TCP connect, switchyard's default. (HAProxy's own connect check resets the
    /// connection before the upstream accepts it, so the upstreams could not count it.)
    Connect,
    /// No checks.
    Off,
}

/// Loopback listeners that health checks connect to: each greets (`hello t`), holds a
/// connection until the checker closes it, and counts its connections.
struct CheckTargets {
    addrs: Vec<SocketAddr>,
    accepted: Arc<[AtomicU64]>,
    _servers: Vec<Server>,
}

fn main() {
    let started = std::time::Instant::now();
    let nofile = match raise_nofile() {
        Ok(nofile) => nofile,
        Err(e) => {
            eprintln!("scale bench: cannot read or raise RLIMIT_NOFILE: {e}");
            std::process::exit(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("scale bench: cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        tokio::spawn(run(nofile, started))
            .await
            .unwrap_or_else(|e| Err(format!("the bench task failed: {e}").into()))
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Err(e) = result {
        eprintln!("scale bench: {e}");
        std::process::exit(1);
    }
}

async fn run(nofile: u64, started: std::time::Instant) -> Result<()> {
    let settings = Settings::from_env(nofile)?;
    let load_start = load_average();
    println!(
        "switchyard scale bench: {}; RLIMIT_NOFILE {nofile}; load average {load_start}",
        if settings.quick {
            "quick run"
        } else {
            "full run"
        }
    );
    for n in &settings.idle_left_out {
        println!(
            "idle connections: {n} left out: the descriptor limit {nofile} allows at most {}",
            max_idle(nofile)
        );
    }
    let haproxy = haproxy().await;
    let mut results = Results::default();
    let wants = |part: &str| settings.parts.iter().any(|p| p == part);
    if wants("idle") {
        println!("\n== idle connections");
        idle_part(&settings, haproxy.as_ref(), &mut results).await;
    }
    // Opened after the idle part, whose connections need the descriptors.
    let needs_targets = wants("checks") || wants("reload") || wants("failover");
    let targets = if needs_targets {
        Some(CheckTargets::start(MOST_TARGETS).await?)
    } else {
        None
    };
    if let Some(targets) = &targets {
        if wants("checks") {
            println!("\n== health checks, every upstream every 1 s");
            checks_part(&settings, haproxy.as_ref(), targets, &mut results).await;
        }
        if wants("reload") {
            println!("\n== a reload that adds pools");
            reload_part(&settings, targets, &mut results).await;
        }
        if wants("failover") {
            println!("\n== failover (primary killed) with 1 pool and with more");
            failover_part(&settings, targets, &mut results).await;
        }
    }
    drop(targets);

    let load_end = load_average();
    let wall = started.elapsed().as_secs_f64();
    let markdown = render(
        &settings,
        haproxy.as_ref(),
        &results,
        &load_start,
        &load_end,
        wall,
    );
    println!("\n{markdown}");
    write_results(
        &settings,
        haproxy.as_ref(),
        &results,
        &markdown,
        (&load_start, &load_end),
        wall,
    )?;
    Ok(())
}

// === settings ===

impl Settings {
    fn from_env(nofile: u64) -> Result<Self> {
        let quick = match std::env::var("SCALE_QUICK").as_deref() {
            Ok("1") => true,
            Ok("0") | Err(std::env::VarError::NotPresent) => false,
            Ok(other) => return Err(format!("SCALE_QUICK must be 1 or 0, not {other:?}").into()),
            Err(e) => return Err(format!("SCALE_QUICK: {e}").into()),
        };
        let rounds = match std::env::var("SCALE_ROUNDS") {
            Err(std::env::VarError::NotPresent) if quick => 1,
            Err(std::env::VarError::NotPresent) => DEFAULT_ROUNDS,
            Err(e) => return Err(format!("SCALE_ROUNDS: {e}").into()),
            Ok(text) => match text.trim().parse::<usize>() {
                Ok(rounds @ 1..=20) => rounds,
                _ => {
                    return Err(format!(
                        "SCALE_ROUNDS must be a whole number from 1 to 20, not {text:?}"
                    )
                    .into());
                }
            },
        };
        let all = ["idle", "checks", "reload", "failover"];
        let parts: Vec<String> = match std::env::var("SCALE_ONLY") {
            Err(std::env::VarError::NotPresent) => all.iter().map(|p| p.to_string()).collect(),
            Err(e) => return Err(format!("SCALE_ONLY: {e}").into()),
            Ok(text) => {
                let parts: Vec<String> = text
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect();
                if let Some(unknown) = parts.iter().find(|p| !all.contains(&p.as_str())) {
                    return Err(format!(
                        "SCALE_ONLY: unknown part {unknown:?}; the parts are {}",
                        all.join(", ")
                    )
                    .into());
                }
                // Set but naming nothing would run nothing and write an empty result
                // over the last one.
                if parts.is_empty() {
                    return Err(format!(
                        "SCALE_ONLY is set but names no part; name some of {}, or unset it for all",
                        all.join(", ")
                    )
                    .into());
                }
                parts
            }
        };
        let wanted_idle: Vec<usize> = if quick {
            QUICK_IDLE_COUNTS.to_vec()
        } else {
            IDLE_COUNTS.to_vec()
        };
        let (idle_counts, idle_left_out) = wanted_idle
            .into_iter()
            .partition(|&n| n as u64 <= max_idle(nofile));
        Ok(Self {
            quick,
            rounds,
            idle_counts,
            check_counts: if quick {
                QUICK_CHECK_COUNTS.to_vec()
            } else {
                CHECK_COUNTS.to_vec()
            },
            check_window_s: if quick {
                QUICK_CHECK_WINDOW
            } else {
                CHECK_WINDOW
            }
            .as_secs_f64(),
            reload_cases: if quick {
                QUICK_RELOAD_CASES.to_vec()
            } else {
                RELOAD_CASES.to_vec()
            },
            extra_pools: EXTRA_POOLS.to_vec(),
            faults: FAULTS.to_vec(),
            parts,
            nofile,
            idle_left_out,
        })
    }
}

/// The most idle connections the descriptor limit allows, in the proxy and in the bench.
fn max_idle(nofile: u64) -> u64 {
    nofile.saturating_sub(SPARE_FDS) / 2
}

// === idle connections ===

async fn idle_part(settings: &Settings, haproxy: Option<&Haproxy>, results: &mut Results) {
    let Some(&most) = settings.idle_counts.iter().max() else {
        return;
    };
    for &n in &settings.idle_counts {
        match idle_switchyard(n).await {
            Ok(result) => {
                print_idle(&result);
                results.idle.push(result);
            }
            Err(e) => results.error(format!("idle {n} / switchyard: {e}")),
        }
        if let Some(haproxy) = haproxy {
            match idle_haproxy(haproxy, n, most).await {
                Ok(result) => {
                    print_idle(&result);
                    results.idle.push(result);
                }
                Err(e) => results.error(format!("idle {n} / HAProxy: {e}")),
            }
        }
        wait_descriptors_back().await;
    }
}

fn print_idle(r: &IdleResult) {
    println!(
        "  {} {}: RSS {} -> {} KiB, {:.2} KiB per connection",
        r.proxy, r.connections, r.rss_before_kib, r.rss_after_kib, r.kib_per_connection
    );
}

async fn idle_switchyard(n: usize) -> Result<IdleResult> {
    let echo = Server::echo().await;
    let (admin, front) = (closed_port(), closed_port());
    // compare.sh's settings: 2 threads, warn logging, no checks, long timeouts.
    let toml = format!(
        r#"[runtime]
worker_threads = 2
shutdown_grace = "1s"

[log]
level = "warn"

[admin]
listen = "{admin}"

[listeners.hold]
bind = "{front}"
pool = "hold"
backlog = 4096

[pools.hold]
connect_timeout = "5s"
idle_timeout = "1h"
upstreams = [{{ address = "{echo}" }}]

[pools.hold.health]
enabled = false
"#,
        echo = echo.addr
    );
    let proxy = ChildProxy::start(&toml, admin).await;
    let result = measure_idle("switchyard", proxy.child.id(), front, n).await;
    drop(proxy);
    drop(echo);
    result
}

async fn idle_haproxy(haproxy: &Haproxy, n: usize, most: usize) -> Result<IdleResult> {
    let echo = Server::echo().await;
    let front = closed_port();
    let maxconn = most + 100;
    let config = format!(
        "global\n    nbthread 2\n    maxconn {maxconn}\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    \
         timeout server 1h\n    maxconn {maxconn}\n    backlog 4096\n\n\
         listen hold\n    bind {front}\n    server up {}\n",
        echo.addr
    );
    let child = HaproxyChild::start(haproxy, &config, front).await?;
    let result = measure_idle(&haproxy.label(), child.child.id(), front, n).await;
    drop(child);
    drop(echo);
    result
}

/// RSS of `pid` before and after `n` idle connections through `front`.
async fn measure_idle(proxy: &str, pid: u32, front: SocketAddr, n: usize) -> Result<IdleResult> {
    sleep(SETTLE).await;
    let before = rss_kib(pid)?;
    let held = open_idle(front, n).await?;
    sleep(SETTLE).await;
    let after = rss_kib(pid)?;
    drop(held);
    Ok(IdleResult {
        proxy: proxy.to_string(),
        connections: n,
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_connection: (after as f64 - before as f64) / n as f64,
    })
}

/// `n` connections through `addr`, each idle after a 1-byte echo.
async fn open_idle(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    let mut openers = JoinSet::new();
    for opener in 0..OPENERS {
        let count = n / OPENERS + usize::from(opener < n % OPENERS);
        openers.spawn(async move {
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                let stream = timeout(OPEN_ONE_LIMIT, echoed_once(addr))
                    .await
                    .map_err(|_| {
                        io::Error::other(format!("no echo within {OPEN_ONE_LIMIT:?}"))
                    })??;
                held.push(stream);
            }
            io::Result::Ok(held)
        });
    }
    let collect = async {
        let mut all = Vec::with_capacity(n);
        while let Some(done) = openers.join_next().await {
            match done {
                Ok(Ok(held)) => all.extend(held),
                Ok(Err(e)) => {
                    return Err(format!("after {} of {n} connections: {e}", all.len()));
                }
                Err(e) => return Err(format!("an opener failed: {e}")),
            }
        }
        Ok(all)
    };
    match timeout(OPEN_ALL_LIMIT, collect).await {
        Ok(Ok(all)) => Ok(all),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(format!("{n} connections not open within {OPEN_ALL_LIMIT:?}").into()),
    }
}

async fn echoed_once(addr: SocketAddr) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    if byte != *b"x" {
        return Err(io::Error::other("the echo is not the byte sent"));
    }
    Ok(stream)
}

/// Waits (bounded) until the descriptors of the last measurement are closed in this
/// process: the next one needs them.
async fn wait_descriptors_back() {
    let deadline = Instant::now() + TEARDOWN_LIMIT;
    while open_descriptors().is_some_and(|n| n > SPARE_FDS as usize) && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
}

fn open_descriptors() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
}

// === health checks ===

async fn checks_part(
    settings: &Settings,
    haproxy: Option<&Haproxy>,
    targets: &CheckTargets,
    results: &mut Results,
) {
    let window = Duration::from_secs_f64(settings.check_window_s);
    let most = settings.check_counts.iter().copied().max().unwrap_or(0);
    let mut runs: Vec<(Option<&Haproxy>, usize, CheckKind)> = settings
        .check_counts
        .iter()
        .map(|&k| (None, k, CheckKind::Greeting))
        .collect();
    if most > 0 {
        runs.push((None, most, CheckKind::Connect));
        if let Some(haproxy) = haproxy {
            runs.push((Some(haproxy), most, CheckKind::Greeting));
        }
    }
    for (haproxy, k, kind) in runs {
        let measured = match haproxy {
            None => checks_switchyard(targets, k, kind, window).await,
            Some(haproxy) => checks_haproxy(haproxy, targets, k, kind, window).await,
        };
        match measured {
            Ok(result) => {
                print_checks(&result);
                results.checks.push(result);
            }
            Err(e) => results.error(format!(
                "checks {k} ({}) / {}: {e}",
                kind.label(),
                haproxy.map_or_else(|| "switchyard".to_string(), Haproxy::label)
            )),
        }
    }
}

fn print_checks(r: &ChecksResult) {
    println!(
        "  {} {} upstreams, {}: {:.2} % of a core, {:.0} checks/s over {:.0} s",
        r.proxy,
        r.upstreams,
        r.check,
        r.cpu_share * 100.0,
        r.checks_per_s,
        r.window_s
    );
}

async fn checks_switchyard(
    targets: &CheckTargets,
    k: usize,
    kind: CheckKind,
    window: Duration,
) -> Result<ChecksResult> {
    let (admin, front) = (closed_port(), closed_port());
    let toml = format!(
        "{}{}",
        front_config(admin, front, ("warn", "text"), targets.addrs[0], false),
        extra_pools(&targets.addrs[..k], kind)
    );
    let proxy = ChildProxy::start(&toml, admin).await;
    measure_checks("switchyard", proxy.child.id(), targets, k, kind, window).await
}

async fn checks_haproxy(
    haproxy: &Haproxy,
    targets: &CheckTargets,
    k: usize,
    kind: CheckKind,
    window: Duration,
) -> Result<ChecksResult> {
    let front = closed_port();
    let mut config = format!(
        "global\n    nbthread 2\n\n\
         defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1h\n    \
         timeout server 1h\n    timeout check 1s\n\n\
         listen front\n    bind {front}\n    server up {}\n",
        targets.addrs[0]
    );
    for (i, addr) in targets.addrs[..k].iter().enumerate() {
        config.push_str(&format!(
            "\nbackend c{i}\n{}    server u {addr} check inter 1s fastinter 1s downinter 1s rise 2 fall 3\n",
            kind.haproxy()
        ));
    }
    let child = HaproxyChild::start(haproxy, &config, front).await?;
    measure_checks(&haproxy.label(), child.child.id(), targets, k, kind, window).await
}

/// Waits until each of the first `k` targets has been checked, then the proxy's CPU
/// time and the checks over `window`.
async fn measure_checks(
    proxy: &str,
    pid: u32,
    targets: &CheckTargets,
    k: usize,
    kind: CheckKind,
    window: Duration,
) -> Result<ChecksResult> {
    let start_counts = targets.counts();
    let deadline = Instant::now() + FIRST_CHECKS_LIMIT;
    loop {
        let now = targets.counts();
        let unchecked = (0..k).filter(|&i| now[i] <= start_counts[i]).count();
        if unchecked == 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{unchecked} of {k} upstreams not checked within {FIRST_CHECKS_LIMIT:?}"
            )
            .into());
        }
        sleep(Duration::from_millis(20)).await;
    }
    // Past the burst of first checks at start-up, into the steady schedule.
    sleep(Duration::from_secs(1) + SETTLE).await;
    let hz = clock_ticks_per_second();
    let (cpu_before, checks_before, at) = (cpu_ticks(pid)?, targets.total(k), Instant::now());
    sleep(window).await;
    let (cpu_after, checks_after, elapsed) = (cpu_ticks(pid)?, targets.total(k), at.elapsed());
    let seconds = elapsed.as_secs_f64();
    Ok(ChecksResult {
        proxy: proxy.to_string(),
        upstreams: k,
        check: kind.label().to_string(),
        window_s: seconds,
        cpu_share: (cpu_after - cpu_before) as f64 / hz as f64 / seconds,
        checks_per_s: (checks_after - checks_before) as f64 / seconds,
    })
}

// === reload ===

async fn reload_part(settings: &Settings, targets: &CheckTargets, results: &mut Results) {
    let primary = match GreetingUpstream::start("primary").await {
        Ok(primary) => primary,
        Err(e) => return results.error(format!("reload: the upstream: {e}")),
    };
    for round in 0..settings.rounds {
        for &(size, checked) in &settings.reload_cases {
            let kind = if checked {
                CheckKind::Greeting
            } else {
                CheckKind::Off
            };
            match reload_round(&primary, targets, size, kind).await {
                Ok(r) => {
                    println!(
                        "  round {} add {size} ({}): signal -> swap {:.1} ms (logged {:.1} ms: \
                         read {:.1}, first checks {:.1}, swap {:.1}), \
                         {} of {} clients failed{}, {} of {} held connections broken",
                        round + 1,
                        r.check,
                        r.signal_to_swap_ms,
                        r.logged_ms,
                        r.read_ms,
                        r.first_checks_ms,
                        r.swap_ms,
                        r.failed,
                        r.clients,
                        describe_failures(&r.failed_why),
                        r.held_broken,
                        r.held
                    );
                    results.reload.push(r);
                }
                Err(e) => results.error(format!(
                    "reload round {} add {size} ({}): {e}",
                    round + 1,
                    kind.label()
                )),
            }
        }
    }
}

async fn reload_round(
    primary: &GreetingUpstream,
    targets: &CheckTargets,
    size: usize,
    kind: CheckKind,
) -> Result<ReloadRound> {
    let (admin, front) = (closed_port(), closed_port());
    let base = front_config(admin, front, ("info", "json"), primary.addr, true);
    let proxy = ChildProxy::start(&base, admin).await;
    wait_served_by(front, "primary").await?;

    let mut held = Vec::with_capacity(HELD_ACROSS_RELOAD);
    for _ in 0..HELD_ACROSS_RELOAD {
        let mut stream = TcpStream::connect(front).await?;
        timeout(CLIENT_TIMEOUT, common::read_line(&mut stream))
            .await
            .map_err(|_| "a held connection got no greeting")??;
        held.push(stream);
    }
    let stop = CancellationToken::new();
    let stream = tokio::spawn(
        client_stream(front, LEAD_IN + RELOAD_LIMIT + LEAD_IN).run(Stop::On(stop.clone())),
    );
    sleep(LEAD_IN).await;

    std::fs::write(
        &proxy.config_path,
        format!("{base}{}", extra_pools(&targets.addrs[..size], kind)),
    )?;
    let signalled = SystemTime::now();
    proxy.signal(libc::SIGHUP);
    let lines = wait_log_line(&proxy, "configuration reloaded", "reload rejected").await;
    sleep(LEAD_IN).await;
    stop.cancel();
    let timeline = stream
        .await
        .map_err(|e| format!("the client stream failed: {e}"))?;
    let lines = lines?;

    let mut held_broken = 0;
    for stream in &mut held {
        if timeout(CLIENT_TIMEOUT, echo_byte(stream))
            .await
            .map_or(true, |r| r.is_err())
        {
            held_broken += 1;
        }
    }
    let status = get_json(admin, "/status").await;
    let pools = status["pools"].as_array().map_or(0, Vec::len);
    if pools != size + 1 {
        return Err(format!(
            "after the reload /status shows {pools} pools, not {}",
            size + 1
        )
        .into());
    }
    let reloaded = log_time(&lines, "configuration reloaded")?;
    let received = log_time(&lines, "SIGHUP received")?;
    let part = |field: &str| log_number(&lines, "configuration reloaded", field);
    let failed_why = failures(&timeline);
    Ok(ReloadRound {
        pools_added: size,
        check: kind.label().to_string(),
        signal_to_swap_ms: millis_between(signalled, reloaded),
        logged_ms: millis_between(received, reloaded),
        read_ms: part("read_ms")?,
        first_checks_ms: part("first_checks_ms")?,
        swap_ms: part("swap_ms")?,
        clients: timeline.records.len(),
        failed: failed_why.iter().map(|(_, n)| n).sum(),
        failed_why,
        held: held.len(),
        held_broken,
    })
}

async fn echo_byte(stream: &mut TcpStream) -> io::Result<()> {
    stream.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    match byte == *b"x" {
        true => Ok(()),
        false => Err(io::Error::other("not an echo")),
    }
}

/// Polls the proxy's log for a line whose message starts with `wanted` (or `failed`,
/// an error); returns every JSON line so far.
async fn wait_log_line(
    proxy: &ChildProxy,
    wanted: &str,
    failed: &str,
) -> Result<Vec<serde_json::Value>> {
    let deadline = Instant::now() + RELOAD_LIMIT;
    loop {
        let lines: Vec<serde_json::Value> = proxy
            .stderr()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if let Some(line) = lines.iter().find(|l| message(l).starts_with(failed)) {
            return Err(format!("the proxy rejected the reload: {line}").into());
        }
        if lines.iter().any(|l| message(l).starts_with(wanted)) {
            return Ok(lines);
        }
        if Instant::now() >= deadline {
            return Err(format!("no log line {wanted:?} within {RELOAD_LIMIT:?}").into());
        }
        sleep(LOG_POLL_EVERY).await;
    }
}

fn message(line: &serde_json::Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or_default()
}

/// The timestamp of the last log line whose message starts with `what`.
fn log_time(lines: &[serde_json::Value], what: &str) -> Result<SystemTime> {
    let line = lines
        .iter()
        .rev()
        .find(|l| message(l).starts_with(what))
        .ok_or_else(|| format!("no log line {what:?}"))?;
    let stamp = line["timestamp"]
        .as_str()
        .ok_or_else(|| format!("log line {what:?} has no timestamp: {line}"))?;
    humantime::parse_rfc3339(stamp)
        .map_err(|e| format!("log line {what:?}: timestamp {stamp:?}: {e}").into())
}

/// The number `field` of the last log line starting with `what`.
fn log_number(lines: &[serde_json::Value], what: &str, field: &str) -> Result<f64> {
    lines
        .iter()
        .rev()
        .find(|l| message(l).starts_with(what))
        .and_then(|l| l["fields"][field].as_f64().or_else(|| l[field].as_f64()))
        .ok_or_else(|| format!("no number {field:?} in log line {what:?}").into())
}

fn millis_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

// === failover ===

async fn failover_part(settings: &Settings, targets: &CheckTargets, results: &mut Results) {
    for round in 0..settings.rounds {
        let cases: Vec<(Fault, usize)> = settings
            .faults
            .iter()
            .flat_map(|&f| settings.extra_pools.iter().map(move |&e| (f, e)))
            .collect();
        for (fault, extra) in cases {
            match failover_round(targets, extra, fault).await {
                Ok(r) => {
                    println!(
                        "  round {} {} {} pool(s): detection {} ({}), switch {}, failed {} of {}",
                        round + 1,
                        r.fault,
                        r.pools,
                        opt_ms(r.detection_ms),
                        r.detected_by.as_deref().unwrap_or("no down event"),
                        opt_ms(r.switch_ms),
                        r.failed,
                        r.clients
                    );
                    results.failover.push(r);
                }
                Err(e) => results.error(format!(
                    "failover round {} {} with {} pools: {e}",
                    round + 1,
                    fault.label(),
                    extra + 1
                )),
            }
        }
    }
}

async fn failover_round(
    targets: &CheckTargets,
    extra: usize,
    fault: Fault,
) -> Result<FailoverRound> {
    let mut primary = GreetingUpstream::start_with_backlog("primary", UPSTREAM_BACKLOG).await?;
    let backup = GreetingUpstream::start_with_backlog("backup", UPSTREAM_BACKLOG).await?;
    let (admin, front) = (closed_port(), closed_port());
    let toml = format!(
        "{}{}",
        failover_config(admin, front, primary.addr, backup.addr),
        extra_pools(&targets.addrs[..extra], CheckKind::Greeting)
    );
    let start_counts = targets.counts();
    let proxy = ChildProxy::start(&toml, admin).await;
    wait_served_by(front, "primary").await?;
    let deadline = Instant::now() + FIRST_CHECKS_LIMIT;
    while targets.counts()[..extra]
        .iter()
        .zip(&start_counts)
        .any(|(now, before)| now <= before)
    {
        if Instant::now() >= deadline {
            return Err(
                format!("the extra pools not all checked within {FIRST_CHECKS_LIMIT:?}").into(),
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
    sleep(SETTLE).await;

    let stop = CancellationToken::new();
    let stream =
        tokio::spawn(client_stream(front, LEAD_IN + WINDOW * 2).run(Stop::On(stop.clone())));
    // A random phase against the check schedule, as benches/failover.rs does.
    sleep(LEAD_IN + Duration::from_micros(fastrand::u64(0..CHECK_INTERVAL_MS * 1000))).await;
    let events_before = last_event_id(admin).await;
    let injected = Instant::now();
    let injected_unix_ms = unix_ms();
    match fault {
        Fault::Killed => primary.kill().await,
        Fault::Hung => primary.hang(),
    }
    sleep_until(injected + WINDOW).await;
    stop.cancel();
    let timeline = stream
        .await
        .map_err(|e| format!("the client stream failed: {e}"))?;

    let events = get_json(admin, &format!("/events?since={events_before}")).await;
    let down = events["events"].as_array().and_then(|events| {
        events
            .iter()
            .find(|e| e["upstream"] == "primary" && (e["new"] == "down" || e["new"] == "ejected"))
    });
    let detection_ms = down
        .and_then(|e| e["at_unix_ms"].as_u64())
        .map(|at| at.saturating_sub(injected_unix_ms) as f64);
    let detected_by = down.map(|e| {
        format!(
            "{}: {}",
            e["new"].as_str().unwrap_or("?"),
            e["reason"].as_str().unwrap_or("?")
        )
    });
    let injected_at = injected.saturating_duration_since(timeline.start);
    let window_end = injected_at + WINDOW;
    let switch_ms = timeline
        .records
        .iter()
        .filter(|r| r.started >= injected_at && r.started < window_end && r.is_served_by("backup"))
        .map(|r| r.finished().saturating_sub(injected_at).as_secs_f64() * 1000.0)
        .min_by(f64::total_cmp);
    // Clients in flight at the injection count too: the fault hit them.
    let in_window: Vec<_> = timeline
        .records
        .iter()
        .filter(|r| r.finished() >= injected_at && r.started < window_end)
        .collect();
    drop(proxy);
    Ok(FailoverRound {
        fault: fault.label().to_string(),
        pools: extra + 1,
        detection_ms,
        detected_by,
        switch_ms,
        failed: in_window.iter().filter(|r| r.served_by.is_err()).count(),
        clients: in_window.len(),
    })
}

async fn last_event_id(admin: SocketAddr) -> u64 {
    let events = get_json(admin, "/events").await;
    events["events"]
        .as_array()
        .and_then(|e| e.iter().filter_map(|e| e["id"].as_u64()).max())
        .unwrap_or(0)
}

/// benches/failover.rs's switchyard config, with an admin API.
fn failover_config(
    admin: SocketAddr,
    front: SocketAddr,
    primary: SocketAddr,
    backup: SocketAddr,
) -> String {
    format!(
        r#"[runtime]
worker_threads = 2

[log]
level = "warn"

[admin]
listen = "{admin}"

[listeners.front]
bind = "{front}"
pool = "p"

[pools.p]
connect_timeout = "{CONNECT_TIMEOUT_MS}ms"
connect_attempts = {CONNECT_ATTEMPTS}
failback = "immediate"
on_upstream_down = "close"
upstreams = [
  {{ name = "primary", address = "{primary}", priority = 0 }},
  {{ name = "backup", address = "{backup}", priority = 1 }},
]

[pools.p.health]
interval = "{CHECK_INTERVAL_MS}ms"
fast_interval = "{CHECK_FAST_INTERVAL_MS}ms"
timeout = "{CHECK_TIMEOUT_MS}ms"
rise = {RISE}
fall = {FALL}
send = "PING\r\n"
expect = "hello"

[pools.p.outlier]
consecutive_failures = {CONSECUTIVE_FAILURES}
"#
    )
}

// === shared pieces ===

/// A proxy with an admin API and one listener `front` → pool `p` of `upstream`,
/// checked every second (or not at all, `checked` false), logging at `level` in
/// `format`.
fn front_config(
    admin: SocketAddr,
    front: SocketAddr,
    (level, format): (&str, &str),
    upstream: SocketAddr,
    checked: bool,
) -> String {
    let health = match checked {
        true => "interval = \"1s\"",
        false => "enabled = false",
    };
    format!(
        r#"[runtime]
worker_threads = 2

[log]
level = "{level}"
format = "{format}"

[admin]
listen = "{admin}"

[listeners.front]
bind = "{front}"
pool = "p"

[pools.p]
upstreams = [{{ address = "{upstream}" }}]

[pools.p.health]
{health}
"#
    )
}

/// One pool per address, named `c<i>`, its one upstream checked every second by `kind`.
fn extra_pools(addrs: &[SocketAddr], kind: CheckKind) -> String {
    let mut text = String::new();
    for (i, addr) in addrs.iter().enumerate() {
        text.push_str(&format!(
            "\n[pools.c{i}]\nupstreams = [{{ address = \"{addr}\" }}]\n\n[pools.c{i}.health]\n{}",
            kind.switchyard()
        ));
    }
    text
}

fn client_stream(addr: SocketAddr, limit: Duration) -> ClientStream {
    ClientStream {
        addr,
        every: CLIENT_EVERY,
        limit,
        client_timeout: CLIENT_TIMEOUT,
        probe: Probe::Greeting {
            speaks_first: false,
        },
    }
}

async fn wait_served_by(addr: SocketAddr, who: &str) -> Result<()> {
    let deadline = Instant::now() + READY_LIMIT;
    while ask_greeting(addr, CLIENT_TIMEOUT, false).await.as_deref() != Ok(who) {
        if Instant::now() >= deadline {
            return Err(
                format!("{who} did not serve through {addr} within {READY_LIMIT:?}").into(),
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// How many clients of `timeline` failed, by why.
fn failures(timeline: &Timeline) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for record in &timeline.records {
        if let Err(why) = &record.served_by {
            *counts.entry(why.label().to_string()).or_insert(0) += 1;
        }
    }
    counts.into_iter().collect()
}

fn describe_failures(failures: &[(String, usize)]) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let list: Vec<String> = failures
        .iter()
        .map(|(why, n)| format!("{n} {why}"))
        .collect();
    format!(" ({})", list.join(", "))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// === impl Fault ===

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Self::Killed => "killed",
            Self::Hung => "hung",
        }
    }
}

// === impl CheckKind ===

impl CheckKind {
    fn label(self) -> &'static str {
        match self {
            Self::Greeting => "send/expect",
            Self::Connect => "TCP connect",
            Self::Off => "unchecked",
        }
    }

    /// The body of switchyard's `[pools.NAME.health]`.
    fn switchyard(self) -> &'static str {
        match self {
            Self::Greeting => "interval = \"1s\"\nsend = \"PING\\r\\n\"\nexpect = \"hello\"\n",
            Self::Connect => "interval = \"1s\"\n",
            Self::Off => "enabled = false\n",
        }
    }

    /// HAProxy's check lines in a backend.
    fn haproxy(self) -> &'static str {
        match self {
            Self::Greeting => {
                "    option tcp-check\n    tcp-check connect\n    tcp-check send \"PING\\r\\n\"\n    tcp-check expect string hello\n"
            }
            Self::Connect | Self::Off => "",
        }
    }
}

// === impl CheckTargets ===

impl CheckTargets {
    async fn start(n: usize) -> Result<Self> {
        let accepted: Arc<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let accepted = accepted.clone();
            servers.push(
                Server::start(move |mut stream: TcpStream| {
                    accepted[i].fetch_add(1, Relaxed);
                    async move {
                        if stream.write_all(b"hello t\n").await.is_err() {
                            return;
                        }
                        // Held until the checker closes it.
                        let mut buf = [0u8; 64];
                        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                    }
                })
                .await,
            );
        }
        Ok(Self {
            addrs: servers.iter().map(|s| s.addr).collect(),
            accepted,
            _servers: servers,
        })
    }

    fn counts(&self) -> Vec<u64> {
        self.accepted.iter().map(|a| a.load(Relaxed)).collect()
    }

    /// Connections the first `k` targets accepted so far.
    fn total(&self, k: usize) -> u64 {
        self.accepted[..k].iter().map(|a| a.load(Relaxed)).sum()
    }
}

// === /proc and limits ===

/// Raises the soft RLIMIT_NOFILE to the hard limit (children inherit it); returns it.
fn raise_nofile() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the struct we own and pass by a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit(2) reads the struct we own through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf(3) takes an integer and returns one; no memory is involved.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100)
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e} (did the proxy exit?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status has no VmRSS").into())
}

/// utime + stime of `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e} (did the proxy exit?)"))?;
    // After "(comm) " the state is field 0; utime and stime are 11 and 12.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .ok_or("/proc/PID/stat without a command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat: no field {i} after the name").into())
    };
    Ok(field(11)? + field(12)?)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_string())
}

/// Whether something listens on `addr` (IPv4), from /proc/net/tcp: waiting for a
/// listener this way opens no connection, which would count in what is measured.
fn listening(addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else {
        return false;
    };
    let wanted = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&wanted.as_str()) && fields.get(3) == Some(&"0A")
        })
    })
}

// === HAProxy ===

impl Haproxy {
    fn label(&self) -> String {
        format!("HAProxy {}", self.version)
    }
}

/// The HAProxy binary, or `None` (said why) when it is missing.
async fn haproxy() -> Option<Haproxy> {
    let Some(binary) = common::find_program("haproxy") else {
        println!(
            "haproxy: not found on PATH or in /usr/sbin; its cells stay empty (Debian: \
             apt-get install haproxy)"
        );
        return None;
    };
    let output = timeout(
        HAPROXY_COMMAND_LIMIT,
        tokio::process::Command::new(&binary)
            .arg("-v")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let Ok(Ok(output)) = output else {
        println!("haproxy: `{} -v` did not answer", binary.display());
        return None;
    };
    // "HAProxy version 2.6.12-1+deb12u3 2025/10/03 - https://haproxy.org/"
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split_whitespace()
        .nth(2)
        .map(|v| v.split('-').next().unwrap_or(v).to_string())
        .unwrap_or_else(|| "?".to_string());
    println!("haproxy: {} ({version})", binary.display());
    Some(Haproxy { binary, version })
}

impl HaproxyChild {
    /// Validates `config` (`haproxy -c`), starts HAProxy in the foreground and waits
    /// until it listens on `front`.
    async fn start(haproxy: &Haproxy, config: &str, front: SocketAddr) -> Result<Self> {
        let dir = common::TestDir::new();
        let config_path = dir.join("haproxy.cfg");
        std::fs::write(&config_path, config)?;
        let check = timeout(
            HAPROXY_COMMAND_LIMIT,
            tokio::process::Command::new(&haproxy.binary)
                .arg("-c")
                .arg("-f")
                .arg(&config_path)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| "`haproxy -c` did not finish")??;
        if !check.status.success() {
            return Err(format!(
                "`haproxy -c` rejects the config: {} {}",
                String::from_utf8_lossy(&check.stdout).trim(),
                String::from_utf8_lossy(&check.stderr).trim()
            )
            .into());
        }
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let child = Command::new(&haproxy.binary)
            .arg("-db")
            .arg("-f")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut started = Self { child, dir };
        let deadline = Instant::now() + READY_LIMIT;
        while !listening(front) {
            if let Some(status) = started.child.try_wait()? {
                return Err(format!("haproxy exited ({status}): {}", started.log()).into());
            }
            if Instant::now() >= deadline {
                return Err(format!("haproxy not listening within {READY_LIMIT:?}").into());
            }
            sleep(Duration::from_millis(20)).await;
        }
        Ok(started)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for HaproxyChild {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === results ===

impl Results {
    fn error(&mut self, message: String) {
        println!("  FAILED: {message}");
        self.errors.push(message);
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

fn opt_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms"))
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".to_string(),
    }
}

/// `value - reference`, signed, e.g. "+2.0".
fn difference(value: Option<f64>, reference: Option<f64>) -> String {
    match (value, reference) {
        (Some(v), Some(r)) => format!("{:+.1}", v - r),
        _ => "-".to_string(),
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut text = format!("| {} |\n", header.join(" | "));
    text.push_str(&format!(
        "|{}\n",
        header.iter().map(|_| "---|").collect::<String>()
    ));
    for row in rows {
        text.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    text
}

fn render(
    settings: &Settings,
    haproxy: Option<&Haproxy>,
    results: &Results,
    load_start: &str,
    load_end: &str,
    wall: f64,
) -> String {
    let theirs = haproxy.map_or_else(|| "HAProxy".to_string(), Haproxy::label);
    let mut md = String::from("## Scale figures\n\n");
    md.push_str(&format!(
        "{} run of `cargo bench --bench scale` on {} CPUs; load average {load_start} at the \
         start, {load_end} at the end; {wall:.0} s. Each figure from fresh processes; \
         MB = 10^6 bytes.\n\n",
        if settings.quick { "A quick" } else { "A full" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    let mut goals = Vec::new();

    if !results.idle.is_empty() {
        md.push_str("### Memory per idle connection (RSS)\n\n");
        let find = |proxy_is_ours: bool, n: usize| {
            results
                .idle
                .iter()
                .find(|r| (r.proxy == "switchyard") == proxy_is_ours && r.connections == n)
        };
        let mut rows = Vec::new();
        for &n in &settings.idle_counts {
            let ours = find(true, n);
            let other = find(false, n);
            rows.push(vec![
                n.to_string(),
                cell(ours.map(|r| r.kib_per_connection), 2),
                cell(ours.map(|r| r.rss_after_kib as f64 * 1024.0 / 1e6), 1),
                cell(other.map(|r| r.kib_per_connection), 2),
                cell(other.map(|r| r.rss_after_kib as f64 * 1024.0 / 1e6), 1),
                ratio(
                    ours.map(|r| r.kib_per_connection),
                    other.map(|r| r.kib_per_connection),
                ),
            ]);
        }
        let header = [
            "idle connections",
            "switchyard KiB/conn",
            "switchyard RSS MB",
            &format!("{theirs} KiB/conn"),
            &format!("{theirs} RSS MB"),
            "ratio",
        ];
        md.push_str(&table(&header, &rows));
        md.push_str(
            "\nKiB/conn: (RSS with the connections − RSS before) / connections; RSS MB: the \
             whole process with the connections open.\n\n",
        );
        if let Some(&most) = settings.idle_counts.iter().max()
            && most >= 9_000
            && let Some(r) = find(true, most)
        {
            let mb = r.rss_after_kib as f64 * 1024.0 / 1e6;
            goals.push(format!(
                "{most} idle connections in {mb:.1} MB RSS (goal: 9,000 in ≤ 40 MB): {}",
                met(mb <= 40.0)
            ));
        }
    }

    if !results.checks.is_empty() {
        md.push_str("### Health checks, every upstream every 1 s\n\n");
        let rows: Vec<Vec<String>> = results
            .checks
            .iter()
            .map(|r| {
                vec![
                    r.proxy.clone(),
                    r.upstreams.to_string(),
                    r.check.clone(),
                    format!("{:.2} %", r.cpu_share * 100.0),
                    format!("{:.0}", r.checks_per_s),
                    match r.checks_per_s > 0.0 {
                        true => format!("{:.1}", r.cpu_share * 1e6 / r.checks_per_s),
                        false => "-".to_string(),
                    },
                    format!("{:.0}", r.window_s),
                ]
            })
            .collect();
        md.push_str(&table(
            &[
                "proxy",
                "upstreams",
                "check",
                "CPU, share of one core",
                "checks/s",
                "CPU µs per check",
                "window s",
            ],
            &rows,
        ));
        let greeting = CheckKind::Greeting.label();
        let ours = results
            .checks
            .iter()
            .filter(|r| r.proxy == "switchyard" && r.check == greeting)
            .max_by_key(|r| r.upstreams);
        let other = results
            .checks
            .iter()
            .find(|r| r.proxy != "switchyard" && r.check == greeting);
        if let Some(ours) = ours {
            md.push_str(&format!(
                "\nThe share includes everything else the idle proxy does (the 0 row). \
                 switchyard / {theirs} at {} upstreams, {greeting} checks: {}.\n\n",
                ours.upstreams,
                ratio(Some(ours.cpu_share), other.map(|r| r.cpu_share))
            ));
        }
        for r in results
            .checks
            .iter()
            .filter(|r| r.proxy == "switchyard" && r.upstreams >= 1_000)
        {
            goals.push(format!(
                "{} upstreams checked every second ({}) for {:.2} % of a core (goal ≤ 5 %): {}",
                r.upstreams,
                r.check,
                r.cpu_share * 100.0,
                met(r.cpu_share <= 0.05)
            ));
        }
    }

    if !results.reload.is_empty() {
        md.push_str("### A reload (SIGHUP) that adds pools\n\n");
        let mut rows = Vec::new();
        for &(size, checked) in &settings.reload_cases {
            let check = if checked {
                CheckKind::Greeting
            } else {
                CheckKind::Off
            }
            .label();
            let rounds: Vec<&ReloadRound> = results
                .reload
                .iter()
                .filter(|r| r.pools_added == size && r.check == check)
                .collect();
            if rounds.is_empty() {
                continue;
            }
            let swap = median(rounds.iter().map(|r| r.signal_to_swap_ms).collect());
            let failed: usize = rounds.iter().map(|r| r.failed).sum();
            let clients: usize = rounds.iter().map(|r| r.clients).sum();
            let broken: usize = rounds.iter().map(|r| r.held_broken).sum();
            let held: usize = rounds.iter().map(|r| r.held).sum();
            rows.push(vec![
                size.to_string(),
                check.to_string(),
                rounds.len().to_string(),
                cell(swap, 1),
                cell(
                    rounds
                        .iter()
                        .map(|r| r.signal_to_swap_ms)
                        .max_by(f64::total_cmp),
                    1,
                ),
                cell(median(rounds.iter().map(|r| r.logged_ms).collect()), 1),
                cell(median(rounds.iter().map(|r| r.read_ms).collect()), 1),
                cell(
                    median(rounds.iter().map(|r| r.first_checks_ms).collect()),
                    1,
                ),
                cell(median(rounds.iter().map(|r| r.swap_ms).collect()), 1),
                format!("{failed} / {clients}"),
                format!("{broken} / {held}"),
            ]);
            if size >= 1_000
                && let Some(swap) = swap
            {
                goals.push(format!(
                    "a {size}-pool reload ({check}) swapped in {swap:.1} ms (median) with {failed} \
                     failed new and {broken} broken held connections (goal ≤ 50 ms, 0 failed): {}",
                    met(swap <= 50.0 && failed == 0 && broken == 0)
                ));
            }
        }
        md.push_str(&table(
            &[
                "pools added",
                "their check",
                "rounds",
                "signal → swap ms (median)",
                "max",
                "SIGHUP logged → swap ms",
                "of which: read",
                "first checks",
                "swap",
                "failed new clients",
                "broken held connections",
            ],
            &rows,
        ));
        md.push_str(&format!(
            "\nThe swap waits for the first check of every new upstream: in the checked rows \
             1,000 checks at once against upstreams in the bench's process, on the same \
             machine, so those rows measure this machine's answer to them as much as the \
             proxy; the unchecked row is the reload itself. New clients every 2 ms through \
             the existing pool from 1 s before the signal to 1 s after the swap; \
             {HELD_ACROSS_RELOAD} connections opened before the signal echo after it.\n\n"
        ));
    }

    if !results.failover.is_empty() {
        md.push_str("### Failover with 1 pool and with 1,001 pools\n\n");
        let mut rows = Vec::new();
        for &fault in &settings.faults {
            let mut medians = Vec::new();
            for &extra in &settings.extra_pools {
                let rounds: Vec<&FailoverRound> = results
                    .failover
                    .iter()
                    .filter(|r| r.pools == extra + 1 && r.fault == fault.label())
                    .collect();
                if rounds.is_empty() {
                    continue;
                }
                let detection = median(rounds.iter().filter_map(|r| r.detection_ms).collect());
                let switch = median(rounds.iter().filter_map(|r| r.switch_ms).collect());
                medians.push((detection, switch));
                let (vs_detection, vs_switch) = match medians.first() {
                    Some(&(d1, s1)) if medians.len() > 1 => {
                        (difference(detection, d1), difference(switch, s1))
                    }
                    _ => ("".to_string(), "".to_string()),
                };
                rows.push(vec![
                    fault.label().to_string(),
                    (extra + 1).to_string(),
                    rounds.len().to_string(),
                    cell(detection, 1),
                    vs_detection,
                    cell(switch, 1),
                    vs_switch,
                    rounds
                        .iter()
                        .map(|r| r.failed)
                        .max()
                        .unwrap_or(0)
                        .to_string(),
                ]);
            }
            if let [(d1, s1), .., (dn, sn)] = medians.as_slice() {
                goals.push(format!(
                    "failover ({}) with {} pools against 1: detection {} ms, switch {} ms \
                     (goal: the same within noise)",
                    fault.label(),
                    settings.extra_pools.iter().max().map_or(0, |n| n + 1),
                    difference(*dn, *d1),
                    difference(*sn, *s1),
                ));
            }
        }
        md.push_str(&table(
            &[
                "fault",
                "pools",
                "rounds",
                "detection ms",
                "vs 1 pool",
                "switch ms",
                "vs 1 pool",
                "failed (worst round)",
            ],
            &rows,
        ));
        md.push_str(&format!(
            "\nPool `p` has benches/failover.rs's settings (send/expect checks every \
             {CHECK_INTERVAL_MS} ms, {CHECK_FAST_INTERVAL_MS} ms while deciding, timeout \
             {CHECK_TIMEOUT_MS} ms, fall {FALL}; ejected after {CONSECUTIVE_FAILURES} failed \
             connects); each extra pool has one upstream, send/expect-checked every second. \
             Killed: connects are refused, so the clients' failed connects eject the primary \
             (passive); hung: it accepts and never answers, so only the active check's timeout \
             tells, and the injection's random phase against the check schedule spreads \
             detection over one interval ({CHECK_INTERVAL_MS} ms). Failed: clients in flight \
             at the injection or started within {} s after it that got no greeting. Detection \
             comes from event timestamps in whole milliseconds.\n\n",
            WINDOW.as_secs()
        ));
    }

    if !goals.is_empty() {
        md.push_str("### Against the goals\n\n");
        for goal in &goals {
            md.push_str(&format!("- {goal}\n"));
        }
        md.push('\n');
    }
    if !settings.idle_left_out.is_empty() {
        md.push_str(&format!(
            "Left out for lack of descriptors (RLIMIT_NOFILE {}): {:?} idle connections.\n\n",
            settings.nofile, settings.idle_left_out
        ));
    }
    if !results.errors.is_empty() {
        md.push_str("### Errors\n\n");
        for e in &results.errors {
            md.push_str(&format!("- {e}\n"));
        }
        md.push('\n');
    }
    md
}

fn write_results(
    settings: &Settings,
    haproxy: Option<&Haproxy>,
    results: &Results,
    markdown: &str,
    (load_start, load_end): (&str, &str),
    wall: f64,
) -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("scale.md"), markdown)?;
    let json = serde_json::json!({
        "settings": settings,
        "haproxy": haproxy.map(|h| h.version.clone()),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "wall_seconds": wall,
        "finished_unix_ms": unix_ms(),
        "results": results,
    });
    std::fs::write(
        dir.join("scale.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    println!("written: {} and scale.json", dir.join("scale.md").display());
    Ok(())
}
