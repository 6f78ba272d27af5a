//! Sidecar mode: a plain-TCP listener on loopback next to an SDK app (SDKs cannot speak TLS to
//! `cliUrl`) that forwards each connection, bytes untouched, to a copilot-lb edge over mutual
//! TLS. The edge then knows the app by its client certificate.

use crate::config::ListenerConfig;
use crate::context::Shared;
use crate::tls::{self, ClientTlsStore, TlsError};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// A tcp-mode listener's upstream.
pub(crate) struct Sidecar {
    upstream: String,
    tls: Option<Arc<ClientTlsStore>>,
}

impl Sidecar {
    /// Prepares the upstream (loads client TLS material).
    pub(crate) fn new(l: &ListenerConfig) -> Result<Sidecar, TlsError> {
        let up = l
            .upstream
            .as_ref()
            .ok_or_else(|| TlsError::Rustls("tcp listener without upstream".into()))?;
        let tls = match &up.tls {
            Some(t) => Some(Arc::new(ClientTlsStore::load(t)?)),
            None => None,
        };
        Ok(Sidecar {
            upstream: up.address.value.clone(),
            tls,
        })
    }

    /// Accepts and forwards until shutdown.
    pub(crate) async fn serve(self, shared: Arc<Shared>, listener: TcpListener) {
        let me = Arc::new(self);
        let max = shared.config().limits.max_connections;
        shared.metrics.set_connections_max(max);
        let slots = Arc::new(Semaphore::new(max));
        if let Ok(a) = listener.local_addr() {
            info!(listen = %a, upstream = %me.upstream, tls = me.tls.is_some(), "listening (tcp sidecar)");
        }
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = shared.stop_accepting.cancelled() => return,
            };
            let (stream, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shared.stop_accepting.cancelled() => return,
            };
            let me = me.clone();
            let sh = shared.clone();
            crate::runtime::spawn_conn(shared.loops(), stream, move |stream| async move {
                let shared = sh;
                shared.metrics.connection_opened();
                tokio::select! {
                    _ = me.forward(&shared, stream) => {}
                    _ = shared.shutdown.cancelled() => {}
                }
                shared.metrics.connection_closed();
                debug!(%peer, "sidecar connection closed");
                drop(permit);
            });
        }
    }

    async fn forward(&self, shared: &Shared, client: TcpStream) {
        crate::wire::tune(&client);
        let timeout = shared.config().limits.connect_timeout.0;
        let up = match tls::dial(&self.upstream, self.tls.as_deref(), Some(timeout)).await {
            Ok(u) => u,
            Err(e) if e.kind() == tls::DialErrorKind::Timeout => {
                warn!(upstream = %self.upstream, error = %e, "connecting to the edge timed out; closing the client connection");
                return;
            }
            Err(e) => {
                warn!(upstream = %self.upstream, error = %e, "cannot reach the edge; closing the client connection");
                return;
            }
        };
        let (mut ur, mut uw) = up;
        let (mut cr, mut cw) = client.into_split();
        let to_edge = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                crate::runtime::activity();
                // The SDKs write header and body separately: a chunk that ends a header block
                // is most likely waiting for its body, which Nagle holds until this is ACKed.
                if buf[..n].ends_with(b"\r\n\r\n") {
                    crate::wire::quickack(&cr);
                }
                if uw.write_all(&buf[..n]).await.is_err() || uw.flush().await.is_err() {
                    break;
                }
            }
            let _ = uw.shutdown().await;
        };
        let to_client = async {
            let mut buf = vec![0u8; 8 * 1024];
            loop {
                let n = match ur.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                crate::runtime::activity();
                if cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = cw.shutdown().await;
        };
        tokio::join!(to_edge, to_client);
    }
}
