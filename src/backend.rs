//! The backend pool: each CLI server's address, token, health state and live-session count.

use crate::balance::{self, Candidate};
use crate::config::{BackendConfig, Config};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
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
    /// Rise/fall counters and recent checks, changed only through [`Backend::observe`].
    checks: Mutex<Checks>,
    drained: AtomicBool,
    /// Sessions with at least one client joined.
    live_sessions: AtomicU64,
    /// Open upstream links.
    links: AtomicU64,
    /// CLI version reported by its `connect` reply.
    version: Mutex<Option<String>>,
    fence: Mutex<CancellationToken>,
    /// Wakes the prober early (after a passive failure).
    probe_now: Notify,
    /// Signalled on every health transition (requests waiting for a verdict listen).
    state_changed: Notify,
    /// Whether "drained, no live sessions" was already logged.
    drained_logged: AtomicBool,
    /// The drain flag of the config file last applied.
    config_drain: AtomicBool,
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

/// How many checks a backend remembers for the admin API.
const HISTORY: usize = 20;

#[derive(Debug, Default)]
struct Checks {
    streak: Streak,
    history: VecDeque<Check>,
}

/// Consecutive results of one kind: the whole input of the rise/fall rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Streak {
    /// Consecutive successful checks.
    pub(crate) oks: u32,
    /// Consecutive failed checks (active or passive).
    pub(crate) fails: u32,
}

/// The rise/fall rule as a pure function: the streak after one observation, and the new
/// verdict if it changes (`Some(true)`: up, `Some(false)`: down). A single failed check never
/// takes a backend down unless `fall` is 1, and a single success never brings it back unless
/// `rise` is 1.
pub(crate) fn observe_health(
    healthy: bool,
    streak: Streak,
    ok: bool,
    rise: u32,
    fall: u32,
) -> (Streak, Option<bool>) {
    if ok {
        let s = Streak {
            oks: streak.oks.saturating_add(1),
            fails: 0,
        };
        (s, (!healthy && s.oks >= rise).then_some(true))
    } else {
        let s = Streak {
            oks: 0,
            fails: streak.fails.saturating_add(1),
        };
        (s, (healthy && s.fails >= fall).then_some(false))
    }
}

/// What the admin API and tests see of a backend: a snapshot, never the live fields.
#[derive(Debug, Clone)]
pub struct BackendStatus {
    /// Name.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Effective state.
    pub state: State,
    /// Health checks call it reachable.
    pub healthy: bool,
    /// Marked draining.
    pub draining: bool,
    /// Weight.
    pub weight: f64,
    /// Cap on live sessions.
    pub max_sessions: Option<u64>,
    /// Sessions with at least one client joined.
    pub live_sessions: u64,
    /// Upstream links open.
    pub links: u64,
    /// CLI version from its last `connect` reply.
    pub version: Option<String>,
    /// Consecutive failed checks.
    pub consecutive_failures: u32,
    /// Consecutive successful checks.
    pub consecutive_successes: u32,
    /// Recent checks, newest first.
    pub history: Vec<Check>,
}

/// A backend that could not be built from its config.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The token source (env or file) could not be read.
    #[error("{0}")]
    Token(String),
    /// The backend's TLS material could not be loaded.
    #[error("backend {backend:?}: {source}")]
    Tls {
        /// Backend name.
        backend: String,
        /// Cause.
        source: crate::tls::TlsError,
    },
}

