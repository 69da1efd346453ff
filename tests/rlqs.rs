//! RLQS end to end: ratekeeper instances over real gRPC (and a real Redis
//! for the shared registry), driven by simulated Envoys that behave as
//! Envoy's `rate_limit_quota` client does (`rlqs/sim.rs`). The report tick
//! is shortened from Envoy's 5 s to keep the tests short; everything is
//! timed by it.

mod common;
#[path = "rlqs/sim.rs"]
mod sim;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{RedisServer, TestServer, http_get};
use ratekeeper::Server;
use ratekeeper::clock::SystemClock;
use ratekeeper::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::BucketAction as Action;
use ratekeeper::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
use ratekeeper::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use ratekeeper::proto::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaUsageReports,
};
use ratekeeper::rlqs::{RedisRegistry, Registry, RlqsSettings};
use ratekeeper::store::MemoryStore;
use sim::{Bucket, Enforced, SimEnvoy, bucket};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The simulated Envoys' report tick (Envoy's is 5 s).
const TICK: Duration = Duration::from_millis(500);

fn settings() -> RlqsSettings {
    RlqsSettings {
        report_period: TICK,
        reallocate_every: Duration::from_millis(100),
        ..RlqsSettings::default()
    }
}

fn rules_yaml(limit: u32, burst: u32) -> String {
    format!(
        r#"
domain: mesh
rlqs:
  - name: api
    bucket: [{{key: service, value: api}}]
    requests_per_unit: {limit}
    unit: second
    burst: {burst}
    assignment_ttl_seconds: 2
  - name: per-user
    bucket: [{{key: user}}]
    requests_per_unit: 10
    unit: second
    assignment_ttl_seconds: 2
"#
    )
}

fn load(yaml: &str) -> ratekeeper::rules::Rules {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, yaml).unwrap();
    ratekeeper::config::load_rules(&path).unwrap()
}

struct Instance {
    server: TestServer,
}

