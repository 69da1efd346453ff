//! Envoy response headers (opt-in), on both stores: `--response-headers`
//! adds exactly envoyproxy/ratelimit's three headers (names configurable),
//! `--draft-rate-limit-headers` the IETF draft's `RateLimit-Policy`,
//! `RateLimit` and `Retry-After`; both may be on. Which descriptor they
//! describe (upstream's pick, quota descriptors included), and none when
//! nothing is limited or when the options are off.

mod common;

use std::sync::Arc;

use common::{Backend, T0, TestServer, TestStore, envoy_request, rules};
use ratekeeper::Server;
use ratekeeper::api::{DraftHeaders, QuotaMode, ResponseHeaders};
use ratekeeper::clock::ManualClock;
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

const RULES: &str = r#"
domain: hdr
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 5, name: per-user}
  - key: ip
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: quota
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1, name: soft}
"#;

struct Fixture {
    server: TestServer,
    _store: TestStore,
}

async fn server(
    backend: Backend,
    upstream: Option<ResponseHeaders>,
    draft: DraftHeaders,
) -> Fixture {
    let store = TestStore::new(backend, Arc::new(ManualClock::new(T0)));
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store.store.clone())
            .with_response_headers(upstream)
            .with_draft_rate_limit_headers(draft),
    )
    .await;
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
            .should_rate_limit(envoy_request("hdr", descriptors))
            .await
            .unwrap()
            .into_inner()
    }
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

async fn response_headers_are_exactly_upstreams_three(backend: Backend) {
    let f = server(backend, Some(ResponseHeaders::default()), DraftHeaders::Off).await;
    // T0 is 40 s into a minute: 20 s to the minute's reset, 1 s for a second.
    let first = f.call(&[&[("user", "a")]]).await;
    assert_eq!(first.overall_code(), Code::Ok);
    assert_eq!(
        headers(&first),
        expect(&[
            ("RateLimit-Limit", "5"),
            ("RateLimit-Remaining", "4"),
            ("RateLimit-Reset", "20"),
        ])
    );
    // Two limits: the one with the fewest hits left.
    let both = f.call(&[&[("user", "a")], &[("ip", "x")]]).await;
    assert_eq!(
        headers(&both),
        expect(&[
            ("RateLimit-Limit", "2"),
            ("RateLimit-Remaining", "1"),
            ("RateLimit-Reset", "1"),
        ])
    );
    // Over the limit: the over-limit descriptor, and still nothing else.
    f.call(&[&[("ip", "x")]]).await;
    let denied = f.call(&[&[("ip", "x")], &[("user", "a")]]).await;
    assert_eq!(denied.overall_code(), Code::OverLimit);
    assert_eq!(
        headers(&denied),
        expect(&[
            ("RateLimit-Limit", "2"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", "1"),
        ])
    );
    // Nothing limited: no headers at all.
    assert!(headers(&f.call(&[&[("other", "x")]]).await).is_empty());
}

async fn draft_headers_are_their_own_option(backend: Backend) {
    let f = server(backend, None, DraftHeaders::On).await;
    let first = f.call(&[&[("user", "a")], &[("ip", "x")]]).await;
    assert_eq!(
        headers(&first),
        expect(&[
            (
                "RateLimit-Policy",
                "\"per-user\";q=5;w=60, \"hdr.ip\";q=2;w=1"
            ),
            ("RateLimit", "\"hdr.ip\";r=1;t=1"),
        ])
    );
    f.call(&[&[("ip", "x")]]).await;
    let denied = f.call(&[&[("user", "a")], &[("ip", "x")]]).await;
    assert_eq!(denied.overall_code(), Code::OverLimit);
    assert_eq!(
        headers(&denied),
        expect(&[
            (
                "RateLimit-Policy",
                "\"per-user\";q=5;w=60, \"hdr.ip\";q=2;w=1"
            ),
            ("RateLimit", "\"hdr.ip\";r=0;t=1"),
            ("Retry-After", "1"),
        ])
    );
}

async fn both_kinds_together_upstreams_first(backend: Backend) {
    let custom = ResponseHeaders {
        limit: "X-RateLimit-Limit".into(),
        remaining: "X-RateLimit-Remaining".into(),
        reset: "X-RateLimit-Reset".into(),
    };
    let f = server(backend, Some(custom), DraftHeaders::On).await;
    let response = f.call(&[&[("user", "b")]]).await;
    assert_eq!(
        headers(&response),
        expect(&[
            ("X-RateLimit-Limit", "5"),
            ("X-RateLimit-Remaining", "4"),
            ("X-RateLimit-Reset", "20"),
            ("RateLimit-Policy", "\"per-user\";q=5;w=60"),
            ("RateLimit", "\"per-user\";r=4;t=20"),
        ])
    );
}

async fn headers_are_off_by_default(backend: Backend) {
    let f = server(backend, None, DraftHeaders::Off).await;
    let response = f.call(&[&[("user", "b")]]).await;
    assert!(response.response_headers_to_add.is_empty());
}

/// A quota descriptor over its limit does not take over the headers (only a
/// hard limit over its limit does), and lets the request through while
/// another quota has room.
async fn a_quota_descriptor_over_its_limit_is_described_only_as_the_fewest_left(backend: Backend) {
    let f = server(backend, Some(ResponseHeaders::default()), DraftHeaders::On).await;
    f.call(&[&[("quota", "q")]]).await;
    // quota=q is now over (0 left), user has 4 left after this call.
    let response = f.call(&[&[("user", "c")], &[("quota", "q")]]).await;
    // The only quota descriptor is over: every quota is spent, so over.
    assert_eq!(response.overall_code(), Code::OverLimit);
    assert_eq!(
        headers(&response),
        expect(&[
            ("RateLimit-Limit", "1"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", "20"),
            (
                "RateLimit-Policy",
                "\"per-user\";q=5;w=60, \"soft\";q=1;w=60"
            ),
            ("RateLimit", "\"soft\";r=0;t=20"),
            ("Retry-After", "20"),
        ])
    );
    // Global quota mode: the over-limit ip descriptor is a quota one too and
    // user still has room, so the request passes; ip is described as the
    // fewest left, and no Retry-After.
    let store = TestStore::new(backend, Arc::new(ManualClock::new(T0)));
    let global = TestServer::start(
        Server::new(rules(&[RULES]), store.store.clone())
            .with_response_headers(Some(ResponseHeaders::default()))
            .with_draft_rate_limit_headers(DraftHeaders::On)
            .with_quota_mode(QuotaMode::Global),
    )
    .await;
    let mut envoy = global.envoy().await;
    for _ in 0..2 {
        envoy
            .should_rate_limit(envoy_request("hdr", &[&[("ip", "y")]]))
            .await
            .unwrap();
    }
    let response = envoy
        .should_rate_limit(envoy_request("hdr", &[&[("ip", "y")], &[("user", "d")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.overall_code(), Code::Ok);
    assert_eq!(response.statuses[0].code(), Code::OverLimit);
    assert_eq!(
        headers(&response),
        expect(&[
            ("RateLimit-Limit", "2"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", "1"),
            (
                "RateLimit-Policy",
                "\"hdr.ip\";q=2;w=1, \"per-user\";q=5;w=60"
            ),
            ("RateLimit", "\"hdr.ip\";r=0;t=1"),
        ])
    );
}

both_stores!(
    response_headers_are_exactly_upstreams_three,
    draft_headers_are_their_own_option,
    both_kinds_together_upstreams_first,
    headers_are_off_by_default,
    a_quota_descriptor_over_its_limit_is_described_only_as_the_fewest_left,
);
