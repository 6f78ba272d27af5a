//! Noisy neighbours (issue #12): a tenant's rate limit and cap on concurrent turns, and fair
//! admission of turns to a saturated backend. Over real loopback sockets against the fake
//! CLI, whose `session.send` with `testTurnMs` is a turn that takes that long.

mod common;

use common::*;
use copilot_lb::config::Config;
use copilot_lb::rpc;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(40);

/// A proxy in front of one fake with tenants a and b; `backend`, `balancing` and `b` are
/// YAML flow-mapping entries added to the backend, `balancing:` and tenant b.
async fn setup(
    backend: &str,
    balancing: &str,
    b: &str,
) -> (
    test_support::fake_cli::FakeCli,
    copilot_lb::app::Running,
    SocketAddr,
) {
    let fake = fakes(1, true).await.remove(0);
    let yaml = format!(
        "listeners: [{{listen: 127.0.0.1:0}}]\nbackends: [{{address: {}{backend}}}]\nbalancing: {{bounded_load: 1.25{balancing}}}\nhealth: {{interval: 100ms, timeout: 500ms}}\ntenants:\n  - {{name: a, token_hashes: [\"{}\"]}}\n  - {{name: b, token_hashes: [\"{}\"]{b}}}\n{}",
        fake.addr(),
        copilot_lb::auth::hash_token("tok-a"),
        copilot_lb::auth::hash_token("tok-b"),
        fake_routing_yaml(),
    );
    let cfg = Config::from_yaml(&yaml, "noisy").expect("config");
    let (running, addr) = proxy(cfg).await;
    (fake, running, addr)
}

async fn as_tenant(addr: SocketAddr, token: &str) -> Client {
    let mut c = Client::connect(addr).await;
    c.ok("connect", json!({"token": token})).await;
    c
}

fn send(sid: &str, turn_ms: u64) -> Value {
    json!({"sessionId": sid, "prompt": "hi", "testTurnMs": turn_ms})
}

/// Asserts a -32016 refusal naming `limit`, retryable.
fn limited(f: &common::Frame, limit: &str) {
    assert_eq!(f.error_code(), Some(rpc::RATE_LIMITED), "{}", f.text());
    let d = &f.json["error"]["data"];
    assert_eq!(d["retryable"], true, "{}", f.text());
    assert_eq!(d["limit"], limit, "{}", f.text());
}

/// Waits until `sid`'s turn ends (its `session.idle` reaches `c`).
async fn idle(c: &mut Client, sid: &str, within: Duration) -> bool {
    let sid = sid.to_string();
    c.wait_notes(within, |n| {
        n.iter().any(|f| {
            f.method() == Some("session.event")
                && f.session() == Some(sid.as_str())
                && f.event_type() == Some("session.idle")
        })
    })
    .await
}

#[tokio::test]
async fn a_tenants_rate_limit_refuses_retryably_and_spares_local_calls_and_others() {
    within(T, async {
        let (_fake, _run, addr) =
            setup("", "", ", rate_limit: {requests_per_second: 1, burst: 3}").await;
        let mut b = as_tenant(addr, "tok-b").await;
        for i in 0..3 {
            b.ok("test.echo", json!({"payload": i})).await;
        }
        let r = b.call("test.echo", json!({"payload": 3})).await;
        limited(&r, "rate_limit");
        let wait = r.json["error"]["data"]["retryAfterMs"].as_u64().unwrap();
        assert!((1..=1000).contains(&wait), "{}", r.text());
        let m = r.json["error"]["message"].as_str().unwrap();
        assert!(m.contains("rate limit") && m.contains("retry in"), "{m}");
        // Answered by the proxy itself: not limited.
        for _ in 0..20 {
            b.ok("ping", json!({})).await;
        }
        // Another connection of b shares the bucket; tenant a has its own (none).
        let mut b2 = as_tenant(addr, "tok-b").await;
        limited(&b2.call("test.echo", json!({})).await, "rate_limit");
        let mut a = as_tenant(addr, "tok-a").await;
        for i in 0..20 {
            a.ok("test.echo", json!({"payload": i})).await;
        }
        tokio::time::sleep(Duration::from_millis(wait + 50)).await;
        b.ok("test.echo", json!({"payload": "again"})).await;
    })
    .await;
}

#[tokio::test]
async fn a_tenants_turns_are_capped_across_connections_until_each_turn_ends() {
    within(T, async {
        let (_fake, _run, addr) = setup("", "", ", max_concurrent_turns: 2").await;
        let mut c1 = as_tenant(addr, "tok-b").await;
        let mut c2 = as_tenant(addr, "tok-b").await;
        for s in ["b-1", "b-2"] {
            c1.ok("session.create", json!({"sessionId": s})).await;
        }
        for s in ["b-3", "b-4", "b-5", "b-6"] {
            c2.ok("session.create", json!({"sessionId": s})).await;
        }
        c1.ok("session.send", send("b-1", 5000)).await;
        c1.ok("session.send", send("b-2", 5000)).await;
        // A second send into a running turn adds no turn.
        c1.ok("session.send", send("b-1", 5000)).await;
        // The cap holds across b's connections...
        let r = c2.call("session.send", send("b-3", 100)).await;
        limited(&r, "max_concurrent_turns");
        assert_eq!(r.json["error"]["data"]["max"], 2, "{}", r.text());
        // ...and not for tenant a.
        let mut a = as_tenant(addr, "tok-a").await;
        a.ok("session.create", json!({"sessionId": "a-1"})).await;
        a.ok("session.send", send("a-1", 100)).await;
        // The connection holding b's two turns closes: they no longer count.
        drop(c1);
        let mut ok = false;
        for _ in 0..50 {
            let r = c2.call("session.send", send("b-3", 5000)).await;
            if r.json.get("result").is_some() {
                ok = true;
                break;
            }
            limited(&r, "max_concurrent_turns");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "closing the connection released its turns");
        // The turn's session.idle ends it.
        c2.ok("session.send", send("b-4", 200)).await;
        limited(
            &c2.call("session.send", send("b-5", 100)).await,
            "max_concurrent_turns",
        );
        assert!(idle(&mut c2, "b-4", Duration::from_secs(5)).await);
        c2.ok("session.send", send("b-5", 5000)).await;
        // Detaching a session ends its turn's count.
        limited(
            &c2.call("session.send", send("b-6", 100)).await,
            "max_concurrent_turns",
        );
        c2.ok("session.detach", json!({"sessionId": "b-5"})).await;
        c2.ok("session.send", send("b-6", 100)).await;
    })
    .await;
}

