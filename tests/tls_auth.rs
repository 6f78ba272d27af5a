//! The auth layer over real sockets: an mTLS edge (certificates made here with rcgen) in front of
//! a fake CLI that requires its own token, reached through in-process sidecars.

mod common;

use common::{within, Client};
use copilot_lb::config::Config;
use copilot_lb::fake_cli::{FakeCli, FakeConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca { cert, key }
}

fn leaf(
    dir: &Path,
    name: &str,
    ca: &Ca,
    san: SanType,
    client: bool,
    expired: bool,
) -> (PathBuf, PathBuf) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.subject_alt_names = vec![san];
    p.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

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
    let server = leaf(
        d,
        "edge",
        &root,
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
        false,
        false,
    );
    let a = leaf(d, "a", &root, uri("spiffe://t/a"), true, false);
    let b = leaf(d, "b", &root, uri("spiffe://t/b"), true, false);
    let rogue = leaf(d, "rogue", &other, uri("spiffe://t/a"), true, false);
    let expired = leaf(d, "expired", &root, uri("spiffe://t/a"), true, true);
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
