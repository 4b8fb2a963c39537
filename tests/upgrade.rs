//! Binary upgrade without downtime (SIGUSR2) and the pid file, on real child processes.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use tokio::time::Instant;

/// A config for a child proxy: listener `front` on `front`, the admin API on `admin`,
/// pool `p` over `upstreams` with quick health checks, and `runtime` lines.
fn child_config(
    front: SocketAddr,
    admin: SocketAddr,
    upstreams: &[(&str, SocketAddr, u32)],
    runtime: &str,
) -> String {
    format!(
        "[runtime]\nshutdown_grace = \"5s\"\n{runtime}\n[admin]\nlisten = \"{admin}\"\n\n{}",
        pool_config(upstreams, "", FAST_HEALTH)
    )
    .replace("bind = \"127.0.0.1:0\"", &format!("bind = \"{front}\""))
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

async fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pid_file_holds_the_serving_pid_and_goes_at_exit() {
    let backend = Backend::start("a").await;
    let (front, admin) = (closed_port(), closed_port());
    let dir = test_dir();
    let pid_path = dir.join("run/switchyard.pid");
    std::fs::create_dir_all(pid_path.parent().unwrap()).unwrap();
    let runtime = format!("pid_file = \"{}\"\n", pid_path.display());
    let mut proxy = ChildProxy::start(
        &child_config(front, admin, &[("a", backend.addr, 0)], &runtime),
        admin,
    )
    .await;
    assert_eq!(read_pid(&pid_path), Some(proxy.child.id()));
    proxy.signal(libc::SIGTERM);
    let status = wait_exit(&mut proxy.child, SOON).await;
    assert!(status.success(), "{status}: {}", proxy.stderr());
    assert!(!pid_path.exists(), "the pid file is removed at exit");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_file_that_cannot_be_written_fails_the_start() {
    let backend = Backend::start("a").await;
    let (front, admin) = (closed_port(), closed_port());
    let dir = test_dir();
    let config = dir.join("switchyard.toml");
    let runtime = "pid_file = \"no-such-folder/switchyard.pid\"\n";
    std::fs::write(
        &config,
        child_config(front, admin, &[("a", backend.addr, 0)], runtime),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot write the pid file"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}
