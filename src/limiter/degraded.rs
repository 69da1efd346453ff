//! Answers when the store fails: each counted descriptor by its failure
//! policy (`error`, `allow`, `deny`, or `local` counting in this process).
//!
//! One `error` descriptor fails the whole request: a request has one answer,
//! and that policy asks for the gateway's. Otherwise nothing is known about
//! the shared counters, so allowed and denied answers claim no remaining
//! hits and promise no retry time; `local` descriptors are counted in this
//! instance's memory with the same rules and algorithms. A failure that is
//! not the store's (a reply this request could not use) is a bug: it is
//! logged as an error and answered the same way, for this request alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Batch;
use crate::algorithm::{BatchHit, Mode, Outcome, denies};
use crate::clock::Clock;
use crate::error::Error;
use crate::failure_policy::FailurePolicy;
use crate::metrics::Metrics;
use crate::store::{CounterStore, MemoryStore, StoreError};

/// Live counters the `local` failure policy keeps in this process.
const LOCAL_MAX_KEYS: usize = 100_000;

/// Degraded answers are logged at most this often.
const LOG_EVERY_MS: u64 = 10_000;

/// The failure policy in force and what it needs.
#[derive(Debug, Clone)]
pub(super) struct Degraded {
    policy: FailurePolicy,
    /// Counters for the `local` policy.
    local: MemoryStore,
    clock: Arc<dyn Clock>,
    /// When a degraded answer may next be logged (clock ms).
    next_log_ms: Arc<AtomicU64>,
}

impl Degraded {
    pub(super) fn new(policy: FailurePolicy, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy,
            local: MemoryStore::new(LOCAL_MAX_KEYS, clock.clone()),
            clock,
            next_log_ms: Arc::default(),
        }
    }

    pub(super) fn with_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    pub(super) fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        Self::new(self.policy, clock)
    }

    /// The service's policy, for rules without their own.
    pub(super) fn policy(&self) -> FailurePolicy {
        self.policy
    }

    /// Answers `batch` by its policies after the store failed with `error`.
    pub(super) async fn answer(
        &self,
        batch: &Batch<'_>,
        error: StoreError,
        metrics: &Metrics,
    ) -> Result<Vec<Outcome>, Error> {
        let mut used = batch.policies.clone();
        used.sort_by_key(|p| p.as_str());
        used.dedup();
        self.log(&error, &used);
        if used.contains(&FailurePolicy::Error) {
            return Err(error.into());
        }
        for policy in &used {
            metrics.degraded(*policy);
        }
        let mut outcomes = by_policy(batch);
        let local: Vec<BatchHit<'_>> = batch
            .hits
            .iter()
            .zip(&batch.policies)
            .filter(|(_, policy)| **policy == FailurePolicy::Local)
            .map(|(hit, _)| *hit)
            .collect();
        if local.is_empty() {
            return Ok(outcomes);
        }
        let mut counted = self
            .local
            .apply(&local, local_mode(batch, &outcomes))
            .await?
            .into_iter();
        for (outcome, policy) in outcomes.iter_mut().zip(&batch.policies) {
            if *policy == FailurePolicy::Local {
                *outcome = counted.next().ok_or_else(|| {
                    Error::Internal("local store returned too few outcomes".to_owned())
                })?;
            }
        }
        Ok(outcomes)
    }

    fn log(&self, error: &StoreError, policies: &[FailurePolicy]) {
        let now = self.clock.now_ms();
        let due = self.next_log_ms.load(Ordering::Relaxed);
        if now < due
            || self
                .next_log_ms
                .compare_exchange(
                    due,
                    now + LOG_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        if error.is_store_failure() {
            tracing::warn!(%error, ?policies, "store failing; answering by failure policy");
        } else {
            tracing::error!(%error, ?policies, "a store reply this request could not use (a bug); answered by failure policy");
        }
    }
}

/// The answers of `allow` and `deny` hits (`local` ones are filled in by
/// counting): nothing is known about the counters, so no remaining hits are
/// claimed and no retry time is promised.
fn by_policy(batch: &Batch<'_>) -> Vec<Outcome> {
    batch
        .hits
        .iter()
        .zip(&batch.policies)
        .map(|(hit, policy)| {
            let allowed = *policy != FailurePolicy::Deny;
            Outcome {
                allowed,
                remaining: 0,
                reset_after_ms: hit.quota.window_ms,
                retry_after_ms: None,
                // Nothing is known: a denial counts as all over the limit.
                used_before: if allowed { 0 } else { hit.quota.burst },
            }
        })
        .collect()
}

/// How the `local` hits are counted: a request already denied by a `deny`
/// hit takes nothing from them unless each descriptor counts on its own.
fn local_mode(batch: &Batch<'_>, answers: &[Outcome]) -> Mode {
    let denied =
        batch
            .hits
            .iter()
            .zip(&batch.policies)
            .zip(answers)
            .any(|((hit, policy), answer)| {
                *policy == FailurePolicy::Deny && denies(answer, hit.enforced)
            });
    if denied && batch.mode != Mode::Independent {
        Mode::DryRun
    } else {
        batch.mode
    }
}
