//! The accept loop, and the set of running listeners that a reload reshapes.
//!
//! The listening sockets are opened, reused and tuned in `sockets`. The accept loop
//! never exits on an accept error: running out of file descriptors or memory is a
//! reason to back off and retry, not to stop serving.
//!
//! Each accept loop registers a duplicate of its socket's descriptor with the runtime
//! it runs on, the current one or, with `runtime.scheduler = "per_thread"`, a worker's
//! (see `workers`); the set keeps the sockets themselves, unregistered, for reloads and
//! upgrades.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::RuntimeFlavor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::wake_gate;
use super::workers::Workers;
use crate::config::{Config, ListenerConfig};
use crate::error::StartError;
use crate::metrics::{ListenerStats, RejectReason};
use crate::shutdown::Shutdown;
use crate::snapshot::{ListenerRoute, SharedSnapshot};
use crate::sockets::{self, Kind, ListenerSockets, SocketTable};

const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_millis(250);

/// A listener's sockets, bound and listening (with their options set), not yet
/// accepting.
#[derive(Debug)]
pub struct BoundListener {
    pub config: ListenerConfig,
    pub sockets: ListenerSockets,
}

/// What every connection of one listener shares. Lives as long as the listener's name
/// stays in the config, across reloads.
#[derive(Debug)]
pub struct ListenerContext {
    pub name: String,
    pub stats: Arc<ListenerStats>,
    /// Connections admitted and not yet ended, counted against `max_connections`.
    admitted: AtomicUsize,
    /// `usize::MAX` when unlimited. A lowered limit admits no one until enough
    /// connections have ended; those already admitted go on.
    max_connections: AtomicUsize,
    pub(crate) snapshot: SharedSnapshot,
}

/// The running listeners. Changed only by start and reload (which are serialized);
/// read by the admin API. Its lock is never held across an await or on the hot path.
#[derive(Debug)]
pub struct ListenerSet {
    running: Mutex<Vec<RunningListener>>,
    snapshot: SharedSnapshot,
    shutdown: Shutdown,
    sockets_per_address: usize,
    /// Where the accept loops run with `runtime.scheduler = "per_thread"`; `None`: on
    /// the runtime that starts them.
    workers: Option<Workers>,
}

#[derive(Debug)]
struct RunningListener {
    context: Arc<ListenerContext>,
    config: ListenerConfig,
    sockets: Vec<RunningSocket>,
}

#[derive(Debug)]
struct RunningSocket {
    /// The configured address (port 0 stays 0 here).
    bind: SocketAddr,
    listener: Arc<std::net::TcpListener>,
    stop: CancellationToken,
}

/// What a reload will run: each listener's sockets, reused or newly bound.
#[derive(Debug)]
pub struct PreparedListeners {
    listeners: Vec<BoundListener>,
}

/// A listener as tests and the admin API see it.
#[derive(Debug, Clone)]
pub struct ListenerView {
    pub context: Arc<ListenerContext>,
    pub config: ListenerConfig,
    /// The addresses actually bound (port 0 resolved).
    pub addrs: Vec<SocketAddr>,
}

// === impl BoundListener ===

impl BoundListener {
    /// Pairs each listener of `config` with its sockets, as [`sockets::bind`] returns
    /// them (one entry per listener, in order).
    pub fn all(config: &Config, sockets: Vec<ListenerSockets>) -> Vec<Self> {
        config
            .listeners
            .iter()
            .zip(sockets)
            .map(|(config, sockets)| Self {
                config: config.clone(),
                sockets,
            })
            .collect()
    }

    /// The addresses actually bound (port 0 resolved), each once however many
    /// `SO_REUSEPORT` sockets share it.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = Vec::new();
        for addr in self.sockets.iter().filter_map(|(_, s)| s.local_addr().ok()) {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        addrs
    }
}

