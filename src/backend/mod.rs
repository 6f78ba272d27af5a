//! A backend: one CLI server's address, token, health state (the rise/fall rule as a pure
//! function, [`observe_health`]) and live-session count; the pool of them; talking to one.

mod call;
mod pool;

pub use call::{request, CallError, FailureKind};
pub use pool::Pool;

use crate::config::{BackendConfig, Config};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
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
    /// A copilot-lb edge rather than a CLI (`backends[].edge`).
    pub edge: bool,
    /// The CLI's connection token, held by the proxy only. Swapped when a managed CLI is
    /// restarted with a fresh one (links opened from then on use it).
    token: arc_swap::ArcSwapOption<String>,
    /// Whether a managed pool supervises this CLI (its token and process are the pool's).
    pub managed: bool,
    /// TLS towards this backend, if configured.
    pub tls: Option<Arc<crate::tls::ClientTlsStore>>,
    health: AtomicU8,
    /// Rise/fall counters and recent checks, changed only through [`Backend::observe`].
    checks: Mutex<Checks>,
    drained: AtomicBool,
    /// Sessions with at least one client joined.
    live_sessions: AtomicU64,
    /// Live sessions held on it through other replicas, as of the last registry sync.
    elsewhere: AtomicU64,
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
    /// Requests written to it and unanswered, plus turns running on it: what a rolling
    /// restart waits to reach zero before it stops the CLI.
    busy: AtomicU64,
    /// Set while a rolling restart empties it: requests for its sessions wait (bounded) and
    /// then fail over, instead of starting work that the stop would cut.
    quiescing: AtomicBool,
    /// Signalled when `quiescing` is cleared.
    quiesce_done: Notify,
    /// The managed CLI's process, for the admin API.
    process: Mutex<ProcessInfo>,
}

/// A managed CLI's process as the admin API shows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessInfo {
    /// Its guardian's process id (0 while not running).
    pub pid: u32,
    /// Starts after the first.
    pub restarts: u64,
}

/// Work in progress on a backend (a request awaiting its reply, or a turn): counted in
/// [`Backend::busy`] while this lives.
#[derive(Debug)]
pub struct Busy(Arc<Backend>);

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self
            .0
            .busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
    }
}

