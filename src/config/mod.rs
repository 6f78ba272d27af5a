//! YAML configuration: parsing (serde-saphyr, unknown fields rejected), defaults, and
//! validation with line numbers.

mod load;
mod values;

pub(crate) use load::sentinel_node;
pub use load::TokenError;
pub use values::{
    check_addr, deadline_after, is_loopback, parse_duration, AddrError, DurationError, Millis,
    MAX_DURATION,
};

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Which store holds the session registry.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StateKind {
    /// A redb file of this process's own: one replica, durable across restarts.
    #[default]
    Embedded,
    /// A Redis server shared by every replica of a fleet.
    Redis,
    /// Memory only: ownership is lost on restart (then every old session is refused).
    Memory,
}

/// Where the session registry lives (`state:`).
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `embedded` (default), `redis` or `memory`.
    #[serde(default)]
    pub kind: StateKind,
    /// Embedded: the file (default `copilot-lb-state.redb` in the working directory).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Redis: `redis://host:port/db` or `rediss://` for TLS; no password in it (see below).
    #[serde(default)]
    pub url: Option<String>,
    /// Redis: find the master through Redis Sentinel instead of a fixed `url`.
    #[serde(default)]
    pub sentinel: Option<Spanned<SentinelConfig>>,
    /// Redis: read the URL from this environment variable instead.
    #[serde(default)]
    pub url_env: Option<String>,
    /// Redis: the password, from this environment variable.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Redis: the password, from this file (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Redis: prefix of every key and of the announcement channel (default `copilot-lb:`).
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// Bound on every registry operation (default 500 ms for Redis, 5 s embedded).
    #[serde(default)]
    pub timeout: Option<Millis>,
    /// How often a replica writes last-used times and re-asserts what it holds (default 5 s).
    #[serde(default)]
    pub sync_interval: Option<Millis>,
    /// Redis: how long the hygiene lease outlives its holder's last renewal (default 15 s).
    #[serde(default)]
    pub lease_ttl: Option<Millis>,
}

/// `state.sentinel`: the sentinels that name the current master of a Redis replication group.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the master under (`sentinel monitor <name> ...`).
    pub master_name: String,
    /// The sentinels, `host:port` each; asked in this order.
    pub nodes: Vec<String>,
    /// The sentinels' own password (their `requirepass`), from this environment variable.
    /// The data nodes' password is `state.password_env` / `state.password_file`.
    #[serde(default)]
    pub password_env: Option<String>,
    /// The sentinels' own password, from this file (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// Why a Redis setting could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateSecretError {
    /// Neither `url` nor `url_env` is set.
    #[error("state.kind redis needs url or url_env")]
    NoUrl,
    /// The named environment variable is not set.
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    /// The password file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl StateConfig {
    /// Default embedded file.
    pub const DEFAULT_PATH: &'static str = "copilot-lb-state.redb";

    /// The embedded store's file.
    pub fn embedded_path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| PathBuf::from(Self::DEFAULT_PATH))
    }

    /// Bound on each registry operation: 500 ms for Redis (a round trip on a LAN), 5 s for
    /// the embedded file, whose writes are fsyncs (hundreds of milliseconds on a disk another
    /// process writes heavily).
    pub fn timeout(&self) -> Duration {
        self.timeout.map(|m| m.0).unwrap_or(match self.kind {
            StateKind::Redis => Duration::from_millis(500),
            _ => Duration::from_secs(5),
        })
    }

    /// Interval of the sync loop.
    pub fn sync_interval(&self) -> Duration {
        self.sync_interval
            .map(|m| m.0)
            .unwrap_or(Duration::from_secs(5))
    }

    /// Redis: how long the hygiene reaper's lease lasts without a renewal (default 15 s): a
    /// holder that stalls or dies loses it this long after its last renewal.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
            .map(|m| m.0)
            .unwrap_or(Duration::from_secs(15))
    }

    /// Prefix of every Redis key.
    pub fn key_prefix(&self) -> &str {
        self.key_prefix.as_deref().unwrap_or("copilot-lb:")
    }

    /// The Redis URL, from the file or the environment.
    pub fn redis_url(&self) -> Result<String, StateSecretError> {
        match (&self.url, &self.url_env) {
            (Some(u), _) => Ok(u.clone()),
            (None, Some(var)) => {
                std::env::var(var).map_err(|_| StateSecretError::MissingEnv(var.clone()))
            }
            (None, None) => Err(StateSecretError::NoUrl),
        }
    }

    /// The Redis password (of the data nodes), if one is configured.
    pub fn redis_password(&self) -> Result<Option<String>, StateSecretError> {
        read_secret(self.password_env.as_deref(), self.password_file.as_deref())
    }

    /// The sentinels' own password, if one is configured.
    pub fn sentinel_password(&self) -> Result<Option<String>, StateSecretError> {
        match &self.sentinel {
            Some(s) => read_secret(
                s.value.password_env.as_deref(),
                s.value.password_file.as_deref(),
            ),
            None => Ok(None),
        }
    }
}

