//! A stream of client connections and what each client saw: the measuring side of a
//! failover drill, shared by `switchyard demo`, the failover bench and the tests (and
//! the coming `switchyard drill`).
//!
//! A client connects, reads one greeting line `hello <name>` and hangs up: the name says
//! which upstream served it, the time it took is its latency. The stream only observes;
//! it never looks inside the proxy, so it measures HAProxy as well as switchyard.
//! [`upstream`] is the greeting upstream it expects on the other side. [`run_clients`]
//! runs a stream of any other client that can say who served it (a real database
//! client, in the tests and the bench).

pub mod exercise;
pub mod upstream;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

/// A greeting longer than this is not one.
const MAX_GREETING: usize = 64;

/// How a stream of clients runs: where, how often, how long at most, what each does.
#[derive(Debug, Clone)]
pub struct ClientStream {
    /// The proxy's (or any greeting server's) address.
    pub addr: SocketAddr,
    /// One new client this often. A tick the runtime misses is skipped, not made up in
    /// a burst: a burst would be load the drill itself made up.
    pub every: Duration,
    /// No client starts later than this after the stream starts, whatever `stop` says.
    pub limit: Duration,
    /// A client without a greeting after this has failed ([`ClientError::Timeout`]).
    pub client_timeout: Duration,
    /// What each client does once connected.
    pub probe: Probe,
}

/// What a client does once connected, and what counts as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Reads the greeting `hello <name>` of a [`GreetingUpstream`](upstream::GreetingUpstream);
    /// with `speaks_first`, sends [`REQUEST`] first, as PostgreSQL, Redis or HTTP
    /// clients do (for a [`client_first`](upstream::GreetingUpstream::client_first)
    /// upstream).
    Greeting { speaks_first: bool },
    /// Served when the connection is still open after `settle`: the proxy closes a
    /// client it cannot connect anywhere. Knows nothing of the protocol, so it cannot
    /// tell which upstream served.
    Tcp { settle: Duration },
    /// Sends `send`; served when the reply starts with `expect` (any byte when empty).
    SendExpect { send: Arc<[u8]>, expect: Arc<[u8]> },
}

/// What a client that speaks first sends.
pub const REQUEST: &[u8] = b"who?\n";

/// What ends a stream before its `limit`.
#[derive(Debug, Clone, Default)]
pub enum Stop {
    /// Nothing: the stream runs for its whole `limit`.
    #[default]
    AtLimit,
    /// The token is cancelled.
    On(CancellationToken),
    /// A client is served by the upstream of this name.
    ServedBy(String),
}

/// What one client saw; `E` says why a client was not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord<E = ClientError> {
    /// When it started, after the stream's start.
    pub started: Duration,
    /// From its connect to its greeting, or until it failed.
    pub latency: Duration,
    /// The name of the upstream that greeted it, or why none did.
    pub served_by: Result<String, E>,
}

/// Why a client got no greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientError {
    /// The connect to the proxy failed.
    Connect,
    /// The proxy closed (or reset) the connection before a greeting.
    Closed,
    /// No greeting within the client timeout.
    Timeout,
    /// Something else than a greeting.
    Garbled,
}

/// Every client of one stream, in the order they started.
#[derive(Debug, Clone)]
pub struct Timeline<E = ClientError> {
    /// When the stream started: [`ClientRecord::started`] counts from here.
    pub start: Instant,
    pub records: Vec<ClientRecord<E>>,
}

/// Connects to `addr` and reads the greeting `hello <name>`; returns the name.
pub async fn greeting(addr: SocketAddr, within: Duration) -> Result<String, ClientError> {
    ask_greeting(addr, within, false).await
}

/// Like [`greeting`]; with `speaks_first`, sends [`REQUEST`] before reading.
pub async fn ask_greeting(
    addr: SocketAddr,
    within: Duration,
    speaks_first: bool,
) -> Result<String, ClientError> {
    match timeout(within, read_greeting(addr, speaks_first)).await {
        Ok(served_by) => served_by,
        Err(_) => Err(ClientError::Timeout),
    }
}

