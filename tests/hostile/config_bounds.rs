//! Hostile configuration values: durations that would overflow a clock or that the kernel
//! refuses are configuration errors (`check` and reload reject them, all at once, each
//! with file:line:col, key and the allowed range); durations at their maximum keep the
//! proxy working; an admin address a listener already holds fails `check`; one bad field
//! of an upstream does not hide its duplicates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// One duration key: the table it lives in, its name, the smallest and largest values
/// accepted, and the nearest values rejected on either side.
struct DurationKey {
    table: &'static str,
    key: &'static str,
    min: &'static str,
    below: &'static str,
    max: &'static str,
    above: &'static str,
    /// Words the key accepts besides a duration, as the message lists them.
    alternatives: &'static str,
}

const fn key(
    table: &'static str,
    key: &'static str,
    (min, below): (&'static str, &'static str),
    (max, above): (&'static str, &'static str),
    alternatives: &'static str,
) -> DurationKey {
    DurationKey {
        table,
        key,
        min,
        below,
        max,
        above,
        alternatives,
    }
}

const MS: (&str, &str) = ("1ms", "999us");
const TEN_MS: (&str, &str) = ("10ms", "9ms");
const DAY: (&str, &str) = ("24h", "86401s");
const OFF: &str = "\"off\" or ";

/// Every duration key of the file, in file order of its table.
const DURATION_KEYS: &[DurationKey] = &[
    key("runtime", "shutdown_grace", MS, DAY, ""),
    key("listeners.front", "handshake_timeout", TEN_MS, DAY, ""),
    key("pools.p", "connect_timeout", MS, DAY, ""),
    key("pools.p", "hedge_after", MS, DAY, OFF),
    key("pools.p", "idle_timeout", MS, DAY, OFF),
    key(
        "pools.p",
        "failback",
        MS,
        DAY,
        "\"immediate\", \"manual\" or ",
    ),
    key("pools.p", "drain_after_failback", MS, DAY, OFF),
    key(
        "pools.p",
        "tcp_keepalive",
        ("1s", "999ms"),
        ("32767s", "32768s"),
        OFF,
    ),
    key("pools.p.health", "interval", TEN_MS, DAY, ""),
    key("pools.p.health", "fast_interval", TEN_MS, DAY, ""),
    key("pools.p.health", "timeout", MS, DAY, ""),
    key("pools.p.outlier", "base_ejection", MS, DAY, ""),
    key("pools.p.outlier", "max_ejection", MS, DAY, ""),
];

/// A config with every duration key set by `value`; returns it and, per key, the
/// 1-based (line, column) of its value.
fn config_with_durations(
    value: impl Fn(&DurationKey) -> &'static str,
) -> (String, Vec<(usize, usize)>) {
    let mut lines: Vec<String> = Vec::new();
    let mut positions = Vec::new();
    let mut table = "";
    for k in DURATION_KEYS {
        if k.table != table {
            table = k.table;
            lines.push(String::new());
            lines.push(format!("[{table}]"));
            match table {
                "listeners.front" => {
                    lines.push("bind = \"127.0.0.1:0\"".into());
                    lines.push("pool = \"p\"".into());
                }
                "pools.p" => lines.push(
                    "upstreams = [{ address = \"127.0.0.1:1\" }, { address = \"127.0.0.1:2\", priority = 1 }]"
                        .into(),
                ),
                _ => {}
            }
        }
        lines.push(format!("{} = \"{}\"", k.key, value(k)));
        positions.push((lines.len(), k.key.len() + 4));
    }
    (lines.join("\n") + "\n", positions)
}

/// `switchyard check` on `text`; returns its exit code, stderr and the path the file
/// had (for matching messages: the file is gone by then).
fn check(text: &str) -> (Option<i32>, String, PathBuf) {
    let dir = TestDir::new();
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run switchyard check");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr, path)
}

fn assert_accepted(text: &str) {
    let (code, stderr, _) = check(text);
    assert_eq!(code, Some(0), "must be accepted: {stderr}\n---\n{text}");
}

