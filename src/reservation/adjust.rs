//! The settle step as a pure function: what a counter's state becomes when
//! a reservation charged at `estimate` is settled at `actual`.
//!
//! It changes exactly what the reservation charged: for the window
//! algorithms the count of the window the estimate went into (if the store
//! still holds that window; once it is gone, the charge no longer limits
//! anything and settling it is moot), for the token bucket the level as it
//! stands now (the bucket has no windows: a refund gives tokens back, an
//! extra charge takes more). A refund never takes a count or level below
//! zero, and an extra charge is added without an admission check (the work
//! is done), capped as the algorithms cap what they store.

use crate::algorithm::{AlgorithmKind, COUNT_CAP, Quota, Stored, window_counts, with_window_count};

/// What one reservation charged one counter: the counter's algorithm and
/// limit then, and the start of the window it charged (the window
/// algorithms; 0 for the token bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charged {
    /// The algorithm that owns the counter's state.
    pub algorithm: AlgorithmKind,
    /// The limit when the reservation was made.
    pub quota: Quota,
    /// Unix ms start of the window charged (window algorithms).
    pub window_start: u64,
}

impl Charged {
    /// What a reservation made at `now_ms` charges with `algorithm` and
    /// `quota`.
    pub fn at(algorithm: AlgorithmKind, quota: Quota, now_ms: u64) -> Self {
        let window_start = match algorithm {
            AlgorithmKind::TokenBucket => 0,
            AlgorithmKind::FixedWindow | AlgorithmKind::SlidingWindow => {
                now_ms - now_ms % quota.window_ms
            }
        };
        Self {
            algorithm,
            quota,
            window_start,
        }
    }
}

/// The state to store after settling `charged` (made with `estimate`) at
/// `actual`, given the live state `stored` (`None`: absent or expired), at
/// `now_ms`. `None` means leave the counter as it is.
pub fn settle(
    charged: &Charged,
    stored: Option<Stored>,
    estimate: u64,
    actual: u64,
    now_ms: u64,
) -> Option<Stored> {
    if estimate == actual {
        return None;
    }
    match charged.algorithm {
        AlgorithmKind::FixedWindow | AlgorithmKind::SlidingWindow => {
            settle_window(charged, stored?, estimate, actual)
        }
        AlgorithmKind::TokenBucket => {
            settle_bucket(&charged.quota, stored, estimate, actual, now_ms)
        }
    }
}

fn settle_window(charged: &Charged, stored: Stored, estimate: u64, actual: u64) -> Option<Stored> {
    let w = charged.quota.window_ms;
    let start = charged.window_start;
    let latest = stored.state[0];
    // Only the windows the state still holds: the latest and the one
    // before it. Anything else is gone (or belongs to another window
    // length after a reload).
    let held = start == latest || (latest >= w && start == latest - w);
    if !held {
        return None;
    }
    let (count, _) = window_counts(stored.state, start, w);
    let settled = count
        .saturating_add(actual)
        .saturating_sub(estimate)
        .min(COUNT_CAP);
    Some(Stored {
        state: with_window_count(stored.state, start, w, settled),
        expires_at_ms: stored.expires_at_ms,
    })
}

