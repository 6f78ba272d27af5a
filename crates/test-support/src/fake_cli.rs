//! A scriptable fake Copilot CLI server (`copilot --headless`) for integration tests and load
//! generation.
//!
//! It speaks the CLI's wire protocol (`copilot-protocol.md`): Content-Length framing, JSON-RPC
//! 2.0 with the CLI's error codes, the connection token of §2.2, sessions that connections join
//! and leave (§3, §5), `session.event` to joined connections and `session.lifecycle` to every
//! connection (§4.1). Several fakes can share one [`Storage`], like CLIs sharing a
//! `COPILOT_HOME`. Failures are injected with [`FakeCli::kill`], [`FakeCli::restart`],
//! [`FakeCli::stall`] and [`FakeCli::refuse_connect`].
//!
//! Every request's params are recorded ([`FakeCli::params_of`]); `session.options.update` and
//! `session.shell.exec` are accepted without effect.
//!
//! Test-only methods: `test.echo {payload}`, `test.null`, `test.stream {sessionId, count,
//! size}`, `test.callClient {sessionId, method, params}`, `test.sleep {ms}`, `test.whoami`.
//! `session.send` with `testTurnMs` is a slow turn: answered at once, as the CLI does, and
//! its events (ending with `session.idle`) follow when the turn is done, which takes that
//! long once one of [`FakeCli::set_turn_workers`] is free (a CLI that runs N turns at once).

use bytes::Bytes;
use copilot_lb::codec::{CodecError, FrameReader, Limits};
use copilot_lb::envelope::{self, Kind};
use copilot_lb::rpc::{self, now_rfc3339, PROTOCOL_VERSION};
use copilot_lb::wire;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Capacity of each connection's outgoing frame queue.
const QUEUE: usize = 1024;
/// Longest `test.sleep` honoured, so a typo cannot hang a test run.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Largest `test.stream` count and delta size honoured.
const MAX_STREAM_COUNT: u64 = 100_000;
/// Largest `test.stream` delta size honoured.
const MAX_STREAM_SIZE: u64 = 16 * 1024 * 1024;
/// How long a closing connection may take to flush its last frames.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the fake server's control API.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// Binding or re-binding the listener failed.
    #[error("fake CLI {name}: cannot listen on {addr}: {source}")]
    Bind {
        /// The fake's name.
        name: String,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
}

impl From<FakeError> for io::Error {
    fn from(e: FakeError) -> io::Error {
        match e {
            FakeError::Bind { source, .. } => source,
        }
    }
}

/// Nesting beyond which the fake, like the CLI, cannot parse a frame.
const FAKE_MAX_DEPTH: usize = 10_000;

/// Configuration of one fake CLI server.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Name, reported as `version: "fake-<name>"` and by `test.whoami`.
    pub name: String,
    /// The `COPILOT_CONNECTION_TOKEN` it requires, if any.
    pub token: Option<String>,
    /// Session storage shared with other fakes (a shared `COPILOT_HOME`); `None` means private.
    pub storage: Option<Arc<Storage>>,
    /// Address to bind; `None` means `127.0.0.1:0`.
    pub addr: Option<SocketAddr>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            name: "fake".into(),
            token: None,
            storage: None,
            addr: None,
        }
    }
}

impl FakeConfig {
    /// A private-storage, token-less config with this name.
    pub fn named(name: impl Into<String>) -> FakeConfig {
        FakeConfig {
            name: name.into(),
            ..FakeConfig::default()
        }
    }
}

/// One persisted session.
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// Session id.
    pub id: String,
    /// Creation time (RFC 3339).
    pub start_time: String,
    /// Last modification time (RFC 3339).
    pub modified_time: String,
    /// Summary (the first prompt).
    pub summary: Option<String>,
    /// Persisted events, oldest first.
    pub history: Vec<Value>,
    /// Names of the fakes where the session is live now (the CLI's in-use lock).
    pub holders: Vec<String>,
}

/// Session storage, private to one fake or shared between several (like `COPILOT_HOME`).
#[derive(Debug, Default)]
pub struct Storage {
    sessions: Mutex<HashMap<String, StoredSession>>,
}

