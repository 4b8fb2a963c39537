//! `redis`: `AUTH` when a password is configured, `PING`, and `INFO replication` for the
//! role. Replies are RESP, read one bounded line (and one bounded bulk string) at a time.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::{failed, read_exact, read_failed, said, send};
use crate::config::{RedisCheck, RedisRole};
use crate::health::CheckFailure;

/// Longest reply line read (status, error or bulk header).
const MAX_LINE: usize = 4096;
/// Largest `INFO replication` read; a real one is a few hundred bytes per replica.
const MAX_INFO: usize = 64 * 1024;

pub(super) async fn ask<S>(stream: &mut S, redis: &RedisCheck) -> Result<(), CheckFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(password) = &redis.password {
        send(stream, &command(&[b"AUTH", password.expose()])).await?;
        let line = read_line(stream).await?;
        if line != b"+OK" {
            return Err(refused("AUTH", &line));
        }
    }
    send(stream, &command(&[b"PING"])).await?;
    let line = read_line(stream).await?;
    if line != b"+PONG" {
        return Err(refused("PING", &line));
    }
    let wanted = match redis.role {
        RedisRole::Any => return Ok(()),
        RedisRole::Master => "master",
        // INFO says "slave" for a replica, in every Redis version.
        RedisRole::Replica => "slave",
    };
    send(stream, &command(&[b"INFO", b"replication"])).await?;
    let line = read_line(stream).await?;
    let Some(len) = line
        .strip_prefix(b"$")
        .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
    else {
        return Err(refused("INFO", &line));
    };
    if len > MAX_INFO {
        return Err(failed(format!(
            "redis: INFO replication of {len} bytes, more than the {} KiB a check reads",
            MAX_INFO / 1024
        )));
    }
    let mut info = vec![0u8; len + 2];
    read_exact(stream, &mut info).await?;
    let role = info
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"role:"))
        .map(|role| role.trim_ascii())
        .ok_or_else(|| failed("redis: INFO replication has no role"))?;
    if role == wanted.as_bytes() {
        Ok(())
    } else {
        Err(said("redis role:", role))
    }
}

/// A command as a RESP array of bulk strings: binary-safe for any password.
fn command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The failure for an unexpected answer to `asked`: an error reply is quoted
/// (`redis: LOADING Redis is loading the dataset in memory`).
fn refused(asked: &str, line: &[u8]) -> CheckFailure {
    match line.strip_prefix(b"-") {
        Some(error) => said("redis: ", error),
        None => said(&format!("redis: unexpected answer to {asked}: "), line),
    }
}

/// One CRLF-terminated line, without the CRLF. Read a byte at a time: the reply after
/// it must stay unread, and a check reads a few short lines.
async fn read_line<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, CheckFailure> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).await.map_err(read_failed)? == 0 {
            return Err(if line.is_empty() {
                CheckFailure::Closed
            } else {
                failed("redis: closed in the middle of a reply")
            });
        }
        if byte[0] == b'\n' && line.last() == Some(&b'\r') {
            line.pop();
            return Ok(line);
        }
        if line.len() >= MAX_LINE {
            return Err(failed(format!(
                "redis: a reply line longer than {MAX_LINE} bytes"
            )));
        }
        line.push(byte[0]);
    }
}
