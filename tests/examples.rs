//! The shipped configs do what their comments say. Each test loads a shipped file's text,
//! rewrites only addresses (binds to loopback port 0, upstreams to servers started here)
//! and keeps every other setting, then checks what the comments promise against the kind
//! of server the example names: real PostgreSQL and Redis servers on loopback ports, real
//! TLS clients and servers, real SIGSTOP, SIGCONT and SIGKILL.
//!
//! PostgreSQL, Redis and MariaDB come from Debian's packages, which `.ci/run` installs,
//! started by tests/common/servers.rs. Without them a test prints SKIPPED and passes,
//! unless `SWITCHYARD_EXAMPLE_SERVERS=required` (set by `.ci/run`) makes it fail instead.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use common::*;
use switchyard::config::CheckKind;
use switchyard::drill::upstream::greet_and_echo;
use switchyard::events::EventKind;
use switchyard::metrics::RejectReason;

// ---------------------------------------------------------------- loading an example

fn shipped(file: &str) -> String {
    std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Replaces each `from` by its `to`. Each must occur exactly once, so that an edited
/// example fails here by name instead of being tested half rewritten.
fn rewrite(file: &str, text: &str, replacements: &[(&str, String)]) -> String {
    let mut text = text.to_string();
    for (from, to) in replacements {
        let found = text.matches(from).count();
        assert_eq!(
            found, 1,
            "{file}: `{from}` should occur once, found {found} times; update tests/examples.rs along with the example"
        );
        text = text.replacen(from, to, 1);
    }
    text
}

/// Writes `text` as `dir/file_name` and starts a proxy from that file in this runtime.
/// Relative paths in it resolve against `dir`, which goes when the proxy is dropped.
fn start_example(dir: TestDir, file_name: &str, text: &str) -> TestProxy {
    start_proxy_in(dir, file_name, text)
}

/// A client connection from `source` (any 127.0.0.0/8 address is loopback).
async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// The Redis node (its port) a new client from `source` is sent to.
async fn node_for(front: SocketAddr, source: IpAddr) -> std::io::Result<u16> {
    let asked = async {
        let mut stream = connect_from(source, front).await?;
        redis_port(&mut stream).await
    };
    tokio::time::timeout(SOON, asked)
        .await
        .map_err(|_| std::io::Error::other("no answer"))?
}

async fn nodes_by_client(front: SocketAddr, clients: &[IpAddr]) -> HashMap<IpAddr, u16> {
    let mut nodes = HashMap::new();
    for &client in clients {
        let node = node_for(front, client)
            .await
            .unwrap_or_else(|e| panic!("client {client}: {e}"));
        nodes.insert(client, node);
    }
    nodes
}

fn clients_per_node(nodes: &HashMap<IpAddr, u16>) -> HashMap<u16, usize> {
    let mut count = HashMap::new();
    for node in nodes.values() {
        *count.entry(*node).or_default() += 1;
    }
    count
}

// ---------------------------------------------------------------- TLS

/// A test CA: it signs every certificate, and clients trust only it.
struct TestCa(CertifiedIssuer<'static, KeyPair>);

/// A certificate and its key, as PEM and as rustls wants them.
struct Leaf {
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    key_der: Vec<u8>,
}

impl TestCa {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchyard examples test CA");
        let key = KeyPair::generate().expect("CA key");
        Self(CertifiedIssuer::self_signed(params, key).expect("CA certificate"))
    }

    fn leaf(&self, names: &[String]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let cert = CertificateParams::new(names.to_vec())
            .expect("leaf params")
            .signed_by(&key, &self.0)
            .expect("leaf certificate");
        Leaf {
            der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.0.der().clone()).expect("CA root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Leaf {
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(vec![self.der.clone()], key)
                .expect("server certificate"),
        )
    }
}

/// An upstream that terminates TLS itself (behind passthrough): greets with `name`,
/// then echoes.
async fn tls_named(config: Arc<rustls::ServerConfig>, name: &'static str) -> Server {
    Server::start(move |stream: TcpStream| {
        let acceptor = TlsAcceptor::from(config.clone());
        async move {
            if let Ok(tls) = acceptor.accept(stream).await {
                greet_and_echo(tls, name).await;
            }
        }
    })
    .await
}

async fn line_from<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::other("closed before a line"));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

