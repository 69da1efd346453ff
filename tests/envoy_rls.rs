//! Envoy RLS v3 (`ShouldRateLimit`) end to end over gRPC, against both
//! stores: every matching rule of envoyproxy/ratelimit, with the exact
//! `current_limit`, `limit_remaining`, `duration_until_reset` and codes it
//! would answer. Time is injected (T0, 40 s into a minute) so durations are exact.

mod common;

use std::sync::Arc;

use common::{Backend, Harness, T0, TestServer, envoy_descriptor, envoy_request, rules};
use ratekeeper::clock::ManualClock;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus,
};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ratekeeper::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::transport::Channel;

const RULES: &str = r#"
domain: rls
descriptors:
  - key: key1
    value: value1
    rate_limit: {unit: minute, requests_per_unit: 3, name: k1}
    descriptors:
      - key: subkey1
        rate_limit: {unit: HOUR, requests_per_unit: 2}
  - key: user
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: user
    value: admin
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 2, name: api}
  - key: path
    value: /api/exact
    rate_limit: {unit: minute, requests_per_unit: 5, name: exact}
  - key: path
    value: /shared/*
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: org
    rate_limit: {unit: day, requests_per_unit: 1, name: org-daily}
  - key: plan
    value: premium
    rate_limit:
      unlimited: true
      replaces: [{name: org-daily}]
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: parent
    descriptors:
      - key: child
        rate_limit: {unit: minute, requests_per_unit: 1}
  - key: zero
    rate_limit: {unit: minute, requests_per_unit: 0}
"#;

/// What a status says, compactly: code, (limit, unit, name), remaining, reset seconds.
type Summary = (Code, Option<(u32, Unit, String)>, u32, Option<i64>);

fn summary(status: &DescriptorStatus) -> Summary {
    (
        status.code(),
        status
            .current_limit
            .as_ref()
            .map(|l| (l.requests_per_unit, l.unit(), l.name.clone())),
        status.limit_remaining,
        status.duration_until_reset.as_ref().map(|d| {
            assert_eq!(d.nanos, 0, "whole seconds only");
            d.seconds
        }),
    )
}

fn limited(code: Code, limit: u32, unit: Unit, name: &str, remaining: u32, reset: i64) -> Summary {
    (
        code,
        Some((limit, unit, name.to_owned())),
        remaining,
        Some(reset),
    )
}

const NO_LIMIT: Summary = (Code::Ok, None, 0, None);
const UNLIMITED: Summary = (Code::Ok, None, u32::MAX, None);

/// `duration_until_reset` at T0 for a unit of `seconds`, by upstream's formula.
fn reset(seconds: u64) -> i64 {
    (seconds - (T0 / 1000) % seconds) as i64
}

struct Fixture {
    client: RateLimitServiceClient<Channel>,
    clock: Arc<ManualClock>,
    _harness: Harness,
}

async fn fixture(backend: Backend) -> Fixture {
    let harness = Harness::start(backend, RULES).await;
    Fixture {
        client: harness.server.envoy().await,
        clock: harness.clock.clone(),
        _harness: harness,
    }
}

impl Fixture {
    async fn call(&mut self, request: RateLimitRequest) -> RateLimitResponse {
        self.client
            .should_rate_limit(request)
            .await
            .unwrap()
            .into_inner()
    }

    /// One call, one descriptor: its status summary.
    async fn one(&mut self, entries: &[(&str, &str)]) -> Summary {
        let response = self.call(envoy_request("rls", &[entries])).await;
        assert_eq!(response.statuses.len(), 1);
        summary(&response.statuses[0])
    }

    async fn with_descriptor(
        &mut self,
        descriptor: RateLimitDescriptor,
        hits_addend: u32,
    ) -> Summary {
        let response = self
            .call(RateLimitRequest {
                domain: "rls".into(),
                descriptors: vec![descriptor],
                hits_addend,
            })
            .await;
        summary(&response.statuses[0])
    }
}

async fn counts_and_reports_like_upstream(backend: Backend) {
    let mut f = fixture(backend).await;
    let k1 = [("key1", "value1")];
    let m = reset(60);
    assert_eq!(
        f.one(&k1).await,
        limited(Code::Ok, 3, Unit::Minute, "k1", 2, m)
    );
    assert_eq!(
        f.one(&k1).await,
        limited(Code::Ok, 3, Unit::Minute, "k1", 1, m)
    );
    assert_eq!(
        f.one(&k1).await,
        limited(Code::Ok, 3, Unit::Minute, "k1", 0, m)
    );
    assert_eq!(
        f.one(&k1).await,
        limited(Code::OverLimit, 3, Unit::Minute, "k1", 0, m)
    );
    // 19.5 s later the window still has 0.5 s: rounded up, never 0.
    f.clock.advance(19_500);
    assert_eq!(
        f.one(&k1).await,
        limited(Code::OverLimit, 3, Unit::Minute, "k1", 0, 1)
    );
    // A new window starts afresh.
    f.clock.advance(500);
    assert_eq!(
        f.one(&k1).await,
        limited(Code::Ok, 3, Unit::Minute, "k1", 2, 60)
    );
}

async fn nesting_and_depth_must_match_exactly(backend: Backend) {
    let mut f = fixture(backend).await;
    let h = reset(3600);
    let sub = [("key1", "value1"), ("subkey1", "x")];
    assert_eq!(
        f.one(&sub).await,
        limited(Code::Ok, 2, Unit::Hour, "", 1, h)
    );
    // The parent's own counter is separate from the child's.
    assert_eq!(
        f.one(&[("key1", "value1")]).await,
        limited(Code::Ok, 3, Unit::Minute, "k1", 2, reset(60))
    );
    // More entries than the configured path: no limit, no fallback.
    assert_eq!(
        f.one(&[("key1", "value1"), ("subkey1", "x"), ("extra", "y")])
            .await,
        NO_LIMIT
    );
    // Stopping at a node that only has children: no limit.
    assert_eq!(f.one(&[("parent", "p")]).await, NO_LIMIT);
    assert_eq!(
        f.one(&[("parent", "p"), ("child", "c")]).await,
        limited(Code::Ok, 1, Unit::Minute, "", 0, reset(60))
    );
    // Entry order matters.
    assert_eq!(
        f.one(&[("subkey1", "x"), ("key1", "value1")]).await,
        NO_LIMIT
    );
    assert_eq!(f.one(&[("key1", "other")]).await, NO_LIMIT);
}

async fn key_only_rules_count_each_value_and_whitelists_win(backend: Backend) {
    let mut f = fixture(backend).await;
    let s = reset(1);
    assert_eq!(
        f.one(&[("user", "alice")]).await,
        limited(Code::Ok, 1, Unit::Second, "", 0, s)
    );
    assert_eq!(
        f.one(&[("user", "alice")]).await,
        limited(Code::OverLimit, 1, Unit::Second, "", 0, s)
    );
    assert_eq!(
        f.one(&[("user", "bob")]).await,
        limited(Code::Ok, 1, Unit::Second, "", 0, s)
    );
    // An empty value falls back to the key-only rule.
    assert_eq!(
        f.one(&[("user", "")]).await,
        limited(Code::Ok, 1, Unit::Second, "", 0, s)
    );
    for _ in 0..3 {
        assert_eq!(f.one(&[("user", "admin")]).await, NO_LIMIT);
    }
}

async fn wildcards_match_after_exact_values(backend: Backend) {
    let mut f = fixture(backend).await;
    let m = reset(60);
    assert_eq!(
        f.one(&[("path", "/api/exact")]).await,
        limited(Code::Ok, 5, Unit::Minute, "exact", 4, m)
    );
    assert_eq!(
        f.one(&[("path", "/api/a")]).await,
        limited(Code::Ok, 2, Unit::Minute, "api", 1, m)
    );
    // Without share_threshold each runtime value has its own counter.
    assert_eq!(
        f.one(&[("path", "/api/b")]).await,
        limited(Code::Ok, 2, Unit::Minute, "api", 1, m)
    );
    assert_eq!(
        f.one(&[("path", "/api/")]).await,
        limited(Code::Ok, 2, Unit::Minute, "api", 1, m)
    );
    // With share_threshold all matching values share one counter.
    assert_eq!(
        f.one(&[("path", "/shared/a")]).await,
        limited(Code::Ok, 2, Unit::Minute, "", 1, m)
    );
    assert_eq!(
        f.one(&[("path", "/shared/b")]).await,
        limited(Code::Ok, 2, Unit::Minute, "", 0, m)
    );
    assert_eq!(
        f.one(&[("path", "/shared/c")]).await,
        limited(Code::OverLimit, 2, Unit::Minute, "", 0, m)
    );
    assert_eq!(f.one(&[("path", "/other")]).await, NO_LIMIT);
}

async fn unlimited_and_replaces(backend: Backend) {
    let mut f = fixture(backend).await;
    assert_eq!(f.one(&[("plan", "premium")]).await, UNLIMITED);
    // Both match: the unlimited premium rule replaces org-daily, which is
    // then neither limited nor counted.
    let both = f
        .call(envoy_request(
            "rls",
            &[&[("org", "acme")], &[("plan", "premium")]],
        ))
        .await;
    assert_eq!(both.overall_code(), Code::Ok);
    assert_eq!(summary(&both.statuses[0]), NO_LIMIT);
    assert_eq!(summary(&both.statuses[1]), UNLIMITED);
    // So org-daily's counter is still untouched: its first hit passes.
    let d = reset(86_400);
    assert_eq!(
        f.one(&[("org", "acme")]).await,
        limited(Code::Ok, 1, Unit::Day, "org-daily", 0, d)
    );
    assert_eq!(
        f.one(&[("org", "acme")]).await,
        limited(Code::OverLimit, 1, Unit::Day, "org-daily", 0, d)
    );
}

async fn shadow_rules_count_but_never_deny(backend: Backend) {
    let mut f = fixture(backend).await;
    let m = reset(60);
    assert_eq!(
        f.one(&[("shadow", "s")]).await,
        limited(Code::Ok, 1, Unit::Minute, "", 0, m)
    );
    let response = f.call(envoy_request("rls", &[&[("shadow", "s")]])).await;
    assert_eq!(response.overall_code(), Code::Ok);
    assert_eq!(
        summary(&response.statuses[0]),
        limited(Code::Ok, 1, Unit::Minute, "", 0, m)
    );
}

async fn hits_addend_request_and_descriptor_level(backend: Backend) {
    let mut f = fixture(backend).await;
    let m = reset(60);
    let k1 = || envoy_descriptor(&[("key1", "value1")]);
    // Request-level addend 2.
    assert_eq!(
        f.with_descriptor(k1(), 2).await,
        limited(Code::Ok, 3, Unit::Minute, "k1", 1, m)
    );
    // Per-descriptor 0 checks without counting, and wins over the request's 5.
    let check = RateLimitDescriptor {
        hits_addend: Some(0),
        ..k1()
    };
    assert_eq!(
        f.with_descriptor(check.clone(), 5).await,
        limited(Code::Ok, 3, Unit::Minute, "k1", 1, m)
    );
    // Per-descriptor 1 wins over the request's 5.
    let one = RateLimitDescriptor {
        hits_addend: Some(1),
        ..k1()
    };
    assert_eq!(
        f.with_descriptor(one, 5).await,
        limited(Code::Ok, 3, Unit::Minute, "k1", 0, m)
    );
    // count == limit: a check-only call is still OK.
    assert_eq!(
        f.with_descriptor(check.clone(), 0).await,
        limited(Code::Ok, 3, Unit::Minute, "k1", 0, m)
    );
    // Request-level 0 means 1: over, and the rejected hit still counts...
    assert_eq!(
        f.with_descriptor(k1(), 0).await,
        limited(Code::OverLimit, 3, Unit::Minute, "k1", 0, m)
    );
    // ...so now even a check-only call is over.
    assert_eq!(
        f.with_descriptor(check, 0).await,
        limited(Code::OverLimit, 3, Unit::Minute, "k1", 0, m)
    );
}

async fn a_hit_larger_than_the_limit_is_rejected_and_counted(backend: Backend) {
    let mut f = fixture(backend).await;
    let m = reset(60);
    let k1 = || envoy_descriptor(&[("key1", "value1")]);
    assert_eq!(
        f.with_descriptor(k1(), 4).await,
        limited(Code::OverLimit, 3, Unit::Minute, "k1", 0, m)
    );
    assert_eq!(
        f.with_descriptor(k1(), 1).await,
        limited(Code::OverLimit, 3, Unit::Minute, "k1", 0, m)
    );
    assert_eq!(
        f.one(&[("zero", "z")]).await,
        limited(Code::OverLimit, 0, Unit::Minute, "", 0, m)
    );
    let check = RateLimitDescriptor {
        hits_addend: Some(0),
        ..envoy_descriptor(&[("zero", "fresh")])
    };
    assert_eq!(
        f.with_descriptor(check, 0).await,
        limited(Code::Ok, 0, Unit::Minute, "", 0, m)
    );
}

async fn limit_overrides_apply_whatever_the_entries(backend: Backend) {
    let mut f = fixture(backend).await;
    let with_override = |entries: &[(&str, &str)], unit| RateLimitDescriptor {
        limit: Some(RateLimitOverride {
            requests_per_unit: 2,
            unit,
        }),
        ..envoy_descriptor(entries)
    };
    let second = ratekeeper::proto::envoy::r#type::v3::RateLimitUnit::Second as i32;
    let hour = ratekeeper::proto::envoy::r#type::v3::RateLimitUnit::Hour as i32;
    // Entries that match nothing still get the override.
    let unmatched = with_override(&[("nothing", "here")], second);
    assert_eq!(
        f.with_descriptor(unmatched.clone(), 0).await,
        limited(Code::Ok, 2, Unit::Second, "", 1, reset(1))
    );
    assert_eq!(
        f.with_descriptor(unmatched.clone(), 0).await,
        limited(Code::Ok, 2, Unit::Second, "", 0, reset(1))
    );
    assert_eq!(
        f.with_descriptor(unmatched, 0).await,
        limited(Code::OverLimit, 2, Unit::Second, "", 0, reset(1))
    );
    // On a configured descriptor the override replaces the configured limit.
    let configured = with_override(&[("key1", "value1")], hour);
    assert_eq!(
        f.with_descriptor(configured, 0).await,
        limited(Code::Ok, 2, Unit::Hour, "", 1, reset(3600))
    );
    // An unknown domain ignores overrides.
    let response = f
        .call(RateLimitRequest {
            domain: "nowhere".into(),
            descriptors: vec![with_override(&[("a", "b")], second)],
            hits_addend: 0,
        })
        .await;
    assert_eq!(summary(&response.statuses[0]), NO_LIMIT);
}

async fn unknown_domains_and_unmatched_descriptors_pass(backend: Backend) {
    let mut f = fixture(backend).await;
    let response = f
        .call(envoy_request(
            "nowhere",
            &[&[("key1", "value1")], &[("x", "y")]],
        ))
        .await;
    assert_eq!(response.overall_code(), Code::Ok);
    assert_eq!(
        response.statuses.iter().map(summary).collect::<Vec<_>>(),
        vec![NO_LIMIT, NO_LIMIT]
    );
    assert!(response.response_headers_to_add.is_empty());
    assert_eq!(f.one(&[("unconfigured", "x")]).await, NO_LIMIT);
}

async fn overall_code_is_over_when_any_descriptor_is(backend: Backend) {
    let mut f = fixture(backend).await;
    let k1: &[(&str, &str)] = &[("key1", "value1")];
    let user: &[(&str, &str)] = &[("user", "zed")];
    let response = f
        .call(RateLimitRequest {
            domain: "rls".into(),
            descriptors: vec![envoy_descriptor(k1), envoy_descriptor(user)],
            hits_addend: 3,
        })
        .await;
    // 3 fits k1 (limit 3) but not user (limit 1); statuses keep request order.
    assert_eq!(response.overall_code(), Code::OverLimit);
    assert_eq!(
        summary(&response.statuses[0]),
        limited(Code::Ok, 3, Unit::Minute, "k1", 0, reset(60))
    );
    assert_eq!(
        summary(&response.statuses[1]),
        limited(Code::OverLimit, 1, Unit::Second, "", 0, reset(1))
    );
}

both_stores!(
    counts_and_reports_like_upstream,
    nesting_and_depth_must_match_exactly,
    key_only_rules_count_each_value_and_whitelists_win,
    wildcards_match_after_exact_values,
    unlimited_and_replaces,
    shadow_rules_count_but_never_deny,
    hits_addend_request_and_descriptor_level,
    a_hit_larger_than_the_limit_is_rejected_and_counted,
    limit_overrides_apply_whatever_the_entries,
    unknown_domains_and_unmatched_descriptors_pass,
    overall_code_is_over_when_any_descriptor_is,
);

/// Without an injected clock the script reads Redis `TIME`: the reset
/// duration is then whatever is left of the real minute.
#[tokio::test]
async fn redis_time_drives_windows_in_production() {
    let redis = common::RedisServer::start();
    let store = Arc::new(common::redis_store(
        &redis.url(),
        std::time::Duration::from_secs(2),
    ));
    let server = TestServer::with(rules(&[RULES]), store).await;
    let mut client = server.envoy().await;
    let response = client
        .should_rate_limit(envoy_request("rls", &[&[("key1", "value1")]]))
        .await
        .unwrap()
        .into_inner();
    let (code, limit, remaining, reset) = summary(&response.statuses[0]);
    assert_eq!(
        (code, limit, remaining),
        (Code::Ok, Some((3, Unit::Minute, "k1".into())), 2)
    );
    let reset = reset.unwrap();
    assert!((1..=60).contains(&reset), "reset {reset}");
}
