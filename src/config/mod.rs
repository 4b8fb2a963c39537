//! The configuration: loading, validation and the typed model every other module reads.
//!
//! Pipeline: file text → [`raw::RawConfig`] (serde, strict: unknown keys are errors) →
//! [`validate`] (collects every problem, each with file, line and column) → [`Config`],
//! whose types cannot hold an invalid value. Nothing outside this module sees raw types.

mod health;
pub mod raw;
mod summary;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use health::{
    CheckKind, CheckTarget, HealthConfig, HttpCheck, HttpMethod, Password, PostgresCheck,
    PostgresRole, RedisCheck, RedisRole,
};
pub use ipnet::IpNet;

/// The largest `weight` of an upstream.
pub const MAX_WEIGHT: u32 = 256;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was loaded from; relative paths inside it resolve against its folder.
    pub source: PathBuf,
    pub runtime: RuntimeConfig,
    pub log: LogConfig,
    /// `None` when the file has no `[admin]` table: no admin server runs.
    pub admin: Option<AdminConfig>,
    /// In file order of their names (sorted), never empty.
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<Arc<PoolConfig>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Tokio worker threads; 0 in the file means one per CPU, resolved here.
    pub worker_threads: usize,
    /// How connections are spread over those threads.
    pub scheduler: Scheduler,
    /// How long established connections may finish after SIGTERM/SIGINT. Default 30s.
    pub shutdown_grace: Duration,
    /// Holds the serving process's PID while it runs (taken over by the new process of
    /// a binary upgrade). Relative to the config file's folder; `None`: no file.
    pub pid_file: Option<PathBuf>,
}

/// Which threads run the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// One tokio work-stealing runtime: any thread may run any connection, and an idle
    /// thread takes work from a busy one.
    Shared,
    /// One single-threaded runtime per worker thread, each accepting on its own
    /// `SO_REUSEPORT` socket of every listener and running the connections it accepted
    /// to their end: no wake-ups across threads per connection, but the kernel spreads
    /// connections by address hash, not by load.
    PerThread,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// One of error|warn|info|debug|trace. Default info.
    pub level: String,
    pub format: LogFormat,
    /// One access-log line per finished client connection.
    pub connections: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// When set, every non-GET request needs `Authorization: Bearer <token>`.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    /// Never empty, no address twice in the whole file.
    pub binds: Vec<SocketAddr>,
    /// The pool clients go to: every client, or with SNI `routes` those whose name
    /// matches no route (`None`: they are closed). Always a defined pool.
    pub pool: Option<String>,
    /// SNI name pattern (lowercase; exact or `*.` one leading label) → pool: routes the
    /// ClientHello (passthrough), or the terminated session's name (with `tls`).
    pub routes: Vec<(String, String)>,
    /// Terminate TLS here; `None` = plain TCP or passthrough.
    pub tls: Option<crate::tls::ServerTls>,
    /// `None` = unlimited. Beyond it, new clients are accepted and closed at once.
    pub max_connections: Option<NonZeroUsize>,
    /// listen(2) backlog. Default 1024.
    pub backlog: u32,
    /// One deadline from accept for everything before routing: the PROXY header, the
    /// ClientHello SNI routing peeks at, and a terminated TLS handshake. Default 5s.
    pub handshake_timeout: Duration,
    /// When not empty, only clients from these networks are served.
    pub allow: Vec<IpNet>,
    /// Clients from these networks are refused, even if allowed.
    pub deny: Vec<IpNet>,
    /// `None` = off: clients send no PROXY header.
    pub accept_proxy_protocol: Option<ProxyProtocolAccept>,
    /// With `accept_proxy_protocol`, the only peers trusted to send a header; empty =
    /// every peer.
    pub proxy_protocol_from: Vec<IpNet>,
}