/// A TLS session through `front` with server name `sni`: the certificate the client
/// was shown, and the greeting of the upstream it reached (after an echo round trip).
async fn tls_visit(
    front: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<(CertificateDer<'static>, String)> {
    let visit = async {
        let stream = TcpStream::connect(front).await?;
        let name = ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
        let mut tls = TlsConnector::from(client.clone())
            .connect(name, stream)
            .await?;
        let shown = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first().cloned())
            .ok_or_else(|| std::io::Error::other("no certificate"))?;
        let line = line_from(&mut tls).await?;
        let greeting = line
            .strip_prefix("hello ")
            .ok_or_else(|| std::io::Error::other(format!("not a greeting: {line:?}")))?
            .to_string();
        let data = random_bytes(50_000, 10);
        tls.write_all(&data).await?;
        let mut back = vec![0u8; data.len()];
        tls.read_exact(&mut back).await?;
        if back != data {
            return Err(std::io::Error::other("echo mismatch"));
        }
        Ok((shown, greeting))
    };
    tokio::time::timeout(SOON, visit)
        .await
        .map_err(|_| std::io::Error::other("no answer"))?
}

/// `(cert, key, names)` of every entry of `listeners.<listener>.tls.certs`.
fn certificate_entries(text: &str, listener: &str) -> Vec<(String, String, Vec<String>)> {
    let table: toml::Table = text.parse().expect("the example parses");
    let entries = table["listeners"][listener]["tls"]["certs"]
        .as_array()
        .expect("a certs list");
    entries
        .iter()
        .map(|entry| {
            let field = |key: &str| entry[key].as_str().expect("a string").to_string();
            let names = entry["names"]
                .as_array()
                .expect("names")
                .iter()
                .map(|n| n.as_str().expect("a name").to_string())
                .collect();
            (field("cert"), field("key"), names)
        })
        .collect()
}

// ================================================================ tests

/// config/examples/minimal.toml: one listener forwarding to a primary, a backup used
/// while the primary is gone, back to the primary when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimal_forwards_to_the_primary_and_uses_the_backup_while_it_is_gone() {
    let file = "config/examples/minimal.toml";
    let mut primary = Backend::start("primary").await;
    let backup = Backend::start("backup").await;
    let text = rewrite(
        file,
        &shipped(file),
        &[
            ("\"127.0.0.1:8080\"", quoted(loopback(0))),
            ("\"127.0.0.1:9001\"", quoted(primary.addr)),
            ("\"127.0.0.1:9002\"", quoted(backup.addr)),
        ],
    );
    let proxy = start_example(TestDir::new(), "minimal.toml", &text);
    let front = proxy.addr("app");
    assert_eq!(greeted_by(front).await.expect("served"), "primary");
    echo_round_trip_after_greeting(front).await;

    let mark = last_event_id(&proxy);
    primary.kill().await;
    let primary_label = primary.addr.to_string();
    event_after(
        &proxy,
        mark,
        Duration::from_secs(20),
        "primary down",
        upstream_became(&primary_label, "down"),
    )
    .await;
    assert_eq!(greeted_by(front).await.expect("served"), "backup");
    echo_round_trip_after_greeting(front).await;

    let mark = last_event_id(&proxy);
    primary.restart().await;
    event_after(
        &proxy,
        mark,
        Duration::from_secs(20),
        "tier 0 again",
        tier_became("0"),
    )
    .await;
    assert_eq!(greeted_by(front).await.expect("served"), "primary");
}

