use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use super::*;

fn members(weights: &[u32]) -> Vec<Member> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| Member {
            key: member_key("pool", &format!("10.0.0.{}:5432", i + 1).parse().unwrap()),
            weight,
        })
        .collect()
}

fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn counts(picker: &Picker, n: usize, picks: u32, load: impl Fn(usize) -> u64) -> Vec<u32> {
    let mut counts = vec![0; n];
    for i in 0..picks {
        counts[picker.pick(client(i), &load)] += 1;
    }
    counts
}

fn assert_share(count: u32, total: u32, expected: f64, tolerance: f64) {
    let share = f64::from(count) / f64::from(total);
    assert!(
        (share - expected).abs() <= tolerance,
        "share {share:.3}, expected {expected:.3} ± {tolerance}"
    );
}

#[test]
fn round_robin_follows_weights_exactly_and_interleaves() {
    let picker = Picker::new(Balance::RoundRobin, &members(&[5, 1, 1]));
    assert_eq!(counts(&picker, 3, 700, |_| 0), vec![500, 100, 100]);
    // Smooth: within one cycle the heavy member is never picked 5 times in a row.
    let Picker::RoundRobin { cycle, .. } = &picker else {
        unreachable!()
    };
    assert_eq!(cycle.len(), 7);
    assert!(
        cycle.windows(5).all(|w| w.iter().any(|&m| m != 0)),
        "{cycle:?}"
    );
    let equal = Picker::new(Balance::RoundRobin, &members(&[1, 1, 1]));
    assert_eq!(counts(&equal, 3, 300, |_| 0), vec![100, 100, 100]);
}

#[test]
fn least_connections_picks_the_least_loaded_per_weight_and_spreads_ties() {
    let picker = Picker::new(Balance::LeastConnections, &members(&[1, 1, 1]));
    let loads = [5u64, 2, 9];
    assert_eq!(counts(&picker, 3, 100, |i| loads[i]), vec![0, 100, 0]);
    assert_eq!(counts(&picker, 3, 300, |_| 0), vec![100, 100, 100]);

    // 2 connections on weight 3 is lighter than 1 on weight 1.
    let weighted = Picker::new(Balance::LeastConnections, &members(&[1, 3]));
    let loads = [1u64, 2];
    assert_eq!(counts(&weighted, 2, 50, |i| loads[i]), vec![0, 50]);
}

#[test]
fn random_two_follows_weights_and_avoids_the_loaded_member() {
    let picker = Picker::new(Balance::RandomTwo, &members(&[1, 1, 2]));
    let picks = 40_000;
    let c = counts(&picker, 3, picks, |_| 0);
    // With equal load the first of the two choices wins: shares follow the weights.
    assert_share(c[0], picks, 0.25, 0.03);
    assert_share(c[2], picks, 0.50, 0.03);

    let loads = [100u64, 0, 0, 0];
    let even = Picker::new(Balance::RandomTwo, &members(&[1, 1, 1, 1]));
    assert_eq!(
        counts(&even, 4, 5_000, |i| loads[i])[0],
        0,
        "never the loaded member when the other choice is idle"
    );

    let single = Picker::new(Balance::RandomTwo, &members(&[1]));
    assert_eq!(counts(&single, 1, 10, |_| 0), vec![10]);
}

#[test]
fn source_hash_is_sticky_and_even() {
    let picker = Picker::new(Balance::SourceHash, &members(&[1, 1, 1]));
    let picks = 30_000;
    let c = counts(&picker, 3, picks, |_| 0);
    for count in c {
        assert_share(count, picks, 1.0 / 3.0, 0.03);
    }
    for i in 0..1000 {
        let first = picker.pick(client(i), |_| 0);
        assert_eq!(picker.pick(client(i), |_| 0), first);
    }
    let v6: IpAddr = "2001:db8::1".parse().unwrap();
    assert_eq!(picker.pick(v6, |_| 0), picker.pick(v6, |_| 0));

    let weighted = Picker::new(Balance::SourceHash, &members(&[1, 1, 2]));
    let c = counts(&weighted, 3, picks, |_| 0);
    assert_share(c[2], picks, 0.5, 0.03);
}

