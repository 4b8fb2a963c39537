//! Two switchyard instances behind one floating address that keepalived (VRRP) moves,
//! run from the shipped `config/keepalived/` files: real keepalived and `switchyard run`
//! processes, a greeting upstream and a client, each in a network namespace of its own,
//! joined by veth pairs to a bridge in one more namespace. Only 10.250.0.0/24 inside
//! those namespaces is used; a guard removes them and stops every process, also when a
//! test fails. Needs root, `ip` (iproute2) and keepalived: without them the tests print
//! SKIPPED, unless `SWITCHYARD_EXAMPLE_SERVERS=required` (set by `.ci/run`) makes that a
//! failure.
//!
//! Each test stops or disturbs instance A, which holds the address, and measures the
//! switch time: from the cause to the first new client connection through the address
//! that instance B served (the upstream greets every connection with the address it
//! came from, so it names the instance). The configs keep preemption, so a recovered A
//! takes the address back; that return is measured too. A binary upgrade of A must not
//! move the address at all. The shipped readiness probe is also run on its own against
//! canned answers (no root needed).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{find_program, log_file, skip};

/// Namespaces and folders of this test carry `<PREFIX>-<pid>-<n>`: unique per run, and
/// the pid tells whether the run that made them is still alive.
const PREFIX: &str = "syvrrp";
/// The shipped configs' network; the test's own replaces it (the last octets stay).
const SHIPPED_NET: &str = "192.168.10.";
const LAB_NET: &str = "10.250.0.";
const FLOATING: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 10);
const HOST_A: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
const HOST_B: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 12);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 20);
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 30);
const SERVICE_PORT: u16 = 5432;
const UPSTREAM_PORT: u16 = 7000;
/// What the shipped probe asks (`switchyard-ready.sh 127.0.0.1 9900`), in each
/// instance's own namespace.
const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9900);

/// Bound on anything a process or keepalived should do: VRRP's own timers are seconds,
/// and the machine may be a loaded 2-core one.
const LIMIT: Duration = Duration::from_secs(30);
/// The client's pace: a new connection every 20 ms.
const PROBE_PAUSE: Duration = Duration::from_millis(20);
/// How often the test looks at a condition it waits for.
const POLL: Duration = Duration::from_millis(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const GREETING_TIMEOUT: Duration = Duration::from_secs(2);
/// After the first connection through the new holder, this many more must go there too.
const SETTLED_CONNECTIONS: usize = 5;

/// The switch times are measured, so two labs never run at once.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn sigterm_on_the_masters_switchyard_moves_the_address_and_a_recovered_master_takes_it_back() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(mut lab) = Lab::start() else { return };

    // A stopping switchyard stops accepting and its /readyz goes; with no connection
    // to drain it exits at once, and the process tracking gives the address up.
    let log_mark = lab.keepalived_log(Role::A).len();
    let stopped = Instant::now();
    lab.signal_switchyard(Role::A, libc::SIGTERM);
    let switch = lab.first_served_by(HOST_B, stopped, "B serving after SIGTERM on A");
    lab.assert_settled_on(Role::B);
    let status = lab.wait_switchyard_exit(Role::A);
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    lab.wait_keepalived_log(
        Role::A,
        log_mark,
        "Quorum lost for tracked process switchyard",
    );
    lab.wait_keepalived_log(Role::A, log_mark, "Entering FAULT STATE");
    println!("vrrp: SIGTERM on A's switchyard -> B serves after {switch}");

    // Recovery: the configs keep preemption, so A takes the address back once its
    // switchyard runs and /readyz has passed `rise` times.
    let restarted = Instant::now();
    lab.start_switchyard(Role::A);
    let back = lab.first_served_by(HOST_A, restarted, "A serving again after its restart");
    lab.assert_settled_on(Role::A);
    println!("vrrp: A's switchyard restarted -> A serves again after {back}");
}

#[test]
fn sigkill_on_the_masters_switchyard_moves_the_address() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(mut lab) = Lab::start() else { return };

    let log_mark = lab.keepalived_log(Role::A).len();
    let killed = Instant::now();
    lab.signal_switchyard(Role::A, libc::SIGKILL);
    let switch = lab.first_served_by(HOST_B, killed, "B serving after SIGKILL on A");
    lab.assert_settled_on(Role::B);
    let status = lab.wait_switchyard_exit(Role::A);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    // The process tracking gave the address up (FAULT), not the probe.
    lab.wait_keepalived_log(
        Role::A,
        log_mark,
        "Quorum lost for tracked process switchyard",
    );
    lab.wait_keepalived_log(Role::A, log_mark, "Entering FAULT STATE");
    println!("vrrp: SIGKILL on A's switchyard -> B serves after {switch}");
}

