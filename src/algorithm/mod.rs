//! The limit math: pure functions of (state, hits, limit, now).
//!
//! An [`Algorithm`] looks at the stored [`State`] of one counter and the hits a
//! request wants to add, and returns an [`Evaluation`]: the [`Outcome`] to
//! report plus the state to store if the hits are admitted, and if they are
//! rejected. Whether anything is stored is decided by [`batch`], which applies
//! all hits of one request with one [`Mode`]. The stores run exactly this code
//! (memory) or its Lua twin (Redis), so the Rust version is the spec and the
//! test oracle for the scripts. Nothing here reads a clock or awaits.

pub mod batch;
pub mod fixed_window;
pub mod refund;
pub mod sliding_window;
pub mod token_bucket;

use std::fmt;

pub use batch::{BatchHit, Mode, StateView, apply_batch, denies};
pub use fixed_window::FixedWindow;
pub use sliding_window::SlidingWindow;
pub use token_bucket::TokenBucket;

/// Counts stay below this so that Lua (doubles) and Rust agree exactly, even
/// when rejected hits keep counting.
pub const COUNT_CAP: u64 = 1 << 50;

/// Largest value of the scaled capacity the sliding window and the token
/// bucket compute (`limit × window_ms`, `burst × window_ms`): 2^52, so that
/// the sum of two such terms (a stored count plus this request's hits) stays
/// at most 2^53, the last integer a double (Lua's number) holds exactly. The
/// config loader refuses limits beyond it.
pub const MAX_SCALED: u64 = 1 << 52;

/// The stored state of one counter. Each algorithm documents the meaning of
/// the three numbers; an absent key is all zeros.
pub type State = [u64; 3];

/// Which algorithm a limit uses; also the tag written into storage keys and
/// passed to the Redis script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlgorithmKind {
    /// Fixed windows aligned to the Unix epoch (envoyproxy/ratelimit's).
    FixedWindow,
    /// Weighted two-window counter.
    SlidingWindow,
    /// Token bucket with a burst capacity (GCRA, in its bucket-level form).
    TokenBucket,
}

/// The parameters an algorithm needs from a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Hits admitted per window (token bucket: tokens refilled per window).
    pub limit: u64,
    /// Window length in milliseconds (never 0).
    pub window_ms: u64,
    /// Token bucket capacity (equal to `limit` unless configured).
    pub burst: u64,
}

/// What a decision tells the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The hits fit within the limit.
    pub allowed: bool,
    /// Hits still available in the current window after this evaluation.
    pub remaining: u64,
    /// Milliseconds until the current window ends.
    pub reset_after_ms: u64,
    /// When denied: milliseconds until the same hits would be admitted if
    /// nobody else consumed; `None` when allowed or never admissible.
    pub retry_after_ms: Option<u64>,
    /// Hits already counted against the capacity when these were judged
    /// (the window's count; for a sliding window its weighted estimate and
    /// for a token bucket the spent part of the bucket, rounded up), so
    /// metrics can tell which of a request's hits crossed a threshold.
    pub used_before: u64,
}

/// State to write back, with the instant it may be forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The new state.
    pub state: State,
    /// Unix milliseconds after which the state is meaningless and may be dropped.
    pub expires_at_ms: u64,
}

/// The result of evaluating hits against a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    /// What to report.
    pub outcome: Outcome,
    /// State after the hits are admitted.
    pub admitted: Stored,
    /// State after the hits are rejected, for algorithms whose rejected hits
    /// still count (fixed window, like envoyproxy/ratelimit); `None` when a
    /// rejection leaves the state unchanged.
    pub rejected: Option<Stored>,
}

/// A rate limit algorithm: a pure step over one counter's state.
///
/// `state` may come from any earlier rule: a limit raised or lowered by a
/// reload, another window, another algorithm, or a clock that has since
/// stepped back. Every algorithm accepts any state with any quota and
/// clamps: it never fails, never overflows, and reports `remaining` within
/// the current quota.
pub trait Algorithm: Send + Sync + fmt::Debug {
    /// Evaluates `hits` against `state` for `quota` at `now_ms`.
    fn evaluate(&self, quota: &Quota, state: State, hits: u64, now_ms: u64) -> Evaluation;
}

