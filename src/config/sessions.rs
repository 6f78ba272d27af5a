//! `sessions:`: shared storage, the failover policy and the session age and idle limits.

use super::values::Millis;
use serde::Deserialize;
use std::time::Duration;

/// What happens to a session whose backend is lost.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailoverPolicy {
    /// Resume the session on the next backend of its ranking (needs shared session storage).
    Reassign,
    /// Answer with an error naming the session; the client must recreate it.
    Fail,
}

/// Session storage and failover.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// Whether every backend sees the same session state (a shared COPILOT_HOME/session-state).
    #[serde(default)]
    pub shared_storage: bool,
    /// Failover policy; defaults to `reassign` with shared storage and `fail` without.
    #[serde(default)]
    pub failover: Option<FailoverPolicy>,
    /// How long a request waits for a suspect backend's health verdict before failing.
    #[serde(default)]
    pub detect_timeout: Option<Millis>,
    /// Default for every tenant: delete sessions this long after creation (off by default).
    #[serde(default)]
    pub max_session_age: Option<Millis>,
    /// Default for every tenant: delete sessions idle this long (off by default).
    #[serde(default)]
    pub max_idle: Option<Millis>,
    /// How often the hygiene reaper walks the registry for sessions past a limit (default 5 s).
    #[serde(default)]
    pub hygiene_interval: Option<Millis>,
}

impl SessionsConfig {
    /// The policy in force.
    pub fn policy(&self) -> FailoverPolicy {
        self.failover.unwrap_or(if self.shared_storage {
            FailoverPolicy::Reassign
        } else {
            FailoverPolicy::Fail
        })
    }

    /// Wait bound for a health verdict (default 5 s).
    pub fn detect_timeout(&self) -> Duration {
        self.detect_timeout
            .map(|m| m.0)
            .unwrap_or(Duration::from_secs(5))
    }

    /// Interval of the hygiene reaper (default 5 s): each pass walks every record in the
    /// registry, so it is not run every second.
    pub fn hygiene_interval(&self) -> Duration {
        self.hygiene_interval
            .map(|m| m.0)
            .unwrap_or(Duration::from_secs(5))
    }
}
