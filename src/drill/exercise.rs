//! `switchyard drill`: a failover drill against a live instance, the way an operator
//! would run one, with objectives a release pipeline can gate on.
//!
//! Probes run through the pool's listener for the whole drill while the active tier is
//! taken out (through the admin API, or by the operator's command), held out, restored,
//! and failed back. Detection, switch and failback times come from the proxy's own
//! events; what the probes saw comes from the probes. Whatever the drill changed it
//! puts back, also when it fails or is interrupted.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::Method;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use super::{ClientRecord, ClientStream, Probe, Stop};
use crate::status::{PoolView, StatusView};

/// Probes before the fault, and after the failback, to compare against.
const CALM: Duration = Duration::from_secs(2);
/// A probe not served within this has failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the drill looks at the proxy while it waits for a change.
const POLL: Duration = Duration::from_millis(50);
/// A `--fault-cmd` or `--restore-cmd` that runs longer has failed.
const COMMAND_LIMIT: Duration = Duration::from_secs(120);
/// A reserved upstream name: writing to it tells whether writes need a token without
/// changing anything (the answer is "no such upstream" once the token is right).
const PREFLIGHT_UPSTREAM: &str = "%00switchyard-drill-preflight";

/// How the active tier is taken out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `maint` on each upstream of the active tier: their connections close.
    Maint,
    /// `drain` on each: no new connections, established ones stay.
    Drain,
    /// The operator's `--fault-cmd` (e.g. stopping a service), undone by `--restore-cmd`.
    Command { fault: String, restore: String },
}

/// What `switchyard drill` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The admin API (host:port).
    pub admin: String,
    pub pool: String,
    /// The bearer token for the admin API's writes.
    pub token: Option<String>,
    /// Where probes go; default: the first listener of the pool.
    pub through: Option<SocketAddr>,
    pub fault: Fault,
    /// New probe connections per second.
    pub rate: u32,
    pub probe: Probe,
    /// How long the tier stays out.
    pub hold: Duration,
    /// How long to wait for the failback after the restore.
    pub failback_limit: Duration,
    pub objectives: Objectives,
}

/// Limits the drill must stay within; `None` = not checked.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Objectives {
    pub max_failed: Option<usize>,
    #[serde(serialize_with = "millis_opt")]
    pub max_switch: Option<Duration>,
    #[serde(serialize_with = "millis_opt")]
    pub max_failback: Option<Duration>,
}

/// What a drill found; also its JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pool: String,
    pub through: String,
    pub fault: String,
    pub hold_ms: u64,
    /// The tier active when the drill started, and the one that took over.
    pub original_tier: u32,
    pub failover_tier: Option<u32>,
    /// Fault → the first upstream of the tier out of service, by the proxy's events.
    pub detection_ms: Option<u64>,
    /// Fault → the pool's active tier changed.
    pub switch_ms: Option<u64>,
    /// Restore → the original tier active again.
    pub failback_ms: Option<u64>,
    pub phases: Vec<PhaseReport>,
    pub timeline: Vec<Moment>,
    pub objectives: Vec<ObjectiveResult>,
    /// Set when the drill ended early (an error or an interruption).
    pub aborted: Option<String>,
    /// Everything the drill changed was put back.
    pub restored: bool,
}

/// What the probes of one phase saw.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub name: &'static str,
    pub probes: usize,
    pub failed: usize,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// New connections per tier during the phase, from the proxy's counters (they
    /// include other clients' connections too).
    pub connections_by_tier: BTreeMap<u32, u64>,
}

/// One line of the timeline, in ms after the drill's start.
#[derive(Debug, Clone, Serialize)]
pub struct Moment {
    pub at_ms: u64,
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObjectiveResult {
    pub name: &'static str,
    pub limit: String,
    pub measured: String,
    pub met: bool,
}

/// Why a drill did not produce a verdict.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// It would be unsafe or cannot work; nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// It failed part way; what it changed was put back (or the report says not).
    #[error("{message}")]
    Failed {
        message: String,
        report: Box<Report>,
    },
}

/// An event as `GET /events` shows it.
#[derive(Debug, Clone, Deserialize)]
struct EventView {
    id: u64,
    at_unix_ms: u64,
    kind: String,
    pool: String,
    upstream: Option<String>,
    old: String,
    new: String,
    reason: String,
}

