//! `backends:`, how new sessions are placed on them (`balancing:`), how their health is
//! checked (`health:`), and reading their connection tokens.

use super::listeners::ClientTlsConfig;
use super::values::Millis;
use super::Config;
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::path::PathBuf;
use std::time::Duration;

/// One Copilot CLI backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Stable name: the input to session hashing. Defaults to the address.
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    /// `host:port` of `copilot --headless --port N`.
    pub address: Spanned<String>,
    /// Relative share of new sessions.
    #[serde(default = "one")]
    pub weight: f64,
    /// Hard cap on live sessions placed here.
    #[serde(default)]
    pub max_sessions: Option<u64>,
    /// Name of an environment variable holding this CLI's `COPILOT_CONNECTION_TOKEN`.
    #[serde(default)]
    pub token_env: Option<String>,
    /// File holding this CLI's connection token (trailing whitespace ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Start drained: keep existing sessions, place no new ones.
    #[serde(default)]
    pub drain: bool,
    /// TLS to this backend (optional).
    #[serde(default)]
    pub tls: Option<ClientTlsConfig>,
    /// Turns (`session.send` and the like) it runs at once; more wait for a slot, which goes
    /// to the tenant with the fewest turns running here (`balancing.turn_wait` bounds the
    /// wait). Unset: no cap, turns are forwarded as they come.
    #[serde(default)]
    pub max_concurrent_turns: Option<u64>,
    /// This backend is a copilot-lb edge, not a CLI (this process is a session-aware sidecar):
    /// the link asks it to announce its shutdown (`copilotLb.goaway`), and when it does, or
    /// dies, this connection's sessions move to another edge with a `session.resume` replay.
    #[serde(default)]
    pub edge: bool,
    /// Started and supervised by copilot-lb (`managed:`), never read from a file.
    #[serde(skip)]
    pub managed: bool,
}

fn one() -> f64 {
    1.0
}

impl BackendConfig {
    /// The backend's stable name.
    pub fn name(&self) -> &str {
        self.name
            .as_ref()
            .map(|n| n.value.as_str())
            .unwrap_or(self.address.value.as_str())
    }
}

/// Placement policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancingConfig {
    /// Bounded-load factor c: no backend takes a new session above ceil(c × average).
    #[serde(default = "default_bounded_load")]
    pub bounded_load: f64,
    /// Turns that may wait for a slot on one backend with `max_concurrent_turns`.
    #[serde(default = "default_max_waiting_turns")]
    pub max_waiting_turns: usize,
    /// How long a turn waits for such a slot before it is refused (retryable).
    #[serde(default = "default_turn_wait")]
    pub turn_wait: Millis,
}

fn default_max_waiting_turns() -> usize {
    64
}

fn default_turn_wait() -> Millis {
    Millis(Duration::from_secs(30))
}

fn default_bounded_load() -> f64 {
    1.25
}

impl Default for BalancingConfig {
    fn default() -> Self {
        BalancingConfig {
            bounded_load: default_bounded_load(),
            max_waiting_turns: default_max_waiting_turns(),
            turn_wait: default_turn_wait(),
        }
    }
}

/// Active health checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between probes (jittered by ±10%).
    #[serde(default = "default_interval")]
    pub interval: Millis,
    /// Probe timeout.
    #[serde(default = "default_probe_timeout")]
    pub timeout: Millis,
    /// Consecutive successes that mark a backend up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that mark a backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Cap on the probe interval while a backend stays down: it starts at `interval` and
    /// doubles with each failed probe up to this (HAProxy's `downinter`, with back-off).
    #[serde(default = "default_max_down_interval")]
    pub max_down_interval: Millis,
}

fn default_max_down_interval() -> Millis {
    Millis(Duration::from_secs(10))
}

fn default_interval() -> Millis {
    Millis(Duration::from_secs(2))
}
fn default_probe_timeout() -> Millis {
    Millis(Duration::from_secs(1))
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: default_interval(),
            timeout: default_probe_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            max_down_interval: default_max_down_interval(),
        }
    }
}

impl Config {
    /// Reads every backend's connection token from its env var or file.
    pub fn backend_token(b: &BackendConfig) -> Result<Option<String>, TokenError> {
        let backend = b.name().to_string();
        if let Some(var) = &b.token_env {
            return match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
                Ok(_) => Err(TokenError::EnvEmpty {
                    backend,
                    var: var.clone(),
                }),
                Err(_) => Err(TokenError::EnvUnset {
                    backend,
                    var: var.clone(),
                }),
            };
        }
        if let Some(path) = &b.token_file {
            return match std::fs::read_to_string(path) {
                Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
                Ok(_) => Err(TokenError::FileEmpty {
                    backend,
                    path: path.clone(),
                }),
                Err(source) => Err(TokenError::FileUnreadable {
                    backend,
                    path: path.clone(),
                    source,
                }),
            };
        }
        Ok(None)
    }
}

/// A backend's connection token could not be read. The token itself never appears here.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// `token_env` names a variable that is not set.
    #[error("backend {backend:?}: environment variable {var} is not set")]
    EnvUnset {
        /// Backend name.
        backend: String,
        /// The variable.
        var: String,
    },
    /// `token_env` names a variable that is empty.
    #[error("backend {backend:?}: environment variable {var} is empty")]
    EnvEmpty {
        /// Backend name.
        backend: String,
        /// The variable.
        var: String,
    },
    /// `token_file` is empty.
    #[error("backend {backend:?}: token file {} is empty", path.display())]
    FileEmpty {
        /// Backend name.
        backend: String,
        /// The file.
        path: std::path::PathBuf,
    },
    /// `token_file` cannot be read.
    #[error("backend {backend:?}: cannot read token file {}: {source}", path.display())]
    FileUnreadable {
        /// Backend name.
        backend: String,
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}
