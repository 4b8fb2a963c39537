//! `postgres`: does the server take logins now?
//!
//! With `role = "any"`, a StartupMessage and the first answer, parsed here: an
//! authentication request (or AuthenticationOk) passes; an ErrorResponse fails with the
//! server's message (`the database system is starting up`, `... is shutting down`,
//! `... is not yet accepting connections` in crash recovery, `sorry, too many clients
//! already`), except errors about the login itself (no such role or database, class 28
//! and 3D000): the server is up and checking logins.
//!
//! With `role = "primary" | "standby"`, a login through tokio-postgres (SCRAM and every
//! other method it speaks) and `SELECT pg_is_in_recovery()`.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Bounded, failed, read_exact, said, send};
use crate::config::{PostgresCheck, PostgresRole};
use crate::health::CheckFailure;

/// Protocol 3.0.
const PROTOCOL: u32 = 0x0003_0000;
/// Largest first message read: an error with all its fields is far smaller.
const MAX_MESSAGE: usize = 16 * 1024;
/// Messages read before the answer that decides (e.g. a protocol negotiation first).
const MAX_MESSAGES: usize = 4;

pub(super) async fn ask<S>(mut stream: Bounded<S>, pg: &PostgresCheck) -> Result<(), CheckFailure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match pg.role {
        PostgresRole::Any => startup(&mut stream, pg).await,
        PostgresRole::Primary | PostgresRole::Standby => login(stream, pg).await,
    }
}

async fn startup<S>(stream: &mut S, pg: &PostgresCheck) -> Result<(), CheckFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send(stream, &startup_message(pg)).await?;
    for _ in 0..MAX_MESSAGES {
        let (tag, body) = read_message(stream).await?;
        match tag {
            b'R' => {
                if body.starts_with(&[0, 0, 0, 0]) {
                    // AuthenticationOk (trust): end the session politely.
                    let _ = send(stream, b"X\0\0\0\x04").await;
                }
                return Ok(());
            }
            b'E' => return error_response(&body),
            // NegotiateProtocolVersion or a notice: the answer comes next.
            b'v' | b'N' => {}
            other => {
                return Err(failed(format!(
                    "postgres: unexpected answer to the startup (message {:?})",
                    char::from(other)
                )));
            }
        }
    }
    Err(failed("postgres: no answer to the startup"))
}

fn startup_message(pg: &PostgresCheck) -> Vec<u8> {
    let mut params = Vec::new();
    for (key, value) in [
        ("user", pg.user.as_str()),
        ("database", pg.database.as_str()),
        ("application_name", "switchyard-check"),
    ] {
        params.extend_from_slice(key.as_bytes());
        params.push(0);
        params.extend_from_slice(value.as_bytes());
        params.push(0);
    }
    params.push(0);
    let mut message = ((8 + params.len()) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&PROTOCOL.to_be_bytes());
    message.extend_from_slice(&params);
    message
}

/// One backend message: its tag and body, at most [`MAX_MESSAGE`] bytes.
async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(u8, Vec<u8>), CheckFailure> {
    let mut header = [0u8; 5];
    read_exact(stream, &mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len < 4 {
        return Err(failed("postgres: a malformed answer"));
    }
    if len - 4 > MAX_MESSAGE {
        return Err(failed(format!(
            "postgres: an answer of {len} bytes, more than the {} KiB a check reads",
            MAX_MESSAGE / 1024
        )));
    }
    let mut body = vec![0u8; len - 4];
    read_exact(stream, &mut body).await?;
    Ok((header[0], body))
}

/// An ErrorResponse to the startup: fields of a type byte and a NUL-terminated value.
fn error_response(body: &[u8]) -> Result<(), CheckFailure> {
    let field = |kind: u8| {
        body.split(|&b| b == 0)
            .find(|f| f.first() == Some(&kind))
            .map(|f| &f[1..])
    };
    let code = field(b'C').unwrap_or_default();
    if code.starts_with(b"28") || code == b"3D000" {
        return Ok(());
    }
    Err(said(
        "postgres: ",
        field(b'M').unwrap_or(b"an error without a message"),
    ))
}

async fn login<S>(stream: Bounded<S>, pg: &PostgresCheck) -> Result<(), CheckFailure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut config = tokio_postgres::Config::new();
    config
        .user(&pg.user)
        .dbname(&pg.database)
        .application_name("switchyard-check");
    if let Some(password) = &pg.password {
        config.password(password.expose());
    }
    let (client, mut connection) = config
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .map_err(pg_failure)?;
    let asked = async {
        let rows = client
            .simple_query("SELECT pg_is_in_recovery()")
            .await
            .map_err(pg_failure)?;
        let in_recovery = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        });
        match in_recovery {
            Some("t") => Ok(true),
            Some("f") => Ok(false),
            _ => Err(failed("postgres: no answer to pg_is_in_recovery()")),
        }
    };
    let in_recovery = tokio::select! {
        answer = asked => answer?,
        ended = &mut connection => {
            ended.map_err(pg_failure)?;
            return Err(CheckFailure::Closed);
        }
    };
    // Without a client the connection sends Terminate and ends: no "unexpected EOF"
    // in the server's log on every check.
    drop(client);
    let _ = connection.await;
    match (pg.role, in_recovery) {
        (PostgresRole::Primary, true) => Err(failed("postgres: in recovery (a standby)")),
        (PostgresRole::Standby, false) => Err(failed("postgres: not in recovery (a primary)")),
        _ => Ok(()),
    }
}

fn pg_failure(error: tokio_postgres::Error) -> CheckFailure {
    match error.as_db_error() {
        Some(db) => said("postgres: ", db.message().as_bytes()),
        None => said("postgres: ", error.to_string().as_bytes()),
    }
}
