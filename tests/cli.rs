//! The real binary: `check-config`, `serve` with the shipped example config
//! and no Redis, environment variables, exit codes, and SIGTERM.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::process::Serve;
use common::{allow_request, free_port};
use ratekeeper::proto::ratekeeper::v1::Decision;

use common::process::BIN;
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config.yaml");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_config_accepts_the_example_and_summarises_it() {
    let out = run(&["check-config", EXAMPLE]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("domain example"), "{stdout}");
    assert!(
        stdout.contains("example.api_key: 100 per minute (fixed_window)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("example.tenant: 1000 per hour (fixed_window) (shadow)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("example.path_/login.user: 5 per 15 × minute (sliding_window)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("example.upload: 60 per hour (token_bucket, burst 20)"),
        "{stdout}"
    );
    assert!(stdout.contains("ok: 1 domains, 7 rules"), "{stdout}");
}

#[test]
fn check_config_shows_a_rules_own_failure_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(
        &path,
        "domain: d\ndescriptors:\n  - {key: login, rate_limit: {unit: minute, requests_per_unit: 5, failure_policy: deny}}\n  - {key: read, rate_limit: {unit: second, requests_per_unit: 50}}\n",
    )
    .unwrap();
    let out = run(&["check-config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("d.login: 5 per minute (fixed_window) (on store failure: deny)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("d.read: 50 per second (fixed_window)\n"),
        "{stdout}"
    );
}

#[test]
fn check_config_refuses_a_bad_file_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: lightyear}\n",
    )
    .unwrap();
    let out = run(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "bad.yaml: descriptors[0].rate_limit.unit: invalid rate limit unit 'lightyear'"
        ),
        "{stderr}"
    );
}

/// Runs `serve` with `args` and asserts exit 64 with `expected` on stderr.
fn assert_refused(args: &[&str], expected: &str) {
    let out = run(&[&["serve"], args].concat());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
}

#[test]
fn serve_refuses_bad_config_and_flags_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "domain: ''\n").unwrap();
    let bad = path.to_str().unwrap();
    assert_refused(&["--config", bad], "config file cannot have empty domain");
    let redis = ["--config", EXAMPLE, "--store", "redis"];
    assert_refused(
        &[&redis[..], &["--redis-url", "http://nope"]].concat(),
        "--redis-url",
    );
    // Redis TLS certificates need a rediss:// URL, a client key its
    // certificate, and the files must be readable.
    assert_refused(
        &[&redis[..], &["--redis-ca-cert", EXAMPLE]].concat(),
        "not rediss://",
    );
    assert_refused(
        &["--config", EXAMPLE, "--redis-client-key", EXAMPLE],
        "--redis-client-cert",
    );
    assert_refused(
        &[
            &redis[..],
            &[
                "--redis-url",
                "rediss://127.0.0.1:6380",
                "--redis-ca-cert",
                "/nonexistent/ca.pem",
            ],
        ]
        .concat(),
        "--redis-ca-cert /nonexistent/ca.pem",
    );
    assert_refused(
        &["--config", EXAMPLE, "--store-timeout", "fast"],
        "--store-timeout",
    );
    assert_refused(
        &["--config", EXAMPLE, "--otlp-endpoint", "collector:4317"],
        "--otlp-endpoint \"collector:4317\"",
    );
    assert_refused(
        &[
            "--config",
            EXAMPLE,
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--otlp-sample-ratio",
            "1.5",
        ],
        "--otlp-sample-ratio 1.5",
    );
    assert_refused(&[], "--config");
}

/// Runs `serve` with `env` set and checks it exits 64 saying `expected`.
fn assert_refused_with_env(args: &[&str], env: &[(&str, &str)], expected: &str) {
    let out = Command::new(BIN)
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?} {env:?}: {stderr}");
}

