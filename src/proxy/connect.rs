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
    let mut out_of_resources: Option<(usize, io::Error)> = None;

    loop {
        let may_start = out_of_resources.is_none() && started < order.len();
        let can_hedge = hedge_at.is_some() && may_start;
        tokio::select! {
            finished = in_flight.next() => {
                let Some((upstream, result)) = finished else { break };
                match result {
                    Ok(stream) => {
                        return Ok(Connected { stream, upstream, attempts: started });
                    }
                    Err(Unconnected::LocalResources(error)) => {
                        out_of_resources = Some((upstream, error));
                        if in_flight.is_empty() {
                            break;
                        }
                    }
                    Err(Unconnected::Upstream(reason)) => {
                        let failed = &route.upstreams[upstream];
                        route.feedback.connect_failed(failed.id, &failed.stats, reason);
                        debug!(pool = %config.name, upstream = failed.label(), %reason, "connect attempt failed");
                        last_failure = (upstream, reason);
                        if out_of_resources.is_none() && started < order.len() {
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
    if let Some((upstream, source)) = out_of_resources {
        return Err(ConnectError::LocalResources {
            upstream: route.upstreams[upstream].label().to_string(),
            source,
        });
    }
    Err(ConnectError::Upstreams {
        attempts: started,
        last_upstream: route.upstreams[last_failure.0].label().to_string(),
        last_reason: last_failure.1,
    })
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
