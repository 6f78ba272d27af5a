//! `managed:`: the pool of CLI servers copilot-lb starts and supervises itself, and its checks.

use super::backends::BackendConfig;
use super::spanned;
use super::values::Millis;
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

/// A pool of local `copilot --headless` processes that copilot-lb starts, supervises and
/// restarts itself (`managed:`). They become backends named `{name_prefix}-1` … `-{count}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedConfig {
    /// How many CLI servers to run.
    pub count: Spanned<u32>,
    /// The CLI executable: a path, or a name looked up on `PATH` (default `copilot`).
    #[serde(default = "default_managed_command")]
    pub command: Spanned<String>,
    /// Arguments placed before the proxy's own (`--headless --host 127.0.0.1 --port N …`).
    #[serde(default)]
    pub args: Vec<String>,
    /// Directory of the pool: `session-state/` shared by every CLI (so failover resumes),
    /// and one `COPILOT_HOME` per CLI under it. Relative to the working directory.
    #[serde(default = "default_managed_home")]
    pub home: PathBuf,
    /// Backend names are `{name_prefix}-{i}`.
    #[serde(default = "default_name_prefix")]
    pub name_prefix: String,
    /// Environment variables passed to the CLIs (model credentials such as
    /// `COPILOT_GITHUB_TOKEN`); nothing else of the proxy's environment is, besides `PATH`,
    /// `HOME` and the locale. Names only: values are never logged.
    #[serde(default)]
    pub env_pass: Vec<String>,
    /// Cap on live sessions per CLI.
    #[serde(default)]
    pub max_sessions: Option<u64>,
    /// Turns each CLI runs at once (as `backends[].max_concurrent_turns`).
    #[serde(default)]
    pub max_concurrent_turns: Option<u64>,
    /// How long a started CLI has to answer a health probe.
    #[serde(default = "default_start_timeout")]
    pub start_timeout: Millis,
    /// How long a CLI has to exit after SIGTERM before its process group is killed.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: Millis,
    /// Rolling restart: how long to wait for a CLI's requests and turns to finish before it
    /// is stopped anyway.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Millis,
    /// First delay before restarting a CLI that exited; doubles per quick exit.
    #[serde(default = "default_restart_backoff")]
    pub restart_backoff: Millis,
    /// Cap on that delay.
    #[serde(default = "default_max_restart_backoff")]
    pub max_restart_backoff: Millis,
}

fn default_managed_command() -> Spanned<String> {
    spanned("copilot".to_string())
}
fn default_managed_home() -> PathBuf {
    PathBuf::from(".copilot-lb/pool")
}
fn default_name_prefix() -> String {
    "cli".into()
}
fn default_start_timeout() -> Millis {
    Millis(Duration::from_secs(60))
}
fn default_stop_timeout() -> Millis {
    Millis(Duration::from_secs(5))
}
fn default_drain_timeout() -> Millis {
    Millis(Duration::from_secs(120))
}
fn default_restart_backoff() -> Millis {
    Millis(Duration::from_millis(500))
}
fn default_max_restart_backoff() -> Millis {
    Millis(Duration::from_secs(30))
}

/// Variables the supervisor sets itself: `env_pass` may not name them.
pub const MANAGED_RESERVED_ENV: &[&str] = &[
    "COPILOT_CONNECTION_TOKEN",
    "COPILOT_HOME",
    "COPILOT_LB_POOL",
    "PATH",
    "HOME",
];

impl ManagedConfig {
    /// The backend names, in order.
    pub fn names(&self) -> Vec<String> {
        (1..=self.count.value)
            .map(|i| format!("{}-{i}", self.name_prefix))
            .collect()
    }
}

impl ManagedConfig {
    /// What is wrong with `managed:`.
    pub(super) fn check(&self, file_backends: &[BackendConfig], p: &mut Vec<String>) {
        let at = |l: serde_saphyr::Location| {
            if l == serde_saphyr::Location::UNKNOWN {
                "managed".to_string()
            } else {
                format!("line {}, column {}", l.line(), l.column())
            }
        };
        let w = at(self.count.referenced);
        if !(1..=64).contains(&self.count.value) {
            p.push(format!("{w}: managed.count must be between 1 and 64"));
        }
        if self.command.value.trim().is_empty() {
            p.push(format!(
                "{}: managed.command must not be empty",
                at(self.command.referenced)
            ));
        }
        let prefix_ok = !self.name_prefix.is_empty()
            && self
                .name_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !prefix_ok {
            p.push(format!(
                "{w}: managed.name_prefix {:?} must be letters, digits, - or _",
                self.name_prefix
            ));
        }
        if let Some(b) = file_backends.iter().find(|b| !b.managed) {
            p.push(format!(
                "{w}: managed and backends cannot be combined (backend {:?}): the pool's CLIs share a session-state directory other backends cannot read; run the other CLIs as a separate copilot-lb",
                b.name()
            ));
        }
        let mut seen = HashSet::new();
        for v in &self.env_pass {
            let valid = v
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                p.push(format!(
                    "{w}: managed.env_pass: {v:?} is not an environment variable name"
                ));
            } else if MANAGED_RESERVED_ENV.contains(&v.as_str()) {
                p.push(format!(
                    "{w}: managed.env_pass: {v} is set by copilot-lb itself"
                ));
            } else if !seen.insert(v.as_str()) {
                p.push(format!(
                    "{w}: managed.env_pass: {v} is listed more than once"
                ));
            }
        }
        if self.max_sessions == Some(0) || self.max_concurrent_turns == Some(0) {
            p.push(format!(
                "{w}: managed.max_sessions and max_concurrent_turns must be >= 1"
            ));
        }
        for (name, d) in [
            ("start_timeout", self.start_timeout),
            ("stop_timeout", self.stop_timeout),
            ("drain_timeout", self.drain_timeout),
            ("restart_backoff", self.restart_backoff),
        ] {
            if d.0.is_zero() {
                p.push(format!("{w}: managed.{name} must be more than 0"));
            }
        }
        if self.max_restart_backoff.0 < self.restart_backoff.0 {
            p.push(format!(
                "{w}: managed.max_restart_backoff must be >= restart_backoff"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, FailoverPolicy};

    #[test]
    fn a_managed_pool_implies_shared_storage_and_names_its_backends() {
        let h = format!("sha256:{}", "0".repeat(64));
        let y = format!("managed:\n  count: 2\n  env_pass: [COPILOT_GITHUB_TOKEN]\ntenants:\n  - name: t\n    token_hashes: [\"{h}\"]\n    backends: [cli-2]\n");
        let c = Config::from_yaml(&y, "t").unwrap();
        let m = c.managed.as_ref().unwrap();
        assert_eq!(m.names(), ["cli-1", "cli-2"]);
        assert_eq!(m.command.value, "copilot");
        assert!(c.sessions.shared_storage);
        assert_eq!(c.sessions.policy(), FailoverPolicy::Reassign);
        assert!(
            c.backends.is_empty(),
            "the pool's backends are added at start"
        );
        let e = Config::from_yaml(&y.replace("cli-2]", "cli-3]"), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown backend \"cli-3\""), "{e}");
        let e = Config::from_yaml("managed:\n  count: 1\n  wat: 1\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("wat"), "{e}");
        let e = Config::from_yaml(
            "managed: {count: 1, restart_backoff: 2s, max_restart_backoff: 1s, name_prefix: \"a b\"}\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("max_restart_backoff must be >= restart_backoff")
                && e.contains("name_prefix"),
            "{e}"
        );
    }
}
