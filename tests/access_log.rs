//! The access log (`[log] connections = true`): one line per finished client connection
//! with its fields and how it ended, in text and in JSON.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use common::*;

/// A child proxy with the access log on: `front` → echo, `idle` → echo with a short
/// idle timeout, `dead` → a closed port, `denied` refuses loopback, `closing` → an
/// upstream that greets and closes.
struct Fixture {
    proxy: ChildProxy,
    front: SocketAddr,
    idle: SocketAddr,
    dead: SocketAddr,
    denied: SocketAddr,
    closing: SocketAddr,
    echo: Server,
    _closer: Server,
}

impl Fixture {
    async fn start(format: &str) -> Self {
        let echo = Server::echo().await;
        let closer = Server::start(|mut stream: TcpStream| async move {
            let _ = stream.write_all(b"bye\n").await;
        })
        .await;
        let [admin, front, idle, dead, denied, closing] = std::array::from_fn(|_| closed_port());
        let toml = format!(
            "[log]\nconnections = true\nformat = \"{format}\"\n\
             [admin]\nlisten = \"{admin}\"\n\
             [listeners.front]\nbind = \"{front}\"\npool = \"echo\"\n\
             [listeners.idle]\nbind = \"{idle}\"\npool = \"idle\"\n\
             [listeners.dead]\nbind = \"{dead}\"\npool = \"dead\"\n\
             [listeners.denied]\nbind = \"{denied}\"\npool = \"echo\"\ndeny = [\"127.0.0.0/8\"]\n\
             [listeners.closing]\nbind = \"{closing}\"\npool = \"closing\"\n\
             [pools.echo]\nupstreams = [{{ address = \"{e}\" }}]\nhealth = {{ enabled = false }}\n\
             [pools.idle]\nidle_timeout = \"300ms\"\nupstreams = [{{ address = \"{e}\" }}]\nhealth = {{ enabled = false }}\n\
             [pools.dead]\nupstreams = [{{ address = \"{d}\" }}]\nhealth = {{ enabled = false }}\n\
             [pools.closing]\nupstreams = [{{ address = \"{c}\" }}]\nhealth = {{ enabled = false }}\n",
            e = echo.addr,
            d = closed_port(),
            c = closer.addr,
        );
        let proxy = ChildProxy::start(&toml, admin).await;
        Self {
            proxy,
            front,
            idle,
            dead,
            denied,
            closing,
            echo,
            _closer: closer,
        }
    }