/// A flag that would do nothing with the others given is refused at
/// startup, naming both; a value from the environment is blamed on the
/// variable the user set.
#[test]
fn serve_refuses_flags_without_effect_naming_both() {
    let config = ["--config", EXAMPLE];
    assert_refused(
        &[&config[..], &["--redis-url", "redis://127.0.0.1:6379"]].concat(),
        "--redis-url has no effect with --store memory (the default); it applies to --store redis",
    );
    assert_refused(
        &[
            &config[..],
            &[
                "--store",
                "redis",
                "--redis-cluster-nodes",
                "127.0.0.1:7000",
            ],
        ]
        .concat(),
        "--redis-cluster-nodes has no effect with --store redis; it applies to --store redis-cluster",
    );
    assert_refused(
        &[&config[..], &["--otlp-sample-ratio", "0.1"]].concat(),
        "--otlp-sample-ratio has no effect without --otlp-endpoint",
    );
    assert_refused_with_env(
        &config,
        &[("RATEKEEPER_REDIS_URL", "redis://127.0.0.1:6379")],
        "RATEKEEPER_REDIS_URL (--redis-url) has no effect with --store memory (the default)",
    );
    assert_refused_with_env(
        &config,
        &[
            ("RATEKEEPER_STORE", "redis"),
            ("RATEKEEPER_MEMORY_MAX_KEYS", "10"),
        ],
        "RATEKEEPER_MEMORY_MAX_KEYS (--memory-max-keys) has no effect with RATEKEEPER_STORE (--store) redis",
    );
    // Bad values from the environment name the variable.
    assert_refused_with_env(
        &config,
        &[("RATEKEEPER_STORE", "etcd")],
        "the environment variable RATEKEEPER_STORE",
    );
    assert_refused_with_env(
        &config,
        &[("RATEKEEPER_SHADOW_MODE", "maybe")],
        "the environment variable RATEKEEPER_SHADOW_MODE",
    );
    // upstream's REDIS_URL form, host:port, gets a hint.
    assert_refused(
        &[
            &config[..],
            &["--store", "redis", "--redis-url", "localhost:6379"],
        ]
        .concat(),
        "it needs a scheme, e.g. redis://localhost:6379",
    );
}

/// The migration key layout applies to the Redis stores only; its prefix
/// to that layout only; and its jitter is whole seconds, as upstream's.
#[test]
fn serve_refuses_the_key_layout_in_the_wrong_combinations() {
    let config = ["--config", EXAMPLE];
    let redis = ["--config", EXAMPLE, "--store", "redis"];
    assert_refused(
        &[&config[..], &["--key-layout", "envoy-ratelimit"]].concat(),
        "--key-layout has no effect with --store memory (the default); it applies to --store redis, redis-cluster or redis-sentinel",
    );
    assert_refused(
        &[&redis[..], &["--cache-key-prefix", "rl:"]].concat(),
        "--cache-key-prefix has no effect without --key-layout envoy-ratelimit",
    );
    assert_refused(
        &[&redis[..], &["--key-layout", "upstream"]].concat(),
        "invalid value 'upstream' for '--key-layout <KEY_LAYOUT>'",
    );
    assert_refused(
        &[
            &redis[..],
            &[
                "--key-layout",
                "envoy-ratelimit",
                "--expiration-jitter-max",
                "2500ms",
            ],
        ]
        .concat(),
        "--expiration-jitter-max 2s 500ms: its fraction of a second has no effect with --key-layout envoy-ratelimit",
    );
    assert_refused_with_env(
        &config,
        &[("RATEKEEPER_KEY_LAYOUT", "envoy-ratelimit")],
        "RATEKEEPER_KEY_LAYOUT (--key-layout) has no effect with --store memory (the default)",
    );
    assert_refused_with_env(
        &redis,
        &[("RATEKEEPER_CACHE_KEY_PREFIX", "rl:")],
        "RATEKEEPER_CACHE_KEY_PREFIX (--cache-key-prefix) has no effect without --key-layout envoy-ratelimit",
    );
    assert_refused_with_env(
        &redis,
        &[("RATEKEEPER_KEY_LAYOUT", "upstream")],
        "the environment variable RATEKEEPER_KEY_LAYOUT",
    );
    assert_refused_with_env(
        &redis,
        &[
            ("RATEKEEPER_KEY_LAYOUT", "envoy-ratelimit"),
            ("RATEKEEPER_EXPIRATION_JITTER_MAX", "300ms"),
        ],
        "RATEKEEPER_EXPIRATION_JITTER_MAX (--expiration-jitter-max) 300ms: its fraction of a second has no effect with RATEKEEPER_KEY_LAYOUT (--key-layout) envoy-ratelimit",
    );
}

