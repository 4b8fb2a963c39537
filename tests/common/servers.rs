//! Real servers on loopback ports, started and stopped by the test: PostgreSQL (initdb
//! into a temp dir, run as the `postgres` user when the test runs as root), redis-server
//! and MariaDB, from Debian's packages. Without them a test prints SKIPPED and passes,
//! unless `SWITCHYARD_EXAMPLE_SERVERS=required` (set by `.ci/run`) makes it fail.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{SOON, TestDir, closed_port, loopback};

// ---------------------------------------------------------------- processes

/// Without the servers an example names its test cannot run: a skip on a developer's
/// machine, a failure where `.ci/run` installed them and set the variable.
pub fn skip(why: &str) {
    let required = std::env::var("SWITCHYARD_EXAMPLE_SERVERS").is_ok_and(|v| v == "required");
    assert!(!required, "{why} (SWITCHYARD_EXAMPLE_SERVERS=required)");
    eprintln!("SKIPPED: {why}");
}

pub fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers; `pid` is our own child and not yet reaped
    // (only its owner's Drop reaps it), so it cannot name another process.
    let result = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        result,
        0,
        "kill failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Resumes `child` if stopped, asks it to exit with `request`, and kills it if it is
/// still running after `grace`; reaps it.
pub fn stop_child(child: &mut Child, request: libc::c_int, grace: Duration) {
    if matches!(child.try_wait(), Ok(None)) {
        signal(child, libc::SIGCONT);
        signal(child, request);
        let deadline = std::time::Instant::now() + grace;
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A [`TestDir`] shared by the server processes that use it: each holds an `Arc` of it,
/// so it is removed after the last of them has stopped.
pub struct TempDir(pub TestDir);

impl TempDir {
    pub fn new() -> Arc<Self> {
        Arc::new(Self(TestDir::new()))
    }
}

pub fn log_file(path: &Path) -> (Stdio, Stdio) {
    let file = std::fs::File::create(path).expect("create a log file");
    let copy = file.try_clone().expect("clone the log file");
    (Stdio::from(file), Stdio::from(copy))
}

/// Runs `command` to its end with its output in `log`; a failure panics with the log.
pub fn run_logged(mut command: Command, log: &Path, what: &str) {
    let (stdout, stderr) = log_file(log);
    let status = command
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        status.success(),
        "{what} failed: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

// ---------------------------------------------------------------- PostgreSQL

/// PostgreSQL's programs, and the user to run the server as: it refuses to run as root.
pub struct PgTools {
    pub bin: PathBuf,
    pub run_as: Option<(u32, u32)>,
}

impl PgTools {
    pub fn find() -> Option<Self> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                (bin.join("postgres").is_file() && bin.join("initdb").is_file())
                    .then_some((version, bin))
            })
            .collect();
        versions.sort();
        let Some((_, bin)) = versions.pop() else {
            skip("PostgreSQL is not installed (Debian package postgresql)");
            return None;
        };
        let run_as = unprivileged("postgres", "PostgreSQL")?;
        Some(Self { bin, run_as })
    }

    /// `program`, run in `dir` as the PostgreSQL user.
    pub fn command(&self, program: &Path, dir: &Path) -> Command {
        let mut command = Command::new(program);
        command.current_dir(dir).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }
}

/// Who to run `server` as: as root, `user` from /etc/passwd (`Some(None)`: not root,
/// run as ourselves); `None` (after [`skip`]) when root and there is no such user.
fn unprivileged(user: &str, server: &str) -> Option<Option<(u32, u32)>> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some(None);
    }
    let ids = passwd_ids(user);
    if ids.is_none() {
        skip(&format!(
            "running as root, and there is no {user} user to run {server} as"
        ));
    }
    ids.map(Some)
}

/// (uid, gid) of `user` from /etc/passwd.
pub fn passwd_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || fields[0] != user {
            return None;
        }
        Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
    })
}

/// One `initdb`, copied for every server (much faster than one `initdb` each).
pub struct PgCluster {
    pub tools: PgTools,
    pub dir: Arc<TempDir>,
    pub template: PathBuf,
}

