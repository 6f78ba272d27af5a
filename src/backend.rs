//! The backend pool: each CLI server's address, token, health state and live-session count.

use crate::config::{BackendConfig, Config};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A backend's routing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Serving and taking new sessions.
    Up = 0,
    /// Serving its sessions, taking no new ones.
    Draining = 1,
    /// Not serving; its links are fenced.
    Down = 2,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Up,
            1 => State::Draining,
            _ => State::Down,
        }
    }

    /// Lower-case name for logs, metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Draining => "draining",
            State::Down => "down",
        }
    }
}

/// One CLI server.
#[derive(Debug)]
pub struct Backend {
    /// Stable name (the hashing key).
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Relative weight.
    pub weight: f64,
    /// Cap on live sessions.
    pub max_sessions: Option<u64>,
    /// The CLI's connection token, held by the proxy only.
    token: Option<String>,
    /// TLS towards this backend, if configured.
    pub tls: Option<Arc<crate::tls::ClientTlsStore>>,
    health: AtomicU8,
    drained: std::sync::atomic::AtomicBool,
    /// Sessions with at least one client joined.
    pub live_sessions: AtomicU64,
    /// Open upstream links.
    pub links: AtomicU64,
    /// CLI version reported by its `connect` reply.
    pub version: Mutex<Option<String>>,
    fence: Mutex<CancellationToken>,
    /// Consecutive successful checks.
    pub oks: AtomicU32,
    /// Consecutive failed checks (active or passive).
    pub fails: AtomicU32,
    /// Wakes the prober early (after a passive failure).
    pub probe_now: Notify,
    /// Recent check results, newest last.
    pub history: Mutex<VecDeque<Check>>,
    /// Signalled on every health transition (requests waiting for a verdict listen).
    pub state_changed: Notify,
    /// Whether "drained, no live sessions" was already logged.
    pub drained_logged: std::sync::atomic::AtomicBool,
    /// The drain flag of the config file last applied.
    config_drain: std::sync::atomic::AtomicBool,
}

/// One health observation.
#[derive(Debug, Clone)]
pub struct Check {
    /// When.
    pub at: SystemTime,
    /// Passed?
    pub ok: bool,
    /// Probe latency or failure detail.
    pub detail: String,
}

impl Backend {
    /// Builds a backend from config; fails if its token source is unreadable.
    pub fn from_config(b: &BackendConfig) -> Result<Backend, String> {
        let cfg_drain = b.drain;
        Ok(Backend {
            name: b.name().to_string(),
            address: b.address.value.clone(),
            weight: b.weight,
            max_sessions: b.max_sessions,
            token: Config::backend_token(b)?,
            tls: match &b.tls {
                Some(t) => Some(Arc::new(
                    crate::tls::ClientTlsStore::load(t)
                        .map_err(|e| format!("backend {:?}: {e}", b.name()))?,
                )),
                None => None,
            },
            health: AtomicU8::new(State::Up as u8),
            drained: Default::default(),
            live_sessions: AtomicU64::new(0),
            links: AtomicU64::new(0),
            version: Mutex::new(None),
            fence: Mutex::new(CancellationToken::new()),
            oks: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            probe_now: Notify::new(),
            history: Mutex::new(VecDeque::new()),
            state_changed: Notify::new(),
            drained_logged: std::sync::atomic::AtomicBool::new(false),
            config_drain: std::sync::atomic::AtomicBool::new(b.drain),
        })
        .inspect(|b| b.set_draining(cfg_drain))
    }

    /// The connection token for this CLI, if it requires one.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Effective state: down wins over draining.
    pub fn state(&self) -> State {
        match State::from_u8(self.health.load(Ordering::Acquire)) {
            State::Down => State::Down,
            _ if self.drained.load(Ordering::Acquire) => State::Draining,
            s => s,
        }
    }

    /// Whether the latest health observation was a success.
    pub fn confirmed(&self) -> bool {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .back()
            .is_some_and(|c| c.ok)
    }

    /// Whether health checks consider it reachable.
    pub fn healthy(&self) -> bool {
        State::from_u8(self.health.load(Ordering::Acquire)) != State::Down
    }

    /// Records the health verdict; returns the previous one.
    pub fn set_healthy(&self, up: bool) -> bool {
        let new = if up { State::Up } else { State::Down } as u8;
        let old = self.health.swap(new, Ordering::AcqRel);
        if !up && old != new {
            self.fence();
        }
        if old != new {
            self.state_changed.notify_waiters();
        }
        old != State::Down as u8
    }

    /// Marks or clears draining.
    pub fn set_draining(&self, on: bool) {
        self.drained.store(on, Ordering::Release);
        self.drained_logged.store(false, Ordering::Release);
    }

    /// Whether it is marked draining.
    pub fn draining(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    /// A token cancelled when this backend is fenced; every upstream link watches one.
    pub fn fence_token(&self) -> CancellationToken {
        self.fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .child_token()
    }

    /// Closes every link the proxy holds to this backend: the CLI closes a session when its
    /// last connection drops, so a stalled or partitioned backend releases its sessions.
    pub fn fence(&self) {
        let mut f = self.fence.lock().unwrap_or_else(|e| e.into_inner());
        f.cancel();
        *f = CancellationToken::new();
    }
}

/// The set of backends, swapped whole on reload.
#[derive(Debug, Default)]
pub struct Pool {
    inner: RwLock<Arc<Vec<Arc<Backend>>>>,
}

impl Pool {
    /// Builds the pool from config.
    pub fn new(cfg: &Config) -> Result<Pool, String> {
        let list = cfg
            .backends
            .iter()
            .map(|b| Backend::from_config(b).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pool {
            inner: RwLock::new(Arc::new(list)),
        })
    }

