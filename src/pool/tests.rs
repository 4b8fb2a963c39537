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

/// Tier 0: a, b; tier 1: c; tier 2: d, all usable; the ramps given, active tier 0.
fn ramped_route(
    balance: &str,
    ramps: Vec<Option<crate::balance::Ramp>>,
    failback_ramp: Option<crate::snapshot::FailbackRamp>,
    states: [State; 4],
) -> PoolRoute {
    let config = route([true; 4], Some(0), &format!("balance = \"{balance}\""))
        .config
        .clone();
    let upstreams: Vec<_> = config
        .upstreams
        .iter()
        .map(|u| std::sync::Arc::new(Upstream::new(&config.name, u.clone())))
        .collect();
    PoolRoute::new(RouteParts {
        closers: upstreams.iter().map(|_| Default::default()).collect(),
        stats: Default::default(),
        upstreams,
        states: states.to_vec(),
        active_tier: Some(0),
        ramps,
        failback_ramp,
        feedback: Feedback::detached(),
        config,
    })
}

const BALANCES: [&str; 4] = [
    "round_robin",
    "least_connections",
    "random_two",
    "source_hash",
];

/// How many of `clients` distinct clients get each upstream as their first choice.
fn first_choices(route: &PoolRoute, clients: u32) -> std::collections::HashMap<String, u32> {
    let mut counts = std::collections::HashMap::new();
    for i in 0..clients {
        let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let first = attempt_order(route, client, &[])[0];
        *counts
            .entry(route.upstreams[first].label().to_string())
            .or_insert(0) += 1;
    }
    counts
}

fn share_of(counts: &std::collections::HashMap<String, u32>, label: &str, total: u32) -> f64 {
    f64::from(counts.get(label).copied().unwrap_or(0)) / f64::from(total)
}

/// A ramp of 10 seconds starting now.
fn ramp_from_now() -> crate::balance::Ramp {
    crate::balance::Ramp {
        started: tokio::time::Instant::now(),
        duration: std::time::Duration::from_secs(10),
    }
}

/// Lets the paused clock reach `secs` after `ramp` started.
async fn at(ramp: crate::balance::Ramp, secs: u64) {
    let due = ramp.started + std::time::Duration::from_secs(secs);
    tokio::time::advance(due.saturating_duration_since(tokio::time::Instant::now())).await;
}

#[tokio::test(start_paused = true)]
async fn a_ramping_upstream_takes_its_growing_share_of_its_tier_for_every_algorithm() {
    for balance in BALANCES {
        let ramp = ramp_from_now();
        let route = ramped_route(
            balance,
            vec![Some(ramp), None, None, None],
            None,
            [State::Up; 4],
        );
        assert!(route.ramping);
        // a's full share of tier 0 is a half; it starts at a tenth of that.
        for (secs, expected) in [(0, 0.05), (5, 0.275), (10, 0.5)] {
            at(ramp, secs).await;
            let counts = first_choices(&route, 10_000);
            let a = share_of(&counts, "a", 10_000);
            assert!(
                (a - expected).abs() < 0.03,
                "{balance} at {secs}s: a has {a:.3} of new connections, expected {expected}"
            );
            assert_eq!(counts.get("c"), None, "{balance}: the rest stays in tier 0");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_source_hash_ramp_moves_only_the_clients_it_takes() {
    let ramp = ramp_from_now();
    let steady = ramped_route("source_hash", vec![None; 4], None, [State::Up; 4]);
    let without_a = ramped_route(
        "source_hash",
        vec![None; 4],
        None,
        [State::Down, State::Up, State::Up, State::Up],
    );
    let ramped = ramped_route(
        "source_hash",
        vec![Some(ramp), None, None, None],
        None,
        [State::Up; 4],
    );
    let first = |route: &PoolRoute, i: u32| {
        let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        route.upstreams[attempt_order(route, client, &[])[0]]
            .label()
            .to_string()
    };
    // Before a came back, every client was on b; halfway through, only the clients a
    // takes have moved, and each of them is one a takes at full weight.
    at(ramp, 5).await;
    let mut moved = 0;
    for i in 0..10_000 {
        assert_eq!(first(&without_a, i), "b");
        let now = first(&ramped, i);
        if now == "a" {
            moved += 1;
            assert_eq!(
                first(&steady, i),
                "a",
                "client {i} moved to a before its turn"
            );
        }
    }
    let share = f64::from(moved) / 10_000.0;
    assert!((share - 0.275).abs() < 0.03, "{share}");
    // Sticky: asked again, every client goes where it went.
    for i in 0..1_000 {
        assert_eq!(first(&ramped, i), first(&ramped, i));
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_back_tier_takes_a_growing_share_and_the_rest_stays_on_the_tier_before() {
    use crate::snapshot::FailbackRamp;
    for balance in BALANCES {
        let ramp = ramp_from_now();
        let failback = Some(FailbackRamp { from: 1, ramp });
        let route = ramped_route(balance, vec![None; 4], failback, [State::Up; 4]);
        for (secs, expected) in [(0, 0.1), (5, 0.55), (10, 1.0)] {
            at(ramp, secs).await;
            let counts = first_choices(&route, 10_000);
            let tier0 = share_of(&counts, "a", 10_000) + share_of(&counts, "b", 10_000);
            assert!(
                (tier0 - expected).abs() < 0.03,
                "{balance} at {secs}s: tier 0 has {tier0:.3}, expected {expected}"
            );
            assert!(
                (share_of(&counts, "c", 10_000) - (1.0 - tier0)).abs() < 1e-9,
                "{balance}: the rest goes to tier 1, nothing to tier 2"
            );
        }
        // A client sent to tier 1 still has tier 0 next: a failed attempt there is not
        // the end.
        let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let order = attempt_order(&route, client, &[]);
        assert_eq!(order.len(), 4, "{balance}: every usable upstream, once");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failback_ramp_whose_old_tier_is_empty_sends_everything_to_the_new_tier() {
    use crate::snapshot::FailbackRamp;
    let ramp = ramp_from_now();
    let route = ramped_route(
        "round_robin",
        vec![None; 4],
        Some(FailbackRamp { from: 1, ramp }),
        [State::Up, State::Up, State::Down, State::Up],
    );
    assert!(route.failback_ramp.is_none(), "nowhere for the rest to go");
    let counts = first_choices(&route, 1_000);
    assert_eq!(counts.get("c"), None);
    assert_eq!(counts.get("d"), None, "never to the tier after it either");
}

#[test]
fn a_tier_whose_members_all_ramp_keeps_every_connection() {
    use std::time::Duration;
    use tokio::time::Instant;
    let ramp = crate::balance::Ramp {
        started: Instant::now(),
        duration: Duration::from_secs(3600),
    };
    let route = ramped_route(
        "round_robin",
        vec![Some(ramp), Some(ramp), None, None],
        None,
        [State::Up; 4],
    );
    let counts = first_choices(&route, 1_000);
    assert_eq!(
        share_of(&counts, "a", 1_000) + share_of(&counts, "b", 1_000),
        1.0
    );
}
