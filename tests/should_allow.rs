//! `ShouldAllow` end to end over gRPC, against both stores: all-or-nothing
//! consumption, dry runs, costs, exact remaining / reset / retry-after, and
//! the per-descriptor decisions for no rule, unlimited and shadow rules.

mod common;

use std::sync::Arc;

use common::{Backend, Harness, allow_request, assert_retry_is_exact};
use ratekeeper::clock::ManualClock;
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use ratekeeper::proto::ratekeeper::v1::{
    Decision, DescriptorResult, ShouldAllowRequest, ShouldAllowResponse,
};
use tonic::transport::Channel;

const RULES: &str = r#"
domain: app
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 5, name: per-user}
  - key: ip
    rate_limit: {unit: second, requests_per_unit: 2, name: per-ip}
  - key: plan
    value: premium
    rate_limit: {unlimited: true, name: premium}
  - key: trial
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1, name: trial}
"#;

struct Fixture {
    client: RateLimiterClient<Channel>,
    clock: Arc<ManualClock>,
    _harness: Harness,
}

async fn fixture(backend: Backend) -> Fixture {
    let harness = Harness::start(backend, RULES).await;
    Fixture {
        client: harness.server.client().await,
        clock: harness.clock.clone(),
        _harness: harness,
    }
}

impl Fixture {
    async fn call(&mut self, request: ShouldAllowRequest) -> ShouldAllowResponse {
        self.client
            .should_allow(request)
            .await
            .unwrap()
            .into_inner()
    }

    async fn ask(&mut self, descriptors: &[&[(&str, &str)]], cost: u64) -> ShouldAllowResponse {
        self.call(allow_request("app", descriptors, cost)).await
    }
}

/// (decision, limit, remaining, reset ms, retry ms) of one result.
fn brief(result: &DescriptorResult) -> (Decision, u64, u64, Option<u64>, Option<u64>) {
    let ms = |d: &prost_types::Duration| (d.seconds * 1000) as u64 + (d.nanos / 1_000_000) as u64;
    (
        result.decision(),
        result.limit,
        result.remaining,
        result.reset_after.as_ref().map(ms),
        result.retry_after.as_ref().map(ms),
    )
}

const USER: &[(&str, &str)] = &[("user", "alice")];
const IP: &[(&str, &str)] = &[("ip", "10.1.1.1")];

async fn counts_cost_and_reports_exact_times(backend: Backend) {
    let mut f = fixture(backend).await;
    let response = f.ask(&[USER], 2).await;
    assert!(response.allowed);
    assert_eq!(response.retry_after, None);
    let result = &response.results[0];
    assert_eq!(brief(result), (Decision::Allowed, 5, 3, Some(20_000), None));
    assert_eq!(result.rule_name, "per-user");
    assert_eq!(result.window.as_ref().map(|w| w.seconds), Some(60));
    // Cost 0 means 1.
    assert_eq!(
        brief(&f.ask(&[USER], 0).await.results[0]),
        (Decision::Allowed, 5, 2, Some(20_000), None)
    );
    // A cost that does not fit is denied and consumes nothing.
    f.clock.advance(1_500);
    let denied = f.ask(&[USER], 3).await;
    assert!(!denied.allowed);
    assert_eq!(
        brief(&denied.results[0]),
        (Decision::Denied, 5, 2, Some(18_500), Some(18_500))
    );
    assert_eq!(
        denied.retry_after.as_ref().map(|d| (d.seconds, d.nanos)),
        Some((18, 500_000_000))
    );
    // The 2 left are still there.
    assert_eq!(
        brief(&f.ask(&[USER], 2).await.results[0]),
        (Decision::Allowed, 5, 0, Some(18_500), None)
    );
}

async fn retry_after_is_exact(backend: Backend) {
    let mut f = fixture(backend).await;
    assert!(f.ask(&[USER], 5).await.allowed);
    let denied = f.ask(&[USER], 1).await;
    let wait = denied.results[0].retry_after.unwrap();
    let wait_ms = (wait.seconds * 1000) as u64 + (wait.nanos / 1_000_000) as u64;
    let request = allow_request("app", &[USER], 1);
    assert_retry_is_exact(&mut f.client, &f.clock, request, wait_ms).await;
}

