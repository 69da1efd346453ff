//! Redis Sentinel: the master is whichever server the sentinels name.
//!
//! Every connect asks the sentinels (in turn, starting with the last one
//! that answered) for the master's address with
//! `SENTINEL get-master-addr-by-name`, connects to it, and checks with
//! `ROLE` that it really is a master (during a failover a sentinel may still
//! name the demoted one). A follower task subscribes to the sentinels'
//! `+switch-master` announcements and, when our master changes, retires
//! every connection at once, so the lanes reconnect to the new master
//! without waiting for errors. Should that message be missed, the old
//! master's `READONLY` answers (or its silence) retire the connections
//! anyway (see [`super::lane`]), and the reconnect asks the sentinels again.
//!
//! Sentinels may require their own credentials (in their URLs); the master
//! has its own (`master_username`, `master_password`). TLS applies to both
//! when the sentinel URLs are `rediss://`, with the same certificates.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use redis::ConnectionInfo;

use super::connect::{open, retarget, tcp_settings};
use super::decide::Code;
use super::lane::{Connect, Connected};
use super::node::Node;
use super::{RedisSettings, connection_info, store_error};
use crate::store::StoreError;

/// How long the follower waits before subscribing again after losing its
/// sentinel.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);

/// Where the sentinels are and which master to follow.
#[derive(Debug, Clone)]
pub struct SentinelSettings {
    /// Sentinel addresses: `host:port` or `redis://[user:password@]host:port`
    /// (`rediss://` for TLS), credentials being the sentinels' own.
    pub nodes: Vec<String>,
    /// The master's name as the sentinels know it.
    pub master_name: String,
    /// ACL user for the master, if any.
    pub master_username: Option<String>,
    /// Password for the master, if any.
    pub master_password: Option<String>,
}

/// Connects to the master the sentinels name.
#[derive(Debug)]
pub(crate) struct SentinelConnector {
    shared: Arc<Sentinels>,
    /// The master's credentials and TLS, its address filled in per connect.
    master: ConnectionInfo,
    code: Arc<Code>,
}

#[derive(Debug)]
struct Sentinels {
    nodes: Vec<ConnectionInfo>,
    name: String,
    /// The sentinel that answered last, asked first next time.
    preferred: AtomicUsize,
    timeout: Duration,
}

/// What the follower task needs; [`FollowerSpec::follow`] starts it.
#[derive(Debug)]
pub(crate) struct FollowerSpec {
    shared: Arc<Sentinels>,
}

/// The running follower; stopped when dropped.
#[derive(Debug)]
pub struct Follower {
    task: tokio::task::JoinHandle<()>,
}

impl SentinelConnector {
    pub(crate) fn new(
        sentinels: &SentinelSettings,
        settings: &RedisSettings,
        code: Arc<Code>,
    ) -> Result<(Self, FollowerSpec), StoreError> {
        if sentinels.nodes.is_empty() {
            return Err(StoreError::Connection("no sentinels given".to_owned()));
        }
        if sentinels.master_name.is_empty() {
            return Err(StoreError::Connection(
                "no sentinel master name given".to_owned(),
            ));
        }
        let nodes = sentinels
            .nodes
            .iter()
            .map(|node| {
                let url = if node.contains("://") {
                    node.clone()
                } else {
                    format!("redis://{node}")
                };
                connection_info(&url, settings.tls.as_ref())
                    .map(|info| info.set_tcp_settings(tcp_settings()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tls = sentinels.nodes.iter().all(|n| n.starts_with("rediss://"));
        let template = if tls {
            "rediss://master:6379"
        } else {
            "redis://master:6379"
        };
        let mut redis_settings = redis::RedisConnectionInfo::default();
        if let Some(user) = &sentinels.master_username {
            redis_settings = redis_settings.set_username(user);
        }
        if let Some(password) = &sentinels.master_password {
            redis_settings = redis_settings.set_password(password);
        }
        let master =
            connection_info(template, settings.tls.as_ref())?.set_redis_settings(redis_settings);
        let shared = Arc::new(Sentinels {
            nodes,
            name: sentinels.master_name.clone(),
            preferred: AtomicUsize::new(0),
            timeout: settings.connect_timeout,
        });
        Ok((
            Self {
                shared: shared.clone(),
                master,
                code,
            },
            FollowerSpec { shared },
        ))
    }
}

#[async_trait]
impl Connect for SentinelConnector {
    async fn connect(&self) -> Result<Connected, StoreError> {
        let (host, port) = self.shared.master_address().await?;
        let mut connected = open(&retarget(&self.master, &host, port), &self.code).await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query_async(&mut connected.conn)
            .await
            .map_err(|e| store_error(&e))?;
        match role.first() {
            Some(redis::Value::BulkString(role)) if role == b"master" => Ok(connected),
            _ => Err(StoreError::Backend(format!(
                "the sentinels name {host}:{port} as master {}, but it is not one (yet)",
                self.shared.name
            ))),
        }
    }
}

impl Sentinels {
    /// The master's address, from the first sentinel that knows it.
    async fn master_address(&self) -> Result<(String, u16), StoreError> {
        let first = self.preferred.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.nodes.len() {
            let at = (first + i) % self.nodes.len();
            match tokio::time::timeout(self.timeout, self.ask(&self.nodes[at])).await {
                Ok(Ok(address)) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return Ok(address);
                }
                Ok(Err(error)) => errors.push(format!("{}: {error}", self.nodes[at].addr())),
                Err(_) => errors.push(format!("{}: timed out", self.nodes[at].addr())),
            }
        }
        Err(StoreError::Connection(format!(
            "no sentinel named master {}: {}",
            self.name,
            errors.join("; ")
        )))
    }

    async fn ask(&self, sentinel: &ConnectionInfo) -> Result<(String, u16), StoreError> {
        let mut conn = super::connect::multiplexed(sentinel).await?;
        let address: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.name)
            .query_async(&mut conn)
            .await
            .map_err(|e| store_error(&e))?;
        address.ok_or_else(|| {
            StoreError::Backend(format!("the sentinel does not know master {}", self.name))
        })
    }
}

impl FollowerSpec {
    /// Follows `+switch-master` for `node` until the node or the returned
    /// handle is dropped.
    pub(crate) fn follow(self, node: Arc<Node>) -> Arc<Follower> {
        let node = Arc::downgrade(&node);
        let task = tokio::spawn(follow(self.shared, node));
        Arc::new(Follower { task })
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Subscribes to `+switch-master` on one sentinel after another; each
/// announcement for our master retires the node's connections.
async fn follow(shared: Arc<Sentinels>, node: Weak<Node>) {
    let mut at = 0;
    loop {
        let sentinel = &shared.nodes[at % shared.nodes.len()];
        at += 1;
        if let Ok(client) = redis::Client::open(sentinel.clone())
            && let Ok(Ok(mut pubsub)) =
                tokio::time::timeout(shared.timeout, client.get_async_pubsub()).await
            && pubsub.subscribe("+switch-master").await.is_ok()
        {
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let Ok(payload) = message.get_payload::<String>() else {
                    continue;
                };
                // "<name> <old ip> <old port> <new ip> <new port>"
                let mut fields = payload.split(' ');
                if fields.next() != Some(shared.name.as_str()) {
                    continue;
                }
                let Some(node) = node.upgrade() else {
                    return;
                };
                tracing::warn!(master = %shared.name, switch = %payload, "sentinels switched the master; reconnecting");
                node.retire_all(&format!("sentinel switch-master: {payload}"));
            }
        }
        if node.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}
