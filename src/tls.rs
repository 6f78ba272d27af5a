//! TLS with rustls: listener certificates and client-certificate verification that reload
//! without a restart (each accept takes the current config, as linkerd's credential store
//! does), client-side TLS for the sidecar and for backends, and peer identity extraction.

use crate::config::{ClientAuth, ClientTlsConfig, ServerTlsConfig};
use arc_swap::ArcSwap;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// File.
        path: String,
        /// What was wrong.
        what: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Loads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, "certificate", e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "certificate", pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// Loads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read(path)?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| pem_error(path, "private key", e))
}

fn pem_error(path: &Path, wanted: &str, e: pem::Error) -> TlsError {
    // pki-types prints the offending marker lines as byte arrays; a person needs the text.
    let what = match e {
        pem::Error::NoItemsFound => format!("no {wanted} found"),
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "bad PEM: no \"-----END {}-----\" line",
            String::from_utf8_lossy(&end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "bad PEM: illegal section start {:?}",
            String::from_utf8_lossy(&line)
        ),
        e => format!("bad PEM: {e}"),
    };
    TlsError::Pem {
        path: path.display().to_string(),
        what,
    }
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            what: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// Modification stamps of a set of files, to notice rotations.
fn stamp(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

struct ServerState {
    config: Arc<rustls::ServerConfig>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

/// A listener's TLS material, swapped whole when its files change.
pub struct ServerTlsStore {
    cfg: ServerTlsConfig,
    state: ArcSwap<ServerState>,
    /// Also serializes rebuilds, so two callers that notice one rotation build it once.
    stamp: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for ServerTlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTlsStore")
            .field("cert", &self.cfg.cert)
            .finish()
    }
}

impl ServerTlsStore {
    /// Loads the listener's certificate, key and client CA.
    pub fn load(cfg: &ServerTlsConfig) -> Result<ServerTlsStore, TlsError> {
        let store = ServerTlsStore {
            cfg: cfg.clone(),
            state: ArcSwap::from_pointee(build_server(cfg)?),
            stamp: Mutex::new(stamp(&files(cfg))),
        };
        Ok(store)
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.state.load().config.clone())
    }

    /// Rebuilds from disk if any file changed. A broken new file keeps the old material.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&files(&self.cfg));
        // The stamps are plain data that a panicking holder cannot leave half-written.
        let mut st = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if *st == now {
            return Ok(false);
        }
        self.state.store(Arc::new(build_server(&self.cfg)?));
        *st = now;
        Ok(true)
    }

    /// Re-verifies a connected client's certificate chain against the current CA and clock.
    pub fn still_valid(&self, chain: &[CertificateDer<'static>]) -> Result<(), CertRejected> {
        let s = self.state.load();
        let Some(v) = &s.verifier else { return Ok(()) };
        let Some((end, rest)) = chain.split_first() else {
            return Ok(());
        };
        v.verify_client_cert(end, rest, UnixTime::now())
            .map(|_| ())
            .map_err(CertRejected)
    }
}

fn files(cfg: &ServerTlsConfig) -> Vec<PathBuf> {
    let mut f = vec![cfg.cert.clone(), cfg.key.clone()];
    if let Some(ca) = &cfg.client_ca {
        f.push(ca.clone());
    }
    f
}

fn build_server(cfg: &ServerTlsConfig) -> Result<ServerState, TlsError> {
    let certs = load_certs(&cfg.cert)?;
    let key = load_key(&cfg.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let verifier: Option<Arc<dyn ClientCertVerifier>> = match (cfg.client_auth, &cfg.client_ca) {
        (ClientAuth::None, _) => None,
        (mode, Some(ca)) => {
            let roots = load_roots(ca)?;
            let b = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let b = if mode == ClientAuth::Optional {
                b.allow_unauthenticated()
            } else {
                b
            };
            Some(b.build().map_err(|e| TlsError::Rustls(e.to_string()))?)
        }
        (_, None) => {
            return Err(TlsError::Rustls("client_auth needs client_ca".into()));
        }
    };
    let builder = match &verifier {
        Some(v) => builder.with_client_cert_verifier(v.clone()),
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(ServerState {
        config: Arc::new(config),
        verifier,
    })
}

/// Client-side TLS material (sidecar → edge, proxy → backend), re-read when files change.
pub struct ClientTlsStore {
    cfg: ClientTlsConfig,
    current: ArcSwap<rustls::ClientConfig>,
    /// Also serializes rebuilds, so concurrent dials that notice one rotation build it once.
    stamp: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for ClientTlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTlsStore")
            .field("ca", &self.cfg.ca)
            .finish()
    }
}

impl ClientTlsStore {
    /// Loads the CA and optional client certificate.
    pub fn load(cfg: &ClientTlsConfig) -> Result<ClientTlsStore, TlsError> {
        Ok(ClientTlsStore {
            cfg: cfg.clone(),
            current: ArcSwap::from_pointee(build_client(cfg)?),
            stamp: Mutex::new(stamp(&client_files(cfg))),
        })
    }

    /// The connector for the next connection (picking up rotated files first).
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        let now = stamp(&client_files(&self.cfg));
        {
            // The stamps are plain data that a panicking holder cannot leave half-written.
            let mut st = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *st != now {
                match build_client(&self.cfg) {
                    Ok(c) => {
                        self.current.store(Arc::new(c));
                        *st = now;
                        tracing::info!(ca = %self.cfg.ca.display(), "client TLS material reloaded");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "client TLS reload failed; keeping the previous material")
                    }
                }
            }
        }
        tokio_rustls::TlsConnector::from(self.current.load_full())
    }

    /// The name to verify for `address` (`server_name`, else the host part).
    pub fn server_name(&self, address: &str) -> Result<ServerName<'static>, DialError> {
        let host = match &self.cfg.server_name {
            Some(n) => n.clone(),
            None => address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|| address.to_string()),
        };
        ServerName::try_from(host.clone()).map_err(|_| DialError::ServerName { name: host })
    }
}

