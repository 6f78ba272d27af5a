//! Certificates for TLS tests and benches, made with rcgen at run time so that no key material
//! is checked in and no certificate in the tree can expire under a test.
//!
//! The fields stay rcgen's own types: callers need PEM for config files and DER for rustls,
//! and rcgen already offers both.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use std::path::{Path, PathBuf};

pub use rcgen::SanType;

/// What a leaf certificate may be used for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A TLS server (a listener's certificate).
    Server,
    /// A TLS client (mTLS).
    Client,
}

/// A certificate and its private key.
pub struct Issued {
    /// The certificate.
    pub cert: Certificate,
    /// Its private key.
    pub key: KeyPair,
}

impl Issued {
    /// Writes `<dir>/<name>.crt` and `<dir>/<name>.key` (PEM) and returns their paths, the
    /// form copilot-lb's TLS config takes.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, self.cert.pem()).unwrap();
        std::fs::write(&k, self.key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A leaf with common name `cn` and one subject alternative name, signed by this CA.
    pub fn leaf(&self, cn: &str, san: SanType, role: Role) -> Issued {
        self.sign(leaf_params(cn, san, role))
    }

    /// Like [`Issued::leaf`] but valid only in 2020, so that expiry checks can be tested.
    pub fn expired_leaf(&self, cn: &str, san: SanType, role: Role) -> Issued {
        let mut p = leaf_params(cn, san, role);
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.sign(p)
    }

    fn sign(&self, p: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued { cert, key }
    }
}

/// A self-signed certificate authority with this common name.
pub fn ca(name: &str) -> Issued {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Issued { cert, key }
}

fn leaf_params(cn: &str, san: SanType, role: Role) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names = vec![san];
    p.extended_key_usages = vec![match role {
        Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
        Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
    }];
    p
}

/// A self-signed end-entity certificate for these DNS names: a server that is its own trust
/// anchor, as a backend reached with `tls: {ca: <its cert>}` is.
pub fn self_signed(dns_names: &[&str]) -> Issued {
    let names = dns_names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let mut p = CertificateParams::new(names).unwrap();
    p.is_ca = IsCa::ExplicitNoCa;
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Issued { cert, key }
}

/// A URI subject alternative name (SPIFFE ids are URIs).
pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// An IP-address subject alternative name.
pub fn ip(s: &str) -> SanType {
    SanType::IpAddress(s.parse().unwrap())
}