/// `check` rejects `text` (made by `value`) naming each duration key at its position.
fn assert_each_key_rejected(value: impl Fn(&DurationKey) -> &'static str + Copy) {
    let (text, positions) = config_with_durations(value);
    let (code, stderr, path) = check(&text);
    assert_eq!(code, Some(1), "{stderr}\n---\n{text}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for (k, (line, column)) in DURATION_KEYS.iter().zip(positions) {
        let expected = format!(
            "{}:{line}:{column}: {}.{}: \"{}\" is out of range; allowed: {}{} to {}",
            path.display(),
            k.table,
            k.key,
            value(k),
            k.alternatives,
            k.min,
            k.max
        );
        assert!(
            stderr.contains(&expected),
            "expected {expected:?} in:\n{stderr}"
        );
    }
    assert_eq!(
        stderr.lines().count(),
        DURATION_KEYS.len(),
        "one problem per key, all at once:\n{stderr}"
    );
}

#[test]
fn check_accepts_every_duration_key_at_its_minimum_and_its_maximum() {
    assert_accepted(&config_with_durations(|k| k.min).0);
    assert_accepted(&config_with_durations(|k| k.max).0);
}

#[test]
fn check_rejects_every_duration_key_just_below_its_minimum() {
    assert_each_key_rejected(|k| k.below);
}

#[test]
fn check_rejects_every_duration_key_just_above_its_maximum() {
    assert_each_key_rejected(|k| k.above);
}

#[test]
fn check_rejects_a_duration_that_would_overflow_the_clock_in_every_key() {
    // Accepted before: each one closed every client, or killed the health checks or
    // the controller, at run time.
    assert_each_key_rejected(|_| "300000000000y");
}

#[test]
fn check_rejects_a_keepalive_with_a_fraction_of_a_second() {
    let (text, positions) = config_with_durations(|k| {
        if k.key == "tcp_keepalive" {
            "1500ms"
        } else {
            k.min
        }
    });
    let (code, stderr, path) = check(&text);
    assert_eq!(code, Some(1), "{stderr}");
    let at = DURATION_KEYS
        .iter()
        .position(|k| k.key == "tcp_keepalive")
        .expect("tcp_keepalive is in the table");
    let (line, column) = positions[at];
    let expected = format!(
        "{}:{line}:{column}: pools.p.tcp_keepalive: \"1500ms\" is not a whole number of seconds",
        path.display()
    );
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in {stderr}"
    );
}

#[test]
fn check_rejects_an_admin_address_that_a_listener_binds() {
    // (admin, listener bind): the same address, or a wildcard of the same family.
    let cases = [
        ("127.0.0.1:15999", "127.0.0.1:15999"),
        ("127.0.0.1:15999", "0.0.0.0:15999"),
        ("0.0.0.0:15999", "127.0.0.1:15999"),
        ("[::1]:15999", "[::]:15999"),
    ];
    for (admin, bind) in cases {
        let text = format!(
            "[admin]\nlisten = \"{admin}\"\n\n[listeners.db]\nbind = [\"127.0.0.1:15998\", \"{bind}\"]\npool = \"p\"\n\n[pools.p]\nupstreams = [{{ address = \"127.0.0.1:1\" }}]\n"
        );
        let (code, stderr, path) = check(&text);
        assert_eq!(code, Some(1), "{admin} vs {bind}: {stderr}");
        let expected = format!(
            "{}:2:10: admin.listen: {admin} collides with bind {bind} of listener \"db\"",
            path.display()
        );
        assert!(
            stderr.contains(&expected),
            "expected {expected:?} in {stderr}"
        );
        // A wildcard admin address is also refused without a token: that is a
        // second, separate problem.
        let others = stderr
            .lines()
            .filter(|l| !l.contains("needs a token_file"))
            .count();
        assert_eq!(others, 1, "{stderr}");
    }
    // Another port, or the other family of a wildcard, is fine.
    for (admin, bind) in [
        ("127.0.0.1:15997", "0.0.0.0:15999"),
        ("127.0.0.1:15999", "[::]:15999"),
    ] {
        assert_accepted(&format!(
            "[admin]\nlisten = \"{admin}\"\n\n[listeners.db]\nbind = \"{bind}\"\npool = \"p\"\n\n[pools.p]\nupstreams = [{{ address = \"127.0.0.1:1\" }}]\n"
        ));
    }
}

