//! The Redis Cluster store against a real 3-master cluster (with replicas)
//! started by the test: exact counting under concurrency across slots, a
//! request spanning several slots decided all-or-nothing, and a master
//! killed under load — no call waits past the deadline, answers follow the
//! failure policy while the slot moves, and counting resumes on the
//! promoted replica.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::cluster::RedisCluster;
use common::coalescing::{Phase, decisions_keep_their_semantics};
use common::{TestServer, allow_request, rules};
use ratekeeper::Server;
use ratekeeper::clock::ManualClock;
use ratekeeper::limiter::FailurePolicy;
use ratekeeper::proto::ratekeeper::v1::ShouldAllowRequest;
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use ratekeeper::store::RedisClusterStore;
use ratekeeper::store::redis_cluster::RedisClusterSettings;

const RULES: &str = r#"
domain: cluster
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 200}
  - key: tight
    rate_limit: {unit: hour, requests_per_unit: 1}
  - key: steady
    rate_limit: {unit: hour, requests_per_unit: 1000000}
"#;

const DEADLINE: Duration = Duration::from_millis(200);
/// Slack for a slow, loaded 2-core machine; far below anything that hangs.
const MARGIN: Duration = Duration::from_secs(2);

/// A store on `cluster` at a fixed time, so exact counts cannot be cut by
/// a window boundary.
fn store(cluster: &RedisCluster) -> RedisClusterStore {
    RedisClusterStore::new(&RedisClusterSettings {
        nodes: cluster.urls(),
        pool_size: 2,
        timeout: DEADLINE,
        connect_timeout: Duration::from_millis(500),
        tls: None,
        expiry_jitter: Duration::ZERO,
    })
    .unwrap()
    .with_clock(Arc::new(ManualClock::new(common::T0)))
}

fn users(request: &[&str]) -> ShouldAllowRequest {
    let descriptors: Vec<[(&str, &str); 1]> = request.iter().map(|u| [("user", *u)]).collect();
    let slices: Vec<&[(&str, &str)]> = descriptors.iter().map(|d| d.as_slice()).collect();
    allow_request("cluster", &slices, 1)
}

/// Masters holding at least one ratekeeper key.
fn masters_with_keys(cluster: &RedisCluster) -> HashSet<u16> {
    cluster
        .ports
        .iter()
        .filter(|port| {
            cluster
                .keys_on(**port)
                .iter()
                .any(|k| k.starts_with(b"rk4:"))
        })
        .map(|port| cluster.master_of(&cluster.keys_on(*port)[0]))
        .collect()
}

