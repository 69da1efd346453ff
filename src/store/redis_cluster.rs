//! The Redis Cluster store: the same batch script as [`super::RedisStore`],
//! run once per hash slot, the slots of one request in parallel.
//!
//! Every key carries its descriptor's hash tag (see `rules::key`), so all
//! state of one descriptor lives on one slot and the script may touch every
//! key of a slot atomically. A request whose descriptors share a slot costs
//! one script call; one spread over N slots costs N calls sent at once, so
//! its latency is that of the slowest node, not the sum (envoyproxy/ratelimit
//! pays N serial round trips).
//!
//! Each master is a [`Node`] of its own — lanes with the same lifecycle as
//! the single-node store (background connects, retired on I/O errors, on
//! `READONLY` after a failover, on silence) — so one slow, silent or dead
//! master costs only its own slots, never a reconnect to the whole cluster.
//! The slot map ([`topology`]) comes from `CLUSTER SLOTS`, refreshed in the
//! background when a node fails or redirects; `MOVED` re-routes the call
//! (and updates the map at once), `ASK` retries on the importing node after
//! `ASKING`, `TRYAGAIN` and `CLUSTERDOWN` are retried, all within the
//! call's deadline.
//!
//! Decisions within a slot are atomic, as on a single Redis. Across slots:
//! - `Independent` (Envoy) and dry runs are exact, each slot on its own;
//! - all-or-nothing (`ShouldAllow`) first judges every slot without writing,
//!   and only when all admit does it apply them (per slot, all-or-nothing).
//!   A denied request therefore takes nothing. If another caller takes the
//!   last hit of some slot between the two steps, the request is denied and
//!   the slots already applied keep their hits: a race can cost quota, never
//!   admit past a limit;
//! - upstream's stop-increment mode likewise judges first, then counts only
//!   the over-limit descriptors when there are any.

mod topology;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::{join_all, try_join_all};

use super::redis::coalesce::Batching;
use super::redis::coalesce::share_out;
use super::redis::encode::{Encoded, assemble};
use super::redis::node::Node;
use super::redis::{RedisTls, decide_on, no_connection, outcomes_of, store_error};
use super::{CounterStore, StoreError};
use crate::algorithm::{BatchHit, Mode, Outcome};
use topology::{Cluster, Redirect, slot};

/// Attempts of one slot's call across redirections and retries (all within
/// the deadline).
const MAX_ATTEMPTS: usize = 5;
/// Pause before retrying a slot the cluster says to try again.
const RETRY_PAUSE: Duration = Duration::from_millis(2);

/// How to reach a Redis Cluster.
#[derive(Debug, Clone)]
pub struct RedisClusterSettings {
    /// Seed nodes, `redis://[user:password@]host:port` or `rediss://…`;
    /// the rest of the cluster is discovered from them.
    pub nodes: Vec<String>,
    /// Connections (lanes) per master.
    pub pool_size: usize,
    /// Deadline of one store call, redirections and retries included.
    pub timeout: Duration,
    /// Deadline for opening one node connection, in the background.
    pub connect_timeout: Duration,
    /// Certificates for `rediss://` nodes.
    pub tls: Option<RedisTls>,
    /// Up to this much (at random per call) is added to every key's TTL.
    pub expiry_jitter: Duration,
}

/// The Redis Cluster counter store.
#[derive(Clone)]
pub struct RedisClusterStore {
    cluster: Arc<Cluster>,
    batching: Arc<Batching>,
    timeout: Duration,
}

