//! Frames longer than `limits.stream_above_bytes` go through as they arrive: forwarded once
//! their envelope is read, the rest copied and checked on the way. They must arrive whole and
//! byte for byte with the id rewritten, cost the proxy a buffer rather than the frame, and a
//! frame whose later bytes would change what the proxy routed on (a second `sessionId`, an
//! `id`) or are not JSON must never reach the backend whole.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// A payload with escapes, quotes, brackets and multi-byte characters throughout, so chunk
/// boundaries fall inside every kind of token.
fn payload(len: usize) -> String {
    let unit = "plain text \"quoted\" {braces} [brackets] back\\slash é ✓ 😀 \n\t";
    unit.repeat(len / unit.len() + 1)
}

fn streamed(running: &copilot_lb::app::Running, direction: &str) -> u64 {
    let text = running.shared.render_metrics();
    let key = format!("copilot_lb_streamed_frames_total{{direction=\"{direction}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_frames_go_through_whole_in_both_directions() {
    within(Duration::from_secs(60), async {
        let Fixture {
            fakes: _fakes,
            running,
            addr,
        } = Fixture::start(1, false).await;
        let mut c = Client::connected(addr).await;
        let sid = c.ok("session.create", json!({})).await["sessionId"]
            .as_str()
            .unwrap()
            .to_string();
        for len in [300 * 1024, 3 << 20] {
            let p = payload(len);
            // A string id, so the rewritten and restored id differ in length.
            // Envelope first, as the SDKs write it (json! would sort `payload` first).
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":"big-one","method":"test.echo","params":{{"sessionId":"{sid}","payload":{}}}}}"#,
                Value::from(p.as_str())
            );
            c.send_body(body.as_bytes()).await;
            let r = c.response("\"big-one\"").await;
            let text = r.text();
            assert_eq!(r.json["id"], "big-one", "{:.300}", text);
            // Compared as a flag: a failure must not print megabytes.
            let same = r.json["result"]["payload"].as_str() == Some(p.as_str());
            assert!(same, "{len}: {:.300}", text);
        }
        assert_eq!(streamed(&running, "client_in"), 2);
        assert_eq!(streamed(&running, "backend_in"), 2);
        // A body that names its session after the big value (keys sorted) is carried whole.
        let p = payload(1 << 20);
        let r = c
            .ok("test.echo", json!({"sessionId": sid, "payload": p}))
            .await;
        assert!(r["payload"].as_str() == Some(p.as_str()));
        assert_eq!(streamed(&running, "client_in"), 2);
        assert_eq!(streamed(&running, "backend_in"), 3);
        // Small frames around them are untouched.
        c.ok("ping", json!({})).await;
        let small = c
            .ok("test.echo", json!({"sessionId": sid, "payload": "s"}))
            .await;
        assert_eq!(small["payload"], "s");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_off_still_carries_big_frames() {
    within(Duration::from_secs(60), async {
        let Fixture {
            fakes: _fakes,
            running,
            addr,
        } = Fixture::with(1, false, |c| c.limits.stream_above_bytes = 0).await;
        let mut c = Client::connected(addr).await;
        let sid = c.ok("session.create", json!({})).await["sessionId"]
            .as_str()
            .unwrap()
            .to_string();
        let p = payload(1 << 20);
        let r = c
            .ok("test.echo", json!({"sessionId": sid, "payload": p}))
            .await;
        assert!(r["payload"].as_str() == Some(p.as_str()));
        assert_eq!(streamed(&running, "client_in"), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_comes_after_the_envelope_cannot_change_it() {
    within(Duration::from_secs(60), async {
        let Fixture {
            fakes,
            running: _running,
            addr,
        } = Fixture::start(1, false).await;
        let mut victim = Client::connected(addr).await;
        let theirs = victim.ok("session.create", json!({})).await["sessionId"]
            .as_str()
            .unwrap()
            .to_string();
        let mut c = Client::connected(addr).await;
        let mine = c.ok("session.create", json!({})).await["sessionId"]
            .as_str()
            .unwrap()
            .to_string();
        let pad = "x".repeat(1 << 20);
        let echoes = fakes[0].requests("test.echo");
        let cases = [
            // JSON.parse at the CLI keeps the last of two keys: this would act on `theirs`.
            (
                format!(r#","sessionId":"{theirs}"}}}}"#),
                -32600,
                "sessionId",
            ),
            (r#"},"id":77}"#.to_string(), -32600, "\"id\""),
            (r#"},"\u0069d":77}"#.to_string(), -32600, "escaped"),
            (r#","n":tru}}"#.to_string(), -32700, "invalid JSON"),
            ("}}    ]".to_string(), -32700, "invalid JSON"),
        ];
        for (i, (after, code, says)) in cases.iter().enumerate() {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":{},"method":"test.echo","params":{{"sessionId":"{mine}","payload":"{pad}"{after}"#,
                100 + i
            );
            c.send_body(body.as_bytes()).await;
            let r = c.response(&(100 + i).to_string()).await;
            assert_eq!(r.error_code(), Some(*code), "{after}: {}", r.text());
            assert!(r.text().contains(says), "{after}: {}", r.text());
            // The connection goes on: a new request on the same session is answered.
            let ok = c
                .ok("test.echo", json!({"sessionId": mine, "payload": "after"}))
                .await;
            assert_eq!(ok["payload"], "after");
        }
        // None of those bodies reached the CLI whole: it saw only the small echoes, and never
        // a call on the other client's session.
        assert_eq!(
            fakes[0].requests("test.echo"),
            echoes + cases.len() as u64,
            "a refused frame reached the CLI"
        );
        assert!(fakes[0]
            .params_of("test.echo")
            .iter()
            .all(|p| p["sessionId"] != theirs.as_str()));
        let still = victim
            .ok("test.echo", json!({"sessionId": theirs, "payload": "mine"}))
            .await;
        assert_eq!(still["payload"], "mine");
    })
    .await;
}
