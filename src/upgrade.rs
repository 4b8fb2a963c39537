//! Binary upgrade without downtime (SIGUSR2), the pid file that names the serving
//! process, and the systemd notifications that go with both.
//!
//! The running process starts the binary its executable path names now (the new one
//! after a package upgrade) with its own arguments, and hands it over a Unix socket:
//! every listening socket (as SCM_RIGHTS, the same open sockets, so their accept queues
//! and the clients waiting in them carry over) and every upstream's health state, so
//! the new process neither binds again nor decides afresh. The new process serves, then
//! says so; only then does the old one stop accepting and drain. A new process that
//! exits, or is not serving within [`READY_LIMIT`], is stopped and the old one goes on.
//!
//! The pid file always names the process that serves: it is replaced whole (written
//! beside it, then renamed over it) so a reader never sees half a number, and a process
//! removes it at exit only while it still holds its own PID, since after an upgrade it
//! belongs to the new process.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::controller::CarriedPool;
use crate::sockets::{Kind, SocketTable};

/// The environment variable that tells a new process where its predecessor waits: the
/// abstract Unix socket name to connect to.
pub const HANDOVER_VAR: &str = "SWITCHYARD_UPGRADE_FROM";

/// How long the new process may take from its start to serving before the upgrade is
/// given up (and the new process stopped).
pub const READY_LIMIT: Duration = Duration::from_secs(30);

/// Descriptors per message: well below the kernel's SCM_MAX_FD (253).
const FDS_PER_MESSAGE: usize = 64;

/// A handover header beyond this is not one (a few hundred bytes per socket and upstream).
const MAX_HEADER: usize = 16 << 20;

/// What the new process says once it serves.
const READY: u8 = b'R';

/// Why an upgrade did not happen; the old process keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot find this process's executable: {0}")]
    Executable(io::Error),
    #[error("cannot open the handover socket: {0}")]
    Socket(io::Error),
    #[error("cannot start {path}: {source}")]
    Spawn { path: String, source: io::Error },
    #[error("the new process (pid {pid}) exited before serving ({status})")]
    Exited {
        pid: u32,
        status: std::process::ExitStatus,
    },
    #[error("the new process (pid {pid}) was not serving within {limit:?}; stopped it")]
    NotReady { pid: u32, limit: Duration },
    #[error("the handover to the new process (pid {pid}) failed: {source}")]
    Handover { pid: u32, source: io::Error },
}

/// What goes over the handover socket before the descriptors, which follow in its
/// `sockets` order.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    sockets: Vec<(Kind, SocketAddr)>,
    health: Vec<CarriedPool>,
}

/// What a new process received from its predecessor.
#[derive(Debug)]
pub struct Inherited {
    sockets: Vec<(Kind, SocketAddr, std::net::TcpListener)>,
    pub health: Vec<CarriedPool>,
    predecessor: UnixStream,
}

// === old side ===

/// Starts the new binary, hands it `sockets` and `health`, and returns its PID once it
/// serves. On an error the new process is stopped (if it started) and nothing here
/// changed. Needs a running tokio runtime.
pub async fn hand_over(
    sockets: SocketTable,
    health: Vec<CarriedPool>,
) -> Result<u32, UpgradeError> {
    let exe = executable().map_err(UpgradeError::Executable)?;
    let name = format!(
        "switchyard-upgrade-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    );
    let listener = handover_listener(&name).map_err(UpgradeError::Socket)?;
    let mut child = tokio::process::Command::new(&exe)
        .args(std::env::args_os().skip(1).collect::<Vec<OsString>>())
        .env(HANDOVER_VAR, &name)
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            path: exe.display().to_string(),
            source,
        })?;
    let pid = child.id().unwrap_or(0);
    let handover = async {
        let (stream, _) = listener.accept().await?;
        // Anyone on the host can connect to an abstract socket: only our child gets
        // the sockets.
        let peer = stream.peer_cred()?.pid();
        if peer != i32::try_from(pid).ok() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("a process other than the new one connected (pid {peer:?})"),
            ));
        }
        let stream = stream.into_std()?;
        tokio::task::spawn_blocking(move || send_and_wait(stream, &sockets, health))
            .await
            .map_err(io::Error::other)?
    };
    let outcome = tokio::select! {
        sent = handover => sent.map_err(|source| UpgradeError::Handover { pid, source }),
        status = child.wait() => match status {
            Ok(status) => return Err(UpgradeError::Exited { pid, status }),
            Err(source) => Err(UpgradeError::Handover { pid, source }),
        },
        () = tokio::time::sleep(READY_LIMIT) => Err(UpgradeError::NotReady { pid, limit: READY_LIMIT }),
    };
    if outcome.is_err() {
        let _ = child.start_kill();
        // Reaped here so that no zombie stays behind the process that keeps serving.
        let _ = child.wait().await;
    }
    outcome.map(|()| pid)
}

/// The binary at the path this process was started from, also when a package upgrade
/// replaced the file (the kernel then calls the old one "PATH (deleted)").
fn executable() -> io::Result<PathBuf> {
    let link = std::fs::read_link("/proc/self/exe")?;
    let text = link.as_os_str().as_encoded_bytes();
    match text.strip_suffix(b" (deleted)") {
        Some(path) => Ok(PathBuf::from(String::from_utf8_lossy(path).into_owned())),
        None => Ok(link),
    }
}

