//! Admission of turns: a tenant's `max_concurrent_turns`, then the session's backend's
//! `max_concurrent_turns` with its fair queue (`crate::fair`). A refused turn gets -32016,
//! retryable; nothing waits without a bound (the queue has `balancing.max_waiting_turns`
//! places and each waits at most `balancing.turn_wait`).

use super::super::conn::ClientConn;
use super::super::request::ClientReq;
use crate::fair::{Admission, TurnSlot};
use crate::rpc;
use serde_json::json;
use std::sync::Arc;

/// How long a client refused by a backend's turn cap is told to wait before retrying.
const BACKEND_RETRY_MS: u64 = 1000;

impl ClientConn {
    /// A turn-starting request whose ownership was checked: admitted (and counted until its
    /// turn ends), then forwarded; or refused.
    pub(in crate::proxy) async fn turn_call(self: &Arc<Self>, req: ClientReq, sid: String) {
        // One turn per session: a send into a running turn is queued by the CLI inside it.
        if self.members().in_turn(&sid) {
            return self.to_session_backend(req).await;
        }
        let tenant = self.tenant();
        let mut slot = match tenant.limits.try_turn() {
            Ok(s) => s,
            Err(max) => {
                self.shared.metrics.limited("tenant_turns");
                let m = format!(
                    "tenant {} has {max} turns in progress, its max_concurrent_turns; retry once one of them ends (its session.idle or session.error)",
                    tenant.name
                );
                let data = rpc::data(true, json!({"limit": "max_concurrent_turns", "max": max}));
                return self.fail(&req, rpc::RATE_LIMITED, &m, data).await;
            }
        };
        let cfg = self.shared.config();
        let gate = self.shared.sessions.get(&sid).and_then(|p| {
            let cap = cfg
                .backends
                .iter()
                .find(|b| b.name() == p.backend)?
                .max_concurrent_turns?;
            let cap = usize::try_from(cap).unwrap_or(usize::MAX);
            Some(
                self.shared
                    .turn_gates
                    .gate(&p.backend, cap, cfg.balancing.max_waiting_turns),
            )
        });
        let Some(gate) = gate else {
            return self.run_turn(req, sid, slot).await;
        };
        let name: Arc<str> = Arc::from(tenant.name.as_str());
        match gate.admit(&name) {
            Admission::Now(b) => {
                slot.on_backend(b);
                self.run_turn(req, sid, slot).await
            }
            Admission::Full => self.backend_busy(&req, "its queue is full").await,
            Admission::Wait(rx) => {
                let wait = cfg.balancing.turn_wait.0;
                let me = self.clone();
                // Waiting must not hold up the connection's other requests.
                self.spawn_for_request(async move {
                    let granted = tokio::select! {
                        r = tokio::time::timeout(wait, rx) => r,
                        _ = me.cancel.cancelled() => return,
                    };
                    match granted {
                        Ok(Ok(b)) => {
                            slot.on_backend(b);
                            me.run_turn(req, sid, slot).await
                        }
                        Ok(Err(_)) => {
                            me.backend_busy(
                                &req,
                                "a tenant with fewer turns took its place in the queue",
                            )
                            .await
                        }
                        Err(_) => {
                            let why =
                                format!("no slot freed within balancing.turn_wait ({wait:?})");
                            me.backend_busy(&req, &why).await
                        }
                    }
                });
            }
        }
    }

    async fn run_turn(self: &Arc<Self>, req: ClientReq, sid: String, slot: TurnSlot) {
        self.members().start_turn(&sid, slot);
        self.to_session_backend(req).await
    }

    async fn backend_busy(&self, req: &ClientReq, why: &str) {
        self.shared.metrics.limited("backend_turns");
        let m = format!(
            "the CLI server of this session is running its max_concurrent_turns and {why}; retry in {BACKEND_RETRY_MS} ms"
        );
        let data = rpc::data(
            true,
            json!({"limit": "backend_max_concurrent_turns", "retryAfterMs": BACKEND_RETRY_MS}),
        );
        self.fail(req, rpc::RATE_LIMITED, &m, data).await
    }

    /// The tenant's rate limit, for a request that would go to a backend. Returns false after
    /// answering.
    pub(in crate::proxy) async fn within_rate(&self, req: &ClientReq) -> bool {
        // No Arc clone, no allocation: the connection's own lock and the tenant's atomic.
        let refused = {
            let who = self.who();
            match &who.tenant {
                Some(t) => t.limits.check_rate().err().map(|e| (e, t.name.clone())),
                None => None,
            }
        };
        let Some((e, tenant)) = refused else {
            return true;
        };
        self.shared.metrics.limited("rate");
        let ms = e.retry_after.as_millis().max(1) as u64;
        let m = format!(
            "tenant {tenant} exceeds its rate limit ({} requests/s, burst {}); retry in {ms} ms",
            e.per_second, e.burst
        );
        let data = rpc::data(true, json!({"limit": "rate_limit", "retryAfterMs": ms}));
        self.fail(req, rpc::RATE_LIMITED, &m, data).await;
        false
    }
}