/// A secret from an environment variable or a file (trailing newline ignored).
fn read_secret(env: Option<&str>, file: Option<&Path>) -> Result<Option<String>, StateSecretError> {
    if let Some(var) = env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| StateSecretError::MissingEnv(var.to_string()));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| StateSecretError::File {
            path: path.display().to_string(),
            source,
        })?;
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
    }
    Ok(None)
}

/// Additions to the routing table, which refuses every method it does not list: methods a
/// newer CLI added, or a CLI's own extensions, that this deployment wants forwarded.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Forwarded to any healthy backend (routed by `params.sessionId`, ownership checked,
    /// when the request carries one). Also accepts the table's host-state methods.
    #[serde(default)]
    pub allow_global: Vec<String>,
    /// Session-scoped: routed by `params.sessionId`, which the request must carry.
    #[serde(default)]
    pub allow_session: Vec<String>,
}

impl RoutingConfig {
    /// How `method` is allowed, if it is. Linear: asked only for methods the table refuses,
    /// and the lists are a handful of names.
    pub(crate) fn allowance(&self, method: &str) -> Option<crate::route::Allowed> {
        if self.allow_session.iter().any(|m| m == method) {
            Some(crate::route::Allowed::Session)
        } else if self.allow_global.iter().any(|m| m == method) {
            Some(crate::route::Allowed::Global)
        } else {
            None
        }
    }
}

/// How the data path is run.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Event-loop threads serving client connections; 0 means one per CPU.
    #[serde(default)]
    pub threads: usize,
    /// After the last frame, keep polling sockets this long instead of sleeping; 0 is off.
    #[serde(default)]
    pub busy_poll: Option<Millis>,
}

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

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Session-aware JSON-RPC proxy.
    #[default]
    Jsonrpc,
    /// Byte pass-through to `upstream` (the sidecar in front of an SDK app).
    Tcp,
}

/// Client certificate policy of a TLS listener.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificates asked for.
    #[default]
    None,
    /// Verified when presented, not required.
    Optional,
    /// Required and verified against `client_ca`.
    Required,
}

/// Server-side TLS for a listener.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Client certificate policy.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// PEM CA bundle that client certificates must chain to.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// Client-side TLS (sidecar to edge, proxy to backend).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// PEM CA bundle that the server certificate must chain to.
    pub ca: PathBuf,
    /// PEM client certificate chain (for mutual TLS).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM client private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name to verify in the server certificate (default: the upstream host).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Where a tcp-mode listener forwards.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` of the copilot-lb edge.
    pub address: Spanned<String>,
    /// TLS to the edge (normally with a client certificate).
    #[serde(default)]
    pub tls: Option<ClientTlsConfig>,
}

/// A tenant: who it is, what it may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Name (the owner recorded on its sessions).
    pub name: Spanned<String>,
    /// `sha256:<hex>` hashes of its `connect` tokens (`copilot-lb hash-token`).
    #[serde(default)]
    pub token_hashes: Vec<String>,
    /// Client-certificate identity patterns (URI SAN, DNS SAN or CN; `*` wildcards).
    #[serde(default)]
    pub identities: Vec<String>,
    /// Session ids it may create (`*` wildcards); empty means any.
    #[serde(default)]
    pub session_patterns: Vec<String>,
    /// Cap on its live sessions (create, resume, open and attach all count).
    #[serde(default)]
    pub max_sessions: Option<u64>,
    /// Whether it may take ownership of a session id the proxy has no record of (a migration
    /// from a direct CLI, or sessions made before the proxy kept records). Off by default:
    /// an unknown session belongs to nobody.
    #[serde(default)]
    pub adopt_unknown: bool,
    /// Delete its sessions this long after creation (off by default).
    #[serde(default)]
    pub max_session_age: Option<Millis>,
    /// Delete its sessions after this long without a request (off by default).
    #[serde(default)]
    pub max_idle: Option<Millis>,
    /// Backends allowed to serve it; empty means all.
    #[serde(default)]
    pub backends: Vec<String>,
    /// Which tools its sessions may use, whatever its clients ask for.
    #[serde(default)]
    pub tools: ToolsConfig,
    /// Whether it may run commands on the CLI host: the CLI's shell tools, `session.shell.*`
    /// and the other host-level session methods, and local MCP servers. Off by default.
    #[serde(default)]
    pub allow_shell: bool,
    /// Rate limit on its requests that go to a backend, shared by all its connections on
    /// this replica (`connect`, `ping` and other requests the proxy answers itself are free).
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Cap on its turns in progress on this replica (`session.send`, `sendMessages`,
    /// `sendAndWait`, from the send until the session's turn ends).
    #[serde(default)]
    pub max_concurrent_turns: Option<u64>,
}