/// `--metrics-addr` opens a port with `/metrics` and `/healthz` only: what a
/// scraper needs, nothing of the rules or the store.
#[tokio::test]
async fn the_metrics_port_serves_metrics_and_liveness_only() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut serve = Serve::start(EXAMPLE, &["--metrics-addr", &addr]);
    let mut client = serve.client().await;
    client
        .should_allow(allow_request("example", &[&[("api_key", "k1")]], 1))
        .await
        .unwrap();
    let socket: std::net::SocketAddr = addr.parse().unwrap();
    let metrics = common::http_get(socket, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("ratelimit_requests_total{"), "{metrics}");
    assert!(
        common::http_get(socket, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    for private in ["/rules", "/readyz"] {
        let answer = common::http_get(socket, private).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{private}: {answer}");
    }
    serve.terminate().await;
}

/// The test-only frozen clock is what multi-process tests count on: every
/// answer is computed at that instant (40 s into a minute: 20 s to reset).
#[tokio::test]
async fn the_frozen_test_clock_fixes_every_answers_time() {
    let mut serve = Serve::start(EXAMPLE, &["--test-frozen-clock-ms", "1700000020000"]);
    let mut client = serve.client().await;
    for _ in 0..3 {
        let result = client
            .should_allow(allow_request("example", &[&[("api_key", "k1")]], 1))
            .await
            .unwrap()
            .into_inner()
            .results
            .remove(0);
        assert_eq!(
            result.reset_after,
            Some(prost_types::Duration {
                seconds: 20,
                nanos: 0
            })
        );
    }
    serve.terminate().await;
}

/// Boolean variables take the usual spellings.
#[tokio::test]
async fn boolean_variables_take_the_usual_spellings() {
    for value in ["1", "true", "TRUE", "yes", "on"] {
        let mut serve = Serve::start_with_env(EXAMPLE, &[], &[("RATEKEEPER_SHADOW_MODE", value)]);
        serve.client().await;
        let (code, _) = serve.terminate().await;
        assert_eq!(code, Some(0), "{value}: {}", serve.stderr());
    }
}

#[test]
fn serve_exits_1_when_the_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let admin = format!("127.0.0.1:{}", free_port());
    let out = run(&[
        "serve",
        "--config",
        EXAMPLE,
        "--grpc-addr",
        &addr,
        "--admin-addr",
        &admin,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--grpc-addr"),
        "{}",
        text(&out.stderr)
    );
}

/// The README's run command: the example config on the memory store, no
/// Redis anywhere. It answers, and exits 0 on SIGTERM.
#[tokio::test]
async fn serve_answers_with_the_example_config_and_stops_on_sigterm() {
    let mut serve = Serve::start(EXAMPLE, &[]);
    let mut client = serve.client().await;
    let response = client
        .should_allow(allow_request("example", &[&[("api_key", "k1")]], 1))
        .await
        .unwrap()
        .into_inner();
    assert!(response.allowed);
    assert_eq!(response.results[0].decision(), Decision::Allowed);
    assert_eq!(response.results[0].remaining, 99);
    assert_eq!(response.results[0].rule_name, "per-api-key");

    let (code, took) = serve.terminate().await;
    assert_eq!(code, Some(0), "{}", serve.stderr());
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// With the Redis store pointed at nothing the service still starts and
/// answers UNAVAILABLE instead of hanging or crashing.
#[tokio::test]
async fn serve_starts_without_redis_and_answers_unavailable() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let mut serve = Serve::start_with_env(
        EXAMPLE,
        &[
            "--store",
            "redis",
            "--redis-url",
            &url,
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "ratekeeper=debug")],
    );
    let mut client = serve.client().await;
    // A gateway's W3C trace context: its trace id lands on the RPC's span.
    let mut request = tonic::Request::new(allow_request("example", &[&[("api_key", "k1")]], 1));
    request.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    let status = client.should_allow(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0));
    let logs = serve.stderr();
    assert!(
        logs.lines()
            .any(|l| l.starts_with('{') && l.contains("ratekeeper serving")),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("store call failed")
                && l.contains("4bf92f3577b34da6a3ce929d0e0e4736")),
        "{logs}"
    );
}

