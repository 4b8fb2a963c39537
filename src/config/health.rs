//! The typed active-check settings of a pool: when checks run, where they connect and
//! what they ask the server.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub fast_interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub target: CheckTarget,
    pub kind: CheckKind,
}

/// Where a check connects.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckTarget {
    /// The upstream's own address (the traffic port).
    Upstream,
    /// The upstream's host on another port (e.g. Patroni's REST API on 8008).
    Port(u16),
    /// Another `host:port` entirely, resolved at load; `target` as written.
    Address { address: SocketAddr, target: String },
}

/// What a check asks once connected.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    /// The connect alone.
    Tcp,
    /// Bytes sent after connect and the bytes the reply must start with (escapes
    /// decoded); with `send` and an empty `expect`, any reply byte passes.
    SendExpect {
        send: Vec<u8>,
        expect: Vec<u8>,
    },
    Http(HttpCheck),
    Postgres(PostgresCheck),
    Redis(RedisCheck),
    /// A MySQL/MariaDB server greeting (protocol 10) passes, an error packet fails.
    Mysql,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpCheck {
    pub method: HttpMethod,
    /// Starts with `/`; visible ASCII only.
    pub path: String,
    /// `None`: the check target's `host:port`.
    pub host: Option<String>,
    /// A status passes when any range holds it; never empty.
    pub status: Vec<RangeInclusive<u16>>,
    /// Empty: the body is not read.
    pub body_contains: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMethod {
    Get,
    Head,
    Options,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PostgresCheck {
    pub user: String,
    pub database: String,
    /// `Any` only sends a StartupMessage; the others log in and ask
    /// `pg_is_in_recovery()`.
    pub role: PostgresRole,
    pub password: Option<Password>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostgresRole {
    Any,
    Primary,
    Standby,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisCheck {
    pub password: Option<Password>,
    /// Asked with `INFO replication` unless `Any`.
    pub role: RedisRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisRole {
    Any,
    Master,
    Replica,
}

/// A password read from `password_file` at load: its first line. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Password {
    pub file: PathBuf,
    secret: Vec<u8>,
}

// === impl CheckKind ===

impl CheckKind {
    /// Every `kind` the config accepts.
    pub const WORDS: &'static [&'static str] =
        &["tcp", "send_expect", "http", "postgres", "redis", "mysql"];

    pub fn as_str(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::SendExpect { .. } => "send_expect",
            CheckKind::Http(_) => "http",
            CheckKind::Postgres(_) => "postgres",
            CheckKind::Redis(_) => "redis",
            CheckKind::Mysql => "mysql",
        }
    }
}

// === impl CheckTarget ===

impl CheckTarget {
    /// Where to connect to check the upstream at `upstream` (written `written`), and
    /// the `host:port` to name it by (TLS server name, HTTP Host).
    pub fn resolve(&self, upstream: SocketAddr, written: &str) -> (SocketAddr, String) {
        match self {
            CheckTarget::Upstream => (upstream, written.to_string()),
            CheckTarget::Port(port) => {
                let host = crate::tls::host_of(written);
                let shown = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                (SocketAddr::new(upstream.ip(), *port), shown)
            }
            CheckTarget::Address { address, target } => (*address, target.clone()),
        }
    }
}

impl fmt::Display for CheckTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckTarget::Upstream => f.write_str("the upstream"),
            CheckTarget::Port(port) => write!(f, "port {port}"),
            CheckTarget::Address { target, .. } => write!(f, "{target}"),
        }
    }
}

// === impl Password ===

impl Password {
    /// The first line of a password file's contents; `None` when that line is empty.
    pub fn from_file(file: PathBuf, contents: &[u8]) -> Option<Self> {
        let line = contents.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        (!line.is_empty()).then(|| Self {
            file,
            secret: line.to_vec(),
        })
    }

    pub fn expose(&self) -> &[u8] {
        &self.secret
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Password(from {})", self.file.display())
    }
}
