//! Clients nobody here wrote, the `redis` crate and `tokio-postgres`, as a stream of new
//! connections through a proxy: each client connects, makes one real request and says
//! which server answered, or what went wrong in the library's own words. Shared by
//! tests/real_failover.rs and benches/failover.rs.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

/// What one client saw.
#[derive(Debug, Clone)]
pub struct RealRecord {
    /// When it started, after the stream's start.
    pub started: Duration,
    /// From its connect to its answer, or until it failed.
    pub latency: Duration,
    /// The name of the server that answered, or the client library's error.
    pub served_by: Result<String, String>,
}

impl RealRecord {
    pub fn finished(&self) -> Duration {
        self.started + self.latency
    }

    pub fn is_served_by(&self, name: &str) -> bool {
        self.served_by.as_deref() == Ok(name)
    }
}

/// Every client of one stream, in the order they started.
#[derive(Debug, Clone)]
pub struct RealTimeline {
    pub start: Instant,
    pub records: Vec<RealRecord>,
}

impl RealTimeline {
    /// `at` as an offset from the stream's start.
    pub fn offset(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.start)
    }

    pub fn failed(&self) -> impl Iterator<Item = &RealRecord> {
        self.records.iter().filter(|r| r.served_by.is_err())
    }
}

/// How a stream of real clients runs.
#[derive(Debug, Clone)]
pub struct RealStream {
    /// One new client this often (a missed tick is skipped, not made up in a burst).
    pub every: Duration,
    /// No client starts later than this after the start.
    pub limit: Duration,
    /// A client without an answer after this has failed.
    pub client_timeout: Duration,
    /// Ends the stream early when cancelled.
    pub stop: CancellationToken,
    /// Ends the stream at the first client this server answered.
    pub until_served_by: Option<String>,
}

impl RealStream {
    /// Runs `client(n)` for the n-th client; returns once every client finished.
    pub async fn run<F, Fut>(self, client: F) -> RealTimeline
    where
        F: Fn(u64) -> Fut,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let start = Instant::now();
        let end = start + self.limit;
        let mut clients = JoinSet::new();
        let mut records = Vec::new();
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut n = 0;
        'spawn: loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                () = sleep_until(end) => break,
                _ = tick.tick() => {
                    let request = client(n);
                    n += 1;
                    let limit = self.client_timeout;
                    clients.spawn(async move {
                        let started = Instant::now();
                        let served_by = timeout(limit, request)
                            .await
                            .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")));
                        RealRecord {
                            started: started.saturating_duration_since(start),
                            latency: started.elapsed(),
                            served_by,
                        }
                    });
                }
            }
            while let Some(done) = clients.try_join_next() {
                if let Ok(record) = done {
                    let found = self
                        .until_served_by
                        .as_deref()
                        .is_some_and(|name| record.is_served_by(name));
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
        RealTimeline { start, records }
    }
}

// ---------------------------------------------------------------- Redis

/// One Redis client (the `redis` crate) on a new connection to `addr`: `SET` a key of
/// its own, `GET` it back and `GET whoami` (which each server was given by
/// [`redis_name_server`]), pipelined in one round trip. Returns the `whoami`.
///
/// The library's `CLIENT SETINFO` on connect is left out: it would be an answered
/// round trip before the request, and a server that has answered once is past replay
/// (a client whose first request was answered by a server that then hangs is lost,
/// with any proxy).
pub async fn redis_request(addr: SocketAddr, n: u64) -> Result<String, String> {
    use redis::IntoConnectionInfo;
    let info = format!("redis://{addr}/")
        .into_connection_info()
        .map_err(|e| e.to_string())?;
    let settings = info.redis_settings().clone().set_skip_set_lib_name();
    let client =
        redis::Client::open(info.set_redis_settings(settings)).map_err(|e| e.to_string())?;
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let key = format!("client:{n}");
    let value = format!("value {n}");
    let (stored, whoami): (String, String) = redis::pipe()
        .cmd("SET")
        .arg(&key)
        .arg(&value)
        .ignore()
        .cmd("GET")
        .arg(&key)
        .cmd("GET")
        .arg("whoami")
        .query_async(&mut connection)
        .await
        .map_err(|e| e.to_string())?;
    if stored != value {
        return Err(format!("GET {key} answered {stored:?}, not {value:?}"));
    }
    Ok(whoami)
}

/// Gives the Redis server at `addr` the `name` that [`redis_request`] reads back.
pub async fn redis_name_server(addr: SocketAddr, name: &str) -> Result<(), String> {
    let client = redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    redis::cmd("SET")
        .arg("whoami")
        .arg(name)
        .query_async::<()>(&mut connection)
        .await
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------- PostgreSQL

/// One PostgreSQL client (`tokio-postgres`, as `postgres` with trust authentication) on
/// a new connection to `addr`: `SELECT 1` and the server's port; returns the port.
pub async fn pg_request(addr: SocketAddr) -> Result<u16, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut config = tokio_postgres::Config::new();
    config.user("postgres").dbname("postgres");
    let (client, connection) = config
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .map_err(|e| pg_words(&e))?;
    tokio::spawn(connection);
    let answer = client
        .simple_query("SELECT 1, current_setting('port')")
        .await
        .map_err(|e| pg_words(&e))?;
    let row = answer
        .iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or("no row")?;
    if row.get(0) != Some("1") {
        return Err(format!("SELECT 1 answered {:?}", row.get(0)));
    }
    row.get(1)
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| format!("no port in {:?}", row.get(1)))
}

/// [`pg_request`], naming the server by its port.
pub async fn pg_request_named(
    addr: SocketAddr,
    names: &[(u16, &'static str)],
) -> Result<String, String> {
    let port = pg_request(addr).await?;
    names
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, name)| name.to_string())
        .ok_or_else(|| format!("served by an unknown port {port}"))
}

/// Runs `sql` (simple protocol) on `addr` as `postgres`.
pub async fn pg_execute(addr: SocketAddr, sql: &str) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut config = tokio_postgres::Config::new();
    config.user("postgres").dbname("postgres");
    let (client, connection) = config
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .map_err(|e| pg_words(&e))?;
    tokio::spawn(connection);
    client.batch_execute(sql).await.map_err(|e| pg_words(&e))
}

/// The error with the server's code and message when it sent one ("FATAL 57P03: the
/// database system is starting up"), not only "db error".
fn pg_words(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => error.to_string(),
    }
}
