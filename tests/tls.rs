//! TLS termination and origination (SPEC §8) with certificates made for each test by
//! rcgen and real rustls peers.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use common::*;
use switchyard::drill::upstream::greet_and_echo;
use switchyard::metrics::RejectReason;

/// A CA and leaf certificates it signs, written as PEM files into `dir`.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
        Self {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    fn ca_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    /// Writes `<file>.pem` and `<file>.key` for `names`; returns the certificate's DER.
    fn leaf(&self, file: &str, names: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(self.dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    fn client_config(&self, ca: &str, client_cert: Option<&str>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.ca_path(ca)).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client_cert {
            Some(file) => {
                let chain = CertificateDer::pem_file_iter(self.dir.join(format!("{file}.pem")))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                let key =
                    PrivateKeyDer::from_pem_file(self.dir.join(format!("{file}.key"))).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }

    fn server_config(&self, file: &str) -> Arc<rustls::ServerConfig> {
        let chain = CertificateDer::pem_file_iter(self.dir.join(format!("{file}.pem")))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(self.dir.join(format!("{file}.key"))).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap(),
        )
    }
}

/// A TLS echo server that answers only clients whose SNI is `expected_sni`, after
/// greeting them with `hello <name>`.
async fn tls_echo(
    config: Arc<rustls::ServerConfig>,
    name: &'static str,
    expected_sni: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    hangable_tls_echo(config, name, expected_sni, Arc::default()).await
}

/// Like [`tls_echo`], but once `hung` is set, sessions it accepts from then on complete
/// their handshake and are never answered, like a stuck process behind a TLS library.
async fn hangable_tls_echo(
    config: Arc<rustls::ServerConfig>,
    name: &'static str,
    expected_sni: &'static str,
    hung: Arc<AtomicBool>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let hung = hung.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                if hung.load(SeqCst) {
                    return std::future::pending().await;
                }
                if tls.get_ref().1.server_name() != Some(expected_sni) {
                    return;
                }
                greet_and_echo(tls, name).await;
            });
        }
    });
    (addr, task)
}

