//! Active health checks: one task per upstream that checks it ([`check()`]: connect, then
//! the pool's check kind) at `interval`, or `fast_interval` while the upstream's state is
//! being decided, and reports each result ([`CheckReport`]) on a channel the controller reads.
//!
//! The checker owns no state: the controller applies the result and answers with the
//! interval to wait, so the schedule always follows the state it just computed. A
//! passive failure on real traffic ([`passive`]) wakes the checker for an immediate
//! check. The controller starts checkers through [`SpawnChecker`], so that its tests
//! can hand it checkers that never touch the network.
//!
//! A check that cannot even open its socket (the proxy is out of descriptors, memory or
//! ports) did not test the upstream: it is neither a pass nor a failure, is not
//! reported, and is tried again at the next interval.

pub mod check;
pub mod outlier;
pub mod passive;
pub mod state;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

pub use check::check;

use crate::config::PoolConfig;
use crate::error::warn_local_exhaustion;
use crate::metrics::ConnectFailure;
use crate::upstream::Upstream;

/// The first check of every upstream starts within this, spread at random so that many
/// upstreams are not all connected to at the same instant.
const FIRST_CHECK_SPREAD: Duration = Duration::from_millis(20);

/// Checks fall due on a grid of this fraction of their interval (at most
/// [`MAX_CHECK_STEP`]), shared by every checker: checks due within one step start at
/// one wake-up of the runtime instead of one wake-up each. With 1,000 upstreams checked
/// every second that is ten checks per wake-up instead of one, for a delay of at most
/// 1 % of the interval.
const CHECK_STEPS_PER_INTERVAL: u32 = 100;
const MAX_CHECK_STEP: Duration = Duration::from_millis(10);

/// Why an active check failed; becomes the reason of a `down` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckFailure {
    Connect(ConnectFailure),
    /// Connected, but sending or the expected reply did not finish within the timeout.
    Timeout,
    ExpectMismatch,
    /// The upstream closed before the expected reply was complete.
    Closed,
    Io,
    /// The server answered, and what it said fails the check: `http 503`, `postgres:
    /// the database system is starting up`, `redis role:slave`.
    Answered(Arc<str>),
}

/// What one check found.
#[derive(Debug)]
pub enum Checked {
    /// The upstream answered as configured (`Ok`) or failed (`Err`).
    Tested(Result<(), CheckFailure>),
    /// The check never reached the upstream: the proxy could not open a connection
    /// (out of descriptors, memory or ports). Says nothing about the upstream.
    NotRun(std::io::Error),
}

/// One finished check of upstream `upstream` (by id). The checker waits for `reply`,
/// the interval until its next check.
#[derive(Debug)]
pub struct CheckReport {
    pub upstream: u64,
    pub result: Result<(), CheckFailure>,
    pub reply: oneshot::Sender<Duration>,
}

/// Where checkers send their reports.
pub type CheckReports = mpsc::UnboundedSender<CheckReport>;

/// Starts the checker of one upstream. The controller is given one, so that what runs
/// the checks (real connections, or a test's hand) is not its concern.
pub trait SpawnChecker: Send + Sync {
    /// `checked_within`: `None` for an upstream never checked (its first check comes
    /// at once, within [`FIRST_CHECK_SPREAD`]), or the interval after which an upstream
    /// just checked (a reload's first check) is checked next.
    fn spawn(
        &self,
        upstream: Arc<Upstream>,
        pool: Arc<PoolConfig>,
        reports: CheckReports,
        checked_within: Option<Duration>,
    ) -> Checker;
}

/// Checks over the network: one task per upstream running [`check()`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NetworkChecks;

/// The controller's end of one checker task.
#[derive(Debug)]
pub struct Checker {
    check_now: Arc<Notify>,
    stop: CancellationToken,
}

// === impl CheckFailure ===

impl CheckFailure {
    pub fn as_str(&self) -> &str {
        match self {
            CheckFailure::Answered(said) => said,
            CheckFailure::Connect(ConnectFailure::Refused) => "connect refused",
            CheckFailure::Connect(ConnectFailure::Reset) => "connection reset",
            CheckFailure::Connect(ConnectFailure::Unreachable) => "unreachable",
            CheckFailure::Connect(ConnectFailure::Timeout) => "connect timeout",
            CheckFailure::Connect(ConnectFailure::Tls) => "TLS handshake failed",
            CheckFailure::Connect(ConnectFailure::FirstByteTimeout) => "no answer",
            CheckFailure::Connect(ConnectFailure::Error) => "connect error",
            CheckFailure::Timeout => "check timeout",
            CheckFailure::ExpectMismatch => "expect mismatch",
            CheckFailure::Closed => "closed before reply",
            CheckFailure::Io => "check I/O error",
        }
    }
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl NetworkChecks ===

impl SpawnChecker for NetworkChecks {
    /// Needs a running tokio runtime.
    fn spawn(
        &self,
        upstream: Arc<Upstream>,
        pool: Arc<PoolConfig>,
        reports: CheckReports,
        checked_within: Option<Duration>,
    ) -> Checker {
        let checker = Checker::new();
        tokio::spawn(check_loop(
            upstream,
            pool,
            reports,
            checked_within,
            checker.woken(),
            checker.stopped(),
        ));
        checker
    }
}

// === impl Checker ===

impl Checker {
    /// The handle to a checker task that watches [`Checker::woken`] and stops when the
    /// handle is dropped ([`Checker::stopped`]).
    pub fn new() -> Self {
        Self {
            check_now: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
        }
    }

