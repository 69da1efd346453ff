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
//! Decisions within a slot are atomic, as on a single Redis; across slots
//! they follow [`super::groups`]: Envoy's independent hits and dry runs are
//! exact, all-or-nothing and stop-increment requests judge every slot
//! first (a race can cost quota, never admit past a limit).
//!
//! In the envoy-ratelimit key layout, upstream's keys (which carry no hash
//! tag) are counted with upstream's commands ([`upstream_keys`]).

pub(crate) mod topology;
mod upstream_keys;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::{join_all, try_join_all};

use super::envoy_layout::EnvoyLayout;
use super::redis::coalesce::Batching;
use super::redis::coalesce::share_out;
use super::redis::encode::{Encoded, assemble};
use super::redis::node::Node;
use super::redis::{
    RedisTls, ScriptTime, decide_on, no_connection, outcomes_of, store_error, stored_keys,
};
use super::{ADMIN_TIMEOUT, CounterStore, RedisCommands, StoreError, groups};
use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::reservation::redis::NodeFailure;
use crate::rules::KeyLayout;
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
    /// Counts upstream's limits in upstream's keys (the envoy-ratelimit
    /// key layout); `None` for ratekeeper's own layout.
    layout: Option<Arc<EnvoyLayout>>,
    /// The longest reservation (`--max-reservation-ttl`).
    max_reservation_ttl: Duration,
}

