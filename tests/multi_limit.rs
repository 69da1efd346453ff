//! Several limits on one descriptor (`rate_limits`), end to end over gRPC
//! against the memory store and a real Redis: a request passes only when
//! every limit admits it, exactly the most restrictive limit's worth is
//! admitted (also under 64 concurrent callers), a denied request charges no
//! limit, the reported retry_after admits the request, Envoy's answer shows
//! the most restrictive limit, `/rules` and the per-rule metrics see the
//! rule once, and bad `rate_limits` YAML is refused with a clear error.

mod common;

use common::{
    Backend, Harness, allow_request, assert_retry_is_exact, envoy_request, http_get, rules,
};
use ratekeeper::config::parse_rules_file;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as RateLimitUnit;
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use ratekeeper::proto::ratekeeper::v1::{Decision, ShouldAllowResponse};
use tonic::transport::Channel;

/// `user`: 10 per second and 25 per minute. `burst`: 5 per second and 5
/// per minute (both full at once). `mixed`: a token bucket of 2 per second
/// and 4 per 3 seconds in a sliding window. T0 is 40 s into a minute.
const RULES: &str = r#"
domain: multi
descriptors:
  - key: user
    rate_limits:
      - {unit: second, requests_per_unit: 10, name: per-user}
      - {unit: minute, requests_per_unit: 25}
  - key: burst
    rate_limits:
      - {unit: second, requests_per_unit: 5}
      - {unit: minute, requests_per_unit: 5}
  - key: mixed
    rate_limits:
      - {unit: second, requests_per_unit: 2, algorithm: token_bucket}
      - {unit: second, unit_multiplier: 3, requests_per_unit: 4, algorithm: sliding_window}
  - key: single
    rate_limit: {unit: minute, requests_per_unit: 3}
"#;

const USER: &[(&str, &str)] = &[("user", "alice")];

async fn ask(
    client: &mut RateLimiterClient<Channel>,
    descriptors: &[&[(&str, &str)]],
    cost: u64,
) -> ShouldAllowResponse {
    client
        .should_allow(allow_request("multi", descriptors, cost))
        .await
        .unwrap()
        .into_inner()
}

fn ms(d: &prost_types::Duration) -> u64 {
    (d.seconds * 1000) as u64 + (d.nanos / 1_000_000) as u64
}

/// Calls one at a time until denied (bounded); returns how many passed and
/// the denial.
async fn drain(
    client: &mut RateLimiterClient<Channel>,
    descriptors: &[&[(&str, &str)]],
) -> (u64, ShouldAllowResponse) {
    for admitted in 0..1_000 {
        let response = ask(client, descriptors, 1).await;
        if !response.allowed {
            return (admitted, response);
        }
    }
    panic!("never denied");
}

async fn admits_exactly_the_most_restrictive_limits_worth(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let mut client = h.server.client().await;
    // The first call reports the tighter limit: 9 left of 10 this second
    // (24 of 25 this minute).
    let first = ask(&mut client, &[USER], 1).await;
    let result = &first.results[0];
    assert_eq!((result.limit, result.remaining), (10, 9));
    assert_eq!(result.rule_name, "per-user");
    // Second by second: 10, 10, then the minute's last 5.
    let (admitted, denied) = drain(&mut client, &[USER]).await;
    assert_eq!(admitted, 9);
    let result = &denied.results[0];
    assert_eq!((result.limit, result.remaining), (10, 0));
    assert_eq!(result.retry_after.as_ref().map(ms), Some(1_000));
    h.clock.advance(1_000);
    assert_eq!(drain(&mut client, &[USER]).await.0, 10);
    h.clock.advance(1_000);
    let (admitted, denied) = drain(&mut client, &[USER]).await;
    assert_eq!(admitted, 5);
    // Now the minute binds: its limit, 0 left, 18 s to its end.
    let result = &denied.results[0];
    assert_eq!(result.decision(), Decision::Denied);
    assert_eq!((result.limit, result.remaining), (25, 0));
    assert_eq!(result.window.as_ref().map(|w| w.seconds), Some(60));
    assert_eq!(result.retry_after.as_ref().map(ms), Some(18_000));
    assert_eq!(denied.retry_after.as_ref().map(ms), Some(18_000));
    // Later seconds of the same minute admit nothing more.
    for _ in 0..5 {
        h.clock.advance(1_000);
        assert_eq!(drain(&mut client, &[USER]).await.0, 0);
    }
}

