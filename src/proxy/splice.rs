//! The data path's raw syscalls: zero-copy forwarding with `splice(2)` (socket → pipe →
//! socket, never through user memory) and a plain `recv(2)`. The only module with
//! `unsafe`; each block says why it is sound.
//!
//! Pipes come from a pool: a per-thread cache (no lock on the data path) under a global
//! cap that keeps them within a quarter of the process's file descriptor limit; idle
//! cached pipes are kept only while they fill less than half of it. A pipe is returned only when empty;
//! one that still holds bytes (its connection failed mid-transfer) is closed instead,
//! so no data can leak into another connection.
//!
//! The pool's counts are kept by ownership, not by the callers: a [`Pipe`] counts as
//! open from creation until it is closed, and a [`Lease`] counts as in use until it is
//! dropped. A transfer cut mid-splice (its future dropped by an idle timeout, a reset
//! on the other direction, a close) therefore gives its pipe's counts back like any
//! other; a count that leaked would shrink the pool for the life of the process.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Bytes one splice call may move; also the pipe size asked for.
pub const CHUNK: usize = 256 * 1024;
/// Idle pipes a worker thread keeps for reuse.
const CACHE_PER_THREAD: usize = 64;

/// A kernel pipe used as the splice buffer of one direction of one connection. Counted
/// in [`pipes_open`] for as long as it exists.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet out.
    pending: usize,
}

/// A pipe taken from the pool, counted in [`pipes_in_use`] until dropped. Give it back
/// with [`give`] to keep an empty pipe for reuse; dropped any other way (a transfer
/// cut short), it is closed.
#[derive(Debug)]
pub struct Lease {
    pipe: Pipe,
    _in_use: InUse,
}

/// One count in [`IN_USE`], released on drop.
#[derive(Debug)]
struct InUse(());

/// Pipes that exist (cached or in use); bounded by [`cap`].
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// Pipes taken and not given back.
static IN_USE: AtomicUsize = AtomicUsize::new(0);
/// Bytes moved through pipes since start (what tests and benchmarks look at).
static SPLICED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static CACHE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// How many pipes may exist: a quarter of RLIMIT_NOFILE in descriptors (two per pipe),
/// so that pipes never starve the connections themselves of descriptors.
pub fn cap() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own and pass by valid pointer.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
        let descriptors = if ok { limit.rlim_cur } else { 1024 };
        usize::try_from(descriptors / 8).unwrap_or(usize::MAX / 8)
    })
}

/// Pipes currently held by connections (not counting idle cached ones).
pub fn pipes_in_use() -> usize {
    IN_USE.load(Relaxed)
}

/// Bytes moved by splice since the process started.
pub fn bytes_spliced() -> u64 {
    SPLICED.load(Relaxed)
}

/// Pipes open in the process, cached or in use.
pub fn pipes_open() -> usize {
    OPEN.load(Relaxed)
}

/// A pipe for one direction, or `None` when the pool is exhausted (the caller copies).
pub fn take() -> Option<Lease> {
    let cached = CACHE.with(|cache| cache.borrow_mut().pop());
    let pipe = match cached {
        Some(pipe) => pipe,
        None => {
            if OPEN.fetch_add(1, Relaxed) >= cap() {
                OPEN.fetch_sub(1, Relaxed);
                return None;
            }
            match Pipe::open() {
                Ok(pipe) => pipe,
                Err(_) => {
                    // No pipe exists to hand the reserved count to.
                    OPEN.fetch_sub(1, Relaxed);
                    return None;
                }
            }
        }
    };
    Some(Lease {
        pipe,
        _in_use: InUse::enter(),
    })
}

