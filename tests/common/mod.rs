//! Shared helpers for integration tests: a raw JSON-RPC client over loopback TCP, fake CLI
//! backends (from `test_support`), and an in-process proxy in front of them.
#![allow(dead_code)]

use bytes::Bytes;
use copilot_lb::app::{self, Running};
use copilot_lb::codec::{encode_frame, CodecError, FrameReader, Limits};
use copilot_lb::config::{Config, Overrides};
use copilot_lb::envelope::{self, Kind};
use copilot_lb::runtime::Loops;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use test_support::fake_cli::{FakeCli, FakeConfig, Storage};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Default wait for one reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One frame from the proxy, kept as raw text and parsed JSON.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Exact body bytes.
    pub raw: Bytes,
    /// Parsed body.
    pub json: Value,
    /// The raw JSON text of `id`, if any.
    pub id: Option<String>,
    /// Request, response or notification.
    pub kind: Option<Kind>,
}

impl Frame {
    fn new(raw: Bytes) -> Frame {
        let json: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        let (id, kind) = match envelope::parse(&raw) {
            Ok(e) => (e.id.map(|r| r.get().to_string()), Some(e.kind)),
            Err(_) => (
                json.get("id").map(|v| v.to_string()),
                if json.get("method").is_some() {
                    None
                } else {
                    Some(Kind::Response)
                },
            ),
        };
        Frame {
            raw,
            json,
            id,
            kind,
        }
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }

    /// `error.code`, if this is an error response.
    pub fn error_code(&self) -> Option<i64> {
        self.json.pointer("/error/code").and_then(Value::as_i64)
    }

    /// `params.sessionId` of a notification.
    pub fn session(&self) -> Option<&str> {
        self.json
            .pointer("/params/sessionId")
            .and_then(Value::as_str)
    }

    /// `method`.
    pub fn method(&self) -> Option<&str> {
        self.json.get("method").and_then(Value::as_str)
    }

    /// The event type of a `session.event`, or the lifecycle type.
    pub fn event_type(&self) -> Option<&str> {
        self.json
            .pointer("/params/event/type")
            .or_else(|| self.json.pointer("/params/type"))
            .and_then(Value::as_str)
    }
}

/// A raw JSON-RPC client.
pub struct Client {
    reader: FrameReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    next: u64,
    /// Notifications received while waiting for responses, oldest first.
    pub notes: VecDeque<Frame>,
    /// Requests from the server received while waiting, oldest first.
    pub server_reqs: VecDeque<Frame>,
    responses: VecDeque<Frame>,
    closed: bool,
}

impl Client {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Client {
        let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        Client::from_stream(s)
    }

    /// A client on a stream the caller connected (to observe how the connect itself went).
    pub fn from_stream(s: TcpStream) -> Client {
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        Client {
            reader: FrameReader::new(r, Limits::default()),
            w,
            next: 1,
            notes: VecDeque::new(),
            server_reqs: VecDeque::new(),
            responses: VecDeque::new(),
            closed: false,
        }
    }

