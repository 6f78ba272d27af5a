//! The tables, as pure functions of the admin API's replies (and the time, for "ago").
//!
//! Every string that came from the API goes through [`clean`]: session ids are chosen by
//! clients and check details quote backends, and neither may drive the operator's terminal
//! with escape sequences.

use serde::Deserialize;
use std::fmt::Write as _;

/// One backend of `/api/backends` (fields this view does not show are ignored, and fields a
/// newer proxy adds do not break it).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct BackendRow {
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) state: String,
    #[serde(default)]
    pub(crate) healthy: bool,
    #[serde(default)]
    pub(crate) draining: bool,
    #[serde(default)]
    pub(crate) drained: bool,
    #[serde(default)]
    pub(crate) weight: f64,
    #[serde(default)]
    pub(crate) max_sessions: Option<u64>,
    #[serde(default)]
    pub(crate) live_sessions: u64,
    #[serde(default)]
    pub(crate) fleet_sessions: Option<u64>,
    #[serde(default)]
    pub(crate) links: u64,
    #[serde(default)]
    pub(crate) version: Option<String>,
    #[serde(default)]
    pub(crate) consecutive_failures: u32,
    /// Newest first.
    #[serde(default)]
    pub(crate) health_history: Vec<CheckRow>,
}

/// One health check.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct CheckRow {
    pub(crate) at_ms: u64,
    pub(crate) ok: bool,
    #[serde(default)]
    pub(crate) detail: String,
}

/// `/api/registry`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RegistryRow {
    pub(crate) kind: String,
    pub(crate) up: bool,
    #[serde(default)]
    pub(crate) errors: u64,
    #[serde(default)]
    pub(crate) cached: u64,
}

/// `/api/sessions`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct SessionsPage {
    pub(crate) total: usize,
    pub(crate) offset: usize,
    pub(crate) sessions: Vec<SessionRow>,
}

/// One session.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct SessionRow {
    pub(crate) session_id: String,
    pub(crate) backend: String,
    pub(crate) owner: String,
    #[serde(default)]
    pub(crate) age_s: u64,
    #[serde(default)]
    pub(crate) idle_s: u64,
    #[serde(default)]
    pub(crate) live_connections: u64,
    #[serde(default)]
    pub(crate) failovers: u64,
}

/// Replaces control characters (ESC, CR, BEL, …) with their `\u{..}` escape.
pub(crate) fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// Cuts to `max` characters, marking the cut with `...` (ASCII, like the rest of the table).
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(3)).collect();
    t.push_str("...");
    t
}