/// The window algorithms keep the counts of two windows:
/// `[latest_start, latest_count, previous_count]`, the count of the window
/// starting at `latest_start` and of the one before it. Seen from the
/// window starting at `n` (length `w`), these are its own count and its
/// predecessor's.
///
/// A window one before the latest is the previous one: a clock that stepped
/// back (NTP, or a failover to a Redis whose clock is behind) finds that
/// window's own count, so no hit is ever lost and no window admits more than
/// its limit by its own clock. A window further back, or further ahead than
/// the next, counts nothing. (In Redis the same state is a hash with one
/// field per window start.)
pub(crate) fn window_counts(state: State, n: u64, w: u64) -> (u64, u64) {
    let [latest, count, previous] = state;
    if n == latest {
        (count, previous)
    } else if n == latest.saturating_add(w) {
        (0, count)
    } else if latest >= w && n == latest - w {
        (previous, 0)
    } else {
        (0, 0)
    }
}

/// The state of [`window_counts`] after the window starting at `n` counts
/// `count`.
pub(crate) fn with_window_count(state: State, n: u64, w: u64, count: u64) -> State {
    let [latest, latest_count, previous] = state;
    if n == latest {
        [latest, count, previous]
    } else if n == latest.saturating_add(w) {
        [n, count, latest_count]
    } else if latest >= w && n == latest - w {
        [latest, latest_count, count]
    } else {
        [n, count, 0]
    }
}

// === impl AlgorithmKind ===

