//! Envoy response headers (opt-in): exact names and values for allowed and
//! denied answers, which descriptor they describe, custom names, and none
//! when nothing is limited or when the option is off.

mod common;

use std::sync::Arc;

use common::{T0, TestServer, envoy_request, rules};
use ratekeeper::Server;
use ratekeeper::api::ResponseHeaders;
use ratekeeper::clock::ManualClock;
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::store::MemoryStore;

const RULES: &str = r#"
domain: hdr
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 5, name: per-user}
  - key: ip
    rate_limit: {unit: second, requests_per_unit: 2}
"#;

async fn server(headers: Option<ResponseHeaders>) -> TestServer {
    let store = Arc::new(MemoryStore::new(1_000, Arc::new(ManualClock::new(T0))));
    TestServer::start(Server::new(rules(&[RULES]), store).with_response_headers(headers)).await
}

fn headers(response: &RateLimitResponse) -> Vec<(String, String)> {
    response
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect()
}

fn expect(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn allowed_and_denied_answers_carry_exact_headers() {
    let server = server(Some(ResponseHeaders::default())).await;
    let envoy = server.envoy().await;
    let call = |descriptors: &'static [&'static [(&'static str, &'static str)]]| {
        let mut envoy = envoy.clone();
        async move {
            envoy
                .should_rate_limit(envoy_request("hdr", descriptors))
                .await
                .unwrap()
                .into_inner()
        }
    };

    // T0 is 40 s into a minute: 20 s to the minute's reset, 1 s for a second.
    let first = call(&[&[("user", "a")]]).await;
    assert_eq!(first.overall_code(), Code::Ok);
    assert_eq!(
        headers(&first),
        expect(&[
            ("RateLimit-Limit", "5"),
            ("RateLimit-Remaining", "4"),
            ("RateLimit-Reset", "20"),
            ("RateLimit-Policy", "\"per-user\";q=5;w=60"),
            ("RateLimit", "\"per-user\";r=4;t=20"),
        ])
    );

    // Two limits: the headers describe the one with the fewest hits left.
    let both = call(&[&[("user", "a")], &[("ip", "x")]]).await;
    assert_eq!(
        headers(&both),
        expect(&[
            ("RateLimit-Limit", "2"),
            ("RateLimit-Remaining", "1"),
            ("RateLimit-Reset", "1"),
            (
                "RateLimit-Policy",
                "\"per-user\";q=5;w=60, \"hdr.ip\";q=2;w=1"
            ),
            ("RateLimit", "\"hdr.ip\";r=1;t=1"),
        ])
    );

    call(&[&[("ip", "x")]]).await;
    let denied = call(&[&[("user", "a")], &[("ip", "x")]]).await;
    assert_eq!(denied.overall_code(), Code::OverLimit);
    assert_eq!(
        headers(&denied),
        expect(&[
            ("RateLimit-Limit", "2"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", "1"),
            (
                "RateLimit-Policy",
                "\"per-user\";q=5;w=60, \"hdr.ip\";q=2;w=1"
            ),
            ("RateLimit", "\"hdr.ip\";r=0;t=1"),
            ("Retry-After", "1"),
        ])
    );

    // Nothing limited: no headers at all.
    assert!(headers(&call(&[&[("other", "x")]]).await).is_empty());
}

#[tokio::test]
async fn header_names_are_configurable_and_the_option_is_off_by_default() {
    let custom = ResponseHeaders {
        limit: "X-RateLimit-Limit".into(),
        remaining: "X-RateLimit-Remaining".into(),
        reset: "X-RateLimit-Reset".into(),
    };
    let custom_server = server(Some(custom)).await;
    let response = custom_server
        .envoy()
        .await
        .should_rate_limit(envoy_request("hdr", &[&[("user", "b")]]))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = headers(&response).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        names,
        [
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset",
            "RateLimit-Policy",
            "RateLimit"
        ]
    );

    let plain = server(None).await;
    let response = plain
        .envoy()
        .await
        .should_rate_limit(envoy_request("hdr", &[&[("user", "b")]]))
        .await
        .unwrap()
        .into_inner();
    assert!(response.response_headers_to_add.is_empty());
}
