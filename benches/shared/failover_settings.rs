//! The failover settings both benches use, so that benches/scale.rs's "failover with
//! many pools" measures the same thing as benches/failover.rs.

use std::time::Duration;

/// Proxy settings, the same for every proxy measured.
pub const CHECK_INTERVAL_MS: u64 = 200;
pub const CHECK_FAST_INTERVAL_MS: u64 = 100;
pub const CHECK_TIMEOUT_MS: u64 = 100;
pub const RISE: u32 = 2;
pub const FALL: u32 = 2;
pub const CONNECT_TIMEOUT_MS: u64 = 300;
pub const CONNECT_ATTEMPTS: u32 = 3;
pub const CONSECUTIVE_FAILURES: u32 = 2;

/// The client stream.
pub const CLIENT_EVERY: Duration = Duration::from_millis(2);
pub const LEAD_IN: Duration = Duration::from_secs(1);
/// The failover window after the injection, in which failures and latency are counted.
pub const WINDOW: Duration = Duration::from_secs(2);
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Upstreams' accept queue: small, so that few connections fill it for a black hole.
pub const UPSTREAM_BACKLOG: i32 = 16;
