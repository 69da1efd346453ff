//! The registry of subscribers: who, across every ratekeeper instance, is
//! subscribed to a bucket and what each wants, so that each instance can run
//! the allocator over the whole set and push shares only to its own streams.
//!
//! A stream hands in one batch per usage report ([`Registry::exchange`]):
//! its demand per bucket goes in, and every live member of those buckets
//! comes back, in one call (one Redis round trip). Members that have not
//! reported for `stale_ms` are dropped, so a crashed instance's streams age
//! out; streams that end leave at once ([`Registry::leave`]). The registry
//! Each member also records the share it holds, so a share only grows into
//! room the others do not hold ([`Registry::hold`] records a grown share
//! before it is sent). The registry
//! also says whether it is [`learning`](Exchange::learning): it lost its
//! state (or just started) less than a TTL ago, so Envoys may still hold
//! assignments it cannot see.

mod memory;
mod redis;

use std::fmt;

use async_trait::async_trait;

pub use self::memory::MemoryRegistry;
pub use self::redis::RedisRegistry;
use crate::store::StoreError;

/// How long entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A member that has not reported for this long is gone.
    pub stale_ms: u64,
    /// How long after state loss the registry is learning.
    pub learning_ms: u64,
}

/// One bucket's line in a report batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The bucket's injective key, domain included.
    pub bucket: String,
    /// Demand in tokens per fill; `None` while not measured.
    pub demand: Option<f64>,
    /// Requests allowed per second, as last measured.
    pub allowed_rate: f64,
    /// The share this member holds now (last sent), per second; `None`
    /// keeps what the registry has (a client reconnecting under its id
    /// still holds what it was sent on its previous stream).
    pub held: Option<f64>,
}

/// A member of a bucket as the registry holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The member (instance and stream).
    pub id: String,
    /// Demand in tokens per fill; `None` while not measured.
    pub demand: Option<f64>,
    /// Requests allowed per second, as last measured.
    pub allowed_rate: f64,
    /// The share it holds, per second.
    pub held: f64,
}

/// What an exchange returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// Per report, in order: every live member of its bucket, sorted by id
    /// (the caller included).
    pub members: Vec<Vec<Member>>,
    /// The registry lost its state less than `learning_ms` ago.
    pub learning: bool,
}

/// Where subscribers are registered.
#[async_trait]
pub trait Registry: Send + Sync + fmt::Debug {
    /// Records `member`'s reports and returns the members of each bucket.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the registry cannot be reached.
    async fn exchange(
        &self,
        domain: &str,
        member: &str,
        reports: &[Report],
        timing: Timing,
    ) -> Result<Exchange, StoreError>;

    /// Records the share `member` now holds in each `(bucket, per second)`,
    /// before it is sent: a grown share is visible to every instance first.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the registry cannot be reached.
    async fn hold(
        &self,
        domain: &str,
        member: &str,
        held: &[(String, f64)],
        timing: Timing,
    ) -> Result<(), StoreError>;

    /// Removes `member` from `buckets`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the registry cannot be reached.
    async fn leave(&self, domain: &str, member: &str, buckets: &[String])
    -> Result<(), StoreError>;

    /// `memory` or `redis`.
    fn backend(&self) -> &'static str;
}
