//! One upstream as the process knows it for as long as its pool and address stay in the
//! config: identity, config entry and counters. Below the routing snapshot, the health
//! checks and the proxy, which all hold it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::UpstreamConfig;
use crate::metrics::UpstreamStats;

/// One upstream, long-lived: the same object across snapshots while its pool and
/// address stay in the config.
#[derive(Debug)]
pub struct Upstream {
    /// Unique in the process; how the controller recognises feedback about it.
    pub id: u64,
    pub pool: String,
    pub config: UpstreamConfig,
    pub stats: Arc<UpstreamStats>,
}

// === impl Upstream ===

impl Upstream {
    pub fn new(pool: &str, config: UpstreamConfig) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Relaxed),
            pool: pool.to_string(),
            config,
            stats: Arc::default(),
        }
    }

    /// The same upstream (identity and counters) under a changed config entry, e.g. a
    /// new priority or weight after a reload.
    pub fn carried(&self, config: UpstreamConfig) -> Self {
        Self {
            id: self.id,
            pool: self.pool.clone(),
            config,
            stats: self.stats.clone(),
        }
    }

    pub fn label(&self) -> &str {
        self.config.label()
    }
}
