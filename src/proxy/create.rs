//! `session.create` (and `sessions.open {kind: create}`): the session id (injected when the
//! client sent none), the tenant's rules, placement and the claim in the session table.

use super::conn::ClientConn;
use super::failover::plan::Refusal;
use super::request::ClientReq;
use crate::affinity::Claim;
use crate::backend::Backend;
use crate::envelope;
use crate::rpc;
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// How long the proxy waits for the CLI to say whether a session id is already on its disk.
const EXISTS_TIMEOUT: Duration = Duration::from_secs(5);

impl ClientConn {
    pub(super) async fn create(self: &Arc<Self>, mut req: ClientReq) {
        if let Some(b) = self.admit_create(&mut req).await {
            self.send(b, req).await;
        }
    }

    /// Checks a create against the tenant's rules, places it (avoiding `req.avoid`) and
    /// claims it; `None` once the client has been answered with a refusal.
    pub(super) async fn admit_create(
        self: &Arc<Self>,
        req: &mut ClientReq,
    ) -> Option<Arc<Backend>> {
        let tenant = self.tenant();
        let chosen = req.session.is_some();
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
                // The registry has no record, but the CLI's storage may: a session made behind
                // the proxy, before its registry existed, or by a replica on another registry.
                // The CLI's create would reuse that directory, and a later resume would load
                // its history; so an id already on disk belongs to nobody, as on resume.
                if chosen && !tenant.may_adopt(&sid) {
                    if let Err(refusal) = self.not_on_disk(&backend, &sid).await {
                        self.forget_session(&sid).await;
                        let data = rpc::data(refusal.retryable, json!({"sessionId": sid}));
                        self.fail(req, refusal.code, &refusal.message, data).await;
                        return None;
                    }
                }
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

impl ClientConn {
    /// Asks `b` whether `sid` already exists in its session storage (`sessions.getMetadata`
    /// reads it without opening it). Fails closed: an answer the proxy cannot read, or none in
    /// time, refuses the create.
    async fn not_on_disk(self: &Arc<Self>, b: &Arc<Backend>, sid: &str) -> Result<(), Refusal> {
        let link = self.link(b);
        let asked = tokio::time::timeout(
            EXISTS_TIMEOUT,
            link.call("sessions.getMetadata", &json!({ "sessionId": sid })),
        )
        .await;
        let reply = match asked {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Err(Refusal {
                    code: rpc::BACKEND_UNAVAILABLE,
                    message: format!("session.create {sid}: backend {} could not be asked whether the id is free ({e}); retry", b.name),
                    retryable: true,
                })
            }
            Err(_) => {
                return Err(Refusal {
                    code: rpc::BACKEND_UNAVAILABLE,
                    message: format!("session.create {sid}: backend {} did not say within {EXISTS_TIMEOUT:?} whether the id is free; retry", b.name),
                    retryable: true,
                })
            }
        };
        on_disk_verdict(&reply, sid)
    }
}

/// Reads a `sessions.getMetadata` reply: `{"result": {}}` means no such session; one with a
/// `session` means it exists (and, unknown to the registry, belongs to nobody); anything else
/// is refused, as the proxy cannot tell.
fn on_disk_verdict(reply: &[u8], sid: &str) -> Result<(), Refusal> {
    let v: Value = serde_json::from_slice(reply).unwrap_or(Value::Null);
    match v.get("result") {
        Some(Value::Object(r)) if r.get("session").is_none_or(Value::is_null) => Ok(()),
        Some(Value::Object(_)) => Err(Refusal {
            code: rpc::SESSION_FORBIDDEN,
            message: format!("session {sid} does not exist or belongs to another tenant"),
            retryable: false,
        }),
        _ => Err(Refusal {
            code: rpc::BACKEND_UNAVAILABLE,
            message: format!("session.create {sid}: the backend's answer to sessions.getMetadata could not be read, so the id cannot be shown to be free: {}", v.get("error").map(Value::to_string).unwrap_or_default()),
            retryable: false,
        }),
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
    fn an_id_on_disk_is_nobodys_and_an_unreadable_answer_refuses() {
        assert!(on_disk_verdict(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#, "s").is_ok());
        assert!(on_disk_verdict(
            br#"{"jsonrpc":"2.0","id":1,"result":{"session":null}}"#,
            "s"
        )
        .is_ok());
        let r = on_disk_verdict(
            br#"{"jsonrpc":"2.0","id":1,"result":{"session":{"sessionId":"s"}}}"#,
            "s",
        )
        .unwrap_err();
        assert_eq!(r.code, rpc::SESSION_FORBIDDEN);
        for bad in [
            &br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"result":null}"#,
            b"not json",
        ] {
            assert_eq!(
                on_disk_verdict(bad, "s").unwrap_err().code,
                rpc::BACKEND_UNAVAILABLE
            );
        }
    }

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
