//! The Redis store over networks that fail the way real ones do, through a
//! fault proxy (`common::fault_proxy`) and with real primaries, replicas and
//! sentinels: every connection going silent for good (half-open), the
//! primary behind an endpoint demoted and the endpoint moved, a Redis 3 ms
//! away, and a Sentinel failover. A steady client (about 150 calls a
//! second) measures how long calls fail; the store is set up as `serve`
//! sets it up (default deadline, pool and connect timeout, the breaker in
//! front, failure policy `error`).
//!
//! The bounds asserted are the targets (calls OK again within 1 s) plus a
//! margin for a slow, loaded machine; the measured figures are printed (run
//! with `--nocapture`) and quoted in the README.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fault_proxy::FaultProxy;
use common::sentinel::{MASTER, SentinelSet};
use common::{RedisServer, TestServer, allow_request, http_get, rules};
use ratekeeper::Server;
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use ratekeeper::store::redis::RedisSettings;
use ratekeeper::store::redis::sentinel::SentinelSettings;
use ratekeeper::store::{CircuitBreaker, CounterStore, RedisStore};
use tonic::transport::Channel;

const RULES: &str = r#"
domain: net
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 1000000}
"#;

/// The store deadline `serve` uses by default.
const DEADLINE: Duration = Duration::from_millis(15);
/// The target: calls are OK again within a second of the fault...
const TARGET: Duration = Duration::from_secs(1);
/// ...plus slack for a slow, loaded machine.
const MARGIN: Duration = Duration::from_secs(1);
/// No single call may take longer than the deadline plus this.
const CALL_SLACK: Duration = Duration::from_millis(500);

/// The tests of this file measure latency-bound recovery: one at a time, so
/// they do not slow each other down on a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The store as `serve --store redis` builds it: default settings, breaker.
fn store(settings: RedisSettings) -> Arc<dyn CounterStore> {
    Arc::new(CircuitBreaker::new(
        Arc::new(RedisStore::new(&settings).unwrap()),
        3,
        Duration::from_millis(200),
    ))
}

async fn serve(store: Arc<dyn CounterStore>) -> TestServer {
    TestServer::start(Server::new(rules(&[RULES]), store)).await
}

/// One call of the steady client: when it started, how long it took, and
/// whether it got an answer.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    took: Duration,
    ok: bool,
}

