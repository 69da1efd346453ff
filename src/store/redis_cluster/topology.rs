//! The cluster's slot map and its masters, kept current in the background.
//!
//! `CLUSTER SLOTS` (asked of any known master or seed) gives each slot
//! range's master; every master is a [`Node`] with its own lanes, reused
//! across refreshes while its address stays. A refresh runs at startup,
//! when a call fails or is redirected, and every [`REFRESH_EVERY`] — never
//! more often than every [`REFRESH_AT_MOST_EVERY`], and one at a time. A
//! `MOVED` answer updates its slot at once, before the refresh lands.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::ConnectionInfo;
use tokio::sync::Notify;

use super::RedisClusterSettings;
use crate::clock::{Clock, MonotonicClock};
use crate::store::StoreError;
use crate::store::redis::coalesce::Batching;
use crate::store::redis::connect::{FixedConnector, multiplexed, retarget};
use crate::store::redis::lane::LaneSettings;
use crate::store::redis::node::Node;
use crate::store::redis::store_error;

/// Slots in a Redis Cluster.
const SLOTS: usize = 16_384;
/// A refresh without a reason, this often.
const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Refreshes asked for closer together than this are one refresh.
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_millis(100);

/// The cluster as this store knows it.
pub(super) struct Cluster {
    seeds: Vec<ConnectionInfo>,
    /// Credentials and TLS for every node; the address is filled in.
    template: ConnectionInfo,
    batching: Arc<Batching>,
    lanes: usize,
    connect_timeout: Duration,
    /// Per slot, the master's address; `None` until known.
    map: ArcSwap<SlotMap>,
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    /// Wakes callers waiting for the first slot map.
    mapped: Notify,
    refreshing: AtomicBool,
    last_refresh_ms: AtomicU64,
    clock: MonotonicClock,
}

/// Who serves each slot.
#[derive(Debug, Clone)]
struct SlotMap {
    masters: Vec<Option<Arc<str>>>,
    /// Why the last refresh failed, while no map is known.
    error: Option<String>,
}

/// What a Redis error says about where a slot's call should go.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Redirect {
    /// The slot has moved for good: update the map, go there.
    Moved { slot: u16, address: String },
    /// The slot is being migrated: ask there once, after `ASKING`.
    Ask { address: String },
    /// The cluster is changing (`TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`):
    /// try again shortly.
    TryAgain,
}

impl Cluster {
    pub(super) fn new(
        seeds: Vec<ConnectionInfo>,
        settings: &RedisClusterSettings,
        batching: Arc<Batching>,
    ) -> Arc<Self> {
        let template = seeds[0].clone();
        let cluster = Arc::new(Self {
            seeds,
            template,
            batching,
            lanes: settings.pool_size.max(1),
            connect_timeout: settings.connect_timeout,
            map: ArcSwap::from_pointee(SlotMap {
                masters: vec![None; SLOTS],
                error: None,
            }),
            nodes: Mutex::default(),
            mapped: Notify::new(),
            refreshing: AtomicBool::new(false),
            last_refresh_ms: AtomicU64::new(0),
            clock: MonotonicClock::default(),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(keep_fresh(Arc::downgrade(&cluster)));
        }
        cluster
    }

    /// The master of `slot`, waiting for the first slot map if there is
    /// none yet (callers bound the wait).
    ///
    /// # Errors
    ///
    /// [`StoreError::Connection`] when the slot map could not be had, or
    /// the slot is served by nobody.
    pub(super) async fn master_of(self: &Arc<Self>, slot: u16) -> Result<Arc<Node>, StoreError> {
        loop {
            let waiting = self.mapped.notified();
            tokio::pin!(waiting);
            waiting.as_mut().enable();
            let map = self.map.load();
            if let Some(address) = &map.masters[usize::from(slot)] {
                return Ok(self.node(address));
            }
            if map.masters.iter().any(Option::is_some) {
                self.request_refresh();
                return Err(StoreError::Backend(format!(
                    "no master serves slot {slot} (the cluster is incomplete)"
                )));
            }
            if let Some(error) = &map.error {
                self.request_refresh();
                return Err(StoreError::Connection(format!(
                    "no cluster slot map: {error}"
                )));
            }
            self.request_refresh();
            waiting.await;
        }
    }

    /// Every master of the current map, by address (waiting for the first
    /// map; callers bound the wait).
    pub(super) async fn masters(self: &Arc<Self>) -> Result<Vec<(String, Arc<Node>)>, StoreError> {
        self.master_of(0).await?;
        let map = self.map.load();
        let mut addresses: Vec<&Arc<str>> = map.masters.iter().flatten().collect();
        addresses.sort();
        addresses.dedup();
        Ok(addresses
            .into_iter()
            .map(|address| (address.to_string(), self.node(address)))
            .collect())
    }

    /// The node at `address`, made (and connecting) if new.
    pub(super) fn node(&self, address: &str) -> Arc<Node> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(node) = nodes.get(address) {
            return node.clone();
        }
        let (host, port) = split_address(address);
        let connector = Arc::new(FixedConnector {
            info: retarget(&self.template, host, port),
            code: self.batching.code.clone(),
        });
        let node = Arc::new(Node::new(
            self.lanes,
            LaneSettings::new(connector, self.batching.clone(), self.connect_timeout),
        ));
        nodes.insert(address.to_owned(), node.clone());
        node
    }

