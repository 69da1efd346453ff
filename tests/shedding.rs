//! Load shedding: past `--max-in-flight` requests being decided, one more
//! is refused at once with RESOURCE_EXHAUSTED and counted, on both APIs;
//! once the requests in flight are answered, requests are decided again.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{RedisServer, TestServer, allow_request, envoy_request, http_get, rules};
use ratekeeper::Server;
use ratekeeper::store::RedisStore;
use ratekeeper::store::redis::RedisSettings;
use tonic::Code;

const RULES: &str = r#"
domain: shed
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 100}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_cap_are_shed_at_once_and_counted() {
    let redis = RedisServer::start();
    // One connection, made by the warm-up below, and a deadline far longer
    // than the test: the held request stays in flight on it for as long as
    // Redis is frozen.
    let store = Arc::new(
        RedisStore::new(&RedisSettings {
            pool_size: 1,
            timeout: Duration::from_secs(60),
            ..RedisSettings::new(redis.url())
        })
        .unwrap(),
    );
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store)
            .with_max_in_flight(1)
            // No readiness ping on the frozen connection (it would retire
            // it, and so fail the held request) during the test.
            .with_readiness_interval(Duration::from_secs(3_600)),
    )
    .await;
    let mut client = server.client().await;
    assert!(
        client
            .should_allow(allow_request("shed", &[&[("user", "warm")]], 1))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );

    redis.pause();
    // Three requests at once, on both APIs: one is admitted and held (Redis
    // is frozen), the two that arrive while it is in flight are shed.
    let mut first = client.clone();
    let mut second = client.clone();
    let mut envoy = server.envoy().await;
    let (a, b, c) = tokio::join!(
        first.should_allow(allow_request("shed", &[&[("user", "a")]], 1)),
        second.should_allow(allow_request("shed", &[&[("user", "b")]], 1)),
        envoy.should_rate_limit(envoy_request("shed", &[&[("user", "c")]])),
    );
    let shed: Vec<tonic::Status> = [a.err(), b.err(), c.err()]
        .into_iter()
        .flatten()
        .filter(|status| status.code() == Code::ResourceExhausted)
        .collect();
    assert_eq!(shed.len(), 2, "{shed:?}");
    assert!(
        shed.iter().all(|s| s.message().contains("overloaded")),
        "{shed:?}"
    );
    redis.resume();
    assert!(
        client
            .should_allow(allow_request("shed", &[&[("user", "after")]], 1))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let metrics = http_get(server.admin_addr, "/metrics").await;
    let shed_count = |surface: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("ratelimit_requests_total")
                    && l.contains("decision=\"shed\"")
                    && l.contains(&format!("surface=\"{surface}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        shed_count("should_allow") + shed_count("envoy"),
        2,
        "{metrics}"
    );
}
