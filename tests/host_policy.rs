//! Host access is a tenant policy (issue #12): the tools a tenant's sessions may use are what
//! its policy allows, whatever its client asks for, on create, resume, `sessions.open`, an
//! options update and a failover's replay; `session.shell.*` and the other host-level methods
//! and local MCP servers need `allow_shell`. Over real loopback sockets against the fake CLI,
//! which records the params it was sent.

mod common;

use common::*;
use copilot_lb::config::Config;
use copilot_lb::rpc;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Tenants: `locked` (no settings: no shell), `shell` (allow_shell, web_fetch denied),
/// `curated` (only view and grep).
fn tenants_yaml(backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{address: {a}}}"))
        .collect();
    format!(
        "listeners: [{{listen: 127.0.0.1:0}}]\nbackends: [{}]\nhealth: {{interval: 100ms, timeout: 500ms}}\n{extra}tenants:\n  - name: locked\n    token_hashes: [\"{}\"]\n  - name: shell\n    token_hashes: [\"{}\"]\n    allow_shell: true\n    tools: {{deny: [web_fetch]}}\n  - name: curated\n    token_hashes: [\"{}\"]\n    tools: {{allow: [view, grep]}}\n",
        list.join(", "),
        copilot_lb::auth::hash_token("tok-locked"),
        copilot_lb::auth::hash_token("tok-shell"),
        copilot_lb::auth::hash_token("tok-curated"),
    )
}

