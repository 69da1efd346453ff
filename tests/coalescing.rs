//! Coalesced Redis calls keep every decision's own semantics: 64 concurrent
//! decisions in every mode, held back until all are queued so that they
//! reach Redis as a few calls, answer exactly as one-at-a-time decisions
//! would (the memory store, which never coalesces, runs the same scenario).
//! Also: a Redis that refuses `FUNCTION` is served through `EVALSHA`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::coalescing::{CALLERS, Phase, decisions_keep_their_semantics};
use common::{RedisServer, T0};
use ratekeeper::clock::{Clock, ManualClock};
use ratekeeper::store::redis::RedisSettings;
use ratekeeper::store::{CounterStore, MemoryStore, RedisStore};

/// Lanes (connections) of the Redis store in these tests.
const LANES: usize = 2;

fn store_on(url: String) -> RedisStore {
    RedisStore::new(&RedisSettings {
        pool_size: LANES,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_millis(500),
        ..RedisSettings::new(url)
    })
    .unwrap()
    .with_clock(Arc::new(ManualClock::new(T0)) as Arc<dyn Clock>)
}

fn calls(redis: &RedisServer, command: &str) -> u64 {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.connection())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

fn reset_stats(redis: &RedisServer) {
    ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(&mut redis.connection())
        .unwrap();
}

fn key(name: &str) -> Vec<u8> {
    format!("coalesce:{{{name}}}|fw|60000").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_keeps_each_decisions_semantics() {
    let store = MemoryStore::new(10_000, Arc::new(ManualClock::new(T0)));
    decisions_keep_their_semantics(&store, key, |_| {}).await;
}

/// Held while all 64 are queued, the decisions reach Redis as two calls on
/// one connection (the first decision's, sent as Redis was held, and one
/// with everything queued behind it: a connection whose call is out, but
/// not late, keeps the traffic, so calls are as full as they can be) — and
/// each keeps its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_redis_calls_keep_each_decisions_semantics() {
    let redis = RedisServer::start();
    let store = store_on(redis.url());
    let fcalls = AtomicU64::new(0);
    decisions_keep_their_semantics(&store, key, |phase| match phase {
        Phase::Queueing => {
            reset_stats(&redis);
            redis.pause();
        }
        Phase::Queued => redis.resume(),
        Phase::Answered => fcalls.store(calls(&redis, "fcall"), Ordering::Relaxed),
    })
    .await;
    let fcalls = fcalls.into_inner();
    assert!(
        (1..=2).contains(&fcalls),
        "{fcalls} calls for {CALLERS} decisions"
    );
    assert_eq!(calls(&redis, "evalsha"), 0);
}

/// Where `FUNCTION` is refused (here by an ACL, as managed Redis services
/// do; Redis before 7 has no functions at all), the same code runs as a
/// script through `EVALSHA`, coalesced just the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_functions_is_served_through_evalsha() {
    let redis = RedisServer::start_with(&[
        "--user",
        "default",
        "on",
        "nopass",
        "~*",
        "+@all",
        "-function",
    ]);
    let refused = ::redis::cmd("FUNCTION")
        .arg("LIST")
        .query::<::redis::Value>(&mut redis.connection());
    assert!(refused.is_err(), "the ACL must refuse FUNCTION");
    let store = store_on(redis.url());
    let scripts = AtomicU64::new(0);
    decisions_keep_their_semantics(&store, key, |phase| match phase {
        Phase::Queueing => {
            reset_stats(&redis);
            redis.pause();
        }
        Phase::Queued => redis.resume(),
        Phase::Answered => scripts.store(calls(&redis, "evalsha"), Ordering::Relaxed),
    })
    .await;
    let scripts = scripts.into_inner();
    assert!((1..=2).contains(&scripts), "{scripts} calls");
    assert_eq!(calls(&redis, "fcall"), 0);
}

/// Envoy's hits on one hot key (a route's limit), 64 at once: one `INCRBY`
/// per call carries them all, and each decision gets the count it would
/// have found alone — exactly the limit passes, and the admitted see every
/// remaining count from the limit down, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_on_one_hot_key_share_one_incrby_and_keep_their_counts() {
    use ratekeeper::algorithm::{AlgorithmKind, BatchHit, Mode, Quota};

    const LIMIT: u64 = 10;
    let redis = RedisServer::start();
    let store = store_on(redis.url());
    let hot = key("route");
    let hit = BatchHit {
        key: &hot,
        algorithm: AlgorithmKind::FixedWindow,
        quota: Quota {
            limit: LIMIT,
            window_ms: 60_000,
            burst: LIMIT,
        },
        hits: 1,
        enforced: true,
    };
    // Up first, so the 64 below go out together behind a held Redis.
    store.apply(&[hit], Mode::Independent).await.unwrap();
    reset_stats(&redis);
    redis.pause();
    let decisions = futures::future::join_all(
        (0..CALLERS).map(|_| store.apply(std::slice::from_ref(&hit), Mode::Independent)),
    );
    let resume = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        redis.resume();
    };
    let (answers, ()) = tokio::join!(decisions, resume);
    let mut remaining: Vec<u64> = answers
        .into_iter()
        .map(|answer| answer.unwrap().remove(0))
        .filter(|outcome| outcome.allowed)
        .map(|outcome| outcome.remaining)
        .collect();
    remaining.sort_unstable();
    // The first call took one; the 64 leave 8 down to 0 to the admitted.
    assert_eq!(remaining, (0..LIMIT - 1).collect::<Vec<_>>());
    let fcalls = calls(&redis, "fcall");
    assert!((1..=2).contains(&fcalls), "{fcalls} calls");
    assert_eq!(calls(&redis, "incrby"), fcalls, "one INCRBY per call");
    let windowed = format!("{}|{}", String::from_utf8_lossy(&hot), T0 / 60_000);
    let count: u64 = ::redis::cmd("GET")
        .arg(windowed)
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(
        count,
        1 + CALLERS as u64,
        "every hit counted, denied ones too"
    );
}
