//! A connection's sessions as plain data (which it joined, which it may hear about, whose
//! turn is running), and the pure rules over them: ownership, notification filtering, the end
//! of a turn.

use crate::auth::Tenant;
use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

/// A session this connection created or resumed, with what it would take to resume it again.
#[derive(Debug, Clone)]
pub(in crate::proxy) struct Joined {
    pub(in crate::proxy) backend: String,
    /// The raw params of the last create/resume (memory only: may hold provider keys).
    pub(in crate::proxy) params: Option<String>,
    /// A turn was sent and no `session.idle`/`session.error` seen yet.
    pub(in crate::proxy) turn: bool,
    /// The link it was joined through broke: the CLI released it for this connection (or
    /// restarted without it), so it must be resumed again before its next request.
    pub(in crate::proxy) lost_link: bool,
}

impl Joined {
    /// Whether using the session on `backend` first needs a `session.resume` there.
    pub(in crate::proxy) fn needs_resume_on(&self, backend: &str) -> bool {
        self.lost_link || self.backend != backend
    }
}

/// A connection's sessions. Plain data: the session table is updated by the caller.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    joined: HashMap<String, Joined>,
    /// Sessions whose events and lifecycle notifications may reach this client.
    known: HashSet<String>,
}

impl Membership {
    /// Joins `sid` on `backend`; true if it was not joined before.
    pub(in crate::proxy) fn join(
        &mut self,
        sid: &str,
        backend: &str,
        params: Option<String>,
    ) -> bool {
        self.known.insert(sid.to_string());
        let j = Joined {
            backend: backend.to_string(),
            params,
            turn: false,
            lost_link: false,
        };
        self.joined.insert(sid.to_string(), j).is_none()
    }

    /// Leaves `sid`; true if it was joined.
    pub(in crate::proxy) fn leave(&mut self, sid: &str) -> bool {
        self.joined.remove(sid).is_some()
    }

    pub(in crate::proxy) fn get(&self, sid: &str) -> Option<&Joined> {
        self.joined.get(sid)
    }

    /// Lets events of `sid` through before it is joined (a resume in progress).
    pub(in crate::proxy) fn learn(&mut self, sid: &str) {
        self.known.insert(sid.to_string());
    }

    pub(in crate::proxy) fn knows(&self, sid: &str) -> bool {
        self.known.contains(sid)
    }

    pub(in crate::proxy) fn set_turn(&mut self, sid: &str, running: bool) {
        if let Some(j) = self.joined.get_mut(sid) {
            j.turn = running;
        }
    }

    /// The sessions on `backend` with a turn running, each marked as no longer running.
    pub(in crate::proxy) fn take_turns_on(&mut self, backend: &str) -> Vec<String> {
        self.joined
            .iter_mut()
            .filter(|(_, j)| j.backend == backend && j.turn)
            .map(|(sid, j)| {
                j.turn = false;
                sid.clone()
            })
            .collect()
    }

    /// The link to `backend` broke: every session joined there needs a resume.
    pub(in crate::proxy) fn link_lost(&mut self, backend: &str) {
        for j in self.joined.values_mut() {
            if j.backend == backend {
                j.lost_link = true;
            }
        }
    }

    /// `sid` was resumed on `backend` for this connection.
    pub(in crate::proxy) fn rejoined(&mut self, sid: &str, backend: &str) {
        if let Some(j) = self.joined.get_mut(sid) {
            j.backend = backend.to_string();
            j.lost_link = false;
        }
    }

    /// Everything joined, emptied (the connection closes).
    pub(in crate::proxy) fn drain(&mut self) -> Vec<(String, Joined)> {
        self.joined.drain().collect()
    }
}

/// Whether `tenant` may use a session: its recorded owner decides (`owned`: `Some(mine)`);
/// an id the proxy has no record of belongs to nobody, unless the tenant adopts unknown ids.
pub(in crate::proxy) fn may_use(owned: Option<bool>, tenant: &Tenant, sid: &str) -> bool {
    match owned {
        Some(mine) => mine,
        None => tenant.may_adopt(sid),
    }
}

/// Whether a backend notification may reach a client. The CLI broadcasts
/// `session.lifecycle` to every connection; only sessions the client created or resumed
/// pass, so no tenant ever sees another's session ids.
pub(in crate::proxy) fn notification_passes(
    method: &str,
    session: Option<&str>,
    telemetry: bool,
    knows: impl Fn(&str) -> bool,
) -> bool {
    if method == "gitHubTelemetry.event" && !telemetry {
        return false;
    }
    match session {
        Some(s) => knows(s),
        None => method != "gitHubTelemetry.event" && method != "session.lifecycle",
    }
}

/// Whether a small `session.event` ends a turn (`session.idle` or `session.error`). Large
/// events are deltas, never the end of a turn, and are not searched.
pub(in crate::proxy) fn ends_turn(body: &[u8]) -> bool {
    if body.len() > 4096 {
        return false;
    }
    // Built once: constructing a searcher costs more than searching a small event.
    static IDLE: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"session.idle\""));
    static ERROR: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"session.error\""));
    IDLE.find(body).is_some() || ERROR.find(body).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_and_telemetry_pass_only_when_asked() {
        let knows = |s: &str| s == "mine";
        assert!(notification_passes(
            "session.event",
            Some("mine"),
            false,
            knows
        ));
        assert!(!notification_passes(
            "session.event",
            Some("theirs"),
            false,
            knows
        ));
        assert!(!notification_passes(
            "session.lifecycle",
            None,
            false,
            knows
        ));
        assert!(!notification_passes(
            "gitHubTelemetry.event",
            None,
            false,
            knows
        ));
        assert!(!notification_passes(
            "gitHubTelemetry.event",
            None,
            true,
            knows
        ));
        assert!(notification_passes(
            "gitHubTelemetry.event",
            Some("mine"),
            true,
            knows
        ));
        assert!(notification_passes("models.changed", None, false, knows));
    }

    #[test]
    fn turns_end_on_idle_or_error_in_small_events() {
        assert!(ends_turn(
            br#"{"params":{"event":{"type":"session.idle"}}}"#
        ));
        assert!(ends_turn(
            br#"{"params":{"event":{"type":"session.error"}}}"#
        ));
        assert!(!ends_turn(
            br#"{"params":{"event":{"type":"assistant.message_delta"}}}"#
        ));
        let mut big = br#"{"type":"session.idle","pad":""#.to_vec();
        big.resize(5000, b'x');
        assert!(!ends_turn(&big));
    }

    #[test]
    fn membership_tracks_links_and_turns() {
        let mut m = Membership::default();
        assert!(m.join("s", "a", None));
        assert!(!m.join("s", "a", None));
        m.set_turn("s", true);
        assert_eq!(m.take_turns_on("b"), Vec::<String>::new());
        assert_eq!(m.take_turns_on("a"), vec!["s".to_string()]);
        assert!(m.take_turns_on("a").is_empty());
        assert!(!m.get("s").unwrap().needs_resume_on("a"));
        m.link_lost("a");
        assert!(m.get("s").unwrap().needs_resume_on("a"));
        m.rejoined("s", "b");
        assert!(!m.get("s").unwrap().needs_resume_on("b"));
        assert!(m.get("s").unwrap().needs_resume_on("a"));
        assert!(m.leave("s") && !m.leave("s"));
        assert!(
            m.knows("s"),
            "a session once joined keeps its events flowing"
        );
    }
}