impl Storage {
    /// Empty storage, ready to share.
    pub fn new() -> Arc<Storage> {
        Arc::new(Storage::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, StoredSession>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ids of every stored session, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// Whether a session is stored.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// A copy of one stored session.
    pub fn get(&self, id: &str) -> Option<StoredSession> {
        self.lock().get(id).cloned()
    }

    /// Names of the fakes holding a session live now.
    pub fn holders(&self, id: &str) -> Vec<String> {
        self.lock()
            .get(id)
            .map(|s| s.holders.clone())
            .unwrap_or_default()
    }

    fn create(&self, id: &str) {
        let now = now_rfc3339();
        self.lock()
            .entry(id.to_string())
            .or_insert_with(|| StoredSession {
                id: id.to_string(),
                start_time: now.clone(),
                modified_time: now,
                summary: None,
                history: Vec::new(),
                holders: Vec::new(),
            });
    }

    /// A copy of `from` (history included) under a fresh id, as `sessions.fork` does.
    fn fork(&self, from: &str) -> Option<String> {
        let mut all = self.lock();
        let src = all.get(from)?.clone();
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_rfc3339();
        all.insert(
            id.clone(),
            StoredSession {
                id: id.clone(),
                start_time: now.clone(),
                modified_time: now,
                holders: Vec::new(),
                ..src
            },
        );
        Some(id)
    }

    fn set_held(&self, id: &str, holder: &str, held: bool) {
        if let Some(s) = self.lock().get_mut(id) {
            s.holders.retain(|h| h != holder);
            if held {
                s.holders.push(holder.to_string());
            }
        }
    }

    fn append(&self, id: &str, events: &[Value], summary: Option<&str>) {
        if let Some(s) = self.lock().get_mut(id) {
            s.history.extend_from_slice(events);
            s.modified_time = now_rfc3339();
            if s.summary.is_none() {
                s.summary = summary.map(str::to_string);
            }
        }
    }

    fn remove(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    fn listing(&self) -> Vec<Value> {
        let mut v: Vec<Value> = self
            .lock()
            .values()
            .map(|s| {
                json!({
                    "sessionId": s.id,
                    "startTime": s.start_time,
                    "modifiedTime": s.modified_time,
                    "summary": s.summary,
                    "isRemote": false,
                })
            })
            .collect();
        v.sort_by(|a, b| a["sessionId"].as_str().cmp(&b["sessionId"].as_str()));
        v
    }
}

/// One open connection to the fake.
struct Conn {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
    authenticated: AtomicBool,
    next_request: AtomicU64,
    calls: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
}

impl Conn {
    async fn send(&self, body: Vec<u8>) {
        let _ = self.tx.send(Bytes::from(body)).await;
    }
}

#[derive(Default)]
struct Live {
    conns: HashMap<u64, Arc<Conn>>,
    /// Session id → connections joined to it.
    joined: HashMap<String, HashSet<u64>>,
}

struct Inner {
    name: String,
    version: String,
    token: Option<String>,
    storage: Arc<Storage>,
    addr: Mutex<SocketAddr>,
    live: Mutex<Live>,
    accepted: AtomicU64,
    next_conn: AtomicU64,
    counts: Mutex<HashMap<String, u64>>,
    /// The params of every request, by method, in arrival order.
    params_seen: Mutex<HashMap<String, Vec<Value>>>,
    stalled: AtomicBool,
    refusing: AtomicBool,
    /// Milliseconds between a client's close and the release of its sessions.
    cleanup_delay_ms: AtomicU64,
    /// `session.resume` of the key opens the value instead (the CLI's prefix resolution, or a
    /// misbehaving CLI, from the proxy's point of view).
    aliases: Mutex<HashMap<String, String>>,
    generation: Mutex<CancellationToken>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// Slow turns run at once (`None`: unbounded).
    turn_workers: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
}

/// A running fake Copilot CLI server on loopback.
pub struct FakeCli {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FakeCli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCli")
            .field("name", &self.inner.name)
            .field("addr", &self.addr())
            .finish()
    }
}

impl FakeCli {
    /// Binds (`127.0.0.1:0` unless configured) and starts serving on the current tokio runtime.
    pub async fn start(cfg: FakeConfig) -> io::Result<FakeCli> {
        let want = cfg
            .addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(want)
            .await
            .map_err(|source| FakeError::Bind {
                name: cfg.name.clone(),
                addr: want,
                source,
            })?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            version: format!("fake-{}", cfg.name),
            name: cfg.name,
            token: cfg.token,
            storage: cfg.storage.unwrap_or_default(),
            addr: Mutex::new(addr),
            live: Mutex::new(Live::default()),
            accepted: AtomicU64::new(0),
            next_conn: AtomicU64::new(1),
            counts: Mutex::new(HashMap::new()),
            params_seen: Mutex::new(HashMap::new()),
            stalled: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            cleanup_delay_ms: AtomicU64::new(0),
            aliases: Mutex::new(HashMap::new()),
            generation: Mutex::new(CancellationToken::new()),
            acceptor: Mutex::new(None),
            turn_workers: Mutex::new(None),
        });
        inner.serve(listener);
        Ok(FakeCli { inner })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        *lock(&self.inner.addr)
    }