fn settle_bucket(
    quota: &Quota,
    stored: Option<Stored>,
    estimate: u64,
    actual: u64,
    now_ms: u64,
) -> Option<Stored> {
    let window = quota.window_ms;
    let drain_per_ms = quota.limit.max(1);
    let capacity = quota.burst.saturating_mul(window);
    // The level now, read exactly as the token bucket reads it.
    let level = stored.map_or(0, |s| {
        let drained = now_ms
            .saturating_sub(s.state[1])
            .saturating_mul(drain_per_ms);
        s.state[0].min(capacity).saturating_sub(drained)
    });
    let settled = if actual > estimate {
        level
            .saturating_add((actual - estimate).saturating_mul(window))
            .min(capacity)
    } else {
        level.saturating_sub((estimate - actual).saturating_mul(window))
    };
    if stored.is_none() && settled == 0 {
        return None;
    }
    Some(Stored {
        state: [settled, now_ms, 0],
        expires_at_ms: now_ms + settled.div_ceil(drain_per_ms),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const T: u64 = 1_700_000_040_000;
    const MINUTE: Quota = Quota {
        limit: 100,
        window_ms: 60_000,
        burst: 100,
    };

    fn charge(
        algorithm: AlgorithmKind,
        quota: Quota,
        state: Option<Stored>,
        hits: u64,
        now: u64,
    ) -> Stored {
        let eval =
            algorithm
                .algorithm()
                .evaluate(&quota, state.map_or([0; 3], |s| s.state), hits, now);
        assert!(eval.outcome.allowed);
        eval.admitted
    }

    #[test]
    fn a_fixed_window_refund_takes_back_the_difference_in_the_charged_window() {
        let charged = Charged::at(AlgorithmKind::FixedWindow, MINUTE, T);
        let s = charge(AlgorithmKind::FixedWindow, MINUTE, None, 30, T);
        let s = charge(AlgorithmKind::FixedWindow, MINUTE, Some(s), 5, T + 1);
        let after = settle(&charged, Some(s), 30, 12, T + 2).unwrap();
        assert_eq!(
            window_counts(after.state, charged.window_start, 60_000).0,
            17
        );
        assert_eq!(after.expires_at_ms, s.expires_at_ms);
    }

    #[test]
    fn a_refund_never_goes_below_zero() {
        let charged = Charged::at(AlgorithmKind::FixedWindow, MINUTE, T);
        let s = Stored {
            state: [charged.window_start, 3, 0],
            expires_at_ms: T + 60_000,
        };
        let after = settle(&charged, Some(s), 10, 0, T).unwrap();
        assert_eq!(after.state[1], 0);
    }

    #[test]
    fn an_extra_charge_lands_in_the_previous_window_while_it_is_held() {
        let charged = Charged::at(AlgorithmKind::SlidingWindow, MINUTE, T);
        let s = charge(AlgorithmKind::SlidingWindow, MINUTE, None, 10, T);
        let next = T + 60_000;
        let s = charge(AlgorithmKind::SlidingWindow, MINUTE, Some(s), 1, next);
        let after = settle(&charged, Some(s), 10, 40, next).unwrap();
        let start = charged.window_start;
        assert_eq!(window_counts(after.state, start, 60_000).0, 40);
        assert_eq!(window_counts(after.state, start + 60_000, 60_000).0, 1);
    }

    #[test]
    fn a_window_that_is_gone_is_left_alone() {
        let charged = Charged::at(AlgorithmKind::FixedWindow, MINUTE, T);
        let later = T + 3 * 60_000;
        let s = charge(AlgorithmKind::FixedWindow, MINUTE, None, 4, later);
        assert_eq!(settle(&charged, Some(s), 1, 50, later), None);
        assert_eq!(settle(&charged, None, 1, 50, later), None);
    }

    #[test]
    fn a_token_bucket_settles_on_its_level_now() {
        let q = Quota {
            limit: 10,
            window_ms: 1_000,
            burst: 20,
        };
        let charged = Charged::at(AlgorithmKind::TokenBucket, q, T);
        let s = charge(AlgorithmKind::TokenBucket, q, None, 8, T);
        // 8 tokens spent; 100 ms later one has come back: 7 spent.
        let refunded = settle(&charged, Some(s), 8, 2, T + 100).unwrap();
        assert_eq!(refunded.state, [1_000, T + 100, 0]);
        let extra = settle(&charged, Some(s), 8, 30, T + 100).unwrap();
        // Capped at the bucket: 7 + 22 > 20.
        assert_eq!(extra.state[0], 20_000);
        // An absent (full) bucket takes an extra charge.
        let fresh = settle(&charged, None, 1, 3, T).unwrap();
        assert_eq!(fresh.state[0], 2_000);
        assert_eq!(settle(&charged, None, 3, 1, T), None);
    }

    proptest! {
        /// Settling moves the charged counter by exactly actual − estimate,
        /// floored at zero (and capped, for a bucket), in any window
        /// algorithm and for any history in the charged window.
        #[test]
        fn a_window_moves_by_the_difference(
            sliding in any::<bool>(),
            before in 0u64..500,
            estimate in 0u64..500,
            actual in 0u64..1_000,
            after in 0u64..500,
        ) {
            let algorithm = if sliding { AlgorithmKind::SlidingWindow } else { AlgorithmKind::FixedWindow };
            let q = Quota { limit: 10_000, window_ms: 60_000, burst: 10_000 };
            let charged = Charged::at(algorithm, q, T);
            let mut s = charge(algorithm, q, None, before, T);
            s = charge(algorithm, q, Some(s), estimate, T + 1);
            s = charge(algorithm, q, Some(s), after, T + 2);
            let settled = settle(&charged, Some(s), estimate, actual, T + 3).unwrap_or(s);
            let count = window_counts(settled.state, charged.window_start, 60_000).0;
            prop_assert_eq!(count, before + after + actual);
        }
    }
}