async fn echo_round_trip_after_greeting(front: SocketAddr) {
    let mut stream = TcpStream::connect(front).await.expect("connect");
    tokio::time::timeout(SOON, read_line(&mut stream))
        .await
        .expect("greeting in time")
        .expect("greeting");
    let data = random_bytes(100_000, 1);
    stream.write_all(&data).await.expect("send");
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(SOON, stream.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert!(back == data, "bytes forwarded unchanged");
}

/// config/switchyard.toml: its default check only connects, and its comment says that
/// cannot see a frozen server; the protocol check the comment shows does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_config_connect_check_misses_a_frozen_postgres_and_the_commented_protocol_check_sees_it()
 {
    let file = "config/switchyard.toml";
    let Some(tools) = PgTools::find() else {
        return;
    };
    let cluster = PgCluster::init(tools);
    let primary = cluster.start("primary").await;
    let standby = cluster.start("standby").await;
    let connect_only = rewrite(
        file,
        &shipped(file),
        &[
            ("\"127.0.0.1:15432\"", quoted(loopback(0))),
            ("\"127.0.0.1:5432\"", quoted(primary.addr)),
            ("\"127.0.0.1:5433\"", quoted(standby.addr)),
        ],
    );
    let protocol = with_commented_check(&connect_only);
    let plain = start_example(TestDir::new(), "switchyard.toml", &connect_only);
    let checked = start_example(TestDir::new(), "switchyard.toml", &protocol);
    assert!(
        matches!(
            &checked.config.pool("postgres").expect("pool").health.kind,
            CheckKind::Postgres(_)
        ),
        "the commented check is in force"
    );
    for proxy in [&plain, &checked] {
        wait_all_checked(proxy, "postgres").await;
        let port = pg_port(proxy.addr("db"), SOON).await.expect("a session");
        assert_eq!(port, primary.addr.port(), "the primary serves");
    }

    let passed_before = checks_passed(&plain, "postgres", "primary");
    let mark = last_event_id(&checked);
    primary.freeze();
    event_after(
        &checked,
        mark,
        Duration::from_secs(20),
        "the protocol check marks the frozen primary down",
        upstream_became("primary", "down"),
    )
    .await;
    let port = pg_port(checked.addr("db"), SOON).await.expect("a session");
    assert_eq!(port, standby.addr.port(), "new clients get the standby");

    wait_until(
        Duration::from_secs(20),
        "connect-only checks of the frozen primary",
        || checks_passed(&plain, "postgres", "primary") >= passed_before + 2,
    )
    .await;
    assert!(
        !plain.proxy.events.all().iter().any(|e| e.new == "down"),
        "a connect-only check passes against a frozen server: {:#?}",
        plain.proxy.events.all()
    );
    assert_eq!(active_priority(&plain, "postgres"), Some(0));
    let hung = pg_port(plain.addr("db"), Duration::from_secs(2)).await;
    assert!(
        hung.is_err(),
        "a client sent to the frozen primary hangs: {hung:?}"
    );
    primary.thaw();
}

/// The shipped file with the check kind its comment shows in force.
fn with_commented_check(text: &str) -> String {
    let commented: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("# kind = "))
        .collect();
    assert_eq!(
        commented.len(),
        1,
        "one commented `kind` example: {commented:?}"
    );
    let kind = commented[0].trim_start_matches("# ").to_string();
    let mut replaced = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.starts_with("kind = \"tcp\"") {
                replaced += 1;
                kind.clone()
            } else {
                line.to_string()
            }
        })
        .collect();
    assert_eq!(replaced, 1, "one `kind` line");
    lines.join("\n")
}

/// config/examples/database-failover.toml against three real PostgreSQL servers: a
/// frozen postmaster is marked down within the configured check timing and new clients
/// (raw protocol and psql) get the other main-site server, then the DR site when both
/// are frozen; after they thaw, clients return only after the 30 s hold-down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_failover_moves_clients_off_frozen_postgres_and_fails_back_after_the_hold() {
    let file = "config/examples/database-failover.toml";
    let Some(tools) = PgTools::find() else {
        return;
    };
    let cluster = PgCluster::init(tools);
    let pg_a = cluster.start("pg-a").await;
    let pg_b = cluster.start("pg-b").await;
    let dr = cluster.start("dr-site").await;
    let text = rewrite(
        file,
        &shipped(file),
        &[
            ("[\"0.0.0.0:5432\", \"[::]:5432\"]", quoted(loopback(0))),
            ("\"10.0.0.1:5432\"", quoted(pg_a.addr)),
            ("\"10.0.0.2:5432\"", quoted(pg_b.addr)),
            ("\"10.0.1.1:5432\"", quoted(dr.addr)),
        ],
    );
    let proxy = start_example(TestDir::new(), "database-failover.toml", &text);
    let front = proxy.addr("postgres");
    let pool = proxy.config.pool("postgres").expect("pool").clone();
    wait_all_checked(&proxy, "postgres").await;

    // least_connections: two sessions held open at once land on both main-site servers.
    let mut sessions = Vec::new();
    let mut main_site = HashSet::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(front).await.expect("connect");
        let port = tokio::time::timeout(SOON, pg_ask_port(&mut stream))
            .await
            .expect("an answer in time")
            .expect("a session");
        main_site.insert(port);
        sessions.push(stream);
    }
    assert_eq!(
        main_site,
        HashSet::from([pg_a.addr.port(), pg_b.addr.port()]),
        "both main-site servers take clients"
    );

    // Frozen pg-a: down within interval + fall × timeout + (fall - 1) × fast_interval
    // (each interval up to 10% longer), plus slack for a loaded machine.
    let health = &pool.health;
    let bound = health.interval.mul_f64(1.1)
        + health.timeout * health.fall
        + health.fast_interval.mul_f64(1.1) * (health.fall - 1);
    let mark = last_event_id(&proxy);
    let frozen_at = unix_ms();
    pg_a.freeze();
    let down = event_after(
        &proxy,
        mark,
        Duration::from_secs(20),
        "pg-a down",
        upstream_became("pg-a", "down"),
    )
    .await;
    let detection = Duration::from_millis(down.at_unix_ms.saturating_sub(frozen_at));
    assert!(
        detection <= bound + Duration::from_millis(1500),
        "detected after {detection:?}; the settings promise about {bound:?}"
    );
    for _ in 0..3 {
        let port = pg_port(front, SOON).await.expect("a session");
        assert_eq!(port, pg_b.addr.port(), "new clients get pg-b");
    }
    assert_eq!(psql_port(&cluster.tools, front).await, pg_b.addr.port());

    // Both main-site servers frozen: the DR site, at once.
    let mark = last_event_id(&proxy);
    pg_b.freeze();
    event_after(
        &proxy,
        mark,
        Duration::from_secs(20),
        "failover to the DR tier",
        tier_became("1"),
    )
    .await;
    assert_eq!(
        pg_port(front, SOON).await.expect("a session"),
        dr.addr.port()
    );
    assert_eq!(psql_port(&cluster.tools, front).await, dr.addr.port());

    // Thawed: the main site must stay healthy for the whole hold-down first.
    let mark = last_event_id(&proxy);
    pg_a.thaw();
    pg_b.thaw();
    let usable = event_after(
        &proxy,
        mark,
        Duration::from_secs(20),
        "a main-site server up",
        |e| e.kind == EventKind::Upstream && e.new == "up",
    )
    .await;
    assert_eq!(
        pg_port(front, SOON).await.expect("a session"),
        dr.addr.port(),
        "clients stay on the DR site during the hold-down"
    );
    let hold = match pool.failback {
        switchyard::config::Failback::After(hold) => hold,
        other => panic!("the example promises a hold-down, has {other:?}"),
    };
    let failback = event_after(
        &proxy,
        mark,
        hold + Duration::from_secs(15),
        "failback to the main site",
        tier_became("0"),
    )
    .await;
    let held = Duration::from_millis(failback.at_unix_ms - usable.at_unix_ms);
    assert!(
        held + Duration::from_millis(50) >= hold && held <= hold + Duration::from_secs(5),
        "failback {held:?} after the main site was usable; the hold-down is {hold:?}"
    );
    let port = pg_port(front, SOON).await.expect("a session");
    assert!(
        port == pg_a.addr.port() || port == pg_b.addr.port(),
        "new clients are back on the main site, got {port}"
    );
    drop(sessions);
}