    /// The fake's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its session storage (possibly shared).
    pub fn storage(&self) -> Arc<Storage> {
        self.inner.storage.clone()
    }

    /// Sessions with at least one joined connection, sorted.
    pub fn sessions_live(&self) -> Vec<String> {
        let live = lock(&self.inner.live);
        let mut v: Vec<String> = live
            .joined
            .iter()
            .filter(|(_, c)| !c.is_empty())
            .map(|(s, _)| s.clone())
            .collect();
        v.sort();
        v
    }

    /// Connections joined to one session now.
    pub fn joined_connections(&self, session: &str) -> usize {
        lock(&self.inner.live)
            .joined
            .get(session)
            .map_or(0, HashSet::len)
    }

    /// Every session in its storage, sorted.
    pub fn stored_sessions(&self) -> Vec<String> {
        self.inner.storage.ids()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        lock(&self.inner.live).conns.len()
    }

    /// Connections accepted since start (including refused ones).
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Slow turns (`session.send` with `testTurnMs`) run `n` at once; later ones wait, first
    /// come first served, as in a CLI whose model calls are the bottleneck.
    pub fn set_turn_workers(&self, n: usize) {
        *lock(&self.inner.turn_workers) = Some(Arc::new(tokio::sync::Semaphore::new(n)));
    }

    /// Requests received for `method` since start (counted even while stalled).
    pub fn requests(&self, method: &str) -> u64 {
        lock(&self.inner.counts).get(method).copied().unwrap_or(0)
    }

    /// Requests received for every method since start.
    pub fn request_counts(&self) -> HashMap<String, u64> {
        lock(&self.inner.counts).clone()
    }

    /// Simulates `kill -9`: closes the listener and every connection at once; later connects
    /// are refused until [`FakeCli::restart`]. Sessions stay in storage but are no longer live.
    pub fn kill(&self) {
        self.inner.kill();
    }

