//! Concurrency leases end to end: the `Leases` API and Envoy's negative hits
//! over real gRPC, on the memory store (time injected) and on a real
//! `redis-server` shared by several instances (Redis's own clock, short TTLs
//! and bounded waits), plus the Lua script against its Rust twin.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    Backend, RedisServer, T0, TestServer, TestStore, envoy_descriptor, http_get, redis_store, rules,
};
use ratekeeper::Server;
use ratekeeper::clock::ManualClock;
use ratekeeper::failure_policy::FailurePolicy;
use ratekeeper::lease::redis::{decode, encode, script};
use ratekeeper::lease::table::{self, KeyState, Op};
use ratekeeper::lease::{ConcurrencyLimit, LeaseKey};
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code as EnvoyCode;
use ratekeeper::proto::ratekeeper::v1::leases_client::LeasesClient;
use ratekeeper::proto::ratekeeper::v1::{
    AcquireRequest, AcquireResponse, Descriptor, Entry, ReleaseRequest, ReleaseStatus, RenewRequest,
};
use ratekeeper::store::CounterStore;
use tonic::Code;
use tonic::transport::Channel;

const RULES: &str = "
domain: jobs
descriptors:
  - key: tenant
    concurrency: 2
    lease_ttl: 10s
    max_lease_ttl: 60s
  - key: global
    concurrency: 3
    lease_ttl: 10s
    max_lease_ttl: 60s
  - key: per_second
    rate_limit:
      unit: second
      requests_per_unit: 100
";

fn descriptor(key: &str, value: &str) -> Descriptor {
    Descriptor {
        entries: vec![Entry {
            key: key.to_owned(),
            value: value.to_owned(),
        }],
    }
}

fn acquire(tenant: &str, lease_id: &str) -> AcquireRequest {
    AcquireRequest {
        domain: "jobs".to_owned(),
        descriptors: vec![descriptor("tenant", tenant)],
        lease_id: lease_id.to_owned(),
        ..Default::default()
    }
}

fn release(tenant: &str, lease_id: &str) -> ReleaseRequest {
    ReleaseRequest {
        domain: "jobs".to_owned(),
        descriptors: vec![descriptor("tenant", tenant)],
        lease_id: lease_id.to_owned(),
    }
}

fn renew(tenant: &str, lease_id: &str) -> RenewRequest {
    RenewRequest {
        domain: "jobs".to_owned(),
        descriptors: vec![descriptor("tenant", tenant)],
        lease_id: lease_id.to_owned(),
        ttl: None,
    }
}

async fn leases(server: &TestServer) -> LeasesClient<Channel> {
    LeasesClient::new(server.channel().await)
}

async fn try_acquire(
    client: &mut LeasesClient<Channel>,
    request: AcquireRequest,
) -> AcquireResponse {
    client.acquire(request).await.unwrap().into_inner()
}

/// A server over RULES on `backend`; memory runs on the returned clock,
/// Redis on its own.
async fn start(backend: Backend) -> (TestServer, Arc<ManualClock>, TestStore) {
    let clock = Arc::new(ManualClock::new(T0));
    let store = match backend {
        Backend::Memory => TestStore::new(Backend::Memory, clock.clone()),
        Backend::Redis => {
            let redis = RedisServer::start();
            let store: Arc<dyn CounterStore> =
                Arc::new(redis_store(&redis.url(), Duration::from_secs(2)));
            TestStore {
                store,
                redis: Some(redis),
            }
        }
    };
    let server = TestServer::with(rules(&[RULES]), store.store.clone()).await;
    (server, clock, store)
}

// ------------------------------------------------------------ exclusion ---