fn client_files(cfg: &ClientTlsConfig) -> Vec<PathBuf> {
    let mut f = vec![cfg.ca.clone()];
    f.extend(cfg.cert.clone());
    f.extend(cfg.key.clone());
    f
}

fn build_client(cfg: &ClientTlsConfig) -> Result<rustls::ClientConfig, TlsError> {
    let roots = load_roots(&cfg.ca)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_webpki_verifier(verifier);
    match (&cfg.cert, &cfg.key) {
        (Some(c), Some(k)) => b
            .with_client_auth_cert(load_certs(c)?, load_key(k)?)
            .map_err(|e| TlsError::Rustls(e.to_string())),
        (None, None) => Ok(b.with_no_client_auth()),
        _ => Err(TlsError::Rustls("tls.cert and tls.key go together".into())),
    }
}

/// The identity a client certificate asserts: its first URI SAN (e.g. `spiffe://…`), else its
/// first DNS SAN, else its subject CN.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = x.subject_alternative_name() {
        let names = &san.value.general_names;
        if let Some(uri) = names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        }) {
            return Some(uri);
        }
        if let Some(dns) = names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        }) {
            return Some(dns);
        }
    }
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn
}

/// A boxed reader half (plain TCP or TLS).
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// A boxed writer half (plain TCP or TLS).
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A connected client's certificate chain no longer verifies (revoked CA, expired).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CertRejected(pub rustls::Error);

