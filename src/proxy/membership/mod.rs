//! A connection's sessions: joining and leaving them (and the session table with them), the
//! ownership check on every call naming a session, notifications and turn tracking.

pub(super) mod joined;
mod turns;

use super::conn::ClientConn;
use super::request::ClientReq;
use crate::envelope;
use crate::route::Route;
use crate::rpc;
use bytes::Bytes;
use joined::{ends_turn, may_use, notification_passes, starts_turn, Membership};
use serde_json::json;
use std::sync::{Arc, MutexGuard};
use tracing::warn;

impl ClientConn {
    pub(super) fn members(&self) -> MutexGuard<'_, Membership> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ownership check for any call naming a session (a match refreshes its idle time).
    /// Returns false after answering.
    pub(super) async fn check_owner(&self, req: &ClientReq, sid: &str) -> bool {
        let tenant = self.tenant();
        let owned = match self
            .shared
            .sessions
            .owner(sid, &tenant.name, &self.shared.pool)
            .await
        {
            Ok(o) => o,
            Err(e) => {
                self.registry_down(req, &e).await;
                return false;
            }
        };
        let ok = may_use(owned, &tenant, sid);
        if !ok {
            self.foreign(req, sid).await;
        }
        ok
    }

    /// Every session a request names besides the one it is routed by: the caller must own
    /// each, and one the CLI reads in its own process must live on the routing session's
    /// backend, where the request goes. Returns false after answering.
    pub(super) async fn check_named(&self, req: &ClientReq) -> bool {
        for o in &req.other_sessions {
            if !self.check_owner(req, &o.id).await {
                return false;
            }
        }
        // Placements are compared only once the routing session is known and the caller's
        // (its own check comes later, on the route): a refusal must not tell a caller where
        // someone else's session lives.
        let home = match req.session.as_deref() {
            Some(s) => {
                let tenant = self.tenant();
                let known = self
                    .shared
                    .sessions
                    .owner(s, &tenant.name, &self.shared.pool)
                    .await
                    .map_err(|_| ());
                self.visible(s, known)
                    .then(|| self.shared.sessions.get(s).map(|p| p.backend))
                    .flatten()
            }
            None => None,
        };
        let Some(home) = home else {
            return true;
        };
        let elsewhere = req.other_sessions.iter().find(|o| {
            o.colocated
                && self
                    .shared
                    .sessions
                    .get(&o.id)
                    .is_some_and(|p| p.backend != home)
        });
        if let Some(o) = elsewhere {
            let sid = req.session.as_deref().unwrap_or("");
            let m = format!(
                "{} names sessions {sid} and {} that live on different CLI servers; copilot-lb forwards a request to one server, whose CLI cannot read the other session",
                req.method, o.id
            );
            let data = rpc::data(false, json!({"sessionIds": [sid, o.id]}));
            self.fail(req, rpc::INVALID_PARAMS, &m, data).await;
            return false;
        }
        true
    }

    /// Whether this client's tenant may see a session (lists); `known` is what the registry
    /// said of it (`Err`: it could not say, so the session is hidden).
    pub(super) fn visible(&self, sid: &str, known: Result<Option<bool>, ()>) -> bool {
        match known {
            Ok(owned) => may_use(owned, &self.tenant(), sid),
            Err(()) => false,
        }
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
    /// another client has the session open, its route (here and in the registry).
    pub(super) async fn forget_failed_create(&self, sid: &str) {
        self.unjoin(sid);
        if let Some(p) = self.shared.sessions.get(sid) {
            if p.live_conns == 0 {
                self.forget_session(sid).await;
            }
        }
    }

    /// Drops `sid` from the registry; a store that cannot answer keeps a record that names
    /// the right owner, so this only logs.
    pub(super) async fn forget_session(&self, sid: &str) {
        if let Err(e) = self.shared.sessions.remove(sid, &self.shared.pool).await {
            warn!(conn = self.id, session = %sid, error = %e, "session forgotten here but not in the registry");
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
        if starts_turn(&req.method) {
            return self.turn_call(req, sid).await;
        }
        self.to_session_backend(req).await;
    }

    /// Whether a backend notification may reach this client; notes the end of a turn.
    pub(super) fn admit_notification(
        self: &Arc<Self>,
        method: &str,
        session: Option<&str>,
        body: &[u8],
    ) -> bool {
        let telemetry = self.telemetry();
        let mut m = self.members();
        let pass = notification_passes(method, session, telemetry, |s| m.knows(s));
        let mut leaving = None;
        if let (true, Some(sid), "session.event") = (pass, session, method) {
            if ends_turn(body) {
                m.end_turn(sid);
                leaving = m.get(sid).map(|j| j.backend.clone());
            }
        }
        drop(m);
        // A turn that a going-away edge let finish: the session moves now.
        if let (Some(name), Some(sid)) = (leaving, session) {
            if self
                .shared
                .pool
                .get(&name)
                .is_some_and(|b| b.edge && b.state() == crate::backend::State::Down)
            {
                self.move_now(sid.to_string(), None);
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
