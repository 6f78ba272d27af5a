//! Routing policy: which backend (or none) a client request goes to, decided from the method
//! name and the session id alone. The table follows `copilot-protocol.md`, "Implications for a
//! session-routing proxy".

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
    /// Any other request carrying `params.sessionId`.
    Session,
    /// `session.list` / `sessions.list`: fanned out, merged, filtered to the caller.
    FanOutList,
    /// `session.getLastId`: computed from the merged, filtered list.
    LastId,
    /// Read-only process state: any healthy backend (the client's own rendezvous order).
    Global,
    /// Refused with an explanation.
    Denied(Denial),
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
}

impl Denial {
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
        }
    }
}

/// Methods that act on process-wide configuration; refused.
const PROCESS_CONFIG: &[&str] = &[
    "account.login",
    "account.logout",
    "secrets.addFilterValues",
    "mcp.config.add",
    "mcp.config.update",
    "mcp.config.remove",
    "mcp.config.enable",
    "mcp.config.disable",
    "mcp.config.reload",
    "extensions.enable",
    "extensions.disable",
    "plugins.install",
    "plugins.uninstall",
    "plugins.update",
    "plugins.updateAll",
    "plugins.enable",
    "plugins.disable",
    "plugins.marketplaces.add",
    "plugins.marketplaces.remove",
    "plugins.marketplaces.refresh",
    "skills.config.setDisabledSkills",
    "skills.config.setSkillDisabled",
    "user.settings.set",
    "user.settings.reload",
    "sessions.setAdditionalPlugins",
    "sessions.setRemoteControlSteering",
    "agentRegistry.spawn",
];

/// Process-exclusive registrations (copilot-protocol.md §5.3).
const EXCLUSIVE: &[&str] = &[
    "sessionFs.setProvider",
    "llmInference.setProvider",
    "registerExtensionLaunchProvider",
    "plugins.builtin.set",
    "llmInference.httpResponseStart",
    "llmInference.httpResponseChunk",
];

/// Calls over many sessions that would need per-tenant splitting.
const MULTI_SESSION: &[&str] = &[
    "sessions.checkInUse",
    "sessions.bulkDelete",
    "sessions.pruneOld",
    "sessions.enrichMetadata",
    "sessions.listNonEmptySessionIds",
    "sessions.findByTaskId",
    "sessions.findByPrefix",
    "sessions.getLastForContext",
    "sessions.getSizes",
    "sessions.list",
];

/// Methods whose session id is not at `params.sessionId` (copilot-protocol.md §3.4).
pub(crate) const SPECIAL_SESSION_FIELDS: &[&str] = &[
    "sessions.open",
    "sessions.transferRemoteControl",
    "sessions.stopRemoteControl",
];

/// Why a [`SPECIAL_SESSION_FIELDS`] call cannot be routed; the text is what the client reads.
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
    #[error("sessions.transferRemoteControl needs toSessionId")]
    TransferWithoutTarget,
    #[error("sessions.stopRemoteControl through copilot-lb needs expectedSessionId (the proxy routes by it)")]
    StopWithoutExpected,
    #[error("{0} has no special session field")]
    NotSpecial(String),
}

/// Finds the session id of a [`SPECIAL_SESSION_FIELDS`] method and its route.
pub(crate) fn special(
    method: &str,
    params: &serde_json::Value,
) -> Result<(String, Route), Unroutable> {
    let s = |v: Option<&serde_json::Value>| v.and_then(|x| x.as_str()).map(str::to_string);
    match method {
        "sessions.open" => match params.get("kind").and_then(|k| k.as_str()) {
            Some("create") => s(params.pointer("/options/sessionId"))
                .map(|id| (id, Route::Create))
                .ok_or(Unroutable::OpenCreateWithoutId),
            Some("resume" | "attach") => s(params.get("sessionId"))
                .map(|id| (id, Route::Resume))
                .ok_or(Unroutable::OpenWithoutId),
            Some(k) => Err(Unroutable::OpenPicksItself(k.to_string())),
            None => Err(Unroutable::OpenWithoutKind),
        },
        "sessions.transferRemoteControl" => s(params.get("toSessionId"))
            .map(|id| (id, Route::Session))
            .ok_or(Unroutable::TransferWithoutTarget),
        "sessions.stopRemoteControl" => s(params.get("expectedSessionId"))
            .map(|id| (id, Route::Session))
            .ok_or(Unroutable::StopWithoutExpected),
        _ => Err(Unroutable::NotSpecial(method.to_string())),
    }
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

/// Decides the route for a client request.
pub(crate) fn classify(method: &str, has_session_id: bool) -> Route {
    match method {
        // A headless CLI has no foreground session and answers `{}`: the proxy answers the
        // same itself, as no backend's answer could belong to the caller.
        "connect" | "ping" | "session.getForeground" => Route::Local,
        "runtime.shutdown" => Route::Denied(Denial::Shutdown),
        "session.create" => Route::Create,
        "session.resume" => require(has_session_id, Route::Resume, method),
        "session.delete" | "sessions.delete" => require(has_session_id, Route::Delete, method),
        "session.destroy" | "session.detach" => require(has_session_id, Route::Detach, method),
        "session.list" => Route::FanOutList,
        "session.getLastId" => Route::LastId,
        m if EXCLUSIVE.contains(&m) => Route::Denied(Denial::Exclusive),
        m if PROCESS_CONFIG.contains(&m) => Route::Denied(Denial::ProcessConfig),
        m if MULTI_SESSION.contains(&m) => Route::Denied(Denial::MultiSession),
        _ if has_session_id => Route::Session,
        m if m.starts_with("session.") => Route::Denied(Denial::MissingSessionId),
        _ => Route::Global,
    }
}

fn require(has: bool, r: Route, _m: &str) -> Route {
    if has {
        r
    } else {
        Route::Denied(Denial::MissingSessionId)
    }
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
    fn table() {
        assert_eq!(classify("connect", false), Route::Local);
        assert_eq!(classify("session.send", true), Route::Session);
        assert_eq!(
            classify("session.send", false),
            Route::Denied(Denial::MissingSessionId)
        );
        assert_eq!(classify("session.create", false), Route::Create);
        assert_eq!(classify("session.list", false), Route::FanOutList);
        assert_eq!(classify("status.get", false), Route::Global);
        assert_eq!(classify("models.list", false), Route::Global);
        assert_eq!(classify("some.future.method", false), Route::Global);
        assert_eq!(classify("sessions.getMetadata", true), Route::Session);
        assert_eq!(
            classify("runtime.shutdown", false),
            Route::Denied(Denial::Shutdown)
        );
        assert_eq!(
            classify("sessionFs.setProvider", false),
            Route::Denied(Denial::Exclusive)
        );
        assert_eq!(
            classify("mcp.config.add", false),
            Route::Denied(Denial::ProcessConfig)
        );
        assert_eq!(classify("session.detach", true), Route::Detach);
        use serde_json::json;
        assert_eq!(
            special(
                "sessions.open",
                &json!({"kind": "create", "options": {"sessionId": "a"}})
            ),
            Ok(("a".into(), Route::Create))
        );
        assert_eq!(
            special(
                "sessions.open",
                &json!({"kind": "attach", "sessionId": "b"})
            ),
            Ok(("b".into(), Route::Resume))
        );
        assert!(special("sessions.open", &json!({"kind": "resumeLast"})).is_err());
        assert_eq!(
            special(
                "sessions.transferRemoteControl",
                &json!({"toSessionId": "c"})
            ),
            Ok(("c".into(), Route::Session))
        );
        assert!(special("sessions.stopRemoteControl", &json!({})).is_err());
    }
}
