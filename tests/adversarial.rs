//! Adversarial inputs (issue #10): malformed framing, hostile JSON, abusive JSON-RPC envelopes,
//! routing abuse, slow and half-open clients, and floods, each over real loopback sockets
//! against the in-process proxy and fake CLI servers.
//!
//! Every attack runs while a well-behaved client on another connection does `ping` round trips;
//! each of its pings must be answered within [`PING_LIMIT`], and its p50/p99 are printed (never
//! asserted: machines are noisy). Every case asserts a clear JSON-RPC error (by code, and by id
//! where one can be known) or a clean close, within [`D`]; afterwards the proxy must still
//! accept and serve a new client, and no backend may ever have seen `runtime.shutdown`.
//!
//! Table tests run their cases one after another against one proxy and report every failing
//! case by name, not just the first.

mod common;

use bytes::Bytes;
use common::*;
use copilot_lb::app::Running;
use copilot_lb::codec::{encode_frame, FrameReader, Limits};
use copilot_lb::config::Config;
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_support::fake_cli::FakeCli;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Bound on every single wait for a reply or a close.
const D: Duration = Duration::from_secs(3);
/// Bound on waits that follow a flood (thousands of frames).
const FLOOD_D: Duration = Duration::from_secs(10);
/// Bound on one whole test.
const T: Duration = Duration::from_secs(90);
/// Bound on one case of a table test.
const CASE_LIMIT: Duration = Duration::from_secs(15);
/// The background client's limit per ping round trip.
const PING_LIMIT: Duration = Duration::from_secs(2);
/// Pause between the background client's pings (pacing, not synchronization).
const PING_GAP: Duration = Duration::from_millis(5);
/// Upper bound on the background client's pings in one test.
const MAX_PINGS: usize = 100_000;
/// `limits.max_frame_bytes` in these tests.
const MAX_FRAME: usize = 64 * 1024;

const PARSE: i64 = -32700;
const INVALID: i64 = -32600;
const NOT_FOUND: i64 = -32601;
const PARAMS: i64 = -32602;
const TOO_LARGE: i64 = -32014;

/// Every background ping latency of this test binary, in microseconds.
static ALL_PINGS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

// ---------------------------------------------------------------------------------------------
// The rig: fakes, the proxy, and the background client.
// ---------------------------------------------------------------------------------------------

/// What a case can see of the system under attack.
struct Env {
    addr: SocketAddr,
    running: Running,
    fakes: Vec<FakeCli>,
}

impl Env {
    /// Client connections the proxy currently holds.
    fn conns(&self) -> usize {
        self.running.shared.conn_count()
    }

    /// How often the backends saw `method`, summed.
    fn reached(&self, method: &str) -> u64 {
        self.fakes.iter().map(|f| f.requests(method)).sum()
    }

    /// Waits (bounded) until the proxy holds exactly `n` client connections.
    async fn conns_settle(&self, n: usize, within: Duration) -> bool {
        eventually(within, || self.conns() == n).await
    }
}

/// A well-behaved client pinging on its own connection for the whole attack.
struct Pinger {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Result<Vec<Duration>, String>>,
}

impl Pinger {
    async fn start(addr: SocketAddr) -> Pinger {
        let mut c = Client::connected(addr).await;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        let (s, d) = (stop.clone(), done.clone());
        let task = tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut first = Some(first_tx);
            for n in 1..=MAX_PINGS {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let id = format!("\"bg-{n}\"");
                let t0 = Instant::now();
                c.send_request(&id, "ping", &json!({ "message": n.to_string() }))
                    .await;
                match c.try_response(&id, PING_LIMIT).await {
                    Some(f) if f.json["result"]["message"] == format!("pong: {n}") => {}
                    Some(f) => return Err(format!("ping {n}: unexpected reply {}", f.text())),
                    None => {
                        return Err(format!(
                            "ping {n}: no reply within {PING_LIMIT:?} (after {} good pings)",
                            lat.len()
                        ))
                    }
                }
                lat.push(t0.elapsed());
                d.fetch_add(1, Ordering::Relaxed);
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
                tokio::time::sleep(PING_GAP).await;
            }
            Ok(lat)
        });
        tokio::time::timeout(D, first_rx)
            .await
            .expect("background client: first ping timed out")
            .expect("background client: failed before its first ping");
        Pinger { stop, done, task }
    }

    fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }
}

/// The proxy under attack, its backends, and the background client.
struct Rig {
    name: &'static str,
    env: Arc<Env>,
    pinger: Pinger,
}

impl Rig {
    /// Two fakes, a proxy with `limits.max_frame_bytes` = 64 KiB, and the background client.
    async fn start(name: &'static str) -> Rig {
        Rig::with(name, |_| {}).await
    }

    async fn with(name: &'static str, tweak: impl FnOnce(&mut Config)) -> Rig {
        let fakes = fakes(2, false).await;
        let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
        let mut cfg = config(&addrs);
        cfg.limits.max_frame_bytes = MAX_FRAME;
        tweak(&mut cfg);
        let (running, addr) = proxy(cfg).await;
        let pinger = Pinger::start(addr).await;
        Rig {
            name,
            env: Arc::new(Env {
                addr,
                running,
                fakes,
            }),
            pinger,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.env.addr
    }

    /// Waits until the background client completes `more` pings from now (bounded): proof
    /// that it kept working while an attack was in progress.
    async fn pings_while_attacked(&self, more: usize, within: Duration) {
        let target = self.pinger.done() + more;
        let ok = eventually(within, || self.pinger.done() >= target).await;
        assert!(
            ok,
            "{}: the background client did not complete {more} pings within {within:?} during the attack",
            self.name
        );
    }

    /// Stops the background client, asserts it never failed, prints its latency, and checks
    /// that the proxy still serves a brand-new client.
    async fn finish(self) {
        self.pinger.stop.store(true, Ordering::Relaxed);
        let lat = tokio::time::timeout(Duration::from_secs(5), self.pinger.task)
            .await
            .unwrap_or_else(|_| panic!("{}: background client did not stop", self.name))
            .unwrap_or_else(|e| panic!("{}: background client panicked: {e}", self.name))
            .unwrap_or_else(|e| panic!("{}: background client failed: {e}", self.name));
        assert!(!lat.is_empty(), "{}: no background pings", self.name);
        let mut us: Vec<u64> = lat.iter().map(|d| d.as_micros() as u64).collect();
        us.sort_unstable();
        let (all_n, all_p50, all_p99) = {
            let mut all = ALL_PINGS.lock().unwrap();
            all.extend_from_slice(&us);
            all.sort_unstable();
            (all.len(), pct(&all, 50), pct(&all, 99))
        };
        println!(
            "[{}] background pings: {} ok, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms | binary so far: {} pings, p50 {:.2} ms, p99 {:.2} ms",
            self.name,
            us.len(),
            pct(&us, 50) as f64 / 1000.0,
            pct(&us, 99) as f64 / 1000.0,
            *us.last().unwrap() as f64 / 1000.0,
            all_n,
            all_p50 as f64 / 1000.0,
            all_p99 as f64 / 1000.0,
        );
        // Still up: a new client connects, pings, and reaches a backend.
        let mut c = Client::connected(self.env.addr).await;
        let f = c.call("ping", json!({"message": "after"})).await;
        assert_eq!(f.json["result"]["message"], "pong: after", "{}", f.text());
        let f = c.call("status.get", json!({})).await;
        assert!(
            f.json.get("result").is_some(),
            "{}: status.get after the attack: {}",
            self.name,
            f.text()
        );
        assert_eq!(
            self.env.reached("runtime.shutdown"),
            0,
            "{}: runtime.shutdown reached a backend",
            self.name
        );
    }
}

fn pct(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) * p) / 100]
}

// ---------------------------------------------------------------------------------------------
// A raw attacker connection.
// ---------------------------------------------------------------------------------------------

