//! The auth layer over real sockets: an mTLS edge (certificates from `test_support::pki`) in
//! front of a fake CLI that requires its own token, reached through in-process sidecars.

mod common;

use common::{within, Client};
use copilot_lb::config::Config;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use test_support::fake_cli::{FakeCli, FakeConfig};
use test_support::pki::{ca, ip, uri, Role};

struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca_pem: String,
    server: (PathBuf, PathBuf),
    a: (PathBuf, PathBuf),
    b: (PathBuf, PathBuf),
    rogue: (PathBuf, PathBuf),
    expired: (PathBuf, PathBuf),
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = ca("test-ca");
    let other = ca("other-ca");
    let ca_path = d.join("ca.crt");
    std::fs::write(&ca_path, root.cert.pem()).unwrap();
    let server = root
        .leaf("edge", ip("127.0.0.1"), Role::Server)
        .write(d, "edge");
    let a = root
        .leaf("a", uri("spiffe://t/a"), Role::Client)
        .write(d, "a");
    let b = root
        .leaf("b", uri("spiffe://t/b"), Role::Client)
        .write(d, "b");
    let rogue = other
        .leaf("rogue", uri("spiffe://t/a"), Role::Client)
        .write(d, "rogue");
    let expired = root
        .expired_leaf("expired", uri("spiffe://t/a"), Role::Client)
        .write(d, "expired");
    Pki {
        other_ca_pem: other.cert.pem(),
        dir,
        ca: ca_path,
        server,
        a,
        b,
        rogue,
        expired,
    }
}

fn hash(t: &str) -> String {
    copilot_lb::auth::hash_token(t)
}

async fn edge(p: &Pki, backend: SocketAddr) -> (copilot_lb::app::Running, SocketAddr) {
    let token_file = p.dir.path().join("cli-token");
    std::fs::write(&token_file, "cli-secret\n").unwrap();
    let yaml = format!(
        r#"
listeners:
  - listen: 127.0.0.1:0
    tls:
      cert: {sc}
      key: {sk}
      client_auth: required
      client_ca: {ca}
backends:
  - address: {backend}
    token_file: {tf}
health: {{ interval: 100ms, timeout: 500ms, rise: 1, fall: 2 }}
tenants:
  - name: a
    identities: ["spiffe://t/a"]
    token_hashes: ["{ha}"]
  - name: b
    identities: ["spiffe://t/b"]
    token_hashes: ["{hb}"]
"#,
        sc = p.server.0.display(),
        sk = p.server.1.display(),
        ca = p.ca.display(),
        tf = token_file.display(),
        ha = hash("tok-a"),
        hb = hash("tok-b"),
    );
    let cfg = Config::from_yaml(&yaml, "edge").unwrap();
    common::proxy(cfg).await
}

async fn sidecar(
    p: &Pki,
    edge: SocketAddr,
    cert: Option<&(PathBuf, PathBuf)>,
) -> (copilot_lb::app::Running, SocketAddr) {
    let client = match cert {
        Some((c, k)) => format!(
            "\n        cert: {}\n        key: {}",
            c.display(),
            k.display()
        ),
        None => String::new(),
    };
    let yaml = format!(
        r#"
listeners:
  - listen: 127.0.0.1:0
    mode: tcp
    upstream:
      address: {edge}
      tls:
        ca: {ca}
        server_name: 127.0.0.1{client}
"#,
        ca = p.ca.display()
    );
    let cfg = Config::from_yaml(&yaml, "sidecar").unwrap();
    common::proxy(cfg).await
}

