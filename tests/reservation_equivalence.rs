//! The Lua settle against its Rust twin: the memory store (which runs the
//! Rust settle, `reservation::adjust`) and the Redis store (which runs
//! `settle.lua`) are driven with the same seeded random sequence of time
//! steps, reservations over every algorithm, settles (refunds, extra
//! charges, retries, conflicting retries, late settles) and reservations
//! left to expire, and must give identical answers at every step: each
//! reservation's decision, each settle's result, and every counter's state
//! as a check reads it. Time is injected into both, so a seed replays
//! exactly.
//!
//! Set `EQUIVALENCE_SEED` to replay a failure; the seed is in every message.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{RedisServer, redis_store};
use ratekeeper::algorithm::{AlgorithmKind, BatchHit, Mode, Quota};
use ratekeeper::clock::{Clock, ManualClock};
use ratekeeper::reservation::{ReservationError, Settled};
use ratekeeper::store::{CounterStore, MemoryStore};

const STEPS: usize = 800;
const DEFAULT_SEED: u64 = 0x5E77_1E5E_ED00;
const TIME_BASE: u64 = 1_700_000_000_000;
/// Retries of a settle stay within the tombstone's life in both stores.
const RETRY_WITHIN_MS: u64 = 5 * 60 * 1_000;

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

struct Counter {
    key: Vec<u8>,
    algorithm: AlgorithmKind,
    quota: Quota,
}

fn counters() -> Vec<Counter> {
    let mut all = Vec::new();
    for (algorithm, tag) in [
        (AlgorithmKind::FixedWindow, "fw"),
        (AlgorithmKind::SlidingWindow, "sw"),
        (AlgorithmKind::TokenBucket, "tb"),
    ] {
        for (n, (limit, window_ms, burst)) in
            [(40, 1_000, 40), (25, 10_000, 60)].into_iter().enumerate()
        {
            let burst = if algorithm == AlgorithmKind::TokenBucket {
                burst
            } else {
                limit
            };
            all.push(Counter {
                key: format!("rk4:{{eq}}:{tag}:{n}").into_bytes(),
                algorithm,
                quota: Quota {
                    limit,
                    window_ms,
                    burst,
                },
            });
        }
    }
    all
}

/// A reservation made in both stores, by its two ids.
struct Pair {
    memory: String,
    redis: String,
    /// When and at what it was settled, if it was.
    settled: Option<(u64, u64)>,
}

/// What a settle answered, comparable across stores (ids differ).
fn shape(result: &Result<Settled, ReservationError>) -> String {
    match result {
        Ok(settled) => format!("{settled:?}"),
        Err(ReservationError::NotFound(_)) => "not found".to_owned(),
        Err(ReservationError::Conflict { settled, .. }) => format!("conflict at {settled}"),
        Err(other) => format!("error {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lua_settle_matches_the_rust_settle() {
    let seed = std::env::var("EQUIVALENCE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let mut rng = Rng(seed);
    let clock = Arc::new(ManualClock::new(TIME_BASE));
    let memory = MemoryStore::new(10_000, clock.clone());
    let server = RedisServer::start();
    let redis = redis_store(&server.url(), Duration::from_secs(5))
        .with_clock(clock.clone() as Arc<dyn Clock>);
    let (m, r) = (
        memory.reservations().unwrap(),
        redis.reservations().unwrap(),
    );
    let counters = counters();
    let mut pairs: Vec<Pair> = Vec::new();
    let mut seen = std::collections::HashSet::new();

    for step in 0..STEPS {
        let at = |what: &str| format!("seed {seed} step {step}: {what}");
        clock.advance(match rng.below(6) {
            0 | 1 => 0,
            2 => rng.below(300),
            3 => rng.below(3_000),
            4 => rng.below(12_000),
            _ => 1_000,
        });
        let now = clock.now_ms();
        let settleable: Vec<usize> = (0..pairs.len())
            .filter(|&i| {
                pairs[i]
                    .settled
                    .is_none_or(|(when, _)| now - when < RETRY_WITHIN_MS)
            })
            .collect();
        if settleable.is_empty() || rng.below(2) == 0 {
            // Reserve on one to three counters.
            let count = 1 + rng.below(3) as usize;
            let estimate = 1 + rng.below(20);
            let hits: Vec<BatchHit<'_>> = (0..count)
                .map(|_| {
                    let c = &counters[rng.below(counters.len() as u64) as usize];
                    BatchHit {
                        key: &c.key,
                        algorithm: c.algorithm,
                        quota: c.quota,
                        hits: estimate,
                        enforced: true,
                    }
                })
                .collect();
            let ttl = 200 + rng.below(60_000);
            let a = m
                .reserve("eq", estimate, &hits, ttl)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", at("memory reserve")));
            let b = r
                .reserve("eq", estimate, &hits, ttl)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", at("redis reserve")));
            assert_eq!(a.outcomes, b.outcomes, "{}", at("reserve outcomes"));
            assert_eq!(a.grant.is_some(), b.grant.is_some(), "{}", at("granted"));
            if let (Some(a), Some(b)) = (a.grant, b.grant) {
                assert_eq!(a.ttl_ms, b.ttl_ms, "{}", at("ttl"));
                pairs.push(Pair {
                    memory: a.id,
                    redis: b.id,
                    settled: None,
                });
            }
        } else {
            // Mostly recent ones (open), sometimes any (expired, retries).
            let back = if rng.below(4) == 0 {
                settleable.len()
            } else {
                settleable.len().min(4)
            };
            let i = settleable[settleable.len() - 1 - rng.below(back as u64) as usize];
            let pair = &mut pairs[i];
            // A retry mostly repeats the settled cost, sometimes not.
            let actual = match pair.settled {
                Some((_, cost)) if rng.below(4) != 0 => cost,
                _ => rng.below(45),
            };
            let a = m.settle("eq", &pair.memory, actual).await;
            let b = r.settle("eq", &pair.redis, actual).await;
            assert_eq!(shape(&a), shape(&b), "{}", at("settle"));
            let kind = shape(&a);
            seen.insert(kind.split([' ', '{']).next().unwrap_or_default().to_owned());
            if let Ok(s) = &a {
                seen.insert(format!("{:?}", s.actual.cmp(&s.estimate)));
                seen.insert(format!("{:?}", s.status));
            }
            if pair.settled.is_none() && a.is_ok() {
                pair.settled = Some((now, actual));
            }
        }
        // Every counter reads the same in both.
        let checks: Vec<BatchHit<'_>> = counters
            .iter()
            .map(|c| BatchHit {
                key: &c.key,
                algorithm: c.algorithm,
                quota: c.quota,
                hits: 1,
                enforced: true,
            })
            .collect();
        for check in &checks {
            let one = std::slice::from_ref(check);
            let a = memory.apply(one, Mode::DryRun).await.unwrap();
            let b = redis.apply(one, Mode::DryRun).await.unwrap();
            assert_eq!(a, b, "{}", at(&String::from_utf8_lossy(check.key)));
        }
    }
    // The sequence did what it is for: every kind of answer, refunds and
    // extra charges.
    for kind in [
        "Settled",
        "AlreadySettled",
        "not",
        "conflict",
        "Less",
        "Greater",
    ] {
        assert!(seen.contains(kind), "seed {seed}: no {kind} in {seen:?}");
    }
    let settled = pairs.iter().filter(|p| p.settled.is_some()).count();
    assert!(
        settled > 50 && pairs.len() > settled,
        "{settled} of {}",
        pairs.len()
    );
}
