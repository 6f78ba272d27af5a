//! The routing table is an allow-list (issue #12): a method it does not know is refused with the
//! setting that forwards it, an operator's `routing` setting forwards it, and every field of a
//! request that names a session is checked, not only `params.sessionId`. Over real loopback
//! sockets against the fake CLI.

mod common;

use common::*;
use copilot_lb::config::Config;
use copilot_lb::rpc;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use test_support::fake_cli::FakeCli;

const T: Duration = Duration::from_secs(30);

/// A proxy with tenants a and b in front of `fakes`, plus `extra` YAML.
async fn tenants(fakes: &[FakeCli], extra: &str) -> (copilot_lb::app::Running, SocketAddr) {
    let backends: String = fakes
        .iter()
        .map(|f| format!("  - address: {}\n", f.addr()))
        .collect();
    let yaml = format!(
        "listeners: [{{listen: 127.0.0.1:0}}]\nbackends:\n{backends}health: {{interval: 100ms, timeout: 500ms}}\ntenants:\n  - name: a\n    token_hashes: [\"{}\"]\n  - name: b\n    token_hashes: [\"{}\"]\n{extra}",
        copilot_lb::auth::hash_token("tok-a"),
        copilot_lb::auth::hash_token("tok-b"),
    );
    let cfg = Config::from_yaml(&yaml, "routing").expect("config");
    proxy(cfg).await
}

async fn as_tenant(addr: SocketAddr, token: &str) -> Client {
    let mut c = Client::connect(addr).await;
    c.ok("connect", json!({"token": token})).await;
    c
}

