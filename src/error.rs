//! Error types at the crate's boundaries, with messages written for operators.

use std::net::SocketAddr;

use crate::metrics::ConnectFailure;

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

/// Every connect attempt for one client failed.
#[derive(Debug, thiserror::Error)]
#[error("{attempts} connect attempt(s) failed, last to {last_upstream}: {last_reason}")]
pub struct ConnectError {
    pub attempts: usize,
    pub last_upstream: String,
    pub last_reason: ConnectFailure,
}
