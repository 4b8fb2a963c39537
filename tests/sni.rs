//! SNI passthrough routing (SPEC §8): the ClientHello is peeked, the pool chosen by its
//! server name, and the bytes forwarded unchanged.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use common::*;
use switchyard::metrics::RejectReason;

/// A minimal TLS 1.3-style ClientHello carrying `name` as its server name.
fn client_hello(name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes()); // server_name_list
    sni.push(0); // host_name
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut extensions = Vec::new();
    extensions.extend_from_slice(&[0, 0]); // server_name
    extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    extensions.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

async fn recording_upstream() -> (Server, mpsc::UnboundedReceiver<Vec<u8>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = Server::start(move |mut stream: TcpStream| {
        let tx = tx.clone();
        async move {
            let mut all = Vec::new();
            let _ = stream.read_to_end(&mut all).await;
            let _ = tx.send(all);
        }
    })
    .await;
    (server, rx)
}

fn config(a: SocketAddr, b: SocketAddr, default: Option<SocketAddr>) -> String {
    let mut text =
        String::from("[listeners.front]\nbind = \"127.0.0.1:0\"\nhandshake_timeout = \"500ms\"\n");
    if default.is_some() {
        text.push_str("pool = \"fallback\"\n");
    }
    text.push_str(
        "\n[listeners.front.routes]\n\"a.example.com\" = \"pa\"\n\"*.example.org\" = \"pb\"\n\n",
    );
    let mut pools = vec![("pa", a), ("pb", b)];
    if let Some(c) = default {
        pools.push(("fallback", c));
    }
    for (name, addr) in pools {
        text.push_str(&format!("[pools.{name}]\nupstreams = [{{ address = \"{addr}\" }}]\n[pools.{name}.health]\nenabled = false\n\n"));
    }
    text
}

/// Sends a ClientHello (plus more bytes) and closes; returns what the upstream got.
async fn send_hello(front: SocketAddr, name: &str) -> Vec<u8> {
    let mut client = TcpStream::connect(front).await.unwrap();
    let mut bytes = client_hello(name);
    bytes.extend_from_slice(b"then application data");
    client.write_all(&bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest).await;
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_server_name_and_forwards_the_client_hello_unchanged() {
    let (a, mut got_a) = recording_upstream().await;
    let (b, mut got_b) = recording_upstream().await;
    let (c, mut got_c) = recording_upstream().await;
    let proxy = start_proxy(&config(a.addr, b.addr, Some(c.addr)));
    let front = proxy.addr("front");

    let sent = send_hello(front, "a.example.com").await;
    assert_eq!(
        tokio::time::timeout(SOON, got_a.recv())
            .await
            .unwrap()
            .unwrap(),
        sent,
        "byte-identical at pool pa"
    );

    let sent = send_hello(front, "B.Example.ORG").await;
    assert_eq!(
        tokio::time::timeout(SOON, got_b.recv())
            .await
            .unwrap()
            .unwrap(),
        sent,
        "wildcard, case-insensitive"
    );

    for unmatched in ["b.example.com", "x.y.example.org", "example.org"] {
        let sent = send_hello(front, unmatched).await;
        assert_eq!(
            tokio::time::timeout(SOON, got_c.recv())
                .await
                .unwrap()
                .unwrap(),
            sent,
            "{unmatched}: default pool"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_names_without_a_default_pool_and_non_tls_clients_are_closed() {
    let (a, _got_a) = recording_upstream().await;
    let (b, _got_b) = recording_upstream().await;
    let proxy = start_proxy(&config(a.addr, b.addr, None));
    let front = proxy.addr("front");
    let stats = proxy.proxy.listener("front").unwrap().context.stats.clone();

    let mut client = TcpStream::connect(front).await.unwrap();
    client
        .write_all(&client_hello("nobody.example.net"))
        .await
        .unwrap();
    assert!(is_closed(&mut client, SOON).await);
    wait_until(SOON, "no_route counted", || {
        stats.rejected(RejectReason::NoRoute) == 1
    })
    .await;

    let mut client = TcpStream::connect(front).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        .await
        .unwrap();
    assert!(is_closed(&mut client, SOON).await);
    wait_until(SOON, "client_hello counted", || {
        stats.rejected(RejectReason::ClientHello) == 1
    })
    .await;

    // Half a hello, then silence: handshake_timeout.
    let mut client = TcpStream::connect(front).await.unwrap();
    client
        .write_all(&client_hello("a.example.com")[..20])
        .await
        .unwrap();
    assert!(is_closed(&mut client, SOON).await);
    wait_until(SOON, "timeout counted", || {
        stats.rejected(RejectReason::HandshakeTimeout) == 1
    })
    .await;

    let route = proxy.proxy.snapshot.load().pool("pa").unwrap().clone();
    assert_eq!(route.upstreams[0].stats.connections_total.load(Relaxed), 0);
}

#[test]
fn check_rejects_bad_route_patterns_and_unknown_pools() {
    let text = "[listeners.front]\nbind = \"127.0.0.1:0\"\n\n[listeners.front.routes]\n\"a.*.com\" = \"pa\"\n\"b.example.com\" = \"nope\"\n\n[pools.pa]\nupstreams = [{ address = \"127.0.0.1:1\" }]\n";
    let err = switchyard::config::Config::parse(text, std::path::Path::new("t.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t.toml:5:1: listeners.front.routes.a.*.com"),
        "{err}"
    );
    assert!(err.contains("pool \"nope\" is not defined"), "{err}");
}
