//! `RateLimitResponse.dynamic_metadata` with `--response-dynamic-metadata`,
//! on both stores: exactly the struct envoyproxy/ratelimit sends (domain,
//! descriptors with their entries, limit override and addend, the request's
//! addend, and the merged rule metadata of every descriptor not over its
//! limit), quota routing through that metadata, none when the option is
//! off, and `/rules` showing a rule's metadata.

mod common;

use std::sync::Arc;

use common::{
    Backend, T0, TestServer, TestStore, envoy_descriptor, envoy_request, http_get, rules,
};
use prost_types::value::Kind;
use ratekeeper::Server;
use ratekeeper::api::DynamicMetadata;
use ratekeeper::clock::ManualClock;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ratekeeper::proto::envoy::r#type::v3::RateLimitUnit;
use serde_json::json;

const RULES: &str = r#"
domain: meta
descriptors:
  - key: backend
    value: a
    quota_mode: true
    metadata: {route: {backend: a, weight: 1}, tier: gold}
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: backend
    value: b
    quota_mode: true
    metadata: {route: {backend: b, pool: spare}, tier: silver, extra: [1, 2]}
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: shadow
    shadow_mode: true
    metadata: {shadowed: true}
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: free
    metadata: {unlimited: true}
    rate_limit: {unlimited: true}
  - key: plain
    rate_limit: {unit: minute, requests_per_unit: 10}
"#;

struct Fixture {
    server: TestServer,
    _store: TestStore,
}

async fn fixture(backend: Backend, metadata: DynamicMetadata) -> Fixture {
    let store = TestStore::new(backend, Arc::new(ManualClock::new(T0)));
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store.store.clone()).with_dynamic_metadata(metadata),
    )
    .await;
    Fixture {
        server,
        _store: store,
    }
}

impl Fixture {
    async fn call(&self, request: RateLimitRequest) -> RateLimitResponse {
        self.server
            .envoy()
            .await
            .should_rate_limit(request)
            .await
            .unwrap()
            .into_inner()
    }
}

/// The metadata as JSON, for comparison.
fn metadata(response: &RateLimitResponse) -> serde_json::Value {
    let fields = &response
        .dynamic_metadata
        .as_ref()
        .expect("dynamic metadata")
        .fields;
    serde_json::Value::Object(
        fields
            .iter()
            .map(|(k, v)| (k.clone(), json_of(v)))
            .collect(),
    )
}

fn json_of(value: &prost_types::Value) -> serde_json::Value {
    match value.kind.as_ref().expect("a value kind") {
        Kind::NullValue(_) => serde_json::Value::Null,
        Kind::NumberValue(n) => json!(n),
        Kind::StringValue(s) => json!(s),
        Kind::BoolValue(b) => json!(b),
        Kind::StructValue(s) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), json_of(v)))
                .collect(),
        ),
        Kind::ListValue(l) => serde_json::Value::Array(l.values.iter().map(json_of).collect()),
    }
}

async fn the_struct_is_upstreams(backend: Backend) {
    let f = fixture(backend, DynamicMetadata::On).await;
    let mut with_addend = envoy_descriptor(&[("plain", "p"), ("extra", "")]);
    with_addend.hits_addend = Some(0);
    let mut with_override = envoy_descriptor(&[("plain", "o")]);
    with_override.limit = Some(RateLimitOverride {
        requests_per_unit: 20,
        unit: RateLimitUnit::Minute as i32,
    });
    let response = f
        .call(RateLimitRequest {
            domain: "meta".into(),
            descriptors: vec![
                envoy_descriptor(&[("backend", "a")]),
                with_addend,
                with_override,
                envoy_descriptor(&[("backend", "b")]),
            ],
            hits_addend: 3,
        })
        .await;
    // 3 hits on limits of 1: both backends over (and every quota spent).
    assert_eq!(response.overall_code(), Code::OverLimit);
    assert_eq!(
        metadata(&response),
        json!({
            "domain": "meta",
            "descriptors": [
                {"entries": ["backend=a"]},
                {"entries": ["plain=p", "extra="], "hitsAddend": 0.0},
                {"entries": ["plain=o"], "limit": "requests_per_unit:20 unit:MINUTE"},
                {"entries": ["backend=b"]},
            ],
            "hitsAddend": 3.0,
        })
    );
}

