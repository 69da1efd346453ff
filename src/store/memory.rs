//! The embedded store: sharded maps in this process.
//!
//! Exact under concurrency: a batch locks every shard its keys live in (in
//! ascending shard order, so two batches can never deadlock) and runs
//! [`apply_batch`] while holding them. The locks are std [`Mutex`]es because
//! nothing awaits while one is held, and a batch touches a handful of keys.
//! A batch's writes are staged and applied when it ends, and only those that
//! change a counter: a dry run, a denied all-or-nothing request or a check
//! that adds nothing inserts (and so evicts) nothing.
//!
//! Bounded, and safe when full: entries carry the instant their state
//! expires; each shard drops expired entries at most once per
//! [`SWEEP_INTERVAL_MS`] when it is written, and never holds more than its
//! share of `max_keys`. The shard of a key comes from a hash keyed with a
//! random seed per store, so no caller can aim a flood at one shard. When a
//! shard is full, making room drops, in this order:
//!
//! 1. expired entries;
//! 2. counters below [`NEAR_LIMIT`] of their capacity, least used first;
//! 3. only then counters at or near their limit, the most recently created
//!    first.
//!
//! So a flood of new keys can never reset a counter at or near its limit
//! while its shard holds anything expired or less used, nor before every
//! near-limit counter created after it: resetting a client held at its limit
//! takes filling its (unknown) shard with near-limit counters newer than its
//! own — in effect, the whole store.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{CounterStore, StoreError};
use crate::algorithm::refund::refund;
use crate::algorithm::{BatchHit, Mode, Outcome, StateView, Stored, apply_batch};
use crate::clock::Clock;
use crate::reservation::{Ledger, ReservationStore};

/// Number of independently locked shards.
const SHARDS: usize = 64;

/// How often (at most) a shard scans itself for expired entries.
pub const SWEEP_INTERVAL_MS: u64 = 1_000;

/// A full shard evicts this fraction of itself at once (1/8).
const EVICT_FRACTION: usize = 8;

/// Default cap on live keys.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// Share of its capacity at which a counter counts as near its limit and is
/// protected from eviction (as upstream's `NEAR_LIMIT_RATIO`), out of 255.
pub const NEAR_LIMIT: u8 = 204;

/// The in-process counter store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Vec<Mutex<Shard>>,
    /// Keyed with a random seed: which keys share a shard is not knowable
    /// from outside.
    router: RandomState,
    max_keys_per_shard: usize,
    clock: Arc<dyn Clock>,
    /// The concurrency rules' leases, on the same clock.
    leases: crate::lease::MemoryLeases,
    /// Reservations charged to these counters.
    ledger: Ledger,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<Box<[u8]>, Entry>,
    next_sweep_ms: u64,
    /// Creation order of entries, for eviction among near-limit counters.
    created: u64,
}

/// One counter: its state, how close to its limit it stood when last
/// written, and when it was created.
#[derive(Debug, Clone, Copy)]
struct Entry {
    stored: Stored,
    /// Used share of its capacity at the last write, 0–255.
    pressure: u8,
    created: u64,
}

/// The shards one batch holds, with its staged writes.
struct LockedView<'a, 'k> {
    guards: Vec<(usize, MutexGuard<'a, Shard>)>,
    router: &'a RandomState,
    now_ms: u64,
    /// Per key touched: the state before the batch and the state now.
    staged: Vec<Staged<'k>>,
}

struct Staged<'k> {
    key: &'k [u8],
    before: Option<Stored>,
    now: Option<Stored>,
}

// === impl MemoryStore ===

impl MemoryStore {
    /// A store that keeps at most about `max_keys` live counters and reads
    /// time from `clock`.
    pub fn new(max_keys: usize, clock: Arc<dyn Clock>) -> Self {
        Self::with_ledger(max_keys, clock, Ledger::default())
    }

