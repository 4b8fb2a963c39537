//! Error types at the crate's boundaries, with messages written for operators.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tracing::warn;

use crate::metrics::{ConnectFailure, FailedReason};

/// Failures while starting the proxy (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {listener:?} cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("admin API: {0}")]
    Admin(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// Why one client could not be connected to any upstream.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Every connect attempt failed: the upstreams are to blame (each failure was
    /// counted against its upstream).
    #[error("{attempts} connect attempt(s) failed, last to {last_upstream}: {last_reason}")]
    Upstreams {
        attempts: usize,
        last_upstream: String,
        last_reason: ConnectFailure,
    },
    /// Our side could not open a connection at all (see [`is_local_exhaustion`]); no
    /// upstream is blamed and no other one is tried, since it would fail the same way.
    #[error("cannot open a connection to {upstream}: {source}")]
    LocalResources {
        upstream: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConnectError {
    /// The `reason` label this failure is counted under.
    pub fn reason(&self) -> FailedReason {
        match self {
            ConnectError::Upstreams { .. } => FailedReason::UpstreamsFailed,
            ConnectError::LocalResources { .. } => FailedReason::LocalResources,
        }
    }
}

/// True when opening or connecting a socket failed because this process or host ran
/// out of something — descriptors (EMFILE, ENFILE), kernel memory (ENOBUFS, ENOMEM) or
/// ephemeral ports (EADDRNOTAVAIL) — rather than because of the peer. Such an error
/// says nothing about the upstream: blaming it would eject healthy upstreams and fail
/// over for no reason whenever we are overloaded.
pub fn is_local_exhaustion(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Minimum time between two warnings about local exhaustion. Under exhaustion every
/// connection and check hits it; a line each would add load (and fill disks) exactly
/// when the process is short of resources.
const LOCAL_EXHAUSTION_WARN_EVERY: Duration = Duration::from_secs(10);

/// Warns that `what` failed for lack of local resources, at most once per
/// [`LOCAL_EXHAUSTION_WARN_EVERY`] for the whole process; the warning tells how many
/// were left out since the previous one.
pub fn warn_local_exhaustion(what: &str, error: &std::io::Error) {
    static THROTTLE: Throttle = Throttle::new();
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let now = START.get_or_init(std::time::Instant::now).elapsed();
    if let Some(suppressed) = THROTTLE.allow(now, LOCAL_EXHAUSTION_WARN_EVERY) {
        warn!(
            error = %error,
            suppressed,
            "{what}: out of local resources (file descriptors, memory or ephemeral ports); \
             not counted against the upstream (similar warnings are limited to one per {}s)",
            LOCAL_EXHAUSTION_WARN_EVERY.as_secs()
        );
    }
}

/// Lets one event through per interval, counting the ones it holds back. Lock-free:
/// concurrent callers race on one compare-and-swap and the losers count as held back.
#[derive(Debug)]
pub(crate) struct Throttle {
    /// Milliseconds (since an arbitrary start) of the last event let through, plus one;
    /// zero when none was.
    last: AtomicU64,
    held_back: AtomicU64,
}

impl Throttle {
    pub(crate) const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// Like [`allow`](Self::allow), on the process's own clock.
    pub(crate) fn allow_now(&self, every: Duration) -> Option<u64> {
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        self.allow(START.get_or_init(std::time::Instant::now).elapsed(), every)
    }

    /// `Some(events held back since the last one let through)` when an event at `now`
    /// may pass; `None` (and counted) when it must not.
    fn allow(&self, now: Duration, every: Duration) -> Option<u64> {
        let stamp = u64::try_from(now.as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let every = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        let last = self.last.load(Relaxed);
        let due = last == 0 || stamp.saturating_sub(last) >= every;
        if !due
            || self
                .last
                .compare_exchange(last, stamp, Relaxed, Relaxed)
                .is_err()
        {
            self.held_back.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.held_back.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_event_through_per_interval_and_counts_the_rest() {
        let throttle = Throttle::new();
        let every = Duration::from_secs(10);
        let at = Duration::from_millis;
        assert_eq!(
            throttle.allow(at(0), every),
            Some(0),
            "the first one passes"
        );
        for ms in [1, 500, 9_999] {
            assert_eq!(throttle.allow(at(ms), every), None);
        }
        assert_eq!(throttle.allow(at(10_000), every), Some(3));
        assert_eq!(throttle.allow(at(10_001), every), None);
        assert_eq!(throttle.allow(at(60_000), every), Some(1));
    }

    #[test]
    fn only_our_own_shortages_are_local() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_local_exhaustion(&std::io::Error::from_raw_os_error(
                errno
            )));
        }
        for errno in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
        ] {
            assert!(!is_local_exhaustion(&std::io::Error::from_raw_os_error(
                errno
            )));
        }
        assert!(!is_local_exhaustion(&std::io::ErrorKind::TimedOut.into()));
    }
}
