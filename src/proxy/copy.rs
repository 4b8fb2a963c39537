//! The data path: bytes both ways between client and upstream until both sides are
//! done, with half-close, an idle deadline and live byte counters, for any pair of
//! streams.
//!
//! Shape of tokio's `copy_bidirectional`: one pump per direction; EOF on one side becomes
//! a write shutdown on the other while the opposite direction keeps flowing; the first
//! error ends both. The idle deadline, the counters, which side ended first and the
//! outside close are kept once, around whichever pumps run.
//!
//! Two kinds of pumps. When both ends are plain TCP sockets, each pump is driven by
//! socket readiness and holds no memory while its side is quiet: a copy buffer is
//! borrowed from a per-thread cache only for a burst of reads, so an idle connection
//! costs no userspace buffer. A direction that streams (several full reads in a row)
//! switches to `splice(2)` through a pooled pipe, so bulk transfers never touch user
//! memory, and switches back when its bursts turn small, so request/response traffic
//! keeps the cheaper plain copy. When either end is TLS (splice cannot see through
//! encryption), tokio's buffered copy runs over streams that count what is read through
//! them. Nothing is logged per read.

// The hot path's functions return `async move` blocks instead of being `async fn`s: an
// async fn keeps a second copy of each argument in its future, held by every open
// connection's task (see `listener::connection_task`).
#![expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice; these futures are every connection's state"
)]

use std::cell::RefCell;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tokio_util::either::Either;

use super::splice;

/// The copy buffer: large enough for bulk reads to fill it (which is what detects a
/// stream), small enough to keep per-thread caches cheap.
const COPY_BUFFER: usize = 64 * 1024;
/// Full reads in a row after which a direction is considered streaming.
const SPLICE_AFTER_FULL_READS: u32 = 4;
/// A splice burst moving less than this means the stream ended: back to copying.
const SPLICE_KEEP_BYTES: u64 = COPY_BUFFER as u64;
/// Idle copy buffers a worker thread keeps for reuse.
const BUFFER_CACHE_PER_THREAD: usize = 32;
/// Buffers of the buffered (TLS) copy; smaller than the plain path's, since a TLS
/// record is at most 16 KiB.
const BUFFERED_COPY_BUFFER: usize = 16 * 1024;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A stream the copy can carry. A plain TCP socket says so, and a pair of them gets the
/// readiness-driven pumps and splice.
pub trait Stream: AsyncRead + AsyncWrite + Unpin {
    /// The socket itself when the bytes on it are the bytes of the stream (no TLS).
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// Where one direction adds its bytes.
pub struct Counters<'a> {
    pub listener: &'a AtomicU64,
    pub upstream: &'a AtomicU64,
}

/// What bounds a copy besides the two peers.
pub struct Limits<C> {
    /// No byte in either direction for this long ends the copy.
    pub idle_timeout: Option<Duration>,
    /// Resolves when the connection must close from outside (shutdown grace expired,
    /// upstream marked down). Pass it pinned (`Pin<&mut _>`), or as a future made of
    /// pinned references, to keep it out of the copy's own state.
    pub closed: C,
    /// The caller closes both streams as soon as the copy returns [`CopyEnd::Done`]:
    /// the last direction to end then leaves its FIN to that close(2) instead of a
    /// shutdown(2) of its own, one syscall less per connection. False when a stream
    /// lives on after the copy.
    pub closed_after_done: bool,
}

/// How the copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyEnd {
    /// Both sides finished sending.
    Done,
    /// No byte in either direction for `idle_timeout`.
    Idle,
    /// One side reset or failed; both were closed.
    Error,
    /// Closed from outside (shutdown grace expired, upstream marked down).
    Closed,
}

#[derive(Debug, Clone, Copy)]
pub struct CopyOutcome {
    pub end: CopyEnd,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// The side whose sending ended first (EOF, reset or error), if either did.
    pub first_to_end: Option<Side>,
}

/// One end of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client = 1,
    Upstream = 2,
}

/// Remembers which side ended first; later ends change nothing. One atomic shared by
/// both directions, so the copy stays free of locks.
#[derive(Debug, Default)]
struct FirstEnd(AtomicU8);

