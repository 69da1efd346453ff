//! The Redis Cluster store: the same batch script as [`super::RedisStore`],
//! run once per hash slot, the slots of one request in parallel.
//!
//! Every key carries its descriptor's hash tag (see `rules::key`), so all
//! state of one descriptor lives on one slot and the script may touch every
//! key of a slot atomically. A request whose descriptors share a slot costs
//! one script call; one spread over N slots costs N calls sent at once, so
//! its latency is that of the slowest node, not the sum (envoyproxy/ratelimit
//! pays N serial round trips). MOVED/ASK redirections, topology refreshes and
//! failover are the cluster client's (redis-rs); the whole call, retries
//! included, runs under the store deadline.
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

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use futures_util::future::try_join_all;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, Slot};

use super::redis::{BATCH_SCRIPT, RedisTls, ScriptTime, invocation, parse_reply, store_error};
use super::{CounterStore, StoreError};
use crate::algorithm::{BatchHit, Mode, Outcome};

/// How to reach a Redis Cluster.
#[derive(Debug, Clone)]
pub struct RedisClusterSettings {
    /// Seed nodes, `redis://[user:password@]host:port` or `rediss://…`;
    /// the rest of the cluster is discovered from them.
    pub nodes: Vec<String>,
    /// Deadline of one store call, retries and redirections included.
    pub timeout: Duration,
    /// Deadline for opening one node connection.
    pub connect_timeout: Duration,
    /// Certificates for `rediss://` nodes.
    pub tls: Option<RedisTls>,
    /// Up to this much (at random per call) is added to every key's TTL.
    pub expiry_jitter: Duration,
}

/// The Redis Cluster counter store.
#[derive(Clone)]
pub struct RedisClusterStore {
    client: ClusterClient,
    /// One multiplexed cluster connection shared by every request (it holds
    /// a connection per node and routes each call by slot); made on first
    /// use, and again after a failure to connect.
    connection: Arc<ArcSwapOption<ClusterConnection>>,
    connecting: Arc<tokio::sync::Mutex<()>>,
    script: Arc<redis::Script>,
    timeout: Duration,
    time: ScriptTime,
}

