//! Getting a request to a backend that can serve it: the re-route after a failed send, and
//! the failover of a session whose backend is down, as explicit loops with one budget.
//!
//! Every decision is a pure function ([`after_failure`], [`plan`], [`failover_target`]) over a
//! snapshot; the loops around them do the I/O.

use super::conn::ClientConn;
use super::request::ClientReq;
use crate::backend::{Backend, State};
use crate::config::FailoverPolicy;
use crate::route::Route;
use crate::rpc;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Failover rounds one request may take (each round walks the whole ranking).
const MAX_ROUNDS: u8 = 3;

/// Why a session cannot be served, as a JSON-RPC error.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Refusal {
    pub(super) code: i64,
    pub(super) message: String,
    pub(super) retryable: bool,
}

/// What to do with a request its backend could not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterFailure {
    /// A create that installed its route: place it again, avoiding the failed backend.
    Replace,
    /// A session call: fail the session over.
    Failover,
    /// A process-wide call: the next backend in this connection's order.
    Retry,
    /// Nothing else can take it: a retryable error.
    Fail,
}

/// Decides what follows a failed send of a request.
pub(super) fn after_failure(
    route: Route,
    fresh: bool,
    has_session: bool,
    attempts: u8,
) -> AfterFailure {
    match route {
        Route::Create if fresh => AfterFailure::Replace,
        Route::Session | Route::Delete | Route::Detach | Route::Resume if has_session => {
            AfterFailure::Failover
        }
        Route::Global if attempts < 2 => AfterFailure::Retry,
        _ => AfterFailure::Fail,
    }
}

/// What failover needs to know of one backend in a session's ranking.
#[derive(Debug, Clone, Copy)]
pub(super) struct CandidateView<'a> {
    pub(super) name: &'a str,
    pub(super) state: State,
    /// The tenant may use it.
    pub(super) allowed: bool,
    /// Its last check failed (it may be dying too).
    pub(super) failing: bool,
}

impl CandidateView<'_> {
    fn up(&self) -> bool {
        self.state == State::Up && self.allowed
    }
}

/// Everything one failover decision looks at.
#[derive(Debug)]
pub(super) struct Situation<'a> {
    pub(super) sid: &'a str,
    /// The backend the session table places it on (`None`: the proxy has no record).
    pub(super) placed_on: Option<&'a str>,
    /// Every backend, in the session's rendezvous order.
    pub(super) ranking: &'a [CandidateView<'a>],
    /// A backend whose link just failed while health still calls it up.
    pub(super) suspect: Option<&'a str>,
    /// Backends found unreachable during this failover.
    pub(super) unreachable: &'a [String],
    pub(super) policy: FailoverPolicy,
    /// The failover's deadline has passed.
    pub(super) out_of_time: bool,
}

/// One step of a failover.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Plan {
    /// The session's backend (at this ranking index) serves: use it, resuming first if this
    /// connection has to.
    Stay(usize),
    /// Its backend is in doubt (a link failed, health has no verdict yet): wait for one.
    Wait(usize),
    /// Move it to the backend at this ranking index.
    Move { from: String, to: usize },
    /// Every candidate failed to answer: wait a moment, then walk the ranking again.
    Rewalk,
    /// Give up with this error.
    Refuse(Refusal),
    /// Give up: the session is lost on `from` (counted as a failed failover).
    Lost { from: String, refusal: Refusal },
}

fn out_of_time(sid: &str) -> Refusal {
    Refusal {
        code: rpc::BACKEND_UNAVAILABLE,
        message: format!("session {sid}: no backend could take it in time; the request was not processed and may be retried"),
        retryable: true,
    }
}

/// The failover decision. Pure: a snapshot in, one step out.
pub(super) fn plan(s: &Situation<'_>) -> Plan {
    let current = match s.placed_on {
        Some(name) => s.ranking.iter().position(|c| c.name == name),
        // Unknown to the proxy: its home is the first serving backend of its ranking.
        None => s
            .ranking
            .iter()
            .position(|c| c.state == State::Up)
            .or_else(|| s.ranking.iter().position(|c| c.state != State::Down)),
    };
    if let Some(i) = current {
        let c = &s.ranking[i];
        if c.state != State::Down {
            let in_doubt = c.failing
                && (s.suspect == Some(c.name) || s.unreachable.iter().any(|u| u == c.name));
            if !in_doubt {
                return Plan::Stay(i);
            }
            // One failed connection is not a verdict; wait for the health checker.
            return if s.out_of_time {
                Plan::Refuse(out_of_time(s.sid))
            } else {
                Plan::Wait(i)
            };
        }
    }
    let Some(old) = s.placed_on else {
        return Plan::Refuse(Refusal {
            code: rpc::BACKEND_UNAVAILABLE,
            message: "no Copilot CLI backend is available (all are down or draining)".into(),
            retryable: true,
        });
    };
    if s.policy == FailoverPolicy::Fail {
        return Plan::Lost {
            from: old.to_string(),
            refusal: Refusal {
                code: rpc::SESSION_LOST,
                message: format!("session {} lived on backend {old}, which is down; backends do not share session storage (failover policy 'fail'), so the session must be recreated", s.sid),
                retryable: false,
            },
        };
    }
    if s.out_of_time {
        return Plan::Refuse(out_of_time(s.sid));
    }
    match failover_target(s.ranking, old, s.unreachable) {
        Some(to) => Plan::Move {
            from: old.to_string(),
            to,
        },
        None if s.unreachable.is_empty() => Plan::Refuse(Refusal {
            code: rpc::BACKEND_UNAVAILABLE,
            message: format!(
                "session {}: its backend {old} is down and no other backend is up",
                s.sid
            ),
            retryable: true,
        }),
        None => Plan::Rewalk,
    }
}

