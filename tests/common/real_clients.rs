//! Clients nobody here wrote, the `redis` crate and `tokio-postgres`, as a stream of new
//! connections through a proxy: each client connects, makes one real request and says
//! which server answered, or what went wrong in the library's own words. Shared by
//! tests/real_failover.rs and benches/failover.rs.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;

use switchyard::drill::{ClientRecord, Stop, Timeline, run_clients};

/// What one real client saw: who served it, or the client library's error.
pub type RealRecord = ClientRecord<String>;

/// Every real client of one stream, in the order they started.
pub type RealTimeline = Timeline<String>;

/// How a stream of real clients runs.
#[derive(Debug, Clone)]
pub struct RealStream {
    /// One new client this often (a missed tick is skipped, not made up in a burst).
    pub every: Duration,
    /// No client starts later than this after the start.
    pub limit: Duration,
    /// A client without an answer after this has failed.
    pub client_timeout: Duration,
    /// What ends the stream before its limit.
    pub stop: Stop,
}

impl RealStream {
    /// Runs `client(n)` for the n-th client; returns once every client finished.
    pub async fn run<F, Fut>(self, client: F) -> RealTimeline
    where
        F: Fn(u64) -> Fut,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let limit = self.client_timeout;
        run_clients(self.every, self.limit, self.stop, move |n| {
            let request = client(n);
            async move {
                timeout(limit, request)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
            }
        })
        .await
    }
}

/// The clients of `timeline` that failed.
pub fn failed(timeline: &RealTimeline) -> impl Iterator<Item = &RealRecord> {
    timeline.records.iter().filter(|r| r.served_by.is_err())
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
    let client = pg_login(addr).await?;
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
    pg_login(addr)
        .await?
        .batch_execute(sql)
        .await
        .map_err(|e| pg_words(&e))
}

/// A session on `addr` as `postgres` (trust authentication), its connection driven by
/// a task of its own that ends with the client.
async fn pg_login(addr: SocketAddr) -> Result<tokio_postgres::Client, String> {
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
    Ok(client)
}

/// The error with the server's code and message when it sent one ("FATAL 57P03: the
/// database system is starting up"), not only "db error".
fn pg_words(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => error.to_string(),
    }
}
