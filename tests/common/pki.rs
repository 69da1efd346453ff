//! Certificates made by the tests with rcgen: a CA, and leaf certificates it
//! signs, as PEM.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A certificate and its key, as PEM.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// A CA, a server certificate for `localhost` and `127.0.0.1`, and a client
/// certificate it signed, plus a client certificate from an unrelated CA.
pub struct Pki {
    pub ca: String,
    pub server: Pair,
    pub client: Pair,
    pub rogue_client: Pair,
}

/// A new self-signed CA.
pub fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for `names` (DNS names or IP addresses) signed by `issuer`.
pub fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, names: &[&str]) -> Pair {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// A fresh PKI.
pub fn pki() -> Pki {
    let issuer = ca("ratekeeper test ca");
    let rogue = ca("some other ca");
    Pki {
        ca: issuer.pem(),
        server: leaf(&issuer, &["localhost", "127.0.0.1"]),
        client: leaf(&issuer, &["gateway"]),
        rogue_client: leaf(&rogue, &["intruder"]),
    }
}
