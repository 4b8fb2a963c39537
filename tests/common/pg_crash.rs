//! A PostgreSQL server that dies the hard way and comes back: every one of its
//! processes SIGKILLed (as when its machine, container or cgroup is killed), then the
//! same postmaster command started again on the same data and port, which goes through
//! crash recovery first and answers "the database system is starting up" meanwhile.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{PgServer, PgTools};

/// Writes a table without a checkpoint after it: WAL that a crash recovery replays
/// (about a second on a small machine) while the server refuses logins with 57P03.
pub const WAL_FILLER: &str =
    "CREATE TABLE filler AS SELECT g, md5(g::text) FROM generate_series(1, 1000000) g";

/// SIGKILLs the postmaster of `server` and every process it started; returns the
/// postmaster's command line, for [`restart_after_crash`].
pub fn crash(server: &mut PgServer) -> Vec<OsString> {
    let pid = server.child().id();
    let command_line =
        std::fs::read(format!("/proc/{pid}/cmdline")).expect("read the postmaster's command line");
    let command_line: Vec<OsString> = command_line
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| OsString::from_vec(arg.to_vec()))
        .collect();
    // Stopped, the postmaster neither starts nor reaps children: the pids read below
    // stay theirs (a dead child stays a zombie) until the kills are sent.
    super::signal(server.child(), libc::SIGSTOP);
    let children = children_of(pid);
    for &child in &children {
        // SAFETY: kill(2) takes plain integers; `child` is a child of our stopped
        // postmaster, which has not reaped it, so the pid cannot have been reused.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
    let _ = server.child_mut().kill();
    let _ = server.child_mut().wait();
    // Orphaned, they are reaped by init; until they are gone, one of them could still
    // hold the shared memory the new postmaster refuses to share.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while children.iter().any(|&child| alive(child)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed postmaster's children did not go away"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    command_line
}

/// Starts `command_line` (from [`crash`]) again as `server`'s process, its output
/// added to the server's log. Returns at once: the server recovers on its own time.
pub fn restart_after_crash(server: &mut PgServer, tools: &PgTools, command_line: &[OsString]) {
    let (program, args) = command_line
        .split_first()
        .expect("the postmaster had a command line");
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&server.log)
        .expect("open the server log");
    let log_copy = log.try_clone().expect("clone the log file");
    let dir = server.data.parent().unwrap_or(Path::new("/"));
    let mut command: Command = tools.command(Path::new(program), dir);
    let child = command
        .args(args)
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_copy))
        .spawn()
        .expect("restart postgres");
    server.replace_child(child);
}

/// The pids whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: libc::pid_t = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let ppid: u32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// Whether `pid` is still a process that is not a zombie.
fn alive(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}
