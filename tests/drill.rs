//! `switchyard drill` against a live instance (SPEC §9): the real binary, as a child
//! process, drilling another child process through its admin API and its listener.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;

use common::*;

/// A running instance with `primary` (tier 0) and `backup` (tier 1) behind listener
/// `front`, an admin API that needs a token, and that token's file.
struct Live {
    _primary: Backend,
    _backup: Backend,
    proxy: ChildProxy,
    token_file: std::path::PathBuf,
    /// Holds the token file; goes after the proxy that reads it.
    _dir: TestDir,
}

impl Live {
    async fn start(pool_extra: &str, with_backup: bool) -> Self {
        let primary = Backend::start("primary").await;
        let backup = Backend::start("backup").await;
        let dir = TestDir::new();
        let token_file = dir.join("admin-token");
        std::fs::write(&token_file, "drill-secret\n").expect("token file");
        let admin = closed_port();
        let upstreams: &[(&str, SocketAddr, u32)] = if with_backup {
            &[("primary", primary.addr, 0), ("backup", backup.addr, 1)]
        } else {
            &[("primary", primary.addr, 0)]
        };
        let toml = format!(
            "[admin]\nlisten = \"{admin}\"\ntoken_file = \"{}\"\n\n{}",
            token_file.display(),
            pool_config(upstreams, pool_extra, FAST_HEALTH)
                .replace("127.0.0.1:0", &closed_port().to_string())
        );
        let proxy = ChildProxy::start(&toml, admin).await;
        let live = Self {
            _primary: primary,
            _backup: backup,
            proxy,
            token_file,
            _dir: dir,
        };
        live.wait_all_up().await;
        live
    }

    async fn status(&self) -> serde_json::Value {
        get_json(self.proxy.admin, "/status").await
    }

    /// Every upstream `up` and tier 0 active: the state a drill must leave behind.
    async fn wait_all_up(&self) {
        let deadline = Instant::now() + SOON;
        loop {
            let status = self.status().await;
            let pool = &status["pools"][0];
            let all_up = pool["upstreams"]
                .as_array()
                .is_some_and(|u| u.iter().all(|u| u["state"] == "up"));
            if all_up && pool["active_tier"] == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "not all up: {status:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn drill(&self, args: &[&str], with_token: bool) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command
            .args([
                "drill",
                "--admin",
                &self.proxy.admin.to_string(),
                "--pool",
                "p",
            ])
            .args(args)
            .kill_on_drop(true);
        if with_token {
            command.arg("--token-file").arg(&self.token_file);
        }
        command
    }
}

async fn finish(mut command: Command) -> Output {
    tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("the drill ends by itself")
        .expect("run switchyard drill")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_fails_over_and_back_and_reports_every_phase_as_json() {
    let live = Live::start("", true).await;
    let json_dir = TestDir::new();
    let json = json_dir.join("drill.json");
    let out = finish(live.drill(
        &[
            "--hold",
            "1s",
            "--rate",
            "100/s",
            "--max-failed",
            "0",
            "--max-switch",
            "2s",
            "--max-failback",
            "5s",
            "--json",
            json.to_str().expect("utf-8 path"),
        ],
        true,
    ))
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("objective max-failed: met"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("json report");
    assert_eq!(report["original_tier"], 0);
    assert_eq!(report["failover_tier"], 1);
    assert_eq!(report["restored"], true);
    for key in ["detection_ms", "switch_ms", "failback_ms"] {
        assert!(report[key].is_u64(), "{key} measured: {report:#}");
    }
    let phases = report["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["before", "during", "after"]);
    for phase in phases {
        assert!(phase["probes"].as_u64() > Some(10), "{phase}");
        assert_eq!(phase["failed"], 0, "{phase}");
    }
    // The backup carried the connections while the primary was out.
    assert!(phases[1]["connections_by_tier"]["1"].as_u64() > Some(0));
    live.wait_all_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_objective_exits_1_naming_it_and_everything_is_put_back() {
    // A hold-down of 2 s after the restore cannot meet a 300 ms failback objective.
    let live = Live::start("failback = \"2s\"\n", true).await;
    let out = finish(live.drill(
        &[
            "--hold",
            "500ms",
            "--rate",
            "50/s",
            "--max-failback",
            "300ms",
        ],
        true,
    ))
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("objective max-failback missed"), "{stderr}");
    live.wait_all_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_drill_puts_the_upstreams_back() {
    let live = Live::start("", true).await;
    let mut drill = live
        .drill(&["--hold", "60s", "--rate", "20/s"], true)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the drill");
    let deadline = Instant::now() + SOON;
    loop {
        let status = live.status().await;
        if status["pools"][0]["upstreams"][0]["state"] == "maint" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fault never came: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = drill.id().expect("running") as libc::pid_t;
    // SAFETY: kill(2) on our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let exit = tokio::time::timeout(SOON, drill.wait())
        .await
        .expect("the drill stops soon after SIGINT")
        .expect("wait");
    assert_eq!(exit.code(), Some(1));
    live.wait_all_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_refuses_a_pool_without_another_usable_tier_or_without_the_token() {
    let alone = Live::start("", false).await;
    let out = finish(alone.drill(&["--hold", "1s"], true)).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no usable upstream outside its active tier 0"),
        "{stderr}"
    );
    assert_eq!(
        alone.status().await["pools"][0]["upstreams"][0]["state"],
        "up"
    );

    let live = Live::start("", true).await;
    let out = finish(live.drill(&["--hold", "1s"], false)).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--token-file"), "{stderr}");
    live.wait_all_up().await;

    let out = finish(live.drill(&["--fault", "command", "--hold", "1s"], true)).await;
    assert_eq!(out.status.code(), Some(2), "usage: {}", text(&out.stderr));
}
