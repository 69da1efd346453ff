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
pub mod sliding_window;
pub mod token_bucket;

use std::fmt;

pub use batch::{BatchHit, Mode, StateView, apply_batch};
pub use fixed_window::FixedWindow;
pub use sliding_window::SlidingWindow;
pub use token_bucket::TokenBucket;

/// Counts stay below this so that Lua (doubles) and Rust agree exactly, even
/// when rejected hits keep counting.
pub const COUNT_CAP: u64 = 1 << 50;

/// Largest value of the scaled products the sliding window and the token
/// bucket compute (`limit × window_ms`, `burst × window_ms`): 2^53, the last
/// integer a double (Lua's number) holds exactly. The config loader refuses
/// limits beyond it.
pub const MAX_SCALED: u64 = 1 << 53;

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
pub trait Algorithm: Send + Sync + fmt::Debug {
    /// Evaluates `hits` against `state` for `quota` at `now_ms`.
    fn evaluate(&self, quota: &Quota, state: State, hits: u64, now_ms: u64) -> Evaluation;
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
