//! The rules shipped in `deploy/`: they load, the Kubernetes ConfigMap
//! carries exactly the Envoy example's rules, and the descriptors that
//! `deploy/envoy/envoy.yaml`'s rate limit actions send get the intended
//! answers. (The Dockerfile, the manifests and envoy.yaml themselves are not
//! run here: no Docker engine, cluster or Envoy on the test machines.)

mod common;

use std::path::Path;

use common::{Backend, Harness, envoy_request};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

fn deploy_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[test]
fn the_configmap_carries_the_envoy_examples_rules() {
    let rules = deploy_file("envoy/ratekeeper-rules.yaml");
    ratekeeper::config::parse_rules_file("ratekeeper-rules.yaml", &rules).unwrap();
    let configmap: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&deploy_file("kubernetes/configmap.yaml")).unwrap();
    let embedded = configmap["data"]["edge.yaml"]
        .as_str()
        .expect("data.edge.yaml in the ConfigMap");
    assert_eq!(
        embedded, rules,
        "the ConfigMap and the Envoy example's rules differ"
    );
}

/// What Envoy sends for one request, per `envoy.yaml`'s `rate_limits`:
/// `[0]` api_key if the header is there, `[1]` the client address, `[2]`
/// login + address for `POST /login`, `[3]` the generic backend key.
fn envoy_descriptors<'a>(
    api_key: Option<&'a str>,
    ip: &'a str,
    login: bool,
) -> Vec<Vec<(&'a str, &'a str)>> {
    let mut descriptors = Vec::new();
    if let Some(key) = api_key {
        descriptors.push(vec![("api_key", key)]);
    }
    descriptors.push(vec![("remote_address", ip)]);
    if login {
        descriptors.push(vec![("header_match", "login"), ("remote_address", ip)]);
    }
    descriptors.push(vec![("generic_key", "backend")]);
    descriptors
}

#[tokio::test]
async fn envoys_descriptors_get_the_intended_limits() {
    let harness =
        Harness::start(Backend::Memory, &deploy_file("envoy/ratekeeper-rules.yaml")).await;
    let mut envoy = harness.server.envoy().await;
    let mut ask = async |descriptors: Vec<Vec<(&str, &str)>>| {
        let slices: Vec<&[(&str, &str)]> = descriptors.iter().map(Vec::as_slice).collect();
        envoy
            .should_rate_limit(envoy_request("edge", &slices))
            .await
            .unwrap()
            .into_inner()
    };

    // A plain request: limits per API key, per IP, and the shadow backend total.
    let reply = ask(envoy_descriptors(Some("k1"), "203.0.113.7", false)).await;
    assert_eq!(reply.overall_code(), Code::Ok);
    let limits: Vec<u32> = reply
        .statuses
        .iter()
        .map(|s| s.current_limit.as_ref().map_or(0, |l| l.requests_per_unit))
        .collect();
    assert_eq!(limits, [600, 20, 2000]);

    // Logins: 5 per 15 minutes per IP, then over the limit.
    for attempt in 1..=6 {
        let reply = ask(envoy_descriptors(None, "198.51.100.9", true)).await;
        let login = &reply.statuses[1];
        let expected = if attempt <= 5 {
            Code::Ok
        } else {
            Code::OverLimit
        };
        assert_eq!(login.code(), expected, "login attempt {attempt}");
        assert_eq!(reply.overall_code(), expected, "login attempt {attempt}");
    }

    // The uptime monitor's address is never limited.
    let reply = ask(envoy_descriptors(None, "192.0.2.10", false)).await;
    assert_eq!(reply.statuses[0].code(), Code::Ok);
    assert!(reply.statuses[0].current_limit.is_none(), "whitelisted");
}

/// The example deployment publishes no admin surface: the Service carries
/// only gRPC, the admin port stays on loopback, probes and Prometheus use
/// the gRPC and metrics-only ports; and its Redis does not evict the live
/// counters nearest their window's end first.
#[test]
fn the_example_deployment_keeps_the_admin_port_private() {
    let docs = |path| -> Vec<serde_yaml_ng::Value> {
        deploy_file(path)
            .split("\n---")
            .map(|doc| serde_yaml_ng::from_str(doc).unwrap())
            .collect()
    };
    for service in docs("kubernetes/service.yaml") {
        let ports: Vec<&str> = service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(ports, ["grpc"], "{service:?}");
    }
    let deployment = &docs("kubernetes/deployment.yaml")[0];
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env = |name: &str| {
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        env("RATEKEEPER_ADMIN_ADDR").as_deref(),
        Some("127.0.0.1:8080")
    );
    assert_eq!(
        env("RATEKEEPER_METRICS_ADDR").as_deref(),
        Some("0.0.0.0:9090")
    );
    assert_eq!(container["readinessProbe"]["grpc"]["port"], 8081);
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], "9090");

    let redis = &docs("kubernetes/redis.yaml")[0];
    let args: Vec<&str> = redis["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let policy = args
        .iter()
        .position(|a| *a == "--maxmemory-policy")
        .map(|i| args[i + 1]);
    assert_eq!(policy, Some("volatile-lfu"));
}
