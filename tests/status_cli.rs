//! `copilot-lb status` and `copilot-lb sessions`: the built binary against a running proxy
//! (in-process, fake CLI backends) over real sockets: the tables, `--json`, the admin token
//! (401 without it, env preferred over a file), and the failures an operator meets
//! (connection refused, a listener that never answers) with their exit codes.

mod common;

use common::{within, Client, Fixture};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// Runs the binary with `args`, outside the repository (so no default config is picked up) and
/// with only `env` as its environment (the test process holds the proxies' tokens); bounded.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_copilot-lb"));
    cmd.args(args)
        .current_dir(dir.path())
        .env_clear()
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("copilot-lb did not exit within 20 s")
        .expect("run copilot-lb")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn admin(f: &Fixture) -> String {
    f.running.admin_addr.expect("admin listener").to_string()
}

/// A raw GET on the admin API, for comparing `--json` with what the API says.
async fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// The table row whose first cell is `first`.
fn row<'a>(table: &'a str, first: &str) -> Option<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
}

#[tokio::test]
async fn status_and_sessions_tables_and_json_from_a_running_proxy() {
    within(Duration::from_secs(60), async {
        let f = Fixture::start(2, false).await;
        let names = common::names(&f.fakes);
        let mut c = Client::connected(f.addr).await;
        for sid in ["status-a", "status-b", "status-c"] {
            c.ok("session.create", json!({"sessionId": sid})).await;
        }
        let addr = admin(&f);
        // Health checks run every 100 ms in the test config: wait for a first verdict each.
        let deadline = Instant::now() + Duration::from_secs(5);
        let out = loop {
            let o = run(&["status", "--admin", &addr], &[]).await;
            assert!(o.status.success(), "status failed: {}", stderr(&o));
            let t = stdout(&o);
            if !t.contains("none yet") || Instant::now() > deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            out.starts_with(&format!(
                "admin {addr}: 2 backend(s): 2 up, 0 draining, 0 down; 3 live session(s)"
            )),
            "{out}"
        );
        assert!(
            out.contains("registry embedded: up, 3 session(s) cached, 0 error(s)"),
            "{out}"
        );
        let header = out.lines().nth(3).unwrap_or("");
        let cols: Vec<&str> = header.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "BACKEND", "ADDRESS", "STATE", "HEALTH", "SESSIONS", "FLEET", "LINKS", "DRAIN",
                "WEIGHT", "VERSION", "LAST", "CHECK"
            ],
            "{out}"
        );
        let mut live = 0;
        for n in &names {
            let r = row(&out, n).unwrap_or_else(|| panic!("no row for {n}:\n{out}"));
            let cells: Vec<&str> = r.split_whitespace().collect();
            assert_eq!(cells[1], n.as_str(), "{r}");
            assert_eq!(cells[2], "up", "{r}");
            assert_eq!(cells[3], "ok", "{r}");
            live += cells[4].parse::<u64>().unwrap();
            assert!(r.contains(" ok ") && r.contains(" ago"), "{r}");
        }
        assert_eq!(live, 3, "{out}");

        // --json: the API's two replies, as they are.
        let o = run(&["status", "--admin", &addr, "--json"], &[]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).expect("status --json is JSON");
        let list = v["backends"].as_array().expect("backends array");
        assert_eq!(list.len(), 2);
        let mut got: Vec<&str> = list.iter().map(|b| b["name"].as_str().unwrap()).collect();
        got.sort();
        let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(v["registry"]["kind"], "embedded");
        assert_eq!(v["registry"]["cached"], 3);
        let (_, api) = get(&addr, "/api/backends", None).await;
        let api: Value = serde_json::from_str(&api).unwrap();
        for key in [
            "name",
            "address",
            "state",
            "weight",
            "live_sessions",
            "links",
        ] {
            assert_eq!(
                list.iter().map(|b| &b[key]).collect::<Vec<_>>(),
                api["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| &b[key])
                    .collect::<Vec<_>>(),
                "{key}"
            );
        }

        // sessions: one row per session with tenant and backend.
        let o = run(&["sessions", "--admin", &addr], &[]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        let t = stdout(&o);
        let cols: Vec<&str> = t.lines().next().unwrap_or("").split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "SESSION",
                "TENANT",
                "BACKEND",
                "AGE",
                "IDLE",
                "CONNS",
                "FAILOVERS"
            ],
            "{t}"
        );
        for sid in ["status-a", "status-b", "status-c"] {
            let r = row(&t, sid).unwrap_or_else(|| panic!("no row for {sid}:\n{t}"));
            let cells: Vec<&str> = r.split_whitespace().collect();
            assert_eq!(cells[1], "default", "{r}");
            let holder = common::holders(&f.fakes, sid)[0].addr().to_string();
            assert_eq!(cells[2], holder, "{r}");
            assert_eq!(cells[5], "1", "one live connection: {r}");
        }
        assert!(t.ends_with("3 session(s)\n"), "{t}");
        let o = run(&["sessions", "--admin", &addr, "--limit", "2"], &[]).await;
        let t = stdout(&o);
        assert!(
            t.ends_with("sessions 1-2 of 3; --offset 2 for more\n"),
            "{t}"
        );
        assert!(row(&t, "status-c").is_none(), "{t}");
        let o = run(&["sessions", "--admin", &addr, "--offset", "2"], &[]).await;
        assert!(row(&stdout(&o), "status-c").is_some(), "{}", stdout(&o));

        // sessions --json: the API's page.
        let o = run(
            &["sessions", "--admin", &addr, "--json", "--limit", "2"],
            &[],
        )
        .await;
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).expect("sessions --json is JSON");
        assert_eq!(
            (v["total"].clone(), v["offset"].clone(), v["limit"].clone()),
            (json!(3), json!(0), json!(2))
        );
        let ids: Vec<&str> = v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["session_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["status-a", "status-b"]);
        assert_eq!(v["sessions"][0]["owner"], "default");

        // A dead backend shows as down.
        f.fakes[0].kill();
        let dead = &names[0];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = run(&["status", "--admin", &addr], &[]).await;
            let t = stdout(&o);
            let r = row(&t, dead).unwrap_or("").to_string();
            if r.contains(" down ") {
                assert!(r.contains("failing"), "{r}");
                assert!(r.contains("failed") && r.contains(" ago: "), "{r}");
                assert!(t.contains("1 up, 0 draining, 1 down"), "{t}");
                break;
            }
            assert!(Instant::now() < deadline, "backend never shown down:\n{t}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(c);
    })
    .await;
}

