//! Hostile tenants (issue #12): an unknown session belongs to nobody, caps hold wherever a
//! session becomes live, ids the CLI would resolve as a prefix never reach it, and a fork
//! belongs to whoever forked. Over real loopback sockets against the fake CLI.

mod common;

use common::*;
use copilot_lb::config::Config;
use copilot_lb::rpc;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// A proxy with tenants a (max 2 live sessions, or adopting unknown sessions when `adopt`) and
/// b in front of one fake.
async fn tenants(
    adopt: bool,
) -> (
    test_support::fake_cli::FakeCli,
    copilot_lb::app::Running,
    SocketAddr,
) {
    let fake = fakes(1, true).await.remove(0);
    let adopt = if adopt {
        "\n    adopt_unknown: true"
    } else {
        ""
    };
    let yaml = format!(
        "listeners: [{{listen: 127.0.0.1:0}}]\nbackends: [{{address: {}}}]\nhealth: {{interval: 100ms, timeout: 500ms}}\ntenants:\n  - name: a\n    token_hashes: [\"{}\"]\n    max_sessions: 2{adopt}\n  - name: b\n    token_hashes: [\"{}\"]\n",
        fake.addr(),
        copilot_lb::auth::hash_token("tok-a"),
        copilot_lb::auth::hash_token("tok-b"),
    );
    let cfg = Config::from_yaml(&yaml, "tenancy").expect("config");
    let (running, addr) = proxy(cfg).await;
    (fake, running, addr)
}

async fn as_tenant(addr: SocketAddr, token: &str) -> Client {
    let mut c = Client::connect(addr).await;
    c.ok("connect", json!({"token": token})).await;
    c
}

#[tokio::test]
async fn an_unknown_session_belongs_to_nobody() {
    within(T, async {
        let (fake, _run, addr) = tenants(false).await;
        // Made behind the proxy's back (another replica, a restart, a fork it never saw).
        let mut direct = Client::connect(fake.addr()).await;
        direct
            .ok("session.create", json!({"sessionId": "orphan-1"}))
            .await;
        for token in ["tok-a", "tok-b"] {
            let mut c = as_tenant(addr, token).await;
            let r = c
                .call("session.resume", json!({"sessionId": "orphan-1"}))
                .await;
            assert_eq!(
                r.error_code(),
                Some(rpc::SESSION_FORBIDDEN),
                "{token}: {}",
                r.text()
            );
            let r = c
                .call(
                    "session.send",
                    json!({"sessionId": "orphan-1", "prompt": "x"}),
                )
                .await;
            assert_eq!(
                r.error_code(),
                Some(rpc::SESSION_FORBIDDEN),
                "{token}: {}",
                r.text()
            );
            let list = c.ok("session.list", json!({})).await;
            assert!(
                !list.to_string().contains("orphan-1"),
                "{token} sees it: {list}"
            );
            // Creating it anew would reuse its storage (the CLI's create does), and a later
            // resume would load its history: as much a claim as a resume.
            for method in ["session.create", "sessions.open"] {
                let params = if method == "sessions.open" {
                    json!({"kind": "create", "options": {"sessionId": "orphan-1"}})
                } else {
                    json!({"sessionId": "orphan-1"})
                };
                let r = c.call(method, params).await;
                assert_eq!(
                    r.error_code(),
                    Some(rpc::SESSION_FORBIDDEN),
                    "{token} {method}: {}",
                    r.text()
                );
            }
            // An id nobody has used is still free.
            c.ok(
                "session.create",
                json!({"sessionId": format!("fresh-{token}")}),
            )
            .await;
        }
        assert_eq!(
            fake.requests("session.resume"),
            0,
            "a refused resume reached the CLI"
        );
        assert_eq!(
            fake.requests("session.create"),
            3,
            "a refused create reached the CLI (1 direct + 2 fresh expected)"
        );
    })
    .await;
}

#[tokio::test]
async fn adopting_unknown_sessions_is_an_explicit_tenant_setting() {
    within(T, async {
        let (fake, _run, addr) = tenants(true).await;
        let mut direct = Client::connect(fake.addr()).await;
        direct
            .ok("session.create", json!({"sessionId": "legacy-1"}))
            .await;
        let mut a = as_tenant(addr, "tok-a").await;
        a.ok("session.resume", json!({"sessionId": "legacy-1"}))
            .await;
        // Adopted: a owns it now, b does not.
        let mut b = as_tenant(addr, "tok-b").await;
        let r = b
            .call("session.resume", json!({"sessionId": "legacy-1"}))
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
    })
    .await;
}