/// 64 callers across three instances sharing one Redis: never more than the
/// limit held at once, checked at every grant with a shared counter of held
/// leases (decremented before the release is sent, so it never overcounts).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_across_three_instances_never_exceed_the_limit() {
    let redis = RedisServer::start();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let store: Arc<dyn CounterStore> =
            Arc::new(redis_store(&redis.url(), Duration::from_secs(5)));
        servers.push(TestServer::with(rules(&[RULES]), store).await);
    }
    let limit = 2;
    let held = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for caller in 0..64 {
        let mut client = leases(&servers[caller % 3]).await;
        let held = held.clone();
        let granted = granted.clone();
        callers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut rounds = 0;
            while rounds < 3 {
                assert!(Instant::now() < deadline, "caller {caller} starved");
                let id = format!("caller-{caller}-{rounds}");
                let answer = try_acquire(&mut client, acquire("acme", &id)).await;
                if !answer.granted {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                let now_held = held.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(now_held <= limit, "{now_held} leases held, limit {limit}");
                granted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                held.fetch_sub(1, Ordering::SeqCst);
                let released = client.release(release("acme", &id)).await.unwrap();
                assert_eq!(released.into_inner().status(), ReleaseStatus::Released);
                rounds += 1;
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    assert_eq!(granted.load(Ordering::SeqCst), 64 * 3);
    // Everything was given back: the full limit is free again.
    let mut client = leases(&servers[0]).await;
    for i in 0..limit {
        assert!(
            try_acquire(&mut client, acquire("acme", &format!("after-{i}")))
                .await
                .granted
        );
    }
}

/// The same exclusion on one memory-store instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_on_the_memory_store_never_exceed_the_limit() {
    let (server, _clock, _store) = start(Backend::Memory).await;
    let held = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for caller in 0..64 {
        let mut client = leases(&server).await;
        let held = held.clone();
        callers.push(tokio::spawn(async move {
            let mut granted = 0;
            for attempt in 0..10_000 {
                if granted == 2 {
                    return;
                }
                let id = format!("c{caller}-{attempt}");
                if !try_acquire(&mut client, acquire("acme", &id)).await.granted {
                    tokio::task::yield_now().await;
                    continue;
                }
                assert!(held.fetch_add(1, Ordering::SeqCst) < 2, "over the limit");
                tokio::task::yield_now().await;
                held.fetch_sub(1, Ordering::SeqCst);
                client.release(release("acme", &id)).await.unwrap();
                granted += 1;
            }
            panic!("caller {caller} starved");
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
}

// ----------------------------------------------------------- lifecycle ---

/// A holder that never releases (killed) frees its permits when its lease
/// expires: memory with the clock moved by hand.
#[tokio::test]
async fn a_killed_holders_permits_return_after_its_ttl_in_memory() {
    let (server, clock, _store) = start(Backend::Memory).await;
    let mut client = leases(&server).await;
    assert!(
        try_acquire(&mut client, acquire("acme", "dead-1"))
            .await
            .granted
    );
    assert!(
        try_acquire(&mut client, acquire("acme", "dead-2"))
            .await
            .granted
    );
    let refused = try_acquire(&mut client, acquire("acme", "live")).await;
    assert!(!refused.granted);
    assert_eq!((refused.limit, refused.in_use), (2, 2));
    assert_eq!(refused.retry_after.unwrap().seconds, 10);
    clock.advance(9_999);
    assert!(
        !try_acquire(&mut client, acquire("acme", "live"))
            .await
            .granted
    );
    clock.advance(1);
    let granted = try_acquire(&mut client, acquire("acme", "live")).await;
    assert!(granted.granted);
    assert_eq!(granted.in_use, 1);
    let metrics = http_get(server.admin_addr, "/metrics").await;
    for line in [
        "ratelimit_lease_expired_total{domain=\"jobs\"} 2",
        "ratelimit_lease_granted_total{surface=\"leases\",domain=\"jobs\"} 3",
        "ratelimit_lease_denied_total{surface=\"leases\",domain=\"jobs\"} 2",
        "ratelimit_lease_in_use{domain=\"jobs\",rule=\"jobs.tenant\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

/// The same on Redis, whose clock cannot be moved: a 300 ms lease and a
/// bounded wait.
#[tokio::test]
async fn a_killed_holders_permits_return_after_its_ttl_in_redis() {
    let (server, _clock, _store) = start(Backend::Redis).await;
    let mut client = leases(&server).await;
    let short = |id: &str| AcquireRequest {
        ttl: Some(prost_types::Duration {
            seconds: 0,
            nanos: 300_000_000,
        }),
        ..acquire("acme", id)
    };
    // Taken before the first grant: no permit can expire sooner than 300 ms
    // after this, however slowly the machine runs.
    let started = Instant::now();
    assert!(try_acquire(&mut client, short("dead-1")).await.granted);
    assert!(try_acquire(&mut client, short("dead-2")).await.granted);
    assert!(
        !try_acquire(&mut client, acquire("acme", "live"))
            .await
            .granted
            || started.elapsed() >= Duration::from_millis(300)
    );
    let deadline = started + Duration::from_secs(10);
    loop {
        if try_acquire(&mut client, acquire("acme", "live"))
            .await
            .granted
        {
            break;
        }
        assert!(Instant::now() < deadline, "expired permits never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
}

async fn idempotent_acquire_and_release(backend: Backend) {
    let (server, _clock, _store) = start(backend).await;
    let mut client = leases(&server).await;
    let first = try_acquire(&mut client, acquire("acme", "job-1")).await;
    assert!(first.granted);
    assert_eq!(first.lease_id, "job-1");
    assert!(first.fencing_token > 0);
    // The response was lost; the caller retries with the same id.
    let retried = try_acquire(&mut client, acquire("acme", "job-1")).await;
    assert!(retried.granted);
    assert_eq!(retried.expires_at, first.expires_at);
    assert_eq!(retried.fencing_token, first.fencing_token);
    assert_eq!(retried.in_use, 1, "a retry takes nothing more");
    // Another holder's release never frees job-1.
    let other = client
        .release(release("acme", "job-2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.status(), ReleaseStatus::AlreadyReleased);
    let second = try_acquire(&mut client, acquire("acme", "job-2")).await;
    assert!(second.granted);
    assert!(second.fencing_token > first.fencing_token);
    assert!(
        !try_acquire(&mut client, acquire("acme", "job-3"))
            .await
            .granted
    );
    // Release, retried.
    let released = client
        .release(release("acme", "job-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.status(), ReleaseStatus::Released);
    let again = client
        .release(release("acme", "job-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.status(), ReleaseStatus::AlreadyReleased);
    let third = try_acquire(&mut client, acquire("acme", "job-3")).await;
    assert!(third.granted);
    assert_eq!(third.in_use, 2);
    // A lease id the server makes.
    client.release(release("acme", "job-3")).await.unwrap();
    let made = try_acquire(&mut client, acquire("acme", "")).await;
    assert!(made.granted);
    assert_eq!(made.lease_id.len(), 32);
}

async fn renew_extends_and_fails_once_expired(backend: Backend) {
    let (server, clock, _store) = start(backend).await;
    let mut client = leases(&server).await;
    let ttl = |ms: i32| {
        Some(prost_types::Duration {
            seconds: 0,
            nanos: ms * 1_000_000,
        })
    };
    let granted = try_acquire(
        &mut client,
        AcquireRequest {
            ttl: ttl(900),
            ..acquire("acme", "worker")
        },
    )
    .await;
    assert!(granted.granted);
    let renewed = client
        .renew(RenewRequest {
            ttl: ttl(900),
            ..renew("acme", "worker")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.fencing_token, granted.fencing_token);
    let ms = |t: prost_types::Timestamp| t.seconds * 1_000 + i64::from(t.nanos / 1_000_000);
    assert!(ms(renewed.expires_at.unwrap()) >= ms(granted.expires_at.unwrap()));
    // Let it expire: by hand in memory, by waiting in Redis.
    match backend {
        Backend::Memory => clock.advance(900),
        Backend::Redis => tokio::time::sleep(Duration::from_millis(1_100)).await,
    }
    let gone = client.renew(renew("acme", "worker")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(gone.message().contains("worker"), "{}", gone.message());
    let never = client.renew(renew("acme", "never-held")).await.unwrap_err();
    assert_eq!(never.code(), Code::NotFound);
}

async fn all_or_nothing_across_descriptors(backend: Backend) {
    let (server, _clock, _store) = start(backend).await;
    let mut client = leases(&server).await;
    let both = |tenant: &str, id: &str| AcquireRequest {
        descriptors: vec![
            descriptor("tenant", tenant),
            descriptor("global", "all"),
            descriptor("per_second", "x"),
        ],
        ..acquire(tenant, id)
    };
    // global allows 3; tenant a allows 2.
    assert!(try_acquire(&mut client, both("a", "1")).await.granted);
    assert!(try_acquire(&mut client, both("a", "2")).await.granted);
    let refused = try_acquire(&mut client, both("a", "3")).await;
    assert!(!refused.granted);
    // Nothing was taken from the global cap by the refused call.
    let b = try_acquire(&mut client, both("b", "4")).await;
    assert!(b.granted);
    assert_eq!(b.statuses.len(), 3);
    assert!(b.statuses[0].concurrency && b.statuses[1].concurrency);
    assert!(!b.statuses[2].concurrency, "a counting rule is not a lease");
    assert_eq!((b.statuses[1].limit, b.statuses[1].in_use), (3, 3));
    assert_eq!((b.limit, b.in_use), (3, 3), "the tightest rule");
    assert!(!try_acquire(&mut client, both("c", "5")).await.granted);
}

async fn bad_input_is_refused_and_changes_nothing(backend: Backend) {
    let (server, _clock, _store) = start(backend).await;
    let mut client = leases(&server).await;
    let cases: Vec<(AcquireRequest, Code, &str)> = vec![
        (
            AcquireRequest {
                domain: String::new(),
                ..acquire("a", "x")
            },
            Code::InvalidArgument,
            "domain",
        ),
        (
            AcquireRequest {
                descriptors: vec![],
                ..acquire("a", "x")
            },
            Code::InvalidArgument,
            "descriptors",
        ),
        (
            acquire("a", &"x".repeat(129)),
            Code::InvalidArgument,
            "lease_id",
        ),
        (acquire("a", "bad\nid"), Code::InvalidArgument, "lease_id"),
        (
            AcquireRequest {
                permits: 1 << 40,
                ..acquire("a", "x")
            },
            Code::InvalidArgument,
            "permits",
        ),
        (
            AcquireRequest {
                ttl: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..acquire("a", "x")
            },
            Code::InvalidArgument,
            "ttl",
        ),
        (
            AcquireRequest {
                descriptors: vec![descriptor("per_second", "x")],
                ..acquire("a", "x")
            },
            Code::FailedPrecondition,
            "no descriptor matches a concurrency rule",
        ),
        (
            AcquireRequest {
                domain: "nope".to_owned(),
                ..acquire("a", "x")
            },
            Code::FailedPrecondition,
            "nope",
        ),
    ];
    for (request, code, text) in cases {
        let status = client.acquire(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(
            status.message().contains(text),
            "{request:?}: {}",
            status.message()
        );
    }
    let empty_id = client.release(release("a", "")).await.unwrap_err();
    assert_eq!(empty_id.code(), Code::InvalidArgument);
    // Nothing was taken by any of them.
    assert!(try_acquire(&mut client, acquire("a", "1")).await.granted);
    assert_eq!(try_acquire(&mut client, acquire("a", "2")).await.in_use, 2);
}

async fn the_ttl_is_clamped_to_the_rules_maximum(backend: Backend) {
    let (server, _clock, _store) = start(backend).await;
    let mut client = leases(&server).await;
    let long = try_acquire(
        &mut client,
        AcquireRequest {
            ttl: Some(prost_types::Duration {
                seconds: 3_600,
                nanos: 0,
            }),
            ..acquire("a", "long")
        },
    )
    .await;
    let default = try_acquire(&mut client, acquire("a", "default")).await;
    let (long, default) = (long.expires_at.unwrap(), default.expires_at.unwrap());
    // 60 s (max_lease_ttl) and 10 s (lease_ttl) from about the same now.
    let gap = long.seconds - default.seconds;
    assert!((49..=51).contains(&gap), "{gap}");
}

// ------------------------------------------------------------ envoy ---

fn envoy(entries: &[(&str, &str)], negative: bool) -> RateLimitRequest {
    let mut descriptor = envoy_descriptor(entries);
    descriptor.is_negative_hits = negative;
    RateLimitRequest {
        domain: "jobs".to_owned(),
        descriptors: vec![descriptor],
        hits_addend: 0,
    }
}

async fn envoy_slots_with_negative_hits(backend: Backend) {
    let (server, clock, _store) = start(backend).await;
    let mut rls = server.envoy().await;
    let mut code = async |negative: bool| {
        let answer = rls
            .should_rate_limit(envoy(&[("tenant", "acme")], negative))
            .await
            .unwrap()
            .into_inner();
        answer.overall_code()
    };
    // Negative hits floor at zero: nothing to free, and they answer OK.
    assert_eq!(code(true).await, EnvoyCode::Ok);
    assert_eq!(code(true).await, EnvoyCode::Ok);
    assert_eq!(code(false).await, EnvoyCode::Ok);
    assert_eq!(code(false).await, EnvoyCode::Ok);
    // Full: refused. Envoy sends the refused request's negative hit too;
    // it cancels the refusal instead of freeing a held slot.
    assert_eq!(code(false).await, EnvoyCode::OverLimit);
    assert_eq!(code(true).await, EnvoyCode::Ok);
    assert_eq!(code(false).await, EnvoyCode::OverLimit);
    assert_eq!(code(true).await, EnvoyCode::Ok);
    // One request ends: one slot frees.
    assert_eq!(code(true).await, EnvoyCode::Ok);
    assert_eq!(code(false).await, EnvoyCode::Ok);
    assert_eq!(code(false).await, EnvoyCode::OverLimit);
    assert_eq!(code(true).await, EnvoyCode::Ok);
    // Slots leaked by requests whose negative hit never came expire.
    if backend == Backend::Memory {
        clock.advance(10_000);
        assert_eq!(code(false).await, EnvoyCode::Ok);
        assert_eq!(code(false).await, EnvoyCode::Ok);
    }
    // A negative hit's cost is checked like any other.
    let mut huge = envoy(&[("tenant", "acme")], true);
    huge.descriptors[0].hits_addend = Some(1 << 40);
    let status = rls.should_rate_limit(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // A negative hit on a counting rule answers OK and is not counted.
    let mut rls = server.envoy().await;
    for _ in 0..150 {
        let answer = rls
            .should_rate_limit(envoy(&[("per_second", "x")], true))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.overall_code(), EnvoyCode::Ok);
    }
}

async fn envoy_status_of_a_concurrency_descriptor(backend: Backend) {
    let (server, _clock, _store) = start(backend).await;
    let mut rls = server.envoy().await;
    let answer = rls
        .should_rate_limit(envoy(&[("tenant", "acme")], false))
        .await
        .unwrap()
        .into_inner();
    let status = &answer.statuses[0];
    assert_eq!(status.code(), EnvoyCode::Ok);
    assert_eq!(status.limit_remaining, 1);
    assert!(status.current_limit.is_none(), "no window to report");
}

both_stores!(
    idempotent_acquire_and_release,
    renew_extends_and_fails_once_expired,
    all_or_nothing_across_descriptors,
    bad_input_is_refused_and_changes_nothing,
    the_ttl_is_clamped_to_the_rules_maximum,
    envoy_slots_with_negative_hits,
    envoy_status_of_a_concurrency_descriptor,
    negative_hits_refund_counting_rules,
);

// ------------------------------------------------------- admin and cli ---

#[tokio::test]
async fn rules_endpoint_shows_a_concurrency_rule() {
    let (server, _clock, _store) = start(Backend::Memory).await;
    let body = http_get(server.admin_addr, "/rules").await;
    assert!(
        body.contains("\"concurrency\":{\"max_in_flight\":2,\"lease_ttl_ms\":10000,\"max_lease_ttl_ms\":60000}"),
        "{body}"
    );
}

#[test]
fn check_config_shows_a_concurrency_rule() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jobs.yaml");
    std::fs::write(&file, RULES).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ratekeeper"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("jobs.tenant: 2 held at once (concurrency; lease ttl 10s, at most 1m)"),
        "{stdout}"
    );
    std::fs::write(
        &file,
        "domain: jobs\ndescriptors:\n  - key: t\n    concurrency: 0\n    lease_ttl: 1s\n",
    )
    .unwrap();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_ratekeeper"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("descriptors[0].concurrency: must be at least 1"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------- twin ---

/// splitmix64, seeded: the same sequence every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// The Lua script and the Rust table, driven with the same seeded sequence
/// of operations on overlapping sets of keys at injected times, answer
/// identically at every step.
#[test]
fn the_lua_script_matches_its_rust_twin() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    let script = script();
    let mut rng = Rng(0x001E_A5E5);
    let limits = [1u64, 3, 5];
    let keys: Vec<LeaseKey> = limits
        .iter()
        .enumerate()
        .map(|(i, &limit)| LeaseKey {
            key: format!("twin:{{t}}:{i}").into_bytes(),
            limit: ConcurrencyLimit {
                max_in_flight: limit,
                lease_ttl_ms: 1_000,
                max_lease_ttl_ms: 5_000,
            },
        })
        .collect();
    let mut states = vec![KeyState::default(); keys.len()];
    let mut now = 1_700_000_000_000u64;
    let mut seen = std::collections::HashMap::new();
    for step in 0..3_000 {
        now += rng.below(400);
        // A non-empty subset of the keys, in order.
        let mut chosen: Vec<usize> = (0..keys.len()).filter(|_| rng.below(2) == 0).collect();
        if chosen.is_empty() {
            chosen.push(rng.below(keys.len() as u64) as usize);
        }
        let id = format!("lease-{}", rng.below(6));
        let ttl_ms = 1 + rng.below(2_000);
        let op = match rng.below(5) {
            0 => Op::Acquire {
                id,
                permits: 1 + rng.below(3),
                ttl_ms,
            },
            1 => Op::Renew { id, ttl_ms },
            2 => Op::Release { id },
            3 => Op::Take {
                n: rng.below(3),
                ttl_ms,
            },
            _ => Op::Free { n: rng.below(3) },
        };
        let op_keys: Vec<LeaseKey> = chosen.iter().map(|&i| keys[i].clone()).collect();
        let mut op_states: Vec<KeyState> = chosen.iter().map(|&i| states[i].clone()).collect();
        let op_limits: Vec<u64> = chosen.iter().map(|&i| limits[i]).collect();
        let expected = table::apply(&mut op_states, &op_limits, &op, now);
        for (slot, state) in chosen.iter().zip(op_states) {
            states[*slot] = state;
        }
        let (redis_keys, args) = encode(&op_keys, &op, Some(now));
        let mut invocation = script.prepare_invoke();
        for key in &redis_keys {
            invocation.key(key);
        }
        for arg in &args {
            invocation.arg(arg);
        }
        let values: Vec<i64> = invocation.invoke(&mut connection).unwrap();
        let found = decode(&values, op_keys.len()).unwrap();
        assert_eq!(
            found, expected,
            "step {step}: {op:?} on keys {chosen:?} at {now}"
        );
        *seen.entry(format!("{:?}", found.code)).or_insert(0) += 1;
        if found.keys.iter().any(|k| k.expired > 0) {
            *seen.entry("expired".to_owned()).or_insert(0) += 1;
        }
    }
    // The sequence reached every outcome, many times.
    for outcome in [
        "Granted",
        "Denied",
        "NotFound",
        "Released",
        "AlreadyReleased",
        "expired",
    ] {
        assert!(
            seen.get(outcome).copied().unwrap_or(0) >= 50,
            "{outcome}: {seen:?}"
        );
    }
}

// ------------------------------------------------------- failure policy ---

/// A server over RULES on a Redis that is then killed, answering store
/// failures with `policy`.
async fn with_dead_redis(policy: FailurePolicy) -> (TestServer, RedisServer) {
    let mut redis = RedisServer::start();
    let store: Arc<dyn CounterStore> =
        Arc::new(redis_store(&redis.url(), Duration::from_millis(500)));
    let server =
        TestServer::start(Server::new(rules(&[RULES]), store).with_failure_policy(policy)).await;
    redis.kill();
    (server, redis)
}

#[tokio::test]
async fn a_store_failure_is_unavailable_under_the_error_policy() {
    let (server, _redis) = with_dead_redis(FailurePolicy::Error).await;
    let mut client = leases(&server).await;
    let status = client.acquire(acquire("acme", "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = client.release(release("acme", "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let mut rls = server.envoy().await;
    let status = rls
        .should_rate_limit(envoy(&[("tenant", "acme")], false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn the_local_policy_keeps_leases_on_the_instance() {
    let (server, _redis) = with_dead_redis(FailurePolicy::Local).await;
    let mut client = leases(&server).await;
    assert!(try_acquire(&mut client, acquire("acme", "1")).await.granted);
    assert!(try_acquire(&mut client, acquire("acme", "2")).await.granted);
    assert!(!try_acquire(&mut client, acquire("acme", "3")).await.granted);
    let released = client
        .release(release("acme", "1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.status(), ReleaseStatus::Released);
    assert!(try_acquire(&mut client, acquire("acme", "3")).await.granted);
}

#[tokio::test]
async fn the_allow_and_deny_policies_answer_without_recording() {
    let (server, _redis) = with_dead_redis(FailurePolicy::Allow).await;
    let mut client = leases(&server).await;
    for id in ["1", "2", "3"] {
        let answer = try_acquire(&mut client, acquire("acme", id)).await;
        assert!(answer.granted);
        assert_eq!(answer.fencing_token, 0, "nothing was recorded");
    }
    let status = client.release(release("acme", "1")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "a release is never faked");
    let (server, _redis) = with_dead_redis(FailurePolicy::Deny).await;
    let mut client = leases(&server).await;
    assert!(!try_acquire(&mut client, acquire("acme", "1")).await.granted);
    let status = client.renew(renew("acme", "1")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

// ----------------------------------------------------------- ShouldAllow ---

#[tokio::test]
async fn should_allow_neither_counts_nor_calls_a_concurrency_rule_unlimited() {
    let (server, _clock, _store) = start(Backend::Memory).await;
    let mut client = server.client().await;
    for _ in 0..3 {
        let answer = client
            .should_allow(common::allow_request("jobs", &[&[("tenant", "acme")]], 1))
            .await
            .unwrap()
            .into_inner();
        assert!(answer.allowed);
        assert!(!answer.results[0].unlimited);
    }
    let mut leases = leases(&server).await;
    assert!(try_acquire(&mut leases, acquire("acme", "1")).await.granted);
    assert!(try_acquire(&mut leases, acquire("acme", "2")).await.granted);
}

// -------------------------------------------------------------- cluster ---

/// On a real 3-master Redis Cluster: callers across three instances, each
/// acquiring a tenant cap and the global cap in one call (all or nothing:
/// the domain's lease keys share a slot), never hold more than either
/// limit; Envoy's slots work there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_redis_cluster_grants_stay_exact_and_all_or_nothing() {
    use common::cluster::RedisCluster;
    use ratekeeper::store::RedisClusterStore;
    use ratekeeper::store::redis_cluster::RedisClusterSettings;

    let cluster = RedisCluster::start();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let store = RedisClusterStore::new(&RedisClusterSettings {
            nodes: cluster.urls(),
            pool_size: 2,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(500),
            tls: None,
            expiry_jitter: Duration::ZERO,
        })
        .unwrap();
        servers.push(TestServer::with(rules(&[RULES]), Arc::new(store)).await);
    }
    // tenant caps 2 each; global caps 3 over both tenants.
    let per_tenant = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let global = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for caller in 0..32 {
        let mut client = leases(&servers[caller % 3]).await;
        let tenant = caller % 2;
        let mine = per_tenant[tenant].clone();
        let global = global.clone();
        callers.push(tokio::spawn(async move {
            let name = format!("t{tenant}");
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut rounds = 0;
            while rounds < 2 {
                assert!(Instant::now() < deadline, "caller {caller} starved");
                let id = format!("c{caller}-{rounds}");
                let request = AcquireRequest {
                    descriptors: vec![descriptor("tenant", &name), descriptor("global", "all")],
                    ..acquire(&name, &id)
                };
                if !try_acquire(&mut client, request).await.granted {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                assert!(
                    mine.fetch_add(1, Ordering::SeqCst) < 2,
                    "tenant cap exceeded"
                );
                assert!(
                    global.fetch_add(1, Ordering::SeqCst) < 3,
                    "global cap exceeded"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
                mine.fetch_sub(1, Ordering::SeqCst);
                global.fetch_sub(1, Ordering::SeqCst);
                let release = ReleaseRequest {
                    descriptors: vec![descriptor("tenant", &name), descriptor("global", "all")],
                    ..release(&name, &id)
                };
                let released = client.release(release).await.unwrap().into_inner();
                assert_eq!(released.status(), ReleaseStatus::Released);
                rounds += 1;
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    let mut rls = servers[1].envoy().await;
    let mut code = async |negative: bool| {
        rls.should_rate_limit(envoy(&[("tenant", "edge")], negative))
            .await
            .unwrap()
            .into_inner()
            .overall_code()
    };
    assert_eq!(code(false).await, EnvoyCode::Ok);
    assert_eq!(code(false).await, EnvoyCode::Ok);
    assert_eq!(code(false).await, EnvoyCode::OverLimit);
    assert_eq!(code(true).await, EnvoyCode::Ok);
    assert_eq!(code(true).await, EnvoyCode::Ok);
    assert_eq!(code(false).await, EnvoyCode::Ok);

    // Refunds on the cluster: counters on two slots, on an injected clock.
    use ratekeeper::algorithm::{AlgorithmKind, BatchHit, Mode, Quota};
    let clock = Arc::new(ManualClock::new(T0));
    let store = RedisClusterStore::new(&RedisClusterSettings {
        nodes: cluster.urls(),
        pool_size: 1,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_millis(500),
        tls: None,
        expiry_jitter: Duration::ZERO,
    })
    .unwrap()
    .with_clock(clock);
    let quota = Quota {
        limit: 3,
        window_ms: 60_000,
        burst: 3,
    };
    let keys = [b"rk4:{a}:refund".to_vec(), b"rk4:{b}:refund".to_vec()];
    let hits = |n: u64| -> Vec<BatchHit<'_>> {
        keys.iter()
            .map(|key| BatchHit {
                key,
                algorithm: AlgorithmKind::FixedWindow,
                quota,
                hits: n,
                enforced: true,
            })
            .collect()
    };
    let taken = store.apply(&hits(3), Mode::Independent).await.unwrap();
    assert!(taken.iter().all(|o| o.allowed && o.remaining == 0));
    store.refund(&hits(2)).await.unwrap();
    let after = store.apply(&hits(2), Mode::Independent).await.unwrap();
    assert!(
        after.iter().all(|o| o.allowed && o.remaining == 0),
        "{after:?}"
    );
}

/// Under global quota mode (`--quota-mode`) every descriptor is a quota
/// descriptor except unlimited ones and concurrency caps: a full cap still
/// denies its request while a counting rule beside it is within its limit.
#[tokio::test]
async fn a_concurrency_cap_is_never_a_quota() {
    use ratekeeper::api::QuotaMode;
    let clock = Arc::new(ManualClock::new(T0));
    let store = TestStore::new(Backend::Memory, clock);
    let server = TestServer::start(
        Server::new(rules(&[RULES]), store.store.clone()).with_quota_mode(QuotaMode::Global),
    )
    .await;
    let mut rls = server.envoy().await;
    let request = RateLimitRequest {
        domain: "jobs".to_owned(),
        descriptors: vec![
            envoy_descriptor(&[("tenant", "acme")]),
            envoy_descriptor(&[("per_second", "x")]),
        ],
        hits_addend: 0,
    };
    for expected in [EnvoyCode::Ok, EnvoyCode::Ok, EnvoyCode::OverLimit] {
        let answer = rls
            .should_rate_limit(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.overall_code(), expected);
    }
}

// ------------------------------------------------- health and reflection ---

#[tokio::test]
async fn the_leases_service_has_health_and_reflection() {
    use futures::StreamExt;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (server, _clock, _store) = start(Backend::Memory).await;
    let mut health = HealthClient::new(server.channel().await);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: "ratekeeper.v1.Leases".into(),
            })
            .await
            .map(|r| r.into_inner().status());
        if matches!(status, Ok(ServingStatus::Serving)) {
            break;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "ratekeeper.v1.Leases"),
        "{list:?}"
    );
}

// -------------------------------------------------------------- refunds ---

const REFUND_RULES: &str = "
domain: refunds
descriptors:
  - key: fixed
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: sliding
    rate_limit: {unit: minute, requests_per_unit: 3, algorithm: sliding_window}
  - key: bucket
    rate_limit: {unit: minute, requests_per_unit: 3, algorithm: token_bucket}
  - key: both
    rate_limits:
      - {unit: minute, requests_per_unit: 3}
      - {unit: hour, requests_per_unit: 4}
";

/// A negative hit on a counting rule takes its hits back, never below
/// zero, on every algorithm and on every limit of a rule with several.
async fn negative_hits_refund_counting_rules(backend: Backend) {
    let h = common::Harness::start(backend, REFUND_RULES).await;
    let mut rls = h.server.envoy().await;
    for key in ["fixed", "sliding", "bucket", "both"] {
        let mut hit = async |hits: u64, negative: bool| {
            let mut request = envoy(&[(key, "x")], negative);
            request.domain = "refunds".to_owned();
            request.descriptors[0].hits_addend = Some(hits);
            rls.should_rate_limit(request)
                .await
                .unwrap()
                .into_inner()
                .overall_code()
        };
        assert_eq!(hit(3, false).await, EnvoyCode::Ok, "{key}");
        assert_eq!(hit(1, false).await, EnvoyCode::OverLimit, "{key}");
        assert_eq!(hit(2, true).await, EnvoyCode::Ok, "{key}");
        // A fixed window also counted the refused hit: 3 + 1 - 2 = 2 used.
        let room = if key == "fixed" || key == "both" {
            1
        } else {
            2
        };
        assert_eq!(hit(room, false).await, EnvoyCode::Ok, "{key}");
        assert_eq!(hit(1, false).await, EnvoyCode::OverLimit, "{key}");
        // Floored at zero: a large refund leaves exactly the limit.
        assert_eq!(hit(50, true).await, EnvoyCode::Ok, "{key}");
        assert_eq!(hit(3, false).await, EnvoyCode::Ok, "{key}");
        assert_eq!(hit(1, false).await, EnvoyCode::OverLimit, "{key}");
    }
}

/// The refund script against its Rust twin: the memory store (which runs
/// `algorithm::refund`) and the Redis store (which runs `refund.lua`),
/// driven by one injected clock through the same seeded sequence of hits
/// and refunds on every algorithm, answer every decision alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refund_script_matches_its_rust_twin() {
    use ratekeeper::algorithm::{AlgorithmKind, BatchHit, Mode, Quota};
    use ratekeeper::clock::Clock;
    use ratekeeper::store::MemoryStore;

    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock::new(T0));
    let memory = MemoryStore::new(1_000, clock.clone());
    let remote = redis_store(&redis.url(), Duration::from_secs(5))
        .with_clock(clock.clone() as Arc<dyn Clock>);
    let counters: Vec<(Vec<u8>, AlgorithmKind, Quota)> = [
        (AlgorithmKind::FixedWindow, 5, 5),
        (AlgorithmKind::SlidingWindow, 5, 5),
        (AlgorithmKind::TokenBucket, 5, 8),
    ]
    .into_iter()
    .map(|(algorithm, limit, burst)| {
        let key = format!("rk4:{{{}}}:twin", algorithm.tag()).into_bytes();
        (
            key,
            algorithm,
            Quota {
                limit,
                window_ms: 10_000,
                burst,
            },
        )
    })
    .collect();
    let mut rng = Rng(0x00BE_EF01);
    let mut refunds = 0;
    for step in 0..1_500 {
        clock.advance(rng.below(1_500));
        let (key, algorithm, quota) = &counters[rng.below(3) as usize];
        let hit = [BatchHit {
            key,
            algorithm: *algorithm,
            quota: *quota,
            hits: rng.below(4),
            enforced: true,
        }];
        if rng.below(3) == 0 {
            memory.refund(&hit).await.unwrap();
            remote.refund(&hit).await.unwrap();
            refunds += 1;
            continue;
        }
        let expected = memory.apply(&hit, Mode::Independent).await.unwrap();
        let found = remote.apply(&hit, Mode::Independent).await.unwrap();
        assert_eq!(
            found,
            expected,
            "step {step}: {algorithm:?} at {}",
            clock.now_ms()
        );
    }
    assert!(refunds > 300, "{refunds}");
}

/// A refund forgets this instance's cached denial of the refunded counter:
/// the over-limit cache must not keep denying what the store now admits.
#[tokio::test]
async fn a_refund_forgets_the_cached_denial() {
    use ratekeeper::store::OverLimitCache;
    let clock = Arc::new(ManualClock::new(T0));
    let store = TestStore::new(Backend::Memory, clock.clone());
    let server = TestServer::start(
        Server::new(rules(&[REFUND_RULES]), store.store.clone())
            .with_over_limit_cache(OverLimitCache::new(100, clock)),
    )
    .await;
    let mut rls = server.envoy().await;
    let mut hit = async |hits: u64, negative: bool| {
        let mut request = envoy(&[("sliding", "x")], negative);
        request.domain = "refunds".to_owned();
        request.descriptors[0].hits_addend = Some(hits);
        rls.should_rate_limit(request)
            .await
            .unwrap()
            .into_inner()
            .overall_code()
    };
    assert_eq!(hit(3, false).await, EnvoyCode::Ok);
    assert_eq!(hit(1, false).await, EnvoyCode::OverLimit);
    assert_eq!(
        hit(1, false).await,
        EnvoyCode::OverLimit,
        "now from the cache"
    );
    assert_eq!(hit(1, true).await, EnvoyCode::Ok);
    assert_eq!(hit(1, false).await, EnvoyCode::Ok);
}
