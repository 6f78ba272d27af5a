//! The managed pool over real processes: the copilot-lb binary supervises fake CLIs (this
//! test binary itself, re-run as [`fake_cli_child`]), each of which starts a grandchild the
//! way a CLI starts a shell tool. Crash and restart with back-off, a fresh token per start,
//! rolling restart, and no process left after a clean stop or a SIGKILL of copilot-lb.

mod common;

use common::Client;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Set (through the pool's wrapper) when this test binary runs as a managed fake CLI.
const CHILD_PORT_VAR: &str = "COPILOT_LB_FAKE_CHILD_PORT";

/// Not a test: the entry point of a fake CLI started by the managed pool. Run normally it
/// returns at once. Run by the pool (the wrapper sets [`CHILD_PORT_VAR`]) it serves the
/// project's fake CLI on the port copilot-lb chose, with the token copilot-lb gave it, and
/// starts a grandchild (`sleep`) whose pid it writes into its COPILOT_HOME.
#[test]
fn fake_cli_child() {
    let Ok(port) = std::env::var(CHILD_PORT_VAR) else {
        return;
    };
    let port: u16 = port.parse().expect("port");
    let token = std::env::var("COPILOT_CONNECTION_TOKEN").ok();
    let home = PathBuf::from(std::env::var("COPILOT_HOME").expect("COPILOT_HOME"));
    let mut grandchild = Command::new("sleep").arg("120").spawn().expect("sleep");
    std::fs::write(home.join("grandchild.pid"), grandchild.id().to_string()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let _cli = test_support::fake_cli::FakeCli::start(test_support::fake_cli::FakeConfig {
            name: format!("managed-{port}"),
            token,
            storage: None,
            addr: Some(SocketAddr::from(([127, 0, 0, 1], port))),
        })
        .await
        .expect("bind");
        println!("fake CLI listening on port {port}");
        // Bounded: the pool stops it long before this.
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
    let _ = grandchild.kill();
    let _ = grandchild.wait();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A copilot-lb process running a managed pool, its log collected.
struct Pool {
    child: std::process::Child,
    log: Arc<Mutex<Vec<String>>>,
    admin: String,
    listen: SocketAddr,
    dir: tempfile::TempDir,
}

impl Pool {
    /// Starts copilot-lb with `count` fake CLIs (or `command`/`args` instead).
    fn start(count: u32, command: Option<(&str, &[&str])>, extra: &str) -> Pool {
        Pool::start_with(count, command, extra, None)
    }

    /// Like [`Pool::start`], the admin API's mutating routes needing `admin_token`.
    fn start_with(
        count: u32,
        command: Option<(&str, &[&str])>,
        extra: &str,
        admin_token: Option<&str>,
    ) -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let (admin_port, listen_port) = (free_port(), free_port());
        let me = std::env::current_exe().unwrap();
        let (cmd, args) = match command {
            Some((c, a)) => (c.to_string(), a.iter().map(|s| format!("{s:?}")).collect()),
            None => (
                "sh".to_string(),
                vec![
                    "\"-c\"".to_string(),
                    // $5 is the port after the proxy's `--headless --host 127.0.0.1 --port`.
                    format!(
                        "{:?}",
                        format!(
                            "{CHILD_PORT_VAR}=\"$5\" exec {} fake_cli_child --exact --nocapture --test-threads=1",
                            me.display()
                        )
                    ),
                    "\"fake\"".to_string(),
                ],
            ),
        };
        let cfg = dir.path().join("lb.yaml");
        std::fs::write(
            &cfg,
            format!(
                "listeners: [{{listen: 127.0.0.1:{listen_port}}}]\nadmin: {{listen: 127.0.0.1:{admin_port}{}}}\nstate: {{kind: memory}}\nhealth: {{interval: 200ms, timeout: 500ms}}\nmanaged:\n  count: {count}\n  command: {cmd}\n  args: [{}]\n  home: {}\n  stop_timeout: 2s\n{}{extra}",
                if admin_token.is_some() { ", token_env: LB_ADMIN_TOKEN" } else { "" },
                args.join(", "),
                dir.path().join("pool").display(),
                if extra.contains("start_timeout") { "" } else { "  start_timeout: 10s\n" },
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_copilot-lb"));
        if let Some(t) = admin_token {
            child.env("LB_ADMIN_TOKEN", t);
        }
        let mut child = child
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Pool {
            child,
            log,
            admin: format!("127.0.0.1:{admin_port}"),
            listen: SocketAddr::from(([127, 0, 0, 1], listen_port)),
            dir,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn http(&self, method: &str, path: &str) -> (u16, Value) {
        let Ok(mut s) = TcpStream::connect(&self.admin) else {
            return (0, Value::Null);
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn metrics(&self) -> String {
        let Ok(mut s) = TcpStream::connect(&self.admin) else {
            return String::new();
        };
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn backends(&self) -> Vec<Value> {
        let (_, v) = self.http("GET", "/api/backends");
        v["backends"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (bounded) until `ok` holds for the backend list; panics with the log if not.
    fn wait_for(&self, what: &str, limit: Duration, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let t0 = Instant::now();
        loop {
            let b = self.backends();
            if !b.is_empty() && ok(&b) {
                return b;
            }
            if t0.elapsed() > limit {
                panic!(
                    "{what}: not within {limit:?}; backends {b:#?}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn all_up(&self, n: usize) -> Vec<Value> {
        self.wait_for("all managed CLIs up", Duration::from_secs(20), |b| {
            b.len() == n
                && b.iter().all(|x| {
                    x["state"] == "up" && x["managed"]["cli_pid"].as_u64().unwrap_or(0) > 0
                })
        })
    }

    /// Every process of the pool now: guardians, CLIs and the CLIs' grandchildren.
    fn processes(&self, backends: &[Value]) -> Vec<u32> {
        let mut pids = Vec::new();
        for b in backends {
            pids.push(b["managed"]["pid"].as_u64().unwrap() as u32);
            pids.push(b["managed"]["cli_pid"].as_u64().unwrap() as u32);
            let home = self
                .dir
                .path()
                .join("pool")
                .join(b["name"].as_str().unwrap());
            pids.push(grandchild(&home));
        }
        pids
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn grandchild(home: &Path) -> u32 {
    let t0 = Instant::now();
    loop {
        if let Some(p) = std::fs::read_to_string(home.join("grandchild.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no grandchild pid in {home:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a live process (a zombie waiting for a reaper counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn all_gone(pids: &[u32], limit: Duration) -> Vec<u32> {
    let t0 = Instant::now();
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || t0.elapsed() > limit {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

#[test]
fn a_clean_stop_leaves_no_process_behind() {
    let mut pool = Pool::start(2, None, "");
    let b = pool.all_up(2);
    let pids = pool.processes(&b);
    assert!(pids.iter().all(|&p| alive(p)), "{pids:?}");
    signal(pool.child.id(), "-TERM");
    let t0 = Instant::now();
    let st = pool.child.wait().unwrap();
    assert!(st.success(), "copilot-lb exit: {st}\n{}", pool.log());
    assert!(t0.elapsed() < Duration::from_secs(10));
    let left = all_gone(&pids, Duration::from_secs(5));
    assert!(left.is_empty(), "left running: {left:?}\n{}", pool.log());
    let log = pool.log();
    assert!(log.contains("managed CLI stopped backend=cli-1"), "{log}");
}

#[test]
fn sigkill_of_copilot_lb_leaves_no_process_behind() {
    let mut pool = Pool::start(2, None, "");
    let b = pool.all_up(2);
    let pids = pool.processes(&b);
    signal(pool.child.id(), "-KILL");
    let _ = pool.child.wait();
    let left = all_gone(&pids, Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "orphans after SIGKILL: {left:?}\n{}",
        pool.log()
    );
}

#[test]
fn a_crashed_cli_is_restarted_with_a_new_token_and_serves_again() {
    let pool = Pool::start(2, None, "");
    let b = pool.all_up(2);
    let old_cli = b[0]["managed"]["cli_pid"].as_u64().unwrap() as u32;
    let old_grandchild = grandchild(&pool.dir.path().join("pool/cli-1"));
    signal(old_cli, "-KILL");
    let b = pool.wait_for("cli-1 restarted and up", Duration::from_secs(15), |b| {
        b[0]["managed"]["restarts"] == 1
            && b[0]["state"] == "up"
            && b[0]["managed"]["cli_pid"].as_u64().unwrap_or(0) as u32 != old_cli
            && b[0]["managed"]["cli_pid"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(
        b[1]["managed"]["restarts"], 0,
        "the other CLI was left alone"
    );
    // The guardian took the dead CLI's group with it.
    assert!(all_gone(&[old_grandchild], Duration::from_secs(5)).is_empty());
    let log = pool.log();
    assert!(log.contains("managed CLI exited backend=cli-1"), "{log}");
    assert!(
        log.contains("restarts after back-off backend=cli-1 in_ms=500"),
        "{log}"
    );
    let m = pool.metrics();
    assert!(
        m.contains("copilot_lb_managed_restarts_total{backend=\"cli-1\",reason=\"exited\"} 1"),
        "{m}"
    );
    // Up means the proxy's probe passed with the CLI's new token; a client gets through.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = Client::connected(pool.listen).await;
        for i in 0..4 {
            let r = c
                .call("session.create", json!({"sessionId": format!("s-{i}")}))
                .await;
            assert!(r.json.get("result").is_some(), "{}", r.text());
        }
    });
}

#[test]
fn a_cli_that_keeps_exiting_is_restarted_with_doubling_back_off() {
    let pool = Pool::start(
        1,
        Some(("sh", &["-c", "echo dying; exit 3", "x"])),
        "  restart_backoff: 100ms\n  max_restart_backoff: 400ms\n",
    );
    let t0 = Instant::now();
    let want = [
        "in_ms=100",
        "in_ms=200",
        "in_ms=400 quick_exits=3",
        "in_ms=400 quick_exits=4",
    ];
    loop {
        let log = pool.log();
        if want.iter().all(|w| log.contains(w)) {
            assert!(
                log.contains("dying backend=cli-1 stream=\"stdout\""),
                "{log}"
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "back-off not seen:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Capped: no delay above the maximum was ever chosen.
    assert!(!pool.log().contains("in_ms=800"));
    let b = pool.backends();
    assert_ne!(b[0]["state"], "up", "{b:?}");
}

#[test]
fn rolling_restart_renews_every_cli_one_at_a_time() {
    let pool = Pool::start(3, None, "");
    let before = pool.all_up(3);
    let (status, v) = pool.http("POST", "/api/backends/restart");
    assert_eq!(status, 200, "{v}\n{}", pool.log());
    let done = v["restarted"].as_array().unwrap();
    assert_eq!(done.len(), 3, "{v}");
    let after = pool.all_up(3);
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(b["managed"]["restarts"], 1, "{b}");
        assert_ne!(a["managed"]["cli_pid"], b["managed"]["cli_pid"]);
        assert_eq!(a["address"], b["address"], "same port, same backend");
        assert_eq!(b["draining"], false, "undrained after its restart");
    }
    let m = pool.metrics();
    for n in ["cli-1", "cli-2", "cli-3"] {
        let want =
            format!("copilot_lb_managed_restarts_total{{backend=\"{n}\",reason=\"rolling\"}} 1");
        assert!(m.contains(&want), "{want}\n{m}");
    }
    // One at a time: each CLI was back before the next one went down.
    let log = pool.log();
    let order: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("rolling restart: CLI"))
        .collect();
    assert_eq!(order.len(), 6, "{log}");
    for pair in order.chunks(2) {
        assert!(
            pair[0].contains("CLI idle") && pair[1].contains("CLI back"),
            "{order:#?}"
        );
    }
    // The CLI verb does the same through the admin API.
    let out = Command::new(env!("CARGO_BIN_EXE_copilot-lb"))
        .args(["restart", "--admin", &pool.admin])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["restarted"].as_array().unwrap().len(), 3);
    pool.wait_for("second restart counted", Duration::from_secs(10), |b| {
        b.iter()
            .all(|x| x["managed"]["restarts"] == 2 && x["state"] == "up")
    });
}

#[test]
fn bad_pools_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lb.yaml");
    let check = |yaml: &str| {
        std::fs::write(&cfg, yaml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_copilot-lb"))
            .arg("check-config")
            .arg(&cfg)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = check("managed: {count: 2}\nbackends: [{address: 127.0.0.1:1}]\n");
    assert!(
        !ok && err.contains("managed and backends cannot be combined"),
        "{err}"
    );
    let (ok, err) = check("managed:\n  count: 0\n");
    assert!(
        !ok && err.contains("line 2") && err.contains("between 1 and 64"),
        "{err}"
    );
    let (ok, err) = check("managed: {count: 1, env_pass: [COPILOT_CONNECTION_TOKEN, \"A B\"]}\n");
    assert!(
        !ok && err.contains("set by copilot-lb itself")
            && err.contains("not an environment variable name"),
        "{err}"
    );
    // A command that does not exist stops the start with what to do.
    std::fs::write(
        &cfg,
        format!(
            "listeners: [{{listen: 127.0.0.1:{}}}]\nstate: {{kind: memory}}\nmanaged: {{count: 1, command: copilot-does-not-exist, home: {}}}\n",
            free_port(),
            dir.path().join("pool").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_copilot-lb"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("was not found on PATH")
            && err.contains("@github/copilot@1.0.102"),
        "{err}"
    );
}

#[test]
fn restart_honours_the_admin_token_and_a_reload_keeps_the_pool() {
    let pool = Pool::start_with(2, None, "", Some("admin-SECRET-7"));
    let before = pool.all_up(2);
    let (status, v) = pool.http("POST", "/api/backends/restart");
    assert_eq!(status, 401, "{v}");
    // A reload (needs the token too) keeps the running pool as it is: same CLIs, still up.
    let reload = |token: &str| {
        let mut s = TcpStream::connect(&pool.admin).unwrap();
        write!(s, "POST /api/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let out = reload("admin-SECRET-7");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}\n{}", pool.log());
    std::thread::sleep(Duration::from_millis(500));
    let after = pool.all_up(2);
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(
            a["managed"]["cli_pid"], b["managed"]["cli_pid"],
            "reload touched a CLI"
        );
        assert_eq!(a["address"], b["address"]);
    }
    // The CLI verb sends the token named by admin.token_env.
    let cfg = pool.dir.path().join("lb.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_copilot-lb"))
        .args(["restart", "--config"])
        .arg(&cfg)
        .env("LB_ADMIN_TOKEN", "admin-SECRET-7")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_copilot-lb"))
        .args(["restart", "--config"])
        .arg(&cfg)
        .env("LB_ADMIN_TOKEN", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"));
    assert!(
        !pool.log().contains("admin-SECRET-7"),
        "the admin token reached the log"
    );
}

#[tokio::test]
async fn restart_without_a_managed_pool_is_refused() {
    let f = common::fakes(1, false).await;
    let (running, _addr) = common::proxy(common::config(&[f[0].addr()])).await;
    let admin = running.admin_addr.unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "POST /api/backends/restart HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 409"), "{out}");
    assert!(out.contains("no managed pool"), "{out}");
    assert!(running.managed.is_none());
}

#[test]
fn a_pool_of_one_refuses_a_rolling_restart() {
    let pool = Pool::start(1, None, "  start_timeout: 1s\n");
    let before = pool.all_up(1);
    let t0 = Instant::now();
    let (status, v) = pool.http("POST", "/api/backends/restart");
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no other CLI of the pool is up"),
        "{v}"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "it waited start_timeout for a spare"
    );
    // Nothing was touched: same process, still up, not left draining.
    let after = pool.all_up(1);
    assert_eq!(
        before[0]["managed"]["cli_pid"],
        after[0]["managed"]["cli_pid"]
    );
    assert_eq!(after[0]["draining"], false);
}
