//! One upstream link: a client connection's own TCP connection to one backend, opened lazily.
//!
//! The CLI keys tools, handlers, event subscriptions and session cleanup on the connection, so
//! links are never shared between clients. Every request the link writes gets a fresh integer
//! id; the pending table maps it back to the client's exact original id.
//!
//! A link is a leaf: it reports to the connection that owns it through [`LinkOwner`] and
//! knows nothing else of it.

use super::request::ClientReq;
use crate::backend::{Backend, CallError};
use crate::codec::{FrameReader, Item};
use crate::context::Shared;
use crate::envelope::{self, Kind};
use crate::route::Route;
use crate::rpc;
use crate::wire::{self, Frame, Streamed};
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What a link reports to the connection that owns it.
pub(crate) trait LinkOwner: Send + Sync + 'static {
    /// The connection's number, for logs.
    fn conn_id(&self) -> u64;
    /// Whether the client asked for telemetry forwarding (sent on the link's `connect`).
    fn telemetry(&self) -> bool;
    /// The backend's reply to one of the owner's requests; `span` is where its id sits.
    fn reply(
        &self,
        link: &Arc<Link>,
        req: ClientReq,
        body: &Bytes,
        span: (usize, usize),
        is_error: bool,
    ) -> impl Future<Output = ()> + Send;
    /// A streamed reply (its rest follows on the frame's tail); `false` if nobody takes it.
    fn reply_frame(
        &self,
        link: &Arc<Link>,
        req: ClientReq,
        frame: Frame,
        is_error: bool,
    ) -> impl Future<Output = bool> + Send;
    /// A streamed notification; `false` if it does not reach the client.
    fn event_frame(
        self: &Arc<Self>,
        method: &str,
        session: Option<&str>,
        frame: Frame,
    ) -> impl Future<Output = bool> + Send;
    /// One of the owner's requests cannot be answered by the backend: the link answers it
    /// with this error instead.
    fn refuse(
        &self,
        req: ClientReq,
        code: i64,
        message: String,
        data: Value,
    ) -> impl Future<Output = ()> + Send;
    /// A notification from the backend (`session` is its `params.sessionId`).
    fn notification(
        self: &Arc<Self>,
        method: &str,
        session: Option<&str>,
        body: Bytes,
    ) -> impl Future<Output = ()> + Send;
    /// A request from the CLI to the client (hooks, sessionFs, user input, …).
    fn cli_request(
        &self,
        link: &Arc<Link>,
        id: Box<RawValue>,
        span: (usize, usize),
        method: &str,
        body: &[u8],
    ) -> impl Future<Output = ()> + Send;
    /// The backend, a copilot-lb edge, announced it is going away (it is marked down, its
    /// links still answer what was sent): move the owner's sessions off it.
    fn backend_leaving(self: &Arc<Self>, backend: &Arc<Backend>);
    /// The link ended: `unsent` requests never reached the backend (re-route them),
    /// `in_flight` ones were written and are unanswered.
    fn ended(
        self: &Arc<Self>,
        link: &Link,
        end: &LinkEnd,
        reason: &str,
        unsent: Vec<ClientReq>,
        in_flight: Vec<ClientReq>,
    );
}

/// What happens to a pending entry when its reply arrives.
enum Pending {
    /// A client request; its body is taken by the writer, so a request still holding one was
    /// never sent and can be re-routed.
    Client(ClientReq),
    Internal(oneshot::Sender<Result<Bytes, CallFailed>>),
}

enum LinkMsg {
    /// The pending client request `pid`; the writer swaps in `pid` as the id.
    Client { pid: u64 },
    /// A body ready to write (replies to CLI requests, proxy-originated requests).
    Raw(Bytes),
}

struct Inner {
    dead: Option<Arc<str>>,
    pending: HashMap<u64, Pending>,
}

/// A link to one backend on behalf of one client connection.
pub(crate) struct Link {
    /// The backend.
    pub(crate) backend: Arc<Backend>,
    tx: mpsc::Sender<LinkMsg>,
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    cancel: CancellationToken,
    /// Cancelled once the link's connection is fully closed: after a close the proxy asked
    /// for, when the backend has closed its side too, i.e. the CLI has seen the client go.
    released: CancellationToken,
    /// A drain task owns the closing socket and cancels `released` itself.
    release_handed_off: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("backend", &self.backend.name)
            .finish()
    }
}

