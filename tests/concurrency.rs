//! Exactness under concurrency: N callers racing on one key must see exactly
//! the limit admitted — on each store, and across two ratekeeper instances
//! sharing one Redis. Time is injected and held still, so the window cannot
//! roll over during a test however slow the machine is.

mod common;

use std::sync::Arc;

use common::{
    Backend, RedisServer, T0, TestServer, TestStore, allow_request, envoy_request, redis_store,
    rules,
};
use ratekeeper::clock::{Clock, ManualClock};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

const RULES: &str = r#"
domain: race
descriptors:
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 500}
  - key: bucket
    rate_limit: {algorithm: token_bucket, unit: hour, requests_per_unit: 1, burst: 300}
  - key: smooth
    rate_limit: {algorithm: sliding_window, unit: minute, requests_per_unit: 400}
"#;

/// The start of a minute, so the sliding window's previous window is empty.
const MINUTE_START: u64 = T0 - 40_000;

const CALLERS: usize = 64;
const CALLS: usize = 2_000;
const LIMIT: usize = 500;

/// Runs `CALLS` ShouldAllow calls on `key` from `CALLERS` tasks spread over
/// `servers` and returns how many were allowed.
async fn race_should_allow(servers: &[&TestServer], key: &'static str) -> usize {
    let mut clients = Vec::new();
    for server in servers {
        // Several connections per server so calls really run in parallel.
        for _ in 0..4 {
            clients.push(server.client().await);
        }
    }
    let tasks: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let mut client = clients[caller % clients.len()].clone();
            tokio::spawn(async move {
                let mut allowed = 0;
                for _ in 0..CALLS / CALLERS + usize::from(caller < CALLS % CALLERS) {
                    let request = allow_request("race", &[&[(key, "t1")]], 1);
                    if client
                        .should_allow(request)
                        .await
                        .unwrap()
                        .into_inner()
                        .allowed
                    {
                        allowed += 1;
                    }
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.unwrap();
    }
    allowed
}

async fn exactly_the_limit_is_admitted(backend: Backend) {
    let clock = Arc::new(ManualClock::new(T0));
    let store = TestStore::new(backend, clock);
    let server = TestServer::with(rules(&[RULES]), store.store.clone()).await;
    assert_eq!(race_should_allow(&[&server], "tenant").await, LIMIT);
}

/// Invariant: with a refill of one token per hour (nothing refills during
/// the test), exactly `burst` of the racing calls get a token.
async fn exactly_the_burst_of_a_token_bucket(backend: Backend) {
    let store = TestStore::new(backend, Arc::new(ManualClock::new(T0)));
    let server = TestServer::with(rules(&[RULES]), store.store.clone()).await;
    assert_eq!(race_should_allow(&[&server], "bucket").await, 300);
}

/// Invariant: in a fresh window (previous one empty), exactly the limit of
/// the racing calls are admitted by the sliding window.
async fn exactly_the_limit_of_a_sliding_window(backend: Backend) {
    let store = TestStore::new(backend, Arc::new(ManualClock::new(MINUTE_START)));
    let server = TestServer::with(rules(&[RULES]), store.store.clone()).await;
    assert_eq!(race_should_allow(&[&server], "smooth").await, 400);
}

async fn exactly_the_limit_is_ok_on_the_envoy_surface(backend: Backend) {
    let clock = Arc::new(ManualClock::new(T0));
    let store = TestStore::new(backend, clock);
    let server = TestServer::with(rules(&[RULES]), store.store.clone()).await;
    let client = server.envoy().await;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..CALLS / CALLERS + usize::from(caller < CALLS % CALLERS) {
                    let request = envoy_request("race", &[&[("tenant", "t1")]]);
                    let response = client
                        .should_rate_limit(request)
                        .await
                        .unwrap()
                        .into_inner();
                    ok += usize::from(response.overall_code() == Code::Ok);
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        ok += task.await.unwrap();
    }
    assert_eq!(ok, LIMIT);
}

both_stores!(
    exactly_the_limit_is_admitted,
    exactly_the_limit_is_ok_on_the_envoy_surface,
    exactly_the_burst_of_a_token_bucket,
    exactly_the_limit_of_a_sliding_window,
);

/// Two instances, each with its own pool, share one Redis: every
/// algorithm's limit holds across them, and is reached exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_exact_limit() {
    let redis = RedisServer::start();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(MINUTE_START));
    let store = || {
        Arc::new(
            redis_store(&redis.url(), std::time::Duration::from_secs(2)).with_clock(clock.clone()),
        )
    };
    let a = TestServer::with(rules(&[RULES]), store()).await;
    let b = TestServer::with(rules(&[RULES]), store()).await;
    assert_eq!(race_should_allow(&[&a, &b], "tenant").await, LIMIT);
    assert_eq!(race_should_allow(&[&a, &b], "bucket").await, 300);
    assert_eq!(race_should_allow(&[&a, &b], "smooth").await, 400);
}
