//! The admin API (SPEC §5) and `switchyard status`, over a real HTTP client.

mod common;

use std::time::Duration;

use common::*;

const TOKEN: &str = "correct-horse-battery-staple";

/// A proxy with the admin API on port 0 and a token file; primary `a`, backup `b`.
async fn start(a: std::net::SocketAddr, b: std::net::SocketAddr) -> TestProxy {
    let dir = TestDir::new();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\n{}",
        token_file.display(),
        pool_config(&[("a", a, 0), ("b", b, 1)], "", FAST_HEALTH)
    );
    let proxy = start_proxy_in(dir, "switchyard.toml", &config);
    let admin = proxy.admin.expect("admin API started");
    // Wait for the first checks so that states are settled.
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let status = get_json(admin, "/status").await;
        let checked = status["pools"][0]["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| !u["last_check"].is_null());
        if checked {
            break proxy;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "first checks never completed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_readyz_status_and_events() {
    let mut a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = start(a.addr, b.addr).await;
    let admin = proxy.admin.unwrap();

    let (code, body, _) = http("GET", admin, "/livez", None).await;
    assert_eq!((code, body.contains("ok")), (200, true));
    let (code, body, _) = http("GET", admin, "/readyz", None).await;
    assert_eq!(code, 200, "{body}");

    let status = get_json(admin, "/status").await;
    assert_eq!(status["listeners"][0]["name"], "front");
    assert_eq!(status["listeners"][0]["pool"], "p");
    assert_eq!(
        status["listeners"][0]["binds"][0],
        proxy.addr("front").to_string()
    );
    let pool = &status["pools"][0];
    assert_eq!(
        (pool["name"].as_str(), pool["active_tier"].as_u64()),
        (Some("p"), Some(0))
    );
    assert_eq!(pool["failback"], "immediate");
    let a_view = upstream_status(&status, "p", "a").unwrap();
    assert_eq!(a_view["state"], "up");
    assert_eq!(a_view["address"], a.addr.to_string());
    assert_eq!(a_view["last_check"]["result"], "ok");
    for key in [
        "reason",
        "since_unix_ms",
        "check_passes",
        "check_failures",
        "ejected_until_unix_ms",
        "connections_active",
        "connections_total",
        "bytes_sent",
        "bytes_received",
    ] {
        assert!(a_view.get(key).is_some(), "status lacks {key}: {a_view}");
    }

    a.kill().await;
    wait_event(&proxy, "a", "down", SOON).await;
    let events = get_json(admin, "/events").await;
    let all = events["events"].as_array().unwrap();
    let down = all
        .iter()
        .find(|e| e["upstream"] == "a" && e["new"] == "down")
        .expect("down event");
    assert_eq!(down["old"], "up");
    assert_eq!(down["pool"], "p");
    assert_eq!(down["kind"], "upstream");
    assert!(
        down["reason"].as_str().unwrap().contains("refused"),
        "{down}"
    );
    assert!(down["at_unix_ms"].as_u64().unwrap() > 0);
    let tier = all
        .iter()
        .find(|e| e["kind"] == "tier")
        .expect("tier event");
    assert_eq!(
        (tier["old"].as_str(), tier["new"].as_str()),
        (Some("0"), Some("1"))
    );
    let newest = all.last().unwrap()["id"].as_u64().unwrap();
    let since = get_json(admin, &format!("/events?since={}", newest - 1)).await;
    assert_eq!(
        since["events"].as_array().unwrap().len(),
        1,
        "newer ones only"
    );
    assert!(
        get_json(admin, &format!("/events?since={newest}")).await["events"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let (code, body, _) = http("GET", admin, "/events?since=yesterday", None).await;
    assert_eq!(code, 400);
    assert!(body.contains("error"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_when_a_pool_has_no_usable_upstream() {
    let mut a = Backend::start("a").await;
    let mut b = Backend::start("b").await;
    let proxy = start(a.addr, b.addr).await;
    let admin = proxy.admin.unwrap();
    a.kill().await;
    b.kill().await;
    wait_until(SOON, "nothing usable", || {
        active_priority(&proxy, "p").is_none()
    })
    .await;
    let (code, body, _) = http("GET", admin, "/readyz", None).await;
    assert_eq!(code, 503, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["pools_without_usable_upstream"][0], "p");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_404_405_401_and_400_have_json_bodies() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = start(a.addr, b.addr).await;
    let admin = proxy.admin.unwrap();

    let (code, body, _) = http("GET", admin, "/nope", None).await;
    assert_eq!(code, 404);
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string());
    let (code, _, allow) = http("POST", admin, "/status", Some(TOKEN)).await;
    assert_eq!((code, allow.as_deref()), (405, Some("GET, HEAD")));
    let (code, _, allow) = http("GET", admin, "/reload", None).await;
    assert_eq!((code, allow.as_deref()), (405, Some("POST")));

    for path in ["/reload", "/pools/p/failback", "/pools/p/upstreams/a/drain"] {
        let (code, body, _) = http("POST", admin, path, None).await;
        assert_eq!(code, 401, "{path} without a token: {body}");
        let (code, _, _) = http("POST", admin, path, Some("wrong")).await;
        assert_eq!(code, 401, "{path} with a wrong token");
    }
    assert_eq!(
        active_priority(&proxy, "p"),
        Some(0),
        "refused requests changed nothing"
    );
    let status = get_json(admin, "/status").await;
    assert_eq!(upstream_status(&status, "p", "a").unwrap()["state"], "up");

    let (code, _, _) = http("POST", admin, "/pools/p/upstreams/%zz/drain", Some(TOKEN)).await;
    assert_eq!(code, 400);
    let (code, _, _) = http(
        "POST",
        admin,
        "/pools/p/upstreams/nosuch/drain",
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 404);
    let (code, _, _) = http("POST", admin, "/pools/nosuch/failback", Some(TOKEN)).await;
    assert_eq!(code, 404);
    let (code, body, _) = http("POST", admin, "/pools/p/failback", Some(TOKEN)).await;
    assert_eq!(code, 409, "nothing better to fail back to: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_state_operations_and_manual_failback() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = start(a.addr, b.addr).await;
    let admin = proxy.admin.unwrap();
    let front = proxy.addr("front");

    let (code, body, _) = http("POST", admin, "/pools/p/upstreams/a/maint", Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"maint\""), "{body}");
    assert_eq!(
        greeted_by(front).await.unwrap(),
        "b",
        "forced failover by maint"
    );
    assert_eq!(active_priority(&proxy, "p"), Some(1));

    // Back under health-check control by its URL-encoded address.
    let encoded = a.addr.to_string().replace(':', "%3A");
    let (code, body, _) = http(
        "POST",
        admin,
        &format!("/pools/p/upstreams/{encoded}/up"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    wait_until(SOON, "failback", || active_priority(&proxy, "p") == Some(0)).await;

    let (code, _, _) = http("POST", admin, "/pools/p/upstreams/a/drain", Some(TOKEN)).await;
    assert_eq!(code, 200);
    assert_eq!(greeted_by(front).await.unwrap(), "b");
    let status = get_json(admin, "/status").await;
    let a_view = upstream_status(&status, "p", "a").unwrap();
    assert_eq!(
        (a_view["state"].as_str(), a_view["reason"].as_str()),
        (Some("drain"), Some("admin"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failback_over_http() {
    let mut a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let dir = TestDir::new();
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\n{}",
        token_file.display(),
        pool_config(
            &[("a", a.addr, 0), ("b", b.addr, 1)],
            "failback = \"manual\"",
            FAST_HEALTH
        )
    );
    let proxy = start_proxy(&config);
    let admin = proxy.admin.unwrap();
    a.kill().await;
    wait_until(SOON, "failover", || active_priority(&proxy, "p") == Some(1)).await;
    a.restart().await;
    wait_event(&proxy, "a", "up", SOON).await;
    assert_eq!(
        active_priority(&proxy, "p"),
        Some(1),
        "manual: stays on the backup"
    );
    let (code, body, _) = http("POST", admin, "/pools/p/failback", Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"active_tier\": 0"), "{body}");
    assert_eq!(greeted_by(proxy.addr("front")).await.unwrap(), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_answers_with_the_result() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = start(a.addr, b.addr).await;
    let admin = proxy.admin.unwrap();
    let original = std::fs::read_to_string(&proxy.config_path).unwrap();

    proxy.rewrite_config(&original.replace("[pools.p]", "[pools.p]\nconnect_timeout = \"1s\""));
    let (code, body, _) = http("POST", admin, "/reload", Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["result"], "ok");
    assert_eq!(json["changes"]["pools_changed"][0], "p");

    proxy.rewrite_config(&original.replace("[pools.p]", "[pools.p]\nbalance = \"fastest\""));
    let (code, body, _) = http("POST", admin, "/reload", Some(TOKEN)).await;
    assert_eq!(code, 400, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["result"], "error");
    assert!(
        json["error"].as_str().unwrap().contains("switchyard.toml:"),
        "{json}"
    );
    assert_eq!(
        greeted_by(proxy.addr("front")).await.unwrap(),
        "a",
        "old config serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_contain_every_spec_name() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = start(a.addr, b.addr).await;
    let admin = proxy.admin.unwrap();
    for _ in 0..3 {
        echo_round_trip_greeted(proxy.addr("front")).await;
    }
    let scrape = metrics(admin).await;
    let names: std::collections::HashSet<&str> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for name in [
        "switchyard_connections_total",
        "switchyard_connections_active",
        "switchyard_connections_failed_total",
        "switchyard_connections_rejected_total",
        "switchyard_bytes_total",
        "switchyard_upstream_up",
        "switchyard_upstream_connections_active",
        "switchyard_upstream_connect_failures_total",
        "switchyard_upstream_connect_seconds",
        "switchyard_pool_active_tier",
        "switchyard_failovers_total",
        "switchyard_failbacks_total",
        "switchyard_health_checks_total",
        "switchyard_config_reloads_total",
    ] {
        assert!(names.contains(name), "/metrics lacks {name}; has {names:?}");
    }
    let value = |metric: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| s.value.clone())
    };
    assert!(
        matches!(value("switchyard_connections_total", &[("listener", "front")]), Some(prometheus_parse::Value::Counter(v)) if v >= 3.0)
    );
    assert!(
        matches!(value("switchyard_upstream_up", &[("upstream", "a")]), Some(prometheus_parse::Value::Gauge(v)) if v == 1.0)
    );
    assert!(
        matches!(value("switchyard_pool_active_tier", &[("pool", "p")]), Some(prometheus_parse::Value::Gauge(v)) if v == 0.0)
    );
    match value("switchyard_upstream_connect_seconds", &[("pool", "p")]) {
        Some(prometheus_parse::Value::Histogram(buckets)) => {
            let total = buckets.last().map_or(0.0, |b| b.count);
            assert!(total >= 3.0, "connect latency observed: {buckets:?}");
        }
        other => panic!("connect latency is not a histogram: {other:?}"),
    }
}

/// One client through the proxy that reads the greeting and checks an echo.
async fn echo_round_trip_greeted(addr: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    read_line(&mut stream).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_status_prints_a_table_and_json_from_a_running_instance() {
    let mut a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = start(a.addr, b.addr).await;
    let admin = proxy.admin.unwrap();
    a.kill().await;
    wait_event(&proxy, "a", "down", SOON).await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["status", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("POOL p  active tier 1"), "{table}");
    let a_line = table.lines().find(|l| l.contains(" a ")).expect("a row");
    assert!(
        a_line.contains("DOWN") && a_line.contains("refused"),
        "{a_line}"
    );
    let b_line = table.lines().find(|l| l.contains(" b ")).expect("b row");
    assert!(b_line.contains("*1") && b_line.contains("UP"), "{b_line}");
    assert!(
        table.contains("front") && table.contains(&proxy.addr("front").to_string()),
        "{table}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["status", "--admin", &admin.to_string(), "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(upstream_status(&json, "p", "a").unwrap()["state"], "down");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["status", "--admin", &closed_port().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"));
}

/// Adding, changing and removing `token_file` takes effect on reload, and an admin API
/// without a token says so once at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_changes_take_effect_on_reload() {
    let a = Server::echo().await;
    let (admin, front) = (closed_port(), closed_port());
    let dir = TestDir::new();
    let (first, second) = (dir.join("first"), dir.join("second"));
    std::fs::write(&first, "first-token\n").unwrap();
    std::fs::write(&second, "second-token\n").unwrap();
    let config = |token_file: Option<&std::path::Path>| {
        let token = token_file.map_or(String::new(), |f| {
            format!("token_file = \"{}\"\n", f.display())
        });
        format!(
            "[admin]\nlisten = \"{admin}\"\n{token}\n{}",
            one_pool_config(&[(a.addr, 0)], "").replace("127.0.0.1:0", &front.to_string())
        )
    };
    let proxy = ChildProxy::start(&config(None), admin).await;
    let drain = "/pools/p/upstreams/127.0.0.1%3A1/up";
    let status = |token: Option<&'static str>| async move {
        // 404: the upstream does not exist, but the request got past authorization.
        http("POST", admin, drain, token).await.0
    };
    assert_eq!(status(None).await, 404);
    // Logged before the first request was served.
    let warnings = proxy
        .stderr()
        .lines()
        .filter(|l| l.contains("the admin API has no token_file"))
        .count();
    assert_eq!(warnings, 1, "{}", proxy.stderr());

    assert_eq!(proxy.reload_with(&config(Some(&first))).await, "ok");
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some("first-token")).await, 404);

    assert_eq!(proxy.reload_with(&config(Some(&second))).await, "ok");
    assert_eq!(status(Some("first-token")).await, 401);
    assert_eq!(status(Some("second-token")).await, 404);

    assert_eq!(proxy.reload_with(&config(None)).await, "ok");
    assert_eq!(status(None).await, 404);
}
