//! When Redis fails mid-load, answers follow the configured failure policy
//! — `error`, `allow`, `deny`, `local` — and no call waits longer than the
//! store deadline; with the circuit breaker open, calls stop waiting at all,
//! and service resumes by itself when Redis is back. These are the few
//! end-to-end checks; the branches are unit-tested over a scripted store
//! (`limiter`, `store::breaker`). Time bounds are generous margins, and the
//! breaker's work is counted, not timed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{RedisServer, TestServer, allow_request, http_get, redis_store, rules};
use ratekeeper::Server;
use ratekeeper::clock::ManualClock;
use ratekeeper::limiter::FailurePolicy;
use ratekeeper::proto::ratekeeper::v1::ShouldAllowResponse;
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use ratekeeper::store::CircuitBreaker;
use tonic::transport::Channel;

const RULES: &str = r#"
domain: fp
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 3}
"#;

const DEADLINE: Duration = Duration::from_millis(100);
/// Scheduling slack on a slow, loaded machine; far below anything that hangs.
const MARGIN: Duration = Duration::from_secs(2);

async fn call(
    client: &mut RateLimiterClient<Channel>,
    user: &str,
) -> (Result<ShouldAllowResponse, tonic::Code>, Duration) {
    let started = Instant::now();
    let result = client
        .should_allow(allow_request("fp", &[&[("user", user)]], 1))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.code());
    (result, started.elapsed())
}

async fn start(redis: &RedisServer, policy: FailurePolicy) -> TestServer {
    let store = Arc::new(redis_store(&redis.url(), DEADLINE));
    // The local fallback counts on a fixed time: no window boundary passes.
    TestServer::start(
        Server::new(rules(&[RULES]), store)
            .with_failure_policy(policy)
            .with_clock(Arc::new(ManualClock::new(common::T0))),
    )
    .await
}