impl RedisClusterStore {
    /// A store for the cluster the seed `settings.nodes` belong to. The slot
    /// map is fetched in the background from now on.
    ///
    /// # Errors
    ///
    /// [`StoreError::Connection`] for an invalid node URL or certificates.
    pub fn new(settings: &RedisClusterSettings) -> Result<Self, StoreError> {
        if settings.nodes.is_empty() {
            return Err(StoreError::Connection(
                "no Redis Cluster nodes given".to_owned(),
            ));
        }
        if settings.tls.is_some() && !settings.nodes.iter().all(|n| n.starts_with("rediss://")) {
            return Err(StoreError::Connection(
                "TLS certificates given, but the cluster nodes are not rediss://".to_owned(),
            ));
        }
        let seeds = settings
            .nodes
            .iter()
            .map(|node| {
                super::redis::connection_info(node, settings.tls.as_ref()).map_err(|e| {
                    StoreError::Connection(format!("invalid redis cluster nodes: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batching = Batching::new(settings.timeout, settings.expiry_jitter);
        Ok(Self {
            cluster: Cluster::new(seeds, settings, batching.clone()),
            batching,
            timeout: settings.timeout,
        })
    }

    /// Makes the script use `clock` instead of Redis `TIME` (tests only).
    pub fn with_clock(self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        self.batching.time.set_clock(clock);
        self
    }

    /// One decision for hits that all live on one slot (coalesced with
    /// others for that slot), following redirections.
    async fn eval(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError> {
        let slot = slot(hits[0].key);
        let mut node = self.cluster.master_of(slot).await?;
        let mut asking = false;
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            let result = if asking {
                self.asking(&node, hits, mode).await
            } else {
                decide_on(&node, slot, hits, mode).await
            };
            let error = match result {
                Ok(outcomes) => return Ok(outcomes),
                Err(error) => error,
            };
            match Redirect::of(&error) {
                Some(Redirect::Moved { slot, address }) => {
                    node = self.cluster.moved(slot, &address);
                    asking = false;
                }
                Some(Redirect::Ask { address }) => {
                    node = self.cluster.node(&address);
                    asking = true;
                }
                Some(Redirect::TryAgain) => {
                    self.cluster.request_refresh();
                    last = Some(store_error(&error));
                    tokio::time::sleep(RETRY_PAUSE).await;
                    node = self.cluster.master_of(slot).await?;
                    asking = false;
                }
                None => {
                    // A failing master may have failed over: look again.
                    self.cluster.request_refresh();
                    return Err(store_error(&error));
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            StoreError::Backend(format!("slot {slot}: redirected {MAX_ATTEMPTS} times"))
        }))
    }

    /// The decision on the node a slot is migrating to, after `ASKING`:
    /// a direct call (ASKING holds for the next command on its connection
    /// only; pipelined with it, nothing comes between).
    async fn asking(
        &self,
        node: &Node,
        hits: &[BatchHit<'_>],
        mode: Mode,
    ) -> Result<Vec<Outcome>, redis::RedisError> {
        let call = node.call().await.map_err(no_connection)?;
        let decision = Encoded::new(hits, mode);
        let assembled = assemble(&[&decision]);
        let cmd = self
            .batching
            .code
            .call(call.runner(), &self.batching.time, &assembled);
        let result = redis::pipe()
            .cmd("ASKING")
            .ignore()
            .add_command(cmd)
            .query_async::<(Vec<i64>,)>(&mut call.connection())
            .await
            .map(|(reply,)| reply);
        call.end(result.as_ref().err().filter(|e| Redirect::of(e).is_none()));
        // One decision: one answer.
        let (now, found) = share_out(&[&decision], &assembled.layout, result).swap_remove(0)?;
        outcomes_of(hits, mode, now, &found)
    }

    /// Runs every slot's group at once, each in its mode; the outcomes come
    /// back in the order of `hits`.
    async fn eval_groups(
        &self,
        hits: &[BatchHit<'_>],
        groups: &[SlotGroup],
        modes: impl Fn(&SlotGroup) -> Mode,
    ) -> Result<Vec<Outcome>, StoreError> {
        let calls = groups.iter().map(|group| {
            let group_hits: Vec<BatchHit<'_>> = group.indexes.iter().map(|&i| hits[i]).collect();
            let mode = modes(group);
            async move { self.eval(&group_hits, mode).await }
        });
        let replies = try_join_all(calls).await?;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; hits.len()];
        for (group, reply) in groups.iter().zip(replies) {
            for (&i, outcome) in group.indexes.iter().zip(reply) {
                outcomes[i] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| StoreError::Protocol("a slot returned too few outcomes".to_owned()))
    }

    async fn decide(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError> {
        let groups = group_by_slot(hits);
        if let [_] = groups.as_slice() {
            return self.eval(hits, mode).await;
        }
        match mode {
            Mode::Independent | Mode::DryRun => self.eval_groups(hits, &groups, |_| mode).await,
            Mode::AllOrNothing => {
                let judged = self.eval_groups(hits, &groups, |_| Mode::DryRun).await?;
                let admitted = !hits
                    .iter()
                    .zip(&judged)
                    .any(|(hit, outcome)| hit.denies(outcome));
                if !admitted {
                    return Ok(judged);
                }
                self.eval_groups(hits, &groups, |_| Mode::AllOrNothing)
                    .await
            }
            Mode::StopIncrementWhenOverLimit => {
                let judged = self.eval_groups(hits, &groups, |_| Mode::DryRun).await?;
                let over: Vec<bool> = judged.iter().map(|o| !o.allowed).collect();
                if !over.contains(&true) {
                    return self.eval_groups(hits, &groups, |_| Mode::Independent).await;
                }
                // Only the over-limit descriptors count: their slots decide
                // again by stop-increment, the others are only judged.
                self.eval_groups(hits, &groups, |group| {
                    if group.indexes.iter().any(|&i| over[i]) {
                        Mode::StopIncrementWhenOverLimit
                    } else {
                        Mode::DryRun
                    }
                })
                .await
            }
        }
    }
}

impl std::fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterStore")
            .field("cluster", &self.cluster)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[async_trait]
impl CounterStore for RedisClusterStore {
    async fn apply(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError> {
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        super::within(self.timeout, self.decide(hits, mode)).await
    }

    /// Pings every master at once: ready while any answers (the slots of a
    /// dead master fail until its replica takes over, the rest are
    /// decided), with the masters that do not answer as the degraded detail.
    async fn ping(&self) -> Result<Option<String>, StoreError> {
        let masters = super::within(self.timeout, self.cluster.masters()).await?;
        let pings = masters.iter().map(|(address, node)| async move {
            let result = super::within(self.timeout, async {
                let call = node.call().await?;
                let result = redis::cmd("PING")
                    .query_async::<String>(&mut call.connection())
                    .await;
                call.end(result.as_ref().err());
                result.map_err(|e| store_error(&e))
            })
            .await;
            (address, result)
        });
        let results = join_all(pings).await;
        let failed: Vec<String> = results
            .iter()
            .filter_map(|(address, result)| {
                result.as_ref().err().map(|e| format!("{address}: {e}"))
            })
            .collect();
        if failed.is_empty() {
            return Ok(None);
        }
        self.cluster.request_refresh();
        if failed.len() == results.len() {
            return Err(StoreError::Connection(format!(
                "no cluster master answers: {}",
                failed.join("; ")
            )));
        }
        Ok(Some(format!(
            "{} of {} masters do not answer: {}",
            failed.len(),
            results.len(),
            failed.join("; ")
        )))
    }

    fn backend(&self) -> &'static str {
        "redis_cluster"
    }
}

/// The hits of one request that live on one slot, by index.
#[derive(Debug)]
struct SlotGroup {
    slot: u16,
    indexes: Vec<usize>,
}

/// Groups hits by slot, in order of first appearance. A request has a few
/// descriptors, so a scan beats a map.
fn group_by_slot(hits: &[BatchHit<'_>]) -> Vec<SlotGroup> {
    let mut groups: Vec<SlotGroup> = Vec::new();
    for (i, hit) in hits.iter().enumerate() {
        let slot = slot(hit.key);
        match groups.iter_mut().find(|group| group.slot == slot) {
            Some(group) => group.indexes.push(i),
            None => groups.push(SlotGroup {
                slot,
                indexes: vec![i],
            }),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::{AlgorithmKind, Quota};

    fn hit(key: &'static [u8]) -> BatchHit<'static> {
        BatchHit {
            key,
            algorithm: AlgorithmKind::FixedWindow,
            quota: Quota {
                limit: 1,
                window_ms: 1_000,
                burst: 1,
            },
            hits: 1,
            enforced: true,
        }
    }

    #[test]
    fn keys_group_by_their_hash_tag_in_order() {
        let hits = [
            hit(b"rk4:{aaaa}:x"),
            hit(b"rk4:{bbbb}:x"),
            hit(b"rk4:{aaaa}:y"),
            hit(b"rk4:{bbbb}:y"),
            hit(b"rk4:{cccc}:x"),
        ];
        let groups: Vec<Vec<usize>> = group_by_slot(&hits)
            .into_iter()
            .map(|g| g.indexes)
            .collect();
        assert_eq!(groups, [vec![0, 2], vec![1, 3], vec![4]]);
    }

    #[tokio::test]
    async fn settings_are_validated() {
        let settings = |nodes: &[&str], tls: Option<RedisTls>| RedisClusterSettings {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            pool_size: 1,
            timeout: Duration::from_millis(10),
            connect_timeout: Duration::from_millis(10),
            tls,
            expiry_jitter: Duration::ZERO,
        };
        assert!(RedisClusterStore::new(&settings(&["redis://127.0.0.1:7000"], None)).is_ok());
        let error = |s| RedisClusterStore::new(&s).unwrap_err().to_string();
        assert!(error(settings(&[], None)).contains("no Redis Cluster nodes"));
        assert!(error(settings(&["http://x"], None)).contains("invalid redis cluster nodes"));
        let tls = RedisTls {
            ca_pem: Some(b"x".to_vec()),
            client_pem: None,
        };
        assert!(error(settings(&["redis://127.0.0.1:7000"], Some(tls))).contains("not rediss://"));
    }
}
