//! One Redis connection slot ("lane") and its lifecycle: a connection is
//! evidence, not a promise.
//!
//! A lane holds at most one multiplexed connection, shared by every request
//! sent on it (they are pipelined back to back). Its lifecycle:
//!
//! - **Connecting never runs inside a request's deadline.** An empty lane is
//!   filled by a background task (TCP with `TCP_NODELAY` and keepalive, TLS,
//!   AUTH, loading the decision code, all under the connect timeout and no
//!   other bound: [`super::connect::multiplexed`]); requests wait for it at
//!   most their own deadline, and the result is kept for the next ones.
//!   The host name is resolved again on every connect.
//! - **Failed connects back off** with jitter (25 ms, doubling to 1 s, each
//!   wait drawn from its upper half), so a Redis that is down is not
//!   hammered; while a lane backs off, its requests fail at once.
//! - **A connection is retired and replaced** (without disturbing the other
//!   lanes) when:
//!   1. a call fails at the I/O level (the socket is gone);
//!   2. it answers "wrong server": `READONLY` (the primary was demoted behind
//!      a DNS name or a virtual IP), `MASTERDOWN`, `LOADING`, or a failed
//!      authentication after a failover;
//!   3. a call on it goes unanswered for the stall bound: requests are
//!      outstanding and nothing comes back (a half-open socket after the
//!      host vanished, an expired NAT entry, a frozen server). Decisions
//!      go out in coalesced calls, each its own probe; a direct call (a
//!      readiness ping) that misses its deadline is followed by a `PING`.
//!      A connection that is merely slow answers and stays.
//!
//! Replacement starts at once, in the background, so the next request on
//! the lane usually finds a fresh connection.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use tokio::sync::{Notify, mpsc};

use super::coalesce::{Batching, Job};
use super::decide::Runner;
use crate::clock::{Clock, MonotonicClock};
use crate::store::StoreError;

/// First wait after a failed connect; it doubles per failure.
const BACKOFF_FIRST_MS: u64 = 25;
/// Longest wait between two connects.
const BACKOFF_MAX_MS: u64 = 1_000;

/// Makes connections for lanes (one endpoint: a fixed address, the master
/// the sentinels name, a cluster node).
#[async_trait]
pub(crate) trait Connect: Send + Sync + std::fmt::Debug {
    /// One new, ready connection (the code loaded, and how it runs there).
    async fn connect(&self) -> Result<Connected, StoreError>;
}

/// A new connection with the code loaded.
#[derive(Debug)]
pub(crate) struct Connected {
    pub conn: MultiplexedConnection,
    pub runner: Runner,
}

/// What the lanes of one endpoint share.
#[derive(Debug)]
pub(crate) struct LaneSettings {
    pub connector: Arc<dyn Connect>,
    /// How each connection's batcher sends decisions.
    pub batching: Arc<Batching>,
    /// Deadline of one connect attempt, in the background.
    pub connect_timeout: Duration,
    /// Measures backoff (monotonic).
    pub clock: Arc<dyn Clock>,
}

impl LaneSettings {
    pub(crate) fn new(
        connector: Arc<dyn Connect>,
        batching: Arc<Batching>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            connector,
            batching,
            connect_timeout,
            clock: Arc::new(MonotonicClock::default()),
        }
    }
}

/// One connection slot.
#[derive(Debug)]
pub(crate) struct Lane {
    state: Mutex<State>,
    changed: Notify,
    settings: Arc<LaneSettings>,
}

#[derive(Debug)]
enum State {
    /// No connection; a connect may start at `next_attempt_ms`.
    Empty {
        next_attempt_ms: u64,
        failures: u32,
        last_error: Option<String>,
    },
    Connecting,
    Live(Arc<Live>),
}

/// A connection in service, with its batcher.
#[derive(Debug)]
pub(crate) struct Live {
    conn: MultiplexedConnection,
    runner: Runner,
    /// Decisions for the batcher ([`super::coalesce`]).
    jobs: mpsc::UnboundedSender<Job>,
    retired: AtomicBool,
    probing: AtomicBool,
    /// Calls that missed their deadline on this connection (for logs).
    missed: AtomicU32,
    /// When the batcher's call now out was sent (monotonic ms + 1), or 0
    /// when none is out: how a node tells a busy lane from a late one.
    out_since: AtomicU64,
    clock: Arc<dyn Clock>,
}

/// A call in flight on a lane: records how it ended, and when it is dropped
/// before it ended (its deadline passed), has the connection probed.
pub(crate) struct Call<'a> {
    lane: &'a Arc<Lane>,
    live: Arc<Live>,
    ended: bool,
}

// === impl Lane ===

