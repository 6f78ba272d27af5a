//! The managed pool (`managed:`): copilot-lb starts N local `copilot --headless` servers
//! itself, supervises them (restart with capped back-off), restarts them one at a time on
//! request (a rolling restart that moves their sessions first) and stops them with itself.
//!
//! Each CLI listens on a loopback port chosen here, requires a fresh random connection token
//! per start that only the proxy holds, and shares one `session-state` directory with the
//! others so a failover resumes its sessions. Each runs under a guardian process
//! (`guard.rs`) so that nothing outlives the proxy, even on SIGKILL. The decisions (back-off,
//! restart order) are pure functions in `plan.rs`.

pub mod guard;
mod plan;
mod spawn;

use crate::backend::Backend;
use crate::config::{BackendConfig, ManagedConfig};
use crate::context::Shared;
use plan::RestartView;
use rand::Rng;
use spawn::{Launch, Spawner};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Why the pool could not be prepared or started.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The CLI executable was not found.
    #[error("managed.command {command:?} was not found{where_}; install the Copilot CLI (`npm install -g @github/copilot@1.0.102`, or run scripts/up.sh, which installs it locally) or set managed.command to its path")]
    CommandNotFound {
        /// The command as configured.
        command: String,
        /// Where it was looked for.
        where_: String,
    },
    /// A directory of the pool could not be made.
    #[error("managed.home {}: {source}", path.display())]
    Home {
        /// The directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Another copilot-lb runs this pool.
    #[error("managed.home {} is in use by another copilot-lb (its lock file {} is held); give each proxy its own managed.home", home.display(), lock.display())]
    Locked {
        /// The pool's directory.
        home: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// No loopback port could be reserved.
    #[error("cannot choose a loopback port for {name}: {source}")]
    Port {
        /// Backend name.
        name: String,
        /// Cause.
        source: std::io::Error,
    },
    /// This process's own executable (the guardian) could not be found.
    #[error("cannot find copilot-lb's own executable to run the guardian: {0}")]
    SelfExe(std::io::Error),
    /// The spawner thread could not start.
    #[error("cannot start the spawner thread: {0}")]
    Thread(std::io::Error),
}

/// Why a rolling restart did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// Another one is running.
    #[error("a rolling restart is already in progress")]
    InProgress,
    /// The proxy is stopping.
    #[error("copilot-lb is shutting down")]
    ShuttingDown,
    /// A CLI could not be taken down without its sessions failing.
    #[error("{name} was not restarted: no other CLI of the pool is up to take its sessions (a pool of one cannot restart without downtime)")]
    NoSpare {
        /// The CLI.
        name: String,
    },
    /// A CLI did not come back healthy.
    #[error("{name} did not become healthy after its restart: {why}; the rolling restart stopped there (the CLIs after it were not restarted)")]
    NotHealthy {
        /// The CLI.
        name: String,
        /// What happened.
        why: StartError,
    },
}

/// Why a start of a CLI (its first, or one a rolling restart asked for) did not end with the
/// CLI answering probes.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The guardian could not be forked.
    #[error("could not be started: {0}")]
    Spawn(std::io::Error),
    /// No probe succeeded within `managed.start_timeout`.
    #[error("not answering after {limit:?} ({})", last.as_ref().map_or_else(|| "no probe answered".to_string(), ToString::to_string))]
    NotReady {
        /// The bound waited.
        limit: Duration,
        /// The last probe's failure; none when no probe finished.
        last: Option<crate::backend::CallError>,
    },
    /// The process ended first.
    #[error("exited ({0}) before it was ready")]
    Exited(String),
    /// A newer restart request took this one's place.
    #[error("superseded by another restart")]
    Superseded,
    /// The pool is stopping.
    #[error("copilot-lb is shutting down")]
    ShuttingDown,
    /// The CLI's supervisor task is gone.
    #[error("its supervisor stopped")]
    SupervisorGone,
}

/// What a rolling restart did, per CLI in the order it went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Restarted {
    /// Backend name.
    pub name: String,
    /// Sessions that were live on it when it was drained.
    pub sessions_moved: u64,
    /// Milliseconds from drain to healthy again.
    pub took_ms: u64,
    /// Whether its work had to be cut at `drain_timeout`.
    pub drain_timed_out: bool,
}

