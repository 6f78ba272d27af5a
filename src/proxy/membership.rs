//! Which sessions a connection has open (joined), which it may hear about (known), whose turn
//! is running, and the ownership checks that decide whether a tenant may use a session.

use super::conn::ClientConn;
use super::request::ClientReq;
use crate::auth::Tenant;
use crate::envelope;
use crate::route::Route;
use crate::rpc;
use bytes::Bytes;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, MutexGuard};
use tracing::warn;

/// A session this connection created or resumed, with what it would take to resume it again.
#[derive(Debug, Clone)]
pub(super) struct Joined {
    pub(super) backend: String,
    /// The raw params of the last create/resume (memory only: may hold provider keys).
    pub(super) params: Option<String>,
    /// A turn was sent and no `session.idle`/`session.error` seen yet.
    pub(super) turn: bool,
    /// The link it was joined through broke: the CLI released it for this connection (or
    /// restarted without it), so it must be resumed again before its next request.
    pub(super) lost_link: bool,
}

impl Joined {
    /// Whether using the session on `backend` first needs a `session.resume` there.
    pub(super) fn needs_resume_on(&self, backend: &str) -> bool {
        self.lost_link || self.backend != backend
    }
}

/// A connection's sessions. Plain data: the session table is updated by the caller.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    joined: HashMap<String, Joined>,
    /// Sessions whose events and lifecycle notifications may reach this client.
    known: HashSet<String>,
}

impl Membership {
    /// Joins `sid` on `backend`; true if it was not joined before.
    pub(super) fn join(&mut self, sid: &str, backend: &str, params: Option<String>) -> bool {
        self.known.insert(sid.to_string());
        let j = Joined {
            backend: backend.to_string(),
            params,
            turn: false,
            lost_link: false,
        };
        self.joined.insert(sid.to_string(), j).is_none()
    }

    /// Leaves `sid`; true if it was joined.
    pub(super) fn leave(&mut self, sid: &str) -> bool {
        self.joined.remove(sid).is_some()
    }

    pub(super) fn get(&self, sid: &str) -> Option<&Joined> {
        self.joined.get(sid)
    }

    /// Lets events of `sid` through before it is joined (a resume in progress).
    pub(super) fn learn(&mut self, sid: &str) {
        self.known.insert(sid.to_string());
    }

    pub(super) fn knows(&self, sid: &str) -> bool {
        self.known.contains(sid)
    }

    pub(super) fn set_turn(&mut self, sid: &str, running: bool) {
        if let Some(j) = self.joined.get_mut(sid) {
            j.turn = running;
        }
    }

    /// The sessions on `backend` with a turn running, each marked as no longer running.
    pub(super) fn take_turns_on(&mut self, backend: &str) -> Vec<String> {
        self.joined
            .iter_mut()
            .filter(|(_, j)| j.backend == backend && j.turn)
            .map(|(sid, j)| {
                j.turn = false;
                sid.clone()
            })
            .collect()
    }

    /// The link to `backend` broke: every session joined there needs a resume.
    pub(super) fn link_lost(&mut self, backend: &str) {
        for j in self.joined.values_mut() {
            if j.backend == backend {
                j.lost_link = true;
            }
        }
    }

    /// `sid` was resumed on `backend` for this connection.
    pub(super) fn rejoined(&mut self, sid: &str, backend: &str) {
        if let Some(j) = self.joined.get_mut(sid) {
            j.backend = backend.to_string();
            j.lost_link = false;
        }
    }

    /// Everything joined, emptied (the connection closes).
    pub(super) fn drain(&mut self) -> Vec<(String, Joined)> {
        self.joined.drain().collect()
    }
}

/// Whether `tenant` may use a session: its recorded owner decides (`owned`: `Some(mine)`),
/// and an id the proxy has no record of only if the tenant may claim it.
pub(super) fn may_use(owned: Option<bool>, tenant: &Tenant, sid: &str) -> bool {
    match owned {
        Some(mine) => mine,
        None => tenant.may_claim(sid),
    }
}

/// Whether a backend notification may reach a client. The CLI broadcasts
/// `session.lifecycle` to every connection; only sessions the client created or resumed
/// pass, so no tenant ever sees another's session ids.
pub(super) fn notification_passes(
    method: &str,
    session: Option<&str>,
    telemetry: bool,
    knows: impl Fn(&str) -> bool,
) -> bool {
    if method == "gitHubTelemetry.event" && !telemetry {
        return false;
    }
    match session {
        Some(s) => knows(s),
        None => method != "gitHubTelemetry.event" && method != "session.lifecycle",
    }
}

/// Whether a small `session.event` ends a turn (`session.idle` or `session.error`). Large
/// events are deltas, never the end of a turn, and are not searched.
pub(super) fn ends_turn(body: &[u8]) -> bool {
    if body.len() > 4096 {
        return false;
    }
    // Built once: constructing a searcher costs more than searching a small event.
    static IDLE: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"session.idle\""));
    static ERROR: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"session.error\""));
    IDLE.find(body).is_some() || ERROR.find(body).is_some()
}

impl ClientConn {
    pub(super) fn members(&self) -> MutexGuard<'_, Membership> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ownership check for any call naming a session (a match refreshes its idle time).
    /// Returns false after answering.
    pub(super) async fn check_owner(&self, req: &ClientReq, sid: &str) -> bool {
        let tenant = self.tenant();
        let owned = self.shared.sessions.owned_by_touch(sid, &tenant.name);
        let ok = may_use(owned, &tenant, sid);
        if !ok {
            self.foreign(req, sid).await;
        }
        ok
    }