/// 64 callers, 10 users on different slots, 4,000 calls in all of which
/// each user can take 200: exactly 200 pass per user, and the keys are
/// spread over every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_is_exact_under_concurrency_across_slots() {
    let cluster = RedisCluster::start();
    let server = TestServer::with(rules(&[RULES]), Arc::new(store(&cluster))).await;
    let allowed: Arc<Vec<AtomicU64>> = Arc::new((0..10).map(|_| AtomicU64::new(0)).collect());
    let channel = server.channel().await;
    let callers: Vec<_> = (0..64)
        .map(|caller| {
            let allowed = allowed.clone();
            let mut client = RateLimiterClient::new(channel.clone());
            tokio::spawn(async move {
                for call in 0..63 {
                    let user = (caller + call) % 10;
                    let reply = client
                        .should_allow(users(&[&format!("user-{user}")]))
                        .await
                        .unwrap()
                        .into_inner();
                    if reply.allowed {
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
    assert_eq!(counts, [200; 10], "allowed per user");
    assert_eq!(masters_with_keys(&cluster).len(), 3, "keys on every master");
}

/// One request whose descriptors live on several slots (and masters) is
/// all-or-nothing: denied by one exhausted descriptor, it takes nothing from
/// the others; a dry run reports without taking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_spanning_slots_is_all_or_nothing() {
    let cluster = RedisCluster::start();
    let server = TestServer::with(rules(&[RULES]), Arc::new(store(&cluster))).await;
    let mut client = server.client().await;
    let names: Vec<String> = (0..10).map(|i| format!("span-{i}")).collect();
    let mut entries: Vec<[(&str, &str); 1]> =
        names.iter().map(|n| [("user", n.as_str())]).collect();
    entries.push([("tight", "t")]);
    let slices: Vec<&[(&str, &str)]> = entries.iter().map(|d| d.as_slice()).collect();

    let first = client
        .should_allow(allow_request("cluster", &slices, 1))
        .await
        .unwrap()
        .into_inner();
    assert!(first.allowed);
    assert!(
        masters_with_keys(&cluster).len() >= 2,
        "the request spans several masters"
    );
    let second = client
        .should_allow(allow_request("cluster", &slices, 1))
        .await
        .unwrap()
        .into_inner();
    assert!(!second.allowed, "tight is exhausted");
    let remaining: Vec<u64> = second.results.iter().map(|r| r.remaining).collect();
    assert_eq!(
        remaining[..10],
        [199; 10],
        "the denied request took nothing"
    );

    let mut dry = allow_request("cluster", &slices[..10], 1);
    dry.dry_run = true;
    let dry = client.should_allow(dry).await.unwrap().into_inner();
    assert!(dry.allowed);
    let remaining: Vec<u64> = dry.results.iter().map(|r| r.remaining).collect();
    assert_eq!(remaining, [199; 10], "a dry run takes nothing");
}

/// A master is killed while callers run: no call waits past the deadline
/// plus a margin, every answer follows the `allow` policy or counts, and
/// once the replica is promoted, counting resumes for the moved slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failover_under_load_is_answered_by_policy_and_recovers() {
    let mut cluster = RedisCluster::start();
    let server = TestServer::start(
        Server::new(rules(&[RULES]), Arc::new(store(&cluster)))
            .with_failure_policy(FailurePolicy::Allow),
    )
    .await;
    let mut client = server.client().await;
    let request = allow_request("cluster", &[&[("steady", "s")]], 1);
    assert!(
        client
            .should_allow(request.clone())
            .await
            .unwrap()
            .into_inner()
            .results[0]
            .remaining
            > 0
    );
    let key = cluster
        .ports
        .iter()
        .flat_map(|port| cluster.keys_on(*port))
        .find(|k| k.starts_with(b"rk4:"))
        .unwrap();
    let master = cluster.master_of(&key);

    // Load on every slot while the master dies: 4 callers on other keys,
    // each call checked against the same bound.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let channel = server.channel().await;
    let load: Vec<_> = (0..4)
        .map(|caller| {
            let stop = stop.clone();
            let mut client = RateLimiterClient::new(channel.clone());
            tokio::spawn(async move {
                let mut calls = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let user = format!("load-{caller}-{}", calls % 50);
                    let started = Instant::now();
                    let reply = client.should_allow(users(&[&user])).await.unwrap();
                    assert!(reply.into_inner().allowed);
                    let took = started.elapsed();
                    assert!(took < DEADLINE + MARGIN, "a loaded call took {took:?}");
                    calls += 1;
                }
                calls
            })
        })
        .collect();

    cluster.kill(master);
    let killed_at = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut degraded = 0;
    let recovered_after = loop {
        let started = Instant::now();
        let reply = client
            .should_allow(request.clone())
            .await
            .unwrap()
            .into_inner();
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert!(took < DEADLINE + MARGIN, "a call took {took:?}");
        assert!(reply.allowed, "the allow policy, or a real count");
        // A degraded answer claims nothing; a counted one has hits left.
        if reply.results[0].remaining > 0 {
            if degraded > 0 {
                break killed_at.elapsed();
            }
        } else {
            degraded += 1;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "no recovery within 30 s of the failover ({degraded} degraded answers)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let mut load_calls = 0;
    for caller in load {
        load_calls += caller.await.unwrap();
    }
    println!(
        "cluster master killed: slowest call {slowest:?} (deadline {DEADLINE:?}), \
         {degraded} answers by policy, counting again after {recovered_after:?}; \
         {load_calls} calls from 4 loaded callers meanwhile, none over the bound"
    );
    assert!(degraded > 0, "the failover was seen");
    assert_ne!(cluster.master_of(&key), master, "a replica took over");
}

/// Every slot of one master moves to another (keys move with MIGRATE) while
/// 32 callers count on 10 users until the move is over: no call waits past the deadline plus a
/// margin, and no user ever gets more than its limit. A call that fails
/// while its slot moves (after Redis counted it, or not) may leave a user
/// short of the limit, never over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_load_never_admits_past_a_limit() {
    let cluster = RedisCluster::start();
    let server = TestServer::with(rules(&[RULES]), Arc::new(store(&cluster))).await;
    let allowed: Arc<Vec<AtomicU64>> = Arc::new((0..10).map(|_| AtomicU64::new(0)).collect());
    let failed = Arc::new(AtomicU64::new(0));
    let channel = server.channel().await;
    // Put every user's key in place, and find a master holding some.
    let mut client = RateLimiterClient::new(channel.clone());
    for user in 0..10 {
        assert!(
            client
                .should_allow(users(&[&format!("reshard-{user}")]))
                .await
                .unwrap()
                .into_inner()
                .allowed
        );
        allowed[user].fetch_add(1, Ordering::Relaxed);
    }
    let from = *masters_with_keys(&cluster).iter().next().unwrap();
    let to = cluster.masters().into_iter().find(|m| *m != from).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let callers: Vec<_> = (0..32)
        .map(|caller| {
            let (allowed, failed, stop) = (allowed.clone(), failed.clone(), stop.clone());
            let mut client = RateLimiterClient::new(channel.clone());
            tokio::spawn(async move {
                // Until the move is over, and at least 100 calls each.
                let mut call = 0;
                while call < 100 || !stop.load(Ordering::Relaxed) {
                    call += 1;
                    let user = (caller + call) % 10;
                    let started = Instant::now();
                    let reply = client
                        .should_allow(users(&[&format!("reshard-{user}")]))
                        .await;
                    let took = started.elapsed();
                    assert!(took < DEADLINE + MARGIN, "a call took {took:?}");
                    match reply {
                        Ok(reply) if reply.get_ref().allowed => {
                            allowed[user].fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(status) => {
                            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                call
            })
        })
        .collect();
    let started = Instant::now();
    let output = tokio::task::block_in_place(|| cluster.reshard(from, to, 5461));
    stop.store(true, Ordering::Relaxed);
    assert!(
        output.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let moved_after = started.elapsed();
    let mut calls = 0;
    for caller in callers {
        calls += caller.await.unwrap();
    }
    let counts: Vec<u64> = allowed.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "resharding under load: 5,461 slots moved in {moved_after:?} under {calls} calls; \
         allowed per user {counts:?}, {failed} calls failed"
    );
    assert!(counts.iter().all(|c| *c <= 200), "over a limit: {counts:?}");
    // At least 3,200 calls on 10 users of 200 each: every limit is reached
    // unless a failed call was counted by Redis after its deadline.
    let short: u64 = counts.iter().map(|c| 200 - c).sum();
    assert!(
        short <= failed,
        "short {short} with only {failed} failed calls"
    );
    assert!(masters_with_keys(&cluster).contains(&to));
}

/// One dead master takes a third of the slots away until its replica takes
/// over, not the instance: with the `error` policy it stays ready
/// throughout, since most requests are still decided, and every instance
/// going unready at once would drop them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_master_leaves_the_instance_ready() {
    let mut cluster = RedisCluster::start();
    let server = TestServer::start(
        Server::new(rules(&[RULES]), Arc::new(store(&cluster)))
            .with_failure_policy(FailurePolicy::Error)
            .with_readiness_interval(Duration::from_millis(50)),
    )
    .await;
    let ready = common::http_get(server.admin_addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let master = cluster.masters()[0];
    cluster.kill(master);
    let killed = Instant::now();
    let (mut looks, mut degraded) = (0, 0);
    while killed.elapsed() < Duration::from_secs(4) {
        let ready = common::http_get(server.admin_addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        looks += 1;
        degraded += usize::from(ready.contains("1 of 3 masters do not answer"));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!(
        "cluster master killed: ready in all {looks} looks over 4 s, {degraded} saying degraded"
    );
    assert!(degraded > 0, "the dead master was never reported");
}

/// Coalescing on a cluster: 64 concurrent decisions on one slot, held
/// until all are queued, reach the slot's master as at most two calls per
/// connection, and each keeps its own mode and answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_calls_keep_each_decisions_semantics() {
    let cluster = RedisCluster::start();
    let store = store(&cluster);
    let key = |name: &str| format!("{{coalesce}}:{name}|fw|60000").into_bytes();
    let master = cluster.master_of(&key("hot"));
    let fcalls = AtomicU64::new(0);
    decisions_keep_their_semantics(&store, key, |phase| match phase {
        Phase::Queueing => {
            cluster.reset_stats();
            cluster.hold(true);
        }
        Phase::Queued => cluster.hold(false),
        Phase::Answered => fcalls.store(cluster.calls(master, "fcall"), Ordering::Relaxed),
    })
    .await;
    let fcalls = fcalls.into_inner();
    // `store` has two connections to each master.
    assert!((1..=4).contains(&fcalls), "{fcalls} calls for 64 decisions");
}