/// Returns a pipe. An empty one is cached for reuse; one that still holds bytes is
/// closed, and so is an empty one when idle pipes already fill half the cap: an idle
/// pipe sits in one thread's cache, out of reach of the others, and idle pipes must
/// never hold so much of the cap that a thread with an empty cache gets none.
pub fn give(lease: Lease) {
    let Lease { pipe, _in_use } = lease;
    // This lease still counts as in use, so `idle` leaves it out.
    let idle = OPEN.load(Relaxed).saturating_sub(IN_USE.load(Relaxed));
    if pipe.pending != 0 || idle >= cap() / 2 {
        return;
    }
    // `try_with`: during thread teardown the cache is gone, and the pipe just closes.
    let _ = CACHE.try_with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.len() < CACHE_PER_THREAD {
            cache.push(pipe);
        }
    });
}

// === impl InUse ===

impl InUse {
    fn enter() -> Self {
        IN_USE.fetch_add(1, Relaxed);
        Self(())
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        IN_USE.fetch_sub(1, Relaxed);
    }
}

// === impl Lease ===

impl Deref for Lease {
    type Target = Pipe;

    fn deref(&self) -> &Pipe {
        &self.pipe
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut Pipe {
        &mut self.pipe
    }
}

// === impl Pipe ===

impl Pipe {
    /// A new pipe; the caller has already counted it in [`OPEN`], and its drop
    /// uncounts it.
    fn open() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array we own; on success both
        // are fresh descriptors owned by nobody else.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created by pipe2 and are owned only here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per call; failing to grow it only costs speed.
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(Self {
            read,
            write,
            pending: 0,
        })
    }

    /// Bytes spliced in and not yet out.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Moves up to [`CHUNK`] bytes from socket `from` into the pipe, without blocking.
    /// `Ok(0)` is end of stream.
    pub fn fill_from(&mut self, from: BorrowedFd<'_>) -> io::Result<usize> {
        let n = splice(from, self.write.as_fd(), CHUNK)?;
        self.pending += n;
        Ok(n)
    }

    /// Moves pending bytes from the pipe into socket `to`, without blocking.
    pub fn drain_into(&mut self, to: BorrowedFd<'_>) -> io::Result<usize> {
        let n = splice(self.read.as_fd(), to, self.pending)?;
        self.pending -= n;
        SPLICED.fetch_add(n as u64, Relaxed);
        Ok(n)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // Both descriptors close right after this, with the fields.
        OPEN.fetch_sub(1, Relaxed);
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: splice only reads and writes kernel buffers behind the two descriptors,
    // which the borrows keep open for the duration of the call; null offsets are
    // required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One non-blocking `recv(2)` into `buf`. The copy path calls it inside tokio's
/// `try_io`, so that a short read can clear the socket's readiness at once instead of
/// paying for one more read that would only say "would block".
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most `buf.len()` bytes into memory we exclusively borrow;
    // the borrow keeps `fd` open during the call.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One non-blocking `recv(2)` with `MSG_PEEK`: the bytes stay queued for the copy.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: as in `recv`: at most `buf.len()` bytes into memory we exclusively borrow,
    // on a descriptor the borrow keeps open.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Errors meaning splice cannot work on these descriptors: fall back to copying.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // The only test in this binary that touches the pool's process-wide counts.
    #[test]
    fn a_lease_dropped_mid_transfer_gives_its_counts_back() {
        let (open, in_use) = (pipes_open(), pipes_in_use());
        let mut lease = take().expect("a pipe");
        assert_eq!(pipes_in_use(), in_use + 1);
        // As if the transfer was cut with bytes still in the pipe.
        lease.pending = 1;
        drop(lease);
        assert_eq!(pipes_in_use(), in_use);
        assert_eq!(pipes_open(), open, "the pipe was closed and uncounted");

        let lease = take().expect("a pipe");
        give(lease);
        assert_eq!(pipes_in_use(), in_use);
        assert_eq!(pipes_open(), open + 1, "an empty pipe is cached");
        let lease = take().expect("the cached pipe");
        assert_eq!(pipes_open(), open + 1, "reused, not a new one");
        drop(lease);
        assert_eq!(pipes_open(), open);
    }
}
