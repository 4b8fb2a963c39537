//! What switchyard costs on the data path, measured against a direct connection.
//!
//! In-process upstreams run on loopback: bulk servers (read what the client sends until
//! EOF while writing back as many bytes as the client asked for, then report the byte
//! count they received) and echo servers. Each metric is measured straight to an
//! upstream and through a switchyard listener in the same process, alternating direct
//! and proxied runs over several rounds, and the table shows the median of each:
//!
//! - upload, download and both-ways bulk throughput on one connection (MB/s, 10^6 bytes);
//! - round-trip latency of a 1-byte ping-pong on one connection (p50, p99 in µs);
//! - connection setup: connect, one round trip and close, one after another (p50, p99
//!   in µs, and connections per second).
//!
//! Client, upstream and proxy share the same few cores, and on a shared machine the
//! absolute numbers move from run to run; the direct and proxied runs see the same noise,
//! so their ratio is the figure to compare between versions.
//!
//! `FORWARD_BENCH_SCALE` (default 1.0) scales every size and count, e.g. 0.25 for a quick
//! run. Every measurement has a deadline and the whole run a time budget, so the bench
//! fails rather than hangs.

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use switchyard::config::Config;
use switchyard::shutdown::Shutdown;

type BoxError = Box<dyn Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

/// Direct and proxied runs per metric; the table shows the median.
const ROUNDS: usize = 7;
/// Read and write size of the client and the upstreams in bulk transfers.
const BUFFER_SIZE: usize = 64 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

/// Sizes and counts at scale 1.0.
const BULK_MIB: f64 = 1024.0;
const BOTH_WAYS_MIB: f64 = 512.0;
const ROUND_TRIPS: f64 = 50_000.0;
const ROUND_TRIP_WARMUP: f64 = 1_000.0;
const CONNECTIONS: f64 = 2_000.0;
/// Untimed runs before the rounds, as a fraction of the timed size.
const WARMUP_FRACTION: f64 = 0.05;

/// No single measurement may take longer than this.
const MEASUREMENT_LIMIT: Duration = Duration::from_secs(30);
/// The whole run, warm-ups included, must fit in this.
const TOTAL_BUDGET: Duration = Duration::from_secs(100);