impl Backend {
    /// Builds a backend from config; fails if its token source is unreadable.
    pub fn from_config(b: &BackendConfig) -> Result<Backend, BackendError> {
        let cfg_drain = b.drain;
        Ok(Backend {
            name: b.name().to_string(),
            address: b.address.value.clone(),
            weight: b.weight,
            max_sessions: b.max_sessions,
            token: Config::backend_token(b).map_err(BackendError::Token)?,
            tls: match &b.tls {
                Some(t) => Some(Arc::new(crate::tls::ClientTlsStore::load(t).map_err(
                    |source| BackendError::Tls {
                        backend: b.name().to_string(),
                        source,
                    },
                )?)),
                None => None,
            },
            health: AtomicU8::new(State::Up as u8),
            checks: Mutex::new(Checks::default()),
            drained: Default::default(),
            live_sessions: AtomicU64::new(0),
            links: AtomicU64::new(0),
            version: Mutex::new(None),
            fence: Mutex::new(CancellationToken::new()),
            probe_now: Notify::new(),
            state_changed: Notify::new(),
            drained_logged: AtomicBool::new(false),
            config_drain: AtomicBool::new(b.drain),
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

    fn checks(&self) -> std::sync::MutexGuard<'_, Checks> {
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the latest health observation was a success.
    pub fn confirmed(&self) -> bool {
        self.checks().history.back().is_some_and(|c| c.ok)
    }

    /// Whether its last check failed (it may be dying, or dead and not yet marked down).
    pub fn failing(&self) -> bool {
        self.checks().streak.fails > 0
    }

    /// Consecutive failed checks.
    pub fn consecutive_failures(&self) -> u32 {
        self.checks().streak.fails
    }

    /// Whether health checks consider it reachable.
    pub fn healthy(&self) -> bool {
        State::from_u8(self.health.load(Ordering::Acquire)) != State::Down
    }

    /// Records one health observation and applies rise/fall ([`observe_health`]). Returns the
    /// new verdict when it changed; logging and metrics are the caller's (health's observers).
    pub fn observe(&self, ok: bool, detail: &str, rise: u32, fall: u32) -> Option<bool> {
        let change = {
            let mut c = self.checks();
            c.history.push_back(Check {
                at: SystemTime::now(),
                ok,
                detail: detail.to_string(),
            });
            while c.history.len() > HISTORY {
                c.history.pop_front();
            }
            let (streak, change) = observe_health(self.healthy(), c.streak, ok, rise, fall);
            c.streak = streak;
            change
        };
        if let Some(up) = change {
            // Fencing (on down) closes every link, so the CLI releases its sessions if it lives.
            self.set_healthy(up);
        }
        change
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

    /// Waits for the next health transition, at most `limit`.
    pub async fn state_change(&self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, self.state_changed.notified()).await;
    }

    /// Asks the prober for one early probe (it ignores this unless the backend is healthy).
    pub fn probe_soon(&self) {
        self.probe_now.notify_one();
    }

    /// Resolves when [`Backend::probe_soon`] was called.
    pub async fn probe_requested(&self) {
        self.probe_now.notified().await
    }

    /// Marks or clears draining.
    pub fn set_draining(&self, on: bool) {
        self.drained.store(on, Ordering::Release);
        self.drained_logged.store(false, Ordering::Release);
        self.log_if_drained();
    }

    /// Whether it is marked draining.
    pub fn draining(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    /// Live sessions now.
    pub fn live_sessions(&self) -> u64 {
        self.live_sessions.load(Ordering::Relaxed)
    }

    /// A session became live here.
    pub fn session_started(&self) {
        self.live_sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// A session stopped being live here.
    pub fn session_ended(&self) {
        let _ = self
            .live_sessions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        self.log_if_drained();
    }

    fn log_if_drained(&self) {
        if self.draining()
            && self.live_sessions() == 0
            && !self.drained_logged.swap(true, Ordering::Relaxed)
        {
            tracing::info!(backend = %self.name, "backend drained: no live sessions left");
        }
    }

    /// An upstream link to it opened.
    pub fn link_opened(&self) {
        self.links.fetch_add(1, Ordering::Relaxed);
    }

    /// An upstream link to it closed.
    pub fn link_closed(&self) {
        let _ = self
            .links
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// The CLI version it last reported.
    pub fn version(&self) -> Option<String> {
        self.version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A snapshot for the admin API.
    pub fn status(&self) -> BackendStatus {
        let (streak, history) = {
            let c = self.checks();
            (c.streak, c.history.iter().rev().cloned().collect())
        };
        BackendStatus {
            name: self.name.clone(),
            address: self.address.clone(),
            state: self.state(),
            healthy: self.healthy(),
            draining: self.draining(),
            weight: self.weight,
            max_sessions: self.max_sessions,
            live_sessions: self.live_sessions(),
            links: self.links.load(Ordering::Relaxed),
            version: self.version(),
            consecutive_failures: streak.fails,
            consecutive_successes: streak.oks,
            history,
        }
    }

    /// The gauges `/metrics` exports for it.
    pub fn gauges(&self) -> crate::metrics::BackendGauges {
        crate::metrics::BackendGauges {
            backend: self.name.clone(),
            sessions: self.live_sessions(),
            state: self.state() as i64,
            links: self.links.load(Ordering::Relaxed),
        }
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
    pub fn new(cfg: &Config) -> Result<Pool, BackendError> {
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

    /// Every backend in `key`'s rendezvous order (weighted HRW): a session's ranking.
    pub fn ranked(&self, key: &str) -> Vec<Arc<Backend>> {
        let all = self.all();
        balance::rank(key, all.iter().map(|b| (b.name.as_str(), b.weight)))
            .into_iter()
            .map(|i| all[i].clone())
            .collect()
    }

    /// The first backend in `key`'s ranking that serves: up preferred, then draining.
    pub fn first_serving(&self, key: &str) -> Option<Arc<Backend>> {
        let ranked = self.ranked(key);
        let up = ranked.iter().find(|b| b.state() == State::Up);
        up.or_else(|| ranked.iter().find(|b| b.state() != State::Down))
            .cloned()
    }

    /// Chooses a backend for a new session: bounded-load HRW over the up backends `allowed`
    /// and not in `exclude`.
    pub fn place(
        &self,
        sid: &str,
        allowed: impl Fn(&str) -> bool,
        exclude: &[String],
        bounded_load: f64,
    ) -> Option<Arc<Backend>> {
        let all = self.all();
        let cands: Vec<Candidate> = all
            .iter()
            .map(|b| Candidate {
                name: &b.name,
                weight: b.weight,
                eligible: b.state() == State::Up && allowed(&b.name) && !exclude.contains(&b.name),
                live: b.live_sessions(),
                max_sessions: b.max_sessions,
            })
            .collect();
        balance::place(sid, &cands, bounded_load)
            .ok()
            .map(|i| all[i].clone())
    }

    /// Replaces the backend list, keeping runtime state of backends whose name and address
    /// are unchanged. Returns (added, removed) names.
    pub fn replace(&self, cfg: &Config) -> Result<(Vec<String>, Vec<String>), BackendError> {
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
                        nb.live_sessions.store(o.live_sessions(), Ordering::Relaxed);
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
        let (r, mut w) = crate::tls::dial(&self.address, self.tls.as_deref())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut reader = crate::codec::FrameReader::new(r, Default::default());
        self.handshake(&mut reader, &mut w, false).await?;
        Ok((reader, w))
    }
}
