//! Process wiring for `copilot-lb serve`: logging, listeners, health, admin, signals.

use crate::config::{Config, ListenerMode, LogFormat, Overrides};
use crate::context::Shared;
use crate::proxy;
use crate::tls::ServerTlsStore;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;
use tracing::{error, warn};
use tracing_subscriber::EnvFilter;

/// The routing table and the config's additions as JSON (`copilot-lb routes`).
pub fn routing_table(routing: &crate::config::RoutingConfig) -> serde_json::Value {
    crate::route::table_json(&routing.allow_global, &routing.allow_session)
}

/// The routing table as the README's Markdown (`copilot-lb routes --markdown`).
pub fn routing_table_markdown() -> String {
    crate::route::table_markdown()
}

/// Installs the tracing subscriber (RUST_LOG wins over the config's level).
pub fn init_logging(cfg: &Config) {
    let level = cfg.log.level.clone().unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colour codes only on a terminal: in files, journald and container logs they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match cfg.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// Start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A backend or the session registry could not be built.
    #[error("{0}")]
    Build(#[from] crate::context::BuildError),
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
    #[error("{0}")]
    Bind(#[from] proxy::BindError),
    /// The managed pool could not be prepared or started.
    #[error("{0}")]
    Managed(#[from] crate::managed::PoolError),
}

/// A running proxy: its shared state and the addresses it bound.
pub struct Running {
    /// Shared state (for tests and the admin API).
    pub shared: Arc<Shared>,
    /// Bound client listener addresses, in config order.
    pub listen_addrs: Vec<std::net::SocketAddr>,
    /// Bound admin address, if any.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// The managed pool, if the config has one.
    pub managed: Option<Arc<crate::managed::Supervisor>>,
}

/// Binds everything and spawns the serving tasks on the current runtime; returns once
/// listening.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    start_on(cfg, None).await
}

/// Like [`start`], but client connections are served on `loops` when given.
pub async fn start_on(
    cfg: Config,
    loops: Option<Arc<crate::runtime::Loops>>,
) -> Result<Running, StartError> {
    let listeners = proxy::bind(&cfg).await?;
    let admin = match &cfg.admin {
        Some(a) => Some(
            tokio::net::TcpListener::bind(&a.listen.value)
                .await
                .map_err(|source| proxy::BindError {
                    addr: a.listen.value.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let jsonrpc = cfg
        .listeners
        .iter()
        .any(|l| l.mode == ListenerMode::Jsonrpc);
    if let Some(l) = &loops {
        let busy = match cfg.runtime.busy_poll {
            Some(m) if !m.0.is_zero() => format!("{:?}", m.0),
            _ => "off".into(),
        };
        info!(threads = l.threads(), busy_poll = %busy, "event loops started");
    }
    // The pool's ports and directories first: its CLIs are backends like the others.
    let prepared = match &cfg.managed {
        Some(m) => Some(crate::managed::prepare(m)?),
        None => None,
    };
    let cfg = match &prepared {
        Some(p) => cfg.with_managed(&p.backends),
        None => cfg,
    };
    let shared = Shared::new(cfg, loops)?;
    let managed = match prepared {
        Some(p) => {
            shared.set_managed_backends(p.backends.clone());
            Some(p.start(&shared)?)
        }
        None => None,
    };
    if jsonrpc {
        proxy::warn_if_open(&shared);
    }
    let listen_addrs = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let cfg = shared.config();
    for (l, lc) in listeners.into_iter().zip(cfg.listeners.iter()) {
        match lc.mode {
            ListenerMode::Jsonrpc => {
                let tls = match &lc.tls {
                    Some(t) => {
                        let store = Arc::new(ServerTlsStore::load(t).map_err(|source| {
                            StartError::Tls {
                                listener: lc.listen.value.clone(),
                                source,
                            }
                        })?);
                        tokio::spawn(proxy::watch_tls(shared.clone(), store.clone()));
                        Some(store)
                    }
                    None => None,
                };
                tokio::spawn(proxy::serve(shared.clone(), l, tls));
            }
            ListenerMode::Tcp => {
                let sidecar =
                    crate::sidecar::Sidecar::new(lc).map_err(|source| StartError::Tls {
                        listener: lc.listen.value.clone(),
                        source,
                    })?;
                tokio::spawn(sidecar.serve(shared.clone(), l));
            }
        }
    }
    if jsonrpc {
        tokio::spawn(crate::health::supervise(shared.clone()));
        tokio::spawn(crate::hygiene::reap(shared.clone()));
        let s = shared.clone();
        tokio::spawn(async move {
            let stop = s.shutdown.clone();
            tokio::join!(
                s.sessions.sync_loop(&s.pool, stop.clone()),
                s.sessions.follow(&s.pool, stop)
            );
        });
    }
    let admin_addr = match admin {
        Some(l) => {
            let addr = l.local_addr().ok();
            tokio::spawn(crate::admin::serve(shared.clone(), l, managed.clone()));
            addr
        }
        None => None,
    };
    for b in shared.pool.all().iter() {
        info!(backend = %b.name, address = %b.address, weight = b.weight, token = b.managed || b.token().is_some(), managed = b.managed, "backend configured");
    }
    Ok(Running {
        shared,
        listen_addrs,
        admin_addr,
        managed,
    })
}

/// Runs until SIGINT or SIGTERM; SIGHUP reloads `source` (the config file and flags).
pub async fn run(cfg: Config, source: Option<(PathBuf, Overrides)>) -> Result<(), StartError> {
    let busy = cfg.runtime.busy_poll.map_or(Duration::ZERO, |m| m.0);
    let loops =
        crate::runtime::Loops::start(cfg.runtime.threads, busy).map_err(StartError::Loops)?;
    let running = start_on(cfg, Some(Arc::new(loops))).await?;
    let shared = running.shared.clone();
    if let Some((p, o)) = source {
        shared.set_reload_source(p, o);
    }
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    loop {
        tokio::select! {
            _ = hup.recv() => match shared.reload() {
                Ok(r) => info!(added = ?r.added, removed = ?r.removed, "configuration reloaded"),
                Err(e) => error!(error = %e, "configuration reload refused; the previous configuration keeps serving"),
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    graceful_shutdown(&shared).await;
    if let Some(m) = &running.managed {
        m.stop().await;
    }
    Ok(())
}

/// Stops accepting, closes idle connections first, lets in-flight requests finish, and cuts
/// whatever is left at one absolute deadline.
pub async fn graceful_shutdown(shared: &Arc<Shared>) {
    let deadline = crate::config::deadline_after(shared.config().limits.shutdown_timeout.0);
    shared.stop_accepting.cancel();
    info!(open = shared.conn_count(), timeout = ?shared.config().limits.shutdown_timeout.0, "draining: no new connections");
    loop {
        let conns = shared.live_conns();
        if conns.is_empty() {
            break;
        }
        for c in &conns {
            // A sidecar that was told moves its sessions to another edge and detaches them
            // here; its connection closes once it holds none (or at the deadline), so no
            // request of its is cut mid-way.
            let moving = c.clone().go_away();
            if c.in_flight() == 0 && !(moving && c.holds_sessions()) {
                c.shut();
            }
        }
        if Instant::now() >= deadline {
            warn!(
                open = conns.len(),
                "shutdown deadline reached; closing remaining connections"
            );
            for c in &conns {
                c.shut();
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Handed over now rather than after its TTL: another replica reaps from its next pass.
    shared.sessions.release_lease(true).await;
    shared.shutdown.cancel();
    // Give connection tasks a moment to log their closing lines.
    tokio::time::sleep(Duration::from_millis(50)).await;
    info!("shut down");
}
