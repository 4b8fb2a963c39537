//! The README's Operations runbook, run word for word.
//!
//! Every shell block the README marks with `<!-- runbook: STEP -->` goes, in order, to
//! one bash session, as an operator's terminal would run them, from a temporary copy of
//! the files the runbook uses (the repository is never written to). The `serve` block
//! is the proxy itself: it runs as a child process (`switchyard run` of
//! `config/examples/runbook.toml`) in front of stand-in PostgreSQL servers on the
//! config's loopback ports. After each step the test checks, through the admin API and
//! real client connections, that what the runbook promises happened.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinSet;

use common::*;

/// The runbook's steps in README order; the README and this list must agree.
const STEPS: [&str; 11] = [
    "token", "serve", "session", "why", "drain", "maint", "up", "failover", "restore", "failback",
    "reload",
];

/// The config the runbook operates, relative to the repository root.
const CONFIG: &str = "config/examples/runbook.toml";

/// The first bytes a PostgreSQL client sends to ask for TLS; the runbook config's check.
const SSL_REQUEST: [u8; 8] = [0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f];

/// A bash step may run several `switchyard` and `curl` commands on a loaded machine.
const STEP_LIMIT: Duration = Duration::from_secs(60);

/// One marked block of the README.
#[derive(Debug)]
struct Block {
    step: String,
    script: String,
}

/// The README's marked shell blocks, in order: a `<!-- runbook: STEP -->` line directly
/// followed by a ```` ```sh ```` fence.
fn runbook_blocks(readme: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(step) = line
            .trim()
            .strip_prefix("<!-- runbook:")
            .and_then(|rest| rest.strip_suffix("-->"))
        else {
            continue;
        };
        let step = step.trim().to_string();
        assert_eq!(
            lines.next().map(str::trim),
            Some("```sh"),
            "README: the runbook marker for {step:?} must be followed by a ```sh block"
        );
        let mut script = String::new();
        for line in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            script.push_str(line);
            script.push('\n');
        }
        blocks.push(Block { step, script });
    }
    blocks
}

/// The PATH the runbook expects: the `switchyard` under test first.
fn path_with_switchyard() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_switchyard"))
        .parent()
        .expect("the binary has a folder")
        .to_path_buf();
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("{}:{rest}", bin.display())
}

/// A command as the runbook's shell runs it: in `dir`, with the binary on PATH and no
/// HTTP proxy between curl and the loopback admin API.
fn shell_command(dir: &Path) -> Command {
    let mut command = Command::new("bash");
    command
        .args(["--noprofile", "--norc"])
        .current_dir(dir)
        .env("PATH", path_with_switchyard())
        .kill_on_drop(true);
    for proxy in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        command.env_remove(proxy);
    }
    command
}

/// One bash process fed the runbook's blocks one at a time, so that variables set by
/// one block are there for the next, as in a terminal. It stops at the first command
/// that fails (`set -euo pipefail`).
struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    trace: PathBuf,
    dir: PathBuf,
}

impl Session {
    fn start(dir: &Path) -> Self {
        let trace = dir.join("runbook-session.log");
        let mut child = shell_command(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&trace).expect("session log"))
            .spawn()
            .expect("start bash");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        Self {
            child,
            stdin,
            stdout,
            trace,
            dir: dir.to_path_buf(),
        }
    }

    /// Runs `block` verbatim in the session; returns what it printed. Fails the test
    /// when a command fails or the block takes longer than [`STEP_LIMIT`].
    async fn run(&mut self, block: &Block) -> String {
        // The block goes to a file and is sourced with stdin from /dev/null, so that no
        // command in it can read the rest of the session's input.
        let file = self.dir.join(format!("runbook-{}.sh", block.step));
        std::fs::write(&file, &block.script).expect("write block");
        let done = format!("__runbook_step_done__ {}", block.step);
        // The marker goes on a line of its own even when the block's last output (curl's
        // JSON) ends without a newline.
        let input = format!(
            "set -euxo pipefail\nsource {} < /dev/null\necho\necho {done}\n",
            file.display()
        );
        self.stdin
            .write_all(input.as_bytes())
            .await
            .expect("feed bash");
        let mut printed = String::new();
        let outcome = tokio::time::timeout(STEP_LIMIT, async {
            while let Some(line) = self.stdout.next_line().await.expect("read bash") {
                if line == done {
                    return true;
                }
                printed.push_str(&line);
                printed.push('\n');
            }
            false
        })
        .await;
        let trace = std::fs::read_to_string(&self.trace).unwrap_or_default();
        match outcome {
            Ok(true) => printed,
            Ok(false) => panic!(
                "runbook step {:?} failed (a command exited non-zero):\n--- block\n{}--- stdout\n{printed}--- trace\n{trace}",
                block.step, block.script
            ),
            Err(_) => panic!(
                "runbook step {:?} took longer than {STEP_LIMIT:?}:\n--- stdout\n{printed}--- trace\n{trace}",
                block.step
            ),
        }
    }
}

