//! The soak run (`chaos soak`, `tests/soak.rs`): N clients create, use and delete sessions
//! through a copilot-lb process in front of three fake CLIs sharing storage, for M minutes;
//! every 10 s copilot-lb's RSS, open fds and threads (from /proc) and its connection and
//! link gauges (from /metrics) are sampled.
//!
//! Pass: no error and no request without an answer; after the warm-up RSS stays within
//! ±`rss_tolerance` of the first post-warm-up sample; at the end (every client gone) the fds
//! are back to the baseline taken before the clients started, the threads too, and the
//! proxy holds no connection, link or session.

use super::host::Host;
use super::mux::{CallErr, Ev, Mux};
use super::procs;
use super::Tally;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of one soak.
#[derive(Debug, Clone)]
pub struct Opts {
    /// How long the clients run.
    pub duration: Duration,
    /// Concurrent clients, one connection each at a time.
    pub clients: usize,
    /// Mean pause before each request of a client (jittered ×0.5–1.5).
    pub think: Duration,
    /// Samples before this are warm-up (not held to the RSS bound).
    pub warmup: Duration,
    /// Sampling period.
    pub every: Duration,
    /// Allowed RSS deviation after warm-up (0.05 = ±5 %).
    pub rss_tolerance: f64,
    /// `session.send` turns per session.
    pub turns: usize,
    /// Sessions per connection before the client reconnects.
    pub sessions_per_conn: usize,
    /// Deadline of every request.
    pub deadline: Duration,
    /// The copilot-lb binary.
    pub lb_bin: PathBuf,
    /// Where to write the JSON report.
    pub out: Option<PathBuf>,
    /// copilot-lb's `log.level`.
    pub log_level: String,
}

impl Opts {
    /// Defaults for a run of `minutes` with `clients`.
    pub fn new(minutes: f64, clients: usize, lb_bin: PathBuf) -> Opts {
        let duration = Duration::from_secs_f64(minutes * 60.0);
        Opts {
            duration,
            clients,
            think: Duration::from_millis(2000),
            warmup: (duration / 5).clamp(Duration::from_secs(30), Duration::from_secs(300)),
            every: Duration::from_secs(10),
            rss_tolerance: 0.05,
            turns: 3,
            sessions_per_conn: 5,
            deadline: Duration::from_secs(20),
            lb_bin,
            out: None,
            log_level: "warn".into(),
        }
    }
}

/// One sample of copilot-lb.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Sample {
    /// Seconds since the clients started.
    pub t_s: f64,
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// Open fds.
    pub fds: usize,
    /// Threads.
    pub threads: u64,
    /// `copilot_lb_connections_active`.
    pub connections: f64,
    /// Sum of `copilot_lb_backend_links`.
    pub links: f64,
    /// Sum of `copilot_lb_backend_sessions`.
    pub sessions: f64,
    /// Requests answered so far.
    pub requests: u64,
}

/// The report.
#[derive(Serialize, Debug, Default)]
pub struct Report {
    /// Clients, duration, think time.
    pub setup: String,
    /// Samples, every 10 s.
    pub samples: Vec<Sample>,
    /// Requests sent / answered.
    pub sent: u64,
    /// Answered.
    pub answered: u64,
    /// Error responses by code (and client-side failures by name).
    pub errors: BTreeMap<String, u64>,
    /// Requests without an answer by their deadline.
    pub unanswered: u64,
    /// Sessions created and deleted.
    pub sessions_created: u64,
    /// Deleted.
    pub sessions_deleted: u64,
    /// Client connections opened.
    pub connections_opened: u64,
    /// Request rate, per second.
    pub req_per_s: f64,
    /// fds before the clients started / at the end.
    pub fds_baseline: usize,
    /// At the end.
    pub fds_end: usize,
    /// Threads before / at the end.
    pub threads_baseline: u64,
    /// At the end.
    pub threads_end: u64,
    /// RSS before the clients started, KiB.
    pub rss_start_kib: u64,
    /// The first post-warm-up sample, KiB.
    pub rss_ref_kib: u64,
    /// Smallest and largest post-warm-up samples.
    pub rss_min_kib: u64,
    /// Largest.
    pub rss_max_kib: u64,
    /// Largest |sample − ref| / ref after warm-up, percent.
    pub rss_dev_pct: f64,
    /// End state per the admin API: connections, links, sessions known.
    pub end_connections: f64,
    /// Links.
    pub end_links: f64,
    /// Sessions in `/api/sessions`.
    pub end_sessions: u64,
    /// Sessions left in the fakes' storage.
    pub end_stored: usize,
    /// copilot-lb CPU seconds used.
    pub lb_cpu_s: f64,
    /// Wall seconds.
    pub wall_s: f64,
    /// Failed checks (empty = pass).
    pub failed: Vec<String>,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    answered: AtomicU64,
    unanswered: AtomicU64,
    created: AtomicU64,
    deleted: AtomicU64,
    opened: AtomicU64,
}