impl Lane {
    pub(crate) fn new(settings: Arc<LaneSettings>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::Empty {
                next_attempt_ms: 0,
                failures: 0,
                last_error: None,
            }),
            changed: Notify::new(),
            settings,
        })
    }

    /// The lane's live connection now, if it has one; an empty lane that
    /// is not backing off starts connecting in the background (so a lane
    /// that lost its connection is refilled by the traffic that passes it,
    /// and at startup the first requests find connections). One look at the
    /// lane's state, whatever the answer.
    pub(crate) fn live_now(self: &Arc<Self>) -> Option<Arc<Live>> {
        let mut state = self.lock();
        match &*state {
            State::Live(live) if !live.retired.load(Ordering::SeqCst) => Some(live.clone()),
            State::Empty {
                next_attempt_ms, ..
            } if self.settings.clock.now_ms() >= *next_attempt_ms => {
                *state = State::Connecting;
                drop(state);
                self.spawn_connect();
                None
            }
            _ => None,
        }
    }

    /// Whether a live connection is in the lane now.
    pub(crate) fn is_live(&self) -> bool {
        matches!(&*self.lock(), State::Live(live) if !live.retired.load(Ordering::SeqCst))
    }

    /// The lane's connection, waiting for a connect in progress (callers
    /// bound the wait with their deadline).
    ///
    /// # Errors
    ///
    /// [`StoreError::Connection`] at once while the lane backs off after a
    /// failed connect.
    pub(crate) async fn live(self: &Arc<Self>) -> Result<Arc<Live>, StoreError> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.lock();
                match &*state {
                    State::Live(live) if !live.retired.load(Ordering::SeqCst) => {
                        return Ok(live.clone());
                    }
                    State::Live(_) => {
                        *state = State::Connecting;
                        drop(state);
                        self.spawn_connect();
                    }
                    State::Connecting => {}
                    State::Empty {
                        next_attempt_ms,
                        last_error,
                        ..
                    } => {
                        let now = self.settings.clock.now_ms();
                        if now < *next_attempt_ms {
                            return Err(StoreError::Connection(format!(
                                "reconnecting in {} ms after: {}",
                                next_attempt_ms - now,
                                last_error.as_deref().unwrap_or("a failed connect")
                            )));
                        }
                        *state = State::Connecting;
                        drop(state);
                        self.spawn_connect();
                    }
                }
            }
            changed.await;
        }
    }

    /// A direct call on the lane's connection (not coalesced), waiting for
    /// a connect in progress.
    ///
    /// # Errors
    ///
    /// As [`Lane::live`].
    pub(crate) async fn call(self: &Arc<Self>) -> Result<Call<'_>, StoreError> {
        let live = self.live().await?;
        Ok(self.call_on(live))
    }

    /// A direct call on `live`, this lane's connection.
    pub(crate) fn call_on(self: &Arc<Self>, live: Arc<Live>) -> Call<'_> {
        Call {
            lane: self,
            live,
            ended: false,
        }
    }

    /// Queues `job` for the lane's batcher, waiting for a connect in
    /// progress.
    ///
    /// # Errors
    ///
    /// As [`Lane::live`], or when the connection was retired meanwhile.
    pub(crate) async fn submit(self: &Arc<Self>, job: Job) -> Result<(), StoreError> {
        self.live().await?.submit(job)
    }

    /// Takes `live` out of service (if it is still the lane's connection)
    /// and starts replacing it.
    pub(crate) fn retire(self: &Arc<Self>, live: &Arc<Live>, why: &str) {
        if live.retired.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut state = self.lock();
        if matches!(&*state, State::Live(current) if Arc::ptr_eq(current, live)) {
            tracing::warn!(reason = why, "redis connection retired; reconnecting");
            *state = State::Connecting;
            drop(state);
            self.spawn_connect();
        }
    }

    /// Retires whatever connection the lane holds (the endpoint moved).
    pub(crate) fn retire_current(self: &Arc<Self>, why: &str) {
        let live = match &*self.lock() {
            State::Live(live) => Some(live.clone()),
            _ => None,
        };
        if let Some(live) = live {
            self.retire(&live, why);
        }
    }

    fn spawn_connect(self: &Arc<Self>) {
        let lane = self.clone();
        tokio::spawn(async move {
            let settings = &lane.settings;
            let result =
                tokio::time::timeout(settings.connect_timeout, settings.connector.connect())
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::Connection(format!(
                            "connect timed out after {:?}",
                            settings.connect_timeout
                        )))
                    });
            let mut state = lane.lock();
            let failures = match &*state {
                State::Empty { failures, .. } => *failures,
                _ => 0,
            };
            *state = match result {
                Ok(connected) => {
                    let (jobs, queue) = mpsc::unbounded_channel();
                    let live = Arc::new(Live {
                        conn: connected.conn,
                        runner: connected.runner,
                        jobs,
                        retired: AtomicBool::new(false),
                        probing: AtomicBool::new(false),
                        missed: AtomicU32::new(0),
                        out_since: AtomicU64::new(0),
                        clock: settings.clock.clone(),
                    });
                    tokio::spawn(super::coalesce::run(
                        Arc::downgrade(&lane),
                        live.clone(),
                        queue,
                        settings.batching.clone(),
                    ));
                    State::Live(live)
                }
                Err(error) => {
                    let failures = failures.saturating_add(1);
                    tracing::debug!(%error, failures, "redis connect failed");
                    State::Empty {
                        next_attempt_ms: settings.clock.now_ms() + backoff_ms(failures),
                        failures,
                        last_error: Some(error.to_string()),
                    }
                }
            };
            drop(state);
            lane.changed.notify_waiters();
        });
    }

    /// A call on `live` missed its deadline: probe it once.
    fn suspect(self: &Arc<Self>, live: Arc<Live>) {
        live.missed.fetch_add(1, Ordering::Relaxed);
        if live.retired.load(Ordering::SeqCst) || live.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let lane = self.clone();
        // A stall probe waits as long as a coalesced call may.
        let bound = self.settings.batching.stall_timeout;
        let spawned = tokio::runtime::Handle::try_current().map(|handle| {
            handle.spawn(async move {
                let mut conn = live.conn.clone();
                let pong = tokio::time::timeout(
                    bound,
                    redis::cmd("PING").query_async::<String>(&mut conn),
                )
                .await;
                match pong {
                    Ok(Ok(_)) => live.probing.store(false, Ordering::SeqCst),
                    Ok(Err(error)) => lane.retire(&live, &format!("stall probe failed: {error}")),
                    Err(_) => lane.retire(
                        &live,
                        &format!(
                            "silent: {} calls missed their deadline and a PING got no answer in {bound:?}",
                            live.missed.load(Ordering::Relaxed)
                        ),
                    ),
                }
            })
        });
        drop(spawned);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// === impl Live ===

impl Live {
    /// A handle on the connection (cheap: it is multiplexed).
    pub(crate) fn connection(&self) -> MultiplexedConnection {
        self.conn.clone()
    }

    /// How this connection runs the code.
    pub(crate) fn runner(&self) -> Runner {
        self.runner
    }

    /// Queues `job` for this connection's batcher.
    ///
    /// # Errors
    ///
    /// [`StoreError::Connection`] when the connection was retired meanwhile.
    pub(crate) fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Connection("the connection was just replaced".to_owned()))
    }

    /// Whether the connection has been taken out of service.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// The batcher sent a call ([`Live::call_back`] when it is answered or
    /// given up).
    pub(crate) fn call_out(&self) {
        self.out_since
            .store(self.clock.now_ms() + 1, Ordering::Relaxed);
    }

    /// The batcher's call is over.
    pub(crate) fn call_back(&self) {
        self.out_since.store(0, Ordering::Relaxed);
    }

    /// Whether a call has been out for more than `bound`.
    pub(crate) fn is_late(&self, bound: Duration) -> bool {
        match self.out_since.load(Ordering::Relaxed) {
            0 => false,
            since => {
                let bound = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
                self.clock.now_ms() + 1 > since.saturating_add(bound)
            }
        }
    }
}

