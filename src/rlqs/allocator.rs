//! The pure allocator: how one global limit is divided among the Envoys
//! subscribed to a bucket.
//!
//! Shares are max-min fair over measured demand (water-filling: walk the
//! subscribers from the smallest demand up, each taking its demand or an
//! equal part of what is left, whichever is less), then whatever nobody
//! wants is spread evenly as headroom, so an idle Envoy can absorb a burst.
//! Shares are whole tokens per fill and always sum to exactly the pool (never
//! above it). A subscriber with no measured demand yet is assumed to want an
//! equal part. Demand is smoothed ([`smoothed`]) and only moves the
//! allocation when it leaves a band around the value last used
//! ([`settle`]), so small changes do not re-send assignments (a re-sent,
//! identical token bucket keeps Envoy's bucket state). After state loss the
//! allocator runs in a learning mode ([`learning_cap`]): nobody gets more
//! than an equal part, so assignments it cannot see still fit the limit.
//! Nothing here reads a clock or does I/O.

/// Weight of the newest measurement in the demand average.
pub const SMOOTHING: f64 = 0.5;
/// Relative change of demand that moves the allocation.
pub const BAND: f64 = 0.10;
/// Absolute change (tokens per fill) below which demand never moves.
pub const MIN_CHANGE: f64 = 0.5;

/// What an Envoy is told to enforce for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// A token bucket (the only rate strategy Envoy enforces).
    TokenBucket {
        /// Capacity, and the tokens a new bucket starts with.
        max_tokens: u32,
        /// Tokens added per fill.
        tokens_per_fill: u32,
        /// Seconds between fills (whole seconds: Envoy drops the rest).
        fill_seconds: u64,
    },
    /// Deny everything (a share of zero).
    DenyAll,
    /// Allow everything (a bucket no rule limits).
    AllowAll,
}