/// One vocabulary for the PROXY protocol: the wire format's own enums.
pub use crate::wire::proxy_protocol::{
    Accept as ProxyProtocolAccept, Version as ProxyProtocolVersion,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    RandomTwo,
    SourceHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failback {
    Immediate,
    Manual,
    /// Only after the better tier stayed usable for this long.
    After(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUpstreamDown {
    Close,
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenAllDown {
    TryAll,
    Reject,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub balance: Balance,
    /// Per attempt. Default 2s.
    pub connect_timeout: Duration,
    /// Tries per client connection, each on a different upstream; at least 1. Default 3.
    pub connect_attempts: usize,
    /// Start a parallel attempt when one has not connected by then. Default off.
    pub hedge_after: Option<Duration>,
    /// No byte either way for this long closes both sides. Default 1h; "off" disables.
    pub idle_timeout: Option<Duration>,
    pub failback: Failback,
    pub on_upstream_down: OnUpstreamDown,
    pub drain_after_failback: Option<Duration>,
    /// A recovered upstream, and a tier failed back to, take a share of new connections
    /// that ramps up over this long. `None` = off.
    pub slow_start: Option<Duration>,
    /// A tier is active only with at least this many usable upstreams; at least 1.
    pub min_usable: usize,
    pub when_all_down: WhenAllDown,
    /// Keepalive idle time on both sides' sockets. Default 60s; "off" disables.
    pub tcp_keepalive: Option<Duration>,
    /// Header sent to upstreams with the client's address; `None` = off.
    pub proxy_protocol: Option<ProxyProtocolVersion>,
    /// The client has sent bytes and the upstream answered nothing for this long: a
    /// failed attempt. `None` = off.
    pub first_byte_timeout: Option<Duration>,
    /// Keep up to this many of the client's bytes until the upstream's first byte, to
    /// send them again elsewhere. `None` = off.
    pub replay_unanswered: Option<usize>,
    /// Originate TLS to the upstreams (and in health checks); `None` = plain TCP.
    pub tls: Option<crate::tls::ClientTls>,
    /// Never empty; addresses and names unique within the pool. Those found in DNS are
    /// the members of `dns` entries as last resolved.
    pub upstreams: Vec<UpstreamConfig>,
    /// Upstream entries given by host name or SRV name, resolved again every
    /// `resolve_interval` (or sooner when their TTL says so).
    pub dns: Vec<DnsEntry>,
    pub resolve_interval: Duration,
    /// DNS servers to ask; empty: those of /etc/resolv.conf.
    pub resolvers: Vec<SocketAddr>,
    pub health: HealthConfig,
    pub outlier: OutlierConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Resolved at load time.
    pub address: SocketAddr,
    /// The address as written (`host:port`, `ip:port`, or the SRV name), for display.
    pub target: String,
    /// Found in DNS: the member's label, stable while its record exists and free of
    /// `/` (admin API paths name upstreams): `host:port@ip` for a host name's record
    /// (`NAME@ip` when the entry has a name), `target:port` for an SRV target
    /// (`NAME@target:port`).
    pub discovered: Option<String>,
    pub name: Option<String>,
    /// 0 is the primary tier, 1 the first backup, and so on.
    pub priority: u32,
    /// 1..=256, default 1.
    pub weight: u32,
}

/// An upstream entry whose members come from DNS.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsEntry {
    pub query: crate::dns::Query,
    /// As written: `host:port` or the SRV name.
    pub target: String,
    pub name: Option<String>,
    pub priority: u32,
    /// Of each member; SRV members take their record's weight instead.
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", Problems(problems))]
    Invalid { problems: Vec<Problem> },
}

/// One thing wrong in a config file, at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Dotted path of the key, e.g. `pools.pg.connect_timeout`; empty for syntax errors.
    pub key: String,
    pub message: String,
}

struct Problems<'a>(&'a [Problem]);

// === impl Config ===

pub use crate::files::{MAX_CONFIG_FILE, MAX_SECRET_FILE, read_bounded};
pub(crate) use validate::unescape;

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let bytes = read_bounded(path, MAX_CONFIG_FILE).map_err(read_error)?;
        let text = String::from_utf8(bytes)
            .map_err(|e| read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Self::parse(&text, path)
    }

    /// Validates `text` as if it had been read from `path` (used in messages and to
    /// resolve relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        validate::parse(text, path)
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<PoolConfig>> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// What `switchyard check` prints: listeners, pools, tiers, effective settings.
    pub fn summary(&self) -> String {
        summary::render(self)
    }
}

