//! TLS with rustls: listener certificates and client-certificate verification that reload
//! without a restart (each accept takes the current config, as linkerd's credential store
//! does), client-side TLS for the sidecar and for backends, and peer identity extraction.

use crate::config::{ClientAuth, ClientTlsConfig, ServerTlsConfig};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;
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
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut data.as_slice()).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        what: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.display().to_string(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Loads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read(path)?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            what: e.to_string(),
        })?
        .ok_or_else(|| TlsError::Pem {
            path: path.display().to_string(),
            what: "no private key found".into(),
        })
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
    state: RwLock<Arc<ServerState>>,
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
            state: RwLock::new(Arc::new(build_server(cfg)?)),
            stamp: Mutex::new(stamp(&files(cfg))),
        };
        Ok(store)
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner()).clone();
        tokio_rustls::TlsAcceptor::from(s.config.clone())
    }

    /// Rebuilds from disk if any file changed. A broken new file keeps the old material.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&files(&self.cfg));
        let mut st = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if *st == now {
            return Ok(false);
        }
        let built = build_server(&self.cfg)?;
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(built);
        *st = now;
        Ok(true)
    }

    /// Re-verifies a connected client's certificate chain against the current CA and clock.
    pub fn still_valid(&self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(v) = &s.verifier else { return Ok(()) };
        let Some((end, rest)) = chain.split_first() else {
            return Ok(());
        };
        v.verify_client_cert(end, rest, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
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
    current: RwLock<Arc<rustls::ClientConfig>>,
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
            current: RwLock::new(Arc::new(build_client(cfg)?)),
            stamp: Mutex::new(stamp(&client_files(cfg))),
        })
    }

    /// The connector for the next connection (picking up rotated files first).
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        let now = stamp(&client_files(&self.cfg));
        {
            let mut st = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *st != now {
                match build_client(&self.cfg) {
                    Ok(c) => {
                        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(c);
                        *st = now;
                        tracing::info!(ca = %self.cfg.ca.display(), "client TLS material reloaded");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "client TLS reload failed; keeping the previous material")
                    }
                }
            }
        }
        let c = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsConnector::from(c)
    }

    /// The name to verify for `address` (`server_name`, else the host part).
    pub fn server_name(&self, address: &str) -> Result<ServerName<'static>, String> {
        let host = match &self.cfg.server_name {
            Some(n) => n.clone(),
            None => address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|| address.to_string()),
        };
        ServerName::try_from(host.clone()).map_err(|_| format!("invalid TLS server name {host:?}"))
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

/// With nothing listening on a loopback port, the kernel can pick that very port as the
/// ephemeral source and complete a TCP simultaneous open with itself; the socket would then
/// hold the port (TIME-WAIT) that the restarting backend needs. Refused, as Go's net does.
fn not_self(stream: &TcpStream, address: &str) -> Result<(), String> {
    match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) if local == peer => Err(format!(
            "connected to itself at {local}: nothing listens on {address}"
        )),
        _ => Ok(()),
    }
}

/// Dials `address` with TCP_NODELAY and, if configured, TLS.
pub async fn dial(
    address: &str,
    tls: Option<&ClientTlsStore>,
) -> Result<(BoxRead, BoxWrite), String> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    not_self(&stream, address)?;
    let _ = stream.set_nodelay(true);
    match tls {
        None => {
            let (r, w) = stream.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Some(t) => {
            let name = t.server_name(address)?;
            let s = t
                .connector()
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS handshake with {address}: {e}"))?;
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
        assert!(err.contains("connected to itself"), "{err}");
    }
}
