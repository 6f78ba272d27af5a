//! Client authentication and tenancy: who a connection is, and which sessions it may touch.

use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// A tenant asked to create a session id outside its `session_patterns`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session id {sid:?} is not allowed for tenant {tenant} (allowed: {})", .allowed.join(", "))]
pub struct SessionIdNotAllowed {
    /// The refused id.
    pub sid: String,
    /// The tenant's name.
    pub tenant: String,
    /// Its patterns.
    pub allowed: Vec<String>,
}

/// The CLI's built-in shell tools (CLI 1.0.102: the bash family on POSIX hosts, the
/// powershell family on Windows), denied to a tenant without `allow_shell`.
pub const SHELL_TOOLS: &[&str] = &[
    "bash",
    "list_bash",
    "read_bash",
    "stop_bash",
    "write_bash",
    "powershell",
    "list_powershell",
    "read_powershell",
    "stop_powershell",
    "write_powershell",
];

/// What a tenant's sessions may do on the CLI host.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    /// Tools its sessions may have (names, `source:name`, `source:*`); `None`: any not denied.
    pub allow_tools: Option<Vec<String>>,
    /// Tools its sessions never have: the configured list, plus [`SHELL_TOOLS`] without
    /// `allow_shell`.
    pub deny_tools: Vec<String>,
    /// It may run commands on the CLI host: shell tools, `session.shell.*` and the other
    /// host-level methods, local MCP servers.
    pub allow_shell: bool,
}

impl HostPolicy {
    /// From a tenant's settings: the shell tools join the deny list unless `allow_shell`.
    pub fn new(allow_tools: Option<Vec<String>>, deny: Vec<String>, allow_shell: bool) -> Self {
        let mut deny_tools = deny;
        if !allow_shell {
            for t in SHELL_TOOLS {
                if !deny_tools.iter().any(|d| d == t) {
                    deny_tools.push(t.to_string());
                }
            }
        }
        HostPolicy {
            allow_tools,
            deny_tools,
            allow_shell,
        }
    }

    /// Everything allowed: what an open proxy's one tenant gets (there is no other tenant to
    /// protect), so its requests are forwarded untouched.
    pub fn unrestricted_policy() -> Self {
        HostPolicy::new(None, Vec::new(), true)
    }

    /// Whether the policy leaves every request as the client sent it.
    pub fn unrestricted(&self) -> bool {
        self.allow_shell && self.allow_tools.is_none() && self.deny_tools.is_empty()
    }
}

/// A tenant: an owner of sessions.
#[derive(Debug)]
pub struct Tenant {
    /// Name, recorded as the owner of every session it creates.
    pub name: String,
    /// Session id patterns (`*` wildcards) it may create; empty means any.
    pub session_patterns: Vec<String>,
    /// Cap on its live sessions.
    pub max_sessions: Option<u64>,
    /// It may adopt session ids the proxy has no record of.
    pub adopt_unknown: bool,
    /// Backends allowed to serve it; empty means all.
    pub backends: Vec<String>,
    /// Delete its sessions this long after creation.
    pub max_session_age: Option<std::time::Duration>,
    /// Delete its sessions after this long without a request.
    pub max_idle: Option<std::time::Duration>,
    /// Its tools and host access.
    pub host: HostPolicy,
    /// Its rate limit and turn cap, with their state on this replica (shared by every
    /// connection of the tenant, and kept across a reload).
    pub(crate) limits: Arc<crate::fair::TenantLimits>,
}

impl Tenant {
    /// The single tenant of an open proxy (no tenants configured).
    pub fn open() -> Tenant {
        Tenant {
            name: "default".into(),
            session_patterns: Vec::new(),
            max_sessions: None,
            // The only tenant of an open proxy: there is nobody else an id could belong to.
            adopt_unknown: true,
            backends: Vec::new(),
            max_session_age: None,
            max_idle: None,
            host: HostPolicy::unrestricted_policy(),
            limits: Arc::default(),
        }
    }

    /// Whether an id matches the tenant's `session_patterns` (any id when there are none).
    pub fn may_claim(&self, sid: &str) -> bool {
        self.session_patterns.is_empty() || self.session_patterns.iter().any(|p| glob(p, sid))
    }

    /// Whether a session id the proxy has no record of may become this tenant's: only with
    /// `adopt_unknown`, and within its patterns. Otherwise an unknown id belongs to nobody.
    pub fn may_adopt(&self, sid: &str) -> bool {
        self.adopt_unknown && self.may_claim(sid)
    }

    /// Whether this tenant may create a session with this id.
    pub fn may_create(&self, sid: &str) -> Result<(), SessionIdNotAllowed> {
        if self.may_claim(sid) {
            Ok(())
        } else {
            Err(SessionIdNotAllowed {
                sid: sid.to_string(),
                tenant: self.name.clone(),
                allowed: self.session_patterns.clone(),
            })
        }
    }

