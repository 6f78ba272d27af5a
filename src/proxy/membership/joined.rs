//! A connection's sessions as plain data (which it joined, which it may hear about, whose
//! turn is running), and the pure rules over them: ownership, notification filtering, the end
//! of a turn.

use crate::auth::Tenant;
use crate::fair::TurnSlot;
use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

/// A session this connection created or resumed, with what it would take to resume it again.
#[derive(Debug, Clone)]
pub(in crate::proxy) struct Joined {
    pub(in crate::proxy) backend: String,
    /// The raw params of the last create/resume (memory only: may hold provider keys).
    pub(in crate::proxy) params: Option<String>,
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

/// A turn in progress on one session, holding its tenant's (and backend's) share.
#[derive(Debug)]
struct Turn {
    _slot: TurnSlot,
    /// The backend it was last sent to (none yet: held, or waiting for a slot).
    sent_to: Option<std::sync::Arc<crate::backend::Backend>>,
    /// Counts the turn as work on that backend if it is a managed CLI (a rolling restart
    /// waits for it).
    _on: Option<crate::backend::Busy>,
    /// Sent on a session this connection has not joined: its events go to whichever
    /// connection did, so the turn is counted until the send is answered.
    until_reply: bool,
}

/// A connection's sessions. Plain data: the session table is updated by the caller.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    joined: HashMap<String, Joined>,
    /// Sessions whose events and lifecycle notifications may reach this client.
    known: HashSet<String>,
    /// Turns in progress, by session: a session has at most one (the CLI queues further
    /// sends into it), and dropping the entry gives its shares back.
    turns: HashMap<String, Turn>,
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
            lost_link: false,
        };
        self.joined.insert(sid.to_string(), j).is_none()
    }

    /// Leaves `sid` (a turn running on it no longer counts); true if it was joined.
    pub(in crate::proxy) fn leave(&mut self, sid: &str) -> bool {
        self.turns.remove(sid);
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

    /// Whether a turn is running on `sid` (a further send joins it and costs nothing more).
    pub(in crate::proxy) fn in_turn(&self, sid: &str) -> bool {
        self.turns.contains_key(sid)
    }

    /// A turn starts on `sid`, holding `slot` until it ends.
    pub(in crate::proxy) fn start_turn(&mut self, sid: &str, slot: TurnSlot) {
        let until_reply = !self.joined.contains_key(sid);
        self.turns.insert(
            sid.to_string(),
            Turn {
                _slot: slot,
                sent_to: None,
                _on: None,
                until_reply,
            },
        );
    }

    /// The turn running on `sid` was sent to `backend` (again, after a failover).
    pub(in crate::proxy) fn turn_on(
        &mut self,
        sid: &str,
        backend: &std::sync::Arc<crate::backend::Backend>,
    ) {
        if let Some(t) = self.turns.get_mut(sid) {
            t._on = backend.managed.then(|| backend.begin_work());
            t.sent_to = Some(backend.clone());
        }
    }

    /// The session's `session.idle` or `session.error` arrived.
    pub(in crate::proxy) fn end_turn(&mut self, sid: &str) {
        self.turns.remove(sid);
    }

    /// A turn-starting request on `sid` was answered: an error means no turn runs; a success
    /// ends a turn counted only until its reply.
    pub(in crate::proxy) fn turn_answered(&mut self, sid: &str, is_error: bool) {
        if is_error || self.turns.get(sid).is_some_and(|t| t.until_reply) {
            self.turns.remove(sid);
        }
    }

    /// The sessions on `backend` with a turn running there, each ended.
    pub(in crate::proxy) fn take_turns_on(&mut self, backend: &str) -> Vec<String> {
        let joined = &self.joined;
        let lost: Vec<String> = self
            .turns
            .iter()
            .filter(|(sid, t)| {
                // A turn not yet sent anywhere (held while its backend quiesced, or waiting
                // for a slot) was not lost: it goes wherever its session moves.
                let sent_there = t.sent_to.as_ref().is_some_and(|b| b.name == backend);
                !t.until_reply
                    && sent_there
                    && joined.get(*sid).is_some_and(|j| j.backend == backend)
            })
            .map(|(sid, _)| sid.clone())
            .collect();
        for sid in &lost {
            self.turns.remove(sid);
        }
        lost
    }

    /// The link to `backend` broke: every session joined there needs a resume.
    pub(in crate::proxy) fn link_lost(&mut self, backend: &str) {
        for j in self.joined.values_mut() {
            if j.backend == backend {
                j.lost_link = true;
            }
        }
    }

    /// Sessions joined on `backend` with no turn running (a running turn is left to finish).
    pub(in crate::proxy) fn idle_on(&self, backend: &str) -> Vec<String> {
        self.joined
            .iter()
            .filter(|(sid, j)| j.backend == backend && !self.turns.contains_key(*sid))
            .map(|(sid, _)| sid.clone())
            .collect()
    }

    /// Whether any session is joined (a going-away edge keeps a connection that holds one).
    pub(in crate::proxy) fn holds_any(&self) -> bool {
        !self.joined.is_empty()
    }

    /// `sid` was resumed on `backend` for this connection.
    pub(in crate::proxy) fn rejoined(&mut self, sid: &str, backend: &str) {
        if let Some(j) = self.joined.get_mut(sid) {
            j.backend = backend.to_string();
            j.lost_link = false;
        }
    }

    /// Everything joined, emptied (the connection closes; its turns end with it).
    pub(in crate::proxy) fn drain(&mut self) -> Vec<(String, Joined)> {
        self.turns.clear();
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

/// Whether a method starts a turn of the session it names.
pub(in crate::proxy) fn starts_turn(method: &str) -> bool {
    matches!(
        method,
        "session.send" | "session.sendMessages" | "session.sendAndWait"
    )
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
    fn every_end_of_a_turn_gives_its_share_back() {
        let l = std::sync::Arc::new(crate::fair::TenantLimits::default());
        let mut m = Membership::default();
        for s in ["idle", "error", "left", "lost", "closed"] {
            m.join(s, if s == "closed" { "b" } else { "a" }, None);
            m.start_turn(s, l.try_turn().unwrap());
        }
        m.start_turn("stray", l.try_turn().unwrap());
        assert_eq!(l.turns(), 6);
        m.end_turn("idle");
        m.turn_answered("error", true);
        m.turn_answered("left", false);
        assert!(m.in_turn("left"), "a joined turn outlives its send's reply");
        m.leave("left");
        m.turn_answered("stray", false);
        m.turn_on("lost", &backend("a"));
        assert_eq!(m.take_turns_on("a"), vec!["lost".to_string()]);
        assert_eq!(l.turns(), 1);
        m.drain();
        assert_eq!(l.turns(), 0);
    }

    fn backend(name: &str) -> std::sync::Arc<crate::backend::Backend> {
        let cfg = crate::config::Config::from_yaml(
            &format!("backends:\n  - name: {name}\n    address: 127.0.0.1:1\n"),
            "t",
        )
        .unwrap();
        std::sync::Arc::new(crate::backend::Backend::from_config(&cfg.backends[0]).unwrap())
    }

    #[test]
    fn membership_tracks_links_and_turns() {
        let l = std::sync::Arc::new(crate::fair::TenantLimits::default());
        let mut m = Membership::default();
        assert!(m.join("s", "a", None));
        assert!(!m.join("s", "a", None));
        m.start_turn("s", l.try_turn().unwrap());
        assert!(
            m.take_turns_on("a").is_empty(),
            "a turn not sent yet is not lost with the backend"
        );
        let a = backend("a");
        m.turn_on("s", &a);
        assert_eq!(a.busy(), 0, "turns are counted on managed CLIs only");
        let managed = {
            let cfg =
                crate::config::Config::from_yaml("backends:\n  - address: 127.0.0.1:2\n", "t")
                    .unwrap();
            let mut bc = cfg.backends[0].clone();
            bc.managed = true;
            std::sync::Arc::new(crate::backend::Backend::from_config(&bc).unwrap())
        };
        m.turn_on("s", &managed);
        assert_eq!(
            managed.busy(),
            1,
            "a turn sent to a managed CLI is work there"
        );
        m.turn_on("s", &a);
        assert_eq!(managed.busy(), 0, "and moves with the turn");
        assert_eq!(a.busy(), 0);
        assert_eq!(m.take_turns_on("b"), Vec::<String>::new());
        assert_eq!(m.take_turns_on("a"), vec!["s".to_string()]);

        assert!(m.take_turns_on("a").is_empty());
        assert_eq!(l.turns(), 0);
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
