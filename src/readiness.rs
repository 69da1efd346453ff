//! Readiness: whether this instance should receive traffic, shared by
//! `/readyz` and gRPC health.
//!
//! A monitor pings the store every interval (always with the store's own
//! deadline) and records the outcome, so `/readyz` answers from the last
//! check instead of adding load, and gRPC health turns NOT_SERVING while the
//! store is unreachable and SERVING again as soon as it answers. Shutdown
//! makes the instance unready for good.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::CounterStore;

/// gRPC health service names kept in step with readiness (besides `""`):
/// our two services and `ratelimit`, the name envoyproxy/ratelimit reports.
pub const HEALTH_NAMES: [&str; 4] = [
    "",
    "ratelimit",
    "ratekeeper.v1.RateLimiter",
    "envoy.service.ratelimit.v3.RateLimitService",
];

/// The readiness state: a cheap-to-clone handle.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    inner: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Why the last store check failed; `None` after a success.
    store_error: ArcSwapOption<String>,
    checked: AtomicBool,
    shutting_down: AtomicBool,
}

/// Why the instance is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Shutdown has begun.
    ShuttingDown,
    /// The store has not been checked yet.
    Unchecked,
    /// The last store check failed.
    Store(Arc<String>),
}

impl Readiness {
    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), NotReady> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(NotReady::ShuttingDown);
        }
        if !self.inner.checked.load(Ordering::SeqCst) {
            return Err(NotReady::Unchecked);
        }
        match self.inner.store_error.load_full() {
            Some(error) => Err(NotReady::Store(error)),
            None => Ok(()),
        }
    }

    /// Marks the instance unready for good and reports NOT_SERVING.
    pub async fn begin_shutdown(&self, health: &HealthReporter) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        for name in HEALTH_NAMES {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    }

    /// Pings the store once, records the outcome and updates gRPC health.
    pub async fn probe(&self, store: &dyn CounterStore, health: &HealthReporter) {
        let error = store.ping().await.err().map(|e| Arc::new(e.to_string()));
        if let Some(error) = &error
            && self.inner.store_error.load().is_none()
        {
            tracing::warn!(%error, backend = store.backend(), "store unreachable; reporting not ready");
        }
        self.inner.store_error.store(error);
        self.inner.checked.store(true, Ordering::SeqCst);
        let status = if self.check().is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in HEALTH_NAMES {
            health.set_service_status(name, status).await;
        }
    }

    /// Probes every `interval` until `stop` resolves.
    pub async fn monitor(
        &self,
        store: Arc<dyn CounterStore>,
        health: HealthReporter,
        interval: Duration,
        stop: impl Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(interval) => {}
            }
            self.probe(store.as_ref(), &health).await;
        }
    }
}
