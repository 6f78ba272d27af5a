//! One client (SDK) connection: its read loop, its reply queue, its life (in flight, settle,
//! close) and the dispatch of each request to the concern that handles it.

use super::failover::plan::Holds;
use super::membership::joined::{starts_turn, Membership};
use super::request::{intake, ClientReq, Intake};
use super::upstream::links::Upstream;
use crate::auth::Tenant;
use crate::codec::{CodecError, FrameReader, Item};
use crate::context::{ClientHandle, Shared};
use crate::route::Route;
use crate::rpc;
use crate::tls::ServerTlsStore;
use crate::wire::{self, Frame};
use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Who the client is, once it said `connect`.
#[derive(Default)]
pub(super) struct Identity {
    pub(super) authenticated: bool,
    pub(super) tenant: Option<Arc<Tenant>>,
}

/// A connected SDK client.
pub(crate) struct ClientConn {
    /// Connection number (logs, metrics, rendezvous key for global calls).
    pub(super) id: u64,
    /// Peer address.
    pub(super) peer: String,
    /// Process-wide state.
    pub(super) shared: Arc<Shared>,
    /// Cancelled when the client goes away; every link is a child of it.
    pub(super) cancel: CancellationToken,
    out: mpsc::Sender<Frame>,
    /// Byte budget of `out` (`limits.max_queued_reply_bytes`); closed when the writer ends.
    out_budget: Arc<tokio::sync::Semaphore>,
    /// The budget's size: a larger frame takes all of it.
    out_limit: usize,
    pub(super) who: Mutex<Identity>,
    /// The client asked for telemetry forwarding in its `connect` (read on every event, so
    /// not behind the identity's lock).
    pub(super) telemetry: AtomicBool,
    /// The client (a session-aware sidecar) asked, in its `connect`, to be told when this
    /// process is going away ([`rpc::GOAWAY`]) rather than just cut off.
    pub(super) goaway: AtomicBool,
    told_goaway: AtomicBool,
    /// Sessions this connection created or resumed (membership.rs).
    pub(super) members: Mutex<Membership>,
    /// Links to backends and the CLI's requests to this client (upstream.rs).
    pub(super) upstream: Mutex<Upstream>,
    /// Sessions whose failover is running on this connection (failover.rs).
    pub(super) holds: Holds,
    pub(super) requests: AtomicU64,
    /// Tasks working on this client's requests (fan-outs, resume probes, failovers, re-routes):
    /// in flight too, though no link holds them.
    busy: AtomicUsize,
    /// TLS peer facts (TLS listeners only).
    pub(super) tls: Option<PeerTls>,
}

/// TLS facts about a client connection.
pub(crate) struct PeerTls {
    /// Identity from the client certificate (URI SAN, DNS SAN or CN).
    pub(crate) identity: Option<String>,
    /// The client's certificate chain, re-verified when the CA or clock changes.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// The listener's TLS store.
    pub(crate) store: Arc<ServerTlsStore>,
}

/// Serves one accepted plain-TCP client connection to completion.
pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: String) {
    wire::tune(&stream);
    let (r, w) = stream.into_split();
    let reader = FrameReader::new(r, shared.limits()).with_on_partial(wire::quickack);
    run(shared, reader, w, peer, None).await;
}

