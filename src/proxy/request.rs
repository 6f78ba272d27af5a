//! A client frame, classified: a request with its route and session, a reply to a CLI
//! callback, a notification, or something refused before routing. Pure: bytes in, a decision
//! out, nothing sent.

use crate::config::RoutingConfig;
use crate::envelope::{self, Kind};
use crate::route::{self, Denial, Route};
use crate::rpc;
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::time::Instant;

/// A client request in flight (or queued) on a link.
#[derive(Debug)]
pub(crate) struct ClientReq {
    /// Original body from the client (taken by the link's writer when written).
    pub(crate) body: Bytes,
    /// The client's id, exactly as sent.
    pub(crate) id: Box<RawValue>,
    /// Where the id sits in `body`.
    pub(crate) id_span: (usize, usize),
    /// Method name.
    pub(crate) method: String,
    /// Session the request is about (and is routed by), if any.
    pub(crate) session: Option<String>,
    /// Every other session its params name: the caller must own each, too.
    pub(crate) other_sessions: Vec<route::Other>,
    /// Route class.
    pub(crate) route: Route,
    /// When the proxy read it.
    pub(crate) started: Instant,
    /// For `session.create`: this request installed the route (undo it if the create fails).
    pub(crate) fresh: bool,
    /// Failover rounds so far (one budget for the whole life of the request).
    pub(crate) attempts: u8,
    /// Backends that could not be reached for it, never tried again (creates, global calls).
    pub(crate) avoid: Vec<String>,
    /// Counts it as work on the backend it was last forwarded to until it is answered (the
    /// request is dropped then), so a rolling restart waits for it.
    pub(crate) on: Option<crate::backend::Busy>,
    /// For a streamed frame (`body` is then its head); boxed, as few requests are.
    pub(crate) stream: Option<Box<StreamedReq>>,
}

/// What a streamed request carries beyond its head.
#[derive(Debug)]
pub(crate) struct StreamedReq {
    /// The rest of the body, taken by the link's writer with the head.
    pub(crate) rest: Option<crate::wire::Streamed>,
    /// Set by whoever answers the client first: the proxy refusing the rest of the body
    /// (`stream.rs`), or any proxy error (`fail`); the other then stays silent.
    pub(crate) answered: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ClientReq {
    /// Whether the client has been told this streamed request failed.
    pub(crate) fn answered(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(|s| s.answered.load(std::sync::atomic::Ordering::Acquire))
    }
}

impl ClientReq {
    /// The metrics class of its route.
    pub(crate) fn class(&self) -> &'static str {
        route::class_label(self.route)
    }
}

/// What a client frame turned out to be.
#[derive(Debug)]
pub(crate) enum Intake {
    /// A request to route.
    Request(ClientReq),
    /// A well-formed request refused before routing: answer it with this error.
    Refused {
        req: ClientReq,
        code: i64,
        message: String,
        data: Value,
    },
    /// Not valid JSON-RPC (or too deep, or not UTF-8): answer under `id` (`null` when no
    /// well-formed id could be found).
    Invalid {
        id: String,
        code: i64,
        message: String,
    },
    /// A reply to a request the CLI made through the proxy: the proxy's id and its span.
    Response {
        id: Option<u64>,
        span: (usize, usize),
        body: Bytes,
    },
    /// A notification (only .NET sends one, `$/cancelRequest`, and the CLI ignores it).
    Notification { method: String },
}