fn main() {
    let started = Instant::now();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("forward bench: cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    // The clients run as a task on the workers, like the proxy and the upstreams: a
    // future driven by `block_on` lives on the main thread and every wake-up crosses
    // threads, which made round-trip times jump between two modes from one connection to
    // the next.
    let result = runtime.block_on(async {
        tokio::spawn(run(started))
            .await
            .unwrap_or_else(|e| Err(format!("the bench task failed: {e}").into()))
    });
    // Upstream accept loops and connection tasks end with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => println!("wall time: {:.1} s", started.elapsed().as_secs_f64()),
        Err(e) => {
            eprintln!("forward bench: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(started: Instant) -> Result<()> {
    let scale = scale_from_env()?;
    let budget = Budget {
        end: started + TOTAL_BUDGET,
    };
    let plan = Plan::new(scale);

    // Separate upstreams for the direct and the proxied runs, so the thousands of
    // short connections of each (and their TIME_WAIT ports) go to different addresses.
    let shutdown = Shutdown::new();
    let bulk_direct = spawn_server(serve_bulk).await?;
    let echo_direct = spawn_server(serve_echo).await?;
    let bulk_proxied = start_proxy(spawn_server(serve_bulk).await?, &shutdown)?;
    let echo_proxied = start_proxy(spawn_server(serve_echo).await?, &shutdown)?;

    println!(
        "switchyard forward bench: scale {scale}, {ROUNDS} rounds, {} worker threads",
        tokio::runtime::Handle::current().metrics().num_workers()
    );
    println!(
        "  bulk {:.0} MiB each way, both ways {:.0} MiB each way, {} round trips, {} connections",
        plan.bulk_bytes as f64 / MIB,
        plan.both_ways_bytes as f64 / MIB,
        plan.round_trips,
        plan.connections,
    );
    println!();

    let targets = [
        (Via::Direct, bulk_direct, echo_direct),
        (Via::Switchyard, bulk_proxied, echo_proxied),
    ];
    let mut table = Table::default();

    let bulk_cases = [
        ("upload MB/s", plan.bulk_bytes, 0),
        ("download MB/s", 0, plan.bulk_bytes),
        (
            "both ways MB/s (sum)",
            plan.both_ways_bytes,
            plan.both_ways_bytes,
        ),
    ];
    for (name, up, down) in bulk_cases {
        let row = table.row(name, Better::Higher, 0);
        for &(via, bulk, _) in &targets {
            let what = format!("{name} warm-up {via:?}");
            budget
                .limit(&what, bulk_transfer(bulk, warmup(up), warmup(down)))
                .await?;
        }
        for round in 0..ROUNDS {
            for &(via, bulk, _) in &targets {
                let what = format!("{name} round {round} {via:?}");
                let elapsed = budget.limit(&what, bulk_transfer(bulk, up, down)).await?;
                table.rows[row].push(via, (up + down) as f64 / 1e6 / elapsed.as_secs_f64());
            }
        }
    }

    let p50 = table.row("round trip p50 µs", Better::Lower, 1);
    let p99 = table.row("round trip p99 µs", Better::Lower, 1);
    for round in 0..ROUNDS {
        for &(via, _, echo) in &targets {
            let what = format!("round trips round {round} {via:?}");
            let samples = budget
                .limit(
                    &what,
                    ping_pong(echo, plan.round_trip_warmup, plan.round_trips),
                )
                .await?;
            table.rows[p50].push(via, micros(percentile(&samples, 0.50)));
            table.rows[p99].push(via, micros(percentile(&samples, 0.99)));
        }
    }

    let p50 = table.row("connect+rtt+close p50 µs", Better::Lower, 1);
    let p99 = table.row("connect+rtt+close p99 µs", Better::Lower, 1);
    let rate = table.row("connections/s", Better::Higher, 0);
    for &(via, _, echo) in &targets {
        let what = format!("connections warm-up {via:?}");
        budget
            .limit(&what, connections(echo, warmup(plan.connections)))
            .await?;
    }
    for round in 0..ROUNDS {
        for &(via, _, echo) in &targets {
            let what = format!("connections round {round} {via:?}");
            let (samples, elapsed) = budget
                .limit(&what, connections(echo, plan.connections))
                .await?;
            table.rows[p50].push(via, micros(percentile(&samples, 0.50)));
            table.rows[p99].push(via, micros(percentile(&samples, 0.99)));
            table.rows[rate].push(via, samples.len() as f64 / elapsed.as_secs_f64());
        }
    }

    table.print();
    shutdown.begin();
    shutdown.drain(Duration::from_secs(1)).await;
    Ok(())
}

fn scale_from_env() -> Result<f64> {
    let text = match std::env::var("FORWARD_BENCH_SCALE") {
        Ok(text) => text,
        Err(std::env::VarError::NotPresent) => return Ok(1.0),
        Err(e) => return Err(format!("FORWARD_BENCH_SCALE: {e}").into()),
    };
    match text.trim().parse::<f64>() {
        Ok(scale) if scale.is_finite() && scale > 0.0 => Ok(scale),
        _ => Err(format!("FORWARD_BENCH_SCALE must be a number above 0, not {text:?}").into()),
    }
}

/// Sizes and counts after scaling.
struct Plan {
    bulk_bytes: u64,
    both_ways_bytes: u64,
    round_trips: u64,
    round_trip_warmup: u64,
    connections: u64,
}

impl Plan {
    fn new(scale: f64) -> Self {
        let scaled = |n: f64| ((n * scale).round() as u64).max(1);
        Self {
            bulk_bytes: scaled(BULK_MIB * MIB),
            both_ways_bytes: scaled(BOTH_WAYS_MIB * MIB),
            round_trips: scaled(ROUND_TRIPS),
            round_trip_warmup: scaled(ROUND_TRIP_WARMUP),
            connections: scaled(CONNECTIONS),
        }
    }
}

fn warmup(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        ((n as f64 * WARMUP_FRACTION) as u64).max(1)
    }
}

/// Deadline of the whole run; each measurement gets what is left, up to a limit.
struct Budget {
    end: Instant,
}

impl Budget {
    async fn limit<T>(&self, what: &str, work: impl Future<Output = Result<T>>) -> Result<T> {
        let left = self.end.saturating_duration_since(Instant::now());
        let limit = left.min(MEASUREMENT_LIMIT);
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(format!("{what}: {e}").into()),
            Err(_) if limit < MEASUREMENT_LIMIT => Err(format!(
                "{what}: the run's {TOTAL_BUDGET:?} budget ran out; try a smaller FORWARD_BENCH_SCALE"
            )
            .into()),
            Err(_) => Err(format!("{what}: did not finish within {limit:?}").into()),
        }
    }
}

// === upstreams ===

/// Binds `127.0.0.1:0` and serves every connection with `serve` on its own task until
/// the runtime ends. Returns the bound address.
async fn spawn_server<F, Fut>(serve: F) -> Result<SocketAddr>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let connection = serve(stream);
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            eprintln!("forward bench: upstream {addr}: {e}");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("forward bench: upstream {addr} cannot accept: {e}");
                    return;
                }
            }
        }
    });
    Ok(addr)
}