/// A client calling every 5 ms until stopped (bounded: at most 60 s).
struct Steady {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Steady {
    fn start(mut client: RateLimiterClient<Channel>) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, flag) = (samples.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(60)
            {
                let at = Instant::now();
                let ok = client
                    .should_allow(allow_request("net", &[&[("user", "steady")]], 1))
                    .await
                    .is_ok();
                s.lock().unwrap().push(Sample {
                    at,
                    took: at.elapsed(),
                    ok,
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Steady {
            samples,
            stop,
            task,
        }
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap();
        self.samples.lock().unwrap().clone()
    }
}

/// What the samples say about a fault at `fault`: failed calls, how long
/// after the fault the last failed call ended, the slowest call.
struct Report {
    failed: usize,
    calls: usize,
    recovered_after: Duration,
    slowest: Duration,
}

fn report(samples: &[Sample], fault: Instant) -> Report {
    // A call still in flight when the fault hit belongs to "after".
    let ended_before = |s: &&Sample| s.at + s.took < fault;
    let after: Vec<&Sample> = samples.iter().filter(|s| !ended_before(s)).collect();
    let first = samples[0].at;
    let failed_before: Vec<_> = samples
        .iter()
        .filter(|s| ended_before(s) && !s.ok)
        .map(|s| (s.at - first, s.took))
        .collect();
    assert!(
        failed_before.is_empty(),
        "calls failed before the fault (at, took): {failed_before:?}"
    );
    assert!(
        after.iter().rev().take(20).all(|s| s.ok),
        "not recovered by the end: {:?}",
        after.iter().rev().take(20).collect::<Vec<_>>()
    );
    Report {
        failed: after.iter().filter(|s| !s.ok).count(),
        calls: after.len(),
        recovered_after: after
            .iter()
            .filter(|s| !s.ok)
            .map(|s| (s.at + s.took).saturating_duration_since(fault))
            .max()
            .unwrap_or_default(),
        slowest: samples.iter().map(|s| s.took).max().unwrap_or_default(),
    }
}

impl Report {
    fn check(&self, what: &str) {
        println!(
            "{what}: {} of {} calls failed, OK again {:?} after the fault, slowest call {:?}",
            self.failed, self.calls, self.recovered_after, self.slowest
        );
        assert!(
            self.recovered_after < TARGET + MARGIN,
            "{what}: calls failed for {:?}",
            self.recovered_after
        );
        assert!(
            self.slowest < DEADLINE + CALL_SLACK,
            "{what}: a call took {:?}",
            self.slowest
        );
    }
}

/// How long after `started` the server's `/readyz` first said ready.
async fn until_ready(server: &TestServer, started: Instant) -> Duration {
    loop {
        if http_get(server.admin_addr, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
        {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The remaining count of `user=tally` after taking `cost` more.
async fn tally(client: &mut RateLimiterClient<Channel>, cost: u64) -> u64 {
    client
        .should_allow(allow_request("net", &[&[("user", "tally")]], cost))
        .await
        .unwrap()
        .into_inner()
        .results[0]
        .remaining
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_are_replaced_within_a_second() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(([127, 0, 0, 1], redis.port).into());
    let server = serve(store(RedisSettings::new(proxy.url()))).await;
    let steady = Steady::start(server.client().await);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let fault = Instant::now();
    proxy.silence_open_connections();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let samples = steady.finish().await;
    let report = report(&samples, fault);
    report.check("half-open connections");
    assert!(report.failed > 0, "the fault was never felt");
    assert!(
        proxy.accepted() > ratekeeper::store::redis::DEFAULT_POOL_SIZE,
        "the connections were replaced"
    );
    // The breaker opened (calls answered without waiting) and closed again
    // (the last calls were answered by Redis).
    let metrics = http_get(server.admin_addr, "/metrics").await;
    assert!(
        metrics
            .contains(r#"ratelimit_storage_errors_total{backend="redis",reason="circuit_open"}"#),
        "{metrics}"
    );
}

/// Traffic rides one connection while it answers in time; when that one
/// goes silent, new calls pass it over for the standby at once (a third of
/// the deadline after its call went out), long before the stall bound
/// retires it: only the calls already on it fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_silent_connection_costs_only_the_calls_already_on_it() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(([127, 0, 0, 1], redis.port).into());
    let server = serve(store(RedisSettings::new(proxy.url()))).await;
    let steady = Steady::start(server.client().await);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let fault = Instant::now();
    proxy.silence_busiest_connection();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let samples = steady.finish().await;
    let report = report(&samples, fault);
    report.check("one silent connection");
    assert!(report.failed > 0, "the fault was never felt");
    // The steady client has one call out at a time: the call on the silent
    // connection fails; the next one finds it late and goes to the standby.
    // (Round-robin would fail every other call until the stall bound.)
    assert!(
        report.failed <= 2,
        "{} of {} calls failed",
        report.failed,
        report.calls
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_behind_the_endpoint_is_followed_within_a_second() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let old = RedisServer::start();
    let new = RedisServer::start_with(&["--replicaof", "127.0.0.1", &old.port.to_string()]);
    let proxy = FaultProxy::start(([127, 0, 0, 1], old.port).into());
    let server = serve(store(RedisSettings::new(proxy.url()))).await;
    let mut client = server.client().await;
    let counted = tally(&mut client, 50).await;
    // Replicated before the switch, so nothing may be lost.
    let _: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5_000)
        .query(&mut old.connection())
        .unwrap();
    let steady = Steady::start(server.client().await);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // What a managed Redis does on failover: promote the replica, demote
    // the primary, move the endpoint. The old sockets now answer READONLY.
    let fault = Instant::now();
    let _: String = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut new.connection())
        .unwrap();
    let _: String = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(new.port)
        .query(&mut old.connection())
        .unwrap();
    proxy.redirect(([127, 0, 0, 1], new.port).into());
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let samples = steady.finish().await;
    report(&samples, fault).check("failover behind the endpoint");
    assert_eq!(
        tally(&mut client, 1).await,
        counted - 1,
        "the count went on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_3_ms_away_is_ready_within_a_second_and_fails_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(([127, 0, 0, 1], redis.port).into());
    proxy.set_delay(Duration::from_millis(3));
    let started = Instant::now();
    let server = serve(store(RedisSettings::new(proxy.url()))).await;
    let ready_after = until_ready(&server, started).await;
    let steady = Steady::start(server.client().await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let samples = steady.finish().await;
    let failed = samples.iter().filter(|s| !s.ok).count();
    let slowest = samples.iter().map(|s| s.took).max().unwrap();
    println!(
        "redis 3 ms away: ready {ready_after:?} after start; {failed} of {} calls failed, slowest {slowest:?}",
        samples.len()
    );
    assert!(ready_after < TARGET + MARGIN, "ready after {ready_after:?}");
    assert_eq!(failed, 0, "calls failed at a steady rate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_within_a_second() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let set = SentinelSet::start();
    let redis = RedisStore::with_sentinels(
        &RedisSettings::new("redis://unused"),
        &SentinelSettings {
            nodes: set.nodes().split(',').map(str::to_owned).collect(),
            master_name: MASTER.to_owned(),
            master_username: None,
            master_password: None,
        },
    )
    .unwrap();
    let breaker = Arc::new(CircuitBreaker::new(
        Arc::new(redis),
        3,
        Duration::from_millis(200),
    ));
    let server = serve(breaker).await;
    let mut client = server.client().await;
    let counted = tally(&mut client, 50).await;
    let _: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5_000)
        .query(&mut set.primary.connection())
        .unwrap();
    let steady = Steady::start(server.client().await);
    tokio::time::sleep(Duration::from_millis(500)).await;

    set.failover();
    let old = set.primary.port;
    set.wait_until(
        Duration::from_secs(20),
        "the sentinels elect the replica",
        |s| s.master_port().is_some_and(|port| port != old),
    );
    let elected = Instant::now();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let samples = steady.finish().await;
    report(&samples, elected).check("sentinel failover (from the election)");
    assert_eq!(set.master_port(), Some(set.replica.port));
    assert_eq!(
        tally(&mut client, 1).await,
        counted - 1,
        "the count went on"
    );
}

/// The cluster store as `serve --store redis-cluster` builds it.
fn cluster_store(
    cluster: &common::cluster::RedisCluster,
    deadline: Duration,
) -> Arc<dyn CounterStore> {
    use ratekeeper::store::RedisClusterStore;
    use ratekeeper::store::redis_cluster::RedisClusterSettings;
    Arc::new(CircuitBreaker::new(
        Arc::new(
            RedisClusterStore::new(&RedisClusterSettings {
                nodes: cluster.urls(),
                pool_size: 4,
                timeout: deadline,
                connect_timeout: Duration::from_secs(1),
                tls: None,
                expiry_jitter: Duration::ZERO,
            })
            .unwrap(),
        ),
        3,
        Duration::from_millis(200),
    ))
}

/// The port (as announced: its proxy's) of the master that serves the
/// steady client's key.
fn steady_master(cluster: &common::cluster::RedisCluster) -> u16 {
    let keys: Vec<Vec<u8>> = cluster
        .ports
        .iter()
        .flat_map(|port| cluster.keys_on(*port))
        .filter(|k| k.windows(6).any(|w| w == b"steady"))
        .collect();
    cluster.master_of(&keys[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_to_one_cluster_master_are_replaced_within_a_second() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = common::cluster::RedisCluster::start_behind_proxies();
    let server = serve(cluster_store(&cluster, DEADLINE)).await;
    // One call puts the key in place; then find its master (blocking
    // fixture calls, made before the steady client runs).
    let mut client = server.client().await;
    client
        .should_allow(allow_request("net", &[&[("user", "steady")]], 1))
        .await
        .unwrap();
    let announced = steady_master(&cluster);
    let steady = Steady::start(client);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let proxy = cluster
        .proxies
        .iter()
        .find(|p| p.port == announced)
        .expect("the master is reached through its proxy");

    let fault = Instant::now();
    proxy.silence_open_connections();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let samples = steady.finish().await;
    let report = report(&samples, fault);
    report.check("half-open connections to one cluster master");
    assert!(report.failed > 0, "the fault was never felt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_3_ms_away_is_ready_within_a_second_and_fails_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = common::cluster::RedisCluster::start_behind_proxies();
    for proxy in &cluster.proxies {
        proxy.set_delay(Duration::from_millis(3));
    }
    let started = Instant::now();
    // A deadline well above the 6 ms round trip: what fails here is a
    // cluster never made ready, or calls that wait on reconnects or slot
    // refreshes, not a call that a machine loaded by parallel tests stalled
    // past 15 ms (seen).
    let server = serve(cluster_store(&cluster, Duration::from_millis(50))).await;
    let ready_after = until_ready(&server, started).await;
    let steady = Steady::start(server.client().await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let samples = steady.finish().await;
    let failed = samples.iter().filter(|s| !s.ok).count();
    println!(
        "redis cluster 3 ms away: ready {ready_after:?} after start; {failed} of {} calls failed",
        samples.len()
    );
    assert!(ready_after < TARGET + MARGIN, "ready after {ready_after:?}");
    assert_eq!(failed, 0, "calls failed at a steady rate");
}

/// A Redis 300 ms away (one way) with deadlines that allow for it: every
/// bound on a call is ratekeeper's own (`--store-timeout`,
/// `--redis-connect-timeout`, the stall bound), none hidden below them, so
/// the store connects and decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_far_away_is_served_within_the_deadlines_given() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(([127, 0, 0, 1], redis.port).into());
    proxy.set_delay(Duration::from_millis(300));
    let store = RedisStore::new(&RedisSettings {
        timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(20),
        ..RedisSettings::new(proxy.url())
    })
    .unwrap();
    let hit = ratekeeper::algorithm::BatchHit {
        key: b"far",
        algorithm: ratekeeper::algorithm::AlgorithmKind::FixedWindow,
        quota: ratekeeper::algorithm::Quota {
            limit: 10,
            window_ms: 3_600_000,
            burst: 10,
        },
        hits: 1,
        enforced: true,
    };
    let outcome = store
        .apply(&[hit], ratekeeper::algorithm::Mode::Independent)
        .await
        .expect("a decision from a Redis 600 ms round trip away");
    assert!(outcome[0].allowed);
    assert!(store.ping().await.is_ok());
}