    /// What the task waits on to check at once.
    pub fn woken(&self) -> Arc<Notify> {
        self.check_now.clone()
    }

    /// Cancelled once the controller drops this checker.
    pub fn stopped(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs a check now (or right after the one in progress).
    pub fn check_now(&self) {
        self.check_now.notify_one();
    }
}

impl Default for Checker {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn check_loop(
    upstream: Arc<Upstream>,
    pool: Arc<PoolConfig>,
    reports: CheckReports,
    checked_within: Option<Duration>,
    check_now: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut next = match checked_within {
        None => Instant::now() + FIRST_CHECK_SPREAD.mul_f64(fastrand::f64()),
        // Checked a moment ago (a reload checks what it adds before the swap): a second
        // check at once would only double the burst of a large reload.
        Some(interval) => jittered(interval),
    };
    // Until the controller answers, the configured interval.
    let mut interval = pool.health.interval;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = sleep_until(next) => {}
            _ = check_now.notified() => {}
        }
        let checked = tokio::select! {
            _ = stop.cancelled() => return,
            checked = check(&upstream.config, &pool) => checked,
        };
        match checked {
            Checked::Tested(result) => {
                let (reply, answer) = oneshot::channel();
                if reports
                    .send(CheckReport {
                        upstream: upstream.id,
                        result,
                        reply,
                    })
                    .is_err()
                {
                    // The controller has stopped: so has the proxy.
                    return;
                }
                let Ok(answer) = answer.await else {
                    return;
                };
                interval = answer;
            }
            Checked::NotRun(error) => {
                upstream.stats.checks_not_run.fetch_add(1, Relaxed);
                warn_local_exhaustion("health check not run", &error);
            }
        }
        next = jittered(interval);
    }
}

/// When the next check after `interval` is due: ±10% so that checks started together
/// drift apart, then on the checks' grid.
fn jittered(interval: Duration) -> Instant {
    on_check_grid(
        Instant::now() + interval.mul_f64(0.9 + 0.2 * fastrand::f64()),
        interval,
    )
}

/// `at`, or the first step of the checks' grid after it (see [`CHECK_STEPS_PER_INTERVAL`]).
fn on_check_grid(at: Instant, interval: Duration) -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let step = (interval / CHECK_STEPS_PER_INTERVAL)
        .min(MAX_CHECK_STEP)
        .as_nanos();
    if step == 0 {
        return at;
    }
    let since = at.saturating_duration_since(origin).as_nanos();
    let aligned = since.div_ceil(step) * step;
    match u64::try_from(aligned) {
        Ok(nanos) => origin + Duration::from_nanos(nanos),
        Err(_) => at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_due_within_one_step_start_together_and_never_early() {
        let now = Instant::now();
        let second = Duration::from_secs(1);
        for offset_ms in [0, 1, 3, 9, 10, 11, 995, 1_000, 5_003] {
            let at = now + Duration::from_millis(offset_ms);
            let due = on_check_grid(at, second);
            assert!(due >= at, "never before it is due");
            assert!(due - at <= MAX_CHECK_STEP, "at most one step late");
        }
        // Checks due anywhere within the step before a grid point wake together...
        let point = on_check_grid(now + Duration::from_secs(2), second);
        for early_ms in [0, 3, 9] {
            let at = point - Duration::from_millis(early_ms);
            assert_eq!(on_check_grid(at, second), point);
        }
        // ...and a short interval gets a fine grid: 1 % of it.
        let fast = Duration::from_millis(50);
        let at = now + Duration::from_micros(7_100);
        let due = on_check_grid(at, fast);
        assert!(due >= at && due - at <= fast / CHECK_STEPS_PER_INTERVAL);
        // Below a nanosecond of step there is no grid.
        let tiny = Duration::from_nanos(50);
        assert_eq!(on_check_grid(at, tiny), at);
    }

    /// Every upstream's checker task lives as long as the upstream: with 1,000
    /// upstreams its size is resident 1,000 times and copied at each spawn (a reload
    /// adding 1,000 pools spent most of its swap there when it was 12 KiB).
    #[test]
    fn a_checker_task_stays_small() {
        const BOUND: usize = 1_024;
        let text = "[listeners.l]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\
                    [pools.p]\nupstreams = [{ address = \"127.0.0.1:1\" }]\n";
        let config = match crate::config::Config::parse(text, std::path::Path::new("t.toml")) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        };
        let pool = config.pools[0].clone();
        let upstream = Arc::new(Upstream::new("p", pool.upstreams[0].clone()));
        let (reports, _) = mpsc::unbounded_channel();
        let checker = Checker::new();
        let task = check_loop(
            upstream,
            pool,
            reports,
            None,
            checker.woken(),
            checker.stopped(),
        );
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= BOUND,
            "a checker task is {size} bytes, bound {BOUND}"
        );
    }
}
