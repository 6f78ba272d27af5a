//! One CLI's life under the pool: start with a fresh token, wait until it answers, watch it,
//! start it again after a back-off when it exits or at once when a rolling restart asks, and
//! stop it with the pool. Also how the pool tells health about it (`mark_down`, `mark_up`).

use super::plan;
use super::spawn::{self, Launch, Spawner};
use super::{Child, Ctl, Supervisor};
use crate::backend::Backend;
use crate::context::Shared;
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

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

fn fresh_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

/// What every start of every CLI shares.
pub(super) struct Base {
    pub(super) command: PathBuf,
    pub(super) guard_exe: PathBuf,
    pub(super) marker: String,
}

/// Marks `b` down through the health observer (logged and counted like a probe's verdict):
/// its links are fenced, so its sessions fail over on their next request.
pub(super) fn mark_down(shared: &Shared, b: &Arc<Backend>, why: &str) {
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
pub(super) async fn supervise(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_long() {
        let (a, b) = (fresh_token(), fresh_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
    }
}
