//! Where counters live: one small async trait, three backends.
//!
//! A [`CounterStore`] takes every hit of one request and applies them in one
//! atomic step with [`apply_batch`](crate::algorithm::apply_batch)'s
//! semantics: in memory under the locks of the keys involved, in Redis as one
//! Lua script call (one round trip), in a Redis Cluster as one script call
//! per hash slot, sent at once. An over-limit answer is an ordinary
//! [`Outcome`]; a [`StoreError`] means the store could not decide. The
//! Redis stores can count instead in envoyproxy/ratelimit's keys
//! ([`envoy_layout`]), for a rolling migration from it.

pub mod breaker;
pub mod envoy_layout;
pub(crate) mod groups;
pub mod memory;
pub mod over_limit_cache;
pub mod redis;
pub mod redis_cluster;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::rules::KeyLayout;

pub use breaker::CircuitBreaker;
pub use memory::MemoryStore;
pub use over_limit_cache::OverLimitCache;
pub use redis::RedisStore;
pub use redis_cluster::RedisClusterStore;

/// A backend that applies a request's hits atomically.
#[async_trait]
pub trait CounterStore: Send + Sync + fmt::Debug {
    /// Applies `hits` with `mode` and returns one outcome per hit, in order.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend failed or missed its deadline; then
    /// nothing is known about whether the hits were counted.
    async fn apply(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError>;

    /// Checks that the backend answers. `Ok(Some(detail))` means it answers
    /// only in part (a cluster with an unreachable master): most requests
    /// are still decided.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when it does not answer within the deadline.
    async fn ping(&self) -> Result<Option<String>, StoreError>;

    /// Short backend name for logs and metrics (`memory`, `redis`).
    fn backend(&self) -> &'static str;

    /// The layout the limiter must build this store's keys in:
    /// ratekeeper's own unless the store counts in envoyproxy/ratelimit's
    /// keys.
    fn key_layout(&self) -> KeyLayout {
        KeyLayout::Ratekeeper
    }

    /// Takes `hits` back from their counters, never below zero (Envoy's
    /// negative hits on counting rules; see `algorithm::refund`). A store
    /// that cannot refund (the envoy-ratelimit key layout) ignores them.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend failed or missed its deadline.
    async fn refund(&self, hits: &[BatchHit<'_>]) -> Result<(), StoreError> {
        let _ = hits;
        Ok(())
    }

    /// The lease tables kept beside these counters (concurrency rules);
    /// `None` when this backend keeps none.
    fn leases(&self) -> Option<std::sync::Arc<dyn crate::lease::LeaseStore>> {
        None
    }

    /// Deletes the counters at `keys` (an operator's reset); returns how many
    /// existed. Keys are named exactly, never searched for.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend failed, or cannot delete keys.
    async fn delete(&self, keys: &[Vec<u8>]) -> Result<u64, StoreError> {
        let _ = keys;
        Err(StoreError::Protocol(format!(
            "the {} store cannot reset counters",
            self.backend()
        )))
    }

    /// Plain Redis commands on this store's connections, for the shared
    /// overrides; `None` for a store that is not Redis.
    fn commands(&self) -> Option<Arc<dyn RedisCommands>> {
        None
    }

    /// The reservations kept beside these counters (reserve, then settle);
    /// `None` when this backend keeps none.
    fn reservations(&self) -> Option<std::sync::Arc<dyn crate::reservation::ReservationStore>> {
        None
    }
}

/// Plain Redis commands routed to the node that owns a key, on the Redis
/// stores' own connections (so Sentinel failovers and Cluster slots are
/// followed): for work off the request path, such as the shared overrides.
#[async_trait]
pub trait RedisCommands: Send + Sync + fmt::Debug {
    /// Runs `cmd` on the master that owns `key`'s slot, within
    /// [`ADMIN_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store failed or answered with an error.
    async fn query(&self, key: &[u8], cmd: ::redis::Cmd) -> Result<::redis::Value, StoreError>;
}

/// Deadline of a call off the request path (overrides, resets): an operator
/// or a poll may wait longer than a decision may.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The call did not finish within the store deadline.
    #[error("store call timed out after {0:?}")]
    Timeout(Duration),
    /// No connection could be had.
    #[error("no connection to the store: {0}")]
    Connection(String),
    /// The backend answered with an error about itself (read-only, loading,
    /// out of memory, cluster down, …).
    #[error("store error: {0}")]
    Backend(String),
    /// The backend answered something we could not use, or refused this
    /// request's script: a bug, not an outage.
    #[error("unexpected store reply: {0}")]
    Protocol(String),
    /// The circuit breaker is open after repeated failures; the store was not called.
    #[error("store circuit open after repeated failures")]
    CircuitOpen,
}

impl StoreError {
    /// A short name of the kind of failure, for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Connection(_) => "connection",
            StoreError::Backend(_) => "backend",
            StoreError::Protocol(_) => "protocol",
            StoreError::CircuitOpen => "circuit_open",
        }
    }

    /// Whether this says the store is failing (unreachable, too slow, or in
    /// a state where it cannot serve), as opposed to a reply this request
    /// could not use. Only store failures count toward the circuit breaker.
    pub fn is_store_failure(&self) -> bool {
        match self {
            StoreError::Timeout(_)
            | StoreError::Connection(_)
            | StoreError::Backend(_)
            | StoreError::CircuitOpen => true,
            StoreError::Protocol(_) => false,
        }
    }
}

