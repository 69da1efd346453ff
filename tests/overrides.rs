//! Runtime overrides and the admin API, end to end: in-process servers over
//! real gRPC and HTTP, sharing a real `redis-server` where the test needs
//! several instances.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{RedisServer, T0, TestServer, allow_request, redis_store, rules};
use ratekeeper::Server;
use ratekeeper::admin_api::AdminAuth;
use ratekeeper::clock::{Clock, ManualClock, SystemClock};
use ratekeeper::overrides::{Overrides, RedisOverrides};
use ratekeeper::proto::ratekeeper::v1::DescriptorResult;
use ratekeeper::store::{CounterStore, MemoryStore, OverLimitCache};
use serde_json::{Value, json};

const RULES: &str = r"
domain: api
descriptors:
  - key: tenant
    rate_limit:
      unit: hour
      requests_per_unit: 1000
";

/// The poll interval the shared-store tests run with.
const POLL: Duration = Duration::from_millis(200);

/// How long the tests wait for something the docs bound by one poll
/// interval: far more, on a loaded machine; a pass says it happened, the
/// printed figure how fast.
const PATIENCE: Duration = Duration::from_secs(10);

// ------------------------------------------------------------- helpers ---

/// One HTTP/1.1 request to the admin port; the status and the JSON body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn tenant(value: &str) -> Value {
    json!([{ "key": "tenant", "value": value }])
}

fn put_body(value: &str, limit: u64, unit: &str) -> Value {
    json!({
        "domain": "api",
        "descriptor": tenant(value),
        "rate_limit": { "requests_per_unit": limit, "unit": unit },
    })
}

async fn put(addr: SocketAddr, body: &Value) -> Value {
    let (status, answer) = http(addr, "PUT", "/admin/v1/overrides", Some(body), None).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

async fn inspect(addr: SocketAddr, value: &str) -> Value {
    let body = json!({ "domain": "api", "descriptor": tenant(value) });
    let (status, answer) = http(addr, "POST", "/admin/v1/inspect", Some(&body), None).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// One `ShouldAllow` for tenant `value`: its descriptor result.
async fn decide(server: &TestServer, value: &str) -> DescriptorResult {
    let mut client = server.client().await;
    let answer = client
        .should_allow(allow_request("api", &[&[("tenant", value)]], 1))
        .await
        .unwrap()
        .into_inner();
    answer.results.into_iter().next().unwrap()
}

/// A server over Redis at `url`, overrides in Redis polled every [`POLL`],
/// with an over-limit cache.
async fn shared_instance(url: &str) -> TestServer {
    let store: Arc<dyn CounterStore> = Arc::new(redis_store(url, Duration::from_secs(2)));
    shared_instance_on(store).await
}

/// A server over a Redis `store`, its overrides in the same Redis polled
/// every [`POLL`], with an over-limit cache.
async fn shared_instance_on(store: Arc<dyn CounterStore>) -> TestServer {
    let overrides = Overrides::new(
        Arc::new(RedisOverrides::new(store.commands().unwrap())),
        Arc::new(SystemClock),
    );
    let server = Server::new(rules(&[RULES]), store)
        .with_overrides(overrides, POLL)
        .with_over_limit_cache(OverLimitCache::new(1_000, Arc::new(SystemClock)));
    TestServer::start(server).await
}

/// A server over a memory store on `clock`, its own overrides.
async fn memory_instance(clock: Arc<dyn Clock>, auth: AdminAuth) -> TestServer {
    let store = Arc::new(MemoryStore::new(10_000, clock.clone()));
    let overrides = Overrides::new(
        Arc::new(ratekeeper::overrides::MemoryOverrides::default()),
        clock.clone(),
    );
    let server = Server::new(rules(&[RULES]), store)
        .with_clock(clock)
        .with_overrides(overrides, Duration::from_millis(50))
        .with_admin_auth(auth);
    TestServer::start(server).await
}

fn ms(d: &prost_types::Duration) -> u64 {
    d.seconds as u64 * 1_000 + d.nanos as u64 / 1_000_000
}

/// A gRPC request carrying the tests' admin token.
fn with_token<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    request
}

/// Polls `check` until it holds; how long that took.
async fn within_patience<F: Future<Output = bool>>(mut check: impl FnMut() -> F) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < PATIENCE, "not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// Waits out the end of the current hour if it is less than `margin` away,
/// so a test counting in hour windows never straddles two.
async fn fresh_hour(margin: Duration) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let left = Duration::from_secs(3_600 - now.as_secs() % 3_600);
    if left < margin {
        tokio::time::sleep(left + Duration::from_secs(1)).await;
    }
}