impl Instance {
    async fn start(
        yaml: &str,
        settings: RlqsSettings,
        registry: Option<Arc<dyn Registry>>,
    ) -> Self {
        let store = Arc::new(MemoryStore::new(1_000, Arc::new(SystemClock)));
        let server = Server::new(load(yaml), store).with_rlqs(settings, registry);
        Instance {
            server: TestServer::start(server).await,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }
}

fn redis_registry(redis: &RedisServer) -> Option<Arc<dyn Registry>> {
    Some(Arc::new(
        RedisRegistry::new(&redis.url(), Duration::from_secs(2)).unwrap(),
    ))
}

/// Waits (bounded) until `check` holds; panics with `what` otherwise.
async fn eventually(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn api() -> Bucket {
    bucket(&[("service", "api")])
}

fn total_share(sims: &[SimEnvoy], b: &Bucket) -> f64 {
    sims.iter().filter_map(|s| s.share(b)).sum()
}

/// Requests the Envoys let through while an assignment was in force (or
/// after one expired): what the server's shares govern.
fn admitted_under_assignment(sims: &[SimEnvoy]) -> u64 {
    sims.iter()
        .map(|s| {
            let st = s.stats();
            st.admitted_assigned + st.decided_expired
        })
        .sum()
}

fn admitted(sims: &[SimEnvoy]) -> u64 {
    sims.iter()
        .map(|s| {
            let st = s.stats();
            st.admitted_assigned + st.admitted_unassigned + st.decided_expired
        })
        .sum()
}

#[tokio::test]
async fn an_envoy_gets_a_whole_second_token_bucket_and_idle_buckets_are_abandoned() {
    let settings = RlqsSettings {
        abandon_after_idle_reports: 3,
        ..settings()
    };
    let instance = Instance::start(&rules_yaml(100, 100), settings, None).await;
    let envoy = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    envoy.set_demand(&api(), 20.0);
    eventually("an assignment", Duration::from_secs(10), || {
        matches!(envoy.enforced(&api()), Some(Enforced::Tokens { .. }))
    })
    .await;
    // Alone on the bucket: the whole limit, whole-second fill interval.
    let Some(Enforced::Tokens {
        max_tokens,
        tokens_per_fill,
        fill_seconds,
        fill_nanos,
    }) = envoy.enforced(&api())
    else {
        unreachable!()
    };
    assert_eq!((fill_seconds, fill_nanos), (1, 0));
    // The first TTL is a learning period: at most an equal part of those
    // seen (here all of it).
    assert_eq!(tokens_per_fill, 100);
    assert_eq!(max_tokens, 100);
    // A bucket no rule limits is allowed explicitly.
    let other = bucket(&[("service", "other")]);
    envoy.set_demand(&other, 5.0);
    eventually(
        "allow-all for an unlimited bucket",
        Duration::from_secs(10),
        || envoy.enforced(&other) == Some(Enforced::Allow),
    )
    .await;
    // Idle for 3 reports: abandoned, and forgotten by the Envoy.
    envoy.set_demand(&other, 0.0);
    eventually("the idle bucket abandoned", Duration::from_secs(10), || {
        envoy.enforced(&other).is_none()
    })
    .await;
    assert!(envoy.stats().abandoned >= 1);
    assert!(envoy.enforced(&api()).is_some(), "the busy bucket stays");
    // No assignment ever expired: TTLs were extended in time.
    assert_eq!(envoy.stats().decided_expired, 0);
    envoy.stop();
}

#[tokio::test]
async fn shares_move_to_where_demand_is_within_a_few_report_periods() {
    let instance = Instance::start(&rules_yaml(100, 100), settings(), None).await;
    let a = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    let b = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    a.set_demand(&api(), 150.0);
    b.set_demand(&api(), 10.0);
    eventually("shares follow demand (a busy, b light)", Duration::from_secs(15), || {
        matches!((a.share(&api()), b.share(&api())), (Some(x), Some(y)) if x >= 80.0 && (10.0..=20.0).contains(&y))
    })
    .await;
    // Demand swaps: within a few periods the shares do too.
    let swapped = tokio::time::Instant::now();
    a.set_demand(&api(), 10.0);
    b.set_demand(&api(), 150.0);
    eventually("shares follow the swap", Duration::from_secs(15), || {
        matches!((a.share(&api()), b.share(&api())), (Some(x), Some(y)) if y >= 80.0 && x <= 20.0)
    })
    .await;
    let periods = swapped.elapsed().as_secs_f64() / TICK.as_secs_f64();
    println!("shares moved to demand in {periods:.1} report periods");
    assert!(periods <= 8.0, "took {periods} periods");
    assert!(total_share(&[a.clone(), b.clone()], &api()) <= 100.0);
    assert_eq!(a.stats().decided_expired + b.stats().decided_expired, 0);
}

#[tokio::test]
async fn envoys_joining_and_leaving_resize_everyones_share() {
    let instance = Instance::start(&rules_yaml(90, 90), settings(), None).await;
    let first = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    let second = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    for envoy in [&first, &second] {
        envoy.set_demand(&api(), 100.0);
    }
    eventually("two halves", Duration::from_secs(15), || {
        first.share(&api()) == Some(45.0) && second.share(&api()) == Some(45.0)
    })
    .await;
    let third = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    third.set_demand(&api(), 100.0);
    let sims = [first.clone(), second.clone(), third.clone()];
    eventually("three thirds", Duration::from_secs(15), || {
        sims.iter().all(|s| s.share(&api()) == Some(30.0))
    })
    .await;
    // One leaves (its stream closes): the others grow back.
    third.stop();
    eventually("two halves again", Duration::from_secs(15), || {
        first.share(&api()) == Some(45.0) && second.share(&api()) == Some(45.0)
    })
    .await;
    // The debug endpoint shows the bucket.
    let debug = http_get(instance.server.admin_addr, "/debug/rlqs").await;
    assert!(debug.contains("\"rule\":\"api\""), "{debug}");
    assert!(debug.contains("\"subscribers\":2"), "{debug}");
    let metrics = http_get(instance.server.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("ratekeeper_rlqs_limit_per_second{domain=\"mesh\",rule=\"api\"} 90"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ratekeeper_rlqs_assigned_per_second{domain=\"mesh\",rule=\"api\"} 90"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_reload_re_pushes_assignments_without_waiting_for_reports() {
    // A long report period: anything that arrives sooner was pushed.
    let settings = RlqsSettings {
        report_period: Duration::from_secs(30),
        ..settings()
    };
    // The rules file is watched as `serve` watches it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, rules_yaml(100, 100)).unwrap();
    let store = Arc::new(MemoryStore::new(1_000, Arc::new(SystemClock)));
    let server = Server::new(ratekeeper::config::load_rules(&path).unwrap(), store)
        .with_rlqs(settings, None)
        .with_reload(ratekeeper::reload::ReloadSettings {
            path: path.clone(),
            interval: Duration::from_millis(100),
            loaded: Some(ratekeeper::config::read_snapshot(&path).unwrap()),
            domain_files: Default::default(),
            dot_files: Default::default(),
        });
    let server = TestServer::start(server).await;
    let envoy = SimEnvoy::start("mesh", vec![server.addr], Duration::from_secs(30));
    envoy.set_demand(&api(), 5.0);
    eventually("the first assignment", Duration::from_secs(10), || {
        envoy.share(&api()) == Some(100.0)
    })
    .await;
    std::fs::write(&path, rules_yaml(40, 40)).unwrap();
    eventually("the new limit pushed", Duration::from_secs(5), || {
        envoy.share(&api()) == Some(40.0)
    })
    .await;
    // A broken rlqs section is refused; the last good limit stays.
    std::fs::write(
        &path,
        rules_yaml(40, 40).replace("unit: second", "unit: fortnight"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = http_get(server.admin_addr, "/readyz").await;
    assert!(
        ready.contains("rlqs[0].unit: invalid unit 'fortnight'"),
        "{ready}"
    );
    assert_eq!(envoy.share(&api()), Some(40.0));
}

#[test]
fn a_bad_rlqs_section_is_refused_with_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, rules_yaml(0, 10)).unwrap();
    let error = ratekeeper::config::load_rules(&path)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("rules.yaml: rlqs[0].requests_per_unit: must be at least 1"),
        "{error}"
    );
}

#[tokio::test]
async fn per_value_buckets_each_get_the_whole_limit() {
    let instance = Instance::start(&rules_yaml(100, 100), settings(), None).await;
    let envoy = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    let (alice, bob) = (bucket(&[("user", "alice")]), bucket(&[("user", "bob")]));
    envoy.set_demand(&alice, 5.0);
    envoy.set_demand(&bob, 5.0);
    eventually("a limit per user", Duration::from_secs(10), || {
        envoy.share(&alice) == Some(10.0) && envoy.share(&bob) == Some(10.0)
    })
    .await;
}

#[tokio::test]
async fn bucket_caps_and_bad_ids_are_refused_with_abandon_and_counted() {
    let settings = RlqsSettings {
        max_buckets_per_stream: 2,
        max_buckets_per_domain: 3,
        ..settings()
    };
    let instance = Instance::start(&rules_yaml(100, 100), settings, None).await;
    let envoy = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    let users: Vec<Bucket> = (0..3)
        .map(|i| bucket(&[("user", &format!("u{i}"))]))
        .collect();
    for user in &users {
        envoy.set_demand(user, 5.0);
    }
    // Two are served; the third is abandoned on each try (the Envoy
    // re-creates it on its next request, and it is refused again).
    let served = |envoy: &SimEnvoy, users: &[Bucket]| {
        users
            .iter()
            .filter(|u| envoy.share(u) == Some(10.0))
            .count()
    };
    eventually("two served, one refused", Duration::from_secs(10), || {
        served(&envoy, &users) == 2 && envoy.stats().abandoned >= 1
    })
    .await;
    tokio::time::sleep(TICK * 2).await;
    assert_eq!(served(&envoy, &users), 2, "the cap holds");
    // Another stream fills the domain cap of 3 distinct buckets.
    let other = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    let (x, y) = (bucket(&[("user", "x")]), bucket(&[("user", "y")]));
    other.set_demand(&x, 5.0);
    other.set_demand(&y, 5.0);
    eventually(
        "the domain cap refuses the fourth bucket",
        Duration::from_secs(10),
        || {
            [other.share(&x), other.share(&y)]
                .iter()
                .filter(|s| **s == Some(10.0))
                .count()
                == 1
                && other.stats().abandoned >= 1
        },
    )
    .await;
    let metrics = http_get(instance.server.admin_addr, "/metrics").await;
    assert!(
        metrics.contains(
            "ratekeeper_rlqs_refused_buckets_total{domain=\"mesh\",reason=\"stream_cap\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "ratekeeper_rlqs_refused_buckets_total{domain=\"mesh\",reason=\"domain_cap\"}"
        ),
        "{metrics}"
    );

    // Raw streams for malformed reports.
    let channel = instance.server.channel().await;
    let mut client = RateLimitQuotaServiceClient::new(channel);
    let usage = |entries: &[(&str, &str)]| BucketQuotaUsage {
        bucket_id: Some(BucketId {
            bucket: entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }),
        time_elapsed: None,
        num_requests_allowed: 1,
        num_requests_denied: 0,
    };
    // An empty value: that bucket is abandoned; the stream goes on.
    let (tx, rx) = mpsc::channel(4);
    let mut responses = client
        .stream_rate_limit_quotas(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(RateLimitQuotaUsageReports {
        domain: "mesh".into(),
        bucket_quota_usages: vec![usage(&[("service", "")])],
    })
    .await
    .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        response.bucket_action[0].bucket_action,
        Some(Action::AbandonAction(_))
    ));
    // The same stream changes its domain: refused, stream ended.
    tx.send(RateLimitQuotaUsageReports {
        domain: "other".into(),
        bucket_quota_usages: vec![usage(&[("service", "api")])],
    })
    .await
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("bound to domain 'mesh'"),
        "{}",
        status.message()
    );
    // A first message without a domain: refused.
    let (tx, rx) = mpsc::channel(4);
    let mut responses = client
        .stream_rate_limit_quotas(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(RateLimitQuotaUsageReports {
        domain: String::new(),
        bucket_quota_usages: vec![usage(&[("service", "api")])],
    })
    .await
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("domain"), "{}", status.message());
}

/// The expected max-min fair shares of `limit` for `demands`.
fn fair(limit: f64, demands: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| demands[a].total_cmp(&demands[b]));
    let mut shares = vec![0.0; demands.len()];
    let mut left = limit;
    for (done, &i) in order.iter().enumerate() {
        shares[i] = demands[i].min(left / (demands.len() - done) as f64);
        left -= shares[i];
    }
    shares
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_envoys_on_two_instances_share_one_limit_over_60_seconds() {
    const LIMIT: f64 = 200.0;
    const BURST: f64 = 200.0;
    // RLQS_BENCH_TICK_MS=5000 runs it at Envoy's real report period (with a
    // 15 s TTL and the server's 1 s re-read), for BENCHMARKS.md.
    let tick = std::env::var("RLQS_BENCH_TICK_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(TICK, Duration::from_millis);
    let settings = if tick == TICK {
        settings()
    } else {
        RlqsSettings {
            report_period: tick,
            ..RlqsSettings::default()
        }
    };
    let ttl = (3 * tick.as_secs()).max(2);
    let redis = RedisServer::start();
    let yaml = rules_yaml(LIMIT as u32, BURST as u32).replace(
        "assignment_ttl_seconds: 2",
        &format!("assignment_ttl_seconds: {ttl}"),
    );
    let one = Instance::start(&yaml, settings, redis_registry(&redis)).await;
    let two = Instance::start(&yaml, settings, redis_registry(&redis)).await;
    // Skewed: three light, three medium, four that want more than a fair part.
    let demands = [5.0, 5.0, 10.0, 10.0, 20.0, 20.0, 40.0, 80.0, 150.0, 300.0];
    let started = tokio::time::Instant::now();
    let sims: Vec<SimEnvoy> = demands
        .iter()
        .enumerate()
        .map(|(i, demand)| {
            let target = if i % 2 == 0 { one.addr() } else { two.addr() };
            let sim = SimEnvoy::start("mesh", vec![target], tick);
            sim.set_demand(&api(), *demand);
            sim
        })
        .collect();
    let run = Duration::from_secs(60);
    let mut max_total_share: f64 = 0.0;
    let mut window_start = None;
    while started.elapsed() < run {
        tokio::time::sleep(Duration::from_millis(100)).await;
        max_total_share = max_total_share.max(total_share(&sims, &api()));
        if window_start.is_none() && started.elapsed() >= Duration::from_secs(10).max(tick * 4) {
            window_start = Some((tokio::time::Instant::now(), admitted(&sims)));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = admitted(&sims) as f64;
    let unassigned: u64 = sims.iter().map(|s| s.stats().admitted_unassigned).sum();
    let expired: u64 = sims.iter().map(|s| s.stats().decided_expired).sum();
    let (window_at, window_count) = window_start.unwrap();
    let steady = (admitted(&sims) - window_count) as f64 / window_at.elapsed().as_secs_f64();
    let shares: Vec<f64> = sims
        .iter()
        .map(|s| s.share(&api()).unwrap_or(-1.0))
        .collect();
    let debug = http_get(one.server.admin_addr, "/debug/rlqs").await;
    println!(
        "RLQS 60 s run, report tick {tick:?}: limit {LIMIT}/s, burst {BURST}, 10 Envoys on 2 instances; admitted {total} in {elapsed:.1} s = {:.1}/s overall; steady (from max(10 s, 4 ticks)) {steady:.1}/s; before first assignment {unassigned}; after expiry {expired}; max sum of shares {max_total_share:.1}/s; final shares {shares:?} (fair {:?})",
        total / elapsed,
        fair(LIMIT, &demands)
    );
    println!("debug: {debug}");
    // The documented bound: L·T + the buckets' capacity (Σ max_tokens ≤
    // burst + one token each) + what Envoys admitted before their first
    // assignment (their no_assignment behaviour, outside the server's
    // control).
    let bound = LIMIT * elapsed + BURST + sims.len() as f64 + unassigned as f64;
    assert!(total <= bound, "admitted {total} > bound {bound}");
    assert!(
        steady <= LIMIT * 1.02,
        "steady rate {steady} over the limit"
    );
    assert!(
        steady >= LIMIT * 0.85,
        "steady rate {steady}: the limit is not used"
    );
    assert!(
        max_total_share <= LIMIT,
        "shares summed to {max_total_share}"
    );
    assert_eq!(expired, 0, "an assignment expired");
    // Light Envoys get their demand; heavy ones share the rest.
    for (share, want) in shares.iter().zip(fair(LIMIT, &demands)) {
        assert!(*share >= want * 0.7, "shares {shares:?}");
    }
    assert!(debug.contains("\"subscribers\":10"), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_restart_leaves_no_gap_in_enforcement() {
    let redis = RedisServer::start();
    let yaml = rules_yaml(100, 100);
    let one = Instance::start(&yaml, settings(), redis_registry(&redis)).await;
    let two = Instance::start(&yaml, settings(), redis_registry(&redis)).await;
    // Envoys load-balance over both instances; each fails over to the other.
    let sims: Vec<SimEnvoy> = (0..4)
        .map(|i| {
            let targets = if i % 2 == 0 {
                vec![one.addr(), two.addr()]
            } else {
                vec![two.addr(), one.addr()]
            };
            let sim = SimEnvoy::start_with_id("mesh", targets, TICK, &format!("envoy-{i}"));
            sim.set_demand(&api(), 100.0);
            sim
        })
        .collect();
    eventually(
        "four quarters across two instances",
        Duration::from_secs(20),
        || sims.iter().all(|s| s.share(&api()) == Some(25.0)),
    )
    .await;
    // Instance one goes away (a rolling update): its streams end, their
    // Envoys keep enforcing until TTL and reconnect on their next tick.
    let before = admitted_under_assignment(&sims);
    let stopped_at = tokio::time::Instant::now();
    one.server.stop().await;
    eventually(
        "everyone re-subscribed on instance two",
        Duration::from_secs(20),
        || {
            sims.iter()
                .step_by(2)
                .all(|s| s.stats().streams_opened >= 2)
        },
    )
    .await;
    // A replacement instance joins and takes a new Envoy.
    let three = Instance::start(&yaml, settings(), redis_registry(&redis)).await;
    let newcomer = SimEnvoy::start_with_id("mesh", vec![three.addr()], TICK, "envoy-new");
    newcomer.set_demand(&api(), 100.0);
    let mut all = sims.clone();
    all.push(newcomer.clone());
    eventually(
        "five fifths across instances two and three",
        Duration::from_secs(20),
        || all.iter().all(|s| s.share(&api()) == Some(20.0)),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seconds = stopped_at.elapsed().as_secs_f64();
    let rate = (admitted_under_assignment(&all) - before) as f64 / seconds;
    let expired: u64 = all.iter().map(|s| s.stats().decided_expired).sum();
    let unassigned = newcomer.stats().admitted_unassigned;
    println!(
        "restart: {seconds:.1} s from the stop, {rate:.1}/s admitted under assignments (limit 100), {unassigned} by the newcomer before its first assignment, requests decided without an assignment in force after having one: {expired}"
    );
    assert_eq!(expired, 0, "a gap in enforcement");
    // Within the limit, plus the buckets' capacity (burst 100 + a token each).
    assert!(rate <= 100.0 + 105.0 / seconds, "rate {rate}");
    drop(two);
}

#[tokio::test]
async fn after_the_registry_is_lost_a_learning_period_caps_shares_at_an_equal_part() {
    let redis = RedisServer::start();
    let instance = Instance::start(&rules_yaml(100, 100), settings(), redis_registry(&redis)).await;
    let (a, b) = (
        SimEnvoy::start("mesh", vec![instance.addr()], TICK),
        SimEnvoy::start("mesh", vec![instance.addr()], TICK),
    );
    a.set_demand(&api(), 150.0);
    b.set_demand(&api(), 10.0);
    eventually("a takes most of the limit", Duration::from_secs(20), || {
        a.share(&api()).is_some_and(|s| s >= 80.0)
    })
    .await;
    // State loss: the registry is gone (a flushed or failed-over Redis).
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut redis.connection())
        .unwrap();
    let mut debug = String::new();
    for _ in 0..100 {
        debug = http_get(instance.server.admin_addr, "/debug/rlqs").await;
        if debug.contains("\"learning\":true") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(debug.contains("\"learning\":true"), "{debug}");
    // While learning, nobody gets more than an equal part...
    eventually("a capped at half", Duration::from_secs(10), || {
        a.share(&api()) == Some(50.0)
    })
    .await;
    assert!(total_share(&[a.clone(), b.clone()], &api()) <= 100.0);
    // ...and after one TTL the shares follow demand again.
    eventually(
        "a back to most of the limit",
        Duration::from_secs(20),
        || a.share(&api()).is_some_and(|s| s >= 80.0),
    )
    .await;
    assert_eq!(a.stats().decided_expired + b.stats().decided_expired, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_shares_rlqs_limits_through_redis_and_refuses_bad_flags() {
    use common::process::{BIN, Serve};
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rules.yaml");
    std::fs::write(&config, rules_yaml(100, 100)).unwrap();
    let config = config.to_str().unwrap();
    let url = redis.url();
    let flags = [
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--rlqs-report-period",
        "500ms",
    ];
    let mut one = Serve::start(config, &flags);
    let mut two = Serve::start(config, &flags);
    one.client().await;
    two.client().await;
    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let a = SimEnvoy::start("mesh", vec![addr(one.grpc_port)], TICK);
    let b = SimEnvoy::start("mesh", vec![addr(two.grpc_port)], TICK);
    a.set_demand(&api(), 100.0);
    b.set_demand(&api(), 100.0);
    // Two processes, one limit: half each.
    eventually(
        "halves across two processes",
        Duration::from_secs(20),
        || a.share(&api()) == Some(50.0) && b.share(&api()) == Some(50.0),
    )
    .await;

    for (flag, value) in [
        ("--rlqs-max-buckets-per-stream", "0"),
        ("--rlqs-report-period", "0s"),
        ("--rlqs-abandon-after-idle-reports", "0"),
    ] {
        let out = std::process::Command::new(BIN)
            .args(["serve", "--config", config, flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }

    // check-config lists RLQS rules and refuses a bad one.
    let out = std::process::Command::new(BIN)
        .args(["check-config", config])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("rlqs mesh: api: 100 per second shared by all Envoys (burst 100, TTL 2 s)"),
        "{stdout}"
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        rules_yaml(100, 100).replace("assignment_ttl_seconds: 2", "assignment_ttl_seconds: 0"),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rlqs[0].assignment_ttl_seconds: must be 1 to 3600 whole seconds, not 0"),
        "{stderr}"
    );
}

/// Checks that nothing answers a PING on `port`: the paused server is the
/// one the test talks to (ports are unique within this test process only;
/// a server of another process on the same port would make the test
/// meaningless, and this says so).
fn assert_silent(port: u16) {
    use std::io::{Read, Write};
    let Ok(mut socket) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let _ = socket.write_all(b"PING\r\n");
    let mut reply = [0u8; 16];
    if let Ok(n) = socket.read(&mut reply) {
        assert!(
            n == 0,
            "port {port} still answers after the pause: another process's server owns it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_keeps_the_assignments_in_force_until_it_answers_again() {
    let redis = RedisServer::start();
    // The registry's deadline must sit well inside TTL − report period.
    let registry: Option<Arc<dyn Registry>> = Some(Arc::new(
        RedisRegistry::new(&redis.url(), Duration::from_millis(200)).unwrap(),
    ));
    let instance = Instance::start(&rules_yaml(100, 100), settings(), registry).await;
    let a = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    a.set_demand(&api(), 100.0);
    eventually("a alone has the limit", Duration::from_secs(10), || {
        a.share(&api()) == Some(100.0)
    })
    .await;
    // Redis stops answering (connections stay open) for longer than the
    // 2 s TTL: the stream keeps extending what is in force.
    redis.pause();
    assert_silent(redis.port);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(a.share(&api()), Some(100.0));
    assert_eq!(a.stats().decided_expired, 0, "an assignment expired");
    // A newcomer meanwhile gets nothing (its Envoy runs its fallback).
    let b = SimEnvoy::start("mesh", vec![instance.addr()], TICK);
    b.set_demand(&api(), 100.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    if b.share(&api()).is_some() {
        let debug = http_get(instance.server.admin_addr, "/debug/rlqs").await;
        panic!(
            "the newcomer was assigned {:?} while Redis was paused; a: {:?}; {debug}",
            b.share(&api()),
            a.share(&api())
        );
    }
    // Redis answers again: the limit is divided once more.
    redis.resume();
    eventually("halves after recovery", Duration::from_secs(20), || {
        a.share(&api()) == Some(50.0) && b.share(&api()) == Some(50.0)
    })
    .await;
    assert_eq!(a.stats().decided_expired + b.stats().decided_expired, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_registry_speaks_tls_with_a_private_ca_and_client_certificates() {
    use common::pki::pki;
    use ratekeeper::rlqs::registry::{Report, Timing};
    use ratekeeper::store::redis::RedisTls;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &pki.ca).unwrap();
    std::fs::write(dir.path().join("server.crt"), &pki.server.cert).unwrap();
    std::fs::write(dir.path().join("server.key"), &pki.server.key).unwrap();
    let redis = RedisServer::start_tls(dir.path(), &[]);
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let tls = RedisTls {
        ca_pem: Some(pki.ca.clone().into_bytes()),
        client_pem: Some((
            pki.client.cert.clone().into_bytes(),
            pki.client.key.clone().into_bytes(),
        )),
    };
    let report = [Report {
        bucket: "7:service3:api".into(),
        demand: Some(5.0),
        allowed_rate: 5.0,
        held: Some(10.0),
    }];
    let timing = Timing {
        stale_ms: 10_000,
        learning_ms: 0,
    };
    let registry = RedisRegistry::with_tls(&url, Duration::from_secs(2), Some(&tls)).unwrap();
    let exchange = registry
        .exchange("mesh", "m1", &report, timing)
        .await
        .unwrap();
    assert_eq!(exchange.members[0].len(), 1);
    assert_eq!(exchange.members[0][0].held, 10.0);
    // Without the private CA the server is not trusted.
    let untrusted = RedisRegistry::with_tls(&url, Duration::from_secs(2), None).unwrap();
    assert!(
        untrusted
            .exchange("mesh", "m1", &report, timing)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_from_many_instances_never_hand_out_the_same_room() {
    use ratekeeper::rlqs::registry::{Claim, Report, Timing};
    let redis = RedisServer::start();
    let timing = Timing {
        stale_ms: 10_000,
        learning_ms: 0,
    };
    // 20 members on 4 "instances" (registry handles) all claim the whole pool at once.
    let registries: Vec<Arc<RedisRegistry>> = (0..4)
        .map(|_| Arc::new(RedisRegistry::new(&redis.url(), Duration::from_secs(2)).unwrap()))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let registry = registries[i % 4].clone();
        tasks.push(tokio::spawn(async move {
            let member = format!("m{i}");
            let report = [Report {
                bucket: "b".into(),
                demand: None,
                allowed_rate: 0.0,
                held: Some(0.0),
            }];
            registry
                .exchange("mesh", &member, &report, timing)
                .await
                .unwrap();
            let claim = Claim {
                bucket: "b".into(),
                wanted: 100,
                pool: 100,
                fill_seconds: 1,
            };
            registry
                .hold("mesh", &member, &[claim], timing)
                .await
                .unwrap()[0]
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, 100, "every token granted once");
}

#[tokio::test]
async fn health_and_reflection_know_the_rlqs_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let instance = Instance::start(&rules_yaml(100, 100), settings(), None).await;
    let mut health = HealthClient::new(instance.server.channel().await);
    let response = health
        .check(HealthCheckRequest {
            service: "envoy.service.rate_limit_quota.v3.RateLimitQuotaService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status(), ServingStatus::Serving);

    // Reflection lists it, so grpcurl needs no proto files.
    use futures::StreamExt;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(instance.server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let response = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "envoy.service.rate_limit_quota.v3.RateLimitQuotaService"),
        "{list:?}"
    );
}
