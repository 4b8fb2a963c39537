//! The hot path: one task per client connection, from routing to the end of the copy.
//!
//! A connection loads the routing snapshot once, connects, then keeps only the chosen
//! upstream's shared counters; the snapshot is dropped before the copy so that a
//! connection open for hours never pins old routing state.

pub mod access;
pub mod connect;
pub mod copy;
pub mod listener;
pub mod proxy_protocol;
pub mod sni;
pub mod splice;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use socket2::SockRef;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info};

use crate::metrics::{ConnectFailure, RejectReason};
use crate::pool::attempt_order;
use crate::shutdown::Shutdown;
use crate::snapshot::Upstream;
use copy::{CopyEnd, Counters};
use listener::ListenerContext;
use tokio_util::sync::CancellationToken;

/// Decrements a gauge when the connection ends, however it ends.
struct Active<'a>(&'a AtomicU64);

impl<'a> Active<'a> {
    fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Relaxed);
        Self(gauge)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    context: &ListenerContext,
    shutdown: &Shutdown,
) {
    let span = tracing::debug_span!(
        "conn",
        listener = %context.name,
        client.addr = %peer,
        upstream = tracing::field::Empty,
    );
    async {
        let _active = Active::enter(&context.stats.connections_active);
        loop {
            let Some(link) = connect_client(&client, peer, context, shutdown).await else {
                return;
            };
            let upstream = &link.upstream;
            tracing::Span::current().record("upstream", upstream.label());
            upstream.stats.connections_total.fetch_add(1, Relaxed);
            let _upstream_active = Active::enter(&upstream.stats.connections_active);
            let outcome = copy::copy_bidirectional(
                &client,
                &link.stream,
                link.idle_timeout,
                Counters {
                    listener: &context.stats.bytes_in,
                    upstream: &upstream.stats.bytes_sent,
                },
                Counters {
                    listener: &context.stats.bytes_out,
                    upstream: &upstream.stats.bytes_received,
                },
                true,
                async {
                    tokio::select! {
                        _ = shutdown.force_closed() => {}
                        _ = link.close.cancelled() => {}
                    }
                },
            )
            .await;
            debug!(
                upstream = upstream.label(),
                end = ?outcome.end,
                sent = outcome.client_to_upstream,
                received = outcome.upstream_to_client,
                "upstream connection closed"
            );
            // Closed because its upstream was marked down before a byte flowed either
            // way (a hung server that accepts and never answers): nothing was lost, so
            // the client moves to another upstream instead of seeing an error.
            let silent = outcome.client_to_upstream == 0 && outcome.upstream_to_client == 0;
            let moved_by_failover = outcome.end == CopyEnd::Closed
                && link.close.is_cancelled()
                && !shutdown.is_force_closed();
            if !(silent && moved_by_failover) {
                return;
            }
            debug!(
                upstream = upstream.label(),
                "upstream went down before any byte; reconnecting the client"
            );
        }
    }
    .instrument(span)
    .await
}

/// A client's connection to one upstream, and what its copy needs.
struct Link {
    stream: TcpStream,
    upstream: Arc<Upstream>,
    /// Cancelled when the upstream's connections must close (down, maint, drain).
    close: CancellationToken,
    idle_timeout: Option<Duration>,
}

/// Routes and connects one client: attempts in the pool's order, each failure counted
/// against its upstream and invisible to the client. `None` when the client must be
/// closed (nothing usable, every attempt failed, or shutdown).
async fn connect_client(
    client: &TcpStream,
    peer: SocketAddr,
    context: &ListenerContext,
    shutdown: &Shutdown,
) -> Option<Link> {
    let route = context
        .snapshot
        .load()
        .route_for_listener(&context.name)
        .cloned();
    let Some(route) = route else {
        // Only for a connection accepted just before a reload removed its listener.
        context.stats.connections_failed.fetch_add(1, Relaxed);
        return None;
    };
    let order = attempt_order(&route, peer.ip());
    if order.is_empty() {
        context.stats.reject(RejectReason::NoUpstream);
        debug!("no usable upstream and when_all_down = reject; closing client");
        return None;
    }
    let connect_started = tokio::time::Instant::now();
    let mut remaining = order.as_slice();
    loop {
        let connected = tokio::select! {
            connected = connect::connect(&route, remaining) => connected,
            _ = shutdown.force_closed() => return None,
        };
        let connected = match connected {
            Ok(connected) => connected,
            Err(e) => {
                context.stats.connections_failed.fetch_add(1, Relaxed);
                info!(pool = %route.config.name, error = %e, "client closed: no upstream could be reached");
                return None;
            }
        };
        let index = connected.upstream;
        if !upstream_gone_first(client, &connected.stream, route.config.connect_timeout).await {
            route.feedback.connect_succeeded(&route.upstreams[index]);
            route
                .stats
                .connect_seconds
                .observe(connect_started.elapsed());
            // The route is dropped here: a connection open for hours must not pin it.
            return Some(Link {
                stream: connected.stream,
                upstream: route.upstreams[index].clone(),
                close: route.closers[index].token(),
                idle_timeout: route.config.idle_timeout,
            });
        }
        // Accepted and closed before a byte flowed either way (a server dying with
        // connections in its accept queue): a failed attempt, invisible to the client.
        let failed = &route.upstreams[index];
        route.feedback.connect_failed(failed, ConnectFailure::Reset);
        debug!(
            upstream = failed.label(),
            "upstream closed before any byte; trying the next"
        );
        remaining = &remaining[connected.attempts..];
        if remaining.is_empty() {
            context.stats.connections_failed.fetch_add(1, Relaxed);
            info!(pool = %route.config.name, "client closed: every upstream closed the connection at once");
            return None;
        }
    }
}

/// Waits, at most `window`, for the first sign of life after connecting. True when the
/// upstream closed or reset before either side sent anything, so another upstream can
/// still take the client; false as soon as either side has bytes (or the window ends).
async fn upstream_gone_first(client: &TcpStream, upstream: &TcpStream, window: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + window;
    loop {
        // `readable()` may wake spuriously; `try_io` clears the readiness on WouldBlock.
        tokio::select! {
            biased;
            ready = upstream.readable() => {
                if ready.is_err() {
                    return true;
                }
                match upstream.try_io(Interest::READABLE, || peek(upstream)) {
                    Ok(0) => return true,
                    Ok(_) => return false,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return true,
                }
            }
            _ = client.readable() => {
                match client.try_io(Interest::READABLE, || peek(client)) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    // Bytes, EOF or an error: the copy takes it from here.
                    _ => return false,
                }
            }
            _ = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

fn peek(stream: &TcpStream) -> std::io::Result<usize> {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit()];
    SockRef::from(stream).peek(&mut probe)
}
