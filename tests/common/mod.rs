//! Shared test fixtures, by topic: an in-process proxy on port 0 ([`proxy`]), loopback
//! upstreams ([`upstream`]), clients ([`client`]), the admin API ([`admin`]), the
//! binary as a child process ([`child`]), real servers ([`servers`], [`pg_crash`]) and
//! real client libraries ([`real_clients`]); polling with a deadline instead of sleeps.
//! benches/failover.rs includes it too, for the real servers and their clients.

// Each file in tests/ is a crate of its own that compiles this module again and uses
// a different part of it: what one of them does not use (a fixture, or a whole topic's
// re-export) would warn in that crate though another one uses it.
#![allow(dead_code, unused_imports)]

pub mod admin;
pub mod child;
pub mod client;
pub mod events;
pub mod patroni;
pub mod pg_crash;
pub mod proxy;
pub mod real_clients;
pub mod servers;
pub mod upstream;

pub use admin::*;
pub use child::*;
pub use client::*;
pub use events::*;
pub use patroni::*;
pub use pg_crash::*;
pub use proxy::*;
pub use real_clients::*;
pub use servers::*;
pub use upstream::*;

use std::time::Duration;

use tokio::time::Instant;

/// Generous bound for anything that should happen "at once" on a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(10);

/// Set (to anything but empty or `0`) to keep every test's folder for a look afterwards;
/// each one kept is named on the test's stderr.
pub const KEEP_TEST_DIRS: &str = "SWITCHYARD_KEEP_TEST_DIRS";

/// A fresh private folder for one test's files, removed with all it holds when this
/// drops: at the end of the test and, as unwinding drops it too, when the test fails.
/// It must outlive whatever still reads the folder: a proxy re-reads its config on
/// reload, so whoever owns a child process (or an in-process proxy) also owns its folder
/// and drops it after stopping that. `TestDir::new().join(..)` drops it at once: bind it.
pub struct TestDir(std::path::PathBuf);

impl TestDir {
    pub fn new() -> Self {
        Self(test_dir())
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for TestDir {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TestDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TestDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let keep = std::env::var_os(KEEP_TEST_DIRS).is_some_and(|v| !v.is_empty() && v != "0");
        if keep {
            eprintln!("{KEEP_TEST_DIRS}: kept {}", self.0.display());
        } else {
            // Errors are ignored: a panic here, while unwinding from a failed test,
            // would abort the whole run and hide that failure.
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh private folder, for [`TestDir`] to own.
fn test_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("switchyard-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// Polls `condition` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Deterministic pseudo-random bytes: the same `seed` gives the same data.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    data
}

/// Unix milliseconds now, comparable with event timestamps.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
