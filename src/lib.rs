//! switchyard: a Layer-4 (TCP) proxy with built-in failover.
//!
//! Data flows config → routing snapshot → proxy / health / admin, with the controller as
//! the snapshot's only writer; reload and shutdown are the two lifecycle edges. The
//! README's layout lists the modules lowest first. `main.rs` only parses arguments, sets up
//! logging and calls [`run`]; tests call [`Proxy::start`] on listeners bound to port 0.

#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod config;
pub mod controller;
pub mod demo;
pub mod dial;
pub mod discovery;
pub mod dns;
pub mod drill;
pub mod error;
pub mod events;
pub mod files;
pub mod health;
pub mod log_format;
pub mod metrics;
pub mod names;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod shutdown;
pub mod snapshot;
pub mod sockets;
pub mod status;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod wire;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, Weak};

use tokio::net::TcpListener;
use tracing::{error, info, warn};

use admin::Admin;
use config::{Config, Scheduler};
use controller::{CarriedPool, Controller, ControllerHandle};
use events::EventLog;
use proxy::listener::{BoundListener, ListenerSet, ListenerView};
use proxy::workers::Workers;
use reload::Reloader;
use shutdown::Shutdown;
use snapshot::SharedSnapshot;
use sockets::{Kind, SocketTable};

/// A running proxy: what tests, the demo, reload and the admin API work with.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub snapshot: SharedSnapshot,
    pub listeners: Arc<ListenerSet>,
    pub events: Arc<EventLog>,
    pub controller: ControllerHandle,
}

// === impl Proxy ===

impl Proxy {
    /// Starts the controller (and with it the health checks) and accepting on
    /// `listeners` (already bound): on the current runtime, or with
    /// `runtime.scheduler = "per_thread"` on worker threads started here. Returns at
    /// once; everything runs until `shutdown` begins. Fails only when the worker
    /// threads cannot start.
    pub fn start(
        config: &Config,
        listeners: Vec<BoundListener>,
        shutdown: &Shutdown,
    ) -> Result<Self, error::StartError> {
        Self::start_inheriting(config, listeners, shutdown, &[])
    }

    /// [`start`](Self::start), with the upstream states a previous process handed over
    /// (a binary upgrade) instead of every upstream up until its first check.
    pub fn start_inheriting(
        config: &Config,
        listeners: Vec<BoundListener>,
        shutdown: &Shutdown,
        health: &[CarriedPool],
    ) -> Result<Self, error::StartError> {
        let workers = match config.runtime.scheduler {
            Scheduler::Shared => {
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = shutdown.drained() => {}
                        _ = proxy::workers::keep_a_timer_due() => {}
                    }
                });
                None
            }
            Scheduler::PerThread => Some(
                Workers::start(config.runtime.worker_threads)
                    .map_err(error::StartError::Runtime)?,
            ),
        };
        let events = Arc::new(EventLog::new());
        let mut controller = Controller::new(config, events.clone());
        if !health.is_empty() {
            controller.inherit(health);
        }
        let snapshot = controller.snapshot();
        let handle = controller.handle();
        tokio::spawn(controller.run(shutdown.clone()));
        let listeners = Arc::new(ListenerSet::start(
            listeners,
            snapshot.clone(),
            shutdown.clone(),
            config.runtime.worker_threads,
            workers,
        ));
        Ok(Self {
            snapshot,
            listeners,
            events,
            controller: handle,
        })
    }

    pub fn listener(&self, name: &str) -> Option<ListenerView> {
        self.listeners
            .views()
            .into_iter()
            .find(|l| l.context.name == name)
    }
}

/// Every listening socket of an instance, bound or handed over, not yet accepting.
#[derive(Debug)]
pub struct Listening {
    pub listeners: Vec<BoundListener>,
    pub admin: Option<Arc<std::net::TcpListener>>,
    /// The upstream states a previous process handed over with its sockets (a binary
    /// upgrade); empty on a fresh start.
    pub health: Vec<CarriedPool>,
}

impl Listening {
    /// Binds every socket of `config`, the admin API's included, except that each
    /// address found in `inherited` is served from the sockets there; inherited sockets
    /// the config does not bind are closed (and logged). The first failure is returned.
    pub fn bind(config: &Config, inherited: SocketTable) -> Result<Self, error::StartError> {
        let bound = sockets::bind(config, config.runtime.worker_threads, inherited)?;
        Ok(Self {
            listeners: BoundListener::all(config, bound.listeners),
            admin: bound.admin,
            health: Vec::new(),
        })
    }
}

/// Binds every socket of `config`, in order; the first failure is returned.
pub fn bind_all(config: &Config) -> Result<Listening, error::StartError> {
    Listening::bind(config, SocketTable::default())
}

/// Everything a running instance consists of.
#[derive(Debug, Clone)]
pub struct Running {
    pub proxy: Proxy,
    pub reloader: Arc<Reloader>,
    /// Where the admin API listens, when configured.
    pub admin_addr: Option<SocketAddr>,
    /// The admin socket with its configured address. Weak, so that the socket closes
    /// when its accept loop ends at shutdown, as it would without this handle.
    admin_socket: Option<(SocketAddr, Weak<TcpListener>)>,
}