/// Kills Redis after one good call, then makes calls and returns their
/// answers; asserts none took longer than the deadline plus margin.
async fn answers_after_kill(
    policy: FailurePolicy,
    calls: usize,
) -> Vec<Result<ShouldAllowResponse, tonic::Code>> {
    let mut redis = RedisServer::start();
    let server = start(&redis, policy).await;
    let mut client = server.client().await;
    assert!(call(&mut client, "warm").await.0.unwrap().allowed);
    redis.kill();
    let mut answers = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..calls {
        let (answer, took) = call(&mut client, "u").await;
        assert!(took < DEADLINE + MARGIN, "{policy:?}: a call took {took:?}");
        slowest = slowest.max(took);
        answers.push(answer);
    }
    // The figure the README's reliability section quotes (run with --nocapture).
    println!("redis killed, policy {policy:?}: slowest call {slowest:?} (deadline {DEADLINE:?})");
    let metrics = http_get(server.admin_addr, "/metrics").await;
    if policy != FailurePolicy::Error {
        assert!(
            metrics.contains("ratelimit_degraded_total{policy="),
            "{metrics}"
        );
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_error_answers_unavailable() {
    for answer in answers_after_kill(FailurePolicy::Error, 5).await {
        assert_eq!(answer.unwrap_err(), tonic::Code::Unavailable);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_allow_fails_open() {
    for answer in answers_after_kill(FailurePolicy::Allow, 5).await {
        assert!(answer.unwrap().allowed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_deny_fails_closed() {
    for answer in answers_after_kill(FailurePolicy::Deny, 5).await {
        let answer = answer.unwrap();
        assert!(!answer.allowed);
        assert_eq!(answer.retry_after, None);
    }
}

/// `local` counts the same rules in memory: exactly the limit passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_local_counts_in_memory() {
    let allowed: Vec<bool> = answers_after_kill(FailurePolicy::Local, 5)
        .await
        .into_iter()
        .map(|a| a.unwrap().allowed)
        .collect();
    assert_eq!(allowed, [true, true, true, false, false]);
}

/// The store errors counted with `reason` so far.
fn store_errors(metrics: &str, reason: &str) -> u64 {
    let prefix =
        format!("ratelimit_storage_errors_total{{backend=\"redis\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Redis frozen: without a breaker every call would wait the full deadline;
/// once the breaker opens, calls are answered by policy without calling the
/// store. When Redis resumes, the readiness ping closes the breaker and
/// counting in Redis resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_stops_paying_the_deadline_and_recovers() {
    let redis = RedisServer::start();
    // A cooldown longer than the test: no probe, so what happens is exact.
    let store = Arc::new(CircuitBreaker::new(
        Arc::new(redis_store(&redis.url(), DEADLINE)),
        3,
        Duration::from_secs(3600),
    ));
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store)
            .with_failure_policy(FailurePolicy::Allow)
            .with_readiness_interval(Duration::from_millis(100)),
    )
    .await;
    let mut client = server.client().await;
    assert_eq!(
        call(&mut client, "a").await.0.unwrap().results[0].remaining,
        2
    );

    redis.pause();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let (answer, took) = call(&mut client, "a").await;
        assert!(answer.unwrap().allowed);
        assert!(took < DEADLINE + MARGIN, "{took:?}");
        slowest = slowest.max(took);
    }
    let metrics = http_get(server.admin_addr, "/metrics").await;
    let (waited, open) = (
        store_errors(&metrics, "timeout"),
        store_errors(&metrics, "circuit_open"),
    );
    // The readiness pings also time out (and do not count); the three
    // calls that did opened the breaker, and every later call skipped Redis.
    println!(
        "redis frozen, breaker: {waited} calls waited the deadline, {open} answered at once (slowest {slowest:?})"
    );
    assert_eq!((waited, open), (3, 17), "{metrics}");

    redis.resume();
    let started = Instant::now();
    loop {
        // Degraded answers claim no remaining hits; a real answer does.
        if call(&mut client, "b").await.0.unwrap().results[0].remaining > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no recovery after Redis resumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "redis resumed: counting in redis again after {:?}",
        started.elapsed()
    );
}

/// A stall of Redis shorter than the breaker's patience: the calls in
/// flight during it fail (they were late together, one failure), and the
/// next call after it is counted in Redis again. Counted per decision, the
/// sixteen late decisions opened the breaker, and every request failed for
/// a whole cooldown after a single stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stall_fails_only_the_calls_it_held() {
    let redis = RedisServer::start();
    // No cooldown or readiness ping ends an opened breaker within the test.
    // A deadline of a second: the 16 calls are admitted together even on a
    // loaded machine (the breaker would see a second wave only if some
    // reached it a whole deadline after the first failed).
    let store = Arc::new(CircuitBreaker::new(
        Arc::new(redis_store(&redis.url(), Duration::from_secs(1))),
        3,
        Duration::from_secs(3600),
    ));
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store).with_readiness_interval(Duration::from_secs(3600)),
    )
    .await;
    let client = server.client().await;
    assert!(call(&mut client.clone(), "warm").await.0.unwrap().allowed);

    redis.pause();
    let held: Vec<_> = (0..16)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move { call(&mut client, &format!("held{i}")).await.0 })
        })
        .collect();
    for answer in futures::future::join_all(held).await {
        assert_eq!(answer.unwrap().unwrap_err(), tonic::Code::Unavailable);
    }
    redis.resume();

    let (answer, _) = call(&mut client.clone(), "after").await;
    let answer = answer.expect("the call after the stall is answered by Redis");
    assert_eq!(answer.results[0].remaining, 2);
    let metrics = http_get(server.admin_addr, "/metrics").await;
    assert_eq!(store_errors(&metrics, "circuit_open"), 0, "{metrics}");
    assert_eq!(store_errors(&metrics, "timeout"), 16, "{metrics}");
}