#[tokio::test]
async fn the_session_cap_holds_on_resume_too() {
    within(T, async {
        let (_fake, _run, addr) = tenants(false).await;
        let mut first = as_tenant(addr, "tok-a").await;
        for sid in ["cap-1", "cap-2"] {
            first.ok("session.create", json!({"sessionId": sid})).await;
        }
        first.shutdown_write().await;
        assert!(first.closed_within(Duration::from_secs(5)).await);
        let mut c = as_tenant(addr, "tok-a").await;
        for sid in ["cap-3", "cap-4"] {
            c.ok("session.create", json!({"sessionId": sid})).await;
        }
        // Two live: resuming a third would make three.
        let r = c
            .call("session.resume", json!({"sessionId": "cap-1"}))
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_LIMIT), "{}", r.text());
        let r = c
            .call(
                "sessions.open",
                json!({"kind": "attach", "sessionId": "cap-2"}),
            )
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_LIMIT), "{}", r.text());
        // Resuming one that is already live here is no new session.
        c.ok("session.resume", json!({"sessionId": "cap-3"})).await;
        // Detach one, and the old one fits again.
        c.ok("session.detach", json!({"sessionId": "cap-4"})).await;
        c.ok("session.resume", json!({"sessionId": "cap-1"})).await;
    })
    .await;
}

#[tokio::test]
async fn uuid_prefixes_and_case_variants_never_reach_the_cli() {
    within(T, async {
        let (fake, _run, addr) = tenants(false).await;
        let mut a = as_tenant(addr, "tok-a").await;
        let sid = "3f2a9c4e-1b7d-4e6f-9a2b-5c8d7e6f1a2b";
        a.ok("session.create", json!({"sessionId": sid})).await;
        let mut b = as_tenant(addr, "tok-b").await;
        let before = fake.requests("session.resume");
        for alias in [
            sid[..8].to_uppercase(),
            sid[..8].to_string(),
            sid[..13].to_string(),
            sid.to_uppercase(),
        ] {
            let r = b.call("session.resume", json!({"sessionId": alias})).await;
            assert_eq!(
                r.error_code(),
                Some(rpc::INVALID_PARAMS),
                "{alias}: {}",
                r.text()
            );
            let r = b
                .call(
                    "sessions.open",
                    json!({"kind": "resume", "sessionId": alias}),
                )
                .await;
            assert_eq!(
                r.error_code(),
                Some(rpc::INVALID_PARAMS),
                "{alias}: {}",
                r.text()
            );
        }
        assert_eq!(
            fake.requests("session.resume"),
            before,
            "an alias reached the CLI"
        );
        // Ids that only look hex (not a UUID's shape) and whole lowercase UUIDs are fine.
        a.ok("session.create", json!({"sessionId": "df-42d88589-3-2"}))
            .await;
        a.ok("session.resume", json!({"sessionId": sid})).await;
    })
    .await;
}

#[tokio::test]
async fn a_fork_belongs_to_whoever_forked_it() {
    within(T, async {
        let (_fake, _run, addr) = tenants(false).await;
        let mut a = as_tenant(addr, "tok-a").await;
        a.ok("session.create", json!({"sessionId": "fork-src"}))
            .await;
        let fork = a
            .ok("sessions.fork", json!({"sessionId": "fork-src"}))
            .await;
        let id = fork["sessionId"].as_str().expect("fork id").to_string();
        let mut b = as_tenant(addr, "tok-b").await;
        let r = b.call("session.resume", json!({"sessionId": id})).await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
        a.ok("session.detach", json!({"sessionId": "fork-src"}))
            .await;
        a.ok("session.resume", json!({"sessionId": id})).await;
    })
    .await;
}

#[tokio::test]
async fn a_reply_naming_another_tenants_session_is_not_delivered() {
    within(T, async {
        let (fake, _run, addr) = tenants(false).await;
        let mut a = as_tenant(addr, "tok-a").await;
        a.ok("session.create", json!({"sessionId": "victim-1"}))
            .await;
        let mut b = as_tenant(addr, "tok-b").await;
        b.ok("session.create", json!({"sessionId": "b-1"})).await;
        b.ok("session.detach", json!({"sessionId": "b-1"})).await;
        // The CLI answers b's resume of its own id with a's session (as it does for a prefix).
        fake.resolve_as("b-1", "victim-1");
        let r = b.call("session.resume", json!({"sessionId": "b-1"})).await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
        assert!(
            !r.text().contains("startTime"),
            "the reply leaked: {}",
            r.text()
        );
        // The handle the CLI opened for b is closed again: only a's connection holds it.
        assert!(
            eventually(Duration::from_secs(5), || fake
                .joined_connections("victim-1")
                == 1)
            .await,
            "b's link still holds a's session ({} connections)",
            fake.joined_connections("victim-1")
        );
        let r = b
            .call(
                "session.send",
                json!({"sessionId": "victim-1", "prompt": "x"}),
            )
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
    })
    .await;
}
