//! Host access as a tenant policy, applied to what a client asks: the tool filter of a session
//! (`availableTools`, `excludedTools`, `toolFilterPrecedence` in `session.create`,
//! `session.resume`, `sessions.open` options and `session.options.update`), local MCP servers
//! in session options, and the session methods that run commands on the CLI host directly.
//! Pure: bytes and a policy in, rewritten bytes or a refusal out.
//!
//! The client is not trusted: whatever it asks, the effective tool set is at most what it asked
//! for intersected with what the policy allows, minus what the policy denies. A denied tool a
//! client asks for is removed, not refused, so an SDK's default tool list keeps working.

use crate::auth::HostPolicy;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::fmt;

/// Session methods that run or install something on the CLI host outside the agent's tool
/// filter: off unless the tenant has `allow_shell`. Sorted (binary search); each is a
/// `Route::Session` entry of the routing table (a unit test checks).
pub(crate) const HOST_METHODS: &[&str] = &[
    // Start an MCP server process, with a command line the client may supply.
    "session.mcp.reloadWithConfig",
    "session.mcp.restartServer",
    "session.mcp.startServer",
    // Fetch plugins (MCP servers, hooks) onto the host, which the CLI then runs.
    "session.plugins.install",
    "session.plugins.marketplaces.add",
    // A shell command on the host, as the CLI's user, outside any tool filter.
    "session.shell.cancelUserRequested",
    "session.shell.exec",
    "session.shell.executeUserRequested",
    "session.shell.kill",
];

/// Whether `method` runs commands on the CLI host (see [`HOST_METHODS`]).
pub(crate) fn is_host_method(method: &str) -> bool {
    HOST_METHODS.binary_search(&method).is_ok()
}

/// The message a client reads when a host method is refused.
pub(crate) fn host_method_refusal(method: &str, tenant: &str) -> String {
    format!(
        "{method} runs commands on the Copilot CLI host, which tenant {tenant} may not do; an operator can allow it with the config setting tenants[].allow_shell: true"
    )
}

/// Which request the tool fields belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// `session.create` / `session.resume` params: the filter is always written, since an
    /// omitted field on resume keeps whatever the session had before.
    Create,
    /// `sessions.open` options: as `Create`, but the schema lists no `toolFilterPrecedence`
    /// there, so a pattern in `availableTools` (which would win over `excludedTools` if the
    /// CLI ignored the precedence) is refused unless an allow list replaces it.
    Open,
    /// `session.options.update`: a patch, so only the fields the client sent are narrowed
    /// (an omitted one keeps the value the proxy already set); the precedence is always set.
    Update,
}

