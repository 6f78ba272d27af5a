//! The load generator shared by `benches/loadgen.rs` (the side-by-side benchmark) and
//! `tests/loadgen_smoke.rs` (a few-seconds run in `cargo test`).
//!
//! Closed-loop tokio clients speak Content-Length framed JSON-RPC to a target (the fake CLI
//! directly, copilot-lb plain or mTLS, HAProxy): N connections × M sessions each, a mix of
//! session-routed `test.echo` calls (latency) and `test.stream` event bursts (throughput).
//! Every loop is bounded by a count and a deadline, and every call by a timeout.
#![allow(dead_code)]

use bytes::Bytes;
use copilot_lb::codec::{FrameReader, Limits};
use copilot_lb::envelope::{self, Kind};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Longest wait for one reply (big frames included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Anything a client can talk over (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where the load goes.
#[derive(Clone)]
pub struct Target {
    /// Label in tables and plots.
    pub name: String,
    /// Address (127.0.0.1 only).
    pub addr: SocketAddr,
    /// TLS client config for a TLS listener.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Process whose RSS/CPU is charged to this path (proxy, HAProxy, or the fake for direct).
    pub pid: Option<u32>,
}

/// One client connection.
pub struct Conn {
    reader: FrameReader<ReadHalf<Box<dyn Io>>>,
    w: WriteHalf<Box<dyn Io>>,
    next: u64,
    out: Vec<u8>,
    /// `session.event` notifications received so far.
    pub events: u64,
    /// Bytes of those notifications.
    pub event_bytes: u64,
}

/// The outcome of one call.
pub struct Reply {
    /// Round-trip time.
    pub rtt: Duration,
    /// Whether the response carried `error`.
    pub error: bool,
    /// The response body.
    pub body: Bytes,
}

fn err(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}

impl Conn {
    /// Opens a connection (TCP_NODELAY; TLS handshake when the target has TLS).
    pub async fn open(t: &Target) -> std::io::Result<Conn> {
        let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(t.addr))
            .await
            .map_err(|_| err("connect timed out"))??;
        s.set_nodelay(true)?;
        let io: Box<dyn Io> = match &t.tls {
            None => Box::new(s),
            Some(cfg) => {
                let c = tokio_rustls::TlsConnector::from(cfg.clone());
                let name = rustls::pki_types::ServerName::IpAddress(t.addr.ip().into());
                Box::new(
                    tokio::time::timeout(Duration::from_secs(10), c.connect(name, s))
                        .await
                        .map_err(|_| err("TLS handshake timed out"))??,
                )
            }
        };
        let (r, w) = tokio::io::split(io);
        Ok(Conn {
            reader: FrameReader::new(r, Limits::default()),
            w,
            next: 1,
            out: Vec::new(),
            events: 0,
            event_bytes: 0,
        })
    }

    /// Opens a connection and runs the SDK's `connect` handshake.
    pub async fn open_connected(t: &Target) -> std::io::Result<Conn> {
        let mut c = Conn::open(t).await?;
        let r = c.call("connect", "{}").await?;
        if r.error {
            return Err(err(format!(
                "connect refused: {}",
                String::from_utf8_lossy(&r.body)
            )));
        }
        Ok(c)
    }

    /// Sends one request (header and body in one write) and reads frames until its response,
    /// counting `session.event` notifications on the way.
    pub async fn call(&mut self, method: &str, params: &str) -> std::io::Result<Reply> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_inner(method, params))
            .await
            .map_err(|_| err(format!("{method}: no reply within {CALL_TIMEOUT:?}")))?
    }

    async fn call_inner(&mut self, method: &str, params: &str) -> std::io::Result<Reply> {
        let id = self.next;
        self.next += 1;
        let body =
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{params}}}"#);
        self.out.clear();
        copilot_lb::codec::write_header(&mut self.out, body.len());
        self.out.extend_from_slice(body.as_bytes());
        let start = Instant::now();
        self.w.write_all(&self.out).await?;
        // A TLS stream may keep encrypted records back until flushed (when the socket was
        // not writable at the moment of the write); without a flush the request could sit
        // in the client forever.
        self.w.flush().await?;
        if self.out.capacity() > 1 << 20 {
            self.out = Vec::new();
        }
        loop {
            let frame = self
                .reader
                .read_frame()
                .await
                .map_err(|e| err(e.to_string()))?
                .ok_or_else(|| err("connection closed"))?;
            let env = envelope::parse(&frame).map_err(|e| err(e.to_string()))?;
            match env.kind {
                Kind::Response if env.id_u64() == Some(id) => {
                    let error = env.is_error;
                    drop(env);
                    return Ok(Reply {
                        rtt: start.elapsed(),
                        error,
                        body: frame,
                    });
                }
                Kind::Notification if env.method.as_deref() == Some("session.event") => {
                    self.events += 1;
                    self.event_bytes += frame.len() as u64;
                }
                // Other responses and server requests do not occur in these scenarios.
                _ => {}
            }
        }
    }

    /// `session.create` with a chosen id.
    pub async fn create_session(&mut self, sid: &str) -> std::io::Result<()> {
        let r = self
            .call("session.create", &format!(r#"{{"sessionId":"{sid}"}}"#))
            .await?;
        if r.error {
            return Err(err(format!(
                "session.create: {}",
                String::from_utf8_lossy(&r.body)
            )));
        }
        Ok(())
    }
}

/// A unique prefix for session ids of one run (the fake's storage is shared by all targets).
pub fn run_prefix(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "lg-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pct {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Pct {
    /// Percentiles of samples in nanoseconds (nearest-rank).
    pub fn of(mut ns: Vec<u64>) -> Pct {
        if ns.is_empty() {
            return Pct::default();
        }
        ns.sort_unstable();
        let at = |q: f64| {
            let i = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len()) - 1;
            ns[i] as f64 / 1000.0
        };
        Pct {
            n: ns.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: *ns.last().unwrap() as f64 / 1000.0,
        }
    }
}

