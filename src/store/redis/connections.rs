//! Shared, pipelined Redis connections: a few slots, each one multiplexed
//! connection that every concurrent request on that slot shares.
//!
//! Checking a connection out of a pool per request would make each request
//! wait for a connection of its own and pay deadpool-redis's health check (an
//! `UNWATCH` + `PING` round trip) on every checkout. Instead, requests go
//! round-robin over the slots and clone the slot's
//! [`MultiplexedConnection`]: concurrent script calls are written back to back
//! on one socket and share round trips, and a decision costs exactly one
//! request to Redis. deadpool-redis remains the connection factory (URL,
//! TLS and ACL handling, the bounded connect timeout): a slot takes a fresh
//! connection out of the pool for good, and when a call fails with an I/O
//! error the slot is marked broken and refilled on its next use.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwapOption;
use deadpool_redis::Pool;
use redis::aio::MultiplexedConnection;

use crate::store::StoreError;

/// The slots.
pub(super) struct Connections {
    pool: Pool,
    slots: Box<[Slot]>,
    next: AtomicUsize,
}

/// One slot: its current connection and a lock so only one caller refills it.
struct Slot {
    current: ArcSwapOption<Shared>,
    refill: tokio::sync::Mutex<()>,
}

/// A connection shared by every request on its slot.
pub(super) struct Shared {
    conn: MultiplexedConnection,
    broken: AtomicBool,
}

impl Connections {
    /// `count` slots filled from `pool` on first use.
    pub(super) fn new(pool: Pool, count: usize) -> Self {
        Self {
            pool,
            slots: (0..count.max(1))
                .map(|_| Slot {
                    current: ArcSwapOption::empty(),
                    refill: tokio::sync::Mutex::new(()),
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next slot's connection, connecting first if the slot is empty or
    /// its connection broke.
    pub(super) async fn get(&self) -> Result<Arc<Shared>, StoreError> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        if let Some(shared) = healthy(&slot.current) {
            return Ok(shared);
        }
        let _refilling = slot.refill.lock().await;
        // Someone else may have refilled it while we waited.
        if let Some(shared) = healthy(&slot.current) {
            return Ok(shared);
        }
        let object = self
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Connection(e.to_string()))?;
        let shared = Arc::new(Shared {
            conn: deadpool_redis::Connection::take(object),
            broken: AtomicBool::new(false),
        });
        slot.current.store(Some(shared.clone()));
        Ok(shared)
    }
}

impl Shared {
    /// A handle for one call (cheap: the connection is multiplexed).
    pub(super) fn connection(&self) -> MultiplexedConnection {
        self.conn.clone()
    }

    /// Records the outcome of a call: an I/O-level failure means the
    /// connection is gone and the slot must be refilled.
    pub(super) fn observe(&self, error: &redis::RedisError) {
        if error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal() {
            self.broken.store(true, Ordering::Relaxed);
        }
    }
}

fn healthy(current: &ArcSwapOption<Shared>) -> Option<Arc<Shared>> {
    current
        .load_full()
        .filter(|shared| !shared.broken.load(Ordering::Relaxed))
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live = self
            .slots
            .iter()
            .filter(|s| healthy(&s.current).is_some())
            .count();
        f.debug_struct("Connections")
            .field("slots", &self.slots.len())
            .field("live", &live)
            .finish()
    }
}
