//! The shared store: counters in Redis, decided by one function call.
//!
//! The decision code (`redis/ratekeeper.lua`) is loaded once per connection
//! as a function library (`FCALL`; a script with `EVALSHA` where functions
//! are unavailable) and reads, decides, writes and sets the expiry of every
//! key of a request in one atomic step with Redis's own clock, so any
//! number of ratekeeper instances share one exact limit. Requests share a
//! few pipelined connections ([`node`], [`lane`]), and the decisions waiting
//! for a connection go out together in one call ([`coalesce`]), each with
//! its own atomicity and answer: a decision is at most one request to Redis,
//! and under load many share one. The answers' details come from the Rust
//! algorithms ([`decide`]). Each decision runs under one deadline, so a
//! dead, frozen or silent Redis costs a request at most that long;
//! connecting runs in the background ([`lane`] has the lifecycle).
//!
//! The Redis is one fixed address (a URL; behind a DNS name or a virtual IP
//! that may move to a new primary), or the master a set of sentinels name
//! ([`sentinel`]). In the envoy-ratelimit key layout, the limits upstream
//! can express are counted in upstream's keys instead ([`upstream_keys`]).

pub(crate) mod coalesce;
pub(crate) mod connect;
pub(crate) mod decide;
pub(crate) mod encode;
pub(crate) mod lane;
pub(crate) mod node;
pub mod sentinel;
pub(crate) mod upstream_keys;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;

use super::{ADMIN_TIMEOUT, CounterStore, RedisCommands, StoreError};
use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::clock::{Clock, SystemClock};
use crate::rules::KeyLayout;
use crate::store::envoy_layout::EnvoyLayout;
use coalesce::{Batching, Job};
use connect::FixedConnector;
use encode::Encoded;
use lane::{Connect, LaneSettings};
use node::Node;

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
    /// Up to this much (chosen at random per call), and less than the key's
    /// window, is added to every key's Redis TTL, so the keys of one window
    /// do not all expire at once.
    pub expiry_jitter: Duration,
}

impl RedisSettings {
    /// Settings for `url` with the service's defaults.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: DEFAULT_POOL_SIZE,
            timeout: Duration::from_millis(15),
            connect_timeout: Duration::from_secs(1),
            tls: None,
            expiry_jitter: DEFAULT_EXPIRY_JITTER,
        }
    }
}

/// What the decision code is told about time: the time to use (tests only;
/// production reads Redis `TIME`) and what to add to each key's TTL. The
/// clock is set once, after the connections that share this are made.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScriptTime {
    clock: Arc<OnceLock<Arc<dyn Clock>>>,
    jitter_max_ms: u64,
    /// Redis's clock minus this host's (ms), as the last reply showed it:
    /// what [`ScriptTime::expected_now_ms`] adds to this host's clock.
    offset_ms: Arc<AtomicI64>,
}

impl ScriptTime {
    pub(crate) fn with_jitter(jitter: Duration) -> Self {
        Self {
            clock: Arc::default(),
            jitter_max_ms: u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX),
            offset_ms: Arc::default(),
        }
    }

    /// Drives the code with `clock` from now on (tests only).
    pub(crate) fn set_clock(&self, clock: Arc<dyn Clock>) {
        let _ = self.clock.set(clock);
    }

    pub(crate) fn now_ms(&self) -> Option<u64> {
        self.clock.get().map(|clock| clock.now_ms())
    }

    /// What the code's `now` will most likely be: the injected time, else
    /// this host's clock corrected by the offset the last reply showed.
    /// Only an estimate, to name the window a call expects (a guess off by
    /// a boundary costs the script a string, never a wrong count): the
    /// decision's time is Redis's.
    pub(crate) fn expected_now_ms(&self) -> u64 {
        match self.clock.get() {
            Some(clock) => clock.now_ms(),
            None => SystemClock
                .now_ms()
                .saturating_add_signed(self.offset_ms.load(Ordering::Relaxed)),
        }
    }

    /// Learns Redis's clock from a reply's `now`.
    pub(crate) fn observe(&self, redis_now_ms: i64) {
        if self.clock.get().is_none() {
            let here = i64::try_from(SystemClock.now_ms()).unwrap_or(i64::MAX);
            self.offset_ms
                .store(redis_now_ms.saturating_sub(here), Ordering::Relaxed);
        }
    }

    /// A call's expiry jitter, drawn from `[0, --expiration-jitter-max)`.
    /// The scripts add it to a TTL modulo the lifetime the TTL extends (a
    /// key's window, a record's own TTL), so nothing outlives its state by
    /// more than that lifetime again.
    pub(crate) fn jitter_ms(&self) -> u64 {
        match self.jitter_max_ms {
            0 => 0,
            max => fastrand::u64(0..max),
        }
    }

    /// What every TTL gets besides the jitter: the grace of injected time.
    pub(crate) fn grace_ms(&self) -> u64 {
        if self.clock.get().is_some() {
            INJECTED_TIME_GRACE_MS
        } else {
            0
        }
    }

    /// What a TTL extending a state that lives `lifetime_ms` gets beyond
    /// it: the jitter modulo that lifetime, plus the grace (the scripts'
    /// `jitter % w + grace`).
    pub(crate) fn ttl_extra_within(&self, lifetime_ms: u64) -> u64 {
        self.jitter_ms() % lifetime_ms.max(1) + self.grace_ms()
    }
}