/// The addresses of `sockets`, each once: the `SO_REUSEPORT` siblings of one address
/// are one address to an operator.
fn distinct_addrs(sockets: &[RunningSocket]) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for addr in sockets.iter().filter_map(|s| s.listener.local_addr().ok()) {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    addrs
}

// === impl ListenerContext ===

impl ListenerContext {
    pub fn new(config: &ListenerConfig, snapshot: SharedSnapshot) -> Self {
        Self {
            name: config.name.clone(),
            stats: Arc::default(),
            admitted: AtomicUsize::new(0),
            max_connections: AtomicUsize::new(limit(config.max_connections)),
            snapshot,
        }
    }

    pub fn max_connections(&self) -> Option<NonZeroUsize> {
        NonZeroUsize::new(self.max_connections.load(Relaxed)).filter(|n| n.get() != usize::MAX)
    }

    /// Takes effect for the next client: connections already admitted go on.
    fn set_max_connections(&self, new: Option<NonZeroUsize>) {
        self.max_connections.store(limit(new), Relaxed);
    }

    /// Counts a client in if the limit allows; the returned guard counts it out.
    /// Lock-free: every worker thread admits to the same listener.
    fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        let max = self.max_connections.load(Relaxed);
        self.admitted
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()?;
        Some(Admitted(self.clone()))
    }
}

fn limit(max: Option<NonZeroUsize>) -> usize {
    max.map_or(usize::MAX, NonZeroUsize::get)
}

/// A connection counted against its listener's `max_connections`, and the listener's
/// context it is served with; counted out when dropped, however the connection ends
/// (even by a panic, or a task that never ran).
#[derive(Debug)]
struct Admitted(Arc<ListenerContext>);

impl std::ops::Deref for Admitted {
    type Target = ListenerContext;

    fn deref(&self) -> &ListenerContext {
        &self.0
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Relaxed);
    }
}

// === impl ListenerSet ===

impl ListenerSet {
    /// Starts accepting on every socket of `bound`, on `workers` when given (one
    /// socket each in turn), else on the current runtime. A reload binds each new
    /// address `sockets_per_address` times, like the start did.
    pub fn start(
        bound: Vec<BoundListener>,
        snapshot: SharedSnapshot,
        shutdown: Shutdown,
        sockets_per_address: usize,
        workers: Option<Workers>,
    ) -> Self {
        let set = Self {
            running: Mutex::new(Vec::new()),
            snapshot,
            shutdown,
            sockets_per_address,
            workers,
        };
        set.apply(PreparedListeners { listeners: bound });
        set
    }

    /// The worker threads' runtimes with `runtime.scheduler = "per_thread"`; empty on
    /// the shared runtime.
    pub fn worker_runtimes(&self) -> Vec<tokio::runtime::Handle> {
        self.workers
            .as_ref()
            .map(|workers| workers.runtimes().to_vec())
            .unwrap_or_default()
    }

    pub fn views(&self) -> Vec<ListenerView> {
        self.lock()
            .iter()
            .map(|l| ListenerView {
                context: l.context.clone(),
                config: l.config.clone(),
                addrs: distinct_addrs(&l.sockets),
            })
            .collect()
    }

    /// Every running socket, keyed by its configured address: what a reload reuses,
    /// and what a binary upgrade hands over.
    pub fn sockets(&self) -> SocketTable {
        let mut table = SocketTable::default();
        for socket in self.lock().iter().flat_map(|l| l.sockets.iter()) {
            table.insert(Kind::Traffic, socket.bind, socket.listener.clone());
        }
        table
    }

    /// Reload, step one: sockets for every listener of `config`, reusing the running
    /// sockets of each address that is already bound and binding the others. Nothing
    /// running changes; on error the sockets bound here are closed again.
    pub fn prepare(&self, full: &Config) -> Result<PreparedListeners, StartError> {
        let mut running = self.sockets();
        let sockets = sockets::bind_listeners(full, self.sockets_per_address, &mut running)?;
        Ok(PreparedListeners {
            listeners: BoundListener::all(full, sockets),
        })
    }