struct Shared {
    addr: SocketAddr,
    until: Instant,
    o: Opts,
    c: Counters,
    errors: Tally,
}

fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    d.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// Sleeps up to `d`, never past the end of the run; false if the run is over.
async fn pause(sh: &Shared, d: Duration) -> bool {
    let now = Instant::now();
    if now >= sh.until {
        return false;
    }
    tokio::time::sleep(d.min(sh.until - now)).await;
    Instant::now() < sh.until
}

async fn call(sh: &Shared, mux: &Mux, method: &str, p: serde_json::Value) -> Option<()> {
    sh.c.sent.fetch_add(1, Ordering::Relaxed);
    match mux.call(method, &p, sh.o.deadline).await {
        Ok(r) => {
            sh.c.answered.fetch_add(1, Ordering::Relaxed);
            if let Some((code, msg)) = r.error {
                sh.errors.add(code.to_string());
                eprintln!("soak: {method}: {code} {msg}");
                return None;
            }
            if method == "session.delete"
                && r.json().pointer("/result/success") != Some(&json!(true))
            {
                sh.errors.add("delete-not-successful");
                return None;
            }
            Some(())
        }
        Err(CallErr::Deadline) => {
            sh.c.unanswered.fetch_add(1, Ordering::Relaxed);
            sh.errors.add("no-answer-by-deadline");
            None
        }
        Err(CallErr::Closed) => {
            sh.errors.add("connection-closed");
            None
        }
    }
}