/// What a direction reports to the rest of the connection.
struct Tally<'a> {
    /// Which end this direction reads from.
    side: Side,
    first_end: &'a FirstEnd,
    counters: Counters<'a>,
    total: &'a AtomicU64,
    /// Milliseconds since `started` of the last byte read, shared by both directions.
    last_activity: &'a AtomicU64,
    started: Instant,
}

/// One direction of a plain TCP pair.
struct Direction<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    tally: &'a Tally<'a>,
    /// See [`Limits::closed_after_done`].
    closed_after_done: bool,
}

/// How a burst of reads ended.
enum Burst {
    /// Nothing more to read for now.
    Drained,
    /// The sender finished.
    Eof,
}

/// A copy buffer borrowed from the thread's cache; returned on drop, on whatever
/// thread the task then runs.
pub(super) struct Buffer(Option<Box<[u8]>>);

/// A stream of the buffered copy that tallies every byte read through it.
struct Counted<'a, S> {
    inner: &'a mut S,
    tally: &'a Tally<'a>,
}

/// Copies until both directions are done, an error, the idle deadline (no byte read
/// either way for `idle_timeout`) or `limits.closed` resolves; the caller closes the
/// streams. `inbound` counts the client's bytes, `outbound` the upstream's. (An
/// `async move` block: an `async fn` would keep a second copy of its arguments.)
pub fn run<'a, A: Stream, B: Stream>(
    client: &'a mut A,
    upstream: &'a mut B,
    limits: Limits<impl std::future::Future<Output = ()> + 'a>,
    inbound: Counters<'a>,
    outbound: Counters<'a>,
) -> impl std::future::Future<Output = CopyOutcome> + 'a {
    async move {
        let started = Instant::now();
        let last_activity = AtomicU64::new(0);
        let sent = AtomicU64::new(0);
        let received = AtomicU64::new(0);
        let first_end = FirstEnd::default();
        let to_upstream = Tally {
            side: Side::Client,
            first_end: &first_end,
            counters: inbound,
            total: &sent,
            last_activity: &last_activity,
            started,
        };
        let to_client = Tally {
            side: Side::Upstream,
            first_end: &first_end,
            counters: outbound,
            total: &received,
            last_activity: &last_activity,
            started,
        };
        // Written inside the `select!` rather than handed to a helper: a future passed by
        // value into another async fn is stored twice, and these are most of a
        // connection's task.
        // No local lives across the await but the timer itself.
        let idle = async {
            if limits.idle_timeout.is_none() {
                return std::future::pending().await;
            }
            loop {
                let timer = match idle_deadline(limits.idle_timeout, started, &last_activity) {
                    Some(deadline) => sleep_until(deadline),
                    None => return,
                };
                timer.await;
            }
        };
        let end = tokio::select! {
            result = async {
                if let (Some(client), Some(upstream)) = (client.plain_tcp(), upstream.plain_tcp()) {
                    let to_upstream = Direction {
                        from: client,
                        to: upstream,
                        tally: &to_upstream,
                        closed_after_done: limits.closed_after_done,
                    };
                    let to_client = Direction {
                        from: upstream,
                        to: client,
                        tally: &to_client,
                        closed_after_done: limits.closed_after_done,
                    };
                    return tokio::try_join!(to_upstream.pump(), to_client.pump()).map(drop);
                }
                // Boxed: a plain pair never takes this branch, and its task should not
                // carry the buffered copy's state.
                Box::pin(buffered(client, upstream, &to_upstream, &to_client)).await
            } => if result.is_ok() { CopyEnd::Done } else { CopyEnd::Error },
            _ = idle => CopyEnd::Idle,
            _ = limits.closed => CopyEnd::Closed,
        };
        CopyOutcome {
            end,
            client_to_upstream: sent.load(Relaxed),
            upstream_to_client: received.load(Relaxed),
            first_to_end: first_end.get(),
        }
    }
}

/// The idle deadline: `limit` after the last byte read either way. `None` once it has
/// passed (or without a limit).
fn idle_deadline(
    limit: Option<Duration>,
    started: Instant,
    last_activity: &AtomicU64,
) -> Option<Instant> {
    let deadline = started + Duration::from_millis(last_activity.load(Relaxed)) + limit?;
    (Instant::now() < deadline).then_some(deadline)
}