enum Ctl {
    /// Stop the CLI and start it again (new token); answer once it is healthy.
    Restart(oneshot::Sender<Result<(), StartError>>),
}

struct Child {
    name: String,
    port: u16,
    home: PathBuf,
    ctl: mpsc::Sender<Ctl>,
}

/// A prepared pool: ports chosen, directories made, the backends to add to the config.
pub(crate) struct Prepared {
    cfg: ManagedConfig,
    command: PathBuf,
    guard_exe: PathBuf,
    home: PathBuf,
    lock: std::fs::File,
    children: Vec<(String, u16, PathBuf)>,
    /// The pool's backends, for [`Config::with_managed`] (at start and on every reload).
    pub(crate) backends: Vec<BackendConfig>,
}

/// The running pool.
pub struct Supervisor {
    shared: Arc<Shared>,
    cfg: ManagedConfig,
    children: Vec<Arc<Child>>,
    rolling: tokio::sync::Mutex<()>,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    _lock: std::fs::File,
    _spawner: Arc<Spawner>,
}

/// Finds `command` the way a shell would: a path as is, a bare name on `PATH`.
fn resolve(command: &str, path: Option<OsString>) -> Option<PathBuf> {
    if command.contains('/') {
        let p = PathBuf::from(command);
        return p.is_file().then_some(p);
    }
    let path = path?;
    std::env::split_paths(&path)
        .map(|d| d.join(command))
        .find(|p| p.is_file())
}

fn fresh_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

fn free_port(name: &str) -> Result<u16, PoolError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| PoolError::Port {
        name: name.into(),
        source,
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|source| PoolError::Port {
            name: name.into(),
            source,
        })
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Chooses ports, makes the directories (one `COPILOT_HOME` per CLI whose `session-state`
/// is a link to the pool's shared one) and takes the pool's lock. Nothing runs yet.
pub(crate) fn prepare(cfg: &ManagedConfig) -> Result<Prepared, PoolError> {
    let command = resolve(&cfg.command.value, std::env::var_os("PATH")).ok_or_else(|| {
        PoolError::CommandNotFound {
            command: cfg.command.value.clone(),
            where_: if cfg.command.value.contains('/') {
                String::new()
            } else {
                " on PATH".into()
            },
        }
    })?;
    // The guardian is this very binary (`copilot-lb managed-child`): a program that embeds
    // the library and starts a pool in-process would have to provide that subcommand too.
    let guard_exe = std::env::current_exe().map_err(PoolError::SelfExe)?;
    let home = absolute(&cfg.home);
    let mk = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| PoolError::Home {
            path: p.to_path_buf(),
            source,
        })
    };
    let shared_state = home.join("session-state");
    mk(&shared_state)?;
    let lock_path = home.join("copilot-lb.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| PoolError::Home {
            path: lock_path.clone(),
            source,
        })?;
    // flock: released by the kernel when this process dies, however it dies.
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(PoolError::Locked {
            home,
            lock: lock_path,
        });
    }
    let mut children = Vec::new();
    let mut backends = Vec::new();
    for name in cfg.names() {
        let chome = home.join(&name);
        mk(&chome)?;
        let link = chome.join("session-state");
        match std::fs::symlink_metadata(&link) {
            Ok(m) if m.file_type().is_symlink() => {
                let _ = std::fs::remove_file(&link);
            }
            Ok(_) => {
                return Err(PoolError::Home {
                    path: link,
                    source: std::io::Error::other(
                        "exists and is not a link to the pool's shared session-state",
                    ),
                })
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&shared_state, &link).map_err(|source| PoolError::Home {
            path: link.clone(),
            source,
        })?;
        let port = free_port(&name)?;
        backends.push(BackendConfig {
            name: Some(crate::config::spanned(name.clone())),
            address: crate::config::spanned(format!("127.0.0.1:{port}")),
            weight: 1.0,
            max_sessions: cfg.max_sessions,
            token_env: None,
            token_file: None,
            drain: false,
            tls: None,
            max_concurrent_turns: cfg.max_concurrent_turns,
            edge: false,
            managed: true,
        });
        children.push((name, port, chome));
    }
    Ok(Prepared {
        cfg: cfg.clone(),
        command,
        guard_exe,
        home,
        lock,
        children,
        backends,
    })
}

