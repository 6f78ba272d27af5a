//! `session.list` and `session.getLastId`: asked of every serving backend, merged (newest
//! copy of each session wins), filtered to what the caller's tenant may see.

use super::conn::ClientConn;
use super::link::CallFailed;
use super::request::ClientReq;
use crate::backend::{Backend, State};
use crate::envelope;
use crate::route::Route;
use crate::rpc;
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// How long a fan-out waits for each backend.
const FANOUT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why one backend of a fan-out gave no reply.
#[derive(Debug, thiserror::Error)]
pub(super) enum AskError {
    /// The link failed the call.
    #[error("{0}")]
    Call(CallFailed),
    /// No reply within [`FANOUT_TIMEOUT`].
    #[error("timed out")]
    TimedOut,
    /// The task asking it panicked or was cancelled.
    #[error("{0}")]
    Task(tokio::task::JoinError),
}

/// The merged answer of a fan-out.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Merged {
    /// Sessions, newest first.
    pub(super) sessions: Vec<Value>,
    /// Backends that answered.
    pub(super) answered: usize,
    /// `backend: why` for each that did not.
    pub(super) errors: Vec<String>,
}

/// Merges the replies of a fan-out. Pure: a session listed by several backends (shared
/// storage) appears once, as its most recently modified copy; ids the caller may not see are
/// dropped.
pub(super) fn merge(
    replies: Vec<(String, Result<Value, AskError>)>,
    visible: impl Fn(&str) -> bool,
) -> Merged {
    let mut out = Merged::default();
    let mut by_id: HashMap<String, Value> = HashMap::new();
    for (name, reply) in replies {
        let v = match reply {
            Ok(v) => v,
            Err(e) => {
                out.errors.push(format!("{name}: {e}"));
                continue;
            }
        };
        if let Some(err) = v.get("error") {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("error");
            out.errors.push(format!("{name}: {msg}"));
            continue;
        }
        out.answered += 1;
        let Some(list) = v.pointer("/result/sessions").and_then(Value::as_array) else {
            continue;
        };
        for s in list {
            let Some(id) = s.get("sessionId").and_then(Value::as_str) else {
                continue;
            };
            if !visible(id) {
                continue;
            }
            let newer = by_id.get(id).is_none_or(|old| modified(s) > modified(old));
            if newer {
                by_id.insert(id.to_string(), s.clone());
            }
        }
    }
    out.sessions = by_id.into_values().collect();
    out.sessions.sort_by(|a, b| modified(b).cmp(modified(a)));
    out
}

fn modified(s: &Value) -> &str {
    s.get("modifiedTime").and_then(Value::as_str).unwrap_or("")
}

impl ClientConn {
    pub(super) async fn list(self: &Arc<Self>, req: ClientReq) {
        let targets: Vec<Arc<Backend>> = self
            .shared
            .pool
            .all()
            .iter()
            .filter(|b| b.state() != State::Down)
            .cloned()
            .collect();
        if targets.is_empty() {
            return self.no_backend(&req).await;
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
        let calls: Vec<_> = targets
            .iter()
            .map(|b| {
                let link = self.link(b);
                let body = body.clone();
                let call = tokio::spawn(async move {
                    tokio::time::timeout(FANOUT_TIMEOUT, link.call_as_proxy(&body, span)).await
                });
                (b.name.clone(), call)
            })
            .collect();
        let mut replies = Vec::with_capacity(calls.len());
        for (name, h) in calls {
            let reply = match h.await {
                Ok(Ok(Ok(r))) => Ok(serde_json::from_slice(&r).unwrap_or(Value::Null)),
                Ok(Ok(Err(e))) => Err(AskError::Call(e)),
                Ok(Err(_)) => Err(AskError::TimedOut),
                Err(e) => Err(AskError::Task(e)),
            };
            replies.push((name, reply));
        }
        // What the registry says of each listed id, asked once per id before the pure merge.
        let mut known: HashMap<String, Result<Option<bool>, ()>> = HashMap::new();
        let tenant = self.tenant();
        for (_, reply) in &replies {
            let Ok(v) = reply else { continue };
            let Some(list) = v.pointer("/result/sessions").and_then(Value::as_array) else {
                continue;
            };
            for id in list
                .iter()
                .filter_map(|s| s.get("sessionId").and_then(Value::as_str))
            {
                if known.contains_key(id) {
                    continue;
                }
                let k = self
                    .shared
                    .sessions
                    .owner(id, &tenant.name, &self.shared.pool)
                    .await
                    .map_err(|_| ());
                known.insert(id.to_string(), k);
            }
        }
        let merged = merge(replies, |id| {
            self.visible(id, known.get(id).cloned().unwrap_or(Err(())))
        });
        if merged.answered == 0 {
            let m = format!(
                "{} failed on every backend: {}",
                req.method,
                merged.errors.join("; ")
            );
            let data = rpc::data(true, json!({}));
            return self.fail(&req, rpc::BACKEND_UNAVAILABLE, &m, data).await;
        }
        if !merged.errors.is_empty() {
            warn!(conn = self.id, errors = ?merged.errors, "{} answered from a subset of backends", req.method);
        }
        self.shared.metrics.request(req.class(), "ok");
        let result = if req.route == Route::LastId {
            match merged.sessions.first().and_then(|s| s.get("sessionId")) {
                Some(id) => json!({"sessionId": id}),
                None => json!({}),
            }
        } else {
            json!({"sessions": merged.sessions})
        };
        self.reply_result(req.id.get(), &result).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[(&str, &str)]) -> Result<Value, AskError> {
        let sessions: Vec<Value> = items
            .iter()
            .map(|(id, t)| json!({"sessionId": id, "modifiedTime": t}))
            .collect();
        Ok(json!({"result": {"sessions": sessions}}))
    }

    #[test]
    fn newest_copy_wins_and_foreign_ids_are_dropped() {
        let m = merge(
            vec![
                (
                    "a".into(),
                    list(&[
                        ("s1", "2026-01-01T00:00:00Z"),
                        ("x", "2026-05-01T00:00:00Z"),
                    ]),
                ),
                (
                    "b".into(),
                    list(&[
                        ("s1", "2026-03-01T00:00:00Z"),
                        ("s2", "2026-02-01T00:00:00Z"),
                    ]),
                ),
            ],
            |id| id != "x",
        );
        assert_eq!(m.answered, 2);
        let ids: Vec<_> = m
            .sessions
            .iter()
            .map(|s| s["sessionId"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["s1", "s2"]);
        assert_eq!(m.sessions[0]["modifiedTime"], "2026-03-01T00:00:00Z");
    }

    #[test]
    fn failed_backends_are_reported_not_merged() {
        let m = merge(
            vec![
                ("a".into(), Err(AskError::TimedOut)),
                (
                    "b".into(),
                    Ok(json!({"error": {"code": -32603, "message": "boom"}})),
                ),
                ("c".into(), list(&[("s", "t")])),
            ],
            |_| true,
        );
        assert_eq!(m.answered, 1);
        assert_eq!(m.errors, ["a: timed out", "b: boom"]);
        assert_eq!(m.sessions.len(), 1);
        let down = AskError::Call(CallFailed::Closed("a".into()));
        let none = merge(vec![("a".into(), Err(down))], |_| true);
        assert_eq!((none.answered, none.sessions.len()), (0, 0));
    }
}