/// Serves one client connection that completed a TLS handshake.
pub(crate) async fn serve_tls(
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
    let (out_tx, out_rx) = mpsc::channel::<Frame>(1024);
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
        who: Mutex::new(Identity::default()),
        telemetry: AtomicBool::new(false),
        goaway: AtomicBool::new(false),
        told_goaway: AtomicBool::new(false),
        members: Mutex::new(Membership::default()),
        upstream: Mutex::new(Upstream::default()),
        holds: Holds::default(),
        requests: AtomicU64::new(0),
        busy: AtomicUsize::new(0),
        tls,
    });
    let handle: Arc<dyn ClientHandle> = conn.clone();
    shared.conn_opened(id, Arc::downgrade(&handle));
    drop(handle);
    shared.metrics.connection_opened();
    let started = Instant::now();
    debug!(conn = id, %peer, identity = ?conn.identity(), "client connected");
    let budget = out_budget.clone();
    let writer = tokio::spawn(async move {
        let mut out_rx = out_rx;
        let res = wire::writer_with(w, &mut out_rx, |body: Frame| {
            budget.add_permits(body.len().clamp(1, out_limit));
            Some(body)
        })
        .await;
        budget.close();
        res
    });
    let stream_above = shared.config().limits.stream_above();
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
            f = reader.read_item(stream_above) => f,
        };
        match frame {
            Ok(Some(Item::Whole(body))) => {
                crate::runtime::activity();
                shared.metrics.frame("client_in", body.len());
                conn.on_client_frame(body).await;
            }
            Ok(Some(Item::Head { head, len })) => {
                crate::runtime::activity();
                shared.metrics.frame("client_in", len);
                if let Err(e) = conn.on_client_head(&mut reader, head).await {
                    debug!(conn = id, error = %e, "client read ended in a streamed frame");
                    break;
                }
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
                shared.metrics.bad_frame("oversize");
                let rid = crate::envelope::sniff_id(&head).unwrap_or_else(|| "null".into());
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
                shared.metrics.bad_frame("framing");
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
    let sessions = conn.close();
    let requests = conn.requests.load(Ordering::Relaxed);
    shared.conn_closed(id);
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
    shared.metrics.connection_closed();
    info!(conn = id, %peer, duration_ms = started.elapsed().as_millis() as u64, requests, sessions, "client connection closed");
}

impl ClientHandle for ClientConn {
    fn in_flight(&self) -> usize {
        self.upstream().pending_client() + self.holds.len() + self.busy.load(Ordering::Acquire)
    }

    fn shut(&self) {
        self.cancel.cancel();
    }

    fn go_away(self: Arc<Self>) -> bool {
        if !self.goaway.load(Ordering::Acquire) {
            return false;
        }
        if !self.told_goaway.swap(true, Ordering::AcqRel) {
            let body = rpc::notification(
                rpc::GOAWAY,
                &json!({"reason": "copilot-lb is shutting down"}),
            );
            info!(conn = self.id, peer = %self.peer, "told the client (a sidecar) to move its sessions: shutting down");
            tokio::spawn(async move { self.send_to_client(Bytes::from(body)).await });
        }
        true
    }

    fn holds_sessions(&self) -> bool {
        self.members().holds_any()
    }

    fn reauthorize(self: Arc<Self>, store: &Arc<ServerTlsStore>) {
        let Some(t) = &self.tls else { return };
        if !Arc::ptr_eq(&t.store, store) || t.chain.is_empty() || self.cancel.is_cancelled() {
            return;
        }
        if let Err(e) = store.still_valid(&t.chain) {
            self.revoke(e.to_string());
        }
    }
}

impl ClientConn {
    pub(super) fn who(&self) -> MutexGuard<'_, Identity> {
        self.who.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client certificate's identity, if any.
    pub(super) fn identity(&self) -> Option<&str> {
        self.tls.as_ref().and_then(|t| t.identity.as_deref())
    }

    /// Closes the connection once its in-flight requests are answered (its certificate no
    /// longer verifies).
    fn revoke(self: &Arc<Self>, why: String) {
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
    pub(super) fn telemetry(&self) -> bool {
        self.telemetry.load(Ordering::Relaxed)
    }

    pub(super) fn tenant(&self) -> Arc<Tenant> {
        self.who()
            .tenant
            .clone()
            .unwrap_or_else(|| self.shared.auth().anonymous())
    }

    /// Queues a body for the client; a closed client just drops it (`false`).
    pub(super) async fn send_to_client(&self, body: impl Into<Frame>) -> bool {
        let body = body.into();
        self.shared.metrics.frame("client_out", body.len());
        // Closed budget: the client is gone, and so is the body.
        let cost = body.len().clamp(1, self.out_limit) as u32;
        let Ok(permit) = self.out_budget.acquire_many(cost).await else {
            return false;
        };
        permit.forget();
        self.out.send(body).await.is_ok()
    }

    pub(super) async fn reply_error(
        &self,
        id: &str,
        code: i64,
        message: &str,
        data: Option<Value>,
    ) {
        self.send_to_client(Bytes::from(rpc::error(id, code, message, data)))
            .await;
    }

    pub(super) async fn reply_result(&self, id: &str, result: &Value) {
        self.send_to_client(Bytes::from(rpc::result(id, result)))
            .await;
    }

    /// Answers a request with a proxy error.
    pub(super) async fn fail(&self, req: &ClientReq, code: i64, message: &str, data: Value) {
        // A streamed request whose rest was refused has had its answer (`stream.rs`).
        if req
            .stream
            .as_ref()
            .is_some_and(|s| s.answered.swap(true, Ordering::AcqRel))
        {
            return;
        }
        self.shared.metrics.request(req.class(), "proxy_error");
        // A send the proxy answered never started a turn: its count ends here.
        if let (Some(sid), true) = (&req.session, starts_turn(&req.method)) {
            self.members().turn_answered(sid, true);
        }
        debug!(conn = self.id, method = %req.method, code, message, "request answered with a proxy error");
        self.reply_error(req.id.get(), code, message, Some(data))
            .await;
    }

    /// Waits until every request in flight is answered, at most `limits.shutdown_timeout`.
    async fn settle(&self) {
        let deadline =
            crate::config::deadline_after(self.shared.config().limits.shutdown_timeout.0);
        // Not once the CLI asks this client something: a client that can no longer write can
        // never answer, so whatever waits on that answer would never complete.
        while self.in_flight() > 0
            && !self.upstream().awaits_client()
            && Instant::now() < deadline
            && !self.cancel.is_cancelled()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Runs work for this client's requests in a task, counted in [`ClientHandle::in_flight`].
    pub(super) fn spawn_for_request<F>(self: &Arc<Self>, work: F)
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

    /// Closes every link and releases this connection's sessions. Returns how many it held.
    fn close(&self) -> usize {
        let joined = self.members().drain();
        let links = self.upstream().drain();
        let held = joined.iter().filter_map(|(sid, j)| {
            links
                .iter()
                .find(|l| l.backend.name == j.backend)
                .map(|l| (sid, l.released()))
        });
        self.shared.releasing(held);
        self.cancel.cancel();
        for l in links {
            l.close();
        }
        for (s, _) in &joined {
            self.shared.sessions.leave(s, &self.shared.pool);
        }
        joined.len()
    }

    pub(super) async fn on_client_frame(self: &Arc<Self>, body: Bytes) {
        let intake = {
            let cfg = self.shared.config_now();
            intake(body, cfg.limits.max_json_depth, &cfg.routing)
        };
        match intake {
            Intake::Request(req) => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                self.on_request(req).await
            }
            Intake::Refused {
                req,
                code,
                message,
                data,
            } => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                self.fail(&req, code, &message, data).await
            }
            Intake::Invalid { id, code, message } => {
                self.shared.metrics.bad_frame("invalid");
                self.reply_error(&id, code, &message, None).await;
            }
            Intake::Response { id, span, body } => self.client_reply(id, span, body).await,
            Intake::Notification { method } => {
                debug!(conn = self.id, method, "client notification dropped");
            }
        }
    }

    pub(super) async fn on_request(self: &Arc<Self>, mut req: ClientReq) {
        if req.method == "connect" {
            return self.on_connect(req).await;
        }
        if self.shared.auth().required() && !self.who().authenticated {
            self.shared.metrics.request(req.class(), "proxy_error");
            return self
                .reply_error(
                    req.id.get(),
                    rpc::AUTHENTICATION_REQUIRED,
                    "AUTHENTICATION_REQUIRED",
                    None,
                )
                .await;
        }
        // Requests the proxy answers itself cost a backend nothing: not rate limited.
        if !matches!(req.route, Route::Local | Route::Denied(_)) && !self.within_rate(&req).await {
            return;
        }
        if !req.other_sessions.is_empty() && !self.check_named(&req).await {
            return;
        }
        // Before any route: the tenant's policy decides what the request may carry, and the
        // rewritten body is what gets placed, forwarded and kept for a failover's replay.
        if !self.host_policy(&mut req).await {
            return;
        }
        match req.route {
            Route::Local => self.local(req).await,
            Route::Denied(d) => self.denied(req, d).await,
            Route::Create => self.create(req).await,
            Route::Resume => self.resume(req).await,
            Route::Session | Route::Delete | Route::Detach => self.session_call(req).await,
            Route::Global => self.global(req).await,
            Route::FanOutList | Route::LastId => {
                let me = self.clone();
                self.spawn_for_request(async move { me.list(req).await });
            }
        }
    }
}