impl Prepared {
    /// Starts every CLI (in the background; each becomes up once it answers a probe). The
    /// backends are marked down first so nothing is routed to a CLI that is not listening yet.
    pub(crate) fn start(self, shared: &Arc<Shared>) -> Result<Arc<Supervisor>, PoolError> {
        let spawner =
            Arc::new(Spawner::start(tokio::runtime::Handle::current()).map_err(PoolError::Thread)?);
        let missing: Vec<&str> = self
            .cfg
            .env_pass
            .iter()
            .filter(|v| std::env::var_os(v).is_none())
            .map(String::as_str)
            .collect();
        credentials_notice(&self.cfg, &missing);
        let stop = shared.shutdown.child_token();
        let mut children = Vec::new();
        let mut receivers = Vec::new();
        for (name, port, home) in &self.children {
            let (tx, rx) = mpsc::channel(4);
            children.push(Arc::new(Child {
                name: name.clone(),
                port: *port,
                home: home.clone(),
                ctl: tx,
            }));
            receivers.push(rx);
        }
        let sup = Arc::new(Supervisor {
            shared: shared.clone(),
            cfg: self.cfg.clone(),
            children,
            rolling: tokio::sync::Mutex::new(()),
            stop,
            tasks: Mutex::new(Vec::new()),
            _lock: self.lock,
            _spawner: spawner.clone(),
        });
        let base = Arc::new(Base {
            command: self.command,
            guard_exe: self.guard_exe,
            marker: self.home.display().to_string(),
        });
        info!(count = sup.children.len(), command = %base.command.display(), home = %self.home.display(), "managed pool starting");
        // The pool's first starts go one at a time: a CLI's first start on a machine unpacks
        // its runtime (~235 MB) into a cache every CLI shares, which they must not race on.
        let first_start = Arc::new(tokio::sync::Semaphore::new(1));
        for (child, rx) in sup.children.iter().zip(receivers) {
            let Some(b) = shared.pool.get(&child.name) else {
                continue;
            };
            mark_down(shared, &b, "managed CLI starting");
            let task = tokio::spawn(supervise(
                sup.clone(),
                child.clone(),
                b,
                base.clone(),
                spawner.clone(),
                rx,
                first_start.clone(),
            ));
            sup.tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task);
        }
        Ok(sup)
    }
}

/// Says, first thing, what the CLIs need for model access when none of it is set.
fn credentials_notice(cfg: &ManagedConfig, missing: &[&str]) {
    let named_token = cfg
        .env_pass
        .iter()
        .any(|v| v == "COPILOT_GITHUB_TOKEN" || v == "GH_TOKEN" || v == "GITHUB_TOKEN");
    let any_set = cfg.env_pass.len() > missing.len();
    if !any_set {
        warn!(
            "managed pool: no model credentials are set for the CLIs{}. Either export COPILOT_GITHUB_TOKEN=<a GitHub token with Copilot access> (and list it in managed.env_pass) before starting copilot-lb, or bring your own key from the SDK: create sessions with provider={{\"type\": \"openai\", \"base_url\": ..., \"api_key\": ...}}. Until then the CLIs start, but a turn without a provider fails with an authentication error",
            if named_token { "" } else { " (managed.env_pass names no COPILOT_GITHUB_TOKEN)" }
        );
    } else if !missing.is_empty() {
        info!(unset = ?missing, "managed pool: some managed.env_pass variables are not set (they are not passed)");
    }
}

/// What every start of every CLI shares.
struct Base {
    command: PathBuf,
    guard_exe: PathBuf,
    marker: String,
}

/// Marks `b` down through the health observer (logged and counted like a probe's verdict):
/// its links are fenced, so its sessions fail over on their next request.
fn mark_down(shared: &Shared, b: &Arc<Backend>, why: &str) {
    let fall = shared.config().health.fall.max(1);
    for _ in 0..=fall {
        if !b.healthy() {
            break;
        }
        crate::health::record(shared, b, false, None, why);
    }
}

