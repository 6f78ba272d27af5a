//! A client that never reads must cost the proxy a bounded amount of memory: its replies wait
//! in a queue bounded in bytes (`limits.max_queued_reply_bytes`), and past that the proxy
//! stops reading from it instead of buffering more.

mod common;

use common::*;
use copilot_lb::codec::{encode_frame, FrameReader};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_gets_backpressure_not_unbounded_buffers() {
    within(Duration::from_secs(60), async {
        let fakes = fakes(1, false).await;
        let mut cfg = config(&[fakes[0].addr()]);
        cfg.limits.max_queued_reply_bytes = 1 << 20;
        let (_run, addr) = proxy(cfg).await;
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = s.into_split();
        // 200 pings of 256 KiB, 50 MiB of answers, none read while sending.
        let msg = "x".repeat(256 * 1024);
        let mut all = Vec::new();
        for i in 0..200 {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":{i},"method":"ping","params":{{"message":"{msg}"}}}}"#
            );
            all.extend_from_slice(&encode_frame(body.as_bytes()));
        }
        let writer = tokio::spawn(async move { w.write_all(&all).await.map(|_| w) });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !writer.is_finished(),
            "the proxy read 50 MiB of requests from a client that reads none of its replies"
        );
        // Another client is unaffected meanwhile.
        let mut other = Client::connected(addr).await;
        other.ok("ping", json!({})).await;
        // Once it reads, nothing was lost: every request is answered, in order.
        let mut reader = FrameReader::new(r, Default::default());
        for i in 0..200u64 {
            let f = tokio::time::timeout(Duration::from_secs(10), reader.read_frame())
                .await
                .expect("reply in time")
                .expect("frame")
                .expect("open");
            let v: Value = serde_json::from_slice(&f).unwrap();
            assert_eq!(v["id"], i);
            assert!(v["result"]["message"].is_string(), "{i}");
        }
        let _w = writer.await.unwrap().unwrap();
    })
    .await;
}