/// Bulk protocol. The client sends an 8-byte big-endian length `down`, then any number of
/// bytes, then EOF. The server counts what follows the header until EOF while writing
/// `down` bytes, then writes the count as 8 big-endian bytes and closes.
async fn serve_bulk(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.split();
    let mut header = [0u8; 8];
    reader.read_exact(&mut header).await?;
    let down = u64::from_be_bytes(header);
    let (received, ()) =
        tokio::try_join!(discard_to_eof(&mut reader), write_bytes(&mut writer, down))?;
    writer.write_all(&received.to_be_bytes()).await?;
    writer.shutdown().await
}

async fn serve_echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

// === proxy ===

/// Starts a switchyard listener on `127.0.0.1:0` in front of `upstream`; returns its
/// address. One proxy per upstream: the config check refuses two listeners on the same
/// bind address, port 0 included.
fn start_proxy(upstream: SocketAddr, shutdown: &Shutdown) -> Result<SocketAddr> {
    let text = format!(
        r#"
[listeners.bench]
bind = "127.0.0.1:0"
pool = "p"

[pools.p]
upstreams = [{{ address = "{upstream}" }}]

[pools.p.health]
enabled = false
"#
    );
    let config = Config::parse(&text, Path::new("bench.toml"))
        .map_err(|e| format!("bench config rejected: {e}"))?;
    let bound = switchyard::bind_all(&config)?.listeners;
    let proxy = switchyard::Proxy::start(&config, bound, shutdown).expect("start the proxy");
    proxy
        .listener("bench")
        .and_then(|l| l.addrs.first().copied())
        .ok_or_else(|| "proxy listener \"bench\" has no bound address".into())
}

// === clients ===

/// Sends `up` bytes and receives `down` bytes at the same time on one connection to the
/// bulk server; returns the time from connected to the server's byte count.
async fn bulk_transfer(addr: SocketAddr, up: u64, down: u64) -> Result<Duration> {
    let mut stream = TcpStream::connect(addr).await?;
    let started = Instant::now();
    let (mut reader, mut writer) = stream.split();
    let send = async {
        writer.write_all(&down.to_be_bytes()).await?;
        write_bytes(&mut writer, up).await?;
        writer.shutdown().await
    };
    let receive = async {
        read_exactly(&mut reader, down).await?;
        let mut count = [0u8; 8];
        reader.read_exact(&mut count).await?;
        Ok::<_, std::io::Error>(u64::from_be_bytes(count))
    };
    let ((), received) = tokio::try_join!(send, receive)?;
    let elapsed = started.elapsed();
    if received != up {
        return Err(format!("upstream received {received} bytes, {up} were sent").into());
    }
    Ok(elapsed)
}

/// `count` 1-byte round trips after `warmup` untimed ones, on one connection.
async fn ping_pong(addr: SocketAddr, warmup: u64, count: u64) -> Result<Vec<Duration>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut samples = Vec::with_capacity(count as usize);
    for i in 0..warmup + count {
        let sent = [i as u8];
        let mut echoed = [0u8; 1];
        let started = Instant::now();
        stream.write_all(&sent).await?;
        stream.read_exact(&mut echoed).await?;
        let elapsed = started.elapsed();
        if echoed != sent {
            return Err(format!("echo returned {echoed:?} for {sent:?}").into());
        }
        if i >= warmup {
            samples.push(elapsed);
        }
    }
    Ok(samples)
}

