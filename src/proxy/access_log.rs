//! The access log (`[log] connections = true`): one line per finished client
//! connection, written when its record is dropped so that every way a connection can
//! end (early returns included) writes exactly one line.
//!
//! The record is plain data owned by the connection's task and filled in as the
//! connection goes: no lock, and no allocation unless the log is on.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use super::copy::{CopyEnd, CopyOutcome, Side};
use crate::metrics::RejectReason;
use crate::snapshot::Upstream;

/// How a client connection ended; the `end` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    ClientClosed,
    UpstreamClosed,
    IdleTimeout,
    /// Closed because its upstream was marked down or put in maint.
    UpstreamDown,
    /// Closed at the end of the shutdown grace.
    Shutdown,
    /// No upstream could be connected (every attempt failed, our own resources ran
    /// out, or a reload removed the pool).
    ConnectFailed,
    /// The upstream never answered the client's bytes (`first_byte_timeout`, or it
    /// closed or went down first) and they could not be replayed elsewhere.
    Unanswered,
    Rejected(RejectReason),
}

/// What the access log line of one connection says.
pub struct ConnectionRecord<'a> {
    enabled: bool,
    listener: &'a str,
    /// The client's address: the TCP peer, or the source of its PROXY header.
    pub client: SocketAddr,
    started: Instant,
    pool: Option<String>,
    upstream: Option<Arc<Upstream>>,
    attempts: usize,
    connect_time: Option<Duration>,
    bytes_in: u64,
    bytes_out: u64,
    pub end: End,
}

// === impl End ===

impl End {
    /// How a copy ended, from the connection's point of view.
    pub fn of_copy(outcome: &CopyOutcome, shutting_down: bool) -> Self {
        match outcome.end {
            CopyEnd::Idle => End::IdleTimeout,
            CopyEnd::Closed if shutting_down => End::Shutdown,
            CopyEnd::Closed => End::UpstreamDown,
            CopyEnd::Done | CopyEnd::Error => match outcome.first_to_end {
                Some(Side::Upstream) => End::UpstreamClosed,
                _ => End::ClientClosed,
            },
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client_closed"),
            End::UpstreamClosed => f.write_str("upstream_closed"),
            End::IdleTimeout => f.write_str("idle_timeout"),
            End::UpstreamDown => f.write_str("upstream_down"),
            End::Shutdown => f.write_str("shutdown"),
            End::ConnectFailed => f.write_str("connect_failed"),
            End::Unanswered => f.write_str("unanswered"),
            End::Rejected(reason) => write!(f, "rejected:{}", reason.as_str()),
        }
    }
}

// === impl ConnectionRecord ===

impl<'a> ConnectionRecord<'a> {
    pub fn new(enabled: bool, listener: &'a str, client: SocketAddr) -> Self {
        Self {
            enabled,
            listener,
            client,
            started: Instant::now(),
            pool: None,
            upstream: None,
            attempts: 0,
            connect_time: None,
            bytes_in: 0,
            bytes_out: 0,
            end: End::ClientClosed,
        }
    }

    /// A client refused before it was served.
    pub fn reject(&mut self, reason: RejectReason) {
        self.end = End::Rejected(reason);
    }

    /// The client reached `upstream` of `pool` after `attempts` connect attempts.
    pub fn connected(
        &mut self,
        pool: &str,
        upstream: &Arc<Upstream>,
        attempts: usize,
        took: Duration,
    ) {
        self.attempts += attempts;
        if self.enabled {
            self.pool = Some(pool.to_string());
            self.upstream = Some(upstream.clone());
            self.connect_time = Some(took);
        }
    }

    /// Attempts that did not end in a connection (they count in `attempts`).
    pub fn attempted(&mut self, attempts: usize) {
        self.attempts += attempts;
    }

    /// Bytes moved before the copy (the opening exchange).
    pub fn moved(&mut self, client_to_upstream: u64, upstream_to_client: u64) {
        self.bytes_in += client_to_upstream;
        self.bytes_out += upstream_to_client;
    }

    pub fn copied(&mut self, outcome: &CopyOutcome, shutting_down: bool) {
        self.bytes_in += outcome.client_to_upstream;
        self.bytes_out += outcome.upstream_to_client;
        self.end = End::of_copy(outcome, shutting_down);
    }
}

impl Drop for ConnectionRecord<'_> {
    fn drop(&mut self) {
        if !self.enabled {
            return;
        }
        let duration_ms = millis(self.started.elapsed());
        let upstream = self.upstream.as_deref();
        info!(
            target: "switchyard::access",
            listener = %self.listener,
            client = %self.client,
            pool = self.pool.as_deref().map(tracing::field::display),
            upstream = upstream.map(|u| tracing::field::display(u.label())),
            tier = upstream.map(|u| u.config.priority),
            attempts = self.attempts,
            connect_ms = self.connect_time.map(millis),
            duration_ms,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            end = %self.end,
            "connection closed"
        );
    }
}

/// Milliseconds with microsecond precision: connect times on a LAN are sub-millisecond.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}