/// Marks `b` up the same way, after a probe of ours answered.
fn mark_up(shared: &Shared, b: &Arc<Backend>, why: &str) {
    let rise = shared.config().health.rise.max(1);
    for _ in 0..=rise {
        if b.healthy() && b.confirmed() {
            break;
        }
        crate::health::record(shared, b, true, None, why);
    }
}

/// Probes until the CLI answers (connect with its token, ping), at most `limit`.
async fn until_ready(b: &Backend, limit: Duration) -> Result<Duration, StartError> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < limit {
        match crate::health::probe(b, Duration::from_secs(1)).await {
            Ok(_) => return Ok(started.elapsed()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(StartError::NotReady { limit, last })
}

/// Copies one output stream of a CLI into the proxy's log, line by line, with its name.
async fn pipe_log<R: AsyncRead + Unpin>(name: String, stream: &'static str, r: R) {
    let mut lines = BufReader::new(r).lines();
    // Ends at EOF: when the CLI (and its guardian) exit.
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim_end();
        if !line.is_empty() {
            info!(backend = %name, stream, "{line}");
        }
    }
}

/// Stops a guardian: SIGTERM (it passes it to the CLI's group and SIGKILLs it after the
/// grace), then SIGKILL of the guardian itself if it does not exit in time.
async fn stop_child(proc: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = proc
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).ok()?))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(grace + Duration::from_secs(2), proc.wait())
        .await
        .is_err()
    {
        let _ = proc.kill().await;
    }
}

/// One CLI's life: start it with a fresh token, watch it, restart it with back-off when it
/// exits, restart it on request, stop it with the pool.
async fn supervise(
    sup: Arc<Supervisor>,
    child: Arc<Child>,
    b: Arc<Backend>,
    base: Arc<Base>,
    spawner: Arc<Spawner>,
    mut ctl: mpsc::Receiver<Ctl>,
    first_start: Arc<tokio::sync::Semaphore>,
) {
    // Held until this CLI's first start is ready or failed (bounded by start_timeout).
    let mut first_turn = tokio::select! {
        p = first_start.acquire_owned() => p.ok(),
        _ = sup.stop.cancelled() => None,
    };
    let cfg = &sup.cfg;
    let grace = cfg.stop_timeout.0;
    let mut failures: u32 = 0;
    let mut starts: u64 = 0;
    let mut waiting: Option<oneshot::Sender<Result<(), StartError>>> = None;
    loop {
        if sup.stop.is_cancelled() {
            break;
        }
        let token = fresh_token();
        b.set_token(Some(token.clone()));
        let launch = Launch {
            guard_exe: base.guard_exe.clone(),
            argv: spawn::cli_argv(&base.command, &cfg.args, child.port, &child.home),
            env: spawn::cli_env(
                |k: &str| std::env::var_os(k),
                &cfg.env_pass,
                &child.home,
                &token,
                &base.marker,
            ),
            cwd: child.home.clone(),
            grace,
        };
        drop(token);
        let started = Instant::now();
        let mut proc = match spawner.spawn(launch).await {
            Ok(s) => s.child,
            Err(e) => {
                drop(first_turn.take());
                error!(backend = %child.name, error = %e, "managed CLI could not be started");
                if let Some(w) = waiting.take() {
                    let _ = w.send(Err(StartError::Spawn(e)));
                }
                let (f, delay) = plan::after_exit(
                    failures,
                    Duration::ZERO,
                    cfg.restart_backoff.0,
                    cfg.max_restart_backoff.0,
                );
                failures = f;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = sup.stop.cancelled() => break,
                }
            }
        };
        starts += 1;
        b.set_process(crate::backend::ProcessInfo {
            pid: proc.id().unwrap_or(0),
            restarts: starts - 1,
        });
        info!(backend = %child.name, pid = proc.id().unwrap_or(0), port = child.port, "managed CLI started");
        if let Some(out) = proc.stdout.take() {
            tokio::spawn(pipe_log(child.name.clone(), "stdout", out));
        }
        if let Some(err) = proc.stderr.take() {
            tokio::spawn(pipe_log(child.name.clone(), "stderr", err));
        }
        let ready = until_ready(&b, cfg.start_timeout.0);
        tokio::pin!(ready);
        let mut is_ready = false;
        // Watch this process until it exits or is stopped; `restart` says what comes next.
        let restart_now = loop {
            tokio::select! {
                r = &mut ready, if !is_ready => {
                    is_ready = true;
                    drop(first_turn.take());
                    match r {
                        Ok(took) => {
                            mark_up(&sup.shared, &b, "managed CLI answered its first probe");
                            info!(backend = %child.name, took_ms = took.as_millis() as u64, "managed CLI ready");
                            if let Some(w) = waiting.take() {
                                let _ = w.send(Ok(()));
                            }
                        }
                        Err(why) => {
                            warn!(backend = %child.name, why = %why, "managed CLI did not become ready; stopping it");
                            if let Some(w) = waiting.take() {
                                let _ = w.send(Err(why));
                            }
                            stop_child(&mut proc, grace).await;
                            break false;
                        }
                    }
                }
                st = proc.wait() => {
                    let status = st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    if sup.stop.is_cancelled() {
                        break false;
                    }
                    warn!(backend = %child.name, status = %status, uptime_ms = started.elapsed().as_millis() as u64, "managed CLI exited");
                    if let Some(w) = waiting.take() {
                        let _ = w.send(Err(StartError::Exited(status)));
                    }
                    break false;
                }
                m = ctl.recv() => match m {
                    Some(Ctl::Restart(reply)) => {
                        if let Some(w) = waiting.replace(reply) {
                            let _ = w.send(Err(StartError::Superseded));
                        }
                        break true;
                    }
                    None => {}
                },
                _ = sup.stop.cancelled() => break false,
            }
        };
        drop(first_turn.take());
        b.set_process(crate::backend::ProcessInfo {
            pid: 0,
            restarts: starts - 1,
        });
        mark_down(&sup.shared, &b, "managed CLI stopped");
        if sup.stop.is_cancelled() {
            stop_child(&mut proc, grace).await;
            break;
        }
        if restart_now {
            stop_child(&mut proc, grace).await;
            failures = 0;
            sup.shared.metrics.managed_restart(&child.name, "rolling");
            continue;
        }
        sup.shared.metrics.managed_restart(&child.name, "exited");
        // It exited (or never became ready): start it again after the back-off.
        stop_child(&mut proc, grace).await;
        let (f, delay) = plan::after_exit(
            failures,
            started.elapsed(),
            cfg.restart_backoff.0,
            cfg.max_restart_backoff.0,
        );
        failures = f;
        info!(backend = %child.name, in_ms = delay.as_millis() as u64, quick_exits = failures, "managed CLI restarts after back-off");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = sup.stop.cancelled() => break,
            m = ctl.recv() => {
                // A restart asked for during the back-off starts it now.
                if let Some(Ctl::Restart(reply)) = m {
                    waiting = Some(reply);
                }
            }
        }
    }
    if let Some(w) = waiting.take() {
        let _ = w.send(Err(StartError::ShuttingDown));
    }
    info!(backend = %child.name, "managed CLI stopped");
}

