//! The Lua scripts against their Rust twins: the memory store (which runs the
//! Rust algorithms) and the Redis store (which runs the Lua ones) are driven
//! with the same seeded random sequence of (time, batch of hits, mode) and
//! must return identical decisions, remaining counts, reset and retry times
//! at every step. Time is injected into both.
//!
//! Set `EQUIVALENCE_SEED` to replay a failure; the seed is in every message.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{RedisServer, redis_store};
use ratekeeper::algorithm::{AlgorithmKind, BatchHit, Mode, Quota};
use ratekeeper::clock::{Clock, ManualClock, SystemClock};
use ratekeeper::store::{CounterStore, MemoryStore};

const STEPS: usize = 1_500;
const DEFAULT_SEED: u64 = 0x5EED_CAFE_F00D;

/// splitmix64: small, seedable, good enough to pick test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One counter of the sequence: a key with its algorithm and quota.
struct Counter {
    key: Vec<u8>,
    algorithm: AlgorithmKind,
    quota: Quota,
}

fn counters(rng: &mut Rng, kinds: &[AlgorithmKind]) -> Vec<Counter> {
    (0..4)
        .map(|i| {
            let algorithm = kinds[i % kinds.len()];
            let limit = 1 + rng.below(12);
            let window_ms = [1_000, 2_000, 5_000, 10_000, 60_000][rng.below(5) as usize];
            let burst = match algorithm {
                AlgorithmKind::TokenBucket => 1 + rng.below(20),
                _ => limit,
            };
            Counter {
                key: format!("equivalence:{i}:{}", algorithm.tag()).into_bytes(),
                algorithm,
                quota: Quota {
                    limit,
                    window_ms,
                    burst,
                },
            }
        })
        .collect()
}

async fn run_sequence(kinds: &[AlgorithmKind]) {
    let seed = std::env::var("EQUIVALENCE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let mut rng = Rng(seed);
    let counters = counters(&mut rng, kinds);

    // Virtual time runs ahead of real time, never behind it, so a Redis key
    // (whose expiry runs in real time) is never gone while still needed.
    let clock = Arc::new(ManualClock::new(0));
    let mut offset = 0;
    let redis = RedisServer::start();
    let memory = MemoryStore::new(1_000, clock.clone());
    let lua = redis_store(&redis.url(), Duration::from_secs(5))
        .with_clock(clock.clone() as Arc<dyn Clock>);

    let modes = [
        Mode::Independent,
        Mode::AllOrNothing,
        Mode::DryRun,
        Mode::StopIncrementWhenOverLimit,
    ];
    let mut decisions = [0usize; 2];
    for step in 0..STEPS {
        let longest = counters.iter().map(|c| c.quota.window_ms).max().unwrap();
        offset += match rng.below(10) {
            0..=3 => 0,
            4..=7 => rng.below(longest / 4),
            8 => rng.below(longest),
            _ => rng.below(3 * longest),
        };
        clock.set(SystemClock.now_ms() + offset);

        let batch: Vec<BatchHit<'_>> = (0..1 + rng.below(3))
            .map(|_| {
                let counter = &counters[rng.below(counters.len() as u64) as usize];
                BatchHit {
                    key: &counter.key,
                    algorithm: counter.algorithm,
                    quota: counter.quota,
                    hits: rng.below(counter.quota.burst.max(counter.quota.limit) + 3),
                    enforced: rng.below(8) != 0,
                    failure_policy: Default::default(),
                }
            })
            .collect();
        let mode = modes[rng.below(4) as usize];

        let rust = memory.apply(&batch, mode).await.unwrap();
        let script = lua.apply(&batch, mode).await.unwrap();
        assert_eq!(
            rust,
            script,
            "seed {seed}, step {step}, now {}, mode {mode:?}, batch {batch:?}",
            clock.now_ms()
        );
        for outcome in &rust {
            decisions[usize::from(outcome.allowed)] += 1;
        }
    }
    // The sequence must exercise both answers, or it proves little.
    assert!(
        decisions[0] > STEPS / 10 && decisions[1] > STEPS / 10,
        "seed {seed}: {decisions:?}"
    );
}

#[tokio::test]
async fn fixed_window_lua_matches_rust() {
    run_sequence(&[AlgorithmKind::FixedWindow]).await;
}

#[tokio::test]
async fn sliding_window_lua_matches_rust() {
    run_sequence(&[AlgorithmKind::SlidingWindow]).await;
}

#[tokio::test]
async fn token_bucket_lua_matches_rust() {
    run_sequence(&[AlgorithmKind::TokenBucket]).await;
}

#[tokio::test]
async fn mixed_batches_lua_matches_rust() {
    run_sequence(&[
        AlgorithmKind::FixedWindow,
        AlgorithmKind::SlidingWindow,
        AlgorithmKind::TokenBucket,
    ])
    .await;
}
