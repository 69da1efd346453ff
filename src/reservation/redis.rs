//! Reservations in Redis (one node, or the master its sentinels name).
//!
//! Reserving is the ordinary all-or-nothing decision (the same script and
//! batching as every request), then the record of what it charged is
//! written: a hash `rk4:rsv:<id>` holding the domain, the estimate, the
//! expiry, the state (`open`, or the settled cost) and per counter its key
//! and how it was charged (algorithm, limit, window, burst, window start),
//! with a Redis TTL past its expiry. Settling reads the record to learn its
//! keys, then one script (`settle.lua`, the twin of [`super::adjust`])
//! re-checks it is open and live, turns it into a tombstone, and adjusts
//! the counters, atomically.
//!
//! If writing the record fails after the charge, the request fails
//! (`UNAVAILABLE`) and the estimate stays charged: the safe side, as an
//! unsettled reservation. A Redis Cluster runs the same steps on the
//! request's slot ([`super::redis_cluster`]).

use std::collections::HashMap;
use std::sync::OnceLock;

use async_trait::async_trait;
use redis::Script;

use super::adjust::Charged;
use super::ledger::{TOMBSTONE_MS, new_id};
use super::{Grant, ReservationError, ReservationStore, Reserved, SettleStatus, Settled};
use crate::algorithm::{AlgorithmKind, BatchHit, Mode};
use crate::rules::key::KEY_PREFIX;
use crate::store::redis::node::Node;
use crate::store::redis::{ScriptTime, decide_at, no_connection, store_error};
use crate::store::{RedisStore, StoreError, within};

/// Reservations beside a [`RedisStore`]'s counters.
#[derive(Debug, Clone)]
pub struct RedisReservations {
    store: RedisStore,
}

impl RedisReservations {
    /// Reservations kept in `store`'s Redis.
    pub fn new(store: RedisStore) -> Self {
        Self { store }
    }
}

fn script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(include_str!("settle.lua")))
}

fn record_key(id: &str) -> String {
    format!("{KEY_PREFIX}rsv:{id}")
}