// --------------------------------------------------------------- tests ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_sharing_redis_apply_an_override_within_the_poll_bound_and_count_it_exactly()
 {
    fresh_hour(Duration::from_secs(120)).await;
    let redis = RedisServer::start();
    let instances = [
        shared_instance(&redis.url()).await,
        shared_instance(&redis.url()).await,
        shared_instance(&redis.url()).await,
    ];
    // Before: the rules file's 1,000 per hour.
    assert_eq!(decide(&instances[1], "acme").await.limit, 1_000);

    put(instances[0].admin_addr, &put_body("acme", 50, "hour")).await;
    // The writer applies it at once; the others within one poll.
    assert_eq!(
        inspect(instances[0].admin_addr, "acme").await["overridden"],
        true
    );
    for (i, instance) in instances.iter().enumerate().skip(1) {
        let took = within_patience(|| async {
            inspect(instance.admin_addr, "acme").await["overridden"] == true
        })
        .await;
        println!("instance {i} applied the override after {took:?} (poll {POLL:?})");
    }

    // Exactly the new limit, counted together (the counter shares its key
    // with the rule's: same algorithm and window), by 64 concurrent callers.
    let used_before = 1;
    let mut clients = Vec::new();
    for instance in &instances {
        clients.push(instance.client().await);
    }
    let mut callers = Vec::new();
    for caller in 0..64 {
        let mut client = clients[caller % 3].clone();
        callers.push(tokio::spawn(async move {
            let mut allowed = 0;
            for _ in 0..3 {
                let answer = client
                    .should_allow(allow_request("api", &[&[("tenant", "acme")]], 1))
                    .await
                    .unwrap()
                    .into_inner();
                allowed += u64::from(answer.allowed);
                assert_eq!(answer.results[0].limit, 50);
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for caller in callers {
        allowed += caller.await.unwrap();
    }
    assert_eq!(allowed, 50 - used_before);

    // Other tenants keep the rules file's limit.
    assert_eq!(decide(&instances[2], "globex").await.limit, 1_000);

    // A restarted instance starts with the override in force.
    let fresh = shared_instance(&redis.url()).await;
    let first = decide(&fresh, "acme").await;
    assert_eq!((first.limit, first.remaining), (50, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_takes_effect_on_every_instance_including_their_over_limit_caches() {
    fresh_hour(Duration::from_secs(120)).await;
    let redis = RedisServer::start();
    let (a, b) = (
        shared_instance(&redis.url()).await,
        shared_instance(&redis.url()).await,
    );
    put(a.admin_addr, &put_body("acme", 3, "hour")).await;
    within_patience(|| async { inspect(b.admin_addr, "acme").await["overridden"] == true }).await;
    for _ in 0..3 {
        assert_eq!(decide(&a, "acme").await.decision, 1);
    }
    // Denied by the store on both, then from each one's cache.
    for instance in [&a, &b] {
        assert_eq!(decide(instance, "acme").await.decision, 2);
        assert_eq!(decide(instance, "acme").await.decision, 2);
        let metrics = common::http_get(instance.admin_addr, "/metrics").await;
        assert!(
            metrics.contains("ratelimit_over_limit_cache_hits_total{domain=\"api\"}"),
            "the cache answered: {metrics}"
        );
    }

    let body = json!({ "domain": "api", "descriptor": tenant("acme") });
    let (status, report) = http(a.admin_addr, "POST", "/admin/v1/reset", Some(&body), None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report, json!({ "keys": 1, "deleted": 1 }));

    // The resetting instance at once; the other within one poll.
    let after = decide(&a, "acme").await;
    assert_eq!((after.decision, after.remaining), (1, 2));
    let took = within_patience(|| async { decide(&b, "acme").await.decision == 1 }).await;
    println!("the other instance admitted again {took:?} after the reset (poll {POLL:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_answers_what_the_next_decision_does_without_consuming() {
    let clock = Arc::new(ManualClock::new(T0));
    let server = memory_instance(clock.clone(), AdminAuth::LoopbackOnly).await;
    put(server.admin_addr, &put_body("acme", 5, "minute")).await;
    for _ in 0..3 {
        assert_eq!(decide(&server, "acme").await.decision, 1);
    }
    clock.advance(7_000);

    let seen = inspect(server.admin_addr, "acme").await;
    assert_eq!(seen["decision"], "allowed");
    assert_eq!(seen["overridden"], true);
    assert_eq!(seen["rule"]["requests_per_unit"], 5);
    assert_eq!(seen["configured_rule"]["requests_per_unit"], 1_000);
    assert_eq!(seen["used"], 3);
    // Twice: inspecting consumed nothing.
    assert_eq!(inspect(server.admin_addr, "acme").await, seen);
    let next = decide(&server, "acme").await;
    assert_eq!(next.decision, 1);
    assert_eq!(next.limit, 5);
    // Inspect says what is left now; the decision what is left after it.
    assert_eq!(seen["remaining"].as_u64().unwrap(), next.remaining + 1);
    assert_eq!(
        seen["reset_after_ms"].as_u64().unwrap(),
        ms(next.reset_after.as_ref().unwrap())
    );

    // Over the limit: the same denial and the same retry time.
    decide(&server, "acme").await;
    let seen = inspect(server.admin_addr, "acme").await;
    let next = decide(&server, "acme").await;
    assert_eq!(seen["decision"], "denied");
    assert_eq!(next.decision, 2);
    assert_eq!(seen["remaining"], next.remaining);
    assert_eq!(
        seen["retry_after_ms"].as_u64().unwrap(),
        ms(next.retry_after.as_ref().unwrap())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_override_expires_and_the_rule_applies_again() {
    let clock = Arc::new(ManualClock::new(T0));
    let server = memory_instance(clock.clone(), AdminAuth::LoopbackOnly).await;
    let mut body = put_body("acme", 2, "minute");
    body["expires_in_seconds"] = json!(30);
    let stored = put(server.admin_addr, &body).await;
    assert_eq!(stored["expires_at_ms"], T0 + 30_000);
    assert_eq!(decide(&server, "acme").await.limit, 2);

    clock.advance(29_999);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(decide(&server, "acme").await.limit, 2, "not yet expired");
    clock.advance(1);
    within_patience(|| async { decide(&server, "acme").await.limit == 1_000 }).await;
    let (_, list) = http(server.admin_addr, "GET", "/admin/v1/overrides", None, None).await;
    assert_eq!(list, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_get_list_delete_and_the_rules_view() {
    let server = memory_instance(Arc::new(SystemClock), AdminAuth::LoopbackOnly).await;
    let stored = put(server.admin_addr, &put_body("acme", 7, "second")).await;
    let key_only = json!({
        "domain": "api",
        "descriptor": [{ "key": "tenant" }],
        "rate_limit": {
            "requests_per_unit": 9,
            "unit": "minute",
            "algorithm": "sliding_window",
            "failure_policy": "allow",
        },
    });
    put(server.admin_addr, &key_only).await;
    // Exact value first, then key-only, as in a rules file.
    assert_eq!(decide(&server, "acme").await.limit, 7);
    assert_eq!(decide(&server, "other").await.limit, 9);
    let seen = inspect(server.admin_addr, "other").await;
    assert_eq!(seen["rule"]["algorithm"], "sliding_window");
    assert_eq!(seen["rule"]["failure_policy"], "allow");

    let target = json!({ "domain": "api", "descriptor": tenant("acme") });
    let (status, got) = http(
        server.admin_addr,
        "POST",
        "/admin/v1/overrides/get",
        Some(&target),
        None,
    )
    .await;
    assert_eq!((status, &got), (200, &stored));
    let (_, list) = http(server.admin_addr, "GET", "/admin/v1/overrides", None, None).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    let rules_view = common::http_get(server.admin_addr, "/rules").await;
    assert!(
        rules_view.contains("\"source\":\"override\""),
        "{rules_view}"
    );

    let (status, deleted) = http(
        server.admin_addr,
        "POST",
        "/admin/v1/overrides/delete",
        Some(&target),
        None,
    )
    .await;
    assert_eq!((status, &deleted), (200, &stored));
    let (status, _) = http(
        server.admin_addr,
        "POST",
        "/admin/v1/overrides/get",
        Some(&target),
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(decide(&server, "acme").await.limit, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_callers_without_the_token() {
    let auth = AdminAuth::from_token_file(b"s3cret\n").unwrap();
    let server = memory_instance(Arc::new(SystemClock), auth).await;
    let body = put_body("acme", 1, "second");
    for token in [None, Some("wrong")] {
        let (status, answer) = http(
            server.admin_addr,
            "PUT",
            "/admin/v1/overrides",
            Some(&body),
            token,
        )
        .await;
        assert_eq!(status, 401, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("token"),
            "{answer}"
        );
        let (status, _) = http(server.admin_addr, "GET", "/admin/v1/overrides", None, token).await;
        assert_eq!(status, 401);
    }
    assert_eq!(
        decide(&server, "acme").await.limit,
        1_000,
        "nothing changed"
    );
    let (status, _) = http(
        server.admin_addr,
        "PUT",
        "/admin/v1/overrides",
        Some(&body),
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(decide(&server, "acme").await.limit, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_with_the_field_and_changes_nothing() {
    let server = memory_instance(Arc::new(SystemClock), AdminAuth::LoopbackOnly).await;
    let mut unknown_domain = put_body("acme", 5, "second");
    unknown_domain["domain"] = json!("nope");
    let mut bad_unit = put_body("acme", 5, "fortnight");
    bad_unit["rate_limit"]["unit"] = json!("fortnight");
    let huge = put_body("acme", 1 << 40, "second");
    let mut negative = put_body("acme", 5, "second");
    negative["rate_limit"]["requests_per_unit"] = json!(-1);
    let long_value = put_body(&"x".repeat(2_000), 5, "second");
    let mut too_many = put_body("acme", 5, "second");
    too_many["descriptor"] = Value::Array(
        (0..40)
            .map(|i| json!({ "key": format!("k{i}"), "value": "v" }))
            .collect(),
    );
    let mut wildcard = put_body("ac*", 5, "second");
    wildcard["descriptor"] = tenant("ac*");
    let mut burst = put_body("acme", 5, "second");
    burst["rate_limit"]["burst"] = json!(10);
    let mut past = put_body("acme", 5, "second");
    past["expires_at_ms"] = json!(1);
    let cases = [
        (unknown_domain, "domain: unknown domain 'nope'"),
        (
            bad_unit,
            "rate_limit.unit: invalid rate limit unit 'fortnight'",
        ),
        (huge, "rate_limit.requests_per_unit"),
        (negative, "body: invalid value: integer `-1`"),
        (long_value, "descriptor[0].value"),
        (too_many, "descriptor: 40 entries"),
        (wildcard, "descriptor[0].value: '*' is not allowed"),
        (
            burst,
            "rate_limit.burst: burst is only valid with algorithm token_bucket",
        ),
        (past, "expires_at_ms: is in the past"),
    ];
    for (body, expected) in cases {
        let (status, answer) = http(
            server.admin_addr,
            "PUT",
            "/admin/v1/overrides",
            Some(&body),
            None,
        )
        .await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.starts_with(expected), "{expected:?} vs {message:?}");
    }
    let unknown = json!({ "domain": "nope", "descriptor": tenant("acme") });
    for path in [
        "/admin/v1/reset",
        "/admin/v1/inspect",
        "/admin/v1/overrides/get",
    ] {
        let (status, answer) = http(server.admin_addr, "POST", path, Some(&unknown), None).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .starts_with("domain: unknown domain")
        );
    }
    // An override of a domain gone from the rules could still be deleted.
    let (status, _) = http(
        server.admin_addr,
        "POST",
        "/admin/v1/overrides/delete",
        Some(&unknown),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let oversized = json!({ "domain": "api", "descriptor": tenant(&"x".repeat(2_000)) });
    for path in [
        "/admin/v1/reset",
        "/admin/v1/inspect",
        "/admin/v1/overrides/delete",
    ] {
        let (status, answer) = http(server.admin_addr, "POST", path, Some(&oversized), None).await;
        assert_eq!(status, 400, "{path}: {answer}");
    }
    let (_, list) = http(server.admin_addr, "GET", "/admin/v1/overrides", None, None).await;
    assert_eq!(list, json!([]));
    assert_eq!(decide(&server, "acme").await.limit, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_admin_service_serves_the_same_operations_behind_the_token() {
    use ratekeeper::proto::ratekeeper::v1::admin_service_client::AdminServiceClient;
    use ratekeeper::proto::ratekeeper::v1::{
        AdminEntry, AdminLimit, DeleteOverrideRequest, GetOverrideRequest, InspectCounterRequest,
        ListOverridesRequest, PutOverrideRequest, ResetCounterRequest,
    };
    use tonic::Code;

    let auth = AdminAuth::from_token_file(b"s3cret").unwrap();
    let server = memory_instance(Arc::new(SystemClock), auth).await;
    let mut admin = AdminServiceClient::new(server.channel().await);
    let descriptor = vec![AdminEntry {
        key: "tenant".to_owned(),
        value: "acme".to_owned(),
    }];
    let put = PutOverrideRequest {
        domain: "api".to_owned(),
        descriptor: descriptor.clone(),
        rate_limit: Some(AdminLimit {
            requests_per_unit: 2,
            unit: "minute".to_owned(),
            algorithm: "token_bucket".to_owned(),
            burst: 4,
            ..AdminLimit::default()
        }),
        ..PutOverrideRequest::default()
    };

    let refused = admin.put_override(put.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    let mut wrong = tonic::Request::new(put.clone());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        admin.put_override(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        decide(&server, "acme").await.limit,
        1_000,
        "nothing changed"
    );

    let stored = admin
        .put_override(with_token(put))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.stored.unwrap().rate_limit.unwrap().burst, 4);
    assert_eq!(decide(&server, "acme").await.limit, 2);
    let list = admin
        .list_overrides(with_token(ListOverridesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.overrides.len(), 1);

    let seen = admin
        .inspect_counter(with_token(InspectCounterRequest {
            domain: "api".to_owned(),
            descriptor: descriptor.clone(),
            hits: 1,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(seen.overridden);
    assert_eq!(seen.rule.unwrap().algorithm, "token_bucket");
    assert_eq!(seen.remaining, 3, "one of the burst of 4 used");

    let report = admin
        .reset_counter(with_token(ResetCounterRequest {
            domain: "api".to_owned(),
            descriptor: descriptor.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (report.keys, report.deleted),
        (2, 2),
        "the override's and the rule's keys"
    );
    admin
        .delete_override(with_token(DeleteOverrideRequest {
            domain: "api".to_owned(),
            descriptor: descriptor.clone(),
        }))
        .await
        .unwrap();
    let gone = admin
        .get_override(with_token(GetOverrideRequest {
            domain: "api".to_owned(),
            descriptor,
        }))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    let bad = PutOverrideRequest {
        domain: "nope".to_owned(),
        ..PutOverrideRequest::default()
    };
    let refused = admin.put_override(with_token(bad)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().starts_with("descriptor"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_drives_a_real_binary_on_redis() {
    use common::process::{BIN, Serve};
    use std::process::Command;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rules.yaml");
    std::fs::write(&config, RULES).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let redis = RedisServer::start();
    let mut serve = Serve::start(
        config.to_str().unwrap(),
        &[
            "--store",
            "redis",
            "--redis-url",
            &redis.url(),
            "--admin-token-file",
            token.to_str().unwrap(),
        ],
    );
    let mut client = serve.client().await;
    let addr = format!("127.0.0.1:{}", serve.admin_port);
    let admin = |args: &[&str], with_token: bool| {
        let mut command = Command::new(BIN);
        command.args(["admin", "--addr", &addr]);
        if with_token {
            command.args(["--token-file", token.to_str().unwrap()]);
        }
        let out = command.args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let put = [
        "put",
        "--domain",
        "api",
        "--entry",
        "tenant=acme",
        "--requests-per-unit",
        "5",
        "--unit",
        "minute",
        "--expires-in",
        "1h",
    ];
    let (code, _, stderr) = admin(&put, false);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("401: admin API: missing bearer token"),
        "{stderr}"
    );

    let (code, stdout, stderr) = admin(&put, true);
    assert_eq!(code, Some(0), "{stderr}");
    let stored: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(stored["rate_limit"]["requests_per_unit"], 5);
    assert!(stored["expires_at_ms"].as_u64().is_some());

    let answer = client
        .should_allow(allow_request("api", &[&[("tenant", "acme")]], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.results[0].limit, 5);

    let (code, stdout, _) = admin(&["list"], true);
    assert_eq!(code, Some(0));
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()[0], stored);
    let (_, stdout, _) = admin(
        &["inspect", "--domain", "api", "--entry", "tenant=acme"],
        true,
    );
    let seen: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (seen["used"].as_u64(), seen["remaining"].as_u64()),
        (Some(1), Some(4))
    );
    let (_, stdout, _) = admin(
        &["reset", "--domain", "api", "--entry", "tenant=acme"],
        true,
    );
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap()["deleted"],
        1
    );
    let (code, _, stderr) = admin(&["get", "--domain", "nope", "--entry", "tenant"], true);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("400: domain: unknown domain 'nope'"),
        "{stderr}"
    );

    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0));
    let log = serve.stderr();
    assert!(log.contains("bearer token required"), "{log}");
    assert!(
        log.contains("used 1 of the rule in force, 4 remaining"),
        "the reset's audit line says what the counter held: {log}"
    );
    assert!(
        log.contains("operation=\"put_override\"") || log.contains("put_override"),
        "{log}"
    );
}

#[test]
fn an_empty_admin_token_file_is_refused_at_startup() {
    use common::process::BIN;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rules.yaml");
    std::fs::write(&config, RULES).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--admin-token-file", token.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("admin token file is empty"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_keeps_overrides_and_resets_counters_for_every_instance() {
    use common::cluster::RedisCluster;
    use ratekeeper::store::RedisClusterStore;
    use ratekeeper::store::redis_cluster::RedisClusterSettings;

    fresh_hour(Duration::from_secs(120)).await;
    let cluster = RedisCluster::start();
    let store = || -> Arc<dyn CounterStore> {
        Arc::new(
            RedisClusterStore::new(&RedisClusterSettings {
                nodes: cluster.urls(),
                pool_size: 2,
                timeout: Duration::from_secs(2),
                connect_timeout: Duration::from_millis(500),
                tls: None,
                expiry_jitter: Duration::ZERO,
            })
            .unwrap(),
        )
    };
    let a = shared_instance_on(store()).await;
    let b = shared_instance_on(store()).await;
    put(a.admin_addr, &put_body("acme", 4, "hour")).await;
    let took =
        within_patience(|| async { inspect(b.admin_addr, "acme").await["overridden"] == true })
            .await;
    println!("cluster: the other instance applied the override after {took:?}");
    for _ in 0..4 {
        assert_eq!(decide(&a, "acme").await.decision, 1);
    }
    assert_eq!(decide(&b, "acme").await.decision, 2);

    let body = json!({ "domain": "api", "descriptor": tenant("acme") });
    let (status, report) = http(b.admin_addr, "POST", "/admin/v1/reset", Some(&body), None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["deleted"], 1);
    let after = decide(&a, "acme").await;
    assert_eq!((after.decision, after.limit, after.remaining), (1, 4, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_lists_the_overrides_when_it_can_reach_the_store() {
    use common::process::BIN;
    let redis = RedisServer::start();
    let instance = shared_instance(&redis.url()).await;
    put(instance.admin_addr, &put_body("acme", 5, "minute")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rules.yaml");
    std::fs::write(&config, RULES).unwrap();
    let check = |extra: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["check-config", config.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let stdout = check(&["--redis-url", &redis.url()]);
    assert!(
        stdout
            .contains(r#"override {"domain":"api","descriptor":[{"key":"tenant","value":"acme"}]"#),
        "{stdout}"
    );
    assert!(stdout.contains("1 runtime overrides in redis"), "{stdout}");
    let stdout = check(&[]);
    assert!(
        stdout.contains("runtime overrides are not shown: they live in the store"),
        "{stdout}"
    );
    let unreachable = format!("redis://127.0.0.1:{}", common::free_port());
    let stdout = check(&["--redis-url", &unreachable]);
    assert!(
        stdout.contains("runtime overrides are not shown: cannot read them"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_request_limit_beats_a_stored_override_which_beats_the_rules() {
    use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
    use ratekeeper::proto::envoy::r#type::v3::RateLimitUnit;

    let server = memory_instance(Arc::new(SystemClock), AdminAuth::LoopbackOnly).await;
    put(server.admin_addr, &put_body("acme", 7, "minute")).await;
    let envoy = server.envoy().await;
    let limit_of = |request| {
        let mut envoy = envoy.clone();
        async move {
            let answer = envoy.should_rate_limit(request).await.unwrap().into_inner();
            answer.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit
        }
    };
    // The stored override, over the rules file's 1,000 per hour.
    let plain = common::envoy_request("api", &[&[("tenant", "acme")]]);
    assert_eq!(limit_of(plain.clone()).await, 7);
    // The request's own limit, over the stored override.
    let mut carried = plain;
    carried.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 3,
        unit: RateLimitUnit::Second as i32,
    });
    assert_eq!(limit_of(carried).await, 3);
    // Other descriptors: the rules file.
    let other = common::envoy_request("api", &[&[("tenant", "globex")]]);
    assert_eq!(limit_of(other).await, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_deletes_every_limit_of_a_rule_with_several() {
    const SEVERAL: &str = r"
domain: api
descriptors:
  - key: tenant
    rate_limits:
      - {unit: second, requests_per_unit: 10}
      - {unit: minute, requests_per_unit: 2}
";
    let clock = Arc::new(ManualClock::new(T0));
    let store = Arc::new(MemoryStore::new(10_000, clock.clone()));
    let server = TestServer::start(Server::new(rules(&[SEVERAL]), store).with_clock(clock)).await;
    assert_eq!(decide(&server, "acme").await.decision, 1);
    assert_eq!(decide(&server, "acme").await.decision, 1);
    assert_eq!(decide(&server, "acme").await.decision, 2);
    let body = json!({ "domain": "api", "descriptor": tenant("acme") });
    let (status, report) = http(
        server.admin_addr,
        "POST",
        "/admin/v1/reset",
        Some(&body),
        None,
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report, json!({ "keys": 2, "deleted": 2 }));
    assert_eq!(decide(&server, "acme").await.decision, 1);
}

/// Without a token, loopback callers are served on both surfaces: the peer
/// address reaches the check (a caller without one would be refused, as
/// the unit tests of `admin_api::auth` show for non-loopback peers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_loopback_callers_are_served_on_both_surfaces() {
    use ratekeeper::proto::ratekeeper::v1::ListOverridesRequest;
    use ratekeeper::proto::ratekeeper::v1::admin_service_client::AdminServiceClient;

    let server = memory_instance(Arc::new(SystemClock), AdminAuth::LoopbackOnly).await;
    let (status, _) = http(server.admin_addr, "GET", "/admin/v1/overrides", None, None).await;
    assert_eq!(status, 200);
    let mut admin = AdminServiceClient::new(server.channel().await);
    let list = admin.list_overrides(ListOverridesRequest {}).await.unwrap();
    assert!(list.into_inner().overrides.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_override_store_refuses_a_new_one_and_makes_room_as_they_expire() {
    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock::new(T0));
    let store: Arc<dyn CounterStore> = Arc::new(redis_store(&redis.url(), Duration::from_secs(2)));
    let overrides = Overrides::new(
        Arc::new(RedisOverrides::new(store.commands().unwrap())),
        clock.clone(),
    )
    .with_max(2);
    let server =
        TestServer::start(Server::new(rules(&[RULES]), store).with_overrides(overrides, POLL))
            .await;
    let addr = server.admin_addr;
    let stored = || async {
        let (status, answer) = http(addr, "GET", "/admin/v1/overrides", None, None).await;
        assert_eq!(status, 200, "{answer}");
        let mut tenants: Vec<String> = answer
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["descriptor"][0]["value"].as_str().unwrap().to_owned())
            .collect();
        tenants.sort();
        tenants
    };

    let mut for_a_minute = put_body("a", 5, "hour");
    for_a_minute["expires_in_seconds"] = json!(60);
    put(addr, &for_a_minute).await;
    put(addr, &put_body("b", 5, "hour")).await;

    // A third is refused, naming the bound, and nothing changes.
    let (status, answer) = http(
        addr,
        "PUT",
        "/admin/v1/overrides",
        Some(&put_body("c", 5, "hour")),
        None,
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains("2 overrides") && message.contains("--max-overrides"),
        "{message}"
    );
    assert_eq!(stored().await, ["a", "b"]);
    // A stored one may still change.
    assert_eq!(
        put(addr, &put_body("b", 7, "hour")).await["rate_limit"]["requests_per_unit"],
        7
    );

    // Once `a` has expired, it makes room (and is gone from Redis).
    clock.advance(60_000);
    put(addr, &put_body("c", 5, "hour")).await;
    assert_eq!(stored().await, ["b", "c"]);
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let held: u64 = redis::cmd("HLEN")
        .arg(ratekeeper::overrides::redis::DATA_KEY)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(held, 2);
}
