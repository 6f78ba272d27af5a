//! The process context every connection, prober and admin request shares: the config and
//! auth policy in force (hot-swapped on reload), the backend pool, the session table, the
//! metrics and the registry of open client connections.
//!
//! It knows connections only through [`ClientHandle`], so it sits below the proxy in the
//! import graph: the proxy, health, hygiene and admin all import it, it imports none of them.

use crate::auth::Auth;
use crate::backend::{BackendError, Pool};
use crate::codec::Limits;
use crate::config::{Config, Overrides};
use crate::metrics::Metrics;
use crate::registry::{OpenError, Registry};
use crate::runtime::Loops;
use arc_swap::ArcSwap;
use dashmap::DashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// What the process needs of an open client connection: shutdown and re-authorization act
/// through this, never on a connection's internals.
pub trait ClientHandle: Send + Sync {
    /// Client requests the connection is waiting on (graceful shutdown waits for zero).
    fn in_flight(&self) -> usize;
    /// Closes the connection now.
    fn shut(&self);
    /// Tells a client that asked for it (a session-aware sidecar) that this process is going
    /// away, once; true if the client asked, and so will move its sessions and let go.
    fn go_away(self: Arc<Self>) -> bool;
    /// Whether the connection still has sessions open.
    fn holds_sessions(&self) -> bool;
    /// Re-checks the connection's authorization after a policy change (a TLS reload, the
    /// periodic expiry check) and closes it, after its in-flight requests, if it no longer
    /// holds. `tls` is the listener store that changed.
    fn reauthorize(self: Arc<Self>, tls: &Arc<crate::tls::ServerTlsStore>);
}

/// Process-wide state shared by every connection.
pub struct Shared {
    config: ArcSwap<Config>,
    auth: ArcSwap<Auth>,
    /// The backends.
    pub pool: Pool,
    /// The session registry (this replica's cache of it, and the store behind).
    pub sessions: Registry,
    /// Metrics.
    pub metrics: Metrics,
    next_conn: AtomicU64,
    /// Cancelled to stop accepting new connections (graceful drain).
    pub stop_accepting: CancellationToken,
    /// Cancelled when everything must stop.
    pub shutdown: CancellationToken,
    /// Open client connections.
    conns: DashMap<u64, Weak<dyn ClientHandle>>,
    /// Where the config came from, for reloads.
    reload_source: std::sync::Mutex<Option<(PathBuf, Overrides)>>,
    /// Event loops serving client connections (none: tasks on the current runtime).
    loops: Option<Arc<Loops>>,
    /// Sessions whose last client just closed, with the close of the link that held each: a
    /// resume waits for it (bounded) so the CLI has released the session first.
    releases: DashMap<String, CancellationToken>,
    /// Admission of turns to backends with `max_concurrent_turns` (fair.rs).
    pub(crate) turn_gates: crate::fair::TurnGates,
    /// The managed pool's backends, added to every reloaded config (the pool is not in the
    /// file's `backends:`).
    managed_backends: std::sync::Mutex<Vec<crate::config::BackendConfig>>,
}

/// What a reload changed.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Backends added.
    pub added: Vec<String>,
    /// Backends removed (their links were fenced).
    pub removed: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The proxy was started from flags only.
    #[error("no config file to reload (started from command-line flags only)")]
    NoSource,
    /// The file did not load or validate.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A backend could not be built (token source, TLS material).
    #[error("{0}")]
    Backend(#[from] BackendError),
}

/// Why the shared state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A backend could not be built (unreadable token source, TLS material).
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// The session registry could not be opened.
    #[error("{0}")]
    Registry(#[from] OpenError),
}