    /// Runs one connection of each kind, then waits for their five lines.
    async fn exercise(&self) -> Vec<String> {
        echo_round_trip(self.front, b"hello").await.unwrap();
        let mut idle = TcpStream::connect(self.idle).await.unwrap();
        idle.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        idle.read_exact(&mut one).await.unwrap();
        assert!(is_closed(&mut idle, SOON).await, "idle timeout closed it");
        let mut dead = TcpStream::connect(self.dead).await.unwrap();
        assert!(is_closed(&mut dead, SOON).await);
        let mut denied = TcpStream::connect(self.denied).await.unwrap();
        assert!(is_closed(&mut denied, SOON).await);
        let mut closing = TcpStream::connect(self.closing).await.unwrap();
        assert_eq!(read_line(&mut closing).await.unwrap(), "bye");
        assert!(is_closed(&mut closing, SOON).await);
        // The upstream ended first; our close ends the other direction.
        drop(closing);
        let deadline = Instant::now() + SOON;
        loop {
            let lines: Vec<String> = self
                .proxy
                .stderr()
                .lines()
                .filter(|l| l.contains("switchyard::access"))
                .map(str::to_string)
                .collect();
            if lines.len() >= 5 {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "expected 5 access-log lines:\n{}",
                self.proxy.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn line_for<'a>(lines: &'a [String], listener: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.contains(&format!("listener={listener} ")))
        .unwrap_or_else(|| panic!("no access-log line for {listener}: {lines:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_name_every_field_and_how_each_connection_ended() {
    let fixture = Fixture::start("text").await;
    let lines = fixture.exercise().await;
    assert_eq!(lines.len(), 5, "one line per connection: {lines:#?}");

    let normal = line_for(&lines, "front");
    for field in [
        "pool=echo",
        &format!("upstream={}", fixture.echo.addr),
        "tier=0",
        "attempts=1",
        "bytes_in=5",
        "bytes_out=5",
        "end=client_closed",
        "connect_ms=",
        "duration_ms=",
        "client=127.0.0.1:",
    ] {
        assert!(normal.contains(field), "{field} missing: {normal}");
    }
    let idle = line_for(&lines, "idle");
    assert!(idle.contains("end=idle_timeout"), "{idle}");
    assert!(idle.contains("bytes_in=1 bytes_out=1"), "{idle}");
    let dead = line_for(&lines, "dead");
    assert!(dead.contains("end=connect_failed"), "{dead}");
    assert!(dead.contains("attempts=1"), "{dead}");
    assert!(
        !dead.contains("upstream="),
        "no upstream was reached: {dead}"
    );
    let denied = line_for(&lines, "denied");
    assert!(denied.contains("end=rejected:denied"), "{denied}");
    let closing = line_for(&lines, "closing");
    assert!(closing.contains("end=upstream_closed"), "{closing}");
    for line in &lines {
        assert!(!line.contains("Some("), "Debug-formatted value: {line}");
        assert!(!line.contains('\u{1b}'), "colour codes: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_typed_fields() {
    let fixture = Fixture::start("json").await;
    let lines = fixture.exercise().await;
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let by_listener = |name: &str| {
        parsed
            .iter()
            .map(|v| &v["fields"])
            .find(|f| f["listener"] == name)
            .unwrap_or_else(|| panic!("no line for {name}: {parsed:#?}"))
            .clone()
    };
    let normal = by_listener("front");
    assert_eq!(normal["message"], "connection closed");
    assert_eq!(normal["pool"], "echo");
    assert_eq!(normal["upstream"], fixture.echo.addr.to_string());
    assert_eq!(normal["tier"], 0);
    assert_eq!(normal["attempts"], 1);
    assert_eq!(normal["bytes_in"], 5);
    assert_eq!(normal["bytes_out"], 5);
    assert_eq!(normal["end"], "client_closed");
    assert!(normal["connect_ms"].is_number(), "{normal}");
    assert!(normal["duration_ms"].is_number(), "{normal}");
    assert_eq!(by_listener("idle")["end"], "idle_timeout");
    let dead = by_listener("dead");
    assert_eq!(dead["end"], "connect_failed");
    assert!(dead.get("upstream").is_none(), "{dead}");
    assert_eq!(by_listener("denied")["end"], "rejected:denied");
    assert_eq!(by_listener("closing")["end"], "upstream_closed");
}

/// `[log] connections` follows a reload: off, then on, then off, then on again. Each
/// connection sends a different number of bytes, so its line (if any) is recognisable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_follows_reloads() {
    let echo = Server::echo().await;
    let (admin, front) = (closed_port(), closed_port());
    let config = |on: bool| {
        format!(
            "[log]\nconnections = {on}\n[admin]\nlisten = \"{admin}\"\n{}",
            one_pool_config(&[(echo.addr, 0)], "").replace("127.0.0.1:0", &front.to_string())
        )
    };
    let lines_with = |proxy: &ChildProxy, bytes: usize| {
        proxy
            .stderr()
            .lines()
            .filter(|l| l.contains("switchyard::access"))
            .filter(|l| l.contains(&format!(" bytes_in={bytes} ")))
            .count()
    };
    let proxy = ChildProxy::start(&config(false), admin).await;
    echo_round_trip(front, &[b'a'; 5]).await.unwrap();
    assert_eq!(proxy.reload_with(&config(true)).await, "ok");
    echo_round_trip(front, &[b'b'; 6]).await.unwrap();
    assert_eq!(proxy.reload_with(&config(false)).await, "ok");
    echo_round_trip(front, &[b'c'; 11]).await.unwrap();
    assert_eq!(proxy.reload_with(&config(true)).await, "ok");
    echo_round_trip(front, &[b'd'; 3]).await.unwrap();
    wait_until(SOON, "the last connection's line", || {
        lines_with(&proxy, 3) == 1
    })
    .await;
    wait_until(SOON, "the logged connection's line", || {
        lines_with(&proxy, 6) == 1
    })
    .await;
    assert_eq!(lines_with(&proxy, 5), 0, "{}", proxy.stderr());
    assert_eq!(lines_with(&proxy, 11), 0, "{}", proxy.stderr());
}