#[derive(Debug, Deserialize)]
struct EventList {
    events: Vec<EventView>,
}

/// The admin API as the drill uses it.
struct AdminClient<'a> {
    addr: &'a str,
    token: Option<&'a str>,
}

/// What the drill changed, to put back.
#[derive(Debug, Default)]
struct Changes {
    /// Upstreams set to maint or drain through the API.
    overridden: Vec<String>,
    /// The fault command ran: the restore command must.
    fault_ran: bool,
}

/// Runs a drill; `interrupted` resolves on Ctrl-C or SIGTERM, which ends the drill
/// early (restoring first).
pub async fn run(
    options: &Options,
    interrupted: impl Future<Output = ()>,
) -> Result<Report, DrillError> {
    let admin = AdminClient {
        addr: &options.admin,
        token: options.token.as_deref(),
    };
    let status = admin.status().await.map_err(DrillError::Refused)?;
    let plan = Plan::check(options, &admin, &status).await?;
    let changes = RefCell::new(Changes::default());
    let started = Instant::now();
    let started_unix_ms = unix_ms();
    let mut timeline = Vec::new();

    let stop_probes = CancellationToken::new();
    let probes = tokio::spawn(
        ClientStream {
            addr: plan.through,
            every: Duration::from_secs(1) / options.rate.max(1),
            limit: CALM * 2 + options.hold + options.failback_limit + COMMAND_LIMIT * 2,
            client_timeout: PROBE_TIMEOUT,
            probe: options.probe.clone(),
        }
        .run(Stop::On(stop_probes.clone())),
    );

    let mut marks = Marks::default();
    let steps = plan.steps(
        &admin,
        options,
        &changes,
        &mut marks,
        &mut timeline,
        started,
    );
    let outcome = tokio::select! {
        outcome = steps => outcome,
        () = interrupted => Err("interrupted".to_string()),
    };
    let restore_error = plan.restore(&admin, options, &changes).await.err();
    if outcome.is_err() {
        marks.end.get_or_insert_with(Instant::now);
    }
    stop_probes.cancel();
    let records: Vec<ClientRecord> = probes
        .await
        .map(|t| {
            let offset = t.start.saturating_duration_since(started);
            t.records
                .into_iter()
                .map(|mut r| {
                    r.started += offset;
                    r
                })
                .collect()
        })
        .unwrap_or_default();
    let events = admin
        .events(plan.last_event_id)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.pool == options.pool)
        .collect::<Vec<_>>();
    for e in &events {
        let subject = e
            .upstream
            .as_deref()
            .map_or("tier".to_string(), |u| u.to_string());
        timeline.push(Moment {
            at_ms: e.at_unix_ms.saturating_sub(started_unix_ms),
            what: format!("event: {subject} {} -> {} ({})", e.old, e.new, e.reason),
        });
    }
    timeline.sort_by_key(|m| m.at_ms);
    let mut report = plan.report(options, &marks, started, started_unix_ms, &records, &events);
    report.timeline = timeline;
    report.restored = restore_error.is_none();
    let aborted = match (outcome, restore_error) {
        (Ok(()), None) => None,
        (Err(e), None) => Some(e),
        (Ok(()), Some(r)) => Some(format!("could not restore: {r}")),
        (Err(e), Some(r)) => Some(format!("{e}; and could not restore: {r}")),
    };
    match aborted {
        None => Ok(report),
        Some(message) => {
            report.aborted = Some(message.clone());
            Err(DrillError::Failed {
                message,
                report: Box::new(report),
            })
        }
    }
}

/// When each step happened.
#[derive(Debug, Default)]
struct Marks {
    fault: Option<Instant>,
    restore: Option<Instant>,
    failback: Option<Instant>,
    end: Option<Instant>,
    /// Connections per tier at the phase boundaries.
    counters: Vec<BTreeMap<u32, u64>>,
}

/// What the drill found out before changing anything.
struct Plan {
    through: SocketAddr,
    original_tier: u32,
    /// The upstreams of the active tier.
    targets: Vec<String>,
    manual_failback: bool,
    last_event_id: u64,
}