fn handover_listener(name: &str) -> io::Result<tokio::net::UnixListener> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// Sends the header and the descriptors, then waits for the new process to serve.
fn send_and_wait(
    mut stream: UnixStream,
    sockets: &SocketTable,
    health: Vec<CarriedPool>,
) -> io::Result<()> {
    // Tokio hands its sockets over non-blocking; this side runs on a blocking thread.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READY_LIMIT))?;
    let header = Header {
        sockets: sockets.iter().map(|(kind, addr, _)| (kind, addr)).collect(),
        health,
    };
    let header = serde_json::to_vec(&header).map_err(io::Error::other)?;
    let length = u32::try_from(header.len()).map_err(io::Error::other)?;
    stream.write_all(&length.to_be_bytes())?;
    stream.write_all(&header)?;
    // The table (and with it every socket) outlives the sends.
    let fds: Vec<RawFd> = sockets.iter().map(|(_, _, s)| s.as_raw_fd()).collect();
    for batch in fds.chunks(FDS_PER_MESSAGE) {
        send_fds(&stream, batch)?;
    }
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer)?;
    if answer[0] != READY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the new process answered something else than ready",
        ));
    }
    Ok(())
}

/// One message: a byte (SCM_RIGHTS needs one to ride on) carrying `fds`.
fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let payload = [u8::try_from(fds.len()).map_err(io::Error::other)?];
    let iov = [io::IoSlice::new(&payload)];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::empty(),
        None,
    )?;
    if sent != 1 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

// === new side ===

/// What the predecessor hands over when this process was started by an upgrade (the
/// environment says so), else `None`. Blocks (for at most [`READY_LIMIT`]): call it
/// before the runtime starts.
pub fn inherit() -> Result<Option<Inherited>, String> {
    let Some(name) = std::env::var_os(HANDOVER_VAR) else {
        return Ok(None);
    };
    receive(name.as_encoded_bytes())
        .map(Some)
        .map_err(|e| format!("cannot take over from the previous process: {e}"))
}

fn receive(name: &[u8]) -> io::Result<Inherited> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    let stream = UnixStream::connect_addr(&addr)?;
    stream.set_read_timeout(Some(READY_LIMIT))?;
    receive_from(stream)
}

fn receive_from(mut stream: UnixStream) -> io::Result<Inherited> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_HEADER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a handover header of {length} bytes (at most {MAX_HEADER})"),
        ));
    }
    // Exactly the header: a read past it would take the first descriptors' byte and
    // drop the descriptors with it.
    let mut header = vec![0u8; length];
    stream.read_exact(&mut header)?;
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut fds = Vec::with_capacity(header.sockets.len());
    // Each message carries at least one descriptor: as many messages as sockets at most.
    for _ in 0..header.sockets.len() {
        if fds.len() >= header.sockets.len() {
            break;
        }
        receive_fds(&stream, &mut fds)?;
    }
    if fds.len() != header.sockets.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} sockets announced, {} received",
                header.sockets.len(),
                fds.len()
            ),
        ));
    }
    let sockets = header
        .sockets
        .into_iter()
        .zip(fds)
        .map(|((kind, addr), fd)| (kind, addr, std::net::TcpListener::from(fd)))
        .collect();
    Ok(Inherited {
        sockets,
        health: header.health,
        predecessor: stream,
    })
}

/// One message of descriptors, appended to `fds`.
#[allow(unsafe_code)]
fn receive_fds(stream: &UnixStream, fds: &mut Vec<OwnedFd>) -> io::Result<()> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut payload = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut payload)];
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let message = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    if message.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            for fd in received {
                // SAFETY: the kernel just installed `fd` in this process for this
                // message (SCM_RIGHTS); nothing else knows of it, so it is ours to own
                // and close.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(())
}

// === impl Inherited ===

impl Inherited {
    /// The inherited sockets as a table for [`Listening::bind`](crate::Listening::bind),
    /// each checked to be what the header says. Needs a running tokio runtime.
    pub fn take_sockets(&mut self) -> io::Result<SocketTable> {
        let mut table = SocketTable::default();
        for (kind, addr, socket) in self.sockets.drain(..) {
            table.adopt(kind, addr, socket)?;
        }
        Ok(table)
    }

    /// Tells the predecessor that this process serves: it stops accepting and drains.
    pub fn serving(mut self) -> io::Result<()> {
        self.predecessor.write_all(&[READY])
    }
}

/// Sends `state` (e.g. `READY=1`, `MAINPID=1234`) to systemd when it started this
/// process with `Type=notify`; does nothing otherwise. A failure is only logged: the
/// proxy serves either way.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            Some(abstract_name) => {
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
                socket.send_to_addr(state.as_bytes(), &addr)?;
            }
            None => {
                socket.send_to(state.as_bytes(), &path)?;
            }
        }
        io::Result::Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// Ignores SIGUSR2 until the upgrade handler replaces this disposition: its default
