//! Getting a request to a backend that can serve it: the re-route after a failed send, and
//! the failover of a session whose backend is down, as explicit loops with one budget. Every
//! decision is a pure function of [`plan`] over a snapshot; these loops do the I/O.

pub(super) mod plan;

use super::conn::ClientConn;
use super::request::ClientReq;
use crate::backend::{Backend, State};
use crate::rpc;
use plan::{
    after_failure, plan, AfterFailure, CandidateView, Hold, Plan, Refusal, RejoinError, Situation,
    MAX_ROUNDS,
};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Longest a request waits for a quiescing backend (a rolling restart ends quiescing after
/// at most `managed.drain_timeout`; this only guards against a restart that never returns).
const QUIESCE_WAIT_MAX: Duration = Duration::from_secs(600);

impl ClientConn {
    /// Sends a request to `b`, re-routing it if `b` cannot take it.
    pub(super) async fn send(self: &Arc<Self>, b: Arc<Backend>, req: ClientReq) {
        if let Err(req) = self.forward(&b, req).await {
            self.reroute(req, &b).await;
        }
    }

    /// Re-routes a request `failed` could not take (down, or its link died before writing
    /// it): one loop; each pass picks the next target by [`after_failure`].
    pub(super) async fn reroute(self: &Arc<Self>, mut req: ClientReq, failed: &Arc<Backend>) {
        let mut failed = failed.clone();
        loop {
            let next = match after_failure(
                req.route,
                req.fresh,
                req.session.is_some(),
                req.attempts,
            ) {
                AfterFailure::Replace => {
                    // Nothing exists yet: place the new session elsewhere. Every backend that
                    // failed it stays excluded, so a double failure walks on to a live backend
                    // and the walk ends when none is left (-32011).
                    if let Some(sid) = &req.session {
                        self.unjoin(sid);
                        self.forget_session(sid).await;
                    }
                    req.fresh = false;
                    req.avoid.push(failed.name.clone());
                    match self.admit_create(&mut req).await {
                        Some(b) => b,
                        None => return,
                    }
                }
                AfterFailure::Failover => {
                    return self.start_failover(req, Some(failed.name.clone())).await;
                }
                AfterFailure::Retry => {
                    req.attempts += 1;
                    let key = format!("conn-{}-{}", self.id, req.attempts);
                    match self
                        .shared
                        .pool
                        .first_serving(&key)
                        .filter(|b| b.name != failed.name)
                    {
                        Some(b) => b,
                        None => return self.no_backend(&req).await,
                    }
                }
                AfterFailure::Fail => {
                    let m = format!(
                        "backend {} is unavailable; the request was not processed and may be retried",
                        failed.name
                    );
                    let data = rpc::data(
                        true,
                        json!({"backend": failed.name, "sessionId": req.session}),
                    );
                    return self.fail(&req, rpc::BACKEND_UNAVAILABLE, &m, data).await;
                }
            };
            match self.forward(&next, req).await {
                Ok(()) => return,
                Err(back) => {
                    req = back;
                    failed = next;
                }
            }
        }
    }

    /// Sends a session-scoped request to the session's backend, failing the session over first
    /// when that backend is down (or the session moved while this connection had it open).
    pub(super) async fn to_session_backend(self: &Arc<Self>, req: ClientReq) {
        let Some(sid) = req.session.clone() else {
            return;
        };
        if let Some(gate) = self.holds.get(&sid) {
            let me = self.clone();
            self.spawn_for_request(async move {
                let _g = gate.lock().await;
                me.start_failover(req, None).await;
            });
            return;
        }
        let here = match self.shared.sessions.get(&sid) {
            Some(p) => self.shared.pool.get(&p.backend),
            None => self.shared.pool.first_serving(&sid),
        };
        match here {
            Some(b)
                if b.state() != State::Down && !b.quiescing() && !self.must_rejoin(&sid, &b) =>
            {
                self.send(b, req).await
            }
            // Quiescing (a rolling restart empties it): the failover task waits, holding the
            // session's later requests in order, then moves the session once it is down.
            _ => self.start_failover(req, None).await,
        }
    }

    /// Whether this connection joined `sid` on a backend other than where it now lives.
    fn must_rejoin(&self, sid: &str, b: &Backend) -> bool {
        self.members()
            .get(sid)
            .is_some_and(|j| j.needs_resume_on(&b.name))
    }

    /// Fails the request's session over in a task, with the session's requests on this
    /// connection held until it finishes; then sends the request. One budget: a request
    /// takes at most [`MAX_ROUNDS`] failover rounds in its life.
    pub(super) async fn start_failover(
        self: &Arc<Self>,
        mut req: ClientReq,
        suspect: Option<String>,
    ) {
        let Some(sid) = req.session.clone() else {
            return;
        };
        if req.attempts >= MAX_ROUNDS {
            return self.kept_failing(&req, &sid).await;
        }
        let hold = self.holds.begin(&sid);
        let me = self.clone();
        self.spawn_for_request(async move {
            let guard = match hold {
                Hold::Runs(g) => Some(g),
                Hold::Behind(gate) => {
                    let _g = gate.lock().await;
                    None
                }
            };
            let mut suspect = suspect;
            loop {
                if req.attempts >= MAX_ROUNDS {
                    me.kept_failing(&req, &sid).await;
                    break;
                }
                req.attempts += 1;
                match me.ensure_session(&sid, suspect.as_deref()).await {
                    Ok(b) => match me.forward(&b, req).await {
                        Ok(()) => break,
                        Err(back) => {
                            req = back;
                            suspect = Some(b.name.clone());
                        }
                    },
                    Err(r) => {
                        let data = rpc::data(r.retryable, json!({"sessionId": sid}));
                        me.fail(&req, r.code, &r.message, data).await;
                        break;
                    }
                }
            }
            if let Some(g) = guard {
                me.holds.end(&sid, g);
            }
        });
    }

    /// Moves every session this connection holds on `backend` (an edge that went away or
    /// died) now rather than at its next request, so its events flow again. One with a turn
    /// running moves when that turn ends: the edge keeps serving it until then.
    pub(super) fn move_off(self: &Arc<Self>, backend: &str) {
        let idle = self.members().idle_on(backend);
        for sid in idle {
            self.move_now(sid, Some(backend.to_string()));
        }
    }

    /// Fails `sid` over with no request waiting on it, holding the session's later requests
    /// behind the move like any failover. Nothing to do if a failover of it already runs.
    pub(super) fn move_now(self: &Arc<Self>, sid: String, suspect: Option<String>) {
        let Hold::Runs(guard) = self.holds.begin(&sid) else {
            return;
        };
        let me = self.clone();
        self.spawn_for_request(async move {
            match me.ensure_session(&sid, suspect.as_deref()).await {
                Ok(b) => {
                    debug!(conn = me.id, session = %sid, backend = %b.name, "session moved off a going-away edge")
                }
                Err(r) => {
                    warn!(conn = me.id, session = %sid, error = %r.message, "session could not be moved yet; its next request tries again")
                }
            }
            me.holds.end(&sid, guard);
        });
    }

    async fn kept_failing(&self, req: &ClientReq, sid: &str) {
        let m = format!("session {sid}: its backend kept failing; the request was not processed and may be retried");
        let data = rpc::data(true, json!({"sessionId": sid}));
        self.fail(req, rpc::BACKEND_UNAVAILABLE, &m, data).await;
    }

    /// Makes sure `sid` is live on a healthy backend that this connection has joined it on,
    /// applying the failover policy. `suspect` names a backend whose link just failed while
    /// health still calls it up: the verdict is awaited (bounded) before anything moves.
    ///
    /// One loop, one deadline: each pass takes a snapshot and follows [`plan`]. A candidate
    /// that cannot be reached (it died too: a double failure) is skipped, not a reason to
    /// declare the session lost.
    async fn ensure_session(
        self: &Arc<Self>,
        sid: &str,
        suspect: Option<&str>,
    ) -> Result<Arc<Backend>, Refusal> {
        let cfg = self.shared.config();
        if let Some(b) = self
            .shared
            .sessions
            .get(sid)
            .and_then(|p| self.shared.pool.get(&p.backend))
            .filter(|b| b.quiescing())
        {
            // Bounded by the restart's own drain_timeout, which ends quiescing in any case.
            b.quiesced(QUIESCE_WAIT_MAX).await;
        }
        let deadline = crate::config::deadline_after(cfg.sessions.detect_timeout());
        let tenant = self.tenant();
        let mut unreachable: Vec<String> = Vec::new();
        // Another replica may have moved it already: decide from the record, not the cache.
        if let Err(e) = self.shared.sessions.refresh(sid, &self.shared.pool).await {
            return Err(Refusal {
                code: rpc::BACKEND_UNAVAILABLE,
                message: format!("session {sid}: where it lives cannot be confirmed, as copilot-lb's session registry is unavailable ({e}); retry"),
                retryable: true,
            });
        }
        loop {
            let placed = self.shared.sessions.get(sid);
            let ranked = self.shared.pool.ranked(sid);
            let views: Vec<CandidateView<'_>> = ranked
                .iter()
                .map(|b| CandidateView {
                    name: &b.name,
                    state: b.state(),
                    allowed: tenant.allows_backend(&b.name),
                    failing: b.failing(),
                })
                .collect();
            let step = plan(&Situation {
                sid,
                placed_on: placed.as_ref().map(|p| p.backend.as_str()),
                ranking: &views,
                suspect,
                unreachable: &unreachable,
                policy: cfg.sessions.policy(),
                out_of_time: Instant::now() >= deadline,
            });
            match step {
                Plan::Stay(i) => {
                    let b = &ranked[i];
                    let joined = self.members().get(sid).cloned();
                    if let Some(j) = joined.filter(|j| j.needs_resume_on(&b.name)) {
                        match self.rejoin(sid, b, j.params.as_deref(), deadline).await {
                            Ok(()) => {}
                            Err(RejoinError::Unreachable(e)) => {
                                debug!(conn = self.id, session = %sid, backend = %b.name, error = %e, "rejoin could not reach the backend");
                                unreachable.push(b.name.clone());
                                if Instant::now() >= deadline {
                                    return Err(plan::out_of_time(sid));
                                }
                                // Health normally records the failure first (then the next pass
                                // waits for a verdict); if a probe cleared it meanwhile, pause
                                // instead of redialling at once.
                                if !b.failing() {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                                continue;
                            }
                            Err(RejoinError::Refused(e)) => return Err(Refusal {
                                code: rpc::SESSION_LOST,
                                message: format!("session {sid} moved to backend {} but could not be resumed there: {e}; it must be recreated", b.name),
                                retryable: false,
                            }),
                        }
                    }
                    return Ok(b.clone());
                }
                Plan::Wait(i) => ranked[i].state_change(Duration::from_millis(100)).await,
                Plan::Rewalk => {
                    // Every candidate failed to answer: give health a moment, then walk again.
                    unreachable.clear();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Plan::Refuse(r) => return Err(r),
                Plan::Lost { from, refusal } => {
                    self.shared.metrics.failover_failed(&from);
                    return Err(refusal);
                }
                Plan::Move { from, to } => {
                    let target = ranked[to].clone();
                    let joined = self.members().get(sid).cloned();
                    if let Some(j) = joined {
                        // The old backend is down, so its links are fenced and the CLI releases
                        // the session before another process resumes it: never live on two.
                        match self
                            .rejoin(sid, &target, j.params.as_deref(), deadline)
                            .await
                        {
                            Ok(()) => {}
                            Err(RejoinError::Unreachable(e)) => {
                                warn!(conn = self.id, session = %sid, from = %from, to = %target.name, error = %e, "failover candidate unreachable; trying the next");
                                unreachable.push(target.name.clone());
                                continue;
                            }
                            Err(RejoinError::Refused(e)) => {
                                self.shared.metrics.failover_failed(&from);
                                warn!(conn = self.id, session = %sid, from = %from, to = %target.name, error = %e, "failover resume failed");
                                return Err(Refusal {
                                    code: rpc::SESSION_LOST,
                                    message: format!("session {sid} lived on backend {from}, which is down, and could not be resumed on {}: {e}; it must be recreated", target.name),
                                    retryable: false,
                                });
                            }
                        }
                    }
                    let now_on = self
                        .shared
                        .sessions
                        .reassign(sid, &from, &target.name, &self.shared.pool)
                        .await
                        .map_err(|e| Refusal {
                            code: rpc::BACKEND_UNAVAILABLE,
                            message: format!("session {sid}: its backend {from} is down and the move to {} cannot be recorded, as copilot-lb's session registry is unavailable ({e}); retry", target.name),
                            retryable: true,
                        })?;
                    if now_on.as_deref() == Some(target.name.as_str()) {
                        self.shared.metrics.failover(&from);
                        info!(conn = self.id, session = %sid, from = %from, to = %target.name, "session failed over");
                        return Ok(target);
                    }
                    // Someone else moved it meanwhile; follow it.
                }
            }
        }
    }
}
