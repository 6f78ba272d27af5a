//! Health: active probes (TCP connect, `connect` with the backend token, `ping`) on a dedicated
//! connection, plus passive signals from live traffic, with rise/fall thresholds so a single
//! failed probe never moves a session.

use crate::backend::{Backend, CallError};
use crate::config::HealthConfig;
use crate::context::Shared;
use rand::Rng;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Records one observation (with a successful probe's latency) and applies rise/fall; logs and
/// counts a transition. Returns true if the state changed.
pub fn record(
    shared: &Shared,
    b: &Arc<Backend>,
    ok: bool,
    latency: Option<Duration>,
    detail: &str,
) -> bool {
    let cfg = shared.config();
    let Some(up) = b.observe(ok, latency, detail, cfg.health.rise, cfg.health.fall) else {
        return false;
    };
    if up {
        info!(backend = %b.name, address = %b.address, "backend is UP");
    } else {
        warn!(backend = %b.name, address = %b.address, failures = b.consecutive_failures(), last = %detail, "backend is DOWN");
    }
    shared.metrics.transition(&b.name, b.state().as_str());
    true
}

/// A failure seen on live traffic (refused, reset, timeout, …): counts toward `fall`, and
/// asks for one early probe to confirm (ignored unless the backend was healthy).
pub fn passive_failure(shared: &Shared, b: &Arc<Backend>, error: &CallError) {
    let kind = error.kind().as_str();
    shared.metrics.passive_failure(&b.name, kind);
    record(shared, b, false, None, &format!("passive {kind}: {error}"));
    b.probe_soon();
}

/// One active probe: TCP (or TLS) connect, `connect` with the backend's token, `ping`.
pub async fn probe(b: &Backend, timeout: Duration) -> Result<Duration, CallError> {
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
            Some(err) => Err(CallError::Ping(err.to_string())),
            None => Ok(()),
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(CallError::Timeout {
            what: "the probe",
            after: timeout,
        }),
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
        let fails = b.consecutive_failures();
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
        shared
            .metrics
            .probe(&b.name, res.as_ref().map(|d| *d).map_err(|_| ()));
        match res {
            Ok(d) => {
                record(
                    &shared,
                    &b,
                    true,
                    Some(d),
                    &format!("ok in {:.1} ms", d.as_secs_f64() * 1000.0),
                );
            }
            Err(e) => {
                record(
                    &shared,
                    &b,
                    false,
                    None,
                    &format!("{}: {e}", e.kind().as_str()),
                );
            }
        }
        let phase = Phase::of(&b, cfg.health.fall);
        let jitter = rand::rng().random_range(0.9..1.1);
        let wait = next_delay(phase, &cfg.health).mul_f64(jitter);
        // Only a healthy backend takes an early probe from a live-traffic failure; once it is
        // suspect or down the schedule alone decides, so failures can never feed a loop.
        let early = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = b.probe_requested(), if phase == Phase::Healthy => true,
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