/// An OTLP/gRPC collector on a loopback port that keeps every span it gets.
#[cfg(feature = "otlp")]
mod collector {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::trace::v1::Span;
    use tonic::{Request, Response, Status};

    #[derive(Clone, Default)]
    pub struct Collector {
        pub spans: Arc<Mutex<Vec<Span>>>,
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, Status> {
            let spans = request
                .into_inner()
                .resource_spans
                .into_iter()
                .flat_map(|r| r.scope_spans)
                .flat_map(|s| s.spans);
            self.spans.lock().unwrap().extend(spans);
            Ok(Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Starts the collector; returns its URL and what it received.
    pub async fn start() -> (String, Arc<Mutex<Vec<Span>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let collector = Collector::default();
        let spans = collector.spans.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (url, spans)
    }

    pub fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn attribute(span: &Span, key: &str) -> Option<String> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|value| match value {
                Value::StringValue(s) => s.clone(),
                other => format!("{other:?}"),
            })
    }
}

/// With `--otlp-endpoint`, RPC spans and their store child spans reach the
/// collector, joined to the caller's trace when it sent a `traceparent`, and
/// an unsampled caller's trace is not exported. Logs stay at INFO: export
/// does not depend on `RUST_LOG`.
#[cfg(feature = "otlp")]
#[tokio::test]
async fn serve_exports_spans_over_otlp_with_the_callers_trace_as_parent() {
    use collector::{attribute, hex};

    const SAMPLED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const UNSAMPLED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const CALLER_SPAN: &str = "00f067aa0ba902b7";
    let (url, spans) = collector::start().await;
    let mut serve = Serve::start(EXAMPLE, &["--otlp-endpoint", &url]);
    let mut client = serve.client().await;
    for traceparent in [
        Some(format!("00-{SAMPLED_TRACE}-{CALLER_SPAN}-01")),
        Some(format!("00-{UNSAMPLED_TRACE}-{CALLER_SPAN}-00")),
        None,
    ] {
        let mut request =
            tonic::Request::new(allow_request("example", &[&[("api_key", "otlp")]], 1));
        if let Some(traceparent) = traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.parse().unwrap());
        }
        assert!(
            client
                .should_allow(request)
                .await
                .unwrap()
                .get_ref()
                .allowed
        );
    }
    // Shutdown flushes the batch exporter.
    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0), "{}", serve.stderr());
    let spans = spans.lock().unwrap().clone();
    let names: Vec<(String, String)> = spans
        .iter()
        .map(|s| (s.name.clone(), hex(&s.trace_id)))
        .collect();

    let rpcs: Vec<_> = spans.iter().filter(|s| s.name == "ShouldAllow").collect();
    assert_eq!(rpcs.len(), 2, "one per sampled request: {names:?}");
    let joined = rpcs
        .iter()
        .find(|s| hex(&s.trace_id) == SAMPLED_TRACE)
        .unwrap_or_else(|| panic!("no span in the caller's trace: {names:?}"));
    assert_eq!(hex(&joined.parent_span_id), CALLER_SPAN);
    assert_eq!(attribute(joined, "domain").as_deref(), Some("example"));
    assert_eq!(
        attribute(joined, "allowed").as_deref(),
        Some("BoolValue(true)")
    );
    let fresh = rpcs
        .iter()
        .find(|s| hex(&s.trace_id) != SAMPLED_TRACE)
        .unwrap();
    assert!(fresh.parent_span_id.is_empty(), "a new trace is a root");
    assert!(
        !names.iter().any(|(_, trace)| trace == UNSAMPLED_TRACE),
        "the caller did not sample this trace: {names:?}"
    );

    for rpc in rpcs {
        let store = spans
            .iter()
            .find(|s| s.name == "store" && s.parent_span_id == rpc.span_id)
            .unwrap_or_else(|| panic!("no store span under {}: {names:?}", hex(&rpc.span_id)));
        assert_eq!(store.trace_id, rpc.trace_id);
        assert_eq!(attribute(store, "backend").as_deref(), Some("memory"));
    }
}