/// config/examples/sticky-cache.toml against five real Redis servers: each client IP
/// keeps its node; a stalled node keeps its established clients; a dead node's clients
/// move and nearly no one else's; with one main node left the pool moves to the two-node
/// DR tier; it fails back only when an operator asks through the admin API (with the
/// token), and every client then returns to its node; with nothing usable new clients are
/// closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cache_keeps_clients_on_their_redis_node_and_fails_over_and_back_as_it_says() {
    let file = "config/examples/sticky-cache.toml";
    let Some(program) = find_program("redis-server") else {
        skip("redis-server is not installed (Debian package redis-server)");
        return;
    };
    let dir = TempDir::new();
    let names = ["cache-1", "cache-2", "cache-3", "cache-dr-1", "cache-dr-2"];
    let shipped_ports = ["7001", "7002", "7003", "7101", "7102"];
    let ports: Vec<u16> = names.iter().map(|_| closed_port().port()).collect();
    let mut nodes = Vec::new();
    for &port in &ports {
        nodes.push(Some(Redis::start(&program, &dir, port).await));
    }
    let mut replacements = vec![
        ("\"127.0.0.1:9900\"", quoted(loopback(0))),
        ("\"127.0.0.1:6380\"", quoted(loopback(0))),
    ];
    let shipped_addrs: Vec<String> = shipped_ports
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    for (from, port) in shipped_addrs.iter().zip(&ports) {
        replacements.push((from.as_str(), quoted(loopback(*port))));
    }
    let text = rewrite(file, &shipped(file), &replacements);
    let proxy_dir = TestDir::new();
    std::fs::create_dir_all(proxy_dir.join("secrets")).expect("secrets dir");
    let token = "example-token-7f3a";
    std::fs::write(proxy_dir.join("secrets/admin-token"), format!("{token}\n")).expect("token");
    let proxy = start_example(proxy_dir, "sticky-cache.toml", &text);
    let front = proxy.addr("cache");
    let admin = proxy.admin.expect("the example has an admin API");
    wait_all_checked(&proxy, "redis").await;
    let port_of = |name: &str| ports[names.iter().position(|n| *n == name).expect("node")];
    let main_tier: HashSet<u16> = ["cache-1", "cache-2", "cache-3"].map(port_of).into();
    let dr_tier: HashSet<u16> = ["cache-dr-1", "cache-dr-2"].map(port_of).into();

    // Each client IP has its node; cache-3 (weight 2) gets the largest share.
    let clients: Vec<IpAddr> = (2..=121u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let initial = nodes_by_client(front, &clients).await;
    let shares = clients_per_node(&initial);
    assert!(
        initial.values().all(|n| main_tier.contains(n)) && shares.len() == 3,
        "every main node and only main nodes serve: {shares:?}"
    );
    let share = |name: &str| shares.get(&port_of(name)).copied().unwrap_or(0);
    assert!(
        share("cache-3") > share("cache-1").max(share("cache-2")),
        "weight 2 gets the largest share: {shares:?}"
    );
    assert_eq!(
        nodes_by_client(front, &clients).await,
        initial,
        "every client keeps its node"
    );

    // A stalled node is marked down but keeps its established clients (keep); new
    // clients from the same IP go elsewhere.
    let client = *clients
        .iter()
        .find(|c| initial[c] == port_of("cache-2"))
        .expect("a client of cache-2");
    let mut held = connect_from(client, front).await.expect("connect");
    assert_eq!(
        redis_port(&mut held).await.expect("INFO"),
        port_of("cache-2")
    );
    let mark = last_event_id(&proxy);
    let stalled = nodes[1].as_ref().expect("cache-2");
    signal(&stalled.child, libc::SIGSTOP);
    event_after(
        &proxy,
        mark,
        Duration::from_secs(20),
        "stalled cache-2 down",
        upstream_became("cache-2", "down"),
    )
    .await;
    let elsewhere = node_for(front, client).await.expect("served");
    assert!(
        elsewhere != port_of("cache-2") && main_tier.contains(&elsewhere),
        "a new client goes to another main node, got {elsewhere}"
    );
    signal(&stalled.child, libc::SIGCONT);
    tokio::time::timeout(SOON, redis_ping(&mut held))
        .await
        .expect("PONG in time")
        .expect("the established client was kept");
    event_after(
        &proxy,
        mark,
        Duration::from_secs(20),
        "cache-2 up again",
        upstream_became("cache-2", "up"),
    )
    .await;
    assert_eq!(
        nodes_by_client(front, &clients).await,
        initial,
        "with cache-2 back, every client has its node again"
    );

    // cache-1 dies: its clients move to the other main nodes, nearly all others stay.
    let mark = last_event_id(&proxy);
    nodes[0] = None;
    event_after(
        &proxy,
        mark,
        Duration::from_secs(20),
        "cache-1 down",
        upstream_became("cache-1", "down"),
    )
    .await;
    let after_death = nodes_by_client(front, &clients).await;
    let mut stayed = 0;
    let mut others = 0;
    for (client, node) in &initial {
        let now = after_death[client];
        assert!(
            main_tier.contains(&now) && now != port_of("cache-1"),
            "{client} is on a live main node, got {now}"
        );
        if *node != port_of("cache-1") {
            others += 1;
            stayed += usize::from(now == *node);
        }
    }
    assert!(
        stayed * 10 >= others * 9,
        "only {stayed} of {others} clients of live nodes kept their node"
    );
    assert_eq!(
        active_priority(&proxy, "redis"),
        Some(0),
        "two main nodes left"
    );

    // cache-2 dies too: one main node cannot carry the load; the DR tier takes over.
    let mark = last_event_id(&proxy);
    nodes[1] = None;
    event_after(
        &proxy,
        mark,
        Duration::from_secs(20),
        "failover to the DR tier",
        tier_became("1"),
    )
    .await;
    let on_dr = nodes_by_client(front, &clients).await;
    let dr_shares = clients_per_node(&on_dr);
    assert!(
        on_dr.values().all(|n| dr_tier.contains(n)) && dr_shares.len() == 2,
        "both DR nodes and only they serve: {dr_shares:?}"
    );
    assert_eq!(
        nodes_by_client(front, &clients).await,
        on_dr,
        "sticky on the DR tier too"
    );

    // The main nodes return: the pool stays on the DR tier until an operator acts.
    let mark = last_event_id(&proxy);
    nodes[0] = Some(Redis::start(&program, &dir, port_of("cache-1")).await);
    nodes[1] = Some(Redis::start(&program, &dir, port_of("cache-2")).await);
    for name in ["cache-1", "cache-2"] {
        event_after(
            &proxy,
            mark,
            Duration::from_secs(20),
            "main node up",
            upstream_became(name, "up"),
        )
        .await;
    }
    let checks = checks_passed(&proxy, "redis", "cache-1");
    wait_until(Duration::from_secs(20), "another check of cache-1", || {
        checks_passed(&proxy, "redis", "cache-1") > checks
    })
    .await;
    assert_eq!(
        active_priority(&proxy, "redis"),
        Some(1),
        "manual failback waits"
    );
    assert!(dr_tier.contains(&node_for(front, clients[0]).await.expect("served")));

    let (status, body, _) = http("POST", admin, "/pools/redis/failback", None).await;
    assert_eq!(status, 401, "failback needs the token: {body}");
    assert_eq!(active_priority(&proxy, "redis"), Some(1));
    let (status, body, _) = http("POST", admin, "/pools/redis/failback", Some(token)).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["active_tier"], 0, "{body}");
    assert_eq!(
        nodes_by_client(front, &clients).await,
        initial,
        "after failback every client is back on its node"
    );

    // Nothing usable: new clients are closed at once (when_all_down = "reject").
    let mark = last_event_id(&proxy);
    for node in &mut nodes {
        *node = None;
    }
    event_after(
        &proxy,
        mark,
        Duration::from_secs(30),
        "no usable tier",
        tier_became("none"),
    )
    .await;
    let stats = proxy
        .proxy
        .listener("cache")
        .expect("listener")
        .context
        .stats
        .clone();
    let rejected = stats.rejected(RejectReason::NoUpstream);
    let mut stream = connect_from(clients[0], front).await.expect("accepted");
    assert!(
        is_closed(&mut stream, Duration::from_secs(1)).await,
        "closed at once"
    );
    assert!(stats.rejected(RejectReason::NoUpstream) > rejected);
}

