//! A multiplexed JSON-RPC client, like one SDK `CopilotClient`: one connection, many sessions,
//! concurrent requests matched by id, `session.event` notifications routed to the session that
//! subscribed. Every call has a deadline; a call whose deadline passes is reported as such
//! (never retried silently).

use bytes::Bytes;
use copilot_lb::codec::{FrameReader, Limits};
use copilot_lb::envelope::{self, Kind};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// `error.code` and `error.message` of an error response.
    pub error: Option<(i64, String)>,
    /// The whole body.
    pub body: Bytes,
    /// Round-trip time.
    pub rtt: Duration,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Why a call has no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallErr {
    /// No response by the deadline.
    Deadline,
    /// The connection closed before the response.
    Closed,
}

/// A session event the callers care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    /// `session.idle`: the turn ended.
    Idle,
    /// `session.error` with its `errorCode` (or message).
    Error(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<(Option<(i64, String)>, Bytes)>>>>;
type Subs = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Ev>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One client connection.
pub struct Mux {
    out: mpsc::Sender<Bytes>,
    pending: Pending,
    subs: Subs,
    next: AtomicU64,
    closed: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Mux {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Mux {
    /// Connects and runs the SDK's `connect` handshake (10 s bound each).
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Arc<Mux>> {
        let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::other("connect timed out"))??;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let (out, rx) = mpsc::channel::<Bytes>(4096);
        let pending: Pending = Arc::default();
        let subs: Subs = Arc::default();
        let closed = CancellationToken::new();
        let writer = {
            let closed = closed.clone();
            tokio::spawn(async move {
                let _ = copilot_lb::wire::writer(w, rx).await;
                closed.cancel();
            })
        };
        let reader = {
            let (pending, subs, closed, out) =
                (pending.clone(), subs.clone(), closed.clone(), out.clone());
            tokio::spawn(async move {
                let mut fr = FrameReader::new(r, Limits::default());
                while let Ok(Some(body)) = fr.read_frame().await {
                    dispatch(&pending, &subs, &out, body).await;
                }
                closed.cancel();
                lock(&pending).clear();
            })
        };
        let m = Arc::new(Mux {
            out,
            pending,
            subs,
            next: AtomicU64::new(1),
            closed,
            tasks: vec![writer, reader],
        });
        match m.call("connect", &json!({}), Duration::from_secs(10)).await {
            Ok(r) if r.error.is_none() => Ok(m),
            Ok(r) => Err(std::io::Error::other(format!(
                "connect refused: {:?}",
                r.error
            ))),
            Err(e) => Err(std::io::Error::other(format!("connect: {e:?}"))),
        }
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Routes `session.idle` / `session.error` events of `sid` to the returned receiver
    /// (replacing an earlier subscription).
    pub fn subscribe(&self, sid: &str) -> mpsc::UnboundedReceiver<Ev> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.subs).insert(sid.to_string(), tx);
        rx
    }

    /// Stops routing events of `sid`.
    pub fn unsubscribe(&self, sid: &str) {
        lock(&self.subs).remove(sid);
    }

    /// One request; `Err` if no response arrives by `deadline` or the connection closes.
    pub async fn call(
        &self,
        method: &str,
        params: &Value,
        deadline: Duration,
    ) -> Result<Reply, CallErr> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let start = Instant::now();
        let wait = async {
            if self.out.send(body).await.is_err() {
                return Err(CallErr::Closed);
            }
            tokio::select! {
                r = rx => r.map_err(|_| CallErr::Closed),
                _ = self.closed.cancelled() => Err(CallErr::Closed),
            }
        };
        let res = tokio::time::timeout(deadline, wait).await;
        lock(&self.pending).remove(&id);
        match res {
            Ok(Ok((error, body))) => Ok(Reply {
                error,
                body,
                rtt: start.elapsed(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CallErr::Deadline),
        }
    }
}

async fn dispatch(pending: &Pending, subs: &Subs, out: &mpsc::Sender<Bytes>, body: Bytes) {
    let Ok(env) = envelope::parse(&body) else {
        return;
    };
    match env.kind {
        Kind::Response => {
            let Some(id) = env.id_u64() else { return };
            let is_error = env.is_error;
            drop(env);
            let waiter = lock(pending).remove(&id);
            if let Some(w) = waiter {
                let error = is_error.then(|| {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    (
                        v.pointer("/error/code")
                            .and_then(Value::as_i64)
                            .unwrap_or(0),
                        v.pointer("/error/message")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    )
                });
                let _ = w.send((error, body));
            }
        }
        Kind::Notification => {
            if env.method.as_deref() != Some("session.event") {
                return;
            }
            drop(env);
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let Some(sid) = v.pointer("/params/sessionId").and_then(Value::as_str) else {
                return;
            };
            let ev = match v.pointer("/params/event/type").and_then(Value::as_str) {
                Some("session.idle") => Ev::Idle,
                Some("session.error") => Ev::Error(
                    v.pointer("/params/event/data/errorCode")
                        .or_else(|| v.pointer("/params/event/data/message"))
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string(),
                ),
                _ => return,
            };
            let tx = lock(subs).get(sid).cloned();
            if let Some(tx) = tx {
                let _ = tx.send(ev);
            }
        }
        Kind::Request => {
            // No CLI→client requests occur in these scenarios; answer so nothing waits.
            let id = env.id.map(|r| r.get().to_string()).unwrap_or_default();
            drop(env);
            let reply = format!(
                r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":-32601,"message":"not handled by the chaos client"}}}}"#
            );
            let _ = out.send(Bytes::from(reply)).await;
        }
    }
}
