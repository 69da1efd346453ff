//! What operators see: exact Prometheus counters after known traffic,
//! `/rules`, gRPC reflection, and global shadow mode.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    Backend, Harness, RedisServer, TestServer, allow_request, envoy_request, http_get, redis_store,
    rules,
};
use futures::StreamExt;
use ratekeeper::Server;
use ratekeeper::api::ShadowMode;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const RULES: &str = r#"
domain: obs
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 5, name: per-user}
  - key: trial
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: vip
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 100}
"#;

/// The value of one sample line `name{labels} value` (labels in any order).
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let wanted = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                && rest.matches('=').count() == labels.len();
            wanted.then(|| value.parse().unwrap())
        })
}

async fn scrape(server: &TestServer) -> String {
    let response = http_get(server.admin_addr, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

#[tokio::test]
async fn counters_match_known_traffic_exactly() {
    let h = Harness::start(Backend::Memory, RULES).await;
    let mut client = h.server.client().await;
    let mut envoy = h.server.envoy().await;
    // 7 ShouldAllow calls for alice, cost 1: 5 allowed, 2 denied.
    for _ in 0..7 {
        client
            .should_allow(allow_request("obs", &[&[("user", "alice")]], 1))
            .await
            .unwrap();
    }
    // 3 Envoy calls for bob with 2 hits each: 2 OK (4 hits), then over (2 hits).
    for _ in 0..3 {
        let mut request = envoy_request("obs", &[&[("user", "bob")]]);
        request.hits_addend = 2;
        envoy.should_rate_limit(request).await.unwrap();
    }
    // A shadow rule over its limit, an unknown domain, a bad request, a dry run.
    for _ in 0..2 {
        client
            .should_allow(allow_request("obs", &[&[("trial", "t")]], 1))
            .await
            .unwrap();
    }
    client
        .should_allow(allow_request("elsewhere", &[&[("user", "x")]], 1))
        .await
        .unwrap();
    client
        .should_allow(allow_request("", &[&[("user", "x")]], 1))
        .await
        .unwrap_err();
    let mut dry = allow_request("obs", &[&[("user", "carol")]], 1);
    dry.dry_run = true;
    client.should_allow(dry).await.unwrap();
    client
        .should_allow(allow_request("obs", &[&[("vip", "v1")]], 3))
        .await
        .unwrap();

    let body = scrape(&h.server).await;
    let requests = |surface, domain, decision| {
        sample(
            &body,
            "ratelimit_requests_total",
            &[
                ("surface", surface),
                ("domain", domain),
                ("decision", decision),
            ],
        )
    };
    assert_eq!(
        requests("should_allow", "obs", "allowed"),
        Some(5.0 + 2.0 + 1.0 + 1.0),
        "{body}"
    );
    assert_eq!(
        requests("should_allow", "obs", "denied"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        requests("should_allow", "unknown", "allowed"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        requests("should_allow", "unknown", "invalid"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(requests("envoy", "obs", "allowed"), Some(2.0), "{body}");
    assert_eq!(requests("envoy", "obs", "denied"), Some(1.0), "{body}");

    let rule = |name, path| sample(&body, name, &[("domain", "obs"), ("rule", path)]);
    // alice 7 hits + bob 6 hits on the same rule (the dry run is not counted).
    assert_eq!(
        rule("ratelimit_rule_hits_total", "obs.user"),
        Some(13.0),
        "{body}"
    );
    assert_eq!(
        rule("ratelimit_rule_allowed_total", "obs.user"),
        Some(9.0),
        "{body}"
    );
    // Hits past the limit, as upstream splits them: alice's 6th and 7th
    // (her count stays 5: denied requests take nothing), and of bob's third
    // call (4 → 6) only the hit past 5.
    assert_eq!(
        rule("ratelimit_rule_denied_total", "obs.user"),
        Some(3.0),
        "{body}"
    );
    // Limit 5, so "near" is above floor(5 × 0.8) = 4 and at most 5:
    // alice's 5th hit, and the 5th of bob's call that went from 4 to 6.
    assert_eq!(
        rule("ratelimit_rule_near_limit_total", "obs.user"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        rule("ratelimit_rule_shadow_denied_total", "obs.trial"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        rule("ratelimit_rule_denied_total", "obs.trial"),
        Some(1.0),
        "{body}"
    );
    // detailed_metric: the runtime value is in the label.
    assert_eq!(
        rule("ratelimit_rule_hits_total", "obs.vip_v1"),
        Some(3.0),
        "{body}"
    );
    // Every store call is in the histogram: 7 + 3 + 2 + 1 (dry run) + 1.
    assert_eq!(
        sample(
            &body,
            "ratelimit_storage_duration_seconds_count",
            &[("backend", "memory")]
        ),
        Some(14.0),
        "{body}"
    );
    assert!(
        body.contains("# TYPE ratelimit_storage_duration_seconds histogram"),
        "{body}"
    );
}

#[tokio::test]
async fn store_errors_are_counted() {
    let mut redis = RedisServer::start();
    let server = TestServer::with(
        rules(&[RULES]),
        Arc::new(redis_store(&redis.url(), Duration::from_millis(200))),
    )
    .await;
    let mut client = server.client().await;
    client
        .should_allow(allow_request("obs", &[&[("user", "a")]], 1))
        .await
        .unwrap();
    redis.kill();
    for _ in 0..3 {
        client
            .should_allow(allow_request("obs", &[&[("user", "a")]], 1))
            .await
            .unwrap_err();
    }
    let body = scrape(&server).await;
    assert_eq!(
        sample(
            &body,
            "ratelimit_storage_errors_total",
            &[("backend", "redis"), ("reason", "connection")]
        ),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "ratelimit_requests_total",
            &[
                ("surface", "should_allow"),
                ("domain", "obs"),
                ("decision", "error")
            ]
        ),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "ratelimit_storage_duration_seconds_count",
            &[("backend", "redis")]
        ),
        Some(4.0)
    );
}

#[tokio::test]
async fn global_shadow_mode_lets_everything_through_and_says_so() {
    let h = Harness::start(Backend::Memory, RULES).await;
    let server = TestServer::start(
        Server::new(rules(&[RULES]), h.store.store.clone()).with_shadow_mode(ShadowMode::Global),
    )
    .await;
    let mut envoy = server.envoy().await;
    let mut client = server.client().await;
    for i in 0..7 {
        let response = envoy
            .should_rate_limit(envoy_request("obs", &[&[("user", "e")]]))
            .await
            .unwrap()
            .into_inner();
        // The overall answer is always OK; the status still tells the truth.
        assert_eq!(response.overall_code(), Code::Ok);
        let expected = if i < 5 { Code::Ok } else { Code::OverLimit };
        assert_eq!(response.statuses[0].code(), expected, "call {i}");
    }
    for i in 0..7 {
        let response = client
            .should_allow(allow_request("obs", &[&[("user", "s")]], 1))
            .await
            .unwrap()
            .into_inner();
        assert!(response.allowed, "call {i}");
        assert_eq!(response.retry_after, None);
        let denied =
            response.results[0].decision() == ratekeeper::proto::ratekeeper::v1::Decision::Denied;
        assert_eq!(denied, i >= 5, "call {i}");
    }
    let body = scrape(&server).await;
    let shadowed = |surface| {
        sample(
            &body,
            "ratelimit_global_shadow_total",
            &[("surface", surface), ("domain", "obs")],
        )
    };
    assert_eq!(shadowed("envoy"), Some(2.0), "{body}");
    assert_eq!(shadowed("should_allow"), Some(2.0), "{body}");
}

#[tokio::test]
async fn rules_endpoint_lists_the_loaded_rules() {
    let h = Harness::start(Backend::Memory, RULES).await;
    let response = http_get(h.server.admin_addr, "/rules").await;
    let json = response.split_once("\r\n\r\n").unwrap().1;
    let rules: serde_json::Value = serde_json::from_str(json).unwrap();
    let user = rules
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == "obs.user")
        .unwrap();
    assert_eq!(user["name"], "per-user");
    assert_eq!(user["algorithm"], "fixed_window");
    assert_eq!(user["requests_per_unit"], 5);
    assert_eq!(user["unit"], "minute");
    assert_eq!(user["source"], "test0.yaml");
    assert_eq!(rules.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn reflection_lists_both_apis_and_health() {
    let h = Harness::start(Backend::Memory, RULES).await;
    let mut reflection = ServerReflectionClient::new(h.server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in [
        "envoy.service.ratelimit.v3.RateLimitService",
        "grpc.health.v1.Health",
        "ratekeeper.v1.RateLimiter",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

/// The shipped Grafana dashboard only queries metrics ratekeeper exports.
#[test]
fn dashboard_queries_only_exported_metrics() {
    use ratekeeper::metrics as m;
    let exported = [
        m::REQUESTS_TOTAL,
        m::RULE_HITS_TOTAL,
        m::RULE_ALLOWED_TOTAL,
        m::RULE_DENIED_TOTAL,
        m::RULE_NEAR_LIMIT_TOTAL,
        m::RULE_SHADOW_DENIED_TOTAL,
        m::GLOBAL_SHADOW_TOTAL,
        m::STORAGE_DURATION_SECONDS,
        m::STORAGE_ERRORS_TOTAL,
        m::CONFIG_RELOADS_TOTAL,
        m::DEGRADED_TOTAL,
        m::OVER_LIMIT_CACHE_HITS_TOTAL,
    ];
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana-dashboard.json"
    ))
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut queried = 0;
    for panel in json["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("ratelimit_") {
                    let name = format!("ratelimit_{}", name.trim_end_matches("_bucket"));
                    assert!(exported.contains(&name.as_str()), "{name} in {expr}");
                    queried += 1;
                }
            }
        }
    }
    assert!(queried >= 10, "{queried}");
}

/// `detailed_metric` puts runtime values into labels; a flood of new values
/// must not grow the series (or `/metrics`) without bound. Past the cap,
/// values are counted under the rule's path, and the folding is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detailed_metric_series_are_bounded_under_a_flood_of_values() {
    let h = Harness::start(Backend::Memory, RULES).await;
    let server = TestServer::start(
        Server::new(rules(&[RULES]), h.store.store.clone()).with_max_detailed_series(50),
    )
    .await;
    let mut client = server.client().await;
    for i in 0..2_000 {
        let value = format!("flood-{i}");
        client
            .should_allow(allow_request("obs", &[&[("vip", &value)]], 1))
            .await
            .unwrap();
    }
    let body = scrape(&server).await;
    let series = body
        .lines()
        .filter(|l| l.starts_with("ratelimit_rule_hits_total{") && l.contains("obs.vip"))
        .count();
    assert_eq!(series, 51, "50 values and the rule's own path");
    assert_eq!(
        sample(
            &body,
            "ratelimit_rule_hits_total",
            &[("domain", "obs"), ("rule", "obs.vip")]
        ),
        Some(1_950.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "ratelimit_detailed_metric_folded_total",
            &[("domain", "obs")]
        ),
        Some(1_950.0),
        "{body}"
    );
    assert!(body.len() < 64 * 1024, "/metrics is {} bytes", body.len());
}