#[tokio::test]
async fn the_admin_address_and_token_variable_come_from_the_config_file() {
    within(Duration::from_secs(60), async {
        let var = "STATUS_CLI_TEST_TOKEN_CFG";
        std::env::set_var(var, "cfg-secret");
        let f = Fixture::with(1, false, |c| {
            let a = c.admin.as_mut().unwrap();
            a.token_env = Some(var.into());
            a.protect_reads = true;
        })
        .await;
        let addr = admin(&f);
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("lb.yaml");
        std::fs::write(
            &cfg,
            format!("admin: {{listen: \"{addr}\", token_env: {var}}}\nbackends: [{{address: 127.0.0.1:1}}]\n"),
        )
        .unwrap();
        let cfg = cfg.to_str().unwrap();
        let o = run(&["status", "--config", cfg], &[(var, "cfg-secret")]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).starts_with(&format!("admin {addr}: 1 backend(s)")), "{}", stdout(&o));
        let o = run(&["status", "--config", cfg], &[]).await;
        assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(&format!("${var}")) && e.contains("COPILOT_LB_ADMIN_TOKEN"), "{e}");
        // A broken config is bad input, with its place.
        std::fs::write(dir.path().join("bad.yaml"), "admin: {listen: 127.0.0.1:1, nope: 2}\n").unwrap();
        let bad = dir.path().join("bad.yaml");
        let o = run(&["status", "--config", bad.to_str().unwrap()], &[]).await;
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
    })
    .await;
}

