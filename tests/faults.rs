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

fn nested(levels: usize) -> String {
    format!("{}{}", "[".repeat(levels), "]".repeat(levels))
}

/// `Content-Length: 999999999999` and one byte: the error comes at once, then the connection
/// closes (nobody can skip a terabyte); a well-behaved connection is unaffected.
#[tokio::test]
async fn an_unskippable_length_is_answered_at_once_and_closes() {
    within(T, async {
        let fakes = fakes(1, false).await;
        let (_run, addr) = proxy(config(&[fakes[0].addr()])).await;
        let mut c = Client::connected(addr).await;
        c.send_raw(b"Content-Length: 999999999999\r\n\r\n{").await;
        let f = c
            .any_response(Duration::from_secs(3))
            .await
            .expect("no answer to an oversized frame");
        assert_eq!(f.error_code(), Some(-32014), "{}", f.text());
        assert_eq!(f.json["id"], Value::Null);
        assert!(c.closed_within(Duration::from_secs(3)).await);
        let mut other = Client::connected(addr).await;
        other.ok("ping", json!({})).await;
    })
    .await;
}

/// An oversized frame is answered, with its id, as soon as its start arrives; once the body is
/// sent the same connection carries on.
#[tokio::test]
async fn an_oversized_frame_is_answered_before_its_body_is_sent() {
    within(T, async {
        let fakes = fakes(1, false).await;
        let mut cfg = config(&[fakes[0].addr()]);
        cfg.limits.max_frame_bytes = 64 * 1024;
        let (_run, addr) = proxy(cfg).await;
        let mut c = Client::connected(addr).await;
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":"big-1","method":"ping","params":{{"message":"{}"}}}}"#,
            "x".repeat(100_000)
        );
        let frame = copilot_lb::codec::encode_frame(body.as_bytes());
        c.send_raw(&frame[..200]).await;
        let f = c
            .any_response(Duration::from_secs(3))
            .await
            .expect("no answer before the body was sent");
        assert_eq!(f.error_code(), Some(-32014), "{}", f.text());
        assert_eq!(f.json["id"], "big-1");
        c.send_raw(&frame[200..]).await;
        let r = c.call("ping", json!({"message": "after"})).await;
        assert_eq!(r.json["result"]["message"], "pong: after", "{}", r.text());
    })
    .await;
}

/// RFC 8259 text is UTF-8: a body that is not gets -32700, never a `pong`.
#[tokio::test]
async fn a_body_that_is_not_utf8_is_a_parse_error() {
    within(T, async {
        let fakes = fakes(1, false).await;
        let (_run, addr) = proxy(config(&[fakes[0].addr()])).await;
        let mut c = Client::connected(addr).await;
        c.send_body(b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"ping\",\"params\":{\"message\":\"\xff\xfeok\"}}")
            .await;
        let f = c.response("5").await;
        assert_eq!(f.error_code(), Some(-32700), "{}", f.text());
        c.ok("ping", json!({})).await;
    })
    .await;
}

/// Nesting past `limits.max_json_depth` is refused by the proxy, with the request's id.
#[tokio::test]
async fn deep_nesting_is_refused_by_the_proxy() {
    within(T, async {
        let fakes = fakes(1, false).await;
        let (_run, addr) = proxy(config(&[fakes[0].addr()])).await;
        let mut c = Client::connected(addr).await;
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":"deep","method":"session.create","params":{{"x":{}}}}}"#,
            nested(100_000)
        );
        c.send_body(body.as_bytes()).await;
        let f = c.response("\"deep\"").await;
        assert_eq!(f.error_code(), Some(-32700), "{}", f.text());
        assert_eq!(fakes[0].requests("session.create"), 0);
        c.ok("ping", json!({})).await;
    })
    .await;
}

/// A backend that cannot parse a frame answers `id: null`; with one request outstanding on the
/// link, that error is delivered to it instead of being dropped.
#[tokio::test]
async fn a_null_id_backend_error_reaches_the_only_request_in_flight() {
    within(T, async {
        let fakes = fakes(1, false).await;
        let mut cfg = config(&[fakes[0].addr()]);
        cfg.limits.max_json_depth = 1_000_000;
        let (_run, addr) = proxy(cfg).await;
        let mut c = Client::connected(addr).await;
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":"deep","method":"session.create","params":{{"sessionId":"nn-1","x":{}}}}}"#,
            nested(50_000)
        );
        c.send_body(body.as_bytes()).await;
        let f = c
            .try_response("\"deep\"", Duration::from_secs(5))
            .await
            .expect("the backend's null-id error was dropped");
        assert_eq!(f.error_code(), Some(-32700), "{}", f.text());
        c.ok("ping", json!({})).await;
    })
    .await;
}