    /// Whether a backend may serve this tenant.
    pub fn allows_backend(&self, name: &str) -> bool {
        self.backends.is_empty() || self.backends.iter().any(|b| b == name)
    }
}

/// The authentication policy in force.
#[derive(Debug)]
pub struct Auth {
    tenants: Vec<TenantAuth>,
    open: Arc<Tenant>,
}

#[derive(Debug)]
struct TenantAuth {
    hashes: Vec<String>,
    identities: Vec<String>,
    tenant: Arc<Tenant>,
}

impl TenantAuth {
    fn identity_ok(&self, identity: Option<&str>) -> bool {
        self.identities.is_empty()
            || identity.is_some_and(|id| self.identities.iter().any(|p| glob(p, id)))
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth::open()
    }
}

impl Auth {
    /// No authentication: one open tenant, as the CLI without COPILOT_CONNECTION_TOKEN.
    pub fn open() -> Auth {
        Auth {
            tenants: Vec::new(),
            open: Arc::new(Tenant::open()),
        }
    }

    /// Builds the policy from the config's tenants (none: open).
    pub fn from_config(
        tenants: &[crate::config::TenantConfig],
        defaults: &crate::config::SessionsConfig,
    ) -> Auth {
        Auth::from_config_after(tenants, defaults, &Auth::open())
    }

    /// Builds the policy for a reload: a tenant of `prev` with the same name keeps its limit
    /// state (bucket, turns in progress), so connections made before and after the reload
    /// share one count, with the new settings applied to it.
    pub fn from_config_after(
        tenants: &[crate::config::TenantConfig],
        defaults: &crate::config::SessionsConfig,
        prev: &Auth,
    ) -> Auth {
        let age = defaults.max_session_age.map(|m| m.0);
        let idle = defaults.max_idle.map(|m| m.0);
        let tenants = tenants
            .iter()
            .map(|t| TenantAuth {
                hashes: t
                    .token_hashes
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                identities: t.identities.clone(),
                tenant: Arc::new(Tenant {
                    name: t.name.value.clone(),
                    session_patterns: t.session_patterns.clone(),
                    max_sessions: t.max_sessions,
                    adopt_unknown: t.adopt_unknown,
                    backends: t.backends.clone(),
                    max_session_age: t.max_session_age.map(|m| m.0).or(age),
                    max_idle: t.max_idle.map(|m| m.0).or(idle),
                    host: HostPolicy::new(
                        t.tools.allow.clone(),
                        t.tools.deny.clone(),
                        t.allow_shell,
                    ),
                    limits: {
                        let l = prev
                            .tenants
                            .iter()
                            .find(|p| p.tenant.name == t.name.value)
                            .map(|p| p.tenant.limits.clone())
                            .unwrap_or_default();
                        l.configure(
                            t.rate_limit
                                .as_ref()
                                .map(|r| (r.requests_per_second, r.burst())),
                            t.max_concurrent_turns.unwrap_or(0),
                        );
                        l
                    },
                }),
            })
            .collect();
        let mut open = Tenant::open();
        open.max_session_age = age;
        open.max_idle = idle;
        Auth {
            tenants,
            open: Arc::new(open),
        }
    }

    /// Every configured tenant (the open one when none are).
    pub fn tenants(&self) -> Vec<Arc<Tenant>> {
        if self.tenants.is_empty() {
            vec![self.open.clone()]
        } else {
            self.tenants.iter().map(|t| t.tenant.clone()).collect()
        }
    }

    /// Whether clients must `connect` with a token first.
    pub fn required(&self) -> bool {
        !self.tenants.is_empty()
    }

    /// The tenant of a connection that has not authenticated (open mode only).
    pub fn anonymous(&self) -> Arc<Tenant> {
        self.open.clone()
    }

