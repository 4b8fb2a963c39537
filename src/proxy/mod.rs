//! The hot path: one task per client connection, from routing to the end of the copy.
//!
//! A connection loads the routing snapshot once, connects, then keeps only the chosen
//! upstream's shared counters; the snapshot is dropped before the copy so that a
//! connection open for hours never pins old routing state.

pub mod access;
pub mod access_log;
pub mod connect;
pub mod copy;
pub mod handshake;
pub mod listener;
pub mod opening;
pub mod splice;
pub mod tls;
pub mod wake_gate;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use socket2::SockRef;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info};

use crate::config::ProxyProtocolVersion;
use crate::health::passive::Feedback;
use crate::metrics::{ConnectFailure, RejectReason};
use crate::pool::attempt_order;
use crate::shutdown::Shutdown;
use crate::snapshot::{ListenerRoute, PoolRoute, Upstream};
use access_log::{ConnectionRecord, End};
use copy::{CopyEnd, Counters, Limits};
use handshake::{Handshake, HandshakeError, Step};
use listener::ListenerContext;
use opening::{Moved, Opening, Replay, Unanswered};
use tls::{ClientStream, UpstreamStream, client_socket};
use tokio_util::either::Either;
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

/// Serves one client (an `async move` block rather than an `async fn`, see
/// `listener::connection_task`).
/// `readiness_may_lie`: the accept loop could not clear the readiness tokio assumes of
/// a new socket (see [`Origin::readiness_may_lie`]).
pub(crate) fn serve<'a>(
    client: TcpStream,
    peer: SocketAddr,
    readiness_may_lie: bool,
    context: &'a ListenerContext,
    listener: &'a ListenerRoute,
    shutdown: &'a Shutdown,
) -> impl Future<Output = ()> + Send + 'a {
    let span = tracing::debug_span!(
        "conn",
        listener = %context.name,
        client.addr = %peer,
        upstream = tracing::field::Empty,
    );
    async move {
        let _active = Active::enter(&context.stats.connections_active);
        // Written when dropped, however the connection ends.
        let mut record = ConnectionRecord::new(listener.access_log, &context.name, peer);
        // In a block of its own, so that the task does not keep the steps' state while
        // it copies.
        let (client, origin, pool) = {
            // One deadline for every step before routing (PROXY header, ClientHello, TLS
            // handshake), so that a slow client cannot buy a fresh timeout per step.
            let steps = Handshake {
                context,
                shutdown,
                deadline: tokio::time::Instant::now() + listener.config.handshake_timeout,
            };
            let Some(mut origin) = client_origin(
                &client,
                peer,
                readiness_may_lie,
                listener,
                &steps,
                &mut record,
            )
            .await
            else {
                return;
            };
            record.client = origin.source;
            let Some((client, pool)) =
                admit(client, &mut origin, listener, &steps, &mut record).await
            else {
                return;
            };
            (client, origin, pool)
        };
        relay(client, &origin, pool, context, shutdown, &mut record).await;
    }
    .instrument(span)
}

/// What a copy needs to know about the upstream side.
struct LinkMeta {
    upstream: Arc<Upstream>,
    /// Cancelled when the upstream's connections must close (down, maint, drain).
    close: CancellationToken,
    idle_timeout: Option<Duration>,
    /// Set when the pool watches the opening exchange.
    opening: Option<Box<OpeningWatch>>,
}

/// A pool's `first_byte_timeout` and `replay_unanswered`, and where to report an
/// upstream that leaves a client unanswered.
struct OpeningWatch {
    first_byte_timeout: Option<Duration>,
    replay_bound: usize,
    feedback: Feedback,
}

/// A client's connection to one upstream, and what its copy needs.
struct Link {
    stream: UpstreamStream,
    meta: LinkMeta,
}

