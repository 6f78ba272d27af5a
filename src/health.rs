//! Health: active probes (TCP connect, `connect` with the backend token, `ping`) on a dedicated
//! connection, plus passive signals from live traffic, with rise/fall thresholds so a single
//! failed probe never moves a session.

use crate::backend::{Backend, Check};
use crate::config::HealthConfig;
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

/// Where a backend is in the probe schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Up, last check passed.
    Healthy,
    /// Up, but the last checks failed: confirm or clear quickly.
    Suspect,
    /// Marked down; `failed` probes since it went down.
    Down { failed: u32 },
}

impl Phase {
    fn of(b: &Backend, fall: u32) -> Phase {
        let fails = b.fails.load(Ordering::Relaxed);
        match (b.healthy(), fails) {
            (true, 0) => Phase::Healthy,
            (true, _) => Phase::Suspect,
            (false, n) => Phase::Down {
                failed: n.saturating_sub(fall),
            },
        }
    }
}

/// The fast interval used while a verdict is pending, and the least time between two probes.
pub(crate) fn fast_interval(cfg: &HealthConfig) -> Duration {
    (cfg.interval.0 / 8).max(Duration::from_millis(50))
}

/// Time until the next probe (before jitter). A down backend is probed at `interval`, doubling
/// with each further failure up to `max_down_interval`: a dead or remote host costs a probe
/// every few seconds per replica, never a connect loop.
pub(crate) fn next_delay(phase: Phase, cfg: &HealthConfig) -> Duration {
    match phase {
        Phase::Healthy => cfg.interval.0,
        Phase::Suspect => fast_interval(cfg).min(cfg.interval.0),
        Phase::Down { failed } => {
            let cap = cfg.max_down_interval.0.max(cfg.interval.0);
            cfg.interval
                .0
                .checked_mul(1u32 << failed.min(16))
                .map_or(cap, |d| d.min(cap))
        }
    }
}

async fn prober(shared: Arc<Shared>, b: Arc<Backend>) {
    loop {
        let cfg = shared.config();
        let started = Instant::now();
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
        let phase = Phase::of(&b, cfg.health.fall);
        let jitter = rand::rng().random_range(0.9..1.1);
        let wait = next_delay(phase, &cfg.health).mul_f64(jitter);
        // Only a healthy backend takes an early probe from a live-traffic failure; once it is
        // suspect or down the schedule alone decides, so failures can never feed a loop.
        let early = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = b.probe_now.notified(), if phase == Phase::Healthy => true,
            _ = shared.shutdown.cancelled() => return,
        };
        if early {
            let gap = fast_interval(&cfg.health).saturating_sub(started.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(gap) => {}
                _ = shared.shutdown.cancelled() => return,
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Millis;

    fn cfg(interval_ms: u64, cap_ms: u64) -> HealthConfig {
        HealthConfig {
            interval: Millis(Duration::from_millis(interval_ms)),
            max_down_interval: Millis(Duration::from_millis(cap_ms)),
            ..HealthConfig::default()
        }
    }

    #[test]
    fn down_backends_back_off_to_the_cap() {
        let c = cfg(2000, 10_000);
        let d = |failed| next_delay(Phase::Down { failed }, &c).as_millis();
        assert_eq!(d(0), 2000);
        assert_eq!(d(1), 4000);
        assert_eq!(d(2), 8000);
        assert_eq!(d(3), 10_000);
        assert_eq!(d(u32::MAX), 10_000);
    }

    #[test]
    fn never_probes_faster_than_the_fast_interval() {
        for (i, cap) in [(1, 1), (100, 50), (2000, 10_000), (u64::MAX / 4, 1)] {
            let c = cfg(i, cap);
            for p in [
                Phase::Healthy,
                Phase::Suspect,
                Phase::Down { failed: 0 },
                Phase::Down { failed: 40 },
            ] {
                let d = next_delay(p, &c);
                assert!(
                    d >= fast_interval(&c).min(c.interval.0),
                    "{p:?} {i} {cap}: {d:?}"
                );
            }
        }
        assert_eq!(
            next_delay(Phase::Suspect, &cfg(2000, 1)),
            Duration::from_millis(250)
        );
    }
}