/// How a link ended, for passive health and for deciding what to tell the client.
#[derive(Debug)]
pub(crate) enum LinkEnd {
    /// The client went away or the proxy closed the link on purpose.
    Closed,
    /// The backend was fenced (marked down).
    Fenced,
    /// Connecting or handshaking failed (nothing was sent).
    ConnectFailed(CallError),
    /// An established link broke.
    Broken(CallError),
    /// The proxy cut a streamed frame off mid-way (its rest was refused); not the
    /// backend's fault, so not a health failure, but the link's stream is gone.
    Cut,
}

/// Why a call the proxy made over a link got no reply.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum CallFailed {
    /// The link ended (the reason says how).
    #[error("{0}")]
    Ended(Arc<str>),
    /// The link closed before the call could be written or answered.
    #[error("link to backend {0} closed")]
    Closed(String),
    /// The reply was over the frame limit and discarded.
    #[error("the backend's reply of {len} bytes exceeds copilot-lb's limit of {limit} bytes (limits.max_frame_bytes) and was discarded")]
    Oversized { len: usize, limit: usize },
}

impl Link {
    /// Starts a link task for `owner` to `backend`, closed when `parent` is cancelled;
    /// requests may be queued at once.
    pub(crate) fn spawn<O: LinkOwner>(
        owner: Arc<O>,
        shared: Arc<Shared>,
        parent: &CancellationToken,
        backend: Arc<Backend>,
    ) -> Arc<Link> {
        let (tx, rx) = mpsc::channel(1024);
        let link = Arc::new(Link {
            backend: backend.clone(),
            tx,
            inner: Mutex::new(Inner {
                dead: None,
                pending: HashMap::new(),
            }),
            next_id: AtomicU64::new(1),
            cancel: parent.child_token(),
            released: CancellationToken::new(),
            release_handed_off: std::sync::atomic::AtomicBool::new(false),
        });
        let fence = backend.fence_token();
        tokio::spawn(run(link.clone(), rx, owner, shared, fence));
        link
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the link has ended.
    pub(crate) fn is_dead(&self) -> bool {
        self.lock().dead.is_some()
    }

    /// Closes the link (client gone, or the proxy is done with it).
    pub(crate) fn close(&self) {
        self.cancel.cancel();
    }

    /// Cancelled when the link's connection is closed on both sides.
    pub(crate) fn released(&self) -> CancellationToken {
        self.released.clone()
    }

    /// Queues a client request. On a dead link the request is handed back untouched.
    pub(crate) async fn send_client(&self, req: ClientReq) -> Result<(), ClientReq> {
        let pid = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut inner = self.lock();
            if inner.dead.is_some() {
                return Err(req);
            }
            inner.pending.insert(pid, Pending::Client(req));
        }
        if self.tx.send(LinkMsg::Client { pid }).await.is_err() {
            // If the link's shutdown already took the entry, it has answered the client.
            if let Some(Pending::Client(req)) = self.lock().pending.remove(&pid) {
                return Err(req);
            }
        }
        Ok(())
    }

    /// The one client request written and unanswered, if there is exactly one (and nothing
    /// the proxy itself is waiting for), taken out of the pending table.
    fn take_sole_written(&self) -> Option<ClientReq> {
        let mut inner = self.lock();
        let mut written = inner.pending.iter().filter(|(_, p)| match p {
            Pending::Client(req) => req.body.is_empty(),
            Pending::Internal(_) => true,
        });
        let (pid, only) = written.next()?;
        if written.next().is_some() || !matches!(only, Pending::Client(_)) {
            return None;
        }
        let pid = *pid;
        match inner.pending.remove(&pid) {
            Some(Pending::Client(req)) => Some(req),
            _ => None,
        }
    }

    /// Client requests written or queued and not yet answered.
    pub(crate) fn pending_client(&self) -> usize {
        self.lock()
            .pending
            .values()
            .filter(|p| matches!(p, Pending::Client(_)))
            .count()
    }

    /// Sends a body as is (a reply to a request the CLI made).
    pub(crate) async fn send_raw(&self, body: Bytes) -> bool {
        self.tx.send(LinkMsg::Raw(body)).await.is_ok()
    }

    /// Sends a request the proxy originates and waits for the reply body.
    pub(crate) async fn call(&self, method: &str, params: &Value) -> Result<Bytes, CallFailed> {
        let pid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = rpc::request(pid, method, params);
        self.call_body(pid, Bytes::from(body)).await
    }