async fn read_greeting(addr: SocketAddr, speaks_first: bool) -> Result<String, ClientError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|_| ClientError::Connect)?;
    if speaks_first && stream.write_all(REQUEST).await.is_err() {
        return Err(ClientError::Closed);
    }
    let mut line = Vec::with_capacity(MAX_GREETING);
    let mut buf = [0u8; MAX_GREETING];
    while !line.contains(&b'\n') {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Err(ClientError::Closed),
            Ok(n) => line.extend_from_slice(&buf[..n]),
        }
        if line.len() > MAX_GREETING {
            return Err(ClientError::Garbled);
        }
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    std::str::from_utf8(&line[..end])
        .ok()
        .and_then(|text| text.strip_prefix("hello "))
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .ok_or(ClientError::Garbled)
}

// === impl Probe ===

impl Probe {
    /// A [`Probe::SendExpect`] from text with the escapes of a health check's `send` and
    /// `expect` (`\r \n \t \\ \xNN`).
    pub fn send_expect(send: &str, expect: &str) -> Result<Self, String> {
        let send = crate::config::unescape(send).map_err(|e| format!("--send: {e}"))?;
        let expect = crate::config::unescape(expect).map_err(|e| format!("--expect: {e}"))?;
        Ok(Probe::SendExpect {
            send: send.into(),
            expect: expect.into(),
        })
    }
}

/// One client of a [`ClientStream`]: who served it, or why none did, within `within`.
async fn probe_client(
    addr: SocketAddr,
    within: Duration,
    probe: Probe,
) -> Result<String, ClientError> {
    match probe {
        Probe::Greeting { speaks_first } => ask_greeting(addr, within, speaks_first).await,
        probe => match timeout(within, probe_once(addr, &probe)).await {
            Ok(served) => served.map(|()| String::new()),
            Err(_) => Err(ClientError::Timeout),
        },
    }
}

/// One [`Probe::Tcp`] or [`Probe::SendExpect`] client.
async fn probe_once(addr: SocketAddr, probe: &Probe) -> Result<(), ClientError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|_| ClientError::Connect)?;
    match probe {
        Probe::Greeting { .. } => Ok(()),
        Probe::Tcp { settle } => {
            let mut byte = [0u8; 1];
            match timeout(*settle, stream.peek(&mut byte)).await {
                // Quiet and open: the proxy kept it.
                Err(_) => Ok(()),
                Ok(Ok(0) | Err(_)) => Err(ClientError::Closed),
                Ok(Ok(_)) => Ok(()),
            }
        }
        Probe::SendExpect { send, expect } => {
            if !send.is_empty() && stream.write_all(send).await.is_err() {
                return Err(ClientError::Closed);
            }
            let wanted = expect.len().max(1);
            let mut reply = Vec::with_capacity(wanted);
            let mut buf = [0u8; MAX_GREETING];
            while reply.len() < wanted {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return Err(ClientError::Closed),
                    Ok(n) => reply.extend_from_slice(&buf[..n]),
                }
            }
            if reply.starts_with(expect) {
                Ok(())
            } else {
                Err(ClientError::Garbled)
            }
        }
    }
}

// === impl ClientStream ===

impl ClientStream {
    /// Starts a client every `every` until `stop` or `limit`; returns once every client
    /// finished, which each does within `client_timeout`.
    pub async fn run(self, stop: Stop) -> Timeline {
        let (addr, within, probe) = (self.addr, self.client_timeout, self.probe);
        run_clients(self.every, self.limit, stop, move |_| {
            probe_client(addr, within, probe.clone())
        })
        .await
    }
}