async fn tls_client(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), stream)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminates_with_the_certificate_chosen_by_sni() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir, "main");
    let a = pki.leaf("a", &["a.example.com"]);
    let b = pki.leaf("b", &["b.example.com"]);
    let upstream = Server::echo().await;
    let config = one_pool_config(&[(upstream.addr, 0)], "").replace(
        "pool = \"p\"\n\n[pools.p]",
        &format!(
            "pool = \"p\"\n\n[listeners.front.tls]\ncerts = [\n  {{ cert = \"{d}/a.pem\", key = \"{d}/a.key\", names = [\"a.example.com\"] }},\n  {{ cert = \"{d}/b.pem\", key = \"{d}/b.key\", names = [\"b.example.com\"] }},\n]\n\n[pools.p]",
            d = dir.display()
        ),
    );
    let proxy = start_proxy(&config);
    for (name, expected) in [("a.example.com", &a), ("b.example.com", &b)] {
        let mut tls = tls_client(proxy.addr("front"), pki.client_config("main", None), name)
            .await
            .expect("handshake");
        let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(
            &presented, expected,
            "{name}: the certificate for that name"
        );
        let data = random_bytes(200_000, 3);
        tls.write_all(&data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        tls.read_exact(&mut back).await.unwrap();
        assert!(back == data, "{name}: bytes through the terminated session");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_listener_refuses_a_client_without_a_certificate() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir, "main");
    pki.leaf("server", &["db.example.com"]);
    pki.leaf("client", &["client.example.com"]);
    let upstream = Server::echo().await;
    let config = one_pool_config(&[(upstream.addr, 0)], "").replace(
        "pool = \"p\"\n\n[pools.p]",
        &format!(
            "pool = \"p\"\n\n[listeners.front.tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\nclient_ca = \"{ca}\"\n\n[pools.p]",
            d = dir.display(),
            ca = pki.ca_path("main").display()
        ),
    );
    let proxy = start_proxy(&config);
    let front = proxy.addr("front");

    let refused = async {
        let mut tls = tls_client(front, pki.client_config("main", None), "db.example.com").await?;
        // TLS 1.3: the server's refusal arrives with the first read.
        tls.write_all(b"hi").await?;
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(())
    }
    .await;
    assert!(
        refused.is_err(),
        "a client without a certificate got through"
    );
    let stats = proxy.proxy.listener("front").unwrap().context.stats.clone();
    wait_until(SOON, "refusal counted", || {
        stats.rejected(RejectReason::TlsHandshake) == 1
    })
    .await;

    let mut tls = tls_client(
        front,
        pki.client_config("main", Some("client")),
        "db.example.com",
    )
    .await
    .expect("mTLS handshake");
    tls.write_all(b"with a certificate").await.unwrap();
    let mut back = [0u8; 18];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"with a certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn originates_tls_with_the_configured_server_name_byte_exact() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir, "main");
    pki.leaf("backend", &["backend.internal"]);
    let (upstream, _task) = tls_echo(
        pki.server_config("backend"),
        "tls-backend",
        "backend.internal",
    )
    .await;
    let config = one_pool_config(&[(upstream, 0)], "").replace(
        "[pools.p.health]",
        &format!(
            "[pools.p.tls]\nserver_name = \"backend.internal\"\nca = \"{}\"\n\n[pools.p.health]",
            pki.ca_path("main").display()
        ),
    );
    let proxy = start_proxy(&config);
    let mut stream = TcpStream::connect(proxy.addr("front")).await.unwrap();
    assert_eq!(read_line(&mut stream).await.unwrap(), "hello tls-backend");
    let data = random_bytes(1 << 20, 9);
    let (mut read, mut write) = stream.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move { write.write_all(&sent).await });
    let mut back = vec![0u8; data.len()];
    read.read_exact(&mut back).await.unwrap();
    writer.await.unwrap().unwrap();
    assert!(back == data, "bytes through the originated session differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_an_untrusted_certificate_fails_its_checks_and_the_pool_fails_over() {
    let dir = TestDir::new();
    let trusted = Pki::new(&dir, "trusted");
    let rogue = Pki::new(&dir, "rogue");
    trusted.leaf("good", &["backend.internal"]);
    rogue.leaf("bad", &["backend.internal"]);
    let (primary, _p) = tls_echo(rogue.server_config("bad"), "primary", "backend.internal").await;
    let (backup, _b) = tls_echo(trusted.server_config("good"), "backup", "backend.internal").await;
    let health = format!(
        "[pools.p.tls]\nserver_name = \"backend.internal\"\nca = \"{}\"\n\n[pools.p.health]\ninterval = \"200ms\"\ntimeout = \"500ms\"\nexpect = \"hello\"\n",
        trusted.ca_path("trusted").display()
    );
    let proxy = start_proxy(&pool_config(
        &[("primary", primary, 0), ("backup", backup, 1)],
        "",
        &health,
    ));
    let down = wait_event(&proxy, "primary", "down", SOON).await;
    assert_eq!(down.reason, "TLS handshake failed");
    wait_until(SOON, "failover", || active_priority(&proxy, "p") == Some(1)).await;
    for _ in 0..5 {
        assert_eq!(greeted_by(proxy.addr("front")).await.unwrap(), "backup");
    }
}

