//! The command line as an operator uses it: real child processes, exit codes, signals.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use common::*;

fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("run switchyard")
}

/// A child process, killed and reaped on drop, and the folder it reads from, removed
/// after it.
struct ChildGuard {
    process: Child,
    _dir: TestDir,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn send_signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers; `pid` is our own child, still unreaped
    // (the guard reaps it only on drop), so the pid cannot have been reused.
    let result = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        result,
        0,
        "kill failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Polls the child until it exits, within `limit`.
async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "switchyard did not exit within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `switchyard run` on a config whose listener binds a free port.
async fn run_child(
    upstream: std::net::SocketAddr,
    extra: &str,
) -> (ChildGuard, std::net::SocketAddr) {
    let port = closed_port().port();
    let dir = TestDir::new();
    let path = dir.join("run.toml");
    let config = format!("{extra}\n{}", one_pool_config(&[(upstream, 0)], ""))
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&path, config).unwrap();
    let child = ChildGuard {
        process: Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "-c"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start switchyard"),
        _dir: dir,
    };
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + SOON;
    while echo_round_trip(addr, b"ready?").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "switchyard did not start serving"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, addr)
}

/// Every shipped config, as a file `check` can load. No private keys ship with the
/// examples, so one that names TLS certificate files which are absent is replaced by an
/// unchanged copy of its text beside certificates generated for the names it lists (the
/// operator brings their own; its comments say where). The copies go when this drops.
struct ShippedConfigs {
    files: Vec<PathBuf>,
    copies: Vec<TestDir>,
}

impl ShippedConfigs {
    fn new() -> Self {
        let mut shipped = Self {
            files: vec![PathBuf::from("config/switchyard.toml")],
            copies: Vec::new(),
        };
        let mut examples: Vec<PathBuf> = std::fs::read_dir("config/examples")
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        examples.sort();
        for example in examples {
            let file = shipped.with_certificates(&example);
            shipped.files.push(file);
        }
        shipped
    }

    fn with_certificates(&mut self, file: &Path) -> PathBuf {
        let text = std::fs::read_to_string(file).unwrap();
        let table: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let string = |v: &toml::Value, key: &str| v.get(key)?.as_str().map(str::to_string);
        // (cert, key, names) for every certificate a listener names.
        let mut pairs = Vec::new();
        let listeners = table.get("listeners").and_then(toml::Value::as_table);
        for tls in listeners
            .into_iter()
            .flat_map(|l| l.values())
            .filter_map(|l| l.get("tls"))
        {
            if let (Some(cert), Some(key)) = (string(tls, "cert"), string(tls, "key")) {
                pairs.push((cert, key, vec!["localhost".to_string()]));
            }
            let entries = tls.get("certs").and_then(toml::Value::as_array);
            for entry in entries.into_iter().flatten() {
                let names: Vec<String> = entry
                    .get("names")
                    .and_then(toml::Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect();
                let (Some(cert), Some(key)) = (string(entry, "cert"), string(entry, "key")) else {
                    continue;
                };
                pairs.push((cert, key, names));
            }
        }
        // The admin token is created by the operator first (the README says how).
        let token = table
            .get("admin")
            .and_then(|admin| string(admin, "token_file"));
        let folder = file.parent().unwrap();
        if pairs
            .iter()
            .all(|(cert, key, _)| folder.join(cert).exists() && folder.join(key).exists())
            && token.iter().all(|t| folder.join(t).exists())
        {
            return file.to_path_buf();
        }
        let dir = TestDir::new();
        let copy = dir.join(file.file_name().unwrap());
        std::fs::write(&copy, text).unwrap();
        if let Some(token) = token {
            let path = dir.join(token);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "test-token\n").unwrap();
        }
        for (cert, key, mut names) in pairs {
            if names.is_empty() {
                names.push("localhost".to_string());
            }
            let key_pair = rcgen::KeyPair::generate().unwrap();
            let certificate = rcgen::CertificateParams::new(names)
                .unwrap()
                .self_signed(&key_pair)
                .unwrap();
            for (path, pem) in [
                (dir.join(cert), certificate.pem()),
                (dir.join(key), key_pair.serialize_pem()),
            ] {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, pem).unwrap();
            }
        }
        self.copies.push(dir);
        copy
    }
}

