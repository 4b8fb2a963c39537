//! Check kinds against the real thing, through the proxy: PostgreSQL that does not take
//! logins yet, a streaming primary/standby pair, a Redis master and its replica, a
//! Patroni-style REST endpoint on a separate port, and MariaDB. Servers come from
//! tests/common/servers.rs (skipped loudly when absent, unless required).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// Checks that decide within a few hundred milliseconds.
const QUICK: &str = "interval = \"200ms\"\nfast_interval = \"100ms\"\nrise = 2\nfall = 1";

/// Listener `front` → pool `p` over `upstreams` (name, address, priority), with
/// `check` lines added to the [`QUICK`] health table.
fn config(upstreams: &[(&str, SocketAddr, u32)], check: &str) -> String {
    let timeout = if check.contains("timeout") {
        ""
    } else {
        "timeout = \"1s\"\n"
    };
    pool_config(
        upstreams,
        "",
        &format!("[pools.p.health]\n{QUICK}\n{timeout}{check}\n"),
    )
}

/// Polls `condition` every 50 ms until it holds; panics with `what` after `limit`.
async fn wait_until_async<F, Fut>(limit: Duration, what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The reason of the first event that took `upstream` to `state`.
async fn became(proxy: &TestProxy, upstream: &str, state: &str) -> String {
    wait_event(proxy, upstream, state, Duration::from_secs(30))
        .await
        .reason
}

// ---------------------------------------------------------------- PostgreSQL

/// A server that is up but does not take logins (here a standby with hot_standby off,
/// the same answer as crash recovery: 57P03, "not yet accepting connections") fails the
/// postgres check with the server's words, clients go to the backup; once it takes
/// logins (promoted) it passes and clients return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_check_fails_while_the_server_takes_no_logins_and_passes_once_it_does() {
    let Some(tools) = PgTools::find() else {
        return;
    };
    let cluster = PgCluster::init(tools);
    let backup = cluster.start("backup").await;
    let recovering = cluster.standby_of(&backup, "recovering", &["hot_standby=off"]);
    // Up, and refusing logins (rather than not listening yet) before the first check.
    wait_until_async(
        Duration::from_secs(30),
        "the standby answers startups",
        || async {
            pg_port(recovering.addr, Duration::from_secs(2))
                .await
                .is_err_and(|e| e.to_string().contains("server error"))
        },
    )
    .await;
    let proxy = start_proxy(&config(
        &[
            ("recovering", recovering.addr, 0),
            ("backup", backup.addr, 1),
        ],
        "kind = \"postgres\"\nuser = \"postgres\"",
    ));
    let reason = became(&proxy, "recovering", "down").await;
    assert!(
        reason.starts_with("postgres: the database system is not")
            && reason.contains("accepting connections"),
        "{reason}"
    );
    let port = pg_port(proxy.addr("front"), SOON).await.expect("a session");
    assert_eq!(port, backup.addr.port(), "clients go to the backup");

    recovering.promote();
    became(&proxy, "recovering", "up").await;
    let port = pg_port(proxy.addr("front"), SOON).await.expect("a session");
    assert_eq!(
        port,
        recovering.addr.port(),
        "clients return once it takes logins"
    );
}

/// `role = "primary"` logs in and asks pg_is_in_recovery(): of a real streaming pair
/// (pg_basebackup -R) only the primary serves; `role = "standby"` picks the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_role_picks_the_primary_or_the_standby_of_a_streaming_pair() {
    let Some(tools) = PgTools::find() else {
        return;
    };
    let cluster = PgCluster::init(tools);
    let primary = cluster.start("primary").await;
    let standby = cluster.standby_of(&primary, "standby", &[]);
    standby.wait_for_queries().await;
    let upstreams = [("primary", primary.addr, 0), ("standby", standby.addr, 0)];
    for (role, serving, other) in [
        ("primary", &primary, "standby"),
        ("standby", &standby, "primary"),
    ] {
        let proxy = start_proxy(&config(
            &upstreams,
            &format!("kind = \"postgres\"\nuser = \"postgres\"\nrole = \"{role}\""),
        ));
        let reason = became(&proxy, other, "down").await;
        let expected = if role == "primary" {
            "postgres: in recovery (a standby)"
        } else {
            "postgres: not in recovery (a primary)"
        };
        assert_eq!(reason, expected);
        for _ in 0..6 {
            let port = pg_port(proxy.addr("front"), SOON).await.expect("a session");
            assert_eq!(port, serving.addr.port(), "role = {role}");
        }
    }
}

