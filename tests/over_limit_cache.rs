//! The over-limit cache in front of Redis: once Redis has denied a counter,
//! repeat offenders are denied without a round trip until the known retry
//! time, then Redis decides again; it never denies what Redis would allow.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    RedisServer, T0, TestServer, allow_request, envoy_request, http_get, redis_store, rules,
};
use ratekeeper::Server;
use ratekeeper::clock::{Clock, ManualClock};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::store::OverLimitCache;

const RULES: &str = r#"
domain: olc
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: team
    rate_limit: {unit: minute, requests_per_unit: 100}
"#;

fn decision_calls(redis: &RedisServer) -> u64 {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.connection())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_fcall:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A server on `redis` with the over-limit cache, both on one injected clock.
async fn start(redis: &RedisServer) -> (TestServer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    let store = Arc::new(
        redis_store(&redis.url(), Duration::from_secs(2))
            .with_clock(clock.clone() as Arc<dyn Clock>),
    );
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store)
            .with_over_limit_cache(OverLimitCache::new(1_000, clock.clone()))
            // No readiness pings during the test: only decisions reach Redis.
            .with_readiness_interval(Duration::from_secs(3600)),
    )
    .await;
    (server, clock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeat_offenders_are_denied_without_a_round_trip() {
    let redis = RedisServer::start();
    let (server, clock) = start(&redis).await;
    let envoy = server.envoy().await;
    let call = |user: &'static str| {
        let mut envoy = envoy.clone();
        async move {
            let response = envoy
                .should_rate_limit(envoy_request("olc", &[&[("user", user)]]))
                .await
                .unwrap();
            let status = response.into_inner().statuses.remove(0);
            (status.code(), status.duration_until_reset.unwrap().seconds)
        }
    };
    assert_eq!(call("a").await, (Code::Ok, 20));
    assert_eq!(call("a").await, (Code::Ok, 20));
    assert_eq!(call("a").await, (Code::OverLimit, 20));
    let before = decision_calls(&redis);
    for _ in 0..5 {
        assert_eq!(call("a").await, (Code::OverLimit, 20));
    }
    assert_eq!(
        decision_calls(&redis),
        before,
        "cached denials went to Redis"
    );
    // Other counters are not affected.
    assert_eq!(call("b").await.0, Code::Ok);
    let metrics = http_get(server.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("ratelimit_over_limit_cache_hits_total{domain=\"olc\"} 5"),
        "{metrics}"
    );

    // At the known reset time Redis decides again, and allows.
    clock.advance(20_000);
    assert_eq!(call("a").await, (Code::Ok, 60));
    assert_eq!(decision_calls(&redis), before + 2);
}

/// In an all-or-nothing request, a cached denial denies the request and the
/// other descriptors are not consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_denial_consumes_nothing_else() {
    let redis = RedisServer::start();
    let (server, _clock) = start(&redis).await;
    let mut client = server.client().await;
    for _ in 0..3 {
        client
            .should_allow(allow_request("olc", &[&[("user", "c")]], 1))
            .await
            .unwrap();
    }
    let both = allow_request("olc", &[&[("user", "c")], &[("team", "t")]], 1);
    for _ in 0..3 {
        let response = client
            .should_allow(both.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(!response.allowed);
        assert_eq!(response.results[1].remaining, 100);
    }
    let alone = client
        .should_allow(allow_request("olc", &[&[("team", "t")]], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alone.results[0].remaining, 99);
}
