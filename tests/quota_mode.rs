//! Quota mode on the Envoy API, on both stores: per rule (`quota_mode: true`)
//! and global (`--quota-mode`), as envoyproxy/ratelimit judges it — an
//! over-limit quota descriptor denies only when every quota descriptor of
//! the request is over, a hard limit over its limit always denies, and the
//! per-descriptor statuses are never rewritten. On `ShouldAllow` quota mode
//! has no effect: every rule is a hard limit.

mod common;

use std::sync::Arc;

use common::{Backend, T0, TestServer, TestStore, allow_request, envoy_request, rules};
use ratekeeper::Server;
use ratekeeper::api::{QuotaMode, ShadowMode};
use ratekeeper::clock::ManualClock;
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

const RULES: &str = r#"
domain: q
descriptors:
  - key: backend
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: soft_shadow
    quota_mode: true
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: free
    rate_limit: {unlimited: true}
"#;

struct Fixture {
    server: TestServer,
    _store: TestStore,
}

async fn fixture(backend: Backend, configure: impl FnOnce(Server) -> Server) -> Fixture {
    let store = TestStore::new(backend, Arc::new(ManualClock::new(T0)));
    let server =
        TestServer::start(configure(Server::new(rules(&[RULES]), store.store.clone()))).await;
    Fixture {
        server,
        _store: store,
    }
}

impl Fixture {
    async fn call(&self, descriptors: &[&[(&str, &str)]]) -> RateLimitResponse {
        self.server
            .envoy()
            .await
            .should_rate_limit(envoy_request("q", descriptors))
            .await
            .unwrap()
            .into_inner()
    }

    /// Uses up a minute's hit of one descriptor.
    async fn spend(&self, key: &str, value: &str) {
        let response = self.call(&[&[(key, value)]]).await;
        assert_eq!(response.statuses[0].code(), Code::Ok, "{key}={value}");
    }
}

fn codes(response: &RateLimitResponse) -> (Code, Vec<Code>) {
    (
        response.overall_code(),
        response.statuses.iter().map(|s| s.code()).collect(),
    )
}

async fn per_rule_quotas_deny_only_when_all_are_spent(backend: Backend) {
    let f = fixture(backend, |s| s).await;
    f.spend("backend", "a").await;
    // a is over, b has room: allowed, and a's status still says over.
    let response = f.call(&[&[("backend", "a")], &[("backend", "b")]]).await;
    assert_eq!(
        codes(&response),
        (Code::Ok, vec![Code::OverLimit, Code::Ok])
    );
    // Now b is spent too (its hit above counted): both over, denied.
    let response = f.call(&[&[("backend", "a")], &[("backend", "b")]]).await;
    assert_eq!(
        codes(&response),
        (Code::OverLimit, vec![Code::OverLimit, Code::OverLimit])
    );
    // A lone quota descriptor over its limit is every quota descriptor.
    assert_eq!(
        codes(&f.call(&[&[("backend", "a")]]).await),
        (Code::OverLimit, vec![Code::OverLimit])
    );
}

async fn a_hard_limit_over_denies_whatever_the_quotas(backend: Backend) {
    let f = fixture(backend, |s| s).await;
    f.spend("tenant", "t").await;
    let response = f.call(&[&[("tenant", "t")], &[("backend", "c")]]).await;
    assert_eq!(
        codes(&response),
        (Code::OverLimit, vec![Code::OverLimit, Code::Ok])
    );
    // Unmatched descriptors are no quota descriptors per rule: a spent quota
    // beside one is still every quota.
    f.spend("backend", "d").await;
    let response = f.call(&[&[("backend", "d")], &[("unmatched", "x")]]).await;
    assert_eq!(
        codes(&response),
        (Code::OverLimit, vec![Code::OverLimit, Code::Ok])
    );
}

async fn shadow_quota_rules_are_never_over(backend: Backend) {
    let f = fixture(backend, |s| s).await;
    f.spend("soft_shadow", "s").await;
    f.spend("backend", "e").await;
    // The shadow quota reports OK over its limit, so a quota has "room".
    let response = f
        .call(&[&[("soft_shadow", "s")], &[("backend", "e")]])
        .await;
    assert_eq!(
        codes(&response),
        (Code::Ok, vec![Code::Ok, Code::OverLimit])
    );
}

async fn global_quota_mode_takes_in_every_descriptor_but_unlimited_ones(backend: Backend) {
    let f = fixture(backend, |s| s.with_quota_mode(QuotaMode::Global)).await;
    f.spend("tenant", "g").await;
    f.spend("tenant", "h").await;
    // Two hard rules, both over: as quotas, all spent.
    let response = f.call(&[&[("tenant", "g")], &[("tenant", "h")]]).await;
    assert_eq!(
        codes(&response),
        (Code::OverLimit, vec![Code::OverLimit, Code::OverLimit])
    );
    // One with room: allowed.
    let response = f.call(&[&[("tenant", "g")], &[("tenant", "fresh")]]).await;
    assert_eq!(
        codes(&response),
        (Code::Ok, vec![Code::OverLimit, Code::Ok])
    );
    // A descriptor without a rule counts as a quota that is never over
    // (upstream's behaviour)...
    let response = f.call(&[&[("tenant", "g")], &[("unmatched", "x")]]).await;
    assert_eq!(
        codes(&response),
        (Code::Ok, vec![Code::OverLimit, Code::Ok])
    );
    // ...an unlimited one does not count at all.
    let response = f.call(&[&[("tenant", "g")], &[("free", "x")]]).await;
    assert_eq!(
        codes(&response),
        (Code::OverLimit, vec![Code::OverLimit, Code::Ok])
    );
}

async fn global_shadow_mode_still_has_the_last_word(backend: Backend) {
    let f = fixture(backend, |s| s.with_shadow_mode(ShadowMode::Global)).await;
    f.spend("backend", "a").await;
    let response = f.call(&[&[("backend", "a")]]).await;
    assert_eq!(codes(&response), (Code::Ok, vec![Code::OverLimit]));
}

async fn should_allow_treats_quota_rules_as_hard_limits(backend: Backend) {
    let f = fixture(backend, |s| s.with_quota_mode(QuotaMode::Global)).await;
    let mut client = f.server.client().await;
    let request = || allow_request("q", &[&[("backend", "a")], &[("backend", "b")]], 1);
    assert!(
        client
            .should_allow(request())
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let spent = client.should_allow(request()).await.unwrap().into_inner();
    assert!(!spent.allowed);
    // c has room, a has none: under Envoy's quota semantics this would pass.
    let one = client
        .should_allow(allow_request(
            "q",
            &[&[("backend", "c")], &[("backend", "a")]],
            1,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !one.allowed,
        "one quota with room does not admit on ShouldAllow"
    );
}

both_stores!(
    per_rule_quotas_deny_only_when_all_are_spent,
    a_hard_limit_over_denies_whatever_the_quotas,
    shadow_quota_rules_are_never_over,
    global_quota_mode_takes_in_every_descriptor_but_unlimited_ones,
    global_shadow_mode_still_has_the_last_word,
    should_allow_treats_quota_rules_as_hard_limits,
);