    /// Sends a client body under a proxy id (fan-out), waiting for the reply body.
    pub(crate) async fn call_as_proxy(
        &self,
        client_body: &[u8],
        id_span: (usize, usize),
    ) -> Result<Bytes, CallFailed> {
        let pid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = envelope::splice(client_body, id_span, pid.to_string().as_bytes());
        self.call_body(pid, Bytes::from(body)).await
    }

    async fn call_body(&self, pid: u64, body: Bytes) -> Result<Bytes, CallFailed> {
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = self.lock();
            if let Some(why) = &inner.dead {
                return Err(CallFailed::Ended(why.clone()));
            }
            inner.pending.insert(pid, Pending::Internal(tx));
        }
        let closed = || CallFailed::Closed(self.backend.name.clone());
        if self.tx.send(LinkMsg::Raw(body)).await.is_err() {
            self.lock().pending.remove(&pid);
            return Err(closed());
        }
        rx.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Marks the link dead and settles everything it owed: queued requests that never reached
    /// the backend are handed back for re-routing; requests already written get an error.
    fn die<O: LinkOwner>(&self, why: &LinkEnd, unsent: Vec<u64>, owner: &Arc<O>) {
        let reason = match why {
            LinkEnd::Closed => "link closed".to_string(),
            LinkEnd::Fenced => format!("backend {} was marked down", self.backend.name),
            LinkEnd::ConnectFailed(e) => format!("cannot reach backend {}: {e}", self.backend.name),
            LinkEnd::Broken(e) => format!("connection to backend {} lost: {e}", self.backend.name),
            LinkEnd::Cut => format!(
                "the link to backend {} was closed: a streamed request on it was refused mid-frame",
                self.backend.name
            ),
        };
        let shared_reason: Arc<str> = reason.as_str().into();
        let pending = {
            let mut inner = self.lock();
            inner.dead = Some(shared_reason.clone());
            std::mem::take(&mut inner.pending)
        };
        let mut pending = pending;
        let mut unsent: Vec<ClientReq> = unsent
            .into_iter()
            .filter_map(|pid| match pending.remove(&pid) {
                Some(Pending::Client(req)) => Some(req),
                _ => None,
            })
            .collect();
        let mut in_flight = Vec::new();
        for (_, p) in pending {
            match p {
                Pending::Internal(tx) => {
                    let _ = tx.send(Err(CallFailed::Ended(shared_reason.clone())));
                }
                // The writer takes the body as it writes; one still holding it never left.
                Pending::Client(req) if !req.body.is_empty() => unsent.push(req),
                Pending::Client(req) => in_flight.push(req),
            }
        }
        owner.ended(self, why, &reason, unsent, in_flight);
    }
}

async fn run<O: LinkOwner>(
    link: Arc<Link>,
    mut rx: mpsc::Receiver<LinkMsg>,
    owner: Arc<O>,
    shared: Arc<Shared>,
    fence: CancellationToken,
) {
    let backend = link.backend.clone();
    backend.link_opened();
    let end = tokio::select! {
        biased;
        _ = fence.cancelled() => LinkEnd::Fenced,
        end = session(&link, &mut rx, &owner, &shared) => end,
    };
    // The socket is gone (session() dropped it), unless a drain task waits for the backend's
    // close and releases it then; a resume held for it may go ahead.
    if !link.release_handed_off.load(Ordering::Acquire) {
        link.released.cancel();
    }
    backend.link_closed();
    rx.close();
    let mut unsent = Vec::new();
    while let Ok(msg) = rx.try_recv() {
        if let LinkMsg::Client { pid } = msg {
            unsent.push(pid);
        }
    }
    match &end {
        LinkEnd::ConnectFailed(e) | LinkEnd::Broken(e) => {
            crate::health::passive_failure(&shared, &backend, e);
        }
        _ => {}
    }
    debug!(conn = owner.conn_id(), backend = %backend.name, end = ?end, "link closed");
    link.die(&end, unsent, &owner);
}

