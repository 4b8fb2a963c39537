//! Listening sockets outlive what reshapes the process: a reload keeps the sockets of
//! the addresses that stay and binds only the new ones, and the table of every socket
//! an instance owns lets another instance serve from the very same sockets (the seam
//! of the binary upgrade). In process, over loopback.

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use switchyard::config::Config;
use switchyard::shutdown::Shutdown;
use switchyard::sockets::{Kind, SocketTable};

use common::*;

/// The kernel's identity of each socket in `table` for (`kind`, `addr`), sorted.
fn inodes(table: &SocketTable, kind: Kind, addr: SocketAddr) -> Vec<u64> {
    let mut inodes: Vec<u64> = table
        .iter()
        .filter(|(k, a, _)| *k == kind && *a == addr)
        .map(|(_, _, socket)| {
            std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))
                .expect("the descriptor is open")
                .ino()
        })
        .collect();
    inodes.sort_unstable();
    inodes
}

/// Two workers, so two `SO_REUSEPORT` sockets per address; `listeners` forward to an
/// echo upstream.
fn config(
    listeners: &[(&str, SocketAddr)],
    admin: Option<SocketAddr>,
    upstream: SocketAddr,
) -> String {
    let mut text = String::from("[runtime]\nworker_threads = 2\n\n");
    if let Some(admin) = admin {
        text.push_str(&format!("[admin]\nlisten = \"{admin}\"\n\n"));
    }
    for (name, addr) in listeners {
        text.push_str(&format!(
            "[listeners.{name}]\nbind = \"{addr}\"\npool = \"p\"\n\n"
        ));
    }
    text.push_str(&format!(
        "[pools.p]\nupstreams = [{{ address = \"{upstream}\" }}]\n\n[pools.p.health]\nenabled = false\n"
    ));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_sockets_of_staying_addresses_and_binds_only_new_ones() {
    let upstream = Server::echo().await;
    let (a, b) = (closed_port(), closed_port());
    let proxy = start_proxy(&config(&[("a", a)], None, upstream.addr));
    let before = inodes(&proxy.proxy.listeners.sockets(), Kind::Traffic, a);
    assert_eq!(before.len(), 2, "one socket per worker");

    proxy.rewrite_config(&config(&[("a", a), ("b", b)], None, upstream.addr));
    proxy.reloader.reload().await.expect("reload adding b");
    let table = proxy.proxy.listeners.sockets();
    assert_eq!(
        inodes(&table, Kind::Traffic, a),
        before,
        "a was not bound again"
    );
    assert_eq!(inodes(&table, Kind::Traffic, b).len(), 2);
    assert_eq!(table.len(), 4);
    drop(table);
    echo_round_trip(a, b"through a").await.expect("a serves");
    echo_round_trip(b, b"through b").await.expect("b serves");

    // The listener moves to another name: same address, same sockets.
    proxy.rewrite_config(&config(&[("renamed", a)], None, upstream.addr));
    proxy
        .reloader
        .reload()
        .await
        .expect("reload renaming a, removing b");
    let table = proxy.proxy.listeners.sockets();
    assert_eq!(inodes(&table, Kind::Traffic, a), before);
    assert!(inodes(&table, Kind::Traffic, b).is_empty());
    drop(table);
    echo_round_trip(a, b"still through a")
        .await
        .expect("a serves");
    let deadline = tokio::time::Instant::now() + SOON;
    while tokio::net::TcpStream::connect(b).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "b still accepts");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_serves_from_the_first_ones_sockets_after_it_stops() {
    let upstream = Server::echo().await;
    let (front, admin) = (closed_port(), closed_port());
    let dir = TestDir::new();
    let path = dir.join("switchyard.toml");
    std::fs::write(
        &path,
        config(&[("front", front)], Some(admin), upstream.addr),
    )
    .unwrap();
    let config = Config::load(&path).expect("valid config");

    let old_shutdown = Shutdown::new();
    let old = switchyard::start(
        config.clone(),
        switchyard::bind_all(&config).expect("bind"),
        &old_shutdown,
    )
    .expect("start the old instance");
    let handed = old.sockets();
    let traffic = inodes(&handed, Kind::Traffic, front);
    let admin_inode = inodes(&handed, Kind::Admin, admin);
    assert_eq!((traffic.len(), admin_inode.len(), handed.len()), (2, 1, 3));

    // Binding the same addresses anew fails: the admin socket has no SO_REUSEPORT.
    assert!(switchyard::bind_all(&config).is_err());
    let listening = switchyard::Listening::bind(&config, handed).expect("served from the table");
    let new_shutdown = Shutdown::new();
    let new = switchyard::start(config.clone(), listening, &new_shutdown).expect("start the new");
    let taken_over = new.sockets();
    assert_eq!(inodes(&taken_over, Kind::Traffic, front), traffic);
    assert_eq!(inodes(&taken_over, Kind::Admin, admin), admin_inode);

    old_shutdown.begin();
    old.proxy.listeners.close();
    for n in 0..20u8 {
        echo_round_trip(front, &[n; 32])
            .await
            .expect("the new instance serves");
    }
    let (status, body, _) = http("GET", admin, "/livez", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(inodes(&old.sockets(), Kind::Traffic, front).is_empty());
    new_shutdown.begin();
}