/// What the attacker saw next.
#[derive(Debug)]
enum Next {
    Frame(Bytes),
    Closed,
    Silent,
}

/// A raw connection: exact bytes out, frames in, half-close on demand.
struct Raw {
    r: FrameReader<OwnedReadHalf>,
    w: Option<OwnedWriteHalf>,
    closed: bool,
    next_id: u64,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let s = tokio::time::timeout(D, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        let limits = Limits {
            max_header: 8 * 1024,
            max_frame: 512 * 1024 * 1024,
        };
        Raw {
            r: FrameReader::new(r, limits),
            w: Some(w),
            closed: false,
            next_id: 1,
        }
    }

    /// Writes bytes; false if the proxy already closed (a write error is not a test failure).
    async fn send(&mut self, bytes: &[u8]) -> bool {
        match self.w.as_mut() {
            Some(w) => tokio::time::timeout(D, w.write_all(bytes))
                .await
                .map(|r| r.is_ok())
                .unwrap_or(false),
            None => false,
        }
    }

    async fn frame(&mut self, body: &[u8]) -> bool {
        self.send(&encode_frame(body)).await
    }

    /// Writes `bytes` from a task (bounded by [`FLOOD_D`]) while the caller reads.
    fn write_in_background(
        &mut self,
        bytes: Vec<u8>,
    ) -> tokio::task::JoinHandle<(OwnedWriteHalf, bool)> {
        let mut w = self.w.take().expect("writer");
        tokio::spawn(async move {
            let ok = matches!(
                tokio::time::timeout(FLOOD_D, w.write_all(&bytes)).await,
                Ok(Ok(()))
            );
            (w, ok)
        })
    }

    /// Takes back the writer lent to [`Raw::write_in_background`]; the write must have worked.
    async fn rejoin_writer(&mut self, h: tokio::task::JoinHandle<(OwnedWriteHalf, bool)>) {
        let (w, ok) = h.await.expect("writer task");
        assert!(ok, "background write failed or stalled");
        self.w = Some(w);
    }

    /// Shuts down the write side (FIN) and keeps reading.
    async fn half_close(&mut self) {
        if let Some(mut w) = self.w.take() {
            let _ = w.shutdown().await;
            // Dropping an OwnedWriteHalf after shutdown keeps the read side open.
            drop(w);
        }
    }

    async fn next(&mut self, wait: Duration) -> Next {
        if self.closed {
            return Next::Closed;
        }
        match tokio::time::timeout(wait, self.r.read_frame()).await {
            Ok(Ok(Some(b))) => Next::Frame(b),
            Ok(Ok(None)) | Ok(Err(_)) => {
                self.closed = true;
                Next::Closed
            }
            Err(_) => Next::Silent,
        }
    }

    /// The next frame as JSON; panics on close, silence, or a body that is not JSON.
    async fn reply(&mut self, what: &str) -> Value {
        self.reply_within(what, D).await
    }

    async fn reply_within(&mut self, what: &str, wait: Duration) -> Value {
        match self.next(wait).await {
            Next::Frame(b) => json_of(&b, what),
            Next::Closed => panic!("{what}: connection closed without a reply"),
            Next::Silent => panic!("{what}: no reply within {wait:?}"),
        }
    }

    /// Expects the proxy to close the connection next (no further frame) within [`D`].
    async fn expect_closed(&mut self, what: &str) {
        match self.next(D).await {
            Next::Closed => {}
            Next::Frame(b) => panic!(
                "{what}: expected a close, got another frame {}",
                String::from_utf8_lossy(&b)
            ),
            Next::Silent => panic!("{what}: connection still open after {D:?}"),
        }
    }

    /// A `ping` on this connection must be answered, and be the very next frame.
    async fn expect_usable(&mut self, what: &str) {
        let n = self.next_id;
        self.next_id += 1;
        let id = format!("alive-{n}");
        let body =
            json!({"jsonrpc": "2.0", "id": id, "method": "ping", "params": {"message": "alive"}});
        assert!(
            self.frame(body.to_string().as_bytes()).await,
            "{what}: the proxy stopped reading (write failed)"
        );
        let v = self.reply(&format!("{what}: ping after the attack")).await;
        assert_eq!(
            v["id"], id,
            "{what}: the next frame is not the ping's reply: {v}"
        );
        assert_eq!(v["result"]["message"], "pong: alive", "{what}: {v}");
    }
}

fn json_of(b: &[u8], what: &str) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| {
        panic!(
            "{what}: the proxy sent a frame that is not JSON ({e}): {}",
            String::from_utf8_lossy(&b[..b.len().min(300)])
        )
    })
}

/// Asserts an error response with `code` and, when given, exactly `id`.
fn assert_error(v: &Value, code: i64, id: Option<&Value>, what: &str) {
    assert_eq!(
        v.pointer("/error/code").and_then(Value::as_i64),
        Some(code),
        "{what}: want error {code}, got {v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: error without a message: {v}"
    );
    assert_eq!(v["jsonrpc"], "2.0", "{what}: {v}");
    if let Some(id) = id {
        assert_eq!(&v["id"], id, "{what}: wrong id in {v}");
    }
}

// ---------------------------------------------------------------------------------------------
// Table-driven cases.
// ---------------------------------------------------------------------------------------------

/// What a case expects after it sends its bytes.
enum Want {
    /// An error with this code and id (None: id not checked), then `Then`.
    Err(i64, Option<Value>, Then),
    /// A success response with this id, then the stream is usable.
    Ok(Value),
    /// No reply at all: a `ping` sent right after gets the very next frame.
    Silent,
}

enum Then {
    Usable,
    Closed,
}

struct Case {
    name: String,
    wire: Vec<u8>,
    want: Want,
}

fn raw_case(name: &str, wire: impl AsRef<[u8]>, want: Want) -> Case {
    Case {
        name: name.to_string(),
        wire: wire.as_ref().to_vec(),
        want,
    }
}

fn body_case(name: &str, body: impl AsRef<[u8]>, want: Want) -> Case {
    raw_case(name, encode_frame(body.as_ref()), want)
}

/// `Content-Length` framing-error: -32700 with id null, then the connection is closed.
fn framing(name: &str, wire: impl AsRef<[u8]>) -> Case {
    raw_case(
        name,
        wire,
        Want::Err(PARSE, Some(Value::Null), Then::Closed),
    )
}

fn err(code: i64, id: Value) -> Want {
    Want::Err(code, Some(id), Then::Usable)
}

async fn run_case(env: Arc<Env>, case: Case) {
    let what = case.name.as_str();
    let mut c = Raw::connect(env.addr).await;
    c.send(&case.wire).await;
    match case.want {
        Want::Err(code, id, then) => {
            let v = c.reply(what).await;
            assert_error(&v, code, id.as_ref(), what);
            match then {
                Then::Usable => c.expect_usable(what).await,
                Then::Closed => c.expect_closed(what).await,
            }
        }
        Want::Ok(id) => {
            let v = c.reply(what).await;
            assert_eq!(v["id"], id, "{what}: {v}");
            assert!(v.get("result").is_some(), "{what}: want a result, got {v}");
            assert!(v.get("error").is_none(), "{what}: {v}");
            c.expect_usable(what).await;
        }
        Want::Silent => c.expect_usable(what).await,
    }
}

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let p = e.into_panic();
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Runs named cases one after another, each bounded, and fails listing every failed case.
/// After each case the background client must have completed another ping.
async fn run_all(rig: &Rig, cases: Vec<(String, CaseFuture)>) {
    let table = rig.name;
    let total = cases.len();
    let mut failed = Vec::new();
    for (name, fut) in cases {
        let before = rig.pinger.done();
        let h = tokio::spawn(tokio::time::timeout(CASE_LIMIT, fut));
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => failed.push(format!("  {name}: did not finish within {CASE_LIMIT:?}")),
            Err(e) => {
                let text = panic_text(e);
                match text.starts_with(name.as_str()) {
                    true => failed.push(format!("  {text}")),
                    false => failed.push(format!("  {name}: {text}")),
                }
            }
        }
        if !eventually(D, || rig.pinger.done() > before).await {
            failed.push(format!("  {name}: the background client made no progress"));
        }
    }
    println!("[{table}] {total} cases, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{table}: {} of {total} case(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

async fn run_table(rig: &Rig, cases: Vec<Case>) {
    let futs = cases
        .into_iter()
        .map(|c| {
            let env = rig.env.clone();
            let name = c.name.clone();
            (name, Box::pin(run_case(env, c)) as CaseFuture)
        })
        .collect();
    run_all(rig, futs).await;
}

fn ping_body(id: &str) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping","params":{{"message":"m"}}}}"#)
}

