//! `mysql`: the server speaks first. Its first packet is a greeting (protocol 10: it
//! accepts logins) or an error packet (`Too many connections`, `Host ... is blocked`),
//! whose message becomes the failure reason. Nothing is sent.

use tokio::io::AsyncRead;

use super::{failed, read_exact, said};
use crate::health::CheckFailure;

/// Most of the first packet read: the greeting's version string and an error message
/// fit well within it.
const MAX_PACKET_READ: usize = 1024;

const GREETING_V10: u8 = 0x0a;
const ERROR_PACKET: u8 = 0xff;

pub(super) async fn ask<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(), CheckFailure> {
    // Header: payload length (3 bytes, little endian) and sequence number.
    let mut header = [0u8; 4];
    read_exact(stream, &mut header).await?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    if len == 0 {
        return Err(failed("mysql: an empty first packet"));
    }
    let mut payload = vec![0u8; len.min(MAX_PACKET_READ)];
    read_exact(stream, &mut payload).await?;
    match payload[0] {
        // The version string follows, NUL-terminated (e.g. "10.11.6-MariaDB").
        GREETING_V10 if payload[1..].contains(&0) => Ok(()),
        GREETING_V10 => Err(failed("mysql: a malformed greeting")),
        ERROR_PACKET => Err(said("mysql: ", error_message(&payload[1..]))),
        other => Err(failed(format!(
            "mysql: not a greeting (protocol {other}, 10 expected)"
        ))),
    }
}

/// The message of an error packet's body: an error code (2 bytes), optionally `#` and a
/// 5-character SQL state, then the text.
fn error_message(body: &[u8]) -> &[u8] {
    let text = body.get(2..).unwrap_or_default();
    match text.first() {
        Some(b'#') if text.len() >= 6 => &text[6..],
        _ => text,
    }
}