#[test]
fn unready_pools_on_the_master_move_the_address_and_ready_ones_take_it_back() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(mut lab) = Lab::start() else { return };

    // A's only upstream in `maint`: A's pool has no usable upstream, so its /readyz
    // fails while the process keeps running (B's view of the upstream is unchanged).
    let log_mark = lab.keepalived_log(Role::A).len();
    let unready = Instant::now();
    let (status, body) = lab.admin(Role::A, "POST", "/pools/p/upstreams/u/maint");
    assert_eq!(status, 200, "maint: {body}");
    let (status, body) = lab.admin(Role::A, "GET", "/readyz");
    assert_eq!(status, 503, "A is unready: {body}");
    assert!(body.contains("\"p\""), "names the pool: {body}");
    let (status, body) = lab.admin(Role::B, "GET", "/readyz");
    assert_eq!(
        status, 200,
        "B's own view of the upstream is unchanged: {body}"
    );
    let switch = lab.first_served_by(HOST_B, unready, "B serving while A is unready");
    lab.assert_settled_on(Role::B);
    // The probe's weight moved it: A's priority fell below B's, A did not fault.
    lab.wait_keepalived_log(
        Role::A,
        log_mark,
        "Changing effective priority from 150 to 90",
    );
    let a_log = lab.keepalived_log(Role::A);
    assert!(
        !a_log[log_mark..].contains("FAULT"),
        "an unready instance lowers its priority, it does not fault:\n{a_log}"
    );
    assert!(lab.switchyard_runs(Role::A), "A's switchyard still runs");
    println!("vrrp: A's pools unready (maint) -> B serves after {switch}");

    let ready = Instant::now();
    let (status, body) = lab.admin(Role::A, "POST", "/pools/p/upstreams/u/up");
    assert_eq!(status, 200, "up: {body}");
    let back = lab.first_served_by(HOST_A, ready, "A serving again once ready");
    lab.assert_settled_on(Role::A);
    println!("vrrp: A's pools ready again -> A serves again after {back}");
}

#[test]
fn a_binary_upgrade_on_the_master_keeps_the_address() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(mut lab) = Lab::start() else { return };

    // New clients through the upgrade and for longer than any move the configs could
    // make would take (two failed probes, then B's master-down timer: under 6 s).
    let log_mark = lab.keepalived_log(Role::A).len();
    let old_pid = lab.switchyard_pid(Role::A);
    let clients = lab.clients_for(Duration::from_secs(8));
    lab.signal_switchyard(Role::A, libc::SIGUSR2);
    lab.wait_for("the new process in the pid file", |lab| {
        read_pid(&lab.instance(Role::A).pid_file).is_some_and(|pid| pid != old_pid)
    });
    let status = lab.wait_switchyard_exit(Role::A);
    assert!(
        status.success(),
        "the old process drained and exited: {status}"
    );
    let served = clients.join().expect("the clients' thread");
    let through_a = served
        .iter()
        .filter(|via| via.as_ref() == Ok(&HOST_A))
        .count();
    let others: Vec<_> = served
        .iter()
        .filter(|via| via.as_ref() != Ok(&HOST_A))
        .collect();
    assert!(
        others.is_empty(),
        "every new connection through A during the upgrade: {others:?}"
    );
    assert!(through_a >= 100, "clients kept coming: {through_a}");
    lab.assert_settled_on(Role::A);
    let a_log = lab.keepalived_log(Role::A);
    for sign in ["Quorum lost", "FAULT", "Changing effective priority"] {
        assert!(
            !a_log[log_mark..].contains(sign),
            "A's keepalived saw nothing of the upgrade ({sign}):\n{a_log}"
        );
    }
    println!(
        "vrrp: binary upgrade on A -> the address stayed, {through_a} of {} new connections through A, none failed",
        served.len()
    );
}

// ---------------------------------------------------------------- the probe

