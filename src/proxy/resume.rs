//! `session.resume` (and `sessions.open {kind: resume|attach}`): to the session's backend when
//! the proxy knows it, found by probing the session's ranking when it does not; and the
//! proxy's own re-resume of a session for a connection (`rejoin`) after a failover or a
//! broken link.

use super::conn::ClientConn;
use super::failover::plan::RejoinError;
use super::request::ClientReq;
use crate::affinity::Claim;
use crate::backend::{Backend, State};
use crate::envelope;
use bytes::Bytes;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::debug;

/// How long a resume waits for a closed client's link to the session to finish closing.
const RELEASE_LIMIT: Duration = Duration::from_millis(250);

/// Whether a CLI error means "this CLI has no such session" (so another backend may have
/// it). The CLI gives no code of its own for it, only -32603 with this text
/// (copilot-protocol.md, "Session not found"), so this is the one place that reads the text.
pub(super) fn is_session_not_found(error: &Value) -> bool {
    let code = error.get("code").and_then(Value::as_i64);
    let msg = error.get("message").and_then(Value::as_str).unwrap_or("");
    code == Some(crate::rpc::INTERNAL_ERROR) && msg.contains("Session not found")
}

impl ClientConn {
    pub(super) async fn resume(self: &Arc<Self>, req: ClientReq) {
        let Some(sid) = req.session.clone() else {
            return;
        };
        if !self.check_owner(&req, &sid).await {
            return;
        }
        if let Some((m, data)) = self.over_cap(&sid) {
            return self.fail(&req, crate::rpc::SESSION_LIMIT, &m, data).await;
        }
        // A client that just closed may still hold it in the CLI: follow its cleanup.
        self.shared.released(&sid, RELEASE_LIMIT).await;
        if let Some(p) = self.shared.sessions.get(&sid) {
            // Recorded as joined where it lives now, so a failover in between is not replayed
            // on top of this very resume.
            let here = self
                .shared
                .pool
                .get(&p.backend)
                .filter(|b| b.state() != State::Down)
                .map(|b| b.name.clone())
                .unwrap_or(p.backend);
            self.join_as(&sid, &here, &req);
            return self.to_session_backend(req).await;
        }
        // Unknown to this proxy (restarted, or created elsewhere): ask backends in the
        // session's rendezvous order until one has it.
        let me = self.clone();
        self.spawn_for_request(async move { me.resume_probe(req, sid).await });
    }

    /// Whether making `sid` live on this connection would pass a cap (the tenant's or its
    /// backend's `max_sessions`): a session this connection or another already has live adds
    /// nothing; any other does, whichever method brings it back.
    fn over_cap(&self, sid: &str) -> Option<(String, Value)> {
        if self.members().get(sid).is_some() {
            return None;
        }
        let placed = self.shared.sessions.get(sid);
        if placed.as_ref().is_some_and(|p| p.live_conns > 0) {
            return None;
        }
        if let Some(refusal) = self.tenant_over_cap(&self.tenant()) {
            return Some(refusal);
        }
        let b = placed.and_then(|p| self.shared.pool.get(&p.backend))?;
        let limit = b.max_sessions?;
        (b.fleet_sessions() >= limit).then(|| {
            let m = format!(
                "backend {} already holds its maximum of {limit} live sessions",
                b.name
            );
            let data = serde_json::json!({"limit": limit, "backend": b.name});
            (m, crate::rpc::data(true, data))
        })
    }

