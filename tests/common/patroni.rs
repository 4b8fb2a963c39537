//! Nodes in the style of a Patroni cluster on loopback: each on an address of its own
//! (127.0.0.2, 127.0.0.3, ...) with a traffic port that greets `hello <name>` and a
//! REST API on one port shared by every node, answering `GET /primary` with 200 on the
//! leader and 503 elsewhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Largest request the REST API reads.
const MAX_REQUEST: usize = 16 * 1024;

pub struct PatroniNode {
    /// The traffic port.
    pub addr: SocketAddr,
    leader: Arc<AtomicBool>,
}

/// One node per name, the first the leader; returns them and the REST API port.
pub async fn patroni_nodes(names: &[&'static str]) -> (Vec<PatroniNode>, u16) {
    let hosts: Vec<String> = (0..names.len())
        .map(|i| format!("127.0.0.{}", i + 2))
        .collect();
    let (rest, port) = same_port_on(&hosts).await;
    let mut nodes = Vec::new();
    for (i, (name, listener)) in names.iter().zip(rest).enumerate() {
        let leader = Arc::new(AtomicBool::new(i == 0));
        tokio::spawn(rest_api(listener, leader.clone()));
        nodes.push(PatroniNode {
            addr: greeting_server(&hosts[i], name).await,
            leader,
        });
    }
    (nodes, port)
}

/// Makes `nodes[leader]` the leader and every other node a replica.
pub fn fail_over(nodes: &[PatroniNode], leader: usize) {
    for (i, node) in nodes.iter().enumerate() {
        node.leader.store(i == leader, Relaxed);
    }
}

/// A listener on each of `hosts`, all on the same port.
async fn same_port_on(hosts: &[String]) -> (Vec<TcpListener>, u16) {
    'attempt: for _ in 0..100 {
        let first = TcpListener::bind((hosts[0].as_str(), 0))
            .await
            .expect("bind a loopback address");
        let port = first.local_addr().expect("addr").port();
        let mut all = vec![first];
        for host in &hosts[1..] {
            match TcpListener::bind((host.as_str(), port)).await {
                Ok(listener) => all.push(listener),
                Err(_) => continue 'attempt,
            }
        }
        return (all, port);
    }
    panic!("no port free on every one of {hosts:?}");
}

/// One request per connection: `GET /primary` is 200 while `leader` holds, anything
/// else 503, like Patroni's API on a replica.
async fn rest_api(listener: TcpListener, leader: Arc<AtomicBool>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let leader = leader.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
                if request.len() > MAX_REQUEST {
                    return;
                }
            }
            let answer: &[u8] = if request.starts_with(b"GET /primary ") && leader.load(Relaxed) {
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"role\": \"primary\"}"
            } else {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"role\": \"replica\"}"
            };
            let _ = stream.write_all(answer).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// A traffic port on `host` that greets `hello <name>` (what `greeted_by` reads), then
/// echoes.
pub async fn greeting_server(host: &str, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind((host, 0))
        .await
        .expect("bind a traffic port");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if stream
                    .write_all(format!("hello {name}\n").as_bytes())
                    .await
                    .is_ok()
                {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    addr
}
