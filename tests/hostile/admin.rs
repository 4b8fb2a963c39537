//! Hostile admin clients: silent and trickling connections, a flood of idle ones under
//! a small descriptor limit, oversized headers, wrong tokens, and HEAD. Throughout, an
//! echo round trip through the proxy and `GET /livez` must keep working.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::common::*;
use switchyard::admin::{HEADER_TIMEOUT, connection_cap_for};

const TOKEN: &str = "correct-horse-battery-staple";

/// Slack on top of a server-side timeout before a test calls it missed, for a loaded
/// 2-core machine.
const MARGIN: Duration = Duration::from_secs(5);

/// An in-process proxy: listener `front` to an echo upstream, and the admin API with a
/// token file.
struct Setup {
    proxy: TestProxy,
    _echo: Server,
    _token_dir: TestDir,
}

impl Setup {
    async fn start() -> Self {
        let echo = Server::echo().await;
        let token_dir = TestDir::new();
        let token_file = token_dir.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
        let config = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\n{}",
            token_file.display(),
            one_pool_config(&[(echo.addr, 0)], "")
        );
        Self {
            proxy: start_proxy(&config),
            _echo: echo,
            _token_dir: token_dir,
        }
    }

    fn admin(&self) -> SocketAddr {
        self.proxy.admin.expect("admin API started")
    }

    async fn assert_serving(&self) {
        assert_serving(self.proxy.addr("front"), self.admin()).await;
    }
}

/// A well-behaved client gets an echo through the proxy and `/livez` answers 200.
async fn assert_serving(front: SocketAddr, admin: SocketAddr) {
    match timeout(SOON, echo_round_trip(front, b"still serving")).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("echo through the proxy failed: {e}"),
        Err(_) => panic!("echo through the proxy timed out"),
    }
    let livez = exchange(admin, &request("GET", "/livez", &[])).await;
    assert_eq!(
        livez.as_ref().map(|r| r.status).ok(),
        Some(200),
        "GET /livez: {livez:?}"
    );
}

/// An answer read off the wire.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// A `Connection: close` request with `extra` header lines.
fn request(method: &str, path: &str, extra: &[&str]) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n");
    for line in extra {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// Sends `request` on a fresh connection and reads the answer until the server closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<RawResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw: Vec<u8> = timeout(SOON, exchange)
        .await
        .map_err(|_| std::io::Error::other("no answer in time"))??;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no complete head in {raw:?}")))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok(RawResponse {
        status,
        head,
        body: raw[end + 4..].to_vec(),
    })
}

