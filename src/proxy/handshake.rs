//! What a connection says before its bytes are copied: on the client side, the PROXY
//! header it must send and the ClientHello SNI routing peeks at; on the upstream side,
//! the PROXY header we send. One function per role; the formats are `crate::wire`'s.
//!
//! Every client-side step runs under one deadline from accept (`handshake_timeout`), so
//! that a slow client cannot buy a fresh timeout per step.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::debug;

use super::access_log::{ConnectionRecord, End};
use super::listener::ListenerContext;
use super::{copy, splice};
use crate::metrics::RejectReason;
use crate::shutdown::Shutdown;
use crate::wire::client_hello::{self, MAX_PEEK_LEN};
use crate::wire::proxy_protocol::{self, Version};

/// A client-side step before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    ProxyHeader,
    ClientHello,
    TlsHandshake,
}

/// Why a client was refused before it was routed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("no complete {0} within handshake_timeout")]
    Timeout(Step),
    #[error("closed before the {0} was complete")]
    Closed(Step),
    #[error("reading the {0}: {1}")]
    Io(Step, #[source] io::Error),
    #[error(transparent)]
    ProxyHeader(#[from] proxy_protocol::DecodeError),
    #[error(transparent)]
    ClientHello(#[from] client_hello::SniError),
    #[error("ClientHello larger than {MAX_PEEK_LEN} bytes")]
    ClientHelloTooLarge,
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
}

/// The client-side steps of one connection, under one deadline.
pub struct Handshake<'a> {
    pub context: &'a ListenerContext,
    pub shutdown: &'a Shutdown,
    /// Accept time plus `handshake_timeout`.
    pub deadline: tokio::time::Instant,
}

impl Handshake<'_> {
    /// Runs one step. A refused client is counted by its reason and `None` returned; a
    /// client still handshaking when the shutdown grace ends is closed with the rest,
    /// not waited for.
    pub async fn run<T>(
        &self,
        step: Step,
        work: impl Future<Output = Result<T, HandshakeError>>,
        record: &mut ConnectionRecord<'_>,
    ) -> Option<T> {
        let bounded = tokio::time::timeout_at(self.deadline, work);
        let outcome = tokio::select! {
            outcome = bounded => outcome.unwrap_or(Err(HandshakeError::Timeout(step))),
            _ = self.shutdown.force_closed() => {
                record.end = End::Shutdown;
                debug!("shutdown grace ended during the {step}; closing");
                return None;
            }
        };
        match outcome {
            Ok(value) => Some(value),
            Err(error) => {
                let reason = error.reject_reason();
                self.context.stats.reject(reason);
                record.reject(reason);
                debug!(%error, "client refused before routing; closing");
                None
            }
        }
    }
}

/// Reads until a complete PROXY header has arrived; returns it and the bytes after it.
pub async fn expect_proxy_header(
    client: &TcpStream,
    accept: proxy_protocol::Accept,
) -> Result<(proxy_protocol::Header, Vec<u8>), HandshakeError> {
    let io_error = |e| HandshakeError::Io(Step::ProxyHeader, e);
    let mut buf = vec![0u8; proxy_protocol::MAX_HEADER_LEN];
    let mut filled = 0;
    loop {
        client.readable().await.map_err(io_error)?;
        match client.try_read(&mut buf[filled..]) {
            Ok(0) => return Err(HandshakeError::Closed(Step::ProxyHeader)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(io_error(e)),
        }
        if let Some((header, used)) = proxy_protocol::decode(&buf[..filled], accept)? {
            return Ok((header, buf[used..filled].to_vec()));
        }
    }
}

/// Sends the pool's PROXY header for a client from `source` to `destination`.
pub async fn send_proxy_header(
    upstream: &TcpStream,
    version: Version,
    source: SocketAddr,
    destination: SocketAddr,
) -> io::Result<()> {
    copy::write_all(
        upstream,
        &proxy_protocol::encode(version, source, destination),
    )
    .await
}

/// Peeks (without consuming) until the whole ClientHello is visible; returns its server
/// name. `early` are bytes already read after a PROXY header: the hello starts there.
///
/// Every turn of the loop either sees new bytes or awaits readiness, and a client that
/// closed its write side with an incomplete hello is an error at once: peeking the same
/// bytes again would otherwise spin without ever yielding to the timer.
pub async fn peek_server_name(
    client: &TcpStream,
    early: &[u8],
) -> Result<Option<String>, HandshakeError> {
    let io_error = |e| HandshakeError::Io(Step::ClientHello, e);
    let closed = || HandshakeError::Closed(Step::ClientHello);
    let fd = std::os::fd::AsFd::as_fd(client);
    let start = early.len();
    let mut buf = vec![0u8; (start + 4096).min(MAX_PEEK_LEN.max(start))];
    buf[..start].copy_from_slice(early);
    let mut seen = 0;
    loop {
        if let Some(info) = client_hello::parse_client_hello(&buf[..start + seen])? {
            return Ok(info.server_name);
        }
        if start + seen == buf.len() {
            if buf.len() >= MAX_PEEK_LEN {
                return Err(HandshakeError::ClientHelloTooLarge);
            }
            buf.resize((buf.len() * 2).min(MAX_PEEK_LEN), 0);
        }
        let space = &mut buf[start..];
        let peeked = client.try_io(Interest::READABLE, || {
            let n = splice::peek(fd, space)?;
            // Nothing new since the last look: report "would block" so that tokio
            // clears the readiness and waits for the next arrival.
            if n != 0 && n == seen {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match peeked {
            Ok(0) => return Err(closed()),
            Ok(n) => seen = n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let ready = client.ready(Interest::READABLE).await.map_err(io_error)?;
                // A closed read side stays readable for ever. Bytes may have arrived
                // together with the FIN, so look once more before giving up.
                if ready.is_read_closed() {
                    let n = splice::peek(fd, &mut buf[start..]).map_err(io_error)?;
                    if n == seen {
                        return Err(closed());
                    }
                    seen = n;
                }
            }
            Err(e) => return Err(io_error(e)),
        }
        // Belt and braces: whatever the socket reports, this loop gives the scheduler
        // (and the handshake deadline) a turn when it runs long.
        tokio::task::coop::consume_budget().await;
    }
}

// === impl Step ===

impl Step {
    /// How a client that fails this step (other than by the deadline) is counted.
    fn reject_reason(self) -> RejectReason {
        match self {
            Step::ProxyHeader => RejectReason::ProxyProtocol,
            Step::ClientHello => RejectReason::ClientHello,
            Step::TlsHandshake => RejectReason::TlsHandshake,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::ProxyHeader => "PROXY header",
            Step::ClientHello => "ClientHello",
            Step::TlsHandshake => "TLS handshake",
        })
    }
}

// === impl HandshakeError ===

impl HandshakeError {
    pub fn step(&self) -> Step {
        match self {
            Self::Timeout(step) | Self::Closed(step) | Self::Io(step, _) => *step,
            Self::ProxyHeader(_) => Step::ProxyHeader,
            Self::ClientHello(_) | Self::ClientHelloTooLarge => Step::ClientHello,
            Self::Tls(_) => Step::TlsHandshake,
        }
    }

    /// The `reason` of `switchyard_connections_rejected_total`.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            Self::Timeout(_) => RejectReason::HandshakeTimeout,
            other => other.step().reject_reason(),
        }
    }
}
