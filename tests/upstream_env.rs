//! The envoyproxy/ratelimit mode end to end: the real binary, started with
//! upstream's environment variables only (no flags, nothing else in its
//! environment but `PATH`), rules in a `RUNTIME_ROOT`-shaped directory,
//! against real `redis-server` processes (single over TCP and over a unix
//! socket, Sentinel, Cluster). Upstream's listeners and probes, `/json`,
//! `/rlconfig`, Prometheus, gRPC and its health, the variables' effects,
//! serving without a valid config, the health gate, and refusals (exit 64,
//! the variable named).

mod common;

use std::time::{Duration, Instant};

use common::cluster::RedisCluster;
use common::fault_proxy::FaultProxy;
use common::sentinel::{MASTER, SentinelOptions, SentinelSet};
use common::upstream::{
    Invocation, RuntimeDir, Upstream, listener_env, pairs, refused_start, request, single_redis_env,
};
use common::{RedisServer, T0, envoy_request, free_port};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const RULES: &str = r"domain: shop
descriptors:
  - key: user
    rate_limit: {name: per-user, unit: minute, requests_per_unit: 2}
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 1}
";

/// 40 s into a minute: every minute window has 20 s left. Exact counts are
/// under test where the clock is frozen, not latency: a store deadline
/// long enough for a debug build on a loaded machine (a call that times out
/// may still have counted, and a retry would count twice).
fn frozen() -> Vec<(String, String)> {
    pairs(&[
        ("RATEKEEPER_TEST_FROZEN_CLOCK_MS", &T0.to_string()),
        ("RATEKEEPER_TEST_STORE_TIMEOUT", "2s"),
    ])
}

fn with(mut base: Vec<(String, String)>, more: &[(&str, &str)]) -> Vec<(String, String)> {
    base.extend(pairs(more));
    base
}

fn user(value: &str) -> String {
    format!(
        r#"{{"domain":"shop","descriptors":[{{"entries":[{{"key":"user","value":"{value}"}}]}}]}}"#
    )
}

async fn health_of(upstream: &Upstream, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(upstream.channel().await);
    let answer = health
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(answer.status).unwrap()
}

