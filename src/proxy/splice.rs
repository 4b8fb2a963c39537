//! The data path's raw syscalls: zero-copy forwarding with `splice(2)` (socket → pipe →
//! socket, never through user memory) and a plain `recv(2)`. The only module with
//! `unsafe`; each block says why it is sound.
//!
//! Pipes come from a pool: a per-thread cache (no lock on the data path) under a global
//! cap that keeps them within a quarter of the process's file descriptor limit. A pipe
//! is returned only when empty; one that still holds bytes (its connection failed
//! mid-transfer) is closed instead, so no data can leak into another connection.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Bytes one splice call may move; also the pipe size asked for.
pub const CHUNK: usize = 256 * 1024;
/// Idle pipes a worker thread keeps for reuse.
const CACHE_PER_THREAD: usize = 64;

/// A kernel pipe used as the splice buffer of one direction of one connection.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet out.
    pub pending: usize,
}

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
pub fn take() -> Option<Pipe> {
    let cached = CACHE.with(|cache| cache.borrow_mut().pop());
    let pipe = match cached {
        Some(pipe) => pipe,
        None => {
            if OPEN.fetch_add(1, Relaxed) >= cap() {
                OPEN.fetch_sub(1, Relaxed);
                return None;
            }
            match Pipe::new() {
                Ok(pipe) => pipe,
                Err(_) => {
                    OPEN.fetch_sub(1, Relaxed);
                    return None;
                }
            }
        }
    };
    IN_USE.fetch_add(1, Relaxed);
    Some(pipe)
}

/// Returns a pipe. An empty one is cached for reuse; one that still holds bytes is
/// closed.
pub fn give(pipe: Pipe) {
    IN_USE.fetch_sub(1, Relaxed);
    if pipe.pending != 0 {
        drop(pipe);
        OPEN.fetch_sub(1, Relaxed);
        return;
    }
    let overflow = CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.len() < CACHE_PER_THREAD {
            cache.push(pipe);
            None
        } else {
            Some(pipe)
        }
    });
    if overflow.is_some() {
        OPEN.fetch_sub(1, Relaxed);
    }
}

// === impl Pipe ===

impl Pipe {
    fn new() -> io::Result<Self> {
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

    /// Moves up to [`CHUNK`] bytes from socket `from` into the pipe, without blocking.
    /// `Ok(0)` is end of stream.
    pub fn fill_from(&mut self, from: RawFd) -> io::Result<usize> {
        let n = splice(from, self.write.as_raw_fd(), CHUNK)?;
        self.pending += n;
        Ok(n)
    }

    /// Moves pending bytes from the pipe into socket `to`, without blocking.
    pub fn drain_into(&mut self, to: RawFd) -> io::Result<usize> {
        let n = splice(self.read.as_raw_fd(), to, self.pending)?;
        self.pending -= n;
        SPLICED.fetch_add(n as u64, Relaxed);
        Ok(n)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice only reads and writes kernel buffers behind the two descriptors,
    // which the callers keep open for the duration of the call (borrowed from a live
    // TcpStream and from this Pipe); null offsets are required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
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
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most `buf.len()` bytes into memory we exclusively borrow;
    // `fd` is borrowed from a TcpStream the caller keeps alive during the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One non-blocking `recv(2)` with `MSG_PEEK`: the bytes stay queued for the copy.
pub fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: as in `recv`: at most `buf.len()` bytes into memory we exclusively borrow,
    // on a descriptor the caller keeps open.
    let n = unsafe {
        libc::recv(
            fd,
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
