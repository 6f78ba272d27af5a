//! YAML configuration: parsing (serde-saphyr, unknown fields rejected), defaults, and
//! validation with line numbers.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::HashSet;
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

/// Why a duration setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// No number where one was expected.
    #[error("invalid duration {0:?} (use e.g. 500ms, 2s, 5m, 1h)")]
    Invalid(String),
    /// A unit other than us, ms, s, m, h.
    #[error("invalid duration unit in {0:?} (use us, ms, s, m or h)")]
    Unit(String),
    /// The number times its unit does not fit in a `Duration`.
    #[error("duration {0:?} is too long")]
    Overflow(String),
    /// Longer than [`MAX_DURATION`].
    #[error("duration {0:?} is longer than the maximum of 365 days")]
    OverMax(Duration),
}

/// Why an address setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// No `:port`.
    #[error("{0:?} must be host:port")]
    NotHostPort(String),
    /// Empty, or holds `/` or a space.
    #[error("{0:?} has an invalid host")]
    Host(String),
    /// Not a number from 0 to 65535.
    #[error("{0:?} has an invalid port")]
    Port(String),
}

/// A duration written as `200us`, `500ms`, `2s`, `1m`, `1h`, or a bare number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub Duration);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let d = match Raw::deserialize(d)? {
            Raw::N(n) => Duration::from_millis(n),
            Raw::S(s) => parse_duration(&s).map_err(de::Error::custom)?,
        };
        if d > MAX_DURATION {
            return Err(de::Error::custom(DurationError::OverMax(d)));
        }
        Ok(Millis(d))
    }
}

/// The longest duration a setting may take. Deadlines are `now + setting`; beyond a year no
/// timeout means anything, and near `u64::MAX` seconds the addition would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `now + d`, never overflowing: a setting built in code can exceed [`MAX_DURATION`].
pub fn deadline_after(d: Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_add(d.min(MAX_DURATION)).unwrap_or(now)
}

/// Parses `250ms`, `3s`, `2m`, `1h` (or bare milliseconds).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| DurationError::Invalid(s.into()))?;
    let d = match unit.trim() {
        "us" | "µs" => Duration::from_micros(n),
        "" | "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "h" => {
            let unit_secs = if unit.trim() == "m" { 60 } else { 3600 };
            Duration::from_secs(
                n.checked_mul(unit_secs)
                    .ok_or_else(|| DurationError::Overflow(s.into()))?,
            )
        }
        _ => return Err(DurationError::Unit(s.into())),
    };
    Ok(d)
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
    /// Cap on its live sessions.
    #[serde(default)]
    pub max_sessions: Option<u64>,
    /// Delete its sessions this long after creation (off by default).
    #[serde(default)]
    pub max_session_age: Option<Millis>,
    /// Delete its sessions after this long without a request (off by default).
    #[serde(default)]
    pub max_idle: Option<Millis>,
    /// Backends allowed to serve it; empty means all.
    #[serde(default)]
    pub backends: Vec<String>,
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
}

fn default_bounded_load() -> f64 {
    1.25
}

