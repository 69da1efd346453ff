//! Reserve, then settle, end to end over gRPC: `ShouldAllow` with a
//! `reservation_ttl` charges an estimate and answers a reservation id;
//! `ReservationService/Settle` charges the difference or refunds it, exactly once.
//! Every test runs on the memory store and on a real redis-server (with the
//! same numbers, so the Lua settle is checked against the Rust one), and
//! across instances sharing a Redis or a Redis Cluster. Time is a manual clock: nothing
//! here waits for real time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cluster::RedisCluster;
use common::process::{BIN, Serve};
use common::{
    Backend, Harness, RedisServer, T0, TestServer, allow_request, http_get, redis_store, rules,
};
use ratekeeper::clock::ManualClock;
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use ratekeeper::proto::ratekeeper::v1::reservation_service_client::ReservationServiceClient;
use ratekeeper::proto::ratekeeper::v1::{
    SettleRequest, SettleResponse, SettleStatus, ShouldAllowRequest, ShouldAllowResponse,
};
use ratekeeper::reservation::Ledger;
use ratekeeper::store::redis_cluster::RedisClusterSettings;
use ratekeeper::store::{MemoryStore, RedisClusterStore};
use tonic::Code;
use tonic::transport::Channel;

const RULES: &str = r#"
domain: llm
descriptors:
  - key: fixed
    rate_limit: {unit: hour, requests_per_unit: 1000000, name: fixed}
  - key: sliding
    rate_limit: {algorithm: sliding_window, unit: hour, requests_per_unit: 1000000, name: sliding}
  - key: bucket
    rate_limit: {algorithm: token_bucket, unit: hour, requests_per_unit: 1000000, name: bucket}
  - key: small
    rate_limit: {unit: hour, requests_per_unit: 10, name: small}
  - key: tokens
    rate_limit: {algorithm: token_bucket, unit: minute, requests_per_unit: 10, name: tokens}
  - key: big
    rate_limits:
      - {unit: hour, requests_per_unit: 1000000, name: big}
      - {algorithm: sliding_window, unit: day, requests_per_unit: 1000000}
      - {algorithm: token_bucket, unit: hour, requests_per_unit: 1000000}
  - key: tenant
    rate_limits:
      - {unit: minute, requests_per_unit: 100, name: tenant}
      - {unit: day, requests_per_unit: 150}
"#;

const ALL: [&[(&str, &str)]; 3] = [&[("fixed", "t")], &[("sliding", "t")], &[("bucket", "t")]];
const SMALL: &[(&str, &str)] = &[("small", "t")];
const TOKENS: &[(&str, &str)] = &[("tokens", "t")];
const TENANT: &[(&str, &str)] = &[("tenant", "acme")];
const BIG: &[(&str, &str)] = &[("big", "acme")];

struct Fixture {
    limiter: RateLimiterClient<Channel>,
    reservations: ReservationServiceClient<Channel>,
    clock: Arc<ManualClock>,
    harness: Harness,
}

async fn fixture(backend: Backend) -> Fixture {
    let harness = Harness::start(backend, RULES).await;
    let channel = harness.server.channel().await;
    Fixture {
        limiter: RateLimiterClient::new(channel.clone()),
        reservations: ReservationServiceClient::new(channel),
        clock: harness.clock.clone(),
        harness,
    }
}

fn reserve_request(
    descriptors: &[&[(&str, &str)]],
    estimate: u64,
    ttl: Duration,
) -> ShouldAllowRequest {
    ShouldAllowRequest {
        reservation_ttl: Some(prost_types::Duration {
            seconds: ttl.as_secs() as i64,
            nanos: ttl.subsec_nanos() as i32,
        }),
        ..allow_request("llm", descriptors, estimate)
    }
}

fn settle_request(id: &str, actual: u64) -> SettleRequest {
    SettleRequest {
        domain: "llm".to_owned(),
        reservation_id: id.to_owned(),
        actual_cost: actual,
    }
}