/// One health observation.
#[derive(Debug, Clone)]
pub struct Check {
    /// When.
    pub at: SystemTime,
    /// Passed?
    pub ok: bool,
    /// How long a successful active probe took (none for failures and passive signals).
    pub latency: Option<std::time::Duration>,
    /// Probe latency or failure reason (error text: addresses and codes, never a token).
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
    /// Sessions with at least one client of this replica joined.
    pub live_sessions: u64,
    /// Live sessions on it across the fleet (this replica's plus the others' as of the last
    /// registry sync; equal to `live_sessions` without a shared registry).
    pub fleet_sessions: u64,
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
    Token(#[from] crate::config::TokenError),
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
            edge: b.edge,
            token: arc_swap::ArcSwapOption::from(
                Config::backend_token(b)
                    .map_err(BackendError::Token)?
                    .map(Arc::new),
            ),
            managed: b.managed,
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
            elsewhere: AtomicU64::new(0),
            links: AtomicU64::new(0),
            version: Mutex::new(None),
            fence: Mutex::new(CancellationToken::new()),
            probe_now: Notify::new(),
            state_changed: Notify::new(),
            drained_logged: AtomicBool::new(false),
            config_drain: AtomicBool::new(b.drain),
            busy: AtomicU64::new(0),
            quiescing: AtomicBool::new(false),
            quiesce_done: Notify::new(),
            process: Mutex::new(ProcessInfo::default()),
        })
        .inspect(|b| b.set_draining(cfg_drain))
    }

    /// The connection token for this CLI, if it requires one.
    pub fn token(&self) -> Option<Arc<String>> {
        self.token.load_full()
    }

    /// Replaces the connection token (a managed CLI restarted with a fresh one).
    pub fn set_token(&self, token: Option<String>) {
        self.token.store(token.map(Arc::new));
    }

    /// The managed CLI's process (all zero for other backends).
    pub fn process(&self) -> ProcessInfo {
        *self.process.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the managed CLI's process.
    pub fn set_process(&self, p: ProcessInfo) {
        *self.process.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Counts a request or turn on it until the returned guard is dropped.
    pub fn begin_work(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// Requests in flight and turns running on it.
    pub fn busy(&self) -> u64 {
        self.busy.load(Ordering::Acquire)
    }

    /// Whether a rolling restart is emptying it (its sessions' requests wait, then move).
    pub fn quiescing(&self) -> bool {
        self.quiescing.load(Ordering::Acquire)
    }

    /// Starts or ends quiescing; ending it wakes every request waiting on it.
    pub fn set_quiescing(&self, on: bool) {
        self.quiescing.store(on, Ordering::Release);
        if !on {
            self.quiesce_done.notify_waiters();
        }
    }

    /// Waits until quiescing ends, at most `limit`.
    pub async fn quiesced(&self, limit: std::time::Duration) {
        let wait = self.quiesce_done.notified();
        tokio::pin!(wait);
        // Registered before the check, so a clear in between is not missed.
        wait.as_mut().enable();
        if !self.quiescing() {
            return;
        }
        let _ = tokio::time::timeout(limit, wait).await;
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

    /// Records one health observation (`latency` of a successful probe) and applies rise/fall
    /// ([`observe_health`]). Returns the new verdict when it changed; logging and metrics are
    /// the caller's (health's observers).
    pub fn observe(
        &self,
        ok: bool,
        latency: Option<std::time::Duration>,
        detail: &str,
        rise: u32,
        fall: u32,
    ) -> Option<bool> {
        let change = {
            let mut c = self.checks();
            c.history.push_back(Check {
                at: SystemTime::now(),
                ok,
                latency,
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

    /// The backend (a copilot-lb edge) announced that it is going away: down at once, so its
    /// sessions move and nothing new goes there, but its links are not fenced: they still
    /// carry the replies to what was sent before, and the edge closes them once idle. Health
    /// checks bring it back up when a new process answers. True if it was not down already.
    pub fn leaving(&self) -> bool {
        // Successes counted before it said so must not bring it back: only a new process
        // answering `rise` probes in a row does.
        self.checks().streak = Streak::default();
        let old = self.health.swap(State::Down as u8, Ordering::AcqRel);
        if old != State::Down as u8 {
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

    /// Live sessions on it across the fleet: what caps and bounded load count. Other
    /// replicas' share is as of the last registry sync (`state.sync_interval` of slack).
    pub fn fleet_sessions(&self) -> u64 {
        self.live_sessions() + self.elsewhere.load(Ordering::Relaxed)
    }

    /// Records how many live sessions other replicas hold on it.
    pub fn set_elsewhere(&self, n: u64) {
        self.elsewhere.store(n, Ordering::Relaxed);
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

    fn set_version(&self, v: &str) {
        *self.version.lock().unwrap_or_else(|e| e.into_inner()) = Some(v.to_string());
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
            fleet_sessions: self.fleet_sessions(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a sequence of results through the rule; returns the verdict after each.
    fn run(healthy: bool, rise: u32, fall: u32, seq: &[bool]) -> Vec<bool> {
        let (mut up, mut streak) = (healthy, Streak::default());
        seq.iter()
            .map(|&ok| {
                let (s, change) = observe_health(up, streak, ok, rise, fall);
                streak = s;
                if let Some(v) = change {
                    up = v;
                }
                up
            })
            .collect()
    }

    #[test]
    fn one_failure_never_takes_a_backend_down() {
        assert_eq!(
            run(true, 2, 3, &[false, false, true, false, false, false]),
            [true, true, true, true, true, false]
        );
        // fall 1: the first failure is the verdict.
        assert_eq!(run(true, 2, 1, &[false]), [false]);
    }

    #[test]
    fn a_down_backend_needs_rise_successes_in_a_row() {
        assert_eq!(
            run(false, 2, 3, &[true, false, true, true, true]),
            [false, false, false, true, true]
        );
    }

    #[test]
    fn a_verdict_is_reported_once_and_counters_saturate() {
        let s = Streak {
            oks: 0,
            fails: u32::MAX,
        };
        assert_eq!(observe_health(true, s, false, 2, 3).1, Some(false));
        assert_eq!(observe_health(false, s, false, 2, 3), (s, None));
        let up = Streak { oks: 5, fails: 0 };
        assert_eq!(observe_health(true, up, true, 2, 3).1, None);
    }
}
