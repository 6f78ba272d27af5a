//! A 2-minute soak in the default suite (issue #10, "Soak"): the soak path of
//! `benches/chaos.rs` (clients creating, using and deleting sessions through a copilot-lb
//! process in front of three fake CLIs sharing storage), with fewer clients. It fails on any
//! error, on RSS leaving ±5 % after the warm-up, and on fds, threads, connections, links or
//! sessions not back to the baseline at the end. The long run is `scripts/soak.sh` (30 min,
//! 500 clients).
//!
//! `COPILOT_LB_SOAK_MINUTES` and `COPILOT_LB_SOAK_CLIENTS` override the 2 minutes and 40
//! clients.

#[path = "../benches/lg/mod.rs"]
mod lg;

#[path = "../benches/chaos/mod.rs"]
mod chaos;

use std::path::PathBuf;
use std::time::Duration;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn soak_two_minutes() {
    let minutes: f64 = env_or("COPILOT_LB_SOAK_MINUTES", 2.0);
    let clients: usize = env_or("COPILOT_LB_SOAK_CLIENTS", 40);
    let mut o = chaos::soak::Opts::new(
        minutes,
        clients,
        PathBuf::from(env!("CARGO_BIN_EXE_copilot-lb")),
    );
    o.think = Duration::from_millis(500);
    o.warmup = o.duration / 3;
    let bound = o.duration + Duration::from_secs(180);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let r = rt
        .block_on(async { tokio::time::timeout(bound, chaos::soak::run(o)).await })
        .unwrap_or_else(|_| panic!("soak did not finish within {bound:?}"))
        .expect("soak setup failed");
    let text = chaos::soak::render(&r);
    println!("{text}");
    assert!(r.failed.is_empty(), "{text}");
    assert!(r.samples.len() >= 3, "{text}");
}
