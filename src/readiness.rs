//! Readiness: whether this instance should receive traffic, shared by
//! `/readyz` and gRPC health.
//!
//! A monitor pings the store every interval (always with the store's own
//! deadline) and records the outcome, so `/readyz` answers from the last
//! check instead of adding load. Readiness follows what the instance can
//! answer, not only the store:
//!
//! | store | failure policies in force | ready | `/readyz` |
//! |---|---|---|---|
//! | answers | any | yes | `ready` |
//! | answers in part (a cluster master unreachable) | any | yes | `ready (degraded: …)` |
//! | down | none is `error` | yes | `ready (degraded: … answering by failure policy)` |
//! | down | some is `error` | no | `503 not ready` |
//!
//! "In force" means the service's `--failure-policy` (which also covers
//! Envoy's request-supplied limits) and every rule's own. Every instance
//! shares the same store, so making them all unready while a policy could
//! answer would only take the policy away: the gateway would drop them all.
//! Shutdown makes the instance unready for good. With a config gate
//! ([`Readiness::with_config_gate`], upstream's
//! `HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED`), the instance is also unready
//! while the rules in force have no domain, or none has loaded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::limiter::Limiter;

/// How soon an unready instance checks the store again.
const UNREADY_RECHECK: Duration = Duration::from_millis(100);

/// gRPC health service names kept in step with readiness (besides `""`):
/// our services and `ratelimit`, the name envoyproxy/ratelimit reports.
pub const HEALTH_NAMES: [&str; 7] = [
    "",
    "ratelimit",
    "ratekeeper.v1.RateLimiter",
    "envoy.service.ratelimit.v3.RateLimitService",
    "ratekeeper.v1.Leases",
    "envoy.service.rate_limit_quota.v3.RateLimitQuotaService",
    "ratekeeper.v1.ReservationService",
];

/// The readiness state: a cheap-to-clone handle.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    inner: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last check's verdict; `None` before the first.
    last: ArcSwapOption<Checked>,
    shutting_down: AtomicBool,
    /// When set, ready only while these rules have a domain.
    config_gate: Option<Limiter>,
}

/// What the last check found.
#[derive(Debug)]
struct Checked {
    /// Why the store does not answer (fully), if it does not.
    store_problem: Option<String>,
    /// The store is down, not merely degraded.
    store_down: bool,
    /// With the store down, every limit still has a non-`error` policy.
    answers_without_store: bool,
}

/// Why the instance is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Shutdown has begun.
    ShuttingDown,
    /// The store has not been checked yet.
    Unchecked,
    /// The store is down and some limit's failure policy is `error`.
    Store(String),
    /// The config gate is on and the rules in force have no domain (or no
    /// configuration has loaded).
    NoConfig,
}

impl Readiness {
    /// Readiness that also needs `limiter`'s rules to have at least one
    /// domain (upstream's `HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED`): a
    /// reload to a config without domains makes the instance unready, a
    /// refused one changes nothing.
    pub fn with_config_gate(limiter: Limiter) -> Self {
        Self {
            inner: Arc::new(State {
                config_gate: Some(limiter),
                ..State::default()
            }),
        }
    }

    /// `Ok(None)` when ready, `Ok(Some(detail))` when ready but degraded,
    /// else why not.
    pub fn check(&self) -> Result<Option<String>, NotReady> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(NotReady::ShuttingDown);
        }
        if let Some(limiter) = &self.inner.config_gate {
            let rules = limiter.rules();
            if !rules.is_loaded() || rules.domains().next().is_none() {
                return Err(NotReady::NoConfig);
            }
        }
        let Some(last) = self.inner.last.load_full() else {
            return Err(NotReady::Unchecked);
        };
        match (&last.store_problem, last.store_down) {
            (None, _) => Ok(None),
            (Some(problem), true) if !last.answers_without_store => {
                Err(NotReady::Store(problem.clone()))
            }
            (Some(problem), true) => Ok(Some(format!(
                "store down ({problem}); answering by failure policy"
            ))),
            (Some(problem), false) => Ok(Some(problem.clone())),
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
    pub async fn probe(&self, limiter: &Limiter, health: &HealthReporter) {
        let store = limiter.store();
        let (store_problem, store_down) = match store.ping().await {
            Ok(detail) => (detail, false),
            Err(error) => (Some(error.to_string()), true),
        };
        let was_down = self
            .inner
            .last
            .load()
            .as_ref()
            .is_some_and(|l| l.store_down);
        if store_down && !was_down {
            tracing::warn!(
                error = store_problem.as_deref().unwrap_or_default(),
                backend = store.backend(),
                "store unreachable"
            );
        }
        self.inner.last.store(Some(Arc::new(Checked {
            store_problem,
            store_down,
            answers_without_store: limiter.answers_without_store(),
        })));
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
        limiter: Limiter,
        health: HealthReporter,
        interval: Duration,
        stop: impl Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            // While not ready, look again soon: an instance starting next to
            // a far Redis, or one the store just came back to, is ready as
            // soon as the store answers, not an interval later.
            let wait = if self.check().is_ok() {
                interval
            } else {
                interval.min(UNREADY_RECHECK)
            };
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(wait) => {}
            }
            self.probe(&limiter, &health).await;
        }
    }
}