/// The failover target's index in `ranking`: the first up backend other than `old` and the ones
/// already found unreachable, preferring those whose last check passed.
pub(super) fn failover_target(
    ranking: &[CandidateView<'_>],
    old: &str,
    unreachable: &[String],
) -> Option<usize> {
    let ok =
        |c: &CandidateView<'_>| c.up() && c.name != old && !unreachable.iter().any(|u| u == c.name);
    ranking
        .iter()
        .position(|c| ok(c) && !c.failing)
        .or_else(|| ranking.iter().position(ok))
}

type Gate = Arc<tokio::sync::Mutex<()>>;

/// Sessions whose failover is running on a connection: their requests queue behind it.
#[derive(Default)]
pub(crate) struct Holds(Mutex<HashMap<String, Gate>>);

/// A connection's place in a session's failover.
enum Hold {
    /// This request runs the failover; others wait on the gate it holds.
    Runs(tokio::sync::OwnedMutexGuard<()>),
    /// Another failover of the session runs here: wait behind it.
    Behind(Gate),
}

impl Holds {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Gate>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Failovers running (each holds at least one request).
    pub(super) fn len(&self) -> usize {
        self.map().len()
    }

    fn get(&self, sid: &str) -> Option<Gate> {
        self.map().get(sid).cloned()
    }

    fn begin(&self, sid: &str) -> Hold {
        let gate: Gate = Arc::new(tokio::sync::Mutex::new(()));
        let Ok(guard) = gate.clone().try_lock_owned() else {
            // A gate nobody else has seen is never locked; waiting on it is harmless anyway.
            return Hold::Behind(gate);
        };
        let mut m = self.map();
        if let Some(g) = m.get(sid) {
            return Hold::Behind(g.clone());
        }
        m.insert(sid.to_string(), gate);
        Hold::Runs(guard)
    }

    fn end(&self, sid: &str, guard: tokio::sync::OwnedMutexGuard<()>) {
        let mut m = self.map();
        let mine = tokio::sync::OwnedMutexGuard::mutex(&guard);
        if m.get(sid).is_some_and(|g| Arc::ptr_eq(g, mine)) {
            m.remove(sid);
        }
        drop(guard);
    }
}

/// Why a re-resume did not happen.
#[derive(Debug)]
pub(super) enum RejoinError {
    /// The backend could not be reached or did not answer: try another.
    Unreachable(String),
    /// The backend answered with an error: the session cannot be resumed there.
    Refused(String),
}

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
                        self.shared.sessions.remove(sid, &self.shared.pool);
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
                        None => return self.no_backend(req).await,
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
            Some(b) if b.state() != State::Down && !self.must_rejoin(&sid, &b) => {
                self.send(b, req).await
            }
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
        let deadline = crate::config::deadline_after(cfg.sessions.detect_timeout());
        let tenant = self.tenant();
        let mut unreachable: Vec<String> = Vec::new();
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
                    let now_on =
                        self.shared
                            .sessions
                            .reassign(sid, &from, &target.name, &self.shared.pool);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, state: State, failing: bool) -> CandidateView<'_> {
        CandidateView {
            name,
            state,
            allowed: true,
            failing,
        }
    }

    fn situation<'a>(
        ranking: &'a [CandidateView<'a>],
        placed_on: Option<&'a str>,
        unreachable: &'a [String],
    ) -> Situation<'a> {
        Situation {
            sid: "s",
            placed_on,
            ranking,
            suspect: None,
            unreachable,
            policy: FailoverPolicy::Reassign,
            out_of_time: false,
        }
    }

    #[test]
    fn failover_walks_the_ranking_past_dead_candidates() {
        use State::*;
        let r = [
            view("a", Down, true),
            view("b", Up, true),
            view("c", Up, false),
        ];
        // b failed its last check (it died with a): c first.
        assert_eq!(failover_target(&r, "a", &[]), Some(2));
        // c unreachable: b is still worth a try.
        assert_eq!(failover_target(&r, "a", &["c".into()]), Some(1));
        assert_eq!(failover_target(&r, "a", &["c".into(), "b".into()]), None);
        // Never the old backend, even if it reads as up.
        let r = [view("a", Up, false), view("b", Up, false)];
        assert_eq!(failover_target(&r, "a", &[]), Some(1));
        assert_eq!(failover_target(&[view("a", Up, false)], "a", &[]), None);
        // Draining and disallowed backends take no failed-over sessions.
        let mut r = [
            view("a", Down, false),
            view("b", Draining, false),
            view("c", Up, false),
        ];
        assert_eq!(failover_target(&r, "a", &[]), Some(2));
        r[2].allowed = false;
        assert_eq!(failover_target(&r, "a", &[]), None);
    }

    #[test]
    fn a_serving_backend_keeps_its_session() {
        use State::*;
        let r = [view("a", Up, false), view("b", Draining, false)];
        assert_eq!(plan(&situation(&r, Some("b"), &[])), Plan::Stay(1));
        // Unknown to the proxy: its home, the first up backend of its ranking.
        let r = [view("a", Down, true), view("b", Up, false)];
        assert_eq!(plan(&situation(&r, None, &[])), Plan::Stay(1));
    }

    #[test]
    fn a_suspect_backend_is_waited_for_then_given_up_on_at_the_deadline() {
        use State::*;
        let r = [view("a", Up, true), view("b", Up, false)];
        let mut s = situation(&r, Some("a"), &[]);
        s.suspect = Some("a");
        assert_eq!(plan(&s), Plan::Wait(0));
        s.out_of_time = true;
        assert!(matches!(
            plan(&s),
            Plan::Refuse(Refusal {
                retryable: true,
                ..
            })
        ));
        // A failing backend nobody suspects still serves (one failed probe is no verdict).
        s.suspect = None;
        s.out_of_time = false;
        assert_eq!(plan(&s), Plan::Stay(0));
    }

    #[test]
    fn a_double_failure_moves_past_the_second_dead_backend() {
        use State::*;
        // a and b died together; health has marked a down and b is failing but still up.
        let r = [
            view("a", Down, true),
            view("b", Up, true),
            view("c", Up, false),
        ];
        let s = situation(&r, Some("a"), &[]);
        assert_eq!(
            plan(&s),
            Plan::Move {
                from: "a".into(),
                to: 2
            }
        );
        // c could not be reached either: b is the last candidate.
        let unreachable = ["c".to_string()];
        let s = situation(&r, Some("a"), &unreachable);
        assert_eq!(
            plan(&s),
            Plan::Move {
                from: "a".into(),
                to: 1
            }
        );
        // Every candidate unreachable: walk again after a pause, not "lost".
        let unreachable = ["c".to_string(), "b".to_string()];
        assert_eq!(plan(&situation(&r, Some("a"), &unreachable)), Plan::Rewalk);
        // The session was moved to b, which then went down too: it moves on to c.
        let r = [
            view("a", Down, true),
            view("b", Down, true),
            view("c", Up, false),
        ];
        assert_eq!(
            plan(&situation(&r, Some("b"), &[])),
            Plan::Move {
                from: "b".into(),
                to: 2
            }
        );
    }

    #[test]
    fn nothing_up_policy_fail_and_unknown_sessions_are_refused() {
        use State::*;
        let r = [view("a", Down, true), view("b", Down, true)];
        match plan(&situation(&r, Some("a"), &[])) {
            Plan::Refuse(r) => assert!(r.retryable && r.code == rpc::BACKEND_UNAVAILABLE),
            p => panic!("{p:?}"),
        }
        // Unknown and no serving backend at all.
        assert!(matches!(plan(&situation(&r, None, &[])), Plan::Refuse(_)));
        let mut s = situation(&r, Some("a"), &[]);
        s.policy = FailoverPolicy::Fail;
        match plan(&s) {
            Plan::Lost { from, refusal } => {
                assert_eq!(from, "a");
                assert_eq!(refusal.code, rpc::SESSION_LOST);
                assert!(!refusal.retryable);
            }
            p => panic!("{p:?}"),
        }
        // A session whose backend was removed from the pool fails over like a dead one.
        let r = [view("b", Up, false)];
        assert_eq!(
            plan(&situation(&r, Some("gone"), &[])),
            Plan::Move {
                from: "gone".into(),
                to: 0
            }
        );
        let s = Situation {
            out_of_time: true,
            ..situation(&r, Some("gone"), &[])
        };
        assert!(matches!(
            plan(&s),
            Plan::Refuse(Refusal {
                retryable: true,
                ..
            })
        ));
    }

    #[test]
    fn failed_sends_are_rerouted_by_route() {
        use AfterFailure::*;
        assert_eq!(after_failure(Route::Create, true, true, 0), Replace);
        assert_eq!(after_failure(Route::Create, false, true, 0), Fail);
        for r in [Route::Session, Route::Delete, Route::Detach, Route::Resume] {
            assert_eq!(after_failure(r, false, true, 0), Failover);
            assert_eq!(after_failure(r, false, false, 0), Fail);
        }
        assert_eq!(after_failure(Route::Global, false, false, 0), Retry);
        assert_eq!(after_failure(Route::Global, false, false, 1), Retry);
        assert_eq!(after_failure(Route::Global, false, false, 2), Fail);
        assert_eq!(after_failure(Route::FanOutList, false, false, 0), Fail);
    }
}
