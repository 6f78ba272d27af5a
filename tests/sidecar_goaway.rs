//! The edge side and the sidecar side of `copilotLb.goaway` (issue #14), over real sockets
//! against the fake CLI: an edge that starts shutting down tells the connections that asked
//! (and only those), keeps each until it holds no session, and the session-aware sidecar in
//! front of two edges moves its client's session to the other edge before the first exits,
//! so the client's next request is answered on its unchanged connection.

mod common;

use common::*;
use copilot_lb::config::Config;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn edge_config(fake: std::net::SocketAddr) -> Config {
    let mut cfg = config(&[fake]);
    cfg.limits.shutdown_timeout = copilot_lb::config::Millis(Duration::from_secs(10));
    cfg
}

#[tokio::test]
async fn a_draining_edge_tells_opted_in_clients_and_keeps_them_until_they_let_go() {
    within(T, async {
        let fake = fakes(1, true).await.remove(0);
        let (edge, addr) = proxy(edge_config(fake.addr())).await;
        let mut sidecar = Client::connect(addr).await;
        sidecar
            .ok("connect", json!({"copilotLbGoaway": true}))
            .await;
        sidecar
            .ok("session.create", json!({"sessionId": "held-1"}))
            .await;
        let mut plain = Client::connected(addr).await;
        plain
            .ok("session.create", json!({"sessionId": "plain-1"}))
            .await;
        let shared = edge.shared.clone();
        let draining = tokio::spawn(async move {
            copilot_lb::app::graceful_shutdown(&shared).await;
        });
        let told = sidecar
            .wait_notes(Duration::from_secs(3), |n| {
                n.iter().any(|f| f.method() == Some("copilotLb.goaway"))
            })
            .await;
        assert!(told, "no goaway for the opted-in connection");
        assert!(
            plain.closed_within(Duration::from_secs(3)).await,
            "an idle plain connection is closed at once"
        );
        assert!(
            !plain
                .notes
                .iter()
                .any(|f| f.method() == Some("copilotLb.goaway")),
            "a client that did not ask was told"
        );
        // Still open while it holds a session: what it sends now is still served.
        tokio::time::sleep(Duration::from_millis(300)).await;
        sidecar
            .ok("session.getMessages", json!({"sessionId": "held-1"}))
            .await;
        sidecar
            .ok("session.detach", json!({"sessionId": "held-1"}))
            .await;
        assert!(
            sidecar.closed_within(Duration::from_secs(3)).await,
            "the edge keeps a connection that holds nothing"
        );
        tokio::time::timeout(Duration::from_secs(3), draining)
            .await
            .expect("the drain waited for the shutdown deadline")
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn the_sidecar_moves_its_clients_session_off_a_draining_edge() {
    within(T, async {
        let fake = fakes(1, true).await.remove(0);
        let (edge_a, addr_a) = proxy(edge_config(fake.addr())).await;
        let (edge_b, addr_b) = proxy(edge_config(fake.addr())).await;
        let mut cfg = config(&[addr_a, addr_b]);
        for b in &mut cfg.backends {
            b.edge = true;
        }
        cfg.sessions.shared_storage = true;
        cfg.sessions.failover = Some(copilot_lb::config::FailoverPolicy::Reassign);
        let (sidecar, addr) = proxy(cfg).await;
        let mut app = Client::connected(addr).await;
        // A session on each edge, so whichever drains has one to move.
        let mut on = std::collections::HashMap::new();
        for n in 0..8 {
            let sid = format!("moving-{n}");
            app.ok("session.create", json!({"sessionId": sid})).await;
            let p = sidecar.shared.sessions.get(&sid).expect("placed");
            on.insert(sid, p.backend);
        }
        let name_a = addr_a.to_string();
        let moved: Vec<String> = on
            .iter()
            .filter(|(_, b)| **b == name_a)
            .map(|(s, _)| s.clone())
            .collect();
        assert!(!moved.is_empty(), "no session on edge A: {on:?}");
        let resumes = fake.requests("session.resume");
        let shared = edge_a.shared.clone();
        let draining = tokio::spawn(async move {
            copilot_lb::app::graceful_shutdown(&shared).await;
        });
        // Every session edge A held is resumed through edge B, without a request from the app.
        let sc = sidecar.shared.clone();
        let all_moved = {
            let moved = moved.clone();
            let name_b = addr_b.to_string();
            eventually(Duration::from_secs(5), move || {
                moved
                    .iter()
                    .all(|s| sc.sessions.get(s).is_some_and(|p| p.backend == name_b))
            })
            .await
        };
        assert!(all_moved, "not every session left the draining edge");
        assert!(fake.requests("session.resume") >= resumes + moved.len() as u64);
        tokio::time::timeout(Duration::from_secs(5), draining)
            .await
            .expect("edge A waited for its shutdown deadline: the sidecar did not let go")
            .unwrap();
        // The app's connection never closed, and its sessions answer.
        for sid in &moved {
            app.ok("session.getMessages", json!({"sessionId": sid}))
                .await;
        }
        drop(edge_b);
    })
    .await;
}