impl PgCluster {
    pub fn init(tools: PgTools) -> Self {
        let dir = TempDir::new();
        if let Some((uid, gid)) = tools.run_as {
            std::os::unix::fs::chown(&dir.0, Some(uid), Some(gid)).expect("chown the test dir");
        }
        let template = dir.0.join("template");
        let log = dir.0.join("initdb.log");
        let mut initdb = tools.command(&tools.bin.join("initdb"), &dir.0);
        initdb
            .arg("-D")
            .arg(&template)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "--no-locale"])
            .args(["-E", "UTF8"]);
        run_logged(initdb, &log, "initdb");
        Self {
            tools,
            dir,
            template,
        }
    }

    /// A server of its own on a free loopback port, answering queries when this returns.
    pub async fn start(&self, name: &str) -> PgServer {
        let data = self.dir.0.join(name);
        let status = self
            .tools
            .command(Path::new("cp"), &self.dir.0)
            .arg("-a")
            .arg(&self.template)
            .arg(&data)
            .status()
            .expect("run cp");
        assert!(status.success(), "copying the PostgreSQL template failed");
        let server = self.run(data, name, &[]);
        server.wait_for_queries().await;
        server
    }

    /// A streaming standby of `primary` (pg_basebackup -R) with `settings` (`-c`
    /// options), started; not waited for: with `hot_standby=off` it never takes queries.
    pub fn standby_of(&self, primary: &PgServer, name: &str, settings: &[&str]) -> PgServer {
        let data = self.dir.0.join(name);
        let log = self.dir.0.join(format!("{name}-basebackup.log"));
        let mut basebackup = self
            .tools
            .command(&self.tools.bin.join("pg_basebackup"), &self.dir.0);
        basebackup
            .args(["-h", "127.0.0.1", "-p", &primary.addr.port().to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream", "--no-sync", "-D"])
            .arg(&data);
        run_logged(basebackup, &log, "pg_basebackup");
        self.run(data, name, settings)
    }

    /// Starts a postmaster on `data` with `settings` on a free loopback port.
    fn run(&self, data: PathBuf, name: &str, settings: &[&str]) -> PgServer {
        let mut server = PgServer {
            child: None,
            addr: loopback(closed_port().port()),
            log: self.dir.0.join(format!("{name}.log")),
            data,
            settings: settings.iter().map(|s| s.to_string()).collect(),
            bin: self.tools.bin.clone(),
            run_as: self.tools.run_as,
            _dir: self.dir.clone(),
        };
        server.spawn();
        server
    }
}

/// A postmaster we started; stopped (immediate shutdown) on drop.
pub struct PgServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub log: PathBuf,
    pub data: PathBuf,
    settings: Vec<String>,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    _dir: Arc<TempDir>,
}

