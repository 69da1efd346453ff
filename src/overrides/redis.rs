//! Overrides in the shared Redis: one hash (field = the override's id, value
//! = its JSON) and one version counter, both under one hash tag. Writes
//! change the hash and bump the version in one script, so an instance that
//! reads the version after a write always loads that write. Reads of the
//! version are one `GET`, off the request path (the refresh loop).
//!
//! Keys: `rk-overrides:{rk-overrides}:data` and `rk-overrides:{rk-overrides}:version`.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;

use super::backend::OverrideBackend;
use super::model::Override;
use crate::store::StoreError;
use crate::store::redis::{RedisSettings, connection_info};

/// The hash of overrides.
pub const DATA_KEY: &str = "rk-overrides:{rk-overrides}:data";
/// The version counter.
pub const VERSION_KEY: &str = "rk-overrides:{rk-overrides}:version";

/// Deadline of one override call: these are admin calls and a poll, off the
/// request path, so a slow Redis may take longer than a decision may.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// KEYS[1] data, KEYS[2] version; ARGV[1] id, ARGV[2] JSON. Returns the new
/// version and the replaced JSON ('' when there was none).
const PUT: &str = r"
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

/// Overrides shared by every instance on one Redis.
pub struct RedisOverrides {
    client: redis::Client,
    /// The connection in use; replaced after a failure. A tokio mutex: a
    /// connect awaits while it is held, and only admin calls and the poll
    /// take it.
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    put: redis::Script,
    delete: redis::Script,
}

impl std::fmt::Debug for RedisOverrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info may hold a password.
        f.debug_struct("RedisOverrides").finish_non_exhaustive()
    }
}

impl RedisOverrides {
    /// Overrides on the Redis of `settings` (its URL and TLS); nothing
    /// connects until the first call.
    ///
    /// # Errors
    ///
    /// [`StoreError::Connection`] for an unusable URL or certificates.
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        let info = connection_info(&settings.url, settings.tls.as_ref())?;
        let client = redis::Client::open(info)
            .map_err(|e| StoreError::Connection(format!("invalid redis url: {e}")))?;
        Ok(Self {
            client,
            connection: tokio::sync::Mutex::new(None),
            put: redis::Script::new(PUT),
            delete: redis::Script::new(DELETE),
        })
    }

    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        let mut held = self.connection.lock().await;
        if let Some(connection) = held.as_ref() {
            return Ok(connection.clone());
        }
        let connection = self
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| StoreError::Connection(e.to_string()))?;
        *held = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `call` on the connection under the deadline; a failed call
    /// retires the connection.
    async fn call<T, F>(
        &self,
        call: impl FnOnce(MultiplexedConnection) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let result = tokio::time::timeout(CALL_TIMEOUT, async {
            let connection = self.connection().await?;
            call(connection)
                .await
                .map_err(|e| crate::store::redis::store_error(&e))
        })
        .await
        .unwrap_or(Err(StoreError::Timeout(CALL_TIMEOUT)));
        if result.is_err() {
            *self.connection.lock().await = None;
        }
        result
    }

    async fn write(
        &self,
        script: &redis::Script,
        args: &[&str],
    ) -> Result<(u64, Option<Override>), StoreError> {
        let (version, before): (u64, String) = self
            .call(|mut c| async move {
                let mut invocation = script.key(DATA_KEY);
                invocation.key(VERSION_KEY);
                for arg in args {
                    invocation.arg(*arg);
                }
                invocation.invoke_async(&mut c).await
            })
            .await?;
        let before = if before.is_empty() {
            None
        } else {
            Some(parse(&before)?)
        };
        Ok((version, before))
    }
}

#[async_trait]
impl OverrideBackend for RedisOverrides {
    async fn version(&self) -> Result<u64, StoreError> {
        let version: Option<u64> = self
            .call(
                |mut c| async move { redis::cmd("GET").arg(VERSION_KEY).query_async(&mut c).await },
            )
            .await?;
        Ok(version.unwrap_or(0))
    }

    async fn load(&self) -> Result<(u64, Vec<Override>), StoreError> {
        let (version, all): (Option<u64>, HashMap<String, String>) = self
            .call(|mut c| async move {
                redis::pipe()
                    .atomic()
                    .get(VERSION_KEY)
                    .hgetall(DATA_KEY)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let mut overrides = Vec::with_capacity(all.len());
        for (id, json) in all {
            match parse(&json) {
                Ok(o) => overrides.push(o),
                // Written by something else; the others still apply.
                Err(error) => tracing::warn!(%id, %error, "unreadable override in redis skipped"),
            }
        }
        Ok((version.unwrap_or(0), overrides))
    }

    async fn put(&self, o: &Override) -> Result<(u64, Option<Override>), StoreError> {
        let json = serde_json::to_string(o)
            .map_err(|e| StoreError::Protocol(format!("override json: {e}")))?;
        self.write(&self.put, &[&o.id(), &json]).await
    }

    async fn delete(&self, id: &str) -> Result<(u64, Option<Override>), StoreError> {
        self.write(&self.delete, &[id]).await
    }

    async fn bump(&self) -> Result<u64, StoreError> {
        self.call(|mut c| async move {
            redis::cmd("INCR")
                .arg(VERSION_KEY)
                .query_async(&mut c)
                .await
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

fn parse(json: &str) -> Result<Override, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Protocol(format!("override json: {e}")))
}