/// `id` settled at `actual` through `client`; the call must succeed.
async fn settle_ok(
    client: &mut ReservationServiceClient<tonic::transport::Channel>,
    id: &str,
    actual: u64,
) -> SettleResponse {
    client
        .settle(settle_request(id, actual))
        .await
        .unwrap()
        .into_inner()
}

fn ms(d: &prost_types::Duration) -> u64 {
    d.seconds as u64 * 1_000 + d.nanos as u64 / 1_000_000
}

const MINUTE: Duration = Duration::from_secs(60);

impl Fixture {
    async fn reserve(
        &mut self,
        descriptors: &[&[(&str, &str)]],
        estimate: u64,
        ttl: Duration,
    ) -> ShouldAllowResponse {
        self.limiter
            .should_allow(reserve_request(descriptors, estimate, ttl))
            .await
            .unwrap()
            .into_inner()
    }

    async fn settle(&mut self, id: &str, actual: u64) -> Result<SettleResponse, tonic::Status> {
        self.reservations
            .settle(settle_request(id, actual))
            .await
            .map(|r| r.into_inner())
    }

    /// What each descriptor has left, asked with a dry run.
    async fn remaining(&mut self, descriptors: &[&[(&str, &str)]]) -> Vec<u64> {
        let request = ShouldAllowRequest {
            dry_run: true,
            ..allow_request("llm", descriptors, 1)
        };
        let response = self
            .limiter
            .should_allow(request)
            .await
            .unwrap()
            .into_inner();
        response.results.iter().map(|r| r.remaining).collect()
    }
}

/// The issue's guarantee: 64 callers reserving an estimate and settling
/// their actual costs at once leave every counter (fixed window, sliding
/// window, token bucket) charged at exactly the sum of the actual costs.
async fn concurrent_reserve_and_settle_charge_exactly_the_settled_costs(backend: Backend) {
    let f = fixture(backend).await;
    let channel = f.harness.server.channel().await;
    let callers: Vec<_> = (0..64u64)
        .map(|i| {
            let channel = channel.clone();
            tokio::spawn(async move {
                let mut limiter = RateLimiterClient::new(channel.clone());
                let mut reservations = ReservationServiceClient::new(channel);
                let mut charged = 0;
                for round in 0..4u64 {
                    let estimate = 500;
                    let actual = (i * 7 + round * 131) % 997;
                    let response = limiter
                        .should_allow(reserve_request(&ALL, estimate, MINUTE))
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(response.allowed);
                    let settled =
                        settle_ok(&mut reservations, &response.reservation_id, actual).await;
                    assert_eq!(settled.status(), SettleStatus::Settled);
                    assert_eq!(
                        (settled.estimated_cost, settled.actual_cost),
                        (estimate, actual)
                    );
                    charged += actual;
                }
                charged
            })
        })
        .collect();
    let mut total = 0;
    for caller in callers {
        total += caller.await.unwrap();
    }
    let mut f = f;
    assert_eq!(f.remaining(&ALL).await, vec![1_000_000 - total; 3]);
}

async fn a_retried_settle_answers_the_same_and_changes_nothing(backend: Backend) {
    let mut f = fixture(backend).await;
    let reserved = f.reserve(&[SMALL], 6, MINUTE).await;
    assert!(reserved.allowed);
    assert!(!reserved.reservation_id.is_empty());
    assert_eq!(reserved.reservation_ttl.as_ref().map(ms), Some(60_000));
    assert_eq!(f.remaining(&[SMALL]).await, vec![4]);

    let first = f.settle(&reserved.reservation_id, 2).await.unwrap();
    assert_eq!(first.status(), SettleStatus::Settled);
    assert_eq!(f.remaining(&[SMALL]).await, vec![8]);
    for _ in 0..3 {
        let again = f.settle(&reserved.reservation_id, 2).await.unwrap();
        assert_eq!(again.status(), SettleStatus::AlreadySettled);
        assert_eq!((again.estimated_cost, again.actual_cost), (6, 2));
    }
    let other = f.settle(&reserved.reservation_id, 3).await.unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition, "{other:?}");
    assert!(
        other
            .message()
            .contains("already settled with actual_cost 2"),
        "{other:?}"
    );
    assert_eq!(f.remaining(&[SMALL]).await, vec![8]);
}

