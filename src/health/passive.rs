//! Passive health: what real traffic reports about upstreams, and the sender the hot
//! path reports through.
//!
//! Defined here, below the controller, so that the routing snapshot can carry the
//! sender without knowing who listens; the controller holds the receiving end. The
//! sender never blocks and never allocates beyond the channel's node, so it is safe on
//! the connect path.

use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::mpsc;

use crate::metrics::{ConnectFailure, UpstreamStats};

/// One observation of real traffic about an upstream (by its id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassiveReport {
    /// A connect attempt failed; `in_a_row` counts since the last success.
    ConnectFailed {
        upstream: u64,
        reason: ConnectFailure,
        in_a_row: u32,
    },
    /// A connect attempt was slow enough to be hedged: worth checking the upstream now.
    Slow { upstream: u64 },
}

/// The hot path's fire-and-forget reports about upstreams. Detached (reporting
/// nowhere) for routes built without a controller.
#[derive(Debug, Clone)]
pub struct Feedback(Option<mpsc::UnboundedSender<PassiveReport>>);

// === impl Feedback ===

impl Feedback {
    /// A sender and the receiver its reports arrive at.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<PassiveReport>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(Some(tx)), rx)
    }

    pub fn detached() -> Self {
        Self(None)
    }

    pub(crate) fn connect_failed(
        &self,
        upstream: u64,
        stats: &UpstreamStats,
        reason: ConnectFailure,
    ) {
        stats.count_connect_failure(reason);
        let in_a_row = stats
            .connect_failures_in_a_row
            .fetch_add(1, Relaxed)
            .saturating_add(1);
        self.report(PassiveReport::ConnectFailed {
            upstream,
            reason,
            in_a_row,
        });
    }

    pub(crate) fn connect_succeeded(&self, stats: &UpstreamStats) {
        // Read first: most connects succeed, and a store on every one would bounce the
        // cache line between cores.
        if stats.connect_failures_in_a_row.load(Relaxed) != 0 {
            stats.connect_failures_in_a_row.store(0, Relaxed);
        }
    }

    pub(crate) fn slow(&self, upstream: u64) {
        self.report(PassiveReport::Slow { upstream });
    }

    fn report(&self, report: PassiveReport) {
        if let Some(tx) = &self.0 {
            // Fails only once the controller has stopped, at shutdown: nothing to do then.
            let _ = tx.send(report);
        }
    }
}