/// A client closes and a new one resumes its session at once: the resume follows the CLI's
/// cleanup of the old connection (which is asynchronous), as it would on a direct connection,
/// so the session is not reported as still active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_right_after_a_client_closes_follows_the_cli_cleanup() {
    within(T, async {
        let fakes = fakes(1, false).await;
        fakes[0].set_cleanup_delay(Duration::from_millis(100));
        let (_run, addr) = proxy(config(&[fakes[0].addr()])).await;
        for i in 0..3 {
            let sid = format!("rc-{i}");
            let mut a = Client::connected(addr).await;
            a.ok("session.create", json!({"sessionId": sid})).await;
            a.ok("session.send", send_params(&sid, "one")).await;
            drop(a); // force_stop: the socket just closes
            let mut b = Client::connected(addr).await;
            b.ok("session.resume", json!({"sessionId": sid})).await;
            let ok = b
                .wait_notes(Duration::from_secs(5), |n| {
                    n.iter().any(|f| {
                        f.json["params"]["event"]["type"] == "session.resume"
                            && f.session() == Some(sid.as_str())
                    })
                })
                .await;
            assert!(ok, "no session.resume event for {sid}");
            let ev = b
                .notes
                .iter()
                .find(|f| f.json["params"]["event"]["type"] == "session.resume")
                .unwrap();
            assert_eq!(
                ev.json["params"]["event"]["data"]["sessionWasActive"],
                false,
                "{}",
                ev.text()
            );
        }
    })
    .await;
}

/// A headless CLI answers `session.getForeground` with `{}`; so does the proxy.
#[tokio::test]
async fn get_foreground_is_answered_like_a_headless_cli() {
    within(T, async {
        let fakes = fakes(1, false).await;
        let (_run, addr) = proxy(config(&[fakes[0].addr()])).await;
        let mut c = Client::connected(addr).await;
        let r = c.call("session.getForeground", json!({})).await;
        assert_eq!(r.json["result"], json!({}), "{}", r.text());
    })
    .await;
}

/// A session idle on a backend that is killed and restarted is resumed on it again at its next
/// request: the new CLI process has it on disk, not live for the proxy's new link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_idle_through_its_backends_restart_is_resumed_there() {
    within(T, async {
        let fakes = fakes(1, false).await;
        let (run, addr) = proxy(config(&[fakes[0].addr()])).await;
        let mut c = Client::connected(addr).await;
        c.ok("session.create", json!({"sessionId": "rs-idle"}))
            .await;
        c.ok("session.send", send_params("rs-idle", "one")).await;
        fakes[0].kill();
        let b = run.shared.pool.all()[0].clone();
        assert!(eventually(Duration::from_secs(5), || !b.healthy()).await);
        fakes[0].restart().await.expect("restart");
        assert!(eventually(Duration::from_secs(5), || b.healthy() && b.confirmed()).await);
        let f = c.call("session.send", send_params("rs-idle", "two")).await;
        assert!(f.json.get("result").is_some(), "{}", f.text());
        let stored = fakes[0].storage().get("rs-idle").expect("stored");
        let prompts = stored
            .history
            .iter()
            .filter(|e| e["type"] == "user.message")
            .count();
        assert_eq!(prompts, 2);
    })
    .await;
}

/// New sessions created just after two of three backends died, before health marks them
/// down, all land on the survivor: each create walks past every backend that failed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_right_after_a_double_failure_all_land_on_the_survivor() {
    within(T, async {
        for round in 0..3 {
            let fakes = fakes(3, true).await;
            let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
            let mut cfg = config(&addrs);
            cfg.sessions.shared_storage = true;
            cfg.health.fall = 1000; // health must not decide this: the walk must
            let (_run, addr) = proxy(cfg).await;
            let mut c = Client::connected(addr).await;
            fakes[0].kill();
            fakes[1].kill();
            // Ids whose ranking puts both dead backends before the survivor.
            let names = names(&fakes);
            let ids: Vec<String> = (0..)
                .map(|i| format!("dc-{round}-{i}"))
                .filter(|sid| {
                    let order =
                        copilot_lb::balance::rank(sid, names.iter().map(|n| (n.as_str(), 1.0)));
                    order[2] == 2
                })
                .take(10)
                .collect();
            for sid in ids {
                let f = c.call("session.create", json!({"sessionId": sid})).await;
                assert!(f.json.get("result").is_some(), "{sid}: {}", f.text());
                assert_eq!(holders(&fakes, &sid)[0].addr(), fakes[2].addr());
            }
        }
    })
    .await;
}

