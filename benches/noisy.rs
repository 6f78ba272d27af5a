//! Noisy neighbours, measured: tenant A takes turns one after another while tenant B floods
//! `session.send` on its own sessions, against a fake CLI that runs a few turns at once (its
//! model calls are the bottleneck). A's turn latency (send to `session.idle`) is reported
//! unloaded and under B's flood, with no limits (first come, first served at the CLI), with
//! the backend's `max_concurrent_turns` (fair admission), and with B's own limits too.
//! Writes `benches/results/noisy.md`.
//!
//! `cargo bench --bench noisy`. Without `--bench` (as under `cargo test --all-targets`) it does
//! nothing. Environment: `NN_TURNS` A's turns per scenario (default 100), `NN_FLOOD` B's
//! sessions (default 24), `NN_TURN_MS` each turn's length (default 20), `NN_WORKERS` turns the
//! fake CLI runs at once (default 4), `NN_OUT` output directory.

use copilot_lb::codec::{write_header, FrameReader, Limits};
use copilot_lb::envelope::{self, Kind};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream as StdTcp};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Longest a scenario's A loop runs, whatever `NN_TURNS` says.
const SCENARIO_CAP: Duration = Duration::from_secs(30);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    if std::env::var("NN_FAKE_CHILD").is_ok() {
        return fake_child();
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("noisy: run it with `cargo bench --bench noisy`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// The fake CLI in its own process, so its CPU is its own.
fn fake_child() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fake = test_support::fake_cli::FakeCli::start(
            test_support::fake_cli::FakeConfig::named("cli-1"),
        )
        .await
        .expect("fake CLI");
        fake.set_turn_workers(env_u64("NN_WORKERS", 4) as usize);
        println!("ADDR {}", fake.addr());
        std::io::stdout().flush().ok();
        let _ = tokio::task::spawn_blocking(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        })
        .await;
    });
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let rest = &s[s.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Starts copilot-lb with tenants a and b; returns it and its client address.
fn spawn_lb(
    fake: SocketAddr,
    backend: &str,
    b: &str,
    dir: &Path,
    name: &str,
) -> (Proc, SocketAddr) {
    let (port, admin) = (free_port(), free_port());
    let yaml = format!(
        "listeners: [{{listen: 127.0.0.1:{port}}}]\nadmin: {{listen: 127.0.0.1:{admin}}}\nbackends: [{{address: {fake}{backend}}}]\nstate: {{kind: memory}}\nlog: {{level: warn}}\ntenants:\n  - {{name: a, token_hashes: [\"{}\"]}}\n  - {{name: b, token_hashes: [\"{}\"]{b}}}\n",
        copilot_lb::auth::hash_token("tok-a"),
        copilot_lb::auth::hash_token("tok-b"),
    );
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, yaml).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_copilot-lb"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("spawn copilot-lb");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while StdTcp::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < until, "copilot-lb did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Proc(child), addr)
}

/// One client connection with one session of its own.
struct Conn {
    r: FrameReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    next: u64,
    sid: String,
}

/// What a `session.send` came to.
enum Turn {
    /// Answered and its `session.idle` arrived, after this long.
    Done(Duration),
    /// Refused by the proxy (a limit).
    Refused,
}

impl Conn {
    async fn open(addr: SocketAddr, token: &str, sid: String) -> std::io::Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Conn {
            r: FrameReader::new(r, Limits::default()),
            w,
            next: 1,
            sid,
        };
        c.call("connect", &format!(r#"{{"token":"{token}"}}"#))
            .await?;
        let p = format!(r#"{{"sessionId":"{}"}}"#, c.sid);
        c.call("session.create", &p).await?;
        Ok(c)
    }

    async fn write(&mut self, method: &str, params: &str) -> std::io::Result<u64> {
        let id = self.next;
        self.next += 1;
        let body =
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{params}}}"#);
        let mut out = Vec::with_capacity(body.len() + 32);
        write_header(&mut out, body.len());
        out.extend_from_slice(body.as_bytes());
        self.w.write_all(&out).await?;
        Ok(id)
    }

    async fn frame(&mut self) -> std::io::Result<bytes::Bytes> {
        self.r
            .read_frame()
            .await
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other("closed"))
    }

    /// A call whose reply is awaited (errors are the caller's to judge).
    async fn call(&mut self, method: &str, params: &str) -> std::io::Result<bool> {
        let id = self.write(method, params).await?;
        loop {
            let f = self.frame().await?;
            let e = envelope::parse(&f).map_err(std::io::Error::other)?;
            if e.kind == Kind::Response && e.id_u64() == Some(id) {
                return Ok(!e.is_error);
            }
        }
    }

    /// One turn: the send, its reply, then its `session.idle`.
    async fn turn(&mut self, turn_ms: u64) -> std::io::Result<Turn> {
        let t0 = Instant::now();
        let p = format!(
            r#"{{"sessionId":"{}","prompt":"x","testTurnMs":{turn_ms}}}"#,
            self.sid
        );
        let id = self.write("session.send", &p).await?;
        let mut answered = false;
        let mut ended = false;
        while !(answered && ended) {
            let f = self.frame().await?;
            let e = envelope::parse(&f).map_err(std::io::Error::other)?;
            match e.kind {
                Kind::Response if e.id_u64() == Some(id) => {
                    if e.is_error {
                        return Ok(Turn::Refused);
                    }
                    answered = true;
                }
                Kind::Notification => {
                    drop(e);
                    if memchr::memmem::find(&f, b"\"session.idle\"").is_some() {
                        ended = true;
                    }
                }
                _ => {}
            }
        }
        Ok(Turn::Done(t0.elapsed()))
    }
}