/// Tokio's copy over streams that tally what is read through them.
async fn buffered<A: Stream, B: Stream>(
    client: &mut A,
    upstream: &mut B,
    to_upstream: &Tally<'_>,
    to_client: &Tally<'_>,
) -> io::Result<()> {
    let mut client = Counted {
        inner: client,
        tally: to_upstream,
    };
    let mut upstream = Counted {
        inner: upstream,
        tally: to_client,
    };
    tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        BUFFERED_COPY_BUFFER,
        BUFFERED_COPY_BUFFER,
    )
    .await
    .map(drop)
}

// === impl Stream ===

impl Stream for TcpStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for tokio_rustls::server::TlsStream<S> {}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for tokio_rustls::client::TlsStream<S> {}

impl<S: Stream + ?Sized> Stream for Box<S> {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        (**self).plain_tcp()
    }
}

impl<L: Stream, R: Stream> Stream for Either<L, R> {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        match self {
            Either::Left(stream) => stream.plain_tcp(),
            Either::Right(stream) => stream.plain_tcp(),
        }
    }
}

// === impl FirstEnd ===

impl FirstEnd {
    fn mark(&self, side: Side) {
        let _ = self.0.compare_exchange(0, side as u8, Relaxed, Relaxed);
    }

    fn get(&self) -> Option<Side> {
        match self.0.load(Relaxed) {
            1 => Some(Side::Client),
            2 => Some(Side::Upstream),
            _ => None,
        }
    }
}

// === impl Tally ===

impl Tally<'_> {
    /// Notes that this direction's sender finished or failed.
    fn ended(&self) {
        self.first_end.mark(self.side);
    }

    /// Pushes the idle deadline forward for bytes read and not yet written.
    fn mark_activity(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_activity.store(now, Relaxed);
    }

    /// Counts `n` bytes moved in this direction.
    fn count(&self, n: u64) {
        self.total.fetch_add(n, Relaxed);
        self.counters.listener.fetch_add(n, Relaxed);
        self.counters.upstream.fetch_add(n, Relaxed);
    }
}

// === impl Direction ===

