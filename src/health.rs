//! Health: active probes (TCP connect, `connect` with the backend token, `ping`) on a dedicated
//! connection, plus passive signals from live traffic, with rise/fall thresholds so a single
//! failed probe never moves a session.

use crate::backend::{Backend, Check};
use crate::codec::{encode_frame, FrameReader};
use crate::envelope::{self, Kind};
use crate::metrics::{BackendLabels, TransitionLabels};
use crate::proxy::Shared;
use crate::rpc;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tracing::{info, warn};

const HISTORY: usize = 20;

/// Records one observation and applies rise/fall. Returns true if the state changed.
pub fn record(shared: &Shared, b: &Arc<Backend>, ok: bool, detail: &str) -> bool {
    {
        let mut h = b.history.lock().unwrap_or_else(|e| e.into_inner());
        h.push_back(Check {
            at: SystemTime::now(),
            ok,
            detail: detail.to_string(),
        });
        while h.len() > HISTORY {
            h.pop_front();
        }
    }
    let cfg = shared.config();
    let changed = if ok {
        b.fails.store(0, Ordering::Relaxed);
        let oks = b.oks.fetch_add(1, Ordering::Relaxed) + 1;
        if !b.healthy() && oks >= cfg.health.rise {
            b.set_healthy(true);
            info!(backend = %b.name, address = %b.address, successes = oks, "backend is UP");
            true
        } else {
            false
        }
    } else {
        b.oks.store(0, Ordering::Relaxed);
        let fails = b.fails.fetch_add(1, Ordering::Relaxed) + 1;
        b.probe_now.notify_one();
        if b.healthy() && fails >= cfg.health.fall {
            // Fencing closes every link to it, so the CLI releases its sessions if it lives.
            b.set_healthy(false);
            warn!(backend = %b.name, address = %b.address, failures = fails, last = %detail, "backend is DOWN");
            true
        } else {
            false
        }
    };
    if changed {
        shared
            .metrics
            .backend_transitions
            .get_or_create(&TransitionLabels {
                backend: b.name.clone(),
                to: b.state().as_str(),
            })
            .inc();
        shared.refresh_gauges();
    }
    changed
}

/// One active probe: connect, `connect` with the backend's token, `ping`.
pub async fn probe(b: &Backend, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let run = async {
        let (r, mut w) = crate::tls::dial(&b.address, b.tls.as_deref())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut reader = FrameReader::new(r, Default::default());
        let params = match b.token() {
            Some(t) => json!({ "token": t }),
            None => json!({}),
        };
        // Sequential: a CLI with a token answers anything before `connect` completes with
        // AUTHENTICATION_REQUIRED, and it serves requests concurrently.
        w.write_all(&encode_frame(&rpc::request(1, "connect", &params)))
            .await
            .map_err(|e| format!("write: {e}"))?;
        w.flush().await.map_err(|e| format!("write: {e}"))?;
        let v = await_reply(&mut reader, 1).await?;
        if let Some(err) = v.get("error") {
            if err.get("code").and_then(Value::as_i64) != Some(rpc::METHOD_NOT_FOUND) {
                return Err(format!("connect failed: {err}"));
            }
        }
        if let Some(ver) = v.pointer("/result/version").and_then(Value::as_str) {
            *b.version.lock().unwrap_or_else(|e| e.into_inner()) = Some(ver.to_string());
        }
        w.write_all(&encode_frame(&rpc::request(
            2,
            "ping",
            &json!({"message": "copilot-lb health"}),
        )))
        .await
        .map_err(|e| format!("write: {e}"))?;
        w.flush().await.map_err(|e| format!("write: {e}"))?;
        let v = await_reply(&mut reader, 2).await?;
        if let Some(err) = v.get("error") {
            return Err(format!("ping failed: {err}"));
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

async fn await_reply(
    reader: &mut FrameReader<crate::tls::BoxRead>,
    id: u64,
) -> Result<Value, String> {
    loop {
        let f = reader
            .read_frame()
            .await
            .map_err(|e| format!("read: {e}"))?
            .ok_or("closed by backend")?;
        let Ok(env) = envelope::parse(&f) else {
            continue;
        };
        if env.kind == Kind::Response && env.id_u64() == Some(id) {
            return serde_json::from_slice(&f).map_err(|e| e.to_string());
        }
    }
}

async fn prober(shared: Arc<Shared>, b: Arc<Backend>) {
    loop {
        let cfg = shared.config();
        let res = probe(&b, cfg.health.timeout.0).await;
        let l = BackendLabels {
            backend: b.name.clone(),
        };
        match res {
            Ok(d) => {
                shared
                    .metrics
                    .probe_duration
                    .get_or_create(&l)
                    .observe(d.as_secs_f64());
                record(
                    &shared,
                    &b,
                    true,
                    &format!("ok in {:.1} ms", d.as_secs_f64() * 1000.0),
                );
            }
            Err(e) => {
                shared.metrics.probe_failures.get_or_create(&l).inc();
                record(&shared, &b, false, &e);
            }
        }
        // While a verdict is pending (some failures, still up) probe fast, so a dead backend is
        // confirmed within fall × fast interval rather than fall × interval.
        let suspect = b.fails.load(Ordering::Relaxed) > 0 && b.healthy();
        let base = if suspect {
            (cfg.health.interval.0 / 8).max(Duration::from_millis(50))
        } else {
            cfg.health.interval.0
        };
        let jitter = rand::rng().random_range(0.9..1.1);
        let wait = base.mul_f64(jitter);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = b.probe_now.notified(), if !suspect => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Keeps one prober per backend in the pool, following reloads.
pub async fn supervise(shared: Arc<Shared>) {
    let mut running: HashMap<usize, (Arc<Backend>, JoinHandle<()>)> = HashMap::new();
    loop {
        let all = shared.pool.all();
        let live: Vec<usize> = all.iter().map(|b| Arc::as_ptr(b) as usize).collect();
        running.retain(|k, (_, h)| {
            let keep = live.contains(k);
            if !keep {
                h.abort();
            }
            keep
        });
        for b in all.iter() {
            let k = Arc::as_ptr(b) as usize;
            running
                .entry(k)
                .or_insert_with(|| (b.clone(), tokio::spawn(prober(shared.clone(), b.clone()))));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shared.shutdown.cancelled() => {
                for (_, (_, h)) in running.drain() { h.abort(); }
                return;
            }
        }
    }
}
