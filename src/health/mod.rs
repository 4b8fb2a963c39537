//! Active health checks: one task per upstream that connects (and optionally sends and
//! expects bytes) at `interval`, or `fast_interval` while the upstream's state is being
//! decided, and reports each result ([`CheckReport`]) on a channel the controller reads.
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

pub mod outlier;
pub mod passive;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::config::{HealthConfig, PoolConfig, UpstreamConfig};
use crate::dial::{Unconnected, open};
use crate::error::warn_local_exhaustion;
use crate::metrics::ConnectFailure;
use crate::upstream::Upstream;
use crate::wire::proxy_protocol;

/// The first check of every upstream starts within this, spread at random so that many
/// upstreams are not all connected to at the same instant.
const FIRST_CHECK_SPREAD: Duration = Duration::from_millis(20);

/// Why an active check failed; becomes the reason of a `down` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckFailure {
    Connect(ConnectFailure),
    /// Connected, but sending or the expected reply did not finish within the timeout.
    Timeout,
    ExpectMismatch,
    /// The upstream closed before the expected reply was complete.
    Closed,
    Io,
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
    fn spawn(
        &self,
        upstream: Arc<Upstream>,
        pool: Arc<PoolConfig>,
        reports: CheckReports,
    ) -> Checker;
}

/// Checks over the network: one task per upstream running [`check`].
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
    pub fn as_str(self) -> &'static str {
        match self {
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
    ) -> Checker {
        let checker = Checker::new();
        tokio::spawn(check_loop(
            upstream,
            pool,
            reports,
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
    check_now: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut next = Instant::now() + FIRST_CHECK_SPREAD.mul_f64(fastrand::f64());
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
        // ±10% so that checks started together drift apart.
        next = Instant::now() + interval.mul_f64(0.9 + 0.2 * fastrand::f64());
    }
}

/// One check: connect, then send and expect if configured, all within `timeout`. A
/// pool that sends PROXY headers to its upstreams sends a v2 LOCAL (v1 UNKNOWN) header
/// first, so that a server requiring the header accepts the check.
pub async fn check(upstream: &UpstreamConfig, pool: &PoolConfig) -> Checked {
    let health = &pool.health;
    let deadline = Instant::now() + health.timeout;
    let mut stream = match open(upstream.address, deadline).await {
        Ok(stream) => stream,
        Err(Unconnected::Upstream(reason)) => {
            return Checked::Tested(Err(CheckFailure::Connect(reason)));
        }
        Err(Unconnected::LocalResources(error)) => return Checked::NotRun(error),
    };
    let checked = async {
        if let Some(version) = pool.proxy_protocol {
            let header = proxy_protocol::encode_local(version);
            stream
                .write_all(&header)
                .await
                .map_err(|_| CheckFailure::Io)?;
        }
        match &pool.tls {
            None => exchange(&mut stream, health).await,
            Some(tls) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let mut session = crate::dial::tls(tls, &upstream.target, stream, left)
                    .await
                    .map_err(|_| CheckFailure::Connect(ConnectFailure::Tls))?;
                exchange(&mut session, health).await
            }
        }
    };
    Checked::Tested(
        timeout_at(deadline, checked)
            .await
            .unwrap_or(Err(CheckFailure::Timeout)),
    )
}

/// The send/expect part of a check, over plain TCP or TLS.
async fn exchange<S>(stream: &mut S, health: &HealthConfig) -> Result<(), CheckFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !health.send.is_empty() {
        stream
            .write_all(&health.send)
            .await
            .map_err(|_| CheckFailure::Io)?;
        stream.flush().await.map_err(|_| CheckFailure::Io)?;
    }
    if health.expect.is_empty() {
        if health.send.is_empty() {
            return Ok(());
        }
        // Something was sent: any reply byte passes, none fails. A frozen server still
        // completes the connect and takes the bytes, but never answers.
        let mut byte = [0u8; 1];
        return match stream.read(&mut byte).await {
            Ok(0) => Err(CheckFailure::Closed),
            Ok(_) => Ok(()),
            Err(_) => Err(CheckFailure::Io),
        };
    }
    let mut reply = vec![0u8; health.expect.len()];
    let mut got = 0;
    while got < reply.len() {
        let n = stream
            .read(&mut reply[got..])
            .await
            .map_err(|_| CheckFailure::Io)?;
        if n == 0 {
            return Err(CheckFailure::Closed);
        }
        if reply[got..got + n] != health.expect[got..got + n] {
            return Err(CheckFailure::ExpectMismatch);
        }
        got += n;
    }
    Ok(())
}