/// action ends the process, and an upgrade asked for during start-up must not.
#[allow(unsafe_code)]
pub fn ignore_upgrade_until_handled() {
    // SAFETY: signal(2) with SIG_IGN installs no handler code, only a disposition; it
    // is called before any other thread exists, so nothing races it.
    unsafe {
        libc::signal(libc::SIGUSR2, libc::SIG_IGN);
    }
}

/// The pid file of this process, while it holds it.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

// === impl PidFile ===

impl PidFile {
    /// Writes this process's PID to `path`, replacing what it held (the previous
    /// process's PID on an upgrade, or a stale one after a crash).
    pub fn write(path: &Path) -> io::Result<Self> {
        let pid = std::process::id();
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!(".{pid}.tmp"));
        let staging = PathBuf::from(staging);
        std::fs::write(&staging, format!("{pid}\n"))?;
        if let Err(e) = std::fs::rename(&staging, path) {
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file still names this process.
    pub fn is_ours(&self) -> bool {
        std::fs::read_to_string(&self.path)
            .is_ok_and(|text| text.trim() == std::process::id().to_string())
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(header: &Header) -> Vec<u8> {
        let json = serde_json::to_vec(header).unwrap();
        let mut bytes = (json.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&json);
        bytes
    }

    #[tokio::test]
    async fn sockets_and_health_cross_the_handover_socket_and_ready_comes_back() {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let second = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, b) = (first.local_addr().unwrap(), second.local_addr().unwrap());
        let mut table = SocketTable::default();
        table.adopt(Kind::Traffic, a, first).unwrap();
        table.adopt(Kind::Admin, b, second).unwrap();
        let health = vec![CarriedPool {
            pool: "p".to_string(),
            active_tier: Some(1),
            upstreams: vec![crate::controller::CarriedUpstream {
                address: a,
                state: crate::health::state::CarriedState {
                    checked_up: Some(false),
                    passes_in_a_row: 1,
                    failures_in_a_row: 0,
                    admin: None,
                },
                reason: "connect refused".to_string(),
            }],
        }];
        let (old, new) = UnixStream::pair().unwrap();
        let sent = health.clone();
        let sender = std::thread::spawn(move || send_and_wait(old, &table, sent));
        let mut inherited = receive_from(new).unwrap();
        assert_eq!(inherited.health, health);
        let table = inherited.take_sockets().unwrap();
        let keys: Vec<_> = table.iter().map(|(kind, addr, _)| (kind, addr)).collect();
        assert_eq!(keys, vec![(Kind::Traffic, a), (Kind::Admin, b)]);
        // The same socket, not a copy: a client of `a` reaches the inherited listener.
        let socket = table.iter().next().unwrap().2.try_clone().unwrap();
        let socket = tokio::net::TcpListener::from_std(socket).unwrap();
        let _client = tokio::net::TcpStream::connect(a).await.unwrap();
        socket.accept().await.unwrap();
        inherited.serving().unwrap();
        sender.join().unwrap().unwrap();
    }

    #[test]
    fn a_truncated_huge_or_garbled_handover_is_an_error() {
        let header = Header {
            sockets: vec![(Kind::Traffic, "127.0.0.1:1".parse().unwrap())],
            health: Vec::new(),
        };
        let complete = header_bytes(&header);
        let mut huge = ((MAX_HEADER + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let mut garbled = 5u32.to_be_bytes().to_vec();
        garbled.extend_from_slice(b"{\"so");
        let cases: [(&str, Vec<u8>); 5] = [
            ("nothing", Vec::new()),
            ("half a length", vec![0, 0]),
            ("half a header", complete[..complete.len() - 3].to_vec()),
            ("a header and no descriptors", complete),
            ("a huge length", huge),
        ];
        for (what, bytes) in cases.into_iter().chain([("garbled JSON", garbled)]) {
            let (mut old, new) = UnixStream::pair().unwrap();
            old.write_all(&bytes).unwrap();
            drop(old);
            assert!(receive_from(new).is_err(), "{what} was taken as a handover");
        }
    }

    #[test]
    fn a_predecessor_that_goes_quiet_does_not_hold_the_start_for_ever() {
        let (_old, new) = UnixStream::pair().unwrap();
        new.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let started = std::time::Instant::now();
        assert!(receive_from(new).is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_pid_file_names_this_process_and_is_removed_only_while_ours() {
        let dir = std::env::temp_dir().join(format!("switchyard-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("switchyard.pid");
        std::fs::write(&path, "999999999\n").unwrap();

        let pid_file = PidFile::write(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(pid_file);
        assert!(!path.exists(), "removed at exit");

        // A new process took the file over: leaving must not remove its PID.
        let pid_file = PidFile::write(&path).unwrap();
        std::fs::write(&path, "1\n").unwrap();
        assert!(!pid_file.is_ours());
        drop(pid_file);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pid_file_in_a_missing_folder_is_an_error_and_leaves_nothing() {
        let path = std::env::temp_dir().join("switchyard-no-such-folder/x/switchyard.pid");
        assert!(PidFile::write(&path).is_err());
        assert!(!path.exists());
    }
}
