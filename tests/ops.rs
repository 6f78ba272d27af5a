//! Operations over real sockets: graceful shutdown, secrets kept out of logs/metrics/admin
//! output, TLS towards backends, and the admin API.

mod common;

use common::{config, fakes, proxy, within, Client};
use copilot_lb::config::Config;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn sigterm_drain_closes_idle_first_and_lets_in_flight_finish() {
    within(Duration::from_secs(30), async {
        let f = fakes(1, false).await;
        let (running, addr) = proxy(config(&[f[0].addr()])).await;
        let mut idle = Client::connected(addr).await;
        let mut busy = Client::connected(addr).await;
        busy.ok("session.create", json!({"sessionId": "s"})).await;
        busy.send_request("77", "test.sleep", &json!({"ms": 800}))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let shared = running.shared.clone();
        let t0 = Instant::now();
        let drain = tokio::spawn(async move { copilot_lb::app::graceful_shutdown(&shared).await });
        assert!(
            idle.closed_within(Duration::from_secs(2)).await,
            "idle connection not closed first"
        );
        assert!(
            t0.elapsed() < Duration::from_millis(700),
            "idle close waited for the busy one"
        );
        let r = busy.response("77").await;
        assert!(
            r.json.get("result").is_some(),
            "in-flight request was cut: {}",
            r.text()
        );
        assert!(busy.closed_within(Duration::from_secs(3)).await);
        drain.await.unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err()
                || Client::connect(addr)
                    .await
                    .closed_within(Duration::from_secs(1))
                    .await,
            "new connections accepted after shutdown"
        );
    })
    .await;
}