async fn a_denied_request_consumes_nothing_anywhere(backend: Backend) {
    let mut f = fixture(backend).await;
    // ip allows 2 per second; user 5 per minute.
    assert!(f.ask(&[USER, IP], 2).await.allowed);
    let denied = f.ask(&[USER, IP], 1).await;
    assert!(!denied.allowed);
    assert_eq!(
        brief(&denied.results[0]),
        (Decision::Allowed, 5, 3, Some(20_000), None)
    );
    assert_eq!(
        brief(&denied.results[1]),
        (Decision::Denied, 2, 0, Some(1_000), Some(1_000))
    );
    // user kept its 3: exactly three more single calls pass alone.
    for left in [2, 1, 0] {
        assert_eq!(brief(&f.ask(&[USER], 1).await.results[0]).2, left);
    }
    assert!(!f.ask(&[USER], 1).await.allowed);
}

async fn the_request_waits_for_its_slowest_denial(backend: Backend) {
    let mut f = fixture(backend).await;
    assert!(f.ask(&[USER, IP], 2).await.allowed);
    assert!(f.ask(&[USER], 3).await.allowed);
    let denied = f.ask(&[USER, IP], 1).await;
    assert_eq!(denied.results[0].decision(), Decision::Denied);
    assert_eq!(denied.results[1].decision(), Decision::Denied);
    // user resets in 20 s, ip in 1 s: the request as a whole needs 20 s.
    assert_eq!(denied.retry_after.map(|d| d.seconds), Some(20));
    // A cost above a limit can never pass: no retry_after at all.
    let never = f.ask(&[IP], 3).await;
    assert!(!never.allowed);
    assert_eq!(never.results[0].retry_after, None);
    assert_eq!(never.retry_after, None);
}

async fn dry_runs_never_consume(backend: Backend) {
    let mut f = fixture(backend).await;
    let mut dry = allow_request("app", &[USER], 4);
    dry.dry_run = true;
    for _ in 0..3 {
        let response = f.call(dry.clone()).await;
        assert!(response.allowed);
        // Nothing was taken, so all 5 remain.
        assert_eq!(
            brief(&response.results[0]),
            (Decision::Allowed, 5, 5, Some(20_000), None)
        );
    }
    assert!(f.ask(&[USER], 4).await.allowed);
    let response = f.call(dry).await;
    assert!(!response.allowed);
    assert_eq!(
        brief(&response.results[0]),
        (Decision::Denied, 5, 1, Some(20_000), Some(20_000))
    );
    assert_eq!(brief(&f.ask(&[USER], 1).await.results[0]).2, 0);
}

async fn no_rule_unlimited_and_shadow_results(backend: Backend) {
    let mut f = fixture(backend).await;
    let response = f
        .ask(
            &[
                &[("unknown", "x")],
                &[("plan", "premium")],
                &[("trial", "t")],
            ],
            1,
        )
        .await;
    assert!(response.allowed);
    let [none, premium, trial] = &response.results[..] else {
        panic!("{response:?}")
    };
    assert_eq!(brief(none), (Decision::NoRule, 0, 0, None, None));
    assert_eq!(none.rule_name, "");
    assert_eq!(brief(premium), (Decision::Allowed, 0, 0, None, None));
    assert!(premium.unlimited);
    assert_eq!(premium.rule_name, "premium");
    assert_eq!(brief(trial), (Decision::Allowed, 1, 0, Some(20_000), None));
    assert!(trial.shadow_mode);
    // The shadow rule is now over its limit: reported, but the request passes
    // and the other descriptor is consumed.
    let response = f.ask(&[&[("trial", "t")], USER], 1).await;
    assert!(response.allowed);
    assert_eq!(response.results[0].decision(), Decision::Denied);
    assert!(response.results[0].shadow_mode);
    assert_eq!(response.retry_after, None);
    assert_eq!(response.results[1].remaining, 4);
}

async fn unknown_domains_allow_everything(backend: Backend) {
    let mut f = fixture(backend).await;
    for _ in 0..10 {
        let response = f.call(allow_request("elsewhere", &[USER], 100)).await;
        assert!(response.allowed);
        assert_eq!(response.results[0].decision(), Decision::NoRule);
    }
}

both_stores!(
    counts_cost_and_reports_exact_times,
    retry_after_is_exact,
    a_denied_request_consumes_nothing_anywhere,
    the_request_waits_for_its_slowest_denial,
    dry_runs_never_consume,
    no_rule_unlimited_and_shadow_results,
    unknown_domains_allow_everything,
);
