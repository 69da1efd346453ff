//! Leases in process memory: [`table`](super::table) under one lock.
//!
//! One `std` mutex for every key: an operation touches all its keys at once
//! (all or nothing), holds the lock for microseconds and never across an
//! `.await`. A key whose table is empty after its purge is dropped, so memory
//! per key is bounded by its limit and idle keys cost nothing; every
//! [`SWEEP_EVERY`] operations, all keys are purged, so keys never touched
//! again do not linger past their leases.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::table::{self, KeyState, Op, Reply};
use super::{LeaseKey, LeaseStore};
use crate::clock::Clock;
use crate::store::StoreError;

/// Operations between two sweeps of every key.
pub const SWEEP_EVERY: u64 = 4_096;

/// The in-process lease store.
#[derive(Debug, Clone)]
pub struct MemoryLeases {
    inner: Arc<Mutex<Tables>>,
    clock: Arc<dyn Clock>,
}

#[derive(Debug, Default)]
struct Tables {
    keys: HashMap<Vec<u8>, KeyState>,
    operations: u64,
}

// === impl MemoryLeases ===

impl MemoryLeases {
    /// An empty store reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Arc::default(),
            clock,
        }
    }

    /// Number of keys holding state (for tests).
    pub fn len(&self) -> usize {
        self.lock().keys.len()
    }

    /// Whether no key holds state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies `op` to `keys` now (synchronous: also the `local` failure
    /// policy's fallback).
    pub fn apply_now(&self, keys: &[LeaseKey], op: &Op) -> Reply {
        let now = self.clock.now_ms();
        let mut tables = self.lock();
        tables.operations += 1;
        if tables.operations.is_multiple_of(SWEEP_EVERY) {
            tables.keys.retain(|_, state| {
                state.purge(now);
                !state.is_empty()
            });
        }
        let mut states: Vec<KeyState> = keys
            .iter()
            .map(|k| tables.keys.remove(&k.key).unwrap_or_default())
            .collect();
        let limits: Vec<u64> = keys.iter().map(|k| k.limit.max_in_flight).collect();
        let reply = table::apply(&mut states, &limits, op, now);
        for (key, state) in keys.iter().zip(states) {
            if !state.is_empty() {
                tables.keys.insert(key.key.clone(), state);
            }
        }
        reply
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic while holding the lock leaves whole tables behind: each
        // operation replaces its keys' states at once.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl LeaseStore for MemoryLeases {
    async fn apply(&self, keys: &[LeaseKey], op: &Op) -> Result<Reply, StoreError> {
        Ok(self.apply_now(keys, op))
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}