/// A tenant's tool policy. Entries are tool names (`view`), or qualified by source
/// (`builtin:view`, `mcp:search`, `custom:lookup`), or a whole source (`mcp:*`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsConfig {
    /// The only tools its sessions may have; absent means any tool not denied.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Tools its sessions never have.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// A token bucket: `requests_per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate (fractions allowed: 0.5 is one request every 2 s).
    pub requests_per_second: f64,
    /// Requests that may come at once after a quiet spell (default: the rate, at least 1).
    #[serde(default)]
    pub burst: Option<u64>,
}

impl RateLimitConfig {
    /// The burst in force.
    pub fn burst(&self) -> u64 {
        self.burst
            .unwrap_or(self.requests_per_second.ceil().max(1.0) as u64)
    }
}

/// One listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs and metrics.
    #[serde(default)]
    pub name: Option<String>,
    /// `host:port` to bind.
    pub listen: Spanned<String>,
    /// Listener mode.
    #[serde(default)]
    pub mode: ListenerMode,
    /// TLS towards clients.
    #[serde(default)]
    pub tls: Option<ServerTlsConfig>,
    /// tcp mode: the edge to forward to.
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    /// tcp mode: allow a non-loopback listen address (plain TCP leaves the host).
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// SO_REUSEPORT (default on, as HAProxy does): a new copilot-lb process can bind the same
    /// address while the old one drains, so a restart on one host never refuses a connection.
    #[serde(default = "yes")]
    pub reuse_port: bool,
}

fn yes() -> bool {
    true
}

/// Admin endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `host:port`; loopback by default in the examples.
    pub listen: Spanned<String>,
    /// Environment variable holding a bearer token required by the mutating routes
    /// (drain, undrain, reload, delete). Reads (health, metrics, lists) stay open for probes.
    #[serde(default)]
    pub token_env: Option<String>,
    /// The read-only `/api/*` lists (backends, sessions with their owners, registry) need the
    /// token too; `/livez`, `/readyz` and `/metrics` stay open for probes and Prometheus.
    #[serde(default)]
    pub protect_reads: bool,
}

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

/// Resource limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame body accepted from either side, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Largest header block, in bytes.
    #[serde(default = "default_max_header")]
    pub max_header_bytes: usize,
    /// Concurrent client connections; further ones wait in the accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TCP connect timeout towards backends.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Millis,
    /// Time a backend has to answer the proxy's own `connect`.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Millis,
    /// On SIGTERM, the absolute deadline for in-flight requests before connections are cut.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Millis,
    /// Deepest nesting of arrays and objects accepted in a client frame (serde_json's own
    /// limit is 128); deeper frames get -32700 from the proxy and never reach a backend.
    #[serde(default = "default_max_json_depth")]
    pub max_json_depth: usize,
    /// Bytes of replies and events that may wait for one client to read them; past that the
    /// client's own links stop reading (backpressure to the CLI), so a client that does not
    /// read costs bounded memory. A frame larger than this waits alone.
    #[serde(default = "default_max_queued_reply_bytes")]
    pub max_queued_reply_bytes: usize,
}

fn default_max_queued_reply_bytes() -> usize {
    64 * 1024 * 1024
}

fn default_max_json_depth() -> usize {
    128
}

fn default_shutdown_timeout() -> Millis {
    Millis(Duration::from_secs(30))
}

