//! The status page: its assets (embedded in the binary, served under a strict
//! Content-Security-Policy), the one JSON document it polls (`GET /api/status`), and the
//! background tick that keeps the counters' recent history.
//!
//! The page costs the proxy nothing while nobody looks: the history is a fixed ring sampled
//! every 10 s from counters the data path keeps anyway, and the document is built only when
//! the page asks for it.

use crate::context::Shared;
use crate::history::{self, unix_ms, History};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Scripts, styles, images and requests from this origin only; no inline code, no framing,
/// no forms posted anywhere, no plugins. The page sets text with DOM calls, never HTML.
pub(super) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// One embedded file: body and content type.
pub(super) struct Asset {
    pub(super) body: &'static str,
    pub(super) content_type: &'static str,
}

/// The page's files by request path.
pub(super) fn asset(path: &str) -> Option<Asset> {
    let (body, content_type) = match path {
        "/" | "/index.html" => (include_str!("page/index.html"), "text/html; charset=utf-8"),
        "/status.js" => (
            include_str!("page/status.js"),
            "text/javascript; charset=utf-8",
        ),
        "/status.css" => (include_str!("page/status.css"), "text/css; charset=utf-8"),
        "/favicon.svg" => (include_str!("page/favicon.svg"), "image/svg+xml"),
        _ => return None,
    };
    Some(Asset { body, content_type })
}

/// The counters' history and when this admin listener started.
pub(super) struct Recent {
    history: Mutex<History>,
    started: SystemTime,
}

impl Recent {
    /// An empty history with its baseline taken now.
    pub(super) fn new(shared: &Shared) -> Arc<Recent> {
        let started = SystemTime::now();
        let mut h = History::default();
        h.sample(started, shared.metrics.totals());
        Arc::new(Recent {
            history: Mutex::new(h),
            started,
        })
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes one history bucket every [`history::INTERVAL`] until shutdown.
pub(super) async fn sample(shared: Arc<Shared>, recent: Arc<Recent>) {
    let mut tick = tokio::time::interval(history::INTERVAL);
    // A late tick (a busy machine) closes a longer bucket rather than a burst of short ones.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: the baseline was taken at start
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let totals = shared.metrics.totals();
        recent.history().sample(SystemTime::now(), totals);
    }
}

/// The document the page polls: everything it shows, in one request.
pub(super) fn document(shared: &Shared, recent: &Recent, now: SystemTime) -> Value {
    let cfg = shared.config();
    let backends: Vec<Value> = shared
        .pool
        .all()
        .iter()
        .map(|b| super::backend_json(b))
        .collect();
    let totals = shared.metrics.totals();
    let buckets = recent.history().view(now, totals);
    let window = History::window_total(&buckets);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "now_ms": unix_ms(now),
        "started_ms": unix_ms(recent.started),
        "admin_token_required": cfg.admin.as_ref().is_some_and(|a| a.token_env.is_some()),
        "connections": shared.conn_count(),
        "registry": shared.sessions.status(),
        "backends": backends,
        "sessions": sessions(shared),
        "totals": totals,
        "history": {
            "interval_s": history::INTERVAL.as_secs(),
            "buckets": buckets,
            "window": window,
        },
    })
}