/// Why a request cannot be made to fit the tenant's policy; the text is what the client reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PolicyError {
    #[error("{field} must be an array of tool-name strings")]
    NotNames { field: &'static str },
    #[error("{0} must be an object")]
    NotObject(&'static str),
    #[error("mcpServers.{server} is a local MCP server, a process started on the Copilot CLI host, which tenant {tenant} may not do; use a remote (http or sse) server, or an operator can allow it with the config setting tenants[].allow_shell: true")]
    LocalMcpServer { server: String, tenant: String },
    #[error("sessions.open: availableTools entry {0:?} is a pattern, which copilot-lb cannot narrow to the tenant's tool policy here; list tool names, or use session.create")]
    Pattern(String),
}

/// Every member of a JSON object in order, duplicates included, with its raw value.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    v.push((k, m.next_value::<&'de RawValue>()?));
                }
                Ok(Members(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn members<'a>(raw: &'a str, what: &'static str) -> Result<Members<'a>, PolicyError> {
    serde_json::from_str(raw).map_err(|_| PolicyError::NotObject(what))
}

/// A tool filter list; `null` is absent, as the CLI reads it.
fn names(v: &RawValue, field: &'static str) -> Result<Option<Vec<String>>, PolicyError> {
    match serde_json::from_str::<Option<Vec<String>>>(v.get()) {
        Ok(n) => Ok(n),
        Err(_) => Err(PolicyError::NotNames { field }),
    }
}

/// `builtin:bash` → (`Some("builtin")`, `"bash"`); `bash` → (`None`, `"bash"`).
fn split(entry: &str) -> (Option<&str>, &str) {
    match entry.split_once(':') {
        Some((src, name)) if matches!(src, "builtin" | "mcp" | "custom") => (Some(src), name),
        _ => (None, entry),
    }
}

fn is_pattern(entry: &str) -> bool {
    entry.contains('*')
}

/// Whether deny entry `d` (a name or `source:*`) covers entry `e`: an unqualified name covers
/// that name from any source; a source wildcard covers what is qualified with that source.
fn covers(d: &str, e: &str) -> bool {
    let ((ds, dn), (es, en)) = (split(d), split(e));
    if dn == "*" {
        return ds.is_none_or(|ds| es == Some(ds));
    }
    dn == en && (ds.is_none() || es.is_none() || ds == es)
}

/// The tools both an allow entry `a` and a client entry `e` name, as one entry: an unqualified
/// side takes the other's source, a `*` side the other's name (`view` and `builtin:*` meet
/// in `builtin:view`); `None` when they name nothing in common.
fn meet(a: &str, e: &str) -> Option<String> {
    let ((as_, an), (es, en)) = (split(a), split(e));
    let source = match (as_, es) {
        (None, x) | (x, None) => x,
        (Some(x), Some(y)) if x == y => Some(x),
        _ => return None,
    };
    let name = match (an, en) {
        ("*", n) | (n, "*") => n,
        (x, y) if x == y => x,
        _ => return None,
    };
    Some(match source {
        Some(s) => format!("{s}:{name}"),
        None => name.to_string(),
    })
}

fn push_unique(v: &mut Vec<String>, s: &str) {
    if !v.iter().any(|x| x == s) {
        v.push(s.to_string());
    }
}

/// What the client asked, narrowed to the policy: `None` leaves the field out.
fn effective_available(
    p: &HostPolicy,
    asked: Option<Vec<String>>,
    target: Target,
) -> Result<Option<Vec<String>>, PolicyError> {
    let denied = |e: &str| p.deny_tools.iter().any(|d| covers(d, e));
    let mut out = Vec::new();
    match (&p.allow_tools, asked) {
        (None, None) => return Ok(None),
        (Some(_), None) if target == Target::Update => return Ok(None),
        (None, Some(asked)) => {
            for e in &asked {
                if is_pattern(e) && target == Target::Open && !p.deny_tools.is_empty() {
                    return Err(PolicyError::Pattern(e.clone()));
                }
                if !denied(e) {
                    push_unique(&mut out, e);
                }
            }
        }
        (Some(allow), None) => {
            for a in allow {
                if !denied(a) {
                    push_unique(&mut out, a);
                }
            }
        }
        (Some(allow), Some(asked)) => {
            for e in &asked {
                for a in allow {
                    if let Some(both) = meet(a, e).filter(|x| !denied(x)) {
                        push_unique(&mut out, &both);
                    }
                }
            }
        }
    }
    Ok(Some(out))
}

/// Whether an `mcpServers` entry starts a process on the CLI host: anything that is not a
/// remote (`http`/`sse`) server, as the SDKs default a server with a `command` to local.
fn local_mcp_servers(v: &RawValue) -> Result<Vec<String>, PolicyError> {
    let servers: Option<serde_json::Map<String, Value>> =
        serde_json::from_str(v.get()).map_err(|_| PolicyError::NotObject("mcpServers"))?;
    let mut local = Vec::new();
    for (name, s) in servers.unwrap_or_default() {
        let remote = matches!(s.get("type").and_then(Value::as_str), Some("http" | "sse"))
            && s.get("command").is_none();
        if !remote {
            local.push(name);
        }
    }
    Ok(local)
}

/// Rewrites one options object (`raw`, its JSON text) to fit `p`: the tool filter fields
/// first, then every other member with its value copied byte for byte. Duplicate tool filter
/// members are all dropped (the CLI's parser keeps the last; the proxy reads the last too).
pub(crate) fn rewrite_options(
    raw: &str,
    p: &HostPolicy,
    tenant: &str,
    target: Target,
    what: &'static str,
) -> Result<String, PolicyError> {
    let m = members(raw, what)?;
    let (mut asked, mut excluded) = (None, None);
    let mut kept = Vec::with_capacity(m.0.len());
    for (k, v) in m.0 {
        match k.as_str() {
            "availableTools" => asked = names(v, "availableTools")?,
            "excludedTools" => excluded = names(v, "excludedTools")?,
            // Always set by the proxy: "excluded" makes the deny list hold even where an
            // allow list is given (the CLI's default lets an allow list ignore it).
            "toolFilterPrecedence" => {}
            "mcpServers" if !p.allow_shell => {
                if let Some(server) = local_mcp_servers(v)?.into_iter().next() {
                    return Err(PolicyError::LocalMcpServer {
                        server,
                        tenant: tenant.to_string(),
                    });
                }
                kept.push((k, v));
            }
            _ => kept.push((k, v)),
        }
    }
    let available = effective_available(p, asked, target)?;
    let excluded = match (target, excluded) {
        (Target::Update, None) => None,
        (_, asked) => {
            let mut v = asked.unwrap_or_default();
            for d in &p.deny_tools {
                push_unique(&mut v, d);
            }
            Some(v)
        }
    };
    let mut out = String::with_capacity(raw.len() + 64);
    out.push('{');
    let mut first = true;
    let mut member = |out: &mut String, key: &str, value: &str| {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&Value::String(key.to_string()).to_string());
        out.push(':');
        out.push_str(value);
    };
    let list = |v: &[String]| Value::from(v.to_vec()).to_string();
    if let Some(a) = &available {
        member(&mut out, "availableTools", &list(a));
    }
    if let Some(e) = &excluded {
        member(&mut out, "excludedTools", &list(e));
    }
    member(&mut out, "toolFilterPrecedence", "\"excluded\"");
    for (k, v) in &kept {
        member(&mut out, k, v.get());
    }
    out.push('}');
    Ok(out)
}

/// Where the session options of a request sit, for the methods that carry them.
fn target_of(method: &str) -> Option<Target> {
    match method {
        "session.create" | "session.resume" => Some(Target::Create),
        "session.options.update" => Some(Target::Update),
        "sessions.open" => Some(Target::Open),
        _ => None,
    }
}

/// Whether a request of `method` carries session options the policy applies to.
pub(crate) fn applies_to(method: &str) -> bool {
    target_of(method).is_some()
}

/// The byte range of `inner` (a slice of `outer`) within `outer`.
fn span_in(outer: &[u8], inner: &str) -> (usize, usize) {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    (start, start + inner.len())
}

/// `body` with its `params` object replaced by `params` (added when the body has none).
fn with_params(body: &[u8], params: &str) -> Option<Vec<u8>> {
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(borrow)]
        params: Option<&'a RawValue>,
    }
    let p: P = serde_json::from_slice(body).ok()?;
    match p.params {
        Some(raw) => Some(crate::envelope::splice(
            body,
            span_in(body, raw.get()),
            params.as_bytes(),
        )),
        None => {
            let end = body.iter().rposition(|b| *b == b'}')?;
            let mut out = body[..end].to_vec();
            out.extend_from_slice(b",\"params\":");
            out.extend_from_slice(params.as_bytes());
            out.extend_from_slice(&body[end..]);
            Some(out)
        }
    }
}

