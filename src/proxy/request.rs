//! A client frame, classified: a request with its route and session, a reply to a CLI
//! callback, a notification, or something refused before routing. Pure: bytes in, a decision
//! out, nothing sent.

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
    /// Session the request is about, if any.
    pub(crate) session: Option<String>,
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

/// Classifies one client frame. `max_depth` is `limits.max_json_depth`.
pub(crate) fn intake(body: Bytes, max_depth: usize) -> Intake {
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
            let mut req = ClientReq {
                route: route::classify(&method, session.is_some()),
                body,
                id,
                id_span,
                method,
                session,
                started: Instant::now(),
                fresh: false,
                attempts: 0,
                avoid: Vec::new(),
            };
            if route::SPECIAL_SESSION_FIELDS.contains(&req.method.as_str()) {
                let params: Value = envelope::raw_params(&req.body)
                    .and_then(|p| serde_json::from_str(p).ok())
                    .unwrap_or(Value::Null);
                match route::special(&req.method, &params) {
                    Ok((sid, r)) => {
                        req.session = Some(sid);
                        req.route = r;
                    }
                    Err(why) => {
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
            if let Some(sid) = req.session.as_deref().filter(|s| route::uuid_alias(s)) {
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
        intake(Bytes::from(body.to_string()), 128)
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