    /// As [`MemoryStore::new`], keeping reservations in `ledger`.
    pub fn with_ledger(max_keys: usize, clock: Arc<dyn Clock>, ledger: Ledger) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                router: RandomState::new(),
                max_keys_per_shard: max_keys.div_ceil(SHARDS).max(1),
                leases: crate::lease::MemoryLeases::new(clock.clone()),
                clock,
                ledger,
            }),
        }
    }

    /// The reservations charged to these counters.
    pub(crate) fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// The store's time.
    pub(crate) fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// Applies `hits` as [`CounterStore::apply`] does, and says at which
    /// instant they were judged (a reservation records its windows from it).
    pub(crate) fn apply_at(&self, hits: &[BatchHit<'_>], mode: Mode) -> (Vec<Outcome>, u64) {
        let mut view = self.lock_for(hits);
        let now_ms = view.now_ms;
        let outcomes = apply_batch(&mut view, hits, mode, now_ms);
        view.commit(hits, &outcomes, self.inner.max_keys_per_shard);
        (outcomes, now_ms)
    }

    /// Rewrites the counters at `keys`, in order, under their shards'
    /// locks: `change(i, live state, now)` returns the new state of
    /// `keys[i]`, or `None` to leave it (settling a reservation).
    pub(crate) fn rewrite(
        &self,
        keys: &[&[u8]],
        mut change: impl FnMut(usize, Option<Stored>, u64) -> Option<Stored>,
    ) {
        let router = &self.inner.router;
        let mut indices: Vec<usize> = keys.iter().map(|k| shard_of(router, k)).collect();
        indices.sort_unstable();
        indices.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> = indices
            .into_iter()
            .map(|i| (i, lock(&self.inner.shards[i])))
            .collect();
        let now_ms = self.inner.clock.now_ms();
        for (i, key) in keys.iter().enumerate() {
            let index = shard_of(router, key);
            let Some((_, shard)) = guards.iter_mut().find(|(at, _)| *at == index) else {
                unreachable!("every key's shard was locked");
            };
            let live = shard
                .entries
                .get(*key)
                .map(|e| e.stored)
                .filter(|s| s.expires_at_ms > now_ms);
            let Some(stored) = change(i, live, now_ms) else {
                continue;
            };
            match shard.entries.get_mut(*key) {
                Some(entry) => entry.stored = stored,
                None => {
                    shard.make_room(now_ms, self.inner.max_keys_per_shard, 1);
                    shard.upsert(key, stored, 0);
                }
            }
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

    fn lock_for<'k>(&self, hits: &[BatchHit<'k>]) -> LockedView<'_, 'k> {
        let router = &self.inner.router;
        let mut indices: Vec<usize> = hits.iter().map(|h| shard_of(router, h.key)).collect();
        indices.sort_unstable();
        indices.dedup();
        LockedView {
            guards: indices
                .into_iter()
                .map(|i| (i, lock(&self.inner.shards[i])))
                .collect(),
            router,
            now_ms: self.inner.clock.now_ms(),
            staged: Vec::with_capacity(hits.len()),
        }
    }
}