impl AlgorithmKind {
    /// Short tag used in storage keys and by the Redis script.
    pub fn tag(self) -> &'static str {
        match self {
            AlgorithmKind::FixedWindow => "fw",
            AlgorithmKind::SlidingWindow => "sw",
            AlgorithmKind::TokenBucket => "tb",
        }
    }

    /// The numeric id the Redis script dispatches on.
    pub fn script_id(self) -> u8 {
        match self {
            AlgorithmKind::FixedWindow => 1,
            AlgorithmKind::SlidingWindow => 2,
            AlgorithmKind::TokenBucket => 3,
        }
    }

    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            AlgorithmKind::FixedWindow => "fixed_window",
            AlgorithmKind::SlidingWindow => "sliding_window",
            AlgorithmKind::TokenBucket => "token_bucket",
        }
    }

    /// Parses a config name (`fixed_window`, `sliding_window`, `token_bucket`).
    pub fn parse(name: &str) -> Option<Self> {
        [
            AlgorithmKind::FixedWindow,
            AlgorithmKind::SlidingWindow,
            AlgorithmKind::TokenBucket,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == name)
    }

    /// The implementation.
    pub fn algorithm(self) -> &'static dyn Algorithm {
        match self {
            AlgorithmKind::FixedWindow => &FixedWindow,
            AlgorithmKind::SlidingWindow => &SlidingWindow,
            AlgorithmKind::TokenBucket => &TokenBucket,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const T: u64 = 1_700_000_000_000;
    const WINDOWS: [u64; 6] = [1_000, 7_000, 60_000, 3_600_000, 86_400_000, 315_360_000_000];

    /// A rule as the loader would accept it: any algorithm, a limit up to
    /// `u32::MAX` within the exact-in-doubles bound, windows up to 10 years.
    fn rule() -> impl Strategy<Value = (AlgorithmKind, Quota)> {
        (
            0usize..3,
            0usize..WINDOWS.len(),
            0u64..=u64::from(u32::MAX),
            0u64..40,
            any::<bool>(),
        )
            .prop_map(|(kind, w, big, small, use_big)| {
                let algorithm = [
                    AlgorithmKind::FixedWindow,
                    AlgorithmKind::SlidingWindow,
                    AlgorithmKind::TokenBucket,
                ][kind];
                let window_ms = WINDOWS[w];
                let mut limit = if use_big { big } else { small };
                if algorithm != AlgorithmKind::FixedWindow {
                    limit = limit.clamp(1, MAX_SCALED / window_ms);
                }
                let burst = match algorithm {
                    AlgorithmKind::TokenBucket => (small + 1).min(MAX_SCALED / window_ms),
                    _ => limit,
                };
                (
                    algorithm,
                    Quota {
                        limit,
                        window_ms,
                        burst,
                    },
                )
            })
    }

    /// What a rule may ever report: its capacity, and how far ahead its
    /// answers may point.
    fn bounds(algorithm: AlgorithmKind, quota: &Quota) -> (u64, u64) {
        match algorithm {
            AlgorithmKind::FixedWindow => (quota.limit, 2 * quota.window_ms),
            AlgorithmKind::SlidingWindow => (quota.limit, 3 * quota.window_ms),
            AlgorithmKind::TokenBucket => (
                quota.burst,
                (quota.burst * quota.window_ms).div_ceil(quota.limit),
            ),
        }
    }

    /// Applies one hit as a store does (an expired state reads as absent),
    /// returning the outcome.
    fn step(
        algorithm: AlgorithmKind,
        quota: &Quota,
        stored: &mut Stored,
        hits: u64,
        now: u64,
    ) -> Outcome {
        if stored.expires_at_ms <= now {
            *stored = ABSENT;
        }
        let eval = algorithm
            .algorithm()
            .evaluate(quota, stored.state, hits, now);
        let write = if eval.outcome.allowed {
            Some(eval.admitted)
        } else {
            eval.rejected
        };
        if let Some(write) = write.filter(|_| hits > 0) {
            *stored = write;
        }
        eval.outcome
    }

    const ABSENT: Stored = Stored {
        state: [0; 3],
        expires_at_ms: 0,
    };

    proptest! {
        /// Invariant: a state left by any rule A (any algorithm, limit,
        /// window) is accepted by any rule B: no panic or overflow, answers
        /// within B's capacity, and for a rule that changed only its limit
        /// (what a reload does to a live key) answers no further ahead than
        /// B's own horizon, with an exact `retry_after`, and B's own
        /// guarantee from the change on.
        #[test]
        fn any_rule_accepts_the_state_of_any_other(
            (algorithm_a, quota_a) in rule(),
            (algorithm_b, quota_b) in rule(),
            same_shape in any::<bool>(),
            before in proptest::collection::vec((0u64..5_000, 0u64..60), 0..30),
            after in proptest::collection::vec((0u64..5_000, 0u64..60), 1..30),
            huge in any::<bool>(),
        ) {
            // Half the cases change only the limit (and burst), as a reload does.
            let (algorithm_b, quota_b) = if same_shape {
                (algorithm_a, Quota { window_ms: quota_a.window_ms, ..quota_b })
            } else {
                (algorithm_b, quota_b)
            };
            let quota_b = if algorithm_b == AlgorithmKind::FixedWindow {
                quota_b
            } else {
                let cap = MAX_SCALED / quota_b.window_ms;
                Quota { limit: quota_b.limit.clamp(1, cap), burst: quota_b.burst.clamp(1, cap), ..quota_b }
            };
            let mut stored = ABSENT;
            let mut now = T;
            for (dt, hits) in before {
                now += dt;
                step(algorithm_a, &quota_a, &mut stored, hits, now);
            }
            let (capacity, horizon) = bounds(algorithm_b, &quota_b);
            let mut admitted_since_change = 0u64;
            let changed_at = now;
            for (dt, hits) in after {
                now += dt;
                let hits = if huge { u64::from(u32::MAX) - hits } else { hits };
                let previous = if stored.expires_at_ms <= now { [0; 3] } else { stored.state };
                let o = step(algorithm_b, &quota_b, &mut stored, hits, now);
                prop_assert!(o.remaining <= capacity, "{o:?}");
                prop_assert!(!o.allowed || hits <= capacity, "{o:?}");
                prop_assert!(o.retry_after_ms.is_none() || !o.allowed, "{o:?}");
                if same_shape {
                    prop_assert!(o.reset_after_ms <= horizon, "{o:?} horizon {horizon}");
                    if let Some(wait) = o.retry_after_ms {
                        prop_assert!(wait <= horizon, "{o:?}");
                        let at = |t| algorithm_b.algorithm().evaluate(&quota_b, previous, hits, t).outcome.allowed;
                        prop_assert!(!at(now + wait - 1) && at(now + wait), "{o:?}");
                    }
                    if o.allowed && algorithm_b == AlgorithmKind::FixedWindow
                        && now - now % quota_b.window_ms == changed_at - changed_at % quota_b.window_ms
                    {
                        admitted_since_change += hits;
                        prop_assert!(admitted_since_change <= quota_b.limit);
                    }
                }
            }
            // Once both rules' horizons have passed, nothing of A is left.
            let (_, horizon_a) = bounds(algorithm_a, &quota_a);
            let later = now + horizon.max(horizon_a) + 1;
            let fresh = algorithm_b.algorithm().evaluate(&quota_b, [0; 3], 1, later).outcome;
            prop_assert_eq!(step(algorithm_b, &quota_b, &mut stored, 1, later), fresh);
        }
    }
}
