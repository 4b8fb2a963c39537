//! Serde mirror of the TOML file, one struct per table.
//!
//! Everything here is exactly what the operator wrote, with defaults filled in and
//! source spans kept on every value that `validate` checks semantically. Nothing in this
//! module interprets a value: durations, addresses and choices stay strings until
//! validation turns them into typed config and reports every problem at once.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// Shorthand for a value whose position in the file is kept for error messages.
pub type S<T> = Spanned<T>;

fn at<T>(value: T) -> S<T> {
    // Defaults never fail validation, so their (empty) span is never shown.
    Spanned::new(0..0, value)
}

fn text(value: &str) -> S<String> {
    at(value.to_string())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub log: RawLog,
    pub admin: Option<S<RawAdmin>>,
    #[serde(default)]
    pub listeners: BTreeMap<S<String>, S<RawListener>>,
    #[serde(default)]
    pub pools: BTreeMap<S<String>, S<RawPool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    #[serde(default = "default_worker_threads")]
    pub worker_threads: S<i64>,
    #[serde(default = "default_scheduler")]
    pub scheduler: S<String>,
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: S<String>,
    #[serde(default)]
    pub pid_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default = "default_log_level")]
    pub level: S<String>,
    #[serde(default = "default_log_format")]
    pub format: S<String>,
    #[serde(default)]
    pub connections: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: S<String>,
    pub token_file: Option<S<String>>,
}

