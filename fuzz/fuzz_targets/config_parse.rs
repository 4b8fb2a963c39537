//! Feeds arbitrary text to the config loader (`Config::parse`, what `Config::load` runs on
//! the file's text) and checks what `check` and reload rely on: no panic; a rejected file
//! has at least one problem, each at a real position (1-based line and column inside the
//! text) with a message; an accepted one has listeners and upstreams, every duration
//! within its bounds, and a summary that renders.
//!
//! The file "lives" in a folder that does not exist, so relative certificate paths fail
//! to read. Inputs that would leave the machine or block are skipped: an upstream host
//! name or SRV name (resolved through DNS) or an absolute certificate path (`/dev/zero`
//! never ends).
//!
//! Run: `cargo fuzz run config_parse` from the repository root (nightly, or
//! `RUSTC_BOOTSTRAP=1` on stable).

#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use switchyard::config::raw::RawConfig;
use switchyard::config::{Config, ConfigError, Failback};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !stays_local(text) {
        return;
    }
    match Config::parse(text, Path::new("/nonexistent/switchyard.toml")) {
        Ok(config) => accepted(&config),
        Err(ConfigError::Invalid { problems }) => {
            assert!(!problems.is_empty(), "rejected without a problem");
            let lines = text.split('\n').count();
            for p in &problems {
                assert!(p.line >= 1 && p.line <= lines, "{p}: line outside the text");
                assert!(p.column >= 1, "{p}");
                assert!(!p.message.is_empty(), "{p}");
                assert!(!p.to_string().is_empty());
            }
        }
        Err(e @ ConfigError::Read { .. }) => panic!("parse never reads the config file: {e}"),
    }
});

/// Whether loading `text` touches only this machine's memory: every upstream is an
/// IP literal and every TLS file path is relative (under the missing folder).
fn stays_local(text: &str) -> bool {
    let Ok(raw) = toml::from_str::<RawConfig>(text) else {
        return true;
    };
    let relative = |path: &str| !path.starts_with('/');
    let upstreams_are_ips = raw.pools.values().all(|pool| {
        pool.get_ref().upstreams.get_ref().iter().all(|u| {
            let u = u.get_ref();
            u.srv.is_none()
                && u.address
                    .as_ref()
                    .is_none_or(|a| a.get_ref().parse::<SocketAddr>().is_ok())
        })
    });
    let listener_paths_relative = raw.listeners.values().all(|l| {
        let Some(tls) = &l.get_ref().tls else {
            return true;
        };
        let t = tls.get_ref();
        t.cert.iter().chain(&t.key).all(|p| relative(p.get_ref()))
            && t.certs.iter().all(|c| {
                relative(c.get_ref().cert.get_ref()) && relative(c.get_ref().key.get_ref())
            })
            && relative(t.client_ca.get_ref())
    });
    let pool_paths_relative = raw.pools.values().all(|p| {
        let Some(tls) = &p.get_ref().tls else {
            return true;
        };
        let t = tls.get_ref();
        t.ca.iter().all(|c| relative(c.get_ref()))
            && relative(t.client_cert.get_ref())
            && relative(t.client_key.get_ref())
    });
    upstreams_are_ips && listener_paths_relative && pool_paths_relative
}

fn accepted(config: &Config) {
    assert!(!config.listeners.is_empty());
    let within = |d: Duration, min_ms: u64| d >= Duration::from_millis(min_ms) && d <= DAY;
    assert!(within(config.runtime.shutdown_grace, 1));
    for listener in &config.listeners {
        assert!(!listener.binds.is_empty());
        assert!(within(listener.handshake_timeout, 10));
    }
    for pool in &config.pools {
        assert!(!pool.upstreams.is_empty());
        assert!(within(pool.connect_timeout, 1));
        assert!(within(pool.resolve_interval, 1000));
        for d in [
            pool.hedge_after,
            pool.idle_timeout,
            pool.drain_after_failback,
        ]
        .into_iter()
        .flatten()
        {
            assert!(within(d, 1));
        }
        if let Failback::After(d) = pool.failback {
            assert!(within(d, 1));
        }
        if let Some(d) = pool.tcp_keepalive {
            assert!(d.subsec_nanos() == 0 && (1..=32767).contains(&d.as_secs()));
        }
        let h = &pool.health;
        assert!(within(h.interval, 10) && within(h.fast_interval, 10) && within(h.timeout, 1));
        let o = &pool.outlier;
        assert!(within(o.base_ejection, 1) && within(o.max_ejection, 1));
        assert!(o.base_ejection <= o.max_ejection);
    }
    assert!(!config.summary().is_empty());
}