async fn a_denied_request_charges_no_limit(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let mut client = h.server.client().await;
    // Denied by the second (10 + 1 > 10): the minute must not count it.
    assert!(ask(&mut client, &[USER], 10).await.allowed);
    for _ in 0..3 {
        assert!(!ask(&mut client, &[USER], 1).await.allowed);
    }
    h.clock.advance(1_000);
    assert!(ask(&mut client, &[USER], 10).await.allowed);
    h.clock.advance(1_000);
    // 20 of 25 counted, not 23: exactly 5 remain.
    let response = ask(&mut client, &[USER], 5).await;
    assert!(response.allowed);
    assert_eq!(response.results[0].remaining, 0);
    // Denied by the multi-limit descriptor: the other descriptor of the
    // request is not charged either (all-or-nothing across both).
    let single: &[(&str, &str)] = &[("single", "s")];
    for _ in 0..4 {
        let response = ask(&mut client, &[single, USER], 1).await;
        assert!(!response.allowed);
        assert_eq!(response.results[0].decision(), Decision::Allowed);
    }
    assert_eq!(drain(&mut client, &[single]).await.0, 3);
    // A cost no limit can ever admit is denied with no retry_after.
    let never = ask(&mut client, &[&[("user", "bob")]], 11).await;
    assert!(!never.allowed);
    assert_eq!(never.retry_after, None);
    assert_eq!(
        ask(&mut client, &[&[("user", "bob")]], 10).await.results[0].remaining,
        0
    );
}

async fn retry_after_admits_when_several_limits_deny(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let mut client = h.server.client().await;
    let burst: &[(&str, &str)] = &[("burst", "b")];
    assert!(ask(&mut client, &[burst], 5).await.allowed);
    // Both deny: the second for 1 s, the minute for 20 s. The request
    // waits for the slower one.
    let denied = ask(&mut client, &[burst], 1).await;
    assert_eq!(denied.retry_after.as_ref().map(ms), Some(20_000));
    let request = allow_request("multi", &[burst], 1);
    assert_retry_is_exact(&mut client, &h.clock, request, 20_000).await;

    // A token bucket and a sliding window: the wait is still exact.
    let mixed: &[(&str, &str)] = &[("mixed", "m")];
    for step in 0..6 {
        let (_, denied) = drain(&mut client, &[mixed]).await;
        let wait = denied.retry_after.as_ref().map(ms).expect("a wait");
        let request = allow_request("multi", &[mixed], 1);
        assert_retry_is_exact(&mut client, &h.clock, request, wait).await;
        h.clock.advance(137 * step);
    }
}

async fn sixty_four_concurrent_callers_are_exact(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let client = h.server.client().await;
    // Three seconds of one minute: 10, 10, then the minute's last 5.
    for expected in [10, 10, 5] {
        let mut tasks = Vec::new();
        for caller in 0..64 {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut admitted = 0u64;
                for _ in 0..3 {
                    let cost = 1 + caller % 2;
                    if ask(&mut client, &[USER], cost).await.allowed {
                        admitted += cost;
                    }
                }
                admitted
            }));
        }
        let mut admitted = 0;
        for task in tasks {
            admitted += task.await.unwrap();
        }
        // Costs of 1 and 2: a limit may end one short when the last unit
        // left is only asked for by costs of 2; top it up with single calls.
        let mut client = client.clone();
        admitted += drain(&mut client, &[USER]).await.0;
        assert_eq!(admitted, expected);
        h.clock.advance(1_000);
    }
}