/// Connects, handshakes, then pumps frames both ways until something ends it.
async fn session<O: LinkOwner>(
    link: &Arc<Link>,
    rx: &mut mpsc::Receiver<LinkMsg>,
    owner: &Arc<O>,
    shared: &Arc<Shared>,
) -> LinkEnd {
    let cfg = shared.config();
    let backend = &link.backend;
    let open = async {
        let timeout = Some(cfg.limits.connect_timeout.0);
        let (r, mut w) =
            match crate::tls::dial(&backend.address, backend.tls.as_deref(), timeout).await {
                Ok(s) => s,
                Err(e) => return Err(LinkEnd::ConnectFailed(e.into())),
            };
        let mut reader = FrameReader::new(r, shared.limits());
        let telemetry = owner.telemetry();
        match tokio::time::timeout(
            cfg.limits.handshake_timeout.0,
            backend.handshake(&mut reader, &mut w, telemetry),
        )
        .await
        {
            Ok(Ok(())) => Ok((reader, w)),
            Ok(Err(e)) => Err(LinkEnd::ConnectFailed(e)),
            Err(_) => Err(LinkEnd::ConnectFailed(CallError::Timeout {
                what: "the backend's answer to connect",
                after: cfg.limits.handshake_timeout.0,
            })),
        }
    };
    let (mut reader, w) = tokio::select! {
        biased;
        _ = link.cancel.cancelled() => return LinkEnd::Closed,
        r = open => match r {
            Ok(rw) => rw,
            Err(end) => return end,
        },
    };
    debug!(conn = owner.conn_id(), backend = %backend.name, "link up");
    let metrics = &shared.metrics;
    let link_w = link.clone();
    let shared_w = shared.clone();
    let writer = wire::writer_with(w, rx, move |msg| {
        let body = match msg {
            LinkMsg::Raw(b) => Frame::whole(b),
            LinkMsg::Client { pid } => {
                let (body, span, stream) = match link_w.lock().pending.get_mut(&pid) {
                    Some(Pending::Client(req)) => (
                        std::mem::take(&mut req.body),
                        req.id_span,
                        req.stream.as_mut().and_then(|s| s.rest.take()),
                    ),
                    _ => return None,
                };
                let f = Frame::spliced(&body, span, Bytes::from(pid.to_string()));
                match stream {
                    Some(s) => f.then(s),
                    None => f,
                }
            }
        };
        shared_w.metrics.frame("backend_out", body.len());
        Some(body)
    });
    let stream_above = cfg.limits.stream_above();
    let max_depth = cfg.limits.max_json_depth;
    let read_loop = async {
        loop {
            match reader.read_item(stream_above).await {
                Ok(Some(Item::Whole(body))) => {
                    crate::runtime::activity();
                    metrics.frame("backend_in", body.len());
                    on_backend_frame(link, owner, body).await;
                }
                Ok(Some(Item::Head { head, len })) => {
                    crate::runtime::activity();
                    metrics.frame("backend_in", len);
                    if let Err(e) =
                        on_backend_head(link, owner, &mut reader, head, max_depth, metrics).await
                    {
                        return LinkEnd::Broken(CallError::Read(e));
                    }
                }
                Ok(None) => return LinkEnd::Broken(CallError::Closed),
                Err(e) if e.recoverable() => {
                    metrics.bad_frame("backend_oversize");
                    warn!(backend = %backend.name, error = %e, "oversized frame from backend discarded");
                    if let crate::codec::CodecError::FrameTooLarge {
                        len, limit, head, ..
                    } = e
                    {
                        oversized_reply(link, &**owner, len, limit, &head).await;
                    }
                }
                Err(e) => return LinkEnd::Broken(CallError::Read(e)),
            }
        }
    };
    // Reads first: when the backend has closed and a request is queued at the same wake-up,
    // the close must be seen before the request is written, so it is re-routed, not lost.
    let end = tokio::select! {
        biased;
        _ = link.cancel.cancelled() => LinkEnd::Closed,
        end = read_loop => end,
        res = writer => match res {
            Ok(()) => LinkEnd::Closed,
            Err(e) if e.kind() == wire::CUT => LinkEnd::Cut,
            Err(e) => LinkEnd::Broken(CallError::Write(e)),
        },
    };
    if matches!(end, LinkEnd::Closed) {
        // The writer is dropped, which half-closes the socket. The CLI cleans up a client's
        // sessions when it sees the close; waiting for its own close (bounded) lets a resume
        // of those sessions from a new client follow that cleanup instead of racing it. The
        // wait holds only the backend socket, so the client's own connection closes at once.
        let released = link.released.clone();
        link.release_handed_off.store(true, Ordering::Release);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(RELEASE_WAIT, async {
                while let Ok(Some(_)) = reader.read_frame().await {}
            })
            .await;
            drop(reader);
            released.cancel();
        });
    }
    end
}

