//! The session-aware data path: accept, authenticate, decode, route, forward.

pub mod client;
pub mod link;

use crate::affinity::SessionTable;
use crate::auth::{Auth, Tenant};
use crate::backend::{Backend, Pool, State};
use crate::balance::{self, Candidate};
use crate::codec::Limits;
use crate::config::{Config, Overrides};
use crate::metrics::{BackendLabels, Metrics};
use crate::tls::ServerTlsStore;
use client::ClientConn;
use dashmap::DashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Weak;
use std::sync::{Arc, RwLock};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Process-wide state shared by every connection.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    auth: RwLock<Arc<Auth>>,
    /// The backends.
    pub pool: Pool,
    /// Session affinity.
    pub sessions: SessionTable,
    /// Metrics.
    pub metrics: Metrics,
    next_conn: AtomicU64,
    /// Cancelled to stop accepting new connections (graceful drain).
    pub stop_accepting: CancellationToken,
    /// Cancelled when everything must stop.
    pub shutdown: CancellationToken,
    /// Open client connections.
    pub conns: DashMap<u64, Weak<ClientConn>>,
    /// Where the config came from, for reloads.
    reload_source: std::sync::Mutex<Option<(PathBuf, Overrides)>>,
    /// Event loops serving client connections (none: tasks on the current runtime).
    loops: std::sync::OnceLock<Arc<crate::runtime::Loops>>,
    /// Sessions whose last client just closed, with the close of the link that held each: a
    /// resume waits for it (bounded) so the CLI has released the session first.
    releases: DashMap<String, CancellationToken>,
    /// `limits.max_json_depth`, read on every client frame without taking the config lock.
    max_json_depth: std::sync::atomic::AtomicUsize,
}

/// What a reload changed.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Backends added.
    pub added: Vec<String>,
    /// Backends removed (their links were fenced).
    pub removed: Vec<String>,
}

/// Start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A backend could not be built (unreadable token source).
    #[error("{0}")]
    Backend(String),
    /// The event loops could not be started.
    #[error("{0}")]
    Loops(crate::runtime::RuntimeError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    /// TLS material could not be loaded.
    #[error("listener {listener}: {source}")]
    Tls {
        /// Listener address.
        listener: String,
        /// Cause.
        source: crate::tls::TlsError,
    },
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
}

impl Shared {
    /// Builds the shared state from a validated config.
    pub fn new(cfg: Config) -> Result<Arc<Shared>, StartError> {
        let pool = Pool::new(&cfg).map_err(StartError::Backend)?;
        let auth = Auth::from_config(&cfg.tenants, &cfg.sessions);
        let shared = Arc::new(Shared {
            config: RwLock::new(Arc::new(cfg)),
            auth: RwLock::new(Arc::new(auth)),
            pool,
            sessions: SessionTable::default(),
            metrics: Metrics::new(),
            next_conn: AtomicU64::new(1),
            stop_accepting: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            conns: DashMap::new(),
            reload_source: std::sync::Mutex::new(None),
            loops: std::sync::OnceLock::new(),
            max_json_depth: std::sync::atomic::AtomicUsize::new(0),
            releases: DashMap::new(),
        });
        shared
            .max_json_depth
            .store(shared.config().limits.max_json_depth, Ordering::Relaxed);
        shared.refresh_gauges();
        Ok(shared)
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves client connections on `loops` from now on (set once, before listening).
    pub fn set_loops(&self, loops: Arc<crate::runtime::Loops>) {
        let _ = self.loops.set(loops);
    }

    /// The event loops, if the process runs its own.
    pub fn loops(&self) -> Option<&crate::runtime::Loops> {
        self.loops.get().map(|l| &**l)
    }

    /// Swaps in a new config (already validated).
    pub fn set_config(&self, cfg: Config) {
        self.max_json_depth
            .store(cfg.limits.max_json_depth, Ordering::Relaxed);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cfg);
    }

    /// Notes that the sessions of a closing client are being released, each by the link that
    /// held it (its token fires when that link has closed). Forgets finished releases.
    pub(crate) fn releasing<'a>(
        &self,
        held: impl Iterator<Item = (&'a String, CancellationToken)>,
    ) {
        self.releases.retain(|_, t| !t.is_cancelled());
        for (sid, done) in held {
            self.releases.insert(sid.clone(), done);
        }
    }