/// Why [`dial`] failed, by step. [`DialError::kind`] tells passive health what it means.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The TCP connect (or the name lookup before it) failed.
    #[error("{source}")]
    Connect {
        /// Where.
        address: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The TCP connect did not finish in time.
    #[error("connect timed out after {after:?}")]
    ConnectTimeout {
        /// Where.
        address: String,
        /// The budget for connect and handshake together.
        after: Duration,
    },
    /// The socket connected to itself: nothing listens on that loopback port.
    #[error("connected to itself at {local}: nothing listens on {address}")]
    SelfConnect {
        /// Where.
        address: String,
        /// The socket's own (and peer) address.
        local: SocketAddr,
    },
    /// The name to verify in the server certificate is not a valid DNS name or IP.
    #[error("invalid TLS server name {name:?}")]
    ServerName {
        /// The name.
        name: String,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {address}: {source}")]
    Handshake {
        /// Where.
        address: String,
        /// Cause (a `rustls::Error` inside when TLS itself refused).
        source: std::io::Error,
    },
    /// The TLS handshake did not finish in time.
    #[error("TLS handshake with {address} timed out ({after:?} for connect and handshake)")]
    HandshakeTimeout {
        /// Where.
        address: String,
        /// The budget for connect and handshake together.
        after: Duration,
    },
}

/// What a [`DialError`] says about the peer, for passive health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialErrorKind {
    /// Nothing listens there: the connect was answered with a reset.
    Refused,
    /// The peer reset or closed the connection before it was ready.
    Reset,
    /// The connect or the TLS handshake did not finish in time.
    Timeout,
    /// TLS refused: certificate, protocol version, alert, or an invalid server name.
    Tls,
    /// The socket connected to itself (see [`DialError::SelfConnect`]).
    SelfConnect,
    /// Anything else: name lookup, no route, local resource limits.
    Io,
}

impl DialErrorKind {
    /// A short stable name, for labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DialErrorKind::Refused => "refused",
            DialErrorKind::Reset => "reset",
            DialErrorKind::Timeout => "timeout",
            DialErrorKind::Tls => "tls",
            DialErrorKind::SelfConnect => "self_connect",
            DialErrorKind::Io => "io",
        }
    }
}

impl DialError {
    /// The class of failure.
    pub fn kind(&self) -> DialErrorKind {
        match self {
            DialError::Connect { source, .. } => io_kind(source),
            DialError::ConnectTimeout { .. } | DialError::HandshakeTimeout { .. } => {
                DialErrorKind::Timeout
            }
            DialError::SelfConnect { .. } => DialErrorKind::SelfConnect,
            DialError::ServerName { .. } => DialErrorKind::Tls,
            DialError::Handshake { source, .. } => {
                // tokio-rustls wraps what rustls refused in the io::Error, under varying kinds.
                if source
                    .get_ref()
                    .is_some_and(|inner| inner.is::<rustls::Error>())
                {
                    DialErrorKind::Tls
                } else {
                    io_kind(source)
                }
            }
        }
    }
}

fn io_kind(e: &std::io::Error) -> DialErrorKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => DialErrorKind::Refused,
        // An EOF mid-handshake is a peer that went away, like a reset, not a TLS verdict.
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
            DialErrorKind::Reset
        }
        K::TimedOut => DialErrorKind::Timeout,
        _ => DialErrorKind::Io,
    }
}

/// With nothing listening on a loopback port, the kernel can pick that very port as the
/// ephemeral source and complete a TCP simultaneous open with itself; the socket would then
/// hold the port (TIME-WAIT) that the restarting backend needs. Refused, as Go's net does.
fn not_self(stream: &TcpStream, address: &str) -> Result<(), DialError> {
    match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) if local == peer => Err(DialError::SelfConnect {
            address: address.to_string(),
            local,
        }),
        _ => Ok(()),
    }
}

/// Runs `f` until `deadline`; `None` when it passed first.
async fn until<F: Future>(deadline: Option<tokio::time::Instant>, f: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
        None => Some(f.await),
    }
}

