//! The human summary printed by `switchyard check`: every effective setting, defaults
//! filled in, so an operator sees what the proxy will actually do.

use std::fmt::Write;
use std::time::Duration;

use super::{CheckKind, Config, Password, PoolConfig};

pub(super) fn render(config: &Config) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason only.
    let _ = writeln!(out, "{}: configuration is valid", config.source.display());
    let _ = writeln!(
        out,
        "runtime: worker_threads {}, scheduler {}, shutdown_grace {}; log: level {}, format {}",
        config.runtime.worker_threads,
        config.runtime.scheduler,
        human(config.runtime.shutdown_grace),
        config.log.level,
        config.log.format,
    );
    match &config.admin {
        Some(admin) => {
            let token = match &admin.token_file {
                Some(path) => format!("token from {}", path.display()),
                None => "no token".to_string(),
            };
            let _ = writeln!(out, "admin: {} ({token})", admin.listen);
        }
        None => {
            let _ = writeln!(out, "admin: off");
        }
    }
    for listener in &config.listeners {
        let binds: Vec<String> = listener.binds.iter().map(ToString::to_string).collect();
        let max = listener
            .max_connections
            .map_or("unlimited".to_string(), |m| m.to_string());
        let _ = writeln!(
            out,
            "listener {}: bind {} -> pool {} (max_connections {max}, backlog {})",
            listener.name,
            binds.join(", "),
            listener.pool.as_deref().unwrap_or("none"),
            listener.backlog,
        );
        if let Some(tls) = &listener.tls {
            let settings = &tls.settings;
            let certs: Vec<String> = settings
                .certs
                .iter()
                .map(|c| c.cert.display().to_string())
                .collect();
            let _ = writeln!(
                out,
                "  TLS terminated: certificates {}; TLS {}; ALPN {}; client certificates {}",
                certs.join(", "),
                if settings.tls13_only {
                    "1.3"
                } else {
                    "1.2 and 1.3"
                },
                if settings.alpn.is_empty() {
                    "none".to_string()
                } else {
                    settings.alpn.join(", ")
                },
                settings
                    .client_ca
                    .as_ref()
                    .map_or("not asked".to_string(), |ca| format!(
                        "required, CA {}",
                        ca.display()
                    )),
            );
        }
        // Routes pick the pool by the server name of the ClientHello: peeked and
        // forwarded unchanged without TLS here, read from the session with it.
        let mode = if listener.tls.is_some() {
            "after termination"
        } else {
            "passthrough"
        };
        for (pattern, pool) in &listener.routes {
            let _ = writeln!(out, "  SNI {pattern} -> pool {pool} ({mode})");
        }
        let nets = |list: &[super::IpNet]| {
            if list.is_empty() {
                "any".to_string()
            } else {
                list.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let proxy = match listener.accept_proxy_protocol {
            None => "off".to_string(),
            Some(accept) => format!(
                "{} from {}, handshake_timeout {}",
                accept,
                nets(&listener.proxy_protocol_from),
                human(listener.handshake_timeout)
            ),
        };
        let deny = if listener.deny.is_empty() {
            "none".to_string()
        } else {
            nets(&listener.deny)
        };
        let _ = writeln!(
            out,
            "  allow {}, deny {deny}; accept_proxy_protocol {proxy}",
            nets(&listener.allow)
        );
    }
    for pool in &config.pools {
        render_pool(&mut out, pool);
    }
    out
}

fn render_pool(out: &mut String, pool: &PoolConfig) {
    let _ = writeln!(out, "pool {}:", pool.name);
    let _ = writeln!(
        out,
        "  balance {}, connect_timeout {}, connect_attempts {}, hedge_after {}, idle_timeout {}",
        pool.balance,
        human(pool.connect_timeout),
        pool.connect_attempts,
        off_or(pool.hedge_after),
        off_or(pool.idle_timeout),
    );
    let _ = writeln!(
        out,
        "  failback {}, on_upstream_down {}, drain_after_failback {}, min_usable {}, when_all_down {}, tcp_keepalive {}, proxy_protocol {}",
        pool.failback,
        pool.on_upstream_down,
        off_or(pool.drain_after_failback),
        pool.min_usable,
        pool.when_all_down,
        off_or(pool.tcp_keepalive),
        pool.proxy_protocol.map_or("off", |v| v.as_str()),
    );
    let replay = pool
        .replay_unanswered
        .map_or("off".to_string(), |bytes| format!("{bytes} bytes"));
    let _ = writeln!(
        out,
        "  first_byte_timeout {}, replay_unanswered {replay}",
        off_or(pool.first_byte_timeout),
    );
    let _ = writeln!(out, "  slow_start {}", off_or(pool.slow_start));
    if !pool.dns.is_empty() {
        let resolvers = if pool.resolvers.is_empty() {
            "those of /etc/resolv.conf".to_string()
        } else {
            let servers: Vec<String> = pool.resolvers.iter().map(|s| s.to_string()).collect();
            servers.join(", ")
        };
        let _ = writeln!(
            out,
            "  dns: {} entries resolved every {} (sooner when the TTL says so), resolvers {resolvers}",
            pool.dns.len(),
            human(pool.resolve_interval),
        );
    }
    for (rank, priority) in pool.priorities().into_iter().enumerate() {
        let role = if rank == 0 {
            "primary".to_string()
        } else {
            format!("backup {rank}")
        };
        let members: Vec<String> = pool
            .upstreams
            .iter()
            .filter(|u| u.priority == priority)
            .map(|u| {
                let mut s = match (&u.discovered, &u.name) {
                    (Some(label), _) => format!("{label} (from DNS {})", u.target),
                    (None, Some(name)) => format!("{name} ({})", u.target),
                    (None, None) => u.target.clone(),
                };
                let address = u.address.to_string();
                if u.target != address {
                    let _ = write!(s, " = {}", u.address);
                }
                if u.weight != 1 {
                    let _ = write!(s, " weight {}", u.weight);
                }
                s
            })
            .collect();
        let _ = writeln!(out, "  tier {priority} ({role}): {}", members.join(", "));
    }
    let h = &pool.health;
    if h.enabled {
        let _ = writeln!(
            out,
            "  health: interval {}, fast_interval {}, timeout {}, rise {}, fall {}",
            human(h.interval),
            human(h.fast_interval),
            human(h.timeout),
            h.rise,
            h.fall,
        );
        let over = if pool.tls.is_some() { ", over TLS" } else { "" };
        let _ = writeln!(
            out,
            "  check: {}, at {}{over}",
            check_kind(&h.kind),
            h.target
        );
    } else {
        let _ = writeln!(out, "  health: disabled (upstreams count as up)");
    }
    let o = &pool.outlier;
    let _ = writeln!(
        out,
        "  outlier: consecutive_failures {}, base_ejection {}, max_ejection {}",
        o.consecutive_failures,
        human(o.base_ejection),
        human(o.max_ejection),
    );
}

/// A check kind with its effective settings, defaults filled in.
fn check_kind(kind: &CheckKind) -> String {
    let password = |p: &Option<Password>| {
        p.as_ref()
            .map_or("none".to_string(), |p| p.file.display().to_string())
    };
    match kind {
        CheckKind::Tcp => "tcp (the connect alone)".to_string(),
        CheckKind::SendExpect { send, expect } => format!(
            "send_expect, send \"{}\", expect \"{}\"",
            escape(send),
            escape(expect)
        ),
        CheckKind::Http(http) => {
            let status: Vec<String> = http
                .status
                .iter()
                .map(|r| match (r.start(), r.end()) {
                    (low, high) if low == high => low.to_string(),
                    (low, high) => format!("{low}-{high}"),
                })
                .collect();
            format!(
                "http, {} {}, host {}, status [{}], body_contains \"{}\"",
                http.method,
                http.path,
                http.host.as_deref().unwrap_or("(the check target)"),
                status.join(", "),
                escape(&http.body_contains),
            )
        }
        CheckKind::Postgres(pg) => format!(
            "postgres, user {}, database {}, role {}, password_file {}",
            pg.user,
            pg.database,
            pg.role,
            password(&pg.password)
        ),
        CheckKind::Redis(redis) => format!(
            "redis, role {}, password_file {}",
            redis.role,
            password(&redis.password)
        ),
        CheckKind::Mysql => "mysql (server greeting)".to_string(),
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn off_or(d: Option<Duration>) -> String {
    d.map_or("off".to_string(), human)
}

/// The inverse of the config's escapes, so the summary can be pasted back into a file.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\x22"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out
}
