//! Upstreams from DNS (SPEC §3 "Discovery"): one task per pool that has host-name or
//! SRV entries resolves each of them again every `resolve_interval` (sooner when the
//! answer's TTL is shorter) and tells the controller the entry's members when they
//! change. Members new to the entry are checked once before the controller hears of
//! them, like upstreams a reload adds. A failed or empty resolution changes nothing:
//! it is counted and logged (at most once a minute per entry), and the last members
//! stay.
//!
//! The controller defines nothing here; it owns the receiving end of [`Membership`]
//! messages and starts and stops the tasks.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{Instant, sleep_until};
use tracing::{info, warn};

use crate::config::{DnsEntry, PoolConfig, UpstreamConfig};
use crate::dns::{self, Resolver};
use crate::health::{self, CheckFailure};
use crate::metrics::PoolStats;

/// Each DNS question gives up after this long (or after the pool's interval, if
/// shorter): a server that never answers must not stall the next round.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// A failing entry is logged again only after this long.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The members of one DNS entry of a pool, as just resolved; never empty.
#[derive(Debug)]
pub struct Membership {
    pub pool: String,
    /// The entry, by its target as written.
    pub target: String,
    pub members: Vec<UpstreamConfig>,
    /// The first check of each member the entry did not have before, by (pool,
    /// address), as a reload hands them over.
    pub first_checks: HashMap<(String, SocketAddr), Result<(), CheckFailure>>,
    /// The controller's count of configurations when the task started: a message from
    /// a task started for an older configuration is ignored.
    pub epoch: u64,
}

pub type MembershipSender = mpsc::UnboundedSender<Membership>;

/// Starts the discovery task of `pool` if it has DNS entries.
pub fn spawn(
    pool: Arc<PoolConfig>,
    stats: Arc<PoolStats>,
    epoch: u64,
    to_controller: MembershipSender,
) -> Option<AbortHandle> {
    if pool.dns.is_empty() {
        return None;
    }
    let task = tokio::spawn(run(pool, stats, epoch, to_controller));
    Some(task.abort_handle())
}

/// What the task knows of one entry.
struct Tracked {
    members: Vec<UpstreamConfig>,
    next: Instant,
    /// Since when resolutions fail, and when that was last logged.
    failing: Option<(Instant, Instant)>,
}

async fn run(pool: Arc<PoolConfig>, stats: Arc<PoolStats>, epoch: u64, tx: MembershipSender) {
    let resolver = match Resolver::new(&pool.resolvers, QUERY_TIMEOUT.min(pool.resolve_interval)) {
        Ok(resolver) => resolver,
        Err(e) => {
            warn!(pool = %pool.name, error = %e, "DNS entries will not be resolved again; their upstreams stay as loaded");
            return;
        }
    };
    // Asked again at once: the load's answer did not keep its TTL, which may be shorter
    // than the interval, and records may have changed since.
    let start = Instant::now();
    let mut tracked: Vec<Tracked> = pool
        .dns
        .iter()
        .map(|entry| Tracked {
            members: members_of(&pool, entry),
            next: start,
            failing: None,
        })
        .collect();
    loop {
        let Some((i, due)) = tracked
            .iter()
            .map(|t| t.next)
            .enumerate()
            .min_by_key(|(_, at)| *at)
        else {
            return;
        };
        sleep_until(due).await;
        let entry = &pool.dns[i];
        let answer = resolver.resolve(&entry.query).await;
        let now = Instant::now();
        let t = &mut tracked[i];
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                stats.dns_failures.fetch_add(1, Relaxed);
                t.next = now + pool.resolve_interval;
                let (since, logged) = t.failing.get_or_insert((now, now - LOG_EVERY));
                if now.duration_since(*logged) >= LOG_EVERY {
                    warn!(pool = %pool.name, target = %entry.target, error = %e, failing_for = ?now.duration_since(*since), "DNS resolution failed; the entry keeps its last known upstreams");
                    *logged = now;
                }
                continue;
            }
        };
        if t.failing.take().is_some() {
            info!(pool = %pool.name, target = %entry.target, "DNS resolution works again");
        }
        t.next = now + pool.resolve_interval.min(answer.ttl);
        let members = entry.members(&answer);
        if members == t.members {
            continue;
        }
        let known: HashSet<SocketAddr> = t.members.iter().map(|m| m.address).collect();
        let first_checks = first_checks(
            &pool,
            members.iter().filter(|m| !known.contains(&m.address)),
        )
        .await;
        t.members = members.clone();
        let message = Membership {
            pool: pool.name.clone(),
            target: entry.target.clone(),
            members,
            first_checks,
            epoch,
        };
        if tx.send(message).is_err() {
            return;
        }
    }
}

/// The entry's members in the configuration the task started from.
fn members_of(pool: &PoolConfig, entry: &DnsEntry) -> Vec<UpstreamConfig> {
    pool.upstreams
        .iter()
        .filter(|u| u.discovered.is_some() && u.target == entry.target)
        .cloned()
        .collect()
}

/// One check of each new member, all at once, each bounded by the pool's timeout.
async fn first_checks<'a>(
    pool: &Arc<PoolConfig>,
    new: impl Iterator<Item = &'a UpstreamConfig>,
) -> HashMap<(String, SocketAddr), Result<(), CheckFailure>> {
    let mut results = HashMap::new();
    if !pool.health.enabled {
        return results;
    }
    let mut checks = JoinSet::new();
    for member in new.take(dns::MAX_RECORDS) {
        let (pool, member) = (pool.clone(), member.clone());
        checks.spawn(async move {
            let checked = health::check(&member, &pool).await;
            (member.address, checked)
        });
    }
    while let Some(done) = checks.join_next().await {
        // A check that could not run leaves the member as at start-up: up until its
        // first regular check.
        if let Ok((address, health::Checked::Tested(result))) = done {
            results.insert((pool.name.clone(), address), result);
        }
    }
    results
}
