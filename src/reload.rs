//! Hot reload (SPEC §4): SIGHUP and `POST /reload` share this one path.
//!
//! Load and validate the whole file first; compute the difference as data; bind new
//! listeners (one failed bind rejects everything, and nothing running has changed);
//! run the first health check of every new upstream; then hand the controller one
//! message that swaps routing atomically, and only then start and stop accept loops.
//! Any error leaves the old configuration serving, logged and counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::Proxy;
use crate::config::{Config, ConfigError, PoolConfig};
use crate::error::StartError;
use crate::health::{self, CheckFailure};

/// What a reload changed, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    pub listeners_changed: Vec<String>,
    pub pools_added: Vec<String>,
    pub pools_removed: Vec<String>,
    pub pools_changed: Vec<String>,
}

/// Counts for `switchyard_config_reloads_total{result}`.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub ok: AtomicU64,
    pub error: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Bind(#[from] StartError),
    #[error("the proxy is shutting down")]
    Stopped,
}

/// Reloads one running proxy from its config file; reloads never overlap.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    current: Mutex<Arc<Config>>,
    /// The admin token file in force, readable without waiting for a reload in progress.
    admin_token_file: arc_swap::ArcSwapOption<PathBuf>,
    proxy: Proxy,
    pub stats: Arc<ReloadStats>,
}

// === impl ConfigDiff ===

