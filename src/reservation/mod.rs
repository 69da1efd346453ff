//! Reserve, then settle: charging costs that are only known after the work
//! (LLM tokens, bytes of a response).
//!
//! A `ShouldAllow` with a reservation TTL is an ordinary all-or-nothing
//! decision whose cost is an estimate, charged at once, so admission counts
//! what was consumed, every outstanding reservation and the request by
//! construction. An admitted request also opens a reservation: a record of
//! exactly which counters and windows the estimate went into. `Settle`
//! consumes that record (exactly once, under the ledger's lock) and applies
//! actual − estimate to those counters ([`adjust`], the pure spec): a refund
//! floored at zero, or an extra charge with no admission check. A settled
//! reservation leaves a tombstone so a retry answers the same; one never
//! settled simply stays charged at its estimate.
//!
//! A store keeps reservations when [`CounterStore::reservations`] says so:
//! the memory store (a [`Ledger`] beside the counters), Redis on one node or
//! behind sentinels ([`redis`]) and Redis Cluster ([`redis_cluster`], for
//! requests on one slot) do; upstream's key layout does not, and a
//! reservation against it is refused with `FAILED_PRECONDITION`.
//!
//! [`CounterStore::reservations`]: crate::store::CounterStore::reservations

pub mod adjust;
pub mod ledger;
mod memory;
pub mod redis;
pub mod redis_cluster;
pub mod service;

use std::fmt;

use async_trait::async_trait;
use tonic::Status;

use crate::algorithm::{BatchHit, Outcome};
use crate::store::StoreError;

pub use ledger::{Charge, Ledger};

/// A backend that charges estimates and settles them.
#[async_trait]
pub trait ReservationStore: Send + Sync + fmt::Debug {
    /// Applies `hits` all-or-nothing, each an estimate of `estimate`; when
    /// they are admitted, opens a reservation of them for `ttl_ms` (clamped
    /// to the store's maximum).
    ///
    /// # Errors
    ///
    /// [`ReservationError::Full`] when too many reservations are open
    /// (nothing is charged); [`ReservationError::Store`] when the store
    /// failed.
    async fn reserve(
        &self,
        domain: &str,
        estimate: u64,
        hits: &[BatchHit<'_>],
        ttl_ms: u64,
    ) -> Result<Reserved, ReservationError>;

    /// Settles reservation `id` of `domain` at `actual`.
    ///
    /// # Errors
    ///
    /// [`ReservationError::NotFound`], [`ReservationError::Conflict`], or
    /// [`ReservationError::Store`].
    async fn settle(
        &self,
        domain: &str,
        id: &str,
        actual: u64,
    ) -> Result<Settled, ReservationError>;

    /// How many reservations expired unsettled since the last call (for
    /// the `expired` metric).
    fn take_expired(&self) -> u64;
}

/// What a reserving call did.
#[derive(Debug, Clone)]
pub struct Reserved {
    /// One per hit, as [`CounterStore::apply`](crate::store::CounterStore::apply) answers.
    pub outcomes: Vec<Outcome>,
    /// The reservation, when the hits were admitted.
    pub grant: Option<Grant>,
}

/// An open reservation, as the caller learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Its id, to settle with.
    pub id: String,
    /// Time left to settle it, in ms.
    pub ttl_ms: u64,
}

/// How a settle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Now or earlier.
    pub status: SettleStatus,
    /// The estimate the reservation charged.
    pub estimate: u64,
    /// The cost it is settled at.
    pub actual: u64,
}

/// Whether this settle did the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleStatus {
    /// This call settled it.
    Settled,
    /// An earlier call settled it at the same cost.
    AlreadySettled,
}

/// Why a reservation could not be made or settled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReservationError {
    /// Unknown, of another domain, or expired.
    #[error("reservation {0:?} not found: unknown, of another domain, or expired")]
    NotFound(String),
    /// Already settled at another cost.
    #[error("reservation {id:?} was already settled with actual_cost {settled}")]
    Conflict {
        /// The reservation.
        id: String,
        /// The cost it was settled at.
        settled: u64,
    },
    /// Too many reservations are open.
    #[error("{0} reservations are open, the most this server keeps; settle some or retry later")]
    Full(usize),
    /// In a Redis Cluster, the request's counters live on several slots.
    #[error(
        "a reservation's descriptors must share one Redis Cluster hash slot; send one descriptor per reservation"
    )]
    Spread,
    /// The store keeps no reservations.
    #[error(
        "reservations need --store memory, redis or redis-sentinel (in ratekeeper's key layout); this {0} store does not keep them yet"
    )]
    Unsupported(&'static str),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ReservationError> for Status {
    fn from(error: ReservationError) -> Self {
        match &error {
            ReservationError::NotFound(_) => Status::not_found(error.to_string()),
            ReservationError::Conflict { .. }
            | ReservationError::Unsupported(_)
            | ReservationError::Spread => Status::failed_precondition(error.to_string()),
            ReservationError::Full(_) => Status::resource_exhausted(error.to_string()),
            ReservationError::Store(e) => crate::error::Error::Storage(e.clone()).into(),
        }
    }
}
