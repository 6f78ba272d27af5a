//! The rolling restart: the pool's CLIs one at a time, each drained and quiesced, marked down
//! so its sessions move, restarted, and undrained once it answers again.

use super::plan::{self, RestartView};
use super::supervise::{mark_down, StartError};
use super::{Child, Ctl, Supervisor};
use crate::backend::Backend;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{info, warn};

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

impl Supervisor {
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
