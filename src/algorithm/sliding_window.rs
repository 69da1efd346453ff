//! Sliding window: the weighted two-window counter.
//!
//! Windows are aligned to the Unix epoch like the fixed window, but a hit is
//! judged against an estimate of the last full window's worth of traffic:
//! `previous × (window − elapsed) / window + current`. The previous window's
//! count fades out linearly as the current one fills, which removes the 2×
//! burst a fixed window allows across a boundary.
//!
//! All arithmetic is exact in integers scaled by the window length (hits ×
//! ms); the loader keeps `limit × window_ms` ≤ 2^53 so the Lua twin computes
//! the same numbers with doubles. State: the counts of the latest window and
//! the one before it (see `window_counts` in the parent module). Rejected
//! hits do not count.

use super::{
    Algorithm, Evaluation, Outcome, Quota, State, Stored, window_counts, with_window_count,
};

/// The sliding window algorithm.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlidingWindow;

impl Algorithm for SlidingWindow {
    fn evaluate(&self, quota: &Quota, state: State, hits: u64, now_ms: u64) -> Evaluation {
        let w = quota.window_ms;
        let start = now_ms - now_ms % w;
        let elapsed = now_ms - start;
        let until_end = start + w - now_ms;
        let (current, previous) = window_counts(state, start, w);

        // Counts from an older rule may exceed today's limit; saturating
        // arithmetic keeps them denying without overflow.
        let capacity = quota.limit.saturating_mul(w);
        let used = previous
            .saturating_mul(w - elapsed)
            .saturating_add(current.saturating_mul(w));
        let need = hits.saturating_mul(w);
        let allowed = used.saturating_add(need) <= capacity;
        let (current_after, used_after) = if allowed {
            (current + hits, used + need)
        } else {
            (current, used)
        };

        let retry_after_ms = if allowed || hits > quota.limit {
            None
        } else if current.saturating_add(hits) <= quota.limit {
            // Admitted once the previous window's share has faded enough,
            // still inside this window.
            let spare = (quota.limit - current - hits) * w;
            Some(until_end - spare / previous)
        } else {
            // Only after the boundary, when this window's count becomes the
            // fading previous one.
            let spare = (quota.limit - hits) * w;
            let into_next = w.saturating_sub(spare / current);
            Some(until_end + into_next)
        };

        // The state matters until every counted hit has faded out.
        let expires_at_ms = |current: u64| {
            if current > 0 {
                start + 2 * w
            } else {
                start + w
            }
        };
        let counted = current.saturating_add(hits);
        let written = with_window_count(state, start, w, counted);
        Evaluation {
            outcome: Outcome {
                allowed,
                remaining: capacity.saturating_sub(used_after) / w,
                reset_after_ms: expires_at_ms(current_after) - now_ms,
                retry_after_ms,
                used_before: used.div_ceil(w),
            },
            admitted: Stored {
                state: written,
                // The latest window's counts fade out a window after it.
                expires_at_ms: written[0] + 2 * w,
            },
            rejected: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// 10 per 10 s.
    const Q: Quota = Quota {
        limit: 10,
        window_ms: 10_000,
        burst: 10,
    };
    /// A boundary of every window that divides 10 s.
    const T: u64 = 1_700_000_000_000;

    /// Applies hits in order, keeping the state as a store would.
    fn run(quota: &Quota, state: &mut State, now: u64, hits: u64) -> Outcome {
        let eval = SlidingWindow.evaluate(quota, *state, hits, now);
        if eval.outcome.allowed {
            *state = eval.admitted.state;
        }
        eval.outcome
    }

    #[test]
    fn the_previous_window_fades_out_linearly() {
        let mut state = [0; 3];
        // Fill the window at its start.
        assert!(run(&Q, &mut state, T, 10).allowed);
        assert!(!run(&Q, &mut state, T + 9_999, 1).allowed);
        // Next window, 0 % elapsed: the previous 10 still weigh fully.
        let o = run(&Q, &mut state, T + 10_000, 1);
        assert!(!o.allowed);
        // First hit fits once 10 × (10 000 − e) / 10 000 ≤ 9, at e = 1 000.
        assert_eq!(o.retry_after_ms, Some(1_000));
        assert!(!run(&Q, &mut state, T + 10_999, 1).allowed);
        let o = run(&Q, &mut state, T + 11_000, 1);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        // Half way: the previous window weighs 5, one counted: 4 more fit.
        let o = run(&Q, &mut state, T + 15_000, 4);
        assert!(o.allowed, "{o:?}");
        assert_eq!(o.remaining, 0);
        assert!(!run(&Q, &mut state, T + 15_000, 1).allowed);
        // Reset: both counts must fade, which ends with the next window.
        assert_eq!(o.reset_after_ms, 15_000);
    }

    #[test]
    fn retry_after_crossing_the_boundary_is_exact() {
        let mut state = [0; 3];
        assert!(run(&Q, &mut state, T + 5_000, 8).allowed);
        // 8 + 3 > 10: not in this window; in the next one 8 × (10 000 − e) /
        // 10 000 + 3 ≤ 10 from e = 1 250.
        let o = run(&Q, &mut state, T + 6_000, 3);
        assert_eq!(o.retry_after_ms, Some(4_000 + 1_250));
        assert!(!run(&Q, &mut state, T + 11_249, 3).allowed);
        assert!(run(&Q, &mut state, T + 11_250, 3).allowed);
    }

    #[test]
    fn a_cost_above_the_limit_never_passes() {
        let o = SlidingWindow.evaluate(&Q, [0; 3], 11, T).outcome;
        assert!(!o.allowed);
        assert_eq!(o.retry_after_ms, None);
        assert_eq!(o.remaining, 10);
    }

    #[test]
    fn state_older_than_the_previous_window_is_forgotten() {
        let mut state = [0; 3];
        assert!(run(&Q, &mut state, T, 10).allowed);
        let o = run(&Q, &mut state, T + 20_000, 10);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
    }

    #[test]
    fn a_backward_clock_step_finds_that_windows_own_count() {
        let mut state = [0; 3];
        assert!(run(&Q, &mut state, T + 9_000, 6).allowed);
        assert!(run(&Q, &mut state, T + 10_000, 4).allowed);
        // Back 1 ms into the first window: its own 6 (and nothing before
        // it) weigh; 4 more fit, a fifth does not.
        let o = run(&Q, &mut state, T + 9_999, 4);
        assert!(o.allowed, "{o:?}");
        assert_eq!(o.remaining, 0);
        assert!(!run(&Q, &mut state, T + 9_999, 1).allowed);
        // Forward again: the second window counts its 4, with the first's
        // 10 fading.
        let o = run(&Q, &mut state, T + 10_000, 1);
        assert!(!o.allowed);
    }

    #[test]
    fn counts_above_a_lowered_limit_deny_and_fade() {
        let mut state = [0; 3];
        assert!(run(&Q, &mut state, T, 10).allowed);
        let lowered = Quota {
            limit: 4,
            window_ms: 10_000,
            burst: 4,
        };
        let o = SlidingWindow
            .evaluate(&lowered, state, 1, T + 1_000)
            .outcome;
        assert_eq!((o.allowed, o.remaining), (false, 0));
        // Next window: 10 × (10 000 − e) + 10 000 ≤ 40 000 from e = 7 000.
        assert_eq!(o.retry_after_ms, Some(9_000 + 7_000));
        assert!(
            !SlidingWindow
                .evaluate(&lowered, state, 1, T + 16_999)
                .outcome
                .allowed
        );
        assert!(
            SlidingWindow
                .evaluate(&lowered, state, 1, T + 17_000)
                .outcome
                .allowed
        );
    }

    /// Sorted times and hits from proptest's raw pairs.
    fn timeline(raw: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        let mut steps: Vec<(u64, u64)> = raw.into_iter().map(|(t, h)| (T + t, h)).collect();
        steps.sort_by_key(|s| s.0);
        steps
    }

    /// Admitted hits per request time, applying `steps` in order.
    fn admitted(quota: &Quota, steps: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut state = [0; 3];
        steps
            .iter()
            .filter_map(|&(now, hits)| {
                run(quota, &mut state, now, hits)
                    .allowed
                    .then_some((now, hits))
            })
            .collect()
    }

    /// Largest sum of admitted hits in any half-open interval of `len` ms.
    fn max_in_any_interval(admitted: &[(u64, u64)], len: u64) -> u64 {
        admitted
            .iter()
            .map(|&(from, _)| {
                admitted
                    .iter()
                    .filter(|(t, _)| *t >= from && *t < from + len)
                    .map(|(_, h)| h)
                    .sum()
            })
            .max()
            .unwrap_or(0)
    }

    proptest! {
        /// Invariant: whatever the traffic, no window-length interval admits
        /// more than twice the limit (and each aligned window at most the limit).
        #[test]
        fn never_more_than_twice_the_limit(
            limit in 1u64..20,
            window_s in 1u64..30,
            raw in proptest::collection::vec((0u64..120_000, 0u64..6), 1..150),
        ) {
            let quota = Quota { limit, window_ms: window_s * 1000, burst: limit };
            let admitted = admitted(&quota, &timeline(raw));
            prop_assert!(max_in_any_interval(&admitted, quota.window_ms) <= 2 * limit);
            for (start, _) in &admitted {
                let aligned = start - start % quota.window_ms;
                let in_window: u64 = admitted.iter().filter(|(t, _)| t - t % quota.window_ms == aligned).map(|(_, h)| h).sum();
                prop_assert!(in_window <= limit);
            }
        }

        /// Invariant: steady traffic (one hit every `gap` ms, at any rate,
        /// since the start of a window) gets at most the limit plus one
        /// admitted in any window-length interval. The one extra is the
        /// estimate's: it assumes the previous window's admitted hits were
        /// spread over all of it, and the first ones cluster at its start, so
        /// one more fits. (Traffic that starts late in a window is not spread
        /// evenly; there only the 2× bound above holds.)
        #[test]
        fn at_most_one_over_the_limit_for_steady_traffic(
            limit in 1u64..20,
            window_s in 1u64..20,
            gap in 1u64..3_000,
            windows_later in 0u64..5,
        ) {
            let quota = Quota { limit, window_ms: window_s * 1000, burst: limit };
            let start = T - T % quota.window_ms + windows_later * quota.window_ms;
            let steps: Vec<(u64, u64)> = (0..400).map(|i| (start + i * gap, 1)).collect();
            let admitted = admitted(&quota, &steps);
            prop_assert!(max_in_any_interval(&admitted, quota.window_ms) <= limit + 1);
        }

        /// Invariant: `retry_after` is exact — one millisecond earlier is still
        /// denied, at `retry_after` the same cost is admitted.
        #[test]
        fn retry_after_is_exact(
            limit in 1u64..20,
            window_s in 1u64..20,
            raw in proptest::collection::vec((0u64..60_000, 1u64..6), 1..40),
            hits in 1u64..20,
        ) {
            let quota = Quota { limit, window_ms: window_s * 1000, burst: limit };
            let steps = timeline(raw);
            let mut state = [0; 3];
            for &(now, h) in &steps {
                run(&quota, &mut state, now, h);
            }
            let now = steps.last().unwrap().0;
            let o = SlidingWindow.evaluate(&quota, state, hits, now).outcome;
            if let Some(wait) = o.retry_after_ms {
                prop_assert!(!SlidingWindow.evaluate(&quota, state, hits, now + wait - 1).outcome.allowed);
                prop_assert!(SlidingWindow.evaluate(&quota, state, hits, now + wait).outcome.allowed);
            } else {
                prop_assert!(o.allowed || hits > limit);
            }
        }
    }
}
