//! Connecting a client to an upstream: attempts in the order `pool::attempt_order`
//! gives, each bounded by `connect_timeout`, with optional hedging.
//!
//! Every failed attempt is classified and counted against its upstream; the client sees
//! nothing of it unless every attempt fails. An attempt that fails on our side (no
//! descriptor, memory or port to open it with) is nobody's fault but ours: it is not
//! counted against the upstream and no further attempt is started.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use crate::dial::{Unconnected, open, tune};
use crate::error::ConnectError;
use crate::metrics::ConnectFailure;
use crate::snapshot::PoolRoute;

type Attempt = Pin<Box<dyn Future<Output = (usize, Result<TcpStream, Unconnected>)> + Send>>;

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
    if route.config.hedge_after.is_none() {
        return connect_in_turn(route, order).await;
    }
    connect_hedged(route, order).await
}

/// Without hedging, one attempt at a time: no set of attempts in flight to allocate for
/// every client.
async fn connect_in_turn(route: &PoolRoute, order: &[usize]) -> Result<Connected, ConnectError> {
    let config = &route.config;
    let mut last_failure = (order[0], ConnectFailure::Error);
    for (tried, &upstream) in order.iter().enumerate() {
        let addr = route.upstreams[upstream].config.address;
        // Boxed: the connection's task would otherwise keep room for it while it copies.
        let result = Box::pin(attempt(addr, config.connect_timeout, config.tcp_keepalive)).await;
        match result {
            Ok(stream) => {
                return Ok(Connected {
                    stream,
                    upstream,
                    attempts: tried + 1,
                });
            }
            Err(Unconnected::LocalResources(source)) => {
                return Err(out_of_resources(route, upstream, source));
            }
            Err(Unconnected::Upstream(reason)) => {
                failed(route, upstream, reason);
                last_failure = (upstream, reason);
            }
        }
    }
    Err(every_attempt_failed(route, order.len(), last_failure))
}

/// With `hedge_after`: a slow attempt gets company from the next upstream's, and the
/// first to connect wins.
async fn connect_hedged(route: &PoolRoute, order: &[usize]) -> Result<Connected, ConnectError> {
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
    // Once our own resources ran out, every further attempt would fail the same way:
    // none is started; attempts already in flight may still connect.
    let mut shortage: Option<(usize, io::Error)> = None;

    loop {
        let may_start = shortage.is_none() && started < order.len();
        let can_hedge = hedge_at.is_some() && may_start;
        tokio::select! {
            finished = in_flight.next() => {
                let Some((upstream, result)) = finished else { break };
                match result {
                    Ok(stream) => {
                        return Ok(Connected { stream, upstream, attempts: started });
                    }
                    Err(Unconnected::LocalResources(error)) => {
                        shortage = Some((upstream, error));
                        if in_flight.is_empty() {
                            break;
                        }
                    }
                    Err(Unconnected::Upstream(reason)) => {
                        failed(route, upstream, reason);
                        last_failure = (upstream, reason);
                        if shortage.is_none() && started < order.len() {
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
                route.feedback.slow(route.upstreams[order[started - 1]].id);
                in_flight.push(start(started));
                started += 1;
                hedge_at = config.hedge_after.map(|d| Instant::now() + d);
            }
        }
    }
    if let Some((upstream, source)) = shortage {
        return Err(out_of_resources(route, upstream, source));
    }
    Err(every_attempt_failed(route, started, last_failure))
}

/// Counts a failed attempt against its upstream.
fn failed(route: &PoolRoute, upstream: usize, reason: ConnectFailure) {
    let failed = &route.upstreams[upstream];
    route
        .feedback
        .connect_failed(failed.id, &failed.stats, reason);
    debug!(pool = %route.config.name, upstream = failed.label(), %reason, "connect attempt failed");
}

fn out_of_resources(route: &PoolRoute, upstream: usize, source: io::Error) -> ConnectError {
    ConnectError::LocalResources {
        upstream: route.upstreams[upstream].label().to_string(),
        source,
    }
}

fn every_attempt_failed(
    route: &PoolRoute,
    attempts: usize,
    (last, reason): (usize, ConnectFailure),
) -> ConnectError {
    ConnectError::Upstreams {
        attempts,
        last_upstream: route.upstreams[last].label().to_string(),
        last_reason: reason,
    }
}

async fn attempt(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Option<Duration>,
) -> Result<TcpStream, Unconnected> {
    let stream = open(addr, Instant::now() + timeout).await?;
    tune(&stream, keepalive);
    Ok(stream)
}
