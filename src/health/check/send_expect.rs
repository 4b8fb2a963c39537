//! `send_expect`: bytes sent after connect, and the bytes the reply must start with.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::{read_failed, send};
use crate::health::CheckFailure;

pub(super) async fn ask<S>(stream: &mut S, sent: &[u8], expect: &[u8]) -> Result<(), CheckFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !sent.is_empty() {
        send(stream, sent).await?;
    }
    if expect.is_empty() {
        if sent.is_empty() {
            return Ok(());
        }
        // Something was sent: any reply byte passes, none fails. A frozen server still
        // completes the connect and takes the bytes, but never answers.
        let mut byte = [0u8; 1];
        return match stream.read(&mut byte).await {
            Ok(0) => Err(CheckFailure::Closed),
            Ok(_) => Ok(()),
            Err(e) => Err(read_failed(e)),
        };
    }
    let mut reply = vec![0u8; expect.len()];
    let mut got = 0;
    while got < reply.len() {
        let n = stream.read(&mut reply[got..]).await.map_err(read_failed)?;
        if n == 0 {
            return Err(CheckFailure::Closed);
        }
        if reply[got..got + n] != expect[got..got + n] {
            return Err(CheckFailure::ExpectMismatch);
        }
        got += n;
    }
    Ok(())
}