#[test]
fn check_accepts_every_shipped_config_and_prints_the_summary() {
    let shipped = ShippedConfigs::new();
    assert!(shipped.files.len() >= 3);
    for file in &shipped.files {
        let out = switchyard(&["check", "-c", file.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("configuration is valid"), "{stdout}");
        assert!(stdout.contains("tier 0 (primary)"), "{stdout}");
        assert!(
            stdout.contains("health:") && stdout.contains("outlier:"),
            "{stdout}"
        );
    }
    let out = switchyard(&["check", "--config", "config/switchyard.toml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("listener db: bind 127.0.0.1:15432 -> pool postgres"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tier 1 (backup 1): standby (127.0.0.1:5433)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("connect_attempts 3, hedge_after off, idle_timeout 1h"),
        "{stdout}"
    );
}

#[test]
fn check_rejects_each_bad_file_naming_file_line_column_and_what_is_wrong() {
    let mut checked = 0;
    for entry in std::fs::read_dir("tests/bad-configs").unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an `# expect:` line", path.display()));
        let (position, message) = expect.split_once(' ').unwrap();
        let out = switchyard(&["check", "-c", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", path.display());
        let located = format!("{}:{position}: ", path.display());
        assert!(
            stderr.contains(&located),
            "{}: expected {located:?} in {stderr:?}",
            path.display()
        );
        assert!(
            stderr.contains(message),
            "{}: expected {message:?} in {stderr:?}",
            path.display()
        );
        assert!(
            stderr.starts_with("error: "),
            "one clear sentence first: {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn check_on_a_missing_file_exits_1_and_bad_usage_exits_2() {
    let out = switchyard(&["check", "-c", "/nonexistent/switchyard.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot read config file /nonexistent/switchyard.toml")
    );
    assert_eq!(switchyard(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        switchyard(&["check", "--no-such-flag"]).status.code(),
        Some(2)
    );
    assert_eq!(
        switchyard(&["run", "--log-format", "xml"]).status.code(),
        Some(2)
    );
}

#[test]
fn run_exits_1_with_one_sentence_when_the_port_is_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = TestDir::new();
    let path = dir.join("busy.toml");
    let config = one_pool_config(&[(closed_port(), 0)], "")
        .replace("127.0.0.1:0", &taken.local_addr().unwrap().to_string());
    std::fs::write(&path, config).unwrap();
    let out = switchyard(&["run", "-c", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("listener \"front\" cannot bind"),
        "{stderr}"
    );
    assert!(stderr.contains("Address already in use"), "{stderr}");
    assert!(Path::new(&path).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_lets_connections_finish_then_exits_0() {
    let upstream = Server::echo().await;
    let (mut child, addr) = run_child(upstream.addr, "[runtime]\nshutdown_grace = \"20s\"").await;

    let mut established = TcpStream::connect(addr).await.unwrap();
    established.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    established.read_exact(&mut buf).await.unwrap();

    send_signal(&child.process, libc::SIGTERM);
    let deadline = Instant::now() + SOON;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The established connection keeps flowing during the grace period.
    established.write_all(b"during").await.unwrap();
    established.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    assert!(
        child.process.try_wait().unwrap().is_none(),
        "exited while a connection was open"
    );

    // Once it ends, the process exits 0 well before the grace period is over.
    drop(established);
    let status = wait_exit(&mut child.process, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_grace_remaining_connections_are_closed_and_it_exits_0() {
    let upstream = Server::echo().await;
    let (mut child, addr) = run_child(upstream.addr, "[runtime]\nshutdown_grace = \"500ms\"").await;
    let mut established = TcpStream::connect(addr).await.unwrap();
    established.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    established.read_exact(&mut b).await.unwrap();

    let signalled = Instant::now();
    send_signal(&child.process, libc::SIGINT);
    assert!(
        is_closed(&mut established, SOON).await,
        "connection closed after the grace period"
    );
    assert!(
        signalled.elapsed() >= Duration::from_millis(450),
        "closed before the grace period ended"
    );
    let status = wait_exit(&mut child.process, SOON).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_does_not_kill_the_process() {
    let upstream = Server::echo().await;
    let (mut child, addr) = run_child(upstream.addr, "").await;
    send_signal(&child.process, libc::SIGHUP);
    // SIGHUP's default action would end the process before these round trips are done.
    for _ in 0..50 {
        echo_round_trip(addr, b"still here")
            .await
            .expect("still serving after SIGHUP");
    }
    assert!(child.process.try_wait().unwrap().is_none());
}

#[test]
fn an_unknown_log_level_is_a_usage_error() {
    let out = switchyard(&["--log-level", "verbose", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown log level \"verbose\""), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check")
        .env("RUST_LOG", "switchyard=loud")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Directives with valid levels still work.
    let out = switchyard(&["--log-level", "warn,switchyard::health=debug", "check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let out = switchyard(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("switchyard {} (", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|h| h.status.success());
    if let Some(head) = head {
        // The build script reruns whenever HEAD moves, so the binary names this commit.
        let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
        assert!(stdout.contains(&format!("({head})")), "{stdout} vs {head}");
    }
}

#[test]
fn every_flag_has_help_text() {
    for command in [
        &["--help"][..],
        &["run", "--help"],
        &["check", "--help"],
        &["status", "--help"],
    ] {
        let out = switchyard(command);
        assert_eq!(out.status.code(), Some(0));
        let help = String::from_utf8_lossy(&out.stdout);
        for line in help.lines().filter(|l| l.trim_start().starts_with('-')) {
            let described = line
                .trim_start()
                .split_once("  ")
                .is_some_and(|(_, text)| !text.trim().is_empty());
            assert!(described, "{command:?}: no help text on {line:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_written_to_a_file_have_no_colour_codes_and_plain_values() {
    let upstream = Server::echo().await;
    let port = closed_port().port();
    let dir = TestDir::new();
    let path = dir.join("run.toml");
    let log_path = dir.join("stderr.log");
    let config = one_pool_config(&[(upstream.addr, 0)], "")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&path, config).unwrap();
    let mut child = ChildGuard {
        process: Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["--log-level", "debug", "run", "-c"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
        _dir: dir,
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + SOON;
    while echo_round_trip(addr, b"logged").await.is_err() {
        assert!(Instant::now() < deadline, "switchyard did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_signal(&child.process, libc::SIGTERM);
    assert!(wait_exit(&mut child.process, SOON).await.success());
    let log = std::fs::read(&log_path).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("switchyard started"), "{text}");
    assert!(!log.contains(&0x1b), "escape bytes in a log file:\n{text}");
    assert!(text.contains("pool=p"), "{text}");
    assert!(!text.contains("Some("), "Debug-formatted values:\n{text}");
}

/// With one `SO_REUSEPORT` socket per worker, an address is still one address to an
/// operator: once in the start-up log, `/status` and `switchyard status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listener_address_is_shown_once() {
    let upstream = Server::echo().await;
    let (admin, front) = (closed_port(), closed_port());
    let toml = format!(
        "[runtime]\nworker_threads = 2\n[admin]\nlisten = \"{admin}\"\n{}",
        one_pool_config(&[(upstream.addr, 0)], "").replace("127.0.0.1:0", &front.to_string())
    );
    let proxy = ChildProxy::start(&toml, admin).await;
    let status = get_json(admin, "/status").await;
    let binds = &status["listeners"][0]["binds"];
    assert_eq!(binds, &serde_json::json!([front.to_string()]), "{status}");
    let table = switchyard(&["status", "--admin", &admin.to_string()]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.matches(&front.to_string()).count(), 1, "{table}");
    let deadline = Instant::now() + SOON;
    while !proxy.stderr().contains("listening") {
        assert!(Instant::now() < deadline, "no start-up log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = proxy.stderr();
    let listening = log
        .lines()
        .filter(|l| l.contains("listening") && l.contains(&front.to_string()))
        .count();
    assert_eq!(listening, 1, "{log}");
}

/// systemd kills a unit that outlives TimeoutStopSec: it must exceed every shipped
/// config's shutdown grace, or a drain ends in SIGKILL.
#[test]
fn the_systemd_unit_waits_longer_than_any_shipped_shutdown_grace() {
    let unit = std::fs::read_to_string("config/switchyard.service").unwrap();
    let stop_timeout = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec in the unit");
    let stop_timeout = humantime::parse_duration(stop_timeout.trim()).unwrap();
    let shipped = ShippedConfigs::new();
    for file in &shipped.files {
        let config = switchyard::config::Config::load(file).unwrap();
        assert!(
            config.runtime.shutdown_grace < stop_timeout,
            "{}: shutdown_grace {:?} is not below TimeoutStopSec {stop_timeout:?}",
            file.display(),
            config.runtime.shutdown_grace
        );
    }
}

/// `check` exit 0 means `run` starts: a token file `run` could not read fails `check`.
#[test]
fn check_fails_on_a_missing_token_file() {
    let dir = TestDir::new();
    let path = dir.join("admin.toml");
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:9900\"\ntoken_file = \"secrets/admin-token\"\n{}",
        one_pool_config(&[(closed_port(), 0)], "")
    );
    std::fs::write(&path, config).unwrap();
    let out = switchyard(&["check", "-c", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(":3:14: admin.token_file: cannot read"),
        "{stderr}"
    );
    assert!(stderr.contains("secrets/admin-token"), "{stderr}");
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    std::fs::write(dir.join("secrets/admin-token"), "t0ken\n").unwrap();
    let out = switchyard(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// JSON logs keep types: numbers as numbers, lists as JSON arrays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_typed_fields_and_lists_as_arrays() {
    let upstream = Server::echo().await;
    let (admin, front, extra) = (closed_port(), closed_port(), closed_port());
    let config = |listeners: &str| {
        format!(
            "[log]\nformat = \"json\"\n[admin]\nlisten = \"{admin}\"\n{listeners}\n[pools.p]\nupstreams = [{{ address = \"{}\" }}]\n",
            upstream.addr
        )
    };
    let one = format!("[listeners.front]\nbind = \"{front}\"\npool = \"p\"\n");
    let two = format!("{one}[listeners.extra]\nbind = \"{extra}\"\npool = \"p\"\n");
    let proxy = ChildProxy::start(&config(&one), admin).await;
    assert_eq!(proxy.reload_with(&config(&two)).await, "ok");
    let log = proxy.stderr();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let reloaded = lines
        .iter()
        .find(|l| l["fields"]["message"] == "configuration reloaded")
        .unwrap_or_else(|| panic!("no reload line: {log}"));
    assert_eq!(
        reloaded["fields"]["listeners_added"],
        serde_json::json!(["extra"])
    );
    assert_eq!(reloaded["fields"]["pools_removed"], serde_json::json!([]));
    let admin_line = lines
        .iter()
        .find(|l| l["fields"]["message"] == "admin API listening")
        .unwrap();
    assert!(
        admin_line["fields"]["max_connections"].is_u64(),
        "{admin_line}"
    );
    assert_eq!(admin_line["level"], "INFO");
}