/// A create in flight on a backend that freezes gets -32011; retrying it (same id) is placed
/// on a live backend instead of waiting for the frozen one to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_lost_in_flight_can_be_retried_elsewhere() {
    within(T, async {
        let fakes = fakes(2, true).await;
        let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
        let mut cfg = config(&addrs);
        cfg.sessions.shared_storage = true;
        let (_run, addr) = proxy(cfg).await;
        let names = names(&fakes);
        let on_first: Vec<String> = (0..)
            .map(|i| format!("cf-{i}"))
            .filter(|s| {
                copilot_lb::balance::rank(s, names.iter().map(|n| (n.as_str(), 1.0)))[0] == 0
            })
            .take(2)
            .collect();
        let sid = on_first[1].clone();
        let mut c = Client::connected(addr).await;
        // The link to the first backend exists before it freezes, so the create is written.
        c.ok("session.create", json!({"sessionId": on_first[0]}))
            .await;
        fakes[0].stall(true);
        let f = c.call("session.create", json!({"sessionId": sid})).await;
        assert_eq!(f.error_code(), Some(-32011), "{}", f.text());
        let f = c.call("session.create", json!({"sessionId": sid})).await;
        assert!(f.json.get("result").is_some(), "retry: {}", f.text());
        assert_eq!(holders(&fakes, &sid)[0].addr(), fakes[1].addr());
    })
    .await;
}

/// A client that closes its side sees the proxy close promptly, even with upstream links
/// open: waiting for a backend to release the client's sessions never holds up the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_client_is_not_held_by_its_links() {
    within(T, async {
        let fakes = fakes(1, false).await;
        // Like the real CLI, the fake closes its side only after an asynchronous cleanup: the
        // proxy's wait for that close must hold the backend socket only, never the client's.
        fakes[0].set_cleanup_delay(Duration::from_secs(1));
        let (_run, addr) = proxy(config(&[fakes[0].addr()])).await;
        for i in 0..3 {
            let mut c = Client::connected(addr).await;
            c.ok("session.create", json!({"sessionId": format!("cl-{i}")}))
                .await;
            c.shutdown_write().await;
            let started = Instant::now();
            assert!(
                c.closed_within(Duration::from_secs(5)).await,
                "never closed"
            );
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(300),
                "round {i}: the proxy closed {took:?} after the client did"
            );
        }
    })
    .await;
}

/// A client half-closes while the CLI waits for its answer to a callback: the client can no
/// longer answer, so the proxy must not hold the connection open waiting for that exchange
/// (on the code before the fix it waited out `limits.shutdown_timeout`).
#[tokio::test]
async fn a_half_closed_client_the_cli_is_asking_is_not_waited_on() {
    within(T, async {
        let fakes = fakes(1, false).await;
        let mut cfg = config(&[fakes[0].addr()]);
        cfg.limits.shutdown_timeout = copilot_lb::config::Millis(Duration::from_secs(20));
        let (_run, addr) = proxy(cfg).await;
        let mut c = Client::connected(addr).await;
        c.ok("session.create", json!({"sessionId": "hc-1"})).await;
        let params = json!({"sessionId": "hc-1", "method": "hooks.invoke", "params": {}});
        c.send_request(r#""cb""#, "test.callClient", &params).await;
        let asked = c.server_request(Duration::from_secs(5)).await;
        assert!(
            asked.is_some(),
            "the CLI's callback never reached the client"
        );
        c.shutdown_write().await;
        let started = Instant::now();
        assert!(
            c.closed_within(Duration::from_secs(5)).await,
            "the proxy kept a half-closed client open for a callback it can never answer"
        );
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "closed only after {took:?}");
    })
    .await;
}
