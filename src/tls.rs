//! TLS material: certificates and keys loaded and checked when the configuration is
//! loaded, turned into rustls configurations that connections only clone.
//!
//! A bad file therefore fails `switchyard check` and rejects a reload; it never fails a
//! running connection, and nothing here panics on bad input.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::names::SniRoutes;

/// One certificate chain and key, and the server names it is for (empty = default).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub names: Vec<String>,
}

/// What a listener's `[tls]` table asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerSettings {
    pub certs: Vec<CertFiles>,
    /// Only TLS 1.3 when true; 1.2 and 1.3 otherwise.
    pub tls13_only: bool,
    pub alpn: Vec<String>,
    pub client_ca: Option<PathBuf>,
}

/// What a pool's `[tls]` table asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientSettings {
    /// SNI and the name verified; `None` = each upstream's host.
    pub server_name: Option<String>,
    /// Trust roots; `None` = the system's.
    pub ca: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub verify: bool,
}

/// A ready server configuration. Equal when built from the same settings and the same
/// file contents, so a reload that rotates a certificate counts as a change.
#[derive(Clone)]
pub struct ServerTls {
    pub settings: ServerSettings,
    pub config: Arc<ServerConfig>,
    fingerprint: u64,
}

/// A ready client configuration for originating TLS to upstreams.
#[derive(Clone)]
pub struct ClientTls {
    pub settings: ClientSettings,
    pub config: Arc<ClientConfig>,
    fingerprint: u64,
}

/// Chooses the certificate by SNI (exact, then one wildcard label), else the default.
#[derive(Debug)]
struct CertBySni {
    by_name: SniRoutes<Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

/// `verify = false`: accepts any upstream certificate (logged loudly at load).
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

/// Why TLS material from the config cannot be used; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsLoadError {
    #[error("cannot read {}: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a PEM certificate chain: {source}", file.display())]
    NotPem {
        file: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no certificate", file.display())]
    NoCertificate { file: PathBuf },
    #[error("{} holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {source}", file.display())]
    NoKey {
        file: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("key {} does not fit certificate {}: {source}", key.display(), cert.display())]
    KeyMismatch {
        key: PathBuf,
        cert: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: not a usable CA certificate: {reason}", file.display())]
    BadCa { file: PathBuf, reason: String },
    #[error("no system trust roots found; set `ca` to a PEM bundle")]
    NoSystemRoots,
    #[error("no certificate configured")]
    NoCertificateConfigured,
    #[error("certificate names: {0}")]
    Names(#[from] crate::names::RouteError),
    #[error("TLS versions: {0}")]
    Versions(#[source] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

// === impl ServerTls ===

impl ServerTls {
    /// Loads every file and builds the configuration; the error says which file and why.
    pub fn load(settings: ServerSettings) -> Result<Self, TlsLoadError> {
        let provider = provider();
        let mut hasher = DefaultHasher::new();
        settings.hash(&mut hasher);
        let versions: &[&rustls::SupportedProtocolVersion] = if settings.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS12, &rustls::version::TLS13]
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(TlsLoadError::Versions)?;
        let builder = match &settings.client_ca {
            Some(path) => {
                let roots = load_roots(path, &mut hasher)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| TlsLoadError::BadCa {
                            file: path.clone(),
                            reason: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut named = Vec::new();
        let mut default = None;
        for files in &settings.certs {
            let chain = load_chain(&files.cert, &mut hasher)?;
            let key = load_key(&files.key, &mut hasher)?;
            let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|source| {
                TlsLoadError::KeyMismatch {
                    key: files.key.clone(),
                    cert: files.cert.clone(),
                    source,
                }
            })?;
            let certified = Arc::new(certified);
            if files.names.is_empty() || default.is_none() {
                default.get_or_insert_with(|| certified.clone());
            }
            for name in &files.names {
                named.push((name.clone(), certified.clone()));
            }
        }
        let default = default.ok_or(TlsLoadError::NoCertificateConfigured)?;
        let by_name = SniRoutes::new(named)?;
        let mut config = builder.with_cert_resolver(Arc::new(CertBySni { by_name, default }));
        config.alpn_protocols = settings
            .alpn
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect();
        Ok(Self {
            settings,
            config: Arc::new(config),
            fingerprint: hasher.finish(),
        })
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

// === impl ClientTls ===

impl ClientTls {
    pub fn load(settings: ClientSettings) -> Result<Self, TlsLoadError> {
        let provider = provider();
        let mut hasher = DefaultHasher::new();
        settings.hash(&mut hasher);
        let roots = match &settings.ca {
            Some(path) => load_roots(path, &mut hasher)?,
            None => system_roots()?,
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsLoadError::Versions)?
            .with_root_certificates(roots);
        let mut config = match &settings.client_cert {
            Some((cert, key)) => {
                let chain = load_chain(cert, &mut hasher)?;
                let key_der = load_key(key, &mut hasher)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|source| TlsLoadError::KeyMismatch {
                        key: key.clone(),
                        cert: cert.clone(),
                        source,
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        if !settings.verify {
            config
                .dangerous()
                .set_certificate_verifier(Arc::new(AcceptAnyCert(provider)));
        }
        Ok(Self {
            settings,
            config: Arc::new(config),
            fingerprint: hasher.finish(),
        })
    }

    /// The name to send and verify for an upstream written as `target` (host:port).
    pub fn server_name(&self, target: &str) -> Option<ServerName<'static>> {
        let host = match &self.settings.server_name {
            Some(name) => name.clone(),
            None => host_of(target),
        };
        ServerName::try_from(host).ok()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The host part of `host:port` or `[v6]:port`.
pub fn host_of(target: &str) -> String {
    let host = target.rsplit_once(':').map_or(target, |(host, _)| host);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

// === impl CertBySni ===

impl ResolvesServerCert for CertBySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|name| self.by_name.lookup(name))
            .unwrap_or(&self.default);
        Some(chosen.clone())
    }
}

// === impl AcceptAnyCert ===

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn read(path: &Path, hasher: &mut DefaultHasher) -> Result<Vec<u8>, TlsLoadError> {
    let bytes =
        crate::files::read_bounded(path, crate::files::MAX_SECRET_FILE).map_err(|source| {
            TlsLoadError::Read {
                file: path.to_path_buf(),
                source,
            }
        })?;
    bytes.hash(hasher);
    Ok(bytes)
}

fn load_chain(
    path: &Path,
    hasher: &mut DefaultHasher,
) -> Result<Vec<CertificateDer<'static>>, TlsLoadError> {
    let bytes = read(path, hasher)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsLoadError::NotPem {
            file: path.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsLoadError::NoCertificate {
            file: path.to_path_buf(),
        });
    }
    Ok(chain)
}

fn load_key(
    path: &Path,
    hasher: &mut DefaultHasher,
) -> Result<PrivateKeyDer<'static>, TlsLoadError> {
    let bytes = read(path, hasher)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| TlsLoadError::NoKey {
        file: path.to_path_buf(),
        source,
    })
}

fn load_roots(path: &Path, hasher: &mut DefaultHasher) -> Result<RootCertStore, TlsLoadError> {
    let mut roots = RootCertStore::empty();
    for cert in load_chain(path, hasher)? {
        roots.add(cert).map_err(|e| TlsLoadError::BadCa {
            file: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsLoadError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsLoadError::NoSystemRoots);
    }
    Ok(roots)
}
