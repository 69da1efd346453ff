//! The shared store: counters in Redis, one Lua script call per request.
//!
//! Every hit of a request goes into one `EVALSHA` of the batch script
//! (`redis/prelude.lua`, the algorithm files and `redis/batch.lua`,
//! concatenated), which reads, decides, writes and sets the expiry of every
//! key in one atomic step with Redis's own clock, so any number of ratekeeper
//! instances share one exact limit. Concurrent requests share a few pipelined
//! connections ([`node`], [`lane`]), so a decision is one request to Redis
//! and concurrent decisions share round trips. Each call runs under one
//! deadline, so a dead, frozen or silent Redis costs a request at most that
//! long; connecting runs in the background ([`lane`] has the lifecycle:
//! connections are retired on I/O errors, "wrong server" answers and
//! silence, and replaced with backoff).
//!
//! The Redis is one fixed address (a URL; behind a DNS name or a virtual IP
//! that may move to a new primary), or the master a set of sentinels name
//! ([`sentinel`]).

pub(crate) mod connect;
pub(crate) mod lane;
pub(crate) mod node;
pub mod sentinel;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{CounterStore, StoreError};
use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::clock::Clock;
use connect::FixedConnector;
use lane::{Connect, LaneSettings};
use node::Node;

/// The batch script: shared prelude, every algorithm, then the driver.
pub(super) const BATCH_SCRIPT: &str = concat!(
    include_str!("redis/prelude.lua"),
    include_str!("redis/fixed_window.lua"),
    include_str!("redis/sliding_window.lua"),
    include_str!("redis/token_bucket.lua"),
    include_str!("redis/batch.lua"),
);

/// Integers the script returns per hit (see `redis/batch.lua`).
const REPLY_PER_HIT: usize = 4;

/// Keys written while time is injected (tests) stay in Redis this long past
/// their state's expiry: the virtual clock need not keep pace with Redis's
/// own, and the script reads a state past its recorded expiry as absent
/// anyway, exactly as the memory store does.
const INJECTED_TIME_GRACE_MS: u64 = 600_000;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: String,
    /// Number of shared, pipelined connections (lanes).
    pub pool_size: usize,
    /// Deadline of one store call, including waiting for a connection.
    pub timeout: Duration,
    /// Deadline for opening one new connection, in the background.
    pub connect_timeout: Duration,
    /// Certificates for a `rediss://` URL; `None` trusts the public web PKI
    /// roots and sends no client certificate.
    pub tls: Option<RedisTls>,
    /// Up to this much (chosen at random per call) is added to every key's
    /// Redis TTL, so the keys of one window do not all expire at once.
    pub expiry_jitter: Duration,
}

impl RedisSettings {
    /// Settings for `url` with the service's defaults.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 4,
            timeout: Duration::from_millis(15),
            connect_timeout: Duration::from_secs(1),
            tls: None,
            expiry_jitter: Duration::ZERO,
        }
    }
}

/// What the batch script is told about time: the time to use (tests only;
/// production reads Redis `TIME`) and what to add to each key's TTL.
#[derive(Debug, Clone, Default)]
pub(super) struct ScriptTime {
    clock: Option<Arc<dyn Clock>>,
    jitter_max_ms: u64,
}

impl ScriptTime {
    pub(super) fn with_jitter(jitter: Duration) -> Self {
        Self {
            clock: None,
            jitter_max_ms: u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX),
        }
    }

    pub(super) fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    fn now_ms(&self) -> Option<u64> {
        self.clock.as_ref().map(|clock| clock.now_ms())
    }

    fn ttl_extra_ms(&self) -> u64 {
        let jitter = match self.jitter_max_ms {
            0 => 0,
            max => fastrand::u64(0..max),
        };
        let grace = if self.clock.is_some() {
            INJECTED_TIME_GRACE_MS
        } else {
            0
        };
        jitter + grace
    }
}

/// Certificates for Redis over TLS.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// PEM CA certificate(s) to trust instead of the public roots (a private
    /// CA, as self-hosted Redis usually has).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and key, for a Redis that requires
    /// client certificates (`tls-auth-clients yes`, its default).
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl RedisTls {
    /// The certificates in redis-rs's form.
    pub(super) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self.client_pem.clone().map(|(client_cert, client_key)| {
                redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }
            }),
            root_cert: self.ca_pem.clone(),
        }
    }
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client_pem.is_some())
            .finish()
    }
}

