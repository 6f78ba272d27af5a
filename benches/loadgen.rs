//! Side-by-side benchmark: the same load direct to the fake CLI, through copilot-lb (plain and
//! mTLS, each a separate `copilot-lb serve` process) and through HAProxy in TCP mode, in one
//! run. Writes `benches/results/loadgen.md`, `latency.svg` and `loadgen.json`.
//!
//! `cargo bench --bench loadgen` (scripts/bench/run.sh sets `ulimit -n` and installs HAProxy).
//! Without `--bench` (as under `cargo test --all-targets`) it does nothing: the smoke run is
//! `tests/loadgen_smoke.rs`.
//!
//! Environment: `LG_OUT` output dir (default `benches/results`), `LG_IDLE` idle connections
//! (default 10000), `LG_QUICK=1` a short run, `LG_HAPROXY` the haproxy binary (default
//! `haproxy` on PATH; skipped when absent), `LG_ONLY` a comma list of the parts to run
//! (`low,busy,two,stream,stream64,frames,idle`; default all), `LG_LB_BIN` a copilot-lb binary to run
//! for the plain and mTLS "copilot-lb" columns instead of this build (A/B comparisons),
//! `LG_LB_EXTRA` YAML appended to the plain column's config (tuning experiments; `\n` for
//! newlines).

#[path = "lg/mod.rs"]
mod lg;

use lg::{IdleResult, LoadResult, LoadSpec, Target};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Rounds each scenario is split into, interleaving the paths.
const ROUNDS: usize = 5;

/// Rounds for a load scenario: the low-load latency run gets more, shorter ones, because its
/// paired added-latency estimate is a median over rounds.
fn rounds_of(scen: &str) -> usize {
    if scen.starts_with("low") {
        12
    } else {
        ROUNDS
    }
}
/// The busy-poll budget of the "copilot-lb busy-poll" column.
const BUSY_POLL: &str = "runtime:\n  busy_poll: 200us\n";

/// A child process, killed and reaped on drop.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("loadgen: stopped {}", self.name);
    }
}

fn main() {
    if let Ok(name) = std::env::var("LG_FAKE_CHILD") {
        fake_child(name);
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("loadgen: run it with `cargo bench --bench loadgen` (or scripts/bench/run.sh); the smoke run is tests/loadgen_smoke.rs");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// The fake CLI backend as its own process (so its CPU and RSS are its own): prints its
/// address, serves until stdin closes.
fn fake_child(name: String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fake =
            test_support::fake_cli::FakeCli::start(test_support::fake_cli::FakeConfig::named(name))
                .await
                .expect("fake CLI start");
        println!("ADDR {}", fake.addr());
        std::io::stdout().flush().ok();
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
        drop(fake);
    });
}