/// config/examples/tls-sni.toml: the terminating listener shows the certificate for the
/// client's name and routes by it (the rest to `pool`); the passthrough listener routes
/// by the ClientHello's name to upstreams that terminate TLS themselves, and closes a
/// name without a route. Certificates are generated at the paths the file names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sni_example_terminates_and_passes_through_by_server_name() {
    let file = "config/examples/tls-sni.toml";
    let shipped_text = shipped(file);
    let dir = TestDir::new();
    let ca = TestCa::new();
    let mut shown_for: Vec<(Vec<String>, CertificateDer<'static>)> = Vec::new();
    for (cert, key, names) in certificate_entries(&shipped_text, "https") {
        let leaf = ca.leaf(&names);
        for (path, pem) in [
            (dir.join(&cert), &leaf.cert_pem),
            (dir.join(&key), &leaf.key_pem),
        ] {
            std::fs::create_dir_all(path.parent().expect("a folder")).expect("certs folder");
            std::fs::write(path, pem).expect("write PEM");
        }
        shown_for.push((names, leaf.der));
    }
    let web_1 = Backend::start("web-1").await;
    let web_2 = Backend::start("web-2").await;
    let app_1 = Backend::start("app-1").await;
    let app_backup = Backend::start("app-backup").await;
    let git_leaf = ca.leaf(&["git.example.com".to_string()]);
    let internal_leaf = ca.leaf(&["*.internal.example.com".to_string()]);
    let git = tls_named(git_leaf.server_config(), "git").await;
    let internal = tls_named(internal_leaf.server_config(), "internal").await;
    let text = rewrite(
        file,
        &shipped_text,
        &[
            ("[\"0.0.0.0:443\", \"[::]:443\"]", quoted(loopback(0))),
            ("[\"0.0.0.0:8443\", \"[::]:8443\"]", quoted(loopback(0))),
            ("\"10.0.1.10:8080\"", quoted(web_1.addr)),
            ("\"10.0.1.11:8080\"", quoted(web_2.addr)),
            ("\"10.0.2.10:8080\"", quoted(app_1.addr)),
            ("\"10.0.2.20:8080\"", quoted(app_backup.addr)),
            ("\"10.0.3.10:443\"", quoted(git.addr)),
            ("\"10.0.4.10:443\"", quoted(internal.addr)),
        ],
    );
    let proxy = start_example(dir, "tls-sni.toml", &text);
    let client = ca.client_config();

    let https = proxy.addr("https");
    for (sni, upstreams, cert_name) in [
        ("app.example.com", &["app-1"][..], "app.example.com"),
        ("www.example.org", &["web-1", "web-2"][..], "*.example.org"),
        ("example.org", &["web-1", "web-2"][..], "example.org"),
    ] {
        let (shown, greeting) = tls_visit(https, &client, sni)
            .await
            .unwrap_or_else(|e| panic!("{sni} through https: {e}"));
        let expected = shown_for
            .iter()
            .find(|(names, _)| names.iter().any(|n| n == cert_name))
            .map(|(_, der)| der)
            .expect("a certificate lists the name");
        assert_eq!(
            &shown, expected,
            "{sni}: the certificate listing {cert_name}"
        );
        assert!(
            upstreams.contains(&greeting.as_str()),
            "{sni}: reached {greeting}, expected one of {upstreams:?}"
        );
    }

    let passthrough = proxy.addr("passthrough");
    for (sni, upstream, leaf) in [
        ("git.example.com", "git", &git_leaf),
        ("ci.internal.example.com", "internal", &internal_leaf),
    ] {
        let (shown, greeting) = tls_visit(passthrough, &client, sni)
            .await
            .unwrap_or_else(|e| panic!("{sni} through passthrough: {e}"));
        assert!(shown == leaf.der, "{sni}: the upstream's own certificate");
        assert_eq!(greeting, upstream, "{sni}");
    }
    let stats = proxy
        .proxy
        .listener("passthrough")
        .expect("listener")
        .context
        .stats
        .clone();
    let refused = tls_visit(passthrough, &client, "www.example.com").await;
    assert!(refused.is_err(), "a name without a route is closed");
    wait_until(SOON, "counted as no_route", || {
        stats.rejected(RejectReason::NoRoute) == 1
    })
    .await;
}