    /// `slot` now lives at `address` (a `MOVED` answer): the map is updated
    /// at once and a full refresh requested.
    pub(super) fn moved(self: &Arc<Self>, slot: u16, address: &str) -> Arc<Node> {
        let mut map = SlotMap::clone(&self.map.load());
        map.masters[usize::from(slot)] = Some(Arc::from(address));
        self.map.store(Arc::new(map));
        self.request_refresh();
        self.node(address)
    }

    /// Starts a refresh in the background unless one runs or ran just now.
    pub(super) fn request_refresh(self: &Arc<Self>) {
        let now = self.clock.now_ms();
        let last = self.last_refresh_ms.load(Ordering::Relaxed);
        let soon = u64::try_from(REFRESH_AT_MOST_EVERY.as_millis()).unwrap_or(u64::MAX);
        let first = self.map.load().masters.iter().all(Option::is_none);
        if (!first && now < last + soon) || self.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        self.last_refresh_ms.store(now, Ordering::Relaxed);
        let this = self.clone();
        tokio::spawn(async move {
            this.refresh().await;
            this.refreshing.store(false, Ordering::SeqCst);
        });
    }

    /// Asks known masters, then the seeds, for the slot map; installs the
    /// first answer and forgets nodes that no longer serve slots.
    async fn refresh(&self) {
        let mut candidates: Vec<ConnectionInfo> = {
            let map = self.map.load();
            let mut known: Vec<&Arc<str>> = map.masters.iter().flatten().collect();
            known.sort();
            known.dedup();
            known
                .into_iter()
                .map(|address| {
                    let (host, port) = split_address(address);
                    retarget(&self.template, host, port)
                })
                .collect()
        };
        candidates.extend(self.seeds.iter().cloned());
        let mut errors = Vec::new();
        for candidate in candidates {
            match tokio::time::timeout(self.connect_timeout, cluster_slots(&candidate)).await {
                Ok(Ok(masters)) => {
                    let serving: std::collections::HashSet<Arc<str>> =
                        masters.iter().flatten().cloned().collect();
                    self.map.store(Arc::new(SlotMap {
                        masters,
                        error: None,
                    }));
                    self.nodes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|address, _| serving.contains(address.as_str()));
                    self.mapped.notify_waiters();
                    return;
                }
                Ok(Err(error)) => errors.push(format!("{}: {error}", candidate.addr())),
                Err(_) => errors.push(format!("{}: timed out", candidate.addr())),
            }
        }
        let error = errors.join("; ");
        tracing::warn!(%error, "redis cluster slot map refresh failed");
        let mut map = SlotMap::clone(&self.map.load());
        map.error = Some(error);
        self.map.store(Arc::new(map));
        self.mapped.notify_waiters();
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.map.load();
        let mapped = map.masters.iter().filter(|m| m.is_some()).count();
        f.debug_struct("Cluster")
            .field("slots_mapped", &mapped)
            .field("nodes", &self.nodes.lock().map(|n| n.len()).unwrap_or(0))
            .finish()
    }
}