/// The shipped probe against servers on loopback that answer each way an admin API
/// could, or fail to: only a 200 status line passes, and nothing holds it past its own
/// 1 s read bound. Runs anywhere (bash only, no root).
#[test]
fn the_readiness_probe_passes_only_on_200() {
    let cases: [(&str, &[u8], bool); 6] = [
        (
            "200",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            true,
        ),
        ("503", b"HTTP/1.1 503 Service Unavailable\r\n\r\n", false),
        ("2000", b"HTTP/1.1 2000 OK\r\n\r\n", false),
        ("HTTP/1.0", b"HTTP/1.0 200 OK\r\n\r\n", false),
        ("not HTTP", b"SSH-2.0-OpenSSH\r\n", false),
        ("closed at once", b"", false),
    ];
    for (what, answer, passes) in cases {
        let server = CannedServer::start(Answer::Bytes(answer.to_vec()));
        let (passed, took) = run_probe(server.port);
        assert_eq!(passed, passes, "{what}");
        assert!(took < Duration::from_secs(5), "{what}: took {took:?}");
    }
    // No answer, or one that never ends its status line: the probe's 1 s read bound
    // ends it (keepalived's timeout would too, later).
    for (what, answer) in [
        ("silence", Answer::Silence),
        ("endless line", Answer::Endless),
    ] {
        let server = CannedServer::start(answer);
        let (passed, took) = run_probe(server.port);
        assert!(!passed, "{what} fails");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{what}: the read bound ends it: {took:?}"
        );
    }
    // Nothing listening: refused, at once.
    let refused = common::closed_port().port();
    let (passed, took) = run_probe(refused);
    assert!(!passed, "refused fails");
    assert!(took < Duration::from_secs(5), "refused: {took:?}");
}

/// Runs the shipped probe against 127.0.0.1:`port`: whether it passed, and how long it
/// took.
fn run_probe(port: u16) -> (bool, Duration) {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keepalived/switchyard-ready.sh");
    let started = Instant::now();
    let status = Command::new("bash")
        .arg(&script)
        .args(["127.0.0.1", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the probe with bash");
    (status.success(), started.elapsed())
}

/// How a [`CannedServer`] answers the request it reads.
enum Answer {
    /// These bytes, then it closes.
    Bytes(Vec<u8>),
    /// Nothing, and it keeps the connection open (a frozen process: the kernel still
    /// completes the handshake).
    Silence,
    /// Bytes that never end a line, for up to 5 s.
    Endless,
}

/// A loopback server that answers one connection's request with an [`Answer`].
struct CannedServer {
    port: u16,
    thread: Option<JoinHandle<()>>,
}

impl CannedServer {
    fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let thread = std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            // The whole request first (bash may write it in pieces): closing with
            // some of it unread would reset the connection under the probe's feet.
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 1 << 16 {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&chunk[..n]),
                }
            }
            match answer {
                Answer::Bytes(bytes) => {
                    let _ = stream.write_all(&bytes);
                }
                // Until the probe gives up and closes its end.
                Answer::Silence => {
                    let _ = stream.read(&mut chunk);
                }
                Answer::Endless => {
                    let started = Instant::now();
                    while started.elapsed() < Duration::from_secs(5)
                        && stream.write_all(&[b'x'; 1024]).is_ok()
                    {}
                }
            }
        });
        Self {
            port,
            thread: Some(thread),
        }
    }
}

impl Drop for CannedServer {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------- the lab

#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    A,
    B,
}

impl Role {
    fn letter(self) -> &'static str {
        match self {
            Role::A => "a",
            Role::B => "b",
        }
    }

    fn address(self) -> Ipv4Addr {
        match self {
            Role::A => HOST_A,
            Role::B => HOST_B,
        }
    }

    fn shipped_config(self) -> &'static str {
        match self {
            Role::A => "keepalived-master.conf",
            Role::B => "keepalived-backup.conf",
        }
    }

    fn other(self) -> Role {
        match self {
            Role::A => Role::B,
            Role::B => Role::A,
        }
    }
}

/// One switchyard host: its namespace, its switchyard and its keepalived.
struct Instance {
    role: Role,
    namespace: String,
    dir: PathBuf,
    /// The switchyard binary under this instance's own process name.
    binary: PathBuf,
    /// `runtime.pid_file`: the serving process, also after a binary upgrade.
    pid_file: PathBuf,
    switchyard: Option<Child>,
    keepalived: Option<Child>,
}

/// Both instances, the client, the upstream and the bridge; removed on drop.
struct Lab {
    dir: PathBuf,
    /// The instances' switchyard binaries, under the build's temporary folder.
    binaries: PathBuf,
    ip: PathBuf,
    keepalived: PathBuf,
    /// Every namespace created so far, the bridge's first.
    namespaces: Vec<String>,
    client: String,
    instances: Vec<Instance>,
    upstream: Option<Upstream>,
}