async fn wait_grpc_health(upstream: &Upstream, wanted: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while health_of(upstream, "ratelimit").await != wanted {
        assert!(
            Instant::now() < deadline,
            "gRPC health never became {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `/readyz` on the debug port until its body contains `needle`.
async fn wait_readyz(upstream: &Upstream, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = request(upstream.debug, "GET", "/readyz", "").await.body;
        if body.contains(needle) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never said '{needle}': {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === the surface ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_ratelimit_on_one_redis_it_serves_upstreams_surface() {
    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    let prometheus = free_port();
    let env = with(
        single_redis_env(redis.port),
        &[
            ("USE_PROMETHEUS", "true"),
            ("PROMETHEUS_ADDR", &format!("127.0.0.1:{prometheus}")),
            ("PROMETHEUS_PATH", "/custom"),
        ],
    );
    let env = [env, frozen()].concat();
    let mut upstream = Upstream::start_as(Invocation::AsRatelimit, &runtime, &env).await;
    upstream.wait_health(200).await;

    // /healthcheck: 200 "OK", any method.
    let health = request(upstream.http, "GET", "/healthcheck", "").await;
    assert_eq!((health.status, health.body.as_str()), (200, "OK"));
    assert_eq!(
        request(upstream.http, "POST", "/healthcheck", "")
            .await
            .status,
        200
    );
    assert_eq!(
        health_of(&upstream, "ratelimit").await,
        ServingStatus::Serving
    );

    // /json: proto3 JSON in and out, 200 then 429.
    let first = upstream.json(&user("a")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["content-type"], "application/json");
    assert_eq!(
        first.body,
        r#"{"overallCode":"OK","statuses":[{"code":"OK","currentLimit":{"requestsPerUnit":2,"unit":"MINUTE","name":"per-user"},"limitRemaining":1,"durationUntilReset":"20s"}]}"#
    );
    let second = upstream.json(&user("a")).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.json()["statuses"][0].get("limitRemaining"), None);
    let third = upstream.json(&user("a")).await;
    assert_eq!(third.status, 429);
    assert_eq!(third.json()["overallCode"], "OVER_LIMIT");
    assert_eq!(third.json()["statuses"][0]["code"], "OVER_LIMIT");

    // gRPC on GRPC_PORT decides with the same counters.
    let mut envoy = upstream.envoy().await;
    let over = envoy
        .should_rate_limit(envoy_request("shop", &[&[("user", "a")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(over.overall_code(), Code::OverLimit);
    let fresh = envoy
        .should_rate_limit(envoy_request("shop", &[&[("user", "b")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fresh.statuses[0].limit_remaining, 1);

    // The proto's own field names and string integers are read too.
    let snake = upstream
        .json(r#"{"domain":"shop","descriptors":[{"entries":[{"key":"user","value":"c"}],"hits_addend":"2"}]}"#)
        .await;
    assert_eq!(snake.status, 200, "{}", snake.body);
    assert_eq!(snake.json()["statuses"][0].get("limitRemaining"), None);

    // Anything wrong: 400 "Bad Request".
    for body in [
        "not json",
        "",
        r#"{"domain":"","descriptors":[{"entries":[{"key":"user","value":"a"}]}]}"#,
        r#"{"domain":"shop","descriptors":[]}"#,
        r#"{"domain":"shop","descriptors":[{"entries":[{"key":"user","valeu":"a"}]}]}"#,
    ] {
        let answer = upstream.json(body).await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (400, "Bad Request\n"),
            "{body}"
        );
        assert_eq!(answer.headers["content-type"], "text/plain; charset=utf-8");
    }
    assert_eq!(request(upstream.http, "GET", "/json", "").await.status, 400);
    assert_eq!(
        request(upstream.http, "GET", "/nothing", "").await.status,
        404
    );

    // /rlconfig on the debug port, and the admin routes beside it.
    let rlconfig = request(upstream.debug, "GET", "/rlconfig", "").await;
    assert_eq!(
        rlconfig.body,
        "shop.tenant: unit=MINUTE requests_per_unit=1, shadow_mode: false, quota_mode: false\n\
         shop.user: unit=MINUTE requests_per_unit=2, shadow_mode: false, quota_mode: false\n"
    );
    assert_eq!(
        request(upstream.debug, "GET", "/readyz", "").await.status,
        200
    );
    let index = request(upstream.debug, "GET", "/debug/pprof/", "").await;
    assert!(index.body.contains("/rlconfig: "), "{}", index.body);

    // Prometheus on its own listener, at its path only.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], prometheus));
    let metrics = request(addr, "GET", "/custom", "").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains(
            r#"ratelimit_requests_total{surface="envoy",domain="shop",decision="denied"} 2"#
        ),
        "{}",
        metrics.body
    );
    assert_eq!(request(addr, "GET", "/metrics", "").await.status, 404);

    // The counters are in Redis.
    let keys: Vec<String> = redis::Commands::keys(&mut redis.connection(), "*").unwrap();
    assert_eq!(keys.len(), 3, "{keys:?}");

    assert_eq!(upstream.terminate().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_redis_with_a_password_and_a_pool_size() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("redis.sock");
    let redis = RedisServer::start_with(&[
        "--unixsocket",
        socket.to_str().unwrap(),
        "--unixsocketperm",
        "700",
        "--requirepass",
        "pw",
    ]);
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    // REDIS_SOCKET_TYPE's default is unix.
    let env = [
        pairs(&[
            ("REDIS_URL", socket.to_str().unwrap()),
            ("REDIS_AUTH", "pw"),
            ("REDIS_POOL_SIZE", "3"),
        ]),
        frozen(),
    ]
    .concat();
    let upstream = Upstream::start(&runtime, &env).await;
    upstream.wait_health(200).await;
    assert_eq!(
        upstream.json(&user("u")).await.json()["statuses"][0]["limitRemaining"],
        1
    );
    assert_eq!(
        upstream.json(&user("u")).await.json()["statuses"][0].get("limitRemaining"),
        None
    );
    let mut conn = redis::Client::open(format!("redis://:pw@127.0.0.1:{}", redis.port))
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::Commands::keys(&mut conn, "*").unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    // REDIS_POOL_SIZE connections, all on the socket (ours is the TCP one).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn).unwrap();
        let on_socket = clients
            .lines()
            .filter(|l| l.contains("addr=/") || l.contains("flags=U"))
            .count();
        if on_socket == 3 {
            break;
        }
        assert!(on_socket < 3, "{clients}");
        assert!(Instant::now() < deadline, "{clients}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_with_the_masters_and_the_sentinels_passwords() {
    let set = SentinelSet::start_with(SentinelOptions {
        master_password: Some("master-pw".into()),
        sentinel_password: Some("sentinel-pw".into()),
        tls: None,
    });
    let sentinels: Vec<String> = set
        .sentinel_ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    let env = [
        pairs(&[
            ("REDIS_TYPE", "sentinel"),
            ("REDIS_URL", &format!("{MASTER},{}", sentinels.join(","))),
            ("REDIS_AUTH", "master-pw"),
            ("REDIS_SENTINEL_AUTH", "sentinel-pw"),
        ]),
        frozen(),
    ]
    .concat();
    let upstream = Upstream::start(&runtime, &env).await;
    upstream.wait_health(200).await;
    assert_eq!(upstream.json(&user("s")).await.status, 200);
    assert_eq!(upstream.json(&user("s")).await.status, 200);
    assert_eq!(upstream.json(&user("s")).await.status, 429);
    let mut primary =
        redis::Client::open(format!("redis://:master-pw@127.0.0.1:{}", set.primary.port))
            .unwrap()
            .get_connection()
            .unwrap();
    let keys: Vec<String> = redis::Commands::keys(&mut primary, "*").unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster() {
    let cluster = RedisCluster::start();
    let nodes: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    let env = [
        pairs(&[
            ("REDIS_TYPE", "CLUSTER"),
            ("REDIS_URL", &nodes.join(",")),
            ("REDIS_POOL_SIZE", "1"),
        ]),
        frozen(),
    ]
    .concat();
    let upstream = Upstream::start(&runtime, &env).await;
    upstream.wait_health(200).await;
    let many: Vec<String> = (0..12)
        .map(|i| format!(r#"{{"entries":[{{"key":"user","value":"u{i}"}}]}}"#))
        .collect();
    let body = format!(r#"{{"domain":"shop","descriptors":[{}]}}"#, many.join(","));
    let answer = upstream.json(&body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        answer.json()["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["limitRemaining"] == 1)
    );
    // Twelve counters, spread over the masters.
    let per_master: Vec<usize> = cluster
        .masters()
        .iter()
        .map(|m| cluster.keys_on(*m).len())
        .collect();
    assert_eq!(per_master.iter().sum::<usize>(), 12, "{per_master:?}");
    assert!(
        per_master.iter().filter(|n| **n > 0).count() > 1,
        "{per_master:?}"
    );
}

// === config ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_config_it_serves_failing_every_call_and_the_gate_holds_health() {
    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    runtime.write(
        "shop.yaml",
        "domain: shop\ndescriptors:\n  - key: user\n    ratelimit: {}\n",
    );
    let env = [
        single_redis_env(redis.port),
        pairs(&[("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", "true")]),
        frozen(),
    ]
    .concat();
    let upstream = Upstream::start(&runtime, &env).await;

    // Not healthy: no config with a domain.
    assert_eq!(upstream.health().await, 500);
    assert_eq!(
        request(upstream.http, "GET", "/healthcheck", "").await.body,
        ""
    );
    assert_eq!(
        health_of(&upstream, "ratelimit").await,
        ServingStatus::NotServing
    );
    // Every call fails as upstream's: UNKNOWN, its message; /json 400.
    let mut envoy = upstream.envoy().await;
    let status = envoy
        .should_rate_limit(envoy_request("shop", &[&[("user", "a")]]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unknown);
    assert_eq!(status.message(), "no rate limit configuration loaded");
    // Checks of the request itself come first, as upstream's.
    let empty = envoy
        .should_rate_limit(envoy_request("", &[&[("user", "a")]]))
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    assert_eq!(upstream.json(&user("a")).await.status, 400);
    assert_eq!(
        request(upstream.debug, "GET", "/rlconfig", "").await.body,
        ""
    );
    let readyz = wait_readyz(&upstream, "last config refused").await;
    assert!(readyz.contains("unknown field `ratelimit`"), "{readyz}");

    // A valid config loads: healthy, and calls decide.
    runtime.write("shop.yaml", RULES);
    upstream.wait_health(200).await;
    wait_grpc_health(&upstream, ServingStatus::Serving).await;
    assert_eq!(
        upstream.json(&user("a")).await.json()["statuses"][0]["limitRemaining"],
        1
    );

    // A refused change changes nothing: still healthy, the old rules decide.
    runtime.write("shop.yaml", "domain: shop\ndescriptors: 7\n");
    wait_readyz(&upstream, "last config change refused").await;
    assert_eq!(upstream.health().await, 200);
    assert_eq!(
        upstream.json(&user("a")).await.json()["statuses"][0].get("limitRemaining"),
        None
    );

    // A config without domains loads, and the gate makes it unhealthy;
    // calls are answered (no limit applies).
    runtime.remove("shop.yaml");
    upstream.wait_health(500).await;
    wait_grpc_health(&upstream, ServingStatus::NotServing).await;
    let answer = upstream.json(&user("a")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body,
        r#"{"overallCode":"OK","statuses":[{"code":"OK"}]}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_gate_health_does_not_wait_for_a_config() {
    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    // No rules directory at all.
    std::fs::remove_dir(runtime.config()).unwrap();
    let upstream = Upstream::start(&runtime, &single_redis_env(redis.port)).await;
    upstream.wait_health(200).await;
    assert_eq!(upstream.json(&user("a")).await.status, 400);
    let status = upstream
        .envoy()
        .await
        .should_rate_limit(envoy_request("shop", &[&[("user", "a")]]))
        .await
        .unwrap_err();
    assert_eq!(status.message(), "no rate limit configuration loaded");
    // The directory appears: the rules apply.
    std::fs::create_dir_all(runtime.config()).unwrap();
    runtime.write("shop.yaml", RULES);
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.json(&user("a")).await.status != 200 {
        assert!(Instant::now() < deadline, "the rules never loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_directory_and_dot_files() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("root/ratelimit/rules");
    std::fs::create_dir_all(&rules).unwrap();
    let domain = |name: &str| {
        format!(
            "domain: {name}\ndescriptors:\n  - key: k\n    rate_limit: {{unit: second, requests_per_unit: 1}}\n"
        )
    };
    std::fs::write(rules.join("a.yaml"), domain("a")).unwrap();
    std::fs::write(rules.join(".b.yaml"), domain("b")).unwrap();
    let root = dir.path().join("root");
    let base = [
        single_redis_env(redis.port),
        pairs(&[
            ("RUNTIME_ROOT", root.to_str().unwrap()),
            ("RUNTIME_SUBDIRECTORY", "ratelimit"),
            ("RUNTIME_APPDIRECTORY", "rules"),
        ]),
    ]
    .concat();
    let domains = |upstream: &Upstream| {
        let debug = upstream.debug;
        async move {
            let body = request(debug, "GET", "/rlconfig", "").await.body;
            body.lines()
                .map(|l| l.split('.').next().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    // Dot files are read by default, as upstream.
    let empty = RuntimeDir::new();
    let upstream = Upstream::start(&empty, &base).await;
    assert_eq!(domains(&upstream).await, ["a", "b"]);
    drop(upstream);
    let upstream = Upstream::start(
        &empty,
        &with(base.clone(), &[("RUNTIME_IGNOREDOTFILES", "true")]),
    )
    .await;
    assert_eq!(domains(&upstream).await, ["a"]);
    drop(upstream);
    // Without watching the root, an empty app directory is the
    // subdirectory itself (read recursively).
    let upstream = Upstream::start(
        &empty,
        &with(
            base.clone(),
            &[
                ("RUNTIME_WATCH_ROOT", "false"),
                ("RUNTIME_APPDIRECTORY", ""),
                ("RUNTIME_IGNOREDOTFILES", "true"),
            ],
        ),
    )
    .await;
    assert_eq!(domains(&upstream).await, ["a"]);
    // Changes apply whatever RUNTIME_WATCH_ROOT says.
    std::fs::write(rules.join("c.yaml"), domain("c")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while domains(&upstream).await != ["a", "c"] {
        assert!(Instant::now() < deadline, "the new file was never loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === behaviour ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_and_the_local_cache() {
    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    let env = [
        single_redis_env(redis.port),
        pairs(&[
            ("SHADOW_MODE", "true"),
            ("LOCAL_CACHE_SIZE_IN_BYTES", "1024"),
        ]),
        frozen(),
    ]
    .concat();
    let upstream = Upstream::start(&runtime, &env).await;
    upstream.wait_health(200).await;
    let tenant = r#"{"domain":"shop","descriptors":[{"entries":[{"key":"tenant","value":"t"}]}]}"#;
    assert_eq!(upstream.json(tenant).await.status, 200);
    for _ in 0..3 {
        // Over the limit, let through: the status says so, the answer is OK.
        let answer = upstream.json(tenant).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.json()["overallCode"], "OK");
        assert_eq!(answer.json()["statuses"][0]["code"], "OVER_LIMIT");
    }
    // The first denial came from Redis, the next two from the local cache.
    let metrics = request(upstream.debug, "GET", "/metrics", "").await.body;
    assert!(
        metrics.contains(r#"ratelimit_over_limit_cache_hits_total{domain="shop"} 2"#),
        "{metrics}"
    );
}

/// The Envoy surface's settings, from upstream's variables: domains merged
/// across files, quota mode per rule with the metadata it routes by,
/// dynamic metadata, exactly upstream's three headers under the names
/// given, and the near-limit ratio of the per-rule metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_domains_quota_mode_metadata_headers_and_near_limit_ratio() {
    use std::collections::BTreeMap;

    use prost_types::value::Kind;

    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    runtime.write(
        "a.yaml",
        "domain: shop\ndescriptors:\n  - key: backend\n    value: a\n    quota_mode: true\n    metadata: {route: a}\n    rate_limit: {unit: minute, requests_per_unit: 1}\n",
    );
    runtime.write(
        "b.yaml",
        "domain: shop\ndescriptors:\n  - key: backend\n    value: b\n    quota_mode: true\n    metadata: {route: b}\n    rate_limit: {unit: minute, requests_per_unit: 1}\n  - key: plain\n    rate_limit: {unit: minute, requests_per_unit: 10}\n",
    );
    let env = [
        single_redis_env(redis.port),
        pairs(&[
            ("MERGE_DOMAIN_CONFIG", "true"),
            ("RESPONSE_DYNAMIC_METADATA", "true"),
            ("LIMIT_RESPONSE_HEADERS_ENABLED", "true"),
            ("LIMIT_REMAINING_HEADER", "X-Left"),
            ("NEAR_LIMIT_RATIO", "0.5"),
        ]),
        frozen(),
    ]
    .concat();
    let upstream = Upstream::start(&runtime, &env).await;
    upstream.wait_health(200).await;
    let mut envoy = upstream.envoy().await;
    let route_of =
        |response: &ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse| {
            let metadata = response
                .dynamic_metadata
                .as_ref()
                .expect("dynamic metadata");
            assert_eq!(
                metadata.fields["domain"].kind,
                Some(Kind::StringValue("shop".to_owned()))
            );
            match &metadata.fields.get("metadata").and_then(|m| m.kind.clone()) {
                Some(Kind::StructValue(rules)) => match &rules.fields["route"].kind {
                    Some(Kind::StringValue(route)) => route.clone(),
                    other => panic!("route {other:?}"),
                },
                _ => String::new(),
            }
        };

    // Quota a has room: OK, a's route, upstream's three headers by name.
    let a = envoy
        .should_rate_limit(envoy_request(
            "shop",
            &[&[("backend", "a")], &[("plain", "p")]],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.overall_code, Code::Ok as i32);
    assert_eq!(route_of(&a), "a");
    let headers: BTreeMap<String, String> = a
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    assert_eq!(
        headers.keys().map(String::as_str).collect::<Vec<_>>(),
        ["RateLimit-Limit", "RateLimit-Reset", "X-Left"],
        "exactly upstream's three headers: {headers:?}"
    );

    // Quota a is spent, b has room: quota mode answers OK (the status of a
    // is not rewritten), and only b's route is left in the metadata.
    let both = || envoy_request("shop", &[&[("backend", "a")], &[("backend", "b")]]);
    let b = envoy.should_rate_limit(both()).await.unwrap().into_inner();
    assert_eq!(b.overall_code, Code::Ok as i32);
    assert_eq!(b.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(route_of(&b), "b");

    // Every quota over: over limit.
    let spent = envoy.should_rate_limit(both()).await.unwrap().into_inner();
    assert_eq!(spent.overall_code, Code::OverLimit as i32);

    // NEAR_LIMIT_RATIO 0.5 of 10: hits 6 to 10 are near the limit (one
    // counted above on `plain`, nine more here).
    for _ in 0..9 {
        envoy
            .should_rate_limit(envoy_request("shop", &[&[("plain", "p")]]))
            .await
            .unwrap();
    }
    let metrics = request(upstream.debug, "GET", "/metrics", "").await.body;
    let near = metrics
        .lines()
        .find(|l| l.starts_with("ratelimit_rule_near_limit_total") && l.contains("plain"))
        .unwrap_or_else(|| panic!("no near-limit series for plain:\n{metrics}"));
    assert!(near.ends_with(" 5"), "{near}");
}

/// A rolling swap: ratekeeper started from the same environment as the
/// old instances (`CACHE_KEY_PREFIX` included) counts in upstream's keys by
/// default, so it and an old envoyproxy/ratelimit instance (the emulator,
/// writing keys as upstream does) hold one exact limit between them under
/// 64 concurrent callers; `RATEKEEPER_KEY_LAYOUT=ratekeeper` leaves those
/// keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_swap_counts_in_upstreams_keys_with_the_old_instances() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use common::upstream_emulator::{Limit, Upstream as OldInstance};

    const HOUR: u64 = 3_600;
    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    runtime.write(
        "shop.yaml",
        "domain: shop\ndescriptors:\n  - key: user\n    rate_limit: {unit: hour, requests_per_unit: 300}\n",
    );
    let env = [
        single_redis_env(redis.port),
        pairs(&[("CACHE_KEY_PREFIX", "rl_")]),
        frozen(),
    ]
    .concat();
    let mut swapped = Upstream::start(&runtime, &env).await;
    swapped.wait_health(200).await;
    let old = OldInstance::on(&redis.url())
        .await
        .with_prefix("rl_")
        .with_jitter(300);
    let now_s = T0 / 1_000;
    let limit = Limit {
        requests_per_unit: 300,
        unit_seconds: HOUR,
    };
    let allowed = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for caller in 0..64 {
        let (allowed, old) = (allowed.clone(), old.clone());
        let mut envoy = (caller % 2 == 0).then_some(swapped.envoy().await);
        callers.push(tokio::spawn(async move {
            for _ in 0..10 {
                let ok = match &mut envoy {
                    Some(envoy) => {
                        let answer = envoy
                            .should_rate_limit(envoy_request("shop", &[&[("user", "u1")]]))
                            .await
                            .unwrap()
                            .into_inner();
                        answer.overall_code == Code::Ok as i32
                    }
                    None => {
                        let user: &[(&str, &str)] = &[("user", "u1")];
                        !old.should_rate_limit("shop", &[(user, limit)], 1, now_s)
                            .await[0]
                            .over_limit
                    }
                };
                if ok {
                    allowed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    assert_eq!(allowed.load(Ordering::Relaxed), 300, "one limit for both");
    let key = old.key("shop", &[("user", "u1")], HOUR, now_s);
    assert_eq!(key, format!("rl_shop_user_u1_{}", now_s / HOUR * HOUR));
    assert_eq!(
        old.get(&key).await,
        Some(640),
        "every call counted in upstream's key"
    );
    swapped.terminate().await;

    // After the rollout: ratekeeper's own keys, upstream's key untouched.
    let env = [
        single_redis_env(redis.port),
        pairs(&[("RATEKEEPER_KEY_LAYOUT", "ratekeeper")]),
        frozen(),
    ]
    .concat();
    let own = Upstream::start(&runtime, &env).await;
    own.wait_health(200).await;
    let mut envoy = own.envoy().await;
    let answer = envoy
        .should_rate_limit(envoy_request("shop", &[&[("user", "u1")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.overall_code, Code::Ok as i32, "a fresh count");
    assert_eq!(old.get(&key).await, Some(640));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_cache_key_increment_when_overlimit() {
    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    let env = [
        single_redis_env(redis.port),
        pairs(&[("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "true")]),
        frozen(),
    ]
    .concat();
    let upstream = Upstream::start(&runtime, &env).await;
    upstream.wait_health(200).await;
    let both = r#"{"domain":"shop","descriptors":[{"entries":[{"key":"tenant","value":"t"}]},{"entries":[{"key":"user","value":"u"}]}]}"#;
    assert_eq!(upstream.json(both).await.status, 200);
    // The tenant is over: the user's hit is not counted.
    let over = upstream.json(both).await;
    assert_eq!(over.status, 429);
    assert_eq!(over.json()["statuses"][1]["limitRemaining"], 1);
    assert_eq!(
        upstream.json(&user("u")).await.json()["statuses"][0].get("limitRemaining"),
        None
    );
    assert_eq!(upstream.json(&user("u")).await.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiration_jitter_is_upstreams_300_s_by_default_and_can_be_off() {
    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    // Redis's own clock (no frozen time), so TTLs are real.
    let ttls = |prefix: &'static str| {
        let mut conn = redis.connection();
        let keys: Vec<String> = redis::Commands::keys(&mut conn, format!("*{prefix}*")).unwrap();
        keys.iter()
            .map(|key| redis::cmd("PTTL").arg(key).query::<i64>(&mut conn).unwrap())
            .collect::<Vec<_>>()
    };
    let calls = |upstream: &Upstream, prefix: &'static str| {
        let http = upstream.http;
        async move {
            for i in 0..20 {
                let answer = request(http, "POST", "/json", &user(&format!("{prefix}{i}"))).await;
                assert_eq!(answer.status, 200);
            }
        }
    };
    let default = Upstream::start(&runtime, &single_redis_env(redis.port)).await;
    default.wait_health(200).await;
    calls(&default, "dflt").await;
    let with_jitter = ttls("dflt");
    assert_eq!(with_jitter.len(), 20);
    assert!(
        with_jitter
            .iter()
            .all(|ttl| *ttl > 0 && *ttl <= 60_000 + 300_000),
        "{with_jitter:?}"
    );
    // A TTL past the window needs a draw above the window's rest: 20 draws
    // of 300 s all below 60 s is below 1e-13.
    assert!(
        with_jitter.iter().any(|ttl| *ttl > 60_000),
        "{with_jitter:?}"
    );
    drop(default);

    let off = Upstream::start(
        &runtime,
        &with(
            single_redis_env(redis.port),
            &[("EXPIRATION_JITTER_MAX_SECONDS", "0")],
        ),
    )
    .await;
    off.wait_health(200).await;
    calls(&off, "zero").await;
    let without = ttls("zero");
    assert_eq!(without.len(), 20);
    assert!(
        without.iter().all(|ttl| *ttl > 0 && *ttl <= 60_000),
        "{without:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_timeout_bounds_connecting() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(([127, 0, 0, 1], redis.port).into());
    // Every round trip takes at least 10 ms (within the 15 ms store
    // deadline), and a connect at least one round trip.
    proxy.set_delay(Duration::from_millis(5));
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    let env = |timeout: &str| {
        [
            single_redis_env(proxy.port),
            pairs(&[("REDIS_TIMEOUT", timeout)]),
        ]
        .concat()
    };
    let short = Upstream::start(&runtime, &env("2ms")).await;
    let long = Upstream::start(&runtime, &env("10s")).await;
    long.wait_health(200).await;
    // A connect bounded by 2 ms can never succeed: it is not healthy, and
    // says why.
    assert_eq!(short.health().await, 500);
    let readyz = request(short.debug, "GET", "/readyz", "").await;
    assert_eq!(readyz.status, 503, "{}", readyz.body);
}

// === logs ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_and_format() {
    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    let mut json = Upstream::start(
        &runtime,
        &with(
            single_redis_env(redis.port),
            &[("LOG_LEVEL", "info"), ("LOG_FORMAT", "json")],
        ),
    )
    .await;
    json.wait_health(200).await;
    assert_eq!(json.terminate().await, Some(0));
    let logs = json.stderr();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "ratekeeper serving" && l["level"] == "INFO"),
        "{logs}"
    );

    // Upstream's default level is WARN: no INFO lines.
    let mut quiet = Upstream::start(&runtime, &single_redis_env(redis.port)).await;
    quiet.wait_health(200).await;
    assert_eq!(quiet.terminate().await, Some(0));
    let logs = quiet.stderr();
    assert!(!logs.contains("ratekeeper serving"), "{logs}");
}

// === gRPC ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_mutual_tls() {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let pki = common::pki::pki();
    let files = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    let env = with(
        single_redis_env(redis.port),
        &[
            ("GRPC_SERVER_USE_TLS", "true"),
            (
                "GRPC_SERVER_TLS_CERT",
                &file("server.crt", &pki.server.cert),
            ),
            ("GRPC_SERVER_TLS_KEY", &file("server.key", &pki.server.key)),
            ("GRPC_CLIENT_TLS_CACERT", &file("ca.crt", &pki.ca)),
        ],
    );
    let upstream = Upstream::start(&runtime, &env).await;
    upstream.wait_health(200).await;
    let connect = |identity: Option<&common::pki::Pair>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca))
            .domain_name("localhost");
        if let Some(pair) = identity {
            tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
        }
        let endpoint = Channel::from_shared(format!("https://{}", upstream.grpc))
            .unwrap()
            .tls_config(tls)
            .unwrap();
        async move {
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            let mut client = ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(channel);
            client
                .should_rate_limit(envoy_request("shop", &[&[("user", "tls")]]))
                .await
                .map(|r| r.into_inner().overall_code())
                .map_err(|e| e.to_string())
        }
    };
    assert_eq!(connect(Some(&pki.client)).await, Ok(Code::Ok));
    assert!(connect(None).await.is_err());
    assert!(connect(Some(&pki.rogue_client)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_client_certificate_and_an_acl_user() {
    let pki = common::pki::pki();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    file("server.crt", &pki.server.cert);
    file("server.key", &pki.server.key);
    let ca = file("ca.crt", &pki.ca);
    let redis = RedisServer::start_tls(
        dir.path(),
        &[
            "--user", "alice", "on", ">s3cret", "~*", "&*", "+@all", "--user", "default", "off",
        ],
    );
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    let env = [
        pairs(&[
            ("REDIS_SOCKET_TYPE", "tcp"),
            ("REDIS_URL", &format!("localhost:{}", redis.port)),
            ("REDIS_AUTH", "alice:s3cret"),
            ("REDIS_TLS", "true"),
            ("REDIS_TLS_CACERT", &ca),
            (
                "REDIS_TLS_CLIENT_CERT",
                &file("client.crt", &pki.client.cert),
            ),
            ("REDIS_TLS_CLIENT_KEY", &file("client.key", &pki.client.key)),
        ]),
        frozen(),
    ]
    .concat();
    let upstream = Upstream::start(&runtime, &env).await;
    upstream.wait_health(200).await;
    assert_eq!(
        upstream.json(&user("t")).await.json()["statuses"][0]["limitRemaining"],
        1
    );
    assert_eq!(
        upstream.json(&user("t")).await.json()["statuses"][0].get("limitRemaining"),
        None
    );
}

/// `GRPC_MAX_CONNECTION_AGE`: an HTTP/2 connection that old gets a GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_are_aged_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = RedisServer::start();
    let runtime = RuntimeDir::new();
    runtime.write("shop.yaml", RULES);
    let env = with(
        single_redis_env(redis.port),
        &[("GRPC_MAX_CONNECTION_AGE", "500ms")],
    );
    let upstream = Upstream::start(&runtime, &env).await;
    let mut stream = tokio::net::TcpStream::connect(upstream.grpc).await.unwrap();
    // The client preface and an empty SETTINGS frame.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // Read frames (3-byte length, type, flags, 4-byte stream id, payload)
    // until a GOAWAY (type 7) comes.
    let goaway = async {
        let mut bytes = Vec::new();
        let mut types = Vec::new();
        let mut at = 0;
        loop {
            while at + 9 <= bytes.len() {
                let length = usize::from(bytes[at]) << 16
                    | usize::from(bytes[at + 1]) << 8
                    | usize::from(bytes[at + 2]);
                types.push(bytes[at + 3]);
                at += 9 + length;
            }
            if types.contains(&0x7) {
                return types;
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed without a GOAWAY; frame types {types:?}");
            bytes.extend_from_slice(&chunk[..n]);
        }
    };
    let types = tokio::time::timeout(Duration::from_secs(10), goaway)
        .await
        .expect("no GOAWAY within 10 s");
    assert_eq!(types[0], 0x4, "{types:?}");
}

// === refusals ===

#[test]
fn refused_settings_exit_64_naming_the_variable() {
    let (listeners, _) = listener_env();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("USE_STATSD", "true")],
            "USE_STATSD: true asks for a statsd sink",
        ),
        (
            &[("BACKEND_TYPE", "memcache")],
            "BACKEND_TYPE: memcache is not supported",
        ),
        (
            &[("CONFIG_TYPE", "GRPC_XDS_SOTW")],
            "CONFIG_TYPE: GRPC_XDS_SOTW",
        ),
        (&[("STATSD_HOST", "statsd")], "STATSD_HOST: has no effect"),
        (
            &[
                ("REDIS_URL", "redis://r:6379"),
                ("REDIS_SOCKET_TYPE", "tcp"),
            ],
            "REDIS_URL: 'redis://r:6379' is not host:port",
        ),
        (
            &[
                ("RATEKEEPER_KEY_LAYOUT", "ratekeeper"),
                ("CACHE_KEY_PREFIX", "rl_"),
            ],
            "CACHE_KEY_PREFIX: has no effect with RATEKEEPER_KEY_LAYOUT=ratekeeper",
        ),
        (
            &[("LIMIT_RESET_HEADER", "X-Reset")],
            "LIMIT_RESET_HEADER: has no effect",
        ),
        (
            &[("SHADOW_MODE", "yes")],
            "SHADOW_MODE: 'yes' is not a boolean",
        ),
        (
            &[("REDIS_TIMEOUT", "10")],
            "REDIS_TIMEOUT: missing unit in duration '10'",
        ),
        (
            &[("LOG_LEVEL", "loud")],
            "LOG_LEVEL: 'loud' is not a log level",
        ),
        (
            &[("RATEKEEPER_STORE", "memory")],
            "RATEKEEPER_STORE: has no effect in the envoyproxy/ratelimit mode",
        ),
        (
            &[("GRPC_CLIENT_TLS_SAN", "x")],
            "GRPC_CLIENT_TLS_SAN: has no effect without GRPC_SERVER_USE_TLS=true",
        ),
    ];
    for (env, message) in cases {
        let mut all = listeners.clone();
        all.extend(pairs(env));
        let (code, stderr) = refused_start(Invocation::Subcommand, &all, &[]);
        assert_eq!(code, Some(64), "{env:?}: {stderr}");
        assert!(
            stderr.contains("invalid envoyproxy/ratelimit settings"),
            "{stderr}"
        );
        assert!(stderr.contains(message), "{env:?}: {stderr}");
    }
    // Several at once, each on its line.
    let mut all = listeners.clone();
    all.extend(pairs(&[("QUOTA_MODE", "maybe"), ("REDIS_TYPE", "ring")]));
    let (code, stderr) = refused_start(Invocation::AsRatelimit, &all, &[]);
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("\n  QUOTA_MODE: ") && stderr.contains("\n  REDIS_TYPE: "),
        "{stderr}"
    );
    // Upstream's defaults alone ask for statsd.
    let (code, stderr) = refused_start(Invocation::AsRatelimit, &[], &[]);
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("USE_STATSD: true (the default) asks for a statsd sink"),
        "{stderr}"
    );
    // No flags in this mode.
    let (code, stderr) = refused_start(Invocation::AsRatelimit, &listeners, &["--config", "x"]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("ratelimit takes no arguments"), "{stderr}");
    let (code, stderr) = refused_start(Invocation::Subcommand, &listeners, &["--store", "redis"]);
    assert_eq!(code, Some(64), "{stderr}");
}

#[test]
fn unreadable_certificates_and_taken_ports_name_their_variable() {
    let (listeners, [http, _, _]) = listener_env();
    let mut env = listeners.clone();
    env.extend(pairs(&[
        ("GRPC_SERVER_USE_TLS", "true"),
        ("GRPC_SERVER_TLS_CERT", "/nonexistent/cert.pem"),
        ("GRPC_SERVER_TLS_KEY", "/nonexistent/key.pem"),
    ]));
    let (code, stderr) = refused_start(Invocation::Subcommand, &env, &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("GRPC_SERVER_TLS_CERT /nonexistent/cert.pem"),
        "{stderr}"
    );

    let taken = std::net::TcpListener::bind(http).unwrap();
    let (code, stderr) = refused_start(Invocation::Subcommand, &listeners, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("binding HOST/PORT {http}")),
        "{stderr}"
    );
    drop(taken);
}