/// Starts `client(n)` for the n-th client every `every` (a missed tick is skipped) until
/// `stop` or `limit`; returns once every client finished. Each client answers who served
/// it and bounds its own time.
pub async fn run_clients<F, Fut, E>(
    every: Duration,
    limit: Duration,
    stop: Stop,
    mut client: F,
) -> Timeline<E>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: Send + 'static,
{
    let start = Instant::now();
    let end = start + limit;
    let never = CancellationToken::new();
    let cancelled = match &stop {
        Stop::On(token) => token,
        _ => &never,
    };
    let wanted = match &stop {
        Stop::ServedBy(name) => Some(name.as_str()),
        _ => None,
    };
    let mut clients = JoinSet::new();
    let mut records = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut n = 0;
    'spawn: loop {
        tokio::select! {
            biased;
            () = cancelled.cancelled() => break,
            () = sleep_until(end) => break,
            due = tick.tick() => {
                let request = client(n);
                n += 1;
                // The tick the stream started the client at, not when its task first
                // ran nor when this loop woke: on a loaded machine either can be after
                // the limit, and the task's out of order.
                let started = due.saturating_duration_since(start);
                clients.spawn(async move {
                    let began = Instant::now();
                    let served_by = request.await;
                    ClientRecord {
                        started,
                        latency: began.elapsed(),
                        served_by,
                    }
                });
            }
        }
        while let Some(done) = clients.try_join_next() {
            if let Ok(record) = done {
                let found = wanted.is_some() && record.served_by.as_deref().ok() == wanted;
                records.push(record);
                if found {
                    break 'spawn;
                }
            }
        }
    }
    while let Some(done) = clients.join_next().await {
        if let Ok(record) = done {
            records.push(record);
        }
    }
    records.sort_by_key(|r| r.started);
    Timeline { start, records }
}

// === impl ClientRecord ===

impl<E> ClientRecord<E> {
    /// When it got its greeting or gave up, after the stream's start.
    pub fn finished(&self) -> Duration {
        self.started + self.latency
    }

    pub fn is_served_by(&self, name: &str) -> bool {
        self.served_by.as_ref().is_ok_and(|served| served == name)
    }
}

// === impl ClientError ===

impl ClientError {
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect failed",
            Self::Closed => "closed",
            Self::Timeout => "timed out",
            Self::Garbled => "garbled",
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl std::error::Error for ClientError {}

// === impl Timeline ===

impl<E> Timeline<E> {
    /// `at` (an instant during the stream) as an offset from its start.
    pub fn offset(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.start)
    }
}

#[cfg(test)]
mod tests {
    use super::upstream::GreetingUpstream;
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const SHORT: Duration = Duration::from_millis(200);

