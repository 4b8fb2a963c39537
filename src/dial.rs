//! Opening connections to upstreams, for clients and for health checks alike: TCP with
//! our own shortages told apart from the upstream's failures, tuning, and TLS
//! origination. Below both the proxy and the health checks.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::error::is_local_exhaustion;
use crate::metrics::ConnectFailure;

/// Why a connection to an upstream was not made.
#[derive(Debug)]
pub enum Unconnected {
    /// The upstream refused, reset, was unreachable or too slow: its failure.
    Upstream(ConnectFailure),
    /// We could not even try (see [`is_local_exhaustion`]): says nothing about it.
    LocalResources(io::Error),
}

/// Opens a socket and connects it to `addr` by `deadline`, telling the upstream's
/// failures apart from our own shortages. Shared with the active health checks, which
/// must not blame an upstream for our own shortages either.
pub async fn open(addr: SocketAddr, deadline: Instant) -> Result<TcpStream, Unconnected> {
    let classify = |e: io::Error| {
        if is_local_exhaustion(&e) {
            Unconnected::LocalResources(e)
        } else {
            Unconnected::Upstream(ConnectFailure::from_io(&e))
        }
    };
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(classify)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(classify(e)),
    }
    let stream = TcpStream::from_std(socket.into()).map_err(Unconnected::LocalResources)?;
    let ready =
        match tokio::time::timeout_at(deadline, stream.ready(Interest::WRITABLE | Interest::ERROR))
            .await
        {
            Err(_) => return Err(Unconnected::Upstream(ConnectFailure::Timeout)),
            Ok(Err(e)) => return Err(classify(e)),
            Ok(Ok(ready)) => ready,
        };
    // A connecting socket turns writable only once the handshake is over, one way or
    // the other; the socket's error is asked for only when the event says the
    // connection is closed, which saves tokio's getsockopt(2) on every connect that
    // worked.
    let closed = ready.is_write_closed() || ready.is_read_closed() || ready.is_error();
    if closed && let Some(e) = stream.take_error().map_err(classify)? {
        return Err(classify(e));
    }
    Ok(stream)
}

/// `TCP_NODELAY` and keepalive on a connected socket. Failures are logged, not fatal:
/// a connection without them still works.
pub fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    if let Some(idle) = keepalive {
        let params = TcpKeepalive::new().with_time(idle);
        if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&params) {
            debug!(error = %e, "cannot set TCP keepalive");
        }
    }
}

/// Originates a TLS session to an upstream within `timeout`.
pub async fn tls(
    tls: &crate::tls::ClientTls,
    target: &str,
    upstream: TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let name = tls
        .server_name(target)
        .ok_or_else(|| format!("no valid server name for {target}"))?;
    let connector = TlsConnector::from(tls.config.clone());
    match tokio::time::timeout(timeout, connector.connect(name, upstream)).await {
        Err(_) => Err("TLS handshake timed out".to_string()),
        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
        Ok(Ok(stream)) => Ok(stream),
    }
}