/// Refreshes every [`REFRESH_EVERY`] while the cluster is in use.
async fn keep_fresh(cluster: Weak<Cluster>) {
    loop {
        match cluster.upgrade() {
            Some(cluster) => cluster.request_refresh(),
            None => return,
        }
        tokio::time::sleep(REFRESH_EVERY).await;
    }
}

/// The slot map as `candidate` reports it: per slot, its master's address.
async fn cluster_slots(candidate: &ConnectionInfo) -> Result<Vec<Option<Arc<str>>>, StoreError> {
    let mut conn = multiplexed(candidate).await?;
    // [[start, end, [host, port, id, …], replicas…], …]
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .map_err(|e| store_error(&e))?;
    let mut masters = vec![None; SLOTS];
    for range in ranges {
        let parsed = (|| {
            let start: u16 = redis::from_redis_value_ref(range.first()?).ok()?;
            let end: u16 = redis::from_redis_value_ref(range.get(1)?).ok()?;
            let master: Vec<redis::Value> = redis::from_redis_value_ref(range.get(2)?).ok()?;
            let host: String = redis::from_redis_value_ref(master.first()?).ok()?;
            let port: u16 = redis::from_redis_value_ref(master.get(1)?).ok()?;
            Some((start, end, host, port))
        })();
        let Some((start, end, host, port)) = parsed else {
            return Err(StoreError::Protocol(format!(
                "unexpected CLUSTER SLOTS entry {range:?}"
            )));
        };
        // An empty host means "the node you asked".
        let host = if host.is_empty() {
            match candidate.addr() {
                redis::ConnectionAddr::Tcp(host, _)
                | redis::ConnectionAddr::TcpTls { host, .. } => host.clone(),
                _ => host,
            }
        } else {
            host
        };
        let address: Arc<str> = Arc::from(format!("{host}:{port}"));
        let end = usize::from(end).min(SLOTS - 1);
        for master in masters.iter_mut().take(end + 1).skip(usize::from(start)) {
            *master = Some(address.clone());
        }
    }
    Ok(masters)
}

fn split_address(address: &str) -> (&str, u16) {
    match address.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().unwrap_or(6379)),
        None => (address, 6379),
    }
}

impl Redirect {
    /// What `error` says, if it is a redirection or a "try again".
    pub(super) fn of(error: &redis::RedisError) -> Option<Self> {
        use redis::{ErrorKind, ServerErrorKind};
        match error.kind() {
            ErrorKind::Server(ServerErrorKind::Moved) => {
                error
                    .redirect_node()
                    .map(|(address, slot)| Redirect::Moved {
                        slot,
                        address: address.to_owned(),
                    })
            }
            ErrorKind::Server(ServerErrorKind::Ask) => {
                error.redirect_node().map(|(address, _)| Redirect::Ask {
                    address: address.to_owned(),
                })
            }
            ErrorKind::Server(
                ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown,
            ) => Some(Redirect::TryAgain),
            _ => None,
        }
    }
}

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag — the part between
/// the first `{` and the next `}`, when not empty — else of the whole key,
/// modulo 16,384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % SLOTS as u16
}

/// CRC-16/XMODEM: polynomial 0x1021, initial value 0, no reflection.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |mut crc, &byte| {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
        crc
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // CRC-16/XMODEM's check value, and CLUSTER KEYSLOT's answers.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"bar"), 5_061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}".as_slice()));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn redirections_are_read_from_errors() {
        let moved = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::Moved),
            "An error was signalled by the server",
            "3999 127.0.0.1:6381".to_owned(),
        ));
        assert_eq!(
            Redirect::of(&moved),
            Some(Redirect::Moved {
                slot: 3_999,
                address: "127.0.0.1:6381".to_owned()
            })
        );
    }
}