impl Plan {
    /// Refuses a drill that would take the pool down or could not put things back.
    async fn check(
        options: &Options,
        admin: &AdminClient<'_>,
        status: &StatusView,
    ) -> Result<Self, DrillError> {
        let refuse = |m: String| Err(DrillError::Refused(m));
        let Some(pool) = status.pools.iter().find(|p| p.name == options.pool) else {
            let names: Vec<&str> = status.pools.iter().map(|p| p.name.as_str()).collect();
            return refuse(format!(
                "the instance at {} has no pool {:?} (it has: {}); nothing was changed",
                options.admin,
                options.pool,
                names.join(", ")
            ));
        };
        let Some(original_tier) = pool.active_tier else {
            return refuse(format!(
                "pool {:?} has no usable upstream now, so there is no failover to test; nothing was changed",
                pool.name
            ));
        };
        let targets: Vec<String> = pool
            .upstreams
            .iter()
            .filter(|u| u.priority == original_tier)
            .map(|u| u.name.clone())
            .collect();
        let spare = pool
            .upstreams
            .iter()
            .any(|u| u.priority != original_tier && u.state == "up");
        if !spare {
            return refuse(format!(
                "pool {:?} has no usable upstream outside its active tier {original_tier}, so taking that tier out would take the pool down; nothing was changed",
                pool.name
            ));
        }
        let writes = !matches!(options.fault, Fault::Command { .. }) || pool.failback == "manual";
        if writes {
            let path = format!(
                "/pools/{}/upstreams/{PREFLIGHT_UPSTREAM}/up",
                path_segment(&pool.name)
            );
            let (code, body) = admin.post(&path).await.map_err(DrillError::Refused)?;
            if code == 401 || code == 403 {
                return refuse(format!(
                    "the admin API at {} refuses writes without the right token ({}): pass --token-file FILE; nothing was changed",
                    options.admin,
                    body.trim()
                ));
            }
        }
        let through = match options.through {
            Some(addr) => addr,
            None => probe_address(status, &pool.name).ok_or_else(|| {
                DrillError::Refused(format!(
                    "no listener sends clients to pool {:?}; give the address to probe with --through; nothing was changed",
                    pool.name
                ))
            })?,
        };
        let last_event_id = admin
            .events(0)
            .await
            .map_err(DrillError::Refused)?
            .iter()
            .map(|e| e.id)
            .max()
            .unwrap_or(0);
        Ok(Self {
            through,
            original_tier,
            targets,
            manual_failback: pool.failback == "manual",
            last_event_id,
        })
    }