async fn an_extra_charge_is_added_without_an_admission_check(backend: Backend) {
    let mut f = fixture(backend).await;
    let reserved = f.reserve(&[SMALL], 2, MINUTE).await;
    assert!(reserved.allowed);
    f.settle(&reserved.reservation_id, 14).await.unwrap();
    // 14 of 10: the work is done, so it counts, and the key stays denied.
    assert_eq!(f.remaining(&[SMALL]).await, vec![0]);
    assert!(!f.reserve(&[SMALL], 1, MINUTE).await.allowed);
}

async fn an_unsettled_reservation_stays_charged_at_its_estimate(backend: Backend) {
    let mut f = fixture(backend).await;
    let reserved = f.reserve(&[SMALL], 7, Duration::from_secs(5)).await;
    assert!(reserved.allowed);
    f.clock.advance(5_000);
    let late = f.settle(&reserved.reservation_id, 1).await.unwrap_err();
    assert_eq!(late.code(), Code::NotFound, "{late:?}");
    assert_eq!(f.remaining(&[SMALL]).await, vec![3]);
    f.reserve(&[SMALL], 1, MINUTE).await;
    let metrics = http_get(f.harness.server.admin_addr, "/metrics").await;
    assert!(metrics.contains(r#"ratelimit_reservations_total{event="reserved"} 2"#));
    // The memory store counts the expiry (Redis forgets expired records by
    // itself, uncounted).
    if backend == Backend::Memory {
        assert!(
            metrics.contains(r#"ratelimit_reservations_total{event="expired"} 1"#),
            "{metrics}"
        );
    }
}

async fn a_refund_is_floored_at_zero(backend: Backend) {
    let mut f = fixture(backend).await;
    let reserved = f.reserve(&[TOKENS], 10, Duration::from_secs(300)).await;
    assert!(reserved.allowed);
    // The bucket refills in full; refunding the 10 must not make room for
    // more than the burst.
    f.clock.advance(60_000);
    f.settle(&reserved.reservation_id, 0).await.unwrap();
    assert!(f.reserve(&[TOKENS], 10, MINUTE).await.allowed);
    assert!(!f.reserve(&[TOKENS], 1, MINUTE).await.allowed);
}

async fn admission_counts_outstanding_reservations(backend: Backend) {
    let mut f = fixture(backend).await;
    let held = f.reserve(&[SMALL], 8, MINUTE).await;
    assert!(held.allowed);
    let denied = f.reserve(&[SMALL], 3, MINUTE).await;
    assert!(!denied.allowed);
    assert!(denied.reservation_id.is_empty());
    assert_eq!(denied.reservation_ttl, None);
    let plain = f
        .limiter
        .should_allow(allow_request("llm", &[SMALL], 3))
        .await
        .unwrap()
        .into_inner();
    assert!(!plain.allowed);
    f.settle(&held.reservation_id, 2).await.unwrap();
    let after = f.reserve(&[SMALL], 3, MINUTE).await;
    assert!(after.allowed);
    assert_eq!(after.results[0].remaining, 5);
}

/// A descriptor with several limits: the estimate is charged to each, and
/// so is the settlement.
async fn every_limit_of_a_descriptor_is_settled(backend: Backend) {
    let mut f = fixture(backend).await;
    let reserved = f.reserve(&[TENANT], 90, MINUTE).await;
    assert!(reserved.allowed);
    assert_eq!(reserved.results[0].remaining, 10);
    f.settle(&reserved.reservation_id, 30).await.unwrap();
    // Minute: 30 of 100 used; day: 30 of 150.
    assert_eq!(f.remaining(&[TENANT]).await, vec![70]);
    let next = f.reserve(&[TENANT], 70, MINUTE).await;
    assert!(next.allowed);
    // The day has 50 left after both; a new minute does not bring it back.
    f.settle(&next.reservation_id, 70).await.unwrap();
    f.clock.advance(60_000);
    assert_eq!(f.remaining(&[TENANT]).await, vec![50]);
}

async fn an_unmatched_request_gets_a_reservation_that_settles(backend: Backend) {
    let mut f = fixture(backend).await;
    let reserved = f.reserve(&[&[("nothing", "x")]], 3, MINUTE).await;
    assert!(reserved.allowed);
    let settled = f.settle(&reserved.reservation_id, 9).await.unwrap();
    assert_eq!(settled.status(), SettleStatus::Settled);
}

async fn bad_input_is_refused_and_changes_nothing(backend: Backend) {
    let mut f = fixture(backend).await;
    let held = f.reserve(&[SMALL], 4, MINUTE).await;
    let refused = |request: ShouldAllowRequest| {
        let mut client = f.limiter.clone();
        async move { client.should_allow(request).await.unwrap_err() }
    };
    let dry = refused(ShouldAllowRequest {
        dry_run: true,
        ..reserve_request(&[SMALL], 1, MINUTE)
    })
    .await;
    assert_eq!(dry.code(), Code::InvalidArgument);
    assert!(dry.message().starts_with("reservation_ttl:"), "{dry:?}");
    for (seconds, nanos) in [(0, 0), (0, 999_999), (-1, 0), (1, -5), (0, 1_000_000_000)] {
        let status = refused(ShouldAllowRequest {
            reservation_ttl: Some(prost_types::Duration { seconds, nanos }),
            ..allow_request("llm", &[SMALL], 1)
        })
        .await;
        assert_eq!(status.code(), Code::InvalidArgument, "{seconds}s {nanos}ns");
        assert!(
            status.message().starts_with("reservation_ttl:"),
            "{status:?}"
        );
    }

    let id = held.reservation_id.clone();
    let cases = [
        (
            settle_request("", 1),
            Code::InvalidArgument,
            "reservation_id:",
        ),
        (
            settle_request(&"x".repeat(65), 1),
            Code::InvalidArgument,
            "reservation_id:",
        ),
        (
            settle_request(&id, u64::MAX),
            Code::InvalidArgument,
            "actual_cost:",
        ),
        (
            settle_request("rsv-00000000000000000000000000000000", 1),
            Code::NotFound,
            "reservation",
        ),
        (
            SettleRequest {
                domain: String::new(),
                ..settle_request(&id, 1)
            },
            Code::InvalidArgument,
            "domain:",
        ),
        (
            SettleRequest {
                domain: "other".to_owned(),
                ..settle_request(&id, 1)
            },
            Code::NotFound,
            "reservation",
        ),
    ];
    for (request, code, prefix) in cases {
        let status = f.reservations.settle(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(status.message().starts_with(prefix), "{status:?}");
    }
    // Nothing changed: the reservation is still open at its estimate.
    assert_eq!(f.remaining(&[SMALL]).await, vec![6]);
    assert_eq!(
        f.settle(&id, 1).await.unwrap().status(),
        SettleStatus::Settled
    );
    assert_eq!(f.remaining(&[SMALL]).await, vec![9]);
}

/// The TTL is shortened to the configured maximum, and a full ledger
/// refuses a reservation without charging it.
#[tokio::test]
async fn the_ttl_is_clamped_and_open_reservations_are_bounded() {
    let clock = Arc::new(ManualClock::new(T0));
    let store = MemoryStore::with_ledger(
        1_000,
        clock.clone(),
        Ledger::new(2, Duration::from_secs(30)),
    );
    let server = TestServer::with(rules(&[RULES]), Arc::new(store)).await;
    let channel = server.channel().await;
    let mut limiter = RateLimiterClient::new(channel);
    let reserve = |estimate| reserve_request(&[SMALL], estimate, Duration::from_secs(3_600));
    let first = limiter.should_allow(reserve(1)).await.unwrap().into_inner();
    assert_eq!(first.reservation_ttl.as_ref().map(ms), Some(30_000));
    limiter.should_allow(reserve(1)).await.unwrap();
    let full = limiter.should_allow(reserve(1)).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    let dry = ShouldAllowRequest {
        dry_run: true,
        ..allow_request("llm", &[SMALL], 1)
    };
    let left = limiter.should_allow(dry).await.unwrap().into_inner();
    assert_eq!(left.results[0].remaining, 8);
    // Once they expire, there is room again.
    clock.advance(30_000);
    assert!(
        limiter
            .should_allow(reserve(1))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
}

/// With the default expiry jitter (up to 300 s) a reservation record and
/// its tombstone outlive their own lifetime by less than that lifetime: a
/// 20 s reservation is not kept in Redis for minutes. (Its expiry is in the
/// record; the TTL only frees the memory.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_records_outlive_their_ttl_by_less_than_it() {
    let redis = RedisServer::start();
    // Redis's own clock: TTLs are real.
    let server = TestServer::with(
        rules(&[RULES]),
        Arc::new(redis_store(&redis.url(), Duration::from_secs(2))),
    )
    .await;
    let channel = server.channel().await;
    let mut limiter = RateLimiterClient::new(channel.clone());
    let mut reservations = ReservationServiceClient::new(channel);
    let mut conn = redis.connection();
    let mut pttl = |id: &str| -> i64 {
        let records: Vec<String> =
            ::redis::Commands::keys(&mut conn, format!("*rsv:{id}")).unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        ::redis::cmd("PTTL")
            .arg(&records[0])
            .query(&mut conn)
            .unwrap()
    };
    // Five draws of up to 300 s: without the bound, all five under 20 s
    // would be a 1e-6 chance. (20 s: room to read the record before it
    // expires, however slow the machine.)
    for _ in 0..5 {
        let reserved = limiter
            .should_allow(reserve_request(&[TENANT], 1, Duration::from_secs(20)))
            .await
            .unwrap()
            .into_inner();
        let ttl = pttl(&reserved.reservation_id);
        assert!(ttl > 0 && ttl < 2 * 20_000, "record pttl {ttl}");
        let settled = settle_ok(&mut reservations, &reserved.reservation_id, 1).await;
        assert_eq!(settled.status(), SettleStatus::Settled);
        let ttl = pttl(&reserved.reservation_id);
        let tombstone = ratekeeper::reservation::ledger::TOMBSTONE_MS as i64;
        assert!(ttl > 0 && ttl < 2 * tombstone, "tombstone pttl {ttl}");
    }
}

/// Exact across instances: 64 callers reserve on one of three ratekeeper
/// instances sharing a redis-server and settle on another; every counter
/// ends charged at exactly the sum of the actual costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_sharing_redis_settle_each_others_reservations() {
    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock::new(T0));
    let mut servers = Vec::new();
    let mut channels = Vec::new();
    for _ in 0..3 {
        let store = redis_store(&redis.url(), Duration::from_secs(5))
            .with_clock(clock.clone() as Arc<dyn ratekeeper::clock::Clock>);
        let server = TestServer::with(rules(&[RULES]), Arc::new(store)).await;
        channels.push(server.channel().await);
        servers.push(server);
    }
    let callers: Vec<_> = (0..64usize)
        .map(|i| {
            let here = channels[i % 3].clone();
            let there = channels[(i + 1) % 3].clone();
            tokio::spawn(async move {
                let mut limiter = RateLimiterClient::new(here.clone());
                let mut reservations = ReservationServiceClient::new(there);
                let mut retry = ReservationServiceClient::new(here);
                let mut charged = 0;
                for round in 0..3u64 {
                    let actual = (i as u64 * 13 + round * 101) % 911;
                    let response = limiter
                        .should_allow(reserve_request(&ALL, 400, MINUTE))
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(response.allowed);
                    let request = settle_request(&response.reservation_id, actual);
                    let settled = reservations.settle(request.clone()).await.unwrap();
                    assert_eq!(settled.into_inner().status(), SettleStatus::Settled);
                    // A retry through the reserving instance changes nothing.
                    let again = retry.settle(request).await.unwrap().into_inner();
                    assert_eq!(again.status(), SettleStatus::AlreadySettled);
                    charged += actual;
                }
                charged
            })
        })
        .collect();
    let mut total = 0;
    for caller in callers {
        total += caller.await.unwrap();
    }
    let mut limiter = RateLimiterClient::new(channels[2].clone());
    let dry = ShouldAllowRequest {
        dry_run: true,
        ..allow_request("llm", &ALL, 1)
    };
    let left = limiter.should_allow(dry).await.unwrap().into_inner();
    let remaining: Vec<u64> = left.results.iter().map(|r| r.remaining).collect();
    assert_eq!(remaining, vec![1_000_000 - total; 3]);
}

/// Redis Cluster, for a descriptor (all of its limits on one slot): 64
/// callers over three instances reserve and settle, with retries, and every
/// limit ends charged at exactly the sum of the actual costs. Descriptors on
/// several slots are refused clearly and charge nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_settles_exactly_and_refuses_requests_over_several_slots() {
    let cluster = RedisCluster::start();
    let clock = Arc::new(ManualClock::new(T0));
    let mut servers = Vec::new();
    let mut channels = Vec::new();
    for _ in 0..3 {
        let store = RedisClusterStore::new(&RedisClusterSettings {
            nodes: cluster.urls(),
            pool_size: 2,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            tls: None,
            expiry_jitter: Duration::ZERO,
        })
        .unwrap()
        .with_clock(clock.clone());
        let server = TestServer::with(rules(&[RULES]), Arc::new(store)).await;
        channels.push(server.channel().await);
        servers.push(server);
    }
    let callers: Vec<_> = (0..64usize)
        .map(|i| {
            let here = channels[i % 3].clone();
            let there = channels[(i + 1) % 3].clone();
            tokio::spawn(async move {
                let mut limiter = RateLimiterClient::new(here);
                let mut reservations = ReservationServiceClient::new(there);
                let mut charged = 0;
                for round in 0..3u64 {
                    let actual = (i as u64 * 17 + round * 89) % 853;
                    let response = limiter
                        .should_allow(reserve_request(&[BIG], 400, MINUTE))
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(response.allowed);
                    let request = settle_request(&response.reservation_id, actual);
                    let settled = reservations.settle(request.clone()).await.unwrap();
                    assert_eq!(settled.into_inner().status(), SettleStatus::Settled);
                    let again = reservations.settle(request).await.unwrap().into_inner();
                    assert_eq!(again.status(), SettleStatus::AlreadySettled);
                    charged += actual;
                }
                charged
            })
        })
        .collect();
    let mut total = 0;
    for caller in callers {
        total += caller.await.unwrap();
    }
    let mut limiter = RateLimiterClient::new(channels[0].clone());
    let dry = |descriptors: &[&[(&str, &str)]]| ShouldAllowRequest {
        dry_run: true,
        ..allow_request("llm", descriptors, 1)
    };
    let left = limiter
        .should_allow(dry(&[BIG]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(left.results[0].remaining, 1_000_000 - total);

    let spread = limiter
        .should_allow(reserve_request(&ALL, 4, MINUTE))
        .await
        .unwrap_err();
    assert_eq!(spread.code(), Code::FailedPrecondition, "{spread:?}");
    assert!(spread.message().contains("hash slot"), "{spread:?}");
    let left = limiter.should_allow(dry(&ALL)).await.unwrap().into_inner();
    let remaining: Vec<u64> = left.results.iter().map(|r| r.remaining).collect();
    assert_eq!(remaining, vec![1_000_000; 3]);
    let mut reservations = ReservationServiceClient::new(channels[1].clone());
    for id in ["rsv-00000000000000000000000000000000-12", "rsv-nope"] {
        let status = reservations
            .settle(settle_request(id, 1))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
}

/// In upstream's key layout the counters are upstream's: reservations are
/// refused clearly and nothing is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_key_layout_refuses_reservations_clearly() {
    use ratekeeper::clock::Clock;
    use ratekeeper::store::envoy_layout::EnvoyLayout;

    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock::new(T0));
    let store = redis_store(&redis.url(), Duration::from_secs(2))
        .with_clock(clock.clone() as Arc<dyn Clock>)
        .with_envoy_layout(EnvoyLayout::new("p_", clock.clone(), 0));
    let server = TestServer::with(rules(&[RULES]), Arc::new(store)).await;
    let channel = server.channel().await;
    let mut limiter = RateLimiterClient::new(channel.clone());
    let status = limiter
        .should_allow(reserve_request(&[SMALL], 4, MINUTE))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("key layout"), "{status:?}");
    let settle = ReservationServiceClient::new(channel)
        .settle(settle_request("rsv-00000000000000000000000000000000", 1))
        .await
        .unwrap_err();
    assert_eq!(settle.code(), Code::FailedPrecondition, "{settle:?}");
    let dry = ShouldAllowRequest {
        dry_run: true,
        ..allow_request("llm", &[SMALL], 1)
    };
    let left = limiter.should_allow(dry).await.unwrap().into_inner();
    assert_eq!(left.results[0].remaining, 10);
}

/// `ReservationService` is reported by gRPC health with the other services
/// and listed by reflection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_know_the_service() {
    use futures::StreamExt;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let f = fixture(Backend::Memory).await;
    let channel = f.harness.server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: "ratekeeper.v1.ReservationService".into(),
            })
            .await
            .map(|r| r.into_inner().status());
        if matches!(status, Ok(ServingStatus::Serving)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
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
            .any(|s| s.name == "ratekeeper.v1.ReservationService"),
        "{list:?}"
    );
}

