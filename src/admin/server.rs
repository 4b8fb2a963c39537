//! The admin listener: the accept loop and the bounds that keep hostile clients from
//! holding the admin API or the process's file descriptors.
//!
//! A request's headers must arrive in full within [`HEADER_TIMEOUT`] and fit in
//! [`MAX_HEADER_BYTES`]; bodies are never read. At most [`connection_cap_for`] the
//! descriptor limit are open at once; at the cap a new connection closes the oldest one
//! that has no request in flight (idle, or still sending its headers) and is past its
//! [`EVICTION_GRACE`], so that stalled clients cannot lock a well-behaved one out. A
//! request in flight is never cut; when every connection has one, a new connection is
//! closed at once. Nothing here is on the data plane's hot path, so one mutex guards the
//! table.
//!
//! An event stream (`GET /events/stream`) is a response without an end, so it must not
//! count as a request in flight: a handful of open browser tabs would otherwise hold
//! every slot for ever and lock the operator out. A streaming connection may be closed
//! to make room like an idle one, at most [`stream_cap_for`] the cap stream at once (the
//! next is answered 503), and each stream ends after [`STREAM_LIFETIME`]; a browser's
//! `EventSource` reconnects by itself and resumes from its `Last-Event-ID`. A reader
//! that stops reading holds its slot no longer than that plus [`STREAM_CLOSE_GRACE`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::page::EventStream;
use super::{Admin, Reply};
use crate::shutdown::Shutdown;

/// How long a request's headers may take to arrive in full, counted from when the
/// server starts waiting for them: the connection's start, or the end of the previous
/// response on a kept-alive connection (so this is also the keep-alive idle timeout).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Request line plus headers, in bytes. More is answered 431 and the connection closed.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// Open admin connections at most, whatever the descriptor limit: a handful of
/// operators and scrapers never need more.
pub const MAX_CONNECTIONS: usize = 128;

/// Open admin connections at least, so that a tiny descriptor limit still leaves room
/// for an operator next to a scraper.
pub const MIN_CONNECTIONS: usize = 4;

/// How long a new connection is safe from being closed to make room for another: the
/// time its client has to get its request's headers to us (a well-behaved client sends
/// them with its first packets). At the cap, the accept loop waits for the oldest idle
/// connection to be this old rather than close one whose request may be on its way;
/// this also bounds a flood's churn to the cap per grace period, the rest waiting in
/// the kernel's accept queue.
pub const EVICTION_GRACE: Duration = Duration::from_millis(50);

/// How long one event stream lasts before the server ends it (and the browser opens a
/// new one): bounds how long a stream holds an admin slot.
pub const STREAM_LIFETIME: Duration = Duration::from_secs(300);

/// How long after its lifetime a stream whose reader stopped reading (so that the end
/// cannot be written) is cut.
pub const STREAM_CLOSE_GRACE: Duration = Duration::from_secs(5);

const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The admin connection cap for a process allowed `descriptors` open files: a
/// sixteenth of them, within [`MIN_CONNECTIONS`]..=[`MAX_CONNECTIONS`]. The rest stays
/// for the data plane (two per proxied connection, health checks, splice pipes), so
/// that admin clients can never starve it.
pub fn connection_cap_for(descriptors: u64) -> usize {
    usize::try_from(descriptors / 16)
        .unwrap_or(usize::MAX)
        .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// Event streams open at once at most for an admin connection cap of `cap`: half of
/// it, so that streams alone never fill the table.
pub fn stream_cap_for(cap: usize) -> usize {
    (cap / 2).max(1)
}

/// The soft RLIMIT_NOFILE now, or the usual default when it cannot be read.
#[allow(unsafe_code)]
fn descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we own and pass by a valid pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if ok { limit.rlim_cur } else { 1024 }
}

/// Serves `admin` on `listener` until shutdown begins.
pub(super) fn spawn(admin: Arc<Admin>, listener: Arc<TcpListener>, shutdown: Shutdown) {
    let cap = connection_cap_for(descriptor_limit());
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, max_connections = cap, "admin API listening");
    }
    let connections = Arc::new(Connections::new(cap));
    tokio::spawn(accept_loop(admin, listener, connections, shutdown));
}

