//! The routing table for people: JSON for `copilot-lb routes`, Markdown for the README (a unit
//! test keeps the README's copy equal to this output, so it cannot drift from the code).

use super::{entries, Denial, Entry, Key, Origin, Route};
use serde_json::{json, Value};
use std::fmt::Write;

fn route_name(e: &Entry) -> &'static str {
    match (e.key, e.route) {
        (Key::Open, _) => "open",
        (_, Route::Local) => "local",
        (_, Route::Create) => "create",
        (_, Route::Resume) => "resume",
        (_, Route::Delete) => "delete",
        (_, Route::Detach) => "detach",
        (_, Route::Session) => "session",
        (_, Route::FanOutList) => "list",
        (_, Route::LastId) => "last_id",
        (_, Route::Global) => "global",
        (_, Route::Denied(_)) => "refused",
    }
}

fn key_name(k: Key) -> Option<String> {
    match k {
        Key::None => None,
        Key::SessionId => Some("sessionId".into()),
        Key::Field(f) => Some(f.into()),
        Key::FirstOf(f) => Some(format!("{f}[0]")),
        Key::Open => {
            Some("options.sessionId (kind create), sessionId (kind resume, attach)".into())
        }
    }
}

/// A JSON pointer as the dotted path a client writes.
fn dotted(pointer: &str) -> String {
    pointer.trim_start_matches('/').replace('/', ".")
}

fn others(e: &Entry) -> Vec<String> {
    let mut v: Vec<String> = match e.key {
        Key::FirstOf(f) => vec![format!("{f}[1..] (same backend)")],
        _ => Vec::new(),
    };
    v.extend(e.also.iter().map(|a| {
        let same = if a.colocated { " (same backend)" } else { "" };
        format!("{}{same}", dotted(a.field))
    }));
    v
}

/// The table and the operator's additions, as `copilot-lb routes` prints them.
pub(crate) fn table_json(allow_global: &[String], allow_session: &[String]) -> Value {
    let methods: Vec<Value> = entries()
        .iter()
        .map(|e| {
            let mut m = json!({
                "method": e.method,
                "route": route_name(e),
                "session": key_name(e.key),
                "also": e.also.iter().map(|a| json!({"field": dotted(a.field), "same_backend": a.colocated})).collect::<Vec<_>>(),
                "origin": match e.origin { Origin::Schema => "schema", Origin::Sdk => "sdk" },
            });
            if let Route::Denied(d) = e.route {
                m["refused"] = json!(d.label());
            }
            m
        })
        .collect();
    json!({
        "methods": methods,
        "routing": {"allow_global": allow_global, "allow_session": allow_session},
    })
}

fn why(d: Denial) -> &'static str {
    match d {
        Denial::Shutdown => "would stop a CLI server every client shares",
        Denial::Exclusive => "registers the caller as the one process-wide provider of a CLI server, which the CLI never releases and a pool cannot offer",
        Denial::ProcessConfig => "changes (or installs into) process-wide CLI configuration or credentials that every client shares",
        Denial::MultiSession => "acts on many sessions, or on whole session stores, across tenants",
        Denial::Host => "reads the CLI host's own state (files, settings, accounts, process-wide singletons) that every client of a shared CLI would see; the one class an operator may forward (`routing.allow_global`)",
        Denial::Internal => "CLI-internal plumbing (the schema marks it internal) acting on the CLI process and host directly",
        Denial::Remote => "acts through the CLI's own GitHub account on remote services (hosting, remote sessions, the catalogue)",
        Denial::MissingSessionId | Denial::Unlisted => "",
    }
}