impl Default for BalancingConfig {
    fn default() -> Self {
        BalancingConfig {
            bounded_load: default_bounded_load(),
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
}

fn spanned<T>(value: T) -> Spanned<T> {
    Spanned {
        value,
        referenced: serde_saphyr::Location::UNKNOWN,
        defined: serde_saphyr::Location::UNKNOWN,
    }
}

impl Config {
    /// Parses YAML text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg: Config = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    /// Applies command-line overrides and validates again.
    pub fn apply(mut self, o: &Overrides, origin: &str) -> Result<Config, ConfigError> {
        if let (Some(l), Some(first)) = (&o.listen, self.listeners.first_mut()) {
            // Keep the listener's mode and TLS; only its address changes.
            first.listen = spanned(l.clone());
        } else if let Some(l) = &o.listen {
            self.listeners = vec![ListenerConfig {
                name: Some("main".into()),
                listen: spanned(l.clone()),
                mode: ListenerMode::Jsonrpc,
                tls: None,
                upstream: None,
                allow_non_loopback: false,
            }];
        }
        if !o.backends.is_empty() {
            self.backends = o
                .backends
                .iter()
                .map(|a| BackendConfig {
                    name: None,
                    address: spanned(a.clone()),
                    weight: 1.0,
                    max_sessions: None,
                    token_env: None,
                    token_file: None,
                    drain: false,
                    tls: None,
                })
                .collect();
        }
        if let Some(a) = &o.admin {
            let token_env = self.admin.take().and_then(|a| a.token_env);
            self.admin = Some(AdminConfig {
                listen: spanned(a.clone()),
                token_env,
            });
        }
        self.validate(origin)?;
        Ok(self)
    }

    /// Checks everything serde cannot: addresses, duplicates, ranges, token sources.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let at = |s: &Spanned<String>| {
            let l = s.referenced;
            if l == serde_saphyr::Location::UNKNOWN {
                "command line".to_string()
            } else {
                format!("line {}, column {}", l.line(), l.column())
            }
        };
        for l in &self.listeners {
            if let Err(e) = check_addr(&l.listen.value) {
                problems.push(format!("{}: listeners[].listen {e}", at(&l.listen)));
            }
            let w = at(&l.listen);
            match l.mode {
                ListenerMode::Tcp => match &l.upstream {
                    None => problems.push(format!(
                        "{w}: a tcp (sidecar) listener needs upstream.address"
                    )),
                    Some(u) => {
                        if let Err(e) = check_addr(&u.address.value) {
                            problems.push(format!("{}: upstream.address {e}", at(&u.address)));
                        }
                        if !l.allow_non_loopback && !is_loopback(&l.listen.value) {
                            problems.push(format!("{w}: a tcp (sidecar) listener forwards plain TCP; listen on 127.0.0.1 or ::1, or set allow_non_loopback: true"));
                        }
                    }
                },
                ListenerMode::Jsonrpc => {
                    if l.upstream.is_some() {
                        problems.push(format!("{w}: upstream is only for mode: tcp"));
                    }
                }
            }
            if let Some(t) = &l.tls {
                if t.client_auth != ClientAuth::None && t.client_ca.is_none() {
                    problems.push(format!(
                        "{w}: tls.client_auth {:?} needs tls.client_ca",
                        t.client_auth
                    ));
                }
            }
        }
        let mut tenant_names = HashSet::new();
        for t in &self.tenants {
            let w = at(&t.name);
            if !tenant_names.insert(t.name.value.clone()) {
                problems.push(format!("{w}: duplicate tenant name {:?}", t.name.value));
            }
            if t.token_hashes.is_empty() && t.identities.is_empty() {
                problems.push(format!(
                    "{w}: tenant {:?} needs token_hashes and/or identities",
                    t.name.value
                ));
            }
            for h in &t.token_hashes {
                let ok = h
                    .strip_prefix("sha256:")
                    .is_some_and(|x| x.len() == 64 && x.bytes().all(|b| b.is_ascii_hexdigit()));
                if !ok {
                    problems.push(format!("{w}: tenant {:?}: token hash {h:?} is not sha256:<64 hex> (use `copilot-lb hash-token`; plaintext tokens never go in YAML)", t.name.value));
                }
            }
            for b in &t.backends {
                if !self.backends.iter().any(|x| x.name() == b) {
                    problems.push(format!(
                        "{w}: tenant {:?} names unknown backend {b:?}",
                        t.name.value
                    ));
                }
            }
        }
        if let Some(a) = &self.admin {
            if let Err(e) = check_addr(&a.listen.value) {
                problems.push(format!("{}: admin.listen {e}", at(&a.listen)));
            }
        }
        let mut names = HashSet::new();
        for b in &self.backends {
            if let Err(e) = check_addr(&b.address.value) {
                problems.push(format!("{}: backends[].address {e}", at(&b.address)));
            }
            let where_name = b.name.as_ref().map(&at).unwrap_or_else(|| at(&b.address));
            if b.name().is_empty() {
                problems.push(format!("{where_name}: backend name must not be empty"));
            }
            if !names.insert(b.name().to_string()) {
                problems.push(format!(
                    "{where_name}: duplicate backend name {:?} (names are the hashing key and must be unique)",
                    b.name()
                ));
            }
            if !(b.weight.is_finite() && b.weight > 0.0) {
                problems.push(format!(
                    "{}: backend {:?}: weight must be > 0",
                    at(&b.address),
                    b.name()
                ));
            }
            if b.token_env.is_some() && b.token_file.is_some() {
                problems.push(format!(
                    "{}: backend {:?}: set token_env or token_file, not both",
                    at(&b.address),
                    b.name()
                ));
            }
            if b.max_sessions == Some(0) {
                problems.push(format!(
                    "{}: backend {:?}: max_sessions must be >= 1",
                    at(&b.address),
                    b.name()
                ));
            }
        }
        if !(self.balancing.bounded_load.is_finite() && self.balancing.bounded_load >= 1.0) {
            problems.push(format!(
                "balancing.bounded_load must be >= 1.0 (got {})",
                self.balancing.bounded_load
            ));
        }
        if self.limits.max_frame_bytes < 1024 {
            problems.push("limits.max_frame_bytes must be at least 1024".into());
        }
        if self.limits.max_header_bytes < 64 {
            problems.push("limits.max_header_bytes must be at least 64".into());
        }
        if self.limits.max_connections == 0 {
            problems.push("limits.max_connections must be at least 1".into());
        }
        if self.sessions.policy() == FailoverPolicy::Reassign && !self.sessions.shared_storage {
            problems.push("sessions.failover: reassign needs sessions.shared_storage: true (a session cannot be resumed on a backend that cannot read its state)".into());
        }
        if self.limits.max_queued_reply_bytes == 0
            || self.limits.max_queued_reply_bytes > u32::MAX as usize
        {
            problems.push("limits.max_queued_reply_bytes must be between 1 and 4294967295".into());
        }
        if self.health.rise == 0 || self.health.fall == 0 {
            problems.push("health.rise and health.fall must be at least 1".into());
        }
        if self.health.interval.0.is_zero() || self.health.timeout.0.is_zero() {
            problems.push("health.interval and health.timeout must be positive".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: origin.to_string(),
                problems,
            })
        }
    }

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

/// Checks `host:port` shape (names are resolved at connect time).
pub fn check_addr(a: &str) -> Result<(), AddrError> {
    if a.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| AddrError::NotHostPort(a.into()))?;
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(AddrError::Host(a.into()));
    }
    port.parse::<u16>().map_err(|_| AddrError::Port(a.into()))?;
    Ok(())
}

/// Whether a listen address is loopback (127.0.0.0/8, ::1 or localhost).
pub fn is_loopback(a: &str) -> bool {
    if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
        return sa.ip().is_loopback();
    }
    a.rsplit_once(':').is_some_and(|(h, _)| h == "localhost")
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
    use super::*;

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