    /// Finds the tenant for a `connect` token and a certificate identity, answering failures
    /// with the CLI's own error codes. A tenant with identity patterns needs a matching
    /// certificate; one with token hashes needs a matching token; one with both needs both.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        identity: Option<&str>,
    ) -> Result<Arc<Tenant>, (i64, &'static str)> {
        if self.tenants.is_empty() {
            return match token {
                Some(_) => Err((
                    crate::rpc::AUTHENTICATION_NOT_CONFIGURED,
                    "AUTHENTICATION_NOT_CONFIGURED",
                )),
                None => Ok(self.open.clone()),
            };
        }
        let candidates = self.tenants.iter().filter(|t| t.identity_ok(identity));
        if let Some(token) = token {
            let h = hash_token(token);
            for t in candidates.clone() {
                if t.hashes
                    .iter()
                    .any(|x| constant_eq(x.as_bytes(), h.as_bytes()))
                {
                    return Ok(t.tenant.clone());
                }
            }
        }
        for t in candidates {
            if t.hashes.is_empty() && !t.identities.is_empty() && token.is_none() {
                return Ok(t.tenant.clone());
            }
        }
        Err((crate::rpc::AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED"))
    }
}

/// The stored form of a token: `sha256:<hex>`.
pub fn hash_token(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// Compares secrets (token hashes, the admin token) in time that does not depend on where
/// they differ, so response timing does not leak a prefix. Lengths are not secret.
pub(crate) fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// `*` matches any run of characters; everything else is literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globbing() {
        assert!(glob("a-*", "a-1"));
        assert!(!glob("a-*", "b-1"));
        assert!(glob("*", ""));
        assert!(glob("x*y*z", "x12y34z"));
        assert!(!glob("x*y*z", "x12y34"));
        assert!(glob("exact", "exact"));
    }

    fn tenant(name: &str, tokens: &[&str], ids: &[&str]) -> crate::config::TenantConfig {
        let yaml = format!(
            "name: {name}\ntoken_hashes: [{}]\nidentities: [{}]\n",
            tokens
                .iter()
                .map(|t| format!("\"{}\"", hash_token(t)))
                .collect::<Vec<_>>()
                .join(","),
            ids.iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        serde_saphyr::from_str(&yaml).unwrap()
    }

    #[test]
    fn tenants_by_token_identity_or_both() {
        assert!(!Auth::from_config(&[], &Default::default()).required());
        let a = Auth::from_config(
            &[
                tenant("a", &["tok-a"], &[]),
                tenant("b", &[], &["spiffe://x/b/*"]),
                tenant("c", &["tok-c"], &["spiffe://x/c"]),
            ],
            &Default::default(),
        );
        assert!(a.required());
        assert_eq!(a.authenticate(Some("tok-a"), None).unwrap().name, "a");
        assert_eq!(
            a.authenticate(None, Some("spiffe://x/b/1")).unwrap().name,
            "b"
        );
        assert_eq!(
            a.authenticate(Some("tok-c"), Some("spiffe://x/c"))
                .unwrap()
                .name,
            "c"
        );
        assert_eq!(
            a.authenticate(Some("tok-c"), Some("spiffe://x/b/1"))
                .unwrap_err()
                .0,
            -32002
        );
        assert_eq!(a.authenticate(Some("wrong"), None).unwrap_err().0, -32002);
        assert_eq!(a.authenticate(None, None).unwrap_err().0, -32002);
    }

    #[test]
    fn a_reload_keeps_a_tenants_turn_count() {
        let mut t = tenant("b", &["tok-b"], &[]);
        t.max_concurrent_turns = Some(1);
        let before = Auth::from_config(std::slice::from_ref(&t), &Default::default());
        let slot = before.tenants()[0].limits.try_turn().unwrap();
        t.max_concurrent_turns = Some(2);
        let after = Auth::from_config_after(&[t], &Default::default(), &before);
        let l = &after.tenants()[0].limits;
        assert_eq!(
            l.turns(),
            1,
            "the turn running before the reload still counts"
        );
        let second = l.try_turn().unwrap();
        assert!(l.try_turn().is_err(), "the new cap, 2, applies");
        drop((slot, second));
        assert_eq!(l.turns(), 0);
    }

    #[test]
    fn constant_eq_compares_whole_slices() {
        assert!(constant_eq(b"sha256:ab", b"sha256:ab"));
        assert!(!constant_eq(b"sha256:ab", b"sha256:ac"));
        assert!(!constant_eq(b"sha256:ab", b"sha256:a"));
        assert!(constant_eq(b"", b""));
    }

    #[test]
    fn a_refused_session_id_names_tenant_and_patterns() {
        let mut t = Tenant::open();
        t.name = "acme".into();
        t.session_patterns = vec!["acme-*".into(), "shared-*".into()];
        assert!(t.may_create("acme-1").is_ok());
        let e = t.may_create("other-1").unwrap_err();
        assert_eq!(e.sid, "other-1");
        assert_eq!(
            e.to_string(),
            "session id \"other-1\" is not allowed for tenant acme (allowed: acme-*, shared-*)"
        );
    }

    #[test]
    fn open_mode_semantics() {
        let a = Auth::open();
        assert!(!a.required());
        assert!(a.authenticate(None, None).is_ok());
        assert_eq!(a.authenticate(Some("t"), None).unwrap_err().0, -32003);
        assert!(hash_token("x").starts_with("sha256:"));
    }
}
