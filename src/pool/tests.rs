use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use super::*;
use crate::config::Config;
use crate::health::state::State;
use crate::snapshot::PoolRoute;

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
    let states = usable
        .iter()
        .map(|&u| if u { State::Up } else { State::Down })
        .collect();
    let mut route = standalone_route(config.pools[0].clone(), states);
    route.active_tier = active;
    route
}

fn names(route: &PoolRoute) -> Vec<&str> {
    attempt_order(route, CLIENT, &[])
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
fn standalone_routes_start_on_the_preferred_tier() {
    let config = route([true; 4], None, "").config.clone();
    let primary_down = standalone_route(
        config.clone(),
        vec![State::Down, State::Ejected, State::Up, State::Up],
    );
    assert_eq!(primary_down.active_tier, Some(1));
    assert_eq!(names(&primary_down), ["c", "d"]);
    let drained = standalone_route(
        config,
        vec![State::Drain, State::Maint, State::Down, State::Down],
    );
    assert_eq!(drained.active_tier, None);
}

#[tokio::test(start_paused = true)]
async fn decide_active_tier_table() {
    use std::time::Duration;
    use tokio::time::Instant;

    use crate::config::Failback;

    let t0 = Instant::now();
    let s = |secs: u64| t0 + Duration::from_secs(secs);
    let hold = Failback::After(Duration::from_secs(3));
    // (name, current, usable counts, min_usable, failback, better_since, now) -> (active, better_since)
    type Case<'a> = (
        &'a str,
        Option<usize>,
        &'a [usize],
        usize,
        Failback,
        Option<Instant>,
        Instant,
        Option<usize>,
        Option<Instant>,
    );
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("start: preferred",              None,    &[1, 1], 1, Failback::Manual,    None,       t0,   Some(0), None),
        ("stable",                        Some(0), &[1, 1], 1, hold,                None,       t0,   Some(0), None),
        ("failover is immediate",         Some(0), &[0, 1], 1, Failback::Manual,    None,       t0,   Some(1), None),
        ("failover below min_usable",     Some(0), &[1, 2], 2, hold,                None,       t0,   Some(1), None),
        ("all down",                      Some(0), &[0, 0], 1, hold,                None,       t0,   None,    None),
        ("back from all down at once",    None,    &[1, 1], 1, Failback::Manual,    None,       t0,   Some(0), None),
        ("failback immediate",            Some(1), &[1, 1], 1, Failback::Immediate, None,       t0,   Some(0), None),
        ("failback manual waits",         Some(1), &[1, 1], 1, Failback::Manual,    None,       t0,   Some(1), None),
        ("failback hold starts clock",    Some(1), &[1, 1], 1, hold,                None,       s(5), Some(1), Some(s(5))),
        ("failback hold keeps clock",     Some(1), &[1, 1], 1, hold,                Some(s(5)), s(7), Some(1), Some(s(5))),
        ("failback hold elapsed",         Some(1), &[1, 1], 1, hold,                Some(s(5)), s(8), Some(0), None),
        ("flap resets clock",             Some(1), &[0, 1], 1, hold,                Some(s(5)), s(7), Some(1), None),
        ("survival beats manual",         Some(1), &[1, 0], 1, Failback::Manual,    None,       t0,   Some(0), None),
        ("survival beats hold",           Some(1), &[1, 0], 1, hold,                None,       t0,   Some(0), None),
    ];
    for (name, current, counts, min_usable, failback, since, now, active, better_since) in cases {
        let d = decide_active_tier(*current, counts, *min_usable, *failback, *since, *now);
        assert_eq!(
            (d.active, d.better_since),
            (*active, *better_since),
            "{name}"
        );
    }
}

#[test]
fn try_all_skips_upstreams_an_operator_took_out() {
    let text = r#"
[listeners.l]
bind = "127.0.0.1:1"
pool = "p"
[pools.p]
connect_attempts = 4
upstreams = [
  { address = "127.0.0.1:10", name = "a" },
  { address = "127.0.0.1:11", name = "b" },
  { address = "127.0.0.1:12", name = "c", priority = 1 },
  { address = "127.0.0.1:13", name = "d", priority = 2 },
]
"#;
    let config = Config::parse(text, Path::new("t.toml")).unwrap();
    let states = vec![State::Down, State::Maint, State::Drain, State::Ejected];
    let route = standalone_route(config.pools[0].clone(), states);
    assert_eq!(route.active_tier, None);
    // Nothing usable: checks may be wrong about a and d, the operator is not about b, c.
    assert_eq!(names(&route), vec!["a", "d"]);
}
