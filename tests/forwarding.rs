//! Transparency of the data path: bytes arrive exact, both directions, with half-close,
//! server-speaks-first and idle timeouts.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_mib_each_way_arrive_byte_exact() {
    let upstream = Server::echo().await;
    let proxy = start_proxy(&one_pool_config(&[(upstream.addr, 0)], ""));
    let data = random_bytes(32 << 20, 1);

    let stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(60), read.read_to_end(&mut back))
        .await
        .expect("echo finished in time")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ from what was sent");

    let stats = &proxy.proxy.listener("front").unwrap().context.stats;
    wait_until(SOON, "byte counters", || {
        stats.bytes_in.load(std::sync::atomic::Ordering::Relaxed) == data.len() as u64
            && stats.bytes_out.load(std::sync::atomic::Ordering::Relaxed) == data.len() as u64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_each_echo_256_kib() {
    let upstream = Server::echo().await;
    let proxy = start_proxy(&one_pool_config(&[(upstream.addr, 0)], ""));
    let addr = proxy.addr("front");

    let mut clients = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        clients.spawn(async move {
            let data = random_bytes(256 << 10, i);
            let stream = TcpStream::connect(addr).await?;
            let (mut read, mut write) = stream.into_split();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                write.write_all(&sent).await?;
                write.shutdown().await
            });
            let mut back = Vec::new();
            read.read_to_end(&mut back).await?;
            writer.await.map_err(std::io::Error::other)??;
            Ok::<bool, std::io::Error>(back == data)
        });
    }
    let mut exact = 0;
    while let Some(result) = clients.join_next().await {
        assert!(
            result.unwrap().expect("client I/O"),
            "a client got different bytes back"
        );
        exact += 1;
    }
    assert_eq!(exact, 200);
}

#[tokio::test]
async fn client_that_shuts_down_writing_still_receives_the_full_reply() {
    // The upstream reads the whole request, then answers with 1 MiB derived from it.
    let upstream = Server::start(|mut stream: TcpStream| async move {
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap();
        let reply: Vec<u8> = request.iter().cycle().take(1 << 20).map(|b| !b).collect();
        stream.write_all(&reply).await.unwrap();
    })
    .await;
    let proxy = start_proxy(&one_pool_config(&[(upstream.addr, 0)], ""));

    let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
    let request = random_bytes(1000, 7);
    stream.write_all(&request).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(SOON, stream.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .unwrap();
    let expected: Vec<u8> = request.iter().cycle().take(1 << 20).map(|b| !b).collect();
    assert_eq!(reply.len(), expected.len());
    assert!(reply == expected);
}

#[tokio::test]
async fn upstream_that_shuts_down_writing_still_receives_from_the_client() {
    // The upstream says hello, closes its sending side, then counts what it receives
    // and reports the count on a side channel.
    let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Server::start(move |mut stream: TcpStream| {
        let count_tx = count_tx.clone();
        async move {
            stream.write_all(b"hello").await.unwrap();
            stream.shutdown().await.unwrap();
            let mut received = Vec::new();
            stream.read_to_end(&mut received).await.unwrap();
            let _ = count_tx.send(received);
        }
    })
    .await;
    let proxy = start_proxy(&one_pool_config(&[(upstream.addr, 0)], ""));

    let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"hello", "upstream's EOF reaches the client");
    let late = random_bytes(300_000, 3);
    stream.write_all(&late).await.unwrap();
    stream.shutdown().await.unwrap();
    let received = tokio::time::timeout(SOON, count_rx.recv())
        .await
        .expect("upstream reported")
        .unwrap();
    assert!(
        received == late,
        "bytes sent after the upstream's half-close arrived intact"
    );
}

#[tokio::test]
async fn server_speaks_first() {
    let upstream = Server::start(|mut stream: TcpStream| async move {
        stream.write_all(b"220 ready\r\n").await.unwrap();
        let mut command = [0u8; 6];
        stream.read_exact(&mut command).await.unwrap();
        assert_eq!(&command, b"QUIT\r\n");
        stream.write_all(b"221 bye\r\n").await.unwrap();
    })
    .await;
    let proxy = start_proxy(&one_pool_config(&[(upstream.addr, 0)], ""));

    let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
    let mut banner = [0u8; 11];
    tokio::time::timeout(SOON, stream.read_exact(&mut banner))
        .await
        .expect("banner without sending anything")
        .unwrap();
    assert_eq!(&banner, b"220 ready\r\n");
    stream.write_all(b"QUIT\r\n").await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"221 bye\r\n");
}

#[tokio::test]
async fn idle_timeout_closes_both_sides() {
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Server::start(move |mut stream: TcpStream| {
        let closed_tx = closed_tx.clone();
        async move {
            let mut buf = [0u8; 16];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = closed_tx.send(Instant::now());
        }
    })
    .await;
    let proxy = start_proxy(&one_pool_config(
        &[(upstream.addr, 0)],
        "idle_timeout = \"300ms\"",
    ));

    let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
    // Activity keeps it open well past the timeout.
    let opened = Instant::now();
    let mut quiet_since = opened;
    while opened.elapsed() < Duration::from_millis(900) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.unwrap();
        quiet_since = Instant::now();
    }
    // Then silence closes both sides.
    assert!(is_closed(&mut stream, SOON).await, "client side closed");
    let upstream_closed = tokio::time::timeout(SOON, closed_rx.recv())
        .await
        .expect("upstream side closed")
        .unwrap();
    assert!(
        quiet_since.elapsed() >= Duration::from_millis(280),
        "closed too early: {:?}",
        quiet_since.elapsed()
    );
    assert!(upstream_closed >= quiet_since);
}
