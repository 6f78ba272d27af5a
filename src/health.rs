//! Health: active probes (TCP connect, `connect` with the backend token, `ping`) on a dedicated
//! connection, plus passive signals from live traffic, with rise/fall thresholds so a single
//! failed probe never moves a session.

use crate::backend::{Backend, Check};
use crate::metrics::{BackendLabels, TransitionLabels};
use crate::proxy::Shared;
use rand::Rng;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
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

/// One active probe: TCP (or TLS) connect, `connect` with the backend's token, `ping`.
pub async fn probe(b: &Backend, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let run = async {
        let (mut reader, mut w) = b.open().await?;
        let v = crate::backend::request(
            &mut reader,
            &mut w,
            1,
            "ping",
            &json!({"message": "copilot-lb health"}),
        )
        .await?;
        match v.get("error") {
            Some(err) => Err(format!("ping failed: {err}")),
            None => Ok(()),
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("timed out after {timeout:?}")),
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