impl Lab {
    /// Builds the network, starts the upstream, both switchyards and both keepalived,
    /// and waits until A holds the address and B is ready to take it. `None` (after
    /// `skip`) when the machine cannot run it.
    fn start() -> Option<Self> {
        let (ip, keepalived) = match prerequisites() {
            Ok(tools) => tools,
            Err(why) => {
                skip(&why);
                return None;
            }
        };
        remove_stale_labs(&ip);
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{PREFIX}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Under /run (root's, mode 755), not /tmp: keepalived's enable_script_security
        // refuses a probe whose path a non-root user could write.
        let dir = Path::new("/run").join(&id);
        std::fs::create_dir_all(&dir).expect("create the lab folder");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("lab folder mode");
        let mut lab = Lab {
            dir,
            binaries: Path::new(env!("CARGO_TARGET_TMPDIR")).join(&id),
            ip,
            keepalived,
            namespaces: Vec::new(),
            client: format!("{id}-c"),
            instances: Vec::new(),
            upstream: None,
        };
        let bridge = format!("{id}-br");
        if let Err(why) = lab.try_add_namespace(&bridge) {
            skip(&format!("cannot create network namespaces: {why}"));
            return None;
        }
        lab.ip_in(&bridge, &["link", "add", "br0", "type", "bridge"]);
        lab.ip_in(&bridge, &["link", "set", "br0", "up"]);
        let client = lab.client.clone();
        let upstream_ns = format!("{id}-u");
        let hosts = [
            (client.as_str(), CLIENT, "pc"),
            (upstream_ns.as_str(), UPSTREAM, "pu"),
            (&format!("{id}-a"), HOST_A, "pa"),
            (&format!("{id}-b"), HOST_B, "pb"),
        ];
        for (namespace, address, port) in hosts {
            lab.join_bridge(&bridge, namespace, address, port);
        }

        lab.upstream = Some(Upstream::start(&upstream_ns));
        for role in [Role::A, Role::B] {
            let namespace = format!("{id}-{}", role.letter());
            lab.prepare_instance(role, namespace);
        }
        for role in [Role::A, Role::B] {
            lab.start_switchyard(role);
        }
        for role in [Role::A, Role::B] {
            lab.start_keepalived(role);
        }
        lab.wait_for("both probes passing", |lab| {
            [Role::A, Role::B].iter().all(|&role| {
                lab.keepalived_log(role)
                    .contains("VRRP_Script(switchyard_ready) succeeded")
            })
        });
        let first = lab.first_served_by(HOST_A, Instant::now(), "A serving at start");
        lab.assert_settled_on(Role::A);
        println!("vrrp: lab up, A serves ({first} after both probes passed)");
        Some(lab)
    }

    fn try_add_namespace(&mut self, name: &str) -> Result<(), String> {
        let out = Command::new(&self.ip)
            .args(["netns", "add", name])
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        self.namespaces.push(name.to_owned());
        self.ip_in(name, &["link", "set", "lo", "up"]);
        Ok(())
    }

    /// A namespace with `eth0` at `address`/24, its veth peer `port` on the bridge.
    fn join_bridge(&mut self, bridge: &str, namespace: &str, address: Ipv4Addr, port: &str) {
        self.try_add_namespace(namespace)
            .unwrap_or_else(|why| panic!("ip netns add {namespace}: {why}"));
        self.ip_in(
            namespace,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", bridge,
            ],
        );
        self.ip_in(bridge, &["link", "set", port, "master", "br0"]);
        self.ip_in(bridge, &["link", "set", port, "up"]);
        self.ip_in(
            namespace,
            &["addr", "add", &format!("{address}/24"), "dev", "eth0"],
        );
        self.ip_in(namespace, &["link", "set", "eth0", "up"]);
    }