/// Runs a store call under `deadline`; past it, the call is dropped and
/// fails with [`StoreError::Timeout`].
pub(crate) async fn within<T>(
    deadline: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(deadline, call)
        .await
        .map_err(|_| StoreError::Timeout(deadline))?
}

#[cfg(test)]
pub(crate) mod scripted {
    //! A store that answers as a test scripts it, for the limiter's and the
    //! breaker's unit tests.

    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// One scripted answer.
    #[derive(Debug, Clone)]
    pub(crate) enum Reply {
        /// Every hit allowed with `remaining` left.
        Allow(u64),
        /// This error.
        Fail(StoreError),
        /// Never answers (a silent store).
        Hang,
    }

    /// Answers calls from a queue; when it is empty, with `otherwise`.
    #[derive(Debug)]
    pub(crate) struct ScriptedStore {
        queue: Mutex<VecDeque<Reply>>,
        otherwise: Reply,
        calls: AtomicUsize,
    }

    impl ScriptedStore {
        pub(crate) fn new(otherwise: Reply) -> Self {
            Self {
                queue: Mutex::default(),
                otherwise,
                calls: AtomicUsize::new(0),
            }
        }

        pub(crate) fn then(self, reply: Reply) -> Self {
            self.queue.lock().unwrap().push_back(reply);
            self
        }

        pub(crate) fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn next(&self) -> Reply {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let queued = self.queue.lock().unwrap().pop_front();
            queued.unwrap_or_else(|| self.otherwise.clone())
        }
    }

    #[async_trait]
    impl CounterStore for ScriptedStore {
        async fn apply(
            &self,
            hits: &[BatchHit<'_>],
            _mode: Mode,
        ) -> Result<Vec<Outcome>, StoreError> {
            let allowed = |remaining| Outcome {
                allowed: true,
                remaining,
                reset_after_ms: 1_000,
                retry_after_ms: None,
                used_before: 0,
            };
            match self.next() {
                Reply::Allow(remaining) => Ok(vec![allowed(remaining); hits.len()]),
                Reply::Fail(error) => Err(error),
                Reply::Hang => std::future::pending().await,
            }
        }

        async fn ping(&self) -> Result<Option<String>, StoreError> {
            match self.next() {
                Reply::Fail(error) => Err(error),
                Reply::Hang => std::future::pending().await,
                Reply::Allow(_) => Ok(None),
            }
        }

        fn backend(&self) -> &'static str {
            "scripted"
        }
    }
}