/// Dials `address` with TCP_NODELAY and, if configured, TLS. `timeout` bounds connect and
/// handshake together; `None` leaves the bound to the caller (then no timeout variant).
pub async fn dial(
    address: &str,
    tls: Option<&ClientTlsStore>,
    timeout: Option<Duration>,
) -> Result<(BoxRead, BoxWrite), DialError> {
    // An unrepresentable deadline (a huge setting built in code) means no deadline.
    let deadline = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
    let after = timeout.unwrap_or_default();
    let stream = until(deadline, TcpStream::connect(address))
        .await
        .ok_or_else(|| DialError::ConnectTimeout {
            address: address.to_string(),
            after,
        })?
        .map_err(|source| DialError::Connect {
            address: address.to_string(),
            source,
        })?;
    not_self(&stream, address)?;
    let _ = stream.set_nodelay(true);
    match tls {
        None => {
            let (r, w) = stream.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Some(t) => {
            let name = t.server_name(address)?;
            let s = until(deadline, t.connector().connect(name, stream))
                .await
                .ok_or_else(|| DialError::HandshakeTimeout {
                    address: address.to_string(),
                    after,
                })?
                .map_err(|source| DialError::Handshake {
                    address: address.to_string(),
                    source,
                })?;
            let (r, w) = tokio::io::split(s);
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

#[cfg(test)]
mod self_connect_tests {
    use super::*;

    #[tokio::test]
    async fn a_self_connected_socket_is_refused() {
        // Bind a port, then connect to it from itself: a TCP simultaneous open.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&port.into()).unwrap();
        s.connect(&port.into()).unwrap();
        s.set_nonblocking(true).unwrap();
        let stream = TcpStream::from_std(s.into()).unwrap();
        let err = not_self(&stream, &port.to_string()).unwrap_err();
        assert_eq!(err.kind(), DialErrorKind::SelfConnect);
        assert!(err.to_string().contains("connected to itself"), "{err}");
    }
}

#[cfg(test)]
mod dial_tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use tokio::net::TcpListener;

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        /// A CA and a `localhost` server certificate signed by it, as `{name}-ca.crt`,
        /// `{name}.crt`, `{name}.key`.
        fn new(names: &[&str]) -> Pki {
            let dir = tempfile::tempdir().unwrap();
            for name in names {
                let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                let ca_key = KeyPair::generate().unwrap();
                let ca = p.self_signed(&ca_key).unwrap();
                let leaf_key = KeyPair::generate().unwrap();
                let leaf = CertificateParams::new(vec!["localhost".to_string()])
                    .unwrap()
                    .signed_by(&leaf_key, &ca, &ca_key)
                    .unwrap();
                let at = |f: &str| dir.path().join(format!("{name}{f}"));
                std::fs::write(at("-ca.crt"), ca.pem()).unwrap();
                std::fs::write(at(".crt"), leaf.pem()).unwrap();
                std::fs::write(at(".key"), leaf_key.serialize_pem()).unwrap();
            }
            Pki { dir }
        }

        fn path(&self, f: &str) -> PathBuf {
            self.dir.path().join(f)
        }

        fn client(&self, ca: &str) -> ClientTlsStore {
            ClientTlsStore::load(&ClientTlsConfig {
                ca: self.path(ca),
                cert: None,
                key: None,
                server_name: Some("localhost".into()),
            })
            .unwrap()
        }

        fn server(&self, name: &str) -> ServerTlsStore {
            ServerTlsStore::load(&ServerTlsConfig {
                cert: self.path(&format!("{name}.crt")),
                key: self.path(&format!("{name}.key")),
                client_auth: ClientAuth::None,
                client_ca: None,
            })
            .unwrap()
        }
    }

    async fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap().to_string();
        (l, a)
    }

    const BUDGET: Option<Duration> = Some(Duration::from_secs(5));

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let err = dial(&addr, None, BUDGET).await.err().unwrap();
        assert_eq!(err.kind(), DialErrorKind::Refused, "{err}");
        assert!(matches!(err, DialError::Connect { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_silent_tls_peer_times_out_in_the_handshake() {
        let pki = Pki::new(&["a"]);
        let client = pki.client("a-ca.crt");
        let (l, addr) = listener().await;
        // Accept and hold the socket without a byte of TLS.
        let hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let t = Duration::from_millis(200);
        let started = std::time::Instant::now();
        let err = dial(&addr, Some(&client), Some(t)).await.err().unwrap();
        assert_eq!(err.kind(), DialErrorKind::Timeout, "{err}");
        assert!(
            matches!(err, DialError::HandshakeTimeout { after, .. } if after == t),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(err.to_string().contains("TLS handshake with"), "{err}");
        hold.abort();
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_a_tls_failure() {
        let pki = Pki::new(&["a", "b"]);
        let client = pki.client("b-ca.crt");
        let server = pki.server("a");
        let (l, addr) = listener().await;
        let serve = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let _ = server.acceptor().accept(s).await;
        });
        let err = dial(&addr, Some(&client), BUDGET).await.err().unwrap();
        assert_eq!(err.kind(), DialErrorKind::Tls, "{err}");
        assert!(err.to_string().contains("TLS handshake with"), "{err}");
        let _ = serve.await;
        // The same pair with the right CA connects.
        let good = pki.client("a-ca.crt");
        let (l, addr) = listener().await;
        let server = pki.server("a");
        let serve = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            server.acceptor().accept(s).await.map(|_| ())
        });
        assert!(dial(&addr, Some(&good), BUDGET).await.is_ok());
        serve.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_resets_during_the_handshake_is_a_reset() {
        let pki = Pki::new(&["a"]);
        let client = pki.client("a-ca.crt");
        let (l, addr) = listener().await;
        let serve = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            // Linger 0: close sends RST, as a crashing process's socket does.
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
        });
        let err = dial(&addr, Some(&client), BUDGET).await.err().unwrap();
        assert_eq!(err.kind(), DialErrorKind::Reset, "{err}");
        serve.await.unwrap();
    }

    #[tokio::test]
    async fn an_invalid_server_name_is_a_tls_failure() {
        let pki = Pki::new(&["a"]);
        let store = ClientTlsStore::load(&ClientTlsConfig {
            ca: pki.path("a-ca.crt"),
            cert: None,
            key: None,
            server_name: Some("not a name".into()),
        })
        .unwrap();
        let (_l, addr) = listener().await;
        let err = dial(&addr, Some(&store), BUDGET).await.err().unwrap();
        assert_eq!(err.kind(), DialErrorKind::Tls);
        assert_eq!(err.to_string(), "invalid TLS server name \"not a name\"");
    }

    #[test]
    fn pem_problems_name_the_file_and_what_is_wrong() {
        let pki = Pki::new(&["a"]);
        let msg = |r: Result<(), TlsError>| r.unwrap_err().to_string();
        let key = pki.path("a.key");
        let e = msg(load_certs(&key).map(|_| ()));
        assert_eq!(e, format!("{}: no certificate found", key.display()));
        let crt = pki.path("a.crt");
        let e = msg(load_key(&crt).map(|_| ()));
        assert_eq!(e, format!("{}: no private key found", crt.display()));
        let cut = pki.path("cut.crt");
        let pem = std::fs::read_to_string(&crt).unwrap();
        std::fs::write(&cut, &pem[..pem.find("-----END").unwrap()]).unwrap();
        let e = msg(load_certs(&cut).map(|_| ()));
        assert_eq!(
            e,
            format!(
                "{}: bad PEM: no \"-----END CERTIFICATE-----\" line",
                cut.display()
            )
        );
        let junk = pki.path("junk.crt");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = msg(load_certs(&junk).map(|_| ()));
        assert!(
            e.starts_with(&format!("{}: bad PEM: ", junk.display())),
            "{e}"
        );
        let e = msg(load_certs(&pki.path("absent.crt")).map(|_| ()));
        assert!(e.starts_with("cannot read "), "{e}");
        assert_eq!(load_certs(&crt).unwrap().len(), 1);
        assert!(matches!(load_key(&key).unwrap(), PrivateKeyDer::Pkcs8(_)));
    }

    #[test]
    fn a_rotated_certificate_is_swapped_in_and_a_broken_one_keeps_the_old() {
        let pki = Pki::new(&["a", "b"]);
        let store = pki.server("a");
        let before = store.acceptor();
        assert!(!store.reload_if_changed().unwrap());
        // Different length, so the stamp changes even within one mtime tick.
        std::fs::write(pki.path("a.crt"), "garbage").unwrap();
        assert!(store.reload_if_changed().is_err());
        std::fs::copy(pki.path("b.crt"), pki.path("a.crt")).unwrap();
        std::fs::copy(pki.path("b.key"), pki.path("a.key")).unwrap();
        // The copies may match the originals' length and mtime tick; move the mtime clear.
        std::fs::File::options()
            .write(true)
            .open(pki.path("a.crt"))
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(60))
            .unwrap();
        assert!(store.reload_if_changed().unwrap());
        let after = store.acceptor();
        assert!(!Arc::ptr_eq(before.config(), after.config()));
    }
}
