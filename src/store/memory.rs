//! The embedded store: sharded maps in this process.
//!
//! Exact under concurrency: a batch locks every shard its keys live in (in
//! ascending shard order, so two batches can never deadlock) and runs
//! [`apply_batch`] while holding them. The locks are std [`Mutex`]es because
//! nothing awaits while one is held, and a batch touches a handful of keys.
//!
//! Bounded: entries carry the instant their window ends; each shard drops
//! expired entries at most once per [`SWEEP_INTERVAL_MS`] when it is written,
//! and a shard never holds more than its share of `max_keys`. When live keys
//! exceed the cap, the eighth of the shard closest to expiry is dropped (those
//! counters restart), which keeps memory bounded under a flood of distinct
//! descriptor values at the price of exactness for the dropped keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{CounterStore, StoreError};
use crate::algorithm::{BatchHit, Mode, Outcome, StateView, Stored, apply_batch};
use crate::clock::Clock;
use crate::rules::key::fnv1a;

/// Number of independently locked shards.
const SHARDS: usize = 64;

/// How often (at most) a shard scans itself for expired entries.
pub const SWEEP_INTERVAL_MS: u64 = 1_000;

/// A full shard evicts this fraction of itself at once (1/8).
const EVICT_FRACTION: usize = 8;

/// Default cap on live keys.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// The in-process counter store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Vec<Mutex<Shard>>,
    max_keys_per_shard: usize,
    clock: Arc<dyn Clock>,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<Box<[u8]>, Stored>,
    next_sweep_ms: u64,
}

/// The shards one batch holds, with the key-to-shard routing.
struct LockedView<'a> {
    guards: Vec<(usize, MutexGuard<'a, Shard>)>,
    now_ms: u64,
    max_keys_per_shard: usize,
}

// === impl MemoryStore ===

impl MemoryStore {
    /// A store that keeps at most about `max_keys` live counters and reads
    /// time from `clock`.
    pub fn new(max_keys: usize, clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                max_keys_per_shard: max_keys.div_ceil(SHARDS).max(1),
                clock,
            }),
        }
    }

    /// Number of entries held, expired or not (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| lock(s).entries.len())
            .sum()
    }

    /// Whether the store holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock_for(&self, hits: &[BatchHit<'_>]) -> LockedView<'_> {
        let mut indices: Vec<usize> = hits.iter().map(|h| shard_of(h.key)).collect();
        indices.sort_unstable();
        indices.dedup();
        LockedView {
            guards: indices
                .into_iter()
                .map(|i| (i, lock(&self.inner.shards[i])))
                .collect(),
            now_ms: self.inner.clock.now_ms(),
            max_keys_per_shard: self.inner.max_keys_per_shard,
        }
    }
}

#[async_trait]
impl CounterStore for MemoryStore {
    async fn apply(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError> {
        let mut view = self.lock_for(hits);
        let now_ms = view.now_ms;
        Ok(apply_batch(&mut view, hits, mode, now_ms))
    }

    async fn ping(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

// === impl LockedView ===

impl LockedView<'_> {
    fn shard(&mut self, key: &[u8]) -> &mut Shard {
        let index = shard_of(key);
        let at = self
            .guards
            .binary_search_by_key(&index, |(i, _)| *i)
            .unwrap_or_else(|_| unreachable!("every key of the batch had its shard locked"));
        &mut self.guards[at].1
    }
}

impl StateView for LockedView<'_> {
    fn load(&mut self, key: &[u8]) -> Option<Stored> {
        let now_ms = self.now_ms;
        self.shard(key)
            .entries
            .get(key)
            .filter(|s| s.expires_at_ms > now_ms)
            .copied()
    }

    fn store(&mut self, key: &[u8], stored: Option<Stored>) {
        let now_ms = self.now_ms;
        let cap = self.max_keys_per_shard;
        let shard = self.shard(key);
        match stored {
            None => {
                shard.entries.remove(key);
            }
            Some(stored) => {
                if let Some(slot) = shard.entries.get_mut(key) {
                    *slot = stored;
                    return;
                }
                shard.make_room(now_ms, cap);
                shard.entries.insert(key.into(), stored);
            }
        }
    }
}

// === impl Shard ===

impl Shard {
    /// Sweeps expired entries when due, and evicts while the shard is full.
    fn make_room(&mut self, now_ms: u64, cap: usize) {
        if now_ms >= self.next_sweep_ms || self.entries.len() >= cap {
            self.entries.retain(|_, s| s.expires_at_ms > now_ms);
            self.next_sweep_ms = now_ms + SWEEP_INTERVAL_MS;
        }
        if self.entries.len() >= cap {
            self.evict_closest_to_expiry(self.entries.len() / EVICT_FRACTION + 1);
            tracing::debug!(
                cap,
                "memory store shard full; dropped the counters closest to expiry"
            );
        }
    }

