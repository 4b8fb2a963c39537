//! PROXY protocol (SPEC §8): headers sent to upstreams hold the bytes the protocol text
//! prescribes and read back with the `ppp` crate, headers from clients are checked and
//! their trailing bytes forwarded, and bad, slow or untrusted headers close that client
//! only.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use common::*;
use switchyard::metrics::RejectReason;

/// An upstream that reports everything each connection sent (to EOF), then closes.
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

fn config(upstream: SocketAddr, listener_extra: &str, pool_extra: &str) -> String {
    one_pool_config(&[(upstream, 0)], pool_extra).replace(
        "pool = \"p\"\n\n[pools.p]",
        &format!("pool = \"p\"\n{listener_extra}\n\n[pools.p]"),
    )
}

/// Splits what an upstream received into the parsed header's addresses and the rest.
fn parse_with_ppp(received: &[u8]) -> (Option<(SocketAddr, SocketAddr)>, bool, Vec<u8>) {
    match ppp::HeaderResult::parse(received) {
        ppp::HeaderResult::V1(Ok(header)) => {
            let rest = received[header.header.len()..].to_vec();
            let addresses = match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Unknown => None,
            };
            (addresses, false, rest)
        }
        ppp::HeaderResult::V2(Ok(header)) => {
            let rest = received[header.header.len()..].to_vec();
            let local = header.command == ppp::v2::Command::Local;
            let addresses = match header.addresses {
                ppp::v2::Addresses::IPv4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v2::Addresses::IPv6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                _ => None,
            };
            (addresses, local, rest)
        }
        other => panic!("the upstream did not receive a valid PROXY header: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_sent_to_upstreams_are_accepted_by_an_independent_parser() {
    for version in ["v1", "v2"] {
        let (upstream, mut received) = recording_upstream().await;
        let proxy = start_proxy(&config(
            upstream.addr,
            "",
            &format!("proxy_protocol = \"{version}\""),
        ));
        let front = proxy.addr("front");
        let mut client = TcpStream::connect(front).await.unwrap();
        let client_addr = client.local_addr().unwrap();
        client.write_all(b"hello upstream").await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();

        let got = tokio::time::timeout(SOON, received.recv())
            .await
            .unwrap()
            .unwrap();
        let expected = header_bytes(version, client_addr, front);
        assert_eq!(
            got.get(..expected.len()),
            Some(&expected[..]),
            "{version}: the header's exact bytes"
        );
        let (addresses, local, payload) = parse_with_ppp(&got);
        assert!(!local);
        assert_eq!(
            addresses,
            Some((client_addr, front)),
            "{version}: the client's real address"
        );
        assert_eq!(
            payload, b"hello upstream",
            "{version}: payload after the header, intact"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_header_is_consumed_its_trailing_bytes_forwarded_and_its_address_passed_on() {
    let (upstream, mut received) = recording_upstream().await;
    let proxy = start_proxy(&config(
        upstream.addr,
        "accept_proxy_protocol = \"any\"\nproxy_protocol_from = [\"127.0.0.0/8\"]",
        "proxy_protocol = \"v2\"",
    ));
    for header in [
        b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n".to_vec(),
        ppp_v2_tcp4(),
    ] {
        let mut client = TcpStream::connect(proxy.addr("front")).await.unwrap();
        // Header and the first payload bytes in one write: nothing may be lost.
        let mut first = header.clone();
        first.extend_from_slice(b"early bytes");
        client.write_all(&first).await.unwrap();
        client.write_all(b" and later ones").await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();

        let got = tokio::time::timeout(SOON, received.recv())
            .await
            .unwrap()
            .unwrap();
        let (addresses, _, payload) = parse_with_ppp(&got);
        let (source, destination) = addresses.expect("addresses passed on");
        assert_eq!(source, "203.0.113.7:4242".parse().unwrap());
        assert_eq!(destination, "198.51.100.1:443".parse().unwrap());
        assert_eq!(payload, b"early bytes and later ones");
    }
}

/// A TCP-over-IPv4 header written out by hand from the protocol text (sections 2.1 and 2.2),
/// not by the encoder under test.
fn header_bytes(version: &str, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (source, destination) else {
        panic!("loopback test addresses are IPv4");
    };
    if version == "v1" {
        let (sp, dp) = (s.port(), d.port());
        return format!("PROXY TCP4 {} {} {sp} {dp}\r\n", s.ip(), d.ip()).into_bytes();
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

/// A v2 PROXY TCP4 header for 203.0.113.7:4242 -> 198.51.100.1:443.
fn ppp_v2_tcp4() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&[203, 0, 113, 7, 198, 51, 100, 1]);
    h.extend_from_slice(&4242u16.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_slow_and_untrusted_headers_close_that_client_only() {
    let upstream = Server::echo().await;
    let proxy = start_proxy(&config(
        upstream.addr,
        "accept_proxy_protocol = \"v1\"\nhandshake_timeout = \"300ms\"",
        "",
    ));
    let front = proxy.addr("front");
    let stats = proxy.proxy.listener("front").unwrap().context.stats.clone();

    let cases: [(&[u8], RejectReason); 3] = [
        (
            b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\n",
            RejectReason::ProxyProtocol,
        ),
        (&[b'P'; 300], RejectReason::ProxyProtocol),
        (b"PROXY TCP4 10.0.0.1 10.0", RejectReason::HandshakeTimeout),
    ];
    for (bytes, reason) in cases {
        let before = stats.rejected(reason);
        let mut client = TcpStream::connect(front).await.unwrap();
        let _ = client.write_all(bytes).await;
        assert!(is_closed(&mut client, SOON).await, "{reason:?}: closed");
        wait_until(SOON, "counted", || stats.rejected(reason) == before + 1).await;
    }
    // A good client at the same time is unaffected.
    let mut good = TcpStream::connect(front).await.unwrap();
    good.write_all(b"PROXY TCP4 10.1.1.1 10.2.2.2 1000 2000\r\nping")
        .await
        .unwrap();
    let mut back = [0u8; 4];
    good.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");

    let untrusted = start_proxy(&config(
        upstream.addr,
        "accept_proxy_protocol = \"any\"\nproxy_protocol_from = [\"10.0.0.0/8\"]",
        "",
    ));
    let mut client = TcpStream::connect(untrusted.addr("front")).await.unwrap();
    let _ = client
        .write_all(b"PROXY TCP4 10.1.1.1 10.2.2.2 1000 2000\r\n")
        .await;
    assert!(is_closed(&mut client, SOON).await);
    let stats = untrusted
        .proxy
        .listener("front")
        .unwrap()
        .context
        .stats
        .clone();
    wait_until(SOON, "untrusted counted", || {
        stats.rejected(RejectReason::UntrustedProxy) == 1
    })
    .await;
    let route = untrusted.proxy.snapshot.load().pool("p").unwrap().clone();
    assert_eq!(route.upstreams[0].stats.connections_total.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_send_a_local_header_first() {
    for version in ["v1", "v2"] {
        // The upstream answers only after a valid PROXY header without client address.
        let (tx, mut seen) = mpsc::unbounded_channel();
        let upstream = Server::start(move |mut stream: TcpStream| {
            let tx = tx.clone();
            async move {
                let mut buf = vec![0u8; 256];
                let mut got = 0;
                loop {
                    let Ok(n) = stream.read(&mut buf[got..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got += n;
                    if let ppp::HeaderResult::V1(Ok(_)) | ppp::HeaderResult::V2(Ok(_)) =
                        ppp::HeaderResult::parse(&buf[..got])
                    {
                        let (addresses, local, _) = parse_with_ppp(&buf[..got]);
                        let _ = tx.send((addresses, local));
                        let _ = stream.write_all(b"ready\n").await;
                        return;
                    }
                }
            }
        })
        .await;
        let health =
            "[pools.p.health]\ninterval = \"200ms\"\ntimeout = \"500ms\"\nexpect = \"ready\"\n";
        let text = config(
            upstream.addr,
            "",
            &format!("proxy_protocol = \"{version}\""),
        )
        .replace("[pools.p.health]\nenabled = false\n", health);
        let proxy = start_proxy(&text);
        let (addresses, local) = tokio::time::timeout(SOON, seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(addresses, None, "{version}: no client address on a check");
        assert_eq!(local, version == "v2", "{version}: v2 LOCAL / v1 UNKNOWN");
        wait_first_checks(&proxy).await;
        assert!(
            proxy.proxy.events.all().is_empty(),
            "{version}: the check passed, nothing went down"
        );
    }
}
