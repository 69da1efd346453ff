//! The algorithms end to end, chosen per rule in config: token bucket and
//! sliding window through both APIs, window multipliers, several algorithms
//! in one all-or-nothing request, dry runs, and upstream's opt-in
//! STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT — against both stores.

mod common;

use common::{
    Backend, Harness, TestServer, allow_request, assert_retry_is_exact, envoy_request, rules,
};
use ratekeeper::Server;
use ratekeeper::api::EnvoyCounting;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::ratekeeper::v1::{
    Algorithm, Decision, DescriptorResult, ShouldAllowResponse,
};

const RULES: &str = r#"
domain: algo
descriptors:
  - key: bucket
    rate_limit: {algorithm: token_bucket, unit: minute, requests_per_unit: 1, burst: 5, name: bucket}
  - key: smooth
    rate_limit: {algorithm: sliding_window, unit: minute, unit_multiplier: 2, requests_per_unit: 4, name: smooth}
  - key: fixed
    rate_limit: {algorithm: fixed_window, unit: second, unit_multiplier: 30, requests_per_unit: 10, name: fixed}
  - key: plain
    rate_limit: {unit: minute, requests_per_unit: 20}
  - key: hourly
    rate_limit: {unit: hour, requests_per_unit: 10}
"#;

fn ms(d: &Option<prost_types::Duration>) -> Option<u64> {
    d.as_ref()
        .map(|d| (d.seconds * 1000) as u64 + (d.nanos / 1_000_000) as u64)
}

/// Each result's `remaining`, in order.
fn remaining(response: &ShouldAllowResponse) -> Vec<u64> {
    response.results.iter().map(|r| r.remaining).collect()
}

fn brief(r: &DescriptorResult) -> (Decision, u64, u64, Option<u64>, Option<u64>) {
    (
        r.decision(),
        r.limit,
        r.remaining,
        ms(&r.reset_after),
        ms(&r.retry_after),
    )
}