    async fn resume_probe(self: &Arc<Self>, req: ClientReq, sid: String) {
        let mut last: Option<Bytes> = None;
        for b in self.shared.pool.ranked(&sid) {
            if b.state() == State::Down {
                continue;
            }
            let link = self.link(&b);
            // Known first so events emitted during resume reach the client.
            self.members().learn(&sid);
            let reply = match link.call_as_proxy(&req.body, req.id_span).await {
                Ok(r) => r,
                Err(e) => {
                    debug!(conn = self.id, backend = %b.name, error = %e, "resume probe failed");
                    continue;
                }
            };
            let v: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
            if let Some(err) = v.get("error") {
                let elsewhere = is_session_not_found(err);
                last = Some(reply);
                if elsewhere {
                    continue;
                }
                break;
            }
            // The session the CLI opened, which is the one asked for unless it resolved the
            // id to another; that one must be the caller's too, or nobody's yet.
            let named = super::upstream::reply_session(&reply).unwrap_or_else(|| sid.clone());
            let tenant = self.tenant();
            let claim = self
                .shared
                .sessions
                .claim(&named, &tenant.name, &b.name, &self.shared.pool)
                .await;
            if let Err(e) = &claim {
                // Opened on the CLI but not recordable: close the handle, fail closed.
                let params = serde_json::json!({"sessionId": named});
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    link.call("session.detach", &params),
                )
                .await;
                return self.registry_down(&req, e).await;
            }
            if matches!(claim, Ok(Claim::Foreign)) {
                let params = serde_json::json!({"sessionId": named});
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    link.call("session.detach", &params),
                )
                .await;
                return self.foreign(&req, &named).await;
            }
            self.join_as(&named, &b.name, &req);
            self.deliver(&req, &reply, true).await;
            return;
        }
        match last {
            Some(reply) => self.deliver(&req, &reply, false).await,
            None => self.no_backend(&req).await,
        }
    }

    /// Before `sid` is resumed on `b`: if this connection still has it open through a live
    /// link to another backend (the record moved it there, e.g. another replica failed it
    /// over), that hold is let go first, so the session is never live on two CLIs.
    async fn release_old_hold(&self, sid: &str, b: &Backend) {
        let old = self.members().get(sid).map(|j| j.backend.clone());
        let Some(old) = old.filter(|o| *o != b.name) else {
            return;
        };
        let Some(link) = self.open_link(&old) else {
            return;
        };
        let params = serde_json::json!({"sessionId": sid});
        let released =
            tokio::time::timeout(Duration::from_secs(2), link.call("session.detach", &params))
                .await;
        if !matches!(released, Ok(Ok(_))) {
            // No answer: closing the link is what makes that CLI let go.
            link.close();
        }
        debug!(conn = self.id, session = %sid, from = %old, to = %b.name, "released the old backend's hold before resuming elsewhere");
    }

    /// Sends a reply obtained through an internal call back under the client's own id.
    async fn deliver(&self, req: &ClientReq, reply: &[u8], ok: bool) {
        let Some(span) = envelope::parse(reply).ok().and_then(|e| e.id_span) else {
            return;
        };
        let out = envelope::splice(reply, span, req.id.get().as_bytes());
        let result = if ok { "ok" } else { "error" };
        self.shared.metrics.request(req.class(), result);
        self.send_to_client(Bytes::from(out)).await;
    }

    /// Resumes `sid` on `b` for this connection with the parameters it last used, within
    /// `deadline` (at least a second, as a resume loads the session from disk).
    pub(super) async fn rejoin(
        self: &Arc<Self>,
        sid: &str,
        b: &Arc<Backend>,
        params: Option<&str>,
        deadline: Instant,
    ) -> Result<(), RejoinError> {
        let mut p: serde_json::Map<String, Value> = params
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        p.insert("sessionId".into(), Value::String(sid.to_string()));
        // The kept params were rewritten when the client sent them; applied again so the
        // replay follows the tenant's policy as it is now (a reload may have narrowed it).
        let tenant = self.tenant();
        if !tenant.host.unrestricted() {
            let text = Value::Object(p).to_string();
            let Ok(fitted) = crate::policy::rewrite_options(
                &text,
                &tenant.host,
                &tenant.name,
                crate::policy::Target::Create,
                "params",
            ) else {
                return Err(RejoinError::Refused(
                    "its kept parameters no longer fit the tenant's tool policy".into(),
                ));
            };
            p = serde_json::from_str(&fitted).unwrap_or_default();
            p.insert("sessionId".into(), Value::String(sid.to_string()));
        }
        self.release_old_hold(sid, b).await;
        let link = self.link(b);
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let reply = match tokio::time::timeout(
            budget,
            link.call("session.resume", &Value::Object(p)),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(RejoinError::Unreachable(e.to_string())),
            Err(_) => {
                // It may still resume there: closing this link makes the CLI release it, so
                // the session is never live on two backends.
                link.close();
                return Err(RejoinError::Unreachable(format!(
                    "no reply to session.resume in {budget:?}"
                )));
            }
        };
        let v: Value =
            serde_json::from_slice(&reply).map_err(|e| RejoinError::Refused(e.to_string()))?;
        if let Some(err) = v.get("error") {
            return Err(RejoinError::Refused(
                err.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("resume failed")
                    .to_string(),
            ));
        }
        self.members().rejoined(sid, &b.name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_clis_not_found_error_sends_a_probe_on() {
        // As CLI 1.0.x words it (copilot-protocol.md).
        assert!(is_session_not_found(
            &json!({"code": -32603, "message": "Request session.resume failed with message: Failed to load session events: Session not found: 3f2a"})
        ));
        assert!(!is_session_not_found(
            &json!({"code": -32603, "message": "Another client is already the provider"})
        ));
        assert!(!is_session_not_found(
            &json!({"code": -32602, "message": "Session not found"})
        ));
        assert!(!is_session_not_found(
            &json!({"message": "Session not found"})
        ));
    }
}