async fn envoy_reports_the_most_restrictive_limit(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let mut envoy = h.server.envoy().await;
    let request = || envoy_request("multi", &[USER]);
    let status = |r: &ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse| {
        let s = &r.statuses[0];
        let limit = s.current_limit.as_ref().unwrap();
        (
            r.overall_code(),
            limit.requests_per_unit,
            limit.unit(),
            s.limit_remaining,
            s.duration_until_reset.as_ref().map(|d| d.seconds),
        )
    };
    let first = envoy
        .should_rate_limit(request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status(&first),
        (Code::Ok, 10, RateLimitUnit::Second, 9, Some(1))
    );
    assert_eq!(
        first.statuses[0].current_limit.as_ref().unwrap().name,
        "per-user"
    );
    let mut last = first;
    for _ in 0..10 {
        last = envoy
            .should_rate_limit(request())
            .await
            .unwrap()
            .into_inner();
    }
    assert_eq!(
        status(&last),
        (Code::OverLimit, 10, RateLimitUnit::Second, 0, Some(1))
    );
    // Envoy counts each limit as upstream counts separate descriptors: the
    // denied hit counted on the minute too (11 of 25).
    let hits = |n: u32| {
        let mut request = request();
        request.hits_addend = n;
        request
    };
    h.clock.advance(1_000);
    let next = envoy
        .should_rate_limit(hits(10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status(&next),
        (Code::Ok, 10, RateLimitUnit::Second, 0, Some(1))
    );
    // 24 of 25 on the minute, 3 of 10 this second: the minute binds.
    h.clock.advance(1_000);
    let next = envoy.should_rate_limit(hits(3)).await.unwrap().into_inner();
    assert_eq!(
        status(&next),
        (Code::Ok, 25, RateLimitUnit::Minute, 1, Some(18))
    );
    let over = envoy.should_rate_limit(hits(2)).await.unwrap().into_inner();
    assert_eq!(
        status(&over),
        (Code::OverLimit, 25, RateLimitUnit::Minute, 0, Some(18))
    );
}

async fn rules_and_metrics_see_the_rule_once(backend: Backend) {
    let h = Harness::start(backend, RULES).await;
    let mut client = h.server.client().await;
    for _ in 0..12 {
        ask(&mut client, &[USER], 1).await;
    }
    let metrics = http_get(h.server.admin_addr, "/metrics").await;
    let value = |name: &str| {
        let series = format!("{name}{{domain=\"multi\",rule=\"multi.user\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    assert_eq!(value("ratelimit_rule_hits_total"), 12.0);
    assert_eq!(value("ratelimit_rule_allowed_total"), 10.0);
    assert_eq!(value("ratelimit_rule_denied_total"), 2.0);

    let body = http_get(h.server.admin_addr, "/rules").await;
    let json = body.split("\r\n\r\n").nth(1).unwrap();
    let views: serde_json::Value = serde_json::from_str(json).unwrap();
    let user = views
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["path"] == "multi.user")
        .unwrap();
    assert_eq!(user["requests_per_unit"], 10);
    let limits: Vec<(u64, &str)> = user["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["requests_per_unit"].as_u64().unwrap(),
                l["unit"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(limits, [(10, "second"), (25, "minute")]);
}

/// Envoy's response headers: upstream's three show the limit reported, the
/// draft's `RateLimit-Policy` lists every limit of the descriptor.
async fn headers_show_the_reported_limit_and_list_every_limit(backend: Backend) {
    use std::sync::Arc;

    use common::{TestServer, TestStore};
    use ratekeeper::Server;
    use ratekeeper::api::{DraftHeaders, ResponseHeaders};
    use ratekeeper::clock::ManualClock;

    let clock = Arc::new(ManualClock::new(common::T0));
    let store = TestStore::new(backend, clock.clone());
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store.store.clone())
            .with_response_headers(Some(ResponseHeaders::default()))
            .with_draft_rate_limit_headers(DraftHeaders::On),
    )
    .await;
    let mut envoy = server.envoy().await;
    let mut request = envoy_request("multi", &[USER]);
    request.hits_addend = 10;
    let mut last = envoy
        .should_rate_limit(request.clone())
        .await
        .unwrap()
        .into_inner();
    let headers: Vec<(String, String)> = last
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    let expected = [
        ("RateLimit-Limit", "10"),
        ("RateLimit-Remaining", "0"),
        ("RateLimit-Reset", "1"),
        (
            "RateLimit-Policy",
            "\"per-user\";q=10;w=1, \"per-user\";q=25;w=60",
        ),
        ("RateLimit", "\"per-user\";r=0;t=1"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    assert_eq!(headers, expected);
    // Then 10 and 5 in the next two seconds fill the minute; 6 more are
    // over both limits: the request waits for the minute, 18 s.
    for hits in [10, 5, 6] {
        clock.advance(if hits == 6 { 0 } else { 1_000 });
        request.hits_addend = hits;
        last = envoy
            .should_rate_limit(request.clone())
            .await
            .unwrap()
            .into_inner();
    }
    let retry = last
        .response_headers_to_add
        .iter()
        .find(|h| h.key == "Retry-After")
        .map(|h| h.value.clone());
    assert_eq!(last.overall_code(), Code::OverLimit);
    assert_eq!(retry.as_deref(), Some("18"));
}

both_stores!(
    admits_exactly_the_most_restrictive_limits_worth,
    a_denied_request_charges_no_limit,
    retry_after_admits_when_several_limits_deny,
    sixty_four_concurrent_callers_are_exact,
    envoy_reports_the_most_restrictive_limit,
    rules_and_metrics_see_the_rule_once,
    the_over_limit_cache_charges_no_other_limit,
    headers_show_the_reported_limit_and_list_every_limit,
);

/// The error for a rules file with one descriptor `user` whose limits are
/// `limits` (YAML after the key).
fn refused(limits: &str) -> String {
    let text = format!("domain: d\ndescriptors:\n  - key: user\n{limits}");
    match parse_rules_file("rules.yaml", &text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_rate_limits_are_refused_with_the_reason() {
    let cases = [
        (
            "    rate_limit: {unit: second, requests_per_unit: 1}\n    rate_limits: [{unit: day, requests_per_unit: 9}]\n",
            "rules.yaml: descriptors[0].rate_limits: a descriptor has either rate_limit or rate_limits, not both",
        ),
        (
            "    rate_limits: []\n",
            "rules.yaml: descriptors[0].rate_limits: rate_limits needs at least one limit",
        ),
        (
            "    rate_limits: [{unit: second, requests_per_unit: 1}, {unlimited: true}]\n",
            "rules.yaml: descriptors[0].rate_limits[1].unlimited: a rate_limits entry cannot be unlimited",
        ),
        (
            "    rate_limits: [{unit: second, requests_per_unit: 1}, {unit: day, requests_per_unit: 9, name: daily}]\n",
            "rules.yaml: descriptors[0].rate_limits[1].name: name applies to every limit of the descriptor; write it on rate_limits[0] only",
        ),
        (
            "    rate_limits: [{unit: second, requests_per_unit: 1}, {unit: day, requests_per_unit: 9, failure_policy: allow}]\n",
            "rules.yaml: descriptors[0].rate_limits[1].failure_policy: failure_policy applies to every limit",
        ),
        (
            "    rate_limits: [{unit: minute, requests_per_unit: 1}, {unit: second, unit_multiplier: 60, requests_per_unit: 9}]\n",
            "rules.yaml: descriptors[0].rate_limits[1]: counts the same window as rate_limits[0] (fixed_window over 60 s)",
        ),
        (
            "    rate_limits: [{unit: second, requests_per_unit: 1}, {unit: days, requests_per_unit: 9}]\n",
            "rules.yaml: descriptors[0].rate_limits[1].unit: invalid rate limit unit 'days'",
        ),
        (
            "    rate_limits: [{unit: second, requests_per_unit: 1}, {unit: day, requests_per_unit: 9, burst: 3}]\n",
            "rules.yaml: descriptors[0].rate_limits[1].burst: burst is only valid with algorithm token_bucket",
        ),
        (
            "    rate_limits: [{unit: second, requests_per_unit: 1}, {unit: day, requestsperunit: 9}]\n",
            "unknown field `requestsperunit`",
        ),
        (
            "    rate_limits: {unit: second, requests_per_unit: 1}\n",
            "rules.yaml: descriptors[0].rate_limits: invalid type: map, expected a sequence",
        ),
    ];
    for (yaml, expected) in cases {
        let error = refused(yaml);
        assert!(
            error.contains(expected),
            "for\n{yaml}expected «{expected}», got «{error}»"
        );
    }
}

#[test]
fn limits_differing_in_algorithm_or_window_load() {
    let text = r#"
domain: d
descriptors:
  - key: user
    rate_limits:
      - {unit: second, requests_per_unit: 10, name: api, failure_policy: deny, replaces: [{name: other}]}
      - {unit: second, requests_per_unit: 10, algorithm: sliding_window}
      - {unit: second, requests_per_unit: 5, algorithm: token_bucket, burst: 20}
      - {unit: day, requests_per_unit: 10000}
"#;
    let rules = rules(&[text]);
    let rule = &rules.all_rules()[0];
    assert_eq!(rule.name.as_deref(), Some("api"));
    assert_eq!(rule.replaces, ["other"]);
    assert_eq!(rule.limits().count(), 4);
    assert_eq!(
        rule.limits().map(|l| l.requests_per_unit).sum::<u64>(),
        10_025
    );
}

/// On a real Redis Cluster: every limit of a descriptor lives on one slot,
/// so one script call decides all of them, and 64 concurrent callers on 10
/// users are admitted exactly the tighter limit's worth per user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keeps_a_descriptors_limits_on_one_slot() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use common::TestServer;
    use common::cluster::RedisCluster;
    use ratekeeper::clock::ManualClock;
    use ratekeeper::store::RedisClusterStore;
    use ratekeeper::store::redis_cluster::RedisClusterSettings;

    let cluster = RedisCluster::start();
    let store = RedisClusterStore::new(&RedisClusterSettings {
        nodes: cluster.urls(),
        pool_size: 2,
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_millis(500),
        tls: None,
        expiry_jitter: Duration::ZERO,
    })
    .unwrap()
    .with_clock(Arc::new(ManualClock::new(common::T0)));
    let server = TestServer::with(rules(&[RULES]), Arc::new(store)).await;
    let channel = server.channel().await;
    let allowed: Arc<Vec<AtomicU64>> = Arc::new((0..10).map(|_| AtomicU64::new(0)).collect());
    let callers: Vec<_> = (0..64)
        .map(|caller| {
            let allowed = allowed.clone();
            let mut client = RateLimiterClient::new(channel.clone());
            tokio::spawn(async move {
                for call in 0..5 {
                    let user = (caller + call) % 10;
                    let name = format!("user-{user}");
                    if ask(&mut client, &[&[("user", &name)]], 1).await.allowed {
                        allowed[user].fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let counts: Vec<u64> = allowed.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    assert_eq!(counts, [10; 10], "allowed per user");

    // Both keys of each user sit on one master.
    let masters = cluster.masters();
    for user in 0..10 {
        let marker = format!("user-{user}|");
        let holders: Vec<(u16, usize)> = masters
            .iter()
            .map(|port| {
                let keys = cluster.keys_on(*port);
                let mine = keys
                    .iter()
                    .filter(|k| String::from_utf8_lossy(k).contains(&marker))
                    .count();
                (*port, mine)
            })
            .filter(|(_, mine)| *mine > 0)
            .collect();
        assert_eq!(holders.len(), 1, "user-{user}'s keys: {holders:?}");
        assert_eq!(holders[0].1, 2, "user-{user}: one key per limit");
    }

    // One script call per request, whatever the number of limits.
    cluster.reset_stats();
    let mut client = RateLimiterClient::new(channel.clone());
    for _ in 0..5 {
        assert!(ask(&mut client, &[&[("user", "fresh")]], 1).await.allowed);
    }
    let scripts: u64 = masters
        .iter()
        .map(|port| cluster.calls(*port, "fcall"))
        .sum();
    assert_eq!(scripts, 5);
}

/// `check-config` (the real binary) prints every limit of a descriptor, and
/// refuses a bad list naming the file, the path and the reason.
#[test]
fn check_config_shows_every_limit_and_refuses_bad_lists() {
    let dir = tempfile::tempdir().unwrap();
    let run = |text: &str| {
        let path = dir.path().join("rules.yaml");
        std::fs::write(&path, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_ratekeeper"))
            .args(["check-config", path.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = run(RULES);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout
            .contains("multi.user: 10 per second (fixed_window) and 25 per minute (fixed_window)"),
        "{stdout}"
    );
    let out = run("domain: d\ndescriptors:\n  - key: k\n    rate_limits: []\n");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("descriptors[0].rate_limits: rate_limits needs at least one limit"),
        "{stderr}"
    );
}

/// In the envoy-ratelimit key layout (migrations), the first limit counts
/// in upstream's key and the others in keys of their own; the decisions
/// are the same as in ratekeeper's layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoy_ratelimit_layout_counts_every_limit() {
    use std::sync::Arc;
    use std::time::Duration;

    use common::{RedisServer, TestServer};
    use ratekeeper::clock::{Clock, ManualClock};
    use ratekeeper::store::envoy_layout::EnvoyLayout;

    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock::new(common::T0));
    let store = common::redis_store(&redis.url(), Duration::from_secs(2))
        .with_clock(clock.clone() as Arc<dyn Clock>)
        .with_envoy_layout(EnvoyLayout::new("p_", clock.clone(), 0));
    let server = TestServer::with(rules(&[RULES]), Arc::new(store)).await;
    let mut client = server.client().await;
    for expected in [10, 10, 5, 0] {
        assert_eq!(drain(&mut client, &[USER]).await.0, expected);
        clock.advance(1_000);
    }
    let mut connection = redis.connection();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query(&mut connection)
        .unwrap();
    let start = common::T0 / 1_000;
    for second in [start, start + 1, start + 2] {
        let key = format!("p_multi_user_alice_{second}");
        assert!(keys.contains(&key), "{key} in {keys:?}");
    }
    assert!(keys.iter().any(|k| k.starts_with("rk4:")), "{keys:?}");
}

/// With the over-limit cache, a limit known to be over answers without the
/// store, and the request's other limits are still not charged: the minute
/// keeps exactly what the admitted calls took.
async fn the_over_limit_cache_charges_no_other_limit(backend: Backend) {
    use std::sync::Arc;

    use common::{TestServer, TestStore};
    use ratekeeper::Server;
    use ratekeeper::clock::ManualClock;
    use ratekeeper::store::OverLimitCache;

    let clock = Arc::new(ManualClock::new(common::T0));
    let store = TestStore::new(backend, clock.clone());
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store.store.clone())
            .with_over_limit_cache(OverLimitCache::new(1_000, clock.clone())),
    )
    .await;
    let mut client = server.client().await;
    for expected in [10, 10, 5, 0] {
        // Many denials per second, most of them from the cache.
        let (admitted, _) = drain(&mut client, &[USER]).await;
        for _ in 0..20 {
            assert!(!ask(&mut client, &[USER], 1).await.allowed);
        }
        assert_eq!(admitted, expected);
        clock.advance(1_000);
    }
}