/// The client as the copy sees it (the TLS session, when this listener terminates TLS)
/// and the pool it goes to: the listener's, or the one its TLS server name selects.
/// `None` when the client was refused (counted by reason).
async fn admit<'l>(
    client: TcpStream,
    origin: &mut Origin,
    listener: &'l ListenerRoute,
    steps: &Handshake<'_>,
    record: &mut ConnectionRecord<'_>,
) -> Option<(ClientStream, &'l str)> {
    let Some(server_tls) = &listener.config.tls else {
        let pool = choose_pool(&client, origin, listener, steps, record).await?;
        return Some((Either::Left(client), pool));
    };
    // The handshake reads the bytes that followed a PROXY header; none are left for the
    // upstream.
    let early = std::mem::take(&mut origin.early);
    origin.readiness_may_lie = true;
    // Boxed, like every TLS future here: a rustls session is large, and an inline one
    // would grow every plain connection's task by its size.
    let accepting = Box::pin(tls::accept(server_tls.config.clone(), client, early));
    let session = steps
        .run(
            Step::TlsHandshake,
            async { accepting.await.map_err(HandshakeError::Tls) },
            record,
        )
        .await?;
    let name = session.get_ref().1.server_name().map(str::to_string);
    let pool = pool_for_name(name.as_deref(), listener, steps.context, record)?;
    Some((Either::Right(Box::new(session)), pool))
}

/// Connects the client and copies until the connection ends. A client whose upstream
/// was marked down before a byte flowed either way (a hung server that accepts and
/// never answers) lost nothing, so it moves to another upstream instead of seeing an
/// error, whatever TLS either side speaks. With `replay_unanswered`, so does a client
/// whose bytes got no answer, within the bound: they are sent again to the next.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice; this future is every connection's state"
)]
fn relay(
    mut client: ClientStream,
    origin: &Origin,
    pool: &str,
    context: &ListenerContext,
    shutdown: &Shutdown,
    record: &mut ConnectionRecord<'_>,
) -> impl Future<Output = ()> {
    async move {
        // Created on the first connect of a pool that watches the opening exchange.
        let mut replay: Option<Replay> = None;
        // Upstreams that left this client unanswered; allocated only then.
        let mut tried: Vec<u64> = Vec::new();
        loop {
            let socket = client_socket(&client);
            // Taken apart at once: a `Link` kept whole would stay in the task beside its
            // parts.
            let Some(Link {
                stream: mut upstream_stream,
                meta: link,
            }) = connect_client(socket, origin, pool, context, shutdown, record, &tried).await
            else {
                return;
            };
            let upstream = &link.upstream;
            tracing::Span::current().record("upstream", tracing::field::display(upstream.label()));
            upstream.stats.connections_total.fetch_add(1, Relaxed);
            let _upstream_active = Active::enter(&upstream.stats.connections_active);
            let inbound = Counters {
                listener: &context.stats.bytes_in,
                upstream: &upstream.stats.bytes_sent,
            };
            let outbound = Counters {
                listener: &context.stats.bytes_out,
                upstream: &upstream.stats.bytes_received,
            };
            let mut opened = Moved::default();
            if let Some(watch) = &link.opening {
                let kept = replay
                    .get_or_insert_with(|| Replay::new(watch.replay_bound, origin.early.len()));
                let bounds = opening::Bounds {
                    first_byte_timeout: watch.first_byte_timeout,
                    idle_timeout: link.idle_timeout,
                    close: &link.close,
                    shutdown,
                };
                // Boxed: only pools that watch the opening exchange pay for its state, and
                // every other connection's task stays as small as before.
                let opening = Box::pin(opening::until_answered(
                    &mut client,
                    &mut upstream_stream,
                    kept,
                    &bounds,
                    &inbound,
                    &outbound,
                    &mut opened,
                ))
                .await;
                record.moved(opened.client_to_upstream, opened.upstream_to_client);
                let unanswered = match opening {
                    Opening::Handover => None,
                    Opening::Unanswered(why) => Some(why),
                    Opening::Idle | Opening::ClientFailed | Opening::Shutdown => {
                        record.end = match opening {
                            Opening::Idle => End::IdleTimeout,
                            Opening::Shutdown => End::Shutdown,
                            _ => End::ClientClosed,
                        };
                        return;
                    }
                };
                if let Some(why) = unanswered {
                    let failure = match why {
                        Unanswered::Timeout => Some(ConnectFailure::FirstByteTimeout),
                        Unanswered::Closed => Some(ConnectFailure::Reset),
                        Unanswered::Down => None,
                    };
                    if let Some(failure) = failure {
                        watch
                            .feedback
                            .connect_failed(upstream.id, &upstream.stats, failure);
                    }
                    opening::abandon(upstream_stream);
                    if !kept.replayable() {
                        record.end = match why {
                            Unanswered::Down => End::UpstreamDown,
                            Unanswered::Closed => End::UpstreamClosed,
                            Unanswered::Timeout => End::Unanswered,
                        };
                        debug!(upstream = %upstream.label(), ?why, "upstream left the client unanswered; more was sent than can be replayed, closing");
                        return;
                    }
                    debug!(upstream = %upstream.label(), ?why, "upstream left the client unanswered; replaying to the next");
                    tried.push(upstream.id);
                    continue;
                }
                // Answered: nothing will be replayed, and a connection open for hours must
                // not keep the copy.
                replay = None;
            }
            // Two waits, polled by hand (`select!` would add its own state to every
            // connection), and only when one of them woke the task.
            let forced = std::pin::pin!(shutdown.force_closed());
            let down = std::pin::pin!(link.close.cancelled());
            let closed = wake_gate::either(forced, down);
            // Done ends this function (a reconnect follows only a close from outside), and
            // with it both streams.
            let limits = Limits {
                idle_timeout: link.idle_timeout,
                closed,
                closed_after_done: true,
            };
            let outcome =
                copy::run(&mut client, &mut upstream_stream, limits, inbound, outbound).await;
            record.copied(&outcome, shutdown.is_force_closed());
            debug!(
                upstream = %upstream.label(),
                end = %record.end,
                sent = outcome.client_to_upstream + opened.client_to_upstream,
                received = outcome.upstream_to_client + opened.upstream_to_client,
                "upstream connection closed"
            );
            let silent = outcome.client_to_upstream == 0
                && outcome.upstream_to_client == 0
                && opened.client_to_upstream == 0
                && opened.upstream_to_client == 0;
            let moved_by_failover = outcome.end == CopyEnd::Closed
                && link.close.is_cancelled()
                && !shutdown.is_force_closed();
            if !(silent && moved_by_failover) {
                return;
            }
            debug!(
                upstream = %upstream.label(),
                "upstream went down before any byte; reconnecting the client"
            );
        }
    }
}