/// How long a closing link waits for the backend to close its side.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// A backend frame over the limit was skipped. If it was a reply, whoever waits for it gets an
/// error instead of waiting forever.
async fn oversized_reply<O: LinkOwner>(
    link: &Arc<Link>,
    owner: &O,
    len: usize,
    limit: usize,
    head: &[u8],
) {
    // A reply starts with jsonrpc and id, not method: only then is the sniffed id a reply id.
    if memchr::memmem::find(&head[..head.len().min(256)], b"\"method\"").is_some() {
        return;
    }
    let Some(pid) = envelope::sniff_id(head).and_then(|t| t.parse::<u64>().ok()) else {
        return;
    };
    let pending = link.lock().pending.remove(&pid);
    let why = CallFailed::Oversized { len, limit };
    match pending {
        Some(Pending::Client(meta)) => {
            let data = rpc::data(
                false,
                serde_json::json!({"limit": limit, "length": len, "backend": link.backend.name}),
            );
            owner
                .refuse(meta, rpc::FRAME_TOO_LARGE, why.to_string(), data)
                .await;
        }
        Some(Pending::Internal(tx)) => {
            let _ = tx.send(Err(why));
        }
        None => {}
    }
}

/// A backend frame too big to hold. A reply to a client request or an event for a client is
/// forwarded as it arrives; anything the proxy must read whole (its own calls' replies, the
/// CLI's requests, replies it records sessions from) is buffered and handled as usual.
async fn on_backend_head<O: LinkOwner, R: tokio::io::AsyncRead + Unpin>(
    link: &Arc<Link>,
    owner: &Arc<O>,
    reader: &mut FrameReader<R>,
    head: Bytes,
    max_depth: usize,
    metrics: &crate::metrics::Metrics,
) -> Result<(), crate::codec::CodecError> {
    let plan = envelope::parse_head(&head).and_then(|h| {
        let to = match h.env.kind {
            Kind::Response => {
                let pid = h.env.id_u64()?;
                let mut inner = link.lock();
                let streams = matches!(
                    inner.pending.get(&pid),
                    Some(Pending::Client(m)) if streams_reply(m)
                );
                let Some(Pending::Client(meta)) =
                    streams.then(|| inner.pending.remove(&pid)).flatten()
                else {
                    return None;
                };
                StreamTo::Reply(meta, h.env.id_span?, h.env.is_error)
            }
            Kind::Notification => {
                let method = h.env.method.as_deref()?;
                if method.starts_with("copilotLb.") {
                    return None;
                }
                StreamTo::Event(
                    method.to_string(),
                    h.env.session_id.as_deref().map(str::to_string),
                )
            }
            Kind::Request => return None,
        };
        Some((to, h.cut))
    });
    let Some((to, cut)) = plan else {
        let body = reader.read_rest(head).await?;
        on_backend_frame(link, owner, body).await;
        return Ok(());
    };
    let mut check = envelope::Tail::structural(cut, max_depth);
    if let Err(e) = check.feed(&head) {
        stream_refused(link, &e);
        if let StreamTo::Reply(meta, ..) = to {
            let data = rpc::data(false, serde_json::json!({"backend": link.backend.name}));
            let m = format!("the backend's reply could not be forwarded: {e}");
            owner.refuse(meta, rpc::INTERNAL_ERROR, m, data).await;
        }
        return Ok(());
    }
    let (tx, rx) = mpsc::channel(STREAM_CHUNKS);
    let mut tx = Some(tx);
    let rest = Streamed {
        len: reader.remaining(),
        rx,
    };
    let frame = match &to {
        StreamTo::Reply(meta, span, _) => Frame::spliced(
            &head,
            *span,
            Bytes::copy_from_slice(meta.id.get().as_bytes()),
        )
        .then(rest),
        StreamTo::Event(..) => Frame::whole(head).then(rest),
    };
    metrics.streamed("backend_in");
    let delivered = match to {
        StreamTo::Reply(meta, _, is_error) => owner.reply_frame(link, meta, frame, is_error).await,
        StreamTo::Event(method, session) => {
            owner.event_frame(&method, session.as_deref(), frame).await
        }
    };
    if !delivered {
        // Nobody takes it: the reader discards the rest before the next frame.
        return Ok(());
    }
    while let Some(chunk) = reader.read_chunk().await? {
        if let Err(e) = check.feed(&chunk) {
            // Dropping the sender before the end cuts the frame off at the client; the
            // reader skips the rest, so this link stays in step.
            stream_refused(link, &e);
            return Ok(());
        }
        if let Some(t) = &tx {
            if t.send(chunk).await.is_err() {
                // The client is gone: the rest is read and dropped.
                tx = None;
            }
        }
    }
    if let Err(e) = check.finish() {
        stream_refused(link, &e);
    }
    Ok(())
}

