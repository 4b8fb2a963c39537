//! Listening sockets and the accept loop.
//!
//! Sockets are created through socket2 so that backlog, `SO_REUSEADDR` and v6-only are
//! explicit. The accept loop never exits on an accept error: running out of file
//! descriptors or memory is a reason to back off and retry, not to stop serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::config::ListenerConfig;
use crate::error::StartError;
use crate::metrics::ListenerStats;
use crate::shutdown::Shutdown;
use crate::snapshot::SharedSnapshot;

const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_millis(250);

/// A listener's sockets, bound and listening, not yet accepting.
#[derive(Debug)]
pub struct BoundListener {
    pub config: ListenerConfig,
    pub sockets: Vec<TcpListener>,
}

/// What every connection of one listener shares.
#[derive(Debug)]
pub struct ListenerContext {
    pub name: String,
    pub pool: String,
    pub stats: Arc<ListenerStats>,
    /// `None` = unlimited.
    pub(crate) limit: Option<Arc<Semaphore>>,
    pub(crate) snapshot: SharedSnapshot,
}

// === impl BoundListener ===

impl BoundListener {
    /// Binds every address of `config`; the first failure is returned and the sockets
    /// bound so far are closed. Needs a running tokio runtime.
    pub fn bind(config: &ListenerConfig) -> Result<Self, StartError> {
        let sockets = config
            .binds
            .iter()
            .map(|&addr| {
                bind_socket(addr, config.backlog).map_err(|source| StartError::Bind {
                    listener: config.name.clone(),
                    addr,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config: config.clone(),
            sockets,
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

fn bind_socket(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Restarting must not wait for TIME_WAIT sockets of the previous process.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // `[::]` and `0.0.0.0` are separate binds in our config; without v6-only the
        // second one would fail with "address in use".
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(socket.into())
}

// === impl ListenerContext ===

impl ListenerContext {
    pub fn new(config: &ListenerConfig, snapshot: SharedSnapshot) -> Self {
        Self {
            name: config.name.clone(),
            pool: config.pool.clone(),
            stats: Arc::default(),
            limit: config
                .max_connections
                .map(|max| Arc::new(Semaphore::new(max.get()))),
            snapshot,
        }
    }
}

/// Accepts until shutdown begins. Each admitted client is served on its own task.
pub(crate) async fn accept_loop(
    socket: TcpListener,
    context: Arc<ListenerContext>,
    shutdown: Shutdown,
) {
    let local = socket.local_addr().ok();
    let mut backoff = MIN_ACCEPT_BACKOFF;
    let mut failures_in_a_row = 0u64;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.stopping() => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if failures_in_a_row > 0 {
                    info!(listener = %context.name, failures = failures_in_a_row, "accepting again");
                    failures_in_a_row = 0;
                    backoff = MIN_ACCEPT_BACKOFF;
                }
                admit(stream, peer, &context, &shutdown);
            }
            Err(e) if is_client_gone(&e) => {
                debug!(listener = %context.name, error = %e, "client left before accept");
            }
            Err(e) => {
                if failures_in_a_row == 0 {
                    warn!(listener = %context.name, error = %e, "accept failed; backing off until it succeeds");
                }
                failures_in_a_row += 1;
                tokio::select! {
                    _ = shutdown.stopping() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
    debug!(listener = %context.name, addr = ?local, "stopped accepting");
}

fn admit(stream: TcpStream, peer: SocketAddr, context: &Arc<ListenerContext>, shutdown: &Shutdown) {
    use std::sync::atomic::Ordering::Relaxed;
    context.stats.connections_total.fetch_add(1, Relaxed);
    let permit = match &context.limit {
        None => None,
        Some(limit) => match limit.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                context.stats.rejected_max_connections.fetch_add(1, Relaxed);
                debug!(listener = %context.name, client = %peer, "max_connections reached; closing client");
                return;
            }
        },
    };
    let context = context.clone();
    let task_shutdown = shutdown.clone();
    shutdown.connections().spawn(async move {
        super::serve(stream, peer, &context, &task_shutdown).await;
        drop(permit);
    });
}

/// Errors that concern one client only; the listener itself is fine.
fn is_client_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || e.raw_os_error() == Some(libc::EPROTO)
        || e.raw_os_error() == Some(libc::EPERM)
}