#[test]
fn source_hash_moves_few_clients_when_an_upstream_leaves_or_returns() {
    let all = members(&[1, 1, 1, 1]);
    let before = Picker::new(Balance::SourceHash, &all);
    // Member 2 leaves: positions shift, so compare by key.
    let remaining: Vec<Member> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, m)| *m)
        .collect();
    let after = Picker::new(Balance::SourceHash, &remaining);

    let clients = 40_000;
    let mut moved_from_staying = 0;
    let mut on_leaving = 0;
    for i in 0..clients {
        let old_key = all[before.pick(client(i), |_| 0)].key;
        let new_key = remaining[after.pick(client(i), |_| 0)].key;
        if old_key == all[2].key {
            on_leaving += 1;
        } else if old_key != new_key {
            moved_from_staying += 1;
        }
    }
    // Only the leaving member's quarter must move; Maglev disturbs a few percent more.
    assert_share(on_leaving, clients, 0.25, 0.03);
    assert!(
        f64::from(moved_from_staying) / f64::from(clients) < 0.05,
        "{moved_from_staying} of {clients} clients of staying upstreams moved"
    );

    // And when it comes back, the clients of the others go back where they were.
    let restored = Picker::new(Balance::SourceHash, &all);
    let mut same = HashMap::new();
    for i in 0..clients {
        *same
            .entry(before.pick(client(i), |_| 0) == restored.pick(client(i), |_| 0))
            .or_insert(0) += 1;
    }
    assert_eq!(
        same.get(&false),
        None,
        "same membership gives the same table"
    );
}

#[tokio::test(start_paused = true)]
async fn a_ramp_grows_linearly_from_a_tenth_to_full_and_stays_full() {
    let ramp = Ramp {
        started: Instant::now(),
        duration: Duration::from_secs(10),
    };
    let at = |secs: f64| ramp.started + Duration::from_secs_f64(secs);
    let cases = [
        (0.0, 0.1),
        (2.5, 0.325),
        (5.0, 0.55),
        (9.0, 0.91),
        (10.0, 1.0),
        (60.0, 1.0),
    ];
    for (secs, share) in cases {
        assert!(
            (ramp.share(at(secs)) - share).abs() < 1e-9,
            "at {secs}s: {} instead of {share}",
            ramp.share(at(secs))
        );
    }
    assert_eq!(ramp.ends(), at(10.0));
    // An instant before the start (a snapshot read late) is the start, not below it.
    assert_eq!(
        ramp.share(ramp.started - Duration::from_secs(1)),
        Ramp::FLOOR
    );
}

#[tokio::test(start_paused = true)]
async fn a_ramp_admits_its_share_of_connections_for_every_algorithm() {
    let ramp = Ramp {
        started: Instant::now(),
        duration: Duration::from_secs(10),
    };
    for balance in [
        Balance::RoundRobin,
        Balance::LeastConnections,
        Balance::RandomTwo,
        Balance::SourceHash,
    ] {
        for (secs, share) in [(0.0, 0.1), (5.0, 0.55), (10.0, 1.0)] {
            let now = ramp.started + Duration::from_secs_f64(secs);
            let draws = Draws::new();
            let admitted = (0..20_000)
                .filter(|&i| ramp.admits(now, balance, client(i), 7, &draws))
                .count() as u32;
            assert_share(admitted, 20_000, share, 0.02);
            if balance != Balance::SourceHash {
                // Any run of connections gets the share within a connection or two.
                for run in [10, 37, 100] {
                    let admitted = (0..run)
                        .filter(|&i| ramp.admits(now, balance, client(i), 7, &draws))
                        .count() as f64;
                    assert!(
                        (admitted - share * run as f64).abs() <= 2.0,
                        "{balance}: {admitted} of {run} at share {share}"
                    );
                }
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_source_hash_ramp_moves_each_client_once_and_only_as_many_as_its_share() {
    let ramp = Ramp {
        started: Instant::now(),
        duration: Duration::from_secs(10),
    };
    let draws = Draws::new();
    let admitted_at = |secs: u64| -> Vec<bool> {
        let now = ramp.started + Duration::from_secs(secs);
        (0..10_000)
            .map(|i| ramp.admits(now, Balance::SourceHash, client(i), 7, &draws))
            .collect()
    };
    let mut before = admitted_at(0);
    for secs in 1..=10 {
        let now = admitted_at(secs);
        let left = before.iter().zip(&now).filter(|(b, n)| **b && !**n).count();
        assert_eq!(left, 0, "at {secs}s a client admitted before was sent back");
        before = now;
    }
    assert!(
        before.iter().all(|&a| a),
        "at the end every client is admitted"
    );
    // Another ramp (another upstream) draws independently of this one.
    let now = ramp.started + Duration::from_secs(5);
    let both = (0..10_000)
        .filter(|&i| {
            ramp.admits(now, Balance::SourceHash, client(i), 7, &draws)
                && ramp.admits(now, Balance::SourceHash, client(i), 8, &draws)
        })
        .count() as u32;
    assert_share(both, 10_000, 0.55 * 0.55, 0.03);
}
