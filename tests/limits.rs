//! Admission limits: `max_connections`, and running out of file descriptors.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_beyond_max_connections_is_closed_at_once_while_the_others_work() {
    let upstream = Server::echo().await;
    let config = one_pool_config(&[(upstream.addr, 0)], "")
        .replace("pool = \"p\"", "pool = \"p\"\nmax_connections = 50");
    let proxy = start_proxy(&config);
    let addr = proxy.addr("front");

    let mut held = Vec::new();
    for i in 0..50u8 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.unwrap();
        held.push(stream);
    }

    let started = Instant::now();
    let mut extra = TcpStream::connect(addr).await.unwrap();
    assert!(
        is_closed(&mut extra, SOON).await,
        "the 51st client is closed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed at once, not after a timeout"
    );
    let stats = &proxy.proxy.listener("front").unwrap().context.stats;
    assert_eq!(
        stats.rejected(switchyard::metrics::RejectReason::MaxConnections),
        1
    );

    for (i, stream) in held.iter_mut().enumerate() {
        let payload = [i as u8, 0xAA, 0x55];
        stream.write_all(&payload).await.unwrap();
        let mut back = [0u8; 3];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, payload, "connection {i} still works");
    }

    // A freed slot admits a new client.
    held.pop();
    wait_until(SOON, "slot freed", || {
        stats.connections_active.load(Relaxed) == 49
    })
    .await;
    echo_round_trip(addr, b"again")
        .await
        .expect("served once below the limit");
}

/// Kills the child on drop so a failing test leaves nothing behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User + system CPU time of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_proxy_neither_exits_nor_spins_and_recovers() {
    let upstream = Server::echo().await;
    let port = closed_port().port();
    let dir = TestDir::new();
    let config_path = dir.join("rlimit.toml");
    std::fs::write(
        &config_path,
        one_pool_config(&[(upstream.addr, 0)], "")
            .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
            .replace(
                "[listeners.front]",
                "[runtime]\nworker_threads = 2\n\n[listeners.front]",
            ),
    )
    .unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" run -c \"$1\" --log-level warn")
        .arg(env!("CARGO_BIN_EXE_switchyard"))
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .expect("start switchyard");
    let mut child = ChildGuard(child);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + SOON;
    while echo_round_trip(addr, b"up").await.is_err() {
        assert!(Instant::now() < deadline, "proxy did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 400 clients, each needing two descriptors in the proxy: far beyond 256.
    let mut clients = Vec::new();
    for _ in 0..400 {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
        {
            clients.push(stream);
        }
    }
    let cpu_before = cpu_time(child.0.id());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_spent = cpu_time(child.0.id()) - cpu_before;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the proxy exited under EMFILE"
    );
    assert!(
        cpu_spent < Duration::from_millis(600),
        "the proxy burnt {cpu_spent:?} of CPU in 2 s: it spins"
    );

    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(20);
    while echo_round_trip(addr, b"served again").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the proxy does not serve again after the clients left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(child.0.try_wait().unwrap().is_none());
    let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
    assert!(
        log.contains("accept failed"),
        "the test never ran the proxy out of descriptors:\n{log}"
    );
}