/// Shape of a closed-loop load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Client connections.
    pub conns: usize,
    /// Sessions per connection.
    pub sessions: usize,
    /// Stop after this long...
    pub duration: Duration,
    /// ...or after this many operations per connection.
    pub max_ops: usize,
    /// Every `stream_every`-th operation is a `test.stream` (0: never).
    pub stream_every: usize,
    /// Events per stream.
    pub stream_count: usize,
    /// Bytes of `deltaContent` per event.
    pub stream_size: usize,
    /// Bytes of the `test.echo` payload.
    pub payload: usize,
    /// Unmeasured operations per connection before the clock starts.
    pub warmup: usize,
}

/// What a load run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadResult {
    /// Latency of the `test.echo` calls.
    pub lat: Pct,
    /// Raw samples (ns), for plots; empty unless kept.
    #[serde(skip)]
    pub samples: Vec<u64>,
    /// Completed calls per second (echo and stream calls).
    pub req_per_s: f64,
    /// `session.event` notifications per second.
    pub events_per_s: f64,
    /// Event payload megabytes (10^6) per second.
    pub event_mb_per_s: f64,
    /// Failed calls, refused connections and timeouts.
    pub errors: u64,
    /// Measured seconds.
    pub secs: f64,
}

impl LoadResult {
    /// Combines rounds of the same load into one result (samples pooled, rates over the
    /// summed measuring time).
    pub fn merge(rounds: Vec<LoadResult>) -> LoadResult {
        let secs: f64 = rounds.iter().map(|r| r.secs).sum::<f64>().max(1e-9);
        let rate = |f: &dyn Fn(&LoadResult) -> f64| {
            rounds.iter().map(|r| f(r) * r.secs).sum::<f64>() / secs
        };
        let samples: Vec<u64> = rounds
            .iter()
            .flat_map(|r| r.samples.iter().copied())
            .collect();
        LoadResult {
            lat: Pct::of(samples.clone()),
            samples,
            req_per_s: rate(&|r| r.req_per_s),
            events_per_s: rate(&|r| r.events_per_s),
            event_mb_per_s: rate(&|r| r.event_mb_per_s),
            errors: rounds.iter().map(|r| r.errors).sum(),
            secs,
        }
    }
}