#[async_trait]
impl ReservationStore for RedisReservations {
    async fn reserve(
        &self,
        domain: &str,
        estimate: u64,
        hits: &[BatchHit<'_>],
        ttl_ms: u64,
    ) -> Result<Reserved, ReservationError> {
        let (node, time, timeout, max_ttl) = self.store.reservation_parts();
        let reserved = within(timeout, async {
            let (outcomes, now_ms) = if hits.is_empty() {
                (Vec::new(), time.now_ms().unwrap_or_else(system_now_ms))
            } else {
                decide_at(node, 0, hits, Mode::AllOrNothing)
                    .await
                    .map_err(|e| store_error(&e))?
            };
            if hits.iter().zip(&outcomes).any(|(hit, o)| hit.denies(o)) {
                return Ok(Reserved {
                    outcomes,
                    grant: None,
                });
            }
            let id = new_id();
            let record = Record {
                key: record_key(&id),
                domain,
                estimate,
                ttl_ms: clamp_ttl(ttl_ms, max_ttl),
                now_ms,
            };
            record
                .write(node, time, hits)
                .await
                .map_err(|e| store_error(&e))?;
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
        let (node, time, timeout, _) = self.store.reservation_parts();
        let record = record_key(id);
        let reply = within(timeout, async {
            settle_on(node, time, &record, domain, actual)
                .await
                .map_err(|e| match e {
                    NodeFailure::Redis(e) => store_error(&e),
                    NodeFailure::Store(e) => e,
                })
        })
        .await?;
        answer(&reply, id, actual)
    }

    fn take_expired(&self) -> u64 {
        // Redis forgets expired records by itself; they are not counted.
        0
    }
}

/// A reservation record to write.
pub(crate) struct Record<'a> {
    /// Its Redis key.
    pub(crate) key: String,
    pub(crate) domain: &'a str,
    pub(crate) estimate: u64,
    /// Its TTL, already clamped.
    pub(crate) ttl_ms: u64,
    /// When the hits were charged (the script's clock).
    pub(crate) now_ms: u64,
}

impl Record<'_> {
    /// Writes the record of `hits` on `node`, with its Redis TTL.
    pub(crate) async fn write(
        &self,
        node: &Node,
        time: &ScriptTime,
        hits: &[BatchHit<'_>],
    ) -> redis::RedisResult<()> {
        let charged: Vec<&BatchHit<'_>> = hits.iter().filter(|h| h.hits > 0).collect();
        let mut hset = redis::cmd("HSET");
        hset.arg(&self.key)
            .arg("d")
            .arg(self.domain)
            .arg("e")
            .arg(self.estimate)
            .arg("x")
            .arg(self.now_ms.saturating_add(self.ttl_ms))
            .arg("s")
            .arg("open")
            .arg("n")
            .arg(charged.len());
        for (i, hit) in charged.iter().enumerate() {
            let how = Charged::at(hit.algorithm, hit.quota, self.now_ms);
            hset.arg(format!("k{i}"))
                .arg(hit.key)
                .arg(format!("c{i}"))
                .arg(format!(
                    "{} {} {} {} {}",
                    hit.algorithm.script_id(),
                    hit.quota.limit,
                    hit.quota.window_ms,
                    hit.quota.burst,
                    how.window_start
                ));
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(hset)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&self.key)
            .arg(
                self.ttl_ms
                    .saturating_add(time.ttl_extra_within(self.ttl_ms)),
            )
            .ignore();
        let call = node.call().await.map_err(no_connection)?;
        let written: redis::RedisResult<()> = pipe.query_async(&mut call.connection()).await;
        call.end(written.as_ref().err());
        written
    }
}

/// Why a settle on one node failed.
#[derive(Debug)]
pub(crate) enum NodeFailure {
    /// Redis answered an error (a cluster may say where to go instead).
    Redis(redis::RedisError),
    /// The record could not be used.
    Store(StoreError),
}

/// Settles the record at `record` on `node`: reads its keys, then runs the
/// settle script; answers the script's reply.
pub(crate) async fn settle_on(
    node: &Node,
    time: &ScriptTime,
    record: &str,
    domain: &str,
    actual: u64,
) -> Result<Vec<i64>, NodeFailure> {
    let call = node
        .call()
        .await
        .map_err(|e| NodeFailure::Redis(no_connection(e)))?;
    let mut conn = call.connection();
    let fields: redis::RedisResult<HashMap<String, Vec<u8>>> = redis::cmd("HGETALL")
        .arg(record)
        .query_async(&mut conn)
        .await;
    let fields = match fields {
        Ok(fields) => fields,
        Err(error) => {
            call.end(Some(&error));
            return Err(NodeFailure::Redis(error));
        }
    };
    let charges = charges_of(&fields).map_err(NodeFailure::Store)?;
    let mut invocation = script().prepare_invoke();
    invocation.key(record);
    for (key, _) in &charges {
        invocation.key(key.as_slice());
    }
    match time.now_ms() {
        Some(now) => invocation.arg(now),
        None => invocation.arg(""),
    };
    invocation
        .arg(domain)
        .arg(actual)
        .arg(TOMBSTONE_MS)
        .arg(time.jitter_ms())
        .arg(time.grace_ms());
    for (_, how) in &charges {
        for part in how.split(' ') {
            invocation.arg(part);
        }
    }
    let reply: redis::RedisResult<Vec<i64>> = invocation.invoke_async(&mut conn).await;
    call.end(reply.as_ref().err());
    reply.map_err(NodeFailure::Redis)
}

/// The settle script's reply as an answer.
pub(crate) fn answer(reply: &[i64], id: &str, actual: u64) -> Result<Settled, ReservationError> {
    let n = || u64::try_from(reply.get(1).copied().unwrap_or(0)).unwrap_or(0);
    match reply.first() {
        Some(1) => Ok(Settled {
            status: SettleStatus::Settled,
            estimate: n(),
            actual,
        }),
        Some(2) => Ok(Settled {
            status: SettleStatus::AlreadySettled,
            estimate: n(),
            actual,
        }),
        Some(3) => Err(ReservationError::Conflict {
            id: id.to_owned(),
            settled: n(),
        }),
        _ => Err(ReservationError::NotFound(id.to_owned())),
    }
}

/// `ttl_ms` within 1 ms and `max`.
pub(crate) fn clamp_ttl(ttl_ms: u64, max: std::time::Duration) -> u64 {
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    ttl_ms.clamp(1, max_ms.max(1))
}

/// The counters of a record: per counter its key and the five script
/// arguments saying how it was charged, space-separated. An absent record
/// has none (the script then answers not found).
fn charges_of(fields: &HashMap<String, Vec<u8>>) -> Result<Vec<(Vec<u8>, String)>, StoreError> {
    let bad = || StoreError::Protocol("malformed reservation record".to_owned());
    let Some(n) = fields.get("n") else {
        return Ok(Vec::new());
    };
    let n: usize = std::str::from_utf8(n)
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)?;
    (0..n)
        .map(|i| {
            let key = fields.get(&format!("k{i}")).ok_or_else(bad)?.clone();
            let how = fields.get(&format!("c{i}")).ok_or_else(bad)?;
            let how = String::from_utf8(how.clone()).map_err(|_| bad())?;
            Ok((key, how))
        })
        .map(|c: Result<(Vec<u8>, String), StoreError>| {
            // Five numbers, the first an algorithm.
            let (key, how) = c?;
            let parts: Vec<&str> = how.split(' ').collect();
            let known = parts
                .first()
                .and_then(|a| a.parse::<u8>().ok())
                .is_some_and(|a| {
                    [
                        AlgorithmKind::FixedWindow,
                        AlgorithmKind::SlidingWindow,
                        AlgorithmKind::TokenBucket,
                    ]
                    .iter()
                    .any(|k| k.script_id() == a)
                });
            if parts.len() != 5 || !known {
                return Err(bad());
            }
            Ok((key, how))
        })
        .collect()
}

pub(crate) fn system_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
