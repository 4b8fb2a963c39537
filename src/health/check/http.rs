//! `http`: one HTTP/1.1 request (`Connection: close`), the status line and headers read
//! within [`MAX_HEAD`], and the body searched within [`MAX_BODY`] when the check names a
//! substring. Hand-written: a check needs one request and one bounded answer, not a
//! client.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::{failed, read_failed, said, send};
use crate::config::HttpCheck;
use crate::health::CheckFailure;

/// Most bytes of status line and headers read.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most bytes of body searched for `body_contains`.
pub const MAX_BODY: usize = 64 * 1024;

pub(super) async fn ask<S>(
    stream: &mut S,
    http: &HttpCheck,
    target: &str,
) -> Result<(), CheckFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send(stream, request(http, target).as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() >= MAX_HEAD {
            return Err(failed(format!(
                "http: no end of headers in the first {} KiB",
                MAX_HEAD / 1024
            )));
        }
        if read_some(stream, &mut buf, MAX_HEAD).await? == 0 {
            return Err(if buf.is_empty() {
                CheckFailure::Closed
            } else {
                failed("http: closed in the middle of the headers")
            });
        }
    };
    let status = status_code(&buf[..head_len])
        .ok_or_else(|| said("http: not an HTTP response: ", first_line(&buf)))?;
    if !http.status.iter().any(|range| range.contains(&status)) {
        return Err(failed(format!("http {status}")));
    }
    if http.body_contains.is_empty() {
        return Ok(());
    }
    let length = content_length(&buf[..head_len]);
    let mut body = buf.split_off(head_len);
    loop {
        if find(&body, &http.body_contains).is_some() {
            return Ok(());
        }
        let complete = length.is_some_and(|length| body.len() >= length);
        if complete || body.len() >= MAX_BODY || read_some(stream, &mut body, MAX_BODY).await? == 0
        {
            return Err(said(
                &format!("http {status}, the body lacks "),
                format!("{:?}", String::from_utf8_lossy(&http.body_contains)).as_bytes(),
            ));
        }
    }
}

fn request(http: &HttpCheck, target: &str) -> String {
    let host = http.host.as_deref().unwrap_or(target);
    format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: switchyard-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        http.method, http.path
    )
}

/// Appends what one read returns, never growing `buf` past `limit`.
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Result<usize, CheckFailure> {
    let mut chunk = [0u8; 4096];
    let room = limit.saturating_sub(buf.len()).min(chunk.len());
    let n = stream.read(&mut chunk[..room]).await.map_err(read_failed)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn first_line(buf: &[u8]) -> &[u8] {
    let end = find(buf, b"\r\n").unwrap_or(buf.len());
    &buf[..end]
}

/// The status of `HTTP/1.x NNN reason`.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = first_line(head);
    let rest = line
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| line.strip_prefix(b"HTTP/1.0 "))?;
    let digits = rest.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|&b| b != b' ') {
        return None;
    }
    std::str::from_utf8(digits)
        .ok()?
        .parse()
        .ok()
        .filter(|s| (100..=599).contains(s))
}

/// The `Content-Length` of a response head, when it has one that parses.
fn content_length(head: &[u8]) -> Option<usize> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
        if !name.trim_ascii().eq_ignore_ascii_case(b"content-length") {
            return None;
        }
        std::str::from_utf8(&value[1..]).ok()?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503\r\n\r\n"), Some(503));
        assert_eq!(status_code(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 20\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 999 X\r\n"), None);
        assert_eq!(status_code(b"HTTP/2 200\r\n"), None);
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
    }

    #[test]
    fn content_lengths() {
        let head = b"HTTP/1.1 200 OK\r\nServer: x\r\ncontent-length: 12\r\n\r\n";
        assert_eq!(content_length(head), Some(12));
        assert_eq!(content_length(b"HTTP/1.1 200 OK\r\n\r\n"), None);
        assert_eq!(
            content_length(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
            None
        );
    }
}