impl PgServer {
    /// Starts the postmaster on its data folder and port; its output goes to `log`.
    fn spawn(&mut self) {
        let (stdout, stderr) = log_file(&self.log);
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .current_dir(self.data.parent().unwrap_or(Path::new("/")))
            .stdin(Stdio::null())
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.addr.port().to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "unix_socket_directories="])
            .args(["-c", "fsync=off", "-c", "shared_buffers=16MB"])
            .args(["-c", "max_connections=50"]);
        for setting in &self.settings {
            command.args(["-c", setting]);
        }
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        let child = command
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
    }

    pub fn child(&self) -> &Child {
        self.child.as_ref().expect("the postmaster runs")
    }

    /// Crashes the server (immediate shutdown: no checkpoint) and starts it again on
    /// the same port: it replays its WAL (crash recovery) before it takes logins.
    pub fn crash_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, libc::SIGQUIT, Duration::from_secs(10));
        }
        self.spawn();
    }

    /// The postmaster's process, to signal or kill (panics once it was stopped for good).
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the postmaster runs")
    }

    /// Makes `child` the postmaster (a restart by hand); the old one must be gone.
    pub fn replace_child(&mut self, child: Child) {
        self.child = Some(child);
    }

    /// Waits until it answers a query on its port (30 s at most).
    pub async fn wait_for_queries(&self) {
        let port = self.addr.port();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match pg_port(self.addr, Duration::from_secs(2)).await {
                Ok(answered) if answered == port => break,
                Ok(other) => panic!("port {port} answered as port {other}"),
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "postgres on {port} did not start: {e}\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends recovery (`pg_ctl promote`): a standby becomes a primary.
    pub fn promote(&self) {
        let mut command = Command::new(self.bin.join("pg_ctl"));
        command
            .arg("promote")
            .arg("-D")
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        let status = command.status().expect("run pg_ctl promote");
        assert!(status.success(), "pg_ctl promote failed");
    }

    /// Freezes the postmaster: the kernel still completes connects to its port, but
    /// nothing accepts them, like a server that is stopped, deadlocked or swapped out.
    pub fn freeze(&self) {
        signal(self.child(), libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(self.child(), libc::SIGCONT);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, the postmaster takes its backends down with it.
        if let Some(child) = &mut self.child {
            stop_child(child, libc::SIGQUIT, Duration::from_secs(10));
        }
    }
}

/// Reads one message: a type byte and a length-prefixed body.
pub async fn pg_message(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=1 << 20).contains(&len) {
        return Err(std::io::Error::other(format!("bad message length {len}")));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await?;
    Ok((header[0], body))
}

pub fn pg_error(body: &[u8]) -> std::io::Error {
    let message = body
        .split(|&b| b == 0)
        .find(|field| field.first() == Some(&b'M'))
        .map(|field| String::from_utf8_lossy(&field[1..]).into_owned())
        .unwrap_or_default();
    std::io::Error::other(format!("server error: {message}"))
}

/// The port of the PostgreSQL server on the other end of `stream`, asked over the wire
/// protocol: startup as `postgres` with trust authentication, then `SHOW port`.
pub async fn pg_ask_port(stream: &mut TcpStream) -> std::io::Result<u16> {
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut startup = Vec::new();
    startup.extend_from_slice(&((8 + params.len()) as u32).to_be_bytes());
    startup.extend_from_slice(&0x0003_0000u32.to_be_bytes());
    startup.extend_from_slice(params);
    stream.write_all(&startup).await?;
    loop {
        match pg_message(stream).await? {
            (b'R', body) if body.starts_with(&[0, 0, 0, 0]) => {}
            (b'R', _) => return Err(std::io::Error::other("asks for a password")),
            (b'E', body) => return Err(pg_error(&body)),
            (b'Z', _) => break,
            _ => {}
        }
    }
    let query = b"SHOW port\0";
    let mut message = vec![b'Q'];
    message.extend_from_slice(&((4 + query.len()) as u32).to_be_bytes());
    message.extend_from_slice(query);
    stream.write_all(&message).await?;
    let mut port = None;
    loop {
        match pg_message(stream).await? {
            // DataRow: column count (2 bytes), then the value's length (4) and bytes.
            (b'D', body) if body.len() > 6 => {
                port = std::str::from_utf8(&body[6..])
                    .ok()
                    .and_then(|p| p.parse().ok());
            }
            (b'E', body) => return Err(pg_error(&body)),
            (b'Z', _) => break,
            _ => {}
        }
    }
    port.ok_or_else(|| std::io::Error::other("no port in the answer"))
}

/// [`pg_ask_port`] on a new connection to `addr`, closed after; an error after `limit`.
pub async fn pg_port(addr: SocketAddr, limit: Duration) -> std::io::Result<u16> {
    let session = async {
        let mut stream = TcpStream::connect(addr).await?;
        let port = pg_ask_port(&mut stream).await?;
        let _ = stream.write_all(b"X\0\0\0\x04").await;
        Ok(port)
    };
    tokio::time::timeout(limit, session)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}

/// The same question asked by `psql`, the client operators use.
pub async fn psql_port(tools: &PgTools, addr: SocketAddr) -> u16 {
    let stdout = psql(tools, addr, "SHOW port").await;
    stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("psql printed {stdout:?}"))
}

/// Runs `sql` with `psql` as `postgres` on `addr`; its output, unaligned.
pub async fn psql(tools: &PgTools, addr: SocketAddr, sql: &str) -> String {
    let mut command = tokio::process::Command::new(tools.bin.join("psql"));
    command
        .args(["-X", "-A", "-t", "-c", sql])
        .arg(format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout=5",
            addr.ip(),
            addr.port()
        ))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SOON, command.output())
        .await
        .expect("psql hung")
        .expect("run psql");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "psql failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.into_owned()
}

// ---------------------------------------------------------------- Redis

/// A redis-server we started, without persistence; killed on drop, like a crash.
pub struct Redis {
    pub child: Child,
    pub addr: SocketAddr,
    _dir: Arc<TempDir>,
}

impl Redis {
    pub async fn start(program: &Path, dir: &Arc<TempDir>, port: u16) -> Self {
        Self::start_with(program, dir, port, &[]).await
    }