// === impl PoolConfig ===

impl PoolConfig {
    /// The distinct priorities in use, best first.
    pub fn priorities(&self) -> Vec<u32> {
        let mut priorities: Vec<u32> = self.upstreams.iter().map(|u| u.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        priorities
    }
}

// === impl UpstreamConfig ===

impl UpstreamConfig {
    /// How operators see this upstream: its record's label when found in DNS, else
    /// its name, else its address as written.
    pub fn label(&self) -> &str {
        self.discovered
            .as_deref()
            .or(self.name.as_deref())
            .unwrap_or(&self.target)
    }
}

// === impl DnsEntry ===

impl DnsEntry {
    /// A member's label from its record's: a host name's records are told apart by
    /// their IP after the name (or `host:port` as written); SRV targets are names
    /// already, prefixed by the entry's name if it has one.
    fn member_label(&self, record: &str) -> String {
        let prefix = match (&self.query, &self.name) {
            (_, Some(name)) => Some(name.as_str()),
            (crate::dns::Query::Host { .. }, None) => Some(self.target.as_str()),
            (crate::dns::Query::Srv { .. }, None) => None,
        };
        match prefix {
            Some(prefix) => format!("{prefix}@{record}"),
            None => record.to_string(),
        }
    }

    /// The upstreams an answer gives this entry.
    pub fn members(&self, answer: &crate::dns::Answer) -> Vec<UpstreamConfig> {
        answer
            .records
            .iter()
            .map(|record| UpstreamConfig {
                address: record.address,
                target: self.target.clone(),
                discovered: Some(self.member_label(&record.label)),
                name: self.name.clone(),
                priority: self.priority,
                // An SRV weight is 0..=65535; ours 1..=256, 0 meaning "rarely" there.
                weight: record
                    .weight
                    .map_or(self.weight, |w| u32::from(w).clamp(1, MAX_WEIGHT)),
            })
            .collect()
    }
}

// === impl Problem ===

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Failback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failback::Immediate => f.write_str("immediate"),
            Failback::Manual => f.write_str("manual"),
            Failback::After(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

/// Writes an enum's config words once: the table `check` validates against (and lists
/// in its messages), `as_str`, and `Display`, so the three can never disagree.
macro_rules! vocabulary {
    ($name:ident { $($variant:ident = $word:literal),+ $(,)? }) => {
        impl $name {
            /// Every word the config accepts, with the value it means.
            pub const WORDS: &'static [(&'static str, $name)] = &[$(($word, $name::$variant)),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

vocabulary!(LogFormat { Text = "text", Json = "json" });
vocabulary!(Scheduler {
    Shared = "shared",
    PerThread = "per_thread",
});
vocabulary!(Balance {
    RoundRobin = "round_robin",
    LeastConnections = "least_connections",
    RandomTwo = "random_two",
    SourceHash = "source_hash",
});
vocabulary!(OnUpstreamDown { Close = "close", Keep = "keep" });
vocabulary!(WhenAllDown { TryAll = "try_all", Reject = "reject" });
vocabulary!(ProxyProtocolAccept { V1 = "v1", V2 = "v2", Any = "any" });
vocabulary!(ProxyProtocolVersion { V1 = "v1", V2 = "v2" });
vocabulary!(HttpMethod {
    Get = "GET",
    Head = "HEAD",
    Options = "OPTIONS",
});
vocabulary!(PostgresRole {
    Any = "any",
    Primary = "primary",
    Standby = "standby",
});
vocabulary!(RedisRole {
    Any = "any",
    Master = "master",
    Replica = "replica",
});

#[cfg(test)]
mod tests;
