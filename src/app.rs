//! Process wiring for `copilot-lb serve`: logging, listeners, health, admin, signals.

use crate::config::{Config, LogFormat};
use crate::proxy::{self, Shared, StartError};
use std::sync::Arc;
use tracing::info;
use tracing_subscriber::EnvFilter;

/// Installs the tracing subscriber (RUST_LOG wins over the config's level).
pub fn init_logging(cfg: &Config) {
    let level = cfg.log.level.clone().unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cfg.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// A running proxy: its shared state and the addresses it bound.
pub struct Running {
    /// Shared state (for tests and the admin API).
    pub shared: Arc<Shared>,
    /// Bound client listener addresses, in config order.
    pub listen_addrs: Vec<std::net::SocketAddr>,
    /// Bound admin address, if any.
    pub admin_addr: Option<std::net::SocketAddr>,
}

/// Binds everything and spawns the serving tasks; returns once listening.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let listeners = proxy::bind(&cfg).await?;
    let admin = match &cfg.admin {
        Some(a) => Some(
            tokio::net::TcpListener::bind(&a.listen.value)
                .await
                .map_err(|source| StartError::Bind {
                    addr: a.listen.value.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let shared = Shared::new(cfg)?;
    proxy::warn_if_open(&shared);
    let listen_addrs = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    for l in listeners {
        tokio::spawn(proxy::serve(shared.clone(), l));
    }
    tokio::spawn(crate::health::supervise(shared.clone()));
    let admin_addr = match admin {
        Some(l) => {
            let addr = l.local_addr().ok();
            tokio::spawn(crate::admin::serve(shared.clone(), l));
            addr
        }
        None => None,
    };
    for b in shared.pool.all().iter() {
        info!(backend = %b.name, address = %b.address, weight = b.weight, token = b.token().is_some(), "backend configured");
    }
    Ok(Running {
        shared,
        listen_addrs,
        admin_addr,
    })
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    let running = start(cfg).await?;
    wait_for_signal().await;
    info!("shutting down");
    running.shared.shutdown.cancel();
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
