//! The Redis store when Redis goes away: calls fail fast with UNAVAILABLE
//! (never hang), descriptors without a limit still pass, service resumes by
//! itself when Redis is back — no restart — and readiness follows what the
//! instance can answer under its failure policies.
//!
//! Bounds on time are behaviour with generous margins (a call that "hangs"
//! would take the whole test); the measured figures are printed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{RedisServer, TestServer, allow_request, envoy_request, http_get, redis_store, rules};
use ratekeeper::Server;
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const RULES: &str = r#"
domain: app
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 1000}
"#;

/// The store deadline used here.
const TIMEOUT: Duration = Duration::from_millis(100);
/// Slack for a slow, loaded machine: far below anything that hangs.
const MARGIN: Duration = Duration::from_secs(2);
/// How long recovery may take here before the test calls it stuck.
const RECOVERY: Duration = Duration::from_secs(10);

async fn ask(client: &mut RateLimiterClient<Channel>) -> (Result<bool, Code>, Duration) {
    let started = Instant::now();
    let result = client
        .should_allow(allow_request("app", &[&[("user", "u")]], 1))
        .await
        .map(|r| r.into_inner().allowed)
        .map_err(|s| s.code());
    (result, started.elapsed())
}

/// Calls until one is allowed; returns how long that took. Bounded.
async fn until_allowed(client: &mut RateLimiterClient<Channel>, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if ask(client).await.0 == Ok(true) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "not recovered within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A server on the Redis at `url`, with the store deadline `TIMEOUT`.
async fn start(url: &str) -> TestServer {
    TestServer::with(rules(&[RULES]), Arc::new(redis_store(url, TIMEOUT))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    let mut redis = RedisServer::start();
    let server = start(&redis.url()).await;
    let mut client = server.client().await;
    assert_eq!(ask(&mut client).await.0, Ok(true));

    redis.kill();
    for _ in 0..20 {
        let (result, took) = ask(&mut client).await;
        assert_eq!(result, Err(Code::Unavailable));
        assert!(took < TIMEOUT + MARGIN, "took {took:?}");
    }
    let status = client
        .should_allow(allow_request("app", &[&[("user", "u")]], 1))
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("rate limit store unavailable"),
        "{}",
        status.message()
    );
    // Descriptors without a limit never touch the store.
    let mut envoy = server.envoy().await;
    let unmatched = envoy
        .should_rate_limit(envoy_request("app", &[&[("nothing", "x")]]))
        .await;
    assert!(unmatched.is_ok(), "{unmatched:?}");

    redis.restart();
    let took = until_allowed(&mut client, RECOVERY).await;
    println!("redis restarted: first allowed call {took:?} after redis accepted connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_costs_at_most_the_deadline() {
    let redis = RedisServer::start();
    let server = start(&redis.url()).await;
    let mut client = server.client().await;
    assert_eq!(ask(&mut client).await.0, Ok(true));

    redis.pause();
    for _ in 0..5 {
        let started = Instant::now();
        let status = client
            .should_allow(allow_request("app", &[&[("user", "u")]], 1))
            .await
            .unwrap_err();
        let took = started.elapsed();
        // The deadline answered, not the socket: the call waited for it and
        // no longer than it allows.
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("timed out after 100ms"),
            "{status:?}"
        );
        assert!(took >= TIMEOUT && took < TIMEOUT + MARGIN, "took {took:?}");
    }
    redis.resume();
    until_allowed(&mut client, RECOVERY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_starts_before_redis_and_serves_once_it_is_up() {
    let port = common::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let server = TestServer::with(rules(&[RULES]), Arc::new(redis_store(&url, TIMEOUT))).await;
    let mut client = server.client().await;
    let (result, took) = ask(&mut client).await;
    assert_eq!(result, Err(Code::Unavailable));
    assert!(took < TIMEOUT + MARGIN, "took {took:?}");
    let ready = http_get(server.admin_addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("not ready: redis store"), "{ready}");

    let _redis = RedisServer::start_on(port, &[]);
    until_allowed(&mut client, RECOVERY).await;
    until_ready(server.admin_addr, true).await;
}

/// Polls `/readyz` until it says `ready` (or not), at most 5 s.
async fn until_ready(admin: std::net::SocketAddr, ready: bool) {
    let started = Instant::now();
    loop {
        let response = http_get(admin, "/readyz").await;
        if response.starts_with("HTTP/1.1 200") == ready {
            return;
        }
        assert!(
            started.elapsed() < RECOVERY,
            "readiness never became {ready}: {response}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn health_status(server: &TestServer) -> ServingStatus {
    let mut health = HealthClient::new(server.channel().await);
    let request = HealthCheckRequest {
        service: "envoy.service.ratelimit.v3.RateLimitService".into(),
    };
    health.check(request).await.unwrap().into_inner().status()
}

/// `/readyz` and gRPC health follow Redis: unready when it stops, ready
/// again when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis() {
    let mut redis = RedisServer::start();
    let store = Arc::new(redis_store(&redis.url(), TIMEOUT));
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store).with_readiness_interval(Duration::from_millis(50)),
    )
    .await;
    until_ready(server.admin_addr, true).await;
    assert_eq!(health_status(&server).await, ServingStatus::Serving);

    redis.kill();
    until_ready(server.admin_addr, false).await;
    let body = http_get(server.admin_addr, "/readyz").await;
    assert!(body.contains("not ready: redis store"), "{body}");
    assert_eq!(health_status(&server).await, ServingStatus::NotServing);

    redis.restart();
    until_ready(server.admin_addr, true).await;
    assert_eq!(health_status(&server).await, ServingStatus::Serving);
}

const PER_RULE_ERROR: &str = r#"
domain: app
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 1000}
  - key: payment
    rate_limit: {unit: hour, requests_per_unit: 10, failure_policy: error}
"#;

/// With a failure policy that answers without the store, a Redis outage
/// leaves the instance ready (and says it is degraded): making every
/// instance unready would only take the policy away. A rule whose own
/// policy is `error` makes it unready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_what_the_instance_can_answer() {
    for (policy, rules_yaml, ready) in [
        (ratekeeper::limiter::FailurePolicy::Allow, RULES, true),
        (ratekeeper::limiter::FailurePolicy::Local, RULES, true),
        (
            ratekeeper::limiter::FailurePolicy::Allow,
            PER_RULE_ERROR,
            false,
        ),
        (ratekeeper::limiter::FailurePolicy::Error, RULES, false),
    ] {
        let mut redis = RedisServer::start();
        let store = Arc::new(redis_store(&redis.url(), TIMEOUT));
        let server = TestServer::start(
            Server::new(rules(&[rules_yaml]), store)
                .with_failure_policy(policy)
                .with_readiness_interval(Duration::from_millis(50)),
        )
        .await;
        until_ready(server.admin_addr, true).await;
        redis.kill();
        // Wait for the monitor to see the outage, whatever it concludes.
        let started = Instant::now();
        let body = loop {
            let body = http_get(server.admin_addr, "/readyz").await;
            if body.contains("store") {
                break body;
            }
            assert!(
                started.elapsed() < RECOVERY,
                "{policy}: outage never seen: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let status = health_status(&server).await;
        if ready {
            assert!(body.starts_with("HTTP/1.1 200"), "{policy}: {body}");
            assert!(
                body.contains("ready (degraded: redis store down"),
                "{policy}: {body}"
            );
            assert!(
                body.contains("answering by failure policy"),
                "{policy}: {body}"
            );
            assert_eq!(status, ServingStatus::Serving, "{policy}");
            let mut client = server.client().await;
            assert_eq!(ask(&mut client).await.0, Ok(true), "{policy}");
        } else {
            assert!(body.starts_with("HTTP/1.1 503"), "{policy}: {body}");
            assert_eq!(status, ServingStatus::NotServing, "{policy}");
        }
    }
}