/// Routes and connects one client: attempts in the pool's order, each failure counted
/// against its upstream and invisible to the client. `None` when the client must be
/// closed (nothing usable, every attempt failed, our own resources ran out, or
/// shutdown).
async fn connect_client(
    client: &TcpStream,
    origin: &Origin,
    pool: &str,
    context: &ListenerContext,
    shutdown: &Shutdown,
    record: &mut ConnectionRecord<'_>,
    tried: &[u64],
) -> Option<Link> {
    record.end = End::ConnectFailed;
    let route = context.snapshot.load().pool(pool).cloned();
    let Some(route) = route else {
        // Only for a connection accepted just before a reload removed its pool.
        context
            .stats
            .fail(crate::metrics::FailedReason::RemovedByReload);
        return None;
    };
    let order = attempt_order(&route, origin.source.ip(), tried);
    if order.is_empty() && !tried.is_empty() {
        context
            .stats
            .fail(crate::metrics::FailedReason::UpstreamsFailed);
        record.end = End::Unanswered;
        info!(pool = %route.config.name, "client closed: no upstream left to replay its unanswered bytes to");
        return None;
    }
    if order.is_empty() {
        context.stats.reject(RejectReason::NoUpstream);
        record.reject(RejectReason::NoUpstream);
        debug!("no usable upstream and when_all_down = reject; closing client");
        return None;
    }
    let connect_started = tokio::time::Instant::now();
    let watches_opening = watches_opening(&route.config);
    let mut remaining = order.as_slice();
    loop {
        let connected = tokio::select! {
            connected = connect::connect(&route, remaining) => connected,
            _ = shutdown.force_closed() => {
                record.end = End::Shutdown;
                return None;
            }
        };
        let connected = match connected {
            Ok(connected) => connected,
            Err(e) => {
                context.stats.fail(e.reason());
                record.attempted(remaining.len());
                match &e {
                    crate::error::ConnectError::LocalResources { source, .. } => {
                        crate::error::warn_local_exhaustion(
                            "client closed: no connection to an upstream could be opened",
                            source,
                        );
                    }
                    crate::error::ConnectError::Upstreams { .. } => {
                        info!(pool = %route.config.name, error = %e, "client closed: no upstream could be reached");
                    }
                }
                return None;
            }
        };
        let index = connected.upstream;
        let introduced = introduce(
            client,
            &connected.stream,
            route.config.proxy_protocol,
            origin,
        )
        .await;
        let established = match (&route.config.tls, introduced) {
            (_, Err(_)) => Err(ConnectFailure::Reset),
            (Some(tls), Ok(())) => {
                let target = &route.upstreams[index].config.target;
                let handshake = Box::pin(crate::dial::tls(
                    tls,
                    target,
                    connected.stream,
                    route.config.connect_timeout,
                ));
                match handshake.await {
                    Ok(stream) => Ok(Either::Right(Box::new(stream))),
                    Err(e) => {
                        debug!(upstream = %route.upstreams[index].label(), error = %e, "upstream TLS failed");
                        Err(ConnectFailure::Tls)
                    }
                }
            }
            // The opening exchange watches for that itself, and a client whose bytes
            // it replays has none left in its socket to end this wait early.
            (None, Ok(())) if watches_opening => Ok(Either::Left(connected.stream)),
            (None, Ok(())) => {
                let gone = upstream_gone_first(
                    client,
                    origin.readiness_may_lie,
                    &connected.stream,
                    route.config.connect_timeout,
                );
                if gone.await {
                    Err(ConnectFailure::Reset)
                } else {
                    Ok(Either::Left(connected.stream))
                }
            }
        };
        match established {
            Ok(stream) => {
                route
                    .feedback
                    .connect_succeeded(&route.upstreams[index].stats);
                let took = connect_started.elapsed();
                route.stats.connect_seconds.observe(took);
                record.connected(
                    &route.config.name,
                    &route.upstreams[index],
                    connected.attempts,
                    took,
                );
                // The route is dropped here: a connection open for hours must not pin it.
                return Some(Link {
                    stream,
                    meta: LinkMeta {
                        upstream: route.upstreams[index].clone(),
                        close: route.closers[index].token(),
                        idle_timeout: route.config.idle_timeout,
                        opening: OpeningWatch::of(&route),
                    },
                });
            }
            Err(reason) => {
                // Accepted and closed before a byte flowed either way (a server dying
                // with connections in its accept queue), or a failed TLS handshake: a
                // failed attempt, invisible to the client.
                let failed = &route.upstreams[index];
                route
                    .feedback
                    .connect_failed(failed.id, &failed.stats, reason);
            }
        }
        let failed = &route.upstreams[index];
        debug!(
            upstream = %failed.label(),
            "upstream closed before any byte; trying the next"
        );
        record.attempted(connected.attempts);
        remaining = &remaining[connected.attempts..];
        if remaining.is_empty() {
            context
                .stats
                .fail(crate::metrics::FailedReason::UpstreamsFailed);
            info!(pool = %route.config.name, "client closed: every upstream closed the connection at once");
            return None;
        }
    }
}