/// Default expiry jitter (`--expiration-jitter-max`), upstream's 300 s:
/// taken modulo each key's window, it spreads the end of a window's keys
/// over the next window (at most 5 minutes), not all at its end, when Redis
/// would block for tens of milliseconds deleting them.
pub const DEFAULT_EXPIRY_JITTER: Duration = Duration::from_secs(300);

/// Default connections per endpoint. Redis runs one command at a time, and
/// each connection carries one coalesced call at a time: fewer connections
/// mean fuller calls (two sent the same traffic in under half the calls of
/// four, see BENCHMARKS.md), and two keep one connection's replacement from
/// stalling the endpoint.
pub const DEFAULT_POOL_SIZE: usize = 2;

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
    pub(crate) fn certificates(&self) -> redis::TlsCertificates {
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
    batching: Arc<Batching>,
    timeout: Duration,
    /// Follows the sentinels' failovers, when the master is found by them.
    _sentinel: Option<Arc<sentinel::Follower>>,
    /// Counts upstream's limits in upstream's keys (the envoy-ratelimit
    /// key layout); `None` for ratekeeper's own layout.
    layout: Option<Arc<EnvoyLayout>>,
    /// The longest reservation (`--max-reservation-ttl`).
    max_reservation_ttl: Duration,
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
        let batching = Batching::new(settings.timeout, settings.expiry_jitter);
        let connector = Arc::new(FixedConnector {
            info,
            code: batching.code.clone(),
        });
        Ok(Self::with_connector(settings, connector, batching))
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
        let batching = Batching::new(settings.timeout, settings.expiry_jitter);
        let (connector, follower) =
            sentinel::SentinelConnector::new(sentinels, settings, batching.code.clone())?;
        let store = Self::with_connector(settings, Arc::new(connector), batching);
        let follower = follower.follow(store.node.clone());
        Ok(Self {
            _sentinel: Some(follower),
            ..store
        })
    }

    fn with_connector(
        settings: &RedisSettings,
        connector: Arc<dyn Connect>,
        batching: Arc<Batching>,
    ) -> Self {
        let lanes = LaneSettings::new(connector, batching.clone(), settings.connect_timeout);
        Self {
            node: Arc::new(Node::new(settings.pool_size.max(1), lanes)),
            batching,
            timeout: settings.timeout,
            _sentinel: None,
            layout: None,
            max_reservation_ttl: crate::reservation::ledger::DEFAULT_MAX_TTL,
        }
    }

    /// Counts every limit upstream can express in envoyproxy/ratelimit's
    /// keys, as `layout` says (the migration key layout).
    pub fn with_envoy_layout(self, layout: EnvoyLayout) -> Self {
        Self {
            layout: Some(Arc::new(layout)),
            ..self
        }
    }

    /// Runs `script` with `keys` and `args` on one of this store's
    /// connections, under its deadline (the lease tables' script, which is
    /// not part of the batched decision code).
    ///
    /// # Errors
    ///
    /// [`StoreError`] as for a decision.
    pub(crate) async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[Vec<u8>],
        args: &[Vec<u8>],
    ) -> Result<T, StoreError> {
        super::within(self.timeout, async {
            let call = self.node.call().await?;
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(key);
            }
            for arg in args {
                invocation.arg(arg);
            }
            let result = invocation.invoke_async::<T>(&mut call.connection()).await;
            call.end(result.as_ref().err());
            result.map_err(|e| store_error(&e))
        })
        .await
    }

    /// Makes the code use `clock` instead of Redis `TIME` (tests only:
    /// instances with different clocks would disagree on windows).
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
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
    /// connections, the scripts' time, the call deadline and the longest
    /// reservation.
    pub(crate) fn reservation_parts(&self) -> (&Node, &ScriptTime, Duration, Duration) {
        (
            &self.node,
            &self.batching.time,
            self.timeout,
            self.max_reservation_ttl,
        )
    }
}

