//! Fixed windows aligned to the Unix epoch, as envoyproxy/ratelimit counts.
//!
//! State: the counts of the latest window and the one before it (see
//! `window_counts` in the parent module), so a clock that steps back into
//! the previous window finds that window's own count. `count + hits >
//! limit` is over limit; equality is allowed (the N-th hit of an N-per-window
//! limit passes with 0 left). Rejected hits still count, as in the reference
//! implementation, so a client hammering a denied key stays denied for the
//! rest of the window. A count above a lowered limit simply denies until the
//! window ends.

use super::{
    Algorithm, COUNT_CAP, Evaluation, Outcome, Quota, State, Stored, window_counts,
    with_window_count,
};

/// The fixed window algorithm.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedWindow;

impl Algorithm for FixedWindow {
    fn evaluate(&self, quota: &Quota, state: State, hits: u64, now_ms: u64) -> Evaluation {
        let w = quota.window_ms;
        let start = now_ms - now_ms % w;
        let (count, _) = window_counts(state, start, w);
        let after = count.saturating_add(hits).min(COUNT_CAP);
        let allowed = after <= quota.limit;
        let reset_after_ms = start + w - now_ms;
        let written = with_window_count(state, start, w, after);
        let stored = Stored {
            state: written,
            // The latest window's end: the previous count matters only to
            // a clock that steps back, while the key lives.
            expires_at_ms: written[0] + w,
        };
        Evaluation {
            outcome: Outcome {
                allowed,
                remaining: if allowed { quota.limit - after } else { 0 },
                reset_after_ms,
                // The next window starts empty, so waiting for it admits any
                // cost that fits the limit at all.
                retry_after_ms: (!allowed && hits <= quota.limit).then_some(reset_after_ms),
                used_before: count,
            },
            admitted: stored,
            rejected: Some(stored),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MINUTE: Quota = Quota {
        limit: 3,
        window_ms: 60_000,
        burst: 3,
    };

    fn run(quota: &Quota, steps: &[(u64, u64)]) -> Vec<(bool, u64, u64, Option<u64>)> {
        let mut state = [0; 3];
        steps
            .iter()
            .map(|&(now, hits)| {
                let eval = FixedWindow.evaluate(quota, state, hits, now);
                state = if eval.outcome.allowed {
                    eval.admitted.state
                } else {
                    eval.rejected.unwrap().state
                };
                let o = eval.outcome;
                (o.allowed, o.remaining, o.reset_after_ms, o.retry_after_ms)
            })
            .collect()
    }

    #[test]
    fn counts_within_one_window_and_resets_at_the_boundary() {
        let t = 1_700_000_020_000; // 40 s into a minute
        let got = run(
            &MINUTE,
            &[
                (t, 1),
                (t + 1_000, 1),
                (t + 2_000, 1),
                (t + 3_000, 1),
                (t + 19_999, 1),
                (t + 20_000, 1),
            ],
        );
        assert_eq!(
            got,
            vec![
                (true, 2, 20_000, None),
                (true, 1, 19_000, None),
                (true, 0, 18_000, None),
                (false, 0, 17_000, Some(17_000)),
                (false, 0, 1, Some(1)),
                (true, 2, 60_000, None),
            ]
        );
    }

    #[test]
    fn rejected_hits_keep_counting() {
        let t = 1_700_000_020_000;
        let got = run(&MINUTE, &[(t, 5), (t, 0), (t, 1)]);
        // 5 > 3: denied and never admissible at this cost; the count is now 5,
        // so even a check-only call (0 hits) reports over limit.
        assert_eq!(got[0], (false, 0, 20_000, None));
        assert_eq!(got[1], (false, 0, 20_000, Some(20_000)));
        assert_eq!(got[2], (false, 0, 20_000, Some(20_000)));
    }

    #[test]
    fn zero_limit_denies_every_counted_hit_but_passes_a_check() {
        let zero = Quota {
            limit: 0,
            window_ms: 1_000,
            burst: 0,
        };
        let got = run(&zero, &[(5_500, 0), (5_500, 1)]);
        assert_eq!(got, vec![(true, 0, 500, None), (false, 0, 500, None)]);
    }

    #[test]
    fn windows_align_to_the_epoch() {
        let hour = Quota {
            limit: 10,
            window_ms: 3_600_000,
            burst: 10,
        };
        // t = 1,000,000 s: the hour window started at 997,200 s (the
        // reference's own example), so 3,600 - 2,800 = 800 s remain.
        let eval = FixedWindow.evaluate(&hour, [0; 3], 1, 1_000_000_000);
        assert_eq!(eval.admitted.state, [997_200_000, 1, 0]);
        assert_eq!(eval.outcome.reset_after_ms, 800_000);
        assert_eq!(eval.admitted.expires_at_ms, 1_000_800_000);
    }

    #[test]
    fn a_backward_clock_step_finds_that_windows_own_count() {
        // Window [t - 60 s, t) is used up, then [t, t + 60 s); the clock
        // then steps back 1 ms, into the first: still used up.
        let t = 1_700_000_040_000;
        let got = run(&MINUTE, &[(t - 1_000, 3), (t, 3), (t - 1, 1), (t, 1)]);
        assert_eq!(got[0], (true, 0, 1_000, None));
        assert_eq!(got[1], (true, 0, 60_000, None));
        assert_eq!(got[2], (false, 0, 1, Some(1)));
        assert_eq!(got[3], (false, 0, 60_000, Some(60_000)));
    }

    #[test]
    fn a_count_above_a_lowered_limit_denies_until_the_window_ends() {
        let t = 1_700_000_020_000;
        let state = FixedWindow.evaluate(&MINUTE, [0; 3], 3, t).admitted.state;
        let lowered = Quota { limit: 1, ..MINUTE };
        let o = FixedWindow.evaluate(&lowered, state, 1, t).outcome;
        assert_eq!(
            (o.allowed, o.remaining, o.retry_after_ms),
            (false, 0, Some(20_000))
        );
        let o = FixedWindow.evaluate(&lowered, state, 0, t).outcome;
        assert_eq!((o.allowed, o.remaining), (false, 0));
    }

    proptest! {
        /// Invariant: within one window, the admitted hits never exceed the
        /// limit, and every hit is admitted while it fits.
        #[test]
        fn never_admits_more_than_the_limit_per_window(
            limit in 0u64..50,
            window_s in 1u64..120,
            steps in proptest::collection::vec((0u64..200_000, 0u64..10), 1..200),
        ) {
            let quota = Quota { limit, window_ms: window_s * 1000, burst: limit };
            let mut steps = steps;
            steps.sort_by_key(|s| s.0);
            let mut state = [0; 3];
            let mut admitted_in_window: std::collections::HashMap<u64, u64> = Default::default();
            for (now, hits) in steps {
                let now = now + 1_700_000_000_000;
                let eval = FixedWindow.evaluate(&quota, state, hits, now);
                let window = now - now % quota.window_ms;
                let used = admitted_in_window.entry(window).or_default();
                let counted = if state[0] == window { state[1] } else { 0 };
                prop_assert_eq!(eval.outcome.allowed, counted + hits <= limit);
                if eval.outcome.allowed {
                    *used += hits;
                    state = eval.admitted.state;
                } else {
                    state = eval.rejected.unwrap().state;
                }
                prop_assert!(*used <= limit);
                prop_assert!(eval.outcome.reset_after_ms >= 1 && eval.outcome.reset_after_ms <= quota.window_ms);
            }
        }
    }
}
