//! The engine's side of reserve, then settle: a reserving decision charges
//! through the store's [`ReservationStore`] instead of the plain store call,
//! and a settle goes straight to it.
//!
//! A reservation is never answered from the over-limit cache nor by a
//! failure policy: a reservation id must stand for a charge the store made,
//! so a store failure is an error (`UNAVAILABLE`).

use std::sync::Arc;
use std::time::Instant;

use super::{Batch, CheckRequest, Decision, Limiter};
use crate::algorithm::Outcome;
use crate::error::Error;
use crate::metrics::AnswerSource;
use crate::reservation::{Grant, ReservationError, ReservationStore, Settled};

/// How to charge a reserving request.
pub(super) struct Reserve<'a> {
    store: &'a dyn ReservationStore,
    estimate: u64,
    ttl_ms: u64,
}

impl Reserve<'_> {
    /// Charges `batch` and opens its reservation when admitted.
    pub(super) async fn apply(
        &self,
        limiter: &Limiter,
        domain: &str,
        batch: &Batch<'_>,
    ) -> Result<(Vec<Outcome>, Vec<AnswerSource>, Option<Grant>), Error> {
        let started = Instant::now();
        let result = self
            .store
            .reserve(domain, self.estimate, &batch.hits, self.ttl_ms)
            .await;
        let store_error = match &result {
            Err(ReservationError::Store(e)) => Some(e),
            _ => None,
        };
        limiter
            .metrics
            .store_call(limiter.store.backend(), started.elapsed(), store_error);
        limiter
            .metrics
            .reservations("expired", self.store.take_expired());
        let reserved = result?;
        if reserved.grant.is_some() {
            limiter.metrics.reservations("reserved", 1);
        }
        let sources = vec![AnswerSource::Store; reserved.outcomes.len()];
        Ok((reserved.outcomes, sources, reserved.grant))
    }
}

impl Limiter {
    /// Decides `request` (all-or-nothing, its cost an estimate) and, when
    /// it is admitted, opens a reservation of it for `ttl_ms`.
    ///
    /// # Errors
    ///
    /// As [`Limiter::check`], and [`Error::Reservation`] when the store
    /// keeps no reservations or too many are open.
    pub async fn reserve(
        &self,
        request: &CheckRequest<'_>,
        estimate: u64,
        ttl_ms: u64,
    ) -> Result<(Decision, Option<Grant>), Error> {
        let store = self.reservation_store()?;
        let reserve = Reserve {
            store: store.as_ref(),
            estimate,
            ttl_ms,
        };
        let (decision, grant) = self.decide(request, Some(&reserve)).await?;
        if grant.is_some() || decision.over_limit() {
            return Ok((decision, grant));
        }
        // Nothing reached the store (an unknown domain): a reservation that
        // charged nothing, so that the caller's settle works the same.
        let reserved = store.reserve(request.domain, estimate, &[], ttl_ms).await?;
        if reserved.grant.is_some() {
            self.metrics.reservations("reserved", 1);
        }
        Ok((decision, reserved.grant))
    }

    /// Settles reservation `id` of `domain` at `actual`.
    ///
    /// # Errors
    ///
    /// [`Error::Reservation`]: not found, settled at another cost, the store
    /// keeps no reservations, or failed.
    pub async fn settle(&self, domain: &str, id: &str, actual: u64) -> Result<Settled, Error> {
        let store = self.reservation_store()?;
        let result = store.settle(domain, id, actual).await;
        self.metrics.reservations("expired", store.take_expired());
        let settled = result?;
        if settled.status == crate::reservation::SettleStatus::Settled {
            self.metrics.reservations("settled", 1);
        }
        Ok(settled)
    }

    fn reservation_store(&self) -> Result<Arc<dyn ReservationStore>, ReservationError> {
        self.store
            .reservations()
            .ok_or(ReservationError::Unsupported(self.store.backend()))
    }
}