/// Decides `hits` with one queued decision on `node`: the outcomes, once
/// the call carrying it answers.
pub(super) async fn decide_on(
    node: &Node,
    slot: u16,
    hits: &[BatchHit<'_>],
    mode: Mode,
) -> Result<Vec<Outcome>, redis::RedisError> {
    Ok(decide_at(node, slot, hits, mode).await?.0)
}

/// As [`decide_on`], also saying at which instant (Unix ms, the script's
/// clock) the hits were judged: a reservation records its windows from it.
pub(crate) async fn decide_at(
    node: &Node,
    slot: u16,
    hits: &[BatchHit<'_>],
    mode: Mode,
) -> Result<(Vec<Outcome>, u64), redis::RedisError> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    node.submit(Job {
        decision: Encoded::new(hits, mode),
        slot,
        answer,
    })
    .await
    .map_err(no_connection)?;
    let (now, found) = answered.await.map_err(|_| {
        redis::RedisError::from((redis::ErrorKind::Io, "the connection was replaced"))
    })??;
    let outcomes = outcomes_of(hits, mode, now, &found)?;
    Ok((outcomes, u64::try_from(now).unwrap_or(0)))
}

/// A node that has no connection to give, as the error its callers handle
/// (an I/O error: the store failing).
pub(crate) fn no_connection(error: StoreError) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "no connection", error.to_string()))
}

/// The outcomes of `hits` from their decision's part of a reply; a reply
/// the algorithms cannot use is an unexpected return (a protocol error: a
/// bug, never the store failing).
pub(super) fn outcomes_of(
    hits: &[BatchHit<'_>],
    mode: Mode,
    now: i64,
    found: &[i64],
) -> Result<Vec<Outcome>, redis::RedisError> {
    decide::outcomes(hits, mode, now, found).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unusable reply",
            e.to_string(),
        ))
    })
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
            .field("layout", &self.layout)
            .finish()
    }
}

#[async_trait]
impl CounterStore for RedisStore {
    async fn apply(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError> {
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        super::within(self.timeout, async {
            match &self.layout {
                None => decide_on(&self.node, 0, hits, mode)
                    .await
                    .map_err(|e| store_error(&e)),
                Some(layout) => {
                    upstream_keys::decide(&self.node, &self.batching, layout, hits, mode).await
                }
            }
        })
        .await
    }

    async fn ping(&self) -> Result<Option<String>, StoreError> {
        super::within(self.timeout, async {
            let call = self.node.call().await?;
            let result = redis::cmd("PING")
                .query_async::<String>(&mut call.connection())
                .await;
            call.end(result.as_ref().err());
            result.map(|_| None).map_err(|e| store_error(&e))
        })
        .await
    }

    fn backend(&self) -> &'static str {
        "redis"
    }

    fn leases(&self) -> Option<Arc<dyn crate::lease::LeaseStore>> {
        Some(Arc::new(crate::lease::RedisLeases::new(self.clone())))
    }

