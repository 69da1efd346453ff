//! A circuit breaker in front of a store.
//!
//! While the store fails, every request would otherwise pay the full store
//! deadline before the failure policy answers. After `threshold` consecutive
//! failures the breaker opens: calls fail at once for `cooldown`, then one
//! call probes the store (the others still fail fast); a success closes the
//! breaker, a failure opens it for another cooldown. A successful readiness
//! ping closes it too, so recovery after the store returns takes at most one
//! cooldown or one readiness interval, whichever comes first.
//!
//! Consecutive means one after another in time: a failure counts only if
//! its call was admitted after the last failure that counted. The decisions
//! in flight together — one coalesced Redis call carries twenty of them —
//! fail together when one call is late, and count as one failure. Counted
//! per decision, a single 15 ms stall of Redis (an expire cycle, a slow
//! command, a busy host) opened the breaker and failed a whole cooldown of
//! requests; now the store must fail requests sent after its first failure
//! too, `threshold` times over, before the breaker opens.
//!
//! What counts: only store failures ([`StoreError::is_store_failure`]: I/O,
//! deadline, the server's own errors). A reply this request could not use is
//! a bug in the request's path, not an outage, and counts as the store
//! answering. A call dropped before the store answered — its caller's
//! deadline was shorter than the store's — counts as a failure: the store
//! was too slow for the callers. A drop guard records it, so a dropped probe
//! also re-opens the breaker instead of leaving it half-open.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{CounterStore, StoreError};
use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::clock::{Clock, MonotonicClock};

/// Default consecutive failures that open the breaker.
pub const DEFAULT_THRESHOLD: u32 = 3;
/// Default time the breaker stays open before probing.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_millis(200);

/// A store behind a circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    inner: Arc<dyn CounterStore>,
    threshold: u32,
    cooldown_ms: u64,
    /// Measures the cooldown; monotonic in production.
    clock: Arc<dyn Clock>,
    /// A std mutex: held for a few instructions, never across an await.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    /// Counted failures so far, ever: a call admitted at `counted` whose
    /// failure comes after another's counted failure is of the same wave.
    counted: u64,
    open_until_ms: Option<u64>,
    probing: bool,
}

/// Whether a call may go to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Closed,
    Probe,
    Open,
}

/// Records the outcome of one admitted call, also when its future is
/// dropped before the store answers.
struct Call<'a> {
    breaker: &'a CircuitBreaker,
    /// The breaker's counted failures when this call was admitted.
    admitted_at: u64,
    recorded: bool,
}

// === impl CircuitBreaker ===