impl Supervisor {
    /// Stops every CLI (each gets `stop_timeout` to exit, then its group is killed) and
    /// waits for them.
    pub async fn stop(&self) {
        self.stop.cancel();
        let tasks: Vec<_> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let bound = self.cfg.stop_timeout.0 + Duration::from_secs(5);
        for t in tasks {
            if tokio::time::timeout(bound, t).await.is_err() {
                warn!("a managed CLI did not stop in time");
            }
        }
    }

    /// Restarts the pool's CLIs one at a time: drain (no new sessions), quiesce (its
    /// sessions' new requests wait) until its requests and turns are done, mark it down (its
    /// sessions move to the others with a resume on their next request, which the quiesce
    /// held), stop, start with a new token, wait until healthy, undrain. Stops at the first
    /// CLI that does not come back.
    pub async fn rolling_restart(&self) -> Result<Vec<Restarted>, RestartError> {
        let _one = self
            .rolling
            .try_lock()
            .map_err(|_| RestartError::InProgress)?;
        // Each CLI with its backend, in the pool's order (a reload never removes them).
        let (children, backends): (Vec<&Arc<Child>>, Vec<Arc<Backend>>) = self
            .children
            .iter()
            .filter_map(|c| Some((c, self.shared.pool.get(&c.name)?)))
            .unzip();
        let views: Vec<RestartView> = backends
            .iter()
            .map(|b| RestartView {
                healthy: b.healthy(),
                sessions: b.live_sessions(),
            })
            .collect();
        let order = plan::restart_order(&views);
        info!(order = ?order.iter().map(|&i| backends[i].name.as_str()).collect::<Vec<_>>(), "rolling restart of the managed pool");
        let mut done = Vec::new();
        for i in order {
            if self.stop.is_cancelled() {
                return Err(RestartError::ShuttingDown);
            }
            let (b, child) = (&backends[i], children[i]);
            done.push(self.restart_one(child, b, &backends, i).await?);
        }
        info!(restarted = done.len(), "rolling restart done");
        Ok(done)
    }