    /// Drops `count` entries, those that expire first. One pass over the
    /// shard frees many slots, so a shard kept full by a flood of new keys
    /// pays the scan once per `cap / EVICT_FRACTION` inserts, not per insert.
    fn evict_closest_to_expiry(&mut self, count: usize) {
        let mut expiries: Vec<u64> = self.entries.values().map(|s| s.expires_at_ms).collect();
        let count = count.min(expiries.len());
        if count == 0 {
            return;
        }
        let threshold = *expiries.select_nth_unstable(count - 1).1;
        let mut evicted = 0;
        self.entries.retain(|_, s| {
            let evict = evicted < count && s.expires_at_ms <= threshold;
            evicted += usize::from(evict);
            !evict
        });
    }
}

fn shard_of(key: &[u8]) -> usize {
    // Keys start with a hash tag, but hashing the whole key is cheap and keeps
    // shards even for any key layout.
    (fnv1a(key) % SHARDS as u64) as usize
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard cannot leave a half-written entry (every
    // write is one insert), so a poisoned lock is safe to keep using.
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::{AlgorithmKind, Quota};
    use crate::clock::ManualClock;

    fn hit(key: &[u8], hits: u64) -> BatchHit<'_> {
        BatchHit {
            key,
            algorithm: AlgorithmKind::FixedWindow,
            quota: Quota {
                limit: 2,
                window_ms: 1_000,
                burst: 2,
            },
            hits,
            enforced: true,
        }
    }

    #[tokio::test]
    async fn expired_windows_are_reclaimed() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(1_000, clock.clone());
        for i in 0..200u32 {
            let key = i.to_be_bytes();
            store
                .apply(&[hit(&key, 1)], Mode::Independent)
                .await
                .unwrap();
        }
        assert_eq!(store.len(), 200);
        // Two seconds later every window has ended; writes sweep their shard.
        clock.advance(2 * SWEEP_INTERVAL_MS);
        for i in 1_000..1_200u32 {
            let key = i.to_be_bytes();
            store
                .apply(&[hit(&key, 1)], Mode::Independent)
                .await
                .unwrap();
        }
        assert!(store.len() <= 200 + SHARDS, "len {}", store.len());
    }

    #[tokio::test]
    async fn live_keys_never_exceed_the_cap() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(640, clock);
        for i in 0..20_000u32 {
            let key = i.to_be_bytes();
            store
                .apply(&[hit(&key, 1)], Mode::Independent)
                .await
                .unwrap();
        }
        assert!(store.len() <= 640, "len {}", store.len());
    }

    #[tokio::test]
    async fn counts_across_calls_and_resets_with_the_window() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(1_000, clock.clone());
        let allowed = |o: Vec<Outcome>| o[0].allowed;
        assert!(allowed(
            store
                .apply(&[hit(b"k", 1)], Mode::AllOrNothing)
                .await
                .unwrap()
        ));
        assert!(allowed(
            store
                .apply(&[hit(b"k", 1)], Mode::AllOrNothing)
                .await
                .unwrap()
        ));
        assert!(!allowed(
            store
                .apply(&[hit(b"k", 1)], Mode::AllOrNothing)
                .await
                .unwrap()
        ));
        clock.advance(1_000);
        assert!(allowed(
            store
                .apply(&[hit(b"k", 1)], Mode::AllOrNothing)
                .await
                .unwrap()
        ));
    }
}