/// Max-min fair shares of `pool` tokens for subscribers wanting `demands`
/// (tokens per fill; `None` = not measured yet), in the same order.
///
/// The shares sum to exactly `pool` when there is at least one subscriber.
pub fn fair_shares(pool: u64, demands: &[Option<f64>]) -> Vec<u64> {
    let n = demands.len();
    if n == 0 {
        return Vec::new();
    }
    let total = pool as f64;
    let equal = total / n as f64;
    let wants: Vec<f64> = demands
        .iter()
        .map(|d| match d {
            Some(d) if d.is_finite() && *d >= 0.0 => *d,
            _ => equal,
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| wants[a].total_cmp(&wants[b]).then(a.cmp(&b)));
    let mut exact = vec![0.0; n];
    let mut remaining = total;
    for (done, &i) in order.iter().enumerate() {
        let give = wants[i].min(remaining / (n - done) as f64).max(0.0);
        exact[i] = give;
        remaining -= give;
    }
    // What nobody wants, spread evenly as headroom.
    if remaining > 0.0 {
        for share in &mut exact {
            *share += remaining / n as f64;
        }
    }
    integerize(pool, &exact)
}

/// Whole shares from exact ones, summing to exactly `pool`: floors, then the
/// tokens left over go one each to the largest fractional parts (largest
/// remainder), ties to the earlier subscriber.
fn integerize(pool: u64, exact: &[f64]) -> Vec<u64> {
    let mut shares: Vec<u64> = exact.iter().map(|x| x.max(0.0).floor() as u64).collect();
    // Rounding error could push the floors above the pool; take it back from
    // the largest.
    let mut sum: u64 = shares.iter().sum();
    while sum > pool {
        if let Some(max) = shares.iter_mut().max() {
            *max -= 1;
        }
        sum -= 1;
    }
    let mut by_fraction: Vec<usize> = (0..exact.len()).collect();
    by_fraction.sort_by(|&a, &b| {
        let fa = exact[a] - exact[a].floor();
        let fb = exact[b] - exact[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let mut left = pool - sum;
    for i in by_fraction.into_iter().cycle() {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    shares
}

/// What a subscriber may be granted: its `target`, but only as far as the
/// pool has room beside what the others hold now (`others_held`, tokens per
/// fill). Shares shrink at once and grow into room others have given up, so
/// the shares held never sum above the pool, whatever order the
/// subscribers learn of a change in.
pub fn grant(target: u64, pool: u64, others_held: f64) -> u64 {
    let room = (pool as f64 - others_held.max(0.0) + 1e-6).floor();
    if room <= 0.0 {
        return 0;
    }
    target.min(room as u64)
}

/// The largest share anyone may have while learning: an equal part of the
/// pool among the `seen` subscribers (rounded down).
pub fn learning_cap(pool: u64, seen: usize) -> u64 {
    pool / (seen.max(1) as u64)
}

/// The smoothed demand after a new measurement.
pub fn smoothed(previous: Option<f64>, measured: f64) -> f64 {
    match previous {
        Some(previous) => SMOOTHING * measured + (1.0 - SMOOTHING) * previous,
        None => measured,
    }
}

/// The demand the allocation should use: the one in use, unless the
/// smoothed demand has left the band around it.
pub fn settle(in_use: Option<f64>, smoothed: f64) -> f64 {
    match in_use {
        Some(in_use) => {
            let change = (smoothed - in_use).abs();
            if change > BAND * smoothed.max(in_use) && change >= MIN_CHANGE {
                smoothed
            } else {
                in_use
            }
        }
        None => smoothed,
    }
}

/// The token bucket for a share of `share` tokens of `pool`, with the rule's
/// `burst` divided in the same proportion (at least one token each), so the
/// buckets' capacities together stay within the burst.
pub fn encode(share: u64, pool: u64, burst: u64, fill_seconds: u64) -> Strategy {
    if share == 0 || pool == 0 {
        return Strategy::DenyAll;
    }
    let capacity = (u128::from(burst) * u128::from(share) / u128::from(pool)).max(1);
    Strategy::TokenBucket {
        max_tokens: u32::try_from(capacity).unwrap_or(u32::MAX),
        tokens_per_fill: u32::try_from(share).unwrap_or(u32::MAX),
        fill_seconds: fill_seconds.max(1),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::Strategy;
    use super::*;

    #[test]
    fn equal_demand_splits_equally() {
        assert_eq!(fair_shares(100, &[Some(50.0); 4]), vec![25, 25, 25, 25]);
        assert_eq!(fair_shares(10, &[None, None, None]), vec![4, 3, 3]);
        assert!(fair_shares(10, &[]).is_empty());
    }

    #[test]
    fn small_demand_is_met_and_the_rest_goes_to_the_big() {
        // 100 tokens; one wants 10, one 20, two want lots.
        let shares = fair_shares(100, &[Some(10.0), Some(500.0), Some(20.0), Some(500.0)]);
        assert_eq!(shares, vec![10, 35, 20, 35]);
    }

    #[test]
    fn unwanted_tokens_become_headroom_for_everyone() {
        // Everyone wants 10 of 100: 60 spare, 15 each on top.
        assert_eq!(fair_shares(100, &[Some(10.0); 4]), vec![25; 4]);
        assert_eq!(fair_shares(100, &[Some(0.0), Some(40.0)]), vec![30, 70]);
    }

    #[test]
    fn a_new_subscriber_is_assumed_to_want_an_equal_part() {
        let shares = fair_shares(90, &[Some(80.0), Some(80.0), None]);
        assert_eq!(shares, vec![30, 30, 30]);
    }

    #[test]
    fn a_pool_smaller_than_the_subscribers_denies_some() {
        let shares = fair_shares(2, &[Some(5.0); 3]);
        assert_eq!(shares.iter().sum::<u64>(), 2);
        assert!(shares.contains(&0));
        assert_eq!(encode(0, 2, 2, 1), Strategy::DenyAll);
    }

    #[test]
    fn grants_only_grow_into_room_the_others_left() {
        assert_eq!(grant(50, 100, 50.0), 50);
        assert_eq!(grant(90, 100, 50.0), 50);
        assert_eq!(grant(90, 100, 10.0), 90);
        assert_eq!(grant(10, 100, 150.0), 0);
        // Float noise in what others hold does not cost a token.
        assert_eq!(grant(10, 100, 90.000_000_1), 10);
    }

    #[test]
    fn learning_caps_at_an_equal_part() {
        assert_eq!(learning_cap(100, 3), 33);
        assert_eq!(learning_cap(100, 0), 100);
    }

    #[test]
    fn small_changes_do_not_move_the_demand_in_use() {
        assert_eq!(settle(None, 7.0), 7.0);
        assert_eq!(settle(Some(100.0), 105.0), 100.0);
        assert_eq!(settle(Some(100.0), 115.0), 115.0);
        assert_eq!(settle(Some(100.0), 80.0), 80.0);
        // Tiny absolute changes never move it, whatever the ratio.
        assert_eq!(settle(Some(0.0), 0.3), 0.0);
        assert_eq!(smoothed(None, 10.0), 10.0);
        assert_eq!(smoothed(Some(10.0), 20.0), 15.0);
    }

    #[test]
    fn encoding_divides_the_burst_in_proportion() {
        assert_eq!(
            encode(25, 100, 200, 1),
            Strategy::TokenBucket {
                max_tokens: 50,
                tokens_per_fill: 25,
                fill_seconds: 1
            }
        );
        // At least one token of capacity.
        assert_eq!(
            encode(1, 1000, 10, 60),
            Strategy::TokenBucket {
                max_tokens: 1,
                tokens_per_fill: 1,
                fill_seconds: 60
            }
        );
    }

    fn demands() -> impl proptest::strategy::Strategy<Value = Vec<Option<f64>>> {
        prop::collection::vec(prop::option::of(0.0f64..10_000.0), 0..40)
    }

    proptest! {
        #[test]
        fn shares_sum_to_the_pool_and_never_above(pool in 0u64..100_000, demands in demands()) {
            let shares = fair_shares(pool, &demands);
            prop_assert_eq!(shares.len(), demands.len());
            if !demands.is_empty() {
                prop_assert_eq!(shares.iter().sum::<u64>(), pool);
            }
        }

        #[test]
        fn shares_are_max_min_fair(pool in 0u64..100_000, demands in demands()) {
            // Anyone short of their demand has (up to rounding) at least as
            // much as anyone else: no share is taken from the poor to feed
            // the rich.
            let shares = fair_shares(pool, &demands);
            let n = demands.len() as f64;
            for (i, d) in demands.iter().enumerate() {
                let want = d.unwrap_or(pool as f64 / n);
                if (shares[i] as f64) + 1.0 < want {
                    for &other in &shares {
                        prop_assert!(other <= shares[i] + 1, "{:?} -> {:?}", demands, shares);
                    }
                }
            }
        }

        #[test]
        fn met_demand_gets_at_least_its_demand(pool in 0u64..100_000, demands in demands()) {
            let shares = fair_shares(pool, &demands);
            let wanted: f64 = demands.iter().map(|d| d.unwrap_or(pool as f64 / demands.len() as f64)).sum();
            if wanted <= pool as f64 {
                for (i, d) in demands.iter().enumerate() {
                    if let Some(d) = d {
                        prop_assert!(shares[i] as f64 >= d.floor() , "{:?} -> {:?}", demands, shares);
                    }
                }
            }
        }

        #[test]
        fn grants_never_push_the_held_sum_over_the_pool(pool in 0u64..10_000, held in prop::collection::vec(0u64..5_000, 1..20), who in 0usize..20, target in 0u64..10_000) {
            // Start from any holding within the pool; one subscriber is granted anew.
            let mut held = held;
            let mut total: u64 = held.iter().sum();
            while total > pool {
                let max = held.iter_mut().max().unwrap();
                let cut = (*max).min(total - pool);
                *max -= cut;
                total -= cut;
            }
            let who = who % held.len();
            let others: u64 = total - held[who];
            held[who] = grant(target, pool, others as f64);
            prop_assert!(held.iter().sum::<u64>() <= pool);
        }

        #[test]
        fn learning_caps_keep_the_sum_within_the_pool(pool in 0u64..100_000, demands in demands(), extra in 0usize..5) {
            let seen = demands.len() + extra;
            let cap = learning_cap(pool, seen);
            let capped: u64 = fair_shares(pool, &demands).into_iter().map(|s| s.min(cap)).sum();
            prop_assert!(capped <= pool);
        }

        #[test]
        fn the_burst_is_never_overcommitted_beyond_one_token_each(pool in 1u64..10_000, burst in 1u64..20_000, demands in demands()) {
            let shares = fair_shares(pool, &demands);
            let capacity: u64 = shares.iter().map(|&s| match encode(s, pool, burst, 1) {
                Strategy::TokenBucket { max_tokens, .. } => u64::from(max_tokens),
                _ => 0,
            }).sum();
            prop_assert!(capacity <= burst.max(pool) + shares.len() as u64);
            prop_assert!(capacity <= burst + shares.len() as u64);
        }
    }
}
