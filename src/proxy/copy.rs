//! The data path: bytes both ways between client and upstream until both sides are
//! done, with half-close, an idle deadline and live byte counters.
//!
//! Shape of tokio's `copy_bidirectional`: one pump per direction; EOF on one side becomes
//! a write shutdown on the other while the opposite direction keeps flowing; the first
//! error ends both. Each pump is driven by socket readiness and holds no memory while
//! its side is quiet: a copy buffer is borrowed from a per-thread cache only for a burst
//! of reads, so an idle connection costs no userspace buffer. A direction that streams
//! (several full reads in a row) switches to `splice(2)` through a pooled pipe, so bulk
//! transfers never touch user memory, and switches back when its bursts turn small, so
//! request/response traffic keeps the cheaper plain copy. Nothing is logged per read.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

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

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// Where one direction adds its bytes.
pub struct Counters<'a> {
    pub listener: &'a AtomicU64,
    pub upstream: &'a AtomicU64,
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
pub struct FirstEnd(AtomicU8);

// === impl FirstEnd ===

impl FirstEnd {
    pub fn mark(&self, side: Side) {
        let _ = self.0.compare_exchange(0, side as u8, Relaxed, Relaxed);
    }

    pub fn get(&self) -> Option<Side> {
        match self.0.load(Relaxed) {
            1 => Some(Side::Client),
            2 => Some(Side::Upstream),
            _ => None,
        }
    }
}

/// What one direction shares with the rest of the connection.
struct Direction<'a> {
    from: &'a TcpStream,
    /// Which end `from` is.
    side: Side,
    first_end: &'a FirstEnd,
    to: &'a TcpStream,
    counters: Counters<'a>,
    total: &'a AtomicU64,
    /// Milliseconds since `started` of the last byte read, shared by both directions.
    last_activity: &'a AtomicU64,
    started: Instant,
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
struct Buffer(Option<Box<[u8]>>);

/// Copies until both directions are done, an error, the idle deadline or `closed`
/// resolves; the caller closes the streams. `zero_copy` allows the splice path (plain
/// TCP on both sides).
#[allow(clippy::too_many_arguments)]
pub async fn copy_bidirectional(
    client: &TcpStream,
    upstream: &TcpStream,
    idle_timeout: Option<Duration>,
    inbound: Counters<'_>,
    outbound: Counters<'_>,
    zero_copy: bool,
    closed: impl std::future::Future<Output = ()>,
) -> CopyOutcome {
    let started = Instant::now();
    let last_activity = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let first_end = FirstEnd::default();
    let to_upstream = Direction {
        from: client,
        side: Side::Client,
        first_end: &first_end,
        to: upstream,
        counters: inbound,
        total: &sent,
        last_activity: &last_activity,
        started,
    };
    let to_client = Direction {
        from: upstream,
        side: Side::Upstream,
        first_end: &first_end,
        to: client,
        counters: outbound,
        total: &received,
        last_activity: &last_activity,
        started,
    };
    let pumps = async { tokio::try_join!(to_upstream.pump(zero_copy), to_client.pump(zero_copy)) };
    let end = until_end(pumps, idle_timeout, started, &last_activity, closed).await;
    CopyOutcome {
        end,
        client_to_upstream: sent.load(Relaxed),
        upstream_to_client: received.load(Relaxed),
        first_to_end: first_end.get(),
    }
}

/// Runs `copying` until it finishes, the idle deadline passes (no byte read for
/// `idle_timeout` since `last_activity`, milliseconds after `started`), or `closed`
/// resolves; how it ended. Shared by the plain and the TLS copy.
pub(super) async fn until_end<T>(
    copying: impl std::future::Future<Output = io::Result<T>>,
    idle_timeout: Option<Duration>,
    started: Instant,
    last_activity: &AtomicU64,
    closed: impl std::future::Future<Output = ()>,
) -> CopyEnd {
    let idle = async {
        let Some(limit) = idle_timeout else {
            return std::future::pending().await;
        };
        loop {
            let deadline = started + Duration::from_millis(last_activity.load(Relaxed)) + limit;
            if Instant::now() >= deadline {
                return;
            }
            sleep_until(deadline).await;
        }
    };
    tokio::select! {
        result = copying => if result.is_ok() { CopyEnd::Done } else { CopyEnd::Error },
        _ = idle => CopyEnd::Idle,
        _ = closed => CopyEnd::Closed,
    }
}

// === impl Direction ===

impl Direction<'_> {
    /// Forwards until `from` finishes sending; an end or a failure is noted as `from`'s.
    async fn pump(&self, zero_copy: bool) -> io::Result<()> {
        let result = self.forward(zero_copy).await;
        self.first_end.mark(self.side);
        result
    }

    async fn forward(&self, zero_copy: bool) -> io::Result<()> {
        let mut full_reads = 0u32;
        let mut splicing = false;
        let mut splice_works = zero_copy;
        loop {
            self.from.readable().await?;
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
                // The peer may already be gone; its own direction reports that.
                let _ = SockRef::from(self.to).shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
        }
    }

    /// Reads until the socket would block (or the direction starts streaming), writing
    /// each read out before the next. Counts consecutive full reads in `full_reads`.
    async fn copy_burst(&self, full_reads: &mut u32) -> io::Result<Burst> {
        let mut buffer = Buffer::take();
        let buf = buffer.as_mut();
        let fd = self.from.as_raw_fd();
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
            self.mark_activity();
            write_all(self.to, &buf[..n]).await?;
            self.count(n as u64);
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

    /// Splices until the socket would block. `Ok(None)` when no pipe is available;
    /// otherwise how the burst ended and how many bytes it moved. If this future is
    /// dropped mid-burst, the lease's drop closes the pipe and keeps the pool's counts.
    async fn splice_burst(&self) -> io::Result<Option<(Burst, u64)>> {
        let Some(mut pipe) = splice::take() else {
            return Ok(None);
        };
        let result = self.splice_through(&mut pipe).await;
        splice::give(pipe);
        result.map(Some)
    }

    async fn splice_through(&self, pipe: &mut splice::Pipe) -> io::Result<(Burst, u64)> {
        let (from, to) = (self.from.as_raw_fd(), self.to.as_raw_fd());
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
            self.mark_activity();
            while pipe.pending() > 0 {
                match self.to.try_io(Interest::WRITABLE, || pipe.drain_into(to)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.to.writable().await?,
                    Err(e) => return Err(e),
                }
            }
            self.count(n as u64);
            moved += n as u64;
        }
    }

    fn mark_activity(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_activity.store(now, Relaxed);
    }

    fn count(&self, n: u64) {
        self.total.fetch_add(n, Relaxed);
        self.counters.listener.fetch_add(n, Relaxed);
        self.counters.upstream.fetch_add(n, Relaxed);
    }
}

pub(crate) async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// === impl Buffer ===

impl Buffer {
    fn take() -> Self {
        let cached = BUFFERS.with(|cache| cache.borrow_mut().pop());
        Self(Some(cached.unwrap_or_else(|| {
            vec![0u8; COPY_BUFFER].into_boxed_slice()
        })))
    }

    fn as_mut(&mut self) -> &mut [u8] {
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
