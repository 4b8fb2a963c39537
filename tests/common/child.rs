//! `switchyard run` as a real child process.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{SOON, TestDir, metrics};

/// `switchyard run` as a child process, killed on drop; its folder (config, stderr) goes
/// after it.
pub struct ChildProxy {
    pub child: std::process::Child,
    pub admin: SocketAddr,
    pub config_path: std::path::PathBuf,
    pub stderr_path: std::path::PathBuf,
    _dir: TestDir,
}

impl ChildProxy {
    /// Starts the binary on `toml` (which must have an `[admin]` table on `admin`) and
    /// waits until the admin API answers.
    pub async fn start(toml: &str, admin: SocketAddr) -> Self {
        Self::launch(toml, admin, &[], None).await
    }

    /// Like [`start`](Self::start), with `args` before `run` and, with `nofile`, under
    /// that RLIMIT_NOFILE (descriptors scarce on purpose).
    pub async fn start_limited(
        toml: &str,
        admin: SocketAddr,
        args: &[&str],
        nofile: Option<u64>,
    ) -> Self {
        Self::launch(toml, admin, args, nofile).await
    }

    async fn launch(toml: &str, admin: SocketAddr, args: &[&str], nofile: Option<u64>) -> Self {
        let dir = TestDir::new();
        let config_path = dir.join("switchyard.toml");
        let stderr_path = dir.join("stderr.log");
        std::fs::write(&config_path, toml).expect("write config");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command
            .args(args)
            .args(["run", "-c"])
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
        if let Some(nofile) = nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            // SAFETY: the closure runs in the forked child before exec; it only calls
            // setrlimit(2), which is async-signal-safe, on a struct it owns, and builds
            // its error from errno without allocating.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("start switchyard");
        let proxy = Self {
            child,
            admin,
            config_path,
            stderr_path,
            _dir: dir,
        };
        let deadline = Instant::now() + SOON;
        while TcpStream::connect(admin).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "admin API never came up: {}",
                proxy.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) takes plain integers; `pid` is our own child, not yet reaped
        // (only `drop` reaps it), so it cannot name another process.
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            result,
            0,
            "kill failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Rewrites the config file and sends SIGHUP; returns once the reload counter moved.
    pub async fn reload_with(&self, toml: &str) -> &'static str {
        std::fs::write(&self.config_path, toml).expect("rewrite config");
        let before = self.reloads().await;
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + SOON;
        loop {
            let now = self.reloads().await;
            if now.0 > before.0 {
                return "ok";
            }
            if now.1 > before.1 {
                return "error";
            }
            assert!(
                Instant::now() < deadline,
                "SIGHUP did not reload: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// (ok, error) from `switchyard_config_reloads_total`.
    pub async fn reloads(&self) -> (u64, u64) {
        let metrics = metrics(self.admin).await;
        let value = |result: &str| {
            metrics
                .samples
                .iter()
                .find(|s| {
                    s.metric == "switchyard_config_reloads_total"
                        && s.labels.get("result") == Some(result)
                })
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => {
                        v as u64
                    }
                    _ => 0,
                })
                .unwrap_or(0)
        };
        (value("ok"), value("error"))
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The PID a pid file holds, once it holds a whole one.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Waits for `child` to exit, at most `limit`.
pub async fn wait_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The PID of the process that takes the pid file at `path` over from `old_pid` (an
/// upgrade's new process), waited for within [`SOON`]; `why_not` explains a timeout.
pub async fn successor_pid(path: &Path, old_pid: u32, why_not: impl Fn() -> String) -> u32 {
    let deadline = Instant::now() + SOON;
    loop {
        match read_pid(path) {
            Some(pid) if pid != old_pid => return pid,
            _ => {}
        }
        assert!(Instant::now() < deadline, "{}", why_not());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The process a test's child started on its own (the new process of an upgrade):
/// killed by its PID when the test ends, however it ends.
pub struct Successor(pub Option<u32>);

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|pid| libc::pid_t::try_from(pid).ok()) {
            // SAFETY: kill(2) takes plain integers; `pid` is the process this test's
            // upgrade started, read from the pid file it wrote (or from its systemd
            // notification).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}