/// The tls-sni example's comment gives openssl commands for a local trial; with the
/// files they make next to an unchanged copy, `switchyard check` accepts the example.
#[test]
fn tls_sni_example_trial_certificates_from_its_comment_pass_check() {
    let file = "config/examples/tls-sni.toml";
    if find_program("openssl").is_none() {
        eprintln!("SKIPPED: openssl is not installed");
        return;
    }
    let text = shipped(file);
    let start = text
        .lines()
        .position(|l| l.contains("For a local trial"))
        .expect("the comment offers a local trial");
    let script: Vec<&str> = text
        .lines()
        .skip(start + 1)
        .take_while(|l| l.starts_with("#   "))
        .map(|l| l.trim_start_matches("#   "))
        .collect();
    assert!(!script.is_empty(), "commands after the trial sentence");
    let dir = TempDir::new();
    std::fs::write(dir.0.join("tls-sni.toml"), &text).expect("copy the example");
    let made = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script.join("\n")])
        .current_dir(&dir.0)
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    assert!(
        made.status.success(),
        "the trial commands failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let check = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "-c"])
        .arg(dir.0.join("tls-sni.toml"))
        .output()
        .expect("run switchyard check");
    assert!(
        check.status.success(),
        "check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The reason of the first event after `mark` that took `upstream` to `state`.
async fn became_after(proxy: &TestProxy, mark: u64, upstream: &str, state: &str) -> String {
    event_after(
        proxy,
        mark,
        Duration::from_secs(30),
        &format!("{upstream} {state}"),
        upstream_became(upstream, state),
    )
    .await
    .reason
}

/// config/examples/postgres-primary.toml against a real streaming pair (pg_basebackup
/// -R) and a dead third server: the standby fails with "in recovery", every client gets
/// the primary; when the primary is gone and the standby promoted, clients follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_primary_sends_clients_only_to_the_primary_and_follows_a_promotion() {
    let file = "config/examples/postgres-primary.toml";
    let Some(tools) = PgTools::find() else {
        return;
    };
    let cluster = PgCluster::init(tools);
    let primary = cluster.start("primary").await;
    // The login the example's comment says to create; the standby replicates it.
    psql(&cluster.tools, primary.addr, "CREATE ROLE switchyard LOGIN").await;
    let standby = cluster.standby_of(&primary, "standby", &[]);
    standby.wait_for_queries().await;
    let text = rewrite(
        file,
        &shipped(file),
        &[
            ("\"127.0.0.1:5432\"", quoted(loopback(0))),
            ("\"10.0.0.1:5432\"", quoted(standby.addr)),
            ("\"10.0.0.2:5432\"", quoted(primary.addr)),
            ("\"10.0.0.3:5432\"", quoted(closed_port())),
        ],
    );
    let proxy = start_example(TestDir::new(), "postgres-primary.toml", &text);
    let front = proxy.addr("postgres");
    assert_eq!(
        became_after(&proxy, 0, "pg-1", "down").await,
        "postgres: in recovery (a standby)"
    );
    became_after(&proxy, 0, "pg-3", "down").await;
    for _ in 0..4 {
        let port = pg_port(front, SOON).await.expect("a session");
        assert_eq!(port, primary.addr.port(), "only the primary serves");
    }
    assert_eq!(psql_port(&cluster.tools, front).await, primary.addr.port());

    let mark = last_event_id(&proxy);
    drop(primary);
    standby.promote();
    became_after(&proxy, mark, "pg-2", "down").await;
    became_after(&proxy, mark, "pg-1", "up").await;
    let port = pg_port(front, SOON).await.expect("a session");
    assert_eq!(port, standby.addr.port(), "clients follow the promotion");
}

/// config/examples/patroni.toml against three Patroni-style nodes (a REST API on one
/// port of each node's own address): only the leader's database port gets clients;
/// when the leader moves, so do clients; with no leader, clients are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_example_follows_the_leader_by_its_rest_api() {
    let file = "config/examples/patroni.toml";
    let (nodes, rest_port) = patroni_nodes(&["node-1", "node-2", "node-3"]).await;
    let text = rewrite(
        file,
        &shipped(file),
        &[
            ("\"127.0.0.1:5000\"", quoted(loopback(0))),
            ("\"10.0.0.1:5432\"", quoted(nodes[0].addr)),
            ("\"10.0.0.2:5432\"", quoted(nodes[1].addr)),
            ("\"10.0.0.3:5432\"", quoted(nodes[2].addr)),
            ("port = 8008", format!("port = {rest_port}")),
        ],
    );
    let proxy = start_example(TestDir::new(), "patroni.toml", &text);
    let front = proxy.addr("postgres");
    assert_eq!(became_after(&proxy, 0, "node-2", "down").await, "http 503");
    assert_eq!(became_after(&proxy, 0, "node-3", "down").await, "http 503");
    for _ in 0..4 {
        assert_eq!(greeted_by(front).await.expect("greeting"), "node-1");
    }

    let mark = last_event_id(&proxy);
    fail_over(&nodes, 2);
    became_after(&proxy, mark, "node-1", "down").await;
    became_after(&proxy, mark, "node-3", "up").await;
    for _ in 0..4 {
        assert_eq!(greeted_by(front).await.expect("greeting"), "node-3");
    }

    // No leader at all (mid-election): new clients are closed, none reaches a replica.
    let mark = last_event_id(&proxy);
    fail_over(&nodes, usize::MAX);
    became_after(&proxy, mark, "node-3", "down").await;
    assert!(
        greeted_by(front).await.is_err(),
        "rejected, not sent to a replica"
    );
}