    /// Reload, last step (after the routing swap): accept on exactly the prepared
    /// sockets. Sockets that stay keep their accept loop; sockets no longer wanted stop
    /// accepting and close, while their established connections go on.
    pub fn apply(&self, prepared: PreparedListeners) {
        let mut running = self.lock();
        let mut old: HashMap<String, RunningListener> = running
            .drain(..)
            .map(|l| (l.config.name.clone(), l))
            .collect();
        for bound in prepared.listeners {
            let mut previous = old.remove(&bound.config.name);
            let context = match &previous {
                Some(p) => {
                    p.context.set_max_connections(bound.config.max_connections);
                    p.context.clone()
                }
                None => Arc::new(ListenerContext::new(&bound.config, self.snapshot.clone())),
            };
            let mut sockets = Vec::new();
            for (bind, listener) in bound.sockets {
                let kept = previous.as_mut().and_then(|p| {
                    let i = p
                        .sockets
                        .iter()
                        .position(|s| Arc::ptr_eq(&s.listener, &listener))?;
                    Some(p.sockets.swap_remove(i))
                });
                let socket = match kept {
                    Some(socket) => socket,
                    None => {
                        // A socket moving from another listener stops its old loop.
                        for other in old.values_mut() {
                            other.sockets.retain(|s| {
                                let moving = Arc::ptr_eq(&s.listener, &listener);
                                if moving {
                                    s.stop.cancel();
                                }
                                !moving
                            });
                        }
                        self.spawn_accept(bind, listener, &context)
                    }
                };
                sockets.push(socket);
            }
            for addr in distinct_addrs(&sockets) {
                let pool = bound.config.pool.as_deref().unwrap_or("(SNI routes only)");
                info!(listener = %bound.config.name, %addr, %pool, "listening");
            }
            if let Some(previous) = previous {
                for socket in previous.sockets {
                    socket.stop.cancel();
                }
            }
            running.push(RunningListener {
                context,
                config: bound.config,
                sockets,
            });
        }
        for (name, removed) in old {
            info!(listener = %name, "listener removed: stops accepting, its connections go on");
            for socket in removed.sockets {
                socket.stop.cancel();
            }
        }
    }

    /// Stops accepting everywhere and closes every listening socket (shutdown).
    pub fn close(&self) {
        for listener in self.lock().drain(..) {
            for socket in listener.sockets {
                socket.stop.cancel();
            }
        }
    }

    /// Ends the worker threads of `runtime.scheduler = "per_thread"` (none otherwise)
    /// and waits for them: after the drain, when no connection is left on them. Blocks.
    pub fn stop_workers(&self) {
        if let Some(workers) = &self.workers {
            workers.stop();
        }
    }

