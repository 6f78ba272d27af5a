//! Loading a config: YAML with line and column in every error, command-line overrides, the
//! semantic checks, and reading backend tokens from the environment or files.

use super::*;
use serde_saphyr::Spanned;
use std::collections::HashSet;

impl Config {
    /// Parses YAML text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        if cfg.managed.is_some() {
            // The pool's CLIs share one session-state directory: failover resumes sessions.
            cfg.sessions.shared_storage = true;
        }
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
                reuse_port: true,
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
                    max_concurrent_turns: None,
                    edge: false,
                    managed: false,
                })
                .collect();
        }
        if let Some(a) = &o.admin {
            let old = self.admin.take();
            self.admin = Some(AdminConfig {
                listen: spanned(a.clone()),
                token_env: old.as_ref().and_then(|a| a.token_env.clone()),
                protect_reads: old.is_some_and(|a| a.protect_reads),
            });
        }
        if let Some(p) = &o.state_path {
            self.state.path = Some(p.clone());
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
        problems.extend(self.state.problems());
        let hygiene = self.sessions.hygiene_interval();
        if hygiene < std::time::Duration::from_secs(1) {
            problems.push("sessions.hygiene_interval must be at least 1s (each pass walks every session record)".into());
        }
        if self.state.kind == super::StateKind::Redis && self.state.lease_ttl() <= hygiene {
            problems.push(format!(
                "state.lease_ttl ({:?}) must be longer than sessions.hygiene_interval ({hygiene:?}): the lease holder renews it once per interval",
                self.state.lease_ttl()
            ));
        }
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
            let tool_lists = [
                ("allow", t.tools.allow.as_deref().unwrap_or_default()),
                ("deny", t.tools.deny.as_slice()),
            ];
            for (list, entries) in tool_lists {
                for e in entries {
                    if let Some(why) = tool_entry_problem(e) {
                        problems.push(format!(
                            "{w}: tenant {:?}: tools.{list} entry {e:?} {why}",
                            t.name.value
                        ));
                    }
                }
            }
            if let Some(r) = &t.rate_limit {
                if !(r.requests_per_second.is_finite() && r.requests_per_second > 0.0) {
                    problems.push(format!(
                        "{w}: tenant {:?}: rate_limit.requests_per_second must be > 0",
                        t.name.value
                    ));
                }
                if r.burst == Some(0) {
                    problems.push(format!(
                        "{w}: tenant {:?}: rate_limit.burst must be >= 1",
                        t.name.value
                    ));
                }
            }
            if t.max_concurrent_turns == Some(0) {
                problems.push(format!(
                    "{w}: tenant {:?}: max_concurrent_turns must be >= 1",
                    t.name.value
                ));
            }
            let managed_names = self.managed.as_ref().map(|m| m.names()).unwrap_or_default();
            for b in &t.backends {
                if !self.backends.iter().any(|x| x.name() == b) && !managed_names.contains(b) {
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
            // Deny by default: protected reads with no token would be open reads.
            if a.protect_reads && a.token_env.is_none() {
                problems.push(format!(
                    "{}: admin.protect_reads needs admin.token_env (the token it requires)",
                    at(&a.listen)
                ));
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
            if b.max_concurrent_turns == Some(0) {
                problems.push(format!(
                    "{}: backend {:?}: max_concurrent_turns must be >= 1",
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
        if self.balancing.turn_wait.0.is_zero() {
            problems.push("balancing.turn_wait must be more than 0".into());
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
        if self.backends.iter().any(|b| b.edge)
            && (self.sessions.policy() != FailoverPolicy::Reassign || !self.sessions.shared_storage)
        {
            problems.push("backends[].edge: true needs sessions.shared_storage: true and failover: reassign (edges share one registry and their CLIs' session state, so a session moves between edges by resume)".into());
        }
        if self.backends.iter().any(|b| b.edge) && self.backends.iter().any(|b| !b.edge) {
            problems.push("backends: either every backend is a copilot-lb edge (edge: true) or none is; a session cannot move between an edge and a CLI".into());
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
        self.routing.check(&mut problems);
        if let Some(m) = &self.managed {
            m.check(&self.backends, &mut problems);
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

    /// Keeps the running pool's `managed:` block across a reload: the pool is built at
    /// start-up only, so a changed, added or removed block is reported and ignored.
    pub fn keep_managed(&mut self, old: &Config) {
        let same = match (&old.managed, &self.managed) {
            (Some(o), Some(n)) => format!("{o:?}") == format!("{n:?}"),
            (None, None) => true,
            _ => false,
        };
        if !same {
            tracing::warn!("managed: changes take effect only after a restart of copilot-lb; the running pool is kept as it is");
        }
        self.managed = old.managed.clone();
        if self.managed.is_some() {
            self.sessions.shared_storage = true;
        }
    }

    /// Adds a managed pool's backends (built by its supervisor) to a validated config: the
    /// same on every reload, so the pool's CLIs never look removed.
    pub fn with_managed(mut self, backends: &[BackendConfig]) -> Config {
        if self.managed.is_some() {
            self.backends.extend(backends.iter().cloned());
            self.sessions.shared_storage = true;
        }
        self
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

/// What is wrong with a `tenants[].tools` entry, if anything. The proxy intersects these with
/// what a client asks for, so only the forms the CLI's tool filter itself knows are taken: a
/// name, `source:name`, or a whole source `source:*`.
fn tool_entry_problem(e: &str) -> Option<&'static str> {
    let (source, name) = match e.split_once(':') {
        Some((s, n)) => (Some(s), n),
        None => (None, e),
    };
    if source.is_some_and(|s| !matches!(s, "builtin" | "mcp" | "custom")) {
        return Some("has an unknown source (use builtin:, mcp: or custom:)");
    }
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("is not a tool name");
    }
    if name.contains('*') && (name != "*" || source.is_none()) {
        return Some("is a pattern; only a whole source is (builtin:*, mcp:* or custom:*)");
    }
    None
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

impl super::StateConfig {
    /// What is wrong with `state:` (settings that do not belong to its kind are refused, so a
    /// typo'd kind never silently runs on another store).
    fn problems(&self) -> Vec<String> {
        use super::StateKind;
        let mut p = Vec::new();
        let redis_only = [
            ("url", self.url.is_some()),
            ("url_env", self.url_env.is_some()),
            ("sentinel", self.sentinel.is_some()),
            ("password_env", self.password_env.is_some()),
            ("password_file", self.password_file.is_some()),
            ("key_prefix", self.key_prefix.is_some()),
            ("lease_ttl", self.lease_ttl.is_some()),
        ];
        let kind = match self.kind {
            StateKind::Embedded => "embedded",
            StateKind::Redis => "redis",
            StateKind::Memory => "memory",
        };
        if self.kind != StateKind::Redis {
            for (name, set) in redis_only {
                if set {
                    p.push(format!(
                        "state.{name} is a redis setting, but state.kind is {kind}"
                    ));
                }
            }
        }
        if self.kind != StateKind::Embedded && self.path.is_some() {
            p.push(format!(
                "state.path is an embedded setting, but state.kind is {kind}"
            ));
        }
        if self.kind == StateKind::Redis {
            if let Some(s) = &self.sentinel {
                let l = s.referenced;
                let at = if l == serde_saphyr::Location::UNKNOWN {
                    String::new()
                } else {
                    format!("line {}, column {}: ", l.line(), l.column())
                };
                if self.url.is_some() || self.url_env.is_some() {
                    p.push(format!("{at}state.sentinel and state.url/url_env are exclusive: the sentinels name the master, give one or the other"));
                }
                sentinel_problems(&s.value, &at, &mut p);
            }
            match (&self.url, &self.url_env) {
                (None, None) if self.sentinel.is_some() => {}
                (None, None) => {
                    p.push("state.kind redis needs url (or url_env, or sentinel)".into())
                }
                (Some(_), Some(_)) => p.push("state: give url or url_env, not both".into()),
                (Some(u), None) => {
                    if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                        p.push("state.url must start with redis:// or rediss://".into());
                    }
                    // A password in the URL would reach logs and the admin API with it.
                    if u.split_once("://")
                        .map(|(_, rest)| rest.split('/').next().unwrap_or("").contains('@'))
                        .unwrap_or(false)
                    {
                        p.push("state.url must not carry credentials; use password_env or password_file".into());
                    }
                }
                (None, Some(_)) => {}
            }
            if self.password_env.is_some() && self.password_file.is_some() {
                p.push("state: give password_env or password_file, not both".into());
            }
        }
        if self.timeout.is_some_and(|t| t.0.is_zero()) {
            p.push("state.timeout must be more than 0".into());
        }
        if self
            .sync_interval
            .is_some_and(|t| t.0 < std::time::Duration::from_millis(100))
        {
            p.push("state.sync_interval must be at least 100ms".into());
        }
        p
    }
}

/// What is wrong with `state.sentinel` (`at` names its line).
fn sentinel_problems(s: &super::SentinelConfig, at: &str, p: &mut Vec<String>) {
    if s.master_name.trim().is_empty() {
        p.push(format!("{at}state.sentinel.master_name must not be empty"));
    }
    if s.nodes.is_empty() {
        p.push(format!(
            "{at}state.sentinel.nodes needs at least one sentinel (host:port)"
        ));
    }
    for n in &s.nodes {
        if let Err(why) = sentinel_node(n) {
            p.push(format!("{at}state.sentinel.nodes: {n:?} {why}"));
        }
    }
    if s.password_env.is_some() && s.password_file.is_some() {
        p.push(format!(
            "{at}state.sentinel: give password_env or password_file, not both"
        ));
    }
}

/// A sentinel's address, `host:port` (`[v6]:port` too): no scheme, no credentials, since
/// the passwords come from the environment or files and the address reaches logs.
pub(crate) fn sentinel_node(n: &str) -> Result<(String, u16), &'static str> {
    if n.contains("://") || n.contains('@') {
        return Err("must be host:port (no scheme, no credentials)");
    }
    let Some((host, port)) = n.rsplit_once(':') else {
        return Err("must be host:port");
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("has no host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host.to_string(), p)),
        _ => Err("has no valid port"),
    }
}

impl RoutingConfig {
    /// Every name is a method the routing table does not know, or one it refuses in the one
    /// class an operator may override (`host`), and appears once over both lists.
    fn check(&self, problems: &mut Vec<String>) {
        let mut seen = HashSet::new();
        let lists = [
            ("allow_global", &self.allow_global),
            ("allow_session", &self.allow_session),
        ];
        for (list, names) in lists {
            for m in names.iter() {
                let w = format!("routing.{list}: {m:?}");
                if m.is_empty() || m.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    problems.push(format!("{w} is not a method name"));
                    continue;
                }
                if !seen.insert(m.as_str()) {
                    problems.push(format!("{w} is listed more than once"));
                    continue;
                }
                match crate::route::lookup(m).map(|e| e.route) {
                    None => {}
                    Some(crate::route::Route::Denied(d)) if d.overridable() => {}
                    Some(crate::route::Route::Denied(d)) => problems.push(format!(
                        "{w} is refused by copilot-lb on purpose ({}), which no setting changes",
                        d.label()
                    )),
                    Some(_) => problems.push(format!(
                        "{w} is already forwarded by copilot-lb's routing table (see `copilot-lb routes`)"
                    )),
                }
            }
        }
    }
}

impl super::ManagedConfig {
    /// What is wrong with `managed:`.
    fn check(&self, file_backends: &[BackendConfig], p: &mut Vec<String>) {
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
            } else if super::MANAGED_RESERVED_ENV.contains(&v.as_str()) {
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