/// Runs a closed-loop load against `t`.
pub async fn load(t: &Target, spec: &LoadSpec) -> LoadResult {
    let prefix = run_prefix("load");
    let payload = "x".repeat(spec.payload);
    let spec = Arc::new(spec.clone());
    let payload = Arc::new(payload);
    // Set up every connection and its sessions before the clock starts.
    let mut setups = tokio::task::JoinSet::new();
    for c in 0..spec.conns {
        let t = t.clone();
        let prefix = prefix.clone();
        let spec = spec.clone();
        setups.spawn(async move {
            let mut conn = Conn::open_connected(&t).await?;
            let mut sids = Vec::new();
            for s in 0..spec.sessions.max(1) {
                let sid = format!("{prefix}-{c}-{s}");
                conn.create_session(&sid).await?;
                sids.push(sid);
            }
            Ok::<_, std::io::Error>((conn, sids))
        });
    }
    let mut errors = 0u64;
    let mut ready = Vec::new();
    while let Some(r) = setups.join_next().await {
        match r {
            Ok(Ok(x)) => ready.push(x),
            Ok(Err(e)) => {
                eprintln!("loadgen: setup failed on {}: {e}", t.name);
                errors += 1;
            }
            Err(_) => errors += 1,
        }
    }
    let start_gate = Arc::new(tokio::sync::Barrier::new(ready.len() + 1));
    let mut workers = tokio::task::JoinSet::new();
    for (mut conn, sids) in ready {
        let spec = spec.clone();
        let payload = payload.clone();
        let gate = start_gate.clone();
        workers.spawn(async move {
            let echo: Vec<String> = sids
                .iter()
                .map(|s| format!(r#"{{"sessionId":"{s}","payload":"{payload}"}}"#))
                .collect();
            let stream: Vec<String> = sids
                .iter()
                .map(|s| {
                    format!(
                        r#"{{"sessionId":"{s}","count":{},"size":{}}}"#,
                        spec.stream_count, spec.stream_size
                    )
                })
                .collect();
            let mut errors = 0u64;
            for i in 0..spec.warmup {
                if conn.call("test.echo", &echo[i % echo.len()]).await.is_err() {
                    errors += 1;
                    break;
                }
            }
            gate.wait().await;
            let (ev0, evb0) = (conn.events, conn.event_bytes);
            let mut lat = Vec::with_capacity(spec.max_ops.min(1 << 20));
            let mut calls = 0u64;
            let deadline = Instant::now() + spec.duration;
            for i in 0..spec.max_ops {
                if Instant::now() >= deadline {
                    break;
                }
                let s = i % sids.len();
                let is_stream =
                    spec.stream_every > 0 && i % spec.stream_every == spec.stream_every - 1;
                let r = if is_stream {
                    conn.call("test.stream", &stream[s]).await
                } else {
                    conn.call("test.echo", &echo[s]).await
                };
                match r {
                    Ok(r) => {
                        calls += 1;
                        if r.error {
                            errors += 1;
                        } else if !is_stream {
                            lat.push(r.rtt.as_nanos() as u64);
                        }
                    }
                    Err(e) => {
                        eprintln!("loadgen: {e}");
                        errors += 1;
                        break;
                    }
                }
            }
            (
                lat,
                calls,
                conn.events - ev0,
                conn.event_bytes - evb0,
                errors,
            )
        });
    }
    start_gate.wait().await;
    let t0 = Instant::now();
    let (mut lat, mut calls, mut events, mut ev_bytes) = (Vec::new(), 0u64, 0u64, 0u64);
    while let Some(r) = workers.join_next().await {
        match r {
            Ok((l, c, e, b, er)) => {
                lat.extend(l);
                calls += c;
                events += e;
                ev_bytes += b;
                errors += er;
            }
            Err(_) => errors += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    LoadResult {
        lat: Pct::of(lat.clone()),
        samples: lat,
        req_per_s: calls as f64 / secs,
        events_per_s: events as f64 / secs,
        event_mb_per_s: ev_bytes as f64 / secs / 1e6,
        errors,
        secs,
    }
}

/// Streaming throughput: one connection, one session, `reps` × `test.stream {count, size}`;
/// the median rep is reported.
pub async fn stream(t: &Target, count: usize, size: usize, reps: usize) -> LoadResult {
    let mut errors = 0;
    let run = async {
        let mut c = Conn::open_connected(t).await?;
        let sid = run_prefix("stream");
        c.create_session(&sid).await?;
        // Warm-up burst.
        c.call(
            "test.stream",
            &format!(
                r#"{{"sessionId":"{sid}","count":{},"size":{size}}}"#,
                count.min(100)
            ),
        )
        .await?;
        let params = format!(r#"{{"sessionId":"{sid}","count":{count},"size":{size}}}"#);
        let mut runs = Vec::new();
        for _ in 0..reps {
            let (e0, b0) = (c.events, c.event_bytes);
            let r = c.call("test.stream", &params).await?;
            if r.error || c.events - e0 != count as u64 {
                errors += 1;
            }
            runs.push((r.rtt, c.events - e0, c.event_bytes - b0));
        }
        Ok::<_, std::io::Error>(runs)
    };
    match run.await {
        Ok(mut runs) => {
            runs.sort_by_key(|r| r.0);
            let (d, ev, b) = runs[runs.len() / 2];
            let secs = d.as_secs_f64().max(1e-9);
            LoadResult {
                lat: Pct::of(runs.iter().map(|r| r.0.as_nanos() as u64).collect()),
                samples: Vec::new(),
                req_per_s: 1.0 / secs,
                events_per_s: ev as f64 / secs,
                event_mb_per_s: b as f64 / secs / 1e6,
                errors,
                secs,
            }
        }
        Err(e) => {
            eprintln!("loadgen: stream on {}: {e}", t.name);
            LoadResult {
                errors: errors + 1,
                ..Default::default()
            }
        }
    }
}

/// Big frames: `reps` round trips of `test.echo` with a `size`-byte payload (the request and
/// the reply are both that big).
pub async fn big_frames(t: &Target, size: usize, reps: usize, deadline: Duration) -> LoadResult {
    let mut errors = 0;
    let until = Instant::now() + deadline;
    let run = async {
        let mut c = Conn::open_connected(t).await?;
        let sid = run_prefix("big");
        c.create_session(&sid).await?;
        let params = format!(
            r#"{{"sessionId":"{sid}","payload":"{}"}}"#,
            "x".repeat(size)
        );
        c.call("test.echo", &params).await?; // warm-up
        let mut lat = Vec::new();
        for _ in 0..reps {
            if Instant::now() >= until {
                break;
            }
            let r = c.call("test.echo", &params).await?;
            if r.error || r.body.len() < size {
                errors += 1;
            }
            lat.push(r.rtt.as_nanos() as u64);
        }
        Ok::<_, std::io::Error>(lat)
    };
    match run.await {
        Ok(lat) => {
            let secs: f64 = lat.iter().map(|n| *n as f64 / 1e9).sum();
            let n = lat.len();
            LoadResult {
                lat: Pct::of(lat),
                samples: Vec::new(),
                req_per_s: n as f64 / secs.max(1e-9),
                events_per_s: 0.0,
                // Megabytes moved per second (request + reply).
                event_mb_per_s: 2.0 * size as f64 * n as f64 / secs.max(1e-9) / 1e6,
                errors,
                secs,
            }
        }
        Err(e) => {
            eprintln!("loadgen: big frames on {}: {e}", t.name);
            LoadResult {
                errors: errors + 1,
                ..Default::default()
            }
        }
    }
}

/// What the idle-connection scenario measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleResult {
    /// Connections held open at once.
    pub open: usize,
    /// Connections that failed to open or handshake.
    pub errors: u64,
    /// RSS of the target's process before, KiB.
    pub rss_before_kib: u64,
    /// RSS with every connection open, KiB.
    pub rss_after_kib: u64,
    /// (after − before) / open, KiB.
    pub kib_per_conn: f64,
    /// Seconds to open them all.
    pub open_secs: f64,
}

/// Opens `n` connections (each runs `connect`; with `linked`, also one session-routed call so
/// a proxy holds an upstream link), holds them, and charges the RSS growth of `t.pid`.
pub async fn idle(t: &Target, n: usize, linked: bool, deadline: Duration) -> IdleResult {
    let before = t.pid.and_then(rss_kib).unwrap_or(0);
    let until = Instant::now() + deadline;
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut set = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for i in 0..n {
        let t = t.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _p = sem.acquire_owned().await.ok()?;
            if Instant::now() >= until {
                return None;
            }
            let mut c = Conn::open_connected(&t).await.ok()?;
            if linked {
                let p = format!(r#"{{"sessionId":"idle-{i}","payload":"x"}}"#);
                if c.call("test.echo", &p).await.ok()?.error {
                    return None;
                }
            }
            Some(c)
        });
    }
    let mut conns = Vec::with_capacity(n);
    let mut errors = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Some(c)) => conns.push(c),
            _ => errors += 1,
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    // Let the target settle (buffers released after the handshake burst).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = t.pid.and_then(rss_kib).unwrap_or(0);
    let open = conns.len();
    drop(conns);
    tokio::time::sleep(Duration::from_millis(500)).await;
    IdleResult {
        open,
        errors,
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_conn: if open > 0 {
            after.saturating_sub(before) as f64 / open as f64
        } else {
            0.0
        },
        open_secs,
    }
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds a process has used so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Ratio `x / base`, formatted.
pub fn ratio(x: f64, base: f64) -> String {
    if base > 0.0 && x.is_finite() {
        format!("{:.2}×", x / base)
    } else {
        "–".into()
    }
}

/// A number with a sensible precision.
pub fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{:.0}", x)
    } else if x >= 10.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.2}", x)
    }
}