async fn as_tenant(addr: SocketAddr, token: &str) -> Client {
    let mut c = Client::connect(addr).await;
    c.ok("connect", json!({"token": token})).await;
    c
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The last params the fake received for `method` naming `sid` (top level or in options).
fn sent(fake: &test_support::fake_cli::FakeCli, method: &str, sid: &str) -> Value {
    fake.params_of(method)
        .into_iter()
        .rev()
        .find(|p| p["sessionId"] == sid || p["options"]["sessionId"] == sid)
        .unwrap_or_else(|| panic!("{method} for {sid} never reached the backend"))
}

/// What a client that wants the shell asks for: the CLI's default precedence would let its
/// allow list ignore any deny list.
fn greedy(sid: &str) -> Value {
    json!({"sessionId": sid, "availableTools": ["bash", "view", "web_fetch"], "excludedTools": [], "toolFilterPrecedence": "available"})
}

#[tokio::test]
async fn a_client_gets_at_most_the_tools_its_tenant_allows_on_create_and_resume() {
    within(T, async {
        let fake = fakes(1, true).await.remove(0);
        let cfg = Config::from_yaml(&tenants_yaml(&[fake.addr()], ""), "t").expect("config");
        let (_run, addr) = proxy(cfg).await;
        let cases = [
            ("tok-locked", "locked-1", vec!["view", "web_fetch"]),
            ("tok-shell", "shell-1", vec!["bash", "view"]),
            ("tok-curated", "curated-1", vec!["view"]),
        ];
        for (token, sid, want) in &cases {
            let mut c = as_tenant(addr, token).await;
            c.ok("session.create", greedy(sid)).await;
            let p = sent(&fake, "session.create", sid);
            assert_eq!(strings(&p["availableTools"]), *want, "{token}: {p}");
            assert_eq!(p["toolFilterPrecedence"], "excluded", "{token}: {p}");
            let excluded = strings(&p["excludedTools"]);
            let shell_denied = excluded.contains(&"bash") && excluded.contains(&"read_bash");
            assert_eq!(shell_denied, *token != "tok-shell", "{token}: {p}");
            c.ok("session.detach", json!({"sessionId": sid})).await;
            // A resume that names no tools would keep whatever the session had: it is
            // written too.
            c.ok("session.resume", json!({"sessionId": sid})).await;
            let p = sent(&fake, "session.resume", sid);
            assert_eq!(p["toolFilterPrecedence"], "excluded", "{token}: {p}");
            assert_eq!(
                strings(&p["excludedTools"]).contains(&"bash"),
                *token != "tok-shell",
                "{token}: {p}"
            );
            if *token == "tok-curated" {
                assert_eq!(strings(&p["availableTools"]), ["view", "grep"], "{p}");
            }
        }
        // sessions.open carries the same options one level down.
        let mut c = as_tenant(addr, "tok-locked").await;
        let _ = c
            .call(
                "sessions.open",
                json!({"kind": "create", "options": greedy("locked-open")}),
            )
            .await;
        let p = sent(&fake, "sessions.open", "locked-open");
        assert_eq!(
            strings(&p["options"]["availableTools"]),
            ["view", "web_fetch"]
        );
        assert!(strings(&p["options"]["excludedTools"]).contains(&"bash"));
    })
    .await;
}

#[tokio::test]
async fn an_options_update_cannot_bring_a_denied_tool_back() {
    within(T, async {
        let fake = fakes(1, true).await.remove(0);
        let cfg = Config::from_yaml(&tenants_yaml(&[fake.addr()], ""), "t").expect("config");
        let (_run, addr) = proxy(cfg).await;
        let mut c = as_tenant(addr, "tok-locked").await;
        c.ok("session.create", json!({"sessionId": "up-1"})).await;
        c.ok(
            "session.options.update",
            json!({"sessionId": "up-1", "excludedTools": [], "availableTools": ["bash"], "toolFilterPrecedence": "available", "model": "m2"}),
        )
        .await;
        let p = sent(&fake, "session.options.update", "up-1");
        assert_eq!(strings(&p["availableTools"]), Vec::<&str>::new(), "{p}");
        assert!(strings(&p["excludedTools"]).contains(&"bash"), "{p}");
        assert_eq!(p["toolFilterPrecedence"], "excluded", "{p}");
        assert_eq!(p["model"], "m2", "{p}");
    })
    .await;
}

#[tokio::test]
async fn shell_methods_and_local_mcp_servers_need_allow_shell_except_in_an_open_proxy() {
    within(T, async {
        let fake = fakes(1, true).await.remove(0);
        let cfg = Config::from_yaml(&tenants_yaml(&[fake.addr()], ""), "t").expect("config");
        let (_run, addr) = proxy(cfg).await;
        let exec = |sid: &str| json!({"sessionId": sid, "command": "cat /proc/self/environ"});
        let mut locked = as_tenant(addr, "tok-locked").await;
        locked
            .ok("session.create", json!({"sessionId": "sh-locked"}))
            .await;
        for m in [
            "session.shell.exec",
            "session.shell.kill",
            "session.mcp.startServer",
        ] {
            let r = locked.call(m, exec("sh-locked")).await;
            assert_eq!(r.error_code(), Some(rpc::METHOD_NOT_FOUND), "{m}: {}", r.text());
            let msg = r.json["error"]["message"].as_str().unwrap_or("");
            assert!(msg.contains("tenants[].allow_shell: true"), "{m}: {msg}");
            assert!(msg.contains("locked"), "{m}: {msg}");
        }
        assert!(fake.params_of("session.shell.exec").is_empty());
        // A local MCP server is a process on the CLI host too.
        let r = locked
            .call(
                "session.create",
                json!({"sessionId": "sh-mcp", "mcpServers": {"x": {"command": "sh", "args": ["-c", "id"]}}}),
            )
            .await;
        assert_eq!(r.error_code(), Some(rpc::INVALID_PARAMS), "{}", r.text());
        assert!(r.text().contains("mcpServers.x"), "{}", r.text());
        assert!(!fake
            .params_of("session.create")
            .iter()
            .any(|p| p["sessionId"] == "sh-mcp"));
        // Allowed for the tenant that has the setting.
        let mut shell = as_tenant(addr, "tok-shell").await;
        shell
            .ok("session.create", json!({"sessionId": "sh-shell"}))
            .await;
        let r = shell.ok("session.shell.exec", exec("sh-shell")).await;
        assert_eq!(r["processId"], "fake-proc-1");
        shell
            .ok(
                "session.create",
                json!({"sessionId": "sh-shell-mcp", "mcpServers": {"x": {"command": "sh"}}}),
            )
            .await;
        // An open proxy (no tenants) has nobody to isolate: options go through untouched and
        // the shell stays available, as before tenants had policies.
        let Fixture {
            fakes,
            running: _open,
            addr,
        } = Fixture::start(1, true).await;
        let mut c = Client::connected(addr).await;
        c.ok("session.create", greedy("open-1")).await;
        assert_eq!(sent(&fakes[0], "session.create", "open-1"), greedy("open-1"));
        let r = c
            .ok(
                "session.shell.exec",
                json!({"sessionId": "open-1", "command": "true"}),
            )
            .await;
        assert_eq!(r["processId"], "fake-proc-1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_replays_the_rewritten_options() {
    within(T, async {
        let fakes = fakes(2, true).await;
        let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
        let yaml = tenants_yaml(&addrs, "sessions: {shared_storage: true}\n");
        let cfg = Config::from_yaml(&yaml, "t").expect("config");
        let (_run, addr) = proxy(cfg).await;
        let mut c = as_tenant(addr, "tok-locked").await;
        c.ok("session.create", greedy("fo-tools")).await;
        let home = holders(&fakes, "fo-tools")[0].addr();
        let (dead, other) = if fakes[0].addr() == home {
            (&fakes[0], &fakes[1])
        } else {
            (&fakes[1], &fakes[0])
        };
        dead.kill();
        let params = json!({"sessionId": "fo-tools", "prompt": "after"});
        let f = c.call("session.send", params.clone()).await;
        if f.error_code().is_some() {
            assert_eq!(f.json["error"]["data"]["retryable"], true, "{}", f.text());
            c.ok("session.send", params).await;
        }
        let p = sent(other, "session.resume", "fo-tools");
        assert_eq!(strings(&p["availableTools"]), ["view", "web_fetch"], "{p}");
        assert!(strings(&p["excludedTools"]).contains(&"bash"), "{p}");
        assert_eq!(p["toolFilterPrecedence"], "excluded", "{p}");
    })
    .await;
}
