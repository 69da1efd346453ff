//! Load shedding: past `--max-in-flight` requests being decided, one more
//! is refused at once with RESOURCE_EXHAUSTED and counted, on both APIs;
//! once the requests in flight are answered, requests are decided again.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{RedisServer, TestServer, allow_request, envoy_request, http_get, rules};
use ratekeeper::Server;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code as EnvoyCode;
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
    let calls = [
        tokio::spawn(async move {
            first
                .should_allow(allow_request("shed", &[&[("user", "a")]], 1))
                .await
                .map(|r| r.into_inner().allowed)
        }),
        tokio::spawn(async move {
            second
                .should_allow(allow_request("shed", &[&[("user", "b")]], 1))
                .await
                .map(|r| r.into_inner().allowed)
        }),
        tokio::spawn(async move {
            envoy
                .should_rate_limit(envoy_request("shed", &[&[("user", "c")]]))
                .await
                .map(|r| r.into_inner().overall_code() == EnvoyCode::Ok)
        }),
    ];
    // Bounded: the shed ones answer at once, the admitted one waits for
    // Redis for as long as it is frozen.
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls.iter().filter(|call| call.is_finished()).count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the extra requests were not shed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.resume();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    let shed: Vec<&tonic::Status> = answers
        .iter()
        .filter_map(|answer| answer.as_ref().err())
        .filter(|status| status.code() == Code::ResourceExhausted)
        .collect();
    assert_eq!(shed.len(), 2, "{answers:?}");
    assert!(
        shed.iter().all(|s| s.message().contains("overloaded")),
        "{shed:?}"
    );
    // The admitted request was decided once Redis answered again.
    assert_eq!(
        answers.iter().filter(|a| matches!(a, Ok(true))).count(),
        1,
        "{answers:?}"
    );
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
