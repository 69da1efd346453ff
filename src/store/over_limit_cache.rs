//! A bounded, opt-in cache of counters known to be over their limit.
//!
//! When the store denies a hit, it also says when the same hits would pass
//! (`retry_after`). Until then, any request adding at least as many hits to
//! that counter is certain to be denied again — other callers can only
//! consume more — so it can be answered here without a round trip. The cache
//! may therefore only deny what the store would deny: an entry holds the
//! quota it was denied under and answers only that quota (an Envoy limit
//! override shares its counter with the configured rule, and a denial under
//! 10 per minute says nothing about 1,000 per minute). It is cleared when
//! the rules change and holds at most `capacity` counters: a flood of
//! distinct keys cannot grow it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::algorithm::{Outcome, Quota};
use crate::clock::Clock;

/// The cache.
#[derive(Debug)]
pub struct OverLimitCache {
    capacity: usize,
    clock: Arc<dyn Clock>,
    /// A std mutex: held for one map operation, never across an await.
    inner: Mutex<Inner>,
}

/// When full, expired entries are swept out at most once per this long: a
/// flood of new denials must not turn every insert into a full scan.
const SWEEP_EVERY_MS: u64 = 1_000;

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Box<[u8]>, Denied>,
    /// No sweep before this time: nothing expires earlier, or one ran
    /// less than [`SWEEP_EVERY_MS`] ago.
    next_sweep_ms: u64,
}

/// A known denial: `hits` or more are denied under `quota` until `until_ms`.
#[derive(Debug, Clone, Copy)]
struct Denied {
    until_ms: u64,
    hits: u64,
    quota: Quota,
}

impl OverLimitCache {
    /// A cache of at most `capacity` counters, reading time from `clock`
    /// (the same clock the store's answers are relative to).
    pub fn new(capacity: usize, clock: Arc<dyn Clock>) -> Self {
        Self {
            capacity,
            clock,
            inner: Mutex::default(),
        }
    }

    /// The denial to answer for `hits` on `key` under `quota`, if one is known.
    pub fn get(&self, key: &[u8], quota: &Quota, hits: u64) -> Option<Outcome> {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        let denied = *inner.entries.get(key)?;
        if denied.until_ms <= now {
            inner.entries.remove(key);
            return None;
        }
        (hits >= denied.hits && denied.quota == *quota).then(|| Outcome {
            allowed: false,
            remaining: 0,
            reset_after_ms: denied.until_ms - now,
            retry_after_ms: Some(denied.until_ms - now),
            // Known to be at or over the limit: every hit is over it.
            used_before: quota.burst,
        })
    }

    /// Remembers that the store denied `hits` on `key` under `quota` with
    /// `outcome`.
    pub fn remember(&self, key: &[u8], quota: &Quota, hits: u64, outcome: &Outcome) {
        let Some(retry_after_ms) = outcome.retry_after_ms.filter(|_| !outcome.allowed) else {
            return;
        };
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        if inner.entries.len() >= self.capacity && !inner.entries.contains_key(key) {
            if now < inner.next_sweep_ms {
                // Full, and nothing to reclaim yet: this denial goes uncached.
                return;
            }
            let mut earliest = u64::MAX;
            inner.entries.retain(|_, denied| {
                let live = denied.until_ms > now;
                if live {
                    earliest = earliest.min(denied.until_ms);
                }
                live
            });
            inner.next_sweep_ms = earliest.max(now + SWEEP_EVERY_MS);
            if inner.entries.len() >= self.capacity {
                return;
            }
        }
        inner.entries.insert(
            key.into(),
            Denied {
                until_ms: now + retry_after_ms,
                hits,
                quota: *quota,
            },
        );
    }

    /// Forgets the denial of `key`, if one is held (its hits were refunded).
    pub fn forget(&self, key: &[u8]) {
        self.lock().entries.remove(key);
    }

    /// Forgets everything (the rules changed).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        inner.next_sweep_ms = 0;
    }

    /// Number of counters held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const Q: Quota = Quota {
        limit: 10,
        window_ms: 60_000,
        burst: 10,
    };

    fn denied(retry: u64) -> Outcome {
        Outcome {
            allowed: false,
            remaining: 0,
            reset_after_ms: retry,
            retry_after_ms: Some(retry),
            used_before: Q.burst,
        }
    }

    #[test]
    fn denies_as_many_hits_or_more_until_the_retry_time() {
        let clock = Arc::new(ManualClock::new(1_000));
        let cache = OverLimitCache::new(10, clock.clone());
        cache.remember(b"k", &Q, 2, &denied(500));
        assert_eq!(cache.get(b"k", &Q, 1), None, "fewer hits might pass");
        assert_eq!(cache.get(b"k", &Q, 2).unwrap().retry_after_ms, Some(500));
        clock.advance(499);
        assert_eq!(cache.get(b"k", &Q, 3).unwrap().retry_after_ms, Some(1));
        clock.advance(1);
        assert_eq!(cache.get(b"k", &Q, 2), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn a_denial_answers_only_the_quota_it_was_made_under() {
        let cache = OverLimitCache::new(10, Arc::new(ManualClock::new(0)));
        cache.remember(b"k", &Q, 1, &denied(500));
        let raised = Quota { limit: 1_000, ..Q };
        assert_eq!(cache.get(b"k", &raised, 1), None);
        assert!(cache.get(b"k", &Q, 1).is_some());
    }

    #[test]
    fn allowed_or_never_admissible_answers_are_not_cached() {
        let cache = OverLimitCache::new(10, Arc::new(ManualClock::new(0)));
        let mut never = denied(5);
        never.retry_after_ms = None;
        cache.remember(b"a", &Q, 1, &never);
        let mut allowed = denied(5);
        allowed.allowed = true;
        cache.remember(b"b", &Q, 1, &allowed);
        assert!(cache.is_empty());
    }

    #[test]
    fn never_holds_more_than_its_capacity() {
        let clock = Arc::new(ManualClock::new(0));
        let cache = OverLimitCache::new(100, clock.clone());
        for i in 0..10_000u32 {
            cache.remember(&i.to_be_bytes(), &Q, 1, &denied(60_000));
        }
        assert_eq!(cache.len(), 100);
        // Expired entries make room.
        clock.advance(60_000);
        cache.remember(b"new", &Q, 1, &denied(1));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_full_cache_sweeps_at_most_once_per_interval() {
        let clock = Arc::new(ManualClock::new(0));
        let cache = OverLimitCache::new(2, clock.clone());
        cache.remember(b"short", &Q, 1, &denied(10));
        cache.remember(b"long", &Q, 1, &denied(60_000));
        // Full; the first overflow sweeps (nothing expired yet) and then no
        // sweep runs for a second, even after `short` expires.
        cache.remember(b"a", &Q, 1, &denied(60_000));
        clock.advance(500);
        cache.remember(b"b", &Q, 1, &denied(60_000));
        assert_eq!(cache.len(), 2);
        assert!(
            cache.get(b"b", &Q, 1).is_none(),
            "uncached while no sweep may run"
        );
        clock.advance(500);
        cache.remember(b"c", &Q, 1, &denied(60_000));
        assert!(cache.get(b"c", &Q, 1).is_some(), "the sweep made room");
        assert!(cache.get(b"long", &Q, 1).is_some());
    }
}