// === impl Call ===

impl Call<'_> {
    /// A handle on the connection for this call (cheap: it is multiplexed).
    pub(crate) fn connection(&self) -> MultiplexedConnection {
        self.live.conn.clone()
    }

    /// How this call's connection runs the code.
    pub(crate) fn runner(&self) -> Runner {
        self.live.runner
    }

    /// Records how the call ended; an error that says the connection is
    /// gone or talks to the wrong server retires it.
    pub(crate) fn end(mut self, error: Option<&redis::RedisError>) {
        self.ended = true;
        if let Some(reason) = error.and_then(retire_reason) {
            self.lane.retire(&self.live, &reason);
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.lane.suspect(self.live.clone());
        }
    }
}

/// Why an error takes its connection out of service, if it does.
pub(crate) fn retire_reason(error: &redis::RedisError) -> Option<String> {
    use redis::{ErrorKind, ServerErrorKind};
    if error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal() {
        return Some(format!("connection lost: {error}"));
    }
    // (A cluster's MOVED or CLUSTERDOWN is about slots, not this
    // connection: the cluster store re-routes or retries.)
    let wrong_server = matches!(
        error.kind(),
        ErrorKind::Server(
            ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown | ServerErrorKind::BusyLoading
        ) | ErrorKind::AuthenticationFailed
    ) || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"));
    wrong_server.then(|| format!("wrong server: {error}"))
}

/// The wait before connect attempt `failures + 1`: doubling from
/// [`BACKOFF_FIRST_MS`] to [`BACKOFF_MAX_MS`], drawn from its upper half so
/// many instances do not reconnect in step.
fn backoff_ms(failures: u32) -> u64 {
    let ceiling = BACKOFF_FIRST_MS
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(BACKOFF_MAX_MS);
    ceiling / 2 + fastrand::u64(0..=ceiling / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        for (failures, ceiling) in [
            (1, 25),
            (2, 50),
            (3, 100),
            (6, 800),
            (7, 1_000),
            (40, 1_000),
        ] {
            for _ in 0..100 {
                let wait = backoff_ms(failures);
                assert!(
                    (ceiling / 2..=ceiling).contains(&wait),
                    "{failures}: {wait}"
                );
            }
        }
    }

    #[test]
    fn wrong_server_and_lost_connections_retire() {
        let readonly = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(
            retire_reason(&readonly)
                .unwrap()
                .starts_with("wrong server")
        );
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(retire_reason(&io).unwrap().starts_with("connection lost"));
        let script = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "user_script:1: attempt to compare nil",
        ));
        assert_eq!(retire_reason(&script), None);
    }
}