async fn token_bucket_bursts_then_refills(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let mut client = h.server.client().await;
    let ask = |cost| allow_request("algo", &[&[("bucket", "b")]], cost);
    let first = client.should_allow(ask(3)).await.unwrap().into_inner();
    let r = &first.results[0];
    // 5 tokens, 1 per minute: after 3 the bucket is full again in 3 minutes.
    assert_eq!(brief(r), (Decision::Allowed, 1, 2, Some(180_000), None));
    assert_eq!((r.algorithm(), r.burst), (Algorithm::TokenBucket, 5));
    assert_eq!(ms(&r.window), Some(60_000));
    assert!(
        client
            .should_allow(ask(2))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let denied = client.should_allow(ask(1)).await.unwrap().into_inner();
    assert_eq!(
        brief(&denied.results[0]),
        (Decision::Denied, 1, 0, Some(300_000), Some(60_000))
    );
    // A cost above the burst can never pass.
    let never = client.should_allow(ask(6)).await.unwrap().into_inner();
    assert_eq!(never.results[0].retry_after, None);
    assert_retry_is_exact(&mut client, &h.clock, ask(1), 60_000).await;
}

async fn sliding_window_with_a_multiplied_window(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let mut client = h.server.client().await;
    let ask = |cost| allow_request("algo", &[&[("smooth", "s")]], cost);
    // T0 is 40 s into a minute and 100 s into a 2-minute window.
    let r = client.should_allow(ask(4)).await.unwrap().into_inner();
    assert_eq!(
        brief(&r.results[0]),
        (Decision::Allowed, 4, 0, Some(140_000), None)
    );
    assert_eq!(ms(&r.results[0].window), Some(120_000));
    assert_eq!(r.results[0].algorithm(), Algorithm::SlidingWindow);
    // In the next window the 4 fade out: one fits once 4 × (120 − e)/120 ≤ 3,
    // i.e. 30 s into it — 20 s + 30 s from now.
    let denied = client.should_allow(ask(1)).await.unwrap().into_inner();
    assert_eq!(ms(&denied.results[0].retry_after), Some(50_000));
    assert_retry_is_exact(&mut client, &h.clock, ask(1), 50_000).await;
}

async fn mixed_algorithms_are_all_or_nothing(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let mut client = h.server.client().await;
    let all: &[&[(&str, &str)]] = &[&[("bucket", "m")], &[("smooth", "m")], &[("fixed", "m")]];
    // Dry run: would pass, consumes nothing.
    let mut dry = allow_request("algo", all, 4);
    dry.dry_run = true;
    let response = client.should_allow(dry).await.unwrap().into_inner();
    assert!(response.allowed);
    assert_eq!(remaining(&response), [5, 4, 10]);
    // Cost 4 fits all three.
    let response = client
        .should_allow(allow_request("algo", all, 4))
        .await
        .unwrap()
        .into_inner();
    assert!(response.allowed);
    assert_eq!(remaining(&response), [1, 0, 6]);
    // Cost 1: the bucket has 1 left and the fixed window 6, but the sliding
    // window is full — nothing is taken from the others.
    let response = client
        .should_allow(allow_request("algo", all, 1))
        .await
        .unwrap()
        .into_inner();
    assert!(!response.allowed);
    let decisions: Vec<Decision> = response.results.iter().map(|r| r.decision()).collect();
    assert_eq!(
        decisions,
        [Decision::Allowed, Decision::Denied, Decision::Allowed]
    );
    assert_eq!(remaining(&response), [1, 0, 6]);
    let bucket_alone = client
        .should_allow(allow_request("algo", &[&[("bucket", "m")]], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bucket_alone.results[0].remaining, 0);
}

async fn envoy_reports_each_algorithm(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let mut envoy = h.server.envoy().await;
    let call = |entries: &'static [(&'static str, &'static str)]| {
        let mut envoy = envoy.clone();
        async move {
            let response = envoy
                .should_rate_limit(envoy_request("algo", &[entries]))
                .await
                .unwrap();
            let status = response.into_inner().statuses.remove(0);
            (
                status.code(),
                status.limit_remaining,
                status.duration_until_reset.unwrap().seconds,
            )
        }
    };
    // Token bucket: duration_until_reset is the time to refill completely.
    assert_eq!(call(&[("bucket", "e")]).await, (Code::Ok, 4, 60));
    for _ in 0..4 {
        call(&[("bucket", "e")]).await;
    }
    assert_eq!(call(&[("bucket", "e")]).await, (Code::OverLimit, 0, 300));
    // Rejected hits take no tokens: one minute later exactly one fits again.
    h.clock.advance(60_000);
    assert_eq!(call(&[("bucket", "e")]).await, (Code::Ok, 0, 300));
    // Fixed window of 30 s: T0 + 60 s is 10 s into one.
    assert_eq!(call(&[("fixed", "e")]).await, (Code::Ok, 9, 20));
    let limit = envoy
        .should_rate_limit(envoy_request("algo", &[&[("smooth", "e")]]))
        .await
        .unwrap()
        .into_inner()
        .statuses
        .remove(0)
        .current_limit
        .unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.name.as_str()),
        (4, "smooth")
    );
}

/// Upstream's own example: a 20/min descriptor keeps its count while its
/// 10/hour sibling is over the limit.
async fn stop_increment_when_over_limit(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let store = h.store.store.clone();
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store).with_envoy_counting(EnvoyCounting::StopWhenOverLimit),
    )
    .await;
    let mut envoy = server.envoy().await;
    let both: &[&[(&str, &str)]] = &[&[("plain", "p")], &[("hourly", "h")]];
    for i in 1..=10u32 {
        let r = envoy
            .should_rate_limit(envoy_request("algo", both))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.overall_code(), Code::Ok);
        assert_eq!(
            (r.statuses[0].limit_remaining, r.statuses[1].limit_remaining),
            (20 - i, 10 - i)
        );
    }
    for _ in 0..3 {
        let r = envoy
            .should_rate_limit(envoy_request("algo", both))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.overall_code(), Code::OverLimit);
        assert_eq!(r.statuses[0].code(), Code::Ok);
        assert_eq!(r.statuses[0].limit_remaining, 10);
        assert_eq!(r.statuses[1].code(), Code::OverLimit);
    }
    // The default server counts the rejected requests against `plain` too.
    let mut default = h.server.envoy().await;
    let r = default
        .should_rate_limit(envoy_request("algo", both))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 9);
}

both_stores!(
    token_bucket_bursts_then_refills,
    sliding_window_with_a_multiplied_window,
    mixed_algorithms_are_all_or_nothing,
    envoy_reports_each_algorithm,
    stop_increment_when_over_limit,
);
