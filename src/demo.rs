//! `switchyard demo`: a self-contained failover demonstration on loopback.
//!
//! Starts a primary and a backup upstream of its own, a proxy in front of them and a
//! steady stream of client connections; kills the primary, brings it back, and prints
//! what clients experienced. With a slow start, the failback is a ramp and the demo
//! prints the primary's share of new clients through it. Everything it reports is
//! measured from real sockets and the proxy's own counters; nothing is simulated.

use std::path::Path;
use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until};

use crate::Proxy;
use crate::config::Config;
use crate::drill::upstream::GreetingUpstream;
use crate::drill::{ClientRecord, ClientStream, Probe, Stop};
use crate::events::{Event, EventKind};
use crate::shutdown::Shutdown;

const CLIENT_EVERY: Duration = Duration::from_millis(5);
const KILL_AT: Duration = Duration::from_millis(1000);
const RESTART_AT: Duration = Duration::from_millis(2500);
/// Without a slow start: the failback is immediate, 1.5 s is plenty to see it.
const END_AT: Duration = Duration::from_millis(4000);
/// With one: the primary takes about 0.5 s to be up again, then the ramp, then this.
const AFTER_RAMP: Duration = Duration::from_millis(1000);
/// Longer would only make the demo slow.
pub const MAX_SLOW_START: Duration = Duration::from_secs(30);
/// A client that is not served within this counts as failed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Default, Clone)]
struct PhaseStats {
    clients: usize,
    primary: usize,
    backup: usize,
    failed: usize,
    latencies: Vec<Duration>,
}