both_stores!(
    concurrent_reserve_and_settle_charge_exactly_the_settled_costs,
    a_retried_settle_answers_the_same_and_changes_nothing,
    an_extra_charge_is_added_without_an_admission_check,
    an_unsettled_reservation_stays_charged_at_its_estimate,
    a_refund_is_floored_at_zero,
    admission_counts_outstanding_reservations,
    every_limit_of_a_descriptor_is_settled,
    an_unmatched_request_gets_a_reservation_that_settles,
    bad_input_is_refused_and_changes_nothing,
);

/// The real binary: `--max-reservation-ttl` shortens reservations, the
/// `ReservationService` is served next to `ShouldAllow`, and a bad value is
/// refused at startup naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_reservations_with_its_flags() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("llm.yaml");
    std::fs::write(&config, RULES).unwrap();
    let config = config.to_str().unwrap();

    let mut serve = Serve::start(config, &["--max-reservation-ttl", "2s"]);
    let mut limiter = serve.client().await;
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", serve.grpc_port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reservations = ReservationServiceClient::new(channel);
    let reserved = limiter
        .should_allow(reserve_request(&[SMALL], 5, Duration::from_secs(3_600)))
        .await
        .unwrap()
        .into_inner();
    assert!(reserved.allowed);
    assert_eq!(reserved.reservation_ttl.as_ref().map(ms), Some(2_000));
    let settled = settle_ok(&mut reservations, &reserved.reservation_id, 1).await;
    assert_eq!(settled.status(), SettleStatus::Settled);
    serve.terminate().await;

    let refused = std::process::Command::new(BIN)
        .args(["serve", "--config", config, "--max-reservation-ttl", "0s"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--max-reservation-ttl"), "{stderr}");
}
