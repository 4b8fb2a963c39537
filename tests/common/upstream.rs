//! Loopback upstreams: generic servers, a refused port, a black hole, and the greeting
//! upstream that fails on demand (the library's, the one the demo and benches use).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use switchyard::drill::upstream::GreetingUpstream;

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

/// A greeting upstream (`hello <name>\n`, then echo) that can serve, hang, be killed
/// and restarted on the same port, or become a black hole; panics where a test could
/// not go on.
pub struct Backend {
    pub addr: SocketAddr,
    upstream: GreetingUpstream,
}

impl Backend {
    pub async fn start(name: &'static str) -> Self {
        let upstream = GreetingUpstream::start(name).await.expect("start backend");
        Self {
            addr: upstream.addr,
            upstream,
        }
    }

    /// Greets each client only after its first bytes, like a server of a protocol where
    /// the client speaks first.
    pub async fn client_first(name: &'static str) -> Self {
        let upstream = GreetingUpstream::client_first(name)
            .await
            .expect("start backend");
        Self {
            addr: upstream.addr,
            upstream,
        }
    }

    /// Listens again on the same address and serves.
    pub async fn restart(&mut self) {
        self.upstream.restart().await.expect("restart backend");
    }

    /// Closes the listener and every connection, like a process that died; returns
    /// once the port is closed.
    pub async fn kill(&mut self) {
        self.upstream.kill().await;
    }

    /// New and established connections stop being answered.
    pub fn hang(&self) {
        self.upstream.hang();
    }

    /// Stops accepting and fills the accept queue: new connects get no answer at all.
    pub async fn black_hole(&mut self) {
        self.upstream.black_hole().await.expect("black hole");
    }
}