#[test]
fn check_reports_duplicate_upstreams_beside_another_problem_of_the_same_upstream() {
    let text = "[listeners.db]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[pools.p]\nupstreams = [\n  { address = \"127.0.0.1:7001\", name = \"a\" },\n  { address = \"127.0.0.1:7001\", name = \"a\", weight = 0 },\n]\n";
    let (code, stderr, path) = check(text);
    assert_eq!(code, Some(1), "{stderr}");
    let file = path.display();
    for expected in [
        format!(
            "{file}:8:15: pools.p.upstreams.address: 127.0.0.1:7001 appears twice in this pool"
        ),
        format!(
            "{file}:8:40: pools.p.upstreams.name: upstream name \"a\" appears twice in this pool"
        ),
        format!("{file}:8:54: pools.p.upstreams.weight: 0 is out of range; allowed: 1 to 256"),
    ] {
        assert!(
            stderr.contains(&expected),
            "expected {expected:?} in:\n{stderr}"
        );
    }
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
}

// --- at run time ---

async fn assert_serving(addr: SocketAddr, admin: SocketAddr) {
    echo_round_trip(addr, b"still serving")
        .await
        .expect("echo round trip through the proxy");
    let (status, body, _) = http("GET", admin, "/livez", None).await;
    assert_eq!(status, 200, "/livez: {body}");
}

