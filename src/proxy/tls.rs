//! TLS on the data path: terminating client sessions and originating sessions to
//! upstreams.
//!
//! The rustls configurations come ready-made from the config (`crate::tls`); this module
//! only runs handshakes, bounded in time. The sessions it returns are copied like any
//! other stream (`copy::run`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

/// The client side of a connection: its socket, or the TLS session this listener
/// terminated on it.
pub type ClientStream = Either<TcpStream, Box<tokio_rustls::server::TlsStream<Prefixed>>>;

/// The upstream side of a connection: its socket, or the TLS session we originated on it.
pub type UpstreamStream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The client's TCP socket, under its TLS session if any.
pub fn client_socket(client: &ClientStream) -> &TcpStream {
    match client {
        Either::Left(socket) => socket,
        Either::Right(session) => &session.get_ref().0.inner,
    }
}

/// The upstream's TCP socket, under its TLS session if any.
pub fn upstream_socket(upstream: &UpstreamStream) -> &TcpStream {
    match upstream {
        Either::Left(socket) => socket,
        Either::Right(session) => session.get_ref().0,
    }
}

/// Replays bytes already read from a socket (after a PROXY header) before the socket's
/// own, so that a TLS handshake sees the client's bytes in order.
pub struct Prefixed {
    prefix: Vec<u8>,
    read: usize,
    pub inner: TcpStream,
}

/// Terminates a client's TLS session; the caller bounds it in time.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    client: TcpStream,
    early: Vec<u8>,
) -> io::Result<tokio_rustls::server::TlsStream<Prefixed>> {
    let stream = Prefixed {
        prefix: early,
        read: 0,
        inner: client,
    };
    TlsAcceptor::from(config).accept(stream).await
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