/// Applies the tenant's policy to a request body of `method`: the new body, `None` when the
/// policy leaves it as it is (unrestricted tenant, a method without options, `sessions.open`
/// attach), or the refusal.
pub(crate) fn apply(
    body: &[u8],
    method: &str,
    p: &HostPolicy,
    tenant: &str,
) -> Result<Option<Vec<u8>>, PolicyError> {
    let Some(target) = target_of(method) else {
        return Ok(None);
    };
    if p.unrestricted() {
        return Ok(None);
    }
    let raw = crate::envelope::raw_params(body).unwrap_or("{}");
    let params = match target {
        Target::Open => {
            let m = members(raw, "params")?;
            let kind =
                m.0.iter()
                    .rev()
                    .find(|(k, _)| k == "kind")
                    .and_then(|(_, v)| serde_json::from_str::<String>(v.get()).ok());
            if !matches!(kind.as_deref(), Some("create" | "resume")) {
                // Attach joins a session already live with its owner's options.
                return Ok(None);
            }
            let opts = rewrite_options(
                m.0.iter()
                    .rev()
                    .find(|(k, _)| k == "options")
                    .map_or("{}", |(_, v)| v.get()),
                p,
                tenant,
                target,
                "options",
            )?;
            let mut out = String::with_capacity(raw.len() + 64);
            out.push_str("{\"options\":");
            out.push_str(&opts);
            for (k, v) in m.0.iter().filter(|(k, _)| k != "options") {
                out.push(',');
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                out.push_str(v.get());
            }
            out.push('}');
            out
        }
        _ => rewrite_options(raw, p, tenant, target, "params")?,
    };
    Ok(with_params(body, &params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(allow: Option<&[&str]>, deny: &[&str], shell: bool) -> HostPolicy {
        HostPolicy::new(
            allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
            deny.iter().map(|s| s.to_string()).collect(),
            shell,
        )
    }

    fn opts(p: &HostPolicy, v: Value, t: Target) -> Value {
        let out = rewrite_options(&v.to_string(), p, "t", t, "params").unwrap();
        serde_json::from_str(&out).unwrap()
    }

    #[test]
    fn host_methods_are_sorted_session_routes() {
        for w in HOST_METHODS.windows(2) {
            assert!(w[0] < w[1], "{} / {}", w[0], w[1]);
        }
        for m in HOST_METHODS {
            let e = crate::route::lookup(m).expect(m);
            assert_eq!(e.route, crate::route::Route::Session, "{m}");
            assert!(is_host_method(m));
        }
        assert!(!is_host_method("session.send"));
        assert!(host_method_refusal("session.shell.exec", "acme")
            .contains("tenants[].allow_shell: true"));
    }

    #[test]
    fn without_allow_shell_the_shell_tools_are_denied() {
        let p = policy(None, &[], false);
        assert!(!p.unrestricted());
        let v = opts(&p, json!({"model": "m"}), Target::Create);
        let excl: Vec<&str> = v["excludedTools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        for t in [
            "bash",
            "read_bash",
            "write_bash",
            "powershell",
            "list_powershell",
        ] {
            assert!(excl.contains(&t), "{t}");
        }
        assert_eq!(v["toolFilterPrecedence"], "excluded");
        assert_eq!(v["model"], "m");
        assert!(v.get("availableTools").is_none());
        assert!(policy(None, &[], true).unrestricted());
    }

    #[test]
    fn a_client_cannot_ask_for_a_denied_tool() {
        let p = policy(None, &["bash", "web_fetch"], true);
        // The CLI's default precedence would let an allow list ignore the deny list.
        let v = opts(
            &p,
            json!({"availableTools": ["bash", "builtin:bash", "view"], "excludedTools": ["grep"], "toolFilterPrecedence": "available"}),
            Target::Create,
        );
        assert_eq!(v["availableTools"], json!(["view"]));
        assert_eq!(v["excludedTools"], json!(["grep", "bash", "web_fetch"]));
        assert_eq!(v["toolFilterPrecedence"], "excluded");
    }

    #[test]
    fn an_allow_list_intersects_what_the_client_asks() {
        let p = policy(
            Some(&["view", "grep", "builtin:glob", "mcp:*"]),
            &["bash"],
            true,
        );
        // Nothing asked: the policy's list.
        let v = opts(&p, json!({}), Target::Create);
        assert_eq!(
            v["availableTools"],
            json!(["view", "grep", "builtin:glob", "mcp:*"])
        );
        // Asked: only what both allow; a client pattern narrows to the policy's entries.
        let v = opts(
            &p,
            json!({"availableTools": ["builtin:view", "bash", "glob", "mcp:search", "custom:x"]}),
            Target::Create,
        );
        assert_eq!(
            v["availableTools"],
            json!(["builtin:view", "builtin:glob", "mcp:glob", "mcp:search"])
        );
        let v = opts(&p, json!({"availableTools": ["builtin:*"]}), Target::Create);
        assert_eq!(
            v["availableTools"],
            json!(["builtin:view", "builtin:grep", "builtin:glob"])
        );
        // Nothing in common: no tools at all (the CLI reads [] as none, not as unset).
        let p = policy(Some(&["view"]), &[], true);
        let v = opts(
            &p,
            json!({"availableTools": ["edit", "mcp:search"]}),
            Target::Create,
        );
        assert_eq!(v["availableTools"], json!([]));
    }

    #[test]
    fn an_update_narrows_only_what_it_sends_and_cannot_drop_the_deny_list() {
        let p = policy(Some(&["view"]), &["bash"], true);
        let v = opts(&p, json!({"sessionId": "s", "model": "m2"}), Target::Update);
        assert_eq!(
            v,
            json!({"toolFilterPrecedence": "excluded", "sessionId": "s", "model": "m2"})
        );
        let v = opts(
            &p,
            json!({"sessionId": "s", "excludedTools": [], "availableTools": ["bash", "view"], "toolFilterPrecedence": "available"}),
            Target::Update,
        );
        assert_eq!(v["excludedTools"], json!(["bash"]));
        assert_eq!(v["availableTools"], json!(["view"]));
        assert_eq!(v["toolFilterPrecedence"], "excluded");
    }

    #[test]
    fn duplicate_and_escaped_keys_cannot_smuggle_a_tool_filter() {
        let p = policy(None, &["bash"], true);
        let raw = r#"{"availableTools":["view"],"avail\u0061bleTools":["bash"],"excludedTools":[],"excludedTools":null}"#;
        let v: Value =
            serde_json::from_str(&rewrite_options(raw, &p, "t", Target::Create, "params").unwrap())
                .unwrap();
        assert_eq!(v["availableTools"], json!([]));
        assert_eq!(v["excludedTools"], json!(["bash"]));
        let text = rewrite_options(raw, &p, "t", Target::Create, "params").unwrap();
        assert_eq!(text.matches("availableTools").count(), 1);
    }

    #[test]
    fn other_members_are_copied_byte_for_byte() {
        let p = policy(None, &["bash"], true);
        let raw = r#"{"systemMessage":{"content":"a\u00e9  b","n":1.50},"tools":[ {"name":"x"} ]}"#;
        let out = rewrite_options(raw, &p, "t", Target::Create, "params").unwrap();
        assert!(out.contains(r#""systemMessage":{"content":"a\u00e9  b","n":1.50}"#));
        assert!(out.contains(r#""tools":[ {"name":"x"} ]"#));
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let p = policy(None, &["bash"], true);
        let e = |raw: &str, t| rewrite_options(raw, &p, "t", t, "params").unwrap_err();
        assert_eq!(
            e(r#"{"availableTools":"bash"}"#, Target::Create),
            PolicyError::NotNames {
                field: "availableTools"
            }
        );
        assert_eq!(
            e(r#"{"excludedTools":[1]}"#, Target::Create),
            PolicyError::NotNames {
                field: "excludedTools"
            }
        );
        assert_eq!(e("[1]", Target::Create), PolicyError::NotObject("params"));
        assert_eq!(
            e(r#"{"availableTools":["builtin:*"]}"#, Target::Open),
            PolicyError::Pattern("builtin:*".into())
        );
        // Where the precedence is the schema's, a pattern is left to the CLI's deny list.
        assert!(rewrite_options(
            r#"{"availableTools":["builtin:*"]}"#,
            &p,
            "t",
            Target::Create,
            "params"
        )
        .is_ok());
    }

    #[test]
    fn local_mcp_servers_need_allow_shell() {
        let raw = r#"{"mcpServers":{"web":{"type":"http","url":"https://x"},"sh":{"command":"sh","args":["-c","id"]}}}"#;
        let p = policy(None, &[], false);
        assert_eq!(
            rewrite_options(raw, &p, "acme", Target::Create, "params").unwrap_err(),
            PolicyError::LocalMcpServer {
                server: "sh".into(),
                tenant: "acme".into()
            }
        );
        let remote = r#"{"mcpServers":{"web":{"type":"http","url":"https://x"}}}"#;
        assert!(rewrite_options(remote, &p, "acme", Target::Create, "params").is_ok());
        let p = policy(None, &["bash"], true);
        assert!(rewrite_options(raw, &p, "acme", Target::Create, "params").is_ok());
    }

    fn body_of(out: &[u8]) -> Value {
        serde_json::from_slice(out).unwrap()
    }

    #[test]
    fn bodies_are_rewritten_where_their_options_sit() {
        let p = policy(None, &["bash"], true);
        let b = br#"{"jsonrpc":"2.0","id":7,"method":"session.create","params":{"sessionId":"s","availableTools":["bash","view"]}}"#;
        let v = body_of(&apply(b, "session.create", &p, "t").unwrap().unwrap());
        assert_eq!(v["params"]["availableTools"], json!(["view"]));
        assert_eq!(
            (v["id"].clone(), v["params"]["sessionId"].clone()),
            (json!(7), json!("s"))
        );
        let b = br#"{"jsonrpc":"2.0","id":1,"method":"session.resume"}"#;
        let v = body_of(&apply(b, "session.resume", &p, "t").unwrap().unwrap());
        assert_eq!(v["params"]["excludedTools"], json!(["bash"]));
        let b = br#"{"jsonrpc":"2.0","id":1,"method":"sessions.open","params":{"kind":"resume","sessionId":"s"}}"#;
        let v = body_of(&apply(b, "sessions.open", &p, "t").unwrap().unwrap());
        assert_eq!(v["params"]["options"]["excludedTools"], json!(["bash"]));
        assert_eq!(v["params"]["sessionId"], "s");
        let b = br#"{"jsonrpc":"2.0","id":1,"method":"sessions.open","params":{"kind":"create","options":{"sessionId":"s","excludedTools":[]}}}"#;
        let v = body_of(&apply(b, "sessions.open", &p, "t").unwrap().unwrap());
        assert_eq!(v["params"]["options"]["excludedTools"], json!(["bash"]));
        assert_eq!(v["params"]["options"]["sessionId"], "s");
        let attach = br#"{"jsonrpc":"2.0","id":1,"method":"sessions.open","params":{"kind":"attach","sessionId":"s"}}"#;
        assert_eq!(apply(attach, "sessions.open", &p, "t").unwrap(), None);
        let send =
            br#"{"jsonrpc":"2.0","id":1,"method":"session.send","params":{"sessionId":"s"}}"#;
        assert_eq!(apply(send, "session.send", &p, "t").unwrap(), None);
        let open = policy(None, &[], true);
        assert_eq!(apply(b, "sessions.open", &open, "t").unwrap(), None);
        // Applying it twice changes nothing more (a re-routed create goes through again).
        let b = br#"{"jsonrpc":"2.0","id":7,"method":"session.create","params":{"availableTools":["bash","view"],"excludedTools":["x"]}}"#;
        let once = apply(b, "session.create", &p, "t").unwrap().unwrap();
        let twice = apply(&once, "session.create", &p, "t").unwrap().unwrap();
        assert_eq!(body_of(&once), body_of(&twice));
    }
}