    async fn refund(&self, hits: &[BatchHit<'_>]) -> Result<(), StoreError> {
        // Upstream's keys hold upstream's counters: not refunded.
        if hits.is_empty() || self.layout.is_some() {
            return Ok(());
        }
        let (keys, args) = refund_call(hits, &self.batching.time);
        self.run_script::<i64>(&REFUND, &keys, &args).await?;
        Ok(())
    }

    async fn delete(&self, keys: &[Vec<u8>]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        // One DEL per counter (all its keys), so the answer counts counters.
        let mut pipe = redis::pipe();
        for counter in keys {
            pipe.cmd("DEL")
                .arg(stored_keys(counter, &self.batching.time));
        }
        let deleted: Vec<u64> = super::within(ADMIN_TIMEOUT, async {
            let call = self.node.call().await?;
            let result = pipe.query_async(&mut call.connection()).await;
            call.end(result.as_ref().err());
            result.map_err(|e| store_error(&e))
        })
        .await?;
        Ok(deleted.iter().filter(|&&n| n > 0).count() as u64)
    }

    fn reservations(&self) -> Option<Arc<dyn crate::reservation::ReservationStore>> {
        // In upstream's key layout the counters are not ours to adjust.
        match self.layout {
            None => Some(Arc::new(crate::reservation::redis::RedisReservations::new(
                self.clone(),
            ))),
            Some(_) => None,
        }
    }

    fn key_layout(&self) -> KeyLayout {
        self.layout
            .as_ref()
            .map_or(KeyLayout::Ratekeeper, |layout| layout.key_layout())
    }

    fn commands(&self) -> Option<Arc<dyn RedisCommands>> {
        Some(Arc::new(self.clone()))
    }
}

#[async_trait]
impl RedisCommands for RedisStore {
    async fn query(&self, _key: &[u8], cmd: redis::Cmd) -> Result<redis::Value, StoreError> {
        super::within(ADMIN_TIMEOUT, async {
            let call = self.node.call().await?;
            let result = cmd
                .query_async::<redis::Value>(&mut call.connection())
                .await;
            call.end(result.as_ref().err());
            result.map_err(|e| store_error(&e))
        })
        .await
    }
}

/// The refund script (`redis/refund.lua`; its Rust twin is
/// `algorithm::refund`).
pub(crate) const REFUND_SOURCE: &str = include_str!("redis/refund.lua");

static REFUND: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REFUND_SOURCE));

/// The Redis keys holding the state of the counter at `key`: a
/// fixed-window counter's is one key per window, so its windows around
/// Redis's now (the one before, the current one, the next, in case the
/// estimate of Redis's clock is a boundary off) stand for it, beside the
/// key itself.
pub(crate) fn stored_keys(key: &[u8], time: &ScriptTime) -> Vec<Vec<u8>> {
    use crate::rules::key::{fixed_window_ms, push_window, window_number};
    let mut stored = vec![key.to_vec()];
    if let Some(window) = fixed_window_ms(key) {
        let current = window_number(time.expected_now_ms(), window);
        for number in [current.saturating_sub(1), current, current + 1] {
            let mut windowed = key.to_vec();
            push_window(&mut windowed, number);
            stored.push(windowed);
        }
    }
    stored
}

/// The refund script's KEYS and ARGV for `hits`, at `time`'s clock.
pub(crate) fn refund_call(
    hits: &[BatchHit<'_>],
    time: &ScriptTime,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let keys = hits.iter().map(|hit| hit.key.to_vec()).collect();
    let mut args: Vec<Vec<u8>> = vec![
        time.now_ms()
            .map(|n| n.to_string())
            .unwrap_or_default()
            .into(),
        time.jitter_ms().to_string().into(),
        time.grace_ms().to_string().into(),
    ];
    for hit in hits {
        for value in [
            u64::from(hit.algorithm.script_id()),
            hit.quota.limit,
            hit.quota.window_ms,
            hit.quota.burst,
            hit.hits,
        ] {
            args.push(value.to_string().into());
        }
    }
    (keys, args)
}

/// What a Redis error says about the store. The script's own runtime
/// errors and replies of the wrong shape are bugs in this request's path
/// ([`StoreError::Protocol`]); everything else — I/O, the server refusing
/// because of its state (read-only, loading, out of memory, busy, cluster
/// down, no permission) — is the store failing.
pub(crate) fn store_error(error: &redis::RedisError) -> StoreError {
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
}
