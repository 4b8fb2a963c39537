//! The Prometheus exposition of `GET /metrics`: the admin API reads every owner's
//! counters and writes them in text format. Lives here, at the top, so that the
//! counters below never depend on the process that holds them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::metrics::{ConnectFailure, Exposition, FailedReason, ListenerStats, RejectReason};

/// Every metric of the admin API's reference for `proxy`, in Prometheus text format.
pub fn render(proxy: &crate::Proxy, reloads: &crate::reload::ReloadStats) -> String {
    let mut e = Exposition::default();
    let listeners = proxy.listeners.views();
    let snapshot = proxy.snapshot.load();
    let mut pools: Vec<_> = snapshot.pools().cloned().collect();
    pools.sort_by(|a, b| a.config.name.cmp(&b.config.name));

    type ListenerCounter = fn(&ListenerStats) -> &AtomicU64;
    let listener_metrics: [(&str, &str, &str, ListenerCounter); 2] = [
        (
            "switchyard_connections_total",
            "counter",
            "Client connections accepted.",
            |s| &s.connections_total,
        ),
        (
            "switchyard_connections_active",
            "gauge",
            "Client connections open now.",
            |s| &s.connections_active,
        ),
    ];
    for (name, kind, help, counter) in listener_metrics {
        e.header(name, kind, help);
        for l in &listeners {
            e.sample(
                name,
                &[("listener", &l.context.name)],
                counter(&l.context.stats).load(Relaxed),
            );
        }
    }
    e.header(
        "switchyard_connections_failed_total",
        "counter",
        "Clients closed without reaching an upstream, by reason: upstreams_failed (every attempt failed), local_resources (the proxy was out of descriptors, memory or ports; no upstream blamed), removed_by_reload.",
    );
    for l in &listeners {
        for reason in FailedReason::ALL {
            e.sample(
                "switchyard_connections_failed_total",
                &[("listener", &l.context.name), ("reason", reason.as_str())],
                l.context.stats.failed(reason),
            );
        }
    }
    e.header(
        "switchyard_connections_rejected_total",
        "counter",
        "Clients closed at once, by reason.",
    );
    for l in &listeners {
        for reason in RejectReason::ALL {
            e.sample(
                "switchyard_connections_rejected_total",
                &[("listener", &l.context.name), ("reason", reason.as_str())],
                l.context.stats.rejected(reason),
            );
        }
    }
    e.header(
        "switchyard_bytes_total",
        "counter",
        "Bytes forwarded; direction in = client to upstream, out = upstream to client.",
    );
    for l in &listeners {
        let s = &l.context.stats;
        for (direction, counter) in [("in", &s.bytes_in), ("out", &s.bytes_out)] {
            e.sample(
                "switchyard_bytes_total",
                &[("listener", &l.context.name), ("direction", direction)],
                counter.load(Relaxed),
            );
        }
    }

    e.header(
        "switchyard_upstream_up",
        "gauge",
        "1 when the upstream is usable (state up), else 0.",
    );
    for route in &pools {
        for (u, state) in route.upstreams.iter().zip(route.states.iter()) {
            e.sample(
                "switchyard_upstream_up",
                &[("pool", &route.config.name), ("upstream", u.label())],
                u8::from(state.is_usable()),
            );
        }
    }
    e.header(
        "switchyard_upstream_connections_active",
        "gauge",
        "Connections open to the upstream now.",
    );
    for route in &pools {
        for u in route.upstreams.iter() {
            e.sample(
                "switchyard_upstream_connections_active",
                &[("pool", &route.config.name), ("upstream", u.label())],
                u.stats.connections_active.load(Relaxed),
            );
        }
    }
    e.header(
        "switchyard_upstream_connect_failures_total",
        "counter",
        "Failed connect attempts on real traffic, by reason.",
    );
    for route in &pools {
        for u in route.upstreams.iter() {
            for reason in ConnectFailure::ALL {
                e.sample(
                    "switchyard_upstream_connect_failures_total",
                    &[
                        ("pool", &route.config.name),
                        ("upstream", u.label()),
                        ("reason", reason.as_str()),
                    ],
                    u.stats.connect_failures(reason),
                );
            }
        }
    }
    e.header(
        "switchyard_upstream_connect_seconds",
        "histogram",
        "Time from a client's arrival to its upstream connection, retries included.",
    );
    for route in &pools {
        e.histogram(
            "switchyard_upstream_connect_seconds",
            &[("pool", &route.config.name)],
            &route.stats.connect_seconds,
        );
    }
    e.header(
        "switchyard_pool_active_tier",
        "gauge",
        "Priority of the pool's active tier; -1 when no upstream is usable.",
    );
    for route in &pools {
        let tier = route.active_priority().map_or(-1, i64::from);
        e.sample(
            "switchyard_pool_active_tier",
            &[("pool", &route.config.name)],
            tier,
        );
    }
    e.header(
        "switchyard_failovers_total",
        "counter",
        "Moves of the active tier to a worse tier.",
    );
    for route in &pools {
        e.sample(
            "switchyard_failovers_total",
            &[("pool", &route.config.name)],
            route.stats.failovers.load(Relaxed),
        );
    }
    e.header(
        "switchyard_failbacks_total",
        "counter",
        "Moves of the active tier back to a better tier.",
    );
    for route in &pools {
        e.sample(
            "switchyard_failbacks_total",
            &[("pool", &route.config.name)],
            route.stats.failbacks.load(Relaxed),
        );
    }
    e.header(
        "switchyard_dns_failures_total",
        "counter",
        "Resolutions of a host-name or SRV upstream entry that failed or found nothing; the pool kept the entry's last known upstreams.",
    );
    for route in &pools {
        e.sample(
            "switchyard_dns_failures_total",
            &[("pool", &route.config.name)],
            route.stats.dns_failures.load(Relaxed),
        );
    }
    e.header(
        "switchyard_health_checks_total",
        "counter",
        "Active health checks, by result; local_resources: not run, the proxy was out of descriptors, memory or ports.",
    );
    for route in &pools {
        for u in route.upstreams.iter() {
            for (result, counter) in [
                ("success", &u.stats.checks_passed),
                ("failure", &u.stats.checks_failed),
                ("local_resources", &u.stats.checks_not_run),
            ] {
                e.sample(
                    "switchyard_health_checks_total",
                    &[
                        ("pool", &route.config.name),
                        ("upstream", u.label()),
                        ("result", result),
                    ],
                    counter.load(Relaxed),
                );
            }
        }
    }
    e.header(
        "switchyard_config_reloads_total",
        "counter",
        "Configuration reloads, by result.",
    );
    e.sample(
        "switchyard_config_reloads_total",
        &[("result", "ok")],
        reloads.ok.load(Relaxed),
    );
    e.sample(
        "switchyard_config_reloads_total",
        &[("result", "error")],
        reloads.error.load(Relaxed),
    );
    e.header(
        "switchyard_splice_pipes",
        "gauge",
        "Pipes of the zero-copy pool: in_use = held by a transfer now, open = in use or cached for reuse.",
    );
    e.sample(
        "switchyard_splice_pipes",
        &[("state", "in_use")],
        crate::proxy::splice::pipes_in_use(),
    );
    e.sample(
        "switchyard_splice_pipes",
        &[("state", "open")],
        crate::proxy::splice::pipes_open(),
    );
    e.header(
        "switchyard_splice_bytes_total",
        "counter",
        "Bytes forwarded by splice(2), without passing through the proxy's memory.",
    );
    e.sample(
        "switchyard_splice_bytes_total",
        &[],
        crate::proxy::splice::bytes_spliced(),
    );
    e.finish()
}