// ---------------------------------------------------------------- Redis

/// `role = "master"`: a real replica (`--replicaof`) is marked down with `redis
/// role:slave` and gets no client; when the two swap roles, so does routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_role_master_never_routes_to_a_replica() {
    let dir = TempDir::new();
    let Some((master, replica)) = redis_pair(&dir).await else {
        return;
    };
    let proxy = start_proxy(&config(
        &[("one", master.addr, 0), ("two", replica.addr, 0)],
        "kind = \"redis\"\nrole = \"master\"",
    ));
    assert_eq!(became(&proxy, "two", "down").await, "redis role:slave");
    for _ in 0..8 {
        assert_eq!(redis_node(proxy.addr("front")).await, master.addr.port());
    }

    redis_swap(&master, &replica).await;
    assert_eq!(became(&proxy, "one", "down").await, "redis role:slave");
    became(&proxy, "two", "up").await;
    for _ in 0..8 {
        assert_eq!(redis_node(proxy.addr("front")).await, replica.addr.port());
    }
}

// ---------------------------------------------------------------- HTTP (Patroni-style)

/// The HAProxy-style Patroni setup: traffic to each host's database port, checks to
/// `GET /primary` on the REST API port of the same host (`port`); when the primary
/// role moves, so do new clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_style_http_check_on_a_separate_port_switches_the_pool_when_it_flips() {
    let (nodes, rest_port) = patroni_nodes(&["a", "b"]).await;
    let proxy = start_proxy(&config(
        &[("a", nodes[0].addr, 0), ("b", nodes[1].addr, 0)],
        &format!("kind = \"http\"\nport = {rest_port}\npath = \"/primary\""),
    ));
    assert_eq!(became(&proxy, "b", "down").await, "http 503");
    for _ in 0..6 {
        assert_eq!(
            greeted_by(proxy.addr("front")).await.expect("greeting"),
            "a"
        );
    }

    fail_over(&nodes, 1);
    assert_eq!(became(&proxy, "a", "down").await, "http 503");
    became(&proxy, "b", "up").await;
    for _ in 0..6 {
        assert_eq!(
            greeted_by(proxy.addr("front")).await.expect("greeting"),
            "b"
        );
    }
}

// ---------------------------------------------------------------- MariaDB

/// A real MariaDB's greeting passes the mysql check; frozen, it times out; thawed, it
/// passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_check_passes_on_a_real_mariadb_and_fails_when_it_is_frozen() {
    let Some(mariadb) = MariaDb::start().await else {
        return;
    };
    let proxy = start_proxy(&config(
        &[("mariadb", mariadb.addr, 0)],
        "kind = \"mysql\"\ntimeout = \"300ms\"",
    ));
    wait_first_checks(&proxy).await;

    mariadb.freeze();
    assert_eq!(became(&proxy, "mariadb", "down").await, "check timeout");
    mariadb.thaw();
    became(&proxy, "mariadb", "up").await;
}

