//! Reservations in a Redis Cluster, for requests whose charged counters
//! share one hash slot (one descriptor, with all of its limits, always
//! does: its keys carry one hash tag).
//!
//! The record lives on that slot too, so the settle script can consume it
//! and adjust the counters atomically, as on one node ([`super::redis`]).
//! The record's key carries a short hash tag chosen to land on the slot,
//! and the id ends with the slot number, so a settle knows where to go
//! from the id alone. A request whose counters span several slots is
//! refused (`FAILED_PRECONDITION`) and charges nothing.

use std::sync::OnceLock;

use async_trait::async_trait;

use super::ledger::new_id;
use super::redis::{NodeFailure, Record, answer, clamp_ttl, settle_on, system_now_ms};
use super::{Grant, ReservationError, ReservationStore, Reserved, Settled};
use crate::algorithm::{BatchHit, Mode};
use crate::rules::key::KEY_PREFIX;
use crate::store::redis::{decide_at, store_error};
use crate::store::redis_cluster::topology::slot;
use crate::store::{RedisClusterStore, StoreError, within};

/// Number of hash slots.
const SLOTS: u16 = 16_384;

/// Reservations beside a [`RedisClusterStore`]'s counters.
#[derive(Debug, Clone)]
pub struct ClusterReservations {
    store: RedisClusterStore,
}

impl ClusterReservations {
    /// Reservations kept in `store`'s cluster.
    pub fn new(store: RedisClusterStore) -> Self {
        Self { store }
    }
}

/// A short hash tag landing on each slot: the first decimal number that
/// hashes there.
fn tag_of(target: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n = 0u64;
        while missing > 0 {
            let tag = n.to_string();
            let at = usize::from(slot(tag.as_bytes()));
            if tags[at].is_empty() {
                tags[at] = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(target)]
}

fn record_key(id: &str, at: u16) -> String {
    format!("{KEY_PREFIX}{{{}}}:rsv:{id}", tag_of(at))
}

/// The slot a reservation id names, if it is one of ours.
fn slot_of_id(id: &str) -> Option<u16> {
    let (_, at) = id.rsplit_once('-')?;
    at.parse::<u16>().ok().filter(|&at| at < SLOTS)
}

fn failure(error: NodeFailure) -> StoreError {
    match error {
        NodeFailure::Redis(e) => store_error(&e),
        NodeFailure::Store(e) => e,
    }
}

#[async_trait]
impl ReservationStore for ClusterReservations {
    async fn reserve(
        &self,
        domain: &str,
        estimate: u64,
        hits: &[BatchHit<'_>],
        ttl_ms: u64,
    ) -> Result<Reserved, ReservationError> {
        let at = hits.first().map_or(0, |hit| slot(hit.key));
        if hits.iter().any(|hit| slot(hit.key) != at) {
            return Err(ReservationError::Spread);
        }
        let (time, timeout, max_ttl) = self.store.reservation_parts();
        let store = &self.store;
        let reserved = within(timeout, async {
            let (outcomes, now_ms) = if hits.is_empty() {
                (Vec::new(), time.now_ms().unwrap_or_else(system_now_ms))
            } else {
                store
                    .on_slot(at, |node| async move {
                        decide_at(&node, at, hits, Mode::AllOrNothing)
                            .await
                            .map_err(NodeFailure::Redis)
                    })
                    .await
                    .map_err(failure)?
            };
            if hits.iter().zip(&outcomes).any(|(hit, o)| hit.denies(o)) {
                return Ok(Reserved {
                    outcomes,
                    grant: None,
                });
            }
            let id = format!("{}-{at}", new_id());
            let record = Record {
                key: record_key(&id, at),
                domain,
                estimate,
                ttl_ms: clamp_ttl(ttl_ms, max_ttl),
                now_ms,
            };
            // Only the write is retried on a redirect: the charge is made.
            store
                .on_slot(at, |node| {
                    let record = &record;
                    async move {
                        record
                            .write(&node, time, hits)
                            .await
                            .map_err(NodeFailure::Redis)
                    }
                })
                .await
                .map_err(failure)?;
            Ok(Reserved {
                outcomes,
                grant: Some(Grant {
                    id,
                    ttl_ms: record.ttl_ms,
                }),
            })
        })
        .await?;
        Ok(reserved)
    }

    async fn settle(
        &self,
        domain: &str,
        id: &str,
        actual: u64,
    ) -> Result<Settled, ReservationError> {
        let Some(at) = slot_of_id(id) else {
            return Err(ReservationError::NotFound(id.to_owned()));
        };
        let (time, timeout, _) = self.store.reservation_parts();
        let record = record_key(id, at);
        let store = &self.store;
        let reply = within(timeout, async {
            store
                .on_slot(at, |node| {
                    let record = &record;
                    async move { settle_on(&node, time, record, domain, actual).await }
                })
                .await
                .map_err(failure)
        })
        .await?;
        answer(&reply, id, actual)
    }

    fn take_expired(&self) -> u64 {
        // Redis forgets expired records by itself; they are not counted.
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_a_tag_and_ids_name_their_slot() {
        for at in [0, 1, 777, SLOTS - 1] {
            let id = format!("{}-{at}", new_id());
            assert_eq!(slot_of_id(&id), Some(at));
            assert_eq!(slot(record_key(&id, at).as_bytes()), at);
        }
        assert_eq!(slot_of_id("rsv-00"), Some(0));
        assert_eq!(slot_of_id("rsv-x"), None);
        assert_eq!(slot_of_id("rsv-16384"), None);
    }
}
