//! Routing policy, as an allow-list: [`table::TABLE`] holds every method copilot-lb forwards,
//! answers or refuses on purpose, how each is routed, and every field of its params that names
//! a session. A method not in it is refused (`Denial::Unlisted`) unless an operator allowed it
//! (`routing.allow_global` / `routing.allow_session`). Pure: method names and params in, a
//! decision out.

mod render;
mod table;

pub(crate) use render::{table_json, table_markdown};

use serde_json::Value;

/// How the proxy treats a client request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Answered by the proxy (`connect`, `ping`, `session.getForeground`).
    Local,
    /// `session.create`: placed by the balancer; the proxy injects a session id if missing.
    Create,
    /// `session.resume`: to the session's backend (found by probing if unknown).
    Resume,
    /// `session.delete`: to the session's backend; the route is dropped on success.
    Delete,
    /// `session.destroy` / `session.detach`: detaches this connection from the session.
    Detach,
    /// A call on one session: to its backend, after the ownership check.
    Session,
    /// `session.list`: fanned out, merged, filtered to the caller.
    FanOutList,
    /// `session.getLastId`: computed from the merged, filtered list.
    LastId,
    /// Read-only process state: any healthy backend (the client's own rendezvous order).
    Global,
    /// Refused with an explanation.
    Denied(Denial),
}

impl Route {
    /// Whether the route acts on the request's session (so it carries one).
    pub(crate) fn uses_session(self) -> bool {
        matches!(
            self,
            Route::Create | Route::Resume | Route::Delete | Route::Detach | Route::Session
        )
    }
}

/// Why the proxy refuses a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denial {
    /// `runtime.shutdown` would stop a shared backend.
    Shutdown,
    /// Process-exclusive registrations that a shared backend pool cannot honour.
    Exclusive,
    /// Changes process-wide CLI configuration shared by every tenant.
    ProcessConfig,
    /// Session-scoped method without a session id.
    MissingSessionId,
    /// Multi-session maintenance calls that could touch other tenants' sessions.
    MultiSession,
    /// Reads the CLI host's own state (files, settings, accounts, process-wide singletons),
    /// which every tenant of a shared backend would see. The one class an operator may
    /// forward anyway (`routing.allow_global`); none of its methods names a session.
    Host,
    /// CLI-internal plumbing (the schema marks it `internal`) acting on the CLI process and
    /// host directly.
    Internal,
    /// Acts through the CLI's own GitHub account on remote services (Mission Control hosting,
    /// remote sessions, the Agent Finder catalogue).
    Remote,
    /// Not in the routing table and not allowed by the operator.
    Unlisted,
}

impl Denial {
    /// Every class, in the order the README lists them.
    pub(crate) const ALL: &'static [Denial] = &[
        Denial::Shutdown,
        Denial::Exclusive,
        Denial::ProcessConfig,
        Denial::MultiSession,
        Denial::Host,
        Denial::Internal,
        Denial::Remote,
        Denial::MissingSessionId,
        Denial::Unlisted,
    ];

    /// The human explanation sent to the client.
    pub(crate) fn message(self, method: &str) -> String {
        match self {
            Denial::Shutdown => format!(
                "{method} is not forwarded by copilot-lb: the CLI servers behind it are shared; stop them through their own supervisor"
            ),
            Denial::Exclusive => format!(
                "{method} registers this client as the single process-wide provider of a CLI server, which a shared, load-balanced pool cannot offer (the CLI never releases it); connect to a dedicated CLI server for this feature"
            ),
            Denial::ProcessConfig => format!(
                "{method} changes process-wide CLI configuration shared by every client of copilot-lb; configure the CLI servers directly"
            ),
            Denial::MissingSessionId => format!("{method} requires params.sessionId"),
            Denial::MultiSession => format!(
                "{method} acts on many sessions at once across shared CLI servers and is not available through copilot-lb; use per-session calls"
            ),
            Denial::Host => format!(
                "{method} reads the CLI host's own state (files, settings, accounts or process-wide singletons), which every client of a shared CLI server would see; an operator who accepts that can forward it with the config setting routing.allow_global"
            ),
            Denial::Internal => format!(
                "{method} is CLI-internal plumbing (its schema marks it internal) that acts on the CLI process and host directly; it is not forwarded by copilot-lb"
            ),
            Denial::Remote => format!(
                "{method} acts through the CLI's own GitHub account on remote services (hosting, remote sessions, the catalogue), which copilot-lb cannot scope to one client; it is not forwarded"
            ),
            Denial::Unlisted => format!(
                "{method} is not in copilot-lb's routing table; an operator can forward it with the config setting routing.allow_global (any backend) or routing.allow_session (routed by params.sessionId)"
            ),
        }
    }

    /// The stable name of the class (`copilot-lb routes`, the README).
    pub(crate) fn label(self) -> &'static str {
        match self {
            Denial::Shutdown => "shutdown",
            Denial::Exclusive => "exclusive",
            Denial::ProcessConfig => "process_config",
            Denial::MissingSessionId => "missing_session_id",
            Denial::MultiSession => "multi_session",
            Denial::Host => "host",
            Denial::Internal => "internal",
            Denial::Remote => "remote",
            Denial::Unlisted => "unlisted",
        }
    }

    /// Whether an operator may forward a method of this class with `routing.allow_*`.
    pub(crate) fn overridable(self) -> bool {
        matches!(self, Denial::Host | Denial::Unlisted)
    }
}

