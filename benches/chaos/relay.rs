//! A TCP relay between copilot-lb and one backend that the test can partition: while cut, it
//! moves nothing in either direction — no bytes, no closes, no new upstream connects (a new
//! connection is accepted by the kernel and then hangs, like a SYN into a black hole that a
//! middlebox answered). Healing delivers what was held back, as TCP would after a short
//! partition.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running relay.
pub struct Relay {
    /// Where copilot-lb connects.
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Listens on 127.0.0.1 (any port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Relay> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let (cut, _) = watch::channel(false);
        let rx = cut.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(conn(s, upstream, rx.clone()));
            }
        });
        Ok(Relay { addr, cut, task })
    }

    /// Starts (`true`) or heals (`false`) the partition.
    pub fn partition(&self, on: bool) {
        self.cut.send_replace(on);
    }
}

async fn open(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|cut| !*cut).await;
}

async fn conn(s: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<bool>) {
    open(&mut rx).await;
    let Ok(Ok(u)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await
    else {
        return;
    };
    let _ = s.set_nodelay(true);
    let _ = u.set_nodelay(true);
    let (sr, sw) = s.into_split();
    let (ur, uw) = u.into_split();
    let failed = CancellationToken::new();
    let a = tokio::spawn(pump(sr, uw, rx.clone(), failed.clone()));
    let b = tokio::spawn(pump(ur, sw, rx, failed.clone()));
    let _ = tokio::join!(a, b);
}

/// Copies one direction, holding everything (data and EOF) while the partition is on.
async fn pump(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    mut rx: watch::Receiver<bool>,
    failed: CancellationToken,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        open(&mut rx).await;
        let n = tokio::select! {
            n = r.read(&mut buf) => n,
            _ = failed.cancelled() => return,
        };
        open(&mut rx).await;
        match n {
            Ok(0) => {
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    failed.cancel();
                    return;
                }
            }
            Err(_) => {
                failed.cancel();
                return;
            }
        }
    }
}