    /// Connects and performs `connect` (open mode).
    pub async fn connected(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr).await;
        let r = c.call("connect", json!({})).await;
        assert_eq!(r.json["result"]["ok"], true, "connect: {}", r.text());
        c
    }

    /// Closes the write side (a TCP half-close); replies can still be read.
    pub async fn shutdown_write(&mut self) {
        self.w.shutdown().await.expect("shutdown");
    }

    /// Writes raw bytes in one write.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("write");
    }

    /// Writes one framed body in one write.
    pub async fn send_body(&mut self, body: &[u8]) {
        let f = encode_frame(body);
        self.send_raw(&f).await;
    }

    /// Sends a request with an explicit raw JSON id.
    pub async fn send_request(&mut self, id: &str, method: &str, params: &Value) {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{}}}"#,
            serde_json::to_string(params).unwrap()
        );
        self.send_body(body.as_bytes()).await;
    }

    /// A fresh integer id.
    pub fn fresh_id(&mut self) -> String {
        let n = self.next;
        self.next += 1;
        n.to_string()
    }

    /// Sends a request with a fresh integer id and waits for its response.
    pub async fn call(&mut self, method: &str, params: Value) -> Frame {
        let id = self.fresh_id();
        self.call_id(&id, method, params).await
    }

    /// Sends a request with the given raw id and waits for its response.
    pub async fn call_id(&mut self, id: &str, method: &str, params: Value) -> Frame {
        self.send_request(id, method, &params).await;
        self.response(id).await
    }

    /// Calls and returns `result`, panicking on an error response.
    pub async fn ok(&mut self, method: &str, params: Value) -> Value {
        let f = self.call(method, params.clone()).await;
        assert!(
            f.json.get("result").is_some(),
            "{method} {params} failed: {}",
            f.text()
        );
        f.json["result"].clone()
    }

    /// Reads the next frame of any kind (None on end of stream or timeout).
    pub async fn read_frame(&mut self, timeout: Duration) -> Option<Frame> {
        if self.closed {
            return None;
        }
        match tokio::time::timeout(timeout, self.reader.read_frame()).await {
            Ok(Ok(Some(b))) => Some(Frame::new(b)),
            Ok(Ok(None)) | Ok(Err(_)) => {
                self.closed = true;
                None
            }
            Err(_) => None,
        }
    }

    fn stash(&mut self, f: Frame) {
        match f.kind {
            Some(Kind::Notification) => self.notes.push_back(f),
            Some(Kind::Request) => self.server_reqs.push_back(f),
            _ => self.responses.push_back(f),
        }
    }

    /// Waits for the response carrying exactly this raw id; stashes everything else.
    pub async fn response(&mut self, id: &str) -> Frame {
        self.try_response(id, REPLY_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no response to id {id} within {REPLY_TIMEOUT:?}"))
    }

    /// Like [`Client::response`] but returns None on timeout or close.
    pub async fn try_response(&mut self, id: &str, timeout: Duration) -> Option<Frame> {
        if let Some(pos) = self
            .responses
            .iter()
            .position(|f| f.id.as_deref() == Some(id))
        {
            return self.responses.remove(pos);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let f = self.read_frame(left).await?;
            if f.kind == Some(Kind::Response) && f.id.as_deref() == Some(id) {
                return Some(f);
            }
            self.stash(f);
        }
    }

    /// Sends `session.send` on `sid` with a fresh id and waits up to `timeout` for its reply.
    pub async fn try_response_after(&mut self, sid: &str, timeout: Duration) -> Option<Frame> {
        let id = self.fresh_id();
        let p = serde_json::json!({"sessionId": sid, "prompt": "x"});
        self.send_request(&id, "session.send", &p).await;
        self.try_response(&id, timeout).await
    }

    /// Waits for any response (e.g. one with `id: null`).
    pub async fn any_response(&mut self, timeout: Duration) -> Option<Frame> {
        if let Some(f) = self.responses.pop_front() {
            return Some(f);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let f = self.read_frame(left).await?;
            if f.kind == Some(Kind::Response) || f.kind.is_none() {
                return Some(f);
            }
            self.stash(f);
        }
    }

    /// Waits for the next server→client request.
    pub async fn server_request(&mut self, timeout: Duration) -> Option<Frame> {
        if let Some(f) = self.server_reqs.pop_front() {
            return Some(f);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let f = self.read_frame(left).await?;
            if f.kind == Some(Kind::Request) {
                return Some(f);
            }
            self.stash(f);
        }
    }

    /// Reads everything that arrives within `quiet` of silence (bounded by `max`), stashing it.
    pub async fn drain(&mut self, quiet: Duration, max: Duration) {
        let deadline = Instant::now() + max;
        while Instant::now() < deadline {
            match self.read_frame(quiet).await {
                Some(f) => self.stash(f),
                None => return,
            }
        }
    }

    /// Waits until `pred` holds over the stashed notifications (reading more as needed).
    pub async fn wait_notes(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&VecDeque<Frame>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.notes) {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            match self.read_frame(left).await {
                Some(f) => self.stash(f),
                None => return pred(&self.notes),
            }
        }
    }

    /// Whether the peer closed the connection within `timeout`.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.closed {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            match tokio::time::timeout(left, self.reader.read_frame()).await {
                Ok(Ok(Some(b))) => {
                    let f = Frame::new(b);
                    self.stash(f);
                }
                Ok(Ok(None)) | Ok(Err(CodecError::UnexpectedEof)) | Ok(Err(_)) => {
                    self.closed = true;
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Session events (`session.event`) stashed for one session, in arrival order.
    pub fn events_for(&self, sid: &str) -> Vec<&Frame> {
        self.notes
            .iter()
            .filter(|f| f.method() == Some("session.event") && f.session() == Some(sid))
            .collect()
    }
}

/// Starts `n` fakes named `cli-0..`, with one shared storage if `shared`.
pub async fn fakes(n: usize, shared: bool) -> Vec<FakeCli> {
    let storage = if shared { Some(Storage::new()) } else { None };
    let mut v = Vec::new();
    for i in 0..n {
        let f = FakeCli::start(FakeConfig {
            name: format!("cli-{i}"),
            token: None,
            storage: storage.clone(),
            addr: None,
        })
        .await
        .expect("fake CLI start");
        v.push(f);
    }
    v
}

/// A config for an in-process proxy in front of `backends`, with fast health checks.
pub fn config(backends: &[SocketAddr]) -> Config {
    let o = Overrides {
        listen: Some("127.0.0.1:0".into()),
        backends: backends.iter().map(|a| a.to_string()).collect(),
        admin: Some("127.0.0.1:0".into()),
        ..Overrides::default()
    };
    let mut cfg = Config::default().apply(&o, "test").expect("config");
    cfg.health.interval = copilot_lb::config::Millis(Duration::from_millis(100));
    cfg.health.timeout = copilot_lb::config::Millis(Duration::from_millis(500));
    cfg.health.rise = 1;
    cfg.health.fall = 2;
    cfg.limits.connect_timeout = copilot_lb::config::Millis(Duration::from_millis(500));
    cfg.limits.handshake_timeout = copilot_lb::config::Millis(Duration::from_millis(1000));
    cfg.routing.allow_global = FAKE_METHODS.iter().map(|m| m.to_string()).collect();
    cfg
}