impl RedisClusterStore {
    /// A store for the cluster the seed `settings.nodes` belong to. Nothing
    /// connects until the first call.
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
        let mut builder = ClusterClient::builder(settings.nodes.clone())
            .connection_timeout(settings.connect_timeout)
            .response_timeout(settings.timeout)
            // Redirections and failover are retried within the deadline,
            // which bounds the whole call anyway.
            .retries(3)
            .min_retry_wait(5)
            .max_retry_wait(settings.timeout.as_millis().try_into().unwrap_or(u64::MAX));
        if let Some(tls) = &settings.tls {
            if !settings.nodes.iter().all(|n| n.starts_with("rediss://")) {
                return Err(StoreError::Connection(
                    "TLS certificates given, but the cluster nodes are not rediss://".to_owned(),
                ));
            }
            builder = builder.certs(tls.certificates());
        }
        let client = builder
            .build()
            .map_err(|e| StoreError::Connection(format!("invalid redis cluster nodes: {e}")))?;
        Ok(Self {
            client,
            connection: Arc::default(),
            connecting: Arc::default(),
            script: Arc::new(redis::Script::new(BATCH_SCRIPT)),
            timeout: settings.timeout,
            time: ScriptTime::with_jitter(settings.expiry_jitter),
        })
    }

    /// Makes the script use `clock` instead of Redis `TIME` (tests only).
    pub fn with_clock(mut self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        self.time = self.time.with_clock(clock);
        self
    }

    async fn connection(&self) -> Result<Arc<ClusterConnection>, StoreError> {
        if let Some(connection) = self.connection.load_full() {
            return Ok(connection);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(connection) = self.connection.load_full() {
            return Ok(connection);
        }
        let connection = Arc::new(
            self.client
                .get_async_connection()
                .await
                .map_err(|e| StoreError::Connection(e.to_string()))?,
        );
        self.connection.store(Some(connection.clone()));
        Ok(connection)
    }

    /// Drops `failed` as the shared connection (unless already replaced), so
    /// the next call connects afresh and rediscovers the topology: after a
    /// failover, a connection that keeps a dead master's address would
    /// otherwise spend every call's deadline on it.
    fn discard(&self, failed: &Arc<ClusterConnection>) {
        self.connection
            .compare_and_swap(failed, None::<Arc<ClusterConnection>>);
    }

    /// One script call for hits that all live on one slot.
    async fn eval(
        &self,
        mut connection: ClusterConnection,
        hits: &[BatchHit<'_>],
        mode: Mode,
    ) -> Result<Vec<Outcome>, StoreError> {
        let reply: Vec<i64> = invocation(&self.script, hits, mode, &self.time)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| store_error(&e))?;
        parse_reply(&reply, hits.len())
    }

    /// Runs every slot's group at once, each in its mode; the outcomes come
    /// back in the order of `hits`.
    async fn eval_groups(
        &self,
        connection: &ClusterConnection,
        hits: &[BatchHit<'_>],
        groups: &[SlotGroup],
        modes: impl Fn(&SlotGroup) -> Mode,
    ) -> Result<Vec<Outcome>, StoreError> {
        let calls = groups.iter().map(|group| {
            let group_hits: Vec<BatchHit<'_>> = group.indexes.iter().map(|&i| hits[i]).collect();
            let mode = modes(group);
            let connection = connection.clone();
            async move { self.eval(connection, &group_hits, mode).await }
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

    /// Runs `call` on the shared connection under the store deadline. When
    /// it fails or misses the deadline, the connection is dropped so the
    /// next call connects afresh (see [`Self::discard`]).
    async fn on_connection<T>(
        &self,
        call: impl AsyncFnOnce(ClusterConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut used = None;
        let result = super::within(self.timeout, async {
            let connection = self.connection().await?;
            used = Some(connection.clone());
            call((*connection).clone()).await
        })
        .await;
        if let (Err(_), Some(connection)) = (&result, &used) {
            self.discard(connection);
        }
        result
    }

    async fn decide(
        &self,
        connection: ClusterConnection,
        hits: &[BatchHit<'_>],
        mode: Mode,
    ) -> Result<Vec<Outcome>, StoreError> {
        let groups = group_by_slot(hits);
        if let [_] = groups.as_slice() {
            return self.eval(connection, hits, mode).await;
        }
        match mode {
            Mode::Independent | Mode::DryRun => {
                self.eval_groups(&connection, hits, &groups, |_| mode).await
            }
            Mode::AllOrNothing => {
                let judged = self
                    .eval_groups(&connection, hits, &groups, |_| Mode::DryRun)
                    .await?;
                let admitted = !hits
                    .iter()
                    .zip(&judged)
                    .any(|(hit, outcome)| hit.denies(outcome));
                if !admitted {
                    return Ok(judged);
                }
                self.eval_groups(&connection, hits, &groups, |_| Mode::AllOrNothing)
                    .await
            }
            Mode::StopIncrementWhenOverLimit => {
                let judged = self
                    .eval_groups(&connection, hits, &groups, |_| Mode::DryRun)
                    .await?;
                let over: Vec<bool> = judged.iter().map(|o| !o.allowed).collect();
                if !over.contains(&true) {
                    return self
                        .eval_groups(&connection, hits, &groups, |_| Mode::Independent)
                        .await;
                }
                // Only the over-limit descriptors count: their slots decide
                // again by stop-increment, the others are only judged.
                self.eval_groups(&connection, hits, &groups, |group| {
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
            .field("connected", &self.connection.load().is_some())
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
        self.on_connection(async |connection| self.decide(connection, hits, mode).await)
            .await
    }

    /// Pings every master: ready while any answers (the slots of a dead
    /// master fail until failover, the rest are decided), with the failure
    /// as the degraded detail.
    async fn ping(&self) -> Result<Option<String>, StoreError> {
        let masters =
            |policy| RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, Some(policy)));
        let connection = super::within(self.timeout, self.connection()).await?;
        let mut every = (*connection).clone();
        let all = super::within(self.timeout, async {
            every
                .route_command(redis::cmd("PING"), masters(ResponsePolicy::AllSucceeded))
                .await
                .map_err(|e| store_error(&e))
        })
        .await;
        let Err(partial) = all else {
            return Ok(None);
        };
        let mut any = (*connection).clone();
        let some = super::within(self.timeout, async {
            any.route_command(redis::cmd("PING"), masters(ResponsePolicy::OneSucceeded))
                .await
                .map_err(|e| store_error(&e))
        })
        .await;
        match some {
            Ok(_) => Ok(Some(format!("not every master answers: {partial}"))),
            Err(error) => {
                self.discard(&connection);
                Err(error)
            }
        }
    }

    fn backend(&self) -> &'static str {
        "redis_cluster"
    }
}

/// The hits of one request that live on one slot, by index.
#[derive(Debug)]
struct SlotGroup {
    slot: Slot,
    indexes: Vec<usize>,
}

/// Groups hits by slot, in order of first appearance. A request has a few
/// descriptors, so a scan beats a map.
fn group_by_slot(hits: &[BatchHit<'_>]) -> Vec<SlotGroup> {
    let mut groups: Vec<SlotGroup> = Vec::new();
    for (i, hit) in hits.iter().enumerate() {
        let slot = Slot::for_key(hit.key);
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
            hit(b"rk3:{aaaa}:x"),
            hit(b"rk3:{bbbb}:x"),
            hit(b"rk3:{aaaa}:y"),
            hit(b"rk3:{bbbb}:y"),
            hit(b"rk3:{cccc}:x"),
        ];
        let groups: Vec<Vec<usize>> = group_by_slot(&hits)
            .into_iter()
            .map(|g| g.indexes)
            .collect();
        assert_eq!(groups, [vec![0, 2], vec![1, 3], vec![4]]);
    }

    #[test]
    fn settings_are_validated() {
        let settings = |nodes: &[&str], tls: Option<RedisTls>| RedisClusterSettings {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
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