fn spawn_fake(name: &str, logs: &Path) -> (Proc, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("LG_FAKE_CHILD", name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(logs.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("spawn fake child");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("ADDR ")
        .unwrap_or_else(|| panic!("fake child said {line:?}"))
        .parse()
        .unwrap();
    (
        Proc {
            name: name.into(),
            child,
        },
        addr,
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(addr: SocketAddr, what: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {addr} within 20 s");
}

fn wait_ready(admin: SocketAddr) {
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n");
            let mut buf = [0u8; 16];
            if s.read(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
                || buf.starts_with(b"HTTP/1.0 200")
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("copilot-lb at admin {admin} not ready within 20 s");
}

/// Starts `copilot-lb serve --config` with one plain or mTLS listener.
fn spawn_lb(
    name: &str,
    backends: &[SocketAddr],
    tls_dir: Option<&Path>,
    extra: &str,
    dir: &Path,
) -> (Proc, SocketAddr) {
    let port = free_port();
    let admin = free_port();
    let listen = format!("127.0.0.1:{port}");
    let listener = match tls_dir {
        Some(d) => lg::tls_listener_yaml(d, &listen),
        None => format!("  - listen: {listen}\n"),
    };
    let mut yaml =
        format!("listeners:\n{listener}admin:\n  listen: 127.0.0.1:{admin}\nbackends:\n");
    for b in backends {
        yaml.push_str(&format!("  - address: {b}\n"));
    }
    yaml.push_str("limits:\n  max_connections: 40000\nlog:\n  level: warn\n");
    yaml.push_str(extra);
    // LG_LB_BIN: another copilot-lb build for the plain and mTLS columns (A/B comparisons).
    let bin = std::env::var("LG_LB_BIN")
        .ok()
        .filter(|b| !b.is_empty() && (name == "copilot-lb" || name == "copilot-lb-mtls"))
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_copilot-lb").into());
    let cfg = dir.join(format!("{name}.yaml"));
    // The fake CLI's test methods are not in the routing table; a build from before the
    // allow-list forwards them anyway and refuses the setting, so it gets the file without.
    let routed = format!("{yaml}routing:\n  allow_global: [test.echo, test.stream]\n");
    std::fs::write(&cfg, &routed).unwrap();
    let knows_routing = Command::new(&bin)
        .arg("check-config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !knows_routing {
        std::fs::write(&cfg, yaml).unwrap();
    }
    // Its own working directory: the default embedded registry file lives there, and an older
    // build (LG_LB_BIN) may not know `--state-path`.
    let cwd = dir.join(format!("{name}.run"));
    std::fs::create_dir_all(&cwd).unwrap();
    let child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .current_dir(&cwd)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("spawn copilot-lb");
    let p = Proc {
        name: name.into(),
        child,
    };
    let addr: SocketAddr = listen.parse().unwrap();
    wait_port(addr, name);
    wait_ready(format!("127.0.0.1:{admin}").parse().unwrap());
    (p, addr)
}

/// Starts HAProxy in TCP mode in front of `backend` (127.0.0.1 only), if installed.
fn spawn_haproxy(
    backend: SocketAddr,
    busy: bool,
    dir: &Path,
) -> Option<(Proc, SocketAddr, String)> {
    let bin = std::env::var("LG_HAPROXY").unwrap_or_else(|_| "haproxy".into());
    let version = Command::new(&bin).arg("-v").output().ok()?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let port = free_port();
    // HAProxy refuses to start when RLIMIT_NOFILE cannot hold 2 × maxconn sockets.
    let maxconn = ((nofile_limit().saturating_sub(200)) / 2).clamp(1000, 50_000);
    let cfg = format!(
        "global\n    maxconn {maxconn}\n    nbthread 2\n{}\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\nfrontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n\nbackend be\n    server fake {backend}\n",
        if busy { "    busy-polling\n" } else { "" }
    );
    let path = dir.join(if busy {
        "haproxy-busy.cfg"
    } else {
        "haproxy.cfg"
    });
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new(&bin)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
        .spawn()
        .ok()?;
    let p = Proc {
        name: "haproxy".into(),
        child,
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_port(addr, "haproxy");
    Some((p, addr, version))
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Lets a paused always-spinning process run while its own column is measured.
struct Awake(Option<u32>);

impl Awake {
    fn new(t: &Target, spinners: &[(String, u32)]) -> Awake {
        let pid = spinners.iter().find(|(n, _)| *n == t.name).map(|(_, p)| *p);
        if let Some(p) = pid {
            signal(p, "CONT");
            std::thread::sleep(Duration::from_millis(50));
        }
        Awake(pid)
    }
}

impl Drop for Awake {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            signal(p, "STOP");
        }
    }
}

fn nofile_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

#[derive(Serialize, Default)]
struct Report {
    machine: String,
    started: String,
    targets: Vec<String>,
    load: BTreeMap<String, BTreeMap<String, LoadResult>>,
    idle: BTreeMap<String, BTreeMap<String, IdleResult>>,
    /// scenario → process → CPU share of one core (cpu-seconds / wall-seconds).
    cpu: BTreeMap<String, BTreeMap<String, f64>>,
    two_backends: BTreeMap<String, LoadResult>,
    /// scenario → path → (p50, p99) added over direct: the median over rounds of the
    /// difference to direct measured in the same round.
    added: BTreeMap<String, BTreeMap<String, (f64, f64)>>,
    notes: Vec<String>,
}

/// Median over rounds of each round's percentile difference between a path and direct.
fn paired_added(path: &[LoadResult], direct: &[LoadResult]) -> (f64, f64) {
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            0.0
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        }
    };
    let per_round: Vec<(f64, f64)> = path
        .iter()
        .zip(direct)
        .map(|(p, d)| {
            let (p, d) = (
                lg::Pct::of(p.samples.clone()),
                lg::Pct::of(d.samples.clone()),
            );
            (p.p50 - d.p50, p.p99 - d.p99)
        })
        .collect();
    (
        med(per_round.iter().map(|x| x.0).collect()),
        med(per_round.iter().map(|x| x.1).collect()),
    )
}

/// CPU probes over a scenario.
struct Cpu {
    pids: Vec<(String, u32)>,
}

impl Cpu {
    fn snap(&self) -> (Instant, Vec<f64>) {
        (
            Instant::now(),
            self.pids
                .iter()
                .map(|(_, p)| lg::cpu_secs(*p).unwrap_or(0.0))
                .collect(),
        )
    }
    /// CPU-seconds used by each process and the wall-clock seconds since `before`.
    fn used(&self, before: (Instant, Vec<f64>)) -> BTreeMap<String, (f64, f64)> {
        let (t, now) = self.snap();
        let wall = t.duration_since(before.0).as_secs_f64();
        self.pids
            .iter()
            .zip(now.iter().zip(before.1.iter()))
            .map(|((n, _), (a, b))| (n.clone(), (a - b, wall)))
            .collect()
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.to_string()))
        .unwrap_or_default();
    format!(
        "{} × {cpu}, Linux {}, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim(),
        mem.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    )
}

async fn run() {
    let quick = std::env::var("LG_QUICK").is_ok_and(|v| v == "1");
    let only = std::env::var("LG_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only.split(',').any(|p| p.trim() == name);
    let out = std::env::var("LG_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results"));
    std::fs::create_dir_all(&out).unwrap();
    let tmp = std::env::temp_dir().join(format!("copilot-lb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    eprintln!("loadgen: logs and configs in {}", tmp.display());
    let mut report = Report {
        machine: machine(),
        started: copilot_lb::rpc::now_rfc3339(),
        ..Default::default()
    };
    let mut idle_n: usize = std::env::var("LG_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1000 } else { 10_000 });
    // HAProxy holds two sockets per connection, the loadgen one, the fake one.
    let limit = nofile_limit();
    if (idle_n as u64) * 2 + 512 > limit {
        let n = (limit.saturating_sub(512) / 2) as usize;
        report.notes.push(format!(
            "RLIMIT_NOFILE is {limit}: idle connections reduced from {idle_n} to {n} (run with `ulimit -n 65536`)"
        ));
        idle_n = n;
    }

    let (fake, fake_addr) = spawn_fake("fake-1", &tmp);
    let (fake2, fake2_addr) = spawn_fake("fake-2", &tmp);
    let tls_dir = tmp.join("pki");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let tls = lg::mtls_pki(&tls_dir);
    let extra = std::env::var("LG_LB_EXTRA")
        .unwrap_or_default()
        .replace("\\n", "\n");
    let (lb, lb_addr) = spawn_lb("copilot-lb", &[fake_addr], None, &extra, &tmp);
    let (lbb, lbb_addr) = spawn_lb("copilot-lb-busy", &[fake_addr], None, BUSY_POLL, &tmp);
    let (lbt, lbt_addr) = spawn_lb("copilot-lb-mtls", &[fake_addr], Some(&tls_dir), "", &tmp);
    let (lb2, lb2_addr) = spawn_lb(
        "copilot-lb-2backends",
        &[fake_addr, fake2_addr],
        None,
        "",
        &tmp,
    );
    let hap = spawn_haproxy(fake_addr, false, &tmp);
    let hapb = spawn_haproxy(fake_addr, true, &tmp);

    let mut targets = vec![
        (
            Target {
                name: "direct".into(),
                addr: fake_addr,
                tls: None,
                pid: Some(fake.pid()),
            },
            None,
        ),
        (
            Target {
                name: "copilot-lb".into(),
                addr: lb_addr,
                tls: None,
                pid: Some(lb.pid()),
            },
            Some(lb.pid()),
        ),
        (
            Target {
                name: "copilot-lb busy-poll".into(),
                addr: lbb_addr,
                tls: None,
                pid: Some(lbb.pid()),
            },
            Some(lbb.pid()),
        ),
        (
            Target {
                name: "copilot-lb mTLS".into(),
                addr: lbt_addr,
                tls: Some(tls),
                pid: Some(lbt.pid()),
            },
            Some(lbt.pid()),
        ),
    ];
    match &hap {
        Some((p, addr, version)) => {
            report.notes.push(format!("HAProxy: {version}"));
            targets.push((
                Target {
                    name: "HAProxy".into(),
                    addr: *addr,
                    tls: None,
                    pid: Some(p.pid()),
                },
                Some(p.pid()),
            ));
        }
        None => report.notes.push(
            "HAProxy not found: its column is empty (scripts/bench/setup.sh installs it)".into(),
        ),
    }
    // HAProxy's busy-polling spins even with no traffic: keep it stopped (SIGSTOP) except
    // while its own column is measured, or it would slow every other path down.
    let mut spinners: Vec<(String, u32)> = Vec::new();
    if let Some((p, addr, _)) = &hapb {
        spinners.push(("HAProxy busy-polling".into(), p.pid()));
        signal(p.pid(), "STOP");
        targets.push((
            Target {
                name: "HAProxy busy-polling".into(),
                addr: *addr,
                tls: None,
                pid: Some(p.pid()),
            },
            Some(p.pid()),
        ));
    }
    report.targets = targets.iter().map(|t| t.0.name.clone()).collect();

    let scale = |d: u64| Duration::from_millis(if quick { d / 4 } else { d });
    let low = LoadSpec {
        conns: 1,
        sessions: 1,
        duration: scale(4800),
        max_ops: 36_000,
        stream_every: 0,
        stream_count: 0,
        stream_size: 0,
        payload: 16,
        warmup: 300,
    };
    let busy = LoadSpec {
        conns: 64,
        sessions: 4,
        duration: scale(4000),
        max_ops: 100_000,
        stream_every: 16,
        stream_count: 8,
        stream_size: 200,
        payload: 16,
        warmup: 20,
    };
    let load_scen: Vec<(&str, LoadSpec)> = vec![
        ("low-load latency: 1 client, test.echo 16 B", low.clone()),
        (
            "64 clients × 4 sessions: test.echo 16 B + every 16th call a burst of 8 × 200 B events",
            busy.clone(),
        ),
    ];
    let t_start = Instant::now();
    let self_pid = std::process::id();
    for (scen, spec) in &load_scen {
        if !part(if scen.starts_with("low") {
            "low"
        } else {
            "busy"
        }) {
            continue;
        }
        // Interleaved rounds, so a slow spell of the machine hits every path alike.
        let mut rounds: Vec<Vec<LoadResult>> = vec![Vec::new(); targets.len()];
        let mut cpu_acc: Vec<BTreeMap<String, (f64, f64)>> = vec![BTreeMap::new(); targets.len()];
        let n_rounds = rounds_of(scen);
        let part_spec = LoadSpec {
            duration: spec.duration / n_rounds as u32,
            max_ops: spec.max_ops / n_rounds,
            ..spec.clone()
        };
        for _ in 0..n_rounds {
            for (i, (t, proxy_pid)) in targets.iter().enumerate() {
                let cpu = cpu_probe(&fake, *proxy_pid, self_pid);
                let _awake = Awake::new(t, &spinners);
                let before = cpu.snap();
                let r = lg::load(t, &part_spec).await;
                for (k, (used, wall)) in cpu.used(before) {
                    let e = cpu_acc[i].entry(k).or_default();
                    e.0 += used;
                    e.1 += wall;
                }
                rounds[i].push(r);
            }
        }
        for (i, (t, _)) in targets.iter().enumerate() {
            let added = paired_added(&rounds[i], &rounds[0]);
            report
                .added
                .entry(scen.to_string())
                .or_default()
                .insert(t.name.clone(), added);
        }
        for (i, (t, _)) in targets.iter().enumerate() {
            let r = LoadResult::merge(std::mem::take(&mut rounds[i]));
            eprintln!(
                "loadgen: {scen} / {}: p50 {:.1} µs p99 {:.1} µs {:.0} req/s {:.0} ev/s errors {}",
                t.name, r.lat.p50, r.lat.p99, r.req_per_s, r.events_per_s, r.errors
            );
            report
                .cpu
                .entry(format!("{scen} / {}", t.name))
                .or_default()
                .extend(
                    cpu_acc[i]
                        .iter()
                        .map(|(k, (u, w))| (k.clone(), u / w.max(1e-9))),
                );
            report
                .load
                .entry(scen.to_string())
                .or_default()
                .insert(t.name.clone(), r);
        }
    }
    // The same busy load through copilot-lb with a second fake backend: if the fake were the
    // bottleneck, throughput would rise.
    if part("two") {
        let t = Target {
            name: "copilot-lb, 2 backends".into(),
            addr: lb2_addr,
            tls: None,
            pid: Some(lb2.pid()),
        };
        let r = lg::load(&t, &busy).await;
        report.two_backends.insert(t.name.clone(), r);
    }
    let streams: Vec<(&str, usize, usize)> = vec![
        (
            "session.event stream, 200 B deltas",
            if quick { 5000 } else { 20_000 },
            200,
        ),
        (
            "session.event stream, 64 KiB deltas",
            if quick { 100 } else { 800 },
            65_536,
        ),
    ];
    for (scen, count, size) in streams
        .iter()
        .filter(|(_, _, size)| part("stream") || (*size > 1024 && part("stream64")))
    {
        let mut rounds: Vec<Vec<LoadResult>> = vec![Vec::new(); targets.len()];
        let mut cpu_acc: Vec<BTreeMap<String, (f64, f64)>> = vec![BTreeMap::new(); targets.len()];
        for _ in 0..ROUNDS {
            for (i, (t, proxy_pid)) in targets.iter().enumerate() {
                let cpu = cpu_probe(&fake, *proxy_pid, self_pid);
                let _awake = Awake::new(t, &spinners);
                let before = cpu.snap();
                rounds[i].push(lg::stream(t, *count, *size, 1).await);
                for (k, (used, wall)) in cpu.used(before) {
                    let e = cpu_acc[i].entry(k).or_default();
                    e.0 += used;
                    e.1 += wall;
                }
            }
        }
        for (i, (t, _)) in targets.iter().enumerate() {
            let r = LoadResult::merge(std::mem::take(&mut rounds[i]));
            eprintln!(
                "loadgen: {scen} / {}: {:.0} ev/s {:.1} MB/s errors {}",
                t.name, r.events_per_s, r.event_mb_per_s, r.errors
            );
            report
                .cpu
                .entry(format!("{scen} / {}", t.name))
                .or_default()
                .extend(
                    cpu_acc[i]
                        .iter()
                        .map(|(k, (u, w))| (k.clone(), u / w.max(1e-9))),
                );
            report
                .load
                .entry(scen.to_string())
                .or_default()
                .insert(t.name.clone(), r);
        }
    }
    let frames: Vec<(&str, usize, usize)> = vec![
        (
            "1 MiB frames (test.echo round trip)",
            1 << 20,
            if quick { 5 } else { 30 },
        ),
        (
            "32 MiB frames (test.echo round trip)",
            32 << 20,
            if quick { 2 } else { 6 },
        ),
    ];
    for (scen, size, reps) in frames.iter().filter(|_| part("frames")) {
        for (t, _) in &targets {
            let _awake = Awake::new(t, &spinners);
            let r = lg::big_frames(t, *size, *reps, Duration::from_secs(60)).await;
            eprintln!(
                "loadgen: {scen} / {}: p50 {:.1} ms p99 {:.1} ms errors {}",
                t.name,
                r.lat.p50 / 1000.0,
                r.lat.p99 / 1000.0,
                r.errors
            );
            report
                .load
                .entry(scen.to_string())
                .or_default()
                .insert(t.name.clone(), r);
        }
    }
    let idles = [
        (format!("{idle_n} idle connections (connect only)"), false),
        (
            format!("{idle_n} idle connections (connect + 1 forwarded call: upstream link open)"),
            true,
        ),
    ];
    // Fresh processes for every idle measurement: an allocator keeps freed memory, so a
    // process that already served load (or the previous idle round) would under-report.
    for (scen, linked) in idles.iter().filter(|_| part("idle")) {
        for (t, _) in &targets {
            let (fk, fk_addr) = spawn_fake("fake-idle", &tmp);
            let (procs, t) = match t.name.as_str() {
                "direct" => (
                    Vec::new(),
                    Target {
                        addr: fk_addr,
                        pid: Some(fk.pid()),
                        ..t.clone()
                    },
                ),
                "HAProxy" | "HAProxy busy-polling" => {
                    let busy = t.name.ends_with("busy-polling");
                    let Some((p, addr, _)) = spawn_haproxy(fk_addr, busy, &tmp) else {
                        continue;
                    };
                    let pid = p.pid();
                    (
                        vec![p],
                        Target {
                            addr,
                            pid: Some(pid),
                            ..t.clone()
                        },
                    )
                }
                name => {
                    let dir = t.tls.as_ref().map(|_| tls_dir.as_path());
                    let extra = if name.ends_with("busy-poll") {
                        BUSY_POLL
                    } else {
                        ""
                    };
                    let (p, addr) = spawn_lb(
                        &format!("{}-idle", name.replace(' ', "-")),
                        &[fk_addr],
                        dir,
                        extra,
                        &tmp,
                    );
                    let pid = p.pid();
                    (
                        vec![p],
                        Target {
                            addr,
                            pid: Some(pid),
                            ..t.clone()
                        },
                    )
                }
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            let r = lg::idle(&t, idle_n, *linked, Duration::from_secs(60)).await;
            drop(procs);
            drop(fk);
            eprintln!(
                "loadgen: {scen} / {}: {} open, {:.1} KiB/conn, errors {}",
                t.name, r.open, r.kib_per_conn, r.errors
            );
            report
                .idle
                .entry(scen.clone())
                .or_default()
                .insert(t.name.clone(), r);
        }
    }
    report.notes.push(format!(
        "measured in {:.0} s",
        t_start.elapsed().as_secs_f64()
    ));
    drop((lb, lbb, lbt, lb2, hap, hapb, fake2));
    let md = markdown(&report, &load_scen, &streams, &frames, &idles);
    std::fs::write(out.join("loadgen.md"), &md).unwrap();
    std::fs::write(
        out.join("loadgen.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    let panels: Vec<(String, Vec<lg::Series>)> = load_scen
        .iter()
        .map(|(scen, _)| {
            let short = if scen.starts_with("low") {
                "1 client, test.echo 16 B"
            } else {
                "64 clients × 4 sessions + event bursts"
            };
            (
                short.to_string(),
                report
                    .targets
                    .iter()
                    .filter_map(|t| {
                        report.load.get(*scen)?.get(t).map(|r| lg::Series {
                            name: t.clone(),
                            points: lg::plot_points(&r.lat),
                        })
                    })
                    .collect(),
            )
        })
        .collect();
    std::fs::write(
        out.join("latency.svg"),
        lg::svg_plot(
            "Round-trip latency percentiles (loopback, same run)",
            &panels,
        ),
    )
    .unwrap();
    println!("{md}");
    println!(
        "loadgen: wrote {}/loadgen.md, latency.svg, loadgen.json",
        out.display()
    );
    drop(fake);
}

fn cpu_probe(fake: &Proc, proxy: Option<u32>, me: u32) -> Cpu {
    let mut pids = vec![("fake CLI".to_string(), fake.pid())];
    if let Some(p) = proxy {
        pids.push(("proxy".into(), p));
    }
    pids.push(("loadgen".into(), me));
    Cpu { pids }
}

fn cell(x: f64, base: f64, unit: &str, first: bool) -> String {
    if first {
        format!("{} {unit}", lg::num(x))
    } else {
        format!("{} {unit} ({})", lg::num(x), lg::ratio(x, base))
    }
}

fn markdown(
    r: &Report,
    load_scen: &[(&str, LoadSpec)],
    streams: &[(&str, usize, usize)],
    frames: &[(&str, usize, usize)],
    idles: &[(String, bool)],
) -> String {
    let mut s = String::new();
    let ts = &r.targets;
    s.push_str(&format!(
        "Machine: {}. Run started {}. Ratios in parentheses are against **direct** in the same run.\n\n",
        r.machine, r.started
    ));
    s.push_str(&format!("| scenario | metric | {} |\n", ts.join(" | ")));
    s.push_str(&format!("|---|---|{}\n", "---|".repeat(ts.len())));
    let row = |s: &mut String, scen: &str, metric: &str, vals: Vec<Option<f64>>, unit: &str| {
        let base = vals[0].unwrap_or(0.0);
        let cells: Vec<String> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| v.map_or("–".into(), |v| cell(v, base, unit, i == 0)))
            .collect();
        s.push_str(&format!("| {scen} | {metric} | {} |\n", cells.join(" | ")));
    };
    let get = |scen: &str, f: &dyn Fn(&LoadResult) -> f64| -> Vec<Option<f64>> {
        ts.iter()
            .map(|t| r.load.get(scen).and_then(|m| m.get(t)).map(f))
            .collect()
    };
    for (scen, _) in load_scen {
        row(&mut s, scen, "p50", get(scen, &|x| x.lat.p50), "µs");
        row(&mut s, "", "p99", get(scen, &|x| x.lat.p99), "µs");
        row(&mut s, "", "p99.9", get(scen, &|x| x.lat.p999), "µs");
        let p50 = get(scen, &|x| x.lat.p50);
        let p99 = get(scen, &|x| x.lat.p99);
        let added: Vec<String> = p50
            .iter()
            .zip(&p99)
            .map(|(a, b)| match (a, b, p50[0], p99[0]) {
                (Some(a), Some(b), Some(a0), Some(b0)) => {
                    format!("{:+.1} / {:+.1} µs", a - a0, b - b0)
                }
                _ => "–".into(),
            })
            .collect();
        s.push_str(&format!(
            "| | added p50 / p99 (pooled) | {} |\n",
            added.join(" | ")
        ));
        let paired: Vec<String> = ts
            .iter()
            .map(|t| {
                r.added
                    .get(*scen)
                    .and_then(|m| m.get(t))
                    .map_or("–".into(), |(a, b)| format!("{a:+.1} / {b:+.1} µs"))
            })
            .collect();
        s.push_str(&format!(
            "| | added p50 / p99 (paired, median of {} rounds) | {} |\n",
            rounds_of(scen),
            paired.join(" | ")
        ));
        row(
            &mut s,
            "",
            "throughput",
            get(scen, &|x| x.req_per_s),
            "req/s",
        );
        if scen.starts_with("64") {
            row(&mut s, "", "events", get(scen, &|x| x.events_per_s), "ev/s");
        }
    }
    for (scen, _, _) in streams {
        row(
            &mut s,
            scen,
            "events",
            get(scen, &|x| x.events_per_s),
            "ev/s",
        );
        row(
            &mut s,
            "",
            "payload",
            get(scen, &|x| x.event_mb_per_s),
            "MB/s",
        );
    }
    for (scen, _, _) in frames {
        row(
            &mut s,
            scen,
            "p50",
            get(scen, &|x| x.lat.p50 / 1000.0),
            "ms",
        );
        row(&mut s, "", "p99", get(scen, &|x| x.lat.p99 / 1000.0), "ms");
    }
    for (scen, _) in idles {
        let vals: Vec<Option<f64>> = ts
            .iter()
            .map(|t| {
                r.idle
                    .get(scen)
                    .and_then(|m| m.get(t))
                    .map(|x| x.kib_per_conn)
            })
            .collect();
        row(&mut s, scen, "RSS per connection", vals, "KiB");
    }
    let errors: Vec<String> = ts
        .iter()
        .map(|t| {
            let l: u64 = r
                .load
                .values()
                .filter_map(|m| m.get(t))
                .map(|x| x.errors)
                .sum();
            let i: u64 = r
                .idle
                .values()
                .filter_map(|m| m.get(t))
                .map(|x| x.errors)
                .sum();
            (l + i).to_string()
        })
        .collect();
    s.push_str(&format!("| all | errors | {} |\n", errors.join(" | ")));
    s.push_str("\nIdle RSS: for *direct* it is the fake CLI's growth, for the others the proxy's own (its upstream sockets included).\n");

    s.push_str("\n**Is the fake backend the bottleneck?** CPU used during each scenario, in cores (1.00 = one core busy the whole time; the machine has ");
    s.push_str(&format!(
        "{}):\n\n| scenario / path | fake CLI | proxy | loadgen |\n|---|---|---|---|\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    for (k, m) in &r.cpu {
        let g = |n: &str| m.get(n).map_or("–".into(), |v| format!("{v:.2}"));
        s.push_str(&format!(
            "| {k} | {} | {} | {} |\n",
            g("fake CLI"),
            g("proxy"),
            g("loadgen")
        ));
    }
    if let (Some(one), Some(two)) = (
        r.load.get(load_scen[1].0).and_then(|m| m.get("copilot-lb")),
        r.two_backends.values().next(),
    ) {
        s.push_str(&format!(
            "\nSame 64-client load through copilot-lb with a second fake backend (separate process): {:.0} req/s, p50 {:.1} µs, p99 {:.1} µs, vs {:.0} req/s, p50 {:.1} µs, p99 {:.1} µs with one ({}).\n",
            two.req_per_s, two.lat.p50, two.lat.p99, one.req_per_s, one.lat.p50, one.lat.p99,
            lg::ratio(two.req_per_s, one.req_per_s)
        ));
    }
    s.push_str("\n**Targets** (added latency: the paired estimate — in each of the interleaved rounds, a path's percentile minus direct's in the same round; the median over rounds — which cancels the machine's slow drifts; the pooled figures above mix rounds):\n\n");
    let low = load_scen[0].0;
    for (lb, hap) in [
        ("copilot-lb", "HAProxy"),
        ("copilot-lb busy-poll", "HAProxy busy-polling"),
    ] {
        let added = |t: &str| r.added.get(low).and_then(|m| m.get(t)).copied();
        let Some((a50, a99)) = added(lb) else {
            continue;
        };
        s.push_str(&format!(
            "- {lb}: added latency at low load {a50:+.1} µs p50 (target ≤ +20): {}; {a99:+.1} µs p99 (target ≤ +40): {}\n",
            ok(a50 <= 20.0),
            ok(a99 <= 40.0)
        ));
        if let Some((h50, h99)) = added(hap) {
            s.push_str(&format!(
                "- {hap} adds {h50:+.1} µs p50, {h99:+.1} µs p99: {lb} no worse: {} (p50), {} (p99)\n",
                ok(a50 <= h50.max(0.0) + 1.0),
                ok(a99 <= h99.max(0.0) + 2.0)
            ));
        }
    }
    for (scen, _, _) in streams {
        let g = |t: &str| {
            r.load
                .get(*scen)
                .and_then(|m| m.get(t))
                .map(|x| x.events_per_s)
        };
        if let (Some(d), Some(l)) = (g("direct"), g("copilot-lb")) {
            s.push_str(&format!(
                "- {scen}: {:.2}× direct (target ≥ 0.8): {}\n",
                l / d,
                ok(l / d >= 0.8)
            ));
        }
    }
    for (scen, _) in idles {
        for t in ["copilot-lb", "copilot-lb mTLS"] {
            if let Some(i) = r.idle.get(scen).and_then(|m| m.get(t)) {
                s.push_str(&format!(
                    "- {scen}, {t}: {:.1} KiB per connection (target ≤ 32): {}\n",
                    i.kib_per_conn,
                    ok(i.kib_per_conn <= 32.0)
                ));
            }
        }
    }
    if !r.notes.is_empty() {
        s.push_str("\nNotes: ");
        s.push_str(&r.notes.join("; "));
        s.push_str(".\n");
    }
    s
}

fn ok(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "**missed**"
    }
}