/// config/examples/redis-master.toml against a real master and its replica
/// (`--replicaof`): the replica is down with "redis role:slave" and gets no client;
/// when they swap roles, clients follow the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_master_example_routes_only_to_the_master() {
    let file = "config/examples/redis-master.toml";
    let dir = TempDir::new();
    let Some((a, b)) = redis_pair(&dir).await else {
        return;
    };
    let text = rewrite(
        file,
        &shipped(file),
        &[
            ("\"127.0.0.1:6379\"", quoted(loopback(0))),
            ("\"10.0.0.1:6379\"", quoted(a.addr)),
            ("\"10.0.0.2:6379\"", quoted(b.addr)),
        ],
    );
    let proxy = start_example(TestDir::new(), "redis-master.toml", &text);
    let front = proxy.addr("redis");
    assert_eq!(
        became_after(&proxy, 0, "redis-b", "down").await,
        "redis role:slave"
    );
    for _ in 0..6 {
        assert_eq!(
            redis_node(front).await,
            a.addr.port(),
            "only the master serves"
        );
    }

    let mark = last_event_id(&proxy);
    redis_swap(&a, &b).await;
    assert_eq!(
        became_after(&proxy, mark, "redis-a", "down").await,
        "redis role:slave"
    );
    became_after(&proxy, mark, "redis-b", "up").await;
    assert_eq!(
        redis_node(front).await,
        b.addr.port(),
        "clients follow the new master"
    );
}

