//! The failover decisions, pure: what follows a failed send ([`after_failure`]), one step of
//! a session's failover ([`plan`]) and the target it moves to ([`failover_target`]); and the
//! per-connection gates that queue a session's requests behind its failover.

use crate::backend::State;
use crate::config::FailoverPolicy;
use crate::route::Route;
use crate::rpc;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Failover rounds one request may take (each round walks the whole ranking).
pub(in crate::proxy) const MAX_ROUNDS: u8 = 3;

/// Why a session cannot be served, as a JSON-RPC error.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::proxy) struct Refusal {
    pub(in crate::proxy) code: i64,
    pub(in crate::proxy) message: String,
    pub(in crate::proxy) retryable: bool,
}

/// What to do with a request its backend could not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::proxy) enum AfterFailure {
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
pub(in crate::proxy) fn after_failure(
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
pub(in crate::proxy) struct CandidateView<'a> {
    pub(in crate::proxy) name: &'a str,
    pub(in crate::proxy) state: State,
    /// The tenant may use it.
    pub(in crate::proxy) allowed: bool,
    /// Its last check failed (it may be dying too).
    pub(in crate::proxy) failing: bool,
}

impl CandidateView<'_> {
    fn up(&self) -> bool {
        self.state == State::Up && self.allowed
    }
}

/// Everything one failover decision looks at.
#[derive(Debug)]
pub(in crate::proxy) struct Situation<'a> {
    pub(in crate::proxy) sid: &'a str,
    /// The backend the session table places it on (`None`: the proxy has no record).
    pub(in crate::proxy) placed_on: Option<&'a str>,
    /// Every backend, in the session's rendezvous order.
    pub(in crate::proxy) ranking: &'a [CandidateView<'a>],
    /// A backend whose link just failed while health still calls it up.
    pub(in crate::proxy) suspect: Option<&'a str>,
    /// Backends found unreachable during this failover.
    pub(in crate::proxy) unreachable: &'a [String],
    pub(in crate::proxy) policy: FailoverPolicy,
    /// The failover's deadline has passed.
    pub(in crate::proxy) out_of_time: bool,
}

/// One step of a failover.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::proxy) enum Plan {
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

pub(in crate::proxy) fn out_of_time(sid: &str) -> Refusal {
    Refusal {
        code: rpc::BACKEND_UNAVAILABLE,
        message: format!("session {sid}: no backend could take it in time; the request was not processed and may be retried"),
        retryable: true,
    }
}

/// The failover decision. Pure: a snapshot in, one step out.
pub(in crate::proxy) fn plan(s: &Situation<'_>) -> Plan {
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
pub(in crate::proxy) fn failover_target(
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

pub(in crate::proxy) type Gate = Arc<tokio::sync::Mutex<()>>;

/// Sessions whose failover is running on a connection: their requests queue behind it.
#[derive(Default)]
pub(crate) struct Holds(Mutex<HashMap<String, Gate>>);

/// A connection's place in a session's failover.
pub(in crate::proxy) enum Hold {
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
    pub(in crate::proxy) fn len(&self) -> usize {
        self.map().len()
    }

    pub(in crate::proxy) fn get(&self, sid: &str) -> Option<Gate> {
        self.map().get(sid).cloned()
    }

    pub(in crate::proxy) fn begin(&self, sid: &str) -> Hold {
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

    pub(in crate::proxy) fn end(&self, sid: &str, guard: tokio::sync::OwnedMutexGuard<()>) {
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
pub(in crate::proxy) enum RejoinError {
    /// The backend could not be reached or did not answer: try another.
    Unreachable(String),
    /// The backend answered with an error: the session cannot be resumed there.
    Refused(String),
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