impl Shared {
    /// Builds the shared state from a validated config; client connections are served on
    /// `loops` when given.
    pub fn new(cfg: Config, loops: Option<Arc<Loops>>) -> Result<Arc<Shared>, BuildError> {
        let pool = Pool::new(&cfg)?;
        // A sidecar-only process routes no sessions: it keeps no registry (and writes no file).
        let routes_sessions = cfg
            .listeners
            .iter()
            .any(|l| l.mode == crate::config::ListenerMode::Jsonrpc);
        let sessions = if routes_sessions {
            Registry::open(&cfg.state, &pool)?
        } else {
            Registry::memory()
        };
        let auth = Auth::from_config(&cfg.tenants, &cfg.sessions);
        Ok(Arc::new(Shared {
            config: ArcSwap::from_pointee(cfg),
            auth: ArcSwap::from_pointee(auth),
            pool,
            sessions,
            metrics: Metrics::new(),
            next_conn: AtomicU64::new(1),
            stop_accepting: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            conns: DashMap::new(),
            reload_source: std::sync::Mutex::new(None),
            loops,
            releases: DashMap::new(),
            turn_gates: Default::default(),
            managed_backends: Default::default(),
        }))
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The config in force, borrowed for a moment (per frame): no reference count is touched,
    /// so event loops on other threads do not contend on one counter. Not to be held across
    /// an await.
    pub fn config_now(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// The event loops, if the process runs its own.
    pub fn loops(&self) -> Option<&Loops> {
        self.loops.as_deref()
    }

    /// Swaps in a new config (already validated).
    pub fn set_config(&self, cfg: Config) {
        self.config.store(Arc::new(cfg));
    }

    /// Registers an open client connection under `id`.
    pub fn conn_opened(&self, id: u64, conn: Weak<dyn ClientHandle>) {
        self.conns.insert(id, conn);
    }

    /// Forgets a closed client connection.
    pub fn conn_closed(&self, id: u64) {
        self.conns.remove(&id);
    }

    /// Client connections open now.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// The open client connections.
    pub fn live_conns(&self) -> Vec<Arc<dyn ClientHandle>> {
        self.conns
            .iter()
            .filter_map(|e| e.value().upgrade())
            .collect()
    }

    /// Notes that the sessions of a closing client are being released, each by the link that
    /// held it (its token fires when that link has closed). Forgets finished releases.
    pub fn releasing<'a>(&self, held: impl Iterator<Item = (&'a String, CancellationToken)>) {
        self.releases.retain(|_, t| !t.is_cancelled());
        for (sid, done) in held {
            self.releases.insert(sid.clone(), done);
        }
    }

    /// Waits (at most `limit`) until a link that held `sid` has closed.
    pub async fn released(&self, sid: &str, limit: std::time::Duration) {
        let Some(done) = self.releases.get(sid).map(|t| t.clone()) else {
            return;
        };
        let _ = tokio::time::timeout(limit, done.cancelled()).await;
        self.releases.remove_if(sid, |_, t| t.is_cancelled());
    }

    /// The authentication policy in force.
    pub fn auth(&self) -> Arc<Auth> {
        self.auth.load_full()
    }

    /// Swaps the authentication policy.
    pub fn set_auth(&self, a: Auth) {
        self.auth.store(Arc::new(a));
    }

    /// Codec limits from the config.
    pub fn limits(&self) -> Limits {
        let c = self.config.load();
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
            .find_map(|b| b.version())
            .unwrap_or_else(|| format!("copilot-lb/{}", env!("CARGO_PKG_VERSION")))
    }

    /// The Prometheus text, with the backend gauges read now.
    pub fn render_metrics(&self) -> String {
        let r = self.sessions.status();
        let registry = crate::metrics::RegistryGauges {
            up: r.up,
            errors: r.errors,
            cached: r.cached,
            lease_held: r.hygiene_lease_held,
        };
        self.metrics
            .render(self.pool.all().iter().map(|b| b.gauges()), registry)
    }

    /// Remembers the managed pool's backends, for reloads.
    pub fn set_managed_backends(&self, b: Vec<crate::config::BackendConfig>) {
        *self
            .managed_backends
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = b;
    }

    /// Remembers the file and flags to re-read on reload.
    pub fn set_reload_source(&self, path: PathBuf, overrides: Overrides) {
        *self.reload_source.lock().unwrap_or_else(|e| e.into_inner()) = Some((path, overrides));
    }

    /// Re-reads the config file. A bad file changes nothing; live sessions never move unless
    /// their backend was removed.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let src = self
            .reload_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((path, overrides)) = src else {
            return Err(ReloadError::NoSource);
        };
        let origin = path.display().to_string();
        let mut cfg = Config::load(&path).and_then(|c| c.apply(&overrides, &origin))?;
        for b in &cfg.backends {
            Config::backend_token(b).map_err(BackendError::Token)?;
        }
        let old = self.config();
        cfg.keep_managed(&old);
        let managed = self
            .managed_backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let cfg = cfg.with_managed(&managed);
        // Again with the pool's backends in: a file that dropped `managed:` for `backends:`
        // cannot be mixed into the running pool.
        cfg.validate(&origin)?;
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
        self.set_auth(Auth::from_config_after(
            &cfg.tenants,
            &cfg.sessions,
            &self.auth(),
        ));
        self.set_config(cfg);
        Ok(ReloadReport { added, removed })
    }
}
