//! Several limits on one descriptor (`rate_limits`): the key each limit
//! counts in, and the one answer reported for all of them.
//!
//! The limiter expands a descriptor with several limits into one hit per
//! limit, so they go through the same batch as the hits of different
//! descriptors: on `ShouldAllow` all-or-nothing (a limit that denies leaves
//! the others uncharged), on Envoy's API each counted as upstream counts
//! separate descriptors. Every limit of a descriptor counts in a key of its
//! own that carries the *first* limit's hash tag, so all of them live on one
//! Redis Cluster slot and one script decides them atomically; the first
//! limit's key is exactly the key it would have as a lone `rate_limit`, so a
//! rule that gains a second limit keeps its counter. [`fold`] then reports
//! the most restrictive answer. Pure.

use super::matcher::EntryRef;
use super::{KeyLayout, Limit, Rule, key};
use crate::algorithm::Outcome;

/// The storage key of the limit at `index` of `rule`'s limits (0 is the
/// first) for one request descriptor.
///
/// The first limit's key is the layout's usual key. The others get
/// ratekeeper's own key for their algorithm and window (unique per limit:
/// the loader refuses two limits with the same algorithm and window) with
/// the hash tag of the first limit's ratekeeper key; in the
/// envoy-ratelimit layout they are keys no upstream instance reads.
pub fn limit_key(
    layout: &KeyLayout,
    domain: &str,
    entries: &[EntryRef<'_>],
    rule: &Rule,
    index: usize,
    limit: &Limit,
) -> Vec<u8> {
    let first = rule.limited().filter(|_| index > 0);
    let Some(first) = first else {
        return layout.key(domain, entries, rule, limit);
    };
    let own = |limit: &Limit| {
        key::storage_key(
            domain,
            entries,
            rule,
            limit.algorithm.tag(),
            limit.window_ms(),
        )
    };
    let mut key = own(limit);
    let anchor = own(first);
    key::copy_tag(&mut key, &anchor);
    key
}

/// The answer of one descriptor from the outcomes of its limits (in the
/// rule's order, never empty), and the index of the limit it reports.
///
/// - allowed only when every limit allows;
/// - `remaining` is the smallest of them;
/// - when denied, `retry_after_ms` is the longest wait among the limits that
///   deny (`None` when one of them can never admit these hits): every limit
///   that admits now still admits later when nobody else consumes, so after
///   that wait all of them admit, and one ms earlier the slowest does not;
/// - the reported limit (its `reset_after_ms` and `used_before`, and the
///   limit shown to the caller) is, when denied, the denying limit with the
///   longest wait; when allowed, the one with the fewest hits left (on a
///   tie, the one that resets last).
///
/// # Panics
///
/// When `outcomes` is empty: a limited rule always has a limit.
pub fn fold(outcomes: &[Outcome]) -> (usize, Outcome) {
    assert!(
        !outcomes.is_empty(),
        "a limited rule has at least one limit"
    );
    if let [only] = outcomes {
        return (0, *only);
    }
    let allowed = outcomes.iter().all(|o| o.allowed);
    let remaining = outcomes.iter().map(|o| o.remaining).min().unwrap_or(0);
    // `None` (never admissible) waits longest of all.
    let wait = |o: &Outcome| o.retry_after_ms.map_or(u128::MAX, u128::from);
    let picked = if allowed {
        index_of_max(outcomes, |o| {
            (std::cmp::Reverse(o.remaining), o.reset_after_ms)
        })
    } else {
        index_of_max(outcomes, |o| (!o.allowed, wait(o)))
    };
    let retry_after_ms = if allowed {
        None
    } else {
        outcomes[picked].retry_after_ms
    };
    (
        picked,
        Outcome {
            allowed,
            remaining,
            retry_after_ms,
            ..outcomes[picked]
        },
    )
}

/// The first index whose `by` is the largest.
fn index_of_max<K: Ord>(outcomes: &[Outcome], by: impl Fn(&Outcome) -> K) -> usize {
    let mut best = 0;
    for (i, outcome) in outcomes.iter().enumerate().skip(1) {
        if by(outcome) > by(&outcomes[best]) {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::algorithm::AlgorithmKind;
    use crate::rules::{RuleLimit, Unit};

    fn outcome(allowed: bool, remaining: u64, reset: u64, retry: Option<u64>) -> Outcome {
        Outcome {
            allowed,
            remaining,
            reset_after_ms: reset,
            retry_after_ms: retry,
            used_before: 0,
        }
    }

    #[test]
    fn one_limit_is_reported_as_it_is() {
        let only = outcome(false, 3, 500, Some(500));
        assert_eq!(fold(&[only]), (0, only));
    }

    #[test]
    fn allowed_reports_the_fewest_left_and_on_a_tie_the_later_reset() {
        let second = outcome(true, 7, 400, None);
        let minute = outcome(true, 2, 30_000, None);
        assert_eq!(fold(&[second, minute]), (1, minute));
        let tied = outcome(true, 2, 90_000, None);
        assert_eq!(fold(&[second, minute, tied]), (2, tied));
    }

    #[test]
    fn denied_waits_for_the_slowest_denial_and_shows_the_fewest_left() {
        let second = outcome(false, 0, 400, Some(400));
        let minute = outcome(true, 1, 30_000, None);
        let day = outcome(false, 2, 3_600_000, Some(3_600_000));
        let (picked, folded) = fold(&[second, minute, day]);
        assert_eq!(picked, 2);
        assert_eq!(folded, outcome(false, 0, 3_600_000, Some(3_600_000)));
        // A limit that can never admit these hits makes the wait unknowable.
        let never = outcome(false, 5, 1_000, None);
        let (picked, folded) = fold(&[second, never]);
        assert_eq!((picked, folded.retry_after_ms), (1, None));
    }

    #[test]
    fn later_limits_share_the_first_limits_slot_and_keep_their_own_keys() {
        let first = Limit::fixed(10, Unit::Second);
        let day = Limit::fixed(10_000, Unit::Day);
        let bucket = Limit {
            algorithm: AlgorithmKind::TokenBucket,
            ..Limit::fixed(10, Unit::Second)
        };
        let rule = Rule {
            limit: RuleLimit::Limited(first),
            extra_limits: vec![day, bucket],
            ..Rule::from_override("dom", first)
        };
        let entries = [EntryRef {
            key: "user",
            value: "alice",
        }];
        let layout = KeyLayout::Ratekeeper;
        let keys: Vec<Vec<u8>> = rule
            .limits()
            .enumerate()
            .map(|(i, limit)| limit_key(&layout, "dom", &entries, &rule, i, limit))
            .collect();
        let alone = Rule::from_override("dom", first);
        assert_eq!(keys[0], layout.key("dom", &entries, &alone, &first));
        let tag = |k: &[u8]| k[..key::KEY_PREFIX.len() + key::TAG_LEN].to_vec();
        assert!(keys.iter().all(|k| tag(k) == tag(&keys[0])));
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[0], keys[2]);
        assert_ne!(keys[1], keys[2]);
        // In upstream's layout the first keeps upstream's key, the others
        // ratekeeper's.
        let upstream = KeyLayout::EnvoyRatelimit {
            prefix: Arc::from(""),
        };
        assert_eq!(
            limit_key(&upstream, "dom", &entries, &rule, 0, &first),
            b"dom_user_alice_"
        );
        assert_eq!(
            limit_key(&upstream, "dom", &entries, &rule, 1, &day),
            keys[1]
        );
    }

    mod exactness {
        use proptest::prelude::*;

        use super::*;
        use crate::algorithm::{Quota, Stored};

        const T: u64 = 1_700_000_000_000;

        fn limit() -> impl Strategy<Value = (AlgorithmKind, Quota)> {
            (0usize..3, 0usize..3, 1u64..20, 1u64..20).prop_map(|(kind, w, limit, burst)| {
                let algorithm = [
                    AlgorithmKind::FixedWindow,
                    AlgorithmKind::SlidingWindow,
                    AlgorithmKind::TokenBucket,
                ][kind];
                let window_ms = [1_000, 3_000, 60_000][w];
                let burst = if algorithm == AlgorithmKind::TokenBucket {
                    burst
                } else {
                    limit
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

        /// The state of a limit at `now`, as a store reads it.
        fn live(stored: Option<Stored>, now: u64) -> [u64; 3] {
            stored
                .filter(|s| s.expires_at_ms > now)
                .map_or([0; 3], |s| s.state)
        }

        proptest! {
            /// Whatever the limits and their history, a folded denial's
            /// `retry_after` is exact: one ms earlier some limit still
            /// denies the same hits, at it every limit admits them.
            #[test]
            fn the_folded_retry_after_is_exact(
                limits in proptest::collection::vec(limit(), 2..4),
                history in proptest::collection::vec((0u64..700, 1u64..6), 0..40),
                hits in 1u64..6,
            ) {
                let mut stored: Vec<Option<Stored>> = vec![None; limits.len()];
                let mut now = T;
                let evaluate = |stored: &[Option<Stored>], hits: u64, at: u64| -> Vec<_> {
                    limits
                        .iter()
                        .zip(stored)
                        .map(|((algorithm, quota), s)| {
                            algorithm.algorithm().evaluate(quota, live(*s, at), hits, at)
                        })
                        .collect()
                };
                // All-or-nothing history: the hits count only when every
                // limit admits them.
                for (dt, h) in history {
                    now += dt;
                    let evals = evaluate(&stored, h, now);
                    if evals.iter().all(|e| e.outcome.allowed) {
                        for (s, e) in stored.iter_mut().zip(&evals) {
                            *s = Some(e.admitted);
                        }
                    }
                }
                let outcomes: Vec<Outcome> =
                    evaluate(&stored, hits, now).iter().map(|e| e.outcome).collect();
                let (_, folded) = fold(&outcomes);
                let admits = |at: u64| {
                    evaluate(&stored, hits, at).iter().all(|e| e.outcome.allowed)
                };
                prop_assert_eq!(folded.allowed, admits(now));
                prop_assert_eq!(
                    folded.remaining,
                    outcomes.iter().map(|o| o.remaining).min().unwrap()
                );
                if let Some(wait) = folded.retry_after_ms {
                    prop_assert!(wait > 0);
                    prop_assert!(!admits(now + wait - 1), "admitted before {wait}");
                    prop_assert!(admits(now + wait), "denied at {wait}");
                } else if !folded.allowed {
                    // Never admissible: some limit is smaller than the hits.
                    let capacity = |(a, q): &(AlgorithmKind, Quota)| {
                        if *a == AlgorithmKind::TokenBucket { q.burst } else { q.limit }
                    };
                    let too_big = limits.iter().any(|l| hits > capacity(l));
                    prop_assert!(too_big);
                }
            }
        }
    }
}