/// `count` sequential connections, each: connect, one 1-byte round trip, close. Returns
/// each connection's time and the time of all of them.
async fn connections(addr: SocketAddr, count: u64) -> Result<(Vec<Duration>, Duration)> {
    let mut samples = Vec::with_capacity(count as usize);
    let all = Instant::now();
    for _ in 0..count {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut echoed = [0u8; 1];
        stream.write_all(b"x").await?;
        stream.read_exact(&mut echoed).await?;
        drop(stream);
        samples.push(started.elapsed());
    }
    Ok((samples, all.elapsed()))
}

// === byte pumps ===

async fn write_bytes<W: AsyncWrite + Unpin>(writer: &mut W, mut n: u64) -> std::io::Result<()> {
    let buf = vec![0x5au8; BUFFER_SIZE];
    while n > 0 {
        let chunk = n.min(BUFFER_SIZE as u64) as usize;
        writer.write_all(&buf[..chunk]).await?;
        n -= chunk as u64;
    }
    Ok(())
}

/// Reads exactly `n` bytes and throws them away.
async fn read_exactly<R: AsyncRead + Unpin>(reader: &mut R, n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut left = n;
    while left > 0 {
        let want = left.min(BUFFER_SIZE as u64) as usize;
        let got = reader.read(&mut buf[..want]).await?;
        if got == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {} of {n} bytes", n - left),
            ));
        }
        left -= got as u64;
    }
    Ok(())
}

/// Reads until EOF; returns how many bytes came.
async fn discard_to_eof<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<u64> {
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

// === results ===

#[derive(Debug, Clone, Copy)]
enum Via {
    Direct,
    Switchyard,
}

#[derive(Debug, Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

struct Row {
    name: &'static str,
    better: Better,
    decimals: usize,
    direct: Vec<f64>,
    proxied: Vec<f64>,
}

impl Row {
    fn push(&mut self, via: Via, value: f64) {
        match via {
            Via::Direct => self.direct.push(value),
            Via::Switchyard => self.proxied.push(value),
        }
    }
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    /// Adds an empty row; returns its index.
    fn row(&mut self, name: &'static str, better: Better, decimals: usize) -> usize {
        self.rows.push(Row {
            name,
            better,
            decimals,
            direct: Vec::new(),
            proxied: Vec::new(),
        });
        self.rows.len() - 1
    }

    fn print(&self) {
        let title = format!("metric (median of {ROUNDS} rounds)");
        let width = self
            .rows
            .iter()
            .map(|r| r.name.chars().count())
            .chain([title.chars().count()])
            .max()
            .unwrap_or(0);
        println!(
            "{title:<width$} | {:>10} | {:>10} | {:>5} | {:>11} | worse when",
            "direct", "switchyard", "ratio", "round range"
        );
        println!(
            "{:-<width$}-+-{:-<10}-+-{:-<10}-+-{:-<5}-+-{:-<11}-+-{:-<10}",
            "", "", "", "", "", ""
        );
        for row in &self.rows {
            let direct = median(&row.direct);
            let proxied = median(&row.proxied);
            // Each round's direct and proxied runs are neighbours in time; the spread of
            // their ratios shows how far the median ratio can be trusted.
            let (low, high) = row
                .direct
                .iter()
                .zip(&row.proxied)
                .map(|(d, p)| p / d)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                    (lo.min(r), hi.max(r))
                });
            let range = format!("{low:.2}-{high:.2}");
            let worse = match row.better {
                Better::Higher => "ratio < 1",
                Better::Lower => "ratio > 1",
            };
            // Padded by characters, not bytes ("µ" is two bytes).
            let pad = width - row.name.chars().count();
            println!(
                "{}{:pad$} | {:>10.prec$} | {:>10.prec$} | {:>5.2} | {range:>11} | {worse}",
                row.name,
                "",
                direct,
                proxied,
                proxied / direct,
                prec = row.decimals,
            );
        }
        println!();
        println!(
            "ratio = switchyard / direct; round range = lowest and highest ratio of one round's \
             direct and switchyard runs."
        );
        println!(
            "Absolute numbers on a shared machine are noise; the ratio is the figure to compare."
        );
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile; `samples` must not be empty.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
