//! One client (SDK) connection: handshake, routing of every request, and delivery of replies,
//! events and CLI callbacks back to it.

use super::link::{ClientReq, Link, LinkEnd};
use super::Shared;
use crate::auth::Tenant;
use crate::backend::{Backend, State};
use crate::balance;
use crate::codec::{CodecError, FrameReader};
use crate::envelope::{self, Kind};
use crate::route::{self, Route};
use crate::tls::ServerTlsStore;
use crate::{rpc, wire};
use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a resume waits for a closed client's link to the session to finish closing.
const RELEASE_LIMIT: Duration = Duration::from_millis(250);

/// How long a fan-out waits for each backend.
const FANOUT_TIMEOUT: Duration = Duration::from_secs(30);

/// A session this connection created or resumed, with what it would take to resume it again.
#[derive(Debug, Clone)]
struct Joined {
    backend: String,
    /// The raw params of the last create/resume (memory only: may hold provider keys).
    params: Option<String>,
    /// A turn was sent and no `session.idle`/`session.error` seen yet.
    turn: bool,
    /// The link it was joined through broke: the CLI released it for this connection (or
    /// restarted without it), so it must be resumed again before its next request.
    lost_link: bool,
}

impl Joined {
    /// Whether using the session on `backend` first needs a `session.resume` there.
    fn needs_resume_on(&self, backend: &str) -> bool {
        self.lost_link || self.backend != backend
    }
}

#[derive(Default)]
struct ConnState {
    authenticated: bool,
    tenant: Option<Arc<Tenant>>,
    telemetry: bool,
    links: HashMap<String, Arc<Link>>,
    joined: HashMap<String, Joined>,
    known: HashSet<String>,
    server_reqs: HashMap<u64, (Arc<Link>, Box<RawValue>)>,
    requests: u64,
    /// Sessions whose failover is in progress on this connection; their requests queue here.
    holds: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

/// Why a session cannot be served, as a JSON-RPC error.
struct Refusal {
    code: i64,
    message: String,
    retryable: bool,
}

/// A connected SDK client.
pub struct ClientConn {
    /// Connection number (logs, metrics, rendezvous key for global calls).
    pub id: u64,
    /// Peer address.
    pub peer: String,
    /// Process-wide state.
    pub shared: Arc<Shared>,
    /// Cancelled when the client goes away; every link is a child of it.
    pub cancel: CancellationToken,
    out: mpsc::Sender<Bytes>,
    /// Byte budget of `out` (`limits.max_queued_reply_bytes`); closed when the writer ends.
    out_budget: Arc<tokio::sync::Semaphore>,
    /// The budget's size: a larger frame takes all of it.
    out_limit: usize,
    st: Mutex<ConnState>,
    next_srv: AtomicU64,
    /// Tasks working on this client's requests (fan-outs, resume probes, failovers, re-routes):
    /// in flight too, though no link holds them.
    busy: AtomicUsize,
    /// TLS peer facts (TLS listeners only).
    pub tls: Option<PeerTls>,
}

/// TLS facts about a client connection.
pub struct PeerTls {
    /// Identity from the client certificate (URI SAN, DNS SAN or CN).
    pub identity: Option<String>,
    /// The client's certificate chain, re-verified when the CA or clock changes.
    pub chain: Vec<CertificateDer<'static>>,
    /// The listener's TLS store.
    pub store: Arc<ServerTlsStore>,
}

/// Serves one accepted plain-TCP client connection to completion.
pub async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: String) {
    wire::tune(&stream);
    let (r, w) = stream.into_split();
    let reader = FrameReader::new(r, shared.limits()).with_on_partial(wire::quickack);
    run(shared, reader, w, peer, None).await;
}

/// Serves one client connection that completed a TLS handshake.
pub async fn serve_tls(
    shared: Arc<Shared>,
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: String,
    tls: PeerTls,
) {
    let (r, w) = tokio::io::split(stream);
    let reader = FrameReader::new(r, shared.limits());
    run(shared, reader, w, peer, Some(tls)).await;
}

async fn run<R, W>(
    shared: Arc<Shared>,
    mut reader: FrameReader<R>,
    w: W,
    peer: String,
    tls: Option<PeerTls>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel::<Bytes>(1024);
    let out_limit = shared
        .config()
        .limits
        .max_queued_reply_bytes
        .clamp(1, u32::MAX as usize);
    let out_budget = Arc::new(tokio::sync::Semaphore::new(out_limit));
    let id = shared.next_conn_id();
    let conn = Arc::new(ClientConn {
        id,
        peer: peer.clone(),
        shared: shared.clone(),
        cancel: CancellationToken::new(),
        out: out_tx,
        out_budget: out_budget.clone(),
        out_limit,
        st: Mutex::new(ConnState::default()),
        next_srv: AtomicU64::new(1),
        busy: AtomicUsize::new(0),
        tls,
    });
    shared.conns.insert(id, Arc::downgrade(&conn));
    shared.metrics.connections_total.inc();
    shared.metrics.connections_active.inc();
    let started = Instant::now();
    debug!(conn = id, %peer, identity = ?conn.identity(), "client connected");
    let budget = out_budget.clone();
    let writer = tokio::spawn(async move {
        let mut out_rx = out_rx;
        let res = wire::writer_with(w, &mut out_rx, |body: Bytes| {
            budget.add_permits(body.len().clamp(1, out_limit));
            Some(body)
        })
        .await;
        budget.close();
        res
    });
    // One cancellation waiter for the connection's life, not one registered per frame.
    let cancelled = conn.cancel.clone().cancelled_owned();
    tokio::pin!(cancelled);
    // Closing with unread input makes the kernel send a reset, which can destroy the error
    // reply before the client reads it; after a fatal framing error, input is drained briefly.
    let mut linger = false;
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut cancelled => break,
            f = reader.read_frame() => f,
        };
        match frame {
            Ok(Some(body)) => {
                crate::runtime::activity();
                shared.metrics.frame("client_in", body.len());
                conn.on_client_frame(body).await;
            }
            Ok(None) => {
                // A client may half-close once it has sent its last request: it still reads.
                conn.settle().await;
                break;
            }
            Err(CodecError::FrameTooLarge {
                len,
                limit,
                head,
                skippable,
            }) => {
                shared
                    .metrics
                    .bad_frames
                    .get_or_create(&crate::metrics::ReasonLabels { reason: "oversize" })
                    .inc();
                let rid = envelope::sniff_id(&head).unwrap_or_else(|| "null".into());
                warn!(conn = id, request = %rid, len, limit, skippable, "oversized frame refused");
                let msg = if skippable {
                    format!("frame of {len} bytes exceeds copilot-lb's limit of {limit} bytes (limits.max_frame_bytes); it is discarded")
                } else {
                    format!("frame of {len} bytes exceeds copilot-lb's limit of {limit} bytes (limits.max_frame_bytes) and is too long to skip; the connection is closed")
                };
                conn.reply_error(
                    &rid,
                    rpc::FRAME_TOO_LARGE,
                    &msg,
                    Some(rpc::data(false, json!({"limit": limit, "length": len}))),
                )
                .await;
                if !skippable {
                    linger = true;
                    break;
                }
            }
            Err(
                e @ (CodecError::MissingContentLength
                | CodecError::InvalidContentLength(_)
                | CodecError::MalformedHeader(_)
                | CodecError::HeaderTooLarge { .. }),
            ) => {
                shared
                    .metrics
                    .bad_frames
                    .get_or_create(&crate::metrics::ReasonLabels { reason: "framing" })
                    .inc();
                warn!(conn = id, error = %e, "framing error; closing connection");
                conn.reply_error("null", rpc::PARSE_ERROR, &e.to_string(), None)
                    .await;
                linger = true;
                break;
            }
            Err(e) => {
                debug!(conn = id, error = %e, "client read ended");
                break;
            }
        }
    }
    let summary = conn.close();
    shared.conns.remove(&id);
    drop(conn);
    // A client that stopped reading could block its writer forever; give queued replies a
    // bounded chance to drain, then drop the socket.
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        abort.abort();
        debug!(
            conn = id,
            "client did not read its last replies; connection dropped"
        );
    }
    // Nothing will read the queue again: release whoever waits to add to it.
    out_budget.close();
    if linger {
        let mut rest = reader.into_inner();
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::io::copy(&mut rest, &mut tokio::io::sink()),
        )
        .await;
    }
    shared.metrics.connections_active.dec();
    info!(conn = id, %peer, duration_ms = started.elapsed().as_millis() as u64, requests = summary.0, sessions = summary.1, "client connection closed");
}

