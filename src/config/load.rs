//! Loading a config: YAML with line and column in every error, command-line overrides, the
//! semantic checks, and reading backend tokens from the environment or files.

use super::tenants::tool_entry_problem;
use super::*;
use serde_saphyr::Spanned;
use std::collections::HashSet;
use std::path::Path;

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
        if self.limits.stream_above_bytes != 0
            && self.limits.stream_above_bytes < crate::codec::STREAM_HEAD
        {
            problems.push(format!(
                "limits.stream_above_bytes must be 0 (never stream) or at least {} (the envelope is read from that many bytes)",
                crate::codec::STREAM_HEAD
            ));
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
}

#[cfg(test)]
mod tests {
    use super::super::*;

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
