//! Health checking against dead backends must cost almost nothing. Its own test binary, so the
//! process's CPU time measures the prober alone.

mod common;

use common::*;
use std::time::Duration;

/// User + system CPU time of this process, from /proc (clock ticks are 100 Hz on Linux).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A port nothing listens on (bound once, then released).
fn dead_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_backend_is_probed_at_the_interval_not_in_a_loop() {
    within(Duration::from_secs(20), async {
        let dead = [dead_port(), dead_port()];
        let mut cfg = config(&dead);
        cfg.health.interval = copilot_lb::config::Millis(Duration::from_millis(200));
        let (run, _addr) = proxy(cfg).await;
        // Let both backends be marked down first.
        assert!(
            eventually(Duration::from_secs(5), || run
                .shared
                .pool
                .all()
                .iter()
                .all(|b| !b.healthy()))
            .await
        );
        let before: Vec<u32> = run
            .shared
            .pool
            .all()
            .iter()
            .map(|b| b.consecutive_failures())
            .collect();
        let cpu0 = cpu_time();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let cpu = cpu_time() - cpu0;
        for (b, n0) in run.shared.pool.all().iter().zip(before) {
            let probes = b.consecutive_failures() - n0;
            // 3 s at a 200 ms interval is at most ~16 probes; back-off makes it fewer.
            assert!(
                probes <= 16,
                "backend {} was probed {probes} times in 3 s",
                b.name
            );
        }
        assert!(
            cpu < Duration::from_millis(500),
            "the prober used {cpu:?} of CPU in 3 s with two dead backends"
        );
    })
    .await;
}

#[tokio::test]
async fn live_traffic_failures_trigger_at_most_one_early_probe() {
    within(Duration::from_secs(20), async {
        let dead = [dead_port()];
        let mut cfg = config(&dead);
        cfg.health.interval = copilot_lb::config::Millis(Duration::from_millis(300));
        cfg.health.fall = u32::MAX; // stays "up": the suspect path, not the down path
        let (run, _addr) = proxy(cfg).await;
        let b = run.shared.pool.all()[0].clone();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n0 = b.consecutive_failures();
        // A storm of passive failures from live traffic.
        let refused = copilot_lb::backend::CallError::Closed;
        for _ in 0..10_000 {
            copilot_lb::health::passive_failure(&run.shared, &b, &refused);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let active = b.consecutive_failures() - n0 - 10_000;
        // Suspect probing runs at interval/8 (≥ 50 ms): ~20 in a second, not thousands.
        assert!(active <= 25, "{active} probes in 1 s after a passive storm");
    })
    .await;
}
