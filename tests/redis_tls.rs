//! Redis over TLS (`rediss://`) with an ACL user and password, against a
//! real `redis-server` that speaks only TLS and requires client certificates,
//! with certificates made by the test: counting works with the right CA,
//! client certificate and password, and every wrong one is refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::pki::{Pki, ca, pki};
use common::{RedisServer, TestServer, allow_request, rules};
use ratekeeper::Server;
use ratekeeper::clock::ManualClock;
use ratekeeper::store::RedisStore;
use ratekeeper::store::redis::{RedisSettings, RedisTls};

const RULES: &str = "domain: tls\ndescriptors:\n  - key: user\n    rate_limit: {unit: hour, requests_per_unit: 2}\n";

/// A TLS-only Redis with ACL user `alice` (password `s3cret`) and the
/// default user disabled; the PKI's files stay in the returned directory.
fn tls_redis(pki: &Pki) -> (RedisServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &pki.ca).unwrap();
    std::fs::write(dir.path().join("server.crt"), &pki.server.cert).unwrap();
    std::fs::write(dir.path().join("server.key"), &pki.server.key).unwrap();
    let redis = RedisServer::start_tls(
        dir.path(),
        &[
            "--user", "alice", "on", ">s3cret", "~*", "&*", "+@all", "--user", "default", "off",
        ],
    );
    (redis, dir)
}

fn store(url: &str, tls: RedisTls) -> RedisStore {
    RedisStore::new(&RedisSettings {
        pool_size: 2,
        timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(1000),
        tls: Some(tls),
        ..RedisSettings::new(url)
    })
    .unwrap()
}

/// The answers to three calls on a limit of 2, or the first error's code.
async fn three_calls(store: RedisStore) -> Result<Vec<bool>, tonic::Code> {
    // A fixed time: no window boundary can pass between the calls.
    let store = store.with_clock(Arc::new(ManualClock::new(common::T0)));
    let server = TestServer::start(Server::new(rules(&[RULES]), Arc::new(store))).await;
    let mut client = server.client().await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        let answer = client
            .should_allow(allow_request("tls", &[&[("user", "u")]], 1))
            .await
            .map_err(|s| s.code())?;
        answers.push(answer.into_inner().allowed);
    }
    Ok(answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_private_ca_client_certificate_and_acl_user_counts() {
    let pki = pki();
    let (redis, _dir) = tls_redis(&pki);
    let url = format!("rediss://alice:s3cret@127.0.0.1:{}", redis.port);
    let good = || RedisTls {
        ca_pem: Some(pki.ca.clone().into_bytes()),
        client_pem: Some((
            pki.client.cert.clone().into_bytes(),
            pki.client.key.clone().into_bytes(),
        )),
    };
    assert_eq!(
        three_calls(store(&url, good())).await,
        Ok(vec![true, true, false])
    );

    // A second instance over TLS sees the same counter: it lives in Redis.
    assert_eq!(
        three_calls(store(&url, good())).await,
        Ok(vec![false, false, false])
    );

    let unavailable = Err(tonic::Code::Unavailable);
    // No client certificate: Redis refuses the handshake.
    let no_client = RedisTls {
        client_pem: None,
        ..good()
    };
    assert_eq!(three_calls(store(&url, no_client)).await, unavailable);
    // A client certificate from another CA.
    let rogue_client = RedisTls {
        client_pem: Some((
            pki.rogue_client.cert.clone().into_bytes(),
            pki.rogue_client.key.clone().into_bytes(),
        )),
        ..good()
    };
    assert_eq!(three_calls(store(&url, rogue_client)).await, unavailable);
    // A server certificate we do not trust.
    let wrong_ca = RedisTls {
        ca_pem: Some(ca("some other ca").pem().into_bytes()),
        ..good()
    };
    assert_eq!(three_calls(store(&url, wrong_ca)).await, unavailable);
    // The right certificates but the wrong password.
    let wrong_password = format!("rediss://alice:guess@127.0.0.1:{}", redis.port);
    assert_eq!(
        three_calls(store(&wrong_password, good())).await,
        unavailable
    );
    // Plaintext to the TLS port.
    let plain = format!("redis://alice:s3cret@127.0.0.1:{}", redis.port);
    assert_eq!(
        three_calls(common::redis_store(&plain, Duration::from_millis(500))).await,
        unavailable
    );
}

#[test]
fn certificates_with_a_plaintext_url_are_refused() {
    let error = RedisStore::new(&RedisSettings {
        tls: Some(RedisTls {
            ca_pem: Some(b"not used".to_vec()),
            client_pem: None,
        }),
        ..RedisSettings::new("redis://127.0.0.1:6379")
    })
    .err()
    .unwrap_or_else(|| panic!("refused"));
    assert!(error.to_string().contains("not rediss://"), "{error}");
}

#[test]
fn garbage_certificates_are_refused_at_startup() {
    let error = RedisStore::new(&RedisSettings {
        tls: Some(RedisTls {
            ca_pem: Some(
                b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n".to_vec(),
            ),
            client_pem: None,
        }),
        ..RedisSettings::new("rediss://127.0.0.1:6379")
    })
    .err()
    .unwrap_or_else(|| panic!("refused"));
    assert!(error.to_string().contains("certificates"), "{error}");
}
