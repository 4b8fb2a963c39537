//! Upstreams from DNS (SPEC §3 "Discovery") against a real DNS server the test starts:
//! dnsmasq from Debian on a loopback port, answering from a hosts file the test
//! rewrites (SIGHUP makes dnsmasq read it again). Without dnsmasq the tests print
//! SKIPPED, unless `SWITCHYARD_EXAMPLE_SERVERS=required` (set by `.ci/run`).

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use common::*;
use switchyard::dns::{self, Query, Resolver};

/// The pool's `resolve_interval` in these tests.
const INTERVAL: Duration = Duration::from_secs(1);

/// What "within one interval" may take beyond the interval on a loaded 2-core machine:
/// the first check of the new members and the controller's swap.
const SLACK: Duration = Duration::from_millis(1500);

/// dnsmasq on a loopback port, answering only from `hosts` (and `srv` records given at
/// start); killed on drop.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    hosts: PathBuf,
    _dir: Arc<TempDir>,
}

impl Dnsmasq {
    async fn start(hosts: &str, srv: &[&str]) -> Option<Self> {
        Self::start_with_ttl(hosts, srv, 60).await
    }

    /// dnsmasq answering its hosts records with TTL `ttl` seconds.
    async fn start_with_ttl(hosts: &str, srv: &[&str], ttl: u32) -> Option<Self> {
        let Some(program) = find_program("dnsmasq") else {
            skip("dnsmasq is not installed (apt-get install dnsmasq)");
            return None;
        };
        let dir = TempDir::new();
        let path = dir.0.join("hosts");
        std::fs::write(&path, hosts).expect("write the hosts file");
        for _ in 0..10 {
            let port = free_udp_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut command = Command::new(&program);
            command
                .arg("--keep-in-foreground")
                .arg("--conf-file=/dev/null")
                .arg("--no-resolv")
                .arg("--no-hosts")
                .arg("--no-poll")
                .arg("--pid-file")
                .arg("--bind-interfaces")
                .arg("--listen-address=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(format!("--local-ttl={ttl}"))
                .arg(format!("--addn-hosts={}", path.display()))
                .arg("--log-facility=-");
            for record in srv {
                command.arg(format!("--srv-host={record}"));
            }
            let (stdout, stderr) = log_file(&dir.0.join(format!("dnsmasq-{port}.log")));
            let child = command
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .expect("start dnsmasq");
            let server = Self {
                child,
                addr,
                hosts: path.clone(),
                _dir: dir.clone(),
            };
            if server.answers().await {
                return Some(server);
            }
            // The port was taken meanwhile and dnsmasq exited: try another.
            drop(server);
        }
        panic!("dnsmasq did not start on any port");
    }

    /// Whether it answers a question within a few seconds (it may still be starting).
    async fn answers(&self) -> bool {
        let resolver = Resolver::new(&[self.addr], Duration::from_millis(200)).expect("resolver");
        let query = Query::Srv {
            name: "_probe._tcp.test".to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            // An empty answer (NXDOMAIN) is an answer.
            match resolver.resolve(&query).await {
                Ok(_) => return true,
                Err(dns::DnsError::Lookup(e)) if !e.contains("timed out") => return true,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Replaces the hosts file and makes dnsmasq read it again.
    fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).expect("rewrite the hosts file");
        signal(&self.child, libc::SIGHUP);
    }

    fn stop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(5));
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
    socket.local_addr().expect("local addr").port()
}

/// Echo servers on 127.0.0.2.. all on one port (as the A records of one name are);
/// each first sends the last byte of its address, so a client knows who served it.
struct Upstreams {
    port: u16,
    tasks: JoinSet<()>,
}

impl Upstreams {
    async fn start(hosts: &[u8]) -> Self {
        'retry: for _ in 0..20 {
            let first = TcpListener::bind((ip(hosts[0]), 0)).await.expect("bind");
            let port = first.local_addr().expect("addr").port();
            let mut listeners = vec![first];
            for host in &hosts[1..] {
                match TcpListener::bind((ip(*host), port)).await {
                    Ok(l) => listeners.push(l),
                    Err(_) => continue 'retry,
                }
            }
            let mut tasks = JoinSet::new();
            for (listener, host) in listeners.into_iter().zip(hosts) {
                let host = *host;
                tasks.spawn(async move {
                    let mut connections = JoinSet::new();
                    loop {
                        let Ok((mut stream, _)) = listener.accept().await else {
                            continue;
                        };
                        connections.spawn(async move {
                            if stream.write_all(&[host]).await.is_err() {
                                return;
                            }
                            let (mut r, mut w) = stream.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                        while connections.try_join_next().is_some() {}
                    }
                });
            }
            return Self { port, tasks };
        }
        panic!("no common free port on 127.0.0.x");
    }
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

fn ip(host: u8) -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, host])
}