    fn spawn_accept(
        &self,
        bind: SocketAddr,
        listener: Arc<std::net::TcpListener>,
        context: &Arc<ListenerContext>,
    ) -> RunningSocket {
        let stop = CancellationToken::new();
        match listener.try_clone() {
            Ok(own) => {
                let task = accept_loop(own, context.clone(), self.shutdown.clone(), stop.clone());
                match &self.workers {
                    Some(workers) => workers.place(task),
                    None => drop(tokio::spawn(task)),
                }
            }
            Err(e) => {
                // Out of descriptors: the socket stays in the set (a reload or an
                // upgrade may still serve it), and its siblings accept its share.
                error!(listener = %context.name, %bind, error = %e, "cannot accept on a listening socket: no descriptor left to register it");
            }
        }
        RunningSocket {
            bind,
            listener,
            stop,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RunningListener>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Accepts until shutdown begins or this socket is removed. Each admitted client is
/// served on its own task, on the runtime this loop runs on, which `socket` (a
/// descriptor of its own) is registered with.
async fn accept_loop(
    socket: std::net::TcpListener,
    context: Arc<ListenerContext>,
    shutdown: Shutdown,
    stop: CancellationToken,
) {
    let local = socket.local_addr().ok();
    let socket = match TcpListener::from_std(socket) {
        Ok(socket) => socket,
        Err(e) => {
            error!(listener = %context.name, addr = ?local, error = %e, "cannot accept on a listening socket: the runtime cannot register it");
            return;
        }
    };
    let mut backoff = MIN_ACCEPT_BACKOFF;
    let mut failures_in_a_row = 0u64;
    // Only where no other thread runs this runtime's driver can an event not slip in
    // between the accept and the clearing, so that the clearing wipes only tokio's
    // assumption and never a real event.
    let clears_readiness =
        tokio::runtime::Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread;
    // Made once and polled only when they fire: the tokens are shared by every accept
    // loop of the process, and a wait made anew per accepted client would take their
    // locks for each.
    let stopping = std::pin::pin!(shutdown.stopping());
    let removed = std::pin::pin!(stop.cancelled());
    let mut stopped = wake_gate::either(stopping, removed);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stopped => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if clears_readiness {
                    forget_assumed_readiness(&stream);
                }
                if failures_in_a_row > 0 {
                    info!(listener = %context.name, failures = failures_in_a_row, "accepting again");
                    failures_in_a_row = 0;
                    backoff = MIN_ACCEPT_BACKOFF;
                }
                admit(stream, peer, !clears_readiness, &context, &shutdown);
            }
            Err(e) if is_client_gone(&e) => {
                debug!(listener = %context.name, error = %e, "client left before accept");
            }
            Err(e) => {
                if failures_in_a_row == 0 {
                    warn!(listener = %context.name, error = %e, "accept failed; backing off until it succeeds");
                }
                failures_in_a_row += 1;
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
    if let Some(addr) = local {
        debug!(listener = %context.name, %addr, "stopped accepting");
    }
}

/// Tokio marks an accepted socket readable before any event says so, so that a first
/// read is tried at once. Cleared here, without a syscall, readiness means bytes (or an
/// end) from now on, and `upstream_gone_first` needs no peek to tell a client that has
/// spoken from one that has not. The socket's registration queued an event of its own
/// if bytes were already there.
fn forget_assumed_readiness(stream: &TcpStream) {
    let would_block = || Err(std::io::ErrorKind::WouldBlock.into());
    let _: std::io::Result<()> = stream.try_io(Interest::READABLE, would_block);
}

fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    readiness_may_lie: bool,
    context: &Arc<ListenerContext>,
    shutdown: &Shutdown,
) {
    context.stats.connections_total.fetch_add(1, Relaxed);
    // The listener's settings as of this moment serve the whole connection setup: one
    // snapshot load here instead of one per step.
    let Some(listener) = context.snapshot.load().listener(&context.name).cloned() else {
        // Only in the instant a reload removes this listener.
        context
            .stats
            .fail(crate::metrics::FailedReason::RemovedByReload);
        return;
    };
    let refuse = |reason| {
        context.stats.reject(reason);
        // Dropped at once: the access-log line of a refused client.
        super::access_log::ConnectionRecord::new(listener.access_log, &context.name, peer)
            .reject(reason);
    };
    if !super::access::is_allowed(&listener.config, peer.ip()) {
        refuse(RejectReason::Denied);
        debug!(listener = %context.name, client = %peer, "client network not allowed; closing");
        return;
    }
    let Some(admitted) = context.try_admit() else {
        refuse(RejectReason::MaxConnections);
        debug!(listener = %context.name, client = %peer, "max_connections reached; closing client");
        return;
    };
    let task = connection_task(
        stream,
        peer,
        readiness_may_lie,
        admitted,
        listener,
        shutdown.clone(),
    );
    shutdown.connections().spawn(task);
}

/// The task of one admitted client, from routing to the end of the copy. Its size is
/// what every open connection costs in memory besides its sockets: kept small by
/// boxing the rare paths (see the test below). An `async move` block rather than an
/// `async fn`, here and down the hot path: an async fn keeps a second copy of each
/// argument for the whole life of its future.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice; this future is every connection's state"
)]
fn connection_task(
    stream: TcpStream,
    peer: SocketAddr,
    readiness_may_lie: bool,
    admitted: Admitted,
    listener: Arc<ListenerRoute>,
    shutdown: Shutdown,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        super::serve(
            stream,
            peer,
            readiness_may_lie,
            &admitted,
            &listener,
            &shutdown,
        )
        .await;
    }
}