    /// Whether this client's tenant may see a session (lists).
    pub(super) fn visible(&self, sid: &str) -> bool {
        let tenant = self.tenant();
        may_use(
            self.shared.sessions.owned_by(sid, &tenant.name),
            &tenant,
            sid,
        )
    }

    /// Joins with the request's own params remembered for a later re-resume.
    pub(super) fn join_as(&self, sid: &str, backend: &str, req: &ClientReq) {
        let params = envelope::raw_params(&req.body).map(str::to_string);
        if self.members().join(sid, backend, params) {
            self.shared.sessions.join(sid, &self.shared.pool);
        }
    }

    pub(super) fn unjoin(&self, sid: &str) {
        if self.members().leave(sid) {
            self.shared.sessions.leave(sid, &self.shared.pool);
        }
    }

    /// Undoes what a failed `session.create` installed: this connection's join and, unless
    /// another client has the session open, its route.
    pub(super) fn forget_failed_create(&self, sid: &str) {
        self.unjoin(sid);
        if let Some(p) = self.shared.sessions.get(sid) {
            if p.live_conns == 0 {
                self.shared.sessions.remove(sid, &self.shared.pool);
            }
        }
    }

    /// Any call naming a session: ownership, detach and turn bookkeeping, then upstream.
    pub(super) async fn session_call(self: &Arc<Self>, req: ClientReq) {
        let Some(sid) = req.session.clone() else {
            return;
        };
        if !self.check_owner(&req, &sid).await {
            return;
        }
        if req.route == Route::Detach {
            self.unjoin(&sid);
        }
        if matches!(
            req.method.as_str(),
            "session.send" | "session.sendMessages" | "session.sendAndWait"
        ) {
            self.members().set_turn(&sid, true);
        }
        self.to_session_backend(req).await;
    }

    /// Whether a backend notification may reach this client; notes the end of a turn.
    pub(super) fn admit_notification(
        &self,
        method: &str,
        session: Option<&str>,
        body: &[u8],
    ) -> bool {
        let telemetry = self.telemetry();
        let mut m = self.members();
        let pass = notification_passes(method, session, telemetry, |s| m.knows(s));
        if let (true, Some(sid), "session.event") = (pass, session, method) {
            if ends_turn(body) {
                m.set_turn(sid, false);
            }
        }
        pass
    }

    /// Tells the client, as a `session.error` event, that a turn in progress died with its
    /// backend: an SDK waiting in `send_and_wait` fails at once instead of at its timeout.
    pub(super) async fn turns_lost(&self, backend: &str, reason: &str) {
        let lost = self.members().take_turns_on(backend);
        for sid in lost {
            let event = json!({
                "sessionId": sid,
                "event": {
                    "id": uuid::Uuid::new_v4().to_string(),
                    "timestamp": rpc::now_rfc3339(),
                    "parentId": null,
                    "type": "session.error",
                    "ephemeral": true,
                    "data": {
                        "errorType": "copilot_lb_backend_lost",
                        "errorCode": "BACKEND_LOST",
                        "message": format!("copilot-lb: the turn in progress was lost because {reason}; send again to continue (the session fails over per policy)"),
                    }
                }
            });
            let body = format!(r#"{{"jsonrpc":"2.0","method":"session.event","params":{event}}}"#);
            warn!(conn = self.id, session = %sid, backend, "turn lost with its backend; session.error sent to the client");
            self.send_to_client(Bytes::from(body)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_and_telemetry_pass_only_when_asked() {
        let knows = |s: &str| s == "mine";
        assert!(notification_passes(
            "session.event",
            Some("mine"),
            false,
            knows
        ));
        assert!(!notification_passes(
            "session.event",
            Some("theirs"),
            false,
            knows
        ));
        assert!(!notification_passes(
            "session.lifecycle",
            None,
            false,
            knows
        ));
        assert!(!notification_passes(
            "gitHubTelemetry.event",
            None,
            false,
            knows
        ));
        assert!(!notification_passes(
            "gitHubTelemetry.event",
            None,
            true,
            knows
        ));
        assert!(notification_passes(
            "gitHubTelemetry.event",
            Some("mine"),
            true,
            knows
        ));
        assert!(notification_passes("models.changed", None, false, knows));
    }

    #[test]
    fn turns_end_on_idle_or_error_in_small_events() {
        assert!(ends_turn(
            br#"{"params":{"event":{"type":"session.idle"}}}"#
        ));
        assert!(ends_turn(
            br#"{"params":{"event":{"type":"session.error"}}}"#
        ));
        assert!(!ends_turn(
            br#"{"params":{"event":{"type":"assistant.message_delta"}}}"#
        ));
        let mut big = br#"{"type":"session.idle","pad":""#.to_vec();
        big.resize(5000, b'x');
        assert!(!ends_turn(&big));
    }

    #[test]
    fn membership_tracks_links_and_turns() {
        let mut m = Membership::default();
        assert!(m.join("s", "a", None));
        assert!(!m.join("s", "a", None));
        m.set_turn("s", true);
        assert_eq!(m.take_turns_on("b"), Vec::<String>::new());
        assert_eq!(m.take_turns_on("a"), vec!["s".to_string()]);
        assert!(m.take_turns_on("a").is_empty());
        assert!(!m.get("s").unwrap().needs_resume_on("a"));
        m.link_lost("a");
        assert!(m.get("s").unwrap().needs_resume_on("a"));
        m.rejoined("s", "b");
        assert!(!m.get("s").unwrap().needs_resume_on("b"));
        assert!(m.get("s").unwrap().needs_resume_on("a"));
        assert!(m.leave("s") && !m.leave("s"));
        assert!(
            m.knows("s"),
            "a session once joined keeps its events flowing"
        );
    }
}
