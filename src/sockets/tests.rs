//! The socket table and binding, over real loopback sockets: what is inherited is what
//! listens, every sibling of an address is carried, leftovers close, bad hand-overs and
//! taken addresses fail with the address named.

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

/// `socket` registered with the test's runtime, as an accept loop registers it: through
/// a descriptor of its own.
fn registered(socket: &TcpListener) -> tokio::net::TcpListener {
    tokio::net::TcpListener::from_std(socket.try_clone().expect("dup")).expect("register")
}

/// A client connects to `socket`'s address and `socket` itself accepts it.
async fn accepts(socket: &TcpListener) {
    let addr = socket.local_addr().expect("addr");
    let socket = registered(socket);
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
    kept.set_nonblocking(true).unwrap();
    let running = Arc::new(kept);
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

/// Why accepted connections cost no setsockopt(2): on Linux they inherit `TCP_NODELAY`
/// and keepalive (with its idle time) from the listening socket they came from.
#[tokio::test]
async fn accepted_connections_inherit_nodelay_and_keepalive_from_the_listener() {
    let bound = bind(
        &config(&["127.0.0.1:0".parse().unwrap()], "9s", None),
        1,
        SocketTable::default(),
    )
    .unwrap();
    let socket = registered(&bound.listeners[0][0].1);
    let addr = socket.local_addr().unwrap();
    let (client, accepted) = tokio::time::timeout(SOON, async {
        tokio::join!(tokio::net::TcpStream::connect(addr), socket.accept())
    })
    .await
    .expect("connected and accepted in time");
    let (_client, accepted) = (client.expect("connect"), accepted.expect("accept").0);
    let options = SockRef::from(&accepted);
    assert!(options.tcp_nodelay().unwrap(), "TCP_NODELAY not inherited");
    assert!(options.keepalive().unwrap(), "SO_KEEPALIVE not inherited");
    assert_eq!(
        options.tcp_keepalive_time().unwrap(),
        Duration::from_secs(9)
    );
}
