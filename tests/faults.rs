//! Faults: double backend failures, framing corners, hostile frames, client reconnects.
//! Over real loopback sockets against fake CLI servers.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn send_params(sid: &str, prompt: &str) -> Value {
    json!({"sessionId": sid, "prompt": prompt})
}

/// Two of three backends die within a millisecond; every session answers its next request,
/// on the survivor, with its history, within a second of the kill. Five rounds, fresh each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_backends_dying_at_once_lose_no_request() {
    within(T, async {
        for round in 0..5 {
            let fakes = fakes(3, true).await;
            let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
            let mut cfg = config(&addrs);
            cfg.sessions.shared_storage = true;
            cfg.health.fall = 3;
            let (running, addr) = proxy(cfg).await;
            let mut c = Client::connected(addr).await;
            let ids: Vec<String> = (0..12).map(|i| format!("df-{round}-{i}")).collect();
            for sid in &ids {
                c.ok("session.create", json!({"sessionId": sid})).await;
                c.ok("session.send", send_params(sid, "one")).await;
            }
            c.drain(Duration::from_millis(50), Duration::from_secs(2))
                .await;
            // The survivor is the backend with the fewest sessions, so most must move.
            let survivor = (0..3)
                .min_by_key(|i| fakes[*i].sessions_live().len())
                .unwrap();
            let killed = Instant::now();
            for (i, f) in fakes.iter().enumerate() {
                if i != survivor {
                    f.kill();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            for sid in &ids {
                let id = c.fresh_id();
                c.send_request(&id, "session.send", &send_params(sid, "two"))
                    .await;
                let f = c.response(&id).await;
                assert!(
                    f.json.get("result").is_some(),
                    "round {round}: {sid}: {}",
                    f.text()
                );
            }
            let slowest = killed.elapsed();
            assert!(
                slowest < Duration::from_secs(1),
                "round {round}: the last answer came {slowest:?} after the kill"
            );
            for sid in &ids {
                let h = holders(&fakes, sid);
                assert_eq!(h.len(), 1, "{sid} live on {} backends", h.len());
                assert_eq!(h[0].addr(), fakes[survivor].addr(), "{sid}");
                // History: the stored session holds both turns.
                let stored = fakes[0].storage().get(sid).expect("stored");
                let prompts = stored
                    .history
                    .iter()
                    .filter(|e| e["type"] == "user.message")
                    .count();
                assert_eq!(prompts, 2, "round {round}: {sid} history");
            }
            drop(running);
        }
    })
    .await;
}
