//! A client frame too big to hold (`limits.stream_above_bytes`): routed on its envelope,
//! forwarded once that is known, and copied to the backend as the rest arrives, checked on
//! the way (`envelope::Tail`). Whatever the proxy must read whole (creates, resumes, methods
//! whose params name other sessions, requests the tenant's tool policy rewrites) is buffered
//! and takes the usual path.

use super::conn::ClientConn;
use super::link::STREAM_CHUNKS;
use super::request::{intake, Intake, StreamedReq};
use crate::codec::{CodecError, FrameReader};
use crate::envelope::{self, Kind, TailError};
use crate::route::{self, Route};
use crate::wire::Streamed;
use crate::{policy, rpc};
use bytes::Bytes;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tracing::warn;

/// Whether a request to `method` may be forwarded before all of it is read.
fn streams(method: &str) -> bool {
    !policy::is_host_method(method)
        && !policy::applies_to(method)
        && !route::lookup(method).is_some_and(|e| e.reads_params())
}

/// The head of a body, cut where the value that runs past it starts, closed as if that
/// value were `null`: what the buffered path's intake reads to route it.
fn stand_in(head: &[u8], cut: usize, in_params: bool) -> Bytes {
    let mut s = Vec::with_capacity(cut + 6);
    s.extend_from_slice(&head[..cut]);
    s.extend_from_slice(b"null");
    if in_params {
        s.push(b'}');
    }
    s.push(b'}');
    Bytes::from(s)
}

impl ClientConn {
    /// Handles a frame whose body is longer than the streaming threshold; `head` is its
    /// start and `reader` holds the rest.
    pub(super) async fn on_client_head<R: AsyncRead + Unpin>(
        self: &Arc<Self>,
        reader: &mut FrameReader<R>,
        head: Bytes,
    ) -> Result<(), CodecError> {
        let (max_depth, intake_of) = {
            let cfg = self.shared.config_now();
            let depth = cfg.limits.max_json_depth;
            let plan = envelope::parse_head(&head)
                .filter(|h| h.env.kind == Kind::Request)
                .filter(|h| h.env.method.as_deref().is_some_and(streams))
                .map(|h| (h.cut, stand_in(&head, h.cut, h.in_params)));
            let intake_of = plan.map(|(cut, s)| (cut, intake(s, depth, &cfg.routing)));
            (depth, intake_of)
        };
        let (cut, mut req) = match intake_of {
            // Routed by a session named before the cut: a second `sessionId` after it can
            // only be a forgery. A frame that names its session later (an SDK that sorts its
            // keys) is routed by what it holds, below.
            Some((cut, Intake::Request(req)))
                if req.route == Route::Session && req.session.is_some() =>
            {
                (cut, req)
            }
            // Refused, local, or routed by what it holds: the usual path, on the whole body.
            _ => {
                let body = reader.read_rest(head).await?;
                // Boxed: the request path's future is deep, and this frame is a rare one.
                Box::pin(self.on_client_frame(body)).await;
                return Ok(());
            }
        };
        let mut check = envelope::Tail::new(cut, max_depth);
        let id = req.id.get().to_string();
        if let Err(e) = check.feed(&head) {
            // Nothing was sent: refused like a buffered frame, and the rest skipped.
            self.shared.metrics.bad_frame("invalid");
            self.reply_error(&id, refusal_code(&e), &e.to_string(), None)
                .await;
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(STREAM_CHUNKS);
        let answered = Arc::new(AtomicBool::new(false));
        // The stand-in and the head share every byte before the cut, the id's span included.
        req.body = head;
        req.stream = Some(Box::new(StreamedReq {
            rest: Some(Streamed {
                len: reader.remaining(),
                rx,
            }),
            answered: answered.clone(),
        }));
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.streamed("client_in");
        Box::pin(self.on_request(req)).await;
        let mut tx = Some(tx);
        let mut refused = None;
        while let Some(chunk) = reader.read_chunk().await? {
            if let Err(e) = check.feed(&chunk) {
                refused = Some(e);
                break;
            }
            if let Some(t) = &tx {
                if t.send(chunk).await.is_err() {
                    // Answered already (refused, or its link died): the rest is dropped.
                    tx = None;
                }
            }
        }
        if refused.is_none() {
            refused = check.finish().err();
        }
        let Some(e) = refused else { return Ok(()) };
        warn!(conn = self.id, error = %e, "streamed request refused mid-frame; its link to the backend is cut");
        self.shared.metrics.bad_frame("invalid");
        // Still waiting to be answered: the client hears why, once. The link cuts the frame
        // off when the sender goes (the backend never sees it whole) and stays silent.
        let waiting = tx.as_ref().is_some_and(|t| !t.is_closed());
        drop(tx);
        if waiting && !answered.swap(true, Ordering::AcqRel) {
            let data = rpc::data(false, json!({}));
            self.reply_error(&id, refusal_code(&e), &e.to_string(), Some(data))
                .await;
        }
        Ok(())
    }
}

/// The code the buffered path gives the same fault.
fn refusal_code(e: &TailError) -> i64 {
    match e {
        TailError::RoutedLater(_) | TailError::EscapedKey(_) => rpc::INVALID_REQUEST,
        TailError::Syntax { .. } | TailError::Utf8(_) | TailError::TooDeep(_) => rpc::PARSE_ERROR,
    }
}
