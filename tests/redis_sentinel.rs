//! The Sentinel store's credentials and TLS against real sentinels: the
//! sentinels' own password and the master's are each used where they
//! belong (and a wrong one is refused), and with TLS everywhere — sentinels,
//! primary and replica speaking only TLS and requiring client certificates
//! — counting works. The failover itself is in `redis_networks.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::pki::pki;
use common::sentinel::{MASTER, SentinelOptions, SentinelSet, Tls};
use common::{TestServer, allow_request, rules};
use ratekeeper::Server;
use ratekeeper::store::RedisStore;
use ratekeeper::store::redis::sentinel::SentinelSettings;
use ratekeeper::store::redis::{RedisSettings, RedisTls};
use tonic::Code;

const RULES: &str = "domain: s\ndescriptors:\n  - key: user\n    rate_limit: {unit: hour, requests_per_unit: 1000}\n";

fn store(set: &SentinelSet, master_password: Option<&str>, tls: Option<RedisTls>) -> RedisStore {
    RedisStore::with_sentinels(
        &RedisSettings {
            timeout: Duration::from_millis(500),
            tls,
            ..RedisSettings::new("redis://unused")
        },
        &SentinelSettings {
            nodes: set.nodes().split(',').map(str::to_owned).collect(),
            master_name: MASTER.to_owned(),
            master_username: None,
            master_password: master_password.map(str::to_owned),
        },
    )
    .unwrap()
}

/// One call's answer: allowed, or the gRPC code.
async fn call(store: RedisStore) -> Result<bool, Code> {
    let server = TestServer::start(Server::new(rules(&[RULES]), Arc::new(store))).await;
    server
        .client()
        .await
        .should_allow(allow_request("s", &[&[("user", "u")]], 1))
        .await
        .map(|r| r.into_inner().allowed)
        .map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_and_master_passwords_are_each_used_where_they_belong() {
    let set = SentinelSet::start_with(SentinelOptions {
        master_password: Some("m4ster".into()),
        sentinel_password: Some("s3ntinel".into()),
        tls: None,
    });
    assert_eq!(call(store(&set, Some("m4ster"), None)).await, Ok(true));
    assert_eq!(
        call(store(&set, Some("wrong"), None)).await,
        Err(Code::Unavailable),
        "a wrong master password"
    );
    assert_eq!(
        call(store(&set, None, None)).await,
        Err(Code::Unavailable),
        "no master password"
    );
    // The sentinels' password is the one in their URLs.
    let unauthenticated = RedisStore::with_sentinels(
        &RedisSettings {
            timeout: Duration::from_millis(500),
            ..RedisSettings::new("redis://unused")
        },
        &SentinelSettings {
            nodes: set
                .sentinel_ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
            master_name: MASTER.to_owned(),
            master_username: None,
            master_password: Some("m4ster".into()),
        },
    )
    .unwrap();
    assert_eq!(call(unauthenticated).await, Err(Code::Unavailable));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_sentinels_and_the_master() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &pki.ca).unwrap();
    std::fs::write(dir.path().join("server.crt"), &pki.server.cert).unwrap();
    std::fs::write(dir.path().join("server.key"), &pki.server.key).unwrap();
    let set = SentinelSet::start_with(SentinelOptions {
        master_password: None,
        sentinel_password: None,
        tls: Some(Tls {
            dir: dir.path().to_owned(),
            ca: pki.ca.clone(),
            client: (pki.client.cert.clone(), pki.client.key.clone()),
        }),
    });
    let tls = || RedisTls {
        ca_pem: Some(pki.ca.clone().into_bytes()),
        client_pem: Some((
            pki.client.cert.clone().into_bytes(),
            pki.client.key.clone().into_bytes(),
        )),
    };
    assert_eq!(call(store(&set, None, Some(tls()))).await, Ok(true));
    // Without a client certificate the TLS-only servers refuse.
    let no_client_certificate = RedisTls {
        client_pem: None,
        ..tls()
    };
    assert_eq!(
        call(store(&set, None, Some(no_client_certificate))).await,
        Err(Code::Unavailable)
    );
}