/// Where a client really comes from, and what it already sent.
struct Origin {
    /// The client's address: the TCP peer, or the source of its PROXY header.
    source: SocketAddr,
    /// The destination of its PROXY header; `None` for our own socket's address, which
    /// is looked up only when a PROXY header to the upstream needs it (a syscall that
    /// most connections never use).
    destination: Option<SocketAddr>,
    /// Bytes that followed the PROXY header in the same reads; the upstream gets them
    /// first.
    early: Vec<u8>,
    /// Tokio's read readiness of the client's socket may be set with nothing behind it:
    /// assumed at accept, or left over from the reads of a handshake (PROXY header,
    /// TLS).
    readiness_may_lie: bool,
}

/// The client's origin. On a listener that accepts PROXY headers, reads and checks the
/// header (within `handshake_timeout`) from a trusted peer; `None` when the client was
/// refused (counted by reason).
async fn client_origin(
    client: &TcpStream,
    peer: SocketAddr,
    readiness_may_lie: bool,
    listener: &ListenerRoute,
    steps: &Handshake<'_>,
    record: &mut ConnectionRecord<'_>,
) -> Option<Origin> {
    let context = steps.context;
    let direct = Origin {
        source: peer,
        destination: None,
        early: Vec::new(),
        readiness_may_lie,
    };
    let settings = &listener.config;
    let Some(accept) = settings.accept_proxy_protocol else {
        return Some(direct);
    };
    if !access::may_send_proxy_header(settings, peer.ip()) {
        context.stats.reject(RejectReason::UntrustedProxy);
        record.reject(RejectReason::UntrustedProxy);
        debug!("peer is not in proxy_protocol_from; closing");
        return None;
    }
    let (header, early) = steps
        .run(
            Step::ProxyHeader,
            handshake::expect_proxy_header(client, accept),
            record,
        )
        .await?;
    // LOCAL / UNKNOWN headers (a balancer's own health check) carry no client address.
    let (source, destination) = match header.addresses() {
        Some(addresses) => (addresses.source, Some(addresses.destination)),
        None => (peer, None),
    };
    Some(Origin {
        source,
        destination,
        early,
        readiness_may_lie: true,
    })
}

