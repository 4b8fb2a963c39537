//! One active check: connect to the check target, send the PROXY header and do the TLS
//! handshake as the pool's traffic does, then ask what the check kind asks (one module
//! per kind). All within the check timeout, and reading at most [`MAX_REPLY`] bytes: a
//! server that answers slowly, endlessly or with garbage fails its check, never stalls
//! or exhausts the proxy.

mod http;
mod mysql;
mod postgres;
mod redis;
mod send_expect;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use socket2::SockRef;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, timeout_at};

use super::{CheckFailure, Checked};
use crate::config::{CheckKind, CheckTarget, PoolConfig, UpstreamConfig};
use crate::dial::{Unconnected, open};
use crate::metrics::ConnectFailure;
use crate::wire::proxy_protocol;

/// Most bytes one check reads from a server, whatever its kind: far above any real
/// answer, a hard stop for a server that sends without end.
pub const MAX_REPLY: usize = 256 * 1024;

/// Most characters of a server's words quoted in a failure reason.
const MAX_QUOTED: usize = 200;

/// One check: connect, then the pool's check kind, all within `timeout`. A pool that
/// sends PROXY headers to its upstreams sends a v2 LOCAL (v1 UNKNOWN) header first when
/// the check goes to the upstream itself, so that a server requiring the header accepts
/// the check; a separate check target is another service and gets none.
pub async fn check(upstream: &UpstreamConfig, pool: &PoolConfig) -> Checked {
    let health = &pool.health;
    let deadline = Instant::now() + health.timeout;
    let (address, target) = health.target.resolve(upstream.address, &upstream.target);
    let mut stream = match open(address, deadline).await {
        Ok(stream) => stream,
        Err(Unconnected::Upstream(reason)) => {
            return Checked::Tested(Err(CheckFailure::Connect(reason)));
        }
        Err(Unconnected::LocalResources(error)) => return Checked::NotRun(error),
    };
    if closes_with_reset(&health.kind) {
        // As HAProxy does: a check's connection ends with a reset, not a FIN exchange
        // and a TIME_WAIT socket per check (1,000 upstreams every second are 60,000
        // sockets in TIME_WAIT). Where it fails, the close is only more expensive.
        let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    let checked = async {
        if let Some(version) = pool.proxy_protocol
            && health.target == CheckTarget::Upstream
        {
            let header = proxy_protocol::encode_local(version);
            stream
                .write_all(&header)
                .await
                .map_err(|_| CheckFailure::Io)?;
        }
        match &pool.tls {
            None => ask(Bounded::new(stream), &health.kind, &target).await,
            Some(tls) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let session = Box::pin(crate::dial::tls(tls, &target, stream, left))
                    .await
                    .map_err(|_| CheckFailure::Connect(ConnectFailure::Tls))?;
                Box::pin(ask(Bounded::new(session), &health.kind, &target)).await
            }
        }
    };
    Checked::Tested(
        timeout_at(deadline, checked)
            .await
            .unwrap_or(Err(CheckFailure::Timeout)),
    )
}

/// Whether a check of `kind` may end its connection with a reset: not where the server
/// would log it as a client gone wrong (PostgreSQL, MySQL: their checks end the session
/// as a client does).
fn closes_with_reset(kind: &CheckKind) -> bool {
    match kind {
        CheckKind::Tcp
        | CheckKind::SendExpect { .. }
        | CheckKind::Http(_)
        | CheckKind::Redis(_) => true,
        CheckKind::Postgres(_) | CheckKind::Mysql => false,
    }
}

/// The kind's exchange over plain TCP or TLS; `target` is the `host:port` checked.
async fn ask<S>(mut stream: Bounded<S>, kind: &CheckKind, target: &str) -> Result<(), CheckFailure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // The protocol kinds' futures are boxed: the checker task of every upstream holds
    // its check's future, and a PostgreSQL login inline would make each of them 12 KiB
    // (12 MB resident for 1,000 upstreams, and as much copied at each spawn).
    match kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::SendExpect { send, expect } => send_expect::ask(&mut stream, send, expect).await,
        CheckKind::Http(http) => Box::pin(http::ask(&mut stream, http, target)).await,
        CheckKind::Postgres(pg) => Box::pin(postgres::ask(stream, pg)).await,
        CheckKind::Redis(redis) => Box::pin(redis::ask(&mut stream, redis)).await,
        CheckKind::Mysql => Box::pin(mysql::ask(&mut stream)).await,
    }
}

/// A failure that quotes the server: `prefix` and its words, made printable and
/// shortened (a reason lands in logs, events and the status table).
fn said(prefix: &str, words: &[u8]) -> CheckFailure {
    let text = String::from_utf8_lossy(words);
    let mut quoted: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_QUOTED)
        .collect();
    if text.trim().chars().count() > MAX_QUOTED {
        quoted.push('…');
    }
    CheckFailure::Answered(Arc::from(format!("{prefix}{quoted}")))
}

/// A plain failure reason of the kind's own, e.g. `"redis: malformed reply"`.
fn failed(reason: impl Into<String>) -> CheckFailure {
    CheckFailure::Answered(Arc::from(reason.into()))
}

/// What a failed read means: past [`MAX_REPLY`], or the connection broke.
fn read_failed(error: io::Error) -> CheckFailure {
    if error.get_ref().is_some_and(|e| e.is::<TooLong>()) {
        failed(format!("reply longer than {} KiB", MAX_REPLY / 1024))
    } else if error.kind() == io::ErrorKind::UnexpectedEof {
        CheckFailure::Closed
    } else {
        CheckFailure::Io
    }
}

/// Writes a whole request and flushes it (a TLS session holds bytes until flushed).
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), CheckFailure> {
    stream
        .write_all(bytes)
        .await
        .map_err(|_| CheckFailure::Io)?;
    stream.flush().await.map_err(|_| CheckFailure::Io)
}

/// Reads exactly `buf.len()` bytes; closing before is [`CheckFailure::Closed`].
async fn read_exact<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
) -> Result<(), CheckFailure> {
    stream.read_exact(buf).await.map(drop).map_err(read_failed)
}

/// A stream that fails reads once [`MAX_REPLY`] bytes have been read.
struct Bounded<S> {
    inner: S,
    left: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("the server sent more than a check reads")]
struct TooLong;

impl<S> Bounded<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            left: MAX_REPLY,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.left == 0 {
            return Poll::Ready(Err(io::Error::other(TooLong)));
        }
        let room = buf.remaining().min(this.left);
        // A window of at most `left` bytes; initialising it costs little on a check and
        // keeps this free of unsafe code.
        let mut window = ReadBuf::new(&mut buf.initialize_unfilled_to(room)[..room]);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut window))?;
        let n = window.filled().len();
        this.left -= n;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
