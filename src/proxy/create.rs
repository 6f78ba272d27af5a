//! `session.create` (and `sessions.open {kind: create}`): the session id (injected when the
//! client sent none), the tenant's rules, placement and the claim in the session table.

use super::conn::ClientConn;
use super::request::ClientReq;
use crate::affinity::Claim;
use crate::backend::Backend;
use crate::envelope;
use crate::rpc;
use bytes::Bytes;
use serde_json::json;
use std::sync::Arc;

impl ClientConn {
    pub(super) async fn create(self: &Arc<Self>, mut req: ClientReq) {
        if let Some(b) = self.admit_create(&mut req).await {
            self.send(b, req).await;
        }
    }

    /// Checks a create against the tenant's rules, places it (avoiding `req.avoid`) and
    /// claims it; `None` once the client has been answered with a refusal.
    pub(super) async fn admit_create(&self, req: &mut ClientReq) -> Option<Arc<Backend>> {
        let tenant = self.tenant();
        let sid = match req.session.clone() {
            Some(s) => s,
            None => {
                let sid = uuid::Uuid::new_v4().to_string();
                let Some((body, span)) = inject_session_id(&req.body, &sid) else {
                    let m = "session.create: params must be an object";
                    self.fail(req, rpc::INVALID_PARAMS, m, rpc::data(false, json!({})))
                        .await;
                    return None;
                };
                req.body = Bytes::from(body);
                req.id_span = span;
                req.session = Some(sid.clone());
                sid
            }
        };
        if let Err(why) = tenant.may_create(&sid) {
            let data = rpc::data(false, json!({"sessionId": sid}));
            self.fail(req, rpc::SESSION_ID_NOT_ALLOWED, &why.to_string(), data)
                .await;
            return None;
        }
        if self.shared.sessions.get(&sid).is_none() {
            if let Some((m, data)) = self.tenant_over_cap(&tenant) {
                self.fail(req, rpc::SESSION_LIMIT, &m, data).await;
                return None;
            }
        }
        let bounded = self.shared.config().balancing.bounded_load;
        let placed =
            self.shared
                .pool
                .place(&sid, |b| tenant.allows_backend(b), &req.avoid, bounded);
        let Some(backend) = placed else {
            self.no_backend(req).await;
            return None;
        };
        let claim = self
            .shared
            .sessions
            .claim(&sid, &tenant.name, &backend.name, &self.shared.pool)
            .await;
        let backend = match claim {
            Err(e) => {
                self.registry_down(req, &e).await;
                return None;
            }
            Ok(Claim::New) => {
                req.fresh = true;
                backend
            }
            Ok(Claim::Existing(name)) => match self.shared.pool.get(&name) {
                Some(b) => b,
                None => {
                    self.no_backend(req).await;
                    return None;
                }
            },
            Ok(Claim::Foreign) => {
                self.foreign(req, &sid).await;
                return None;
            }
        };
        // Installed before forwarding: the CLI may call back (sessionFs, hooks) or announce the
        // session (lifecycle) before it replies.
        self.join_as(&sid, &backend.name, req);
        Some(backend)
    }
}

/// Adds `"sessionId": sid` to a request's params without re-encoding anything else. Returns
/// the new body and its id span.
fn inject_session_id(body: &[u8], sid: &str) -> Option<(Vec<u8>, (usize, usize))> {
    let field = format!("\"sessionId\":{}", serde_json::to_string(sid).ok()?);
    let out = match envelope::params_object_start(body) {
        Some(at) => {
            let rest = &body[at..];
            let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
            let sep = if empty { "" } else { "," };
            let mut out = Vec::with_capacity(body.len() + field.len() + 1);
            out.extend_from_slice(&body[..at]);
            out.extend_from_slice(field.as_bytes());
            out.extend_from_slice(sep.as_bytes());
            out.extend_from_slice(rest);
            out
        }
        None => {
            if envelope::raw_params(body).is_some() {
                return None;
            }
            let end = body.iter().rposition(|b| *b == b'}')?;
            let mut out = Vec::with_capacity(body.len() + field.len() + 12);
            out.extend_from_slice(&body[..end]);
            out.extend_from_slice(format!(",\"params\":{{{field}}}").as_bytes());
            out.extend_from_slice(&body[end..]);
            out
        }
    };
    let span = envelope::parse(&out).ok()?.id_span?;
    Some((out, span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inject_into_params() {
        let (b, span) = inject_session_id(
            br#"{"jsonrpc":"2.0","id":"q","method":"session.create","params":{"model":"m"}}"#,
            "s-1",
        )
        .unwrap();
        let e = envelope::parse(&b).unwrap();
        assert_eq!(e.session_id.as_deref(), Some("s-1"));
        assert_eq!(&b[span.0..span.1], b"\"q\"");
        let (b, _) = inject_session_id(
            br#"{"jsonrpc":"2.0","params":{ },"id":3,"method":"session.create"}"#,
            "s-2",
        )
        .unwrap();
        assert_eq!(
            envelope::parse(&b).unwrap().session_id.as_deref(),
            Some("s-2")
        );
        let (b, _) = inject_session_id(
            br#"{"jsonrpc":"2.0","id":3,"method":"session.create"}"#,
            "s-3",
        )
        .unwrap();
        assert_eq!(
            envelope::parse(&b).unwrap().session_id.as_deref(),
            Some("s-3")
        );
        assert!(inject_session_id(
            br#"{"jsonrpc":"2.0","id":3,"method":"session.create","params":[1]}"#,
            "x"
        )
        .is_none());
    }
}
