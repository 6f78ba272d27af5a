//! `tenants:`: who a client is and what it may do (tools, host access, rate and turn limits).

use super::values::Millis;
use serde::Deserialize;
use serde_saphyr::Spanned;

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

/// What is wrong with a `tenants[].tools` entry, if anything. The proxy intersects these with
/// what a client asks for, so only the forms the CLI's tool filter itself knows are taken: a
/// name, `source:name`, or a whole source `source:*`.
pub(super) fn tool_entry_problem(e: &str) -> Option<&'static str> {
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

#[cfg(test)]
mod tests {
    use crate::config::Config;

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
}