    /// `ip -n namespace args...`, which must succeed.
    fn ip_in(&self, namespace: &str, args: &[&str]) -> String {
        let out = Command::new(&self.ip)
            .args(["-n", namespace])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {namespace} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The instance's folder: switchyard's config, the keepalived config built from the
    /// shipped one, the probe, logs; and the shipped sysctl applied in its namespace.
    fn prepare_instance(&mut self, role: Role, namespace: String) {
        let dir = self.dir.join(role.letter());
        std::fs::create_dir_all(&dir).expect("instance folder");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("instance folder mode");
        apply_sysctl(&namespace, &shipped("60-switchyard-vip.conf"));

        let pid_file = dir.join("switchyard.pid");
        std::fs::write(dir.join("switchyard.toml"), switchyard_config(&pid_file))
            .expect("write switchyard.toml");
        // Both instances share this machine's process table, and keepalived counts
        // processes by name: each switchyard runs under a name of its own, the file name
        // it is started by, so that each keepalived sees only its own. A hard link (or a
        // copy), not a symlink: a binary upgrade starts /proc/self/exe, which names the
        // link itself, so the new process keeps the name. Beside the build (same file
        // system), where a hard link is possible.
        let binaries = self.binaries.join(role.letter());
        std::fs::create_dir_all(&binaries).expect("binaries folder");
        let binary = binaries.join(process_name(role));
        if std::fs::hard_link(env!("CARGO_BIN_EXE_switchyard"), &binary).is_err() {
            std::fs::copy(env!("CARGO_BIN_EXE_switchyard"), &binary)
                .expect("copy the switchyard binary");
        }

        let probe = dir.join("switchyard-ready.sh");
        std::fs::write(&probe, shipped("switchyard-ready.sh")).expect("write the probe");
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755))
            .expect("probe mode");
        let config = keepalived_config(&shipped(role.shipped_config()), role, &probe);
        std::fs::write(dir.join("keepalived.conf"), config).expect("write keepalived.conf");