// ---------------------------------------------------------------------------------------------
// Framing.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_errors_get_a_parse_error_and_a_close() {
    within(T, async {
        let rig = Rig::start("framing_errors").await;
        let ping = ping_body("1");
        let hdr = |v: &str| format!("Content-Length: {v}\r\n\r\n{ping}");
        let cases = vec![
            framing(
                "no Content-Length",
                format!("Content-Type: application/json\r\n\r\n{ping}"),
            ),
            framing("negative length", hdr("-5")),
            framing("non-numeric length", hdr("abc")),
            framing("length with a plus sign", hdr(&format!("+{}", ping.len()))),
            framing("hexadecimal length", hdr("0x2a")),
            framing("fractional length", hdr(&format!("{}.0", ping.len()))),
            framing("empty length", hdr("")),
            framing("space inside the length", hdr("4 2")),
            framing("length overflowing 64 bits", hdr("184467440737095516160")),
            framing("NUL after the length", hdr(&format!("{}\0", ping.len()))),
            framing(
                "header line without a colon",
                format!("Content-Length {}\r\n\r\n{ping}", ping.len()),
            ),
            framing(
                "garbage before the header",
                format!("garbage!!\r\nContent-Length: {}\r\n\r\n{ping}", ping.len()),
            ),
            framing(
                "an HTTP request on the JSON-RPC port",
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n",
            ),
            framing("an empty header block", format!("\r\n\r\n{ping}")),
            framing(
                "header block over the limit without a terminator",
                format!("X-Pad: {}\r\n", "a".repeat(9000)),
            ),
            framing(
                "header block over the limit with a terminator",
                format!(
                    "{}Content-Length: {}\r\n\r\n{ping}",
                    "X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(250),
                    ping.len()
                ),
            ),
        ];
        run_table(&rig, cases).await;
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenient_framing_is_accepted_and_stays_in_sync() {
    within(T, async {
        let rig = Rig::start("lenient_framing").await;
        let ping = ping_body("\"ok\"");
        let n = ping.len();
        let ok = || Want::Ok(json!("ok"));
        let cases = vec![
            raw_case("bare LF header", format!("Content-Length: {n}\n\n{ping}"), ok()),
            raw_case(
                "whitespace-laden length",
                format!("Content-Length: \t  {n} \t \r\n\r\n{ping}"),
                ok(),
            ),
            raw_case(
                "spaced, mixed-case header name",
                format!("  cOnTeNt-LeNgTh  :{n}\r\n\r\n{ping}"),
                ok(),
            ),
            raw_case(
                "duplicate identical lengths",
                format!("Content-Length: {n}\r\nContent-Length: {n}\r\n\r\n{ping}"),
                ok(),
            ),
            raw_case(
                "extra headers around the length",
                format!("X-A: 1\r\nContent-Length: {n}\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n{ping}"),
                ok(),
            ),
            raw_case(
                "leading zeros in the length",
                format!("Content-Length: 000{n}\r\n\r\n{ping}"),
                ok(),
            ),
            // The CLI's reader keeps the last value; so does the proxy, and it re-frames
            // everything it forwards, so the two can never disagree on where a frame ends.
            raw_case(
                "conflicting duplicate lengths (last wins)",
                format!("Content-Length: 3\r\nContent-Length: {n}\r\n\r\n{ping}"),
                ok(),
            ),
            raw_case(
                "zero-length body",
                "Content-Length: 0\r\n\r\n",
                err(PARSE, Value::Null),
            ),
            raw_case(
                "whitespace-only body",
                "Content-Length: 3\r\n\r\n \r\n",
                err(PARSE, Value::Null),
            ),
        ];
        run_table(&rig, cases).await;
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frames_end_in_a_clean_close() {
    within(T, async {
        let rig = Rig::start("truncated_frames").await;
        let env = rig.env.clone();
        let base = env.conns();
        let mut cases: Vec<(String, CaseFuture)> = Vec::new();
        for (name, wire) in [
            (
                "body shorter than declared, then close",
                b"Content-Length: 100\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1".to_vec(),
            ),
            (
                "header cut in the middle, then close",
                b"Content-Len".to_vec(),
            ),
            (
                "header without its blank line, then close",
                b"Content-Length: 10\r\n".to_vec(),
            ),
        ] {
            let env = env.clone();
            let fut = async move {
                let mut c = Raw::connect(env.addr).await;
                c.send(&wire).await;
                c.half_close().await;
                // Nothing complete was sent, so nothing can be answered: a clean close.
                c.expect_closed(name).await;
                drop(c);
                assert!(
                    env.conns_settle(base, D).await,
                    "{name}: connection still held by the proxy"
                );
            };
            cases.push((name.to_string(), Box::pin(fut)));
        }
        run_all(&rig, cases).await;
        rig.finish().await;
    })
    .await;
}

/// (a) A length that cannot be skipped in reasonable time is refused as soon as the header is
/// read, and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giant_content_length_is_refused_at_once_and_closed() {
    within(T, async {
        let rig = Rig::start("giant_length").await;
        let mut c = Raw::connect(rig.addr()).await;
        c.send(b"Content-Length: 999999999999\r\n\r\n{").await;
        let v = c.reply("Content-Length 999999999999 + one byte").await;
        assert_error(&v, TOO_LARGE, Some(&Value::Null), "giant length");
        c.expect_closed("giant length").await;

        // With the id among the first bytes, the refusal carries it.
        let mut c = Raw::connect(rig.addr()).await;
        c.send(b"Content-Length: 999999999999\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":\"giant\",\"method\":\"test.echo\",\"params\":{\"payload\":\"")
            .await;
        let v = c.reply("giant length with a visible id").await;
        assert_error(&v, TOO_LARGE, Some(&json!("giant")), "giant length, id");
        c.expect_closed("giant length, id").await;
        rig.finish().await;
    })
    .await;
}

/// (a) A moderately oversized frame is refused with its id as soon as its header and first
/// bytes arrive, not after the whole body; the stream stays usable once the body is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_refused_before_its_body_arrives() {
    within(T, async {
        let rig = Rig::start("oversized_early").await;
        let mut c = Raw::connect(rig.addr()).await;
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":"over-1","method":"test.echo","params":{{"payload":"{}"}}}}"#,
            "z".repeat(MAX_FRAME + 16)
        );
        let wire = encode_frame(body.as_bytes());
        // The header and the first 4 KiB (which hold the id); the other ~60 KiB come later.
        let first = 4096;
        c.send(&wire[..first]).await;
        let v = c
            .reply("oversized frame, header and first bytes only")
            .await;
        assert_error(&v, TOO_LARGE, Some(&json!("over-1")), "oversized early");
        assert_eq!(v["error"]["data"]["limit"], MAX_FRAME, "{v}");
        c.send(&wire[first..]).await;
        c.expect_usable("oversized early").await;
        assert_eq!(
            rig.env.reached("test.echo"),
            0,
            "oversized frame reached a backend"
        );
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_sent_whole_are_refused_with_their_id() {
    within(T, async {
        let rig = Rig::start("oversized_whole").await;
        let huge = "h".repeat(1024 * 1024);
        let cases = vec![
            body_case(
                "1 MiB string in params (limit 64 KiB)",
                format!(r#"{{"jsonrpc":"2.0","id":"huge-1","method":"test.echo","params":{{"payload":"{huge}"}}}}"#),
                err(TOO_LARGE, json!("huge-1")),
            ),
            body_case(
                "one byte over the limit, numeric id",
                {
                    let head = r#"{"jsonrpc":"2.0","id":77,"method":"ping","params":{"message":""#;
                    let pad = MAX_FRAME + 1 - head.len() - 3;
                    format!("{head}{}\"}}}}", "p".repeat(pad))
                },
                err(TOO_LARGE, json!(77)),
            ),
            body_case(
                "oversized garbage",
                vec![b'#'; MAX_FRAME * 2],
                err(TOO_LARGE, Value::Null),
            ),
        ];
        run_table(&rig, cases).await;
        assert_eq!(rig.env.reached("test.echo"), 0);
        rig.finish().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// JSON.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_gets_a_parse_error_and_the_stream_survives() {
    within(T, async {
        let rig = Rig::start("malformed_json").await;
        let p = |id: Value| err(PARSE, id);
        let cases = vec![
            body_case("not JSON at all", "{this is not json", p(Value::Null)),
            body_case(
                "truncated object",
                r#"{"jsonrpc":"2.0","id":3,"method":"ping""#,
                p(json!(3)),
            ),
            body_case(
                "trailing garbage",
                r#"{"jsonrpc":"2.0","id":4,"method":"ping"} xyz"#,
                p(json!(4)),
            ),
            body_case(
                "two objects in one frame",
                r#"{"jsonrpc":"2.0","id":5,"method":"ping"}{"jsonrpc":"2.0","id":6,"method":"ping"}"#,
                p(json!(5)),
            ),
            body_case(
                "NaN as id",
                r#"{"jsonrpc":"2.0","id":NaN,"method":"ping"}"#,
                p(Value::Null),
            ),
            body_case(
                "Infinity in params",
                r#"{"jsonrpc":"2.0","id":7,"method":"ping","params":{"x":Infinity}}"#,
                p(json!(7)),
            ),
            body_case(
                "-Infinity in params",
                r#"{"jsonrpc":"2.0","id":8,"method":"status.get","params":{"x":-Infinity}}"#,
                p(json!(8)),
            ),
            body_case(
                "undefined in params",
                r#"{"jsonrpc":"2.0","id":9,"method":"status.get","params":{"x":undefined}}"#,
                p(json!(9)),
            ),
            body_case(
                "UTF-8 byte order mark",
                format!("\u{feff}{}", ping_body("10")),
                p(json!(10)),
            ),
            body_case(
                "comment",
                r#"{"jsonrpc":"2.0",/* hi */"id":11,"method":"ping"}"#,
                p(json!(11)),
            ),
            body_case(
                "single quotes",
                "{'jsonrpc':'2.0','id':12,'method':'ping'}",
                p(Value::Null),
            ),
            body_case(
                "trailing comma",
                r#"{"jsonrpc":"2.0","id":13,"method":"ping",}"#,
                p(json!(13)),
            ),
            body_case(
                "unescaped control character in a string",
                b"{\"jsonrpc\":\"2.0\",\"id\":14,\"method\":\"ping\",\"params\":{\"message\":\"a\x01b\"}}"
                    ,
                p(json!(14)),
            ),
            body_case(
                "invalid escape",
                r#"{"jsonrpc":"2.0","id":15,"method":"ping","params":{"message":"\q"}}"#,
                p(json!(15)),
            ),
            body_case(
                "unterminated string",
                r#"{"jsonrpc":"2.0","id":16,"method":"ping","params":{"message":"abc}}"#,
                p(json!(16)),
            ),
            body_case("lone closing brace", "}", p(Value::Null)),
            body_case("NUL bytes", vec![0u8; 32], p(Value::Null)),
        ];
        run_table(&rig, cases).await;
        rig.finish().await;
    })
    .await;
}

/// (b) A body that is not valid UTF-8 is a parse error, never a `pong` echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_bodies_get_parse_errors() {
    within(T, async {
        let rig = Rig::start("invalid_utf8").await;
        let mut cases: Vec<(String, CaseFuture)> = Vec::new();
        let variants: [(&str, &[u8]); 7] = [
            ("0xFF in a ping message", b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"ping\",\"params\":{\"message\":\"a\xffb\"}}"),
            ("0xFE 0xFF in a forwarded call", b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"test.echo\",\"params\":{\"payload\":\"\xfe\xff\"}}"),
            ("invalid byte in a key", b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"ping\",\"params\":{\"k\xff\":1}}"),
            ("invalid byte in the method", b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"pi\xffng\",\"params\":{}}"),
            ("truncated multi-byte sequence", b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"ping\",\"params\":{\"message\":\"\xe2\x82\"}}"),
            ("overlong encoding of '/'", b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"ping\",\"params\":{\"message\":\"\xc0\xaf\"}}"),
            ("UTF-16 surrogate encoded as UTF-8", b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"test.echo\",\"params\":{\"payload\":\"\xed\xa0\x80\"}}"),
        ];
        for (name, body) in variants {
            let env = rig.env.clone();
            let body = body.to_vec();
            let fut = async move {
                let mut c = Raw::connect(env.addr).await;
                c.frame(&body).await;
                let v = c.reply(name).await;
                assert!(
                    v.get("result").is_none(),
                    "{name}: invalid UTF-8 was answered with a result: {v}"
                );
                assert_error(&v, PARSE, None, name);
                assert!(
                    v["id"] == json!(5) || v["id"].is_null(),
                    "{name}: id must be 5 or null: {v}"
                );
                c.expect_usable(name).await;
            };
            cases.push((name.to_string(), Box::pin(fut)));
        }
        run_all(&rig, cases).await;
        assert_eq!(rig.env.reached("test.echo"), 0, "invalid UTF-8 reached a backend");
        rig.finish().await;
    })
    .await;
}

fn nested(open: &str, close: &str, depth: usize) -> String {
    let mut s = String::with_capacity((open.len() + close.len()) * depth + 1);
    for _ in 0..depth {
        s.push_str(open);
    }
    s.push('1');
    for _ in 0..depth {
        s.push_str(close);
    }
    s
}

/// (c) JSON nested deeper than `limits.max_json_depth` (default 128) is refused by the proxy
/// itself with -32700 and the sniffed id; it never reaches a backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_refused_by_the_proxy() {
    within(T, async {
        let rig = Rig::with("deep_json", |cfg| {
            cfg.limits.max_frame_bytes = 2 * 1024 * 1024;
        })
        .await;
        let arrays = nested("[", "]", 100_000);
        let objects = nested("{\"a\":", "}", 100_000);
        let cases = vec![
            body_case(
                "100,000 nested arrays in params of a forwarded call",
                format!(r#"{{"jsonrpc":"2.0","id":"deep-1","method":"test.echo","params":{{"payload":{arrays}}}}}"#),
                err(PARSE, json!("deep-1")),
            ),
            body_case(
                "100,000 nested objects in params of a forwarded call",
                format!(r#"{{"jsonrpc":"2.0","id":"deep-2","method":"status.get","params":{{"x":{objects}}}}}"#),
                err(PARSE, json!("deep-2")),
            ),
            body_case(
                "100,000 nested arrays in ping params",
                format!(r#"{{"jsonrpc":"2.0","id":"deep-3","method":"ping","params":{{"message":"m","x":{arrays}}}}}"#),
                err(PARSE, json!("deep-3")),
            ),
            body_case(
                "100,000 nested arrays in an unknown top-level field",
                format!(r#"{{"jsonrpc":"2.0","id":"deep-4","method":"status.get","extra":{arrays},"params":{{}}}}"#),
                err(PARSE, json!("deep-4")),
            ),
            body_case(
                "300 nested arrays in a session call",
                format!(r#"{{"jsonrpc":"2.0","id":"deep-5","method":"session.send","params":{{"sessionId":"s-deep","prompt":{}}}}}"#, nested("[", "]", 300)),
                err(PARSE, json!("deep-5")),
            ),
            body_case(
                "100,000 nested arrays, id unknowable",
                arrays.clone(),
                err(PARSE, Value::Null),
            ),
        ];
        run_table(&rig, cases).await;
        for m in ["test.echo", "status.get", "session.send"] {
            let n = rig.env.reached(m);
            // status.get is also sent by finish(); nothing before it.
            assert_eq!(n, 0, "deeply nested {m} reached a backend");
        }
        // Moderate nesting is forwarded untouched.
        let mut c = Client::connected(rig.addr()).await;
        let payload: Value = serde_json::from_str(&nested("[", "]", 50)).unwrap();
        let f = c.call("test.echo", json!({"payload": payload.clone()})).await;
        assert_eq!(f.json["result"]["payload"], payload, "{}", f.text());
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_but_valid_json_is_served() {
    within(T, async {
        let rig = Rig::start("awkward_json").await;
        let env = rig.env.clone();
        let mut cases: Vec<(String, CaseFuture)> = Vec::new();

        // A large string full of escapes comes back byte-exact.
        let e = env.clone();
        cases.push((
            "escape-heavy 48 KiB string".into(),
            Box::pin(async move {
                let mut c = Client::connected(e.addr).await;
                let s: String = (0..6000)
                    .map(|i| ["\"", "\\", "\u{0}", "\n", "é", "💥", "\u{2028}", "x"][i % 8])
                    .collect();
                let f = c.call("test.echo", json!({"payload": s})).await;
                assert_eq!(f.json["result"]["payload"].as_str(), Some(s.as_str()));
            }),
        ));
        // A 50,000-character string id comes back exactly, local and forwarded.
        let e = env.clone();
        cases.push((
            "50,000-character string id".into(),
            Box::pin(async move {
                let mut c = Client::connected(e.addr).await;
                let id = format!("\"{}\"", "i".repeat(50_000));
                for m in ["ping", "status.get"] {
                    let f = c.call_id(&id, m, json!({})).await;
                    assert_eq!(f.id.as_deref(), Some(id.as_str()), "{m}");
                    assert!(f.json.get("result").is_some(), "{m}: {}", &f.text()[..200]);
                }
            }),
        ));
        // Escapes in keys: "\u0069d" is "id", "\u006dethod" is "method".
        let e = env.clone();
        cases.push((
            "escaped member names".into(),
            Box::pin(async move {
                let mut c = Raw::connect(e.addr).await;
                c.frame(br#"{"jsonrpc":"2.0","\u0069d":"esc","\u006dethod":"ping","params":{}}"#)
                    .await;
                let v = c.reply("escaped member names").await;
                assert_eq!(v["id"], "esc", "{v}");
                assert!(v.get("result").is_some(), "{v}");
            }),
        ));
        // A lone surrogate escape is valid JSON text; it must be answered, not hang.
        let e = env.clone();
        cases.push((
            "lone surrogate escape".into(),
            Box::pin(async move {
                let mut c = Raw::connect(e.addr).await;
                c.frame(br#"{"jsonrpc":"2.0","id":"sur","method":"test.echo","params":{"payload":"\ud800"}}"#)
                    .await;
                let v = c.reply("lone surrogate").await;
                assert_eq!(v["id"], "sur", "{v}");
                c.expect_usable("lone surrogate").await;
            }),
        ));
        // Huge numbers and exponents in params pass through.
        let e = env.clone();
        cases.push((
            "huge numbers in params".into(),
            Box::pin(async move {
                let mut c = Raw::connect(e.addr).await;
                c.frame(br#"{"jsonrpc":"2.0","id":"num","method":"test.echo","params":{"payload":[1e308,-1e-308,123456789012345678901234567890,0.0000000000001]}}"#)
                    .await;
                let v = c.reply("huge numbers").await;
                assert_eq!(v["id"], "num", "{v}");
                assert!(v["result"]["payload"].is_array(), "{v}");
            }),
        ));
        // Whitespace everywhere.
        let e = env.clone();
        cases.push((
            "whitespace everywhere".into(),
            Box::pin(async move {
                let mut c = Raw::connect(e.addr).await;
                c.frame(b" \r\n\t{ \"jsonrpc\" : \"2.0\" ,\n\"id\" :\t\"ws\" , \"method\" : \"ping\" } \n\t ")
                    .await;
                let v = c.reply("whitespace").await;
                assert_eq!(v["id"], "ws", "{v}");
                assert!(v.get("result").is_some(), "{v}");
            }),
        ));
        run_all(&rig, cases).await;
        rig.finish().await;
    })
    .await;
}

/// Error replies must be well-formed JSON and never carry an id the request did not have: a
/// misattributed id would fail some other pending request of the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_are_well_formed_and_never_misattributed() {
    within(T, async {
        let rig = Rig::start("sniffed_ids").await;
        let mut cases: Vec<(String, CaseFuture)> = Vec::new();
        let variants: [(&str, &[u8], i64); 7] = [
            (
                "id with a leading zero",
                b"{\"jsonrpc\":\"2.0\",\"id\":012,\"method\":\"ping\"}",
                PARSE,
            ),
            (
                "string id with a raw control character",
                b"{\"jsonrpc\":\"2.0\",\"id\":\"a\x01b\",\"method\":\"ping\"}",
                PARSE,
            ),
            (
                "string id with an invalid escape",
                b"{\"jsonrpc\":\"2.0\",\"id\":\"\\q\",\"method\":\"ping\"}",
                PARSE,
            ),
            (
                "string id with a raw newline",
                b"{\"jsonrpc\":\"2.0\",\"id\":\"a\nb\",\"method\":\"ping\"}",
                PARSE,
            ),
            (
                "fractional id 1.5",
                b"{\"jsonrpc\":\"2.0\",\"id\":1.5,\"method\":\"ping\"}",
                INVALID,
            ),
            (
                "exponent id 1e3",
                b"{\"jsonrpc\":\"2.0\",\"id\":1e3,\"method\":\"ping\"}",
                INVALID,
            ),
            (
                "truncated body whose only id is nested in params",
                b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"params\":{\"id\":99}",
                PARSE,
            ),
        ];
        for (name, body, code) in variants {
            let env = rig.env.clone();
            let body = body.to_vec();
            let fut = async move {
                let mut c = Raw::connect(env.addr).await;
                c.frame(&body).await;
                // reply() fails on a frame that is not JSON.
                let v = c.reply(name).await;
                assert_error(&v, code, Some(&Value::Null), name);
                c.expect_usable(name).await;
            };
            cases.push((name.to_string(), Box::pin(fut)));
        }
        run_all(&rig, cases).await;
        rig.finish().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// JSON-RPC envelope.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_envelopes_get_invalid_request() {
    within(T, async {
        let rig = Rig::start("invalid_envelopes").await;
        let i = |id: Value| err(INVALID, id);
        let cases = vec![
            body_case(
                "batch array",
                r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
                Want::Err(INVALID, None, Then::Usable),
            ),
            body_case("empty batch", "[]", i(Value::Null)),
            body_case("scalar body", "42", i(Value::Null)),
            body_case("string body", r#""ping""#, i(Value::Null)),
            body_case("null body", "null", i(Value::Null)),
            body_case("empty object", "{}", i(Value::Null)),
            body_case(
                "missing jsonrpc",
                r#"{"id":21,"method":"ping"}"#,
                i(json!(21)),
            ),
            body_case(
                "jsonrpc 1.0",
                r#"{"jsonrpc":"1.0","id":22,"method":"ping"}"#,
                i(json!(22)),
            ),
            body_case(
                "jsonrpc as a number",
                r#"{"jsonrpc":2.0,"id":23,"method":"ping"}"#,
                i(json!(23)),
            ),
            body_case(
                "jsonrpc null",
                r#"{"jsonrpc":null,"id":24,"method":"ping"}"#,
                i(json!(24)),
            ),
            body_case(
                "id as object",
                r#"{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}"#,
                i(Value::Null),
            ),
            body_case(
                "id as array",
                r#"{"jsonrpc":"2.0","id":[1],"method":"ping"}"#,
                i(Value::Null),
            ),
            body_case(
                "id as bool",
                r#"{"jsonrpc":"2.0","id":true,"method":"ping"}"#,
                i(Value::Null),
            ),
            body_case(
                "id null on a request",
                r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
                i(Value::Null),
            ),
            body_case(
                "id past i64",
                r#"{"jsonrpc":"2.0","id":9223372036854775808,"method":"ping"}"#,
                i(Value::Null),
            ),
            body_case(
                "1,000-digit numeric id",
                format!(
                    r#"{{"jsonrpc":"2.0","id":{},"method":"ping"}}"#,
                    "9".repeat(1000)
                ),
                i(Value::Null),
            ),
            body_case(
                "method as a number",
                r#"{"jsonrpc":"2.0","id":31,"method":5}"#,
                i(json!(31)),
            ),
            body_case(
                "method null",
                r#"{"jsonrpc":"2.0","id":32,"method":null}"#,
                i(json!(32)),
            ),
            body_case(
                "method as an object",
                r#"{"jsonrpc":"2.0","id":33,"method":{"n":"ping"}}"#,
                i(json!(33)),
            ),
            body_case(
                "params as a string",
                r#"{"jsonrpc":"2.0","id":34,"method":"status.get","params":"x"}"#,
                i(json!(34)),
            ),
            body_case(
                "params as a number",
                r#"{"jsonrpc":"2.0","id":35,"method":"status.get","params":5}"#,
                i(json!(35)),
            ),
            body_case(
                "params as a bool",
                r#"{"jsonrpc":"2.0","id":36,"method":"status.get","params":true}"#,
                i(json!(36)),
            ),
            body_case(
                "response with neither result nor error",
                r#"{"jsonrpc":"2.0","id":37}"#,
                i(json!(37)),
            ),
            body_case(
                "duplicate id",
                r#"{"jsonrpc":"2.0","id":38,"id":39,"method":"ping"}"#,
                Want::Err(INVALID, None, Then::Usable),
            ),
            body_case(
                "duplicate method",
                r#"{"jsonrpc":"2.0","id":40,"method":"ping","method":"runtime.shutdown"}"#,
                i(json!(40)),
            ),
            body_case(
                "duplicate jsonrpc",
                r#"{"jsonrpc":"2.0","jsonrpc":"1.0","id":41,"method":"ping"}"#,
                i(json!(41)),
            ),
            body_case(
                "duplicate params",
                r#"{"jsonrpc":"2.0","id":42,"method":"status.get","params":{},"params":{}}"#,
                i(json!(42)),
            ),
        ];
        run_table(&rig, cases).await;
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn params_of_the_wrong_shape_get_invalid_params() {
    within(T, async {
        let rig = Rig::start("params_shape").await;
        let cases = vec![
            body_case(
                "params as an array, forwarded method",
                r#"{"jsonrpc":"2.0","id":51,"method":"status.get","params":[1,2]}"#,
                err(PARAMS, json!(51)),
            ),
            // `params: null` is read as no params, as the CLI reads it.
            body_case(
                "params null, forwarded method",
                r#"{"jsonrpc":"2.0","id":52,"method":"status.get","params":null}"#,
                Want::Ok(json!(52)),
            ),
            body_case(
                "params as an array, session.create",
                r#"{"jsonrpc":"2.0","id":53,"method":"session.create","params":["s"]}"#,
                err(PARAMS, json!(53)),
            ),
            body_case(
                "params as an array, session.send",
                r#"{"jsonrpc":"2.0","id":54,"method":"session.send","params":["s","hi"]}"#,
                err(PARAMS, json!(54)),
            ),
            // ping is answered by the proxy, which ignores its params like the CLI.
            body_case(
                "params as an array, ping",
                r#"{"jsonrpc":"2.0","id":55,"method":"ping","params":["x"]}"#,
                Want::Ok(json!(55)),
            ),
        ];
        run_table(&rig, cases).await;
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_notifications_from_the_client_are_dropped_silently() {
    within(T, async {
        let rig = Rig::start("client_responses").await;
        let before = rig.env.reached("session.send");
        let cases = vec![
            body_case("response to an unknown numeric id", r#"{"jsonrpc":"2.0","id":424242,"result":{}}"#, Want::Silent),
            body_case("response to an unknown string id", r#"{"jsonrpc":"2.0","id":"zzz","error":{"code":-1,"message":"m"}}"#, Want::Silent),
            body_case("response with both result and error", r#"{"jsonrpc":"2.0","id":77,"result":{},"error":{"code":1,"message":"x"}}"#, Want::Silent),
            body_case("response with id 0", r#"{"jsonrpc":"2.0","id":0,"result":null}"#, Want::Silent),
            body_case("response with a negative id", r#"{"jsonrpc":"2.0","id":-1,"result":null}"#, Want::Silent),
            body_case("$/cancelRequest notification", r#"{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}"#, Want::Silent),
            body_case("runtime.shutdown as a notification", r#"{"jsonrpc":"2.0","method":"runtime.shutdown"}"#, Want::Silent),
            body_case("session.send as a notification", r#"{"jsonrpc":"2.0","method":"session.send","params":{"sessionId":"n-1","prompt":"x"}}"#, Want::Silent),
            body_case("notification with array params", r#"{"jsonrpc":"2.0","method":"x","params":[1]}"#, Want::Silent),
        ];
        run_table(&rig, cases).await;
        assert_eq!(rig.env.reached("session.send"), before, "a client notification was forwarded");
        rig.finish().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Routing abuse.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_abuse_is_refused_or_answered_by_the_backend() {
    within(T, async {
        let rig = Rig::start("routing_abuse").await;
        let req = |id: u64, method: &str, params: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":{},"params":{params}}}"#,
                serde_json::to_string(method).unwrap()
            )
        };
        let nf = |id: u64| err(NOT_FOUND, json!(id));
        let long_method = "m.".repeat(5000);
        let cases = vec![
            body_case("unknown method", req(61, "no.such.thing", "{}"), nf(61)),
            body_case("empty method", req(62, "", "{}"), nf(62)),
            body_case(
                "path-like method with NUL",
                req(63, "../../etc/passwd\u{0}", "{}"),
                nf(63),
            ),
            body_case(
                "10,000-character method",
                req(64, &long_method, "{}"),
                nf(64),
            ),
            body_case(
                "runtime.shutdown",
                req(65, "runtime.shutdown", "{}"),
                nf(65),
            ),
            body_case(
                "runtime.shutdown with a sessionId",
                req(66, "runtime.shutdown", r#"{"sessionId":"s"}"#),
                nf(66),
            ),
            body_case(
                "runtime.shutdown with array params",
                req(67, "runtime.shutdown", "[]"),
                err(PARAMS, json!(67)),
            ),
            body_case(
                "sessionFs.setProvider",
                req(68, "sessionFs.setProvider", r#"{"initialCwd":"/"}"#),
                nf(68),
            ),
            body_case(
                "sessions.bulkDelete",
                req(69, "sessions.bulkDelete", r#"{"sessionIds":["a","b"]}"#),
                nf(69),
            ),
            body_case(
                "session.send without sessionId",
                req(70, "session.send", r#"{"prompt":"x"}"#),
                nf(70),
            ),
            body_case(
                "session.send with numeric sessionId",
                req(71, "session.send", r#"{"sessionId":5,"prompt":"x"}"#),
                nf(71),
            ),
            body_case(
                "session.send with null sessionId",
                req(72, "session.send", r#"{"sessionId":null}"#),
                nf(72),
            ),
            body_case(
                "session.send with array sessionId",
                req(73, "session.send", r#"{"sessionId":["a"]}"#),
                nf(73),
            ),
            body_case(
                "session.send with object sessionId",
                req(74, "session.send", r#"{"sessionId":{"id":"a"}}"#),
                nf(74),
            ),
            body_case(
                "session.resume with bool sessionId",
                req(75, "session.resume", r#"{"sessionId":true}"#),
                nf(75),
            ),
            body_case(
                "session.delete without sessionId",
                req(76, "session.delete", "{}"),
                nf(76),
            ),
            body_case(
                "session.detach without sessionId",
                req(77, "session.detach", "{}"),
                nf(77),
            ),
            body_case(
                "sessions.open without kind",
                req(78, "sessions.open", "{}"),
                nf(78),
            ),
            body_case(
                "sessions.open with a numeric sessionId",
                req(79, "sessions.open", r#"{"kind":"resume","sessionId":7}"#),
                nf(79),
            ),
            body_case(
                "sessions.open kind as an object",
                req(80, "sessions.open", r#"{"kind":{"k":"resume"}}"#),
                nf(80),
            ),
            body_case(
                "sessions.transferRemoteControl without toSessionId",
                req(81, "sessions.transferRemoteControl", "{}"),
                nf(81),
            ),
        ];
        run_table(&rig, cases).await;
        for m in [
            "runtime.shutdown",
            "sessionFs.setProvider",
            "sessions.bulkDelete",
            "session.send",
            "session.resume",
            "session.delete",
            "sessions.open",
        ] {
            assert_eq!(rig.env.reached(m), 0, "{m} reached a backend");
        }
        // Not in the routing table: refused by the proxy, never forwarded.
        assert_eq!(rig.env.reached("no.such.thing"), 0);
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_session_ids_route_consistently() {
    within(T, async {
        let rig = Rig::start("odd_session_ids").await;
        let mut c = Client::connected(rig.addr()).await;
        let long = "L".repeat(4000);
        let odd = [
            "../../etc/passwd",
            "a b\tc",
            "💥-ünïcødé",
            "a\u{0}b",
            "\n",
            "\"quoted\"",
            "{\"sessionId\":\"x\"}",
            "%00%2e%2e",
            long.as_str(),
        ];
        let mut failed = Vec::new();
        for sid in odd {
            let short: String = sid.chars().take(24).collect();
            let f = c.call("session.create", json!({"sessionId": sid})).await;
            if f.json["result"]["sessionId"] != sid {
                failed.push(format!("{short:?}: create: {}", f.text()));
                continue;
            }
            let f = c.call("session.getMetadata", json!({"sessionId": sid})).await;
            if f.json["result"]["session"]["sessionId"] != sid {
                failed.push(format!("{short:?}: getMetadata: {}", f.text()));
            }
            let f = c.call("session.send", json!({"sessionId": sid, "prompt": "hi"})).await;
            if !f.json["result"]["messageId"].is_string() {
                failed.push(format!("{short:?}: send: {}", f.text()));
            }
            let h = holders(&rig.env.fakes, sid).len();
            if h != 1 {
                failed.push(format!("{short:?}: live on {h} backends"));
            }
        }
        // A duplicated sessionId routes by the last one, as the CLI reads it.
        c.ok("session.create", json!({"sessionId": "dup-real"})).await;
        c.send_body(br#"{"jsonrpc":"2.0","id":"dup","method":"session.getMetadata","params":{"sessionId":"dup-decoy","sessionId":"dup-real"}}"#).await;
        let f = c.response(r#""dup""#).await;
        if f.json["result"]["session"]["sessionId"] != "dup-real" {
            failed.push(format!("duplicate sessionId: {}", f.text()));
        }
        // An empty session id is a session id like any other, or refused; never a hang.
        let f = c.call("session.create", json!({"sessionId": ""})).await;
        if f.json.get("result").is_none() && f.error_code().is_none() {
            failed.push(format!("empty sessionId: {}", f.text()));
        }
        println!("[odd_session_ids] {} cases, {} failed", odd.len() + 2, failed.len());
        assert!(failed.is_empty(), "odd session ids:\n{}", failed.join("\n"));
        rig.finish().await;
    })
    .await;
}

/// (d) `session.getForeground` on a headless setup answers a result (an object with no
/// session id), not -32601.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_foreground_answers_without_a_session() {
    within(T, async {
        let rig = Rig::start("get_foreground").await;
        let mut c = Client::connected(rig.addr()).await;
        for params in [json!({}), json!({"sessionId": null})] {
            let f = tokio::time::timeout(D, c.call("session.getForeground", params.clone()))
                .await
                .expect("session.getForeground: no reply");
            assert!(f.error_code().is_none(), "{params}: {}", f.text());
            let r = &f.json["result"];
            assert!(
                r.is_object(),
                "{params}: result is not an object: {}",
                f.text()
            );
            assert!(
                r.get("sessionId").is_none_or(Value::is_null),
                "{params}: headless foreground has a session: {}",
                f.text()
            );
        }
        rig.finish().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Slow and half-open clients.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_do_not_stall_anyone() {
    within(T, async {
        let rig = Rig::start("slowloris").await;
        let mut set = JoinSet::new();
        for i in 0..20 {
            let addr = rig.addr();
            set.spawn(async move {
                let mut c = Raw::connect(addr).await;
                let body = ping_body(&format!("\"slow-{i}\""));
                let header = format!("Content-Length: {}\r\n\r\n", body.len());
                for b in header.as_bytes() {
                    assert!(c.send(&[*b]).await, "slow-{i}: proxy stopped reading");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                c.send(body.as_bytes()).await;
                let v = c.reply(&format!("slow-{i}")).await;
                assert_eq!(v["id"], format!("slow-{i}"), "{v}");
                assert!(v.get("result").is_some(), "{v}");
            });
        }
        // The background client keeps being served while 20 headers trickle in.
        rig.pings_while_attacked(20, D).await;
        while let Some(r) = tokio::time::timeout(Duration::from_secs(10), set.join_next())
            .await
            .expect("slowloris clients did not finish")
        {
            r.expect("slowloris client failed");
        }
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_frame_then_idle_keeps_the_stream_in_sync() {
    within(T, async {
        let rig = Rig::start("half_frame_idle").await;
        let base = rig.env.conns();
        let body = ping_body("\"half\"");
        let wire = encode_frame(body.as_bytes());
        let mut c = Raw::connect(rig.addr()).await;
        c.send(&wire[..wire.len() / 2]).await;
        // The idle period is the attack: nothing may be answered for half a frame.
        let start = rig.pinger.done();
        match c.next(Duration::from_secs(1)).await {
            Next::Silent => {}
            other => panic!("half a frame got {other:?}"),
        }
        assert!(
            rig.pinger.done() > start,
            "background client starved during the idle period"
        );
        c.send(&wire[wire.len() / 2..]).await;
        let v = c.reply("completed frame").await;
        assert_eq!(v["id"], "half", "{v}");
        c.expect_usable("half frame").await;

        // Half a frame, then the client disappears: the proxy lets the connection go.
        let mut c2 = Raw::connect(rig.addr()).await;
        c2.send(&wire[..wire.len() / 2]).await;
        assert!(
            rig.env.conns_settle(base + 2, D).await,
            "connections not registered"
        );
        drop(c2);
        assert!(
            rig.env.conns_settle(base + 1, D).await,
            "abandoned half frame still held"
        );
        drop(c);
        assert!(rig.env.conns_settle(base, D).await, "connection still held");
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_mid_frame_is_a_clean_close() {
    within(T, async {
        let rig = Rig::start("half_close_mid_frame").await;
        let base = rig.env.conns();
        let body = ping_body("\"hc\"");
        let wire = encode_frame(body.as_bytes());
        let mut c = Raw::connect(rig.addr()).await;
        c.send(&wire[..wire.len() - 5]).await;
        c.half_close().await;
        c.expect_closed("half-close mid-frame").await;
        assert!(rig.env.conns_settle(base, D).await, "connection still held");
        rig.finish().await;
    })
    .await;
}

/// A client that sends complete requests and then half-closes its write side is still owed
/// the replies: the proxy answers what it received, then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_after_complete_requests_still_gets_the_replies() {
    within(T, async {
        let rig = Rig::start("half_close_replies").await;
        let base = rig.env.conns();
        let mut cases: Vec<(String, CaseFuture)> = Vec::new();
        for (name, body) in [
            ("local ping", ping_body("\"hc-ping\"")),
            (
                "forwarded call",
                r#"{"jsonrpc":"2.0","id":"hc-status","method":"status.get","params":{}}"#
                    .to_string(),
            ),
            (
                "forwarded call in flight for 300 ms",
                r#"{"jsonrpc":"2.0","id":"hc-sleep","method":"test.sleep","params":{"ms":300}}"#
                    .to_string(),
            ),
        ] {
            let env = rig.env.clone();
            let fut = async move {
                let mut c = Raw::connect(env.addr).await;
                c.frame(body.as_bytes()).await;
                c.half_close().await;
                let v = c.reply(name).await;
                assert!(v.get("result").is_some(), "{name}: {v}");
                c.expect_closed(name).await;
            };
            cases.push((name.to_string(), Box::pin(fut)));
        }
        run_all(&rig, cases).await;
        assert!(
            rig.env.conns_settle(base, D).await,
            "connections still held"
        );
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_harms_only_itself() {
    within(T, async {
        let rig = Rig::start("never_reads").await;
        let base = rig.env.conns();
        let s = TcpStream::connect(rig.addr()).await.unwrap();
        let (r, mut w) = s.into_split();
        // 1,500 replies of 16 KB (local and forwarded; more than the proxy queues per client,
        // ~24 MB in all) that nobody reads. The writes block once the proxy pushes back, so
        // they run in a task that is aborted below.
        let writer = tokio::spawn(async move {
            let payload = "r".repeat(16_000);
            for i in 0..1500u32 {
                let (method, key) = if i % 2 == 0 {
                    ("ping", "message")
                } else {
                    ("test.echo", "payload")
                };
                let body = json!({"jsonrpc":"2.0","id":i,"method":method,"params":{key: payload}})
                    .to_string();
                if w.write_all(&encode_frame(body.as_bytes())).await.is_err() {
                    break;
                }
            }
            w
        });
        rig.pings_while_attacked(100, Duration::from_secs(10)).await;
        // A second, well-behaved client that also reaches a backend is served meanwhile.
        let mut c = Client::connected(rig.addr()).await;
        let f = tokio::time::timeout(D, c.call("test.echo", json!({"payload": "fine"})))
            .await
            .expect("forwarded call stalled behind a client that never reads");
        assert_eq!(f.json["result"]["payload"], "fine");
        drop(c);
        writer.abort();
        let _ = writer.await;
        drop(r);
        assert!(
            rig.env.conns_settle(base, Duration::from_secs(10)).await,
            "the non-reading client's connection stayed pinned ({} held)",
            rig.env.conns()
        );
        rig.finish().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Floods.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_pipelined_pings_are_all_answered_in_order() {
    within(T, async {
        let rig = Rig::start("ping_flood").await;
        const N: usize = 5000;
        let mut wire = Vec::new();
        for i in 0..N {
            wire.extend(encode_frame(ping_body(&i.to_string()).as_bytes()));
        }
        let mut c = Raw::connect(rig.addr()).await;
        // Written from a task while this one reads, so neither side's buffers can wedge it.
        let writing = c.write_in_background(wire);
        for i in 0..N {
            let v = c.reply_within(&format!("flood ping {i}"), FLOOD_D).await;
            assert_eq!(v["id"], i, "lost or out of order: {v}");
            assert_eq!(v["result"]["message"], "pong: m", "{v}");
        }
        c.rejoin_writer(writing).await;
        c.expect_usable("after 5,000 pings").await;
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_bad_frames_and_stray_responses_are_absorbed() {
    within(T, async {
        let rig = Rig::start("bad_frame_flood").await;
        // 2,000 unparseable bodies in one write: 2,000 parse errors, then the stream works.
        let mut c = Raw::connect(rig.addr()).await;
        let mut wire = Vec::new();
        for _ in 0..2000 {
            wire.extend(encode_frame(b"{nope"));
        }
        let writing = c.write_in_background(wire);
        for i in 0..2000 {
            let v = c.reply_within(&format!("garbage {i}"), FLOOD_D).await;
            assert_error(&v, PARSE, Some(&Value::Null), "garbage flood");
        }
        c.rejoin_writer(writing).await;
        c.expect_usable("after 2,000 garbage frames").await;

        // 5,000 responses to ids the proxy never issued, and 5,000 client notifications: all
        // dropped, and the next ping is the very next frame.
        let mut s = Raw::connect(rig.addr()).await;
        let mut wire = Vec::new();
        for i in 0..5000 {
            wire.extend(encode_frame(
                format!(
                    r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#,
                    1_000_000 + i
                )
                .as_bytes(),
            ));
            wire.extend(encode_frame(
                br#"{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}"#,
            ));
        }
        let writing = s.write_in_background(wire);
        s.rejoin_writer(writing).await;
        s.expect_usable("after 10,000 stray responses and notifications")
            .await;
        rig.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_opened_and_dropped_leave_nothing_behind() {
    within(T, async {
        let rig = Rig::start("connection_churn").await;
        let base = rig.env.conns();
        let ping = encode_frame(ping_body("1").as_bytes());
        for round in 0..6 {
            let mut set = JoinSet::new();
            for i in 0..50 {
                let addr = rig.addr();
                let ping = ping.clone();
                set.spawn(async move {
                    let mut s = TcpStream::connect(addr).await.expect("connect");
                    match (round * 50 + i) % 5 {
                        0 => {}
                        1 => {
                            let _ = s.write_all(b"Content-Len").await;
                        }
                        2 => {
                            let _ = s.write_all(&ping).await;
                        }
                        3 => {
                            let _ = s.write_all(&ping[..ping.len() / 2]).await;
                            socket2::SockRef::from(&s)
                                .set_linger(Some(Duration::ZERO))
                                .unwrap();
                        }
                        _ => {
                            socket2::SockRef::from(&s)
                                .set_linger(Some(Duration::ZERO))
                                .unwrap();
                        }
                    }
                    drop(s);
                });
            }
            while let Some(r) = tokio::time::timeout(D, set.join_next())
                .await
                .expect("churn round stalled")
            {
                r.expect("churn task");
            }
        }
        assert!(
            rig.env.conns_settle(base, Duration::from_secs(5)).await,
            "{} connections left after 300 were dropped",
            rig.env.conns() - base
        );
        // 300 idle connections held open at once, then dropped.
        let mut held = Vec::new();
        for _ in 0..300 {
            held.push(
                tokio::time::timeout(D, TcpStream::connect(rig.addr()))
                    .await
                    .expect("connect timed out")
                    .expect("connect"),
            );
        }
        assert!(
            rig.env
                .conns_settle(base + 300, Duration::from_secs(5))
                .await,
            "300 held connections: proxy holds {}",
            rig.env.conns()
        );
        rig.pings_while_attacked(20, D).await;
        drop(held);
        assert!(
            rig.env.conns_settle(base, Duration::from_secs(5)).await,
            "{} connections left after dropping 300 idle ones",
            rig.env.conns().saturating_sub(base)
        );
        rig.finish().await;
    })
    .await;
}
