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
    /// The TLS handshake with the upstream failed (e.g. an untrusted certificate).
    Tls,
    /// Connected, but the client's bytes got no answer within `first_byte_timeout`.
    FirstByteTimeout,
    /// Anything else. (Running out of our own descriptors, memory or ports is never
    /// an upstream's failure: see [`FailedReason::LocalResources`].)
    Error,
}

/// Per-listener counters.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    /// Clients closed after admission without reaching an upstream, every reason
    /// together (the sum of [`ListenerStats::failed`] over [`FailedReason::ALL`]).
    pub connections_failed: AtomicU64,
    /// The same clients by reason.
    failed: [AtomicU64; FailedReason::ALL.len()],
    /// Clients closed at once, by reason.
    rejected: [AtomicU64; RejectReason::ALL.len()],
    /// Bytes from clients to upstreams.
    pub bytes_in: AtomicU64,
    /// Bytes from upstreams to clients.
    pub bytes_out: AtomicU64,
}

/// Why an admitted client was closed without reaching an upstream; the `reason` label
/// of `switchyard_connections_failed_total`:
///
/// - `upstreams_failed`: every connect attempt failed, or every upstream tried closed
///   the connection before a byte flowed; each attempt was also counted against its
///   upstream in `switchyard_upstream_connect_failures_total`.
/// - `local_resources`: the proxy could not open a connection for lack of its own
///   resources: no descriptor (EMFILE, ENFILE), no kernel memory (ENOBUFS, ENOMEM) or
///   no ephemeral port (EADDRNOTAVAIL). Not counted against any upstream, and no other
///   upstream is tried (it would fail the same way).
/// - `removed_by_reload`: a reload removed the client's listener or pool in the instant
///   after it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedReason {
    UpstreamsFailed,
    LocalResources,
    RemovedByReload,
}

// === impl FailedReason ===

impl FailedReason {
    pub const ALL: [FailedReason; 3] = [
        FailedReason::UpstreamsFailed,
        FailedReason::LocalResources,
        FailedReason::RemovedByReload,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailedReason::UpstreamsFailed => "upstreams_failed",
            FailedReason::LocalResources => "local_resources",
            FailedReason::RemovedByReload => "removed_by_reload",
        }
    }
}

/// Why a client was closed at once; the `reason` label of
/// `switchyard_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// `max_connections` reached.
    MaxConnections,
    /// No usable upstream and `when_all_down = "reject"`.
    NoUpstream,
    /// The client's network is denied, or not allowed.
    Denied,
    /// A PROXY header from a peer not in `proxy_protocol_from`.
    UntrustedProxy,
    /// A malformed, oversized or truncated PROXY header.
    ProxyProtocol,
    /// The PROXY header, the ClientHello or the TLS handshake did not complete within
    /// `handshake_timeout` (one deadline for all of them, from accept).
    HandshakeTimeout,
    /// Not a TLS ClientHello where SNI routing needs one, or a malformed one.
    ClientHello,
    /// No SNI route matches and the listener has no default pool.
    NoRoute,
    /// The client's TLS handshake failed or timed out (e.g. no client certificate).
    TlsHandshake,
}

// === impl RejectReason ===

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::MaxConnections,
        RejectReason::NoUpstream,
        RejectReason::Denied,
        RejectReason::UntrustedProxy,
        RejectReason::ProxyProtocol,
        RejectReason::HandshakeTimeout,
        RejectReason::ClientHello,
        RejectReason::NoRoute,
        RejectReason::TlsHandshake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MaxConnections => "max_connections",
            RejectReason::NoUpstream => "no_upstream",
            RejectReason::Denied => "denied",
            RejectReason::UntrustedProxy => "untrusted_proxy",
            RejectReason::ProxyProtocol => "proxy_protocol",
            RejectReason::HandshakeTimeout => "handshake_timeout",
            RejectReason::ClientHello => "client_hello",
            RejectReason::NoRoute => "no_route",
            RejectReason::TlsHandshake => "tls_handshake",
        }
    }
}

// === impl ListenerStats ===

impl ListenerStats {
    pub fn reject(&self, reason: RejectReason) {
        self.rejected[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason as usize].load(Relaxed)
    }

    /// Counts a client closed without reaching an upstream.
    pub fn fail(&self, reason: FailedReason) {
        self.failed[reason as usize].fetch_add(1, Relaxed);
        self.connections_failed.fetch_add(1, Relaxed);
    }

    pub fn failed(&self, reason: FailedReason) -> u64 {
        self.failed[reason as usize].load(Relaxed)
    }
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
    /// Checks that never reached the upstream because the proxy was out of its own
    /// descriptors, memory or ports: neither a pass nor a failure.
    pub checks_not_run: AtomicU64,
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
    /// Resolutions of a DNS entry that failed or found nothing; the last set was kept.
    pub dns_failures: AtomicU64,
    /// Time from a client's arrival to its upstream connection, retries included.
    pub connect_seconds: Histogram,
}

/// Upper bounds (seconds) of the connect latency histogram's buckets.
pub const CONNECT_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram of atomics: observing is two relaxed adds and a short scan.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

// === impl ConnectFailure ===

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 7] = [
        ConnectFailure::Refused,
        ConnectFailure::Reset,
        ConnectFailure::Unreachable,
        ConnectFailure::Timeout,
        ConnectFailure::Tls,
        ConnectFailure::FirstByteTimeout,
        ConnectFailure::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Reset => "reset",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Tls => "tls",
            ConnectFailure::FirstByteTimeout => "first_byte_timeout",
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

// === impl Histogram ===

impl Histogram {
    pub fn observe(&self, value: std::time::Duration) {
        let seconds = value.as_secs_f64();
        let bucket = CONNECT_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(CONNECT_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(value.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Cumulative counts per bucket bound (the last is +Inf), the sum in seconds, and
    /// the count.
    pub fn read(&self) -> (Vec<u64>, f64, u64) {
        let mut running = 0;
        let cumulative: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| {
                running += b.load(Relaxed);
                running
            })
            .collect();
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        (cumulative, sum, running)
    }
}

/// Prometheus text exposition (format 0.0.4), built by hand: every value already lives
/// in our own atomics, so a registry would only copy them.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        use std::fmt::Write;
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        use std::fmt::Write;
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let (cumulative, sum, count) = histogram.read();
        for (i, count) in cumulative.iter().enumerate() {
            let bound = CONNECT_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let mut with_le = labels.to_vec();
            with_le.push(("le", &bound));
            self.sample(&format!("{name}_bucket"), &with_le, count);
        }
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, count);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(200));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (cumulative, sum, count) = h.read();
        assert_eq!(count, 3);
        assert_eq!(cumulative[0], 1);
        assert_eq!(cumulative[3], 2, "3 ms falls in the 5 ms bucket");
        assert_eq!(cumulative[CONNECT_BUCKETS.len() - 1], 2);
        assert_eq!(
            cumulative[CONNECT_BUCKETS.len()],
            3,
            "+Inf counts everything"
        );
        assert!((sum - 60.0032).abs() < 1e-6);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::default();
        e.sample("m", &[("a", "x\"y\\z\nw")], 1);
        assert_eq!(e.finish(), "m{a=\"x\\\"y\\\\z\\nw\"} 1\n");
    }
}