    /// A snapshot of the current backends.
    pub fn all(&self) -> Arc<Vec<Arc<Backend>>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Finds a backend by name.
    pub fn get(&self, name: &str) -> Option<Arc<Backend>> {
        self.all().iter().find(|b| b.name == name).cloned()
    }

    /// Replaces the backend list, keeping runtime state of backends whose name and address
    /// are unchanged. Returns (added, removed) names.
    pub fn replace(&self, cfg: &Config) -> Result<(Vec<String>, Vec<String>), String> {
        let old = self.all();
        let mut next = Vec::new();
        let mut added = Vec::new();
        for b in &cfg.backends {
            let keep = old.iter().find(|o| {
                o.name == b.name()
                    && o.address == b.address.value
                    && o.weight == b.weight
                    && o.max_sessions == b.max_sessions
                    && o.token.as_deref() == Config::backend_token(b).ok().flatten().as_deref()
            });
            match keep {
                Some(o) => {
                    // The file's drain flag applies when it changes, so a reload does not undo
                    // a drain an operator started through the admin API.
                    if o.config_drain.swap(b.drain, Ordering::AcqRel) != b.drain {
                        o.set_draining(b.drain);
                    }
                    next.push(o.clone())
                }
                None => {
                    let nb = Backend::from_config(b)?;
                    if let Some(o) = old.iter().find(|o| o.name == b.name()) {
                        // Same name, new settings: carry the counters so accounting stays right.
                        nb.live_sessions
                            .store(o.live_sessions.load(Ordering::Relaxed), Ordering::Relaxed);
                        nb.set_draining(o.draining());
                        o.fence();
                    } else {
                        added.push(nb.name.clone());
                    }
                    next.push(Arc::new(nb));
                }
            }
        }
        let removed: Vec<String> = old
            .iter()
            .filter(|o| !cfg.backends.iter().any(|b| b.name() == o.name))
            .map(|o| {
                // Its links close, so the CLI releases its sessions before they move.
                o.fence();
                o.name.clone()
            })
            .collect();
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        Ok((added, removed))
    }
}

/// Sends one request on a connection of the proxy's own and waits for the reply with that id,
/// skipping anything else the backend sends meanwhile.
pub async fn request(
    reader: &mut crate::codec::FrameReader<crate::tls::BoxRead>,
    w: &mut crate::tls::BoxWrite,
    id: u64,
    method: &str,
    params: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    use tokio::io::AsyncWriteExt;
    let frame = crate::codec::encode_frame(&crate::rpc::request(id, method, params));
    w.write_all(&frame)
        .await
        .map_err(|e| format!("write: {e}"))?;
    // A TLS stream may hold the records until flushed.
    w.flush().await.map_err(|e| format!("write: {e}"))?;
    loop {
        let f = reader
            .read_frame()
            .await
            .map_err(|e| format!("read: {e}"))?
            .ok_or("backend closed the connection")?;
        let Ok(env) = crate::envelope::parse(&f) else {
            continue;
        };
        if env.kind == crate::envelope::Kind::Response && env.id_u64() == Some(id) {
            return serde_json::from_slice(&f).map_err(|e| e.to_string());
        }
    }
}

impl Backend {
    /// The proxy's own `connect` on a fresh connection, with this backend's token (never a
    /// client's). It must complete before anything else: a CLI with a token answers earlier
    /// requests with AUTHENTICATION_REQUIRED, and it serves requests concurrently.
    pub async fn handshake(
        &self,
        reader: &mut crate::codec::FrameReader<crate::tls::BoxRead>,
        w: &mut crate::tls::BoxWrite,
        telemetry: bool,
    ) -> Result<(), String> {
        use serde_json::Value;
        let mut params = serde_json::Map::new();
        if let Some(t) = self.token() {
            params.insert("token".into(), Value::String(t.to_string()));
        }
        if telemetry {
            params.insert("enableGitHubTelemetryForwarding".into(), Value::Bool(true));
        }
        let v = request(reader, w, 0, "connect", &Value::Object(params)).await?;
        if let Some(err) = v.get("error") {
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
            if code == crate::rpc::METHOD_NOT_FOUND {
                // A legacy CLI without `connect`: accepted, as the SDKs do.
                return Ok(());
            }
            let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
            return Err(format!("backend refused the proxy's connect: {code} {msg}"));
        }
        if let Some(ver) = v.pointer("/result/version").and_then(Value::as_str) {
            *self.version.lock().unwrap_or_else(|e| e.into_inner()) = Some(ver.to_string());
        }
        Ok(())
    }

    /// Dials this backend (TLS if configured) and performs the proxy's `connect`.
    pub async fn open(
        &self,
    ) -> Result<
        (
            crate::codec::FrameReader<crate::tls::BoxRead>,
            crate::tls::BoxWrite,
        ),
        String,
    > {
        let (r, mut w) = crate::tls::dial(&self.address, self.tls.as_deref(), None)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut reader = crate::codec::FrameReader::new(r, Default::default());
        self.handshake(&mut reader, &mut w, false).await?;
        Ok((reader, w))
    }
}