/// Where an entry finds the session it is routed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key {
    /// Not routed by a session.
    None,
    /// `params.sessionId`, which the envelope parser already reads: no extra parse.
    SessionId,
    /// Another top-level string field of params.
    Field(&'static str),
    /// The first id of a top-level array; the others are checked like [`Also`] fields that
    /// must be colocated.
    FirstOf(&'static str),
    /// `sessions.open`: by its kind (`options.sessionId` for create, `sessionId` for resume
    /// and attach); the kind also decides the route.
    Open,
}

/// A field other than the routing key that names a session: the caller must own it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Also {
    /// JSON pointer into params.
    pub(crate) field: &'static str,
    /// The CLI reads that session in the process the request runs in, so it must live on the
    /// same backend as the routing session.
    pub(crate) colocated: bool,
}

/// Where an entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A method of the CLI's published schema.
    Schema,
    /// Sent by the SDKs but not in the schema (older protocol methods the CLI still serves).
    Sdk,
}

/// One method of the routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) method: &'static str,
    pub(crate) route: Route,
    pub(crate) key: Key,
    pub(crate) also: &'static [Also],
    pub(crate) origin: Origin,
}

impl Entry {
    const fn new(method: &'static str, route: Route, key: Key, also: &'static [Also]) -> Entry {
        Entry {
            method,
            route,
            key,
            also,
            origin: Origin::Schema,
        }
    }

    const fn sdk(self) -> Entry {
        Entry {
            origin: Origin::Sdk,
            ..self
        }
    }

    /// Whether routing it needs params parsed beyond what the envelope read.
    pub(crate) fn reads_params(&self) -> bool {
        !matches!(self.key, Key::None | Key::SessionId) || !self.also.is_empty()
    }
}

const fn local(method: &'static str) -> Entry {
    Entry::new(method, Route::Local, Key::None, &[])
}

const fn global(method: &'static str) -> Entry {
    Entry::new(method, Route::Global, Key::None, &[])
}

const fn session(method: &'static str) -> Entry {
    Entry::new(method, Route::Session, Key::SessionId, &[])
}

const fn denied(method: &'static str, d: Denial) -> Entry {
    Entry::new(method, Route::Denied(d), Key::None, &[])
}

const fn also(field: &'static str, colocated: bool) -> Also {
    Also { field, colocated }
}

/// The table, sorted by method.
pub(crate) fn entries() -> &'static [Entry] {
    table::TABLE
}

/// The table's entry for `method`.
pub(crate) fn lookup(method: &str) -> Option<&'static Entry> {
    table::TABLE
        .binary_search_by(|e| e.method.cmp(method))
        .ok()
        .map(|i| &table::TABLE[i])
}

