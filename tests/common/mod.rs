//! Shared test fixtures: an in-process proxy on port 0, loopback upstreams of several
//! behaviours, and polling with a deadline instead of sleeps.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use switchyard::Proxy;
use switchyard::config::Config;
use switchyard::shutdown::Shutdown;

/// Generous bound for anything that should happen "at once" on a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(10);

pub struct TestProxy {
    pub proxy: Proxy,
    pub shutdown: Shutdown,
    pub config: Config,
    pub reloader: std::sync::Arc<switchyard::reload::Reloader>,
    pub admin: Option<SocketAddr>,
    /// The file the config was loaded from; rewrite it and reload.
    pub config_path: std::path::PathBuf,
}

impl TestProxy {
    /// The first bound address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.proxy.listener(name).expect("listener exists").addrs[0]
    }

    /// Replaces the config file's content (the next reload reads it).
    pub fn rewrite_config(&self, toml: &str) {
        std::fs::write(&self.config_path, toml).expect("write test config");
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.begin();
        let _ = std::fs::remove_dir_all(
            self.config_path
                .parent()
                .unwrap_or(Path::new("/nonexistent")),
        );
    }
}

/// A fresh private directory for one test's files.
pub fn test_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("switchyard-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// Starts a proxy in this runtime from TOML text (binds should use port 0), loaded
/// from a file of its own so that tests can rewrite it and reload.
pub fn start_proxy(toml: &str) -> TestProxy {
    let config_path = test_dir().join("switchyard.toml");
    std::fs::write(&config_path, toml).expect("write test config");
    let config = Config::load(&config_path)
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{toml}"));
    let listeners = switchyard::bind_all(&config).expect("bind test listeners");
    let shutdown = Shutdown::new();
    let running = switchyard::start(config.clone(), listeners, &shutdown).expect("start proxy");
    TestProxy {
        proxy: running.proxy,
        shutdown,
        config,
        reloader: running.reloader,
        admin: running.admin_addr,
        config_path,
    }
}

/// A config with one listener `front` on port 0 forwarding to pool `p` whose upstreams
/// are `(address, priority)`; `pool_extra` lines go into `[pools.p]`.
pub fn one_pool_config(upstreams: &[(SocketAddr, u32)], pool_extra: &str) -> String {
    let list: Vec<String> = upstreams
        .iter()
        .map(|(addr, priority)| format!("{{ address = \"{addr}\", priority = {priority} }}"))
        .collect();
    format!(
        "[listeners.front]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[pools.p]\n{pool_extra}\nupstreams = [{}]\n\n[pools.p.health]\nenabled = false\n",
        list.join(", ")
    )
}

/// A loopback server; dropping it closes the listener and every connection it holds.
pub struct Server {
    pub addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Server {
    /// Serves every accepted connection with `handler`.
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                connections.spawn(handler(stream));
                while connections.try_join_next().is_some() {}
            }
        });
        Self { addr, tasks }
    }

    /// Echoes every byte; on EOF from the client, shuts down its write side.
    pub async fn echo() -> Self {
        Self::start(|mut stream: TcpStream| async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }

    /// Sends `name` and a newline on accept, then echoes.
    pub async fn named(name: &'static str) -> Self {
        Self::start(move |mut stream: TcpStream| async move {
            if stream
                .write_all(format!("{name}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await
    }

    pub fn stop(self) {}
}

impl Drop for Server {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// An address where nothing listens (connects are refused).
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// A listening socket whose accept queue is full and never drained: the kernel drops
/// new SYNs, so connects neither succeed nor fail until the client gives up.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<std::net::TcpStream>,
}

impl BlackHole {
    pub fn new() -> Self {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        listener.bind(&any.into()).expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("inet");
        let mut fillers = Vec::new();
        for _ in 0..16 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(stream) => fillers.push(stream),
                Err(_) => break,
            }
        }
        let probe = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(probe.is_err(), "the black hole still accepts connections");
        Self {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

/// Polls `condition` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads one line (without the newline) from a fresh connection's greeting.
pub async fn read_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = stream.read(&mut byte).await?;
        if n == 0 || byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

/// Connects, sends `payload`, reads the same number of bytes back and checks them.
pub async fn echo_round_trip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await?;
    if back != payload {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    data
}

/// True when the peer closed: a read returns EOF or an error.
pub async fn is_closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// How a [`Backend`] behaves towards connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Greets with `hello <name>\n`, then echoes.
    Serving = 0,
    /// Accepts (the kernel does) but never answers, like a stuck process.
    Hung = 1,
}

/// A controllable upstream for failover tests: it can serve, hang, be killed and
/// restarted on the same port, or become a black hole.
pub struct Backend {
    pub name: &'static str,
    pub addr: SocketAddr,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    tasks: JoinSet<()>,
    fillers: Vec<std::net::TcpStream>,
    paused_listener: Option<std::net::TcpListener>,
}

impl Backend {
    pub async fn start(name: &'static str) -> Self {
        let mut backend = Self {
            name,
            addr: "127.0.0.1:0".parse().expect("addr"),
            mode: Default::default(),
            tasks: JoinSet::new(),
            fillers: Vec::new(),
            paused_listener: None,
        };
        backend.restart().await;
        backend
    }

    /// Listens again on the same address (a fresh port the first time) and serves.
    pub async fn restart(&mut self) {
        self.kill().await;
        let listener = Self::listen(self.addr);
        self.addr = listener.local_addr().expect("backend addr");
        self.mode
            .store(Mode::Serving as u8, std::sync::atomic::Ordering::SeqCst);
        self.serve(listener);
    }

    fn listen(addr: SocketAddr) -> std::net::TcpListener {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.set_reuse_address(true).expect("reuseaddr");
        socket.bind(&addr.into()).expect("bind backend");
        // Large enough for bursts of test clients (an overflow drops SYNs and stalls a
        // connect for a second), small enough to fill quickly for a black hole.
        socket.listen(128).expect("listen");
        socket.set_nonblocking(true).expect("nonblocking");
        socket.into()
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let name = self.name;
        let mode = self.mode.clone();
        self.tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections.spawn(Self::handle(stream, name, mode.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
    }

    async fn handle(
        mut stream: TcpStream,
        name: &'static str,
        mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    ) {
        let hung = || mode.load(std::sync::atomic::Ordering::SeqCst) == Mode::Hung as u8;
        if hung() {
            return std::future::pending().await;
        }
        if stream
            .write_all(format!("hello {name}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if hung() {
                return std::future::pending().await;
            }
            if stream.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Closes the listener and every connection, like a process that died; returns
    /// once the port is closed.
    pub async fn kill(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.fillers.clear();
        self.paused_listener = None;
    }

    /// New and established connections stop being answered.
    pub fn hang(&self) {
        self.mode
            .store(Mode::Hung as u8, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops accepting and fills the accept queue: new connects get no answer at all.
    pub async fn black_hole(&mut self) {
        self.kill().await;
        let listener = Self::listen(self.addr);
        for _ in 0..256 {
            match std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) {
                Ok(stream) => self.fillers.push(stream),
                Err(_) => break,
            }
        }
        assert!(
            std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(300)).is_err(),
            "black hole still accepts"
        );
        self.paused_listener = Some(listener);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Connects through the proxy and returns the upstream's greeting name (`hello NAME`).
pub async fn greeted_by(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let line = tokio::time::timeout(SOON, read_line(&mut stream))
        .await
        .map_err(|_| std::io::Error::other("no greeting"))??;
    line.strip_prefix("hello ")
        .map(str::to_string)
        .ok_or_else(|| std::io::Error::other(format!("closed or unexpected greeting {line:?}")))
}

/// Health settings that decide quickly; `expect` matches the backends' greeting.
pub const FAST_HEALTH: &str = "[pools.p.health]\ninterval = \"200ms\"\nfast_interval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2\nsend = \"PING\\r\\n\"\nexpect = \"hello\"\n";

/// Like [`one_pool_config`] but with `health` as the `[pools.p.health]` table.
pub fn checked_pool_config(
    upstreams: &[(SocketAddr, u32)],
    pool_extra: &str,
    health: &str,
) -> String {
    one_pool_config(upstreams, pool_extra).replace("[pools.p.health]\nenabled = false\n", health)
}

/// Waits for an upstream event of `upstream` whose new state is `new`; returns it.
pub async fn wait_event(
    proxy: &TestProxy,
    upstream: &str,
    new: &str,
    limit: Duration,
) -> switchyard::events::Event {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(event) = proxy
            .proxy
            .events
            .all()
            .into_iter()
            .find(|e| e.upstream.as_deref() == Some(upstream) && e.new == new)
        {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no event {upstream} -> {new} within {limit:?}: {:#?}",
            proxy.proxy.events.all()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The pool's active tier priority as routing sees it now.
pub fn active_priority(proxy: &TestProxy, pool: &str) -> Option<u32> {
    proxy
        .proxy
        .snapshot
        .load()
        .pool(pool)
        .and_then(|r| r.active_priority())
}

/// Unix milliseconds now, comparable with event timestamps.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Listener `front` → pool `p` with named upstreams `(name, address, priority)`,
/// `pool_extra` lines in `[pools.p]` and `health` as the whole health table.
pub fn pool_config(
    upstreams: &[(&str, SocketAddr, u32)],
    pool_extra: &str,
    health: &str,
) -> String {
    let list: Vec<String> = upstreams
        .iter()
        .map(|(name, addr, priority)| {
            format!("{{ name = \"{name}\", address = \"{addr}\", priority = {priority} }}")
        })
        .collect();
    format!(
        "[listeners.front]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[pools.p]\n{pool_extra}\nupstreams = [{}]\n\n{health}\n",
        list.join(", ")
    )
}

/// One HTTP/1.1 request with a real client; returns (status, body, allow header).
pub async fn http(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, String, Option<String>) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    let stream = TcpStream::connect(addr).await.expect("connect to admin");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string());
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Empty::<bytes::Bytes>::new()).expect("request"))
        .await
        .expect("HTTP response");
    let status = response.status().as_u16();
    let allow = response
        .headers()
        .get(hyper::header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), allow)
}

pub async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body, _) = http("GET", addr, path, None).await;
    assert!(
        status == 200 || status == 503,
        "GET {path}: {status} {body}"
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// `switchyard run` as a child process, killed on drop.
pub struct ChildProxy {
    pub child: std::process::Child,
    pub admin: SocketAddr,
    pub config_path: std::path::PathBuf,
    pub stderr_path: std::path::PathBuf,
}

impl ChildProxy {
    /// Starts the binary on `toml` (which must have an `[admin]` table on `admin`) and
    /// waits until the admin API answers.
    pub async fn start(toml: &str, admin: SocketAddr) -> Self {
        let dir = test_dir();
        let config_path = dir.join("switchyard.toml");
        let stderr_path = dir.join("stderr.log");
        std::fs::write(&config_path, toml).expect("write config");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "-c"])
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("start switchyard");
        let proxy = Self {
            child,
            admin,
            config_path,
            stderr_path,
        };
        let deadline = Instant::now() + SOON;
        while TcpStream::connect(admin).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "admin API never came up: {}",
                proxy.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) takes plain integers; `pid` is our own child, not yet reaped
        // (only `drop` reaps it), so it cannot name another process.
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            result,
            0,
            "kill failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Rewrites the config file and sends SIGHUP; returns once the reload counter moved.
    pub async fn reload_with(&self, toml: &str) -> &'static str {
        std::fs::write(&self.config_path, toml).expect("rewrite config");
        let before = self.reloads().await;
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + SOON;
        loop {
            let now = self.reloads().await;
            if now.0 > before.0 {
                return "ok";
            }
            if now.1 > before.1 {
                return "error";
            }
            assert!(
                Instant::now() < deadline,
                "SIGHUP did not reload: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// (ok, error) from `switchyard_config_reloads_total`.
    pub async fn reloads(&self) -> (u64, u64) {
        let metrics = metrics(self.admin).await;
        let value = |result: &str| {
            metrics
                .samples
                .iter()
                .find(|s| {
                    s.metric == "switchyard_config_reloads_total"
                        && s.labels.get("result") == Some(result)
                })
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => {
                        v as u64
                    }
                    _ => 0,
                })
                .unwrap_or(0)
        };
        (value("ok"), value("error"))
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(
            self.config_path
                .parent()
                .unwrap_or(Path::new("/nonexistent")),
        );
    }
}

/// `/metrics`, parsed by a Prometheus text parser.
pub async fn metrics(admin: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body, _) = http("GET", admin, "/metrics", None).await;
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text")
}

/// The upstream named `name` of pool `pool` in `/status`.
pub fn upstream_status<'a>(
    status: &'a serde_json::Value,
    pool: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    status["pools"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == pool)?["upstreams"]
        .as_array()?
        .iter()
        .find(|u| u["name"] == name)
}

/// Waits until every upstream of pool `p` passed its first active check.
pub async fn wait_first_checks(proxy: &TestProxy) {
    let route = proxy
        .proxy
        .snapshot
        .load()
        .pool("p")
        .expect("pool p")
        .clone();
    wait_until(SOON, "first checks passed", || {
        route.upstreams.iter().all(|u| {
            u.stats
                .checks_passed
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        })
    })
    .await;
}