/// `45s`, `3m12s`, `2h05m`, `3d04h`.
pub(crate) fn human(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Align {
    Left,
    Right,
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks.
fn table(headers: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|(h, _)| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(cell.chars().count());
            if i > 0 {
                l.push_str("  ");
            }
            match headers[i].1 {
                Align::Left => {
                    l.push_str(cell);
                    l.push_str(&" ".repeat(pad));
                }
                Align::Right => {
                    l.push_str(&" ".repeat(pad));
                    l.push_str(cell);
                }
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|(h, _)| *h).collect());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn ago(now_ms: u64, at_ms: u64) -> String {
    human(now_ms.saturating_sub(at_ms) / 1000)
}

/// The `status` view: a summary line each for the admin API and the registry, then one row
/// per backend.
pub(crate) fn status(
    admin: &str,
    backends: &[BackendRow],
    registry: &RegistryRow,
    now_ms: u64,
) -> String {
    let mut out = String::new();
    let count = |s: &str| backends.iter().filter(|b| b.state == s).count();
    let sessions: u64 = backends.iter().map(|b| b.live_sessions).sum();
    let links: u64 = backends.iter().map(|b| b.links).sum();
    let _ = writeln!(
        out,
        "admin {}: {} backend(s): {} up, {} draining, {} down; {sessions} live session(s), {links} link(s)",
        clean(admin),
        backends.len(),
        count("up"),
        count("draining"),
        count("down"),
    );
    let _ = writeln!(
        out,
        "registry {}: {}, {} session(s) cached, {} error(s)\n",
        clean(&registry.kind),
        if registry.up { "up" } else { "UNAVAILABLE" },
        registry.cached,
        registry.errors,
    );
    let headers = [
        ("BACKEND", Align::Left),
        ("ADDRESS", Align::Left),
        ("STATE", Align::Left),
        ("HEALTH", Align::Left),
        ("SESSIONS", Align::Right),
        ("FLEET", Align::Right),
        ("LINKS", Align::Right),
        ("DRAIN", Align::Left),
        ("WEIGHT", Align::Right),
        ("VERSION", Align::Left),
        ("LAST CHECK", Align::Left),
    ];
    let rows: Vec<Vec<String>> = backends
        .iter()
        .map(|b| {
            let health = match (b.healthy, b.consecutive_failures) {
                (true, 0) => "ok".to_string(),
                (true, n) => format!("ok, {n} failed"),
                (false, n) => format!("failing ({n} checks)"),
            };
            let sessions = match b.max_sessions {
                Some(m) => format!("{}/{m}", b.live_sessions),
                None => b.live_sessions.to_string(),
            };
            let drain = match (b.draining, b.drained) {
                (_, true) => "drained",
                (true, false) => "draining",
                (false, false) => "-",
            };
            let last = match b.health_history.first() {
                Some(c) => {
                    let verdict = if c.ok { "ok" } else { "failed" };
                    let detail = clean(&c.detail);
                    let detail = if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", cut(&detail, 48))
                    };
                    format!("{verdict} {} ago{detail}", ago(now_ms, c.at_ms))
                }
                None => "none yet".to_string(),
            };
            vec![
                clean(&b.name),
                clean(&b.address),
                clean(&b.state),
                health,
                sessions,
                b.fleet_sessions
                    .map(|n| n.to_string())
                    .unwrap_or("-".into()),
                b.links.to_string(),
                drain.to_string(),
                format!("{}", b.weight),
                b.version.as_deref().map(clean).unwrap_or("-".into()),
                last,
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no backends configured\n");
    } else {
        out.push_str(&table(&headers, &rows));
    }
    out
}

/// The `sessions` view: one row per session of the page, and where the page sits in the total.
pub(crate) fn sessions(page: &SessionsPage) -> String {
    let headers = [
        ("SESSION", Align::Left),
        ("TENANT", Align::Left),
        ("BACKEND", Align::Left),
        ("AGE", Align::Right),
        ("IDLE", Align::Right),
        ("CONNS", Align::Right),
        ("FAILOVERS", Align::Right),
    ];
    let rows: Vec<Vec<String>> = page
        .sessions
        .iter()
        .map(|s| {
            vec![
                clean(&s.session_id),
                clean(&s.owner),
                clean(&s.backend),
                human(s.age_s),
                human(s.idle_s),
                s.live_connections.to_string(),
                s.failovers.to_string(),
            ]
        })
        .collect();
    let mut out = String::new();
    if !rows.is_empty() {
        out.push_str(&table(&headers, &rows));
    }
    let shown = rows.len();
    let _ = match (shown, page.total) {
        (0, 0) => writeln!(out, "no sessions"),
        (0, t) => writeln!(out, "no sessions at offset {} ({t} in all)", page.offset),
        (n, t) if page.offset == 0 && n == t => writeln!(out, "{t} session(s)"),
        (n, t) => {
            let next = page.offset + n;
            let more = if next < t {
                format!("; --offset {next} for more")
            } else {
                String::new()
            };
            writeln!(out, "sessions {}-{next} of {t}{more}", page.offset + 1)
        }
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn backend(v: serde_json::Value) -> BackendRow {
        serde_json::from_value(v).unwrap()
    }

    fn sample() -> Vec<BackendRow> {
        vec![
            backend(json!({
                "name": "cli-1", "address": "127.0.0.1:41001", "state": "up", "healthy": true,
                "draining": false, "drained": false, "weight": 1.0, "max_sessions": 500,
                "live_sessions": 3, "fleet_sessions": 3, "links": 2, "version": "1.0.102",
                "consecutive_failures": 0, "consecutive_successes": 9,
                "health_history": [{"at_ms": 99_000, "ok": true, "detail": "1.2ms"}],
                "a_field_from_a_newer_proxy": {"x": 1}
            })),
            backend(json!({
                "name": "cli-2", "address": "127.0.0.1:41002", "state": "down", "healthy": false,
                "draining": true, "drained": true, "weight": 2.5, "max_sessions": null,
                "live_sessions": 0, "fleet_sessions": 0, "links": 0, "version": null,
                "consecutive_failures": 4, "consecutive_successes": 0,
                "health_history": [
                    {"at_ms": 95_000, "ok": false, "detail": "connect: Connection refused (os error 111)"},
                    {"at_ms": 90_000, "ok": true, "detail": "1ms"}
                ]
            })),
        ]
    }

    fn registry() -> RegistryRow {
        serde_json::from_value(json!({"kind": "embedded", "up": true, "errors": 0, "cached": 3}))
            .unwrap()
    }

    #[test]
    fn status_table_has_a_row_per_backend_with_aligned_columns() {
        let out = status("127.0.0.1:9464", &sample(), &registry(), 100_000);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "admin 127.0.0.1:9464: 2 backend(s): 1 up, 0 draining, 1 down; 3 live session(s), 2 link(s)"
        );
        assert_eq!(
            lines[1],
            "registry embedded: up, 3 session(s) cached, 0 error(s)"
        );
        assert_eq!(lines[2], "");
        let header = lines[3];
        assert!(
            header.starts_with("BACKEND  ADDRESS          STATE  HEALTH"),
            "{header}"
        );
        let up = lines[4];
        let down = lines[5];
        assert!(
            up.starts_with("cli-1    127.0.0.1:41001  up     ok "),
            "{up}"
        );
        assert!(up.contains("3/500") && up.contains("1.0.102"), "{up}");
        assert!(up.ends_with("ok 1s ago: 1.2ms"), "{up}");
        assert!(down.contains("down   failing (4 checks)"), "{down}");
        assert!(down.contains("drained") && down.contains("2.5"), "{down}");
        assert!(
            down.ends_with("failed 5s ago: connect: Connection refused (os error 111)"),
            "{down}"
        );
        // Every column starts where its header does.
        for col in ["SESSIONS", "LINKS", "DRAIN", "VERSION", "LAST CHECK"] {
            let at = header.find(col).unwrap();
            assert_ne!(&up[at - 1..at], "x", "{col}");
        }
        let drain_at = header.find("DRAIN").unwrap();
        assert_eq!(&up[drain_at..drain_at + 1], "-");
        assert_eq!(&down[drain_at..drain_at + 7], "drained");
        // Right-aligned numbers end under the header's end.
        let links_end = header.find("LINKS").unwrap() + "LINKS".len();
        assert_eq!(&up[links_end - 1..links_end], "2");
        assert_eq!(&down[links_end - 1..links_end], "0");
        assert!(
            lines.iter().all(|l| l == &l.trim_end()),
            "trailing blanks:\n{out}"
        );
    }

    #[test]
    fn status_without_backends_or_checks_says_so() {
        let out = status("h:1", &[], &registry(), 0);
        assert!(out.ends_with("no backends configured\n"), "{out}");
        let b = backend(json!({"name": "a", "address": "h:2", "state": "up"}));
        let out = status("h:1", &[b], &registry(), 0);
        assert!(out.contains("none yet"), "{out}");
        let down: RegistryRow =
            serde_json::from_value(json!({"kind": "redis", "up": false, "errors": 7, "cached": 0}))
                .unwrap();
        assert!(status("h:1", &[], &down, 0)
            .contains("registry redis: UNAVAILABLE, 0 session(s) cached, 7 error(s)"));
    }

    #[test]
    fn strings_from_the_api_cannot_reach_the_terminal_as_escapes() {
        let page: SessionsPage = serde_json::from_value(json!({
            "total": 1, "offset": 0, "limit": 100,
            "sessions": [{"session_id": "evil\u{1b}[2J\u{7}", "backend": "cli-1", "owner": "t\r",
                          "age_s": 1, "idle_s": 1, "live_connections": 1, "failovers": 0, "epoch": 1}]
        }))
        .unwrap();
        let out = sessions(&page);
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
        assert!(
            out.contains("evil\\u{1b}[2J\\u{7}") && out.contains("t\\u{d}"),
            "{out}"
        );
        let mut b = sample();
        b[1].health_history[0].detail = "x\u{1b}]0;title\u{7}".into();
        let out = status("h:1", &b, &registry(), 100_000);
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
    }

    #[test]
    fn sessions_table_and_paging_footer() {
        let row = |id: &str, owner: &str, age: u64, idle: u64| {
            json!({"session_id": id, "backend": "cli-2", "owner": owner, "age_s": age,
                   "idle_s": idle, "live_connections": 1, "failovers": 2, "epoch": 3})
        };
        let page: SessionsPage = serde_json::from_value(json!({
            "total": 5, "offset": 0, "limit": 2,
            "sessions": [row("s-1", "team-a", 3725, 59), row("session-two", "default", 90_000, 0)]
        }))
        .unwrap();
        let out = sessions(&page);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "SESSION      TENANT   BACKEND    AGE  IDLE  CONNS  FAILOVERS"
        );
        assert_eq!(
            lines[1],
            "s-1          team-a   cli-2    1h02m   59s      1          2"
        );
        assert_eq!(
            lines[2],
            "session-two  default  cli-2    1d01h    0s      1          2"
        );
        assert_eq!(lines[3], "sessions 1-2 of 5; --offset 2 for more");
        let all = SessionsPage {
            total: 2,
            ..page.clone()
        };
        assert!(sessions(&all).ends_with("\n2 session(s)\n"));
        let last = SessionsPage {
            total: 4,
            offset: 2,
            ..page.clone()
        };
        assert!(sessions(&last).ends_with("sessions 3-4 of 4\n"));
        let none = SessionsPage {
            total: 0,
            offset: 0,
            sessions: vec![],
        };
        assert_eq!(sessions(&none), "no sessions\n");
        let past = SessionsPage {
            total: 3,
            offset: 10,
            sessions: vec![],
        };
        assert_eq!(sessions(&past), "no sessions at offset 10 (3 in all)\n");
    }

    #[test]
    fn durations_are_short_and_exact() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(59), "59s");
        assert_eq!(human(60), "1m00s");
        assert_eq!(human(3599), "59m59s");
        assert_eq!(human(3600), "1h00m");
        assert_eq!(human(86_399), "23h59m");
        assert_eq!(human(86_400), "1d00h");
        assert_eq!(
            human(u64::MAX),
            format!("{}d{:02}h", u64::MAX / 86_400, u64::MAX % 86_400 / 3600)
        );
        assert_eq!(cut("abcdefgh", 6), "abc...");
        assert_eq!(cut("abc", 4), "abc");
    }
}
