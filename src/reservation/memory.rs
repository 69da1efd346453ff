//! Reservations in the memory store: the estimate is charged and its
//! windows recorded from the same instant, under the shards' locks; a
//! settle takes the record from the ledger first (so only one settle ever
//! adjusts), then rewrites the counters under their shards' locks.

use async_trait::async_trait;

use super::adjust::{self, Charged};
use super::ledger::{Charge, Taken};
use super::{ReservationError, ReservationStore, Reserved, SettleStatus, Settled};
use crate::algorithm::{BatchHit, Mode};
use crate::store::MemoryStore;

#[async_trait]
impl ReservationStore for MemoryStore {
    async fn reserve(
        &self,
        domain: &str,
        estimate: u64,
        hits: &[BatchHit<'_>],
        ttl_ms: u64,
    ) -> Result<Reserved, ReservationError> {
        if self.ledger().is_full(self.now_ms()) {
            return Err(ReservationError::Full(self.ledger().max_open()));
        }
        let (outcomes, now_ms) = self.apply_at(hits, Mode::AllOrNothing);
        if hits.iter().zip(&outcomes).any(|(hit, o)| hit.denies(o)) {
            return Ok(Reserved {
                outcomes,
                grant: None,
            });
        }
        let charges: Vec<Charge> = hits
            .iter()
            .filter(|hit| hit.hits > 0)
            .map(|hit| Charge {
                key: hit.key.to_vec(),
                charged: Charged::at(hit.algorithm, hit.quota, now_ms),
            })
            .collect();
        match self
            .ledger()
            .open(domain, estimate, charges.clone(), ttl_ms, now_ms)
        {
            Ok(grant) => Ok(Reserved {
                outcomes,
                grant: Some(grant),
            }),
            Err(error) => {
                // Filled up by a racing reservation since the check: give
                // the estimate back, so a refused reservation charges nothing.
                settle_charges(self, &charges, estimate, 0);
                Err(error)
            }
        }
    }

    async fn settle(
        &self,
        domain: &str,
        id: &str,
        actual: u64,
    ) -> Result<Settled, ReservationError> {
        let now_ms = self.now_ms();
        let taken = self.ledger().take(domain, id, actual, now_ms)?;
        Ok(match taken {
            Taken::Again(settled) => settled,
            Taken::Open { estimate, charges } => {
                settle_charges(self, &charges, estimate, actual);
                Settled {
                    status: SettleStatus::Settled,
                    estimate,
                    actual,
                }
            }
        })
    }

    fn take_expired(&self) -> u64 {
        self.ledger().take_expired()
    }
}

fn settle_charges(store: &MemoryStore, charges: &[Charge], estimate: u64, actual: u64) {
    let keys: Vec<&[u8]> = charges.iter().map(|c| c.key.as_slice()).collect();
    store.rewrite(&keys, |i, stored, now_ms| {
        adjust::settle(&charges[i].charged, stored, estimate, actual, now_ms)
    });
}