/// With `--otlp-sample-ratio 0`, requests without a `traceparent` are not
/// traced at all, while a caller's sampled trace still is.
#[cfg(feature = "otlp")]
#[tokio::test]
async fn serve_traces_only_the_sampled_share() {
    use collector::hex;

    const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (url, spans) = collector::start().await;
    let mut serve = Serve::start(
        EXAMPLE,
        &["--otlp-endpoint", &url, "--otlp-sample-ratio", "0"],
    );
    let mut client = serve.client().await;
    for traced in [false, true, false] {
        let mut request =
            tonic::Request::new(allow_request("example", &[&[("api_key", "ratio")]], 1));
        if traced {
            request.metadata_mut().insert(
                "traceparent",
                format!("00-{CALLER_TRACE}-00f067aa0ba902b7-01")
                    .parse()
                    .unwrap(),
            );
        }
        client.should_allow(request).await.unwrap();
    }
    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0), "{}", serve.stderr());
    let traces: Vec<(String, String)> = spans
        .lock()
        .unwrap()
        .iter()
        .map(|s| (s.name.clone(), hex(&s.trace_id)))
        .collect();
    assert_eq!(
        traces.len(),
        2,
        "the caller's RPC and its store span: {traces:?}"
    );
    assert!(
        traces.iter().all(|(_, trace)| trace == CALLER_TRACE),
        "{traces:?}"
    );
}

/// `--store redis-sentinel` counts in the master the sentinels name; a
/// missing master name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_counts_in_the_master_the_sentinels_name() {
    let set = common::sentinel::SentinelSet::start();
    let nodes = set.nodes();
    let mut serve = Serve::start(
        EXAMPLE,
        &[
            "--store",
            "redis-sentinel",
            "--redis-sentinel-nodes",
            &nodes,
            "--redis-sentinel-master",
            common::sentinel::MASTER,
        ],
    );
    let mut client = serve.client().await;
    let response = client
        .should_allow(allow_request("example", &[&[("api_key", "k1")]], 1))
        .await
        .unwrap()
        .into_inner();
    assert!(response.allowed);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("rk4:*")
        .query(&mut set.primary.connection())
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    serve.terminate().await;
    assert_refused(
        &[
            "--config",
            EXAMPLE,
            "--store",
            "redis-sentinel",
            "--redis-sentinel-nodes",
            &nodes,
        ],
        "no sentinel master name given",
    );
    assert_refused(
        &["--config", EXAMPLE, "--redis-sentinel-master", "mymaster"],
        "--redis-sentinel-master has no effect with --store memory (the default)",
    );
}

/// `--worker-threads N` runs N worker threads; 1 serves on the main thread
/// alone (a single-threaded runtime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sets_the_runtimes_threads() {
    for (flag, workers) in [("3", 3), ("1", 0)] {
        let mut serve = Serve::start(EXAMPLE, &["--worker-threads", flag]);
        let mut client = serve.client().await;
        let response = client
            .should_allow(allow_request("example", &[&[("api_key", "k1")]], 1))
            .await
            .unwrap();
        assert!(response.into_inner().allowed);
        let tasks = std::fs::read_dir(format!("/proc/{}/task", serve.child.id())).unwrap();
        let named = tasks
            .filter(|task| {
                let comm = task.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).is_ok_and(|name| name.trim() == "rk-worker")
            })
            .count();
        assert_eq!(named, workers, "--worker-threads {flag}");
        serve.terminate().await;
    }
}

