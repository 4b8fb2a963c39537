//! Each check kind against scripted servers on loopback: the answers real servers give,
//! and hostile ones (truncated, endless, huge, slow, garbage). Every check must end
//! within its timeout with a reason, never hang or read without bound.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

use super::*;
use crate::config::Config;

/// A server that accepts connections and runs `reply` on each one's write half, while
/// everything the client sends is read and forwarded to the returned receiver (so that
/// closing never resets the connection under unread bytes).
async fn server<F, Fut>(reply: F) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>)
where
    F: Fn(OwnedWriteHalf) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heard, hear) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (mut read, write) = stream.into_split();
            let heard = heard.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = read.read(&mut buf).await {
                    let _ = heard.send(buf[..n].to_vec());
                }
            });
            tokio::spawn(reply(write));
        }
    });
    (addr, hear)
}

/// A server that writes `bytes` and then closes its side.
async fn answering(bytes: &'static [u8]) -> SocketAddr {
    server(move |mut w| async move {
        let _ = w.write_all(bytes).await;
    })
    .await
    .0
}

/// A server that writes `bytes` and then keeps the connection open without a word.
async fn answering_then_silent(bytes: &'static [u8]) -> SocketAddr {
    server(move |mut w| async move {
        let _ = w.write_all(bytes).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await
    .0
}

/// A server that writes `first` and then `pattern` again and again until the client
/// goes away.
async fn endless(first: &'static [u8], pattern: &'static [u8]) -> SocketAddr {
    server(move |mut w| async move {
        if w.write_all(first).await.is_err() {
            return;
        }
        while w.write_all(pattern).await.is_ok() {}
    })
    .await
    .0
}

/// A server that writes `bytes` one byte every 100 ms: slower than [`SHORT`] allows.
async fn dribbling(bytes: &'static [u8]) -> SocketAddr {
    dribbling_every(bytes, Duration::from_millis(100)).await
}

/// A server that writes `bytes` one byte every `gap`.
async fn dribbling_every(bytes: &'static [u8], gap: Duration) -> SocketAddr {
    server(move |mut w| async move {
        for b in bytes {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
    })
    .await
    .0
}

/// The result of one check of `addr` with the `[pools.p.health]` lines `health`.
async fn checked(addr: SocketAddr, health: &str) -> Result<(), CheckFailure> {
    let text = format!(
        "[listeners.l]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nupstreams = [{{ address = \"{addr}\" }}]\n[pools.p.health]\n{health}\n"
    );
    let config = Config::parse(&text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
    let pool = config.pools[0].clone();
    let started = Instant::now();
    let result = match check(&pool.upstreams[0], &pool).await {
        Checked::Tested(result) => result,
        Checked::NotRun(e) => panic!("check not run: {e}"),
    };
    // The timeout bounds every check, whatever the server does.
    assert!(started.elapsed() < pool.health.timeout + Duration::from_millis(500));
    result
}

fn reason(result: Result<(), CheckFailure>) -> String {
    match result {
        Ok(()) => panic!("the check passed"),
        Err(failure) => failure.to_string(),
    }
}

const HTTP: &str = "kind = \"http\"\ntimeout = \"2s\"";
const SHORT: &str = "timeout = \"300ms\"";

// ---------------------------------------------------------------- http

#[tokio::test]
async fn http_passes_on_a_listed_status_and_fails_naming_any_other() {
    let ok = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(checked(ok, HTTP).await, Ok(()));
    let unavailable =
        answering(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno").await;
    assert_eq!(reason(checked(unavailable, HTTP).await), "http 503");
    let custom = format!("{HTTP}\nstatus = [\"200\", \"500-503\"]");
    assert_eq!(checked(unavailable, &custom).await, Ok(()));
    let http10 = answering(b"HTTP/1.0 404 Not Found\r\n\r\n").await;
    assert_eq!(reason(checked(http10, HTTP).await), "http 404");
}

#[tokio::test]
async fn http_sends_the_configured_request_line_host_and_connection_close() {
    let (addr, mut heard) = server(|mut w| async move {
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
    })
    .await;
    let health = format!("{HTTP}\nmethod = \"OPTIONS\"\npath = \"/primary?lag=1MB\"");
    assert_eq!(checked(addr, &health).await, Ok(()));
    let request = String::from_utf8(heard.recv().await.unwrap()).unwrap();
    assert!(
        request.starts_with(&format!(
            "OPTIONS /primary?lag=1MB HTTP/1.1\r\nHost: {addr}\r\n"
        )),
        "{request:?}"
    );
    assert!(request.contains("\r\nConnection: close\r\n"), "{request:?}");
    assert!(request.ends_with("\r\n\r\n"), "{request:?}");

    let health = format!("{HTTP}\nhost = \"patroni.internal\"");
    assert_eq!(checked(addr, &health).await, Ok(()));
    let request = String::from_utf8(heard.recv().await.unwrap()).unwrap();
    assert!(
        request.contains("\r\nHost: patroni.internal\r\n"),
        "{request:?}"
    );
}

#[tokio::test]
async fn http_body_contains_searches_a_bounded_body() {
    let body = format!("{HTTP}\nbody_contains = \"\\\"role\\\": \\\"master\\\"\"");
    // 58 bytes, one every 20 ms: over a second, well within the 10 s timeout even on a
    // loaded machine (one every 100 ms, the whole 6 s, timed out once under load).
    let found = dribbling_every(
        b"HTTP/1.1 200 OK\r\n\r\n{\"state\": \"running\", \"role\": \"master\"}",
        Duration::from_millis(20),
    )
    .await;
    let slow_but_in_time = format!("{body}\ntimeout = \"10s\"");
    let slow_but_in_time = slow_but_in_time.replace("timeout = \"2s\"\n", "");
    assert_eq!(checked(found, &slow_but_in_time).await, Ok(()));
    let lacking =
        answering(b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\n{\"role\": \"replica\"}\r\n")
            .await;
    assert!(reason(checked(lacking, &body).await).starts_with("http 200, the body lacks"),);
    // An endless body is searched up to its bound, then fails without waiting for the
    // timeout.
    let long = format!("{body}\ntimeout = \"20s\"").replace("timeout = \"2s\"\n", "");
    let endless = endless(b"HTTP/1.1 200 OK\r\n\r\n", b"xxxxxxxxxxxxxxxx").await;
    let started = Instant::now();
    assert!(reason(checked(endless, &long).await).contains("the body lacks"));
    assert!(started.elapsed() < Duration::from_secs(10));
    // A Content-Length that is reached ends the search even if the server stays open.
    let complete = answering_then_silent(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno").await;
    assert!(reason(checked(complete, &long).await).contains("the body lacks"));
}

#[tokio::test]
async fn http_hostile_answers_fail_with_a_reason() {
    let endless_headers = endless(b"HTTP/1.1 200 OK\r\n", b"X-Filler: aaaaaaaa\r\n").await;
    assert!(reason(checked(endless_headers, HTTP).await).contains("no end of headers"));
    let truncated = answering(b"HTTP/1.1 200 OK\r\nContent-Le").await;
    assert_eq!(
        reason(checked(truncated, HTTP).await),
        "http: closed in the middle of the headers"
    );
    let closed = answering(b"").await;
    assert_eq!(checked(closed, HTTP).await, Err(CheckFailure::Closed));
    let garbage = answering(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
    assert_eq!(
        reason(checked(garbage, HTTP).await),
        "http: not an HTTP response: SSH-2.0-OpenSSH_9.2"
    );
    let binary = answering(b"\x00\x01\x02\xff\xfe\r\n\r\n").await;
    assert!(reason(checked(binary, HTTP).await).starts_with("http: not an HTTP response"));
    let slow = dribbling(b"HTTP/1.1 200 OK\r\n\r\n").await;
    let short = format!("kind = \"http\"\n{SHORT}");
    assert_eq!(checked(slow, &short).await, Err(CheckFailure::Timeout));
    let silent = answering_then_silent(b"").await;
    assert_eq!(checked(silent, &short).await, Err(CheckFailure::Timeout));
}

// ---------------------------------------------------------------- redis

const REDIS: &str = "kind = \"redis\"\ntimeout = \"2s\"";

#[tokio::test]
async fn redis_ping_passes_and_an_error_reply_is_quoted() {
    let pong = answering(b"+PONG\r\n").await;
    assert_eq!(checked(pong, REDIS).await, Ok(()));
    let loading = answering(b"-LOADING Redis is loading the dataset in memory\r\n").await;
    assert_eq!(
        reason(checked(loading, REDIS).await),
        "redis: LOADING Redis is loading the dataset in memory"
    );
    let other = answering(b"+OK\r\n").await;
    assert_eq!(
        reason(checked(other, REDIS).await),
        "redis: unexpected answer to PING: +OK"
    );
}

#[tokio::test]
async fn redis_role_is_read_from_info_replication() {
    let info = b"+PONG\r\n$44\r\n# Replication\r\nrole:slave\r\nmaster_port:6379\r\n\r\n";
    let replica = answering(info).await;
    let master = format!("{REDIS}\nrole = \"master\"");
    assert_eq!(reason(checked(replica, &master).await), "redis role:slave");
    let wanted = format!("{REDIS}\nrole = \"replica\"");
    assert_eq!(checked(replica, &wanted).await, Ok(()));
    let no_role = answering(b"+PONG\r\n$13\r\n# Replication\r\n").await;
    assert_eq!(
        reason(checked(no_role, &master).await),
        "redis: INFO replication has no role"
    );
}

#[tokio::test]
async fn redis_authenticates_with_the_password_file_as_a_resp_array() {
    let dir = std::env::temp_dir().join(format!("switchyard-redis-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("password");
    std::fs::write(&file, "s3cret with spaces\n").unwrap();
    let (addr, mut heard) = server(|mut w| async move {
        let _ = w.write_all(b"+OK\r\n+PONG\r\n").await;
    })
    .await;
    let health = format!("{REDIS}\npassword_file = {:?}", file.display().to_string());
    assert_eq!(checked(addr, &health).await, Ok(()));
    let mut sent = Vec::new();
    while !sent.ends_with(b"PING\r\n") {
        sent.extend(heard.recv().await.unwrap());
    }
    assert_eq!(
        sent,
        b"*2\r\n$4\r\nAUTH\r\n$18\r\ns3cret with spaces\r\n*1\r\n$4\r\nPING\r\n"
    );
    let refused = answering(b"-WRONGPASS invalid username-password pair\r\n").await;
    assert_eq!(
        reason(checked(refused, &health).await),
        "redis: WRONGPASS invalid username-password pair"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn redis_hostile_answers_fail_with_a_reason() {
    let master = format!("{REDIS}\nrole = \"master\"");
    let endless_line = endless(b"+PO", b"NGNGNGNG").await;
    assert!(reason(checked(endless_line, REDIS).await).contains("longer than"));
    let huge = answering(b"+PONG\r\n$999999999\r\nrole:master\r\n").await;
    assert!(reason(checked(huge, &master).await).contains("more than the 64 KiB"));
    let truncated = answering(b"+PONG\r\n$44\r\n# Replication\r\nrole:mas").await;
    assert_eq!(checked(truncated, &master).await, Err(CheckFailure::Closed));
    let half_line = answering(b"+PON").await;
    assert_eq!(
        reason(checked(half_line, REDIS).await),
        "redis: closed in the middle of a reply"
    );
    let garbage = answering(b"\xff\xfe\x00garbage\r\n").await;
    assert!(reason(checked(garbage, REDIS).await).starts_with("redis: unexpected answer"));
    let bad_length = answering(b"+PONG\r\n$-5\r\n").await;
    assert!(reason(checked(bad_length, &master).await).starts_with("redis: unexpected answer"));
    let slow = dribbling(b"+PONG\r\n").await;
    let short = format!("kind = \"redis\"\n{SHORT}");
    assert_eq!(checked(slow, &short).await, Err(CheckFailure::Timeout));
}

// ---------------------------------------------------------------- mysql

const MYSQL: &str = "kind = \"mysql\"\ntimeout = \"2s\"";

/// A MariaDB 10.11 greeting, shortened after the version string.
const GREETING: &[u8] = b"\x1a\x00\x00\x00\x0a10.11.6-MariaDB\x00\x08\x00\x00\x00abcdefgh";

#[tokio::test]
async fn mysql_greeting_passes_and_an_error_packet_is_quoted() {
    let greeting = answering_then_silent(GREETING).await;
    assert_eq!(checked(greeting, MYSQL).await, Ok(()));
    let too_many = answering(b"\x17\x00\x00\x00\xff\x10\x04Too many connections").await;
    assert_eq!(
        reason(checked(too_many, MYSQL).await),
        "mysql: Too many connections"
    );
    let with_state =
        answering(b"\x23\x00\x00\x00\xff\x69\x04#HY000Host '10.0.0.9' is blocked").await;
    assert_eq!(
        reason(checked(with_state, MYSQL).await),
        "mysql: Host '10.0.0.9' is blocked"
    );
}

#[tokio::test]
async fn mysql_hostile_answers_fail_with_a_reason() {
    let truncated = answering(b"\x1a\x00\x00\x00\x0a10.11").await;
    assert_eq!(checked(truncated, MYSQL).await, Err(CheckFailure::Closed));
    let header_only = answering(b"\x1a\x00").await;
    assert_eq!(checked(header_only, MYSQL).await, Err(CheckFailure::Closed));
    let empty = answering(b"\x00\x00\x00\x00").await;
    assert_eq!(
        reason(checked(empty, MYSQL).await),
        "mysql: an empty first packet"
    );
    // A huge declared length: only the first KiB is read, and it has no version end.
    let huge = endless(b"\xff\xff\xff\x00\x0a", b"A").await;
    assert_eq!(
        reason(checked(huge, MYSQL).await),
        "mysql: a malformed greeting"
    );
    let old_protocol = answering(b"\x05\x00\x00\x00\x095.0\x00").await;
    assert_eq!(
        reason(checked(old_protocol, MYSQL).await),
        "mysql: not a greeting (protocol 9, 10 expected)"
    );
    // Text read as a packet header declares megabytes that never come.
    let http = answering(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    assert_eq!(checked(http, MYSQL).await, Err(CheckFailure::Closed));
    let slow = dribbling(GREETING).await;
    let short = format!("kind = \"mysql\"\n{SHORT}");
    assert_eq!(checked(slow, &short).await, Err(CheckFailure::Timeout));
}

// ---------------------------------------------------------------- postgres

const POSTGRES: &str = "kind = \"postgres\"\ntimeout = \"2s\"";

/// An ErrorResponse with severity FATAL, `code` and `message`.
fn pg_error(code: &str, message: &str) -> &'static [u8] {
    let mut body = Vec::new();
    for (kind, value) in [(b'S', "FATAL"), (b'C', code), (b'M', message)] {
        body.push(kind);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = vec![b'E'];
    message.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    message.extend_from_slice(&body);
    message.leak()
}

#[tokio::test]
async fn postgres_startup_passes_on_an_authentication_request() {
    let (sasl, mut heard) = server(|mut w| async move {
        // AuthenticationSASL, SCRAM-SHA-256.
        let _ = w
            .write_all(b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00")
            .await;
    })
    .await;
    let health = format!("{POSTGRES}\nuser = \"monitor\"\ndatabase = \"app\"");
    assert_eq!(checked(sasl, &health).await, Ok(()));
    let startup = heard.recv().await.unwrap();
    assert_eq!(&startup[4..8], &[0, 3, 0, 0], "protocol 3.0");
    assert!(
        startup.ends_with(b"user\0monitor\0database\0app\0application_name\0switchyard-check\0\0")
    );
    assert_eq!(
        startup.len(),
        u32::from_be_bytes(startup[..4].try_into().unwrap()) as usize
    );
    let trust = answering(b"R\x00\x00\x00\x08\x00\x00\x00\x00").await;
    assert_eq!(checked(trust, POSTGRES).await, Ok(()));
}

#[tokio::test]
async fn postgres_errors_fail_with_the_servers_message_except_login_errors() {
    let cases = [
        ("57P03", "the database system is starting up", false),
        ("57P03", "the database system is shutting down", false),
        (
            "57P03",
            "the database system is not yet accepting connections",
            false,
        ),
        ("53300", "sorry, too many clients already", false),
        ("28000", "role \"switchyard\" does not exist", true),
        ("3D000", "database \"postgres\" does not exist", true),
    ];
    for (code, message, passes) in cases {
        let addr = answering(pg_error(code, message)).await;
        let result = checked(addr, POSTGRES).await;
        if passes {
            assert_eq!(result, Ok(()), "{code}");
        } else {
            assert_eq!(reason(result), format!("postgres: {message}"));
        }
    }
}

#[tokio::test]
async fn postgres_hostile_answers_fail_with_a_reason() {
    let huge = answering(b"E\x7f\xff\xff\xffSFATAL").await;
    assert!(reason(checked(huge, POSTGRES).await).contains("more than the 16 KiB"));
    let short_length = answering(b"R\x00\x00\x00\x02").await;
    assert_eq!(
        reason(checked(short_length, POSTGRES).await),
        "postgres: a malformed answer"
    );
    let truncated = answering(&pg_error("57P03", "the database system is starting up")[..20]).await;
    assert_eq!(
        checked(truncated, POSTGRES).await,
        Err(CheckFailure::Closed)
    );
    let garbage = answering(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    assert!(reason(checked(garbage, POSTGRES).await).starts_with("postgres:"));
    let notices = endless(b"", b"N\x00\x00\x00\x04").await;
    assert_eq!(
        reason(checked(notices, POSTGRES).await),
        "postgres: no answer to the startup"
    );
    let no_message = answering(b"E\x00\x00\x00\x0bC57P03\x00\x00").await;
    assert_eq!(
        reason(checked(no_message, POSTGRES).await),
        "postgres: an error without a message"
    );
    let slow = dribbling(b"R\x00\x00\x00\x08\x00\x00\x00\x00").await;
    let short = format!("kind = \"postgres\"\n{SHORT}");
    assert_eq!(checked(slow, &short).await, Err(CheckFailure::Timeout));
}

#[tokio::test]
async fn postgres_role_login_fails_on_hostile_answers_within_bounds() {
    let role = "kind = \"postgres\"\ntimeout = \"5s\"\nuser = \"monitor\"\nrole = \"primary\"";
    // An endless stream of one message that never ends: the check stops at MAX_REPLY.
    let endless_message = endless(b"R\x7f\xff\xff\xff", b"0123456789abcdef").await;
    let started = Instant::now();
    assert!(reason(checked(endless_message, role).await).starts_with("postgres:"));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stopped by the byte bound"
    );
    let error = answering(pg_error("57P03", "the database system is starting up")).await;
    assert_eq!(
        reason(checked(error, role).await),
        "postgres: the database system is starting up"
    );
    let garbage = answering(b"\x00\x01garbage").await;
    assert!(reason(checked(garbage, role).await).starts_with("postgres:"));
}

// ---------------------------------------------------------------- send_expect, target

#[tokio::test]
async fn send_with_an_empty_expect_needs_a_reply_byte() {
    let health = "send = \"PING\\r\\n\"\ntimeout = \"300ms\"";
    let answers = answering(b"+").await;
    assert_eq!(checked(answers, health).await, Ok(()));
    let silent = answering_then_silent(b"").await;
    assert_eq!(checked(silent, health).await, Err(CheckFailure::Timeout));
}

/// How the check's connection to a server that sends `greeting` ends, as the server
/// sees it: `true` for a reset, `false` for an orderly close.
async fn ended_with_reset(health: &str, greeting: &'static [u8]) -> bool {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(greeting).await.unwrap();
        let mut buf = [0u8; 256];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return false,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("{e}"),
            }
        }
    });
    assert_eq!(checked(addr, health).await, Ok(()));
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the check's connection ended")
        .unwrap()
}

#[tokio::test]
async fn checks_end_with_a_reset_except_where_a_server_would_log_it() {
    // No FIN exchange and no TIME_WAIT socket per check (HAProxy's way)...
    assert!(ended_with_reset("timeout = \"2s\"", b"").await);
    assert!(ended_with_reset("send = \"PING\\r\\n\"\nexpect = \"hello\"", b"hello\n").await);
    // ...but a database whose check talks its protocol is left as a client leaves it
    // (a whole greeting: bytes left unread would make the kernel reset anyway).
    let greeting = b"\x1d\x00\x00\x00\x0a10.11.6-MariaDB\x00\x08\x00\x00\x00abcdefgh";
    assert!(!ended_with_reset(MYSQL, greeting).await);
}

#[tokio::test]
async fn a_check_port_is_checked_on_the_upstreams_host_instead_of_its_address() {
    let rest_api = answering(b"HTTP/1.1 200 OK\r\n\r\n").await;
    // The upstream's own port is closed: only the check port answers.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = closed.local_addr().unwrap();
    drop(closed);
    let health = format!("{HTTP}\nport = {}", rest_api.port());
    assert_eq!(checked(upstream, &health).await, Ok(()));
    let health = format!("{HTTP}\naddress = \"{rest_api}\"");
    assert_eq!(checked(upstream, &health).await, Ok(()));
    assert!(matches!(
        checked(upstream, HTTP).await,
        Err(CheckFailure::Connect(_))
    ));
}

#[tokio::test]
async fn bounded_reads_stop_at_max_reply() {
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move { while server.write_all(&[7u8; 4096]).await.is_ok() {} });
    let mut bounded = Bounded::new(&mut client);
    let mut sink = Vec::new();
    let error = bounded.read_to_end(&mut sink).await.unwrap_err();
    assert_eq!(sink.len(), MAX_REPLY);
    assert_eq!(read_failed(error).to_string(), "reply longer than 256 KiB");
}

// ---------------------------------------------------------------- TLS

/// An HTTPS endpoint with a certificate for `name`, signed by a fresh CA whose PEM is
/// returned; it answers every request with `answer`.
async fn https(name: &str, answer: &'static [u8]) -> (SocketAddr, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut session) = acceptor.accept(stream).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    match session.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = session.write_all(answer).await;
                let _ = session.shutdown().await;
            });
        }
    });
    (addr, ca.pem())
}

#[tokio::test]
async fn http_runs_over_the_pools_tls_with_its_ca_and_server_name() {
    let (addr, ca) = https("patroni.test", b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
    let dir = std::env::temp_dir().join(format!("switchyard-check-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let tls = |name: &str| {
        format!(
            "{HTTP}\n[pools.p.tls]\nca = {:?}\nserver_name = \"{name}\"",
            ca_file.display().to_string()
        )
    };
    // The status proves the request went through the TLS session.
    assert_eq!(
        reason(checked(addr, &tls("patroni.test")).await),
        "http 503"
    );
    // The pool's verification holds for checks too.
    assert_eq!(
        checked(addr, &tls("other.test")).await,
        Err(CheckFailure::Connect(ConnectFailure::Tls))
    );
    // Plain HTTP against the TLS port gets no HTTP answer.
    assert!(checked(addr, HTTP).await.is_err());
    let _ = std::fs::remove_dir_all(dir);
}