impl Direction<'_> {
    /// Forwards until `from` finishes sending; an end or a failure is noted as `from`'s.
    fn pump(&self) -> impl Future<Output = io::Result<()>> {
        async move {
            let result = self.forward().await;
            self.tally.ended();
            result
        }
    }

    fn forward(&self) -> impl Future<Output = io::Result<()>> {
        async move {
            let mut full_reads = 0u32;
            let mut splicing = false;
            let mut splice_works = true;
            loop {
                read_ready(self.from).await?;
                let burst = if splicing {
                    match self.splice_burst().await {
                        Ok(Some((burst, moved))) => {
                            // A small burst means the stream is over: copy is cheaper.
                            splicing = moved >= SPLICE_KEEP_BYTES;
                            burst
                        }
                        // No pipe to be had right now: copy this burst.
                        Ok(None) => {
                            splicing = false;
                            self.copy_burst(&mut full_reads).await?
                        }
                        Err(e) if splice::is_unsupported(&e) => {
                            splicing = false;
                            splice_works = false;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                } else {
                    let burst = self.copy_burst(&mut full_reads).await?;
                    if splice_works && full_reads >= SPLICE_AFTER_FULL_READS {
                        splicing = true;
                        full_reads = 0;
                    }
                    burst
                };
                if let Burst::Eof = burst {
                    // The other direction may still flow: pass the FIN on. Unless it already
                    // ended (an error there would have ended the copy), so that this end
                    // ends it: then the caller's close(2) sends the FIN.
                    let last = self.tally.first_end.get().is_some();
                    if !(last && self.closed_after_done) {
                        // The peer may already be gone; its own direction reports that.
                        let _ = SockRef::from(self.to).shutdown(std::net::Shutdown::Write);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Reads until the socket would block (or the direction starts streaming), writing
    /// each read out before the next. Counts consecutive full reads in `full_reads`.
    fn copy_burst(&self, full_reads: &mut u32) -> impl Future<Output = io::Result<Burst>> {
        async move {
            let mut buffer = Buffer::take();
            let buf = buffer.as_mut();
            let fd = self.from.as_fd();
            loop {
                // A short read almost always means the socket is drained: report it to tokio
                // as "would block" so its readiness is cleared now, saving the extra read
                // that would only find nothing. Tokio keeps the readiness if an event
                // arrived meanwhile, so no data is ever left unnoticed.
                let mut short = None;
                let read = self.from.try_io(Interest::READABLE, || {
                    let n = splice::recv(fd, buf)?;
                    if n > 0 && n < buf.len() {
                        short = Some(n);
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n)
                });
                let n = match (read, short) {
                    (Ok(0), _) => return Ok(Burst::Eof),
                    (Ok(n), _) => n,
                    (Err(_), Some(n)) => n,
                    (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(Burst::Drained);
                    }
                    (Err(e), None) => return Err(e),
                };
                self.tally.mark_activity();
                write_all(self.to, &buf[..n]).await?;
                self.tally.count(n as u64);
                if short.is_some() {
                    *full_reads = 0;
                    return Ok(Burst::Drained);
                }
                if n == buf.len() {
                    *full_reads += 1;
                    if *full_reads >= SPLICE_AFTER_FULL_READS {
                        return Ok(Burst::Drained);
                    }
                } else {
                    *full_reads = 0;
                }
            }
        }
    }

    /// Splices until the socket would block. `Ok(None)` when no pipe is available;
    /// otherwise how the burst ended and how many bytes it moved. If this future is
    /// dropped mid-burst, the lease's drop closes the pipe and keeps the pool's counts.
    fn splice_burst(&self) -> impl Future<Output = io::Result<Option<(Burst, u64)>>> {
        async move {
            let Some(mut pipe) = splice::take() else {
                return Ok(None);
            };
            let result = self.splice_through(&mut pipe).await;
            splice::give(pipe);
            result.map(Some)
        }
    }

    fn splice_through(
        &self,
        pipe: &mut splice::Pipe,
    ) -> impl Future<Output = io::Result<(Burst, u64)>> {
        async move {
            let (from, to) = (self.from.as_fd(), self.to.as_fd());
            let mut moved = 0u64;
            loop {
                let n = match self
                    .from
                    .try_io(Interest::READABLE, || pipe.fill_from(from))
                {
                    Ok(0) => return Ok((Burst::Eof, moved)),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok((Burst::Drained, moved));
                    }
                    Err(e) => return Err(e),
                };
                self.tally.mark_activity();
                while pipe.pending() > 0 {
                    match self.to.try_io(Interest::WRITABLE, || pipe.drain_into(to)) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            write_ready(self.to).await?
                        }
                        Err(e) => return Err(e),
                    }
                }
                self.tally.count(n as u64);
                moved += n as u64;
            }
        }
    }
}

/// Waits until `socket` is readable (or may be: the caller's `try_io` clears a spurious
/// readiness). Tokio's `readable()` future carries a waiter node of its own, 152 bytes
/// held by every quiet direction of every idle connection; the poll form keeps the
/// waker in the socket's one reader slot instead. One slot is enough: all the futures
/// of a connection run in its one task, with the same waker.
pub(super) fn read_ready(socket: &TcpStream) -> impl Future<Output = io::Result<()>> {
    std::future::poll_fn(|cx| socket.poll_read_ready(cx))
}

/// [`read_ready`] for writing.
fn write_ready(socket: &TcpStream) -> impl Future<Output = io::Result<()>> {
    std::future::poll_fn(|cx| socket.poll_write_ready(cx))
}

pub(crate) fn write_all(to: &TcpStream, mut data: &[u8]) -> impl Future<Output = io::Result<()>> {
    async move {
        while !data.is_empty() {
            match to.try_write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => write_ready(to).await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

// === impl Buffer ===

impl Buffer {
    pub(super) fn take() -> Self {
        let cached = BUFFERS.with(|cache| cache.borrow_mut().pop());
        Self(Some(cached.unwrap_or_else(|| {
            vec![0u8; COPY_BUFFER].into_boxed_slice()
        })))
    }

    pub(super) fn as_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(buffer) = self.0.take() {
            BUFFERS.with(|cache| {
                let mut cache = cache.borrow_mut();
                if cache.len() < BUFFER_CACHE_PER_THREAD {
                    cache.push(buffer);
                }
            });
        }
    }
}

// === impl Counted ===

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let result = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        // Nothing read into a buffer with room is end of stream.
        match &result {
            Poll::Ready(Ok(())) if n == 0 && room => self.tally.ended(),
            Poll::Ready(Err(_)) => self.tally.ended(),
            _ => {}
        }
        if n > 0 {
            self.tally.mark_activity();
            self.tally.count(n);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A TCP stream that hides its socket, so that the copy takes its buffered path.
    struct Opaque(TcpStream);

    impl Stream for Opaque {}

    impl AsyncRead for Opaque {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Opaque {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, data)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// Both ends of a loopback connection.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connecting, listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// A client end, a proxy-side client stream, a proxy-side upstream stream and an
    /// upstream end; the proxy-side streams hidden from splice when `plain` is false.
    async fn connection(
        plain: bool,
    ) -> (
        TcpStream,
        Either<TcpStream, Opaque>,
        Either<TcpStream, Opaque>,
        TcpStream,
    ) {
        let (client, proxy_client) = socket_pair().await;
        let (proxy_upstream, upstream) = socket_pair().await;
        let wrap = |stream| {
            if plain {
                Either::Left(stream)
            } else {
                Either::Right(Opaque(stream))
            }
        };
        (client, wrap(proxy_client), wrap(proxy_upstream), upstream)
    }

    fn limits(idle_timeout: Option<Duration>) -> Limits<std::future::Pending<()>> {
        Limits {
            idle_timeout,
            closed: std::future::pending(),
            closed_after_done: false,
        }
    }

    struct Meters {
        listener_in: AtomicU64,
        upstream_sent: AtomicU64,
        listener_out: AtomicU64,
        upstream_received: AtomicU64,
    }

    impl Meters {
        fn new() -> Self {
            Self {
                listener_in: AtomicU64::new(0),
                upstream_sent: AtomicU64::new(0),
                listener_out: AtomicU64::new(0),
                upstream_received: AtomicU64::new(0),
            }
        }

        fn inbound(&self) -> Counters<'_> {
            Counters {
                listener: &self.listener_in,
                upstream: &self.upstream_sent,
            }
        }

        fn outbound(&self) -> Counters<'_> {
            Counters {
                listener: &self.listener_out,
                upstream: &self.upstream_received,
            }
        }
    }

    #[tokio::test]
    async fn both_paths_half_close_count_and_name_who_ended_first() {
        for plain in [true, false] {
            let (mut client, mut proxy_client, mut proxy_upstream, mut upstream) =
                connection(plain).await;
            let meters = Meters::new();
            let copying = run(
                &mut proxy_client,
                &mut proxy_upstream,
                limits(None),
                meters.inbound(),
                meters.outbound(),
            );
            let peers = async {
                client.write_all(b"request").await.unwrap();
                client.shutdown().await.unwrap();
                let mut request = Vec::new();
                upstream.read_to_end(&mut request).await.unwrap();
                assert_eq!(request, b"request", "plain: {plain}");
                // The client's half-close left the other direction open.
                upstream.write_all(b"the answer").await.unwrap();
                upstream.shutdown().await.unwrap();
                let mut answer = Vec::new();
                client.read_to_end(&mut answer).await.unwrap();
                assert_eq!(answer, b"the answer", "plain: {plain}");
            };
            let (outcome, ()) = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::join!(copying, peers)
            })
            .await
            .expect("the copy ends");
            assert_eq!(outcome.end, CopyEnd::Done, "plain: {plain}");
            assert_eq!(outcome.first_to_end, Some(Side::Client), "plain: {plain}");
            assert_eq!(
                (outcome.client_to_upstream, outcome.upstream_to_client),
                (7, 10),
                "plain: {plain}"
            );
            assert_eq!(meters.listener_in.load(Relaxed), 7);
            assert_eq!(meters.upstream_sent.load(Relaxed), 7);
            assert_eq!(meters.listener_out.load(Relaxed), 10);
            assert_eq!(meters.upstream_received.load(Relaxed), 10);
        }
    }

    /// With `closed_after_done`, the last direction to end sends no FIN of its own: the
    /// close after the copy does, and the peer sees a clean end of stream then.
    #[tokio::test]
    async fn the_last_fin_is_left_to_the_close_that_follows() {
        let (mut client, proxy_client, proxy_upstream, mut upstream) = connection(true).await;
        let (Either::Left(mut proxy_client), Either::Left(mut proxy_upstream)) =
            (proxy_client, proxy_upstream)
        else {
            unreachable!("plain streams were asked for");
        };
        let meters = Meters::new();
        let then_closed = Limits {
            idle_timeout: None,
            closed: std::future::pending::<()>(),
            closed_after_done: true,
        };
        let copying = run(
            &mut proxy_client,
            &mut proxy_upstream,
            then_closed,
            meters.inbound(),
            meters.outbound(),
        );
        let peers = async {
            client.write_all(b"request").await.unwrap();
            client.shutdown().await.unwrap();
            // The first direction to end still passes its FIN on at once.
            let mut request = Vec::new();
            upstream.read_to_end(&mut request).await.unwrap();
            assert_eq!(request, b"request");
            upstream.write_all(b"the answer").await.unwrap();
            upstream.shutdown().await.unwrap();
            let mut answer = [0u8; 10];
            client.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"the answer");
        };
        let (outcome, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(copying, peers)
        })
        .await
        .expect("the copy ends");
        assert_eq!(outcome.end, CopyEnd::Done);
        let mut rest = [0u8; 1];
        let early = client.try_read(&mut rest);
        assert!(
            matches!(&early, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "the copy sent the last FIN itself: {early:?}"
        );
        drop((proxy_client, proxy_upstream));
        let end = tokio::time::timeout(Duration::from_secs(10), client.read(&mut rest))
            .await
            .expect("the close sends the FIN");
        assert_eq!(end.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn both_paths_end_a_silent_connection_at_the_idle_deadline() {
        for plain in [true, false] {
            let (_client, mut proxy_client, mut proxy_upstream, _upstream) =
                connection(plain).await;
            let meters = Meters::new();
            let started = Instant::now();
            let outcome = run(
                &mut proxy_client,
                &mut proxy_upstream,
                limits(Some(Duration::from_secs(30))),
                meters.inbound(),
                meters.outbound(),
            )
            .await;
            assert_eq!(outcome.end, CopyEnd::Idle, "plain: {plain}");
            assert_eq!(started.elapsed(), Duration::from_secs(30), "plain: {plain}");
            assert_eq!(outcome.first_to_end, None);
        }
    }

    /// What moving a client to another upstream relies on: a copy closed from outside
    /// before any byte leaves the client's stream whole for the next copy.
    #[tokio::test]
    async fn both_paths_leave_the_client_usable_after_a_silent_close() {
        for plain in [true, false] {
            let (mut client, mut proxy_client, mut first_upstream, _hung) = connection(plain).await;
            let meters = Meters::new();
            let closed = Limits {
                idle_timeout: None,
                closed: std::future::ready(()),
                closed_after_done: false,
            };
            let outcome = run(
                &mut proxy_client,
                &mut first_upstream,
                closed,
                meters.inbound(),
                meters.outbound(),
            )
            .await;
            assert_eq!(outcome.end, CopyEnd::Closed, "plain: {plain}");
            assert_eq!(
                (outcome.client_to_upstream, outcome.upstream_to_client),
                (0, 0)
            );

            let (proxy_upstream, mut upstream) = socket_pair().await;
            let mut next_upstream = if plain {
                Either::Left(proxy_upstream)
            } else {
                Either::Right(Opaque(proxy_upstream))
            };
            let copying = run(
                &mut proxy_client,
                &mut next_upstream,
                limits(None),
                meters.inbound(),
                meters.outbound(),
            );
            let peers = async {
                upstream.write_all(b"hello backup\n").await.unwrap();
                let mut greeting = [0u8; 13];
                client.read_exact(&mut greeting).await.unwrap();
                assert_eq!(&greeting, b"hello backup\n", "plain: {plain}");
                drop(upstream);
                client.shutdown().await.unwrap();
            };
            let (outcome, ()) = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::join!(copying, peers)
            })
            .await
            .expect("the copy ends");
            assert_eq!(outcome.upstream_to_client, 13, "plain: {plain}");
        }
    }
}
