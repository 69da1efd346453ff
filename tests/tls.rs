//! TLS and mTLS on the gRPC listener, with certificates made by the test:
//! a TLS client that trusts the CA is served, a plaintext one is not; with a
//! client CA configured, only clients presenting a certificate signed by it
//! get an answer.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::pki::{Pair, Pki, ca, pki};
use common::{T0, TestServer, allow_request, rules};
use ratekeeper::clock::ManualClock;
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use ratekeeper::store::MemoryStore;
use ratekeeper::{Server, TlsSettings};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const RULES: &str = "domain: tls\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 10}\n";

async fn serve(pki: &Pki, mtls: bool) -> TestServer {
    let store = Arc::new(MemoryStore::new(100, Arc::new(ManualClock::new(T0))));
    let tls = TlsSettings {
        cert_pem: pki.server.cert.clone().into_bytes(),
        key_pem: pki.server.key.clone().into_bytes(),
        client_ca_pem: mtls.then(|| pki.ca.clone().into_bytes()),
    };
    TestServer::start(Server::new(rules(&[RULES]), store).with_tls(tls)).await
}

/// Calls ShouldAllow once over TLS (trusting `ca`, presenting `identity`).
async fn call_tls(server: &TestServer, ca: &str, identity: Option<&Pair>) -> Result<bool, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    let channel = Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    call(channel).await
}

async fn call_plaintext(server: &TestServer) -> Result<bool, String> {
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    call(channel).await
}

/// One `ShouldAllow` on `channel`.
async fn call(channel: Channel) -> Result<bool, String> {
    RateLimiterClient::new(channel)
        .should_allow(allow_request("tls", &[&[("user", "u")]], 1))
        .await
        .map(|r| r.into_inner().allowed)
        .map_err(|s| format!("call: {s:?}"))
}

#[tokio::test]
async fn tls_serves_trusting_clients_only() {
    let pki = pki();
    let server = serve(&pki, false).await;
    assert_eq!(call_tls(&server, &pki.ca, None).await, Ok(true));
    assert!(
        call_plaintext(&server).await.is_err(),
        "plaintext was served"
    );
    // A client that does not trust our CA refuses the server.
    let other_ca = ca("some other ca").pem();
    assert!(call_tls(&server, &other_ca, None).await.is_err());
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_ca() {
    let pki = pki();
    let server = serve(&pki, true).await;
    assert_eq!(
        call_tls(&server, &pki.ca, Some(&pki.client)).await,
        Ok(true)
    );
    assert!(
        call_tls(&server, &pki.ca, None).await.is_err(),
        "served without a client certificate"
    );
    assert!(
        call_tls(&server, &pki.ca, Some(&pki.rogue_client))
            .await
            .is_err(),
        "served a client certificate from another CA"
    );
    assert!(call_plaintext(&server).await.is_err());
}

#[test]
fn bad_tls_settings_are_refused_at_startup() {
    let bin = env!("CARGO_BIN_EXE_ratekeeper");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config.yaml");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let junk = junk.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--tls-cert", junk], "--tls-key"),
        (&["--tls-cert", junk, "--tls-key", junk], "invalid TLS"),
        (
            &["--tls-cert", "/nonexistent/cert.pem", "--tls-key", junk],
            "--tls-cert",
        ),
    ];
    for (args, expected) in cases {
        let out = Command::new(bin)
            .args(["serve", "--config", example])
            .args(*args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
