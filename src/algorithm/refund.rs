//! Refunds: hits taken back from a counter (Envoy's `is_negative_hits` on a
//! counting rule), never below zero.
//!
//! The window algorithms lower the count of the window `now` falls in (a
//! refund arriving in the next window has nothing left to take back there:
//! that window's count is its own); the token bucket lowers its level,
//! giving the tokens back. A refund never creates state and never extends
//! a counter's life: the stored expiry stays (the token bucket's, which is
//! the time its level drains, can only come sooner).

use super::{AlgorithmKind, Quota, Stored, window_counts, with_window_count};

/// The state after taking `hits` back from `stored` at `now_ms`; `None`
/// when nothing changes (no state, or nothing counted to take back).
pub fn refund(
    algorithm: AlgorithmKind,
    quota: &Quota,
    stored: Option<Stored>,
    hits: u64,
    now_ms: u64,
) -> Option<Stored> {
    let stored = stored?;
    match algorithm {
        AlgorithmKind::FixedWindow | AlgorithmKind::SlidingWindow => {
            let w = quota.window_ms;
            let start = now_ms - now_ms % w;
            let (count, _) = window_counts(stored.state, start, w);
            if count == 0 || hits == 0 {
                return None;
            }
            Some(Stored {
                state: with_window_count(stored.state, start, w, count.saturating_sub(hits)),
                expires_at_ms: stored.expires_at_ms,
            })
        }
        AlgorithmKind::TokenBucket => {
            let window = quota.window_ms;
            let drain_per_ms = quota.limit.max(1);
            let capacity = quota.burst.saturating_mul(window);
            let [level, measured, _] = stored.state;
            let drained = now_ms.saturating_sub(measured).saturating_mul(drain_per_ms);
            let level = level.min(capacity).saturating_sub(drained);
            if level == 0 || hits == 0 {
                return None;
            }
            let after = level.saturating_sub(hits.saturating_mul(window));
            Some(Stored {
                state: [after, now_ms, 0],
                expires_at_ms: now_ms + after.div_ceil(drain_per_ms),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Quota = Quota {
        limit: 5,
        window_ms: 60_000,
        burst: 5,
    };
    const T: u64 = 1_700_000_040_000;

    fn count(algorithm: AlgorithmKind, hits: u64) -> Stored {
        algorithm.algorithm().evaluate(&Q, [0; 3], hits, T).admitted
    }

    #[test]
    fn windows_take_back_from_the_current_window_floored_at_zero() {
        for algorithm in [AlgorithmKind::FixedWindow, AlgorithmKind::SlidingWindow] {
            let three = count(algorithm, 3);
            let one = refund(algorithm, &Q, Some(three), 2, T + 1).unwrap();
            let eval = algorithm.algorithm().evaluate(&Q, one.state, 4, T + 2);
            assert!(eval.outcome.allowed, "{algorithm:?}: 1 + 4 fits 5");
            assert_eq!(eval.outcome.remaining, 0);
            let zero = refund(algorithm, &Q, Some(three), 10, T + 1).unwrap();
            assert_eq!(window_counts(zero.state, T - T % 60_000, 60_000).0, 0);
            assert_eq!(zero.expires_at_ms, three.expires_at_ms);
            assert_eq!(refund(algorithm, &Q, Some(zero), 1, T + 1), None);
            assert_eq!(refund(algorithm, &Q, None, 1, T), None);
            // The next window's count is its own: nothing to take back.
            assert_eq!(refund(algorithm, &Q, Some(three), 1, T + 60_000), None);
        }
    }

    #[test]
    fn the_token_bucket_gives_tokens_back() {
        let three = count(AlgorithmKind::TokenBucket, 3);
        let one = refund(AlgorithmKind::TokenBucket, &Q, Some(three), 2, T).unwrap();
        let eval = AlgorithmKind::TokenBucket
            .algorithm()
            .evaluate(&Q, one.state, 4, T);
        assert!(eval.outcome.allowed);
        assert_eq!(eval.outcome.remaining, 0);
        let empty = refund(AlgorithmKind::TokenBucket, &Q, Some(three), 9, T).unwrap();
        assert_eq!(empty.state[0], 0);
        assert_eq!(empty.expires_at_ms, T);
    }
}
