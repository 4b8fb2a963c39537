//! The splice path: bulk transfers switch to zero-copy, stay byte-exact through a
//! half-close, and give every pipe back.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use common::*;
use switchyard::proxy::splice;

/// Deterministic content, so both ends can check every byte without keeping 64 MiB.
fn chunk(seed: u64, index: u64, len: usize) -> Vec<u8> {
    random_bytes(len, seed.wrapping_mul(1_000_003).wrapping_add(index))
}

const CHUNK: usize = 64 * 1024;

async fn send_all(stream: &mut (impl AsyncWriteExt + Unpin), seed: u64, chunks: u64) {
    for i in 0..chunks {
        stream
            .write_all(&chunk(seed, i, CHUNK))
            .await
            .expect("send");
    }
}

/// Reads to EOF, checking every byte against the generator; returns the byte count.
async fn receive_exact(stream: &mut (impl AsyncReadExt + Unpin), seed: u64) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut index = 0u64;
    let mut total = 0u64;
    loop {
        match stream.read_exact(&mut buf).await {
            Ok(_) => {
                assert!(buf == chunk(seed, index, CHUNK), "chunk {index} differs");
                index += 1;
                total += CHUNK as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return total,
            Err(e) => panic!("receive: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_through_splice_with_a_half_close_in_the_middle() {
    const CHUNKS: u64 = 1024; // 64 MiB
    // The upstream reads the client's 64 MiB to EOF, checking it, then sends its own
    // 64 MiB back: the reply flows after the client's half-close.
    let upstream = Server::start(|mut stream: TcpStream| async move {
        let got = receive_exact(&mut stream, 1).await;
        assert_eq!(got, CHUNKS * CHUNK as u64, "upstream received everything");
        send_all(&mut stream, 2, CHUNKS).await;
    })
    .await;
    let proxy = start_proxy(&one_pool_config(&[(upstream.addr, 0)], ""));
    let spliced_before = splice::bytes_spliced();

    let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        send_all(&mut stream, 1, CHUNKS).await;
        stream.shutdown().await.unwrap();
        let got = receive_exact(&mut stream, 2).await;
        assert_eq!(got, CHUNKS * CHUNK as u64, "client received everything");
    })
    .await
    .expect("transfer finished in time");

    let spliced = splice::bytes_spliced() - spliced_before;
    assert!(
        spliced > 100 << 20,
        "only {spliced} of 128 MiB went through splice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipe_pool_returns_to_empty_after_many_connections() {
    let upstream = Server::echo().await;
    let proxy = start_proxy(&one_pool_config(&[(upstream.addr, 0)], ""));
    let addr = proxy.addr("front");
    for round in 0..3u64 {
        let mut clients = JoinSet::new();
        for i in 0..50u64 {
            clients.spawn(async move {
                let stream = TcpStream::connect(addr).await.unwrap();
                let (mut read, mut write) = stream.into_split();
                let writer = tokio::spawn(async move {
                    send_all(&mut write, round * 100 + i, 32).await; // 2 MiB: enough to stream
                    write.shutdown().await.unwrap();
                });
                let got = receive_exact(&mut read, round * 100 + i).await;
                writer.await.unwrap();
                got
            });
        }
        while let Some(got) = clients.join_next().await {
            assert_eq!(got.unwrap(), 32 * CHUNK as u64);
        }
    }
    assert!(splice::bytes_spliced() > 0, "the transfers used splice");
    wait_until(SOON, "every pipe given back", || {
        splice::pipes_in_use() == 0
    })
    .await;
    assert!(splice::pipes_open() <= splice::cap());
}