/// Waits for the server to close `stream`, reading and discarding whatever it sends;
/// returns how long that took from `since`, or `None` past `limit`.
async fn closed_within(
    stream: &mut TcpStream,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    loop {
        let left = limit.checked_sub(since.elapsed())?;
        match timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
    let setup = Setup::start().await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(setup.admin()).await.expect("connect");
    setup.assert_serving().await;
    let closed = closed_within(&mut silent, opened, HEADER_TIMEOUT + MARGIN).await;
    let closed = closed.expect("a silent admin connection stays open past the header timeout");
    assert!(
        closed >= HEADER_TIMEOUT - Duration::from_millis(100),
        "closed after {closed:?}, before the header timeout: not the timeout's doing"
    );
    setup.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_is_closed_when_idle_past_the_header_timeout() {
    let setup = Setup::start().await;
    let mut stream = TcpStream::connect(setup.admin()).await.expect("connect");
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .expect("send");
    // Read the whole answer (head, then Content-Length bytes); the connection stays.
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    let answered = timeout(SOON, async {
        loop {
            let n = stream.read(&mut buf).await.expect("read answer");
            assert!(n > 0, "closed instead of answering: {raw:?}");
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse().ok())
                    .expect("content-length");
                if body.len() >= length {
                    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                    return;
                }
            }
        }
    })
    .await;
    assert!(answered.is_ok(), "no answer to GET /livez: {raw:?}");
    let idle_since = Instant::now();
    setup.assert_serving().await;
    let closed = closed_within(&mut stream, idle_since, HEADER_TIMEOUT + MARGIN).await;
    assert!(
        closed.is_some(),
        "an idle kept-alive admin connection stays open past the header timeout"
    );
    setup.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_trickled_a_byte_a_second_is_cut_at_the_header_timeout() {
    let setup = Setup::start().await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(setup.admin()).await.expect("connect");
    let trickle = b"GET /livez HTTP/1.1\r\nX-Trickle: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut sent = 0;
    let closed = loop {
        assert!(
            started.elapsed() < HEADER_TIMEOUT + MARGIN,
            "a trickling admin client kept its connection for {:?} ({sent} bytes sent)",
            started.elapsed()
        );
        if stream.write_all(&trickle[sent..=sent]).await.is_err() {
            break started.elapsed();
        }
        sent += 1;
        // One byte a second: the pause is the attack itself, and the read notices a
        // close meanwhile.
        let mut buf = [0u8; 256];
        match timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(_)) | Err(_) => {}
        }
        if sent % 2 == 0 {
            setup.assert_serving().await;
        }
    };
    assert!(
        closed >= HEADER_TIMEOUT - Duration::from_millis(100),
        "cut after {closed:?}, before the header timeout"
    );
    setup.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_is_refused_without_affecting_others() {
    let setup = Setup::start().await;
    let admin = setup.admin();
    // A well-behaved kept-alive client, connected before the attack.
    let mut neighbour = TcpStream::connect(admin).await.expect("connect");

    let big = format!("X-Big: {}", "a".repeat(32 * 1024));
    match exchange(admin, &request("GET", "/livez", &[&big])).await {
        Ok(response) => assert_eq!(response.status, 431, "{}", response.head),
        // The server may close before the client reads its 431 (a reset).
        Err(e) => assert!(
            !e.to_string().contains("no answer in time"),
            "an oversized header hangs: {e}"
        ),
    }
    setup.assert_serving().await;

    neighbour
        .write_all(b"GET /livez HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    timeout(SOON, neighbour.read_to_end(&mut answer))
        .await
        .expect("neighbour answered in time")
        .expect("neighbour read");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_is_never_read() {
    let setup = Setup::start().await;
    let mut stream = TcpStream::connect(setup.admin()).await.expect("connect");
    // One write, so that the server receives all of it at once and its close after
    // the answer is a FIN, not a reset for unread bytes.
    let mut request = format!(
        "POST /pools/p/failback HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000000000\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(&[b'x'; 1024]);
    stream.write_all(&request).await.expect("send");
    // Answered without waiting for the gigabyte, then closed instead of read on.
    let mut answer = Vec::new();
    let read = timeout(SOON, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server waits for the body: {answer:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 409"), "{answer}");
    setup.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_are_refused_and_the_bearer_scheme_is_case_insensitive() {
    let setup = Setup::start().await;
    let admin = setup.admin();
    let post = |authorization: String| {
        let line = format!("Authorization: {authorization}");
        async move {
            exchange(admin, &request("POST", "/pools/p/failback", &[&line]))
                .await
                .expect("answer")
                .status
        }
    };
    let same_length = "x".repeat(TOKEN.len());
    for (authorization, why) in [
        (format!("Bearer {TOKEN}x"), "longer"),
        (format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]), "shorter"),
        ("Bearer x".to_string(), "much shorter"),
        (format!("Bearer {same_length}"), "same length"),
        (format!("Bearer {TOKEN}{TOKEN}"), "the token twice"),
        (format!("Basic {TOKEN}"), "another scheme"),
        (format!("Bearer{TOKEN}"), "no space"),
    ] {
        assert_eq!(
            post(authorization.clone()).await,
            401,
            "{why}: {authorization}"
        );
    }
    // Authorized: the pool is on its best tier, so failback answers 409.
    for authorization in [
        format!("Bearer {TOKEN}"),
        format!("bearer {TOKEN}"),
        format!("BEARER  {TOKEN}"),
        format!("bEaReR     {TOKEN}"),
    ] {
        assert_eq!(post(authorization.clone()).await, 409, "{authorization}");
    }
    setup.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_served_wherever_get_is_without_a_body() {
    let setup = Setup::start().await;
    let admin = setup.admin();
    for path in ["/livez", "/status", "/readyz", "/metrics", "/events"] {
        let get = exchange(admin, &request("GET", path, &[]))
            .await
            .expect("GET");
        let head = exchange(admin, &request("HEAD", path, &[]))
            .await
            .expect("HEAD");
        assert_eq!(head.status, 200, "HEAD {path}: {}", head.head);
        assert!(head.body.is_empty(), "HEAD {path} sent a body: {head:?}");
        assert_eq!(
            head.header("content-type"),
            get.header("content-type"),
            "HEAD {path}"
        );
        assert!(
            head.header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .is_some_and(|n| n > 0),
            "HEAD {path} announces the GET body's length: {}",
            head.head
        );
    }
    let head = exchange(admin, &request("HEAD", "/reload", &[]))
        .await
        .expect("HEAD /reload");
    assert_eq!(
        (head.status, head.header("allow")),
        (405, Some("POST")),
        "{}",
        head.head
    );
    assert!(head.body.is_empty(), "{head:?}");
    let post = exchange(
        admin,
        &request(
            "POST",
            "/livez",
            &[&format!("Authorization: Bearer {TOKEN}")],
        ),
    )
    .await
    .expect("POST /livez");
    assert_eq!(
        (post.status, post.header("allow")),
        (405, Some("GET, HEAD")),
        "{}",
        post.head
    );
    setup.assert_serving().await;
}

/// TCP connections on local port `port` that `child` holds a descriptor for,
/// listening sockets aside: the admin connections the server keeps open.
fn connections_held(child: &ChildProxy, port: u16) -> usize {
    let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{}/fd", child.child.id()))
        .map(|dir| {
            dir.filter_map(|entry| {
                let link = std::fs::read_link(entry.ok()?.path()).ok()?;
                let link = link.to_str()?;
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|local| local.rsplit_once(':'))
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            let listening = fields.get(3) == Some(&"0A");
            let inode = fields.get(9).and_then(|i| i.parse::<u64>().ok());
            local_port == Some(port) && !listening && inode.is_some_and(|i| inodes.contains(&i))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_admin_connections_neither_lock_out_livez_nor_starve_the_proxy() {
    const DESCRIPTORS: u64 = 256;
    const IDLE: usize = 1000;
    let cap = connection_cap_for(DESCRIPTORS);
    let echo = Server::echo().await;
    let admin = closed_port();
    let health = "[pools.p.health]\ninterval = \"200ms\"\nfast_interval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 2\n";
    let config = format!(
        "[admin]\nlisten = \"{admin}\"\n\n{}",
        checked_pool_config(&[(echo.addr, 0)], "", health)
    );
    let proxy = ChildProxy::start_limited(&config, admin, &[], Some(DESCRIPTORS)).await;

    let status = exchange(admin, &request("GET", "/status", &[]))
        .await
        .expect("GET /status");
    let status: serde_json::Value = serde_json::from_slice(&status.body).expect("status JSON");
    let front: SocketAddr = status["listeners"][0]["binds"][0]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("front address in /status");
    let deadline = Instant::now() + SOON;
    loop {
        let status = exchange(admin, &request("GET", "/status", &[])).await;
        let up = status.ok().and_then(|s| {
            let json: serde_json::Value = serde_json::from_slice(&s.body).ok()?;
            Some(json["pools"][0]["upstreams"][0]["state"] == "up")
        });
        if up == Some(true) {
            break;
        }
        assert!(Instant::now() < deadline, "the upstream never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut idle = Vec::with_capacity(IDLE);
    for n in 1..=IDLE {
        let stream = timeout(SOON, TcpStream::connect(admin))
            .await
            .unwrap_or_else(|_| panic!("connect {n} timed out"))
            .unwrap_or_else(|e| panic!("connect {n}: {e}"));
        idle.push(stream);
        if n % 50 == 0 {
            assert_serving(front, admin).await;
            wait_until(
                SOON,
                &format!("the server keeps at most {cap} admin connections ({n} opened)"),
                || connections_held(&proxy, admin.port()) <= cap,
            )
            .await;
        }
    }
    assert_serving(front, admin).await;

    let events = exchange(admin, &request("GET", "/events", &[]))
        .await
        .expect("GET /events");
    let events: serde_json::Value = serde_json::from_slice(&events.body).expect("events JSON");
    let downs: Vec<&serde_json::Value> = events["events"]
        .as_array()
        .map(|all| all.iter().filter(|e| e["new"] == "down").collect())
        .unwrap_or_default();
    assert!(
        downs.is_empty(),
        "a healthy upstream was marked down: {downs:?}\n{}",
        proxy.stderr()
    );
    drop(idle);
}

/// A client guessing tokens cannot flood the log: refusals are counted in the warning,
/// not written one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guessing_does_not_flood_the_log() {
    let echo = Server::echo().await;
    let dir = TestDir::new();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (admin, front) = (closed_port(), closed_port());
    let config = format!(
        "[admin]\nlisten = \"{admin}\"\ntoken_file = \"{}\"\n\n{}",
        token_file.display(),
        one_pool_config(&[(echo.addr, 0)], "").replace("127.0.0.1:0", &front.to_string())
    );
    let proxy = ChildProxy::start(&config, admin).await;
    let started = Instant::now();
    for guess in 0..200 {
        let line = format!("Authorization: Bearer guess-{guess}");
        let answer = exchange(admin, &request("POST", "/reload", &[&line]))
            .await
            .expect("answer");
        assert_eq!(answer.status, 401);
    }
    let periods = started.elapsed().as_secs() / 10 + 1;
    let warnings = proxy
        .stderr()
        .lines()
        .filter(|l| l.contains("admin request refused"))
        .count() as u64;
    assert!(
        (1..=periods).contains(&warnings),
        "{warnings} warnings for 200 refusals in {:?}",
        started.elapsed()
    );
    assert_serving(front, admin).await;
}
