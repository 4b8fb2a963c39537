//! switchyard in this test's runtime, configs for it, and what to wait for in it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use switchyard::Proxy;
use switchyard::config::Config;
use switchyard::shutdown::Shutdown;

use super::{SOON, TestDir, wait_until};

pub struct TestProxy {
    pub proxy: Proxy,
    pub shutdown: Shutdown,
    pub config: Config,
    pub reloader: std::sync::Arc<switchyard::reload::Reloader>,
    pub admin: Option<SocketAddr>,
    /// The file the config was loaded from; rewrite it and reload.
    pub config_path: std::path::PathBuf,
    /// Holds the config and what it names; goes after the proxy (fields drop after
    /// `drop` has begun the shutdown).
    _dir: TestDir,
}

impl TestProxy {
    /// The first bound address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.proxy.listener(name).expect("listener exists").addrs[0]
    }

    /// Replaces the config file's content (the next reload reads it).
    pub fn rewrite_config(&self, toml: &str) {
        std::fs::write(&self.config_path, toml).expect("write test config");
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.begin();
    }
}

/// Starts a proxy in this runtime from TOML text (binds should use port 0), loaded
/// from a file of its own so that tests can rewrite it and reload.
pub fn start_proxy(toml: &str) -> TestProxy {
    start_proxy_in(TestDir::new(), "switchyard.toml", toml)
}

/// Like [`start_proxy`], from `dir/file_name`; the proxy owns `dir` (and whatever the
/// test put in it) until it is dropped.
pub fn start_proxy_in(dir: TestDir, file_name: &str, toml: &str) -> TestProxy {
    let config_path = dir.join(file_name);
    std::fs::write(&config_path, toml).expect("write test config");
    let config = Config::load(&config_path)
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{toml}"));
    let listeners = switchyard::bind_all(&config).expect("bind test listeners");
    let shutdown = Shutdown::new();
    let running = switchyard::start(config.clone(), listeners, &shutdown).expect("start proxy");
    TestProxy {
        proxy: running.proxy,
        shutdown,
        config,
        reloader: running.reloader,
        admin: running.admin_addr,
        config_path,
        _dir: dir,
    }
}

/// A config with one listener `front` on port 0 forwarding to pool `p` whose upstreams
/// are `(address, priority)`; `pool_extra` lines go into `[pools.p]`.
pub fn one_pool_config(upstreams: &[(SocketAddr, u32)], pool_extra: &str) -> String {
    let list: Vec<String> = upstreams
        .iter()
        .map(|(addr, priority)| format!("{{ address = \"{addr}\", priority = {priority} }}"))
        .collect();
    format!(
        "[listeners.front]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[pools.p]\n{pool_extra}\nupstreams = [{}]\n\n[pools.p.health]\nenabled = false\n",
        list.join(", ")
    )
}

/// Like [`one_pool_config`] but with `health` as the `[pools.p.health]` table.
pub fn checked_pool_config(
    upstreams: &[(SocketAddr, u32)],
    pool_extra: &str,
    health: &str,
) -> String {
    one_pool_config(upstreams, pool_extra).replace("[pools.p.health]\nenabled = false\n", health)
}

/// Listener `front` → pool `p` with named upstreams `(name, address, priority)`,
/// `pool_extra` lines in `[pools.p]` and `health` as the whole health table.
pub fn pool_config(
    upstreams: &[(&str, SocketAddr, u32)],
    pool_extra: &str,
    health: &str,
) -> String {
    let list: Vec<String> = upstreams
        .iter()
        .map(|(name, addr, priority)| {
            format!("{{ name = \"{name}\", address = \"{addr}\", priority = {priority} }}")
        })
        .collect();
    format!(
        "[listeners.front]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[pools.p]\n{pool_extra}\nupstreams = [{}]\n\n{health}\n",
        list.join(", ")
    )
}

/// Health settings that decide quickly; `expect` matches the backends' greeting.
pub const FAST_HEALTH: &str = "[pools.p.health]\ninterval = \"200ms\"\nfast_interval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2\nsend = \"PING\\r\\n\"\nexpect = \"hello\"\n";

/// Waits for an upstream event of `upstream` whose new state is `new`; returns it.
pub async fn wait_event(
    proxy: &TestProxy,
    upstream: &str,
    new: &str,
    limit: Duration,
) -> switchyard::events::Event {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(event) = proxy
            .proxy
            .events
            .all()
            .into_iter()
            .find(|e| e.upstream.as_deref() == Some(upstream) && e.new == new)
        {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no event {upstream} -> {new} within {limit:?}: {:#?}",
            proxy.proxy.events.all()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The pool's active tier priority as routing sees it now.
pub fn active_priority(proxy: &TestProxy, pool: &str) -> Option<u32> {
    proxy
        .proxy
        .snapshot
        .load()
        .pool(pool)
        .and_then(|r| r.active_priority())
}

/// Waits until every upstream of pool `p` passed its first active check.
pub async fn wait_first_checks(proxy: &TestProxy) {
    let route = proxy
        .proxy
        .snapshot
        .load()
        .pool("p")
        .expect("pool p")
        .clone();
    wait_until(SOON, "first checks passed", || {
        route.upstreams.iter().all(|u| {
            u.stats
                .checks_passed
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        })
    })
    .await;
}