/// Sessions this replica knows, by tenant and backend: `{tenants: [{tenant, known, live,
/// backends: {name: {known, live}}}], known, live}`.
fn sessions(shared: &Shared) -> Value {
    let mut tenants: BTreeMap<String, (u64, u64, serde_json::Map<String, Value>)> = BTreeMap::new();
    let (mut known, mut live) = (0u64, 0u64);
    for ((owner, backend), t) in shared.sessions.tally() {
        let e = tenants.entry(owner).or_default();
        e.0 += t.known;
        e.1 += t.live;
        e.2.insert(backend, json!({"known": t.known, "live": t.live}));
        known += t.known;
        live += t.live;
    }
    let list: Vec<Value> = tenants
        .into_iter()
        .map(
            |(tenant, (k, l, by))| json!({"tenant": tenant, "known": k, "live": l, "backends": by}),
        )
        .collect();
    json!({"known": known, "live": live, "tenants": list})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn shared() -> Arc<Shared> {
        let cfg = Config::from_yaml(
            "state: {kind: memory}\n\
             admin: {listen: 127.0.0.1:0, token_env: COPILOT_LB_STATUS_TEST_TOKEN}\n\
             backends:\n  - {name: cli-1, address: 127.0.0.1:9}\n  - {name: cli-2, address: 127.0.0.1:10}\n",
            "test",
        )
        .expect("config");
        Shared::new(cfg, None).expect("shared")
    }

    #[tokio::test]
    async fn the_document_counts_sessions_by_tenant_and_backend() {
        let s = shared();
        for (id, owner, backend, joined) in [
            ("a1", "team-a", "cli-1", true),
            ("a2", "team-a", "cli-1", false),
            ("a3", "team-a", "cli-2", true),
            ("b1", "team-b", "cli-2", true),
        ] {
            s.sessions
                .claim(id, owner, backend, &s.pool)
                .await
                .expect("claim");
            if joined {
                s.sessions.join(id, &s.pool);
            }
        }
        let recent = Recent::new(&s);
        let d = document(&s, &recent, SystemTime::now());
        assert_eq!(d["sessions"]["known"], 4);
        assert_eq!(d["sessions"]["live"], 3);
        let a = &d["sessions"]["tenants"][0];
        assert_eq!(a["tenant"], "team-a");
        assert_eq!(
            (a["known"].as_u64(), a["live"].as_u64()),
            (Some(3), Some(2))
        );
        assert_eq!(a["backends"]["cli-1"], json!({"known": 2, "live": 1}));
        assert_eq!(a["backends"]["cli-2"], json!({"known": 1, "live": 1}));
        assert_eq!(d["sessions"]["tenants"][1]["backends"]["cli-2"]["live"], 1);
        assert_eq!(d["admin_token_required"], true);
        let names: Vec<_> = d["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| b["name"].clone())
            .collect();
        assert_eq!(names, [json!("cli-1"), json!("cli-2")]);
        assert_eq!(d["backends"][0]["live_sessions"], 1);
    }

    #[tokio::test]
    async fn the_history_shows_what_happened_since_the_baseline() {
        let s = shared();
        // Before the baseline: not in the window.
        s.metrics.request("session", "proxy_error");
        let recent = Recent::new(&s);
        s.metrics.request("session", "proxy_error");
        s.metrics.request("session", "ok");
        s.metrics.request("session", "error");
        s.metrics.failover("cli-1");
        s.metrics.failover_failed("cli-2");
        s.metrics.probe("cli-2", Err(()));
        s.metrics
            .passive_failure("cli-2", crate::backend::FailureKind::Refused.as_str());
        s.metrics.bad_frame("framing");
        let later = SystemTime::now() + std::time::Duration::from_secs(10);
        recent.history().sample(later, s.metrics.totals());
        s.metrics.request("create", "proxy_error");
        let d = document(&s, &recent, later + std::time::Duration::from_secs(1));
        let w = &d["history"]["window"];
        assert_eq!(w["refused"], 2);
        assert_eq!(w["requests"], 4);
        assert_eq!(w["backend_errors"], 1);
        assert_eq!(w["failovers"], 1);
        assert_eq!(w["failover_failures"], 1);
        assert_eq!(w["health_failures"], 2);
        assert_eq!(w["bad_frames"], 1);
        assert_eq!(d["totals"]["refused"], 3, "totals count from process start");
        let b = d["history"]["buckets"].as_array().expect("buckets");
        assert_eq!(b.len(), 2, "one closed bucket and the open one");
        assert_eq!(
            (b[0]["refused"].as_u64(), b[1]["refused"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(d["history"]["interval_s"], 10);
    }

    #[test]
    fn assets_are_embedded_and_reference_only_their_own_origin() {
        let page = asset("/").expect("index");
        assert!(page.content_type.starts_with("text/html"));
        for name in ["/status.js", "/status.css", "/favicon.svg"] {
            assert!(page.body.contains(&format!("\"{name}\"")), "{name} linked");
            assert!(asset(name).is_some(), "{name} served");
        }
        for a in ["/", "/status.js", "/status.css"] {
            // The SVG namespace is a name, not a fetch.
            let body = asset(a)
                .expect("asset")
                .body
                .replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{a}: no CDN"
            );
            assert!(
                !body.contains("innerHTML"),
                "{a}: text only, never HTML from data"
            );
        }
        assert!(
            !page.body.contains("<script>") && !page.body.contains(" style="),
            "nothing inline: the CSP forbids it"
        );
        assert!(asset("/../Cargo.toml").is_none());
        assert!(CSP.contains("default-src 'none'") && !CSP.contains("unsafe"));
    }
}