/// Where a slot's call goes next.
struct Target {
    node: Arc<Node>,
    /// Send `ASKING` first: the slot is being migrated there.
    asking: bool,
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
            layout: None,
            max_reservation_ttl: crate::reservation::ledger::DEFAULT_MAX_TTL,
        })
    }

    /// Counts every limit upstream can express in envoyproxy/ratelimit's
    /// keys, as `layout` says (the migration key layout).
    pub fn with_envoy_layout(self, layout: EnvoyLayout) -> Self {
        Self {
            layout: Some(Arc::new(layout)),
            ..self
        }
    }

    /// Makes the script use `clock` instead of Redis `TIME` (tests only).
    pub fn with_clock(self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        self.batching.time.set_clock(clock);
        self
    }

    /// Shortens reservations to at most `max` (`--max-reservation-ttl`).
    pub fn with_max_reservation_ttl(self, max: Duration) -> Self {
        Self {
            max_reservation_ttl: max,
            ..self
        }
    }

    /// What the reservations kept beside these counters need: the
    /// scripts' time, the call deadline and the longest reservation.
    pub(crate) fn reservation_parts(&self) -> (&ScriptTime, Duration, Duration) {
        (&self.batching.time, self.timeout, self.max_reservation_ttl)
    }

    /// Runs `call` on the master of `slot`, following `MOVED` and
    /// `TRYAGAIN` (an `ASK`, during a slot migration, is retried on the
    /// importing node without `ASKING`, so it fails: the caller's error).
    pub(crate) async fn on_slot<T, F, Fut>(&self, slot: u16, call: F) -> Result<T, NodeFailure>
    where
        F: Fn(Arc<Node>) -> Fut,
        Fut: Future<Output = Result<T, NodeFailure>>,
    {
        let mut to = self.master_of(slot).await.map_err(NodeFailure::Store)?;
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            match call(to.node.clone()).await {
                Err(NodeFailure::Redis(error)) => {
                    to = self
                        .follow(slot, &error, &mut last)
                        .await
                        .map_err(NodeFailure::Store)?;
                }
                done => return done,
            }
        }
        Err(NodeFailure::Store(redirected_too_often(slot, last)))
    }

    /// One decision for hits that all live on one slot (coalesced with
    /// others for that slot), following redirections.
    async fn eval(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError> {
        let slot = slot(hits[0].key);
        let mut to = self.master_of(slot).await?;
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            let result = if to.asking {
                self.asking(&to.node, hits, mode).await
            } else {
                decide_on(&to.node, slot, hits, mode).await
            };
            match result {
                Ok(outcomes) => return Ok(outcomes),
                Err(error) => to = self.follow(slot, &error, &mut last).await?,
            }
        }
        Err(redirected_too_often(slot, last))
    }

    /// The master of `slot`, as a call's first target.
    async fn master_of(&self, slot: u16) -> Result<Target, StoreError> {
        Ok(Target {
            node: self.cluster.master_of(slot).await?,
            asking: false,
        })
    }

    /// Where a call on `slot` goes after it failed with `error`: the node a
    /// redirection names (after `ASKING` when the slot is being migrated),
    /// or the slot's master again shortly when the cluster says to try
    /// again (`last` keeps that error, for when the attempts run out). Any
    /// other error ends the call.
    async fn follow(
        &self,
        slot: u16,
        error: &redis::RedisError,
        last: &mut Option<StoreError>,
    ) -> Result<Target, StoreError> {
        match Redirect::of(error) {
            Some(Redirect::Moved { slot, address }) => Ok(Target {
                node: self.cluster.moved(slot, &address),
                asking: false,
            }),
            Some(Redirect::Ask { address }) => Ok(Target {
                node: self.cluster.node(&address),
                asking: true,
            }),
            Some(Redirect::TryAgain) => {
                self.cluster.request_refresh();
                *last = Some(store_error(error));
                tokio::time::sleep(RETRY_PAUSE).await;
                self.master_of(slot).await
            }
            None => {
                // A failing master may have failed over: look again.
                self.cluster.request_refresh();
                Err(store_error(error))
            }
        }
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

    /// Runs every slot's group at once, each in its mode.
    async fn eval_groups(
        &self,
        hits: &[BatchHit<'_>],
        slots: &[Vec<usize>],
        modes: Vec<Mode>,
    ) -> Result<Vec<Vec<Outcome>>, StoreError> {
        let calls = slots.iter().zip(modes).map(|(group, mode)| {
            let group_hits: Vec<BatchHit<'_>> = group.iter().map(|&i| hits[i]).collect();
            async move { self.eval(&group_hits, mode).await }
        });
        try_join_all(calls).await
    }

    async fn decide(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError> {
        let slots = group_by_slot(hits);
        if let [_] = slots.as_slice() {
            return self.eval(hits, mode).await;
        }
        groups::decide(hits, &slots, mode, |modes| {
            self.eval_groups(hits, &slots, modes)
        })
        .await
    }
}

impl RedisClusterStore {
    /// Runs the Lua `source` with `keys` (which must share one slot) and
    /// `args` on that slot's master, following redirections, under the
    /// store deadline (the lease tables' script). Sent with `EVAL`, so a
    /// node that never saw it (after `ASK` or a failover) needs no `LOAD`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Protocol`] when the keys span slots; otherwise as for
    /// a decision.
    pub(crate) async fn run_script<T: redis::FromRedisValue>(
        &self,
        source: &str,
        keys: &[Vec<u8>],
        args: &[Vec<u8>],
    ) -> Result<T, StoreError> {
        let Some(first) = keys.first() else {
            return Err(StoreError::Protocol(
                "a script call without keys".to_owned(),
            ));
        };
        let slot = slot(first);
        if keys.iter().any(|key| self::slot(key) != slot) {
            return Err(StoreError::Protocol(
                "the keys of one script call span cluster slots".to_owned(),
            ));
        }
        super::within(self.timeout, async {
            let mut to = self.master_of(slot).await?;
            let mut last = None;
            for _ in 0..MAX_ATTEMPTS {
                let call = to.node.call().await?;
                let mut pipe = redis::pipe();
                if to.asking {
                    pipe.cmd("ASKING").ignore();
                }
                pipe.cmd("EVAL")
                    .arg(source)
                    .arg(keys.len())
                    .arg(keys)
                    .arg(args);
                let result = pipe
                    .query_async::<(T,)>(&mut call.connection())
                    .await
                    .map(|(reply,)| reply);
                call.end(result.as_ref().err().filter(|e| Redirect::of(e).is_none()));
                match result {
                    Ok(reply) => return Ok(reply),
                    Err(error) => to = self.follow(slot, &error, &mut last).await?,
                }
            }
            Err(redirected_too_often(slot, last))
        })
        .await
    }
}

/// A call that was redirected or told to try again as often as it may.
fn redirected_too_often(slot: u16, last: Option<StoreError>) -> StoreError {
    last.unwrap_or_else(|| {
        StoreError::Backend(format!("slot {slot}: redirected {MAX_ATTEMPTS} times"))
    })
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
        super::within(self.timeout, async {
            match &self.layout {
                None => self.decide(hits, mode).await,
                Some(layout) => self.decide_in_layout(layout, hits, mode).await,
            }
        })
        .await
    }

    fn leases(&self) -> Option<Arc<dyn crate::lease::LeaseStore>> {
        Some(Arc::new(crate::lease::RedisLeases::on_cluster(
            self.clone(),
        )))
    }

    async fn refund(&self, hits: &[BatchHit<'_>]) -> Result<(), StoreError> {
        // Upstream's keys hold upstream's counters: not refunded.
        if hits.is_empty() || self.layout.is_some() {
            return Ok(());
        }
        let calls = group_by_slot(hits).into_iter().map(|group| async move {
            let group: Vec<BatchHit<'_>> = group.iter().map(|&i| hits[i]).collect();
            let (keys, args) = super::redis::refund_call(&group, &self.batching.time);
            self.run_script::<i64>(super::redis::REFUND_SOURCE, &keys, &args)
                .await
        });
        try_join_all(calls).await.map(drop)
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

    fn reservations(&self) -> Option<Arc<dyn crate::reservation::ReservationStore>> {
        // In upstream's key layout the counters are not ours to adjust.
        match self.layout {
            None => Some(Arc::new(
                crate::reservation::redis_cluster::ClusterReservations::new(self.clone()),
            )),
            Some(_) => None,
        }
    }

    fn backend(&self) -> &'static str {
        "redis_cluster"
    }

    fn key_layout(&self) -> KeyLayout {
        self.layout
            .as_ref()
            .map_or(KeyLayout::Ratekeeper, |layout| layout.key_layout())
    }

    /// Each counter on its own slot's master, one after another (an
    /// operator's reset names a counter or two).
    async fn delete(&self, keys: &[Vec<u8>]) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for key in keys {
            // A counter's keys share its hash tag: one slot, one DEL.
            let stored = stored_keys(key, &self.batching.time);
            let reply = self
                .query(key, redis::cmd("DEL").arg(stored).clone())
                .await?;
            let gone = redis::from_redis_value::<u64>(reply)
                .map_err(|e| StoreError::Protocol(e.to_string()))?;
            deleted += u64::from(gone > 0);
        }
        Ok(deleted)
    }

    fn commands(&self) -> Option<Arc<dyn RedisCommands>> {
        Some(Arc::new(self.clone()))
    }
}

#[async_trait]
impl RedisCommands for RedisClusterStore {
    /// Follows redirections as a decision does, within the admin deadline.
    async fn query(&self, key: &[u8], cmd: redis::Cmd) -> Result<redis::Value, StoreError> {
        let slot = slot(key);
        super::within(ADMIN_TIMEOUT, async {
            let mut to = self.master_of(slot).await?;
            let mut last = None;
            for _ in 0..MAX_ATTEMPTS {
                let call = to.node.call().await?;
                let result = if to.asking {
                    redis::pipe()
                        .cmd("ASKING")
                        .ignore()
                        .add_command(cmd.clone())
                        .query_async::<(redis::Value,)>(&mut call.connection())
                        .await
                        .map(|(reply,)| reply)
                } else {
                    cmd.query_async::<redis::Value>(&mut call.connection())
                        .await
                };
                call.end(result.as_ref().err().filter(|e| Redirect::of(e).is_none()));
                match result {
                    Ok(reply) => return Ok(reply),
                    Err(error) => to = self.follow(slot, &error, &mut last).await?,
                }
            }
            Err(redirected_too_often(slot, last))
        })
        .await
    }
}

/// The hits of one request grouped by slot (indexes, in order of first
/// appearance). A request has a few descriptors, so a scan beats a map.
fn group_by_slot(hits: &[BatchHit<'_>]) -> Vec<Vec<usize>> {
    let mut slots: Vec<u16> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, hit) in hits.iter().enumerate() {
        let slot = slot(hit.key);
        match slots.iter().position(|&s| s == slot) {
            Some(at) => groups[at].push(i),
            None => {
                slots.push(slot);
                groups.push(vec![i]);
            }
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
        let groups: Vec<Vec<usize>> = group_by_slot(&hits);
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