#[tokio::test]
async fn a_saturated_backend_gives_a_freed_slot_to_the_tenant_with_fewest_turns() {
    within(T, async {
        let (_fake, _run, addr) = setup(", max_concurrent_turns: 2", "", "").await;
        let mut b = as_tenant(addr, "tok-b").await;
        let mut a = as_tenant(addr, "tok-a").await;
        for s in ["b-1", "b-2", "b-3"] {
            b.ok("session.create", json!({"sessionId": s})).await;
        }
        a.ok("session.create", json!({"sessionId": "a-1"})).await;
        b.ok("session.send", send("b-1", 800)).await;
        b.ok("session.send", send("b-2", 4000)).await;
        // The backend is full: b's third turn waits, then a's.
        let b3 = b.fresh_id();
        b.send_request(&b3, "session.send", &send("b-3", 4000))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let a1 = a.fresh_id();
        a.send_request(&a1, "session.send", &send("a-1", 100)).await;
        assert!(
            b.try_response(&b3, Duration::from_millis(300))
                .await
                .is_none(),
            "b's third turn waits"
        );
        // b-1 ends at ~800 ms: the slot goes to a (0 turns there), not to b's earlier waiter.
        let r = a.try_response(&a1, Duration::from_secs(10)).await.unwrap();
        assert!(r.json.get("result").is_some(), "{}", r.text());
        assert!(idle(&mut a, "a-1", Duration::from_secs(10)).await);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(2500),
            "a's turn waited {took:?}: first come, first served would make it wait for b-2 (4 s)"
        );
        // b's waiter is admitted next, not dropped.
        let r = b.try_response(&b3, Duration::from_secs(10)).await.unwrap();
        assert!(r.json.get("result").is_some(), "{}", r.text());
    })
    .await;
}

#[tokio::test]
async fn a_full_turn_queue_refuses_retryably_and_a_lighter_tenant_displaces_the_heaviest() {
    within(T, async {
        let (_fake, _run, addr) =
            setup(", max_concurrent_turns: 1", ", max_waiting_turns: 1", "").await;
        let mut b = as_tenant(addr, "tok-b").await;
        let mut a = as_tenant(addr, "tok-a").await;
        for s in ["b-1", "b-2", "b-3"] {
            b.ok("session.create", json!({"sessionId": s})).await;
        }
        a.ok("session.create", json!({"sessionId": "a-1"})).await;
        b.ok("session.send", send("b-1", 1000)).await;
        let b2 = b.fresh_id();
        b.send_request(&b2, "session.send", &send("b-2", 100)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Queue full, and b holds the most: b's next turn is refused at once.
        let r = b.call("session.send", send("b-3", 100)).await;
        limited(&r, "backend_max_concurrent_turns");
        assert!(r.json["error"]["data"]["retryAfterMs"].as_u64().is_some());
        // a has nothing there: its turn takes b's place in the queue.
        let a1 = a.fresh_id();
        a.send_request(&a1, "session.send", &send("a-1", 100)).await;
        let r = b.try_response(&b2, Duration::from_secs(5)).await.unwrap();
        limited(&r, "backend_max_concurrent_turns");
        assert!(
            r.json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("fewer turns"),
            "{}",
            r.text()
        );
        let r = a.try_response(&a1, Duration::from_secs(5)).await.unwrap();
        assert!(r.json.get("result").is_some(), "{}", r.text());
    })
    .await;
}

#[tokio::test]
async fn a_turn_waits_for_a_backend_slot_no_longer_than_turn_wait() {
    within(T, async {
        let (_fake, _run, addr) =
            setup(", max_concurrent_turns: 1", ", turn_wait: 300ms", "").await;
        let mut b = as_tenant(addr, "tok-b").await;
        let mut a = as_tenant(addr, "tok-a").await;
        b.ok("session.create", json!({"sessionId": "b-1"})).await;
        a.ok("session.create", json!({"sessionId": "a-1"})).await;
        b.ok("session.send", send("b-1", 5000)).await;
        let t0 = Instant::now();
        let r = a.call("session.send", send("a-1", 100)).await;
        limited(&r, "backend_max_concurrent_turns");
        assert!(
            r.json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("turn_wait"),
            "{}",
            r.text()
        );
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // The connection was not blocked meanwhile, and still works.
        a.ok("test.echo", json!({})).await;
    })
    .await;
}