/// The pool for this client: the listener's, or with SNI routes the one its TLS server
/// name selects (the ClientHello is peeked, never consumed or changed). `None` when the
/// client was refused (counted by reason).
async fn choose_pool<'l>(
    client: &TcpStream,
    origin: &Origin,
    listener: &'l ListenerRoute,
    steps: &Handshake<'_>,
    record: &mut ConnectionRecord<'_>,
) -> Option<&'l str> {
    if listener.sni.is_empty() {
        return listener.config.pool.as_deref();
    }
    let name = steps
        .run(
            Step::ClientHello,
            handshake::peek_server_name(client, &origin.early),
            record,
        )
        .await?;
    pool_for_name(name.as_deref(), listener, steps.context, record)
}

/// The pool a TLS server name selects: its SNI route, else the listener's pool. `None`
/// (counted as `NoRoute`) when neither exists.
fn pool_for_name<'l>(
    name: Option<&str>,
    listener: &'l ListenerRoute,
    context: &ListenerContext,
    record: &mut ConnectionRecord<'_>,
) -> Option<&'l str> {
    // Borrowed from the listener's route, which the connection's task holds anyway: no
    // copy of the name per connection.
    let routed = name
        .and_then(|n| listener.sni.lookup(n))
        .map(String::as_str);
    let pool = routed.or(listener.config.pool.as_deref());
    if pool.is_none() {
        context.stats.reject(RejectReason::NoRoute);
        record.reject(RejectReason::NoRoute);
        debug!(server_name = %name.unwrap_or("(none)"), "no SNI route matches the server name and there is no default pool; closing");
    }
    pool
}

/// Sends the pool's PROXY header, then whatever the client sent after its own header.
async fn introduce(
    client: &TcpStream,
    upstream: &TcpStream,
    version: Option<ProxyProtocolVersion>,
    origin: &Origin,
) -> std::io::Result<()> {
    if let Some(version) = version {
        let destination = origin.destination.unwrap_or_else(|| {
            client
                .local_addr()
                .unwrap_or_else(|_| unspecified_like(origin.source))
        });
        handshake::send_proxy_header(upstream, version, origin.source, destination).await?;
    }
    if !origin.early.is_empty() {
        copy::write_all(upstream, &origin.early).await?;
    }
    Ok(())
}

fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// Waits, at most `window`, for the first sign of life after connecting. True when the
/// upstream closed or reset before either side sent anything, so another upstream can
/// still take the client; false as soon as either side has bytes (or the window ends).
/// The client's readiness is taken at its word unless it may lie.
async fn upstream_gone_first(
    client: &TcpStream,
    readiness_may_lie: bool,
    upstream: &TcpStream,
    window: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + window;
    loop {
        // Readiness may be spurious; `try_io` clears it on WouldBlock.
        tokio::select! {
            biased;
            ready = copy::read_ready(upstream) => {
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
            _ = copy::read_ready(client) => {
                if !readiness_may_lie {
                    // Bytes, an end or an error: the copy takes it from here.
                    return false;
                }
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

fn watches_opening(config: &crate::config::PoolConfig) -> bool {
    config.first_byte_timeout.is_some() || config.replay_unanswered.is_some()
}

// === impl OpeningWatch ===

impl OpeningWatch {
    /// `None` for a pool that sets neither key: its clients go straight to the copy.
    fn of(route: &PoolRoute) -> Option<Box<Self>> {
        let config = &route.config;
        if !watches_opening(config) {
            return None;
        }
        Some(Box::new(Self {
            first_byte_timeout: config.first_byte_timeout,
            replay_bound: config.replay_unanswered.unwrap_or(0),
            feedback: route.feedback.clone(),
        }))
    }
}
