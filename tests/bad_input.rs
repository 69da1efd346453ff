//! Every malformed request is refused with INVALID_ARGUMENT and a message
//! that names the field, on both RPCs, and consumes nothing.

mod common;

use std::sync::Arc;

use common::{T0, TestServer, allow_request, envoy_descriptor, envoy_request, rules};
use ratekeeper::Server;
use ratekeeper::api::RequestLimits;
use ratekeeper::clock::ManualClock;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use ratekeeper::proto::ratekeeper::v1::ShouldAllowRequest;
use ratekeeper::store::MemoryStore;
use tonic::Code;

const RULES: &str = r#"
domain: app
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;

const LIMITS: RequestLimits = RequestLimits {
    max_descriptors: 4,
    max_entries: 3,
    max_value_bytes: 16,
    max_request_bytes: 2048,
};

async fn server() -> TestServer {
    let store = Arc::new(MemoryStore::new(1_000, Arc::new(ManualClock::new(T0))));
    TestServer::start(Server::new(rules(&[RULES]), store).with_request_limits(LIMITS)).await
}

fn long() -> String {
    "x".repeat(17)
}

fn allow_cases() -> Vec<(&'static str, ShouldAllowRequest)> {
    let user: &[(&str, &str)] = &[("user", "alice")];
    let long = long();
    vec![
        ("domain: must not be empty", allow_request("", &[user], 1)),
        (
            "domain: 17 bytes; at most 16",
            allow_request(&long, &[user], 1),
        ),
        (
            "descriptors: must not be empty",
            allow_request("app", &[], 1),
        ),
        (
            "descriptors: 5 descriptors; at most 4",
            allow_request("app", &[user; 5], 1),
        ),
        (
            "descriptors[1].entries: must not be empty",
            allow_request("app", &[user, &[]], 1),
        ),
        (
            "descriptors[0].entries: 4 entries; at most 3",
            allow_request(
                "app",
                &[&[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]],
                1,
            ),
        ),
        (
            "descriptors[0].entries[1].key: must not be empty",
            allow_request("app", &[&[("a", "1"), ("", "2")]], 1),
        ),
        (
            "descriptors[0].entries[0].key: 17 bytes",
            allow_request("app", &[&[(&long, "1")]], 1),
        ),
        (
            "descriptors[0].entries[0].value: 17 bytes",
            allow_request("app", &[&[("user", &long)]], 1),
        ),
        (
            "cost: 4294967296 exceeds the maximum cost",
            allow_request("app", &[user], 1 << 32),
        ),
        (
            "cost: 18446744073709551615 exceeds",
            allow_request("app", &[user], u64::MAX),
        ),
    ]
}

fn envoy_cases() -> Vec<(&'static str, RateLimitRequest)> {
    let user: &[(&str, &str)] = &[("user", "alice")];
    let long = long();
    let with = |descriptor: RateLimitDescriptor| RateLimitRequest {
        domain: "app".into(),
        descriptors: vec![envoy_descriptor(user), descriptor],
        hits_addend: 1,
    };
    vec![
        ("domain: must not be empty", envoy_request("", &[user])),
        ("domain: 17 bytes", envoy_request(&long, &[user])),
        ("descriptors: must not be empty", envoy_request("app", &[])),
        (
            "descriptors: 5 descriptors",
            envoy_request("app", &[user; 5]),
        ),
        (
            "descriptors[0].entries: 4 entries",
            envoy_request("app", &[&[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]]),
        ),
        (
            "descriptors[1].entries[0].key: must not be empty",
            with(envoy_descriptor(&[("", "v")])),
        ),
        (
            "descriptors[1].entries[0].value: 17 bytes",
            with(envoy_descriptor(&[("user", &long)])),
        ),
        (
            "descriptors[1].hits_addend: 4294967296 exceeds",
            with(RateLimitDescriptor {
                hits_addend: Some(1 << 32),
                ..envoy_descriptor(user)
            }),
        ),
        (
            "descriptors[1].limit.unit: unit 0 is not a known rate limit unit",
            with(RateLimitDescriptor {
                limit: Some(RateLimitOverride {
                    requests_per_unit: 5,
                    unit: 0,
                }),
                ..envoy_descriptor(user)
            }),
        ),
        (
            "descriptors[1].limit.unit: unit 42 is not",
            with(RateLimitDescriptor {
                limit: Some(RateLimitOverride {
                    requests_per_unit: 5,
                    unit: 42,
                }),
                ..envoy_descriptor(user)
            }),
        ),
    ]
}

/// `status` is INVALID_ARGUMENT with a message that starts with `expected`.
fn assert_invalid(status: tonic::Status, expected: &str) {
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{expected}: {status:?}"
    );
    assert!(
        status.message().starts_with(expected),
        "want {expected:?}, got {:?}",
        status.message()
    );
}

#[tokio::test]
async fn should_allow_refuses_bad_input_naming_the_field() {
    let server = server().await;
    let mut client = server.client().await;
    for (expected, request) in allow_cases() {
        assert_invalid(client.should_allow(request).await.unwrap_err(), expected);
    }
    // None of them consumed anything: alice's single hit is still there.
    let response = client
        .should_allow(allow_request("app", &[&[("user", "alice")]], 1))
        .await
        .unwrap();
    assert!(response.into_inner().allowed);
}

#[tokio::test]
async fn should_rate_limit_refuses_bad_input_naming_the_field() {
    let server = server().await;
    let mut client = server.envoy().await;
    for (expected, request) in envoy_cases() {
        assert_invalid(
            client.should_rate_limit(request).await.unwrap_err(),
            expected,
        );
    }
    // The valid first descriptor of the refused requests was not counted.
    let response = client
        .should_rate_limit(envoy_request("app", &[&[("user", "alice")]]))
        .await
        .unwrap();
    assert_eq!(response.into_inner().statuses[0].limit_remaining, 0);
    let response = client
        .should_rate_limit(envoy_request("app", &[&[("user", "alice")]]))
        .await
        .unwrap();
    assert_eq!(response.into_inner().statuses[0].limit_remaining, 0);
}

/// A request larger than the byte cap is refused before it is decoded, on
/// both RPCs, and the server keeps serving.
#[tokio::test]
async fn oversized_requests_are_refused_before_decoding() {
    let server = server().await;
    let mut client = server.client().await;
    let huge = "x".repeat(4096);
    let status = client
        .should_allow(allow_request("app", &[&[("user", &huge)]], 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let mut envoy = server.envoy().await;
    let status = envoy
        .should_rate_limit(envoy_request("app", &[&[("user", &huge)]]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        client
            .should_allow(allow_request("app", &[&[("user", "ok")]], 1))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn limits_at_the_boundary_are_accepted() {
    let server = server().await;
    let mut client = server.client().await;
    let exact = "x".repeat(16);
    let entries: &[(&str, &str)] = &[("user", &exact), ("b", ""), ("c", "3")];
    let request = allow_request(&"d".repeat(16), &[entries; 4], ratekeeper::api::MAX_COST);
    assert!(common::allowed(&mut client, request).await);
    // Envoy accepts a descriptor without entries (it matches nothing).
    let mut envoy = server.envoy().await;
    let response = envoy
        .should_rate_limit(envoy_request("app", &[&[]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.statuses.len(), 1);
}