fn http(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Like [`http`], with extra request header lines (`Name: value`).
fn http_with(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_is_served_with_its_policy_and_its_document() {
    within(Duration::from_secs(30), async {
        let f = fakes(2, false).await;
        let mut cfg = config(&[f[0].addr(), f[1].addr()]);
        std::env::set_var("OPS_TEST_PAGE_TOKEN", "page-tok");
        cfg.admin.as_mut().unwrap().token_env = Some("OPS_TEST_PAGE_TOKEN".into());
        let (running, addr) = proxy(cfg).await;
        let admin = running.admin_addr.unwrap();
        let page = http(admin, "GET", "/");
        let head = page
            .split("\r\n\r\n")
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(head.contains("content-type: text/html"), "{head}");
        assert!(
            head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
            "{head}"
        );
        assert!(head.contains("x-frame-options: deny"), "{head}");
        for asset in ["/status.js", "/status.css", "/favicon.svg"] {
            let r = http(admin, "GET", asset);
            assert!(r.starts_with("HTTP/1.1 200"), "{asset}: {r}");
            assert!(
                page.contains(&format!("\"{asset}\"")),
                "the page links {asset}"
            );
        }
        let mut c = Client::connected(addr).await;
        for i in 0..3 {
            c.ok("session.create", json!({"sessionId": format!("p{i}")}))
                .await;
        }
        let doc = http(admin, "GET", "/api/status");
        assert!(doc.starts_with("HTTP/1.1 200"), "{doc}");
        assert!(
            doc.to_ascii_lowercase().contains("cache-control: no-store"),
            "{doc}"
        );
        let body = doc.split("\r\n\r\n").nth(1).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON document");
        assert_eq!(v["sessions"]["live"], 3, "{v:#}");
        assert_eq!(v["admin_token_required"], true);
        assert_eq!(v["backends"].as_array().map(Vec::len), Some(2));
        assert!(
            v["history"]["window"]["requests"].as_u64() >= Some(4),
            "{v:#}"
        );
        // Mutations: a foreign Origin is refused even with the token; the page's own passes.
        let name = f[0].addr().to_string();
        let drain = format!("/api/backends/{name}/drain");
        let auth = "Authorization: Bearer page-tok";
        let foreign = http_with(
            admin,
            "POST",
            &drain,
            &[auth, "Origin: http://evil.example"],
        );
        assert!(foreign.starts_with("HTTP/1.1 403"), "{foreign}");
        assert!(!running.shared.pool.get(&name).unwrap().draining());
        let own = format!("Origin: http://{admin}");
        let ok = http_with(admin, "POST", &drain, &[auth, &own]);
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(running.shared.pool.get(&name).unwrap().draining());
        let no_token = http_with(admin, "POST", &drain, &[&own]);
        assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");
    })
    .await;
}

/// A copilot-lb process on `cfg` whose stderr (the log) is collected line by line.
struct Logged {
    child: std::process::Child,
    lines: std::thread::JoinHandle<Vec<String>>,
}

impl Logged {
    fn start(cfg: &std::path::Path, level: &str) -> Logged {
        let state = cfg.with_extension("redb");
        let mut child = Command::new(env!("CARGO_BIN_EXE_copilot-lb"))
            .args(["serve", "--config"])
            .arg(cfg)
            .arg("--state-path")
            .arg(state)
            .env("RUST_LOG", level)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = std::thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        Logged { child, lines }
    }

    /// Stops the process (SIGTERM) and returns its log.
    fn finish(mut self) -> Vec<String> {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        self.lines.join().unwrap()
    }
}

#[tokio::test]
async fn secrets_never_reach_logs_metrics_or_admin_output() {
    let f = fakes(1, false).await;
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lb.yaml");
    let tenant_token = "tenant-token-SECRET-1";
    std::fs::write(
        &cfg,
        format!(
            "listeners: [{{listen: 127.0.0.1:{listen_port}}}]\nadmin: {{listen: 127.0.0.1:{admin_port}}}\nbackends: [{{address: {}}}]\ntenants:\n  - name: t\n    token_hashes: [\"{}\"]\nlog: {{format: json}}\n",
            f[0].addr(),
            copilot_lb::auth::hash_token(tenant_token)
        ),
    )
    .unwrap();
    let proxy = Logged::start(&cfg, "trace");
    let addr: SocketAddr = format!("127.0.0.1:{listen_port}").parse().unwrap();
    let mut up = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "proxy did not start");
    let secrets = [
        "sk-API-KEY-SECRET-2",
        "ghp_GITHUB-TOKEN-SECRET-3",
        "bearer-SECRET-4",
        tenant_token,
    ];
    within(Duration::from_secs(20), async {
        let mut c = Client::connect(addr).await;
        c.ok("connect", json!({"token": tenant_token})).await;
        c.ok(
            "session.create",
            json!({"sessionId": "sec-1", "gitHubToken": secrets[1],
                   "provider": {"type": "openai", "baseUrl": "http://127.0.0.1:9/v1", "apiKey": secrets[0], "bearerToken": secrets[2]}}),
        )
        .await;
        c.ok("session.send", json!({"sessionId": "sec-1", "prompt": "hello"})).await;
        c.ok("session.resume", json!({"sessionId": "sec-1", "provider": {"apiKey": secrets[0]}})).await;
        let bad = c.call("connect", json!({"token": "wrong-SECRET-5"})).await;
        assert_eq!(bad.error_code(), Some(-32002));
    })
    .await;
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let mut outputs = vec![];
    for p in ["/metrics", "/api/sessions", "/api/backends", "/api/status"] {
        outputs.push(http(admin, "GET", p));
    }
    assert!(
        outputs[1].contains("sec-1"),
        "admin should list the session: {}",
        outputs[1]
    );
    let log = proxy.finish().join("\n");
    assert!(
        log.contains("session created"),
        "trace log looks empty:\n{log}"
    );
    for s in secrets.iter().chain(["wrong-SECRET-5"].iter()) {
        assert!(!log.contains(s), "secret {s} leaked into the log");
        for o in &outputs {
            assert!(!o.contains(s), "secret {s} leaked into admin output");
        }
    }
}

#[tokio::test]
async fn backends_can_be_reached_over_tls() {
    within(Duration::from_secs(30), async {
        // A TLS-terminating copilot-lb stands in for a CLI behind TLS.
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = test_support::pki::self_signed(&["cli.internal"]).write(dir.path(), "cli");
        let f = fakes(1, false).await;
        let inner = Config::from_yaml(
            &format!(
                "listeners: [{{listen: 127.0.0.1:0, tls: {{cert: {}, key: {}}}}}]\nbackends: [{{address: {}}}]\n",
                c.display(),
                k.display(),
                f[0].addr()
            ),
            "tls-backend",
        )
        .unwrap();
        let (_inner, inner_addr) = proxy(inner).await;
        let outer = Config::from_yaml(
            &format!(
                "listeners: [{{listen: 127.0.0.1:0}}]\nbackends: [{{address: {inner_addr}, tls: {{ca: {}, server_name: cli.internal}}}}]\n",
                c.display()
            ),
            "outer",
        )
        .unwrap();
        let (_outer, addr) = proxy(outer).await;
        let mut client = Client::connected(addr).await;
        client.ok("session.create", json!({"sessionId": "over-tls"})).await;
        let r = client.ok("session.send", json!({"sessionId": "over-tls", "prompt": "x"})).await;
        assert!(r.get("messageId").is_some(), "{r}");
        assert_eq!(f[0].requests("session.send"), 1);
        // Wrong CA: the link fails and the client gets a retryable error, not a hang.
        let bad = Config::from_yaml(
            &format!(
                "listeners: [{{listen: 127.0.0.1:0}}]\nbackends: [{{address: {inner_addr}, tls: {{ca: {}, server_name: wrong.name}}}}]\nhealth: {{interval: 100ms, timeout: 500ms, rise: 1, fall: 1}}\nsessions: {{detect_timeout: 1s}}\n",
                c.display()
            ),
            "bad",
        )
        .unwrap();
        let (_bad, bad_addr) = proxy(bad).await;
        let mut client = Client::connected(bad_addr).await;
        let r = client.call("session.create", json!({"sessionId": "nope"})).await;
        assert!(r.error_code().is_some(), "{}", r.text());
    })
    .await;
}

// Multi-threaded: the test's blocking HTTP calls must not starve the in-process admin server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_drains_lists_and_guards_mutations() {
    within(Duration::from_secs(30), async {
        let f = fakes(2, false).await;
        let mut cfg = config(&[f[0].addr(), f[1].addr()]);
        std::env::set_var("OPS_TEST_ADMIN_TOKEN", "adm-tok");
        cfg.admin.as_mut().unwrap().token_env = Some("OPS_TEST_ADMIN_TOKEN".into());
        let (running, addr) = proxy(cfg).await;
        let admin = running.admin_addr.unwrap();
        let name = f[0].addr().to_string();
        let denied = http(admin, "POST", &format!("/api/backends/{name}/drain"));
        assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
        let mut s = TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "POST /api/backends/{name}/drain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer adm-tok\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").unwrap();
        let mut ok = String::new();
        let _ = s.read_to_string(&mut ok);
        assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("\"draining\": true"), "{ok}");
        let mut c = Client::connected(addr).await;
        for i in 0..10 {
            c.ok("session.create", json!({"sessionId": format!("d{i}")})).await;
        }
        assert_eq!(f[0].sessions_live().len(), 0, "drained backend got new sessions");
        let sessions = http(admin, "GET", "/api/sessions?offset=0&limit=3");
        assert!(sessions.contains("\"total\": 10") && sessions.contains("\"limit\": 3"), "{sessions}");
        let ready = http(admin, "GET", "/readyz");
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        let metrics = http(admin, "GET", "/metrics");
        assert!(metrics.contains("copilot_lb_requests_total{class=\"create\",result=\"ok\"} 10"), "{metrics}");
    })
    .await;
}