async fn client(sh: Arc<Shared>, i: usize) {
    // Spread the clients' starts over one think time.
    let start = sh.o.think.mul_f64(i as f64 / sh.o.clients.max(1) as f64);
    if !pause(&sh, start).await {
        return;
    }
    let mut n = 0u64;
    while Instant::now() < sh.until {
        let mux = match Mux::connect(sh.addr).await {
            Ok(m) => m,
            Err(e) => {
                sh.errors.add("connect-failed");
                eprintln!("soak: client {i}: {e}");
                if !pause(&sh, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        sh.c.opened.fetch_add(1, Ordering::Relaxed);
        for _ in 0..sh.o.sessions_per_conn {
            if !pause(&sh, jitter(sh.o.think)).await {
                break;
            }
            n += 1;
            let sid = format!("soak-{}-{i}-{n}", std::process::id());
            let mut rx = mux.subscribe(&sid);
            if call(&sh, &mux, "session.create", json!({"sessionId": sid}))
                .await
                .is_some()
            {
                sh.c.created.fetch_add(1, Ordering::Relaxed);
                for t in 0..sh.o.turns {
                    if !pause(&sh, jitter(sh.o.think)).await {
                        break;
                    }
                    while rx.try_recv().is_ok() {}
                    let p = json!({"sessionId": sid, "prompt": format!("soak turn {t}")});
                    if call(&sh, &mux, "session.send", p).await.is_some() {
                        // The fake sends the turn's events before its response.
                        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
                        if !matches!(end, Ok(Some(Ev::Idle))) {
                            sh.errors.add("turn-without-session.idle");
                        }
                    }
                }
                // Deleted even when the run ended mid-session, so nothing is left behind.
                if call(&sh, &mux, "session.delete", json!({"sessionId": sid}))
                    .await
                    .is_some()
                {
                    sh.c.deleted.fetch_add(1, Ordering::Relaxed);
                }
            }
            mux.unsubscribe(&sid);
        }
        drop(mux);
    }
}

fn sample(pid: u32, admin: SocketAddr, t_s: f64, requests: u64) -> Sample {
    let m = procs::metrics(admin).unwrap_or_default();
    Sample {
        t_s,
        rss_kib: crate::lg::rss_kib(pid).unwrap_or(0),
        fds: procs::fds(pid).unwrap_or(0),
        threads: procs::threads(pid).unwrap_or(0),
        connections: procs::metric_sum(&m, "copilot_lb_connections_active"),
        links: procs::metric_sum(&m, "copilot_lb_backend_links"),
        sessions: procs::metric_sum(&m, "copilot_lb_backend_sessions"),
        requests,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

/// The smallest fd count over `n` readings 200 ms apart (a health probe may hold one briefly).
async fn min_fds(pid: u32, n: usize) -> usize {
    let mut best = usize::MAX;
    for _ in 0..n {
        best = best.min(procs::fds(pid).unwrap_or(usize::MAX));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    best
}

/// Runs the soak; the report's `failed` lists failed checks.
pub async fn run(o: Opts) -> std::io::Result<Report> {
    let t_wall = Instant::now();
    let dir = std::env::temp_dir().join(format!(
        "copilot-lb-soak-{}-{}",
        std::process::id(),
        t_wall.elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    eprintln!("soak: logs and configs in {}", dir.display());
    let names: Vec<String> = (1..=3).map(|i| format!("cli-{i}")).collect();
    let host = Host::start(&dir.join("storage"), &names).await?;
    let mut yaml = String::from("backends:\n");
    for (n, f) in &host.fakes {
        yaml.push_str(&format!("  - name: {n}\n    address: {}\n", f.addr()));
    }
    yaml.push_str(&format!(
        "health:\n  interval: 1s\n  timeout: 1s\nsessions:\n  shared_storage: true\n\
         limits:\n  max_connections: 20000\nlog:\n  level: {}\n",
        o.log_level
    ));
    let (bin, d) = (o.lb_bin.clone(), dir.clone());
    let lb = blocking(move || procs::spawn_lb(&bin, &yaml, &d)).await?;
    let pid = lb.proc.pid();
    let admin = lb.admin;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut r = Report {
        setup: format!(
            "{} clients for {:?}, each: connect, {} × (create, {} × send + session.idle, delete), reconnect; \
             a request every {:?} (×0.5–1.5) per client; 3 fake CLIs sharing storage; warm-up {:?}",
            o.clients, o.duration, o.sessions_per_conn, o.turns, o.think, o.warmup
        ),
        fds_baseline: min_fds(pid, 5).await,
        threads_baseline: procs::threads(pid).unwrap_or(0),
        rss_start_kib: crate::lg::rss_kib(pid).unwrap_or(0),
        ..Report::default()
    };
    let cpu0 = crate::lg::cpu_secs(pid).unwrap_or(0.0);
    let t0 = Instant::now();
    let sh = Arc::new(Shared {
        addr: lb.listen,
        until: t0 + o.duration,
        o: o.clone(),
        c: Counters::default(),
        errors: Tally::default(),
    });
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..o.clients {
        clients.spawn(client(sh.clone(), i));
    }
    // Sample every `every` while the clients run.
    let mut next = t0 + o.every;
    while next <= sh.until {
        tokio::time::sleep_until(next.into()).await;
        let (t, n) = (
            t0.elapsed().as_secs_f64(),
            sh.c.answered.load(Ordering::Relaxed),
        );
        let s = blocking(move || sample(pid, admin, t, n)).await;
        eprintln!(
            "soak: t={:>5.0}s rss {} KiB fds {} threads {} conns {} links {} sessions {} requests {}",
            s.t_s, s.rss_kib, s.fds, s.threads, s.connections, s.links, s.sessions, s.requests
        );
        r.samples.push(s);
        next += o.every;
    }
    let bound = o.deadline * 8 + Duration::from_secs(30);
    let drained = tokio::time::timeout(bound, async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        r.failed.push(format!(
            "clients did not finish within {bound:?} of the end"
        ));
    }
    let secs = t0.elapsed().as_secs_f64();
    // Let the proxy close what the clients closed, then read the end state (bounded).
    let mut end = Sample::default();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = t0.elapsed().as_secs_f64();
        end = blocking(move || sample(pid, admin, t, 0)).await;
        if end.connections == 0.0 && end.links == 0.0 && end.fds <= r.fds_baseline {
            break;
        }
    }
    r.fds_end = min_fds(pid, 5).await;
    r.threads_end = procs::threads(pid).unwrap_or(0);
    r.end_connections = end.connections;
    r.end_links = end.links;
    r.end_sessions = blocking(move || procs::placements(admin))
        .await
        .map_or(u64::MAX, |m| m.len() as u64);
    r.end_stored = host.storage.ids().len();
    r.lb_cpu_s = crate::lg::cpu_secs(pid).unwrap_or(0.0) - cpu0;
    r.sent = sh.c.sent.load(Ordering::Relaxed);
    r.answered = sh.c.answered.load(Ordering::Relaxed);
    r.unanswered = sh.c.unanswered.load(Ordering::Relaxed);
    r.sessions_created = sh.c.created.load(Ordering::Relaxed);
    r.sessions_deleted = sh.c.deleted.load(Ordering::Relaxed);
    r.connections_opened = sh.c.opened.load(Ordering::Relaxed);
    r.errors = sh.errors.snapshot();
    r.req_per_s = r.answered as f64 / secs.max(1e-9);
    let warm = o.warmup.as_secs_f64();
    let post: Vec<u64> = r
        .samples
        .iter()
        .filter(|s| s.t_s >= warm)
        .map(|s| s.rss_kib)
        .collect();
    if let Some(&first) = post.first() {
        r.rss_ref_kib = first;
        r.rss_min_kib = *post.iter().min().unwrap_or(&first);
        r.rss_max_kib = *post.iter().max().unwrap_or(&first);
        let dev = post
            .iter()
            .map(|&x| (x as f64 - first as f64).abs() / first.max(1) as f64)
            .fold(0.0, f64::max);
        r.rss_dev_pct = dev * 100.0;
        if dev > o.rss_tolerance {
            r.failed.push(format!(
                "RSS after warm-up left ±{:.0} % of {} KiB: {}..{} KiB ({:.1} %)",
                o.rss_tolerance * 100.0,
                first,
                r.rss_min_kib,
                r.rss_max_kib,
                r.rss_dev_pct
            ));
        }
    } else {
        r.failed
            .push("no RSS sample after the warm-up (run longer than the warm-up)".into());
    }
    let errors: u64 = r.errors.values().sum();
    if errors > 0 || r.unanswered > 0 {
        r.failed.push(format!("{errors} errors: {:?}", r.errors));
    }
    if r.sessions_created == 0 {
        r.failed.push("no session was created".into());
    }
    if r.fds_end > r.fds_baseline {
        r.failed.push(format!(
            "open fds at the end {} > baseline {}",
            r.fds_end, r.fds_baseline
        ));
    }
    if r.threads_end != r.threads_baseline {
        r.failed.push(format!(
            "threads at the end {} != baseline {}",
            r.threads_end, r.threads_baseline
        ));
    }
    if r.end_connections != 0.0 || r.end_links != 0.0 {
        r.failed.push(format!(
            "copilot-lb still reports {} client connections and {} backend links with no client left",
            r.end_connections, r.end_links
        ));
    }
    if r.end_sessions != 0 {
        r.failed.push(format!(
            "copilot-lb still lists {} sessions after every session was deleted",
            r.end_sessions
        ));
    }
    if r.end_stored != 0 {
        r.failed.push(format!(
            "{} sessions left in the fakes' storage (a delete was lost)",
            r.end_stored
        ));
    }
    r.wall_s = t_wall.elapsed().as_secs_f64();
    if let Some(out) = &o.out {
        if let Some(d) = out.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(
            out,
            serde_json::to_string_pretty(&r).map_err(std::io::Error::other)?,
        )?;
    }
    drop(lb);
    drop(host);
    // Kept when the run failed: its copilot-lb log says why.
    if r.failed.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(r)
}

/// The report as text.
pub fn render(r: &Report) -> String {
    let mut s = format!("soak: {}\n\n", r.setup);
    s.push_str("| t (s) | RSS (KiB) | fds | threads | connections | links | sessions | requests |\n|---|---|---|---|---|---|---|---|\n");
    for x in &r.samples {
        s.push_str(&format!(
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} |\n",
            x.t_s, x.rss_kib, x.fds, x.threads, x.connections, x.links, x.sessions, x.requests
        ));
    }
    s.push_str(&format!(
        "\nrequests sent {}, answered {} ({:.0}/s), without an answer {}; errors {:?}\n",
        r.sent, r.answered, r.req_per_s, r.unanswered, r.errors
    ));
    s.push_str(&format!(
        "sessions created {}, deleted {}; client connections opened {}\n",
        r.sessions_created, r.sessions_deleted, r.connections_opened
    ));
    s.push_str(&format!(
        "RSS: {} KiB before the clients, {} KiB at the end of warm-up, {}..{} KiB after it (max deviation {:.1} %)\n",
        r.rss_start_kib, r.rss_ref_kib, r.rss_min_kib, r.rss_max_kib, r.rss_dev_pct
    ));
    s.push_str(&format!(
        "fds: baseline {}, end {}; threads: baseline {}, end {}; at the end: {} connections, {} links, {} sessions in the proxy, {} in storage\n",
        r.fds_baseline, r.fds_end, r.threads_baseline, r.threads_end, r.end_connections, r.end_links, r.end_sessions, r.end_stored
    ));
    s.push_str(&format!(
        "copilot-lb CPU {:.1} s over {:.0} s\n",
        r.lb_cpu_s, r.wall_s
    ));
    if r.failed.is_empty() {
        s.push_str("\nSOAK: pass\n");
    } else {
        s.push_str("\nSOAK FAILED:\n");
        for f in &r.failed {
            s.push_str(&format!("  - {f}\n"));
        }
    }
    s
}
