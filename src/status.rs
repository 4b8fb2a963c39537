//! The status views: what `GET /status` returns and `switchyard status` prints.
//!
//! Plain serializable structs built from live state on request, never internal types,
//! so the JSON shape is a deliberate contract. The same structs deserialize on the CLI
//! side to render the table.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusView {
    /// The serving process: after a binary upgrade, the new one's. 0 from an instance
    /// too old to say.
    #[serde(default)]
    pub pid: u32,
    pub listeners: Vec<ListenerView>,
    pub pools: Vec<PoolView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListenerView {
    pub name: String,
    /// The addresses actually bound.
    pub binds: Vec<String>,
    pub pool: String,
    pub connections_active: u64,
    pub connections_total: u64,
    pub connections_failed: u64,
    pub max_connections: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolView {
    pub name: String,
    pub balance: String,
    /// Priority of the active tier; `None` when no upstream is usable.
    pub active_tier: Option<u32>,
    pub failback: String,
    pub failovers: u64,
    pub failbacks: u64,
    /// After a failback with `slow_start`: the failed-back tier's ramp.
    #[serde(default)]
    pub failback_ramp: Option<TierRampView>,
    pub upstreams: Vec<UpstreamView>,
}

/// A failed-back tier taking a growing share of new connections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TierRampView {
    /// The tier that served before the failback and takes the rest meanwhile.
    pub from_tier: u32,
    /// The failed-back tier.
    pub to_tier: u32,
    /// The failed-back tier's share of new connections now, 10 to 100.
    pub share_percent: u32,
    pub remaining_ms: u64,
}

/// An upstream taking a growing share of its tier's new connections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RampView {
    /// Its share now, as a percentage of the share it has at full weight: 10 to 100.
    pub share_percent: u32,
    pub remaining_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpstreamView {
    /// The configured name, else the address as written.
    pub name: String,
    pub address: String,
    pub priority: u32,
    pub weight: u32,
    /// up | down | ejected | drain | maint
    pub state: String,
    /// Why it is in this state (the reason of its last transition).
    pub reason: String,
    pub since_unix_ms: u64,
    pub last_check: Option<CheckView>,
    /// Consecutive passing / failing active checks.
    pub check_passes: u32,
    pub check_failures: u32,
    /// Failed connect attempts on real traffic since the last success.
    pub connect_failures_in_a_row: u32,
    pub ejected_until_unix_ms: Option<u64>,
    pub connections_active: u64,
    pub connections_total: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// While it ramps up after coming back (`slow_start`).
    #[serde(default)]
    pub slow_start: Option<RampView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckView {
    pub at_unix_ms: u64,
    /// "ok" or the failure, e.g. "connect refused".
    pub result: String,
}

// === impl StatusView ===

impl StatusView {
    /// The table `switchyard status` prints: like `haproxy show stat`, but legible.
    pub fn render(&self, now_unix_ms: u64) -> String {
        let mut out = String::new();
        let ago = |ms: u64| human_age(now_unix_ms.saturating_sub(ms));
        // Writing to a String cannot fail.
        let _ = writeln!(out, "LISTENERS");
        for l in &self.listeners {
            let max = l
                .max_connections
                .map_or("unlimited".to_string(), |m| m.to_string());
            let _ = writeln!(
                out,
                "  {:<16} {:<28} -> {:<16} active {:>5} / max {:<9} total {:>8}  failed {}",
                l.name,
                l.binds.join(", "),
                l.pool,
                l.connections_active,
                max,
                l.connections_total,
                l.connections_failed,
            );
        }
        for p in &self.pools {
            let active = p
                .active_tier
                .map_or("NONE (no usable upstream)".to_string(), |t| t.to_string());
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "POOL {}  active tier {}  balance {}  failback {}  failovers {}  failbacks {}",
                p.name, active, p.balance, p.failback, p.failovers, p.failbacks
            );
            if let Some(ramp) = &p.failback_ramp {
                let _ = writeln!(
                    out,
                    "  slow start: tier {} takes {}% of new connections, tier {} the rest; full in {}",
                    ramp.to_tier,
                    ramp.share_percent,
                    ramp.from_tier,
                    human_age(ramp.remaining_ms)
                );
            }
            let _ = writeln!(
                out,
                "  {:<4} {:<16} {:<22} {:<8} {:<9} {:>6} {:>8} {:>10} {:>10}  reason",
                "tier",
                "upstream",
                "address",
                "state",
                "since",
                "active",
                "total",
                "sent",
                "received"
            );
            for u in &p.upstreams {
                let marker = if Some(u.priority) == p.active_tier {
                    "*"
                } else {
                    " "
                };
                let mut reason = u.reason.clone();
                if let Some(ramp) = &u.slow_start {
                    let _ = write!(
                        reason,
                        " (slow start: {}% of its share, full in {})",
                        ramp.share_percent,
                        human_age(ramp.remaining_ms)
                    );
                }
                if let Some(until) = u.ejected_until_unix_ms {
                    let _ = write!(
                        reason,
                        " (ejected for {} more)",
                        human_age(until.saturating_sub(now_unix_ms))
                    );
                }
                if let Some(check) = &u.last_check {
                    let _ = write!(
                        reason,
                        "; last check {} ago: {}",
                        ago(check.at_unix_ms),
                        check.result
                    );
                }
                let _ = writeln!(
                    out,
                    "  {marker}{:<3} {:<16} {:<22} {:<8} {:<9} {:>6} {:>8} {:>10} {:>10}  {}",
                    u.priority,
                    u.name,
                    u.address,
                    u.state.to_uppercase(),
                    ago(u.since_unix_ms),
                    u.connections_active,
                    u.connections_total,
                    human_bytes(u.bytes_sent),
                    human_bytes(u.bytes_received),
                    reason,
                );
            }
        }
        out
    }
}