/// `bind = "addr"` or `bind = ["addr", ...]`.
#[derive(Debug)]
pub enum OneOrMany {
    One(String),
    Many(Vec<S<String>>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub bind: S<OneOrMany>,
    pub pool: Option<S<String>>,
    /// SNI name pattern → pool (passthrough routing, or after termination).
    #[serde(default)]
    pub routes: BTreeMap<S<String>, S<String>>,
    pub tls: Option<S<RawListenerTls>>,
    #[serde(default = "default_max_connections")]
    pub max_connections: S<i64>,
    #[serde(default = "default_backlog")]
    pub backlog: S<i64>,
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: S<String>,
    #[serde(default)]
    pub allow: Vec<S<String>>,
    #[serde(default)]
    pub deny: Vec<S<String>>,
    #[serde(default = "default_off")]
    pub accept_proxy_protocol: S<String>,
    #[serde(default)]
    pub proxy_protocol_from: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    #[serde(default = "default_balance")]
    pub balance: S<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: S<String>,
    #[serde(default = "default_connect_attempts")]
    pub connect_attempts: S<i64>,
    #[serde(default = "default_off")]
    pub hedge_after: S<String>,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: S<String>,
    #[serde(default = "default_failback")]
    pub failback: S<String>,
    #[serde(default = "default_on_upstream_down")]
    pub on_upstream_down: S<String>,
    #[serde(default = "default_off")]
    pub drain_after_failback: S<String>,
    #[serde(default = "default_off")]
    pub slow_start: S<String>,
    #[serde(default = "default_min_usable")]
    pub min_usable: S<i64>,
    #[serde(default = "default_when_all_down")]
    pub when_all_down: S<String>,
    #[serde(default = "default_tcp_keepalive")]
    pub tcp_keepalive: S<String>,
    #[serde(default = "default_off")]
    pub proxy_protocol: S<String>,
    #[serde(default = "default_off")]
    pub first_byte_timeout: S<String>,
    #[serde(default = "default_off")]
    pub replay_unanswered: S<String>,
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: S<String>,
    #[serde(default)]
    pub resolvers: Vec<S<String>>,
    pub tls: Option<S<RawPoolTls>>,
    #[serde(default = "default_upstreams")]
    pub upstreams: S<Vec<S<RawUpstream>>>,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub outlier: RawOutlier,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
    #[serde(default)]
    pub certs: Vec<S<RawCertEntry>>,
    #[serde(default = "default_min_version")]
    pub min_version: S<String>,
    #[serde(default)]
    pub alpn: Vec<S<String>>,
    #[serde(default = "default_empty")]
    pub client_ca: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertEntry {
    pub cert: S<String>,
    pub key: S<String>,
    #[serde(default)]
    pub names: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoolTls {
    pub server_name: Option<S<String>>,
    pub ca: Option<S<String>>,
    #[serde(default = "default_empty")]
    pub client_cert: S<String>,
    #[serde(default = "default_empty")]
    pub client_key: S<String>,
    #[serde(default = "default_true")]
    pub verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub address: Option<S<String>>,
    pub srv: Option<S<String>>,
    #[serde(default = "default_priority")]
    pub priority: S<i64>,
    #[serde(default = "default_weight")]
    pub weight: S<i64>,
    pub name: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_interval")]
    pub interval: S<String>,
    #[serde(default = "default_fast_interval")]
    pub fast_interval: S<String>,
    #[serde(default = "default_check_timeout")]
    pub timeout: S<String>,
    #[serde(default = "default_rise")]
    pub rise: S<i64>,
    #[serde(default = "default_fall")]
    pub fall: S<i64>,
    /// Absent: `send_expect` when `send` or `expect` is given, else `tcp`.
    pub kind: Option<S<String>>,
    pub port: Option<S<i64>>,
    pub address: Option<S<String>>,
    // Each kind's own keys: absent ones take the kind's defaults, and a key given to
    // another kind is an error, so they stay optional here.
    pub send: Option<S<String>>,
    pub expect: Option<S<String>>,
    pub method: Option<S<String>>,
    pub path: Option<S<String>>,
    pub host: Option<S<String>>,
    pub status: Option<S<Vec<S<String>>>>,
    pub body_contains: Option<S<String>>,
    pub user: Option<S<String>>,
    pub database: Option<S<String>>,
    pub role: Option<S<String>>,
    pub password_file: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: S<i64>,
    #[serde(default = "default_base_ejection")]
    pub base_ejection: S<String>,
    #[serde(default = "default_max_ejection")]
    pub max_ejection: S<String>,
}

// === defaults (SPEC §2) ===

fn default_worker_threads() -> S<i64> {
    at(0)
}
fn default_scheduler() -> S<String> {
    text("per_thread")
}
fn default_shutdown_grace() -> S<String> {
    text("30s")
}
fn default_log_level() -> S<String> {
    text("info")
}
fn default_log_format() -> S<String> {
    text("text")
}
fn default_max_connections() -> S<i64> {
    at(0)
}
fn default_backlog() -> S<i64> {
    at(1024)
}
fn default_min_version() -> S<String> {
    text("1.2")
}
fn default_handshake_timeout() -> S<String> {
    text("5s")
}
fn default_balance() -> S<String> {
    text("round_robin")
}
fn default_connect_timeout() -> S<String> {
    text("2s")
}
fn default_connect_attempts() -> S<i64> {
    at(3)
}
fn default_off() -> S<String> {
    text("off")
}
fn default_idle_timeout() -> S<String> {
    text("1h")
}
fn default_failback() -> S<String> {
    text("immediate")
}
fn default_on_upstream_down() -> S<String> {
    text("close")
}
fn default_min_usable() -> S<i64> {
    at(1)
}
fn default_when_all_down() -> S<String> {
    text("try_all")
}
fn default_resolve_interval() -> S<String> {
    text("30s")
}
fn default_tcp_keepalive() -> S<String> {
    text("60s")
}
fn default_upstreams() -> S<Vec<S<RawUpstream>>> {
    at(Vec::new())
}
fn default_priority() -> S<i64> {
    at(0)
}
fn default_weight() -> S<i64> {
    at(1)
}
fn default_true() -> bool {
    true
}
fn default_interval() -> S<String> {
    text("2s")
}
fn default_fast_interval() -> S<String> {
    text("250ms")
}
fn default_check_timeout() -> S<String> {
    text("1s")
}
fn default_rise() -> S<i64> {
    at(2)
}
fn default_fall() -> S<i64> {
    at(3)
}
fn default_empty() -> S<String> {
    text("")
}
fn default_consecutive_failures() -> S<i64> {
    at(3)
}
fn default_base_ejection() -> S<String> {
    text("10s")
}
fn default_max_ejection() -> S<String> {
    text("5m")
}

impl Default for RawRuntime {
    fn default() -> Self {
        Self {
            worker_threads: default_worker_threads(),
            scheduler: default_scheduler(),
            shutdown_grace: default_shutdown_grace(),
            pid_file: String::new(),
        }
    }
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: default_log_format(),
            connections: false,
        }
    }
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: default_interval(),
            fast_interval: default_fast_interval(),
            timeout: default_check_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            kind: None,
            port: None,
            address: None,
            send: None,
            expect: None,
            method: None,
            path: None,
            host: None,
            status: None,
            body_contains: None,
            user: None,
            database: None,
            role: None,
            password_file: None,
        }
    }
}

impl Default for RawOutlier {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
        }
    }
}

// === impl OneOrMany ===

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address string like \"0.0.0.0:5432\" or a list of them")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(value.to_string()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut all = Vec::new();
                while let Some(addr) = seq.next_element()? {
                    all.push(addr);
                }
                Ok(OneOrMany::Many(all))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}