/// A check that logs in with SCRAM-SHA-256 and a `password_file`: the right password
/// passes, a wrong one fails with the server's words; the startup-only check passes on
/// the SCRAM request alone, without a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_role_check_logs_in_with_scram_from_a_password_file() {
    let Some(tools) = PgTools::find() else {
        return;
    };
    let cluster = PgCluster::init(tools);
    let server = cluster.start("scram").await;
    psql(
        &cluster.tools,
        server.addr,
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE checker LOGIN PASSWORD 'correct horse'",
    )
    .await;
    // `checker` must authenticate with SCRAM; everyone else stays trusted.
    let hba = server.data.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(
        &hba,
        format!("host all checker 127.0.0.1/32 scram-sha-256\n{rules}"),
    )
    .expect("write pg_hba.conf");
    psql(&cluster.tools, server.addr, "SELECT pg_reload_conf()").await;

    let dir = TempDir::new();
    let right = dir.0.join("right");
    let wrong = dir.0.join("wrong");
    std::fs::write(&right, "correct horse\n").expect("write");
    std::fs::write(&wrong, "battery staple\n").expect("write");
    let login = |file: &std::path::Path| {
        format!(
            "kind = \"postgres\"\nuser = \"checker\"\nrole = \"primary\"\npassword_file = {:?}",
            file.display().to_string()
        )
    };
    let proxy = start_proxy(&config(&[("pg", server.addr, 0)], &login(&right)));
    wait_first_checks(&proxy).await;
    let proxy = start_proxy(&config(&[("pg", server.addr, 0)], &login(&wrong)));
    assert_eq!(
        became(&proxy, "pg", "down").await,
        "postgres: password authentication failed for user \"checker\""
    );
    let startup_only = start_proxy(&config(
        &[("pg", server.addr, 0)],
        "kind = \"postgres\"\nuser = \"checker\"",
    ));
    wait_first_checks(&startup_only).await;
}

/// A Redis that requires a password: PING without AUTH fails with its NOAUTH error,
/// AUTH from the `password_file` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_check_authenticates_with_a_password_file() {
    let Some(program) = find_program("redis-server") else {
        skip("redis-server is not installed (Debian package redis-server)");
        return;
    };
    let dir = TempDir::new();
    let redis = Redis::start_with(
        &program,
        &dir,
        closed_port().port(),
        &["--requirepass", "s3cret"],
    )
    .await;
    let file = dir.0.join("redis-password");
    std::fs::write(&file, "s3cret\n").expect("write");
    let proxy = start_proxy(&config(&[("redis", redis.addr, 0)], "kind = \"redis\""));
    assert_eq!(
        became(&proxy, "redis", "down").await,
        "redis: NOAUTH Authentication required."
    );
    let with_password = format!(
        "kind = \"redis\"\nrole = \"master\"\npassword_file = {:?}",
        file.display().to_string()
    );
    let proxy = start_proxy(&config(&[("redis", redis.addr, 0)], &with_password));
    wait_first_checks(&proxy).await;
}

/// A real crash: the server is killed (immediate shutdown) after writing tens of MB of
/// WAL and restarted on its port. While it replays the WAL it answers startups with
/// "the database system is not yet accepting connections" (or "starting up"): the check
/// fails with those words, and its first pass comes only when a login works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_check_fails_through_crash_recovery_and_passes_when_logins_work() {
    let Some(tools) = PgTools::find() else {
        return;
    };
    let cluster = PgCluster::init(tools);
    let mut server = cluster.start("crashing").await;
    psql(
        &cluster.tools,
        server.addr,
        "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 300000) g",
    )
    .await;
    let text = config(&[("pg", server.addr, 0)], "kind = \"postgres\"");
    let checked = switchyard::config::Config::parse(&text, std::path::Path::new("t.toml"))
        .expect("a valid config");
    let pool = checked.pools[0].clone();

    server.crash_and_restart();
    let mut refusals = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match switchyard::health::check(&pool.upstreams[0], &pool).await {
            switchyard::health::Checked::Tested(Ok(())) => break,
            switchyard::health::Checked::Tested(Err(failure)) => refusals.push(failure.to_string()),
            switchyard::health::Checked::NotRun(e) => panic!("check not run: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no passing check after the restart: {refusals:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let port = pg_port(server.addr, Duration::from_secs(2))
        .await
        .expect("a login works once the check passes");
    assert_eq!(port, server.addr.port());
    assert!(
        refusals
            .iter()
            .any(|r| r.starts_with("postgres: the database system is")),
        "the check saw the recovery: {refusals:?}"
    );
}