/// Runs the demo; with `slow_start`, the failback ramps up over that long.
pub fn main(slow_start: Option<Duration>) -> Result<(), String> {
    if let Some(d) = slow_start.filter(|&d| d.is_zero() || d > MAX_SLOW_START) {
        return Err(format!(
            "the demo's slow start must be above 0 and at most {}, not {}",
            humantime::format_duration(MAX_SLOW_START),
            humantime::format_duration(d)
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(run(slow_start))
}

async fn run(slow_start: Option<Duration>) -> Result<(), String> {
    let end_at = slow_start.map_or(END_AT, |d| {
        RESTART_AT + Duration::from_millis(500) + d + AFTER_RAMP
    });
    let slow_start_line = slow_start.map_or(String::new(), |d| {
        format!("slow_start = \"{}\"\n", humantime::format_duration(d))
    });
    let upstream = |name: &'static str| async move {
        GreetingUpstream::start(name)
            .await
            .map_err(|e| format!("demo upstream {name}: {e}"))
    };
    let mut primary = upstream("primary").await?;
    let backup = upstream("backup").await?;

    let config_text = format!(
        r#"
[listeners.demo]
bind = "127.0.0.1:0"
pool = "demo"

[pools.demo]
connect_timeout = "300ms"
failback = "immediate"
{slow_start_line}upstreams = [
  {{ address = "{}", priority = 0, name = "primary" }},
  {{ address = "{}", priority = 1, name = "backup" }},
]

[pools.demo.health]
interval = "200ms"
fast_interval = "100ms"
timeout = "100ms"
rise = 2
fall = 2

[pools.demo.outlier]
consecutive_failures = 2
base_ejection = "5s"
"#,
        primary.addr, backup.addr
    );
    let config = Config::parse(&config_text, Path::new("(demo)")).map_err(|e| e.to_string())?;
    let listeners = crate::bind_all(&config)
        .map_err(|e| e.to_string())?
        .listeners;
    let shutdown = Shutdown::new();
    let proxy = Proxy::start(&config, listeners, &shutdown).map_err(|e| e.to_string())?;
    let front = proxy
        .listener("demo")
        .and_then(|l| l.addrs.first().copied())
        .ok_or("the demo listener did not bind")?;

    println!("switchyard demo: failover on loopback");
    println!("  proxy   {front}");
    println!("  primary {} (priority 0)", primary.addr);
    println!("  backup  {} (priority 1)", backup.addr);
    println!(
        "  one new client every {} ms; each reads the name of the upstream that serves it",
        CLIENT_EVERY.as_millis()
    );
    println!(
        "  health checks every 200 ms (100 ms while deciding), timeout 100 ms, rise 2, fall 2;"
    );
    match slow_start {
        None => println!("  2 failed connects in a row eject an upstream; failback immediate"),
        Some(d) => println!(
            "  2 failed connects in a row eject an upstream; failback immediate, with a slow start of {}",
            humantime::format_duration(d)
        ),
    }
    println!();

    // Let the first health checks settle before the clock starts.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        let route = proxy.snapshot.load().pool("demo").cloned();
        let checked = route.is_some_and(|r| {
            r.upstreams.iter().all(|u| {
                u.stats
                    .checks_passed
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
            })
        });
        if checked {
            break;
        }
        sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    let clients = tokio::spawn(
        ClientStream {
            addr: front,
            every: CLIENT_EVERY,
            limit: end_at,
            client_timeout: CLIENT_TIMEOUT,
            probe: Probe::Greeting {
                speaks_first: false,
            },
        }
        .run(Stop::AtLimit),
    );

    sleep_until(start + KILL_AT).await;
    let killed = Instant::now();
    primary.kill().await;
    sleep_until(start + RESTART_AT).await;
    primary
        .restart()
        .await
        .map_err(|e| format!("demo upstream primary: {e}"))?;
    let restarted = Instant::now();

    let timeline = clients
        .await
        .map_err(|e| format!("client stream failed: {e}"))?;
    let events = proxy.events.all();
    drop((primary, backup));
    shutdown.begin();
    shutdown.drain(Duration::from_secs(1)).await;

    // Event times are Unix milliseconds: line them up with the stream's start.
    let start_unix_ms = unix_ms().saturating_sub(timeline.start.elapsed().as_millis() as u64);
    let killed_at = timeline.offset(killed);
    let restarted_at = timeline.offset(restarted);
    print_timeline(
        &timeline.records,
        &events,
        start_unix_ms,
        Moments {
            killed_at,
            restarted_at,
            end_at,
        },
    );
    Ok(())
}

/// When the demo did what, after the client stream's start.
struct Moments {
    killed_at: Duration,
    restarted_at: Duration,
    end_at: Duration,
}

fn print_timeline(records: &[ClientRecord], events: &[Event], start_unix_ms: u64, at: Moments) {
    let Moments {
        killed_at,
        restarted_at,
        end_at,
    } = at;
    let ms = |d: Duration| format!("{:>7.1} ms", d.as_secs_f64() * 1000.0);
    let since_start = |e: &Event| Duration::from_millis(e.at_unix_ms.saturating_sub(start_unix_ms));
    let first_served = |after: Duration, by: &str| {
        records
            .iter()
            .filter(|r| r.started >= after && r.is_served_by(by))
            .map(ClientRecord::finished)
            .min()
    };
    let first_event = |after: Duration, matches: &dyn Fn(&Event) -> bool| {
        events
            .iter()
            .filter(|e| since_start(e) + Duration::from_millis(1) >= after && matches(e))
            .min_by_key(|e| e.id)
    };
    let after = |at: Duration, from: Duration| {
        format!(
            "{:.1} ms after",
            at.saturating_sub(from).as_secs_f64() * 1000.0
        )
    };

    // Printed in time order: which of detection, switch and first client comes first
    // depends on the run.
    let mut lines: Vec<(Duration, String)> = Vec::new();
    lines.push((Duration::ZERO, "clients served by the primary".to_string()));
    lines.push((
        killed_at,
        "primary killed: listener closed, its connections dropped".to_string(),
    ));
    let detection = first_event(killed_at, &|e| {
        e.upstream.as_deref() == Some("primary") && e.new != "up"
    });
    if let Some(e) = detection {
        lines.push((
            since_start(e),
            format!(
                "detection: primary {} -> {} ({}), {} the kill",
                e.old,
                e.new,
                e.reason,
                after(since_start(e), killed_at)
            ),
        ));
    }
    if let Some(at) = first_served(killed_at, "backup") {
        lines.push((
            at,
            format!(
                "first new client served by the backup, {} the kill",
                after(at, killed_at)
            ),
        ));
    }
    if let Some(e) = first_event(killed_at, &|e| e.kind == EventKind::Tier && e.new != "0") {
        lines.push((
            since_start(e),
            format!("switch: active tier {} -> {} ({})", e.old, e.new, e.reason),
        ));
    }
    lines.push((restarted_at, "primary restarted".to_string()));
    if let Some(e) = first_event(restarted_at, &|e| {
        e.upstream.as_deref() == Some("primary") && e.new == "up"
    }) {
        lines.push((
            since_start(e),
            format!(
                "primary up again ({}), {} the restart",
                e.reason,
                after(since_start(e), restarted_at)
            ),
        ));
    }
    if let Some(e) = first_event(restarted_at, &|e| e.kind == EventKind::Tier && e.new == "0") {
        lines.push((
            since_start(e),
            format!(
                "failback: active tier {} -> {} ({})",
                e.old, e.new, e.reason
            ),
        ));
    }
    if let Some(at) = first_served(restarted_at, "primary") {
        lines.push((
            at,
            format!(
                "first new client served by the primary again, {} the restart",
                after(at, restarted_at)
            ),
        ));
    }
    let ramp = first_event(restarted_at, &|e| {
        e.kind == EventKind::SlowStart && e.upstream.is_none() && e.new == "ramp"
    });
    let ramp_end = ramp.and_then(|started| {
        events
            .iter()
            .find(|e| e.kind == EventKind::SlowStart && e.upstream.is_none() && e.id > started.id)
    });
    if let Some(e) = ramp {
        lines.push((since_start(e), format!("slow start: {}", e.reason)));
    }
    if let Some(e) = ramp_end {
        lines.push((since_start(e), e.reason.clone()));
    }
    lines.push((end_at, "end".to_string()));
    lines.sort_by_key(|(at, _)| *at);
    println!("timeline");
    for (at, what) in &lines {
        println!("  {}  {what}", ms(*at));
    }
    println!();

    let mut phases: Vec<(String, Duration, Duration)> = vec![
        ("before the kill".to_string(), Duration::ZERO, killed_at),
        ("primary down".to_string(), killed_at, restarted_at),
    ];
    match (ramp, ramp_end) {
        (Some(started), Some(ended)) => {
            let (from, to) = (since_start(started), since_start(ended));
            phases.push(("until the failback".to_string(), restarted_at, from));
            // The ramp in quarters: the primary's share of new clients grows.
            let quarter = (to.saturating_sub(from)) / 4;
            for q in 0..4u32 {
                let start = from + quarter * q;
                let end = if q == 3 { to } else { start + quarter };
                phases.push((format!("slow start {}/4", q + 1), start, end));
            }
            phases.push(("after the ramp".to_string(), to, end_at + CLIENT_TIMEOUT));
        }
        _ => phases.push((
            "after the restart".to_string(),
            restarted_at,
            end_at + CLIENT_TIMEOUT,
        )),
    }
    println!(
        "  {:<18} {:>7} {:>8} {:>7} {:>7} {:>9}   connect+greeting latency p50 / p99 / max",
        "phase", "clients", "primary", "backup", "failed", "% primary"
    );
    let mut total = PhaseStats::default();
    for (name, from, to) in &phases {
        let (from, to) = (*from, *to);
        let mut phase = PhaseStats::default();
        for r in records
            .iter()
            .filter(|r| r.started >= from && r.started < to)
        {
            phase.clients += 1;
            match r.served_by.as_deref() {
                Ok("primary") => phase.primary += 1,
                Ok(_) => phase.backup += 1,
                Err(_) => phase.failed += 1,
            }
            phase.latencies.push(r.latency);
        }
        total.clients += phase.clients;
        total.failed += phase.failed;
        phase.latencies.sort();
        println!(
            "  {:<18} {:>7} {:>8} {:>7} {:>7} {:>9}   {} / {} / {}",
            name,
            phase.clients,
            phase.primary,
            phase.backup,
            phase.failed,
            percent(phase.primary, phase.clients),
            percentile(&phase.latencies, 0.50),
            percentile(&phase.latencies, 0.99),
            percentile(&phase.latencies, 1.0),
        );
    }
    println!();
    println!(
        "client-visible failures: {} of {} connections",
        total.failed, total.clients
    );
    println!();
    println!("the proxy's event ring (what GET /events shows)");
    for e in events {
        let subject = match (&e.upstream, e.kind) {
            (Some(upstream), EventKind::SlowStart) => format!("slow start of {upstream}"),
            (Some(upstream), _) => format!("upstream {upstream}"),
            (None, EventKind::SlowStart) => "slow start of the active tier".to_string(),
            (None, _) => "active tier".to_string(),
        };
        println!(
            "  {}  #{} pool {} {subject}: {} -> {} ({})",
            ms(since_start(e)),
            e.id,
            e.pool,
            e.old,
            e.new,
            e.reason
        );
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn percent(part: usize, whole: usize) -> String {
    if whole == 0 {
        return "-".to_string();
    }
    format!("{:.0} %", part as f64 * 100.0 / whole as f64)
}

fn percentile(sorted: &[Duration], q: f64) -> String {
    if sorted.is_empty() {
        return "-".to_string();
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    format!("{:.2} ms", sorted[index].as_secs_f64() * 1000.0)
}