fn with_admin(config: &str) -> String {
    format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n{config}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_clock_overflowing_duration_is_rejected_and_the_proxy_keeps_serving() {
    let echo = Server::echo().await;
    let config = with_admin(&one_pool_config(&[(echo.addr, 0)], ""));
    let proxy = start_proxy(&config);
    let (addr, admin) = (proxy.addr("front"), proxy.admin.expect("admin API"));
    assert_serving(addr, admin).await;

    for line in [
        "connect_timeout = \"300000000000y\"",
        "hedge_after = \"300000000000y\"",
        "idle_timeout = \"300000000000y\"",
        "tcp_keepalive = \"500ms\"",
    ] {
        proxy.rewrite_config(&with_admin(&one_pool_config(&[(echo.addr, 0)], line)));
        let error = proxy
            .reloader
            .reload()
            .await
            .expect_err("an out-of-range duration must be rejected")
            .to_string();
        assert!(
            error.contains("is out of range; allowed"),
            "{line}: {error}"
        );
        assert_serving(addr, admin).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_every_connection_duration_at_its_maximum_serves_clients() {
    let echo = Server::echo().await;
    let config = with_admin(&one_pool_config(
        &[(echo.addr, 0)],
        "connect_timeout = \"24h\"\nhedge_after = \"24h\"\nidle_timeout = \"24h\"\ntcp_keepalive = \"32767s\"\nfailback = \"24h\"\ndrain_after_failback = \"24h\"",
    ))
    .replace(
        "pool = \"p\"\n",
        "pool = \"p\"\nhandshake_timeout = \"24h\"\n",
    )
    .replace("[admin]", "[runtime]\nshutdown_grace = \"24h\"\n\n[admin]");
    let proxy = start_proxy(&config);
    let (addr, admin) = (proxy.addr("front"), proxy.admin.expect("admin API"));
    for round in 0..3u64 {
        echo_round_trip(addr, &random_bytes(4096, round))
            .await
            .expect("echo round trip with 24h timeouts");
    }
    assert_serving(addr, admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_with_interval_and_timeout_at_their_maximum_still_run() {
    let echo = Server::echo().await;
    let refused = closed_port();
    let config = with_admin(&pool_config(
        &[("good", echo.addr, 0), ("gone", refused, 0)],
        "",
        "[pools.p.health]\ninterval = \"24h\"\nfast_interval = \"24h\"\ntimeout = \"24h\"\n",
    ));
    let proxy = start_proxy(&config);
    let (addr, admin) = (proxy.addr("front"), proxy.admin.expect("admin API"));
    // The first check of each upstream still runs (and decides its state directly).
    wait_event(&proxy, "gone", "down", SOON).await;
    let route = proxy
        .proxy
        .snapshot
        .load()
        .pool("p")
        .expect("pool p")
        .clone();
    wait_until(SOON, "the first check of `good` passed", || {
        route.upstreams.iter().any(|u| {
            u.config.label() == "good"
                && u.stats
                    .checks_passed
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
        })
    })
    .await;
    let status = get_json(admin, "/status").await;
    let good = upstream_status(&status, "p", "good").expect("good in /status");
    assert_eq!(good["state"], "up", "{good}");
    assert_eq!(good["last_check"]["result"], "ok", "{good}");
    let gone = upstream_status(&status, "p", "gone").expect("gone in /status");
    assert_eq!(gone["state"], "down", "{gone}");
    assert_serving(addr, admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejection_of_the_maximum_length_leaves_the_controller_answering() {
    let echo = Server::echo().await;
    let (refused, refused_alone) = (closed_port(), closed_port());
    let outlier = "[pools.OUT.outlier]\nconsecutive_failures = 1\nbase_ejection = \"24h\"\nmax_ejection = \"24h\"\n\n[pools.OUT.health]\nenabled = false\n";
    let config = with_admin(&format!(
        "[listeners.front]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[listeners.lonely]\nbind = \"127.0.0.1:0\"\npool = \"q\"\n\n\
         [pools.p]\nupstreams = [{{ name = \"refuses\", address = \"{refused}\", priority = 0 }}, {{ name = \"echo\", address = \"{}\", priority = 1 }}]\n\n{}\n\
         [pools.q]\nupstreams = [{{ name = \"refuses-too\", address = \"{refused_alone}\" }}]\n\n{}",
        echo.addr,
        outlier.replace("OUT", "p"),
        outlier.replace("OUT", "q"),
    ));
    let proxy = start_proxy(&config);
    let (addr, admin) = (proxy.addr("front"), proxy.admin.expect("admin API"));

    // The refused attempt ejects `refuses` for a day; the client is served by `echo`.
    echo_round_trip(addr, b"first client")
        .await
        .expect("served by the backup after the refused attempt");
    wait_event(&proxy, "refuses", "ejected", SOON).await;
    // The only upstream of q refuses too: q is left with nothing usable.
    let mut lonely = tokio::net::TcpStream::connect(proxy.addr("lonely"))
        .await
        .expect("connect to listener lonely");
    assert!(
        is_closed(&mut lonely, SOON).await,
        "q has no upstream to serve"
    );
    wait_event(&proxy, "refuses-too", "ejected", SOON).await;

    // The controller still answers, and /status shows both ejections a day long.
    let status = get_json(admin, "/status").await;
    let now = unix_ms();
    for (pool, name) in [("p", "refuses"), ("q", "refuses-too")] {
        let upstream = upstream_status(&status, pool, name).expect("upstream in /status");
        assert_eq!(upstream["state"], "ejected", "{upstream}");
        let until = upstream["ejected_until_unix_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("no ejection end: {upstream}"));
        let day = Duration::from_secs(24 * 60 * 60).as_millis() as u64;
        assert!(
            until > now + day - 60_000 && until <= now + day,
            "ejected until {until}, now {now}: {upstream}"
        );
    }

    // /readyz agrees with /status: ready exactly when every pool has an active tier.
    let pools = status["pools"].as_array().expect("pools in /status");
    let without: Vec<&str> = pools
        .iter()
        .filter(|p| p["active_tier"].is_null())
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(without, ["q"], "{status}");
    let active_p = pools.iter().find(|p| p["name"] == "p").expect("pool p");
    assert_eq!(active_p["active_tier"], 1, "{active_p}");
    let (code, body, _) = http("GET", admin, "/readyz", None).await;
    let ready: serde_json::Value = serde_json::from_str(&body).expect("/readyz is JSON");
    assert_eq!(code, 503, "{body}");
    assert_eq!(ready["ready"], false, "{body}");
    assert_eq!(
        ready["pools_without_usable_upstream"],
        serde_json::json!(without)
    );

    assert_serving(addr, admin).await;
    let again = get_json(admin, "/status").await;
    assert_eq!(
        upstream_status(&again, "p", "refuses").map(|u| u["state"].clone()),
        Some("ejected".into()),
        "still answering, still ejected"
    );
}

/// Files named by the config (the config itself, certificates, keys, the admin token)
/// are read with a size bound: an endless one such as /dev/zero is an error at once,
/// not a hang that eats memory.
#[test]
fn endless_files_are_refused_not_read_forever() {
    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "-c", "/dev/zero"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than"));

    let listener = "[listeners.db]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n";
    let pool = "[pools.p]\nupstreams = [{ address = \"127.0.0.1:1\" }]\n";
    for (text, key) in [
        (
            format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"/dev/zero\"\n{listener}{pool}"
            ),
            "admin.token_file",
        ),
        (
            format!(
                "{listener}[listeners.db.tls]\ncert = \"/dev/zero\"\nkey = \"/dev/zero\"\n{pool}"
            ),
            "listeners.db.tls",
        ),
    ] {
        let (code, stderr, _) = check(&text);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains(key) && stderr.contains("larger than"),
            "{stderr}"
        );
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}
