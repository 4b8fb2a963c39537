//! TLS on the data path: terminating client sessions, originating sessions to
//! upstreams, and the copy for connections where either side is TLS.
//!
//! The rustls configurations come ready-made from the config (`crate::tls`); this module
//! only runs handshakes, bounded in time, and moves bytes. TLS connections take the
//! buffered copy: splice cannot see through encryption.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::copy::{CopyOutcome, Counters, FirstEnd, Side, until_end};

/// TLS copy buffers; smaller than the plain path's, since a TLS record is at most 16 KiB.
const TLS_BUFFER: usize = 16 * 1024;

/// Replays bytes already read from a socket (after a PROXY header) before the socket's
/// own, so that a TLS handshake sees the client's bytes in order.
pub struct Prefixed {
    prefix: Vec<u8>,
    read: usize,
    pub inner: TcpStream,
}

/// Counts every byte read through it and stamps the connection's last activity.
struct Counted<'a, S> {
    inner: S,
    /// Which end reading from `inner` hears.
    side: Side,
    first_end: &'a FirstEnd,
    counters: &'a Counters<'a>,
    total: &'a AtomicU64,
    last_activity: &'a AtomicU64,
    started: Instant,
}

/// Terminates a client's TLS session; the caller bounds it in time.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    client: TcpStream,
    early: Vec<u8>,
) -> Result<tokio_rustls::server::TlsStream<Prefixed>, String> {
    let stream = Prefixed {
        prefix: early,
        read: 0,
        inner: client,
    };
    TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))
}

/// Originates a TLS session to an upstream within `timeout`.
pub async fn connect(
    tls: &crate::tls::ClientTls,
    target: &str,
    upstream: TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let name = tls
        .server_name(target)
        .ok_or_else(|| format!("no valid server name for {target}"))?;
    let connector = TlsConnector::from(tls.config.clone());
    match tokio::time::timeout(timeout, connector.connect(name, upstream)).await {
        Err(_) => Err("TLS handshake timed out".to_string()),
        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// Like the plain copy (half-close, idle deadline, live counters, `closed`), for any
/// pair of streams.
pub async fn copy_streams<A, B>(
    client: &mut A,
    upstream: &mut B,
    idle_timeout: Option<Duration>,
    inbound: Counters<'_>,
    outbound: Counters<'_>,
    closed: impl std::future::Future<Output = ()>,
) -> CopyOutcome
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last_activity = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let first_end = FirstEnd::default();
    let mut client = Counted {
        inner: client,
        side: Side::Client,
        first_end: &first_end,
        counters: &inbound,
        total: &sent,
        last_activity: &last_activity,
        started,
    };
    let mut upstream = Counted {
        inner: upstream,
        side: Side::Upstream,
        first_end: &first_end,
        counters: &outbound,
        total: &received,
        last_activity: &last_activity,
        started,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        TLS_BUFFER,
        TLS_BUFFER,
    );
    let end = until_end(copy, idle_timeout, started, &last_activity, closed).await;
    CopyOutcome {
        end,
        client_to_upstream: sent.load(Relaxed),
        upstream_to_client: received.load(Relaxed),
        first_to_end: first_end.get(),
    }
}

// === impl Prefixed ===

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read < self.prefix.len() {
            let rest = &self.prefix[self.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.read += n;
            if self.read == self.prefix.len() {
                self.prefix = Vec::new();
                self.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// === impl Counted ===

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        // Nothing read into a buffer with room is end of stream.
        match &result {
            Poll::Ready(Ok(())) if n == 0 && room => self.first_end.mark(self.side),
            Poll::Ready(Err(_)) => self.first_end.mark(self.side),
            _ => {}
        }
        if n > 0 {
            self.total.fetch_add(n, Relaxed);
            self.counters.listener.fetch_add(n, Relaxed);
            self.counters.upstream.fetch_add(n, Relaxed);
            self.last_activity
                .store(self.started.elapsed().as_millis() as u64, Relaxed);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