#[tokio::test]
async fn protected_reads_answer_401_without_the_token_and_the_env_wins_over_the_file() {
    within(Duration::from_secs(60), async {
        let var = "STATUS_CLI_TEST_TOKEN_401";
        std::env::set_var(var, "right-token");
        let f = Fixture::with(1, false, |c| {
            let a = c.admin.as_mut().unwrap();
            a.token_env = Some(var.into());
            a.protect_reads = true;
        })
        .await;
        let addr = admin(&f);
        // The API itself: /api/* reads need the token, probes and metrics do not.
        assert_eq!(get(&addr, "/api/sessions", None).await.0, 401);
        assert_eq!(
            get(&addr, "/api/backends", Some("right-token")).await.0,
            200
        );
        assert_eq!(get(&addr, "/livez", None).await.0, 200);
        assert_eq!(get(&addr, "/metrics", None).await.0, 200);

        for cmd in ["status", "sessions"] {
            let o = run(&[cmd, "--admin", &addr, "--token-env", var], &[]).await;
            assert_eq!(o.status.code(), Some(4), "{cmd}: {}", stderr(&o));
            let e = stderr(&o);
            assert!(e.contains("401") && e.contains(&format!("${var}")), "{e}");
            assert!(e.contains("--token-file"), "{e}");
            assert!(o.stdout.is_empty(), "{cmd} printed a table after a 401");
        }
        let o = run(
            &["status", "--admin", &addr, "--token-env", var],
            &[(var, "right-token")],
        )
        .await;
        assert!(o.status.success(), "{}", stderr(&o));
        // The default variable works too.
        let o = run(
            &["sessions", "--admin", &addr, "--json"],
            &[("COPILOT_LB_ADMIN_TOKEN", "right-token")],
        )
        .await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            serde_json::from_slice::<Value>(&o.stdout).unwrap()["total"],
            0
        );
        // A wrong token: refused, and the message names where it came from, not what it is.
        let o = run(
            &["status", "--admin", &addr, "--token-env", var],
            &[(var, "wrong-token")],
        )
        .await;
        assert_eq!(o.status.code(), Some(4));
        let e = stderr(&o);
        assert!(e.contains(&format!("from ${var} was refused")), "{e}");
        assert!(
            !e.contains("wrong-token") && !e.contains("right-token"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        let bad = dir.path().join("bad");
        std::fs::write(&good, "right-token\n").unwrap();
        std::fs::write(&bad, "wrong-token\n").unwrap();
        let file = |p: &Path| p.to_str().unwrap().to_string();
        let o = run(
            &[
                "status",
                "--admin",
                &addr,
                "--token-env",
                var,
                "--token-file",
                &file(&good),
            ],
            &[],
        )
        .await;
        assert!(o.status.success(), "token file: {}", stderr(&o));
        // Both given: the environment is preferred.
        let o = run(
            &[
                "status",
                "--admin",
                &addr,
                "--token-env",
                var,
                "--token-file",
                &file(&bad),
            ],
            &[(var, "right-token")],
        )
        .await;
        assert!(o.status.success(), "env over file: {}", stderr(&o));
        let o = run(
            &[
                "status",
                "--admin",
                &addr,
                "--token-env",
                var,
                "--token-file",
                &file(&good),
            ],
            &[(var, "wrong-token")],
        )
        .await;
        assert_eq!(o.status.code(), Some(4), "env over file: {}", stderr(&o));
        let missing = dir.path().join("missing");
        let o = run(
            &["status", "--admin", &addr, "--token-file", &file(&missing)],
            &[],
        )
        .await;
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("missing"), "{}", stderr(&o));
    })
    .await;
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn unreachable_and_silent_admin_apis_fail_fast_with_their_exit_codes() {
    within(Duration::from_secs(60), async {
        // Nothing listening.
        let nobody = free_port().to_string();
        let t0 = Instant::now();
        let o = run(&["status", "--admin", &nobody], &[]).await;
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("cannot connect to the admin API at") && e.contains(&nobody),
            "{e}"
        );
        assert!(e.to_lowercase().contains("refused"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));

        // A listener that accepts (the kernel's backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_addr = silent.local_addr().unwrap().to_string();
        for cmd in ["status", "sessions"] {
            let t0 = Instant::now();
            let o = run(&[cmd, "--admin", &silent_addr, "--timeout", "300ms"], &[]).await;
            let took = t0.elapsed();
            assert_eq!(o.status.code(), Some(3), "{cmd}: {}", stderr(&o));
            assert!(
                stderr(&o).contains("did not answer within 300ms"),
                "{}",
                stderr(&o)
            );
            assert!(took < Duration::from_secs(5), "{cmd} took {took:?}");
        }
        drop(silent);

        // Something that is not the admin API.
        let f = Fixture::start(1, false).await;
        let o = run(
            &["status", "--admin", &f.addr.to_string(), "--timeout", "1s"],
            &[],
        )
        .await;
        assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("is the admin listener?") || stderr(&o).contains("admin listener?"),
            "{}",
            stderr(&o)
        );
        // Bad input.
        let o = run(&["sessions", "--admin", "127.0.0.1:1", "--limit", "0"], &[]).await;
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        let o = run(&["status", "--admin", "no-port"], &[]).await;
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        let o = run(&["status", "--timeout", "0s"], &[]).await;
        assert_eq!(o.status.code(), Some(2), "clap usage error: {}", stderr(&o));
    })
    .await;
}