fn codes(ms: &[&Entry]) -> String {
    ms.iter()
        .map(|e| {
            let star = if e.origin == Origin::Sdk { "¹" } else { "" };
            format!("`{}`{star}", e.method)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The README's routing table (between its `routing-table` markers).
pub(crate) fn table_markdown() -> String {
    let all = entries();
    let pick = |f: &dyn Fn(&Entry) -> bool| all.iter().filter(|e| f(e)).collect::<Vec<_>>();
    let plain = |r: Route| move |e: &Entry| e.route == r && e.key != Key::Open;
    let mut out = String::from(
        "| methods | session fields (ownership-checked) | handling |\n|---|---|---|\n",
    );
    let mut row = |ms: Vec<&Entry>, fields: &str, how: &str| {
        if !ms.is_empty() {
            let _ = writeln!(out, "| {} | {fields} | {how} |", codes(&ms));
        }
    };
    row(
        pick(&plain(Route::Local)),
        "–",
        "answered by the proxy (connect authenticates with the CLI's codes -32001/-32002/-32003; session.getForeground answers `{}`, as a headless CLI does)",
    );
    row(
        pick(&plain(Route::Create)),
        "`sessionId` (injected if absent)",
        "placed by HRW + bounded load; route installed before forwarding",
    );
    for e in pick(&|e: &Entry| e.key == Key::Open) {
        row(vec![e], &fields(e), "kind `create` placed like session.create, `resume` and `attach` routed like session.resume; kinds that pick a session by themselves are refused");
    }
    row(
        pick(&plain(Route::Resume)),
        "`sessionId`",
        "the session's backend; unknown to the proxy: backends tried in ranking order",
    );
    row(
        pick(&plain(Route::Delete)),
        "`sessionId`",
        "the session's backend; the route is dropped on success",
    );
    row(
        pick(&plain(Route::Detach)),
        "`sessionId`",
        "the session's backend; this connection leaves the session",
    );
    row(
        pick(&|e: &Entry| matches!(e.route, Route::FanOutList | Route::LastId)),
        "–",
        "fanned out to every backend not down; merged, filtered to the caller's tenant",
    );
    row(
        pick(&|e: &Entry| {
            e.route == Route::Session && e.key == Key::SessionId && e.also.is_empty()
        }),
        "`sessionId`",
        "the session's backend",
    );
    for e in pick(&|e: &Entry| e.route == Route::Session && e.reads_params()) {
        let how = if e.also.iter().any(|a| a.colocated) || matches!(e.key, Key::FirstOf(_)) {
            "the routing session's backend; refused if a *same backend* session lives on another CLI"
        } else {
            "the routing session's backend"
        };
        row(vec![e], &fields(e), how);
    }
    row(
        pick(&plain(Route::Global)),
        "–",
        "any healthy backend (the connection's own rendezvous order)",
    );
    for d in Denial::ALL {
        row(
            pick(&|e: &Entry| e.route == Route::Denied(*d)),
            "–",
            &format!("refused (-32601, class `{}`): {}", d.label(), why(*d)),
        );
    }
    out.push_str(
        "\n¹ not in the CLI's schema: sent by an SDK, or still served by the CLI for older SDKs.\n",
    );
    out
}

fn fields(e: &Entry) -> String {
    let mut v: Vec<String> = key_name(e.key)
        .into_iter()
        .map(|k| format!("`{k}` (routes)"))
        .collect();
    v.extend(others(e).into_iter().map(|o| format!("`{o}`")));
    v.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_routing_table_is_this_output() {
        let readme = include_str!("../../README.md");
        let (begin, end) = (
            "<!-- routing-table:begin -->\n",
            "<!-- routing-table:end -->",
        );
        let start = readme
            .find(begin)
            .expect("README has no routing-table:begin marker")
            + begin.len();
        let stop = readme[start..]
            .find(end)
            .expect("README has no routing-table:end marker")
            + start;
        let want = table_markdown();
        assert!(
            readme[start..stop] == want,
            "README's routing table is stale; replace it with `copilot-lb routes --markdown`:\n{want}"
        );
    }

    #[test]
    fn every_entry_appears_in_the_markdown_exactly_once() {
        let md = table_markdown();
        for e in entries() {
            let n = md.matches(&format!("`{}`", e.method)).count();
            assert_eq!(n, 1, "{} appears {n} times", e.method);
        }
    }

    #[test]
    fn json_lists_every_entry_with_its_fields() {
        let v = table_json(&["x.y".into()], &[]);
        let ms = v["methods"].as_array().unwrap();
        assert_eq!(ms.len(), entries().len());
        let mode = ms
            .iter()
            .find(|m| m["method"] == "session.mode.set")
            .unwrap();
        assert_eq!(mode["also"][0]["field"], "inheritPlanBaseFromSessionId");
        assert_eq!(mode["also"][0]["same_backend"], true);
        let open = ms.iter().find(|m| m["method"] == "sessions.open").unwrap();
        assert_eq!(open["route"], "open");
        assert_eq!(
            open["also"][0]["field"],
            "options.detachedFromSpawningParentSessionId"
        );
        let sd = ms
            .iter()
            .find(|m| m["method"] == "runtime.shutdown")
            .unwrap();
        assert_eq!(sd["refused"], "shutdown");
        assert_eq!(v["routing"]["allow_global"][0], "x.y");
    }
}
