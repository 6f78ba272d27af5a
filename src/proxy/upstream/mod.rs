//! A connection's links to backends: opening them, sending requests over them, and what a
//! link reports back (replies, notifications, CLI requests, its end).

pub(super) mod links;

use super::conn::ClientConn;
use super::link::{Link, LinkEnd, LinkOwner};
use super::membership::joined::starts_turn;
use super::request::ClientReq;
use crate::backend::{Backend, State};
use crate::envelope;
use crate::route::Route;
use crate::rpc;
use crate::wire::Frame;
use bytes::Bytes;
use links::Upstream;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::sync::{Arc, MutexGuard};
use tracing::{debug, info};

impl ClientConn {
    pub(super) fn upstream(&self) -> MutexGuard<'_, Upstream> {
        self.upstream.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client's link to `backend`, opened on first use.
    pub(super) fn link(self: &Arc<Self>, backend: &Arc<Backend>) -> Arc<Link> {
        let mut up = self.upstream();
        if let Some(l) = up.links.get(&backend.name) {
            if !l.is_dead() && Arc::ptr_eq(&l.backend, backend) {
                return l.clone();
            }
        }
        let l = Link::spawn(
            self.clone(),
            self.shared.clone(),
            &self.cancel,
            backend.clone(),
        );
        up.links.insert(backend.name.clone(), l.clone());
        l
    }

    /// This client's live link to the backend named `name`, if it has one (never opens one).
    pub(super) fn open_link(&self, name: &str) -> Option<Arc<Link>> {
        self.upstream()
            .links
            .get(name)
            .filter(|l| !l.is_dead())
            .cloned()
    }

    /// Sends a request over this client's link to `backend`. A request the backend cannot
    /// take (it is down, or its link died before the request was written) comes back for the
    /// caller to re-route.
    pub(super) async fn forward(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        mut req: ClientReq,
    ) -> Result<(), ClientReq> {
        if backend.state() == State::Down {
            return Err(req);
        }
        if let Some(sid) = req
            .session
            .as_deref()
            .filter(|_| crate::proxy::membership::joined::starts_turn(&req.method))
        {
            self.members().turn_on(sid, backend);
        }
        // Requests are counted only where a rolling restart waits for them (a managed CLI),
        // so the path to other backends touches no shared counter.
        if backend.managed {
            req.on = Some(backend.begin_work());
        }
        let link = self.link(backend);
        match link.send_client(req).await {
            Ok(()) => Ok(()),
            // The link died between lookup and send; one fresh link.
            Err(req) => self.link(backend).send_client(req).await,
        }
    }

    /// A read-only process-wide call: any serving backend, in this connection's own
    /// rendezvous order.
    pub(super) async fn global(self: &Arc<Self>, req: ClientReq) {
        match self.shared.pool.first_serving(&format!("conn-{}", self.id)) {
            Some(b) => self.send(b, req).await,
            None => self.no_backend(&req).await,
        }
    }

    /// The client answered a request the CLI made.
    pub(super) async fn client_reply(&self, id: Option<u64>, span: (usize, usize), body: Bytes) {
        let target = id.and_then(|n| self.upstream().server_reqs.remove(&n));
        match target {
            Some((link, orig)) => {
                let fixed = envelope::splice(&body, span, orig.get().as_bytes());
                if !link.send_raw(Bytes::from(fixed)).await {
                    debug!(
                        conn = self.id,
                        "reply to a CLI request arrived after its link closed"
                    );
                }
            }
            None => {
                // Debug, not warn: a misbehaving client must not be able to flood logs.
                self.shared.metrics.bad_frame("unknown_response");
                debug!(
                    conn = self.id,
                    "client sent a response to an unknown request id; dropped"
                );
            }
        }
    }
}

/// The `result.sessionId` of a reply, if it has one.
pub(super) fn reply_session(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.pointer("/result/sessionId")?.as_str().map(str::to_string)
}

/// A reply named a session that belongs to another tenant, so it is not delivered.
#[derive(Debug, thiserror::Error)]
pub(super) enum Withheld {
    /// A create or resume was answered with a session other than the one asked for.
    #[error(
        "{method} of {asked} was answered with session {named}, which belongs to another tenant"
    )]
    Answered {
        method: String,
        asked: String,
        named: String,
    },
}

