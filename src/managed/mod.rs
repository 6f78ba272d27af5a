//! The managed pool (`managed:`): copilot-lb starts N local `copilot --headless` servers
//! itself, supervises them (restart with capped back-off), restarts them one at a time on
//! request (a rolling restart that moves their sessions first) and stops them with itself.
//!
//! Each CLI listens on a loopback port chosen here, requires a fresh random connection token
//! per start that only the proxy holds, and shares one `session-state` directory with the
//! others so a failover resumes its sessions. Each runs under a guardian process
//! (`guard.rs`) so that nothing outlives the proxy, even on SIGKILL. The decisions (back-off,
//! restart order) are pure functions in `plan.rs`.
//!
//! This file prepares and starts the pool; `supervise.rs` is one CLI's life (start, ready,
//! exit, back-off), `rolling.rs` the rolling restart that asks those supervisors to restart
//! their CLIs one at a time.

pub mod guard;
mod plan;
mod rolling;
mod spawn;
mod supervise;

pub use rolling::{RestartError, Restarted};
pub use supervise::StartError;

use crate::config::{BackendConfig, ManagedConfig};
use crate::context::Shared;
use spawn::Spawner;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use supervise::{mark_down, supervise, Base};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
}