/// How many chunks of a streamed frame may wait for the writer: the memory a big frame
/// holds is this many read buffers, not the frame.
pub(crate) const STREAM_CHUNKS: usize = 4;

/// Where a streamed backend frame goes.
enum StreamTo {
    Reply(ClientReq, (usize, usize), bool),
    Event(String, Option<String>),
}

/// Whether a reply to this request can be forwarded before it is all read: not when the
/// proxy records something from its body.
fn streams_reply(meta: &ClientReq) -> bool {
    !matches!(meta.route, Route::Create | Route::Resume | Route::Delete)
        && meta.method != "sessions.fork"
}

fn stream_refused(link: &Link, e: &envelope::TailError) {
    warn!(backend = %link.backend.name, error = %e, "streamed frame from backend refused; not delivered whole");
}

async fn on_backend_frame<O: LinkOwner>(link: &Arc<Link>, owner: &Arc<O>, body: Bytes) {
    let env = match envelope::parse_backend(&body) {
        Ok(e) => e,
        Err(e) => {
            // The CLI answers a frame it could not parse with `id: null`. With one request
            // written and unanswered on this link, the error can only be its answer; otherwise
            // it cannot be routed (a Rust SDK client would drop its connection on a null id).
            if let Some(err) = null_id_error(&body) {
                if let Some(meta) = link.take_sole_written() {
                    let head = r#"{"jsonrpc":"2.0","id":"#;
                    let out = format!(r#"{head}{},"error":{err}}}"#, meta.id.get());
                    let span = (head.len(), head.len() + meta.id.get().len());
                    return owner.reply(link, meta, &Bytes::from(out), span, true).await;
                }
            }
            warn!(backend = %link.backend.name, error = %e, "unroutable frame from backend dropped");
            return;
        }
    };
    match env.kind {
        Kind::Response => {
            let Some(pid) = env.id_u64() else {
                debug!(backend = %link.backend.name, "backend reply with an id the proxy never sent dropped");
                return;
            };
            let pending = link.lock().pending.remove(&pid);
            match pending {
                Some(Pending::Client(meta)) => {
                    let is_error = env.is_error;
                    let span = env.id_span.unwrap_or((0, 0));
                    drop(env);
                    owner.reply(link, meta, &body, span, is_error).await;
                }
                Some(Pending::Internal(tx)) => {
                    let _ = tx.send(Ok(body.clone()));
                }
                None => {
                    debug!(backend = %link.backend.name, pid, "reply for unknown id dropped");
                }
            }
        }
        Kind::Notification => {
            let method = env.method.as_deref().unwrap_or("");
            if method.starts_with("copilotLb.") {
                // The proxy's own protocol between a sidecar and its edges: never a client's.
                if method == rpc::GOAWAY && link.backend.edge {
                    if link.backend.leaving() {
                        info!(backend = %link.backend.name, "edge is going away; moving its sessions to another edge");
                    }
                    owner.backend_leaving(&link.backend);
                } else {
                    debug!(backend = %link.backend.name, method, "copilot-lb notification from a backend dropped");
                }
                return;
            }
            let session = env.session_id.as_deref();
            owner.notification(method, session, body.clone()).await;
        }
        Kind::Request => {
            let Some(span) = env.id_span else { return };
            let Some(id) = env.id.map(|r| r.to_owned()) else {
                return;
            };
            let method = env.method.as_deref().unwrap_or("").to_string();
            drop(env);
            owner.cli_request(link, id, span, &method, &body).await;
        }
    }
}

/// The `error` member of an error response whose id is null, as JSON text.
fn null_id_error(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let o = v.as_object()?;
    (o.get("id") == Some(&Value::Null) && !o.contains_key("method"))
        .then(|| {
            o.get("error")
                .filter(|e| e.is_object())
                .map(Value::to_string)
        })
        .flatten()
}
