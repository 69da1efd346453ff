//! Per-rule metrics with envoyproxy/ratelimit's shape, on both stores, read
//! from `/metrics` after known Envoy traffic: hits split into within, near
//! (`--near-limit-ratio`), over and over-from-the-cache as upstream splits
//! them, and the stats key each descriptor is counted under
//! (`value_to_metric`, `detailed_metric`, limit overrides, sanitising),
//! with every per-value key under `--max-detailed-metric-series`.

mod common;

use std::sync::Arc;

use common::{
    Backend, T0, TestServer, TestStore, envoy_descriptor, envoy_request, http_get, rules,
};
use ratekeeper::Server;
use ratekeeper::clock::{Clock, ManualClock};
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use ratekeeper::proto::envoy::r#type::v3::RateLimitUnit;
use ratekeeper::store::OverLimitCache;

const RULES: &str = r#"
domain: m
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 10}
  - key: route
    value_to_metric: true
    descriptors:
      - key: http_method
        value_to_metric: true
        descriptors:
          - key: subject_id
            rate_limit: {unit: minute, requests_per_unit: 60}
  - key: path
    value: "/files/*"
    value_to_metric: true
    rate_limit: {unit: minute, requests_per_unit: 60}
  - key: shared
    value: "/s/*"
    value_to_metric: true
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 60}
  - key: remote_address
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 60}
  - key: soft
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 2}
"#;

struct Fixture {
    server: TestServer,
    clock: Arc<ManualClock>,
    store: TestStore,
}

async fn fixture(backend: Backend, configure: impl FnOnce(Server) -> Server) -> Fixture {
    let clock = Arc::new(ManualClock::new(T0));
    let store = TestStore::new(backend, clock.clone());
    let server =
        TestServer::start(configure(Server::new(rules(&[RULES]), store.store.clone()))).await;
    Fixture {
        server,
        clock,
        store,
    }
}

impl Fixture {
    async fn call(&self, request: RateLimitRequest) {
        self.server
            .envoy()
            .await
            .should_rate_limit(request)
            .await
            .unwrap();
    }

    async fn hits(&self, entries: &[(&str, &str)], hits: u32) {
        let mut request = envoy_request("m", &[entries]);
        request.hits_addend = hits;
        self.call(request).await;
    }

    async fn metrics(&self) -> String {
        http_get(self.server.admin_addr, "/metrics").await
    }
}