/// How the operator's `routing` setting lets a method through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Allowed {
    /// `allow_global`: any backend (or the session's, when the request names one).
    Global,
    /// `allow_session`: routed by `params.sessionId`, which it must carry.
    Session,
}

impl Allowed {
    fn route(self, has_session_id: bool) -> Route {
        match (self, has_session_id) {
            // A request naming a session never bypasses the ownership check, however the
            // operator filed its method.
            (_, true) => Route::Session,
            (Allowed::Global, false) => Route::Global,
            (Allowed::Session, false) => Route::Denied(Denial::MissingSessionId),
        }
    }
}

/// Decides the route of a request from its table entry (if any), whether it carries
/// `params.sessionId`, and the operator's allowance (asked only when the table refuses it
/// in a class an operator may override). For keys other than `params.sessionId` the route is
/// provisional until [`named`] reads the params.
pub(crate) fn decide(
    entry: Option<&Entry>,
    has_session_id: bool,
    allowed: impl FnOnce() -> Option<Allowed>,
) -> Route {
    let Some(e) = entry else {
        return allowed().map_or(Route::Denied(Denial::Unlisted), |a| a.route(has_session_id));
    };
    match e.route {
        Route::Denied(d) if d.overridable() => {
            allowed().map_or(e.route, |a| a.route(has_session_id))
        }
        r if e.key == Key::SessionId
            && !has_session_id
            && r.uses_session()
            && r != Route::Create =>
        {
            Route::Denied(Denial::MissingSessionId)
        }
        r => r,
    }
}

/// Another session a request names besides the one it is routed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Other {
    pub(crate) id: String,
    /// Must live on the same backend as the routing session.
    pub(crate) colocated: bool,
}

/// The sessions a request names, read from its params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Named {
    /// The routing session.
    pub(crate) session: Option<String>,
    pub(crate) route: Route,
    pub(crate) others: Vec<Other>,
}

/// Why a request's session fields cannot be routed; the text is what the client reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unroutable {
    #[error("sessions.open {{kind: create}} through copilot-lb needs options.sessionId (the proxy routes by it)")]
    OpenCreateWithoutId,
    #[error("sessions.open needs sessionId")]
    OpenWithoutId,
    #[error("sessions.open {{kind: {0}}} picks a session on one CLI server by itself, which copilot-lb cannot route; open it by id (kind resume or attach)")]
    OpenPicksItself(String),
    #[error("sessions.open needs kind")]
    OpenWithoutKind,
    #[error("{method} through copilot-lb needs {field} (the proxy routes by it)")]
    KeyMissing {
        method: &'static str,
        field: &'static str,
    },
    #[error("{method} through copilot-lb needs a non-empty {field} array of session ids (the proxy routes by the first)")]
    NoIds {
        method: &'static str,
        field: &'static str,
    },
    #[error("{method}: {field} names a session and must be a session id string")]
    NotAnId {
        method: &'static str,
        field: &'static str,
    },
}

/// Reads every session-naming field of `params` for `e` (only called when
/// [`Entry::reads_params`]); `session` is the envelope's `params.sessionId`.
pub(crate) fn named(
    e: &Entry,
    params: &Value,
    session: Option<String>,
) -> Result<Named, Unroutable> {
    let method = e.method;
    let string = |v: Option<&Value>, field: &'static str| match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Unroutable::NotAnId { method, field }),
    };
    let mut others = Vec::new();
    let (session, route) = match e.key {
        Key::None => (None, e.route),
        Key::SessionId => (session, e.route),
        Key::Field(f) => match string(params.get(f), f)? {
            Some(id) => (Some(id), e.route),
            None => return Err(Unroutable::KeyMissing { method, field: f }),
        },
        Key::FirstOf(f) => {
            let ids = match params.get(f) {
                Some(Value::Array(a)) if !a.is_empty() => a,
                Some(Value::Array(_)) | None | Some(Value::Null) => {
                    return Err(Unroutable::NoIds { method, field: f })
                }
                Some(_) => return Err(Unroutable::NotAnId { method, field: f }),
            };
            let mut ids = ids.iter().map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(Unroutable::NotAnId { method, field: f }),
            });
            let first = ids.next().transpose()?;
            for id in ids {
                others.push(Other {
                    id: id?,
                    colocated: true,
                });
            }
            (first, e.route)
        }
        Key::Open => {
            let (id, r) = match params.get("kind").and_then(Value::as_str) {
                Some("create") => (
                    string(params.pointer("/options/sessionId"), "options.sessionId")?
                        .ok_or(Unroutable::OpenCreateWithoutId)?,
                    Route::Create,
                ),
                Some("resume" | "attach") => (
                    string(params.get("sessionId"), "sessionId")?
                        .ok_or(Unroutable::OpenWithoutId)?,
                    Route::Resume,
                ),
                Some(k) => return Err(Unroutable::OpenPicksItself(k.to_string())),
                None => return Err(Unroutable::OpenWithoutKind),
            };
            (Some(id), r)
        }
    };
    for a in e.also {
        // The pointer's last segment is what the client wrote: name that in a refusal.
        let field = a.field.rsplit('/').next().unwrap_or(a.field);
        if let Some(id) = string(params.pointer(a.field), field)? {
            others.push(Other {
                id,
                colocated: a.colocated,
            });
        }
    }
    Ok(Named {
        session,
        route,
        others,
    })
}