impl ConfigDiff {
    pub fn between(old: &Config, new: &Config) -> Self {
        let mut diff = Self::default();
        for l in &new.listeners {
            match old.listeners.iter().find(|o| o.name == l.name) {
                None => diff.listeners_added.push(l.name.clone()),
                Some(o) if o != l => diff.listeners_changed.push(l.name.clone()),
                Some(_) => {}
            }
        }
        for o in &old.listeners {
            if !new.listeners.iter().any(|l| l.name == o.name) {
                diff.listeners_removed.push(o.name.clone());
            }
        }
        // By name through a map: a search of the other file's pools for each pool was
        // 4 ms between two files of 1,000 pools.
        let old_pools = pools_by_name(old);
        let new_pools = pools_by_name(new);
        for p in &new.pools {
            match old_pools.get(p.name.as_str()) {
                None => diff.pools_added.push(p.name.clone()),
                Some(&o) if o != p => diff.pools_changed.push(p.name.clone()),
                Some(_) => {}
            }
        }
        for o in &old.pools {
            if !new_pools.contains_key(o.name.as_str()) {
                diff.pools_removed.push(o.name.clone());
            }
        }
        diff
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

// === impl Reloader ===

impl Reloader {
    /// `current` is the configuration `proxy` runs; `current.source` is reloaded.
    pub fn new(current: Config, proxy: Proxy) -> Self {
        Self {
            path: current.source.clone(),
            admin_token_file: arc_swap::ArcSwapOption::from_pointee(admin_token_file(&current)),
            current: Mutex::new(Arc::new(current)),
            proxy,
            stats: Arc::default(),
        }
    }

    /// The admin token file in force: `[admin] token_file` takes effect on reload.
    pub fn admin_token_file(&self) -> Option<Arc<PathBuf>> {
        self.admin_token_file.load_full()
    }

    /// The configuration in force.
    pub async fn current(&self) -> Arc<Config> {
        self.current.lock().await.clone()
    }

    /// Reloads the file. On any error nothing changes and the old config keeps serving.
    pub async fn reload(&self) -> Result<ConfigDiff, ReloadError> {
        let mut current = self.current.lock().await;
        match self.swap(&current).await {
            Ok((config, diff, took)) => {
                warn_about_restart_only_changes(&current, &config);
                let token_file = admin_token_file(&config);
                if admin_token_file(&current) != token_file {
                    info!(
                        token_file = %token_file.as_ref().map_or("(none: writes need no token)".into(), |p| p.display().to_string()),
                        "admin token_file changed: in force from now on"
                    );
                }
                self.admin_token_file.store(token_file.map(Arc::new));
                *current = config;
                self.stats.ok.fetch_add(1, Relaxed);
                info!(
                    file = %self.path.display(),
                    listeners_added = ?diff.listeners_added,
                    listeners_removed = ?diff.listeners_removed,
                    listeners_changed = ?diff.listeners_changed,
                    pools_added = ?diff.pools_added,
                    pools_removed = ?diff.pools_removed,
                    pools_changed = ?diff.pools_changed,
                    read_ms = took.read.as_secs_f64() * 1e3,
                    first_checks = took.first_checks,
                    first_checks_ms = took.checking.as_secs_f64() * 1e3,
                    swap_ms = took.swap.as_secs_f64() * 1e3,
                    "configuration reloaded"
                );
                Ok(diff)
            }
            Err(e) => {
                self.stats.error.fetch_add(1, Relaxed);
                error!(file = %self.path.display(), error = %e, "reload rejected; the previous configuration keeps serving");
                Err(e)
            }
        }
    }

    async fn swap(
        &self,
        current: &Config,
    ) -> Result<(Arc<Config>, ConfigDiff, ReloadTimes), ReloadError> {
        let started = Instant::now();
        // Off the async threads: reading a large file takes tens of milliseconds, which
        // the connections of a runtime worker would otherwise wait out.
        let path = self.path.clone();
        let new = match tokio::task::spawn_blocking(move || Config::load(&path)).await {
            Ok(loaded) => Arc::new(loaded?),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(ReloadError::Stopped),
        };
        let diff = ConfigDiff::between(current, &new);
        let prepared = self.proxy.listeners.prepare(&new)?;
        let read = started.elapsed();
        let checks = first_checks(current, &new, &self.proxy.listeners.worker_runtimes()).await;
        let first_checks = checks.len();
        let checking = started.elapsed() - read;
        self.proxy
            .controller
            .reload(new.clone(), checks)
            .await
            .map_err(|_| ReloadError::Stopped)?;
        self.proxy.listeners.apply(prepared);
        let swap = started.elapsed() - read - checking;
        let took = ReloadTimes {
            read,
            first_checks,
            checking,
            swap,
        };
        Ok((new, diff, took))
    }
}

/// Where a reload's time went, for its log line: with many new upstreams the first
/// checks are most of it.
struct ReloadTimes {
    /// Reading and validating the file, binding new listeners.
    read: Duration,
    first_checks: usize,
    checking: Duration,
    /// The controller's swap and the listeners' changes.
    swap: Duration,
}

/// The first health check of every upstream that `new` adds (by pool and address),
/// all at once, each bounded by its pool's `health.timeout`: not on the checks' grid nor
/// spread as the checkers' first checks are, since the reload waits for them. With
/// 1,000 new upstreams the checks take both cores, three quarters of it in the kernel's
/// TCP (perf); running them as one future per worker instead of a task each changed
/// nothing measurable. With worker runtimes (the `per_thread` scheduler) the checks are
/// dealt out over their threads: on the controller's one thread alone, 1,000 checks
/// took half as long again.
async fn first_checks(
    current: &Config,
    new: &Config,
    runtimes: &[tokio::runtime::Handle],
) -> HashMap<(String, SocketAddr), Result<(), CheckFailure>> {
    let known_pools = pools_by_name(current);
    let mut checks = JoinSet::new();
    let mut next_runtime = runtimes.iter().cycle();
    for pool in new.pools.iter().filter(|p| p.health.enabled) {
        let known = known_pools.get(pool.name.as_str());
        for upstream in &pool.upstreams {
            let stays =
                known.is_some_and(|k| k.upstreams.iter().any(|u| u.address == upstream.address));
            if stays {
                continue;
            }
            let key = (pool.name.clone(), upstream.address);
            let pool = pool.clone();
            let upstream = upstream.clone();
            let check = async move {
                let checked = health::check(&upstream, &pool).await;
                (key, checked)
            };
            match next_runtime.next() {
                Some(runtime) => checks.spawn_on(check, runtime),
                None => checks.spawn(check),
            };
        }
    }
    let mut results = HashMap::new();
    while let Some(done) = checks.join_next().await {
        // A check that could not run (we are out of descriptors) leaves the upstream
        // as at start-up: up until its first check.
        if let Ok((key, health::Checked::Tested(result))) = done {
            results.insert(key, result);
        }
    }
    results
}

fn pools_by_name(config: &Config) -> HashMap<&str, &Arc<PoolConfig>> {
    config.pools.iter().map(|p| (p.name.as_str(), p)).collect()
}

fn admin_token_file(config: &Config) -> Option<PathBuf> {
    config.admin.as_ref()?.token_file.clone()
}

fn warn_about_restart_only_changes(old: &Config, new: &Config) {
    if old.runtime != new.runtime {
        warn!("[runtime] changed: it takes effect at the next restart");
    }
    if (&old.log.level, old.log.format) != (&new.log.level, new.log.format) {
        warn!(
            "[log] changed: it takes effect at the next restart (--log-level and RUST_LOG still apply)"
        );
    }
    if old.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen) {
        warn!("admin.listen changed: the admin server moves at the next restart");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn diff_names_what_was_added_removed_and_changed() {
        let old = config(
            "[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[listeners.b]\nbind = \"127.0.0.1:2\"\npool = \"p\"\n[listeners.c]\nbind = \"127.0.0.1:3\"\npool = \"q\"\n\
             [pools.p]\nupstreams = [{ address = \"127.0.0.1:10\" }]\n[pools.q]\nupstreams = [{ address = \"127.0.0.1:11\" }]\n",
        );
        let new = config(
            "[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[listeners.b]\nbind = \"127.0.0.1:2\"\npool = \"r\"\n[listeners.d]\nbind = \"127.0.0.1:4\"\npool = \"p\"\n\
             [pools.p]\nupstreams = [{ address = \"127.0.0.1:10\", priority = 1 }]\n[pools.r]\nupstreams = [{ address = \"127.0.0.1:12\" }]\n",
        );
        let diff = ConfigDiff::between(&old, &new);
        assert_eq!(
            diff,
            ConfigDiff {
                listeners_added: vec!["d".into()],
                listeners_removed: vec!["c".into()],
                listeners_changed: vec!["b".into()],
                pools_added: vec!["r".into()],
                pools_removed: vec!["q".into()],
                pools_changed: vec!["p".into()],
            }
        );
        assert!(ConfigDiff::between(&new, &new).is_empty());
    }
}