impl ClientConn {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client certificate's identity, if any.
    pub fn identity(&self) -> Option<&str> {
        self.tls.as_ref().and_then(|t| t.identity.as_deref())
    }

    /// Closes the connection once its in-flight requests are answered (its certificate no
    /// longer verifies).
    pub fn revoke(self: &Arc<Self>, why: String) {
        let me = self.clone();
        tokio::spawn(async move {
            warn!(conn = me.id, identity = ?me.identity(), reason = %why, "client certificate no longer valid; closing after in-flight requests");
            let deadline =
                crate::config::deadline_after(me.shared.config().limits.shutdown_timeout.0);
            while me.in_flight() > 0 && Instant::now() < deadline && !me.cancel.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            me.shut();
        });
    }

    /// Whether the client asked for telemetry forwarding in its `connect`.
    pub fn telemetry(&self) -> bool {
        self.lock().telemetry
    }

    fn tenant(&self) -> Arc<Tenant> {
        self.lock()
            .tenant
            .clone()
            .unwrap_or_else(|| self.shared.auth().anonymous())
    }

    /// Queues a body for the client; a closed client just drops it.
    pub async fn send_to_client(&self, body: Bytes) {
        self.shared.metrics.frame("client_out", body.len());
        // Closed budget: the client is gone, and so is the body.
        let cost = body.len().clamp(1, self.out_limit) as u32;
        let Ok(permit) = self.out_budget.acquire_many(cost).await else {
            return;
        };
        permit.forget();
        let _ = self.out.send(body).await;
    }

    async fn reply_error(&self, id: &str, code: i64, message: &str, data: Option<Value>) {
        self.send_to_client(Bytes::from(rpc::error(id, code, message, data)))
            .await;
    }

    async fn reply_result(&self, id: &str, result: &Value) {
        self.send_to_client(Bytes::from(rpc::result(id, result)))
            .await;
    }

    async fn fail(&self, req: &ClientReq, code: i64, message: &str, data: Value) {
        self.shared
            .metrics
            .request(route::class_label(req.route), "proxy_error");
        debug!(conn = self.id, method = %req.method, code, message, "request answered with a proxy error");
        self.reply_error(req.id.get(), code, message, Some(data))
            .await;
    }

    /// Client requests this connection is waiting on (graceful shutdown waits for zero).
    pub fn in_flight(&self) -> usize {
        let links: Vec<_> = self.lock().links.values().cloned().collect();
        let holds = self.lock().holds.len();
        links.iter().map(|l| l.pending_client()).sum::<usize>()
            + holds
            + self.busy.load(Ordering::Acquire)
    }

