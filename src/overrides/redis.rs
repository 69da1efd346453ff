//! Overrides in the shared Redis: one hash (field = the override's id, value
//! = its JSON) and one version counter, both under one hash tag (one slot in
//! a Cluster). Writes change the hash and bump the version in one script, so
//! an instance that reads the version after a write always loads that
//! write. Reads of the version are one `GET`, off the request path (the
//! refresh loop). Calls go over the counter store's own connections
//! ([`RedisCommands`]), so Sentinel failovers and Cluster redirections are
//! followed as for decisions.
//!
//! Keys: `rk-overrides:{rk-overrides}:data` and `rk-overrides:{rk-overrides}:version`.

use std::sync::Arc;

use async_trait::async_trait;

use super::backend::{OverrideBackend, Put};
use super::model::Override;
use crate::store::{RedisCommands, StoreError};

/// The hash of overrides.
pub const DATA_KEY: &str = "rk-overrides:{rk-overrides}:data";
/// The version counter.
pub const VERSION_KEY: &str = "rk-overrides:{rk-overrides}:version";

/// KEYS[1] data, KEYS[2] version; ARGV[1] id, ARGV[2] JSON, ARGV[3] the
/// most overrides stored, ARGV[4] now (Unix ms). Returns the new version and
/// the replaced JSON ('' when there was none), or -1 when a new override
/// finds the hash full even after its expired entries are dropped (read
/// from each entry's `expires_at_ms`; an entry that does not decode stays).
const PUT: &str = r"
local max = tonumber(ARGV[3])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= max then
  local all = redis.call('HGETALL', KEYS[1])
  local now = tonumber(ARGV[4])
  for i = 1, #all, 2 do
    local ok, o = pcall(cjson.decode, all[i + 1])
    if ok and type(o) == 'table' and type(o.expires_at_ms) == 'number' and o.expires_at_ms <= now then
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
  if redis.call('HLEN', KEYS[1]) >= max then
    return {-1, ''}
  end
end
local before = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {redis.call('INCR', KEYS[2]), before or ''}
";

/// KEYS[1] data, KEYS[2] version; ARGV[1] id. Returns the new version and
/// the removed JSON ('' when there was none).
const DELETE: &str = r"
local before = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return {redis.call('INCR', KEYS[2]), before or ''}
";

/// KEYS[1] data, KEYS[2] version. Returns the version ('0' when unset) and
/// the hash as a flat list, read at one moment.
const LOAD: &str = r"
return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1])}
";

/// Overrides shared by every instance on one Redis (single node, behind
/// Sentinel, or a Cluster: both keys share one hash tag, so one slot).
#[derive(Debug)]
pub struct RedisOverrides {
    /// The counter store's own connections.
    redis: Arc<dyn RedisCommands>,
}

impl RedisOverrides {
    /// Overrides kept through `redis` (a Redis store's
    /// [`commands`](crate::store::CounterStore::commands)).
    pub fn new(redis: Arc<dyn RedisCommands>) -> Self {
        Self { redis }
    }

    /// Runs a script (plain `EVAL`: these calls are rare and off the
    /// request path) on the overrides' slot.
    async fn eval(&self, script: &str, args: &[&str]) -> Result<redis::Value, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(2).arg(DATA_KEY).arg(VERSION_KEY);
        for arg in args {
            cmd.arg(*arg);
        }
        self.redis.query(DATA_KEY.as_bytes(), cmd).await
    }

    async fn write(&self, script: &str, args: &[&str]) -> Result<Put, StoreError> {
        let (version, before): (i64, String) = decode(self.eval(script, args).await?)?;
        let Ok(version) = u64::try_from(version) else {
            return Ok(Put::Full);
        };
        let before = if before.is_empty() {
            None
        } else {
            Some(parse(&before)?)
        };
        Ok(Put::Stored(version, before))
    }
}

#[async_trait]
impl OverrideBackend for RedisOverrides {
    async fn version(&self) -> Result<u64, StoreError> {
        let reply = self
            .redis
            .query(
                DATA_KEY.as_bytes(),
                redis::cmd("GET").arg(VERSION_KEY).clone(),
            )
            .await?;
        Ok(decode::<Option<u64>>(reply)?.unwrap_or(0))
    }

    async fn load(&self) -> Result<(u64, Vec<Override>), StoreError> {
        let (version, flat): (u64, Vec<String>) = decode(self.eval(LOAD, &[]).await?)?;
        let mut overrides = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            let [id, json] = pair else { continue };
            match parse(json) {
                Ok(o) => overrides.push(o),
                // Written by something else; the others still apply.
                Err(error) => tracing::warn!(%id, %error, "unreadable override in redis skipped"),
            }
        }
        Ok((version, overrides))
    }

    async fn put(&self, o: &Override, max: usize, now_ms: u64) -> Result<Put, StoreError> {
        let json = serde_json::to_string(o)
            .map_err(|e| StoreError::Protocol(format!("override json: {e}")))?;
        let (max, now) = (max.to_string(), now_ms.to_string());
        self.write(PUT, &[&o.id(), &json, &max, &now]).await
    }

    async fn delete(&self, id: &str) -> Result<(u64, Option<Override>), StoreError> {
        match self.write(DELETE, &[id]).await? {
            Put::Stored(version, before) => Ok((version, before)),
            Put::Full => Err(StoreError::Protocol("overrides: delete answered -1".into())),
        }
    }

    async fn bump(&self) -> Result<u64, StoreError> {
        let reply = self
            .redis
            .query(
                DATA_KEY.as_bytes(),
                redis::cmd("INCR").arg(VERSION_KEY).clone(),
            )
            .await?;
        decode(reply)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

fn decode<T: redis::FromRedisValue>(reply: redis::Value) -> Result<T, StoreError> {
    redis::from_redis_value(reply).map_err(|e| StoreError::Protocol(format!("overrides: {e}")))
}

fn parse(json: &str) -> Result<Override, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Protocol(format!("override json: {e}")))
}
