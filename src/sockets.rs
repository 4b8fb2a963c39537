//! Every listening socket the process owns is opened here, the traffic listeners' and
//! the admin API's, and its options are set here.
//!
//! Sockets that already exist come in as a [`SocketTable`] keyed by kind and configured
//! address: the running ones when a reload asks for the sockets of its new config, or
//! sockets from outside the process ([`SocketTable::adopt`]), which is how a binary
//! upgrade will hand them to the new process. An address found in the
//! table is served by the sockets there and never bound again, so its accept queue,
//! with the clients waiting in it, carries over. One address may have several sockets:
//! the `SO_REUSEPORT` siblings that give each worker thread an accept loop of its own.
//! Port 0 is never looked up: each such bind asks the kernel for a new port.
//!
//! The sockets here are plain std sockets, registered with no runtime: whoever accepts
//! on one registers a duplicate of its descriptor with its own runtime, so that with
//! `runtime.scheduler = "per_thread"` a socket wakes only the thread that serves it,
//! and the descriptors stay here, ready to be handed over.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use std::net::TcpListener;
use tracing::warn;

use crate::config::{Config, ListenerConfig};
use crate::error::StartError;

/// listen(2) backlog of the admin socket: what `std::net::TcpListener::bind` gives, which
/// the admin API used before it was bound here. Its connection cap is the real bound.
const ADMIN_BACKLOG: u32 = 128;

/// What a listening socket serves. Part of the table's key so that a socket handed over
/// for one role is never put to the other.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Kind {
    Traffic,
    Admin,
}

/// Listening sockets by kind and configured address, each address with all its
/// `SO_REUSEPORT` siblings.
#[derive(Debug, Default)]
pub struct SocketTable {
    by_address: HashMap<(Kind, SocketAddr), Vec<Arc<TcpListener>>>,
}

/// A config's sockets, bound or taken from the table, listening but not yet accepting.
#[derive(Debug)]
pub struct Bound {
    /// One entry per listener of the config, in its order.
    pub listeners: Vec<ListenerSockets>,
    pub admin: Option<Arc<TcpListener>>,
    /// Table entries the config does not want. Their sockets were dropped, which closes
    /// them unless the caller still holds them.
    pub leftovers: Vec<(Kind, SocketAddr)>,
}

/// One traffic listener's sockets, each with the address it was configured as (port 0
/// stays 0 here); the siblings of an address follow one another.
pub type ListenerSockets = Vec<(SocketAddr, Arc<TcpListener>)>;

/// One address as the config wants it listened on.
struct Wanted<'a> {
    kind: Kind,
    /// Who wants the address, for errors: a listener's name, or "admin".
    owner: &'a str,
    addr: SocketAddr,
    backlog: u32,
    /// How many `SO_REUSEPORT` siblings to open when the address is not in the table.
    siblings: usize,
}

// === impl SocketTable ===

impl SocketTable {
    /// Adds one more socket for `addr`.
    pub fn insert(&mut self, kind: Kind, addr: SocketAddr, socket: Arc<TcpListener>) {
        self.by_address
            .entry((kind, addr))
            .or_default()
            .push(socket);
    }

    /// Adds a socket that comes from outside the runtime (from a previous process, say),
    /// after checking that it is a listening TCP socket bound where the table will say
    /// it is: a mix-up in the handover must fail here, not as an accept loop that never
    /// accepts.
    pub fn adopt(
        &mut self,
        kind: Kind,
        addr: SocketAddr,
        socket: std::net::TcpListener,
    ) -> io::Result<()> {
        let options = SockRef::from(&socket);
        if options.r#type()? != Type::STREAM || !options.is_listener()? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the socket handed over for {addr} is not a listening TCP socket"),
            ));
        }
        let local = socket.local_addr()?;
        let matches = local.ip() == addr.ip() && (addr.port() == 0 || local.port() == addr.port());
        if !matches {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the socket handed over for {addr} is bound to {local}"),
            ));
        }
        // Shared by every duplicate an accept loop registers: tokio needs it.
        socket.set_nonblocking(true)?;
        self.insert(kind, addr, Arc::new(socket));
        Ok(())
    }

    /// Every socket with its key, the siblings of an address one after another, in a
    /// stable order (by kind, then address).
    pub fn iter(&self) -> impl Iterator<Item = (Kind, SocketAddr, &Arc<TcpListener>)> {
        let mut keys: Vec<_> = self.by_address.keys().copied().collect();
        keys.sort();
        keys.into_iter().flat_map(move |key| {
            self.by_address[&key]
                .iter()
                .map(move |socket| (key.0, key.1, socket))
        })
    }

    /// How many sockets, siblings counted one by one.
    pub fn len(&self) -> usize {
        self.by_address.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }

    fn take(&mut self, kind: Kind, addr: SocketAddr) -> Option<Vec<Arc<TcpListener>>> {
        if addr.port() == 0 {
            return None;
        }
        self.by_address.remove(&(kind, addr))
    }

    fn into_keys(self) -> Vec<(Kind, SocketAddr)> {
        let mut keys: Vec<_> = self.by_address.into_keys().collect();
        keys.sort();
        keys
    }
}

