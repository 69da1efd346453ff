//! Three `ratekeeper` processes (the real binary) share one limit exactly:
//! against one Redis, and against a Redis Cluster with requests whose
//! descriptors span several slots.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::RedisServer;
use common::allow_request;
use common::cluster::RedisCluster;
use common::process::Serve;

const RULES: &str = r#"
domain: shared
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 300}
  - key: team
    rate_limit: {unit: hour, requests_per_unit: 100000}
  - key: bucket
    rate_limit: {unit: day, requests_per_unit: 150, algorithm: token_bucket}
"#;

/// Exactness, not latency, is under test: debug builds of six processes and
/// their callers share two cores, so store calls get a generous deadline
/// (`--store-timeout 1s` below). Every instance reads the same frozen time,
/// so no window boundary can pass mid-count.
const FROZEN: &str = "1700000020000";
const CALLERS_PER_INSTANCE: usize = 16;
const CALLS_PER_CALLER: usize = 25;

/// Starts three instances with `store_flags`, sends 1,200 calls through
/// them at once, and returns how many were allowed per descriptor set:
/// `(user alone, user + team + bucket)`.
async fn allowed_across_three(store_flags: &[&str]) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rules.yaml");
    std::fs::write(&config, RULES).unwrap();
    let flags = [store_flags, &["--test-frozen-clock-ms", FROZEN]].concat();
    let mut instances: Vec<Serve> = (0..3)
        .map(|_| Serve::start(config.to_str().unwrap(), &flags))
        .collect();
    let mut clients = Vec::new();
    for instance in &mut instances {
        clients.push(instance.client().await);
    }
    let single = Arc::new(AtomicU64::new(0));
    let spanning = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for client in &clients {
        for caller in 0..CALLERS_PER_INSTANCE {
            let mut client = client.clone();
            let (single, spanning) = (single.clone(), spanning.clone());
            callers.push(tokio::spawn(async move {
                for call in 0..CALLS_PER_CALLER {
                    let team = format!("team-{}", (caller + call) % 7);
                    let alone = allow_request("shared", &[&[("user", "u1")]], 1);
                    let reply = client.should_allow(alone).await.unwrap().into_inner();
                    if reply.allowed {
                        single.fetch_add(1, Ordering::Relaxed);
                    }
                    let three = allow_request(
                        "shared",
                        &[&[("user", "u2")], &[("team", &team)], &[("bucket", "b")]],
                        1,
                    );
                    let reply = client.should_allow(three).await.unwrap().into_inner();
                    if reply.allowed {
                        spanning.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for caller in callers {
        caller.await.unwrap();
    }
    for instance in &mut instances {
        let (code, _) = instance.terminate().await;
        assert_eq!(code, Some(0), "{}", instance.stderr());
    }
    (
        single.load(Ordering::Relaxed),
        spanning.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_redis_exactly() {
    let redis = RedisServer::start();
    let url = redis.url();
    let (single, spanning) = allowed_across_three(&[
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--store-timeout",
        "1s",
    ])
    .await;
    assert_eq!(single, 300, "user alone: limit 300");
    // The token bucket (150) binds first; all-or-nothing keeps the others in step.
    assert_eq!(spanning, 150, "user + team + bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_redis_cluster_exactly() {
    let cluster = RedisCluster::start();
    let nodes = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let (single, spanning) = allowed_across_three(&[
        "--store",
        "redis-cluster",
        "--redis-cluster-nodes",
        &nodes,
        "--store-timeout",
        "1s",
    ])
    .await;
    assert_eq!(single, 300, "user alone: limit 300");
    assert_eq!(spanning, 150, "user + team + bucket, on several slots");
}