#[test]
fn a_bad_certificate_file_fails_check_with_its_position() {
    let dir = TestDir::new();
    std::fs::write(dir.join("broken.pem"), "not a certificate").unwrap();
    std::fs::write(dir.join("broken.key"), "not a key").unwrap();
    let text = format!(
        "[listeners.front]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[listeners.front.tls]\ncert = \"{d}/broken.pem\"\nkey = \"{d}/broken.key\"\n\n[pools.p]\nupstreams = [{{ address = \"127.0.0.1:1\" }}]\n",
        d = dir.display()
    );
    let err = switchyard::config::Config::parse(&text, Path::new("t.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("t.toml:"), "{err}");
    assert!(err.contains("listeners.front.tls"), "{err}");
    assert!(err.contains("broken"), "names the file: {err}");
    let missing = text.replace("broken.pem", "missing.pem");
    let err = switchyard::config::Config::parse(&missing, Path::new("t.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read") && err.contains("missing.pem"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_termination_mode_routes_choose_the_pool_after_the_handshake() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir, "main");
    pki.leaf("wild", &["a.example.com", "b.example.com"]);
    let pa = Backend::start("pa").await;
    let pb = Backend::start("pb").await;
    let text = format!(
        "[listeners.front]\nbind = \"127.0.0.1:0\"\npool = \"pb\"\n\n[listeners.front.tls]\ncert = \"{d}/wild.pem\"\nkey = \"{d}/wild.key\"\nalpn = [\"h2\", \"http/1.1\"]\n\n[listeners.front.routes]\n\"a.example.com\" = \"pa\"\n\n\
         [pools.pa]\nupstreams = [{{ address = \"{a}\" }}]\n[pools.pa.health]\nenabled = false\n\n[pools.pb]\nupstreams = [{{ address = \"{b}\" }}]\n[pools.pb.health]\nenabled = false\n",
        d = dir.display(),
        a = pa.addr,
        b = pb.addr
    );
    let proxy = start_proxy(&text);
    // `check` says what the listener does: terminate, then route.
    let summary = proxy.config.summary();
    assert!(
        summary.contains("TLS terminated: certificates"),
        "{summary}"
    );
    assert!(summary.contains("ALPN h2, http/1.1"), "{summary}");
    assert!(
        summary.contains("SNI a.example.com -> pool pa (after termination)"),
        "{summary}"
    );
    for (sni, expected) in [("a.example.com", "hello pa"), ("b.example.com", "hello pb")] {
        let mut config = (*pki.client_config("main", None)).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let mut tls = tls_client(proxy.addr("front"), Arc::new(config), sni)
            .await
            .expect("handshake");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "ALPN negotiated"
        );
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while tls.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        assert_eq!(String::from_utf8_lossy(&line), expected, "{sni}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_handshake_timeout_and_a_bad_certificate_on_reload() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir, "main");
    pki.leaf("server", &["db.example.com"]);
    let upstream = Server::echo().await;
    let tls_table = format!(
        "pool = \"p\"\nhandshake_timeout = \"300ms\"\n\n[listeners.front.tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\nmin_version = \"1.3\"\n\n[pools.p]",
        d = dir.display()
    );
    let config =
        one_pool_config(&[(upstream.addr, 0)], "").replace("pool = \"p\"\n\n[pools.p]", &tls_table);
    let proxy = start_proxy(&config);
    let front = proxy.addr("front");
    let stats = proxy.proxy.listener("front").unwrap().context.stats.clone();

    // A client that only speaks TLS 1.2 is refused by min_version = "1.3".
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.ca_path("main")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls12_only = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert!(
        tls_client(front, Arc::new(tls12_only), "db.example.com")
            .await
            .is_err()
    );
    wait_until(SOON, "refusal counted", || {
        stats.rejected(RejectReason::TlsHandshake) == 1
    })
    .await;
    assert!(
        tls_client(front, pki.client_config("main", None), "db.example.com")
            .await
            .is_ok(),
        "TLS 1.3 works"
    );

    // A client that never starts its handshake is closed after handshake_timeout.
    let mut silent = TcpStream::connect(front).await.unwrap();
    assert!(is_closed(&mut silent, SOON).await);
    wait_until(SOON, "timeout counted as a timeout", || {
        stats.rejected(RejectReason::HandshakeTimeout) == 1
            && stats.rejected(RejectReason::TlsHandshake) == 1
    })
    .await;

    // A reload whose certificate is broken is rejected; the old one keeps serving.
    std::fs::write(dir.join("server.pem"), "garbage").unwrap();
    let rejected = proxy.reloader.reload().await;
    assert!(rejected.is_err_and(|e| e.to_string().contains("server.pem")));
    assert!(
        tls_client(front, pki.client_config("main", None), "db.example.com")
            .await
            .is_ok(),
        "old certificate still served"
    );
}

/// Reads one `\n`-terminated line through a TLS session, within [`SOON`].
async fn read_tls_line(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let reading = async {
        loop {
            if tls.read(&mut byte).await? == 0 || byte[0] == b'\n' {
                return Ok::<_, std::io::Error>(());
            }
            line.push(byte[0]);
        }
    };
    tokio::time::timeout(SOON, reading)
        .await
        .map_err(|_| std::io::Error::other("no line"))??;
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_clients_waiting_on_a_hung_primary_move_to_the_backup_when_it_goes_down() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir, "main");
    pki.leaf("front", &["db.example.com"]);
    let primary = Backend::start("primary").await;
    let backup = Backend::start("backup").await;
    let config = pool_config(
        &[("primary", primary.addr, 0), ("backup", backup.addr, 1)],
        "",
        FAST_HEALTH,
    )
    .replace(
        "pool = \"p\"\n\n[pools.p]",
        &format!(
            "pool = \"p\"\n\n[listeners.front.tls]\ncert = \"{d}/front.pem\"\nkey = \"{d}/front.key\"\n\n[pools.p]",
            d = dir.display()
        ),
    );
    assert!(config.contains("[listeners.front.tls]"), "{config}");
    let proxy = start_proxy(&config);
    wait_first_checks(&proxy).await;
    primary.hang();
    // Handshaken with the proxy, connected to the hung primary, waiting for its
    // greeting: nothing has flowed to or from the upstream yet.
    let client_config = pki.client_config("main", None);
    let mut clients = JoinSet::new();
    for _ in 0..20 {
        let (addr, client_config) = (proxy.addr("front"), client_config.clone());
        clients.spawn(async move {
            let mut tls = tls_client(addr, client_config, "db.example.com").await?;
            read_tls_line(&mut tls).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    while let Some(served) = clients.join_next().await {
        assert_eq!(
            served.unwrap().expect("no client saw an error"),
            "hello backup"
        );
    }
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    assert!(
        route.upstreams[0].stats.connections_total.load(Relaxed) > 0,
        "some clients did start on the hung primary"
    );
}

/// A TLS pool whose `primary` completed its first checks and then hung: it still
/// completes TLS handshakes and never answers. `backup` (tier 1) greets.
struct HungTlsPrimary {
    proxy: TestProxy,
    _upstreams: [tokio::task::JoinHandle<()>; 2],
}

impl HungTlsPrimary {
    /// `pool_extra` lines in `[pools.p]`, `health` as the whole health table.
    async fn start(pool_extra: &str, health: &str) -> Self {
        let dir = TestDir::new();
        let pki = Pki::new(&dir, "main");
        pki.leaf("backend", &["backend.internal"]);
        let hung = Arc::new(AtomicBool::new(false));
        let (primary, p) = hangable_tls_echo(
            pki.server_config("backend"),
            "primary",
            "backend.internal",
            hung.clone(),
        )
        .await;
        let (backup, b) =
            tls_echo(pki.server_config("backend"), "backup", "backend.internal").await;
        let tls_and_health = format!(
            "[pools.p.tls]\nserver_name = \"backend.internal\"\nca = \"{}\"\n\n{health}",
            pki.ca_path("main").display(),
        );
        let proxy = start_proxy_in(
            dir,
            "switchyard.toml",
            &pool_config(
                &[("primary", primary, 0), ("backup", backup, 1)],
                pool_extra,
                &tls_and_health,
            ),
        );
        wait_first_checks(&proxy).await;
        hung.store(true, SeqCst);
        Self {
            proxy,
            _upstreams: [p, b],
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_tls_pool_waiting_on_a_hung_primary_move_to_the_backup_when_it_goes_down() {
    let pair = HungTlsPrimary::start(
        "",
        &FAST_HEALTH.replace("timeout = \"100ms\"", "timeout = \"300ms\""),
    )
    .await;
    let proxy = &pair.proxy;
    // Connected and handshaken to the hung primary, waiting for its greeting.
    let mut clients = JoinSet::new();
    for _ in 0..20 {
        clients.spawn(greeted_by(proxy.addr("front")));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    while let Some(served) = clients.join_next().await {
        assert_eq!(served.unwrap().expect("no client saw an error"), "backup");
    }
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    assert!(
        route.upstreams[0].stats.connections_total.load(Relaxed) > 0,
        "some clients did start on the hung primary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_through_tls_origination_moves_unanswered_clients_of_a_hung_primary() {
    // Checks that cannot see the hang in time: only the opening exchange reacts.
    let pair = HungTlsPrimary::start(
        "first_byte_timeout = \"150ms\"\nreplay_unanswered = \"16KiB\"\n",
        "[pools.p.health]\ninterval = \"30s\"\ntimeout = \"2s\"\n",
    )
    .await;
    let proxy = &pair.proxy;
    let mut clients = JoinSet::new();
    for _ in 0..10 {
        clients.spawn(switchyard::drill::ask_greeting(
            proxy.addr("front"),
            SOON,
            true,
        ));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    while let Some(served) = clients.join_next().await {
        assert_eq!(served.unwrap().as_deref(), Ok("backup"));
    }
    let route = proxy.proxy.snapshot.load().pool("p").unwrap().clone();
    assert!(
        route.upstreams[0]
            .stats
            .connect_failures(switchyard::metrics::ConnectFailure::FirstByteTimeout)
            > 0,
        "clients were sent to the hung primary first and left it unanswered"
    );
}
