//! Graceful shutdown: stop accepting, let connections finish within a grace period,
//! then close what is left.
//!
//! Tokens rather than a broadcast channel, so a task that starts after shutdown began
//! still sees it; the task tracker knows when every connection task has ended.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a drain waits, after the connections, for admin calls accepted just before
/// accepting stopped: enough for any request that had arrived (an event stream would
/// otherwise go on for minutes).
pub const ANSWER_WIND_DOWN: Duration = Duration::from_secs(2);

/// Cheap to clone; every clone controls the same shutdown.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    stop_accepting: CancellationToken,
    force_close: CancellationToken,
    drained: CancellationToken,
    connections: TaskTracker,
    /// Requests accepted for an answer outside the proxied connections (admin calls).
    answers: TaskTracker,
}

// === impl Shutdown ===

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Listeners stop accepting; established connections go on.
    pub fn begin(&self) {
        self.stop_accepting.cancel();
    }

    pub fn is_stopping(&self) -> bool {
        self.stop_accepting.is_cancelled()
    }

    /// Resolves once [`begin`](Self::begin) was called.
    pub async fn stopping(&self) {
        self.stop_accepting.cancelled().await;
    }

    pub fn is_force_closed(&self) -> bool {
        self.force_close.is_cancelled()
    }

    /// Resolves when established connections must close now.
    pub fn force_closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        // Not an async fn: every open connection holds this future, and the wrapper
        // would add its own state to each.
        self.force_close.cancelled()
    }

    pub(crate) fn connections(&self) -> &TaskTracker {
        &self.connections
    }

    /// Resolves once [`drain`](Self::drain) has ended: what outlives accepting (the
    /// controller) stops here, so that a request accepted just before shutdown began, an
    /// admin call racing a binary upgrade above all, is still answered.
    pub async fn drained(&self) {
        self.drained.cancelled().await;
    }

    /// Wraps a task that owes a client an answer (an admin connection), so that
    /// [`drain`](Self::drain) waits for it before the process exits; such tasks wind
    /// down by themselves once accepting stopped.
    pub fn track_answer<F: std::future::Future>(
        &self,
        task: F,
    ) -> tokio_util::task::task_tracker::TrackedFuture<F> {
        self.answers.track_future(task)
    }

    /// Number of connections still open.
    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }

    /// Waits up to `grace` for connections to finish, then closes the rest and waits for
    /// their tasks to end; then up to [`ANSWER_WIND_DOWN`] for admin calls accepted
    /// before accepting stopped. Returns how many connections had to be closed.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.connections.close();
        let left = if tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_ok()
        {
            0
        } else {
            let left = self.connections.len();
            self.force_close.cancel();
            self.connections.wait().await;
            left
        };
        self.answers.close();
        let _ = tokio::time::timeout(ANSWER_WIND_DOWN, self.answers.wait()).await;
        self.drained.cancel();
        left
    }
}

/// Ignores SIGHUP until the reload handler replaces this disposition.
///
/// SIGHUP's default action ends the process, and the reload handler can only be
/// installed once the runtime runs, after the config is loaded: a reload asked for during
/// start-up (a deployment script racing the start) would otherwise kill the proxy. The
/// file read at start is the newest one anyway, so an ignored early SIGHUP loses nothing
/// but a reload of the same file.
#[allow(unsafe_code)]
pub fn ignore_hangup_until_handled() {
    // SAFETY: signal(2) with SIG_IGN installs no handler code, only a disposition; it
    // is called before any other thread exists, so nothing races it.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}