/// A fork's new session belongs to another tenant (the id is kept for the error's data).
#[derive(Debug, thiserror::Error)]
#[error("the fork's new session {0} belongs to another tenant")]
pub(super) struct ForeignFork(String);

impl ClientConn {
    /// A create or resume of `asked` was answered with another session, `named`: the CLI
    /// resolved the id to a different session. If `named` is the caller's (or nobody's yet)
    /// it is recorded and joined as the caller's; if it is another tenant's the reply is not
    /// delivered, the handle the CLI opened for this link is closed, and `Err` says why.
    pub(super) async fn adopt_reply_session(
        &self,
        link: &Arc<Link>,
        asked: &str,
        named: &str,
        meta: &ClientReq,
    ) -> Result<(), Withheld> {
        let tenant = self.tenant();
        let claim = self
            .shared
            .sessions
            .claim(named, &tenant.name, &link.backend.name, &self.shared.pool)
            .await;
        if meta.route == Route::Create && meta.fresh {
            self.forget_failed_create(asked).await;
        } else {
            self.unjoin(asked);
        }
        // Another tenant's, or not recordable: withheld either way (fail closed).
        if !matches!(
            claim,
            Ok(crate::affinity::Claim::New | crate::affinity::Claim::Existing(_))
        ) {
            tracing::warn!(conn = self.id, asked, named, backend = %link.backend.name, "backend answered with another tenant's session; reply withheld and the handle closed");
            let link = link.clone();
            let sid = named.to_string();
            tokio::spawn(async move {
                let params = json!({"sessionId": sid});
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    link.call("session.detach", &params),
                )
                .await;
            });
            return Err(Withheld::Answered {
                method: meta.method.clone(),
                asked: asked.to_string(),
                named: named.to_string(),
            });
        }
        self.join_as(named, &link.backend.name, meta);
        Ok(())
    }

    /// Records the session a `sessions.fork` reply names as the caller's, on the backend that
    /// made it. `Err` with the id when that id already belongs to another tenant.
    async fn record_fork(&self, link: &Link, body: &[u8]) -> Result<(), ForeignFork> {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let Some(new) = v.pointer("/result/sessionId").and_then(Value::as_str) else {
            return Ok(());
        };
        let tenant = self.tenant();
        match self
            .shared
            .sessions
            .claim(new, &tenant.name, &link.backend.name, &self.shared.pool)
            .await
        {
            Ok(crate::affinity::Claim::Foreign) | Err(_) => Err(ForeignFork(new.to_string())),
            Ok(_) => {
                info!(conn = self.id, session = %new, backend = %link.backend.name, "forked session recorded");
                Ok(())
            }
        }
    }
}

impl LinkOwner for ClientConn {
    fn conn_id(&self) -> u64 {
        self.id
    }

    fn telemetry(&self) -> bool {
        ClientConn::telemetry(self)
    }

    async fn reply(
        &self,
        link: &Arc<Link>,
        meta: ClientReq,
        body: &Bytes,
        span: (usize, usize),
        is_error: bool,
    ) {
        if meta.method == "sessions.fork" && !is_error {
            if let Err(e) = self.record_fork(link, body).await {
                let data = rpc::data(false, json!({"sessionId": e.0}));
                return self
                    .fail(&meta, rpc::SESSION_FORBIDDEN, &e.to_string(), data)
                    .await;
            }
        }
        if matches!(meta.route, Route::Create | Route::Resume) && !is_error {
            if let (Some(asked), Some(named)) = (&meta.session, reply_session(body)) {
                if named != *asked {
                    if let Err(e) = self.adopt_reply_session(link, asked, &named, &meta).await {
                        let data = rpc::data(false, json!({"sessionId": named}));
                        return self
                            .fail(&meta, rpc::SESSION_FORBIDDEN, &e.to_string(), data)
                            .await;
                    }
                }
            }
        }
        let out = Frame::spliced(body, span, Bytes::copy_from_slice(meta.id.get().as_bytes()));
        if let (Some(sid), true) = (&meta.session, starts_turn(&meta.method)) {
            self.members().turn_answered(sid, is_error);
        }
        if let Some(sid) = &meta.session {
            match meta.route {
                Route::Create if is_error => self.forget_failed_create(sid).await,
                Route::Resume if is_error => self.unjoin(sid),
                Route::Create => {
                    info!(conn = self.id, session = %sid, backend = %link.backend.name, "session created")
                }
                Route::Delete if !is_error => {
                    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                    if v.pointer("/result/success").and_then(Value::as_bool) == Some(true) {
                        self.unjoin(sid);
                        self.forget_session(sid).await;
                        info!(conn = self.id, session = %sid, "session deleted");
                    }
                }
                _ => {}
            }
        }
        let result = if is_error { "error" } else { "ok" };
        self.shared
            .metrics
            .reply(meta.class(), result, meta.started);
        self.send_to_client(out).await;
    }