        self.instances.push(Instance {
            role,
            namespace,
            dir,
            binary,
            pid_file,
            switchyard: None,
            keepalived: None,
        });
    }

    fn instance(&self, role: Role) -> &Instance {
        self.instances
            .iter()
            .find(|i| i.role == role)
            .expect("both instances exist")
    }

    fn instance_mut(&mut self, role: Role) -> &mut Instance {
        self.instances
            .iter_mut()
            .find(|i| i.role == role)
            .expect("both instances exist")
    }

    /// `switchyard run` in the instance's namespace; returns once its /readyz is 200.
    fn start_switchyard(&mut self, role: Role) {
        let instance = self.instance(role);
        let mut command = Command::new(&self.ip);
        command
            .args(["netns", "exec", &instance.namespace])
            .arg(&instance.binary)
            .args(["run", "-c"])
            .arg(instance.dir.join("switchyard.toml"));
        let log = instance.dir.join("switchyard.log");
        let child = spawn_tied(command, &log);
        self.instance_mut(role).switchyard = Some(child);
        self.wait_for(&format!("{role:?}'s switchyard ready"), |lab| {
            assert!(
                lab.switchyard_runs(role),
                "{role:?}'s switchyard exited at start"
            );
            lab.try_admin(role, "GET", "/readyz")
                .is_ok_and(|(status, _)| status == 200)
        });
    }

    /// keepalived for the instance's namespace, started from this (the initial)
    /// namespace: with `--namespace` it opens the kernel's process events before it
    /// enters the namespace, and they are only delivered in the initial one.
    fn start_keepalived(&mut self, role: Role) {
        let instance = self.instance(role);
        let dir = &instance.dir;
        let mut command = Command::new(&self.keepalived);
        command
            .arg(format!("--namespace={}", instance.namespace))
            .args([
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--no-syslog",
            ])
            .arg("--vrrp")
            .arg(format!(
                "--use-file={}",
                dir.join("keepalived.conf").display()
            ))
            .arg(format!("--pid={}", dir.join("keepalived.pid").display()))
            .arg(format!("--vrrp_pid={}", dir.join("vrrp.pid").display()));
        let child = spawn_tied(command, &dir.join("keepalived.log"));
        self.instance_mut(role).keepalived = Some(child);
    }

    fn switchyard_runs(&mut self, role: Role) -> bool {
        self.instance_mut(role)
            .switchyard
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    fn switchyard_pid(&self, role: Role) -> libc::pid_t {
        let child = self
            .instance(role)
            .switchyard
            .as_ref()
            .expect("switchyard started");
        libc::pid_t::try_from(child.id()).expect("pid fits pid_t")
    }

    fn signal_switchyard(&self, role: Role, signal: libc::c_int) {
        let child = self
            .instance(role)
            .switchyard
            .as_ref()
            .expect("switchyard started");
        common::signal(child, signal);
    }

    fn wait_switchyard_exit(&mut self, role: Role) -> std::process::ExitStatus {
        let deadline = Instant::now() + LIMIT;
        loop {
            let child = self
                .instance_mut(role)
                .switchyard
                .as_mut()
                .expect("switchyard started");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.instance_mut(role).switchyard = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{role:?}'s switchyard never exited"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the instance's keepalived logs `line` after byte `mark` of its log.
    fn wait_keepalived_log(&mut self, role: Role, mark: usize, line: &str) {
        self.wait_for(&format!("{role:?}'s keepalived logging {line:?}"), |lab| {
            lab.keepalived_log(role)
                .get(mark..)
                .is_some_and(|since| since.contains(line))
        });
    }

    fn keepalived_log(&self, role: Role) -> String {
        std::fs::read_to_string(self.instance(role).dir.join("keepalived.log")).unwrap_or_default()
    }

    /// Whether the floating address is on the instance's eth0 now.
    fn holds_address(&self, role: Role) -> bool {
        let listing = self.ip_in(
            &self.instance(role).namespace,
            &["-4", "-o", "addr", "show", "dev", "eth0"],
        );
        listing.contains(&format!(" {FLOATING}/"))
    }

    /// The address is on `role` only, and the next new connections all go through it.
    fn assert_settled_on(&mut self, role: Role) {
        let other = role.other();
        self.wait_for(&format!("the address on {role:?} only"), |lab| {
            lab.holds_address(role) && !lab.holds_address(other)
        });
        let client = self.client.clone();
        let served: Vec<Result<Ipv4Addr, String>> = in_namespace(&client, || {
            (0..SETTLED_CONNECTIONS).map(|_| connect_once()).collect()
        });
        assert!(
            served.iter().all(|via| via.as_ref() == Ok(&role.address())),
            "every new connection goes through {role:?}: {served:?}"
        );
    }

    /// New connections to the floating address from the client, a new one every 20 ms
    /// whether the earlier ones have finished or not (as independent clients would),
    /// until one is served by `want` (the upstream greets with the address it came
    /// from). The switch time is when that connection got its greeting: a connection
    /// caught in the move, which only its own timeout ends, does not delay it.
    fn first_served_by(&self, want: Ipv4Addr, since: Instant, what: &str) -> Switch {
        let client = self.client.clone();
        // Threads started by a thread inside a namespace start inside it too.
        let outcome = in_namespace(&client, move || {
            let (report, results) = std::sync::mpsc::channel();
            std::thread::scope(|clients| {
                let mut switch = Switch::default();
                loop {
                    switch.started += 1;
                    let report = report.clone();
                    clients.spawn(move || {
                        let result = connect_once();
                        let _ = report.send((result, since.elapsed()));
                    });
                    std::thread::sleep(PROBE_PAUSE);
                    let mut served_at = None;
                    for (result, at) in results.try_iter() {
                        match result {
                            Ok(via) if via == want => {
                                served_at =
                                    Some(served_at.map_or(at, |first: Duration| first.min(at)));
                            }
                            Ok(via) => switch.served_by_other.push(via),
                            Err(why) => {
                                switch.failed += 1;
                                switch.last_error = why;
                            }
                        }
                    }
                    if let Some(at) = served_at {
                        switch.after = at;
                        return Ok(switch);
                    }
                    if since.elapsed() > LIMIT {
                        return Err(switch);
                    }
                }
            })
        });
        outcome.unwrap_or_else(|switch| {
            panic!(
                "timed out waiting for: {what} ({switch:?}); A holds the address: {}, B: {}",
                self.holds_address(Role::A),
                self.holds_address(Role::B)
            )
        })
    }

    /// New connections to the floating address from the client, one every 20 ms for
    /// `window`, in the background: which instance served each, or why it failed.
    fn clients_for(&self, window: Duration) -> JoinHandle<Vec<Result<Ipv4Addr, String>>> {
        let client = self.client.clone();
        std::thread::spawn(move || {
            in_namespace(&client, move || {
                let started = Instant::now();
                std::thread::scope(|clients| {
                    let mut running = Vec::new();
                    while started.elapsed() < window {
                        running.push(clients.spawn(connect_once));
                        std::thread::sleep(PROBE_PAUSE);
                    }
                    running
                        .into_iter()
                        .map(|client| client.join().unwrap_or_else(|_| Err("panicked".into())))
                        .collect()
                })
            })
        })
    }

    /// One admin API request in the instance's namespace: (status, body).
    fn admin(&self, role: Role, method: &str, path: &str) -> (u16, String) {
        self.try_admin(role, method, path)
            .unwrap_or_else(|e| panic!("{method} {path} on {role:?}: {e}"))
    }

    fn try_admin(&self, role: Role, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        in_namespace(&self.instance(role).namespace, move || {
            let mut stream = TcpStream::connect_timeout(&ADMIN, GREETING_TIMEOUT)?;
            stream.set_read_timeout(Some(GREETING_TIMEOUT))?;
            stream.write_all(request.as_bytes())?;
            let mut answer = String::new();
            stream.take(1 << 16).read_to_string(&mut answer)?;
            let status = answer
                .strip_prefix("HTTP/1.1 ")
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:?}")))?;
            let body = answer
                .split_once("\r\n\r\n")
                .map_or("", |(_, body)| body)
                .to_owned();
            Ok((status, body))
        })
    }

    /// Polls `condition` every 20 ms until it holds; panics after [`LIMIT`].
    fn wait_for(&mut self, what: &str, mut condition: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + LIMIT;
        while !condition(self) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            std::thread::sleep(POLL);
        }
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for instance in &self.instances {
            for name in ["switchyard.log", "keepalived.log"] {
                let text = std::fs::read_to_string(instance.dir.join(name)).unwrap_or_default();
                all.push_str(&format!("--- {:?} {name}\n{text}\n", instance.role));
            }
        }
        all
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for instance in &mut self.instances {
            // keepalived first and gently: it removes its address and tells its peer.
            if let Some(mut child) = instance.keepalived.take() {
                common::stop_child(&mut child, libc::SIGTERM, Duration::from_secs(5));
            }
        }
        for instance in &mut self.instances {
            if let Some(mut child) = instance.switchyard.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            // A process a binary upgrade started is no child of this test: its pid
            // file names it, and its executable shows it is this instance's.
            if let Some(pid) = read_pid(&instance.pid_file) {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
                if exe.is_ok_and(|exe| exe == instance.binary) {
                    // SAFETY: kill(2) takes plain integers; the pid was checked just
                    // above to run this instance's switchyard binary.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        drop(self.upstream.take());
        for namespace in self.namespaces.iter().rev() {
            let _ = Command::new(&self.ip)
                .args(["netns", "delete", namespace])
                .status();
            // keepalived --namespace keeps its state under /run/keepalived/<namespace>.
            let _ = std::fs::remove_dir_all(Path::new("/run/keepalived").join(namespace));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.binaries);
    }
}

/// What a client saw until the first connection through the instance it waited for.
#[derive(Debug, Default)]
struct Switch {
    after: Duration,
    started: u32,
    failed: u32,
    last_error: String,
    served_by_other: Vec<Ipv4Addr>,
}

impl std::fmt::Display for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ms ({} new connections started, {} failed by then, {} served by the other instance)",
            self.after.as_millis(),
            self.started,
            self.failed,
            self.served_by_other.len()
        )
    }
}