/// Gives an in-process proxy on the default embedded registry a state file of its own (the
/// default path is shared by the working directory, and a file is opened by one proxy only).
/// The files (72 KiB each) sit in one directory that `scripts/test-all.sh` empties.
pub fn own_state(cfg: &mut Config) {
    if cfg.state.kind == copilot_lb::config::StateKind::Embedded && cfg.state.path.is_none() {
        let dir = std::env::temp_dir().join("copilot-lb-test-state");
        let _ = std::fs::create_dir_all(&dir);
        cfg.state.path = Some(dir.join(format!("{}.redb", uuid::Uuid::new_v4())));
    }
}

/// The fake CLI's own test methods, which the routing table does not know: the tests' config
/// forwards them the way an operator would forward a CLI's extension methods.
pub const FAKE_METHODS: &[&str] = &[
    "test.echo",
    "test.sleep",
    "test.stream",
    "test.null",
    "test.callClient",
    "test.whoami",
];

/// `routing:` for a YAML config that forwards [`FAKE_METHODS`].
pub fn fake_routing_yaml() -> String {
    format!("routing: {{allow_global: [{}]}}\n", FAKE_METHODS.join(", "))
}

/// Starts the proxy in-process.
pub async fn proxy(mut cfg: Config) -> (Running, SocketAddr) {
    own_state(&mut cfg);
    let r = app::start(cfg).await.expect("proxy start");
    let addr = r.listen_addrs[0];
    (r, addr)
}

/// Fake backends and an in-process proxy in front of them, the setup most proxy tests start
/// from. Tests destructure it; the fakes and the proxy stop when their bindings drop, so bind
/// unused ones to `_name`, never to `_`.
pub struct Fixture {
    /// The backends, in the config's order.
    pub fakes: Vec<FakeCli>,
    /// The proxy.
    pub running: Running,
    /// The proxy's client listener.
    pub addr: SocketAddr,
}

impl Fixture {
    /// `n` fakes from [`fakes`] behind a proxy with the test [`config`].
    pub async fn start(n: usize, shared: bool) -> Fixture {
        Fixture::with(n, shared, |_| {}).await
    }

    /// Like [`Fixture::start`], with `tweak` applied to the config before the proxy starts.
    pub async fn with(n: usize, shared: bool, tweak: impl FnOnce(&mut Config)) -> Fixture {
        Fixture::front(fakes(n, shared).await, None, tweak).await
    }

    /// A proxy in front of fakes the test prepared itself (tokens, killed, sessions made
    /// behind the proxy's back), serving clients on `loops` when given.
    pub async fn front(
        fakes: Vec<FakeCli>,
        loops: Option<Arc<Loops>>,
        tweak: impl FnOnce(&mut Config),
    ) -> Fixture {
        let addrs: Vec<SocketAddr> = fakes.iter().map(|f| f.addr()).collect();
        let mut cfg = config(&addrs);
        tweak(&mut cfg);
        own_state(&mut cfg);
        let running = app::start_on(cfg, loops).await.expect("proxy start");
        let addr = running.listen_addrs[0];
        Fixture {
            fakes,
            running,
            addr,
        }
    }
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub async fn eventually<F: FnMut() -> bool>(timeout: Duration, mut f: F) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a test body with an overall timeout.
pub async fn within<F: Future<Output = ()>>(limit: Duration, fut: F) {
    tokio::time::timeout(limit, fut)
        .await
        .expect("test exceeded its time limit");
}

/// Which fake holds a session live (exactly one expected).
pub fn holders<'a>(fakes: &'a [FakeCli], sid: &str) -> Vec<&'a FakeCli> {
    fakes
        .iter()
        .filter(|f| f.sessions_live().iter().any(|s| s == sid))
        .collect()
}

/// Backend names as the proxy knows them (addresses, since tests give no names).
pub fn names(fakes: &[FakeCli]) -> Vec<String> {
    fakes.iter().map(|f| f.addr().to_string()).collect()
}

/// Shared storage handle, for tests that build fakes by hand.
pub fn storage() -> Arc<Storage> {
    Storage::new()
}

/// `copilot-lb serve` as a child process (the built binary) on `cfg`, client listener `addr`
/// and embedded registry file `state`, its output discarded. The caller reaps it.
pub fn spawn_serve(
    cfg: &std::path::Path,
    addr: SocketAddr,
    state: &std::path::Path,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_copilot-lb"))
        .args(["serve", "--config"])
        .arg(cfg)
        .args(["--listen", &addr.to_string(), "--state-path"])
        .arg(state)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn copilot-lb")
}