fn hosts_file(name: &str, hosts: &[u8]) -> String {
    hosts
        .iter()
        .map(|h| format!("127.0.0.{h} {name}\n"))
        .collect()
}

fn config(upstreams: &str, resolver: SocketAddr) -> String {
    format!(
        "[listeners.front]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[pools.p]\nresolve_interval = \"{}ms\"\nresolvers = [\"{resolver}\"]\nupstreams = [{upstreams}]\n\n[pools.p.health]\ninterval = \"200ms\"\nfast_interval = \"100ms\"\ntimeout = \"500ms\"\n",
        INTERVAL.as_millis()
    )
}

/// The pool's upstreams as routing sees them now, by address.
fn members(proxy: &TestProxy) -> BTreeSet<SocketAddr> {
    let snapshot = proxy.proxy.snapshot.load();
    let route = snapshot.pool("p").expect("pool p");
    route.upstreams.iter().map(|u| u.config.address).collect()
}

fn addrs(hosts: &[u8], port: u16) -> BTreeSet<SocketAddr> {
    hosts
        .iter()
        .map(|h| SocketAddr::new(ip(*h), port))
        .collect()
}

/// Waits until the pool's members are `want`; returns how long that took.
async fn wait_members(proxy: &TestProxy, want: &BTreeSet<SocketAddr>, limit: Duration) -> Duration {
    let start = Instant::now();
    wait_until(limit, &format!("members {want:?}"), || {
        members(proxy) == *want
    })
    .await;
    start.elapsed()
}

/// Clients that connect, learn their upstream, echo a few bytes and close, over and
/// over, until stopped; every failure is kept.
struct Stream {
    stop: Arc<AtomicBool>,
    /// When each served exchange began connecting, and the host that served it.
    served: Arc<Mutex<Vec<(Instant, u8)>>>,
    failures: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicU64>,
    tasks: JoinSet<()>,
}

