//! Every listening socket the process owns is opened here, the traffic listeners' and
//! the admin API's, and its options are set here.
//!
//! Sockets that already exist come in as a [`SocketTable`] keyed by kind and configured
//! address: the running ones when a reload asks for the sockets of its new config, or
//! the ones a previous process hands over in a binary upgrade. An address found in the
//! table is served by the sockets there and never bound again, so its accept queue,
//! with the clients waiting in it, carries over. One address may have several sockets:
//! the `SO_REUSEPORT` siblings that give each worker thread an accept loop of its own.
//! Port 0 is never looked up: each such bind asks the kernel for a new port.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::TcpListener;
use tracing::warn;

use crate::config::{Config, ListenerConfig};
use crate::error::StartError;

/// listen(2) backlog of the admin socket: what `std::net::TcpListener::bind` gives, which
/// the admin API used before it was bound here. Its connection cap is the real bound.
const ADMIN_BACKLOG: u32 = 128;

/// What a listening socket serves. Part of the table's key so that a socket handed over
/// for one role is never put to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// accepts. Needs a running tokio runtime.
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
        socket.set_nonblocking(true)?;
        self.insert(kind, addr, Arc::new(TcpListener::from_std(socket)?));
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
/// and the sockets bound so far are closed. Needs a running tokio runtime.
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
    TcpListener::from_std(socket.into())
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
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use super::*;

    const SOON: Duration = Duration::from_secs(5);

    /// Listener `front` on `binds`, its pool keeping connections alive after `keepalive`.
    fn config(binds: &[SocketAddr], keepalive: &str, admin: Option<SocketAddr>) -> Config {
        let binds: Vec<String> = binds.iter().map(|a| format!("\"{a}\"")).collect();
        let mut text = format!(
            "[listeners.front]\nbind = [{}]\npool = \"p\"\n\n[pools.p]\ntcp_keepalive = \"{keepalive}\"\nupstreams = [{{ address = \"127.0.0.1:9\" }}]\n",
            binds.join(", ")
        );
        if let Some(admin) = admin {
            text.push_str(&format!("\n[admin]\nlisten = \"{admin}\"\n"));
        }
        Config::parse(&text, Path::new("t.toml")).expect("valid test config")
    }

    /// A plain listening socket, as a previous process would hand it over.
    fn listening() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind")
    }

    /// `n` `SO_REUSEPORT` sockets sharing one loopback port.
    fn siblings(n: usize) -> (SocketAddr, Vec<std::net::TcpListener>) {
        let mut addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut sockets = Vec::new();
        for _ in 0..n {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            socket.set_reuse_port(true).expect("SO_REUSEPORT");
            socket.bind(&addr.into()).expect("bind");
            socket.listen(16).expect("listen");
            let socket = std::net::TcpListener::from(socket);
            addr = socket.local_addr().expect("addr");
            sockets.push(socket);
        }
        (addr, sockets)
    }

    /// The socket's identity in the kernel, whichever descriptor refers to it.
    fn inode(socket: &impl AsRawFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))
            .expect("the descriptor is open")
            .ino()
    }

    fn inodes<'a>(sockets: impl IntoIterator<Item = &'a Arc<TcpListener>>) -> Vec<u64> {
        let mut inodes: Vec<u64> = sockets.into_iter().map(|s| inode(&**s)).collect();
        inodes.sort_unstable();
        inodes
    }

    fn sockets_of(bound: &Bound) -> impl Iterator<Item = &Arc<TcpListener>> {
        bound.listeners.iter().flatten().map(|(_, socket)| socket)
    }

    /// A client connects to `socket`'s address and `socket` itself accepts it.
    async fn accepts(socket: &TcpListener) {
        let addr = socket.local_addr().expect("addr");
        let (client, accepted) = tokio::time::timeout(SOON, async {
            tokio::join!(tokio::net::TcpStream::connect(addr), socket.accept())
        })
        .await
        .expect("connected and accepted in time");
        let (client, accepted) = (client.expect("connect"), accepted.expect("accept").0);
        assert_eq!(accepted.peer_addr().ok(), client.local_addr().ok());
    }

    #[tokio::test]
    async fn an_inherited_socket_is_the_one_that_listens_and_nothing_else_is_bound() {
        let handed = listening();
        let addr = handed.local_addr().unwrap();
        let (fd, ino) = (handed.as_raw_fd(), inode(&handed));
        let mut table = SocketTable::default();
        table.adopt(Kind::Traffic, addr, handed).unwrap();

        let bound = bind(&config(&[addr], "7s", None), 4, table).unwrap();

        assert!(bound.leftovers.is_empty());
        let sockets = &bound.listeners[0];
        assert_eq!(sockets.len(), 1, "no sibling bound beside it: {sockets:?}");
        let (configured, socket) = &sockets[0];
        assert_eq!(*configured, addr);
        assert_eq!((socket.as_raw_fd(), inode(&**socket)), (fd, ino));
        // The options a listener's sockets get are set on inherited ones as well.
        let options = SockRef::from(&**socket);
        assert!(options.tcp_nodelay().unwrap());
        assert!(options.keepalive().unwrap());
        assert_eq!(
            options.tcp_keepalive_time().unwrap(),
            Duration::from_secs(7)
        );
        accepts(socket).await;
    }

    #[tokio::test]
    async fn every_reuseport_sibling_of_an_address_is_inherited_and_handed_on() {
        let (addr, handed) = siblings(3);
        let before = {
            let mut inodes: Vec<u64> = handed.iter().map(inode).collect();
            inodes.sort_unstable();
            inodes
        };
        let mut table = SocketTable::default();
        for socket in handed {
            table.adopt(Kind::Traffic, addr, socket).unwrap();
        }
        assert_eq!(table.len(), 3);

        // Fewer workers now than the previous process had: no sibling is dropped.
        let bound = bind(&config(&[addr], "60s", None), 2, table).unwrap();
        assert_eq!(inodes(sockets_of(&bound)), before);

        // The table a process builds from its sockets carries them all on again.
        let mut again = SocketTable::default();
        for (configured, socket) in bound.listeners.iter().flatten() {
            again.insert(Kind::Traffic, *configured, socket.clone());
        }
        assert_eq!(again.iter().count(), 3);
        assert!(
            again
                .iter()
                .all(|(kind, a, _)| kind == Kind::Traffic && a == addr)
        );
        let rebound = bind(&config(&[addr], "60s", None), 8, again).unwrap();
        assert_eq!(inodes(sockets_of(&rebound)), before);
    }

    #[tokio::test]
    async fn new_sockets_of_an_address_are_reuseport_siblings_and_port_0_gets_one() {
        let (addr, held) = siblings(1);
        drop(held);
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let bound = bind(
            &config(&[addr, any], "60s", None),
            3,
            SocketTable::default(),
        )
        .unwrap();
        let sockets = &bound.listeners[0];
        let on_addr: Vec<_> = sockets.iter().filter(|(a, _)| *a == addr).collect();
        assert_eq!(on_addr.len(), 3);
        for (_, socket) in &on_addr {
            assert!(SockRef::from(&**socket).reuse_port().unwrap());
            assert_eq!(socket.local_addr().unwrap(), addr);
        }
        assert_eq!(sockets.iter().filter(|(a, _)| *a == any).count(), 1);
    }

    #[tokio::test]
    async fn inherited_sockets_the_config_does_not_bind_are_reported_and_closed() {
        let (kept, unused, unused_admin) = (listening(), listening(), listening());
        let (kept_addr, unused_addr, unused_admin_addr) = (
            kept.local_addr().unwrap(),
            unused.local_addr().unwrap(),
            unused_admin.local_addr().unwrap(),
        );
        let mut table = SocketTable::default();
        table.adopt(Kind::Traffic, kept_addr, kept).unwrap();
        table.adopt(Kind::Traffic, unused_addr, unused).unwrap();
        table
            .adopt(Kind::Admin, unused_admin_addr, unused_admin)
            .unwrap();

        let bound = bind(&config(&[kept_addr], "60s", None), 1, table).unwrap();

        assert_eq!(
            bound.leftovers,
            [
                (Kind::Traffic, unused_addr),
                (Kind::Admin, unused_admin_addr)
            ]
        );
        assert!(bound.admin.is_none());
        for addr in [unused_addr, unused_admin_addr] {
            let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused, "{addr}");
        }
        accepts(&bound.listeners[0][0].1).await;
    }

    #[tokio::test]
    async fn the_admin_socket_is_inherited_under_its_own_kind_only() {
        let handed = listening();
        let addr = handed.local_addr().unwrap();
        let ino = inode(&handed);
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut table = SocketTable::default();
        table.adopt(Kind::Admin, addr, handed).unwrap();
        let bound = bind(&config(&[any], "60s", Some(addr)), 1, table).unwrap();
        let admin = bound.admin.expect("the admin socket");
        assert_eq!(inode(&*admin), ino);
        accepts(&admin).await;

        // A traffic socket handed over for the admin address is not the admin socket:
        // binding one beside it fails as any address in use does.
        let handed = listening();
        let addr = handed.local_addr().unwrap();
        let mut table = SocketTable::default();
        table.adopt(Kind::Traffic, addr, handed).unwrap();
        let error = bind(&config(&[any], "60s", Some(addr)), 1, table).unwrap_err();
        assert!(
            matches!(&error, StartError::Bind { listener, addr: failed, source }
                if listener == "admin" && *failed == addr && source.kind() == io::ErrorKind::AddrInUse),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_address_bound_elsewhere_fails_naming_the_listener_and_the_address() {
        let taken = listening();
        let addr = taken.local_addr().unwrap();
        let error = bind(&config(&[addr], "60s", None), 2, SocketTable::default()).unwrap_err();
        let StartError::Bind {
            listener,
            addr: failed,
            source,
        } = &error
        else {
            panic!("not a bind error: {error}");
        };
        assert_eq!((listener.as_str(), *failed), ("front", addr));
        assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
        assert!(
            error
                .to_string()
                .starts_with(&format!("listener \"front\" cannot bind {addr}: ")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_failed_bind_closes_what_it_bound_and_keeps_the_table_sockets_untouched() {
        let (free, held) = siblings(1);
        drop(held);
        let taken = listening();
        let taken_addr = taken.local_addr().unwrap();
        let kept = listening();
        let kept_addr = kept.local_addr().unwrap();
        let running = Arc::new(
            TcpListener::from_std({
                kept.set_nonblocking(true).unwrap();
                kept
            })
            .unwrap(),
        );
        let mut table = SocketTable::default();
        table.insert(Kind::Traffic, kept_addr, running.clone());
        let error = bind_listeners(
            &config(&[kept_addr, free, taken_addr], "60s", None),
            2,
            &mut table,
        )
        .unwrap_err();
        assert!(matches!(error, StartError::Bind { addr, .. } if addr == taken_addr));
        // The newly bound address is free again; the running socket was not retuned.
        drop(std::net::TcpListener::bind(free).expect("the failed bind released it"));
        assert!(!SockRef::from(&*running).tcp_nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_socket_handed_over_for_another_address_is_refused() {
        let handed = listening();
        let local = handed.local_addr().unwrap();
        let claimed = SocketAddr::new(local.ip(), local.port().wrapping_add(1).max(1));
        let mut table = SocketTable::default();
        let error = table.adopt(Kind::Traffic, claimed, handed).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            error.to_string(),
            format!("the socket handed over for {claimed} is bound to {local}")
        );
        assert!(table.is_empty());
    }

    #[tokio::test]
    async fn a_handed_over_socket_that_does_not_listen_is_refused() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let bound_only = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        bound_only.bind(&addr.into()).unwrap();
        let datagram = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        datagram.bind(&addr.into()).unwrap();
        let mut table = SocketTable::default();
        for socket in [bound_only, datagram] {
            let local = socket.local_addr().unwrap().as_socket().unwrap();
            let error = table
                .adopt(Kind::Traffic, local, socket.into())
                .unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(
                error.to_string(),
                format!("the socket handed over for {local} is not a listening TCP socket")
            );
        }
        assert!(table.is_empty());
    }

    #[tokio::test]
    async fn port_0_is_never_taken_from_the_table() {
        let handed = listening();
        let ino = inode(&handed);
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut table = SocketTable::default();
        table.adopt(Kind::Traffic, any, handed).unwrap();
        let bound = bind(&config(&[any], "60s", None), 1, table).unwrap();
        assert_ne!(inodes(sockets_of(&bound)), [ino]);
        assert_eq!(bound.leftovers, [(Kind::Traffic, any)]);
    }
}
