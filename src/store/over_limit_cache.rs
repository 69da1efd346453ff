//! A bounded, opt-in cache of counters known to be over their limit.
//!
//! When the store denies a hit, it also says when the same hits would pass
//! (`retry_after`). Until then, any request adding at least as many hits to
//! that counter is certain to be denied again — other callers can only
//! consume more — so it can be answered here without a round trip. The cache
//! may therefore only deny what the store already denied. It is cleared when
//! the rules change (a raised limit could admit sooner) and holds at most
//! `capacity` counters: a flood of distinct keys cannot grow it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::algorithm::Outcome;
use crate::clock::Clock;

/// The cache.
#[derive(Debug)]
pub struct OverLimitCache {
    capacity: usize,
    clock: Arc<dyn Clock>,
    /// A std mutex: held for one map operation, never across an await.
    entries: Mutex<HashMap<Box<[u8]>, Denied>>,
}

/// A known denial: `hits` or more are denied until `until_ms`.
#[derive(Debug, Clone, Copy)]
struct Denied {
    until_ms: u64,
    hits: u64,
}

impl OverLimitCache {
    /// A cache of at most `capacity` counters, reading time from `clock`
    /// (the same clock the store's answers are relative to).
    pub fn new(capacity: usize, clock: Arc<dyn Clock>) -> Self {
        Self {
            capacity,
            clock,
            entries: Mutex::default(),
        }
    }

    /// The denial to answer for `hits` on `key`, if one is known.
    pub fn get(&self, key: &[u8], hits: u64) -> Option<Outcome> {
        let now = self.clock.now_ms();
        let mut entries = self.lock();
        let denied = *entries.get(key)?;
        if denied.until_ms <= now {
            entries.remove(key);
            return None;
        }
        (hits >= denied.hits).then(|| Outcome {
            allowed: false,
            remaining: 0,
            reset_after_ms: denied.until_ms - now,
            retry_after_ms: Some(denied.until_ms - now),
        })
    }

    /// Remembers that the store denied `hits` on `key` with `outcome`.
    pub fn remember(&self, key: &[u8], hits: u64, outcome: &Outcome) {
        let Some(retry_after_ms) = outcome.retry_after_ms.filter(|_| !outcome.allowed) else {
            return;
        };
        let now = self.clock.now_ms();
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(key) {
            entries.retain(|_, denied| denied.until_ms > now);
            if entries.len() >= self.capacity {
                return;
            }
        }
        entries.insert(
            key.into(),
            Denied {
                until_ms: now + retry_after_ms,
                hits,
            },
        );
    }

    /// Forgets everything (the rules changed).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Number of counters held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<[u8]>, Denied>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn denied(retry: u64) -> Outcome {
        Outcome {
            allowed: false,
            remaining: 0,
            reset_after_ms: retry,
            retry_after_ms: Some(retry),
        }
    }

    #[test]
    fn denies_as_many_hits_or_more_until_the_retry_time() {
        let clock = Arc::new(ManualClock::new(1_000));
        let cache = OverLimitCache::new(10, clock.clone());
        cache.remember(b"k", 2, &denied(500));
        assert_eq!(cache.get(b"k", 1), None, "fewer hits might pass");
        assert_eq!(cache.get(b"k", 2).unwrap().retry_after_ms, Some(500));
        clock.advance(499);
        assert_eq!(cache.get(b"k", 3).unwrap().retry_after_ms, Some(1));
        clock.advance(1);
        assert_eq!(cache.get(b"k", 2), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn allowed_or_never_admissible_answers_are_not_cached() {
        let cache = OverLimitCache::new(10, Arc::new(ManualClock::new(0)));
        let mut never = denied(5);
        never.retry_after_ms = None;
        cache.remember(b"a", 1, &never);
        let mut allowed = denied(5);
        allowed.allowed = true;
        cache.remember(b"b", 1, &allowed);
        assert!(cache.is_empty());
    }

    #[test]
    fn never_holds_more_than_its_capacity() {
        let clock = Arc::new(ManualClock::new(0));
        let cache = OverLimitCache::new(100, clock.clone());
        for i in 0..10_000u32 {
            cache.remember(&i.to_be_bytes(), 1, &denied(60_000));
        }
        assert_eq!(cache.len(), 100);
        // Expired entries make room.
        clock.advance(60_000);
        cache.remember(b"new", 1, &denied(1));
        assert_eq!(cache.len(), 1);
    }
}
