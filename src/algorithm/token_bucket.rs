//! Token bucket with a burst capacity, in GCRA's bucket-level form.
//!
//! The bucket holds up to `burst` tokens and refills continuously at `limit`
//! tokens per window. Equivalently (and how it is computed): a "level" of
//! spent capacity that drains over time — GCRA's theoretical arrival time,
//! measured from now. To stay exact in integers, one token is `window_ms`
//! units and the level drains `limit` units per millisecond, so no fraction
//! ever appears; the loader keeps `burst × window_ms` ≤ 2^53 so the Lua twin
//! computes the same numbers with doubles.
//!
//! State: `[level, measured_at_ms, 0]`. Rejected hits take no tokens. A
//! level above today's capacity (the burst or limit was lowered by a reload)
//! reads as an empty bucket that refills from the moment it was measured; a
//! measurement from the future (the clock stepped back) drains nothing and
//! is re-measured at now: the count is kept, and the bucket never waits for
//! the clock to catch up.

use super::{Algorithm, Evaluation, Outcome, Quota, State, Stored};

/// The token bucket algorithm.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenBucket;

impl Algorithm for TokenBucket {
    fn evaluate(&self, quota: &Quota, state: State, hits: u64, now_ms: u64) -> Evaluation {
        let window = quota.window_ms;
        // The loader refuses a zero refill for token buckets; never divide by 0.
        let drain_per_ms = quota.limit.max(1);
        let capacity = quota.burst.saturating_mul(window);

        let drained = now_ms.saturating_sub(state[1]).saturating_mul(drain_per_ms);
        let level = state[0].min(capacity).saturating_sub(drained);
        let need = hits.saturating_mul(window);
        let allowed = level.saturating_add(need) <= capacity;
        let level_after = if allowed { level + need } else { level };

        let retry_after_ms = if allowed || hits > quota.burst {
            None
        } else {
            // Drain until the hits fit.
            Some((level + need - capacity).div_ceil(drain_per_ms))
        };
        let admitted = level.saturating_add(need).min(capacity);
        Evaluation {
            outcome: Outcome {
                allowed,
                remaining: (capacity - level_after) / window,
                // Until the bucket is full again.
                reset_after_ms: level_after.div_ceil(drain_per_ms),
                retry_after_ms,
                used_before: level.div_ceil(window),
            },
            admitted: Stored {
                state: [admitted, now_ms, 0],
                expires_at_ms: now_ms + admitted.div_ceil(drain_per_ms),
            },
            rejected: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// 2 tokens per second, bucket of 5.
    const Q: Quota = Quota {
        limit: 2,
        window_ms: 1_000,
        burst: 5,
    };
    const T: u64 = 1_700_000_000_000;

    fn run(quota: &Quota, state: &mut State, now: u64, hits: u64) -> Outcome {
        let eval = TokenBucket.evaluate(quota, *state, hits, now);
        if eval.outcome.allowed {
            *state = eval.admitted.state;
        }
        eval.outcome
    }

    #[test]
    fn a_full_bucket_allows_the_burst_then_refills_at_the_rate() {
        let mut state = [0; 3];
        let o = run(&Q, &mut state, T, 5);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        // Full again after 5 tokens at 2 per second.
        assert_eq!(o.reset_after_ms, 2_500);
        let o = run(&Q, &mut state, T, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after_ms, Some(500));
        assert!(!run(&Q, &mut state, T + 499, 1).allowed);
        let o = run(&Q, &mut state, T + 500, 1);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        // Two seconds later four tokens are back.
        let o = run(&Q, &mut state, T + 2_500, 4);
        assert!(o.allowed, "{o:?}");
        assert_eq!((o.remaining, o.reset_after_ms), (0, 2_500));
    }

    #[test]
    fn fractional_refill_is_exact() {
        // 3 tokens per second: one every 333.3 ms.
        let q = Quota {
            limit: 3,
            window_ms: 1_000,
            burst: 1,
        };
        let mut state = [0; 3];
        assert!(run(&q, &mut state, T, 1).allowed);
        let o = run(&q, &mut state, T, 1);
        assert_eq!(o.retry_after_ms, Some(334));
        assert!(!run(&q, &mut state, T + 333, 1).allowed);
        assert!(run(&q, &mut state, T + 334, 1).allowed);
    }

    #[test]
    fn a_cost_above_the_burst_never_passes() {
        let o = TokenBucket.evaluate(&Q, [0; 3], 6, T).outcome;
        assert!(!o.allowed);
        assert_eq!(o.retry_after_ms, None);
        assert_eq!(o.remaining, 5);
    }

    #[test]
    fn the_state_expires_when_the_bucket_is_full_again() {
        let eval = TokenBucket.evaluate(&Q, [0; 3], 3, T);
        assert_eq!(eval.admitted.expires_at_ms, T + 1_500);
        // After that, the old state is as good as none.
        let later = TokenBucket.evaluate(&Q, eval.admitted.state, 5, T + 1_500);
        assert_eq!(
            later.outcome,
            TokenBucket.evaluate(&Q, [0; 3], 5, T + 1_500).outcome
        );
    }

    #[test]
    fn a_lowered_burst_reads_an_overfull_bucket_as_empty() {
        // 100 per hour, used up; then reloaded as 50 per hour.
        let before = Quota {
            limit: 100,
            window_ms: 3_600_000,
            burst: 100,
        };
        let after = Quota {
            limit: 50,
            window_ms: 3_600_000,
            burst: 50,
        };
        let mut state = [0; 3];
        assert!(run(&before, &mut state, T, 100).allowed);
        let o = TokenBucket.evaluate(&after, state, 1, T).outcome;
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        // Empty under the new rule, refilling at 50 per hour: one token
        // every 72 s.
        assert_eq!(o.retry_after_ms, Some(72_000));
        assert_eq!(o.reset_after_ms, 3_600_000);
        assert!(
            TokenBucket
                .evaluate(&after, state, 1, T + 72_000)
                .outcome
                .allowed
        );
    }

    #[test]
    fn a_measurement_from_the_future_keeps_its_level() {
        let mut state = [0; 3];
        assert!(run(&Q, &mut state, T, 5).allowed);
        // The clock steps back 10 s: the bucket is still empty.
        let o = TokenBucket.evaluate(&Q, state, 1, T - 10_000).outcome;
        assert!(!o.allowed);
        assert_eq!(o.retry_after_ms, Some(500));
    }

    proptest! {
        /// Invariant: in any interval of length t, at most `burst + rate × t`
        /// hits are admitted (rate = limit / window), i.e.
        /// `admitted × window ≤ burst × window + limit × t`.
        #[test]
        fn never_more_than_burst_plus_rate_times_t(
            limit in 1u64..20,
            window_s in 1u64..10,
            burst in 1u64..30,
            raw in proptest::collection::vec((0u64..30_000, 0u64..8), 1..150),
        ) {
            let quota = Quota { limit, window_ms: window_s * 1000, burst };
            let mut steps: Vec<(u64, u64)> = raw.into_iter().map(|(t, h)| (T + t, h)).collect();
            steps.sort_by_key(|s| s.0);
            let mut state = [0; 3];
            let admitted: Vec<(u64, u64)> = steps
                .iter()
                .filter_map(|&(now, hits)| run(&quota, &mut state, now, hits).allowed.then_some((now, hits)))
                .collect();
            for (i, &(from, _)) in admitted.iter().enumerate() {
                let mut total = 0;
                for &(to, hits) in &admitted[i..] {
                    total += hits;
                    prop_assert!(total * quota.window_ms <= burst * quota.window_ms + limit * (to - from));
                }
            }
        }

        /// Invariant: `retry_after` is exact.
        #[test]
        fn retry_after_is_exact(
            limit in 1u64..20,
            window_s in 1u64..10,
            burst in 1u64..30,
            raw in proptest::collection::vec((0u64..10_000, 1u64..8), 1..40),
            hits in 1u64..30,
        ) {
            let quota = Quota { limit, window_ms: window_s * 1000, burst };
            let mut steps: Vec<(u64, u64)> = raw.into_iter().map(|(t, h)| (T + t, h)).collect();
            steps.sort_by_key(|s| s.0);
            let mut state = [0; 3];
            for &(now, h) in &steps {
                run(&quota, &mut state, now, h);
            }
            let now = steps.last().unwrap().0;
            let o = TokenBucket.evaluate(&quota, state, hits, now).outcome;
            match o.retry_after_ms {
                Some(wait) => {
                    prop_assert!(!TokenBucket.evaluate(&quota, state, hits, now + wait - 1).outcome.allowed);
                    prop_assert!(TokenBucket.evaluate(&quota, state, hits, now + wait).outcome.allowed);
                }
                None => prop_assert!(o.allowed || hits > burst),
            }
        }
    }
}