    async fn reply_frame(
        &self,
        _link: &Arc<Link>,
        meta: ClientReq,
        frame: Frame,
        is_error: bool,
    ) -> bool {
        // Only replies the proxy records nothing from are streamed (`streams_reply`).
        if let (Some(sid), true) = (&meta.session, starts_turn(&meta.method)) {
            self.members().turn_answered(sid, is_error);
        }
        let result = if is_error { "error" } else { "ok" };
        self.shared
            .metrics
            .reply(meta.class(), result, meta.started);
        self.send_to_client(frame).await
    }

    async fn event_frame(
        self: &Arc<Self>,
        method: &str,
        session: Option<&str>,
        frame: Frame,
    ) -> bool {
        // A streamed event is too big to end a turn (`ends_turn`): its body is not needed.
        self.admit_notification(method, session, &[]) && self.send_to_client(frame).await
    }

    async fn refuse(&self, req: ClientReq, code: i64, message: String, data: Value) {
        self.fail(&req, code, &message, data).await;
    }

    async fn notification(self: &Arc<Self>, method: &str, session: Option<&str>, body: Bytes) {
        if self.admit_notification(method, session, &body) {
            self.send_to_client(body).await;
        }
    }

    fn backend_leaving(self: &Arc<Self>, backend: &Arc<Backend>) {
        self.move_off(&backend.name);
    }

    async fn cli_request(
        &self,
        link: &Arc<Link>,
        id: Box<RawValue>,
        span: (usize, usize),
        method: &str,
        body: &[u8],
    ) {
        // The id becomes a proxy-allocated non-negative integer, mapped back when the client
        // answers: ids from several backends can never collide on the client.
        let n = {
            let mut up = self.upstream();
            up.next_srv += 1;
            let n = up.next_srv;
            up.server_reqs.insert(n, (link.clone(), id));
            n
        };
        debug!(conn = self.id, backend = %link.backend.name, method, "CLI request forwarded to client");
        let out = envelope::splice(body, span, n.to_string().as_bytes());
        self.send_to_client(Bytes::from(out)).await;
    }

    fn ended(
        self: &Arc<Self>,
        link: &Link,
        why: &LinkEnd,
        reason: &str,
        unsent: Vec<ClientReq>,
        in_flight: Vec<ClientReq>,
    ) {
        self.upstream().link_ended(link);
        let established = matches!(why, LinkEnd::Broken(_) | LinkEnd::Fenced | LinkEnd::Cut);
        if established {
            self.members().link_lost(&link.backend.name);
        }
        if matches!(why, LinkEnd::Closed) || self.cancel.is_cancelled() {
            return;
        }
        let me = self.clone();
        let backend = link.backend.clone();
        let reason = reason.to_string();
        self.spawn_for_request(async move {
            if established {
                // A refused reconnect sent nothing; only a link that carried turns loses them.
                me.turns_lost(&backend.name, &reason).await;
                if backend.edge {
                    // A sidecar: the app's sessions move to another edge now, so their events
                    // flow again without waiting for the app's next request.
                    me.move_off(&backend.name);
                }
            }
            for meta in in_flight {
                if meta.route == Route::Create && meta.fresh {
                    // It may never have run: a retry must be free to place it elsewhere.
                    if let Some(sid) = &meta.session {
                        me.forget_failed_create(sid).await;
                    }
                }
                let m = format!(
                    "{} was in flight when {reason}; it may not have completed and may be retried",
                    meta.method
                );
                let data = rpc::data(
                    true,
                    json!({"backend": backend.name, "sessionId": meta.session}),
                );
                me.fail(&meta, rpc::BACKEND_UNAVAILABLE, &m, data).await;
            }
            for req in unsent {
                // A streamed request refused mid-frame is answered and its rest is gone.
                if req.answered() {
                    continue;
                }
                me.reroute(req, &backend).await;
            }
        });
    }
}
