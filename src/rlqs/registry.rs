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
//! room the others do not hold: [`Registry::hold`] claims a grown share
//! atomically against the others' (one script in Redis) before it is sent,
//! so two instances can never hand out the same room. The registry
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

/// A grown share a member wants to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The bucket's injective key.
    pub bucket: String,
    /// Tokens per fill wanted.
    pub wanted: u64,
    /// The rule's tokens per fill, for every member together.
    pub pool: u64,
    /// The fill interval in seconds (held shares are kept per second).
    pub fill_seconds: u64,
}

/// The tokens a claim can have beside `others` (tokens per fill the other
/// members hold): the one rule both registries apply.
pub fn claimable(claim: &Claim, others: f64) -> u64 {
    let room = (claim.pool as f64 - others.max(0.0) + 1e-6).floor();
    if room <= 0.0 {
        0
    } else {
        claim.wanted.min(room as u64)
    }
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

    /// Claims grown shares for `member`, atomically against what every other
    /// member holds: each claim gets `min(wanted, pool − others' held)`
    /// (never below zero), which is recorded as held before it is sent.
    /// Returns the tokens granted, per claim.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the registry cannot be reached.
    async fn hold(
        &self,
        domain: &str,
        member: &str,
        claims: &[Claim],
        timing: Timing,
    ) -> Result<Vec<u64>, StoreError>;

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