fn message(f: &Frame) -> String {
    f.json["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn reached(fakes: &[FakeCli], method: &str) -> u64 {
    fakes.iter().map(|f| f.requests(method)).sum()
}

#[tokio::test]
async fn a_method_not_in_the_table_is_refused_naming_the_setting() {
    within(T, async {
        let f = fakes(1, false).await;
        let (_run, addr) = tenants(&f, "").await;
        let mut a = as_tenant(addr, "tok-a").await;
        a.ok("session.create", json!({"sessionId": "a-1"})).await;
        // A method a future CLI might add, global and session-scoped, and the fake's own.
        for (m, p) in [
            ("cli.futureGlobal", json!({})),
            ("session.futureThing", json!({"sessionId": "a-1"})),
            ("test.whoami", json!({})),
        ] {
            let r = a.call(m, p).await;
            assert_eq!(
                r.error_code(),
                Some(rpc::METHOD_NOT_FOUND),
                "{m}: {}",
                r.text()
            );
            assert_eq!(
                r.json["error"]["data"]["source"],
                "copilot-lb",
                "{m}: {}",
                r.text()
            );
            let msg = message(&r);
            assert!(
                msg.contains("routing.allow_global") && msg.contains("routing.allow_session"),
                "{m}: {msg}"
            );
            assert_eq!(reached(&f, m), 0, "{m} reached the CLI");
        }
    })
    .await;
}

#[tokio::test]
async fn methods_the_schema_has_but_the_table_refuses_never_reach_a_cli() {
    within(T, async {
        let f = fakes(1, false).await;
        let (_run, addr) = tenants(&f, "").await;
        let mut a = as_tenant(addr, "tok-a").await;
        a.ok("session.create", json!({"sessionId": "a-1"})).await;
        for (m, p, says) in [
            // Writes any JSON file on the CLI's host.
            (
                "persistence.writeRawJsonLocked",
                json!({"path": "/tmp/x.json", "dataJson": "{}"}),
                "internal",
            ),
            // Publishes a session to remote hosting, whoever owns it.
            (
                "host.publishSession",
                json!({"hostId": "h", "sessionId": "a-1"}),
                "remote services",
            ),
            // Names whichever session holds the process-wide remote-control singleton.
            (
                "sessions.getRemoteControlStatus",
                json!({}),
                "routing.allow_global",
            ),
            ("user.settings.get", json!({}), "routing.allow_global"),
        ] {
            let r = a.call(m, p).await;
            assert_eq!(
                r.error_code(),
                Some(rpc::METHOD_NOT_FOUND),
                "{m}: {}",
                r.text()
            );
            assert!(message(&r).contains(says), "{m}: {}", r.text());
            assert_eq!(reached(&f, m), 0, "{m} reached the CLI");
        }
    })
    .await;
}

#[tokio::test]
async fn allow_global_forwards_a_method_and_a_session_id_in_it_is_still_checked() {
    within(T, async {
        let f = fakes(1, false).await;
        let (_run, addr) = tenants(
            &f,
            "routing:\n  allow_global: [test.whoami, test.echo, user.settings.get]\n",
        )
        .await;
        let mut a = as_tenant(addr, "tok-a").await;
        let r = a.ok("test.whoami", json!({})).await;
        assert!(r.is_object(), "{r}");
        assert_eq!(reached(&f, "test.whoami"), 1);
        // A host-state method the table refuses by default, forwarded because it is listed
        // (the fake does not implement it: its own -32601 comes back).
        let r = a.call("user.settings.get", json!({})).await;
        assert_eq!(reached(&f, "user.settings.get"), 1, "{}", r.text());
        assert_ne!(
            r.json["error"]["data"]["source"],
            "copilot-lb",
            "{}",
            r.text()
        );
        // Naming a session makes it a session call: the owner's goes through, another
        // tenant's is refused before any CLI sees it.
        a.ok("session.create", json!({"sessionId": "a-1"})).await;
        a.ok("test.echo", json!({"sessionId": "a-1", "payload": 1}))
            .await;
        let mut b = as_tenant(addr, "tok-b").await;
        let r = b
            .call("test.echo", json!({"sessionId": "a-1", "payload": 2}))
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
        assert_eq!(reached(&f, "test.echo"), 1);
    })
    .await;
}

#[tokio::test]
async fn allow_session_needs_and_checks_params_session_id() {
    within(T, async {
        let f = fakes(1, false).await;
        let (_run, addr) = tenants(&f, "routing:\n  allow_session: [test.echo]\n").await;
        let mut a = as_tenant(addr, "tok-a").await;
        let r = a.call("test.echo", json!({"payload": 1})).await;
        assert_eq!(r.error_code(), Some(rpc::METHOD_NOT_FOUND), "{}", r.text());
        assert!(message(&r).contains("params.sessionId"), "{}", r.text());
        a.ok("session.create", json!({"sessionId": "a-1"})).await;
        a.ok("test.echo", json!({"sessionId": "a-1", "payload": 2}))
            .await;
        let mut b = as_tenant(addr, "tok-b").await;
        let r = b
            .call("test.echo", json!({"sessionId": "a-1", "payload": 3}))
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
        assert_eq!(reached(&f, "test.echo"), 1);
    })
    .await;
}

#[tokio::test]
async fn the_routing_setting_cannot_forward_what_is_refused_on_purpose() {
    let yaml = |list: &str| {
        format!("listeners: [{{listen: 127.0.0.1:0}}]\nbackends: [{{address: 127.0.0.1:1}}]\nrouting:\n  {list}\n")
    };
    for (list, says) in [
        (
            "allow_global: [runtime.shutdown]",
            "refused by copilot-lb on purpose",
        ),
        (
            "allow_global: [sessionFs.setProvider]",
            "refused by copilot-lb on purpose",
        ),
        (
            "allow_session: [sessions.bulkDelete]",
            "refused by copilot-lb on purpose",
        ),
        ("allow_global: [session.send]", "already forwarded"),
        ("allow_global: [x.y, x.y]", "more than once"),
        (
            "allow_global: [x.y]\n  allow_session: [x.y]",
            "more than once",
        ),
        ("allow_global: [\"a b\"]", "not a method name"),
        ("allow_global: [\"\"]", "not a method name"),
        ("allow_everything: true", "allow_everything"),
    ] {
        let err = Config::from_yaml(&yaml(list), "t")
            .expect_err(list)
            .to_string();
        assert!(err.contains(says), "{list}: {err}");
    }
    let ok = Config::from_yaml(
        &yaml("allow_global: [user.settings.get, x.y]\n  allow_session: [x.z]"),
        "t",
    )
    .expect("host-state and unknown methods may be allowed");
    assert_eq!(ok.routing.allow_session, ["x.z"]);
}

/// Tenant a's session `a-1` and tenant b's `b-1` on one fake, and b's client.
async fn two_tenants(extra: &str) -> (Vec<FakeCli>, copilot_lb::app::Running, Client) {
    let f = fakes(1, true).await;
    let (run, addr) = tenants(&f, extra).await;
    let mut a = as_tenant(addr, "tok-a").await;
    a.ok("session.create", json!({"sessionId": "a-1"})).await;
    let mut b = as_tenant(addr, "tok-b").await;
    b.ok("session.create", json!({"sessionId": "b-1"})).await;
    (f, run, b)
}

#[tokio::test]
async fn every_session_naming_field_is_checked_for_ownership() {
    within(T, async {
        let (f, _run, mut b) = two_tenants("").await;
        for (m, p) in [
            (
                "session.mode.set",
                json!({"sessionId": "b-1", "mode": "plan", "inheritPlanBaseFromSessionId": "a-1"}),
            ),
            (
                "sessions.transferRemoteControl",
                json!({"toSessionId": "b-1", "expectedFromSessionId": "a-1"}),
            ),
            (
                "sessions.getClientMetadata",
                json!({"sessionIds": ["b-1", "a-1"]}),
            ),
            ("sessions.getClientMetadata", json!({"sessionIds": ["a-1"]})),
            (
                "sessions.open",
                json!({"kind": "create", "options": {"sessionId": "b-2", "detachedFromSpawningParentSessionId": "a-1"}}),
            ),
        ] {
            let r = b.call(m, p.clone()).await;
            assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{m} {p}: {}", r.text());
            assert!(message(&r).contains("a-1"), "{m}: {}", r.text());
            assert_eq!(reached(&f, m), 0, "{m} {p} reached the CLI");
        }
        // The same calls naming only b's own sessions are forwarded.
        b.call(
            "session.mode.set",
            json!({"sessionId": "b-1", "mode": "plan", "inheritPlanBaseFromSessionId": "b-1"}),
        )
        .await;
        b.call("sessions.getClientMetadata", json!({"sessionIds": ["b-1"]}))
            .await;
        assert_eq!(reached(&f, "session.mode.set"), 1);
        assert_eq!(reached(&f, "sessions.getClientMetadata"), 1);
    })
    .await;
}

#[tokio::test]
async fn partial_and_upper_case_uuids_are_refused_in_every_session_field() {
    within(T, async {
        let (f, _run, mut b) = two_tenants("").await;
        let id = "3f2a9c4e-1b7d-4e6f-9a2b-5c8d7e6f1a2b";
        let upper = id.to_uppercase();
        for (m, p) in [
            (
                "session.mode.set",
                json!({"sessionId": "b-1", "mode": "plan", "inheritPlanBaseFromSessionId": &id[..8]}),
            ),
            (
                "sessions.transferRemoteControl",
                json!({"toSessionId": "b-1", "expectedFromSessionId": upper}),
            ),
            (
                "sessions.getClientMetadata",
                json!({"sessionIds": ["b-1", &id[..9]]}),
            ),
            (
                "sessions.open",
                json!({"kind": "create", "options": {"sessionId": "b-2", "detachedFromSpawningParentSessionId": &id[..7]}}),
            ),
        ] {
            let r = b.call(m, p.clone()).await;
            assert_eq!(r.error_code(), Some(rpc::INVALID_PARAMS), "{m} {p}: {}", r.text());
            assert_eq!(reached(&f, m), 0, "{m} {p} reached the CLI");
        }
    })
    .await;
}

#[tokio::test]
async fn session_fields_that_are_not_ids_are_refused() {
    within(T, async {
        let (f, _run, mut b) = two_tenants("").await;
        for (m, p) in [
            (
                "session.mode.set",
                json!({"sessionId": "b-1", "mode": "plan", "inheritPlanBaseFromSessionId": {"id": "a-1"}}),
            ),
            ("sessions.getClientMetadata", json!({"sessionIds": ["b-1", ["a-1"]]})),
            ("sessions.getClientMetadata", json!({"sessionIds": []})),
            ("sessions.transferRemoteControl", json!({"toSessionId": "b-1", "expectedFromSessionId": 1})),
        ] {
            let r = b.call(m, p.clone()).await;
            assert_eq!(r.error_code(), Some(rpc::METHOD_NOT_FOUND), "{m} {p}: {}", r.text());
            assert_eq!(reached(&f, m), 0, "{m} {p} reached the CLI");
        }
    })
    .await;
}

/// Creates sessions for `c` until two of them sit on different fakes.
async fn two_backends(c: &mut Client, f: &[FakeCli]) -> (String, String) {
    let mut first: Option<(String, String)> = None;
    for i in 0..64 {
        let sid = format!("a-{i}");
        c.ok("session.create", json!({"sessionId": sid})).await;
        let at = holders(f, &sid)[0].addr().to_string();
        match &first {
            None => first = Some((sid, at)),
            Some((s0, at0)) if *at0 != at => return (s0.clone(), sid),
            Some(_) => {}
        }
    }
    panic!("64 sessions all placed on one backend");
}

#[tokio::test]
async fn a_request_naming_sessions_on_two_backends_is_refused() {
    within(T, async {
        let f = fakes(2, false).await;
        let (_run, addr) = tenants(&f, "").await;
        let mut a = as_tenant(addr, "tok-a").await;
        let (x, y) = two_backends(&mut a, &f).await;
        for (m, p) in [
            (
                "session.mode.set",
                json!({"sessionId": x, "mode": "plan", "inheritPlanBaseFromSessionId": y}),
            ),
            ("sessions.getClientMetadata", json!({"sessionIds": [x, y]})),
        ] {
            let r = a.call(m, p.clone()).await;
            assert_eq!(
                r.error_code(),
                Some(rpc::INVALID_PARAMS),
                "{m} {p}: {}",
                r.text()
            );
            assert!(
                message(&r).contains("different CLI servers"),
                "{}",
                r.text()
            );
            assert_eq!(reached(&f, m), 0, "{m} {p} reached a CLI");
        }
        // A field the CLI only compares (not reads) may name a session elsewhere.
        let r = a
            .call(
                "sessions.transferRemoteControl",
                json!({"toSessionId": x, "expectedFromSessionId": y}),
            )
            .await;
        assert_ne!(
            r.json["error"]["data"]["source"],
            "copilot-lb",
            "{}",
            r.text()
        );
        assert_eq!(reached(&f, "sessions.transferRemoteControl"), 1);
        // Sessions on one backend: forwarded there.
        let r = a
            .call(
                "session.mode.set",
                json!({"sessionId": x, "mode": "plan", "inheritPlanBaseFromSessionId": x}),
            )
            .await;
        assert_ne!(
            r.json["error"]["data"]["source"],
            "copilot-lb",
            "{}",
            r.text()
        );
        assert_eq!(holders(&f, &x)[0].requests("session.mode.set"), 1);
        // Another tenant naming a's session as the routing one gets the ownership refusal,
        // never a word about where a's sessions live.
        let mut b = as_tenant(addr, "tok-b").await;
        b.ok("session.create", json!({"sessionId": "b-1"})).await;
        let r = b
            .call(
                "session.mode.set",
                json!({"sessionId": x, "mode": "plan", "inheritPlanBaseFromSessionId": "b-1"}),
            )
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
        assert!(!message(&r).contains("different"), "{}", r.text());
        assert!(
            r.json["error"]["data"].get("sessionIds").is_none(),
            "{}",
            r.text()
        );
    })
    .await;
}