async fn metadata_of_descriptors_within_their_limit_is_merged(backend: Backend) {
    let f = fixture(backend, DynamicMetadata::On).await;
    let both = || envoy_request("meta", &[&[("backend", "a")], &[("backend", "b")]]);
    // Both within: maps merge key by key, the first descriptor winning.
    let response = f.call(both()).await;
    assert_eq!(response.overall_code(), Code::Ok);
    let merged = metadata(&response);
    assert_eq!(
        merged["metadata"],
        json!({
            "route": {"backend": "a", "weight": 1.0, "pool": "spare"},
            "tier": "gold",
            "extra": [1.0, 2.0],
        })
    );
    // Request-level addend 0 is left out.
    assert!(merged.get("hitsAddend").is_none(), "{merged}");
    // Spend a alone: now a is over and b within, so only b's metadata is
    // sent — where a quota-routing gateway may still send the request.
    let response = f.call(envoy_request("meta", &[&[("backend", "a")]])).await;
    assert_eq!(response.overall_code(), Code::OverLimit);
    assert!(metadata(&response).get("metadata").is_none());
}

async fn quota_routing_sees_the_quotas_with_room(backend: Backend) {
    let f = fixture(backend, DynamicMetadata::On).await;
    f.call(envoy_request("meta", &[&[("backend", "a")]])).await;
    let response = f
        .call(envoy_request(
            "meta",
            &[&[("backend", "a")], &[("backend", "b")]],
        ))
        .await;
    // a is over but b has room: allowed, with b's metadata only.
    assert_eq!(response.overall_code(), Code::Ok);
    assert_eq!(response.statuses[0].code(), Code::OverLimit);
    assert_eq!(
        metadata(&response)["metadata"],
        json!({"route": {"backend": "b", "pool": "spare"}, "tier": "silver", "extra": [1.0, 2.0]})
    );
}

async fn shadow_counts_as_within_and_unlimited_sends_nothing(backend: Backend) {
    let f = fixture(backend, DynamicMetadata::On).await;
    f.call(envoy_request("meta", &[&[("shadow", "s")]])).await;
    let response = f
        .call(envoy_request(
            "meta",
            &[&[("shadow", "s")], &[("free", "x")]],
        ))
        .await;
    // Over its limit, but a shadow rule's status is OK: its metadata is sent.
    // Upstream never looks at an unlimited rule's metadata.
    assert_eq!(metadata(&response)["metadata"], json!({"shadowed": true}));
    // An unknown domain: the request as sent, nothing else.
    let response = f.call(envoy_request("elsewhere", &[&[("k", "v")]])).await;
    assert_eq!(
        metadata(&response),
        json!({"domain": "elsewhere", "descriptors": [{"entries": ["k=v"]}]})
    );
}

async fn no_metadata_unless_asked(backend: Backend) {
    let f = fixture(backend, DynamicMetadata::Off).await;
    let response = f
        .call(envoy_request(
            "meta",
            &[&[("backend", "a")], &[("backend", "b")]],
        ))
        .await;
    assert_eq!(response.dynamic_metadata, None);
}

both_stores!(
    the_struct_is_upstreams,
    metadata_of_descriptors_within_their_limit_is_merged,
    quota_routing_sees_the_quotas_with_room,
    shadow_counts_as_within_and_unlimited_sends_nothing,
    no_metadata_unless_asked,
);

#[tokio::test]
async fn rules_endpoint_shows_metadata_and_quota_mode() {
    let f = fixture(Backend::Memory, DynamicMetadata::Off).await;
    let response = http_get(f.server.admin_addr, "/rules").await;
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    let rules: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
    let rule = rules
        .iter()
        .find(|r| r["path"] == "meta.backend_b")
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(
        rule["metadata"],
        json!({"route": {"backend": "b", "pool": "spare"}, "tier": "silver", "extra": [1, 2]})
    );
    assert_eq!(rule["quota_mode"], json!(true));
    let plain = rules.iter().find(|r| r["path"] == "meta.plain").unwrap();
    assert_eq!(plain["metadata"], serde_json::Value::Null);
    assert_eq!(plain["quota_mode"], json!(false));
}