/// The Redis counter store.
#[derive(Clone)]
pub struct RedisStore {
    node: Arc<Node>,
    script: Arc<redis::Script>,
    timeout: Duration,
    /// Production reads Redis `TIME`; tests inject a clock to drive the
    /// script exactly like the Rust twin.
    time: ScriptTime,
    /// Follows the sentinels' failovers, when the master is found by them.
    _sentinel: Option<Arc<sentinel::Follower>>,
}

/// How long a silent connection is given to answer a `PING` after one of
/// its calls missed the deadline: long enough for a slow Redis, short
/// enough to replace a dead socket well within a second.
pub fn stall_timeout(store_timeout: Duration) -> Duration {
    (store_timeout * 5).max(Duration::from_millis(250))
}

// === impl RedisStore ===

impl RedisStore {
    /// A store for `settings`. Connections are made in the background from
    /// now on (so the service can start before Redis, and the first
    /// requests need not wait for a connect).
    ///
    /// # Errors
    ///
    /// [`StoreError::Connection`] when the URL or the certificates cannot
    /// be used.
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        let info = connection_info(&settings.url, settings.tls.as_ref())?;
        let script = Arc::new(redis::Script::new(BATCH_SCRIPT));
        let connector = Arc::new(FixedConnector {
            info,
            script: script.clone(),
        });
        Ok(Self::with_connector(settings, connector, script, None))
    }

    /// A store on the master the sentinels of `sentinels` name.
    ///
    /// # Errors
    ///
    /// [`StoreError::Connection`] when an address or the certificates cannot
    /// be used.
    pub fn with_sentinels(
        settings: &RedisSettings,
        sentinels: &sentinel::SentinelSettings,
    ) -> Result<Self, StoreError> {
        let script = Arc::new(redis::Script::new(BATCH_SCRIPT));
        let (connector, follower) =
            sentinel::SentinelConnector::new(sentinels, settings, script.clone())?;
        let store = Self::with_connector(settings, Arc::new(connector), script, None);
        let follower = follower.follow(store.node.clone());
        Ok(Self {
            _sentinel: Some(follower),
            ..store
        })
    }

    fn with_connector(
        settings: &RedisSettings,
        connector: Arc<dyn Connect>,
        script: Arc<redis::Script>,
        follower: Option<Arc<sentinel::Follower>>,
    ) -> Self {
        let lanes = LaneSettings::new(
            connector,
            settings.connect_timeout,
            stall_timeout(settings.timeout),
        );
        Self {
            node: Arc::new(Node::new(settings.pool_size.max(1), lanes)),
            script,
            timeout: settings.timeout,
            time: ScriptTime::with_jitter(settings.expiry_jitter),
            _sentinel: follower,
        }
    }

    /// Makes the script use `clock` instead of Redis `TIME` (tests only:
    /// instances with different clocks would disagree on windows).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.time = self.time.with_clock(clock);
        self
    }

    /// Runs `call` on a lane's connection under the store deadline; the
    /// lane learns how it ended.
    async fn on_connection<T, F>(
        &self,
        call: impl FnOnce(redis::aio::MultiplexedConnection) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        super::within(self.timeout, async {
            let lane = self.node.call().await?;
            let result = call(lane.connection()).await;
            lane.end(result.as_ref().err());
            result.map_err(|e| store_error(&e))
        })
        .await
    }
}

/// The connection info for `url`, with `tls`'s certificates.
///
/// # Errors
///
/// [`StoreError::Connection`] for an unusable URL or certificates.
pub(crate) fn connection_info(
    url: &str,
    tls: Option<&RedisTls>,
) -> Result<redis::ConnectionInfo, StoreError> {
    if !url.contains("://") {
        // envoyproxy/ratelimit's REDIS_URL is host:port; this is a URL.
        return Err(StoreError::Connection(format!(
            "invalid redis url '{url}': it needs a scheme, e.g. redis://{url} (rediss:// for TLS)"
        )));
    }
    let invalid = |e: redis::RedisError| StoreError::Connection(format!("invalid redis url: {e}"));
    let client = match tls {
        None => redis::Client::open(url).map_err(invalid)?,
        Some(tls) => {
            if !url.starts_with("rediss://") {
                return Err(StoreError::Connection(
                    "TLS certificates given, but the redis url is not rediss://".to_owned(),
                ));
            }
            redis::Client::build_with_tls(url, tls.certificates()).map_err(|e| {
                StoreError::Connection(format!("invalid redis TLS certificates: {e}"))
            })?
        }
    };
    Ok(client.get_connection_info().clone())
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("live_connections", &self.node.live_lanes())
            .field("timeout", &self.timeout)
            .field("time", &self.time)
            .finish()
    }
}

