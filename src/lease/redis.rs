//! Leases in Redis: [`table`](super::table)'s Lua twin (`leases.lua`), one
//! script call per operation covering every key of the request, on the
//! counter store's own connections and deadline.
//!
//! Each concurrency key is four Redis keys sharing its hash tag (named
//! leases, their permits and tokens, anonymous slots, debts), each given a
//! TTL longer than any entry its rule allows, so idle state vanishes by
//! itself. Time comes from Redis `TIME`, so every instance agrees.
//!
//! On Redis Cluster the script runs on the master of the request's slot:
//! lease keys carry their domain's hash tag, so every key of one request
//! (one domain) shares a slot and a multi-descriptor grant stays atomic.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;

use super::table::{Code, KeyReply, Op, Reply};
use super::{KEY_SLACK_MS, LeaseKey, LeaseStore};
use crate::store::{RedisClusterStore, RedisStore, StoreError};

/// The script's source.
const SOURCE: &str = include_str!("leases.lua");

/// The script, built once.
static SCRIPT: LazyLock<redis::Script> = LazyLock::new(script);

/// Suffixes of the four Redis keys of one concurrency key, in KEYS order.
const PARTS: [&[u8]; 4] = [b":z", b":h", b":a", b":d"];

/// The lease store on a Redis counter store's connections.
#[derive(Debug, Clone)]
pub struct RedisLeases {
    store: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Single(Arc<RedisStore>),
    Cluster(Arc<RedisClusterStore>),
}

// === impl RedisLeases ===

impl RedisLeases {
    /// Leases kept in the Redis of `store`.
    pub fn new(store: RedisStore) -> Self {
        Self {
            store: Backend::Single(Arc::new(store)),
        }
    }

    /// Leases kept in the cluster of `store`: every lease key of a domain
    /// carries the domain's hash tag ([`super::lease_key`]), so one request's
    /// keys share a slot and its grant stays one atomic script call.
    pub fn on_cluster(store: RedisClusterStore) -> Self {
        Self {
            store: Backend::Cluster(Arc::new(store)),
        }
    }
}

#[async_trait]
impl LeaseStore for RedisLeases {
    async fn apply(&self, keys: &[LeaseKey], op: &Op) -> Result<Reply, StoreError> {
        let (redis_keys, args) = encode(keys, op, None);
        let values: Vec<i64> = match &self.store {
            Backend::Single(store) => store.run_script(&SCRIPT, &redis_keys, &args).await?,
            Backend::Cluster(store) => store.run_script(SOURCE, &redis_keys, &args).await?,
        };
        decode(&values, keys.len()).map_err(StoreError::Protocol)
    }

    fn backend(&self) -> &'static str {
        match self.store {
            Backend::Single(_) => "redis",
            Backend::Cluster(_) => "redis_cluster",
        }
    }
}

/// The lease script (for tests that run it directly).
pub fn script() -> redis::Script {
    redis::Script::new(SOURCE)
}

/// The script's KEYS and ARGV for `op` on `keys`, at `now` (Unix ms) or,
/// when `None`, at Redis's own time.
pub fn encode(keys: &[LeaseKey], op: &Op, now: Option<u64>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let redis_keys = keys
        .iter()
        .flat_map(|k| {
            PARTS.iter().map(|part| {
                let mut key = k.key.clone();
                key.extend_from_slice(part);
                key
            })
        })
        .collect();
    let (name, id, n, ttl_ms) = match op {
        Op::Acquire {
            id,
            permits,
            ttl_ms,
        } => ("acquire", id.as_str(), *permits, *ttl_ms),
        Op::Renew { id, ttl_ms } => ("renew", id.as_str(), 0, *ttl_ms),
        Op::Release { id } => ("release", id.as_str(), 0, 0),
        Op::Take { n, ttl_ms } => ("take", "", *n, *ttl_ms),
        Op::Free { n } => ("free", "", *n, 0),
    };
    let mut args: Vec<Vec<u8>> = vec![
        name.into(),
        now.map(|n| n.to_string()).unwrap_or_default().into(),
        id.into(),
        n.to_string().into(),
        ttl_ms.to_string().into(),
    ];
    for key in keys {
        args.push(key.limit.max_in_flight.to_string().into());
        args.push(
            (key.limit.max_lease_ttl_ms + KEY_SLACK_MS)
                .to_string()
                .into(),
        );
    }
    (redis_keys, args)
}

/// The [`Reply`] for `count` keys from the script's return.
///
/// # Errors
///
/// A description of a reply of the wrong shape.
pub fn decode(values: &[i64], count: usize) -> Result<Reply, String> {
    if values.len() != 3 + 3 * count {
        return Err(format!(
            "lease script returned {} values for {count} keys",
            values.len()
        ));
    }
    let code = match values[0] {
        1 => Code::Granted,
        2 => Code::Denied,
        3 => Code::NotFound,
        4 => Code::Released,
        5 => Code::AlreadyReleased,
        other => return Err(format!("lease script returned code {other}")),
    };
    let unsigned = |v: i64| u64::try_from(v).map_err(|_| format!("negative value {v}"));
    Ok(Reply {
        code,
        expires_at_ms: unsigned(values[1])?,
        retry_after_ms: u64::try_from(values[2]).ok(),
        keys: values[3..]
            .chunks(3)
            .map(|c| {
                Ok(KeyReply {
                    in_use: unsigned(c[0])?,
                    token: unsigned(c[1])?,
                    expired: unsigned(c[2])?,
                })
            })
            .collect::<Result<_, String>>()?,
    })
}
