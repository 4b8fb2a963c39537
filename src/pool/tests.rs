use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::config::Config;
use crate::snapshot::{PoolRoute, Upstream};

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

/// Tier 0: a, b; tier 1: c; tier 2: d.
fn route(usable: [bool; 4], active: Option<usize>, extra: &str) -> PoolRoute {
    let attempts = if extra.contains("connect_attempts") {
        ""
    } else {
        "connect_attempts = 4"
    };
    let text = format!(
        r#"
[listeners.l]
bind = "127.0.0.1:1"
pool = "p"
[pools.p]
{attempts}
{extra}
upstreams = [
  {{ address = "127.0.0.1:10", name = "a" }},
  {{ address = "127.0.0.1:11", name = "b" }},
  {{ address = "127.0.0.1:12", name = "c", priority = 1 }},
  {{ address = "127.0.0.1:13", name = "d", priority = 2 }},
]
"#
    );
    let config = Config::parse(&text, Path::new("t.toml")).unwrap();
    let pool = config.pools[0].clone();
    let upstreams = pool
        .upstreams
        .iter()
        .map(|u| Arc::new(Upstream::new("p", u.clone())))
        .collect();
    PoolRoute::new(pool, upstreams, usable.to_vec(), active)
}

fn names(route: &PoolRoute) -> Vec<&str> {
    attempt_order(route, CLIENT)
        .into_iter()
        .map(|i| route.upstreams[i].label())
        .collect()
}

#[test]
fn preferred_tier_table() {
    let cases: &[(&[usize], usize, Option<usize>)] = &[
        (&[2, 1], 1, Some(0)),
        (&[0, 1], 1, Some(1)),
        (&[0, 0, 1], 1, Some(2)),
        (&[1, 3], 2, Some(1)),
        (&[1, 1], 2, Some(0)),
        (&[0, 1], 2, Some(1)),
        (&[0, 0], 1, None),
        (&[], 1, None),
    ];
    for (counts, min_usable, expected) in cases {
        assert_eq!(
            preferred_tier(counts, *min_usable),
            *expected,
            "{counts:?} min_usable {min_usable}"
        );
    }
}

#[test]
fn attempt_order_table() {
    let ab = |order: &[&str]| order[..2] == ["a", "b"] || order[..2] == ["b", "a"];

    let all = route([true; 4], Some(0), "");
    let order = names(&all);
    assert!(ab(&order), "{order:?}");
    assert_eq!(order[2..], ["c", "d"]);

    let a_down = route([false, true, true, true], Some(0), "");
    assert_eq!(names(&a_down), ["b", "c", "d"]);

    let primary_down = route([false, false, true, true], Some(1), "");
    assert_eq!(names(&primary_down), ["c", "d"]);

    // Primary usable again but held back by failback: it is the last resort.
    let held = route([true, true, true, true], Some(1), "");
    let order = names(&held);
    assert_eq!(order[..2], ["c", "d"]);
    assert!(ab(&order[2..]), "{order:?}");

    let capped = route([true; 4], Some(0), "connect_attempts = 2");
    assert!(ab(&names(&capped)));

    let try_all = route([false; 4], None, "");
    let order = names(&try_all);
    assert!(ab(&order), "{order:?}");
    assert_eq!(order[2..], ["c", "d"]);

    let reject = route([false; 4], None, "when_all_down = \"reject\"");
    assert!(names(&reject).is_empty());
}

#[test]
fn attempt_order_rotates_the_first_choice_within_the_active_tier() {
    let all = route([true; 4], Some(0), "");
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..10 {
        firsts.insert(names(&all)[0].to_string());
    }
    assert_eq!(firsts.len(), 2, "round robin alternates a and b");
}

#[test]
fn with_preferred_tier_applies_min_usable() {
    let config_route = route([true, false, true, true], Some(0), "min_usable = 2");
    let rebuilt = PoolRoute::with_preferred_tier(
        config_route.config.clone(),
        config_route.upstreams.to_vec(),
        config_route.usable.to_vec(),
    );
    // No tier has two usable upstreams, so the lowest with any stays active.
    assert_eq!(rebuilt.active_tier, Some(0));
    assert_eq!(names(&rebuilt)[0], "a");
}