impl CircuitBreaker {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn CounterStore>, threshold: u32, cooldown: Duration) -> Self {
        Self {
            inner,
            threshold: threshold.max(1),
            cooldown_ms: u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX),
            clock: Arc::new(MonotonicClock::default()),
            state: Mutex::default(),
        }
    }

    /// Measures the cooldown on `clock` (tests move it by hand).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Whether the breaker is open (calls fail fast).
    pub fn is_open(&self) -> bool {
        self.lock().open_until_ms.is_some()
    }

    /// Whether a call may go to the store, and the counted failures as of
    /// its admission.
    fn admit(&self) -> (Admission, u64) {
        let mut state = self.lock();
        let admission = match state.open_until_ms {
            None => Admission::Closed,
            Some(until) if self.clock.now_ms() >= until && !state.probing => {
                state.probing = true;
                Admission::Probe
            }
            Some(_) => Admission::Open,
        };
        (admission, state.counted)
    }

    /// The outcome of a call admitted when `admitted_at` failures had
    /// counted.
    fn record(&self, ok: bool, admitted_at: u64) {
        let mut state = self.lock();
        state.probing = false;
        if ok {
            if state.open_until_ms.is_some() {
                tracing::info!(
                    backend = self.inner.backend(),
                    "store answers again; circuit closed"
                );
            }
            state.consecutive_failures = 0;
            state.open_until_ms = None;
            return;
        }
        if admitted_at != state.counted {
            // In flight beside a failure that counted: the same wave.
            return;
        }
        state.counted += 1;
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        if state.consecutive_failures >= self.threshold {
            if state.open_until_ms.is_none() {
                tracing::warn!(
                    backend = self.inner.backend(),
                    failures = state.consecutive_failures,
                    "store failing; circuit open, answering by failure policy without waiting"
                );
            }
            state.open_until_ms = Some(self.clock.now_ms().saturating_add(self.cooldown_ms));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl CounterStore for CircuitBreaker {
    async fn apply(&self, hits: &[BatchHit<'_>], mode: Mode) -> Result<Vec<Outcome>, StoreError> {
        let (admission, admitted_at) = self.admit();
        if admission == Admission::Open {
            return Err(StoreError::CircuitOpen);
        }
        let mut call = Call {
            breaker: self,
            admitted_at,
            recorded: false,
        };
        let result = self.inner.apply(hits, mode).await;
        call.finish(result.as_ref().err());
        result
    }

    async fn ping(&self) -> Result<Option<String>, StoreError> {
        let result = self.inner.ping().await;
        if result.is_ok() {
            self.record(true, 0);
        }
        result
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn key_layout(&self) -> crate::rules::KeyLayout {
        self.inner.key_layout()
    }

    fn leases(&self) -> Option<std::sync::Arc<dyn crate::lease::LeaseStore>> {
        self.inner.leases()
    }

    async fn refund(&self, hits: &[BatchHit<'_>]) -> Result<(), StoreError> {
        self.inner.refund(hits).await
    }

    // An operator's reset: not request traffic, so it neither waits for nor
    // moves the breaker.
    async fn delete(&self, keys: &[Vec<u8>]) -> Result<u64, StoreError> {
        self.inner.delete(keys).await
    }

    fn commands(&self) -> Option<std::sync::Arc<dyn super::RedisCommands>> {
        self.inner.commands()
    }

    fn reservations(&self) -> Option<Arc<dyn crate::reservation::ReservationStore>> {
        // Reserving and settling go to the store directly: their failures
        // are errors, never answered by the breaker's policy.
        self.inner.reservations()
    }
}

// === impl Call ===

impl Call<'_> {
    fn finish(&mut self, error: Option<&StoreError>) {
        self.recorded = true;
        self.breaker.record(
            !error.is_some_and(StoreError::is_store_failure),
            self.admitted_at,
        );
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.record(false, self.admitted_at);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::algorithm::{AlgorithmKind, Quota};
    use crate::clock::ManualClock;
    use crate::store::scripted::{Reply, ScriptedStore};

    const HIT: BatchHit<'static> = BatchHit {
        key: b"k",
        algorithm: AlgorithmKind::FixedWindow,
        quota: Quota {
            limit: 1,
            window_ms: 1_000,
            burst: 1,
        },
        hits: 1,
        enforced: true,
    };

    fn breaker(store: ScriptedStore) -> (CircuitBreaker, Arc<ScriptedStore>, Arc<ManualClock>) {
        let store = Arc::new(store);
        let clock = Arc::new(ManualClock::new(0));
        let breaker = CircuitBreaker::new(store.clone(), 3, Duration::from_millis(200))
            .with_clock(clock.clone());
        (breaker, store, clock)
    }

    async fn call(breaker: &CircuitBreaker) -> Result<Vec<Outcome>, StoreError> {
        breaker.apply(&[HIT], Mode::Independent).await
    }

    /// A store that times out `n` times, then answers; and the breaker
    /// opened by the first three of those failures.
    async fn opened_by_timeouts(
        n: usize,
    ) -> (CircuitBreaker, Arc<ScriptedStore>, Arc<ManualClock>) {
        let timeout = Reply::Fail(StoreError::Timeout(Duration::from_millis(10)));
        let store = (0..n).fold(ScriptedStore::new(Reply::Allow(0)), |store, _| {
            store.then(timeout.clone())
        });
        let (breaker, store, clock) = breaker(store);
        for _ in 0..3 {
            assert!(call(&breaker).await.is_err());
        }
        assert!(breaker.is_open());
        (breaker, store, clock)
    }

    #[tokio::test]
    async fn opens_after_consecutive_store_failures_and_probes_after_the_cooldown() {
        let (breaker, store, clock) = opened_by_timeouts(4).await;
        assert!(matches!(call(&breaker).await, Err(StoreError::CircuitOpen)));
        assert_eq!(store.calls(), 3, "an open breaker does not call the store");
        clock.advance(200);
        // The probe fails: open for another cooldown.
        assert!(matches!(call(&breaker).await, Err(StoreError::Timeout(_))));
        assert!(matches!(call(&breaker).await, Err(StoreError::CircuitOpen)));
        clock.advance(200);
        assert!(call(&breaker).await.is_ok());
        assert!(!breaker.is_open());
    }

    #[tokio::test]
    async fn replies_the_request_cannot_use_never_open_it() {
        let (breaker, store, _) = breaker(ScriptedStore::new(Reply::Fail(StoreError::Protocol(
            "negative value -3".into(),
        ))));
        for _ in 0..10 {
            assert!(matches!(call(&breaker).await, Err(StoreError::Protocol(_))));
        }
        assert!(!breaker.is_open());
        assert_eq!(store.calls(), 10);
    }

    #[tokio::test]
    async fn a_call_dropped_before_the_store_answers_counts_as_a_failure() {
        let (breaker, _, clock) = breaker(ScriptedStore::new(Reply::Hang));
        for _ in 0..3 {
            let dropped = tokio::time::timeout(Duration::from_millis(1), call(&breaker)).await;
            assert!(dropped.is_err());
        }
        assert!(breaker.is_open());
        // A dropped probe re-opens it rather than leaving it half-open.
        clock.advance(200);
        assert!(
            tokio::time::timeout(Duration::from_millis(1), call(&breaker))
                .await
                .is_err()
        );
        assert!(matches!(call(&breaker).await, Err(StoreError::CircuitOpen)));
        clock.advance(200);
        assert!(
            tokio::time::timeout(Duration::from_millis(1), call(&breaker))
                .await
                .is_err(),
            "a new probe is admitted after the next cooldown"
        );
    }

    /// Ten decisions in flight together, all dropped at their callers'
    /// deadline (one late coalesced call): one failure, not ten.
    async fn a_wave_of_late_calls(breaker: &CircuitBreaker) {
        let wave = futures::future::join_all((0..10).map(|_| call(breaker)));
        assert!(
            tokio::time::timeout(Duration::from_millis(1), wave)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn calls_that_fail_together_count_once() {
        let (breaker, store, _) = breaker(ScriptedStore::new(Reply::Hang));
        a_wave_of_late_calls(&breaker).await;
        a_wave_of_late_calls(&breaker).await;
        assert!(!breaker.is_open(), "two waves are two failures of three");
        assert_eq!(store.calls(), 20);
        a_wave_of_late_calls(&breaker).await;
        assert!(breaker.is_open());
    }

    #[tokio::test]
    async fn a_success_between_waves_starts_the_count_again() {
        // Two waves hang, the next call answers, then every call hangs.
        let store = (0..20)
            .fold(ScriptedStore::new(Reply::Hang), |store, _| {
                store.then(Reply::Hang)
            })
            .then(Reply::Allow(0));
        let (breaker, _, _) = breaker(store);
        a_wave_of_late_calls(&breaker).await;
        a_wave_of_late_calls(&breaker).await;
        assert!(call(&breaker).await.is_ok());
        a_wave_of_late_calls(&breaker).await;
        a_wave_of_late_calls(&breaker).await;
        assert!(!breaker.is_open());
        a_wave_of_late_calls(&breaker).await;
        assert!(breaker.is_open());
    }

    #[tokio::test]
    async fn a_successful_ping_closes_it() {
        let (breaker, _, _) = opened_by_timeouts(3).await;
        breaker.ping().await.unwrap();
        assert!(!breaker.is_open());
    }
}
