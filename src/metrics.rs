//! Counters and gauges shared by the hot path and the readers (admin, demo, tests).
//!
//! Everything is a relaxed atomic: the hot path only ever adds, and readers tolerate a
//! value that is a few increments behind. Objects here outlive routing snapshots, so a
//! reload or failover never resets a counter of an upstream that stays.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Why a connect attempt to an upstream failed; the `reason` label of
/// `switchyard_upstream_connect_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectFailure {
    Refused,
    Reset,
    Unreachable,
    Timeout,
    /// Anything else, e.g. out of file descriptors.
    Error,
}

/// Per-listener counters.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    /// Clients whose every connect attempt failed.
    pub connections_failed: AtomicU64,
    /// Clients closed at once because `max_connections` was reached.
    pub rejected_max_connections: AtomicU64,
    /// Clients closed at once because no upstream was usable and `when_all_down = "reject"`.
    pub rejected_no_upstream: AtomicU64,
    /// Bytes from clients to upstreams.
    pub bytes_in: AtomicU64,
    /// Bytes from upstreams to clients.
    pub bytes_out: AtomicU64,
}

/// Per-upstream counters, kept across snapshots by (pool, address).
#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub connections_active: AtomicU64,
    pub connections_total: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub checks_passed: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Failed connect attempts on real traffic since the last success (passive check).
    pub connect_failures_in_a_row: AtomicU32,
    connect_failures: [AtomicU64; ConnectFailure::ALL.len()],
}

/// Per-pool counters, kept across reloads by pool name.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Active tier moved to a worse tier (or away from a tier with nothing usable).
    pub failovers: AtomicU64,
    /// Active tier moved back to a better tier.
    pub failbacks: AtomicU64,
}

// === impl ConnectFailure ===

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 5] = [
        ConnectFailure::Refused,
        ConnectFailure::Reset,
        ConnectFailure::Unreachable,
        ConnectFailure::Timeout,
        ConnectFailure::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Reset => "reset",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Error => "error",
        }
    }

    pub fn from_io(error: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match error.kind() {
            ConnectionRefused => ConnectFailure::Refused,
            ConnectionReset | ConnectionAborted | BrokenPipe => ConnectFailure::Reset,
            HostUnreachable | NetworkUnreachable | AddrNotAvailable | NetworkDown => {
                ConnectFailure::Unreachable
            }
            TimedOut => ConnectFailure::Timeout,
            _ => ConnectFailure::Error,
        }
    }
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl UpstreamStats ===

impl UpstreamStats {
    pub fn count_connect_failure(&self, reason: ConnectFailure) {
        self.connect_failures[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn connect_failures(&self, reason: ConnectFailure) -> u64 {
        self.connect_failures[reason as usize].load(Relaxed)
    }

    pub fn connect_failures_total(&self) -> u64 {
        self.connect_failures.iter().map(|c| c.load(Relaxed)).sum()
    }
}