struct Row {
    name: &'static str,
    p50: f64,
    p99: f64,
    turns: usize,
    b_turns: u64,
    b_refused: u64,
    wall: f64,
    cpu_lb: f64,
    cpu_fake: f64,
    cpu_gen: f64,
}

async fn scenario(
    name: &'static str,
    fake: (SocketAddr, u32),
    backend: &str,
    b_limits: &str,
    flood: usize,
    dir: &Path,
) -> Row {
    let turns = env_u64("NN_TURNS", 100) as usize;
    let turn_ms = env_u64("NN_TURN_MS", 20);
    let (lb, addr) = spawn_lb(fake.0, backend, b_limits, dir, name);
    let tag = name.replace(' ', "-");
    let stop = Arc::new(AtomicBool::new(false));
    let (b_ok, b_refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut floods = Vec::new();
    for i in 0..flood {
        let mut c = Conn::open(addr, "tok-b", format!("b-{tag}-{i}"))
            .await
            .unwrap();
        let (stop, ok, refused) = (stop.clone(), b_ok.clone(), b_refused.clone());
        floods.push(tokio::spawn(async move {
            let until = Instant::now() + SCENARIO_CAP + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                match c.turn(turn_ms).await {
                    Ok(Turn::Done(_)) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(Turn::Refused) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        // A hostile flooder: ignores retryAfterMs, tries again at once.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        0
                    }
                    Err(_) => break,
                };
            }
        }));
    }
    let mut a = Conn::open(addr, "tok-a", format!("a-{tag}")).await.unwrap();
    // Let the flood reach its steady state before measuring.
    tokio::time::sleep(Duration::from_millis(if flood > 0 { 500 } else { 0 })).await;
    let pids = [lb.0.id(), fake.1, std::process::id()];
    let before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let (b0, r0) = (
        b_ok.load(Ordering::Relaxed),
        b_refused.load(Ordering::Relaxed),
    );
    let t0 = Instant::now();
    let mut lat = Vec::new();
    while lat.len() < turns && t0.elapsed() < SCENARIO_CAP {
        match a.turn(turn_ms).await.expect("A's turn") {
            Turn::Done(d) => lat.push(d.as_secs_f64() * 1e3),
            Turn::Refused => panic!("tenant A was refused"),
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let after: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let (b1, r1) = (
        b_ok.load(Ordering::Relaxed),
        b_refused.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        let _ = tokio::time::timeout(Duration::from_secs(5), f).await;
    }
    drop(lb);
    let cpu = |i: usize| (after[i] - before[i]) / wall;
    Row {
        name,
        p50: pct(lat.clone(), 0.5),
        p99: pct(lat.clone(), 0.99),
        turns: lat.len(),
        b_turns: b1 - b0,
        b_refused: r1 - r0,
        wall,
        cpu_lb: cpu(0),
        cpu_fake: cpu(1),
        cpu_gen: cpu(2),
    }
}

async fn run() {
    let dir = std::env::temp_dir().join(format!("copilot-lb-noisy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("NN_FAKE_CHILD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("fake child");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let fake_addr: SocketAddr = line.trim().strip_prefix("ADDR ").unwrap().parse().unwrap();
    let fake = (fake_addr, child.id());
    let _fake = Proc(child);
    let flood = env_u64("NN_FLOOD", 24) as usize;
    let workers = env_u64("NN_WORKERS", 4);
    let cap = format!(", max_concurrent_turns: {workers}");
    let b_limits = ", rate_limit: {requests_per_second: 100, burst: 20}, max_concurrent_turns: 2";
    let rows = vec![
        scenario("unloaded", fake, "", "", 0, &dir).await,
        scenario("B floods, no limits", fake, "", "", flood, &dir).await,
        scenario(
            "B floods, backend max_concurrent_turns",
            fake,
            &cap,
            "",
            flood,
            &dir,
        )
        .await,
        scenario(
            "B floods, backend cap + B's limits",
            fake,
            &cap,
            b_limits,
            flood,
            &dir,
        )
        .await,
        scenario(
            "unloaded, backend cap + B's limits",
            fake,
            &cap,
            b_limits,
            0,
            &dir,
        )
        .await,
    ];
    let base = (rows[0].p50, rows[0].p99);
    let mut md = format!(
        "# Noisy neighbours\n\nTenant A: one session, {} sequential turns per scenario (at most {} s); tenant B: {flood} sessions on {flood} connections, each sending its next turn as soon as the last ended or was refused (1 ms later); every turn {} ms on a fake CLI that runs {workers} at once. Backend cap: `max_concurrent_turns: {workers}`. B's limits: `rate_limit: {{requests_per_second: 100, burst: 20}}`, `max_concurrent_turns: 2`. CPU: share of one core over A's measured span.\n\n| scenario | A p50 | A p99 | A p50 ×unloaded | A p99 ×unloaded | A turns | B turns/s | B refused/s | CPU copilot-lb | CPU fake CLI | CPU load generator |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        env_u64("NN_TURNS", 100),
        SCENARIO_CAP.as_secs(),
        env_u64("NN_TURN_MS", 20)
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.1} ms | {:.1} ms | {:.2}× | {:.2}× | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |\n",
            r.name,
            r.p50,
            r.p99,
            r.p50 / base.0,
            r.p99 / base.1,
            r.turns,
            r.b_turns as f64 / r.wall,
            r.b_refused as f64 / r.wall,
            r.cpu_lb,
            r.cpu_fake,
            r.cpu_gen
        ));
    }
    println!("{md}");
    let out = std::env::var("NN_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("noisy.md"), md).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