/// Errors that concern one client only; the listener itself is fine.
fn is_client_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || e.raw_os_error() == Some(libc::EPROTO)
        || e.raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::SniRoutes;
    use crate::snapshot::RoutingSnapshot;

    const CONFIG: &str = r#"
[listeners.plain]
bind = "127.0.0.1:0"
pool = "p"

[pools.p]
upstreams = [{ address = "127.0.0.1:1" }]
"#;

    /// Every open connection holds its task: a plain TCP connection's must stay small,
    /// the rare paths (TLS, PROXY header, SNI, opening watch) being boxed.
    #[tokio::test]
    async fn a_plain_connection_task_stays_small() {
        let config = Config::parse(CONFIG, std::path::Path::new("size.toml")).unwrap();
        let listener_config = config.listeners[0].clone();
        let snapshot: SharedSnapshot = Arc::new(arc_swap::ArcSwap::from_pointee(
            RoutingSnapshot::new(Vec::new(), HashMap::new()),
        ));
        let context = Arc::new(ListenerContext::new(&listener_config, snapshot));
        let route = Arc::new(ListenerRoute {
            config: listener_config,
            sni: SniRoutes::default(),
            access_log: false,
        });
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(socket.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = socket.accept().await.unwrap();
        let admitted = context.try_admit().unwrap();
        let task = connection_task(accepted, peer, true, admitted, route, Shutdown::new());
        let size = std::mem::size_of_val(&task);
        println!("connection task: {size} bytes");
        assert!(size <= TASK_BOUND, "a connection's task takes {size} bytes");
        drop(client);
    }

    #[test]
    fn a_lowered_limit_waits_for_connections_to_end_and_a_raised_one_admits_at_once() {
        let config = Config::parse(CONFIG, std::path::Path::new("limit.toml")).unwrap();
        let snapshot: SharedSnapshot = Arc::new(arc_swap::ArcSwap::from_pointee(
            RoutingSnapshot::new(Vec::new(), HashMap::new()),
        ));
        let context = Arc::new(ListenerContext::new(&config.listeners[0], snapshot));
        context.set_max_connections(NonZeroUsize::new(3));
        let mut held: Vec<Admitted> = (0..3).map(|_| context.try_admit().unwrap()).collect();
        assert!(
            context.try_admit().is_none(),
            "the fourth is over the limit"
        );

        context.set_max_connections(NonZeroUsize::new(1));
        assert_eq!(context.max_connections(), NonZeroUsize::new(1));
        held.pop();
        assert!(
            context.try_admit().is_none(),
            "two still open, above the new limit"
        );
        held.pop();
        assert!(
            context.try_admit().is_none(),
            "one still open: the limit is reached"
        );
        held.pop();
        held.push(context.try_admit().expect("all ended: one admitted"));

        context.set_max_connections(None);
        assert_eq!(context.max_connections(), None);
        held.extend((0..100).map(|_| context.try_admit().unwrap()));
        drop(held);
        assert_eq!(context.admitted.load(Relaxed), 0, "every guard counted out");
    }

    /// What the test allows: 1,984 bytes measured in the debug build `cargo test` makes
    /// (2,584 while the hot path's functions were `async fn`s keeping second copies of
    /// their arguments, 2,840 before the pumps waited with `poll_read_ready`), plus some
    /// room for layout changes of the compiler or tokio. A rare path left inline, or an
    /// `async fn` back on the hot path, grows it past this.
    const TASK_BOUND: usize = 2112;
}
