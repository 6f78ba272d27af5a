//! `chaos fake-cli --port P [--storage DIR] [--name N]`: one fake CLI backend as its own
//! process, so a script can `kill -9`, SIGSTOP and SIGCONT it for real.
//!
//! With `--storage DIR` the backend shares session storage with the other backends of DIR:
//! it forwards every connection to fake `N` of the storage host that wrote `DIR/N.addr` (see
//! [`super::host`]: the fake keeps storage in memory, so shared storage across
//! processes lives in one host process). Without `--storage` it runs the fake CLI
//! itself, with private storage. Either way it listens on 127.0.0.1:P, prints `READY` on
//! stdout, and exits when stdin closes (its parent died or let go).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use test_support::fake_cli::{FakeCli, FakeConfig};
use tokio::net::{TcpListener, TcpStream};

/// Runs until stdin closes.
pub async fn run(port: u16, storage: Option<PathBuf>, name: String) -> std::io::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let _standalone;
    let serve = match storage {
        None => {
            _standalone = FakeCli::start(FakeConfig {
                name: name.clone(),
                addr: Some(addr),
                ..FakeConfig::default()
            })
            .await?;
            None
        }
        Some(dir) => {
            let upstream = read_addr(&super::host::addr_file(&dir, &name))?;
            let l = bind_retry(addr).await?;
            Some(tokio::spawn(forward_all(l, upstream)))
        }
    };
    println!("READY {addr}");
    std::io::stdout().flush().ok();
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        while let Ok(n) = std::io::stdin().read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    if let Some(h) = serve {
        h.abort();
    }
    Ok(())
}

/// The host's address for this backend (the host writes the file before the backends start;
/// waits up to 10 s for it).
fn read_addr(path: &std::path::Path) -> std::io::Result<SocketAddr> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(path) {
            Ok(s) => {
                return s.trim().parse().map_err(|e| {
                    std::io::Error::other(format!("{}: bad address: {e}", path.display()))
                })
            }
            Err(e) if Instant::now() >= until => {
                return Err(std::io::Error::other(format!(
                    "{}: {e} (is a storage host running for this directory?)",
                    path.display()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Binds, retrying for up to 5 s while the previous process's socket goes away.
async fn bind_retry(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut last = None;
    for _ in 0..100 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()))
}

async fn forward_all(l: TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let Ok(Ok(mut u)) =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await
            else {
                return;
            };
            let _ = u.set_nodelay(true);
            let mut s = s;
            let _ = tokio::io::copy_bidirectional(&mut s, &mut u).await;
        });
    }
}