    /// Before, fault, hold, restore, failback, after. Stops at the first failure.
    async fn steps(
        &self,
        admin: &AdminClient<'_>,
        options: &Options,
        changes: &RefCell<Changes>,
        marks: &mut Marks,
        timeline: &mut Vec<Moment>,
        started: Instant,
    ) -> Result<(), String> {
        let mut note = |what: String| {
            timeline.push(Moment {
                at_ms: started.elapsed().as_millis() as u64,
                what,
            })
        };
        note(format!(
            "probing {} at {}/s; pool {:?} on tier {}",
            self.through, options.rate, options.pool, self.original_tier
        ));
        marks
            .counters
            .push(self.connections_by_tier(admin, options).await?);
        sleep(CALM).await;

        marks
            .counters
            .push(self.connections_by_tier(admin, options).await?);
        marks.fault = Some(Instant::now());
        match &options.fault {
            Fault::Command { fault, .. } => {
                note(format!("fault: running {fault:?}"));
                changes.borrow_mut().fault_ran = true;
                run_command(fault).await?;
            }
            fault => {
                let action = if *fault == Fault::Drain {
                    "drain"
                } else {
                    "maint"
                };
                note(format!("fault: {action} on {}", self.targets.join(", ")));
                for upstream in &self.targets {
                    changes.borrow_mut().overridden.push(upstream.clone());
                    admin.set(&options.pool, upstream, action).await?;
                }
            }
        }
        note(format!(
            "holding for {}",
            humantime::format_duration(options.hold)
        ));
        sleep(options.hold).await;

        marks
            .counters
            .push(self.connections_by_tier(admin, options).await?);
        marks.restore = Some(Instant::now());
        match &options.fault {
            Fault::Command { restore, .. } => {
                note(format!("restore: running {restore:?}"));
                run_command(restore).await?;
                changes.borrow_mut().fault_ran = false;
            }
            _ => {
                note(format!("restore: up on {}", self.targets.join(", ")));
                let overridden = std::mem::take(&mut changes.borrow_mut().overridden);
                for upstream in &overridden {
                    admin.set(&options.pool, upstream, "up").await?;
                }
            }
        }
        let deadline = Instant::now() + options.failback_limit;
        let mut asked = false;
        loop {
            let status = admin.status().await?;
            let pool = pool_of(&status, &options.pool)?;
            if pool.active_tier == Some(self.original_tier) {
                break;
            }
            let tier_usable = pool
                .upstreams
                .iter()
                .any(|u| u.priority == self.original_tier && u.state == "up");
            if self.manual_failback && tier_usable && !asked {
                note("manual failback requested".to_string());
                admin
                    .post_ok(&format!("/pools/{}/failback", path_segment(&options.pool)))
                    .await?;
                asked = true;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "pool {:?} did not fail back to tier {} within {}",
                    options.pool,
                    self.original_tier,
                    humantime::format_duration(options.failback_limit)
                ));
            }
            sleep(POLL).await;
        }
        marks.failback = Some(Instant::now());
        note(format!("failed back to tier {}", self.original_tier));
        sleep(CALM).await;
        marks
            .counters
            .push(self.connections_by_tier(admin, options).await?);
        marks.end = Some(Instant::now());
        Ok(())
    }

    /// Puts back what the drill changed; safe to call whatever happened.
    async fn restore(
        &self,
        admin: &AdminClient<'_>,
        options: &Options,
        changes: &RefCell<Changes>,
    ) -> Result<(), String> {
        let overridden = std::mem::take(&mut changes.borrow_mut().overridden);
        let mut first_error = None;
        for upstream in &overridden {
            if let Err(e) = admin.set(&options.pool, upstream, "up").await {
                first_error.get_or_insert(e);
            }
        }
        let fault_ran = std::mem::take(&mut changes.borrow_mut().fault_ran);
        if let (true, Fault::Command { restore, .. }) = (fault_ran, &options.fault)
            && let Err(e) = run_command(restore).await
        {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn connections_by_tier(
        &self,
        admin: &AdminClient<'_>,
        options: &Options,
    ) -> Result<BTreeMap<u32, u64>, String> {
        let status = admin.status().await?;
        let pool = pool_of(&status, &options.pool)?;
        let mut by_tier = BTreeMap::new();
        for u in &pool.upstreams {
            *by_tier.entry(u.priority).or_insert(0) += u.connections_total;
        }
        Ok(by_tier)
    }

    fn report(
        &self,
        options: &Options,
        marks: &Marks,
        started: Instant,
        started_unix_ms: u64,
        records: &[ClientRecord],
        events: &[EventView],
    ) -> Report {
        let at = |instant: Option<Instant>| {
            instant.map(|i| i.saturating_duration_since(started).as_millis() as u64)
        };
        let (fault_ms, restore_ms) = (at(marks.fault), at(marks.restore));
        let unix = |ms: Option<u64>| ms.map(|m| started_unix_ms + m);
        let (fault_unix, restore_unix) = (unix(fault_ms), unix(restore_ms));
        let tier_events = || events.iter().filter(|e| e.kind == "tier");
        let detection_ms = fault_unix.and_then(|f| {
            events
                .iter()
                .find(|e| {
                    e.at_unix_ms >= f
                        && e.upstream
                            .as_deref()
                            .is_some_and(|u| self.targets.iter().any(|t| t == u))
                        && e.new != "up"
                })
                .map(|e| e.at_unix_ms.saturating_sub(f))
        });
        let original = self.original_tier.to_string();
        let switch = fault_unix.and_then(|f| {
            tier_events().find(|e| e.at_unix_ms >= f && e.old == original && e.new != original)
        });
        let failback_ms = restore_unix.and_then(|r| {
            tier_events()
                .find(|e| e.at_unix_ms >= r && e.new == original)
                .map(|e| e.at_unix_ms.saturating_sub(r))
        });
        let bounds = [
            Some(0),
            fault_ms,
            restore_ms,
            at(marks.end).or(Some(u64::MAX)),
        ];
        let names = ["before", "during", "after"];
        let phases = (0..3)
            .filter_map(|i| {
                let (from, to) = (bounds[i]?, bounds[i + 1]?);
                let in_phase: Vec<&ClientRecord> = records
                    .iter()
                    .filter(|r| (from..to).contains(&(r.started.as_millis() as u64)))
                    .collect();
                let counters = |k: usize| marks.counters.get(k);
                let connections_by_tier = match (counters(i), counters(i + 1)) {
                    (Some(a), Some(b)) => b
                        .iter()
                        .map(|(tier, n)| (*tier, n.saturating_sub(*a.get(tier).unwrap_or(&0))))
                        .collect(),
                    _ => BTreeMap::new(),
                };
                Some(phase(names[i], &in_phase, connections_by_tier))
            })
            .collect::<Vec<_>>();
        let failed: usize = phases.iter().map(|p| p.failed).sum();
        let switch_ms = switch.and_then(|e| fault_unix.map(|f| e.at_unix_ms.saturating_sub(f)));
        let mut objectives = Vec::new();
        let o = options.objectives;
        if let Some(limit) = o.max_failed {
            objectives.push(ObjectiveResult {
                name: "max-failed",
                limit: limit.to_string(),
                measured: failed.to_string(),
                met: failed <= limit,
            });
        }
        for (name, limit, measured) in [
            ("max-switch", o.max_switch, switch_ms),
            ("max-failback", o.max_failback, failback_ms),
        ] {
            if let Some(limit) = limit {
                objectives.push(ObjectiveResult {
                    name,
                    limit: format!("{} ms", limit.as_millis()),
                    measured: measured.map_or("never".to_string(), |m| format!("{m} ms")),
                    met: measured.is_some_and(|m| u128::from(m) <= limit.as_millis()),
                });
            }
        }
        Report {
            pool: options.pool.clone(),
            through: self.through.to_string(),
            fault: match &options.fault {
                Fault::Maint => "maint".to_string(),
                Fault::Drain => "drain".to_string(),
                Fault::Command { fault, .. } => format!("command {fault:?}"),
            },
            hold_ms: options.hold.as_millis() as u64,
            original_tier: self.original_tier,
            failover_tier: switch.and_then(|e| e.new.parse().ok()),
            detection_ms,
            switch_ms,
            failback_ms,
            phases,
            timeline: Vec::new(),
            objectives,
            aborted: None,
            restored: false,
        }
    }
}

fn phase(
    name: &'static str,
    records: &[&ClientRecord],
    connections_by_tier: BTreeMap<u32, u64>,
) -> PhaseReport {
    let mut latencies: Vec<Duration> = records
        .iter()
        .filter(|r| r.served_by.is_ok())
        .map(|r| r.latency)
        .collect();
    latencies.sort();
    let quantile = |q: f64| {
        if latencies.is_empty() {
            return None;
        }
        let index = ((latencies.len() - 1) as f64 * q).round() as usize;
        Some(latencies[index].as_secs_f64() * 1000.0)
    };
    PhaseReport {
        name,
        probes: records.len(),
        failed: records.iter().filter(|r| r.served_by.is_err()).count(),
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        max_ms: quantile(1.0),
        connections_by_tier,
    }
}

// === impl Report ===

impl Report {
    /// Objectives missed, by name.
    pub fn missed(&self) -> Vec<&ObjectiveResult> {
        self.objectives.iter().filter(|o| !o.met).collect()
    }

    /// The timeline and the per-phase table, for a terminal.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
        let _ = writeln!(
            out,
            "drill of pool {} through {} (fault: {}, hold {} ms)",
            self.pool, self.through, self.fault, self.hold_ms
        );
        let _ = writeln!(out, "\ntimeline (ms after start)");
        for m in &self.timeline {
            let _ = writeln!(out, "  {:>7}  {}", m.at_ms, m.what);
        }
        let _ = writeln!(
            out,
            "\n{:<8} {:>7} {:>7} {:>9} {:>9} {:>9}  connections by tier",
            "phase", "probes", "failed", "p50 ms", "p99 ms", "max ms"
        );
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        for p in &self.phases {
            let tiers: Vec<String> = p
                .connections_by_tier
                .iter()
                .map(|(t, n)| format!("tier {t}: {n}"))
                .collect();
            let _ = writeln!(
                out,
                "{:<8} {:>7} {:>7} {:>9} {:>9} {:>9}  {}",
                p.name,
                p.probes,
                p.failed,
                f(p.p50_ms),
                f(p.p99_ms),
                f(p.max_ms),
                tiers.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "\ndetection {}, switch {} (tier {} -> {}), failback {}",
            ms(self.detection_ms),
            ms(self.switch_ms),
            self.original_tier,
            self.failover_tier
                .map_or("none".to_string(), |t| t.to_string()),
            ms(self.failback_ms)
        );
        for o in &self.objectives {
            let verdict = if o.met { "met" } else { "MISSED" };
            let _ = writeln!(
                out,
                "objective {}: {verdict} (limit {}, measured {})",
                o.name, o.limit, o.measured
            );
        }
        if let Some(why) = &self.aborted {
            let _ = writeln!(out, "aborted: {why}");
        }
        let restored = if self.restored {
            "everything the drill changed was put back"
        } else {
            "NOT everything the drill changed could be put back: check the pool"
        };
        let _ = writeln!(out, "{restored}");
        out
    }
}

// === impl AdminClient ===

impl AdminClient<'_> {
    async fn status(&self) -> Result<StatusView, String> {
        let (code, body) = crate::admin::request(self.addr, Method::GET, "/status", None).await?;
        if code != 200 {
            return Err(format!(
                "the admin API at {} answered {code} to /status: {}",
                self.addr,
                body.trim()
            ));
        }
        serde_json::from_str(&body).map_err(|e| {
            format!(
                "the admin API at {} sent a status this version cannot read: {e}",
                self.addr
            )
        })
    }

    async fn events(&self, since: u64) -> Result<Vec<EventView>, String> {
        let path = format!("/events?since={since}");
        let (code, body) = crate::admin::request(self.addr, Method::GET, &path, None).await?;
        if code != 200 {
            return Err(format!(
                "the admin API at {} answered {code} to /events: {}",
                self.addr,
                body.trim()
            ));
        }
        serde_json::from_str::<EventList>(&body)
            .map(|list| list.events)
            .map_err(|e| format!("the admin API at {} sent unreadable events: {e}", self.addr))
    }

    async fn post(&self, path: &str) -> Result<(u16, String), String> {
        crate::admin::request(self.addr, Method::POST, path, self.token).await
    }

    async fn post_ok(&self, path: &str) -> Result<(), String> {
        let (code, body) = self.post(path).await?;
        if code == 200 {
            return Ok(());
        }
        Err(format!(
            "the admin API at {} answered {code} to POST {path}: {}",
            self.addr,
            body.trim()
        ))
    }

    async fn set(&self, pool: &str, upstream: &str, action: &str) -> Result<(), String> {
        self.post_ok(&format!(
            "/pools/{}/upstreams/{}/{action}",
            path_segment(pool),
            path_segment(upstream)
        ))
        .await
    }
}

