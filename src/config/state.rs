//! `state:`: where the session registry lives (embedded file, Redis or Sentinel), its secrets,
//! and its checks.

use super::values::Millis;
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

impl StateConfig {
    /// What is wrong with `state:` (settings that do not belong to its kind are refused, so a
    /// typo'd kind never silently runs on another store).
    pub(super) fn problems(&self) -> Vec<String> {
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
fn sentinel_problems(s: &SentinelConfig, at: &str, p: &mut Vec<String>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

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
}
