//! A stream of client connections and what each client saw: the measuring side of a
//! failover drill, shared by `switchyard demo`, the failover bench and the tests (and
//! the coming `switchyard drill`).
//!
//! A client connects, reads one greeting line `hello <name>` and hangs up: the name says
//! which upstream served it, the time it took is its latency. The stream only observes;
//! it never looks inside the proxy, so it measures HAProxy as well as switchyard.
//! [`upstream`] is the greeting upstream it expects on the other side.

pub mod upstream;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

/// A greeting longer than this is not one.
const MAX_GREETING: usize = 64;

/// How a stream of clients runs: where, how often, how long at most.
#[derive(Debug, Clone, Copy)]
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
}

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

/// What one client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    /// When it started, after the stream's start.
    pub started: Duration,
    /// From its connect to its greeting, or until it failed.
    pub latency: Duration,
    /// The name of the upstream that greeted it, or why none did.
    pub served_by: Result<String, ClientError>,
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
pub struct Timeline {
    /// When the stream started: [`ClientRecord::started`] counts from here.
    pub start: Instant,
    pub records: Vec<ClientRecord>,
}

/// Connects to `addr` and reads the greeting `hello <name>`; returns the name.
pub async fn greeting(addr: SocketAddr, within: Duration) -> Result<String, ClientError> {
    match timeout(within, read_greeting(addr)).await {
        Ok(served_by) => served_by,
        Err(_) => Err(ClientError::Timeout),
    }
}

async fn read_greeting(addr: SocketAddr) -> Result<String, ClientError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|_| ClientError::Connect)?;
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

// === impl ClientStream ===

impl ClientStream {
    /// Starts a client every `every` until `stop` or `limit`; returns once every client
    /// finished, which each does within `client_timeout`.
    pub async fn run(self, stop: Stop) -> Timeline {
        let start = Instant::now();
        let end = start + self.limit;
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
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        'spawn: loop {
            tokio::select! {
                biased;
                () = cancelled.cancelled() => break,
                () = sleep_until(end) => break,
                _ = tick.tick() => {
                    clients.spawn(self.client(start));
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

    async fn client(self, stream_start: Instant) -> ClientRecord {
        let started = Instant::now();
        let served_by = greeting(self.addr, self.client_timeout).await;
        ClientRecord {
            started: started.saturating_duration_since(stream_start),
            latency: started.elapsed(),
            served_by,
        }
    }
}

// === impl ClientRecord ===

impl ClientRecord {
    /// When it got its greeting or gave up, after the stream's start.
    pub fn finished(&self) -> Duration {
        self.started + self.latency
    }

    pub fn is_served_by(&self, name: &str) -> bool {
        self.served_by.as_deref() == Ok(name)
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

impl Timeline {
    /// `at` (an instant during the stream) as an offset from its start.
    pub fn offset(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.start)
    }
}