fn pool_of<'a>(status: &'a StatusView, name: &str) -> Result<&'a PoolView, String> {
    status
        .pools
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| format!("pool {name:?} disappeared from the instance (a reload?)"))
}

/// The first address a listener of `pool` is bound to, with a wildcard bind turned into
/// the loopback address of its family.
fn probe_address(status: &StatusView, pool: &str) -> Option<SocketAddr> {
    let bind = status
        .listeners
        .iter()
        .filter(|l| l.pool == pool)
        .flat_map(|l| l.binds.iter())
        .find_map(|b| b.parse::<SocketAddr>().ok())?;
    let ip = match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Some(SocketAddr::new(ip, bind.port()))
}

/// Escapes what a path segment cannot carry as is (an upstream named by its address
/// has a `:`; `%` must not be read as an escape).
fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Runs an operator's command with `sh -c`, bounded in time; fails on a non-zero exit.
async fn run_command(command: &str) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    match tokio::time::timeout(COMMAND_LIMIT, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{command:?} failed ({status})")),
        Ok(Err(e)) => Err(format!("{command:?}: {e}")),
        Err(_) => Err(format!(
            "{command:?} did not finish within {}s",
            COMMAND_LIMIT.as_secs()
        )),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn millis_opt<S: serde::Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(d) => s.serialize_some(&(d.as_millis() as u64)),
        None => s.serialize_none(),
    }
}

/// Where `--json` writes the report.
pub fn write_json(report: &Report, path: &PathBuf) -> Result<(), String> {
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
}