    /// Binds the same port again and serves with the same storage (after [`FakeCli::kill`];
    /// a running fake is killed first).
    pub async fn restart(&self) -> io::Result<()> {
        self.inner.kill();
        let old = lock(&self.inner.acceptor).take();
        if let Some(h) = old {
            let _ = h.await;
        }
        let addr = self.addr();
        let mut last = None;
        // The old socket closes asynchronously; retry briefly (bounded).
        for _ in 0..50 {
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    *lock(&self.inner.generation) = CancellationToken::new();
                    self.inner.serve(l);
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(FakeError::Bind {
            name: self.inner.name.clone(),
            addr,
            source: last.unwrap_or_else(|| io::ErrorKind::AddrInUse.into()),
        }
        .into())
    }

    /// While on, connections are accepted and frames read, but nothing is ever answered.
    pub fn stall(&self, on: bool) {
        self.inner.stalled.store(on, Ordering::Relaxed);
    }

    /// Like the CLI, release a closed client's sessions only after `d` (its cleanup is
    /// asynchronous); the fake closes its side of the connection after the release.
    pub fn set_cleanup_delay(&self, d: Duration) {
        self.inner
            .cleanup_delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// The params of every `method` request this fake received, oldest first (what the proxy
    /// actually forwarded).
    pub fn params_of(&self, method: &str) -> Vec<Value> {
        lock(&self.inner.params_seen)
            .get(method)
            .cloned()
            .unwrap_or_default()
    }

    /// From now on `session.resume {sessionId: asked}` opens and answers `actual`, as the real
    /// CLI does for an id that is a unique prefix of another.
    pub fn resolve_as(&self, asked: &str, actual: &str) {
        lock(&self.inner.aliases).insert(asked.to_string(), actual.to_string());
    }

    /// While on, every accepted connection is closed at once.
    pub fn refuse_connect(&self, on: bool) {
        self.inner.refusing.store(on, Ordering::Relaxed);
    }
}

impl Drop for FakeCli {
    fn drop(&mut self) {
        self.inner.kill();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn serve(self: &Arc<Self>, listener: TcpListener) {
        let gen = lock(&self.generation).clone();
        let me = self.clone();
        let h = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    biased;
                    _ = gen.cancelled() => return,
                    a = listener.accept() => a,
                };
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                me.accepted.fetch_add(1, Ordering::Relaxed);
                if gen.is_cancelled() {
                    return;
                }
                if me.refusing.load(Ordering::Relaxed) {
                    drop(stream);
                    continue;
                }
                tokio::spawn(me.clone().connection(stream, gen.child_token()));
            }
        });
        *lock(&self.acceptor) = Some(h);
    }

    fn kill(&self) {
        lock(&self.generation).cancel();
        let live = std::mem::take(&mut *lock(&self.live));
        for s in live.joined.keys() {
            self.storage.set_held(s, &self.name, false);
        }
        for c in live.conns.values() {
            c.cancel.cancel();
        }
    }

    fn count(&self, method: &str) {
        let mut m = lock(&self.counts);
        match m.get_mut(method) {
            Some(n) => *n += 1,
            None => {
                m.insert(method.to_string(), 1);
            }
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, cancel: CancellationToken) {
        wire::tune(&stream);
        let (r, w) = stream.into_split();
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(wire::writer(w, rx));
        let conn = Arc::new(Conn {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            tx,
            cancel: cancel.clone(),
            authenticated: AtomicBool::new(false),
            next_request: AtomicU64::new(1),
            calls: Mutex::new(HashMap::new()),
        });
        {
            let mut live = lock(&self.live);
            if cancel.is_cancelled() {
                writer.abort();
                return;
            }
            live.conns.insert(conn.id, conn.clone());
        }
        let mut reader = FrameReader::new(r, Limits::default());
        loop {
            let frame = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                f = reader.read_frame() => f,
            };
            match frame {
                Ok(Some(body)) => self.on_frame(&conn, body).await,
                Ok(None) => break,
                Err(CodecError::FrameTooLarge { .. }) => {}
                Err(CodecError::MissingContentLength) => {
                    if !self.stalled.load(Ordering::Relaxed) {
                        conn.send(rpc::error(
                            "null",
                            rpc::PARSE_ERROR,
                            "Header must provide a Content-Length property.",
                            None,
                        ))
                        .await;
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        let killed = cancel.is_cancelled();
        let delay = self.cleanup_delay_ms.load(Ordering::Relaxed);
        if delay > 0 && !killed {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.leave_all(conn.id);
        conn.cancel.cancel();
        lock(&conn.calls).clear();
        drop(conn);
        drop(reader);
        if killed {
            writer.abort();
        } else if let Err(_elapsed) = tokio::time::timeout(FLUSH_TIMEOUT, writer).await {
            // A handler still holds the queue; the socket closes when it finishes.
        }
    }

    /// Removes a connection and its joins; sessions left without a connection stop being live.
    fn leave_all(&self, conn: u64) {
        let mut released = Vec::new();
        {
            let mut live = lock(&self.live);
            live.conns.remove(&conn);
            live.joined.retain(|sid, conns| {
                conns.remove(&conn);
                if conns.is_empty() {
                    released.push(sid.clone());
                    false
                } else {
                    true
                }
            });
        }
        for s in released {
            self.storage.set_held(&s, &self.name, false);
        }
    }

    /// Joins `conn` to `sid`; returns whether the session was already live here.
    fn join(&self, conn: u64, sid: &str) -> bool {
        let was_live = {
            let mut live = lock(&self.live);
            if !live.conns.contains_key(&conn) {
                return false;
            }
            let set = live.joined.entry(sid.to_string()).or_default();
            let was = !set.is_empty();
            set.insert(conn);
            was
        };
        if !was_live {
            self.storage.set_held(sid, &self.name, true);
        }
        was_live
    }

    fn detach(&self, conn: u64, sid: &str) {
        let released = {
            let mut live = lock(&self.live);
            match live.joined.get_mut(sid) {
                Some(set) => {
                    set.remove(&conn);
                    if set.is_empty() {
                        live.joined.remove(sid);
                        true
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if released {
            self.storage.set_held(sid, &self.name, false);
        }
    }

    fn is_live(&self, sid: &str) -> bool {
        lock(&self.live)
            .joined
            .get(sid)
            .is_some_and(|s| !s.is_empty())
    }

    fn joined_conns(&self, sid: &str) -> Vec<Arc<Conn>> {
        let live = lock(&self.live);
        match live.joined.get(sid) {
            Some(set) => set
                .iter()
                .filter_map(|c| live.conns.get(c).cloned())
                .collect(),
            None => Vec::new(),
        }
    }

    fn all_conns(&self) -> Vec<Arc<Conn>> {
        lock(&self.live).conns.values().cloned().collect()
    }

    /// Sends one body to every joined connection of a session.
    async fn to_joined(&self, sid: &str, body: Bytes) {
        for c in self.joined_conns(sid) {
            let _ = c.tx.send(body.clone()).await;
        }
    }

    /// `session.lifecycle` to every connection, like the CLI (best effort: a full queue drops).
    fn lifecycle(&self, kind: &str, sid: &str) {
        let meta = self
            .storage
            .get(sid)
            .map(|s| json!({"startTime": s.start_time, "modifiedTime": s.modified_time, "summary": s.summary}));
        let mut params = json!({"type": kind, "sessionId": sid});
        if let Some(m) = meta {
            params["metadata"] = m;
        }
        let body = Bytes::from(notification("session.lifecycle", &params));
        for c in self.all_conns() {
            let _ = c.tx.try_send(body.clone());
        }
    }

    async fn on_frame(self: &Arc<Self>, conn: &Arc<Conn>, body: Bytes) {
        // The CLI's JSON parser gives up on very deep nesting and answers with `id: null`.
        let parsed =
            envelope::check_text(&body, FAKE_MAX_DEPTH).and_then(|()| envelope::parse(&body));
        let env = match parsed {
            Ok(e) => e,
            Err(e) => {
                if !self.stalled.load(Ordering::Relaxed) {
                    conn.send(rpc::error("null", e.code(), &e.to_string(), None))
                        .await;
                }
                return;
            }
        };
        match env.kind {
            Kind::Response => {
                let Some(n) = env.id_u64() else { return };
                drop(env);
                let waiter = lock(&conn.calls).remove(&n);
                if let Some(w) = waiter {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let answer = match v.get("result") {
                        Some(r) => r.clone(),
                        None => json!({"error": v.get("error").cloned().unwrap_or(Value::Null)}),
                    };
                    let _ = w.send(answer);
                }
            }
            Kind::Notification => {}
            Kind::Request => {
                let id = env.id.map(|r| r.get().to_string()).unwrap_or_default();
                let method = env.method.as_deref().unwrap_or("").to_string();
                drop(env);
                self.count(&method);
                if self.stalled.load(Ordering::Relaxed) {
                    return;
                }
                self.on_request(conn, id, method, body).await;
            }
        }
    }

    async fn on_request(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        id: String,
        method: String,
        body: Bytes,
    ) {
        let params: Value = envelope::raw_params(&body)
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or(Value::Null);
        if method == "connect" {
            return self.on_connect(conn, &id, &params).await;
        }
        lock(&self.params_seen)
            .entry(method.clone())
            .or_default()
            .push(params.clone());
        if self.token.is_some() && !conn.authenticated.load(Ordering::Relaxed) {
            return conn
                .send(rpc::error(
                    &id,
                    rpc::AUTHENTICATION_REQUIRED,
                    "AUTHENTICATION_REQUIRED",
                    None,
                ))
                .await;
        }
        let sid = params
            .get("sessionId")
            .and_then(Value::as_str)
            .map(str::to_string);
        let reply = match method.as_str() {
            "ping" => {
                let m = params.get("message").and_then(Value::as_str).unwrap_or("");
                Ok(
                    json!({"message": format!("pong: {m}"), "timestamp": rpc::now_millis(), "protocolVersion": PROTOCOL_VERSION}),
                )
            }
            "status.get" => {
                Ok(json!({"version": self.version, "protocolVersion": PROTOCOL_VERSION}))
            }
            "session.create" => Ok(self.create(conn, sid)),
            "session.resume" => {
                let sid = sid.map(|s| lock(&self.aliases).get(&s).cloned().unwrap_or(s));
                self.resume(conn, sid).await
            }
            "session.send" => self.send(sid, &params).await,
            "session.getMessages" => match sid.and_then(|s| self.storage.get(&s)) {
                Some(s) => Ok(json!({"events": s.history})),
                None => Ok(json!({"events": []})),
            },
            "session.list" => Ok(json!({"sessions": self.storage.listing()})),
            // Like the CLI: a new session with the source's history, on this server.
            "sessions.fork" => match sid.and_then(|s| self.storage.fork(&s)) {
                Some(id) => Ok(json!({"sessionId": id})),
                None => Err((
                    -32603,
                    "Request sessions.fork failed with message: Session not found".to_string(),
                )),
            },
            "session.delete" => Ok(self.delete(sid)),
            "session.detach" | "session.destroy" => {
                if let Some(s) = &sid {
                    self.detach(conn.id, s);
                }
                Ok(json!({"success": true}))
            }
            // The CLI's is `sessions.getMetadata` (the proxy asks it before a tenant's create).
            "session.getMetadata" | "sessions.getMetadata" => {
                Ok(match sid.and_then(|s| self.storage.get(&s)) {
                    Some(s) => {
                        json!({"session": {"sessionId": s.id, "startTime": s.start_time, "modifiedTime": s.modified_time, "summary": s.summary, "isRemote": false}})
                    }
                    None => json!({}),
                })
            }
            // Accepted as the CLI would, so a test sees whether the proxy forwarded them.
            "session.options.update" => Ok(json!({})),
            "session.shell.exec" => Ok(json!({"processId": "fake-proc-1"})),
            "test.echo" => {
                Ok(json!({"payload": params.get("payload").cloned().unwrap_or(Value::Null)}))
            }
            "test.null" => Ok(Value::Null),
            "test.whoami" => Ok(json!({"backend": self.name, "connection": conn.id})),
            "test.stream" => self.stream(sid, &params).await,
            "test.sleep" => {
                let ms = params.get("ms").and_then(Value::as_u64).unwrap_or(0);
                let d = Duration::from_millis(ms).min(MAX_SLEEP);
                let conn = conn.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => conn.send(rpc::result(&id, &json!({}))).await,
                        _ = conn.cancel.cancelled() => {}
                    }
                });
                return;
            }
            "test.callClient" => {
                self.call_client(conn, id, &params);
                return;
            }
            _ => Err((rpc::METHOD_NOT_FOUND, format!("Unhandled method {method}"))),
        };
        let out = match reply {
            Ok(v) => rpc::result(&id, &v),
            Err((code, msg)) => rpc::error(&id, code, &msg, None),
        };
        conn.send(out).await;
    }

    async fn on_connect(&self, conn: &Conn, id: &str, params: &Value) {
        let given = params.get("token").and_then(Value::as_str);
        let err = match (&self.token, given) {
            (None, Some(_)) => Some((
                rpc::AUTHENTICATION_NOT_CONFIGURED,
                "AUTHENTICATION_NOT_CONFIGURED",
            )),
            (None, None) => None,
            (Some(want), Some(got)) if want == got => None,
            (Some(_), _) => Some((rpc::AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED")),
        };
        let out = match err {
            Some((code, msg)) => rpc::error(id, code, msg, None),
            None => {
                conn.authenticated.store(true, Ordering::Relaxed);
                rpc::result(
                    id,
                    &json!({"ok": true, "protocolVersion": PROTOCOL_VERSION, "version": self.version}),
                )
            }
        };
        conn.send(out).await;
    }

    fn create(&self, conn: &Conn, sid: Option<String>) -> Value {
        let sid = sid.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        self.storage.create(&sid);
        self.join(conn.id, &sid);
        // Like the CLI: announced to every connection before the reply.
        self.lifecycle("session.created", &sid);
        let start = self
            .storage
            .get(&sid)
            .map(|s| s.start_time)
            .unwrap_or_default();
        json!({
            "sessionId": sid,
            "nativeSessionId": sid,
            "startTime": start,
            "isRemote": false,
            "mode": "interactive",
            "workspacePath": format!("/fake/{}/session-state/{sid}", self.name),
            "capabilities": {"ui": {"elicitation": false, "mcpApps": false, "canvases": false}, "extensions": false},
        })
    }

    async fn resume(&self, conn: &Conn, sid: Option<String>) -> Result<Value, (i64, String)> {
        let sid = sid.unwrap_or_default();
        let Some(stored) = self.storage.get(&sid) else {
            return Err((
                -32603,
                format!("Request session.resume failed with message: Failed to load session events: Session not found: {sid}"),
            ));
        };
        let in_use_elsewhere = stored.holders.iter().any(|h| *h != self.name);
        let was_live = self.join(conn.id, &sid);
        let ev = event(
            "session.resume",
            json!({"resumeTime": now_rfc3339(), "eventCount": stored.history.len(), "alreadyInUse": in_use_elsewhere, "sessionWasActive": was_live}),
            true,
        );
        self.to_joined(&sid, Bytes::from(session_event(&sid, &ev)))
            .await;
        Ok(json!({
            "sessionId": sid,
            "nativeSessionId": sid,
            "startTime": stored.start_time,
            "isRemote": false,
            "mode": "interactive",
            "workspacePath": format!("/fake/{}/session-state/{sid}", self.name),
        }))
    }

    async fn send(
        self: &Arc<Self>,
        sid: Option<String>,
        params: &Value,
    ) -> Result<Value, (i64, String)> {
        let sid = sid.unwrap_or_default();
        if !self.is_live(&sid) || !self.storage.contains(&sid) {
            return Err((-32603, format!("Session not found for sessionId: {sid}")));
        }
        let message_id = uuid::Uuid::new_v4().to_string();
        if let Some(ms) = params.get("testTurnMs").and_then(Value::as_u64) {
            let (me, params, mid) = (self.clone(), params.clone(), message_id.clone());
            let workers = lock(&self.turn_workers).clone();
            let gen = lock(&self.generation).clone();
            tokio::spawn(async move {
                let turn = async {
                    let _permit = match &workers {
                        Some(w) => w.clone().acquire_owned().await.ok(),
                        None => None,
                    };
                    tokio::time::sleep(Duration::from_millis(ms).min(MAX_SLEEP)).await;
                    me.turn(&sid, &params, mid).await;
                };
                tokio::select! {
                    _ = turn => {}
                    _ = gen.cancelled() => {}
                }
            });
            return Ok(json!({"messageId": message_id}));
        }
        self.turn(&sid, params, message_id.clone()).await;
        Ok(json!({"messageId": message_id}))
    }

    /// A turn's events: the user message, the answer, `session.idle`.
    async fn turn(&self, sid: &str, params: &Value, message_id: String) {
        let sid = sid.to_string();
        let prompt = params.get("prompt").and_then(Value::as_str).unwrap_or("");
        let user = event("user.message", json!({"content": prompt}), false);
        let assistant = event(
            "assistant.message",
            json!({"messageId": message_id, "content": format!("ECHO: {}", prompt.to_uppercase())}),
            false,
        );
        let idle = event("session.idle", json!({}), false);
        self.storage.append(
            &sid,
            &[user.clone(), assistant.clone(), idle.clone()],
            Some(prompt),
        );
        for e in [&user, &assistant, &idle] {
            self.to_joined(&sid, Bytes::from(session_event(&sid, e)))
                .await;
        }
        self.lifecycle("session.updated", &sid);
    }

    fn delete(&self, sid: Option<String>) -> Value {
        let sid = sid.unwrap_or_default();
        if self.storage.remove(&sid) {
            self.lifecycle("session.deleted", &sid);
            json!({"success": true})
        } else {
            json!({"success": false, "error": format!("Session file not found for {sid}")})
        }
    }

    async fn stream(&self, sid: Option<String>, params: &Value) -> Result<Value, (i64, String)> {
        let sid = sid.unwrap_or_default();
        if !self.is_live(&sid) {
            return Err((-32603, format!("Session not found for sessionId: {sid}")));
        }
        let count = params
            .get("count")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .min(MAX_STREAM_COUNT);
        let size = params
            .get("size")
            .and_then(Value::as_u64)
            .unwrap_or(16)
            .min(MAX_STREAM_SIZE) as usize;
        let filler = "x".repeat(size);
        for i in 0..count {
            let ev = event(
                "assistant.message_delta",
                json!({"messageId": "stream", "index": i, "deltaContent": filler}),
                true,
            );
            self.to_joined(&sid, Bytes::from(session_event(&sid, &ev)))
                .await;
        }
        Ok(json!({"sent": count}))
    }

    /// Sends a server→client request on `conn` and answers `id` with the client's reply.
    fn call_client(self: &Arc<Self>, conn: &Arc<Conn>, id: String, params: &Value) {
        let method = params
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("hooks.invoke")
            .to_string();
        let mut p = params.get("params").cloned().unwrap_or_else(|| json!({}));
        if let (Some(obj), Some(sid)) = (p.as_object_mut(), params.get("sessionId")) {
            obj.entry("sessionId").or_insert_with(|| sid.clone());
        }
        let n = conn.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&conn.calls).insert(n, tx);
        let conn = conn.clone();
        tokio::spawn(async move {
            conn.send(rpc::request(n, &method, &p)).await;
            tokio::select! {
                answer = rx => {
                    if let Ok(a) = answer {
                        conn.send(rpc::result(&id, &json!({"clientResult": a, "requestId": n}))).await;
                    }
                }
                _ = conn.cancel.cancelled() => {}
            }
        });
    }
}

fn notification(method: &str, params: &Value) -> Vec<u8> {
    let p = serde_json::to_string(params).unwrap_or_else(|_| "{}".into());
    format!(r#"{{"jsonrpc":"2.0","method":"{method}","params":{p}}}"#).into_bytes()
}

/// Builds one event object.
fn event(kind: &str, data: Value, ephemeral: bool) -> Value {
    let mut e = json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "timestamp": now_rfc3339(),
        "parentId": Value::Null,
        "type": kind,
        "data": data,
    });
    if ephemeral {
        e["ephemeral"] = Value::Bool(true);
    }
    e
}

fn session_event(sid: &str, event: &Value) -> Vec<u8> {
    notification("session.event", &json!({"sessionId": sid, "event": event}))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The fake stamps sessions with the product's formatter; SDKs parse these fields.
    #[test]
    fn rfc3339_shape() {
        let st = Storage::new();
        st.create("s");
        let s = st.get("s").unwrap();
        for t in [&s.start_time, &s.modified_time] {
            assert_eq!(t.len(), 24, "{t}");
            assert!(t.ends_with('Z'));
            assert!(t.starts_with("20"));
        }
    }
}
