//! Addresses, the event ring and check counters of an in-process proxy: what tests wait
//! for while real servers fail and recover.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;

use switchyard::events::{Event, EventKind};

use super::{TestProxy, wait_until};

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

pub fn quoted(addr: SocketAddr) -> String {
    format!("\"{addr}\"")
}

// ---------------------------------------------------------------- events and state

pub fn last_event_id(proxy: &TestProxy) -> u64 {
    proxy.proxy.events.all().last().map_or(0, |e| e.id)
}

/// The first event newer than `after` that `matches`, waiting up to `limit` for it.
pub async fn event_after(
    proxy: &TestProxy,
    after: u64,
    limit: Duration,
    what: &str,
    matches: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + limit;
    loop {
        let events = proxy.proxy.events.all();
        if let Some(event) = events.iter().find(|e| e.id > after && matches(e)) {
            return event.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no event {what} within {limit:?}: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn upstream_became<'a>(label: &'a str, state: &'a str) -> impl Fn(&Event) -> bool + 'a {
    move |e| e.kind == EventKind::Upstream && e.upstream.as_deref() == Some(label) && e.new == state
}

pub fn tier_became(priority: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| e.kind == EventKind::Tier && e.new == priority
}

pub fn checks_passed(proxy: &TestProxy, pool: &str, label: &str) -> u64 {
    let snapshot = proxy.proxy.snapshot.load();
    let route = snapshot.pool(pool).expect("pool exists");
    route
        .upstreams
        .iter()
        .find(|u| u.label() == label)
        .expect("upstream exists")
        .stats
        .checks_passed
        .load(Relaxed)
}

/// Waits until every upstream of `pool` has passed an active check.
pub async fn wait_all_checked(proxy: &TestProxy, pool: &str) {
    let route = proxy
        .proxy
        .snapshot
        .load()
        .pool(pool)
        .expect("pool exists")
        .clone();
    wait_until(
        Duration::from_secs(20),
        "every upstream passed a check",
        || {
            route
                .upstreams
                .iter()
                .all(|u| u.stats.checks_passed.load(Relaxed) > 0)
        },
    )
    .await;
}
