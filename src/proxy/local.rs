//! What the proxy answers itself: `connect` (authentication), `ping`,
//! `session.getForeground`, and every refusal that needs no backend.

use super::conn::ClientConn;
use super::request::ClientReq;
use crate::envelope;
use crate::route::Denial;
use crate::rpc;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::warn;

impl ClientConn {
    /// `connect`: authenticates the client with its token (and certificate identity).
    pub(super) async fn on_connect(self: &Arc<Self>, req: ClientReq) {
        let params = params_of(&req);
        let token = params.get("token").and_then(Value::as_str);
        let verdict = self.shared.auth().authenticate(token, self.identity());
        match verdict {
            Ok(tenant) => {
                let telemetry = params
                    .get("enableGitHubTelemetryForwarding")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                self.telemetry.store(telemetry, Ordering::Relaxed);
                let goaway = params
                    .get(rpc::GOAWAY_OPT_IN)
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                self.goaway.store(goaway, Ordering::Release);
                {
                    let mut who = self.who();
                    who.authenticated = true;
                    who.tenant = Some(tenant);
                }
                self.shared.metrics.request("local", "ok");
                let version = self.shared.backend_version();
                self.reply_result(req.id.get(), &json!({"ok": true, "protocolVersion": rpc::PROTOCOL_VERSION, "version": version}))
                    .await;
            }
            Err((code, msg)) => {
                self.shared.metrics.request("local", "proxy_error");
                warn!(conn = self.id, peer = %self.peer, identity = ?self.identity(), code, "client connect refused");
                self.reply_error(req.id.get(), code, msg, None).await;
            }
        }
    }

    /// `ping` and `session.getForeground` (connect is handled before authentication).
    pub(super) async fn local(&self, req: ClientReq) {
        self.shared.metrics.request("local", "ok");
        if req.method == "session.getForeground" {
            // A headless CLI has no foreground session and answers `{}`.
            return self.reply_result(req.id.get(), &json!({})).await;
        }
        let params = params_of(&req);
        let msg = params.get("message").and_then(Value::as_str).unwrap_or("");
        self.reply_result(
            req.id.get(),
            &json!({"message": format!("pong: {msg}"), "timestamp": rpc::now_millis(), "protocolVersion": rpc::PROTOCOL_VERSION}),
        )
        .await;
    }

    /// A method the proxy does not forward.
    pub(super) async fn denied(&self, req: ClientReq, d: Denial) {
        let m = d.message(&req.method);
        let data = rpc::data(false, json!({"method": req.method}));
        self.fail(&req, rpc::METHOD_NOT_FOUND, &m, data).await;
    }

    /// No backend can take the request.
    pub(super) async fn no_backend(&self, req: &ClientReq) {
        self.fail(
            req,
            rpc::BACKEND_UNAVAILABLE,
            "no Copilot CLI backend is available (all are down or draining)",
            rpc::data(true, json!({})),
        )
        .await;
    }

    /// The session registry could not answer a question the request depends on: fail closed,
    /// retryable (the store's error text carries no credentials).
    pub(super) async fn registry_down(&self, req: &ClientReq, e: &crate::registry::StoreError) {
        let m = format!("copilot-lb's session registry is unavailable ({e}); the request was not processed and may be retried");
        self.shared.metrics.registry_refusal();
        self.fail(
            req,
            rpc::BACKEND_UNAVAILABLE,
            &m,
            rpc::data(true, json!({})),
        )
        .await;
    }

    /// The tenant's `max_sessions` refusal, if one more live session would pass it.
    pub(super) fn tenant_over_cap(&self, tenant: &crate::auth::Tenant) -> Option<(String, Value)> {
        let limit = tenant.max_sessions?;
        (self.shared.sessions.fleet_owned_by(&tenant.name) >= limit).then(|| {
            let m = format!(
                "tenant {} already holds its maximum of {limit} live sessions",
                tenant.name
            );
            (m, rpc::data(true, json!({"limit": limit})))
        })
    }

    /// A call on a session owned by another tenant (or unknown and not claimable).
    pub(super) async fn foreign(&self, req: &ClientReq, sid: &str) {
        let m = format!("session {sid} does not exist or belongs to another tenant");
        self.fail(
            req,
            rpc::SESSION_FORBIDDEN,
            &m,
            rpc::data(false, json!({"sessionId": sid})),
        )
        .await;
    }
}

fn params_of(req: &ClientReq) -> Value {
    envelope::raw_params(&req.body)
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or(Value::Null)
}