const PER_RULE: &str = r#"
domain: per_rule
descriptors:
  - key: open
    rate_limit: {unit: hour, requests_per_unit: 1, failure_policy: allow}
  - key: closed
    rate_limit: {unit: hour, requests_per_unit: 1, failure_policy: deny}
  - key: counted
    rate_limit: {unit: hour, requests_per_unit: 2, failure_policy: local}
  - key: plain
    rate_limit: {unit: hour, requests_per_unit: 1}
"#;

/// Per-rule policies override the service's (`error` here) for their own
/// descriptors; a request holding one `error` descriptor still fails as a
/// whole. Envoy's API reports each descriptor by its own policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_rule_policies_override_the_service_policy() {
    use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

    let mut redis = RedisServer::start();
    let store = Arc::new(redis_store(&redis.url(), DEADLINE));
    let server = TestServer::start(
        Server::new(rules(&[PER_RULE]), store)
            .with_failure_policy(FailurePolicy::Error)
            .with_clock(Arc::new(ManualClock::new(common::T0))),
    )
    .await;
    let mut client = server.client().await;
    let mut envoy = server.envoy().await;
    redis.kill();

    let mut ask = async |descriptors: &[&[(&str, &str)]]| {
        let started = Instant::now();
        let answer = client
            .should_allow(allow_request("per_rule", descriptors, 1))
            .await
            .map(|r| r.into_inner().allowed)
            .map_err(|s| s.code());
        assert!(
            started.elapsed() < DEADLINE + MARGIN,
            "{:?}",
            started.elapsed()
        );
        answer
    };
    // Twice each: the limits are 1, so a second `allow` shows nothing counts.
    for _ in 0..2 {
        assert_eq!(ask(&[&[("open", "x")]]).await, Ok(true));
        assert_eq!(ask(&[&[("closed", "x")]]).await, Ok(false));
    }
    assert_eq!(ask(&[&[("counted", "x")]]).await, Ok(true));
    assert_eq!(ask(&[&[("counted", "x")]]).await, Ok(true));
    assert_eq!(ask(&[&[("counted", "x")]]).await, Ok(false));
    assert_eq!(
        ask(&[&[("plain", "x")]]).await,
        Err(tonic::Code::Unavailable)
    );
    assert_eq!(
        ask(&[&[("open", "y")], &[("plain", "y")]]).await,
        Err(tonic::Code::Unavailable)
    );
    // All-or-nothing: denied by `closed`, so `counted` (value z) is only
    // checked and still has both its hits afterwards.
    assert_eq!(
        ask(&[&[("counted", "z")], &[("closed", "z")]]).await,
        Ok(false)
    );
    assert_eq!(ask(&[&[("counted", "z")]]).await, Ok(true));
    assert_eq!(ask(&[&[("counted", "z")]]).await, Ok(true));

    let response = envoy
        .should_rate_limit(common::envoy_request(
            "per_rule",
            &[&[("open", "e")], &[("closed", "e")], &[("counted", "e")]],
        ))
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<Code> = response.statuses.iter().map(|s| s.code()).collect();
    assert_eq!(codes, [Code::Ok, Code::OverLimit, Code::Ok]);
    assert_eq!(response.overall_code(), Code::OverLimit);

    let metrics = http_get(server.admin_addr, "/metrics").await;
    for policy in ["allow", "deny", "local"] {
        assert!(
            metrics.contains(&format!("ratelimit_degraded_total{{policy=\"{policy}\"}}")),
            "{policy}: {metrics}"
        );
    }
    assert!(
        !metrics.contains("ratelimit_degraded_total{policy=\"error\"}"),
        "{metrics}"
    );
    // `/rules` shows each rule's own policy; `null` follows the service's.
    let listed = http_get(server.admin_addr, "/rules").await;
    for shown in [
        r#""failure_policy":"allow""#,
        r#""failure_policy":"deny""#,
        r#""failure_policy":"local""#,
        r#""failure_policy":null"#,
    ] {
        assert!(listed.contains(shown), "{shown}: {listed}");
    }
}
