//! A circuit breaker in front of a store.
//!
//! While the store fails, every request would otherwise pay the full store
//! deadline before the failure policy answers. After `threshold` consecutive
//! failures the breaker opens: calls fail at once for `cooldown`, then one
//! call probes the store (the others still fail fast); a success closes the
//! breaker, a failure opens it for another cooldown. A successful readiness
//! ping closes it too, so recovery after the store returns takes at most one
//! cooldown or one readiness interval, whichever comes first.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{CounterStore, StoreError};
use crate::algorithm::{BatchHit, Mode, Outcome};

/// Default consecutive failures that open the breaker.
pub const DEFAULT_THRESHOLD: u32 = 3;
/// Default time the breaker stays open before probing.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_millis(200);

/// A store behind a circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    inner: Arc<dyn CounterStore>,
    threshold: u32,
    cooldown: Duration,
    /// A std mutex: held for a few instructions, never across an await.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// Whether a call may go to the store.
enum Admission {
    Closed,
    Probe,
    Open,
}

impl CircuitBreaker {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn CounterStore>, threshold: u32, cooldown: Duration) -> Self {
        Self {
            inner,
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::default(),
        }
    }

    fn admit(&self) -> Admission {
        let mut state = self.lock();
        match state.open_until {
            None => Admission::Closed,
            Some(until) if Instant::now() >= until && !state.probing => {
                state.probing = true;
                Admission::Probe
            }
            Some(_) => Admission::Open,
        }
    }

    fn record(&self, ok: bool) {
        let mut state = self.lock();
        state.probing = false;
        if ok {
            if state.open_until.is_some() {
                tracing::info!(
                    backend = self.inner.backend(),
                    "store answers again; circuit closed"
                );
            }
            *state = State::default();
            return;
        }
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        if state.consecutive_failures >= self.threshold {
            if state.open_until.is_none() {
                tracing::warn!(
                    backend = self.inner.backend(),
                    failures = state.consecutive_failures,
                    "store failing; circuit open, answering by failure policy without waiting"
                );
            }
            state.open_until = Some(Instant::now() + self.cooldown);
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
        if let Admission::Open = self.admit() {
            return Err(StoreError::CircuitOpen);
        }
        let result = self.inner.apply(hits, mode).await;
        self.record(result.is_ok());
        result
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let result = self.inner.ping().await;
        if result.is_ok() {
            self.record(true);
        }
        result
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}