/// Accepts until shutdown begins. An accept error (EMFILE above all) backs off and
/// retries, with one warning per episode and one line when accepting works again.
async fn accept_loop(
    admin: Arc<Admin>,
    listener: Arc<TcpListener>,
    connections: Arc<Connections>,
    shutdown: Shutdown,
) {
    let mut backoff = MIN_ACCEPT_BACKOFF;
    let mut failures_in_a_row = 0u64;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.stopping() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if failures_in_a_row > 0 {
                    info!(failures = failures_in_a_row, "admin API accepting again");
                    failures_in_a_row = 0;
                    backoff = MIN_ACCEPT_BACKOFF;
                }
                // At the cap, hold the new connection until the oldest idle one is past
                // its grace; meanwhile further clients wait in the kernel's queue.
                let admitted = loop {
                    match connections.admit(Instant::now()) {
                        Admission::Admitted { id, closed } => break Some((id, closed)),
                        Admission::AllBusy => break None,
                        Admission::NotBefore(at) => tokio::select! {
                            biased;
                            _ = shutdown.stopping() => return,
                            _ = tokio::time::sleep_until(at) => {}
                        },
                    }
                };
                match admitted {
                    Some((id, closed)) => {
                        serve(&admin, &connections, &shutdown, id, closed, stream, peer)
                    }
                    None => debug!(
                        %peer,
                        "admin connection refused: every open one has a request in flight"
                    ),
                }
            }
            Err(e) if is_client_gone(&e) => {
                debug!(error = %e, "admin client left before accept");
            }
            Err(e) => {
                if failures_in_a_row == 0 {
                    warn!(error = %e, "admin accept failed; backing off until it succeeds");
                }
                failures_in_a_row += 1;
                tokio::select! {
                    _ = shutdown.stopping() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

/// Errors that concern one client only; the listener itself is fine.
fn is_client_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || e.raw_os_error() == Some(libc::EPROTO)
}

fn serve(
    admin: &Arc<Admin>,
    connections: &Arc<Connections>,
    shutdown: &Shutdown,
    id: u64,
    closed: oneshot::Receiver<()>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let registered = Registered {
        connections: connections.clone(),
        id,
    };
    let admin = admin.clone();
    let tracker = shutdown.clone();
    let connection_shutdown = shutdown.clone();
    let shutdown = shutdown.clone();
    let task = async move {
        let tracked = registered.connections.clone();
        // Set once this connection streams: when the stream must be over.
        let (stream_deadline, mut stream_ends) = watch::channel(None::<Instant>);
        let (request_seen, mut first_request) = watch::channel(false);
        let service = service_fn(move |request| {
            request_seen.send_replace(true);
            let in_flight = RequestInFlight::start(&tracked, id);
            let admin = admin.clone();
            let tracked = tracked.clone();
            let shutdown = shutdown.clone();
            let stream_deadline = stream_deadline.clone();
            async move {
                let reply = admin.handle(request, peer, &shutdown).await;
                let response = match reply {
                    Reply::Whole(response) => response.map(|body| TrackedBody::Whole {
                        body,
                        _in_flight: in_flight,
                    }),
                    Reply::Stream(response) => match StreamSlot::take(&tracked) {
                        Some(slot) => {
                            // A stream is not a request in flight: see the module doc.
                            drop(in_flight);
                            let ends = Instant::now() + STREAM_LIFETIME;
                            stream_deadline.send_replace(Some(ends));
                            response.map(|body| TrackedBody::Stream {
                                body: body.until(ends),
                                _slot: slot,
                            })
                        }
                        None => {
                            let mut refused = super::error(
                                hyper::StatusCode::SERVICE_UNAVAILABLE,
                                "too many event streams open; try again later",
                            );
                            if let Ok(value) = "5".parse() {
                                refused
                                    .headers_mut()
                                    .insert(hyper::header::RETRY_AFTER, value);
                            }
                            refused.map(|body| TrackedBody::Whole {
                                body,
                                _in_flight: in_flight,
                            })
                        }
                    },
                };
                Ok::<_, Infallible>(response)
            }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_header_size(MAX_HEADER_BYTES)
            .serve_connection(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => Some(result),
            _ = closed => {
                debug!(%peer, "admin connection closed to make room for a new one");
                None
            }
            _ = stream_overdue(&mut stream_ends) => {
                debug!(%peer, "admin event stream cut: its reader stopped reading");
                None
            }
            _ = connection_shutdown.stopping() => {
                // A client that connected before accepting stopped (an admin call racing
                // a binary upgrade's handover) gets its request answered, then the
                // connection closes instead of waiting for another. An event stream
                // ends by itself when shutdown begins.
                let first = tokio::select! {
                    result = connection.as_mut() => Some(result),
                    _ = first_request.wait_for(|seen| *seen) => None,
                };
                match first {
                    Some(result) => Some(result),
                    None => {
                        connection.as_mut().graceful_shutdown();
                        Some(connection.as_mut().await)
                    }
                }
            }
        };
        if let Some(Err(e)) = result {
            debug!(%peer, error = %e, "admin connection ended with an error");
        }
        drop(registered);
    };
    tokio::spawn(tracker.track_answer(task));
}

/// Resolves [`STREAM_CLOSE_GRACE`] after the end set in `stream_ends`, for a stream
/// that could not end by itself because its reader stopped reading; never without one.
async fn stream_overdue(stream_ends: &mut watch::Receiver<Option<Instant>>) {
    let ends = match stream_ends.wait_for(Option::is_some).await {
        Ok(ends) => *ends,
        Err(_) => None,
    };
    match ends {
        Some(ends) => tokio::time::sleep_until(ends + STREAM_CLOSE_GRACE).await,
        None => std::future::pending().await,
    }
}

/// The open admin connections, oldest first, with their requests in flight.
#[derive(Debug)]
struct Connections {
    cap: usize,
    open: Mutex<OpenConnections>,
}

#[derive(Debug, Default)]
struct OpenConnections {
    next_id: u64,
    /// Event streams open now, on any connection.
    streams: usize,
    /// Ids grow with each accept, so the first entry is the oldest connection.
    by_age: BTreeMap<u64, Slot>,
}

#[derive(Debug)]
struct Slot {
    opened: Instant,
    requests_in_flight: u32,
    /// Dropped with the slot, which wakes the connection's task to close it.
    _close: oneshot::Sender<()>,
}

/// What [`Connections::admit`] decided for a new connection.
#[derive(Debug)]
enum Admission {
    /// Registered; `closed` completes when the connection must close.
    Admitted {
        id: u64,
        closed: oneshot::Receiver<()>,
    },
    /// At the cap and every open connection has a request in flight.
    AllBusy,
    /// At the cap; the oldest idle connection may be closed from this instant on.
    NotBefore(Instant),
}

impl Connections {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            open: Mutex::default(),
        }
    }

    /// Registers a new connection opened `now`; at the cap, closes the oldest one
    /// without a request in flight to make room, once it is past its grace.
    fn admit(&self, now: Instant) -> Admission {
        let mut open = self.lock();
        if open.by_age.len() >= self.cap {
            let Some((&oldest_idle, slot)) = open
                .by_age
                .iter()
                .find(|(_, slot)| slot.requests_in_flight == 0)
            else {
                return Admission::AllBusy;
            };
            let may_close_at = slot.opened + EVICTION_GRACE;
            if now < may_close_at {
                return Admission::NotBefore(may_close_at);
            }
            open.by_age.remove(&oldest_idle);
        }
        let id = open.next_id;
        open.next_id += 1;
        let (close, closed) = oneshot::channel();
        open.by_age.insert(
            id,
            Slot {
                opened: now,
                requests_in_flight: 0,
                _close: close,
            },
        );
        Admission::Admitted { id, closed }
    }

    fn count_request(&self, id: u64, started: bool) {
        if let Some(slot) = self.lock().by_age.get_mut(&id) {
            slot.requests_in_flight = if started {
                slot.requests_in_flight.saturating_add(1)
            } else {
                slot.requests_in_flight.saturating_sub(1)
            };
        }
    }

    /// Counts a new event stream, unless [`stream_cap_for`] are
    /// open already.
    fn start_stream(&self) -> bool {
        let mut open = self.lock();
        if open.streams >= stream_cap_for(self.cap) {
            return false;
        }
        open.streams += 1;
        true
    }

    fn end_stream(&self) {
        let mut open = self.lock();
        open.streams = open.streams.saturating_sub(1);
    }

    fn release(&self, id: u64) {
        self.lock().by_age.remove(&id);
    }

    #[cfg(test)]
    fn open(&self) -> Vec<u64> {
        self.lock().by_age.keys().copied().collect()
    }

    fn lock(&self) -> MutexGuard<'_, OpenConnections> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection's place in the table, given back when its task ends however it ends.
struct Registered {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.release(self.id);
    }
}

/// Marks a request in flight from the moment its headers are parsed until hyper has
/// taken the whole response body.
struct RequestInFlight {
    connections: Arc<Connections>,
    id: u64,
}

impl RequestInFlight {
    fn start(connections: &Arc<Connections>, id: u64) -> Self {
        connections.count_request(id, true);
        Self {
            connections: connections.clone(),
            id,
        }
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.connections.count_request(self.id, false);
    }
}

/// One of the open event streams, counted until hyper drops its body.
struct StreamSlot {
    connections: Arc<Connections>,
}

impl StreamSlot {
    fn take(connections: &Arc<Connections>) -> Option<Self> {
        connections.start_stream().then(|| Self {
            connections: connections.clone(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.connections.end_stream();
    }
}

/// A response body that keeps its request counted in flight, or its stream counted,
/// while hyper holds it.
enum TrackedBody {
    Whole {
        body: Full<Bytes>,
        _in_flight: RequestInFlight,
    },
    Stream {
        body: EventStream,
        _slot: StreamSlot,
    },
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            TrackedBody::Whole { body, .. } => Pin::new(body).poll_frame(cx),
            TrackedBody::Stream { body, .. } => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            TrackedBody::Whole { body, .. } => body.is_end_stream(),
            TrackedBody::Stream { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            TrackedBody::Whole { body, .. } => body.size_hint(),
            TrackedBody::Stream { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_is_a_sixteenth_of_the_descriptors_within_bounds() {
        assert_eq!(connection_cap_for(256), 16);
        assert_eq!(connection_cap_for(1024), 64);
        assert_eq!(connection_cap_for(1 << 20), MAX_CONNECTIONS);
        assert_eq!(connection_cap_for(16), MIN_CONNECTIONS);
        assert_eq!(connection_cap_for(u64::MAX), MAX_CONNECTIONS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_is_cut_only_after_its_end_and_the_grace() {
        let (set, mut ends) = watch::channel(None);
        let unarmed = tokio::time::timeout(STREAM_LIFETIME * 10, stream_overdue(&mut ends));
        assert!(
            unarmed.await.is_err(),
            "a connection without a stream stays"
        );
        let start = Instant::now();
        set.send_replace(Some(start + STREAM_LIFETIME));
        stream_overdue(&mut ends).await;
        assert_eq!(
            Instant::now().duration_since(start),
            STREAM_LIFETIME + STREAM_CLOSE_GRACE
        );
        drop(set);
        let (set, mut ends) = watch::channel(None);
        drop(set);
        let gone = tokio::time::timeout(STREAM_LIFETIME * 10, stream_overdue(&mut ends));
        assert!(
            gone.await.is_err(),
            "a connection whose service is gone is not cut here"
        );
    }

    fn admitted(admission: Admission) -> (u64, oneshot::Receiver<()>) {
        match admission {
            Admission::Admitted { id, closed } => (id, closed),
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_past_its_grace_makes_room() {
        let connections = Arc::new(Connections::new(3));
        let start = Instant::now();
        let (a, mut a_closed) = admitted(connections.admit(start));
        let (b, mut b_closed) = admitted(connections.admit(start));
        let (c, _c_closed) = admitted(connections.admit(start + EVICTION_GRACE));
        let busy = RequestInFlight::start(&connections, a);

        let later = start + EVICTION_GRACE;
        let (d, _d_closed) = admitted(connections.admit(later));
        assert_eq!(
            connections.open(),
            vec![a, c, d],
            "b ({b}), the oldest idle, went"
        );
        assert!(b_closed.try_recv().is_err(), "b is told to close");
        assert!(
            matches!(
                a_closed.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ),
            "a request in flight is not cut"
        );

        assert!(
            matches!(connections.admit(later), Admission::NotBefore(at) if at == later + EVICTION_GRACE),
            "c is within its grace: wait for it"
        );
        let much_later = later + EVICTION_GRACE;
        let _c_busy = RequestInFlight::start(&connections, c);
        let _d_busy = RequestInFlight::start(&connections, d);
        assert!(
            matches!(connections.admit(much_later), Admission::AllBusy),
            "every one is busy: refuse"
        );

        drop(busy);
        let (e, _) = admitted(connections.admit(much_later));
        assert_eq!(
            connections.open(),
            vec![c, d, e],
            "a is idle again and went"
        );
        connections.release(c);
        assert_eq!(connections.open(), vec![d, e]);
    }
}
