//! The tenant's host-access policy on each request (`crate::policy`): host-level session
//! methods refused without `allow_shell`, and the tool filter of session options rewritten
//! before anything is placed, forwarded or recorded for a failover's replay.

use super::conn::ClientConn;
use super::request::ClientReq;
use crate::policy;
use crate::route::Route;
use crate::{envelope, rpc};
use bytes::Bytes;
use serde_json::json;
use tracing::debug;

impl ClientConn {
    /// Applies the tenant's policy to `req`; `false` once the client has been answered with
    /// a refusal.
    pub(super) async fn host_policy(&self, req: &mut ClientReq) -> bool {
        // Most requests carry nothing the policy reads: decided on the method alone.
        let host_method = policy::is_host_method(&req.method);
        if !matches!(req.route, Route::Create | Route::Resume | Route::Session)
            || !(host_method || policy::applies_to(&req.method))
        {
            return true;
        }
        let tenant = self.tenant();
        if host_method && !tenant.host.allow_shell {
            let m = policy::host_method_refusal(&req.method, &tenant.name);
            let data = rpc::data(
                false,
                json!({"method": req.method, "tenant": tenant.name, "setting": "tenants[].allow_shell"}),
            );
            self.fail(req, rpc::METHOD_NOT_FOUND, &m, data).await;
            return false;
        }
        let body = match policy::apply(&req.body, &req.method, &tenant.host, &tenant.name) {
            Ok(None) => return true,
            Ok(Some(b)) => b,
            Err(why) => {
                let data = rpc::data(false, json!({"method": req.method, "tenant": tenant.name}));
                self.fail(
                    req,
                    rpc::INVALID_PARAMS,
                    &format!("{}: {why}", req.method),
                    data,
                )
                .await;
                return false;
            }
        };
        // The id may sit after params: find it again in the new body.
        let Some(span) = envelope::parse(&body).ok().and_then(|e| e.id_span) else {
            let data = rpc::data(false, json!({"method": req.method}));
            self.fail(
                req,
                rpc::INVALID_PARAMS,
                "params could not be rewritten",
                data,
            )
            .await;
            return false;
        };
        debug!(conn = self.id, method = %req.method, tenant = %tenant.name, "tool policy applied");
        req.body = Bytes::from(body);
        req.id_span = span;
        true
    }
}