/// Whether the CLI would resolve `sid` to some other session's id. It takes "a session id or
/// a unique prefix" for UUID ids, in any case, so a UUID-shaped prefix of 7 or more characters,
/// or a whole UUID not in lower case, names whichever session it happens to match: never
/// forwarded, so ownership is always checked on the id the CLI will use.
pub(crate) fn uuid_alias(sid: &str) -> bool {
    const SHAPE: &[u8] = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";
    let b = sid.as_bytes();
    if b.len() < 7 || b.len() > SHAPE.len() {
        return false;
    }
    let fits = b.iter().zip(SHAPE).all(|(c, t)| match t {
        b'-' => *c == b'-',
        _ => c.is_ascii_hexdigit(),
    });
    fits && (b.len() < SHAPE.len() || b.iter().any(u8::is_ascii_uppercase))
}

/// A low-cardinality label for metrics.
pub(crate) fn class_label(r: Route) -> &'static str {
    match r {
        Route::Local => "local",
        Route::Create => "create",
        Route::Resume => "resume",
        Route::Delete => "delete",
        Route::Detach => "detach",
        Route::Session => "session",
        Route::FanOutList => "list",
        Route::LastId => "list",
        Route::Global => "global",
        Route::Denied(_) => "denied",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(method: &str, has_sid: bool) -> Route {
        decide(lookup(method), has_sid, || None)
    }

    #[test]
    fn uuid_prefixes_and_case_variants_are_aliases() {
        let id = "3f2a9c4e-1b7d-4e6f-9a2b-5c8d7e6f1a2b";
        assert!(!uuid_alias(id));
        for alias in [&id[..7], &id[..8], &id[..9], &id[..20], &id[..35]] {
            assert!(uuid_alias(alias), "{alias}");
        }
        assert!(uuid_alias(&id.to_uppercase()));
        assert!(uuid_alias(&id[..8].to_uppercase()));
        // Not a UUID's shape, or too short to be taken as a prefix.
        for fine in [
            "3f2a9c",
            "df-42d88589-3-2",
            "job-123",
            "deadbeef-x",
            "s1",
            "",
            "3f2a9c4e1b7d",
        ] {
            assert!(!uuid_alias(fine), "{fine}");
        }
        assert!(!uuid_alias(&format!("{id}0")));
    }

    #[test]
    fn the_table_is_sorted_and_unique_so_binary_search_finds_every_entry() {
        for w in entries().windows(2) {
            assert!(
                w[0].method < w[1].method,
                "{} / {}",
                w[0].method,
                w[1].method
            );
        }
        for e in entries() {
            assert_eq!(lookup(e.method), Some(e));
        }
        assert_eq!(lookup("session.sen"), None);
        assert_eq!(lookup(""), None);
    }

    #[test]
    fn entries_are_consistent() {
        for e in entries() {
            // An operator may forward a host-state method; none of them names a session, so
            // forwarding one can never skip an ownership check.
            if e.route == Route::Denied(Denial::Host) {
                assert_eq!((e.key, e.also.len()), (Key::None, 0), "{}", e.method);
            }
            if e.route == Route::Global || e.route == Route::Local {
                assert_eq!(e.key, Key::None, "{}", e.method);
            }
            if e.route.uses_session() {
                assert_ne!(e.key, Key::None, "{}", e.method);
            }
            assert!(!matches!(
                e.route,
                Route::Denied(Denial::Unlisted | Denial::MissingSessionId)
            ));
            for a in e.also {
                assert!(a.field.starts_with('/'), "{}", e.method);
            }
        }
    }

    #[test]
    fn routes_of_known_methods() {
        assert_eq!(route("connect", false), Route::Local);
        assert_eq!(route("ping", false), Route::Local);
        assert_eq!(route("session.getForeground", false), Route::Local);
        assert_eq!(route("session.send", true), Route::Session);
        assert_eq!(
            route("session.send", false),
            Route::Denied(Denial::MissingSessionId)
        );
        assert_eq!(route("session.create", false), Route::Create);
        assert_eq!(route("session.create", true), Route::Create);
        assert_eq!(route("session.list", false), Route::FanOutList);
        assert_eq!(route("session.getLastId", false), Route::LastId);
        assert_eq!(route("status.get", false), Route::Global);
        assert_eq!(route("models.list", false), Route::Global);
        // A sessionId in a global call's params does not make it a session call.
        assert_eq!(route("models.list", true), Route::Global);
        assert_eq!(route("session.detach", true), Route::Detach);
        assert_eq!(route("sessions.close", true), Route::Detach);
        assert_eq!(route("sessions.delete", true), Route::Delete);
        assert_eq!(
            route("runtime.shutdown", false),
            Route::Denied(Denial::Shutdown)
        );
        assert_eq!(
            route("sessionFs.setProvider", false),
            Route::Denied(Denial::Exclusive)
        );
        assert_eq!(
            route("mcp.config.add", false),
            Route::Denied(Denial::ProcessConfig)
        );
        assert_eq!(
            route("sessions.bulkDelete", false),
            Route::Denied(Denial::MultiSession)
        );
        assert_eq!(
            route("sessions.getMetadata", true),
            Route::Denied(Denial::Internal)
        );
        assert_eq!(
            route("persistence.writeRawJsonLocked", false),
            Route::Denied(Denial::Internal)
        );
        assert_eq!(
            route("host.publishSession", true),
            Route::Denied(Denial::Remote)
        );
        assert_eq!(
            route("user.settings.get", false),
            Route::Denied(Denial::Host)
        );
    }

    #[test]
    fn unknown_methods_are_refused_unless_allowed() {
        for m in ["some.future.method", "test.echo", "session.future", ""] {
            assert_eq!(route(m, false), Route::Denied(Denial::Unlisted), "{m}");
            assert_eq!(route(m, true), Route::Denied(Denial::Unlisted), "{m}");
        }
        let g = || Some(Allowed::Global);
        let s = || Some(Allowed::Session);
        assert_eq!(decide(None, false, g), Route::Global);
        assert_eq!(decide(None, true, g), Route::Session);
        assert_eq!(decide(None, true, s), Route::Session);
        assert_eq!(
            decide(None, false, s),
            Route::Denied(Denial::MissingSessionId)
        );
        // Host state: forwarded when allowed; nothing else the table refuses ever is.
        let host = lookup("user.settings.get");
        assert_eq!(decide(host, false, g), Route::Global);
        let shutdown = lookup("runtime.shutdown");
        assert_eq!(decide(shutdown, false, g), Route::Denied(Denial::Shutdown));
        // A forwarded method never consults the operator's lists (the hot path).
        let send = lookup("session.send");
        assert_eq!(
            decide(send, true, || panic!("asked for a listed method")),
            Route::Session
        );
    }

    #[test]
    fn only_entries_with_other_fields_read_params() {
        let reads: Vec<&str> = entries()
            .iter()
            .filter(|e| e.reads_params())
            .map(|e| e.method)
            .collect();
        assert_eq!(
            reads,
            [
                "session.mode.set",
                "sessions.getClientMetadata",
                "sessions.open",
                "sessions.stopRemoteControl",
                "sessions.transferRemoteControl",
            ]
        );
    }

    fn named_of(method: &str, sid: Option<&str>, params: Value) -> Result<Named, Unroutable> {
        named(
            lookup(method).expect(method),
            &params,
            sid.map(str::to_string),
        )
    }

    fn other(id: &str, colocated: bool) -> Other {
        Other {
            id: id.into(),
            colocated,
        }
    }

    #[test]
    fn every_session_naming_field_is_read() {
        let n = named_of(
            "sessions.open",
            None,
            json!({"kind": "create", "options": {"sessionId": "a", "detachedFromSpawningParentSessionId": "p"}}),
        )
        .unwrap();
        assert_eq!(
            (n.session.as_deref(), n.route, n.others),
            (Some("a"), Route::Create, vec![other("p", false)])
        );
        let n = named_of(
            "sessions.open",
            None,
            json!({"kind": "attach", "sessionId": "b"}),
        )
        .unwrap();
        assert_eq!((n.session.as_deref(), n.route), (Some("b"), Route::Resume));
        assert_eq!(
            named_of("sessions.open", None, json!({"kind": "resumeLast"})),
            Err(Unroutable::OpenPicksItself("resumeLast".into()))
        );
        let n = named_of(
            "sessions.transferRemoteControl",
            Some("ignored"),
            json!({"toSessionId": "c", "expectedFromSessionId": "d"}),
        )
        .unwrap();
        assert_eq!(
            (n.session.as_deref(), n.route, n.others),
            (Some("c"), Route::Session, vec![other("d", false)])
        );
        assert_eq!(
            named_of("sessions.stopRemoteControl", None, json!({})),
            Err(Unroutable::KeyMissing {
                method: "sessions.stopRemoteControl",
                field: "expectedSessionId"
            })
        );
        let n = named_of(
            "session.mode.set",
            Some("s"),
            json!({"sessionId": "s", "mode": "plan", "inheritPlanBaseFromSessionId": "t"}),
        )
        .unwrap();
        assert_eq!(
            (n.session.as_deref(), n.others),
            (Some("s"), vec![other("t", true)])
        );
        let n = named_of(
            "sessions.getClientMetadata",
            None,
            json!({"sessionIds": ["x", "y", "z"]}),
        )
        .unwrap();
        assert_eq!(
            (n.session.as_deref(), n.others),
            (Some("x"), vec![other("y", true), other("z", true)])
        );
    }

    #[test]
    fn session_fields_of_the_wrong_shape_are_refused() {
        let not_id =
            |method: &'static str, field: &'static str| Err(Unroutable::NotAnId { method, field });
        assert_eq!(
            named_of(
                "session.mode.set",
                Some("s"),
                json!({"inheritPlanBaseFromSessionId": 7})
            ),
            not_id("session.mode.set", "inheritPlanBaseFromSessionId")
        );
        assert_eq!(
            named_of(
                "sessions.getClientMetadata",
                None,
                json!({"sessionIds": ["x", 1]})
            ),
            not_id("sessions.getClientMetadata", "sessionIds")
        );
        assert_eq!(
            named_of(
                "sessions.getClientMetadata",
                None,
                json!({"sessionIds": "x"})
            ),
            not_id("sessions.getClientMetadata", "sessionIds")
        );
        assert_eq!(
            named_of(
                "sessions.getClientMetadata",
                None,
                json!({"sessionIds": []})
            ),
            Err(Unroutable::NoIds {
                method: "sessions.getClientMetadata",
                field: "sessionIds"
            })
        );
        assert_eq!(
            named_of(
                "sessions.open",
                None,
                json!({"kind": "create", "options": {"sessionId": {"a": 1}}})
            ),
            not_id("sessions.open", "options.sessionId")
        );
        // Absent or null optional fields name nothing.
        let n = named_of(
            "session.mode.set",
            Some("s"),
            json!({"inheritPlanBaseFromSessionId": null}),
        )
        .unwrap();
        assert!(n.others.is_empty());
    }
}
