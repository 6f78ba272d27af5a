//! `listeners:` (modes, TLS, the sidecar's upstream) and `admin:`.

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::path::PathBuf;

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

#[cfg(test)]
mod tests {
    use crate::config::{Config, Overrides};

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
}