/// One series of the latency plot.
pub struct Series {
    /// Legend.
    pub name: String,
    /// (percentile label, microseconds).
    pub points: Vec<(String, f64)>,
}

/// A hand-written SVG: one panel per scenario, latency (log scale) against percentile.
pub fn svg_plot(title: &str, panels: &[(String, Vec<Series>)]) -> String {
    let (pw, ph, ml, mt, mb) = (460.0, 320.0, 70.0, 50.0, 70.0);
    let width = ml + panels.len() as f64 * (pw + 40.0) + 20.0;
    let height = mt + ph + mb + 30.0;
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        width / 2.0,
        xml(title)
    );
    for (pi, (ptitle, series)) in panels.iter().enumerate() {
        let x0 = ml + pi as f64 * (pw + 40.0);
        let all: Vec<f64> = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| *v > 0.0)
            .collect();
        if all.is_empty() {
            continue;
        }
        let lo = all.iter().cloned().fold(f64::MAX, f64::min).log10().floor();
        let hi = all
            .iter()
            .cloned()
            .fold(0.0, f64::max)
            .log10()
            .ceil()
            .max(lo + 1.0);
        let y = |v: f64| mt + ph - (v.max(1e-3).log10() - lo) / (hi - lo) * ph;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>
<rect x="{x0}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="black"/>
"#,
            x0 + pw / 2.0,
            mt - 8.0,
            xml(ptitle)
        );
        let mut d = lo as i32;
        while d as f64 <= hi {
            for m in [1.0, 2.0, 5.0] {
                let v = m * 10f64.powi(d);
                if v.log10() > hi + 1e-9 {
                    break;
                }
                let yy = y(v);
                let label = if v >= 1000.0 {
                    format!("{} ms", v / 1000.0)
                } else {
                    format!("{v} µs")
                };
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
                    x0 + pw,
                    x0 - 4.0,
                    yy + 4.0
                );
            }
            d += 1;
        }
        let npts = series.first().map_or(0, |s| s.points.len()).max(1);
        let x = |i: usize| x0 + 30.0 + i as f64 * (pw - 60.0) / (npts.max(2) - 1) as f64;
        if let Some(first) = series.first() {
            for (i, (lab, _)) in first.points.iter().enumerate() {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                    x(i),
                    mt + ph + 18.0,
                    xml(lab)
                );
            }
        }
        for (si, se) in series.iter().enumerate() {
            let c = colors[si % colors.len()];
            let pts: Vec<String> = se
                .points
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{:.1},{:.1}", x(i), y(p.1)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            for p in &pts {
                let (px, py) = p.split_once(',').unwrap();
                let _ = write!(s, r#"<circle cx="{px}" cy="{py}" r="3" fill="{c}"/>"#);
            }
            let ly = mt + ph + 38.0 + 0.0 * si as f64;
            let lx = x0 + si as f64 * (pw / series.len().max(1) as f64);
            let _ = write!(
                s,
                r#"
<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{c}"/><text x="{:.1}" y="{:.1}">{}</text>
"#,
                ly - 10.0,
                lx + 16.0,
                ly,
                xml(&se.name)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Percentile points for the plot.
pub fn plot_points(p: &Pct) -> Vec<(String, f64)> {
    vec![
        ("p50".into(), p.p50),
        ("p90".into(), p.p90),
        ("p99".into(), p.p99),
        ("p99.9".into(), p.p999),
        ("max".into(), p.max),
    ]
}

/// Self-signed PKI for a TLS listener with client certificates: writes `ca.crt`,
/// `server.crt`/`server.key` (SAN 127.0.0.1) into `dir` and returns a client config that
/// trusts the CA and presents a client certificate.
pub fn mtls_pki(dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use test_support::pki::{self, Role};
    let ca = pki::ca("loadgen-ca");
    let server = ca.leaf("127.0.0.1", pki::ip("127.0.0.1"), Role::Server);
    let client = ca.leaf("loadgen", pki::uri("spiffe://bench/loadgen"), Role::Client);
    std::fs::write(dir.join("ca.crt"), ca.cert.pem()).unwrap();
    server.write(dir, "server");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(client.key.serialize_der()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![client.cert.der().clone()], key)
    .unwrap();
    Arc::new(cfg)
}

/// The YAML of a copilot-lb TLS listener (client certificates required) for `mtls_pki`'s files.
pub fn tls_listener_yaml(dir: &std::path::Path, listen: &str) -> String {
    format!(
        "  - listen: {listen}\n    tls:\n      cert: {}\n      key: {}\n      client_auth: required\n      client_ca: {}\n",
        dir.join("server.crt").display(),
        dir.join("server.key").display(),
        dir.join("ca.crt").display()
    )
}