/// Stand-ins for the PostgreSQL servers: a session's SSLRequest is answered `N` (no
/// TLS), as PostgreSQL without TLS does; every other byte is echoed.
struct StandIns {
    tasks: JoinSet<()>,
}

impl StandIns {
    async fn start(addrs: &[SocketAddr]) -> Self {
        let mut tasks = JoinSet::new();
        for &addr in addrs {
            let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| {
                panic!("cannot listen on {addr}, a port of {CONFIG}; it must be free: {e}")
            });
            tasks.spawn(async move {
                let mut sessions = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    sessions.spawn(stand_in_session(stream));
                    while sessions.try_join_next().is_some() {}
                }
            });
        }
        Self { tasks }
    }
}

impl Drop for StandIns {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn stand_in_session(mut stream: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let answer: &[u8] = if buf[..n] == SSL_REQUEST {
            b"N"
        } else {
            &buf[..n]
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// A client connection through the proxy that has proven it reaches an upstream.
async fn connected_client(listener: SocketAddr) -> TcpStream {
    let mut client = TcpStream::connect(listener)
        .await
        .expect("connect to proxy");
    assert!(echoes(&mut client).await, "a new client is not served");
    client
}

/// Whether `client` still gets its bytes back through the proxy.
async fn echoes(client: &mut TcpStream) -> bool {
    let payload = b"SELECT 1;\n";
    let exchange = async {
        client.write_all(payload).await?;
        let mut back = [0u8; 10];
        client.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back == *payload)
    };
    matches!(tokio::time::timeout(SOON, exchange).await, Ok(Ok(true)))
}

/// The admin API's view of one upstream of pool `postgres`.
async fn upstream(admin: SocketAddr, name: &str) -> serde_json::Value {
    let status = get_json(admin, "/status").await;
    upstream_status(&status, "postgres", name)
        .unwrap_or_else(|| panic!("no upstream {name} in /status: {status}"))
        .clone()
}

async fn state(admin: SocketAddr, name: &str) -> String {
    upstream(admin, name).await["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn counter(admin: SocketAddr, name: &str, field: &str) -> u64 {
    upstream(admin, name).await[field].as_u64().unwrap_or(0)
}

async fn pool(admin: SocketAddr) -> serde_json::Value {
    let status = get_json(admin, "/status").await;
    status["pools"]
        .as_array()
        .and_then(|pools| pools.iter().find(|p| p["name"] == "postgres"))
        .unwrap_or_else(|| panic!("no pool postgres in /status: {status}"))
        .clone()
}

async fn active_tier(admin: SocketAddr) -> Option<u64> {
    pool(admin).await["active_tier"].as_u64()
}

/// Waits until `condition` (polled through the admin API) holds.
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + SOON;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_runbook_works_as_written() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("read README.md");
    let blocks = runbook_blocks(&readme);
    let steps: Vec<&str> = blocks.iter().map(|b| b.step.as_str()).collect();
    assert_eq!(
        steps, STEPS,
        "the README's runbook steps changed; update this test with them"
    );
    let block = |step: &str| {
        blocks
            .iter()
            .find(|b| b.step == step)
            .expect("every step was found")
    };

    // Laid out like the repository root, for the runbook.
    let work = TestDir::new();
    let dir = work.to_path_buf();
    std::fs::create_dir_all(dir.join("config/examples")).expect("mkdir");
    std::fs::copy(repo.join(CONFIG), dir.join(CONFIG)).expect("copy the runbook config");
    let mut session = Session::start(&dir);
    // token: first, as for an operator: the config is not valid until its token exists.
    session.run(block("token")).await;
    let config = switchyard::config::Config::load(&dir.join(CONFIG)).expect("valid config");
    let admin = config
        .admin
        .as_ref()
        .expect("the runbook config has [admin]");
    let admin_addr = admin.listen;
    let token_file = admin
        .token_file
        .clone()
        .expect("the runbook config has a token");
    let listener = config.listeners[0].binds[0];
    let upstream_addrs: Vec<SocketAddr> = config.pools[0]
        .upstreams
        .iter()
        .map(|u| u.address)
        .collect();
    let _stand_ins = StandIns::start(&upstream_addrs).await;

    // A private, non-empty token where the config's token_file points.
    let metadata = std::fs::metadata(&token_file).expect("the token file exists");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600, "token mode");
    let token = std::fs::read_to_string(&token_file).expect("read token");
    assert!(token.trim().len() >= 24, "token too short: {token:?}");

    // serve: the block's one command, as the proxy process.
    let serve = block("serve");
    let commands: Vec<&str> = serve
        .script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(commands.len(), 1, "the serve block is one command");
    let log = dir.join("switchyard.log");
    let _proxy = shell_command(&dir)
        .arg("-c")
        .arg(format!("exec {}", commands[0]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("proxy log"))
        .spawn()
        .expect("start switchyard");
    let proxy_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + SOON;
    while TcpStream::connect(admin_addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the admin API never came up:\n{}",
            proxy_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("every upstream passed its first check", || async {
        let status = get_json(admin_addr, "/status").await;
        status["pools"][0]["upstreams"]
            .as_array()
            .is_some_and(|all| {
                all.iter()
                    .all(|u| u["last_check"]["result"] == "ok" && u["state"] == "up")
            })
    })
    .await;

    session.run(block("session")).await;

    // why: the status table and the event log.
    let printed = session.run(block("why")).await;
    assert!(printed.contains("POOL postgres"), "{printed}");
    assert!(printed.contains("\"events\""), "{printed}");

    // drain: pg-a takes no new clients, the ones it has stay.
    let mut held = Vec::new();
    while counter(admin_addr, "pg-a", "connections_active").await == 0 {
        assert!(held.len() < 8, "round robin never chose pg-a");
        held.push(connected_client(listener).await);
    }
    let on_pg_a = counter(admin_addr, "pg-a", "connections_active").await;
    let printed = session.run(block("drain")).await;
    assert!(printed.contains("DRAIN"), "{printed}");
    assert_eq!(state(admin_addr, "pg-a").await, "drain");
    for client in &mut held {
        assert!(
            echoes(client).await,
            "an established client was cut by drain"
        );
    }
    let pg_a_total = counter(admin_addr, "pg-a", "connections_total").await;
    let pg_b_total = counter(admin_addr, "pg-b", "connections_total").await;
    drop(connected_client(listener).await);
    assert_eq!(
        counter(admin_addr, "pg-a", "connections_total").await,
        pg_a_total,
        "a new client went to the drained pg-a"
    );
    assert_eq!(
        counter(admin_addr, "pg-b", "connections_total").await,
        pg_b_total + 1
    );

    // maint: pg-a's connections close, the others stay.
    session.run(block("maint")).await;
    assert_eq!(state(admin_addr, "pg-a").await, "maint");
    eventually("pg-a's connections closed", || async {
        counter(admin_addr, "pg-a", "connections_active").await == 0
    })
    .await;
    let mut cut = 0;
    for client in &mut held {
        if !echoes(client).await {
            cut += 1;
        }
    }
    assert_eq!(cut, on_pg_a, "maint closes exactly pg-a's clients");

    // up: back under health-check control, and up.
    let printed = session.run(block("up")).await;
    assert!(printed.contains("\"up\""), "{printed}");
    assert_eq!(state(admin_addr, "pg-a").await, "up");

    // failover: tier 0 in maint, the DR tier serves new clients.
    session.run(block("failover")).await;
    assert_eq!(active_tier(admin_addr).await, Some(1));
    let pg_dr_total = counter(admin_addr, "pg-dr", "connections_total").await;
    drop(connected_client(listener).await);
    assert_eq!(
        counter(admin_addr, "pg-dr", "connections_total").await,
        pg_dr_total + 1,
        "a new client did not go to pg-dr"
    );

    // restore: tier 0 usable again, but manual failback keeps tier 1 active.
    session.run(block("restore")).await;
    assert_eq!(state(admin_addr, "pg-a").await, "up");
    assert_eq!(state(admin_addr, "pg-b").await, "up");
    assert_eq!(active_tier(admin_addr).await, Some(1), "failback is manual");

    // failback: the operator moves the pool back to tier 0.
    let printed = session.run(block("failback")).await;
    assert!(printed.contains("\"active_tier\": 0"), "{printed}");
    assert_eq!(active_tier(admin_addr).await, Some(0));
    assert_eq!(pool(admin_addr).await["failbacks"], 1);

    // reload: validated, then applied.
    let printed = session.run(block("reload")).await;
    assert!(printed.contains("configuration is valid"), "{printed}");
    assert!(printed.contains("\"result\": \"ok\""), "{printed}");
    let scrape = metrics(admin_addr).await;
    let reloads = |result: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "switchyard_config_reloads_total"
                    && s.labels.get("result") == Some(result)
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => -1.0,
            })
    };
    assert_eq!(reloads("ok"), Some(1.0), "{}", proxy_log());
    assert_eq!(reloads("error"), Some(0.0));

    // The proxy served throughout.
    drop(connected_client(listener).await);
    drop(session.stdin);
    let _ = session.child.wait().await;
}

#[test]
fn runbook_blocks_are_found_with_their_text() {
    let readme = "intro\n<!-- runbook: one -->\n```sh\necho a\necho b\n```\n\n```sh\nnot marked\n```\n<!-- runbook: two -->\n```sh\nx=1\n```\n";
    let blocks = runbook_blocks(readme);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].step, "one");
    assert_eq!(blocks[0].script, "echo a\necho b\n");
    assert_eq!(blocks[1].step, "two");
    assert_eq!(blocks[1].script, "x=1\n");
}
