//! The cost of the session registry, in one run: a forwarded session call through a replica
//! on Redis vs one on the embedded store (paired, interleaved), and what Redis adds to
//! `session.create` and to a replica's first `session.resume` of a session it never saw (a
//! cache miss answered by Redis) compared with the embedded store. Real `redis-server` and
//! release copilot-lb processes on loopback in front of one fake CLI; CPU per process.
//!
//!   cargo bench --bench registry            (REG_N sessions, default 300; REG_CALLS, 5000)
//!
//! Writes `benches/results/registry.md` (or `$LG_OUT/registry.md`).

#[path = "lg/mod.rs"]
mod lg;

use lg::{cpu_secs, Conn, Pct, Target};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use test_support::fake_cli::{FakeCli, FakeConfig};
use test_support::redis::RedisServer;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Lb(Child, SocketAddr);

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn lb(dir: &Path, name: &str, backend: SocketAddr, state: &str) -> Lb {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "listeners: [{{listen: {addr}}}]\nbackends: [{{address: {backend}}}]\nlog: {{level: warn}}\n{state}"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_copilot-lb"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("spawn copilot-lb");
    let until = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < until, "{name} did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Lb(child, addr)
}

fn target(name: &str, l: &Lb) -> Target {
    Target {
        name: name.into(),
        addr: l.1,
        tls: None,
        pid: Some(l.0.id()),
    }
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

async fn call_ok(c: &mut Conn, method: &str, params: &str) -> Duration {
    let r = c.call(method, params).await.expect(method);
    assert!(!r.error, "{method}: {}", String::from_utf8_lossy(&r.body));
    r.rtt
}

fn row(what: &str, e: &Pct, r: &Pct) -> String {
    format!(
        "| {what} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2}× / {:.2}× | {:+.0} / {:+.0} |\n",
        e.p50,
        e.p99,
        r.p50,
        r.p99,
        r.p50 / e.p50,
        r.p99 / e.p99,
        r.p50 - e.p50,
        r.p99 - e.p99
    )
}

fn main() {
    // `cargo test --all-targets` runs this too (harness = false, without `--bench`): then a
    // short smoke run into the temp dir, so the suite keeps it working and never rewrites the
    // committed figures.
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = if bench { env_or("REG_N", 300) } else { 20 };
    let calls: usize = if bench {
        env_or("REG_CALLS", 5000)
    } else {
        200
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bound = Duration::from_secs(600);
    let report = rt.block_on(async {
        tokio::time::timeout(bound, run(n, calls))
            .await
            .expect("registry bench took longer than 10 minutes")
    });
    let out = match std::env::var("LG_OUT") {
        Ok(o) => o,
        Err(_) if bench => "benches/results".into(),
        Err(_) => std::env::temp_dir()
            .join("copilot-lb-registry-bench-smoke")
            .display()
            .to_string(),
    };
    std::fs::create_dir_all(&out).unwrap();
    let path = Path::new(&out).join("registry.md");
    std::fs::write(&path, &report).unwrap();
    println!("{report}\nwritten to {}", path.display());
}

async fn run(n: usize, calls: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeCli::start(FakeConfig::named("b1")).await.unwrap();
    let redis = RedisServer::start().expect("redis-server (scripts/install-test-deps.sh)");
    let redis_state = format!(
        "state: {{kind: redis, url: \"{}\", key_prefix: \"bench:\"}}\n",
        redis.url()
    );
    let emb = lb(
        dir.path(),
        "embedded",
        fake.addr(),
        "state: {kind: embedded, path: state.redb}\n",
    )
    .await;
    let r1 = lb(dir.path(), "redis-1", fake.addr(), &redis_state).await;
    let r2 = lb(dir.path(), "redis-2", fake.addr(), &redis_state).await;
    let (te, t1, t2) = (
        target("embedded", &emb),
        target("redis-1", &r1),
        target("redis-2", &r2),
    );
    let cpu0: Vec<f64> = [&te, &t1, &t2]
        .iter()
        .map(|t| cpu_secs(t.pid.unwrap()).unwrap_or(0.0))
        .collect();
    let redis_cpu0 = cpu_secs(redis.pid()).unwrap_or(0.0);
    let (mut ce, mut c1, mut c2) = (
        Conn::open_connected(&te).await.unwrap(),
        Conn::open_connected(&t1).await.unwrap(),
        Conn::open_connected(&t2).await.unwrap(),
    );
    let tag = lg::run_prefix("reg");
    // Warm-up: connections to the backend and to Redis, scripts loaded.
    for i in 0..20 {
        call_ok(
            &mut ce,
            "session.create",
            &format!(r#"{{"sessionId":"{tag}-we-{i}"}}"#),
        )
        .await;
        call_ok(
            &mut c1,
            "session.create",
            &format!(r#"{{"sessionId":"{tag}-wr-{i}"}}"#),
        )
        .await;
    }
    // Creates, interleaved.
    let (mut create_e, mut create_r) = (Vec::new(), Vec::new());
    for i in 0..n {
        create_e.push(ns(call_ok(
            &mut ce,
            "session.create",
            &format!(r#"{{"sessionId":"{tag}-e-{i}"}}"#),
        )
        .await));
        create_r.push(ns(call_ok(
            &mut c1,
            "session.create",
            &format!(r#"{{"sessionId":"{tag}-r-{i}"}}"#),
        )
        .await));
    }
    // First resume through a replica: the embedded one knows every session from its file; the
    // second Redis replica never saw these, so each is a cache miss answered by Redis.
    let mut ce2 = Conn::open_connected(&te).await.unwrap();
    let (mut resume_e, mut resume_r) = (Vec::new(), Vec::new());
    for i in 0..n {
        resume_e.push(ns(call_ok(
            &mut ce2,
            "session.resume",
            &format!(r#"{{"sessionId":"{tag}-e-{i}"}}"#),
        )
        .await));
        resume_r.push(ns(call_ok(
            &mut c2,
            "session.resume",
            &format!(r#"{{"sessionId":"{tag}-r-{i}"}}"#),
        )
        .await));
    }
    // The resuming connections close, so each replica has one client per session again.
    drop(ce2);
    drop(c2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Forwarded session calls on held sessions, interleaved (the hot path).
    let (mut call_e, mut call_r) = (Vec::new(), Vec::new());
    for i in 0..calls {
        let k = i % n;
        call_e.push(ns(call_ok(
            &mut ce,
            "session.getMessages",
            &format!(r#"{{"sessionId":"{tag}-e-{k}"}}"#),
        )
        .await));
        call_r.push(ns(call_ok(
            &mut c1,
            "session.getMessages",
            &format!(r#"{{"sessionId":"{tag}-r-{k}"}}"#),
        )
        .await));
    }
    let cpu: Vec<f64> = [&te, &t1, &t2]
        .iter()
        .zip(&cpu0)
        .map(|(t, c0)| cpu_secs(t.pid.unwrap()).unwrap_or(0.0) - c0)
        .collect();
    let redis_cpu = cpu_secs(redis.pid()).unwrap_or(0.0) - redis_cpu0;
    let mut s = String::new();
    s.push_str(&format!(
        "# Session registry cost (one run, {} cores, {n} sessions, {calls} calls per path)\n\n",
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1)
    ));
    s.push_str("Latency in µs, p50 / p99, measured by one client on loopback, the two paths interleaved.\n\n");
    s.push_str("| operation | embedded | redis | ratio redis/embedded | redis − embedded |\n|---|---|---|---|---|\n");
    s.push_str(&row(
        "session.create",
        &Pct::of(create_e),
        &Pct::of(create_r),
    ));
    s.push_str(&row(
        "first session.resume on a replica (redis: cache miss)",
        &Pct::of(resume_e),
        &Pct::of(resume_r),
    ));
    s.push_str(&row(
        "forwarded session call (session.getMessages)",
        &Pct::of(call_e),
        &Pct::of(call_r),
    ));
    s.push_str(&format!(
        "\nCPU seconds over the run: copilot-lb embedded {:.2}, redis-1 {:.2}, redis-2 {:.2}; redis-server {:.2}.\n",
        cpu[0], cpu[1], cpu[2], redis_cpu
    ));
    drop(fake);
    s
}