#[tokio::test]
async fn special_session_fields_route_to_the_sessions_backend() {
    within(Duration::from_secs(30), async {
        let f = fakes(3, false).await;
        let (_r, addr) = proxy(config(&[f[0].addr(), f[1].addr(), f[2].addr()])).await;
        let mut c = Client::connected(addr).await;
        for i in 0..6 {
            c.ok("session.create", json!({"sessionId": format!("sp{i}")}))
                .await;
        }
        for i in 0..6 {
            let sid = format!("sp{i}");
            let home = f
                .iter()
                .position(|x| x.sessions_live().contains(&sid))
                .unwrap();
            let before: Vec<u64> = f
                .iter()
                .map(|x| x.requests("sessions.transferRemoteControl"))
                .collect();
            let r = c
                .call(
                    "sessions.transferRemoteControl",
                    json!({"toSessionId": sid}),
                )
                .await;
            assert_eq!(
                r.error_code(),
                Some(-32601),
                "the fake does not implement it: {}",
                r.text()
            );
            for (j, x) in f.iter().enumerate() {
                let want = before[j] + u64::from(j == home);
                assert_eq!(
                    x.requests("sessions.transferRemoteControl"),
                    want,
                    "routed to the wrong backend"
                );
            }
            let opened = f[home].requests("sessions.open");
            let r = c
                .call("sessions.open", json!({"kind": "attach", "sessionId": sid}))
                .await;
            assert!(r.text().contains("Unhandled method"), "{}", r.text());
            assert_eq!(f[home].requests("sessions.open"), opened + 1);
        }
        let r = c.call("sessions.open", json!({"kind": "resumeLast"})).await;
        assert_eq!(r.error_code(), Some(-32601));
        assert!(r.text().contains("cannot route"), "{}", r.text());
        let total: u64 = f.iter().map(|x| x.requests("sessions.open")).sum();
        assert_eq!(total, 6, "a refused sessions.open reached a backend");
    })
    .await;
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_pin_its_connection() {
    within(Duration::from_secs(30), async {
        use tokio::io::AsyncWriteExt;
        let f = fakes(1, false).await;
        // The wait for its last replies is bounded by shutdown_timeout (then 5 s for the
        // writer): set short, so the test does not depend on how much of the stream the
        // kernel's socket buffers happen to absorb (with room for all of it, the stream ends
        // and nothing is in flight; without, the bound is what frees the connection).
        let mut cfg = config(&[f[0].addr()]);
        cfg.limits.shutdown_timeout = copilot_lb::config::Millis(Duration::from_secs(3));
        let (running, addr) = proxy(cfg).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut wire = Vec::new();
        for (id, m, p) in [
            (1, "session.create", json!({"sessionId": "flood"})),
            (
                2,
                "test.stream",
                json!({"sessionId": "flood", "count": 2000, "size": 65536}),
            ),
        ] {
            let body = json!({"jsonrpc": "2.0", "id": id, "method": m, "params": p}).to_string();
            wire.extend(copilot_lb::codec::encode_frame(body.as_bytes()));
        }
        s.write_all(&wire).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Half-close and never read the ~128 MiB of events queued for us.
        s.shutdown().await.unwrap();
        let gone = common::eventually(Duration::from_secs(15), || {
            running
                .shared
                .render_metrics()
                .contains("copilot_lb_connections_active 0")
        })
        .await;
        assert!(gone, "the connection stayed pinned by its blocked writer");
        assert!(
            common::eventually(Duration::from_secs(5), || f[0].connections() == 0).await,
            "its upstream link stayed open"
        );
        drop(s);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_are_percent_decoded() {
    within(Duration::from_secs(30), async {
        let f = fakes(1, false).await;
        let (running, addr) = proxy(config(&[f[0].addr()])).await;
        let admin = running.admin_addr.unwrap();
        let sid = "job 1/\u{3b1}#x?y";
        let mut c = Client::connected(addr).await;
        c.ok("session.create", json!({"sessionId": sid})).await;
        let path = "/api/sessions/job%201%2F%CE%B1%23x%3Fy";
        let r = tokio::task::spawn_blocking(move || http(admin, "DELETE", path))
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(!f[0].stored_sessions().iter().any(|s| s == sid), "{r}");
        let bad = tokio::task::spawn_blocking(move || http(admin, "DELETE", "/api/sessions/%FF"))
            .await
            .unwrap();
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        let name = f[0].addr().to_string().replace(':', "%3A");
        let d = tokio::task::spawn_blocking(move || {
            http(admin, "POST", &format!("/api/backends/{name}/drain"))
        })
        .await
        .unwrap();
        assert!(d.starts_with("HTTP/1.1 200"), "{d}");
    })
    .await;
}

/// The log line for an oversized frame names the connection in `conn` and the frame's id in
/// `request` (the code before the fix put the request id in `conn`, so a log search by
/// connection found the wrong client's lines).
#[tokio::test]
async fn the_oversize_log_line_names_connection_and_request_apart() {
    let f = fakes(1, false).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lb.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listeners: [{{listen: 127.0.0.1:{port}}}]\nbackends: [{{address: {}}}]\nlimits: {{max_frame_bytes: 4096}}\nlog: {{format: json}}\n",
            f[0].addr()
        ),
    )
    .unwrap();
    let proxy = Logged::start(&cfg, "info");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        TcpStream::connect(addr).is_ok()
    });
    assert!(up, "proxy did not start");
    within(Duration::from_secs(20), async {
        let mut c = Client::connected(addr).await;
        let big = format!(
            r#"{{"jsonrpc":"2.0","id":4242,"method":"ping","params":{{"message":"{}"}}}}"#,
            "x".repeat(8192)
        );
        c.send_body(big.as_bytes()).await;
        let r = c.response("4242").await;
        assert_eq!(r.error_code(), Some(copilot_lb::rpc::FRAME_TOO_LARGE));
    })
    .await;
    let log = proxy.finish();
    let line = log
        .iter()
        .find(|l| l.contains("oversized frame refused"))
        .unwrap_or_else(|| panic!("no oversize line in the log:\n{}", log.join("\n")));
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    let fields = &v["fields"];
    assert_eq!(fields["request"], "4242", "{line}");
    assert!(
        fields["conn"].is_u64(),
        "conn must be the connection number: {line}"
    );
}