fn default_max_frame() -> usize {
    crate::codec::DEFAULT_MAX_FRAME_BYTES
}
fn default_max_header() -> usize {
    crate::codec::DEFAULT_MAX_HEADER_BYTES
}
fn default_max_connections() -> usize {
    10_000
}
fn default_connect_timeout() -> Millis {
    Millis(Duration::from_secs(3))
}
fn default_handshake_timeout() -> Millis {
    Millis(Duration::from_secs(5))
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: default_max_frame(),
            max_header_bytes: default_max_header(),
            max_connections: default_max_connections(),
            connect_timeout: default_connect_timeout(),
            handshake_timeout: default_handshake_timeout(),
            shutdown_timeout: default_shutdown_timeout(),
            max_json_depth: default_max_json_depth(),
            max_queued_reply_bytes: default_max_queued_reply_bytes(),
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

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `copilot_lb=debug`; `RUST_LOG` wins if set.
    #[serde(default)]
    pub level: Option<String>,
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_sentinel_block_is_checked_and_exclusive_with_url() {
        let ok = Config::from_yaml(
            "state:\n  kind: redis\n  sentinel: {master_name: mymaster, nodes: [\"127.0.0.1:26379\", \"[::1]:26380\"]}\n",
            "t",
        )
        .unwrap();
        let s = &ok.state.sentinel.as_ref().unwrap().value;
        assert_eq!((s.master_name.as_str(), s.nodes.len()), ("mymaster", 2));
        assert_eq!(sentinel_node("[::1]:26380").unwrap(), ("::1".into(), 26380));
        for (bad, says) in [
            (
                "  url: redis://127.0.0.1:6379/0\n  sentinel: {master_name: m, nodes: [\"h:1\"]}\n",
                "line 4, column 13: state.sentinel and state.url/url_env are exclusive",
            ),
            (
                "  url_env: X\n  sentinel: {master_name: m, nodes: [\"h:1\"]}\n",
                "state.sentinel and state.url/url_env are exclusive",
            ),
            ("  sentinel: {master_name: m, nodes: []}\n", "at least one sentinel"),
            ("  sentinel: {master_name: \"\", nodes: [\"h:1\"]}\n", "master_name must not be empty"),
            ("  sentinel: {master_name: m, nodes: [\"redis://h:1\"]}\n", "no scheme"),
            ("  sentinel: {master_name: m, nodes: [\"u:pw@h:1\"]}\n", "no credentials"),
            ("  sentinel: {master_name: m, nodes: [\"h:0\"]}\n", "no valid port"),
            ("  sentinel: {master_name: m, nodes: [\"h\"]}\n", "must be host:port"),
            (
                "  sentinel: {master_name: m, nodes: [\"h:1\"], password_env: A, password_file: /p}\n",
                "state.sentinel: give password_env or password_file, not both",
            ),
            ("  sentinel: {master_name: m, nodes: [\"h:1\"], url: x}\n", "unknown field"),
            ("  sentinel: {nodes: [\"h:1\"]}\n", "master_name"),
            ("", "needs url (or url_env, or sentinel)"),
        ] {
            let yaml = format!("state:\n  kind: redis\n{bad}");
            let e = Config::from_yaml(&yaml, "t").unwrap_err().to_string();
            assert!(e.contains(says), "{yaml}: {e}");
        }
        let e = Config::from_yaml(
            "state:\n  kind: embedded\n  sentinel: {master_name: m, nodes: [\"h:1\"]}\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("state.sentinel is a redis setting"), "{e}");
    }

    #[test]
    fn the_data_nodes_and_the_sentinels_passwords_come_from_their_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let (data, sent) = (dir.path().join("d"), dir.path().join("s"));
        std::fs::write(&data, "data-pw\n").unwrap();
        std::fs::write(&sent, "sentinel-pw\n").unwrap();
        let yaml = format!(
            "state:\n  kind: redis\n  password_file: {}\n  sentinel: {{master_name: m, nodes: [\"h:1\"], password_file: {}}}\n",
            data.display(),
            sent.display()
        );
        let c = Config::from_yaml(&yaml, "t").unwrap();
        assert_eq!(
            c.state.redis_password().unwrap().as_deref(),
            Some("data-pw")
        );
        assert_eq!(
            c.state.sentinel_password().unwrap().as_deref(),
            Some("sentinel-pw")
        );
        // A missing secret is an error at start-up, not a connection without a password.
        std::fs::remove_file(&sent).unwrap();
        assert!(c.state.sentinel_password().is_err());
        assert!(crate::registry::RedisStore::new(&c.state).is_err());
    }

    #[test]
    fn hygiene_interval_and_lease_ttl_are_checked_together() {
        let redis = "state: {kind: redis, url: \"redis://127.0.0.1:1/0\"";
        let ok = Config::from_yaml(&format!("{redis}}}\n"), "t").unwrap();
        assert_eq!(ok.sessions.hygiene_interval(), Duration::from_secs(5));
        assert_eq!(ok.state.lease_ttl(), Duration::from_secs(15));
        for (bad, why) in [
            (
                "sessions: {hygiene_interval: 200ms}\n".to_string(),
                "at least 1s",
            ),
            (
                format!("sessions: {{hygiene_interval: 10s}}\n{redis}, lease_ttl: 10s}}\n"),
                "longer than sessions.hygiene_interval",
            ),
            (
                "state: {kind: embedded, lease_ttl: 30s}\n".to_string(),
                "redis setting",
            ),
        ] {
            let e = Config::from_yaml(&bad, "t").unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    use super::*;

    #[test]
    fn protected_reads_need_a_token_and_survive_the_admin_flag() {
        let e = Config::from_yaml(
            "admin: {listen: 127.0.0.1:9464, protect_reads: true}\n",
            "t.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("admin.protect_reads needs admin.token_env") && e.contains("line 1"),
            "{e}"
        );
        let c = Config::from_yaml(
            "admin: {listen: 127.0.0.1:9464, token_env: T, protect_reads: true}\n",
            "t.yaml",
        )
        .unwrap();
        let o = Overrides {
            admin: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        };
        let a = c.apply(&o, "t.yaml").unwrap().admin.unwrap();
        assert!(a.protect_reads && a.token_env.as_deref() == Some("T"));
    }

    #[test]
    fn huge_durations_are_refused_with_their_place() {
        for bad in [
            "limits:\n  shutdown_timeout: 18446744073709551615\n",
            "limits:\n  shutdown_timeout: 9999999999999999h\n",
            "health:\n  interval: 400d\n",
            "sessions:\n  detect_timeout: 8784h\n",
        ] {
            let e = Config::from_yaml(bad, "t.yaml").unwrap_err().to_string();
            assert!(e.contains("line 2"), "{bad}: {e}");
        }
        let ok = Config::from_yaml("limits:\n  shutdown_timeout: 8760h\n", "t.yaml").unwrap();
        assert_eq!(ok.limits.shutdown_timeout.0, MAX_DURATION);
    }

    #[test]
    fn minimal_and_defaults() {
        let c = Config::from_yaml(
            "listeners:\n  - listen: 127.0.0.1:4321\nbackends:\n  - address: 127.0.0.1:41001\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.balancing.bounded_load, 1.25);
        assert_eq!(c.backends[0].name(), "127.0.0.1:41001");
        assert_eq!(c.health.fall, 3);
    }

    #[test]
    fn tenant_tool_policies_are_checked() {
        let yaml = |tools: &str| {
            format!(
                "tenants:\n  - name: a\n    token_hashes: [\"sha256:{}\"]\n    tools: {tools}\n",
                "0".repeat(64)
            )
        };
        let c = Config::from_yaml(
            &yaml("{allow: [view, builtin:grep, mcp:*], deny: [web_fetch]}"),
            "t",
        )
        .unwrap();
        assert_eq!(c.tenants[0].tools.deny, ["web_fetch"]);
        assert!(!c.tenants[0].allow_shell, "host access is off by default");
        for (bad, why) in [
            (
                "{allow: [\"ba*\"]}",
                "tools.allow entry \"ba*\" is a pattern",
            ),
            ("{deny: [\"*\"]}", "tools.deny entry \"*\" is a pattern"),
            ("{deny: [\"shell:bash\"]}", "unknown source"),
            ("{allow: [\"\"]}", "is not a tool name"),
            ("{deny: [\"mcp:\"]}", "is not a tool name"),
        ] {
            let e = Config::from_yaml(&yaml(bad), "t").unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("line 2"), "{bad}: {e}");
        }
        let e = Config::from_yaml(&yaml("{allowed: [view]}"), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allowed"), "{e}");
    }

    #[test]
    fn noisy_neighbour_limits_parse_and_validate() {
        let h = format!("sha256:{}", "0".repeat(64));
        let ok = format!("backends:\n  - address: 127.0.0.1:1\n    max_concurrent_turns: 4\ntenants:\n  - name: b\n    token_hashes: [\"{h}\"]\n    rate_limit: {{requests_per_second: 2.5}}\n    max_concurrent_turns: 3\n");
        let c = Config::from_yaml(&ok, "t").unwrap();
        let r = c.tenants[0].rate_limit.as_ref().unwrap();
        assert_eq!((r.requests_per_second, r.burst()), (2.5, 3));
        assert_eq!(c.tenants[0].max_concurrent_turns, Some(3));
        assert_eq!(c.backends[0].max_concurrent_turns, Some(4));
        assert_eq!(c.balancing.max_waiting_turns, 64);
        for (bad, says) in [
            (
                "rate_limit: {requests_per_second: 0}",
                "requests_per_second must be > 0",
            ),
            (
                "rate_limit: {requests_per_second: 1, burst: 0}",
                "burst must be >= 1",
            ),
            (
                "max_concurrent_turns: 0",
                "max_concurrent_turns must be >= 1",
            ),
        ] {
            let y = format!("tenants:\n  - name: b\n    token_hashes: [\"{h}\"]\n    {bad}\n");
            let e = Config::from_yaml(&y, "t").unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("line 2"), "{bad}: {e}");
        }
    }

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

    #[test]
    fn unknown_field_is_rejected_with_line() {
        let err = Config::from_yaml("backends:\n  - address: 127.0.0.1:1\n    wieght: 2\n", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("wieght"), "{err}");
        assert!(err.contains('3'), "{err}");
    }

    #[test]
    fn semantic_errors_carry_lines() {
        let err = Config::from_yaml(
            "backends:\n  - address: 127.0.0.1:1\n  - address: nope\n  - address: 127.0.0.1:1\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("duplicate backend name"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1500").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("200us").unwrap(), Duration::from_micros(200));
        assert_eq!(parse_duration("50µs").unwrap(), Duration::from_micros(50));
        // Too many digits for a u64 is not a number; a u64 times its unit may not fit.
        assert!(matches!(
            parse_duration("99999999999999999999h"),
            Err(DurationError::Invalid(_))
        ));
        assert!(matches!(
            parse_duration("9999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("18446744073709551615m"),
            Err(DurationError::Overflow(_))
        ));
        assert_eq!(
            parse_duration("2 weeks").unwrap_err().to_string(),
            "invalid duration unit in \"2 weeks\" (use us, ms, s, m or h)"
        );
        assert_eq!(
            parse_duration("soon").unwrap_err().to_string(),
            "invalid duration \"soon\" (use e.g. 500ms, 2s, 5m, 1h)"
        );
        let c = Config::from_yaml("health:\n  interval: 250ms\n  timeout: 1s\n", "t").unwrap();
        assert_eq!(c.health.interval.0, Duration::from_millis(250));
    }

    #[test]
    fn addresses() {
        assert_eq!(check_addr("127.0.0.1:1"), Ok(()));
        assert_eq!(check_addr("[::1]:80"), Ok(()));
        assert_eq!(check_addr("cli-1.internal:4321"), Ok(()));
        assert_eq!(
            check_addr("nope"),
            Err(AddrError::NotHostPort("nope".into()))
        );
        assert_eq!(check_addr(":80"), Err(AddrError::Host(":80".into())));
        assert_eq!(check_addr("a b:80"), Err(AddrError::Host("a b:80".into())));
        assert_eq!(
            check_addr("h:99999"),
            Err(AddrError::Port("h:99999".into()))
        );
        assert_eq!(
            check_addr("nope").unwrap_err().to_string(),
            "\"nope\" must be host:port"
        );
    }

    #[test]
    fn overrides_stand_in_for_file() {
        let o = Overrides {
            listen: Some("127.0.0.1:4321".into()),
            backends: vec!["127.0.0.1:41001".into(), "127.0.0.1:41002".into()],
            admin: None,
            state_path: None,
        };
        let c = Config::default().apply(&o, "flags").unwrap();
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.listeners[0].listen.value, "127.0.0.1:4321");
        let bad = Overrides {
            backends: vec!["nope".into()],
            ..Default::default()
        };
        assert!(Config::default()
            .apply(&bad, "flags")
            .unwrap_err()
            .to_string()
            .contains("command line"));
    }
}