    async fn restart_one(
        &self,
        child: &Child,
        b: &Arc<Backend>,
        all: &[Arc<Backend>],
        i: usize,
    ) -> Result<Restarted, RestartError> {
        let begun = Instant::now();
        let views = |all: &[Arc<Backend>]| -> Vec<RestartView> {
            all.iter()
                .map(|b| RestartView {
                    healthy: b.healthy(),
                    sessions: b.live_sessions(),
                })
                .collect()
        };
        let was_healthy = b.healthy();
        if was_healthy {
            // Another CLI must be up to take the sessions; one restarting may need a moment.
            let deadline = Instant::now() + self.cfg.start_timeout.0;
            while !plan::may_stop(&views(all), i) {
                if Instant::now() >= deadline {
                    return Err(RestartError::NoSpare {
                        name: child.name.clone(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let was_draining = b.draining();
        let sessions = b.live_sessions();
        b.set_draining(true);
        b.set_quiescing(true);
        // A request that passed the quiescing check just before it was set is counted when
        // it is forwarded: give it that moment, then wait for the work to end.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let drain_deadline = Instant::now() + self.cfg.drain_timeout.0;
        let mut timed_out = false;
        while b.busy() > 0 && was_healthy {
            if Instant::now() >= drain_deadline {
                warn!(backend = %child.name, busy = b.busy(), timeout = ?self.cfg.drain_timeout.0, "rolling restart: work still running at managed.drain_timeout; stopping the CLI anyway");
                timed_out = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        info!(backend = %child.name, sessions, "rolling restart: CLI idle; moving its sessions and restarting it");
        // Down first (fenced: the CLI releases every session), then the held requests go on
        // and fail over to the next CLI of each session's ranking.
        mark_down(&self.shared, b, "rolling restart");
        b.set_quiescing(false);
        let (tx, rx) = oneshot::channel();
        let result = match child.ctl.send(Ctl::Restart(tx)).await {
            Ok(()) => rx.await.unwrap_or(Err(StartError::SupervisorGone)),
            Err(_) => Err(StartError::SupervisorGone),
        };
        b.set_draining(was_draining);
        match result {
            Ok(()) => {
                let took = begun.elapsed();
                info!(backend = %child.name, took_ms = took.as_millis() as u64, "rolling restart: CLI back");
                Ok(Restarted {
                    name: child.name.clone(),
                    sessions_moved: sessions,
                    took_ms: took.as_millis() as u64,
                    drain_timed_out: timed_out,
                })
            }
            Err(_) if self.stop.is_cancelled() => Err(RestartError::ShuttingDown),
            Err(why) => Err(RestartError::NotHealthy {
                name: child.name.clone(),
                why,
            }),
        }
    }
}

/// The CLI's own process id: the first child of its guardian `pid` (0 when none).
pub(crate) fn cli_pid_of(pid: u32) -> u32 {
    if pid == 0 {
        return 0;
    }
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_resolve_like_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("copilot");
        std::fs::write(&exe, "").unwrap();
        let path = Some(OsString::from(format!(
            "/nonexistent:{}",
            dir.path().display()
        )));
        assert_eq!(resolve("copilot", path.clone()), Some(exe.clone()));
        assert_eq!(resolve("nope", path.clone()), None);
        assert_eq!(resolve(exe.to_str().unwrap(), None), Some(exe));
        assert_eq!(resolve("./missing/copilot", path), None);
    }

    #[test]
    fn tokens_are_fresh_and_long() {
        let (a, b) = (fresh_token(), fresh_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
    }
}
