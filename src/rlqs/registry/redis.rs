//! The registry in Redis, so that every ratekeeper instance sees every
//! subscriber. One script per report batch (`exchange.lua`) records the
//! caller's demands, drops stale members and returns the live ones; every
//! key of a domain carries the domain's hash tag, and every key expires on
//! its own (a bucket hash after `stale_ms` without reports, the domain's
//! "born" key long after). Time is Redis `TIME`, so instances agree on it.
//!
//! Keys: `rk:rlqs:v1:{<domain hex>}:born` and
//! `rk:rlqs:v1:{<domain hex>}:b:<bucket hex>`. Hex keeps the encoding
//! injective and free of `{` and `}`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;

use super::{Claim, Exchange, Member, Registry, Report, Timing};
use crate::store::StoreError;
use crate::store::redis::RedisTls;

const PREFIX: &str = "rk:rlqs:v1:";

/// Subscribers in Redis, one connection, re-opened after a failure.
#[derive(Clone)]
pub struct RedisRegistry {
    client: redis::Client,
    script: Arc<redis::Script>,
    hold_script: Arc<redis::Script>,
    deadline: Duration,
    /// A tokio `Mutex`: connecting awaits while it is held.
    connection: Arc<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

// === impl RedisRegistry ===

impl RedisRegistry {
    /// A registry at `url`; every call (connecting included) has `deadline`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Connection`] when the URL is invalid.
    pub fn new(url: &str, deadline: Duration) -> Result<Self, StoreError> {
        Self::with_tls(url, deadline, None)
    }

    /// A registry at `url` (`rediss://`) trusting `tls`'s CA and presenting
    /// its client certificate, as the Redis store does.
    ///
    /// # Errors
    ///
    /// [`StoreError::Connection`] when the URL or certificates are invalid.
    pub fn with_tls(
        url: &str,
        deadline: Duration,
        tls: Option<&RedisTls>,
    ) -> Result<Self, StoreError> {
        let client = match tls {
            Some(tls) => redis::Client::build_with_tls(url, tls.certificates()),
            None => redis::Client::open(url),
        }
        .map_err(|e| StoreError::Connection(e.to_string()))?;
        Ok(Self {
            client,
            script: Arc::new(redis::Script::new(include_str!("exchange.lua"))),
            hold_script: Arc::new(redis::Script::new(include_str!("hold.lua"))),
            deadline,
            connection: Arc::new(tokio::sync::Mutex::new(None)),
        })
    }

    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = tokio::time::timeout(
            self.deadline,
            self.client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| StoreError::Timeout(self.deadline))?
        .map_err(|e| StoreError::Connection(e.to_string()))?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `call` with a connection under the deadline; after any failure
    /// the connection is dropped so the next call opens a new one.
    async fn with_connection<T>(
        &self,
        call: impl AsyncFnOnce(MultiplexedConnection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let connection = self.connection().await?;
        match tokio::time::timeout(self.deadline, call(connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                // A connection that answers with an error (READONLY after a
                // failover, LOADING, …) is evidence, not a promise: retire
                // it; the next call opens a fresh one.
                *self.connection.lock().await = None;
                if error.is_io_error() || error.is_connection_dropped() {
                    return Err(StoreError::Connection(error.to_string()));
                }
                Err(StoreError::Backend(error.to_string()))
            }
            Err(_) => {
                *self.connection.lock().await = None;
                Err(StoreError::Timeout(self.deadline))
            }
        }
    }
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn domain_tag(domain: &str) -> String {
    format!("{PREFIX}{{{}}}", hex(domain))
}

#[async_trait]
impl Registry for RedisRegistry {
    async fn exchange(
        &self,
        domain: &str,
        member: &str,
        reports: &[Report],
        timing: Timing,
    ) -> Result<Exchange, StoreError> {
        let tag = domain_tag(domain);
        let mut invocation = self.script.prepare_invoke();
        invocation.key(format!("{tag}:born"));
        for report in reports {
            invocation.key(format!("{tag}:b:{}", hex(&report.bucket)));
        }
        invocation
            .arg(member)
            .arg(timing.stale_ms)
            .arg(timing.learning_ms)
            .arg("");
        for report in reports {
            invocation
                .arg(
                    report
                        .demand
                        .map_or_else(|| "-1".to_owned(), |d| format!("{d:.6}")),
                )
                .arg(format!("{:.3}", report.allowed_rate))
                .arg(
                    report
                        .held
                        .map_or_else(|| "-1".to_owned(), |h| format!("{h:.6}")),
                );
        }
        let (learning, buckets): (i64, Vec<Vec<String>>) = self
            .with_connection(async |mut connection| invocation.invoke_async(&mut connection).await)
            .await?;
        let members = buckets
            .into_iter()
            .map(|flat| {
                let mut list: Vec<Member> = flat
                    .chunks_exact(4)
                    .map(|m| Member {
                        id: m[0].clone(),
                        demand: m[1].parse::<f64>().ok().filter(|d| *d >= 0.0),
                        allowed_rate: m[2].parse().unwrap_or(0.0),
                        // Unreadable: assume the worst, it holds a lot.
                        held: m[3].parse().unwrap_or(f64::MAX / 1e6),
                    })
                    .collect();
                list.sort_by(|a, b| a.id.cmp(&b.id));
                list
            })
            .collect();
        Ok(Exchange {
            members,
            learning: learning == 1,
        })
    }

    async fn hold(
        &self,
        domain: &str,
        member: &str,
        claims: &[Claim],
        timing: Timing,
    ) -> Result<Vec<u64>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let tag = domain_tag(domain);
        let mut invocation = self.hold_script.prepare_invoke();
        for claim in claims {
            invocation.key(format!("{tag}:b:{}", hex(&claim.bucket)));
        }
        invocation.arg(member).arg(timing.stale_ms);
        for claim in claims {
            invocation
                .arg(claim.wanted)
                .arg(claim.pool)
                .arg(claim.fill_seconds.max(1));
        }
        let granted: Vec<u64> = self
            .with_connection(async |mut connection| invocation.invoke_async(&mut connection).await)
            .await?;
        if granted.len() != claims.len() {
            return Err(StoreError::Protocol(format!(
                "rlqs hold: {} grants for {} claims",
                granted.len(),
                claims.len()
            )));
        }
        // The script applies the same rule as `claimable`; never trust more.
        Ok(granted
            .into_iter()
            .zip(claims)
            .map(|(g, c)| g.min(c.wanted))
            .collect())
    }

    async fn leave(
        &self,
        domain: &str,
        member: &str,
        buckets: &[String],
    ) -> Result<(), StoreError> {
        if buckets.is_empty() {
            return Ok(());
        }
        let tag = domain_tag(domain);
        let mut pipe = redis::pipe();
        for bucket in buckets {
            pipe.hdel(format!("{tag}:b:{}", hex(bucket)), member)
                .ignore();
        }
        self.with_connection(async |mut connection| pipe.query_async::<()>(&mut connection).await)
            .await
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}