/// Every socket of `config`: its listeners' (`sockets_per_address` siblings for each
/// address not in `existing`) and the admin API's. Entries of `existing` the config does
/// not want are closed and named in [`Bound::leftovers`]. The first failure is returned
/// and the sockets bound so far are closed.
pub fn bind(
    config: &Config,
    sockets_per_address: usize,
    mut existing: SocketTable,
) -> Result<Bound, StartError> {
    let listeners = bind_listeners(config, sockets_per_address, &mut existing)?;
    let admin = match &config.admin {
        Some(admin) => {
            let wanted = Wanted {
                kind: Kind::Admin,
                owner: "admin",
                addr: admin.listen,
                backlog: ADMIN_BACKLOG,
                siblings: 1,
            };
            listen(&wanted, &mut existing)?.into_iter().next()
        }
        None => None,
    };
    let leftovers = existing.into_keys();
    for (kind, addr) in &leftovers {
        warn!(?kind, %addr, "a socket handed over for an address the config does not bind; closed");
    }
    Ok(Bound {
        listeners,
        admin,
        leftovers,
    })
}

/// The traffic sockets of `config`, taking each address found in `existing` out of it
/// (the admin socket is left alone: a reload does not move it). Only once every address
/// has its sockets are their options set, so that a failed bind leaves the sockets that
/// were in the table as they were.
pub fn bind_listeners(
    config: &Config,
    sockets_per_address: usize,
    existing: &mut SocketTable,
) -> Result<Vec<ListenerSockets>, StartError> {
    let mut all = Vec::with_capacity(config.listeners.len());
    for listener in &config.listeners {
        let mut sockets = Vec::new();
        for &addr in &listener.binds {
            let wanted = Wanted {
                kind: Kind::Traffic,
                owner: &listener.name,
                addr,
                backlog: listener.backlog,
                siblings: sockets_per_address,
            };
            sockets.extend(listen(&wanted, existing)?.into_iter().map(|s| (addr, s)));
        }
        all.push(sockets);
    }
    for (listener, sockets) in config.listeners.iter().zip(&all) {
        let keepalive = pool_keepalive(config, listener);
        for (_, socket) in sockets {
            if let Err(e) = tune_traffic(socket, listener.backlog, keepalive) {
                warn!(listener = %listener.name, error = %e, "cannot set the listening socket's options");
            }
        }
    }
    Ok(all)
}

/// The sockets of one address: the table's if it has them, else newly bound. Port 0
/// gets one socket, since each `SO_REUSEPORT` sibling would be given a port of its own.
fn listen(
    wanted: &Wanted<'_>,
    existing: &mut SocketTable,
) -> Result<Vec<Arc<TcpListener>>, StartError> {
    if let Some(sockets) = existing.take(wanted.kind, wanted.addr) {
        return Ok(sockets);
    }
    let count = if wanted.addr.port() == 0 {
        1
    } else {
        wanted.siblings.max(1)
    };
    (0..count)
        .map(|_| {
            open(wanted, count > 1)
                .map(Arc::new)
                .map_err(|source| StartError::Bind {
                    listener: wanted.owner.to_string(),
                    addr: wanted.addr,
                    source,
                })
        })
        .collect()
}

/// The options that must be set before bind(2).
fn open(wanted: &Wanted<'_>, reuse_port: bool) -> io::Result<TcpListener> {
    let addr = wanted.addr;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Restarting must not wait for TIME_WAIT sockets of the previous process.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() && wanted.kind == Kind::Traffic {
        // `[::]` and `0.0.0.0` are separate binds in a listener's list; without v6-only
        // the second one would fail with "address in use". The admin API has one
        // address and keeps the system's dual-stack default.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog_arg(wanted.backlog))?;
    Ok(socket.into())
}

/// What a traffic socket gets whether new, kept or handed over, since a reload may
/// change it: the backlog (listen(2) may be called again to change it), and the options
/// accepted connections inherit on Linux, `TCP_NODELAY` and keepalive, so that they
/// cost no syscall per connection.
fn tune_traffic(
    listener: &TcpListener,
    backlog: u32,
    keepalive: Option<Duration>,
) -> io::Result<()> {
    let socket = SockRef::from(listener);
    socket.listen(backlog_arg(backlog))?;
    socket.set_tcp_nodelay(true)?;
    match keepalive {
        Some(idle) => socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(idle)),
        None => socket.set_keepalive(false),
    }
}

/// The tcp_keepalive of the pool a listener forwards to.
fn pool_keepalive(config: &Config, listener: &ListenerConfig) -> Option<Duration> {
    let pool = listener
        .pool
        .as_deref()
        .or_else(|| listener.routes.first().map(|(_, pool)| pool.as_str()))?;
    config.pool(pool).and_then(|p| p.tcp_keepalive)
}

fn backlog_arg(backlog: u32) -> i32 {
    i32::try_from(backlog).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests;
