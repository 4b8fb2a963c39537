//! Connecting a client to an upstream: attempts in the order `pool::attempt_order`
//! gives, each bounded by `connect_timeout`, with optional hedging.
//!
//! Every failed attempt is classified and counted against its upstream; the client sees
//! nothing of it unless every attempt fails.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use crate::error::ConnectError;
use crate::metrics::ConnectFailure;
use crate::snapshot::PoolRoute;

type Attempt = Pin<Box<dyn Future<Output = (usize, Result<TcpStream, ConnectFailure>)> + Send>>;

/// A connected upstream.
#[derive(Debug)]
pub struct Connected {
    pub stream: TcpStream,
    /// Index into `route.upstreams`.
    pub upstream: usize,
    /// How many entries of the order were used (tried or cancelled).
    pub attempts: usize,
}

/// Tries `order` (indices into `route.upstreams`) until one connects. Failures are
/// reported here; success is the caller's to report, once the upstream proved alive.
pub async fn connect(route: &PoolRoute, order: &[usize]) -> Result<Connected, ConnectError> {
    let config = &route.config;
    let start = |i: usize| -> Attempt {
        let upstream = order[i];
        let addr = route.upstreams[upstream].config.address;
        let timeout = config.connect_timeout;
        let keepalive = config.tcp_keepalive;
        Box::pin(async move { (upstream, attempt(addr, timeout, keepalive).await) })
    };

    let mut in_flight = FuturesUnordered::new();
    in_flight.push(start(0));
    let mut started = 1;
    let mut hedge_at = config.hedge_after.map(|d| Instant::now() + d);
    let mut last_failure = (order[0], ConnectFailure::Error);

    loop {
        let can_hedge = hedge_at.is_some() && started < order.len();
        tokio::select! {
            finished = in_flight.next() => {
                let Some((upstream, result)) = finished else { break };
                match result {
                    Ok(stream) => {
                        return Ok(Connected { stream, upstream, attempts: started });
                    }
                    Err(reason) => {
                        let failed = &route.upstreams[upstream];
                        route.feedback.connect_failed(failed, reason);
                        debug!(pool = %config.name, upstream = failed.label(), %reason, "connect attempt failed");
                        last_failure = (upstream, reason);
                        if started < order.len() {
                            in_flight.push(start(started));
                            started += 1;
                            hedge_at = config.hedge_after.map(|d| Instant::now() + d);
                        } else if in_flight.is_empty() {
                            break;
                        }
                    }
                }
            }
            _ = sleep_until(hedge_at.unwrap_or_else(Instant::now)), if can_hedge => {
                route.feedback.slow(&route.upstreams[order[started - 1]]);
                in_flight.push(start(started));
                started += 1;
                hedge_at = config.hedge_after.map(|d| Instant::now() + d);
            }
        }
    }
    Err(ConnectError {
        attempts: started,
        last_upstream: route.upstreams[last_failure.0].label().to_string(),
        last_reason: last_failure.1,
    })
}

async fn attempt(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Option<Duration>,
) -> Result<TcpStream, ConnectFailure> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| ConnectFailure::from_io(&e))?;
    let stream = match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Err(_) => return Err(ConnectFailure::Timeout),
        Ok(Err(e)) => return Err(ConnectFailure::from_io(&e)),
        Ok(Ok(stream)) => stream,
    };
    tune(&stream, keepalive);
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