/// Classifies one client frame. `max_depth` is `limits.max_json_depth`; `routing` is what the
/// operator allows beyond the routing table.
pub(crate) fn intake(body: Bytes, max_depth: usize, routing: &RoutingConfig) -> Intake {
    let env = match envelope::check_text(&body, max_depth).and_then(|()| envelope::parse(&body)) {
        Ok(e) => e,
        Err(e) => {
            return Intake::Invalid {
                id: envelope::sniff_id(&body).unwrap_or_else(|| "null".into()),
                code: e.code(),
                message: e.to_string(),
            }
        }
    };
    match env.kind {
        Kind::Response => {
            let (id, span) = (env.id_u64(), env.id_span.unwrap_or((0, 0)));
            drop(env);
            Intake::Response { id, span, body }
        }
        Kind::Notification => Intake::Notification {
            method: env.method.as_deref().unwrap_or("").to_string(),
        },
        Kind::Request => {
            let id = match env.id {
                Some(r) => r.to_owned(),
                // The envelope calls a frame with a method and an id a request.
                None => {
                    return Intake::Notification {
                        method: env.method.as_deref().unwrap_or("").to_string(),
                    }
                }
            };
            let id_span = env.id_span.unwrap_or((0, 0));
            let method = env.method.as_deref().unwrap_or("").to_string();
            let session = env.session_id.as_deref().map(str::to_string);
            let params_ok = env.params_is_object;
            drop(env);
            let entry = route::lookup(&method);
            let route = route::decide(entry, session.is_some(), || routing.allowance(&method));
            let mut req = ClientReq {
                session: session.filter(|_| route.uses_session()),
                route,
                body,
                id,
                id_span,
                method,
                other_sessions: Vec::new(),
                started: Instant::now(),
                fresh: false,
                attempts: 0,
                avoid: Vec::new(),
                on: None,
                stream: None,
            };
            // Only the few methods with session fields beyond `params.sessionId` pay for a
            // parse of their params; a refused request needs none.
            if let Some(e) =
                entry.filter(|e| e.reads_params() && !matches!(req.route, Route::Denied(_)))
            {
                let params: Value = envelope::raw_params(&req.body)
                    .and_then(|p| serde_json::from_str(p).ok())
                    .unwrap_or(Value::Null);
                match route::named(e, &params, req.session.take()) {
                    Ok(n) => {
                        req.session = n.session;
                        req.route = n.route;
                        req.other_sessions = n.others;
                    }
                    Err(why) => {
                        // As for a `params.sessionId` that is not a string: the method, in
                        // that form, is one copilot-lb cannot route.
                        req.route = Route::Denied(Denial::MissingSessionId);
                        let data = rpc::data(false, json!({"method": req.method}));
                        return Intake::Refused {
                            req,
                            code: rpc::METHOD_NOT_FOUND,
                            message: why.to_string(),
                            data,
                        };
                    }
                }
            }
            let aliased = req
                .session
                .iter()
                .chain(req.other_sessions.iter().map(|o| &o.id))
                .find(|s| route::uuid_alias(s))
                .cloned();
            if let Some(sid) = aliased {
                return Intake::Refused {
                    message: format!("session id {sid:?} has the shape of a partial or upper-case UUID, which the CLI would resolve to whichever session it matches; send the session's full lower-case id"),
                    data: rpc::data(false, json!({"sessionId": sid})),
                    req,
                    code: rpc::INVALID_PARAMS,
                };
            }
            if !params_ok && req.route != Route::Local {
                return Intake::Refused {
                    message: format!("{}: params must be an object", req.method),
                    req,
                    code: rpc::INVALID_PARAMS,
                    data: rpc::data(false, json!({})),
                };
            }
            Intake::Request(req)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(body: &str) -> Intake {
        intake(
            Bytes::from(body.to_string()),
            128,
            &RoutingConfig::default(),
        )
    }

    #[test]
    fn requests_carry_route_session_and_id() {
        let Intake::Request(r) = take(
            r#"{"jsonrpc":"2.0","id":"a-1","method":"session.send","params":{"sessionId":"s1"}}"#,
        ) else {
            panic!("not a request")
        };
        assert_eq!(r.route, Route::Session);
        assert_eq!(r.session.as_deref(), Some("s1"));
        assert_eq!(r.id.get(), "\"a-1\"");
        assert_eq!(&r.body[r.id_span.0..r.id_span.1], b"\"a-1\"");
    }

    #[test]
    fn special_fields_name_the_session() {
        let Intake::Request(r) = take(
            r#"{"jsonrpc":"2.0","id":1,"method":"sessions.open","params":{"kind":"resume","sessionId":"s2"}}"#,
        ) else {
            panic!("not a request")
        };
        assert_eq!((r.route, r.session.as_deref()), (Route::Resume, Some("s2")));
        let Intake::Refused { code, req, .. } =
            take(r#"{"jsonrpc":"2.0","id":1,"method":"sessions.open","params":{"kind":"new"}}"#)
        else {
            panic!("not refused")
        };
        assert_eq!(code, rpc::METHOD_NOT_FOUND);
        assert_eq!(req.class(), "denied");
    }

    #[test]
    fn other_session_fields_travel_with_the_request() {
        let Intake::Request(r) = take(
            r#"{"jsonrpc":"2.0","id":1,"method":"session.mode.set","params":{"sessionId":"s","mode":"plan","inheritPlanBaseFromSessionId":"t"}}"#,
        ) else {
            panic!("not a request")
        };
        assert_eq!((r.route, r.session.as_deref()), (Route::Session, Some("s")));
        let others: Vec<(&str, bool)> = r
            .other_sessions
            .iter()
            .map(|o| (o.id.as_str(), o.colocated))
            .collect();
        assert_eq!(others, [("t", true)]);
        // A method with no such field carries none, and a global one no session at all.
        let Intake::Request(r) =
            take(r#"{"jsonrpc":"2.0","id":2,"method":"models.list","params":{"sessionId":"s"}}"#)
        else {
            panic!("not a request")
        };
        assert_eq!(
            (r.route, r.session, r.other_sessions.len()),
            (Route::Global, None, 0)
        );
    }

    #[test]
    fn an_alias_in_any_session_field_is_refused() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"session.mode.set","params":{"sessionId":"s","inheritPlanBaseFromSessionId":"3F2A9C4E"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"sessions.getClientMetadata","params":{"sessionIds":["s","3f2a9c4e-1b7d"]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"sessions.transferRemoteControl","params":{"toSessionId":"s","expectedFromSessionId":"3f2a9c4"}}"#,
        ] {
            assert!(
                matches!(
                    take(body),
                    Intake::Refused {
                        code: rpc::INVALID_PARAMS,
                        ..
                    }
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn unlisted_methods_are_refused_unless_the_operator_allows_them() {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"x.new","params":{}}"#;
        let Intake::Request(r) = take(body) else {
            panic!("not a request")
        };
        assert_eq!(r.route, Route::Denied(Denial::Unlisted));
        let routing = RoutingConfig {
            allow_global: vec!["x.new".into()],
            allow_session: vec![],
        };
        let Intake::Request(r) = intake(Bytes::from(body), 128, &routing) else {
            panic!("not a request")
        };
        assert_eq!(r.route, Route::Global);
    }

    #[test]
    fn params_must_be_an_object_except_for_local_methods() {
        assert!(matches!(
            take(r#"{"jsonrpc":"2.0","id":1,"method":"session.send","params":[1]}"#),
            Intake::Refused {
                code: rpc::INVALID_PARAMS,
                ..
            }
        ));
        assert!(matches!(
            take(r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}"#),
            Intake::Request(_)
        ));
    }

    #[test]
    fn invalid_frames_name_only_a_well_formed_id() {
        match take(r#"{"jsonrpc":"2.0","id":7,"method":"#) {
            Intake::Invalid { id, code, .. } => {
                assert_eq!(id, "7");
                assert_eq!(code, rpc::PARSE_ERROR);
            }
            other => panic!("{other:?}"),
        }
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":2,"method":"ping","params":{}}}"#,
            "[".repeat(200) + &"]".repeat(200)
        );
        assert!(matches!(take(&deep), Intake::Invalid { .. }));
    }

    #[test]
    fn responses_and_notifications() {
        assert!(matches!(
            take(r#"{"jsonrpc":"2.0","id":5,"result":{}}"#),
            Intake::Response { id: Some(5), .. }
        ));
        assert!(matches!(
            take(r#"{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}"#),
            Intake::Notification { .. }
        ));
    }
}