/// config/examples/mysql.toml against a real MariaDB and a dead backup: clients get the
/// server's greeting through the proxy; frozen, it fails its check (timeout); thawed, it
/// passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_example_checks_the_server_greeting() {
    let file = "config/examples/mysql.toml";
    let Some(mariadb) = MariaDb::start().await else {
        return;
    };
    let text = rewrite(
        file,
        &shipped(file),
        &[
            ("\"127.0.0.1:3306\"", quoted(loopback(0))),
            ("\"10.0.0.1:3306\"", quoted(mariadb.addr)),
            ("\"10.0.0.2:3306\"", quoted(closed_port())),
        ],
    );
    let proxy = start_example(TestDir::new(), "mysql.toml", &text);
    let front = proxy.addr("mysql");
    became_after(&proxy, 0, "db-2", "down").await;
    let mut stream = TcpStream::connect(front).await.expect("connect");
    let mut header = [0u8; 5];
    tokio::time::timeout(SOON, stream.read_exact(&mut header))
        .await
        .expect("a greeting in time")
        .expect("a greeting");
    assert_eq!(header[4], 0x0a, "a protocol-10 greeting through the proxy");

    let mark = last_event_id(&proxy);
    mariadb.freeze();
    assert_eq!(
        became_after(&proxy, mark, "db-1", "down").await,
        "check timeout"
    );
    mariadb.thaw();
    became_after(&proxy, mark, "db-1", "up").await;
}
