//! The greeting upstream: answers each connection with `hello <name>\n`, then echoes,
//! and fails on demand the three ways a failover has to handle (it dies, it hangs, it
//! stops answering SYNs).
//!
//! It lives in the library, not among the test fixtures, because the demo ships with
//! it; the tests and the failover bench use this same one, so what the demo shows and
//! what they measure is the same upstream.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;

/// Large enough for bursts of clients (an overflow drops SYNs and stalls a connect for
/// a second), small enough to fill quickly for a black hole.
pub const DEFAULT_BACKLOG: i32 = 128;

/// A connect that takes this long on loopback is not going to be accepted: the queue
/// is full.
const FILL_PROBE_TIMEOUT: Duration = Duration::from_millis(100);

/// A loopback upstream; dropping it closes its listener and every connection.
pub struct GreetingUpstream {
    name: String,
    /// Port 0 until the first start; the same port on every restart.
    pub addr: SocketAddr,
    backlog: i32,
    /// Greets only once the client has sent something (as PostgreSQL, Redis and HTTP
    /// servers answer only a client that spoke).
    client_first: bool,
    hung: Arc<AtomicBool>,
    /// Cancelled to stop accepting while keeping the listener (a black hole).
    accepting: CancellationToken,
    tasks: JoinSet<()>,
    /// Connections that fill the accept queue of a black hole.
    fillers: Vec<TcpStream>,
}

/// Writes the greeting `hello <name>\n`, then echoes until EOF or an error.
pub async fn greet_and_echo<S>(stream: S, name: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    greet_then_echo(stream, name, &AtomicBool::new(false), false).await;
}

/// Like [`greet_and_echo`], but goes silent (and keeps the connection) as soon as
/// `hung` is set, before the greeting or between reads. With `client_first`, waits for
/// the client's first bytes (and takes them) before greeting.
async fn greet_then_echo<S>(mut stream: S, name: &str, hung: &AtomicBool, client_first: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if hung.load(SeqCst) {
        return std::future::pending().await;
    }
    let mut buf = vec![0u8; 16 * 1024];
    if client_first {
        if matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {
            return;
        }
        if hung.load(SeqCst) {
            return std::future::pending().await;
        }
    }
    if stream
        .write_all(format!("hello {name}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if hung.load(SeqCst) {
            return std::future::pending().await;
        }
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// === impl GreetingUpstream ===

impl GreetingUpstream {
    /// Serves on a fresh loopback port with [`DEFAULT_BACKLOG`].
    pub async fn start(name: &str) -> io::Result<Self> {
        Self::start_with_backlog(name, DEFAULT_BACKLOG).await
    }

    /// Serves on a fresh loopback port, greeting each client only after its first
    /// bytes: a protocol where the client speaks first, for clients with
    /// [`ClientStream::speaks_first`](super::ClientStream::speaks_first).
    pub async fn client_first(name: &str) -> io::Result<Self> {
        Self::open(name, DEFAULT_BACKLOG, true).await
    }

    /// [`client_first`](Self::client_first) with an accept queue of `backlog`.
    pub async fn client_first_with_backlog(name: &str, backlog: i32) -> io::Result<Self> {
        Self::open(name, backlog, true).await
    }

    /// Serves on a fresh loopback port; `backlog` bounds the accept queue, which a
    /// [`black_hole`](Self::black_hole) has to fill.
    pub async fn start_with_backlog(name: &str, backlog: i32) -> io::Result<Self> {
        Self::open(name, backlog, false).await
    }

    async fn open(name: &str, backlog: i32, client_first: bool) -> io::Result<Self> {
        let mut upstream = Self {
            name: name.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            backlog,
            client_first,
            hung: Arc::default(),
            accepting: CancellationToken::new(),
            tasks: JoinSet::new(),
            fillers: Vec::new(),
        };
        upstream.restart().await?;
        Ok(upstream)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Listens again on the same address (a fresh port the first time) and serves.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.kill().await;
        let listener = self.listen().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("upstream {} cannot listen on {}: {e}", self.name, self.addr),
            )
        })?;
        self.addr = listener.local_addr()?;
        self.hung.store(false, SeqCst);
        self.accepting = CancellationToken::new();
        let listener = TcpListener::from_std(listener)?;
        let (name, hung, accepting) =
            (self.name.clone(), self.hung.clone(), self.accepting.clone());
        let client_first = self.client_first;
        self.tasks.spawn(async move {
            let name: Arc<str> = name.into();
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    biased;
                    () = accepting.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let (name, hung) = (name.clone(), hung.clone());
                            connections.spawn(async move {
                                greet_then_echo(stream, &name, &hung, client_first).await;
                            });
                        }
                        // Out of descriptors and the like: try again, not in a hot loop.
                        Err(_) => sleep(Duration::from_millis(1)).await,
                    },
                }
                while connections.try_join_next().is_some() {}
            }
            // A black hole: the listener stays open but nobody accepts, so the kernel
            // queues connections until the queue is full and then drops SYNs; the
            // established connections stay open and silent.
            std::future::pending::<()>().await;
            drop((listener, connections));
        });
        Ok(())
    }

    fn listen(&self) -> io::Result<std::net::TcpListener> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(self.addr), Type::STREAM, None)?;
        // The restarted upstream takes its old port back at once, TIME_WAIT or not.
        socket.set_reuse_address(true)?;
        socket.bind(&self.addr.into())?;
        socket.listen(self.backlog)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    }

    /// Closes the listener and every connection, like a process that died; returns
    /// once the port is closed.
    pub async fn kill(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.fillers.clear();
    }

    /// New and established connections stop being answered.
    pub fn hang(&self) {
        self.hung.store(true, SeqCst);
    }

    /// Stops accepting (established connections go silent) and fills the accept queue,
    /// so that new SYNs are dropped and connects time out.
    pub async fn black_hole(&mut self) -> io::Result<()> {
        self.hang();
        self.accepting.cancel();
        // The kernel queues up to backlog + 1 connections, plus some in SYN-RECV.
        let most = 4 * usize::try_from(self.backlog.max(1)).unwrap_or(1) + 16;
        let mut probe = FILL_PROBE_TIMEOUT;
        while self.fillers.len() < most {
            match timeout(probe, TcpStream::connect(self.addr)).await {
                Ok(Ok(stream)) => {
                    self.fillers.push(stream);
                    probe = FILL_PROBE_TIMEOUT;
                }
                Ok(Err(e)) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("black hole: connect to {}: {e}", self.name),
                    ));
                }
                // Not even the handshake: the queue is full, unless this machine was
                // merely slow; a second, longer probe tells which.
                Err(_) if probe == FILL_PROBE_TIMEOUT => probe = 3 * FILL_PROBE_TIMEOUT,
                Err(_) => return Ok(()),
            }
        }
        Err(io::Error::other(format!(
            "black hole: the accept queue of {} still takes connections after {}",
            self.name,
            self.fillers.len()
        )))
    }
}

impl Drop for GreetingUpstream {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}
