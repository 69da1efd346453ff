//! The Lua scripts against their Rust twins: the memory store (which runs the
//! Rust algorithms) and the Redis store (which runs the Lua ones) are driven
//! with the same seeded random sequence of (time, batch of hits, mode, rule
//! changes) and must return identical decisions, remaining counts, reset and
//! retry times at every step. Time is injected into both from a fixed base,
//! so a seed replays exactly.
//!
//! The sequence reaches the numeric edges: limits up to `u32::MAX` (and up to
//! the exact-in-doubles bound `MAX_SCALED` for the scaled algorithms), hour
//! and day windows, costs up to `u32::MAX`, and rules that change under a
//! live key between steps — the limit (as a reload does) and, rarely, the
//! algorithm or window, so every algorithm meets every other's state.
//!
//! Set `EQUIVALENCE_SEED` to replay a failure; the seed is in every message.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{RedisServer, redis_store};
use ratekeeper::algorithm::{AlgorithmKind, BatchHit, MAX_SCALED, Mode, Quota};
use ratekeeper::clock::{Clock, ManualClock};
use ratekeeper::store::{CounterStore, MemoryStore};

const STEPS: usize = 1_500;
const DEFAULT_SEED: u64 = 0x5EED_CAFE_F00D;
/// Virtual time starts here, whatever the machine's clock says.
const TIME_BASE: u64 = 1_700_000_000_000;
const WINDOWS: [u64; 7] = [1_000, 2_000, 5_000, 10_000, 60_000, 3_600_000, 86_400_000];
const KINDS: [AlgorithmKind; 3] = [
    AlgorithmKind::FixedWindow,
    AlgorithmKind::SlidingWindow,
    AlgorithmKind::TokenBucket,
];

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

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// One counter of the sequence: a key (named after its algorithm and window,
/// as production keys are) with its current rule.
struct Counter {
    id: usize,
    key: Vec<u8>,
    algorithm: AlgorithmKind,
    quota: Quota,
}

/// A rule the loader would accept: mostly small numbers (so both answers
/// happen), sometimes the largest limit the algorithm allows.
fn rule(rng: &mut Rng, algorithm: AlgorithmKind, window_ms: u64) -> Quota {
    let most = match algorithm {
        AlgorithmKind::FixedWindow => u64::from(u32::MAX),
        _ => (MAX_SCALED / window_ms).min(u64::from(u32::MAX)),
    };
    let mut pick = |small: u64| {
        if rng.one_in(12) {
            most - rng.below(3)
        } else {
            (1 + rng.below(small)).min(most)
        }
    };
    let limit = pick(12);
    let burst = match algorithm {
        AlgorithmKind::TokenBucket => pick(20),
        _ => limit,
    };
    Quota {
        limit,
        window_ms,
        burst,
    }
}

fn counters(rng: &mut Rng, kinds: &[AlgorithmKind]) -> Vec<Counter> {
    (0..4)
        .map(|i| {
            let algorithm = kinds[i % kinds.len()];
            let window_ms = WINDOWS[rng.below(WINDOWS.len() as u64) as usize];
            Counter {
                id: i,
                key: counter_key(i, algorithm, window_ms),
                algorithm,
                quota: rule(rng, algorithm, window_ms),
            }
        })
        .collect()
}

fn counter_key(id: usize, algorithm: AlgorithmKind, window_ms: u64) -> Vec<u8> {
    format!("equivalence:{id}|{}|{window_ms}", algorithm.tag()).into_bytes()
}

/// Changes a counter's rule under its live key: usually only the limit (what
/// a reload does), sometimes the window or the algorithm too (a new key).
fn change_rule(rng: &mut Rng, counter: &mut Counter, kinds: &[AlgorithmKind]) {
    if rng.one_in(4) {
        counter.algorithm = kinds[rng.below(kinds.len() as u64) as usize];
    }
    let window_ms = if rng.one_in(4) {
        WINDOWS[rng.below(WINDOWS.len() as u64) as usize]
    } else {
        counter.quota.window_ms
    };
    counter.quota = rule(rng, counter.algorithm, window_ms);
    counter.key = counter_key(counter.id, counter.algorithm, window_ms);
}

async fn run_sequence(kinds: &[AlgorithmKind]) {
    let seed = std::env::var("EQUIVALENCE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let mut rng = Rng(seed);
    let mut counters = counters(&mut rng, kinds);

    let clock = Arc::new(ManualClock::new(TIME_BASE));
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
        if rng.one_in(40) {
            let i = rng.below(counters.len() as u64) as usize;
            change_rule(&mut rng, &mut counters[i], kinds);
        }
        let longest = counters.iter().map(|c| c.quota.window_ms).max().unwrap();
        clock.advance(match rng.below(10) {
            0..=3 => 0,
            4..=7 => rng.below(longest / 4),
            8 => rng.below(longest),
            _ => rng.below(3 * longest),
        });

        let batch: Vec<BatchHit<'_>> = (0..1 + rng.below(3))
            .map(|_| {
                let counter = &counters[rng.below(counters.len() as u64) as usize];
                let capacity = counter.quota.burst.max(counter.quota.limit);
                let hits = if rng.one_in(30) {
                    u64::from(u32::MAX) - rng.below(2)
                } else {
                    rng.below(capacity.min(20) + 3)
                };
                BatchHit {
                    key: &counter.key,
                    algorithm: counter.algorithm,
                    quota: counter.quota,
                    hits,
                    enforced: rng.below(8) != 0,
                }
            })
            .collect();
        let mode = modes[rng.below(4) as usize];

        let rust = memory.apply(&batch, mode).await.unwrap();
        let script = lua.apply(&batch, mode).await.unwrap();
        let context = || {
            format!(
                "seed {seed}, step {step}, now {}, mode {mode:?}, batch {batch:?}",
                clock.now_ms()
            )
        };
        assert_eq!(rust, script, "{}", context());
        for (hit, outcome) in batch.iter().zip(&rust) {
            assert!(
                outcome.remaining <= hit.quota.burst.max(hit.quota.limit),
                "{outcome:?}: {}",
                context()
            );
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
    run_sequence(&KINDS).await;
}