    /// Like [`Redis::start`], with more command-line options (e.g. `--replicaof`).
    pub async fn start_with(
        program: &Path,
        dir: &Arc<TempDir>,
        port: u16,
        options: &[&str],
    ) -> Self {
        let log = dir.0.join(format!("redis-{port}.log"));
        let (stdout, stderr) = log_file(&log);
        let child = Command::new(program)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(options)
            .arg("--dir")
            .arg(&dir.0)
            .current_dir(&dir.0)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start redis-server");
        let redis = Self {
            child,
            addr: loopback(port),
            _dir: dir.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answered = match TcpStream::connect(redis.addr).await {
                Ok(mut stream) => {
                    tokio::time::timeout(Duration::from_secs(2), redis_port(&mut stream)).await
                }
                Err(e) => Ok(Err(e)),
            };
            match answered {
                Ok(Ok(answered)) => {
                    assert_eq!(answered, port);
                    break;
                }
                // Started with --requirepass: it answers, and asks for the password.
                Ok(Err(e)) if e.to_string().contains("NOAUTH") => break,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        redis
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One CRLF-terminated line of a reply.
pub async fn redis_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if stream.read(&mut byte).await? == 0 || line.len() > 512 {
            return Err(std::io::Error::other("closed or overlong reply"));
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

/// The port of the Redis node that serves `stream`, from `INFO server`.
pub async fn redis_port(stream: &mut TcpStream) -> std::io::Result<u16> {
    stream.write_all(b"INFO server\r\n").await?;
    let header = redis_line(stream).await?;
    let len: usize = header
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .filter(|&n| n < 1 << 20)
        .ok_or_else(|| std::io::Error::other(format!("unexpected reply {header:?}")))?;
    let mut body = vec![0u8; len + 2];
    stream.read_exact(&mut body).await?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("tcp_port:")?.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no tcp_port in INFO"))
}

pub async fn redis_ping(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"PING\r\n").await?;
    match redis_line(stream).await?.as_str() {
        "+PONG" => Ok(()),
        other => Err(std::io::Error::other(format!("PING answered {other:?}"))),
    }
}

/// A master and its replica (`--replicaof`), or `None` (after [`skip`]) when
/// redis-server is not installed.
pub async fn redis_pair(dir: &Arc<TempDir>) -> Option<(Redis, Redis)> {
    let Some(program) = find_program("redis-server") else {
        skip("redis-server is not installed (Debian package redis-server)");
        return None;
    };
    let master = Redis::start(&program, dir, closed_port().port()).await;
    let master_port = master.addr.port().to_string();
    let replica = Redis::start_with(
        &program,
        dir,
        closed_port().port(),
        &["--replicaof", "127.0.0.1", &master_port],
    )
    .await;
    Some((master, replica))
}

/// One inline command on a new connection to `addr`; the reply's first line.
pub async fn redis_command(addr: SocketAddr, command: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect to redis");
    stream
        .write_all(format!("{command}\r\n").as_bytes())
        .await
        .expect("send");
    tokio::time::timeout(SOON, redis_line(&mut stream))
        .await
        .expect("an answer in time")
        .expect("an answer")
}

/// A failover by hand: `replica` becomes the master and `master` follows it.
pub async fn redis_swap(master: &Redis, replica: &Redis) {
    assert_eq!(redis_command(replica.addr, "REPLICAOF NO ONE").await, "+OK");
    let follow = format!("REPLICAOF 127.0.0.1 {}", replica.addr.port());
    assert_eq!(redis_command(master.addr, &follow).await, "+OK");
}

/// The Redis node (its port) a new client through `front` lands on.
pub async fn redis_node(front: SocketAddr) -> u16 {
    let mut stream = TcpStream::connect(front).await.expect("connect");
    tokio::time::timeout(SOON, redis_port(&mut stream))
        .await
        .expect("an answer in time")
        .expect("an answer")
}

// ---------------------------------------------------------------- MariaDB

/// A MariaDB server of its own (mariadb-install-db into a temp dir, run as the `mysql`
/// user when the test runs as root); killed on drop.
pub struct MariaDb {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    _dir: Arc<TempDir>,
}

impl MariaDb {
    /// `None` (after [`skip`]) when MariaDB is not installed.
    pub async fn start() -> Option<Self> {
        let (Some(server), Some(install)) =
            (find_program("mariadbd"), find_program("mariadb-install-db"))
        else {
            skip("MariaDB is not installed (Debian package mariadb-server)");
            return None;
        };
        let run_as = unprivileged("mysql", "MariaDB")?;
        let dir = TempDir::new();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir.0, Some(uid), Some(gid)).expect("chown the test dir");
        }
        let command = |program: &Path| {
            let mut command = Command::new(program);
            command.current_dir(&dir.0).stdin(Stdio::null());
            if let Some((uid, gid)) = run_as {
                command.uid(uid).gid(gid);
            }
            command
        };
        let data = dir.0.join("data");
        let log = dir.0.join("install.log");
        let mut install_db = command(&install);
        install_db
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        run_logged(install_db, &log, "mariadb-install-db");
        let port = closed_port().port();
        let log = dir.0.join("mariadb.log");
        let (stdout, stderr) = log_file(&log);
        let child = command(&server)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", dir.0.join("sock").display()))
            .arg(format!("--pid-file={}", dir.0.join("pid").display()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--skip-log-bin",
            ])
            .args(["--innodb-buffer-pool-size=8M"])
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start mariadbd");
        let server = Self {
            child,
            addr: loopback(port),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.greets().await {
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start: {}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(server)
    }

    /// Whether a new connection gets a protocol-10 greeting.
    async fn greets(&self) -> bool {
        let greeting = async {
            let mut stream = TcpStream::connect(self.addr).await?;
            let mut first = [0u8; 5];
            stream.read_exact(&mut first).await?;
            std::io::Result::Ok(first[4] == 0x0a)
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), greeting).await,
            Ok(Ok(true))
        )
    }

    /// Freezes the server: connects complete, nothing answers.
    pub fn freeze(&self) {
        signal(&self.child, libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(&self.child, libc::SIGCONT);
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGKILL, Duration::from_secs(10));
    }
}
