//! Where counters live: one small async trait, three backends.
//!
//! A [`CounterStore`] takes every hit of one request and applies them in one
//! atomic step with [`apply_batch`](crate::algorithm::apply_batch)'s
//! semantics: in memory under the locks of the keys involved, in Redis as one
//! Lua script call (one round trip), in a Redis Cluster as one script call
//! per hash slot, sent at once. An over-limit answer is an ordinary
//! [`Outcome`]; a [`StoreError`] means the store could not decide.

pub mod breaker;
pub mod memory;
pub mod over_limit_cache;
pub mod redis;
pub mod redis_cluster;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::algorithm::{BatchHit, Mode, Outcome};

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

    /// Checks that the backend answers.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when it does not answer within the deadline.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Short backend name for logs and metrics (`memory`, `redis`).
    fn backend(&self) -> &'static str;
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The call did not finish within the store deadline.
    #[error("store call timed out after {0:?}")]
    Timeout(Duration),
    /// No connection could be had.
    #[error("no connection to the store: {0}")]
    Connection(String),
    /// The backend answered with an error.
    #[error("store error: {0}")]
    Backend(String),
    /// The backend answered something we did not expect.
    #[error("unexpected store reply: {0}")]
    Protocol(String),
    /// The circuit breaker is open after repeated failures; the store was not called.
    #[error("store circuit open after repeated failures")]
    CircuitOpen,
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