#[async_trait]
impl CounterStore for RedisStore {
    async fn apply(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError> {
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let invocation = invocation(&self.script, hits, mode, &self.time);
        let reply: Vec<i64> = self
            .on_connection(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await?;
        parse_reply(&reply, hits.len())
    }

    async fn ping(&self) -> Result<Option<String>, StoreError> {
        self.on_connection(|mut conn| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(|_| None)
        })
        .await
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

/// The batch script's call for `hits`: their keys, then the mode, the time
/// (empty: Redis's own clock), the TTL extra and six arguments per hit (see
/// `batch.lua`).
pub(super) fn invocation<'s>(
    script: &'s redis::Script,
    hits: &[BatchHit<'_>],
    mode: Mode,
    time: &ScriptTime,
) -> redis::ScriptInvocation<'s> {
    let mut invocation = script.prepare_invoke();
    for hit in hits {
        invocation.key(hit.key);
    }
    invocation.arg(mode_id(mode));
    match time.now_ms() {
        Some(now_ms) => invocation.arg(now_ms),
        None => invocation.arg(""),
    };
    invocation.arg(time.ttl_extra_ms());
    for hit in hits {
        invocation
            .arg(hit.algorithm.script_id())
            .arg(hit.quota.limit)
            .arg(hit.quota.window_ms)
            .arg(hit.quota.burst)
            .arg(hit.hits)
            .arg(u8::from(hit.enforced));
    }
    invocation
}

/// What a Redis error says about the store. The script's own runtime
/// errors and replies of the wrong shape are bugs in this request's path
/// ([`StoreError::Protocol`]); everything else — I/O, the server refusing
/// because of its state (read-only, loading, out of memory, busy, cluster
/// down, no permission) — is the store failing.
pub(super) fn store_error(error: &redis::RedisError) -> StoreError {
    use redis::ErrorKind;
    let script_error = error.code() == Some("ERR")
        && error
            .detail()
            .is_some_and(|detail| detail.contains("script") || detail.contains("function"));
    match error.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            StoreError::Protocol(error.to_string())
        }
        _ if script_error => StoreError::Protocol(error.to_string()),
        _ if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal() =>
        {
            StoreError::Connection(error.to_string())
        }
        _ => StoreError::Backend(error.to_string()),
    }
}

fn mode_id(mode: Mode) -> u8 {
    match mode {
        Mode::Independent => 0,
        Mode::AllOrNothing => 1,
        Mode::DryRun => 2,
        Mode::StopIncrementWhenOverLimit => 3,
    }
}

pub(super) fn parse_reply(reply: &[i64], hits: usize) -> Result<Vec<Outcome>, StoreError> {
    const FIELDS: usize = REPLY_PER_HIT;
    if reply.len() != hits * FIELDS {
        return Err(StoreError::Protocol(format!(
            "expected {} integers, got {}",
            hits * FIELDS,
            reply.len()
        )));
    }
    let non_negative =
        |v: i64| u64::try_from(v).map_err(|_| StoreError::Protocol(format!("negative value {v}")));
    reply
        .chunks_exact(FIELDS)
        .map(|f| {
            Ok(Outcome {
                allowed: f[0] == 1,
                remaining: non_negative(f[1])?,
                reset_after_ms: non_negative(f[2])?,
                retry_after_ms: if f[3] < 0 {
                    None
                } else {
                    Some(non_negative(f[3])?)
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_for(url: &str) -> Result<RedisStore, StoreError> {
        RedisStore::new(&RedisSettings::new(url))
    }

    #[test]
    fn urls_with_credentials_and_tls_are_accepted() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://:secret@127.0.0.1:6379/2",
            "redis://alice:secret@localhost:6380",
            "rediss://alice:secret@redis.example:6380",
        ] {
            store_for(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["", "http://127.0.0.1", "redis://"] {
            assert!(store_for(url).is_err(), "{url}");
        }
    }

    #[test]
    fn replies_are_checked() {
        assert!(parse_reply(&[1, 2, 3], 1).is_err());
        assert!(parse_reply(&[1, -2, 3, -1], 1).is_err());
        let outcomes = parse_reply(&[1, 2, 3, -1, 0, 0, 5, 5], 2).unwrap();
        assert_eq!(outcomes[1].retry_after_ms, Some(5));
        assert!(outcomes[0].allowed && !outcomes[1].allowed);
    }
}