impl Running {
    /// Every listening socket of the instance, keyed by its configured address: what a
    /// binary upgrade hands over to the new process.
    pub fn sockets(&self) -> SocketTable {
        let mut table = self.proxy.listeners.sockets();
        if let Some((addr, socket)) = &self.admin_socket
            && let Some(socket) = socket.upgrade()
        {
            // A duplicate: the admin API's own stays registered with its runtime.
            match socket.as_fd().try_clone_to_owned() {
                Ok(fd) => table.insert(Kind::Admin, *addr, Arc::new(fd.into())),
                Err(e) => {
                    warn!(%addr, error = %e, "cannot duplicate the admin socket; it is not handed over")
                }
            }
        }
        table
    }
}

/// Starts the admin API (if configured), the controller and the listeners. Returns at
/// once; everything runs until `shutdown` begins. Needs a running tokio runtime.
pub fn start(
    config: Config,
    listening: Listening,
    shutdown: &Shutdown,
) -> Result<Running, error::StartError> {
    if let Some(admin) = &config.admin {
        Admin::check_token_file(admin)?;
    }
    let admin_listen = config.admin.as_ref().map(|admin| admin.listen);
    let admin_registered = listening.admin.map(registered).transpose()?;
    let proxy = Proxy::start_inheriting(&config, listening.listeners, shutdown, &listening.health)?;
    let reloader = Arc::new(Reloader::new(config, proxy.clone()));
    let mut admin_addr = None;
    let mut admin_socket = None;
    if let Some((listen, socket)) = admin_listen.zip(admin_registered) {
        admin_addr = socket.local_addr().ok();
        admin_socket = Some((listen, Arc::downgrade(&socket)));
        Arc::new(Admin::new(proxy.clone(), reloader.clone())).spawn(socket, shutdown.clone());
    }
    Ok(Running {
        proxy,
        reloader,
        admin_addr,
        admin_socket,
    })
}

/// Runs a whole instance: serves, reloads on SIGHUP, upgrades the binary on SIGUSR2,
/// and when `shutdown` begins (or a new process took over) lets connections finish for
/// `runtime.shutdown_grace` and closes the rest. With `predecessor`, this process is
/// the new one of an upgrade: it tells the old one once it serves.
pub async fn run(
    config: Config,
    listening: Listening,
    shutdown: Shutdown,
    predecessor: Option<upgrade::Inherited>,
) -> Result<(), error::StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    let grace = config.runtime.shutdown_grace;
    let mut hangup = signal(SignalKind::hangup()).map_err(error::StartError::Signals)?;
    let mut upgrade_signal =
        signal(SignalKind::user_defined2()).map_err(error::StartError::Signals)?;
    let running = start(config, listening, &shutdown)?;
    match predecessor {
        Some(predecessor) => {
            if let Err(e) = predecessor.serving() {
                // The old process gives up on us and keeps serving; two serving on the
                // same sockets is harmless, and an operator can stop either.
                warn!(error = %e, "cannot tell the previous process that this one serves");
            }
        }
        None => upgrade::notify_systemd("READY=1"),
    }
    let reloader = running.reloader.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            info!("SIGHUP received: reloading the configuration");
            // The outcome is logged and counted by the reloader.
            let _ = reloader.reload().await;
        }
    });
    loop {
        tokio::select! {
            () = shutdown.stopping() => break,
            Some(()) = upgrade_signal.recv() => {
                if upgrade(&running).await {
                    shutdown.begin();
                    break;
                }
            }
        }
    }
    running.proxy.listeners.close();
    info!(
        open = shutdown.open_connections(),
        grace = %humantime::format_duration(grace),
        "shutting down: stopped accepting, waiting for connections to finish"
    );
    let closed = shutdown.drain(grace).await;
    let listeners = running.proxy.listeners.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || listeners.stop_workers()).await {
        warn!(error = %e, "the worker threads did not stop cleanly");
    }
    info!(closed, "shutdown complete");
    Ok(())
}

/// The admin socket as the admin API accepts on it, registered with the current
/// runtime.
fn registered(socket: Arc<std::net::TcpListener>) -> Result<Arc<TcpListener>, error::StartError> {
    let socket = Arc::try_unwrap(socket).or_else(|shared| shared.try_clone());
    socket
        .and_then(TcpListener::from_std)
        .map(Arc::new)
        .map_err(|e| error::StartError::Admin(format!("cannot accept on the admin socket: {e}")))
}

/// Hands this instance over to a new process of the binary; true once the new one
/// serves (this one must then stop), false when this one keeps serving.
async fn upgrade(running: &Running) -> bool {
    info!("SIGUSR2 received: starting the new binary and handing this instance over");
    let health = match running.proxy.controller.carried().await {
        Ok(health) => health,
        Err(e) => {
            error!(error = %e, "binary upgrade failed; this process keeps serving");
            return false;
        }
    };
    match upgrade::hand_over(running.sockets(), health).await {
        Ok(pid) => {
            upgrade::notify_systemd(&format!("MAINPID={pid}"));
            info!(
                new_pid = pid,
                "binary upgrade: the new process serves; this one stops accepting"
            );
            true
        }
        Err(e) => {
            error!(error = %e, "binary upgrade failed; this process keeps serving");
            false
        }
    }
}