    /// Waits (at most `limit`) until a link that held `sid` has closed.
    pub(crate) async fn released(&self, sid: &str, limit: std::time::Duration) {
        let Some(done) = self.releases.get(sid).map(|t| t.clone()) else {
            return;
        };
        let _ = tokio::time::timeout(limit, done.cancelled()).await;
        self.releases.remove_if(sid, |_, t| t.is_cancelled());
    }

    /// Deepest nesting accepted in a client frame.
    pub fn max_json_depth(&self) -> usize {
        self.max_json_depth.load(Ordering::Relaxed)
    }

    /// The authentication policy in force.
    pub fn auth(&self) -> Arc<Auth> {
        self.auth.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swaps the authentication policy.
    pub fn set_auth(&self, a: Auth) {
        *self.auth.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(a);
    }

    /// Codec limits from the config.
    pub fn limits(&self) -> Limits {
        let c = self.config();
        Limits {
            max_header: c.limits.max_header_bytes,
            max_frame: c.limits.max_frame_bytes,
        }
    }

    /// A fresh connection number.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The CLI version to report in the proxy's own `connect` reply.
    pub fn backend_version(&self) -> String {
        self.pool
            .all()
            .iter()
            .find_map(|b| b.version.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_else(|| format!("copilot-lb/{}", env!("CARGO_PKG_VERSION")))
    }

    /// Chooses a backend for a new session (bounded-load HRW over the tenant's backends).
    pub fn place(&self, sid: &str, tenant: &Tenant, exclude: &[String]) -> Option<Arc<Backend>> {
        let all = self.pool.all();
        let c = self.config().balancing.bounded_load;
        let cands: Vec<Candidate> = all
            .iter()
            .map(|b| Candidate {
                name: &b.name,
                weight: b.weight,
                eligible: b.state() == State::Up
                    && tenant.allows_backend(&b.name)
                    && !exclude.contains(&b.name),
                live: b.live_sessions.load(Ordering::Relaxed),
                max_sessions: b.max_sessions,
            })
            .collect();
        balance::place(sid, &cands, c).ok().map(|i| all[i].clone())
    }

    /// Live sessions owned by a tenant.
    pub fn live_sessions_of(&self, tenant: &str) -> u64 {
        self.sessions.live_owned_by(tenant)
    }

    /// Pushes per-backend gauges (sessions, state) to the metrics.
    pub fn refresh_gauges(&self) {
        for b in self.pool.all().iter() {
            let l = BackendLabels {
                backend: b.name.clone(),
            };
            self.metrics
                .sessions
                .get_or_create(&l)
                .set(b.live_sessions.load(Ordering::Relaxed) as i64);
            self.metrics
                .backend_state
                .get_or_create(&l)
                .set(b.state() as i64);
            if b.draining()
                && b.live_sessions.load(Ordering::Relaxed) == 0
                && !b.drained_logged.swap(true, Ordering::Relaxed)
            {
                info!(backend = %b.name, "backend drained: no live sessions left");
            }
        }
    }

    /// Remembers the file and flags to re-read on reload.
    pub fn set_reload_source(&self, path: PathBuf, overrides: Overrides) {
        *self.reload_source.lock().unwrap_or_else(|e| e.into_inner()) = Some((path, overrides));
    }

    /// Re-reads the config file. A bad file changes nothing; live sessions never move unless
    /// their backend was removed.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let src = self
            .reload_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((path, overrides)) = src else {
            return Err("no config file to reload (started from command-line flags only)".into());
        };
        let origin = path.display().to_string();
        let cfg = Config::load(&path)
            .and_then(|c| c.apply(&overrides, &origin))
            .map_err(|e| e.to_string())?;
        for b in &cfg.backends {
            Config::backend_token(b)?;
        }
        let old = self.config();
        if old
            .listeners
            .iter()
            .map(|l| &l.listen.value)
            .ne(cfg.listeners.iter().map(|l| &l.listen.value))
        {
            warn!("listener changes take effect only after a restart");
        }
        if old.runtime != cfg.runtime {
            warn!("runtime changes (threads, busy_poll) take effect only after a restart");
        }
        let (added, removed) = self.pool.replace(&cfg)?;
        self.set_auth(Auth::from_config(&cfg.tenants, &cfg.sessions));
        self.set_config(cfg);
        self.refresh_gauges();
        Ok(ReloadReport { added, removed })
    }

    /// Client requests in flight on a connection (for graceful shutdown).
    pub fn live_conns(&self) -> Vec<Arc<ClientConn>> {
        self.conns
            .iter()
            .filter_map(|e| e.value().upgrade())
            .collect()
    }

    /// A failure seen on live traffic (refused, reset): counts toward `fall`.
    pub fn health_passive_failure(&self, backend: &Arc<Backend>, error: &str) {
        self.metrics
            .passive_failures
            .get_or_create(&BackendLabels {
                backend: backend.name.clone(),
            })
            .inc();
        crate::health::record(self, backend, false, &format!("passive: {error}"));
        // One early probe to confirm; the prober ignores it unless the backend was healthy.
        backend.probe_now.notify_one();
    }
}

/// Binds every configured listener.
pub async fn bind(cfg: &Config) -> Result<Vec<TcpListener>, StartError> {
    let mut out = Vec::new();
    for l in &cfg.listeners {
        let addr = l.listen.value.clone();
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        out.push(listener);
    }
    Ok(out)
}

/// Accepts client connections until shutdown; a semaphore caps concurrent connections.
/// With `tls`, each accept takes the store's current config, so rotated certificates apply
/// to new handshakes without a restart.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, tls: Option<Arc<ServerTlsStore>>) {
    let max = shared.config().limits.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(listen = %local, max_connections = max, tls = tls.is_some(), "listening (jsonrpc)");
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shared.stop_accepting.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shared.stop_accepting.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let tls = tls.clone();
                let sh = shared.clone();
                crate::runtime::spawn_conn(shared.loops(), stream, move |stream| async move {
                    let shared = sh;
                    match tls {
                        None => client::serve(shared, stream, peer.to_string()).await,
                        Some(store) => {
                            crate::wire::tune(&stream);
                            let timeout = shared.config().limits.handshake_timeout.0;
                            let hs = tokio::time::timeout(timeout, store.acceptor().accept(stream))
                                .await;
                            match hs {
                                Ok(Ok(s)) => {
                                    let chain: Vec<_> = s
                                        .get_ref()
                                        .1
                                        .peer_certificates()
                                        .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
                                        .unwrap_or_default();
                                    let identity =
                                        chain.first().and_then(crate::tls::peer_identity);
                                    let peer_tls = client::PeerTls {
                                        identity,
                                        chain,
                                        store,
                                    };
                                    client::serve_tls(shared, s, peer.to_string(), peer_tls).await
                                }
                                Ok(Err(e)) => {
                                    shared
                                        .metrics
                                        .bad_frames
                                        .get_or_create(&crate::metrics::ReasonLabels {
                                            reason: "tls_handshake",
                                        })
                                        .inc();
                                    warn!(%peer, error = %e, "TLS handshake failed");
                                }
                                Err(_) => warn!(%peer, "TLS handshake timed out"),
                            }
                        }
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reloads a listener's TLS files when they change, and closes (after their in-flight
/// requests) connections whose client certificate no longer verifies: a CA dropped from the
/// bundle, or a certificate that expired.
pub async fn watch_tls(shared: Arc<Shared>, store: Arc<ServerTlsStore>) {
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        ticks += 1;
        let changed = match store.reload_if_changed() {
            Ok(true) => {
                info!("listener TLS material reloaded");
                true
            }
            Ok(false) => false,
            Err(e) => {
                error!(error = %e, "listener TLS reload failed; keeping the previous material");
                false
            }
        };
        if !changed && ticks % 30 != 0 {
            continue;
        }
        for c in shared.live_conns() {
            let Some(t) = &c.tls else { continue };
            if !Arc::ptr_eq(&t.store, &store) || t.chain.is_empty() || c.cancel.is_cancelled() {
                continue;
            }
            if let Err(e) = store.still_valid(&t.chain) {
                c.revoke(e.to_string());
            }
        }
    }
}

/// Logs a start-up warning when the proxy accepts anyone.
pub fn warn_if_open(shared: &Shared) {
    if !shared.auth().required() {
        error!("No tenants are configured, so copilot-lb accepts connections from any client and all sessions belong to one open tenant. Configure tenants with token hashes (copilot-lb hash-token) to require authentication.");
    }
}