impl Stream {
    fn start(front: SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for _ in 0..clients {
            let (stop, served, failures, done) =
                (stop.clone(), served.clone(), failures.clone(), done.clone());
            tasks.spawn(async move {
                while !stop.load(Relaxed) {
                    let began = Instant::now();
                    match tokio::time::timeout(SOON, one_exchange(front)).await {
                        Ok(Ok(host)) => {
                            served.lock().expect("lock").push((began, host));
                            done.fetch_add(1, Relaxed);
                        }
                        Ok(Err(e)) => failures.lock().expect("lock").push(e.to_string()),
                        Err(_) => failures.lock().expect("lock").push("timed out".into()),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
        Self {
            stop,
            served,
            failures,
            done,
            tasks,
        }
    }

    fn served_by(&self, host: u8) -> usize {
        self.served_by_since(host, None)
    }

    /// Exchanges served by `host` that began connecting at or after `since`.
    fn served_by_since(&self, host: u8, since: Option<Instant>) -> usize {
        self.served
            .lock()
            .expect("lock")
            .iter()
            .filter(|&&(began, by)| by == host && since.is_none_or(|s| began >= s))
            .count()
    }

    async fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Relaxed);
        while self.tasks.join_next().await.is_some() {}
        let failures = self.failures.lock().expect("lock").clone();
        (self.done.load(Relaxed), failures)
    }
}

async fn one_exchange(front: SocketAddr) -> std::io::Result<u8> {
    let mut stream = TcpStream::connect(front).await?;
    let mut host = [0u8; 1];
    stream.read_exact(&mut host).await?;
    stream.write_all(b"ping").await?;
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).await?;
    if &back != b"ping" {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(host[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_follows_dns_under_load_and_an_outage_empties_nothing() {
    let upstreams = Upstreams::start(&[2, 3, 4]).await;
    let port = upstreams.port;
    let Some(mut dns) = Dnsmasq::start(&hosts_file("db.test", &[2]), &[]).await else {
        return;
    };
    let proxy = start_proxy(&config(
        &format!("{{ address = \"db.test:{port}\" }}"),
        dns.addr,
    ));
    assert_eq!(members(&proxy), addrs(&[2], port), "resolved at load");
    let front = proxy.addr("front");
    let stream = Stream::start(front, 4);

    // A long connection on the member that will vanish: it must stay (drain).
    let mut long = TcpStream::connect(front).await.expect("connect");
    let mut host = [0u8; 1];
    long.read_exact(&mut host).await.expect("greeting");
    assert_eq!(host[0], 2);

    // Records appear: they become upstreams, checked before use, within one interval.
    dns.set_hosts(&hosts_file("db.test", &[2, 3, 4]));
    let took = wait_members(&proxy, &addrs(&[2, 3, 4], port), SOON).await;
    assert!(
        took <= INTERVAL + SLACK,
        "new records took {took:?} to become upstreams"
    );
    wait_until(SOON, "the new members serve clients", || {
        stream.served_by(3) > 0 && stream.served_by(4) > 0
    })
    .await;
    let pools = proxy.proxy.controller.status().await.expect("status");
    for new in [3, 4] {
        let view = pools[0]
            .upstreams
            .iter()
            .find(|u| u.name == format!("db.test:{port}@127.0.0.{new}"))
            .expect("a new member in the status");
        assert_eq!(view.reason, "added by DNS; first check passed", "{view:?}");
        assert_eq!(view.address, format!("127.0.0.{new}:{port}"));
    }

    // A record vanishes: its upstream drains: no new connections, the established one
    // stays and keeps working.
    dns.set_hosts(&hosts_file("db.test", &[3, 4]));
    let took = wait_members(&proxy, &addrs(&[3, 4], port), SOON).await;
    // Routing no longer has it: a client that connects from now on cannot reach it. One
    // that connected before may still be finishing its exchange with it.
    let gone = Instant::now();
    assert!(
        took <= INTERVAL + SLACK,
        "a vanished record took {took:?} to go"
    );
    let removed = wait_event(
        &proxy,
        &format!("db.test:{port}@127.0.0.2"),
        "removed",
        SOON,
    )
    .await;
    assert_eq!(removed.reason, "DNS");
    tokio::time::sleep(INTERVAL).await;
    assert_eq!(
        stream.served_by_since(2, Some(gone)),
        0,
        "no new connection to a vanished record"
    );
    long.write_all(b"still")
        .await
        .expect("the drained connection stays");
    let mut back = [0u8; 5];
    long.read_exact(&mut back)
        .await
        .expect("echo on the drained connection");
    assert_eq!(&back, b"still");

    // The DNS server goes away: resolutions fail, are counted, and the pool keeps its
    // last known members.
    dns.stop();
    let route = proxy.proxy.snapshot.load().pool("p").expect("pool").clone();
    wait_until(SOON * 2, "two failed resolutions counted", || {
        route.stats.dns_failures.load(Relaxed) >= 2
    })
    .await;
    assert_eq!(
        members(&proxy),
        addrs(&[3, 4], port),
        "an outage empties nothing"
    );

    let (done, failures) = stream.finish().await;
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    assert!(done > 50, "only {done} connections went through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_targets_ports_and_weights_and_check_shows_them() {
    let a = Upstreams::start(&[2]).await;
    let b = Upstreams::start(&[3]).await;
    let srv = [
        format!("_db._tcp.test,a.test,{},0,5", a.port),
        format!("_db._tcp.test,b.test,{},0,1", b.port),
    ];
    let srv: Vec<&str> = srv.iter().map(String::as_str).collect();
    let hosts = "127.0.0.2 a.test\n127.0.0.3 b.test\n";
    let Some(dns) = Dnsmasq::start(hosts, &srv).await else {
        return;
    };
    let text = config("{ srv = \"_db._tcp.test\", priority = 0 }", dns.addr);
    let proxy = start_proxy(&text);
    let snapshot = proxy.proxy.snapshot.load();
    let route = snapshot.pool("p").expect("pool p");
    let mut found: Vec<(String, SocketAddr, u32)> = route
        .upstreams
        .iter()
        .map(|u| (u.label().to_string(), u.config.address, u.config.weight))
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            (
                format!("a.test:{}", a.port),
                SocketAddr::new(ip(2), a.port),
                5
            ),
            (
                format!("b.test:{}", b.port),
                SocketAddr::new(ip(3), b.port),
                1
            ),
        ]
    );

    // `check` says where they come from and what they resolve to now.
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check")
        .arg("--config")
        .arg(&proxy.config_path)
        .output()
        .expect("run check");
    let shown = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{shown}{errors}");
    assert!(
        shown.contains(&format!(
            "a.test:{} (from DNS _db._tcp.test) = 127.0.0.2:{} weight 5",
            a.port, a.port
        )),
        "{shown}"
    );
    assert!(
        shown.contains("dns: 1 entries resolved every 1s"),
        "{shown}"
    );
}

/// A DNS server that answers every question with `reply` (or never, for `None`).
fn hostile_server(reply: Option<Vec<u8>>) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let addr = socket.local_addr().expect("addr");
    let thread = std::thread::spawn(move || {
        let mut buffer = [0u8; 1500];
        while let Ok((_, from)) = socket.recv_from(&mut buffer) {
            if let Some(reply) = &reply {
                let _ = socket.send_to(reply, from);
            }
        }
    });
    (addr, thread)
}

#[tokio::test]
async fn garbage_and_silence_from_the_dns_server_are_clear_errors_in_bounded_time() {
    let garbage = hostile_server(Some(random_bytes(300, 7))).0;
    let silent = hostile_server(None).0;
    for (server, what) in [(garbage, "garbage"), (silent, "silence")] {
        let dir = TempDir::new();
        let path = dir.0.join("switchyard.toml");
        std::fs::write(&path, config("{ address = \"db.test:5432\" }", server)).expect("write");
        let started = Instant::now();
        let error = switchyard::config::Config::load(&path)
            .expect_err("a name that does not resolve is a config error")
            .to_string();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            started.elapsed()
        );
        assert!(
            error.contains("cannot resolve \"db.test:5432\""),
            "{what}: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_record_set_is_bounded() {
    let many: Vec<String> = (0..200)
        .map(|i| format!("127.0.{}.{} many.test\n", 1 + i / 250, 1 + i % 250))
        .collect();
    let Some(dns) = Dnsmasq::start(&many.concat(), &[]).await else {
        return;
    };
    // Through a pool: 64 upstreams, not 200.
    let text = config("{ address = \"many.test:9\" }", dns.addr)
        .replace("interval = \"200ms\"", "enabled = false")
        .replace("fast_interval = \"100ms\"\ntimeout = \"500ms\"\n", "");
    let proxy = start_proxy(&text);
    assert_eq!(members(&proxy).len(), dns::MAX_RECORDS);
    drop(proxy);

    let resolver = Resolver::new(&[dns.addr], Duration::from_secs(2)).expect("resolver");
    let answer = resolver
        .resolve(&Query::Host {
            host: "many.test".to_string(),
            port: 9,
        })
        .await
        .expect("resolves over TCP after a truncated UDP answer");
    assert_eq!(answer.records.len(), dns::MAX_RECORDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_shorter_than_the_interval_is_honoured() {
    let upstreams = Upstreams::start(&[2, 3]).await;
    let port = upstreams.port;
    let Some(dns) = Dnsmasq::start_with_ttl(&hosts_file("db.test", &[2]), &[], 1).await else {
        return;
    };
    let text = config(&format!("{{ address = \"db.test:{port}\" }}"), dns.addr)
        .replace("resolve_interval = \"1000ms\"", "resolve_interval = \"1h\"");
    let proxy = start_proxy(&text);
    assert_eq!(members(&proxy), addrs(&[2], port));
    dns.set_hosts(&hosts_file("db.test", &[2, 3]));
    // The TTL (1s), not the interval (1h), says when to ask again.
    let took = wait_members(&proxy, &addrs(&[2, 3], port), SOON).await;
    assert!(took <= Duration::from_secs(1) + SLACK, "took {took:?}");
}

/// One address family per name: a dual-stack name is one upstream (its A record), a
/// name with only AAAA records is upstreams on IPv6; each labelled `host:port@ip`, and
/// `check` shows each with the address it resolves to now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_name_is_one_upstream_and_check_shows_what_names_resolve_to() {
    let hosts = "127.0.0.2 both.test\n::1 both.test\n::1 six.test\n";
    let Some(dns) = Dnsmasq::start(hosts, &[]).await else {
        return;
    };
    let text = config(
        "{ address = \"both.test:9\" }, { address = \"six.test:9\", name = \"v6\", priority = 1 }",
        dns.addr,
    );
    let dir = TempDir::new();
    let path = dir.0.join("switchyard.toml");
    std::fs::write(&path, text).expect("write the config");
    let loaded = switchyard::config::Config::load(&path).expect("loads");
    let found: Vec<(String, SocketAddr)> = loaded.pools[0]
        .upstreams
        .iter()
        .map(|u| (u.label().to_string(), u.address))
        .collect();
    assert_eq!(
        found,
        vec![
            (
                "both.test:9@127.0.0.2".to_string(),
                "127.0.0.2:9".parse().expect("addr")
            ),
            ("v6@::1".to_string(), "[::1]:9".parse().expect("addr")),
        ]
    );

    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run check");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "tier 0 (primary): both.test:9@127.0.0.2 (from DNS both.test:9) = 127.0.0.2:9",
        "tier 1 (backup 1): v6@::1 (from DNS six.test:9) = [::1]:9",
        "dns: 2 entries resolved every 1s",
    ] {
        assert!(shown.contains(line), "{line:?} not in:\n{shown}");
    }
}

/// Labels address DNS members in the admin API over HTTP (written as they are, or
/// percent-encoded). The name as written still names its member while it is one
/// upstream, as before discovery; while it is several, the call is refused with the
/// labels to use, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_name_dns_members_by_label_and_refuse_an_ambiguous_name() {
    let upstreams = Upstreams::start(&[2, 3]).await;
    let port = upstreams.port;
    let Some(dns) = Dnsmasq::start(&hosts_file("db.test", &[2]), &[]).await else {
        return;
    };
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        config(&format!("{{ address = \"db.test:{port}\" }}"), dns.addr)
    );
    let proxy = start_proxy(&text);
    let admin = proxy.admin.expect("admin API");
    let post = |path: String| async move {
        let (code, body, _) = http("POST", admin, &path, None).await;
        (code, body)
    };
    let state_of = |label: String| async move {
        let status = get_json(admin, "/status").await;
        upstream_status(&status, "p", &label).map(|u| u["state"].clone())
    };
    let (first, second) = (
        format!("db.test:{port}@127.0.0.2"),
        format!("db.test:{port}@127.0.0.3"),
    );

    let (code, body) = post(format!("/pools/p/upstreams/db.test:{port}/drain")).await;
    assert_eq!(
        code, 200,
        "one member: the name as written names it; {body}"
    );
    assert_eq!(state_of(first.clone()).await, Some("drain".into()));
    let (code, body) = post(format!("/pools/p/upstreams/db.test:{port}/up")).await;
    assert_eq!(code, 200, "{body}");

    dns.set_hosts(&hosts_file("db.test", &[2, 3]));
    wait_members(&proxy, &addrs(&[2, 3], port), SOON).await;
    let (code, body) = post(format!("/pools/p/upstreams/db.test:{port}/maint")).await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains(&format!("{first}, {second}")) && body.contains("name one by its label"),
        "{body}"
    );
    assert_eq!(state_of(first.clone()).await, Some("up".into()));
    assert_eq!(state_of(second.clone()).await, Some("up".into()));

    let (code, body) = post(format!("/pools/p/upstreams/{second}/maint")).await;
    assert_eq!(code, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["state"], "maint");
    let encoded = format!("db.test%3A{port}%40127.0.0.2");
    let (code, body) = post(format!("/pools/p/upstreams/{encoded}/drain")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(state_of(second).await, Some("maint".into()));
    assert_eq!(state_of(first).await, Some("drain".into()));
}