#[async_trait]
impl CounterStore for MemoryStore {
    async fn delete(&self, keys: &[Vec<u8>]) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for key in keys {
            let shard = &self.inner.shards[shard_of(&self.inner.router, key)];
            deleted += u64::from(lock(shard).entries.remove(key.as_slice()).is_some());
        }
        Ok(deleted)
    }

    async fn apply(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError> {
        let mut view = self.lock_for(hits);
        let now_ms = view.now_ms;
        let outcomes = apply_batch(&mut view, hits, mode, now_ms);
        view.commit(hits, &outcomes, self.inner.max_keys_per_shard);
        Ok(outcomes)
    }

    async fn ping(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    fn leases(&self) -> Option<Arc<dyn crate::lease::LeaseStore>> {
        Some(Arc::new(self.inner.leases.clone()))
    }

    async fn refund(&self, hits: &[BatchHit<'_>]) -> Result<(), StoreError> {
        let mut view = self.lock_for(hits);
        let now_ms = view.now_ms;
        for hit in hits {
            let stored = view.load(hit.key);
            if let Some(after) = refund(hit.algorithm, &hit.quota, stored, hit.hits, now_ms) {
                view.store(hit.key, Some(after));
            }
        }
        // Nothing was judged: a refunded key reads as under no pressure.
        let outcomes: Vec<Outcome> = hits
            .iter()
            .map(|hit| Outcome {
                allowed: true,
                remaining: hit.quota.burst.max(hit.quota.limit),
                reset_after_ms: 0,
                retry_after_ms: None,
                used_before: 0,
            })
            .collect();
        view.commit(hits, &outcomes, self.inner.max_keys_per_shard);
        Ok(())
    }

    fn reservations(&self) -> Option<Arc<dyn ReservationStore>> {
        Some(Arc::new(self.clone()))
    }
}

// === impl LockedView ===

impl LockedView<'_, '_> {
    fn shard(&mut self, key: &[u8]) -> &mut Shard {
        let index = shard_of(self.router, key);
        let at = self
            .guards
            .binary_search_by_key(&index, |(i, _)| *i)
            .unwrap_or_else(|_| unreachable!("every key of the batch had its shard locked"));
        &mut self.guards[at].1
    }

    /// Applies the staged writes that change a counter, making room for new
    /// keys first.
    fn commit(&mut self, hits: &[BatchHit<'_>], outcomes: &[Outcome], cap: usize) {
        let now_ms = self.now_ms;
        let staged = std::mem::take(&mut self.staged);
        let router = self.router;
        for (index, shard) in &mut self.guards {
            let new_keys = staged
                .iter()
                .filter(|s| s.before.is_none() && s.now.is_some())
                .filter(|s| shard_of(router, s.key) == *index)
                .count();
            if new_keys > 0 {
                shard.make_room(now_ms, cap, new_keys);
            }
        }
        for write in staged.iter().filter(|s| s.before != s.now) {
            let pressure = pressure(hits, outcomes, write.key);
            let shard = self.shard(write.key);
            match write.now {
                None => {
                    shard.entries.remove(write.key);
                }
                Some(stored) => shard.upsert(write.key, stored, pressure),
            }
        }
    }
}

impl<'k> StateView<'k> for LockedView<'_, 'k> {
    fn load(&mut self, key: &'k [u8]) -> Option<Stored> {
        if let Some(staged) = self.staged.iter().find(|s| s.key == key) {
            return staged.now;
        }
        let now_ms = self.now_ms;
        self.shard(key)
            .entries
            .get(key)
            .map(|e| e.stored)
            .filter(|s| s.expires_at_ms > now_ms)
    }

    fn store(&mut self, key: &'k [u8], stored: Option<Stored>) {
        if let Some(staged) = self.staged.iter_mut().find(|s| s.key == key) {
            staged.now = stored;
            return;
        }
        let before = self.load(key);
        self.staged.push(Staged {
            key,
            before,
            now: stored,
        });
    }
}

// === impl Shard ===

impl Shard {
    fn upsert(&mut self, key: &[u8], stored: Stored, pressure: u8) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.stored = stored;
            entry.pressure = pressure;
            return;
        }
        self.created += 1;
        self.entries.insert(
            key.into(),
            Entry {
                stored,
                pressure,
                created: self.created,
            },
        );
    }

    /// Sweeps expired entries when due, and evicts while the shard has no
    /// room for `new_keys` more.
    fn make_room(&mut self, now_ms: u64, cap: usize, new_keys: usize) {
        let full = || self.entries.len() + new_keys > cap;
        if now_ms >= self.next_sweep_ms || full() {
            self.entries.retain(|_, e| e.stored.expires_at_ms > now_ms);
            self.next_sweep_ms = now_ms + SWEEP_INTERVAL_MS;
        }
        if self.entries.len() + new_keys > cap {
            let count =
                (self.entries.len() + new_keys - cap).max(self.entries.len() / EVICT_FRACTION + 1);
            self.evict(count);
            tracing::debug!(
                cap,
                "memory store shard full; dropped its least used counters"
            );
        }
    }

    /// Drops `count` entries, lowest [`eviction_rank`] first. One pass over
    /// the shard frees many slots, so a shard kept full by a flood of new
    /// keys pays the scan once per `cap / EVICT_FRACTION` inserts, not per
    /// insert.
    fn evict(&mut self, count: usize) {
        let mut ranks: Vec<u64> = self.entries.values().map(eviction_rank).collect();
        let count = count.min(ranks.len());
        if count == 0 {
            return;
        }
        let threshold = *ranks.select_nth_unstable(count - 1).1;
        let mut evicted = 0;
        self.entries.retain(|_, e| {
            let evict = evicted < count && eviction_rank(e) <= threshold;
            evicted += usize::from(evict);
            !evict
        });
    }
}

/// Eviction order, lowest first: counters below the near-limit share by how
/// much they use, then near-limit counters newest first.
fn eviction_rank(entry: &Entry) -> u64 {
    if entry.pressure < NEAR_LIMIT {
        u64::from(entry.pressure)
    } else {
        u64::MAX - entry.created
    }
}

/// How much of its capacity the counter at `key` uses after this batch,
/// from the last outcome for it: 0 (nothing) to 255 (at or over the limit).
fn pressure(hits: &[BatchHit<'_>], outcomes: &[Outcome], key: &[u8]) -> u8 {
    let Some((hit, outcome)) = hits
        .iter()
        .zip(outcomes)
        .rev()
        .find(|(hit, _)| hit.key == key)
    else {
        return u8::MAX;
    };
    let capacity = hit.quota.burst.max(hit.quota.limit);
    if capacity == 0 || !outcome.allowed {
        return u8::MAX;
    }
    let used = capacity.saturating_sub(outcome.remaining);
    u8::try_from(u128::from(used) * 255 / u128::from(capacity)).unwrap_or(u8::MAX)
}

fn shard_of(router: &RandomState, key: &[u8]) -> usize {
    (router.hash_one(key) % SHARDS as u64) as usize
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

    fn hit(key: &[u8], limit: u64, window_ms: u64, hits: u64) -> BatchHit<'_> {
        BatchHit {
            key,
            algorithm: AlgorithmKind::FixedWindow,
            quota: Quota {
                limit,
                window_ms,
                burst: limit,
            },
            hits,
            enforced: true,
        }
    }

    async fn allowed(store: &MemoryStore, hit: BatchHit<'_>, mode: Mode) -> bool {
        store.apply(&[hit], mode).await.unwrap()[0].allowed
    }

    #[tokio::test]
    async fn expired_windows_are_reclaimed() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(1_000, clock.clone());
        for i in 0..200u32 {
            let key = i.to_be_bytes();
            allowed(&store, hit(&key, 2, 1_000, 1), Mode::Independent).await;
        }
        assert_eq!(store.len(), 200);
        // Two seconds later every window has ended; writes sweep their shard.
        clock.advance(2 * SWEEP_INTERVAL_MS);
        for i in 1_000..1_200u32 {
            let key = i.to_be_bytes();
            allowed(&store, hit(&key, 2, 1_000, 1), Mode::Independent).await;
        }
        assert!(store.len() <= 200 + SHARDS, "len {}", store.len());
    }

    #[tokio::test]
    async fn live_keys_never_exceed_the_cap() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(640, clock);
        for i in 0..20_000u32 {
            let key = i.to_be_bytes();
            allowed(&store, hit(&key, 2, 1_000, 1), Mode::Independent).await;
        }
        assert!(store.len() <= 640, "len {}", store.len());
    }

    #[tokio::test]
    async fn counts_across_calls_and_resets_with_the_window() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(1_000, clock.clone());
        let once = || hit(b"k", 2, 1_000, 1);
        assert!(allowed(&store, once(), Mode::AllOrNothing).await);
        assert!(allowed(&store, once(), Mode::AllOrNothing).await);
        assert!(!allowed(&store, once(), Mode::AllOrNothing).await);
        clock.advance(1_000);
        assert!(allowed(&store, once(), Mode::AllOrNothing).await);
    }

    /// The attack a review found: fill a full store with keys (here both
    /// barely used ones and ones at their own limit, created after the
    /// victim's, with windows far longer) so that making room evicts the
    /// victim's counter and gives it a fresh limit. The victim stays denied.
    #[tokio::test]
    async fn a_victim_at_its_limit_stays_denied_while_a_flood_fills_the_store() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(640, clock.clone());
        let victim = || hit(b"victim", 5, 60_000, 1);
        for _ in 0..5 {
            assert!(allowed(&store, victim(), Mode::AllOrNothing).await);
        }
        assert!(!allowed(&store, victim(), Mode::AllOrNothing).await);
        for i in 0..20_000u32 {
            let key = i.to_be_bytes();
            // Barely used: one hit of a hundred.
            allowed(&store, hit(&key, 100, 86_400_000, 1), Mode::Independent).await;
            // At their own limit, a day long.
            let key = (i + 1_000_000).to_be_bytes();
            allowed(&store, hit(&key, 1, 86_400_000, 1), Mode::Independent).await;
            if i % 1_000 == 0 {
                assert!(
                    !allowed(&store, victim(), Mode::AllOrNothing).await,
                    "reset after {i}"
                );
            }
        }
        assert!(!allowed(&store, victim(), Mode::AllOrNothing).await);
        assert!(store.len() <= 640, "len {}", store.len());
        // Its window over, the victim counts afresh as anyone does.
        clock.advance(60_000);
        assert!(allowed(&store, victim(), Mode::AllOrNothing).await);
    }

    #[tokio::test]
    async fn requests_that_consume_nothing_insert_nothing() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(640, clock);
        for i in 0..1_000u32 {
            let key = i.to_be_bytes();
            // A dry run, a check of 0 hits, a request denied as a whole.
            allowed(&store, hit(&key, 5, 60_000, 1), Mode::DryRun).await;
            allowed(&store, hit(&key, 5, 60_000, 0), Mode::Independent).await;
            let denied = [hit(&key, 5, 60_000, 1), hit(b"zero", 0, 60_000, 1)];
            let outcomes = store.apply(&denied, Mode::AllOrNothing).await.unwrap();
            assert!(!outcomes[1].allowed);
        }
        assert!(store.is_empty(), "len {}", store.len());
    }

    #[test]
    fn each_store_places_keys_on_its_own_shards() {
        let (a, b) = (RandomState::new(), RandomState::new());
        let keys: Vec<[u8; 4]> = (0..100u32).map(u32::to_be_bytes).collect();
        let placement = |router: &RandomState| -> Vec<usize> {
            keys.iter().map(|k| shard_of(router, k)).collect()
        };
        // 100 keys landing on the same 64 shards twice by chance: 64^-100.
        assert_ne!(placement(&a), placement(&b));
    }
}