/// Two files of one domain: refused unless merged, by `check-config` and
/// `serve` alike, with `--merge-domain-config` or its variable.
#[tokio::test]
async fn merge_domain_config_on_check_config_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        "domain: m\ndescriptors:\n  - {key: a, rate_limit: {unit: minute, requests_per_unit: 5}}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        "domain: m\ndescriptors:\n  - {key: b, quota_mode: true, rate_limit: {unit: minute, requests_per_unit: 1}}\n",
    )
    .unwrap();
    let path = dir.path().to_str().unwrap();

    let out = run(&["check-config", path]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("b.yaml: domain: duplicate domain 'm' in config file (already defined in")
            && stderr.contains("--merge-domain-config merges them"),
        "{stderr}"
    );
    let out = run(&["check-config", "--merge-domain-config", path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("m.a: 5 per minute (fixed_window)\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("m.b: 1 per minute (fixed_window) (quota)"),
        "{stdout}"
    );
    assert!(stdout.contains("ok: 1 domains, 2 rules"), "{stdout}");
    let with_env = |value: &str| {
        Command::new(BIN)
            .args(["check-config", path])
            .env("RATEKEEPER_MERGE_DOMAIN_CONFIG", value)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    assert!(with_env("yes").status.success());
    let out = with_env("maybe");
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("the environment variable RATEKEEPER_MERGE_DOMAIN_CONFIG"),
        "{}",
        text(&out.stderr)
    );

    assert_refused(&["--config", path], "duplicate domain 'm' in config file");
    let mut serve = Serve::start_with_env(path, &[], &[("RATEKEEPER_MERGE_DOMAIN_CONFIG", "1")]);
    let mut client = serve.client().await;
    for (key, limit) in [("a", 5), ("b", 1)] {
        let result = client
            .should_allow(allow_request("m", &[&[(key, "x")]], 1))
            .await
            .unwrap()
            .into_inner()
            .results
            .remove(0);
        assert_eq!(result.limit, limit, "{key}");
    }
    serve.terminate().await;
}

/// The Envoy answer options reach the service from their flags and
/// variables: quota mode, dynamic metadata, both kinds of headers and the
/// near-limit ratio of the metrics.
#[tokio::test]
async fn envoy_answer_options_are_wired_from_flags_and_variables() {
    use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(
        &path,
        "domain: e\ndescriptors:\n  - {key: backend, metadata: {pool: main}, rate_limit: {unit: minute, requests_per_unit: 2}}\n",
    )
    .unwrap();
    let mut serve = Serve::start_with_env(
        path.to_str().unwrap(),
        &[
            "--quota-mode",
            "--draft-rate-limit-headers",
            "--near-limit-ratio",
            "0.5",
        ],
        &[
            ("RATEKEEPER_RESPONSE_DYNAMIC_METADATA", "on"),
            ("RATEKEEPER_RESPONSE_HEADERS", "true"),
        ],
    );
    serve.client().await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", serve.grpc_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut envoy = RateLimitServiceClient::new(channel);
    let request = || common::envoy_request("e", &[&[("backend", "a")], &[("backend", "b")]]);
    envoy.should_rate_limit(request()).await.unwrap();
    envoy
        .should_rate_limit(common::envoy_request("e", &[&[("backend", "a")]]))
        .await
        .unwrap();
    // a is over, b has room: allowed under global quota mode.
    let response = envoy
        .should_rate_limit(request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.overall_code(), Code::Ok);
    assert_eq!(response.statuses[0].code(), Code::OverLimit);
    let names: Vec<&str> = response
        .response_headers_to_add
        .iter()
        .map(|h| h.key.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "RateLimit-Reset",
            "RateLimit-Policy",
            "RateLimit"
        ]
    );
    let metadata = response.dynamic_metadata.expect("dynamic metadata");
    assert!(metadata.fields.contains_key("metadata"), "{metadata:?}");
    // Ratio 0.5 of 2: near above 1 — a's 2nd hit and b's 2nd.
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], serve.admin_port));
    let metrics = common::http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("ratelimit_rule_near_limit_total{domain=\"e\",rule=\"e.backend\"} 2"),
        "{metrics}"
    );
    serve.terminate().await;
}