async fn fake_with_token() -> FakeCli {
    FakeCli::start(FakeConfig {
        name: "cli".into(),
        token: Some("cli-secret".into()),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Whether a connection through `addr` gets no `ping` answer (handshake refused, closed).
async fn refused(addr: SocketAddr) -> bool {
    let Ok(mut c) = tokio::time::timeout(Duration::from_secs(3), Client::connect(addr)).await
    else {
        return true;
    };
    c.send_request("1", "ping", &json!({})).await;
    c.try_response("1", Duration::from_secs(3)).await.is_none()
}

#[tokio::test]
async fn mtls_edge_accepts_known_identities_and_refuses_the_rest() {
    within(Duration::from_secs(30), async {
        let p = pki();
        let cli = fake_with_token().await;
        let (_edge, edge_addr) = edge(&p, cli.addr()).await;
        let (_sa, via_a) = sidecar(&p, edge_addr, Some(&p.a)).await;
        let (_sn, via_none) = sidecar(&p, edge_addr, None).await;
        let (_sr, via_rogue) = sidecar(&p, edge_addr, Some(&p.rogue)).await;
        let (_se, via_expired) = sidecar(&p, edge_addr, Some(&p.expired)).await;

        let mut a = Client::connect(via_a).await;
        let r = a.ok("connect", json!({"token": "tok-a"})).await;
        assert_eq!(r["ok"], true);
        a.ok("session.create", json!({"sessionId": "a-1"})).await;
        a.ok("session.send", json!({"sessionId": "a-1", "prompt": "hi"}))
            .await;
        assert_eq!(
            cli.requests("session.send"),
            1,
            "the backend served the request with the proxy's token"
        );

        let before = cli.accepted();
        assert!(
            refused(via_none).await,
            "no client certificate must be refused"
        );
        assert!(
            refused(via_rogue).await,
            "a certificate from another CA must be refused"
        );
        assert!(
            refused(via_expired).await,
            "an expired certificate must be refused"
        );
        assert_eq!(
            cli.accepted(),
            before,
            "refused clients must not reach the backend"
        );
    })
    .await;
}

#[tokio::test]
async fn wrong_token_gets_cli_codes_and_reaches_nothing() {
    within(Duration::from_secs(30), async {
        let p = pki();
        let cli = fake_with_token().await;
        let (_edge, edge_addr) = edge(&p, cli.addr()).await;
        let (_sa, via_a) = sidecar(&p, edge_addr, Some(&p.a)).await;
        let mut c = Client::connect(via_a).await;
        let r = c.call("session.create", json!({"sessionId": "x"})).await;
        assert_eq!(r.error_code(), Some(-32001), "{}", r.text());
        let r = c.call("connect", json!({"token": "nope"})).await;
        assert_eq!(r.error_code(), Some(-32002));
        let r = c.call("connect", json!({"token": "tok-b"})).await;
        assert_eq!(
            r.error_code(),
            Some(-32002),
            "b's token from a's certificate"
        );
        let r = c.call("connect", json!({})).await;
        assert_eq!(r.error_code(), Some(-32002));
        let r = c.call("session.list", json!({})).await;
        assert_eq!(r.error_code(), Some(-32001));
        assert_eq!(
            cli.requests("session.create") + cli.requests("session.list"),
            0
        );
    })
    .await;
}

#[tokio::test]
async fn tenants_cannot_touch_each_others_sessions() {
    within(Duration::from_secs(30), async {
        let p = pki();
        let cli = fake_with_token().await;
        let (_edge, edge_addr) = edge(&p, cli.addr()).await;
        let (_sa, via_a) = sidecar(&p, edge_addr, Some(&p.a)).await;
        let (_sb, via_b) = sidecar(&p, edge_addr, Some(&p.b)).await;
        let mut b = Client::connect(via_b).await;
        b.ok("connect", json!({"token": "tok-b"})).await;
        let mut a = Client::connect(via_a).await;
        a.ok("connect", json!({"token": "tok-a"})).await;
        a.ok("session.create", json!({"sessionId": "secret"})).await;
        a.ok(
            "session.send",
            json!({"sessionId": "secret", "prompt": "plans"}),
        )
        .await;
        for (m, params) in [
            ("session.resume", json!({"sessionId": "secret"})),
            (
                "session.send",
                json!({"sessionId": "secret", "prompt": "leak"}),
            ),
            ("session.getMessages", json!({"sessionId": "secret"})),
            ("session.delete", json!({"sessionId": "secret"})),
            ("session.create", json!({"sessionId": "secret"})),
        ] {
            let r = b.call(m, params).await;
            assert_eq!(r.error_code(), Some(-32012), "{m}: {}", r.text());
        }
        let list = b.ok("session.list", json!({})).await;
        assert!(!list.to_string().contains("secret"), "{list}");
        let list = a.ok("session.list", json!({})).await;
        assert!(list.to_string().contains("secret"), "{list}");
        b.drain(Duration::from_millis(300), Duration::from_secs(2))
            .await;
        assert!(
            b.events_for("secret").is_empty(),
            "b saw a's events or lifecycle"
        );
        assert_eq!(
            cli.requests("session.resume") + cli.requests("session.delete"),
            0
        );
    })
    .await;
}

#[tokio::test]
async fn rotating_the_client_ca_closes_connections_it_no_longer_trusts() {
    within(Duration::from_secs(30), async {
        let p = pki();
        let cli = fake_with_token().await;
        let (_edge, edge_addr) = edge(&p, cli.addr()).await;
        let (_sa, via_a) = sidecar(&p, edge_addr, Some(&p.a)).await;
        let mut a = Client::connect(via_a).await;
        a.ok("connect", json!({"token": "tok-a"})).await;
        a.ok("session.create", json!({"sessionId": "rot"})).await;
        // Replace the trusted client CA with another one: a's certificate no longer verifies.
        std::fs::write(&p.ca, &p.other_ca_pem).unwrap();
        assert!(
            a.closed_within(Duration::from_secs(10)).await,
            "connection with a revoked CA stayed open"
        );
        assert!(
            refused(via_a).await,
            "new handshakes must use the new CA bundle"
        );
    })
    .await;
}