/// The value of `name{domain="m",rule="<rule>"}`, 0 when absent.
fn rule(body: &str, name: &str, rule: &str) -> f64 {
    let series = format!("{name}{{domain=\"m\",rule=\"{rule}\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// (total, within, near, over, over from cache, shadow) of one key.
fn counts(body: &str, key: &str) -> [f64; 6] {
    [
        "ratelimit_rule_hits_total",
        "ratelimit_rule_allowed_total",
        "ratelimit_rule_near_limit_total",
        "ratelimit_rule_denied_total",
        "ratelimit_rule_denied_from_cache_total",
        "ratelimit_rule_shadow_denied_total",
    ]
    .map(|name| rule(body, name, key))
}

async fn hits_split_as_upstream(backend: Backend) {
    let f = fixture(backend, |s| s).await;
    // Upstream's worked example: 11 single hits on a limit of 10, ratio 0.8.
    for _ in 0..11 {
        f.hits(&[("user", "a")], 1).await;
    }
    assert_eq!(
        counts(&f.metrics().await, "m.user"),
        [11.0, 10.0, 2.0, 1.0, 0.0, 0.0]
    );
    // One request of 5 at count 7: 2 near (9, 10), 2 over, none within.
    f.hits(&[("user", "b")], 7).await;
    f.hits(&[("user", "b")], 5).await;
    assert_eq!(
        counts(&f.metrics().await, "m.user"),
        [23.0, 17.0, 4.0, 3.0, 0.0, 0.0]
    );
    // A shadow rule: 3 at count 1 on a limit of 2 — the hits past the limit
    // are over and shadow.
    f.hits(&[("soft", "s")], 1).await;
    f.hits(&[("soft", "s")], 3).await;
    assert_eq!(
        counts(&f.metrics().await, "m.soft"),
        [4.0, 1.0, 1.0, 2.0, 0.0, 2.0]
    );
}

async fn the_near_limit_ratio_is_configurable(backend: Backend) {
    let f = fixture(backend, |s| s.with_near_limit_ratio(0.5)).await;
    for _ in 0..10 {
        f.hits(&[("user", "a")], 1).await;
    }
    // Near is above floor(10 × 0.5) = 5: hits 6 to 10.
    assert_eq!(
        counts(&f.metrics().await, "m.user"),
        [10.0, 10.0, 5.0, 0.0, 0.0, 0.0]
    );
}

async fn denials_from_the_over_limit_cache_are_counted_per_rule(backend: Backend) {
    let f = fixture(backend, |s| s).await;
    let clock: Arc<dyn Clock> = f.clock.clone();
    let cached = TestServer::start(
        Server::new(rules(&[RULES]), f.store.store.clone())
            .with_over_limit_cache(OverLimitCache::new(100, clock)),
    )
    .await;
    let mut envoy = cached.envoy().await;
    for hits in [10, 2, 3] {
        let mut request = envoy_request("m", &[&[("user", "c")]]);
        request.hits_addend = hits;
        envoy.should_rate_limit(request).await.unwrap();
    }
    let body = http_get(cached.admin_addr, "/metrics").await;
    // 10 fit (2 near: 9, 10); 2 are over, from the store, and remembered;
    // the 3 after are answered from the cache: over and over from cache.
    assert_eq!(counts(&body, "m.user"), [15.0, 10.0, 2.0, 5.0, 3.0, 0.0]);
}

async fn stats_keys_carry_the_values_the_config_asks_for(backend: Backend) {
    let f = fixture(backend, |s| s).await;
    f.hits(
        &[
            ("route", "api"),
            ("http_method", "GET"),
            ("subject_id", "123"),
        ],
        1,
    )
    .await;
    f.hits(
        &[
            ("route", "web"),
            ("http_method", "POST"),
            ("subject_id", "456"),
        ],
        1,
    )
    .await;
    f.hits(&[("path", "/files/a:b|c")], 1).await;
    f.hits(&[("shared", "/s/x")], 1).await;
    f.hits(&[("remote_address", "10.0.0.1")], 1).await;
    let mut with_override = envoy_descriptor(&[("user", "o"), ("extra", "")]);
    with_override.limit = Some(RateLimitOverride {
        requests_per_unit: 5,
        unit: RateLimitUnit::Second as i32,
    });
    f.call(RateLimitRequest {
        domain: "m".into(),
        descriptors: vec![with_override],
        hits_addend: 2,
    })
    .await;
    let body = f.metrics().await;
    let hits = |key| rule(&body, "ratelimit_rule_hits_total", key);
    assert_eq!(
        hits("m.route_api.http_method_GET.subject_id"),
        1.0,
        "{body}"
    );
    assert_eq!(
        hits("m.route_web.http_method_POST.subject_id"),
        1.0,
        "{body}"
    );
    // A wildcard level with value_to_metric: the whole runtime value,
    // sanitised (`:` and `|` become `_`).
    assert_eq!(hits("m.path_/files/a_b_c"), 1.0, "{body}");
    // share_threshold keeps the pattern.
    assert_eq!(hits("m.shared_/s/*"), 1.0, "{body}");
    // detailed_metric, with an IPv4 address's dots sanitised.
    assert_eq!(hits("m.remote_address_10_0_0_1"), 1.0, "{body}");
    // A limit override is named after the request's entries.
    assert_eq!(hits("m.user_o.extra"), 2.0, "{body}");
    assert!(!body.contains("route.http_method.subject_id\""), "{body}");
}

async fn per_value_keys_stay_under_the_cap(backend: Backend) {
    let f = fixture(backend, |s| s.with_max_detailed_series(2)).await;
    for method in ["GET", "POST", "PUT", "DELETE"] {
        f.hits(
            &[
                ("route", "api"),
                ("http_method", method),
                ("subject_id", "1"),
            ],
            1,
        )
        .await;
    }
    let body = f.metrics().await;
    let hits = |key| rule(&body, "ratelimit_rule_hits_total", key);
    assert_eq!(
        hits("m.route_api.http_method_GET.subject_id"),
        1.0,
        "{body}"
    );
    assert_eq!(
        hits("m.route_api.http_method_POST.subject_id"),
        1.0,
        "{body}"
    );
    // Past the cap: the rule's own path, and the folding counted.
    assert_eq!(hits("m.route.http_method.subject_id"), 2.0, "{body}");
    assert!(!body.contains("http_method_PUT"), "{body}");
    let folded = body
        .lines()
        .find_map(|l| l.strip_prefix("ratelimit_detailed_metric_folded_total{domain=\"m\"} "))
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(folded, "2");
}

both_stores!(
    hits_split_as_upstream,
    the_near_limit_ratio_is_configurable,
    denials_from_the_over_limit_cache_are_counted_per_rule,
    stats_keys_carry_the_values_the_config_asks_for,
    per_value_keys_stay_under_the_cap,
);
