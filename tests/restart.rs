//! A restart of copilot-lb on one host refuses no connection (issue #14 item 4): the new
//! process binds the same address beside the old one (SO_REUSEPORT), then the old one gets
//! SIGTERM and drains. A client dialling in a loop throughout is never refused, and every
//! connection made once the old process is gone is served. Real processes, real sockets.

mod common;

use common::*;
use serde_json::json;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// One client's connect + ping; the error kind when it could not be served.
async fn one_ping(addr: SocketAddr) -> Result<(), std::io::ErrorKind> {
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
        .map_err(|e| e.kind())?;
    let mut c = Client::from_stream(stream);
    let id = c.fresh_id();
    c.send_request(&id, "ping", &json!({"message": "restart"}))
        .await;
    match c.try_response(&id, Duration::from_secs(2)).await {
        Some(f) if f.text().contains("pong: restart") => Ok(()),
        Some(_) => Err(std::io::ErrorKind::InvalidData),
        None => Err(std::io::ErrorKind::UnexpectedEof),
    }
}

#[tokio::test]
async fn a_restart_beside_the_old_process_refuses_no_connection() {
    within(T, async {
        let fake = fakes(1, true).await.remove(0);
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("lb.yaml");
        std::fs::write(
            &cfg,
            format!(
                "backends: [{{address: {}}}]\nhealth: {{interval: 100ms, timeout: 500ms}}\nlimits: {{shutdown_timeout: 5s}}\n",
                fake.addr()
            ),
        )
        .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut old = spawn_serve(&cfg, addr, &dir.path().join("old.redb"));
        assert!(
            eventually(Duration::from_secs(15), || std::net::TcpStream::connect(addr).is_ok())
                .await,
            "the first process did not listen"
        );

        // Dial continuously until told to stop (bounded: at most 20 s, 5,000 attempts).
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, refused, cut, ok_after) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let old_gone = Arc::new(AtomicBool::new(false));
        let dialer = {
            let (stop, ok, refused, cut, ok_after, old_gone) = (
                stop.clone(),
                ok.clone(),
                refused.clone(),
                cut.clone(),
                ok_after.clone(),
                old_gone.clone(),
            );
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(20);
                for _ in 0..5_000 {
                    if stop.load(Ordering::Acquire) || Instant::now() > until {
                        break;
                    }
                    let after = old_gone.load(Ordering::Acquire);
                    match one_ping(addr).await {
                        Ok(()) if after => {
                            ok_after.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(std::io::ErrorKind::ConnectionRefused) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            cut.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The new process binds beside the old one; it must be up before the old one goes.
        let mut new = spawn_serve(&cfg, addr, &dir.path().join("new.redb"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            new.try_wait().unwrap().is_none(),
            "the new process could not bind next to the old one"
        );
        let _ = Command::new("kill")
            .args(["-TERM", &old.id().to_string()])
            .status();
        let exited = eventually(Duration::from_secs(10), || {
            old.try_wait().ok().flatten().is_some()
        })
        .await;
        assert!(exited, "the old process did not exit after SIGTERM");
        old_gone.store(true, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(700)).await;
        stop.store(true, Ordering::Release);
        dialer.await.unwrap();
        let _ = new.kill();
        let _ = new.wait();
        let (ok, refused, cut, ok_after) = (
            ok.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
            cut.load(Ordering::Relaxed),
            ok_after.load(Ordering::Relaxed),
        );
        println!("restart: {ok} served before the old process exited, {ok_after} after, {refused} refused, {cut} cut (accepted by the old process as it stopped)");
        assert_eq!(refused, 0, "a connection was refused during the restart");
        assert!(ok > 0 && ok_after > 0, "{ok} / {ok_after}");
    })
    .await;
}