/// One new connection to the floating address: the instance address the upstream saw.
fn connect_once() -> Result<Ipv4Addr, String> {
    let target = SocketAddr::from((FLOATING, SERVICE_PORT));
    let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(GREETING_TIMEOUT))
        .map_err(|e| format!("set timeout: {e}"))?;
    let mut greeting = String::new();
    stream
        .take(128)
        .read_to_string(&mut greeting)
        .map_err(|e| format!("read: {e}"))?;
    greeting
        .trim()
        .strip_prefix("hello ")
        .and_then(|address| address.parse().ok())
        .ok_or_else(|| format!("no greeting: {greeting:?}"))
}

// ---------------------------------------------------------------- the upstream

/// A TCP server in its own namespace that greets each connection with "hello <the
/// address it came from>" and closes it: the address names the switchyard instance.
struct Upstream {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start(namespace: &str) -> Self {
        let listener = in_namespace(namespace, || {
            TcpListener::bind((UPSTREAM, UPSTREAM_PORT)).expect("bind the upstream")
        });
        listener
            .set_nonblocking(true)
            .expect("nonblocking upstream listener");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_write_timeout(Some(GREETING_TIMEOUT));
                        let _ = writeln!(stream, "hello {}", peer.ip());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------- helpers

/// Root, `ip` and keepalived, or why not.
fn prerequisites() -> Result<(PathBuf, PathBuf), String> {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the VRRP test needs root (network namespaces, addresses)".into());
    }
    let ip = find_program("ip").ok_or("`ip` is not installed (Debian package iproute2)")?;
    let keepalived = find_program("keepalived")
        .ok_or("keepalived is not installed (Debian package keepalived)")?;
    Ok((ip, keepalived))
}

fn shipped(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/keepalived")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn process_name(role: Role) -> String {
    format!("switchyard-{}", role.letter())
}

/// The shipped keepalived config with only what the lab must change: its network, the
/// probe's path, and the process name (both instances share this machine's processes).
fn keepalived_config(shipped: &str, role: Role, probe: &Path) -> String {
    let process_line = format!("process {}\n", process_name(role));
    let probe_path = probe.display().to_string();
    let changes = [
        (SHIPPED_NET, LAB_NET),
        ("/etc/keepalived/switchyard-ready.sh", probe_path.as_str()),
        ("process switchyard\n", process_line.as_str()),
    ];
    let mut config = shipped.to_owned();
    for (from, to) in changes {
        assert!(
            config.contains(from),
            "{} no longer has {from:?}: update the test",
            role.shipped_config()
        );
        config = config.replace(from, to);
    }
    config
}

/// switchyard on the floating address (bound on both instances thanks to the sysctl),
/// the admin API where the probe asks, one pool over the upstream.
fn switchyard_config(pid_file: &Path) -> String {
    format!(
        "[runtime]\nshutdown_grace = \"5s\"\npid_file = \"{}\"\n\n\
         [admin]\nlisten = \"{ADMIN}\"\n\n\
         [listeners.front]\nbind = \"{FLOATING}:{SERVICE_PORT}\"\npool = \"p\"\n\n\
         [pools.p]\nconnect_timeout = \"1s\"\n\
         upstreams = [{{ name = \"u\", address = \"{UPSTREAM}:{UPSTREAM_PORT}\" }}]\n\n\
         [pools.p.health]\ninterval = \"500ms\"\n",
        pid_file.display()
    )
}

fn read_pid(path: &Path) -> Option<libc::pid_t> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Applies a sysctl.d file's `key = value` lines inside `namespace` (the net.* keys are
/// per namespace). A key the kernel does not have (IPv6 disabled) is left out; the IPv4
/// one the lab relies on must be there.
fn apply_sysctl(namespace: &str, file: &str) {
    let settings: Vec<(PathBuf, String)> = file
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line.split_once('=').expect("sysctl lines are key = value");
            let path = Path::new("/proc/sys").join(key.trim().replace('.', "/"));
            (path, value.trim().to_owned())
        })
        .collect();
    assert!(
        settings
            .iter()
            .any(|(path, _)| path.ends_with("ipv4/ip_nonlocal_bind")),
        "the sysctl file sets net.ipv4.ip_nonlocal_bind"
    );
    in_namespace(namespace, move || {
        for (path, value) in settings {
            if path.exists() || path.ends_with("ipv4/ip_nonlocal_bind") {
                std::fs::write(&path, &value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
    });
}

/// Runs `work` on a thread of its own that has entered network namespace `namespace`
/// (setns changes only the calling thread); sockets it makes stay in that namespace.
fn in_namespace<T: Send + 'static>(
    namespace: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let path = Path::new("/run/netns").join(namespace);
    std::thread::spawn(move || {
        let handle =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        enter_network_namespace(handle.as_fd())
            .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
        work()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn enter_network_namespace(namespace: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: setns(2) reads a descriptor that `namespace` keeps open for the call and a
    // flag; it moves only the calling thread, which the caller owns, to that namespace.
    let result = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Spawns `command` with its output in `log`; the kernel kills it if this test process
/// dies first (an aborted run leaves no keepalived or switchyard behind).
fn spawn_tied(mut command: Command, log: &Path) -> Child {
    let (stdout, stderr) = log_file(log);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // async-signal-safe, with plain integers; its error is built from errno.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"))
}

/// Removes the namespaces and folders of runs whose process is gone (killed before
/// their guard ran); their processes died with them (`spawn_tied`).
fn remove_stale_labs(ip: &Path) {
    let dead_run = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
    };
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| dead_run(name))
            .collect()
    };
    for namespace in names("/run/netns") {
        let _ = Command::new(ip)
            .args(["netns", "delete", &namespace])
            .status();
        let _ = std::fs::remove_dir_all(Path::new("/run/keepalived").join(&namespace));
    }
    for folder in names("/run") {
        let _ = std::fs::remove_dir_all(Path::new("/run").join(folder));
    }
    let binaries = env!("CARGO_TARGET_TMPDIR");
    for folder in names(binaries) {
        let _ = std::fs::remove_dir_all(Path::new(binaries).join(folder));
    }
}