/// The new settings refuse bad values, naming the flag or the variable.
#[test]
fn envoy_answer_options_refuse_bad_values() {
    let config = ["--config", EXAMPLE];
    assert_refused(
        &[&config[..], &["--near-limit-ratio", "1.5"]].concat(),
        "--near-limit-ratio",
    );
    for variable in [
        "RATEKEEPER_QUOTA_MODE",
        "RATEKEEPER_RESPONSE_DYNAMIC_METADATA",
        "RATEKEEPER_DRAFT_RATE_LIMIT_HEADERS",
        "RATEKEEPER_MERGE_DOMAIN_CONFIG",
    ] {
        assert_refused_with_env(
            &config,
            &[(variable, "maybe")],
            &format!("the environment variable {variable}"),
        );
    }
    assert_refused_with_env(
        &config,
        &[("RATEKEEPER_NEAR_LIMIT_RATIO", "2")],
        "the environment variable RATEKEEPER_NEAR_LIMIT_RATIO",
    );
    // One file holds one domain: nothing to merge.
    assert_refused(
        &[&config[..], &["--merge-domain-config"]].concat(),
        "--merge-domain-config has no effect without --config naming a directory of rules files",
    );
    assert_refused_with_env(
        &config,
        &[("RATEKEEPER_MERGE_DOMAIN_CONFIG", "1")],
        "RATEKEEPER_MERGE_DOMAIN_CONFIG (--merge-domain-config) has no effect",
    );
    // Header names are upstream's headers' and need them, draft or not.
    assert_refused(
        &[
            &config[..],
            &["--draft-rate-limit-headers", "--limit-header", "X-Limit"],
        ]
        .concat(),
        "--limit-header has no effect without --response-headers",
    );
}

/// The overrides' bounds: at least one override, a poll that moves.
#[test]
fn serve_refuses_bad_overrides_bounds() {
    let config = ["--config", EXAMPLE];
    assert_refused(
        &[&config[..], &["--max-overrides", "0"]].concat(),
        "invalid value '0' for '--max-overrides <MAX_OVERRIDES>': must be at least 1",
    );
    assert_refused_with_env(
        &config,
        &[("RATEKEEPER_MAX_OVERRIDES", "many")],
        "invalid value 'many' for '--max-overrides <MAX_OVERRIDES>'",
    );
    assert_refused(
        &[&config[..], &["--overrides-poll-interval", "0s"]].concat(),
        "invalid value '0s' for '--overrides-poll-interval <OVERRIDES_POLL_INTERVAL>'",
    );
}

/// The `THP_enabled` line of a process's status: 0 where transparent huge
/// pages are off for it.
#[cfg(target_os = "linux")]
fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .expect("THP_enabled in /proc/<pid>/status (Linux 5.0 or later)")
        .trim()
        .to_owned()
}

/// Huge-page faults stalled the memory store for milliseconds as it grew
/// (src/huge_pages.rs): the server turns them off for itself.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn serve_turns_transparent_huge_pages_off_for_itself() {
    // The flag is inherited: clear it here, or a parent that had set it
    // would make this pass whatever the binary does.
    rustix::thread::disable_transparent_huge_pages(false).unwrap();
    assert_eq!(thp_enabled(std::process::id()), "1");

    let mut server = Serve::start(EXAMPLE, &["--store", "memory"]);
    server.client().await;
    assert_eq!(thp_enabled(server.child.id()), "0");
}