    /// A server that answers every connection with `reply` (empty: closes at once).
    async fn replying(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(reply).await;
            }
        });
        addr
    }

    fn closed_port() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    }

    #[tokio::test]
    async fn a_greeting_names_the_upstream_and_each_failure_is_told_apart() {
        let upstream = GreetingUpstream::start("primary").await.expect("upstream");
        assert_eq!(
            greeting(upstream.addr, SHORT).await.as_deref(),
            Ok("primary")
        );
        assert_eq!(
            greeting(closed_port(), SHORT).await,
            Err(ClientError::Connect)
        );
        assert_eq!(
            greeting(replying(b"").await, SHORT).await,
            Err(ClientError::Closed)
        );
        assert_eq!(
            greeting(replying(b"nope\n").await, SHORT).await,
            Err(ClientError::Garbled)
        );
        assert_eq!(
            greeting(replying(&[b'x'; 100]).await, SHORT).await,
            Err(ClientError::Garbled)
        );
        upstream.hang();
        assert_eq!(
            greeting(upstream.addr, SHORT).await,
            Err(ClientError::Timeout)
        );
    }

    #[tokio::test]
    async fn an_upstream_dies_comes_back_on_its_port_and_becomes_a_black_hole() {
        let mut upstream = GreetingUpstream::start_with_backlog("primary", 4)
            .await
            .expect("upstream");
        let addr = upstream.addr;
        upstream.kill().await;
        assert_eq!(greeting(addr, SHORT).await, Err(ClientError::Connect));
        upstream.restart().await.expect("restart");
        assert_eq!(upstream.addr, addr);
        assert_eq!(greeting(addr, SHORT).await.as_deref(), Ok("primary"));
        upstream.black_hole().await.expect("black hole");
        assert!(
            timeout(SHORT, TcpStream::connect(addr)).await.is_err(),
            "a connect to a black hole neither succeeds nor fails"
        );
    }

    #[tokio::test]
    async fn a_client_started_before_the_limit_is_recorded_so_when_its_task_runs_late() {
        // The first client's making stalls the thread past the limit, as a loaded machine
        // can: its task first runs after the limit, yet the stream started it before.
        let limit = Duration::from_millis(50);
        let timeline = run_clients(Duration::from_millis(5), limit, Stop::AtLimit, |n| {
            if n == 0 {
                std::thread::sleep(limit + Duration::from_millis(30));
            }
            async { Ok::<_, ClientError>("a".to_string()) }
        })
        .await;
        assert!(!timeline.records.is_empty());
        assert!(
            timeline.records.iter().all(|r| r.started < limit),
            "{:?}",
            timeline.records
        );
    }

    #[tokio::test]
    async fn a_stream_records_every_client_in_start_order_within_its_limit() {
        let upstream = GreetingUpstream::start("backup").await.expect("upstream");
        let limit = Duration::from_millis(300);
        let timeline = ClientStream {
            addr: upstream.addr,
            every: Duration::from_millis(5),
            limit,
            client_timeout: SHORT,
            probe: Probe::Greeting {
                speaks_first: false,
            },
        }
        .run(Stop::AtLimit)
        .await;
        assert!(timeline.records.len() >= 5, "{:?}", timeline.records);
        assert!(timeline.records.iter().all(|r| r.is_served_by("backup")));
        assert!(timeline.records.iter().all(|r| r.started < limit));
        assert!(
            timeline
                .records
                .windows(2)
                .all(|w| w[0].started <= w[1].started)
        );
    }

    #[tokio::test]
    async fn a_stream_stops_at_the_first_client_of_the_named_upstream_or_when_cancelled() {
        let upstream = GreetingUpstream::start("primary").await.expect("upstream");
        let stream = ClientStream {
            addr: upstream.addr,
            every: Duration::from_millis(5),
            limit: Duration::from_secs(30),
            client_timeout: SHORT,
            probe: Probe::Greeting {
                speaks_first: false,
            },
        };
        let began = Instant::now();
        let timeline = stream
            .clone()
            .run(Stop::ServedBy("primary".to_string()))
            .await;
        assert!(timeline.records.iter().any(|r| r.is_served_by("primary")));
        let stop = CancellationToken::new();
        stop.cancel();
        let timeline = stream.run(Stop::On(stop)).await;
        assert!(timeline.records.is_empty(), "{:?}", timeline.records);
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "the limit ended it"
        );
    }

    #[tokio::test]
    async fn probes_tell_served_from_closed_and_a_wrong_reply() {
        let upstream = GreetingUpstream::start("primary").await.expect("upstream");
        let closing = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let closing_addr = closing.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = closing.accept().await {
                drop(stream);
            }
        });
        let tcp = Probe::Tcp {
            settle: Duration::from_millis(100),
        };
        assert_eq!(probe_once(upstream.addr, &tcp).await, Ok(()));
        assert_eq!(
            probe_once(closing_addr, &tcp).await,
            Err(ClientError::Closed)
        );
        let hello = Probe::send_expect("", "hello p").expect("probe");
        assert_eq!(probe_once(upstream.addr, &hello).await, Ok(()));
        let wrong = Probe::send_expect("PING\\r\\n", "+PONG").expect("probe");
        assert_eq!(
            probe_once(upstream.addr, &wrong).await,
            Err(ClientError::Garbled)
        );
        assert!(Probe::send_expect("\\x4", "").is_err(), "a bad escape");
    }
}