fn human_age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str, priority: u32, slow_start: Option<RampView>) -> UpstreamView {
        UpstreamView {
            name: name.to_string(),
            address: format!("127.0.0.1:1{priority}"),
            priority,
            weight: 1,
            state: "up".to_string(),
            reason: "check passed".to_string(),
            since_unix_ms: 0,
            last_check: None,
            check_passes: 2,
            check_failures: 0,
            connect_failures_in_a_row: 0,
            ejected_until_unix_ms: None,
            connections_active: 0,
            connections_total: 0,
            bytes_sent: 0,
            bytes_received: 0,
            slow_start,
        }
    }

    #[test]
    fn the_table_shows_ramps_and_their_shares() {
        let view = StatusView {
            pid: 1,
            listeners: Vec::new(),
            pools: vec![PoolView {
                name: "p".to_string(),
                balance: "round_robin".to_string(),
                active_tier: Some(0),
                failback: "immediate".to_string(),
                failovers: 1,
                failbacks: 1,
                failback_ramp: Some(TierRampView {
                    from_tier: 1,
                    to_tier: 0,
                    share_percent: 43,
                    remaining_ms: 1_270,
                }),
                upstreams: vec![
                    upstream(
                        "a",
                        0,
                        Some(RampView {
                            share_percent: 55,
                            remaining_ms: 900,
                        }),
                    ),
                    upstream("c", 1, None),
                ],
            }],
        };
        let table = view.render(5_000);
        assert!(
            table.contains(
                "  slow start: tier 0 takes 43% of new connections, tier 1 the rest; full in 1.3s\n"
            ),
            "{table}"
        );
        assert!(
            table.contains("check passed (slow start: 55% of its share, full in 900ms)"),
            "{table}"
        );
        assert_eq!(table.matches("slow start").count(), 2, "{table}");
    }

    #[test]
    fn a_status_without_the_slow_start_fields_still_reads() {
        // What an instance from before slow start answers.
        let json = r#"{"name":"a","address":"x","priority":0,"weight":1,"state":"up",
            "reason":"","since_unix_ms":0,"last_check":null,"check_passes":0,
            "check_failures":0,"connect_failures_in_a_row":0,"ejected_until_unix_ms":null,
            "connections_active":0,"connections_total":0,"bytes_sent":0,"bytes_received":0}"#;
        let view: Result<UpstreamView, _> = serde_json::from_str(json);
        assert_eq!(view.map(|v| v.slow_start).ok(), Some(None));
    }
}