    /// Waits until every request in flight is answered, at most `limits.shutdown_timeout`.
    async fn settle(&self) {
        let deadline =
            crate::config::deadline_after(self.shared.config().limits.shutdown_timeout.0);
        // Not once the CLI asks this client something: a client that can no longer write can
        // never answer, so whatever waits on that answer would never complete.
        while self.in_flight() > 0
            && self.lock().server_reqs.is_empty()
            && Instant::now() < deadline
            && !self.cancel.is_cancelled()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Runs work for this client's requests in a task, counted in [`ClientConn::in_flight`].
    fn spawn_for_request<F>(self: &Arc<Self>, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        struct Busy(Arc<ClientConn>);
        impl Drop for Busy {
            fn drop(&mut self) {
                self.0.busy.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.busy.fetch_add(1, Ordering::AcqRel);
        let busy = Busy(self.clone());
        tokio::spawn(async move {
            let _busy = busy;
            work.await;
        });
    }

    /// Closes the connection (graceful shutdown of an idle client).
    pub fn shut(&self) {
        self.cancel.cancel();
    }

    /// Closes every link and releases this connection's sessions. Returns (requests, sessions).
    fn close(&self) -> (u64, usize) {
        let (links, joined, requests) = {
            let mut st = self.lock();
            if !st.joined.is_empty() {
                let held = st
                    .joined
                    .iter()
                    .filter_map(|(sid, j)| st.links.get(&j.backend).map(|l| (sid, l.released())));
                self.shared.releasing(held);
            }
            let links: Vec<_> = st.links.drain().map(|(_, l)| l).collect();
            let joined: Vec<_> = st.joined.drain().map(|(s, _)| s).collect();
            st.server_reqs.clear();
            (links, joined, st.requests)
        };
        self.cancel.cancel();
        for l in links {
            l.close();
        }
        for s in &joined {
            self.shared.sessions.leave(s, &self.shared.pool);
        }
        self.shared.refresh_gauges();
        (requests, joined.len())
    }

    async fn on_client_frame(self: &Arc<Self>, body: Bytes) {
        let checked = envelope::check_text(&body, self.shared.max_json_depth());
        let env = match checked.and_then(|()| envelope::parse(&body)) {
            Ok(e) => e,
            Err(e) => {
                self.shared
                    .metrics
                    .bad_frames
                    .get_or_create(&crate::metrics::ReasonLabels { reason: "invalid" })
                    .inc();
                let id = envelope::sniff_id(&body).unwrap_or_else(|| "null".into());
                self.reply_error(&id, e.code(), &e.to_string(), None).await;
                return;
            }
        };
        match env.kind {
            Kind::Request => {
                let Some(id) = env.id.map(|r| r.to_owned()) else {
                    return;
                };
                let id_span = env.id_span.unwrap_or((0, 0));
                let method = env.method.as_deref().unwrap_or("").to_string();
                let session = env.session_id.as_deref().map(str::to_string);
                let params_ok = env.params_is_object;
                drop(env);
                let mut session = session;
                let mut route = route::classify(&method, session.is_some());
                if route::SPECIAL_SESSION_FIELDS.contains(&method.as_str()) {
                    let params: Value = envelope::raw_params(&body)
                        .and_then(|p| serde_json::from_str(p).ok())
                        .unwrap_or(Value::Null);
                    match route::special(&method, &params) {
                        Ok((sid, r)) => {
                            session = Some(sid);
                            route = r;
                        }
                        Err(why) => {
                            self.shared.metrics.request("denied", "proxy_error");
                            let id = envelope::parse(&body)
                                .ok()
                                .and_then(|e| e.id.map(|r| r.get().to_string()))
                                .unwrap_or_else(|| "null".into());
                            return self
                                .reply_error(
                                    &id,
                                    rpc::METHOD_NOT_FOUND,
                                    &why,
                                    Some(rpc::data(false, json!({"method": method}))),
                                )
                                .await;
                        }
                    }
                }
                let req = ClientReq {
                    body,
                    id,
                    id_span,
                    method,
                    session,
                    route,
                    started: Instant::now(),
                    fresh: false,
                    attempts: 0,
                    avoid: Vec::new(),
                };
                self.lock().requests += 1;
                if !params_ok && req.route != Route::Local {
                    let m = format!("{}: params must be an object", req.method);
                    self.fail(&req, rpc::INVALID_PARAMS, &m, rpc::data(false, json!({})))
                        .await;
                    return;
                }
                self.on_request(req).await;
            }
            Kind::Response => {
                let n = env.id_u64();
                let span = env.id_span.unwrap_or((0, 0));
                drop(env);
                let target = n.and_then(|n| self.lock().server_reqs.remove(&n));
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
                        self.shared
                            .metrics
                            .bad_frames
                            .get_or_create(&crate::metrics::ReasonLabels {
                                reason: "unknown_response",
                            })
                            .inc();
                        debug!(
                            conn = self.id,
                            "client sent a response to an unknown request id; dropped"
                        );
                    }
                }
            }
            Kind::Notification => {
                // Only .NET sends one ($/cancelRequest), and the CLI ignores it.
                debug!(
                    conn = self.id,
                    method = env.method.as_deref().unwrap_or(""),
                    "client notification dropped"
                );
            }
        }
    }

    async fn on_request(self: &Arc<Self>, req: ClientReq) {
        let auth = self.shared.auth();
        if req.method == "connect" {
            return self.on_connect(req).await;
        }
        if auth.required() && !self.lock().authenticated {
            self.shared
                .metrics
                .request(route::class_label(req.route), "proxy_error");
            return self
                .reply_error(
                    req.id.get(),
                    rpc::AUTHENTICATION_REQUIRED,
                    "AUTHENTICATION_REQUIRED",
                    None,
                )
                .await;
        }
        self.dispatch(req).await;
    }

    async fn on_connect(self: &Arc<Self>, req: ClientReq) {
        let params: Value = envelope::raw_params(&req.body)
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or(Value::Null);
        let token = params.get("token").and_then(Value::as_str);
        let auth = self.shared.auth();
        let verdict = auth.authenticate(token, self.identity());
        match verdict {
            Ok(tenant) => {
                {
                    let mut st = self.lock();
                    st.authenticated = true;
                    st.tenant = Some(tenant);
                    st.telemetry = params
                        .get("enableGitHubTelemetryForwarding")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
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

    async fn dispatch(self: &Arc<Self>, req: ClientReq) {
        match req.route {
            Route::Local if req.method == "session.getForeground" => {
                self.shared.metrics.request("local", "ok");
                self.reply_result(req.id.get(), &json!({})).await;
            }
            Route::Local => {
                // `ping` (connect is handled before authentication).
                let params: Value = envelope::raw_params(&req.body)
                    .and_then(|p| serde_json::from_str(p).ok())
                    .unwrap_or(Value::Null);
                let msg = params.get("message").and_then(Value::as_str).unwrap_or("");
                self.shared.metrics.request("local", "ok");
                self.reply_result(
                    req.id.get(),
                    &json!({"message": format!("pong: {msg}"), "timestamp": rpc::now_millis(), "protocolVersion": rpc::PROTOCOL_VERSION}),
                )
                .await;
            }
            Route::Denied(d) => {
                let m = d.message(&req.method);
                self.fail(
                    &req,
                    rpc::METHOD_NOT_FOUND,
                    &m,
                    rpc::data(false, json!({"method": req.method})),
                )
                .await;
            }
            Route::Create => self.create(req, Vec::new()).await,
            Route::Resume => self.resume(req).await,
            Route::Session | Route::Delete | Route::Detach => self.session_call(req).await,
            Route::Global => {
                let key = format!("conn-{}", self.id);
                match self.pick_any(&key) {
                    Some(b) => self.forward(b, req).await,
                    None => self.no_backend(req).await,
                }
            }
            Route::FanOutList | Route::LastId => {
                let me = self.clone();
                self.spawn_for_request(async move { me.list(req).await });
            }
        }
    }

    async fn no_backend(&self, req: ClientReq) {
        self.fail(
            &req,
            rpc::BACKEND_UNAVAILABLE,
            "no Copilot CLI backend is available (all are down or draining)",
            rpc::data(true, json!({})),
        )
        .await;
    }

    /// The first usable backend in `key`'s rendezvous order (up preferred over draining).
    fn pick_any(&self, key: &str) -> Option<Arc<Backend>> {
        let all = self.shared.pool.all();
        let order = balance::rank(key, all.iter().map(|b| (b.name.as_str(), b.weight)));
        let up = order
            .iter()
            .map(|i| &all[*i])
            .find(|b| b.state() == State::Up);
        up.or_else(|| {
            order
                .iter()
                .map(|i| &all[*i])
                .find(|b| b.state() != State::Down)
        })
        .cloned()
    }

    /// The backend a session lives on, or its home if the proxy has never seen it.
    fn locate(&self, sid: &str) -> Option<Arc<Backend>> {
        match self.shared.sessions.get(sid) {
            Some(p) => self.shared.pool.get(&p.backend),
            None => self.pick_any(sid),
        }
    }

    /// Ownership check for any call naming a session (a match refreshes its idle time).
    /// Returns false after answering.
    async fn check_owner(&self, req: &ClientReq, sid: &str) -> bool {
        let tenant = self.tenant();
        let ok = match self.shared.sessions.owned_by_touch(sid, &tenant.name) {
            Some(mine) => mine,
            None => tenant.may_claim(sid),
        };
        if !ok {
            self.foreign(req, sid).await;
        }
        ok
    }

    async fn session_call(self: &Arc<Self>, req: ClientReq) {
        let Some(sid) = req.session.clone() else {
            return;
        };
        if !self.check_owner(&req, &sid).await {
            return;
        }
        if req.route == Route::Detach {
            let removed = self.lock().joined.remove(&sid);
            if removed.is_some() {
                self.shared.sessions.leave(&sid, &self.shared.pool);
                self.shared.refresh_gauges();
            }
        }
        if matches!(
            req.method.as_str(),
            "session.send" | "session.sendMessages" | "session.sendAndWait"
        ) {
            if let Some(j) = self.lock().joined.get_mut(&sid) {
                j.turn = true;
            }
        }
        self.to_session_backend(req).await;
    }

    /// Notes the end of a turn from the events passing by.
    pub fn observe_event(&self, session: &str, body: &[u8]) {
        if body.len() > 4096 {
            return;
        }
        // Built once: constructing a searcher costs more than searching a small event.
        static IDLE: LazyLock<memchr::memmem::Finder<'static>> =
            LazyLock::new(|| memchr::memmem::Finder::new(b"\"session.idle\""));
        static ERROR: LazyLock<memchr::memmem::Finder<'static>> =
            LazyLock::new(|| memchr::memmem::Finder::new(b"\"session.error\""));
        let ends = IDLE.find(body).is_some() || ERROR.find(body).is_some();
        if ends {
            if let Some(j) = self.lock().joined.get_mut(session) {
                j.turn = false;
            }
        }
    }

    /// Tells the client, as a `session.error` event, that a turn in progress died with its
    /// backend: an SDK waiting in `send_and_wait` fails at once instead of at its timeout.
    async fn turns_lost(&self, backend: &str, reason: &str) {
        let lost: Vec<String> = {
            let mut st = self.lock();
            st.joined
                .iter_mut()
                .filter(|(_, j)| j.backend == backend && j.turn)
                .map(|(sid, j)| {
                    j.turn = false;
                    sid.clone()
                })
                .collect()
        };
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

    /// Sends a session-scoped request to the session's backend, failing the session over first
    /// when that backend is down (or the session moved while this connection had it open).
    async fn to_session_backend(self: &Arc<Self>, req: ClientReq) {
        let Some(sid) = req.session.clone() else {
            return;
        };
        let gate = self.lock().holds.get(&sid).cloned();
        if let Some(gate) = gate {
            let me = self.clone();
            self.spawn_for_request(async move {
                let _g = gate.lock().await;
                me.start_failover(req, None).await;
            });
            return;
        }
        match self.locate(&sid) {
            Some(b) if b.state() != State::Down && !self.must_rejoin(&sid, &b) => {
                self.forward(b, req).await
            }
            _ => self.start_failover(req, None).await,
        }
    }

    /// Whether this connection joined `sid` on a backend other than where it now lives.
    fn must_rejoin(&self, sid: &str, b: &Backend) -> bool {
        self.lock()
            .joined
            .get(sid)
            .is_some_and(|j| j.needs_resume_on(&b.name))
    }

    /// Runs `ensure_session` for the request's session in a task, with the session's requests
    /// on this connection held until it finishes.
    async fn start_failover(self: &Arc<Self>, mut req: ClientReq, suspect: Option<String>) {
        let Some(sid) = req.session.clone() else {
            return;
        };
        req.attempts += 1;
        if req.attempts > 3 {
            let m = format!("session {sid}: its backend kept failing; the request was not processed and may be retried");
            return self
                .fail(
                    &req,
                    rpc::BACKEND_UNAVAILABLE,
                    &m,
                    rpc::data(true, json!({"sessionId": sid})),
                )
                .await;
        }
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let Ok(guard) = gate.clone().try_lock_owned() else {
            return;
        };
        let gate = {
            let mut st = self.lock();
            match st.holds.get(&sid) {
                Some(existing) => Some(existing.clone()),
                None => {
                    st.holds.insert(sid.clone(), gate.clone());
                    None
                }
            }
        };
        let me = self.clone();
        self.spawn_for_request(async move {
            let guard = match gate {
                // Another failover of this session is running here: queue behind it.
                Some(g) => {
                    drop(guard);
                    let _g = g.lock().await;
                    None
                }
                None => Some(guard),
            };
            let result = me.ensure_session(&sid, suspect.as_deref()).await;
            match result {
                Ok(b) => me.forward(b, req).await,
                Err(r) => {
                    let data = rpc::data(r.retryable, json!({"sessionId": sid}));
                    me.fail(&req, r.code, &r.message, data).await;
                }
            }
            if guard.is_some() {
                let mut st = me.lock();
                if st
                    .holds
                    .get(&sid)
                    .is_some_and(|g| Arc::ptr_eq(g, &gate_of(&guard)))
                {
                    st.holds.remove(&sid);
                }
            }
            drop(guard);
        });
    }

    /// Makes sure `sid` is live on a healthy backend that this connection has joined it on,
    /// applying the failover policy. `suspect` names a backend whose link just failed while
    /// health still calls it up: the verdict is awaited (bounded) before anything moves.
    ///
    /// One loop, one deadline: each pass either waits for a verdict, resumes on the next
    /// candidate of the session's ranking, or gives up. A candidate that cannot be reached
    /// (it died too: a double failure) is skipped, not a reason to declare the session lost.
    async fn ensure_session(
        self: &Arc<Self>,
        sid: &str,
        suspect: Option<&str>,
    ) -> Result<Arc<Backend>, Refusal> {
        let cfg = self.shared.config();
        let deadline = crate::config::deadline_after(cfg.sessions.detect_timeout());
        let mut unreachable: Vec<String> = Vec::new();
        let out_of_time = |sid: &str| {
            Refusal {
            code: rpc::BACKEND_UNAVAILABLE,
            message: format!("session {sid}: no backend could take it in time; the request was not processed and may be retried"),
            retryable: true,
        }
        };
        loop {
            let placed = self.shared.sessions.get(sid);
            let current = match &placed {
                Some(p) => self.shared.pool.get(&p.backend),
                None => self.pick_any(sid),
            };
            if let Some(b) = &current {
                if b.state() != State::Down {
                    let failing = b.fails.load(Ordering::Relaxed) > 0;
                    let in_doubt = failing
                        && (suspect == Some(b.name.as_str()) || unreachable.contains(&b.name));
                    if in_doubt {
                        if Instant::now() >= deadline {
                            return Err(out_of_time(sid));
                        }
                        // One failed connection is not a verdict; wait for the health checker.
                        let _ = tokio::time::timeout(
                            Duration::from_millis(100),
                            b.state_changed.notified(),
                        )
                        .await;
                        continue;
                    }
                    let params = self.lock().joined.get(sid).cloned();
                    if let Some(j) = params.filter(|j| j.needs_resume_on(&b.name)) {
                        match self.rejoin(sid, b, j.params.as_deref(), deadline).await {
                            Ok(()) => {}
                            Err(RejoinError::Unreachable(e)) => {
                                debug!(conn = self.id, session = %sid, backend = %b.name, error = %e, "rejoin could not reach the backend");
                                unreachable.push(b.name.clone());
                                continue;
                            }
                            Err(RejoinError::Refused(e)) => return Err(Refusal {
                                code: rpc::SESSION_LOST,
                                message: format!("session {sid} moved to backend {} but could not be resumed there: {e}; it must be recreated", b.name),
                                retryable: false,
                            }),
                        }
                    }
                    return Ok(b.clone());
                }
            }
            let Some(p) = placed else {
                return Err(Refusal {
                    code: rpc::BACKEND_UNAVAILABLE,
                    message: "no Copilot CLI backend is available (all are down or draining)"
                        .into(),
                    retryable: true,
                });
            };
            let old = p.backend.clone();
            if cfg.sessions.policy() == crate::config::FailoverPolicy::Fail {
                self.count_failover_failure(&old);
                return Err(Refusal {
                    code: rpc::SESSION_LOST,
                    message: format!("session {sid} lived on backend {old}, which is down; backends do not share session storage (failover policy 'fail'), so the session must be recreated"),
                    retryable: false,
                });
            }
            if Instant::now() >= deadline {
                return Err(out_of_time(sid));
            }
            let tenant = self.tenant();
            let all = self.shared.pool.all();
            let order = balance::rank(sid, all.iter().map(|b| (b.name.as_str(), b.weight)));
            let views: Vec<CandidateView<'_>> = order
                .iter()
                .map(|i| {
                    let b = &all[*i];
                    CandidateView {
                        name: &b.name,
                        up: b.state() == State::Up && tenant.allows_backend(&b.name),
                        failing: b.fails.load(Ordering::Relaxed) > 0,
                    }
                })
                .collect();
            let Some(pick) = failover_target(&views, &old, &unreachable) else {
                if unreachable.is_empty() {
                    return Err(Refusal {
                        code: rpc::BACKEND_UNAVAILABLE,
                        message: format!(
                            "session {sid}: its backend {old} is down and no other backend is up"
                        ),
                        retryable: true,
                    });
                }
                // Every candidate failed to answer: give health a moment, then walk again.
                unreachable.clear();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let target = all[order[pick]].clone();
            let params = self.lock().joined.get(sid).cloned();
            if let Some(j) = params {
                // The old backend is down, so its links are fenced and the CLI releases the
                // session before another process resumes it: never live on two backends.
                match self
                    .rejoin(sid, &target, j.params.as_deref(), deadline)
                    .await
                {
                    Ok(()) => {}
                    Err(RejoinError::Unreachable(e)) => {
                        warn!(conn = self.id, session = %sid, from = %old, to = %target.name, error = %e, "failover candidate unreachable; trying the next");
                        unreachable.push(target.name.clone());
                        continue;
                    }
                    Err(RejoinError::Refused(e)) => {
                        self.count_failover_failure(&old);
                        warn!(conn = self.id, session = %sid, from = %old, to = %target.name, error = %e, "failover resume failed");
                        return Err(Refusal {
                            code: rpc::SESSION_LOST,
                            message: format!("session {sid} lived on backend {old}, which is down, and could not be resumed on {}: {e}; it must be recreated", target.name),
                            retryable: false,
                        });
                    }
                }
            }
            let now_on = self
                .shared
                .sessions
                .reassign(sid, &old, &target.name, &self.shared.pool);
            if now_on.as_deref() == Some(target.name.as_str()) {
                self.shared
                    .metrics
                    .failovers
                    .get_or_create(&crate::metrics::BackendLabels {
                        backend: old.clone(),
                    })
                    .inc();
                info!(conn = self.id, session = %sid, from = %old, to = %target.name, "session failed over");
                self.shared.refresh_gauges();
                return Ok(target);
            }
            // Someone else moved it meanwhile; follow it.
        }
    }

    fn count_failover_failure(&self, from: &str) {
        self.shared
            .metrics
            .failover_failures
            .get_or_create(&crate::metrics::BackendLabels {
                backend: from.to_string(),
            })
            .inc();
    }

    /// Resumes `sid` on `b` for this connection with the parameters it last used, within
    /// `deadline` (at least a second, as a resume loads the session from disk).
    async fn rejoin(
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
            Ok(Err(e)) => return Err(RejoinError::Unreachable(e)),
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
        let mut st = self.lock();
        if let Some(j) = st.joined.get_mut(sid) {
            j.backend = b.name.clone();
            j.lost_link = false;
        }
        Ok(())
    }

    async fn create(self: &Arc<Self>, mut req: ClientReq, exclude: Vec<String>) {
        let tenant = self.tenant();
        let sid = match req.session.clone() {
            Some(s) => s,
            None => {
                let sid = uuid::Uuid::new_v4().to_string();
                match inject_session_id(&req.body, &sid) {
                    Some((body, span)) => {
                        req.body = Bytes::from(body);
                        req.id_span = span;
                        req.session = Some(sid.clone());
                        sid
                    }
                    None => {
                        let m = "session.create: params must be an object".to_string();
                        return self
                            .fail(&req, rpc::INVALID_PARAMS, &m, rpc::data(false, json!({})))
                            .await;
                    }
                }
            }
        };
        if let Err(why) = tenant.may_create(&sid) {
            return self
                .fail(
                    &req,
                    rpc::SESSION_ID_NOT_ALLOWED,
                    &why.to_string(),
                    rpc::data(false, json!({"sessionId": sid})),
                )
                .await;
        }
        if let Some(limit) = tenant.max_sessions {
            let live = self.shared.live_sessions_of(&tenant.name);
            if live >= limit && self.shared.sessions.get(&sid).is_none() {
                let m = format!(
                    "tenant {} already holds its maximum of {limit} live sessions",
                    tenant.name
                );
                return self
                    .fail(
                        &req,
                        rpc::SESSION_LIMIT,
                        &m,
                        rpc::data(true, json!({"limit": limit})),
                    )
                    .await;
            }
        }
        let backend = match self.shared.place(&sid, &tenant, &exclude) {
            Some(b) => b,
            None => return self.no_backend(req).await,
        };
        let backend = match self
            .shared
            .sessions
            .claim(&sid, &tenant.name, &backend.name)
        {
            crate::affinity::Claim::New => {
                req.fresh = true;
                backend
            }
            crate::affinity::Claim::Existing(name) => match self.shared.pool.get(&name) {
                Some(b) => b,
                None => return self.no_backend(req).await,
            },
            crate::affinity::Claim::Foreign => {
                return self.foreign(&req, &sid).await;
            }
        };
        // Installed before forwarding: the CLI may call back (sessionFs, hooks) or announce the
        // session (lifecycle) before it replies.
        self.join_as(&sid, &backend.name, &req);
        self.forward(backend, req).await;
    }

    /// Answers a call on a session owned by another tenant.
    async fn foreign(&self, req: &ClientReq, sid: &str) {
        let m = format!("session {sid} does not exist or belongs to another tenant");
        self.fail(
            req,
            rpc::SESSION_FORBIDDEN,
            &m,
            rpc::data(false, json!({"sessionId": sid})),
        )
        .await;
    }

    /// Joins with the request's own params remembered for a later re-resume.
    fn join_as(&self, sid: &str, backend: &str, req: &ClientReq) {
        self.join(
            sid,
            backend,
            envelope::raw_params(&req.body).map(str::to_string),
        );
    }

    fn join(&self, sid: &str, backend: &str, params: Option<String>) {
        let first = {
            let mut st = self.lock();
            st.known.insert(sid.to_string());
            st.joined
                .insert(
                    sid.to_string(),
                    Joined {
                        backend: backend.to_string(),
                        params,
                        turn: false,
                        lost_link: false,
                    },
                )
                .is_none()
        };
        if first {
            self.shared.sessions.join(sid, &self.shared.pool);
            self.shared.refresh_gauges();
        }
    }

    /// Undoes what a failed `session.create` installed: this connection's join and, unless
    /// another client has the session open, its route.
    fn forget_failed_create(&self, sid: &str) {
        self.unjoin(sid);
        if let Some(p) = self.shared.sessions.get(sid) {
            if p.live_conns == 0 {
                self.shared.sessions.remove(sid, &self.shared.pool);
            }
        }
    }

    fn unjoin(&self, sid: &str) {
        if self.lock().joined.remove(sid).is_some() {
            self.shared.sessions.leave(sid, &self.shared.pool);
            self.shared.refresh_gauges();
        }
    }

    async fn resume(self: &Arc<Self>, req: ClientReq) {
        let Some(sid) = req.session.clone() else {
            return;
        };
        if !self.check_owner(&req, &sid).await {
            return;
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

    async fn resume_probe(self: &Arc<Self>, req: ClientReq, sid: String) {
        let all = self.shared.pool.all();
        let order = balance::rank(&sid, all.iter().map(|b| (b.name.as_str(), b.weight)));
        let mut last: Option<Bytes> = None;
        for i in order {
            let b = all[i].clone();
            if b.state() == State::Down {
                continue;
            }
            let link = self.link(&b);
            // Joined first so events emitted during resume reach the client.
            self.lock().known.insert(sid.clone());
            let reply = match link.call_as_proxy(&req.body, req.id_span).await {
                Ok(r) => r,
                Err(e) => {
                    debug!(conn = self.id, backend = %b.name, error = %e, "resume probe failed");
                    continue;
                }
            };
            let v: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
            if let Some(err) = v.get("error") {
                let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
                if msg.contains("Session not found") {
                    last = Some(reply);
                    continue;
                }
                last = Some(reply);
                break;
            }
            let tenant = self.tenant();
            if self.shared.sessions.claim(&sid, &tenant.name, &b.name)
                == crate::affinity::Claim::Foreign
            {
                return self.foreign(&req, &sid).await;
            }
            self.join_as(&sid, &b.name, &req);
            self.deliver(&req, &reply, true).await;
            return;
        }
        match last {
            Some(reply) => self.deliver(&req, &reply, false).await,
            None => self.no_backend(req).await,
        }
    }

    /// Sends a reply obtained through an internal call back under the client's own id.
    async fn deliver(&self, req: &ClientReq, reply: &[u8], ok: bool) {
        let span = match envelope::parse(reply) {
            Ok(e) => e.id_span,
            Err(_) => None,
        };
        let Some(span) = span else { return };
        let out = envelope::splice(reply, span, req.id.get().as_bytes());
        self.shared.metrics.request(
            route::class_label(req.route),
            if ok { "ok" } else { "error" },
        );
        self.send_to_client(Bytes::from(out)).await;
    }

    /// The client's link to `backend`, opened on first use.
    fn link(self: &Arc<Self>, backend: &Arc<Backend>) -> Arc<Link> {
        let mut st = self.lock();
        if let Some(l) = st.links.get(&backend.name) {
            if !l.is_dead() && Arc::ptr_eq(&l.backend, backend) {
                return l.clone();
            }
        }
        let l = Link::spawn(self, backend.clone());
        st.links.insert(backend.name.clone(), l.clone());
        l
    }

    /// Sends a request over this client's link to `backend`. Boxed (and `Send`) because
    /// failover can route back here from a spawned task.
    fn forward(
        self: &Arc<Self>,
        backend: Arc<Backend>,
        req: ClientReq,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if backend.state() == State::Down {
                return self.backend_down(req, &backend).await;
            }
            let link = self.link(&backend);
            if let Err(req) = link.send_client(req).await {
                // The link died between lookup and send; one fresh attempt.
                let link = self.link(&backend);
                if let Err(req) = link.send_client(req).await {
                    self.backend_down(req, &backend).await;
                }
            }
        })
    }

    async fn backend_down(self: &Arc<Self>, req: ClientReq, backend: &Backend) {
        if req.route == Route::Create && req.fresh {
            // Nothing exists yet: place the new session elsewhere.
            if let Some(sid) = &req.session {
                self.unjoin(sid);
                self.shared.sessions.remove(sid, &self.shared.pool);
            }
            // Every backend that failed it stays excluded, so a double failure walks on to a
            // live backend and the walk ends when none is left (-32011).
            let mut req = req;
            req.fresh = false;
            req.avoid.push(backend.name.clone());
            let exclude = req.avoid.clone();
            let me = self.clone();
            return Box::pin(me.create(req, exclude)).await;
        }
        if req.session.is_some()
            && matches!(
                req.route,
                Route::Session | Route::Delete | Route::Detach | Route::Resume
            )
        {
            let suspect = Some(backend.name.clone());
            return self.start_failover(req, suspect).await;
        }
        if req.route == Route::Global && req.attempts < 2 {
            let mut req = req;
            req.attempts += 1;
            let key = format!("conn-{}-{}", self.id, req.attempts);
            if let Some(b) = self.pick_any(&key).filter(|b| b.name != backend.name) {
                return self.forward(b, req).await;
            }
            return self.no_backend(req).await;
        }
        let m = format!(
            "backend {} is unavailable; the request was not processed and may be retried",
            backend.name
        );
        self.fail(
            &req,
            rpc::BACKEND_UNAVAILABLE,
            &m,
            rpc::data(
                true,
                json!({"backend": backend.name, "sessionId": req.session}),
            ),
        )
        .await;
    }

    /// Called by a link that ended: re-route what it never sent, fail what it had in flight.
    pub fn link_died(
        self: &Arc<Self>,
        link: &Link,
        why: &LinkEnd,
        reason: &str,
        unsent: Vec<ClientReq>,
        in_flight: Vec<ClientReq>,
    ) {
        {
            let mut st = self.lock();
            if st
                .links
                .get(&link.backend.name)
                .is_some_and(|l| std::ptr::eq(Arc::as_ptr(l), link))
            {
                st.links.remove(&link.backend.name);
            }
            if matches!(why, LinkEnd::Broken(_) | LinkEnd::Fenced) {
                for j in st.joined.values_mut() {
                    if j.backend == link.backend.name {
                        j.lost_link = true;
                    }
                }
            }
            st.server_reqs
                .retain(|_, (l, _)| !std::ptr::eq(Arc::as_ptr(l), link));
        }
        if matches!(why, LinkEnd::Closed) || self.cancel.is_cancelled() {
            return;
        }
        let me = self.clone();
        let backend = link.backend.clone();
        let reason = reason.to_string();
        let established = matches!(why, LinkEnd::Broken(_) | LinkEnd::Fenced);
        self.spawn_for_request(async move {
            if established {
                // A refused reconnect sent nothing; only a link that carried turns loses them.
                me.turns_lost(&backend.name, &reason).await;
            }
            for meta in in_flight {
                if meta.route == Route::Create && meta.fresh {
                    // It may never have run: a retry must be free to place it elsewhere.
                    if let Some(sid) = &meta.session {
                        me.forget_failed_create(sid);
                    }
                }
                me.shared
                    .metrics
                    .request(route::class_label(meta.route), "proxy_error");
                let m = format!(
                    "{} was in flight when {reason}; it may not have completed and may be retried",
                    meta.method
                );
                me.reply_error(
                    meta.id.get(),
                    rpc::BACKEND_UNAVAILABLE,
                    &m,
                    Some(rpc::data(
                        true,
                        json!({"backend": backend.name, "sessionId": meta.session}),
                    )),
                )
                .await;
            }
            for req in unsent {
                me.backend_down(req, &backend).await;
            }
        });
    }

    /// A reply from a backend to one of this client's requests.
    pub async fn backend_reply(
        &self,
        _link: &Link,
        meta: ClientReq,
        body: &[u8],
        span: (usize, usize),
        is_error: bool,
    ) {
        let out = envelope::splice(body, span, meta.id.get().as_bytes());
        let class = route::class_label(meta.route);
        if let Some(sid) = &meta.session {
            match meta.route {
                Route::Create if is_error => self.forget_failed_create(sid),
                Route::Resume if is_error => self.unjoin(sid),
                Route::Create => {
                    info!(conn = self.id, session = %sid, backend = %_link.backend.name, "session created")
                }
                Route::Delete if !is_error => {
                    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                    if v.pointer("/result/success").and_then(Value::as_bool) == Some(true) {
                        self.unjoin(sid);
                        self.shared.sessions.remove(sid, &self.shared.pool);
                        self.shared.refresh_gauges();
                        info!(conn = self.id, session = %sid, "session deleted");
                    }
                }
                _ => {}
            }
        }
        self.shared
            .metrics
            .request(class, if is_error { "error" } else { "ok" });
        self.shared
            .metrics
            .request_duration
            .get_or_create(&crate::metrics::ClassLabels { class })
            .observe(meta.started.elapsed().as_secs_f64());
        self.send_to_client(Bytes::from(out)).await;
    }

    /// Whether a backend notification may reach this client. The CLI broadcasts
    /// `session.lifecycle` to every connection; only sessions this client created or resumed
    /// pass, so no tenant ever sees another's session ids.
    pub fn wants_notification(&self, method: &str, session: Option<&str>) -> bool {
        let st = self.lock();
        if method == "gitHubTelemetry.event" && !st.telemetry {
            return false;
        }
        match session {
            Some(s) => st.known.contains(s),
            None => method != "gitHubTelemetry.event" && method != "session.lifecycle",
        }
    }

    /// A request from the CLI to this client (hooks, sessionFs, user input, …): the id becomes
    /// a proxy-allocated non-negative integer, mapped back when the client answers.
    pub async fn backend_request(
        &self,
        link: &Arc<Link>,
        id: Box<RawValue>,
        span: (usize, usize),
        method: &str,
        body: &[u8],
    ) {
        let n = self.next_srv.fetch_add(1, Ordering::Relaxed);
        self.lock().server_reqs.insert(n, (link.clone(), id));
        debug!(conn = self.id, backend = %link.backend.name, method, "CLI request forwarded to client");
        let out = envelope::splice(body, span, n.to_string().as_bytes());
        self.send_to_client(Bytes::from(out)).await;
    }

    async fn list(self: &Arc<Self>, req: ClientReq) {
        let all = self.shared.pool.all();
        let targets: Vec<Arc<Backend>> = all
            .iter()
            .filter(|b| b.state() != State::Down)
            .cloned()
            .collect();
        if targets.is_empty() {
            return self.no_backend(req).await;
        }
        // session.getLastId is answered from the merged list; its own params don't apply.
        let (body, span) = if req.route == Route::LastId {
            let b = rpc::request(0, "session.list", &json!({}));
            let span = envelope::parse(&b)
                .ok()
                .and_then(|e| e.id_span)
                .unwrap_or((0, 0));
            (Bytes::from(b), span)
        } else {
            (req.body.clone(), req.id_span)
        };
        let mut calls = Vec::new();
        for b in &targets {
            let link = self.link(b);
            let body = body.clone();
            calls.push((
                b.name.clone(),
                tokio::spawn(async move {
                    tokio::time::timeout(FANOUT_TIMEOUT, link.call_as_proxy(&body, span)).await
                }),
            ));
        }
        let mut merged: HashMap<String, Value> = HashMap::new();
        let mut errors = Vec::new();
        let mut ok = 0;
        for (name, h) in calls {
            let res = match h.await {
                Ok(Ok(Ok(r))) => r,
                Ok(Ok(Err(e))) => {
                    errors.push(format!("{name}: {e}"));
                    continue;
                }
                Ok(Err(_)) => {
                    errors.push(format!("{name}: timed out"));
                    continue;
                }
                Err(e) => {
                    errors.push(format!("{name}: {e}"));
                    continue;
                }
            };
            let v: Value = serde_json::from_slice(&res).unwrap_or(Value::Null);
            if let Some(err) = v.get("error") {
                errors.push(format!(
                    "{name}: {}",
                    err.get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("error")
                ));
                continue;
            }
            ok += 1;
            if let Some(list) = v.pointer("/result/sessions").and_then(Value::as_array) {
                for s in list {
                    let Some(id) = s.get("sessionId").and_then(Value::as_str) else {
                        continue;
                    };
                    if !self.visible(id) {
                        continue;
                    }
                    let newer = match merged.get(id) {
                        Some(old) => modified(s) > modified(old),
                        None => true,
                    };
                    if newer {
                        merged.insert(id.to_string(), s.clone());
                    }
                }
            }
        }
        if ok == 0 {
            let m = format!(
                "{} failed on every backend: {}",
                req.method,
                errors.join("; ")
            );
            return self
                .fail(
                    &req,
                    rpc::BACKEND_UNAVAILABLE,
                    &m,
                    rpc::data(true, json!({})),
                )
                .await;
        }
        if !errors.is_empty() {
            warn!(conn = self.id, errors = ?errors, "{} answered from a subset of backends", req.method);
        }
        let mut sessions: Vec<Value> = merged.into_values().collect();
        sessions.sort_by_key(|s| std::cmp::Reverse(modified(s)));
        self.shared
            .metrics
            .request(route::class_label(req.route), "ok");
        if req.route == Route::LastId {
            let last = sessions.first().and_then(|s| s.get("sessionId").cloned());
            let result = match last {
                Some(id) => json!({"sessionId": id}),
                None => json!({}),
            };
            return self.reply_result(req.id.get(), &result).await;
        }
        self.reply_result(req.id.get(), &json!({"sessions": sessions}))
            .await;
    }

    /// Whether this client's tenant may see a session.
    fn visible(&self, sid: &str) -> bool {
        let tenant = self.tenant();
        match self.shared.sessions.owned_by(sid, &tenant.name) {
            Some(mine) => mine,
            None => tenant.may_claim(sid),
        }
    }
}

/// Why a re-resume did not happen.
#[derive(Debug)]
enum RejoinError {
    /// The backend could not be reached or did not answer: try another.
    Unreachable(String),
    /// The backend answered with an error: the session cannot be resumed there.
    Refused(String),
}

/// What failover needs to know of one backend in a session's ranking.
#[derive(Debug, Clone, Copy)]
struct CandidateView<'a> {
    name: &'a str,
    /// Up (not draining, not down) and allowed for the tenant.
    up: bool,
    /// Its last check failed (it may be dying too).
    failing: bool,
}

/// The failover target's index in `ranking`: the first up backend other than `old` and the ones
/// already found unreachable, preferring those whose last check passed.
fn failover_target(
    ranking: &[CandidateView<'_>],
    old: &str,
    unreachable: &[String],
) -> Option<usize> {
    let ok =
        |c: &CandidateView<'_>| c.up && c.name != old && !unreachable.iter().any(|u| u == c.name);
    ranking
        .iter()
        .position(|c| ok(c) && !c.failing)
        .or_else(|| ranking.iter().position(ok))
}

fn gate_of(guard: &Option<tokio::sync::OwnedMutexGuard<()>>) -> Arc<tokio::sync::Mutex<()>> {
    match guard {
        Some(g) => tokio::sync::OwnedMutexGuard::mutex(g).clone(),
        None => Arc::new(tokio::sync::Mutex::new(())),
    }
}

fn modified(s: &Value) -> String {
    s.get("modifiedTime")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
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

    fn view(name: &str, up: bool, failing: bool) -> CandidateView<'_> {
        CandidateView { name, up, failing }
    }

    #[test]
    fn failover_walks_the_ranking_past_dead_candidates() {
        let r = [
            view("a", false, true),
            view("b", true, true),
            view("c", true, false),
        ];
        // b failed its last check (it died with a): c first.
        assert_eq!(failover_target(&r, "a", &[]), Some(2));
        // c unreachable: b is still worth a try.
        assert_eq!(failover_target(&r, "a", &["c".into()]), Some(1));
        assert_eq!(failover_target(&r, "a", &["c".into(), "b".into()]), None);
        // Never the old backend, even if it reads as up.
        let r = [view("a", true, false), view("b", true, false)];
        assert_eq!(failover_target(&r, "a", &[]), Some(1));
        assert_eq!(failover_target(&[view("a", true, false)], "a", &[]), None);
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
