//! YAML configuration: parsing (serde-saphyr, unknown fields rejected), defaults, and
//! validation with line numbers.
//!
//! This file holds the whole file's shape ([`Config`]) and the errors; each section's types,
//! defaults and checks live in a file of their own, and `load.rs` reads a file and checks
//! what spans sections. Everything is re-exported here, so callers name `crate::config::X`.

mod backends;
mod limits;
mod listeners;
mod load;
mod managed;
mod routing;
mod sessions;
mod state;
mod tenants;
mod values;

pub use backends::{BackendConfig, BalancingConfig, HealthConfig, TokenError};
pub use limits::{LimitsConfig, LogConfig, LogFormat, RuntimeConfig};
pub use listeners::{
    AdminConfig, ClientAuth, ClientTlsConfig, ListenerConfig, ListenerMode, ServerTlsConfig,
    UpstreamConfig,
};
pub use managed::{ManagedConfig, MANAGED_RESERVED_ENV};
pub use routing::RoutingConfig;
pub use sessions::{FailoverPolicy, SessionsConfig};
pub(crate) use state::sentinel_node;
pub use state::{SentinelConfig, StateConfig, StateKind, StateSecretError};
pub use tenants::{RateLimitConfig, TenantConfig, ToolsConfig};
pub use values::{
    check_addr, deadline_after, is_loopback, parse_duration, AddrError, DurationError, Millis,
    MAX_DURATION,
};

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::path::PathBuf;

/// Where `copilot-lb serve` looks for a config when given none, in order.
pub const DEFAULT_CONFIG_PATHS: &[&str] =
    &["config/copilot-lb.yaml", "/etc/copilot-lb/copilot-lb.yaml"];

/// Configuration errors, each pointing at the file and, where known, the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// YAML syntax or type error (the message carries line and column).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// serde-saphyr's message with a snippet.
        message: String,
    },
    /// Semantic errors found after parsing.
    #[error("{path}: invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        path: String,
        /// One line per problem.
        problems: Vec<String>,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client-facing listeners.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Admin HTTP endpoint (health, metrics, API).
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Copilot CLI backends.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Placement policy.
    #[serde(default)]
    pub balancing: BalancingConfig,
    /// Resource limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Active health checking.
    #[serde(default)]
    pub health: HealthConfig,
    /// Session storage and failover policy.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// Tenants; none means one open tenant and no client authentication.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Event-loop threads and busy polling (read at start-up only).
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// The session registry: who owns each session and where it lives (read at start-up).
    #[serde(default)]
    pub state: StateConfig,
    /// Methods the routing table does not forward that an operator allows anyway.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// CLI servers copilot-lb starts and supervises itself (read at start-up only).
    #[serde(default)]
    pub managed: Option<ManagedConfig>,
}

/// Command-line values that override or stand in for the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replaces the first listener's address (or adds a JSON-RPC listener if there is none).
    pub listen: Option<String>,
    /// Replaces all backends.
    pub backends: Vec<String>,
    /// Replaces the admin address.
    pub admin: Option<String>,
    /// Replaces `state.path`.
    pub state_path: Option<PathBuf>,
}

pub(crate) fn spanned<T>(value: T) -> Spanned<T> {
    Spanned {
        value,
        referenced: serde_saphyr::Location::UNKNOWN,
        defined: serde_saphyr::Location::UNKNOWN,
    }
}

/// Finds the config file to use when none was given.
pub fn default_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("COPILOT_LB_CONFIG") {
        return Some(PathBuf::from(p));
    }
    DEFAULT_CONFIG_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}
