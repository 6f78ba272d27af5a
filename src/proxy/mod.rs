//! The session-aware data path: accept, authenticate, decode, route, forward.
//!
//! One file per step (docs/architecture.md): `conn` (a client connection's life), `request`
//! (a frame classified), `local` (what the proxy answers itself), `membership` (sessions a
//! connection holds, ownership), `create`, `resume`, `failover` (re-routing and failover),
//! `fanout` (lists), `stream` (frames too big to hold), `upstream` (a connection's links)
//! and `link` (one link, a leaf).

mod conn;
mod create;
mod failover;
mod fanout;
mod host;
mod link;
mod local;
mod membership;
mod request;
mod resume;
mod stream;
mod upstream;

use crate::config::Config;
use crate::context::Shared;
use crate::tls::ServerTlsStore;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{error, info, warn};

/// A listener that could not bind.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// Address.
    pub addr: String,
    /// Cause.
    pub source: std::io::Error,
}

/// Binds every configured listener.
pub(crate) async fn bind(cfg: &Config) -> Result<Vec<TcpListener>, BindError> {
    let mut out = Vec::new();
    for l in &cfg.listeners {
        let addr = l.listen.value.clone();
        let listener = bind_one(&addr, l.reuse_port)
            .await
            .map_err(|source| BindError { addr, source })?;
        out.push(listener);
    }
    Ok(out)
}

/// One listening socket, with SO_REUSEPORT when asked: during a restart the new process
/// listens beside the old one, which stops accepting only once it drains, so no connect is
/// refused in between (Linux admits only sockets of the same user to the group).
async fn bind_one(addr: &str, reuse_port: bool) -> std::io::Result<TcpListener> {
    let sa = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "resolves to no address")
    })?;
    let s = socket2::Socket::new(
        socket2::Domain::for_address(sa),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&sa.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Accepts client connections until shutdown; a semaphore caps concurrent connections.
/// With `tls`, each accept takes the store's current config, so rotated certificates apply
/// to new handshakes without a restart.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<Arc<ServerTlsStore>>,
) {
    let max = shared.config().limits.max_connections;
    shared.metrics.set_connections_max(max);
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
                        None => conn::serve(shared, stream, peer.to_string()).await,
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
                                    let peer_tls = conn::PeerTls {
                                        identity,
                                        chain,
                                        store,
                                    };
                                    conn::serve_tls(shared, s, peer.to_string(), peer_tls).await
                                }
                                Ok(Err(e)) => {
                                    shared.metrics.bad_frame("tls_handshake");
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
pub(crate) async fn watch_tls(shared: Arc<Shared>, store: Arc<ServerTlsStore>) {
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
            c.reauthorize(&store);
        }
    }
}

/// Logs a start-up warning when the proxy accepts anyone.
pub(crate) fn warn_if_open(shared: &Shared) {
    if !shared.auth().required() {
        error!("No tenants are configured, so copilot-lb accepts connections from any client and all sessions belong to one open tenant. Configure tenants with token hashes (copilot-lb hash-token) to require authentication.");
        // The open tenant keeps every tool and host-level method: with no tenants there is no
        // isolation between clients for a policy to protect.
        error!("Without tenants, clients' sessions may use every tool, including the shell, and session.shell.* and the other host-level methods: they run commands on the Copilot CLI hosts as the CLI's user. Configure tenants (tools, allow_shell) to restrict them.");
    }
}
