//! The engine both APIs share: match, build hits, one store call, decide.
//!
//! [`Limiter::check`] takes a request already validated and translated by the
//! API layer, finds each descriptor's rule (or its request-supplied limit
//! override), drops rules named by another matched rule's `replaces`, builds
//! one storage key per counted descriptor and hands the whole batch to the
//! store in one call. Descriptors without a limit never reach the store, so a
//! request that matches nothing is answered even when the store is down.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::clock::SystemClock;
use crate::error::Error;
pub use crate::failure_policy::FailurePolicy;
use crate::metrics::Metrics;
use crate::rules::key::storage_key;
use crate::rules::matcher::EntryRef;
use crate::rules::{Limit, Rule, Rules};
use crate::store::{CounterStore, MemoryStore, OverLimitCache, StoreError};

/// Live counters the `local` failure policy keeps in this process.
const LOCAL_FALLBACK_MAX_KEYS: usize = 100_000;

/// Degraded answers are logged at most this often.
const DEGRADED_LOG_EVERY: Duration = Duration::from_secs(10);

/// The decision engine: the current rules and the counter store.
#[derive(Debug, Clone)]
pub struct Limiter {
    /// Swapped whole on reload; readers never lock.
    rules: Arc<ArcSwap<Rules>>,
    store: Arc<dyn CounterStore>,
    metrics: Metrics,
    policy: FailurePolicy,
    /// Counters for the `local` policy.
    local: MemoryStore,
    /// When a degraded answer was last logged; a std mutex, never held
    /// across an await.
    degraded_logged: Arc<Mutex<Option<Instant>>>,
    /// Known denials, answered without a store call (opt-in).
    over_limit: Option<Arc<OverLimitCache>>,
}

/// A validated request, borrowing its strings from the wire message.
#[derive(Debug, Clone)]
pub struct CheckRequest<'a> {
    /// The domain to look descriptors up in.
    pub domain: &'a str,
    /// The descriptors, in request order.
    pub descriptors: Vec<DescriptorInput<'a>>,
    /// How the hits are committed.
    pub mode: Mode,
    /// Whether rules deny, or everything runs as if in shadow mode.
    pub enforcement: Enforcement,
}

/// Whether over-limit rules deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Enforcement {
    /// Each rule as configured (shadow-mode rules never deny).
    #[default]
    AsConfigured,
    /// Every rule as if in shadow mode (`--shadow-mode`): counted and
    /// reported, never denying.
    ShadowAll,
}

/// One descriptor of a [`CheckRequest`].
#[derive(Debug, Clone)]
pub struct DescriptorInput<'a> {
    /// The entries, in order.
    pub entries: Vec<EntryRef<'a>>,
    /// A limit supplied by the request instead of the configuration.
    pub limit_override: Option<Limit>,
    /// Hits to add (0 only checks).
    pub hits: u64,
}

/// What happened to one descriptor.
#[derive(Debug, Clone, PartialEq)]
pub enum DescriptorDecision {
    /// No rule applies (none matched, the domain is unknown, or the rule was
    /// replaced by another matched rule).
    NoRule,
    /// The rule is unlimited: allowed, not counted.
    Unlimited {
        /// The matched rule.
        rule: Arc<Rule>,
    },
    /// The rule's limit was applied.
    Limited {
        /// The matched rule.
        rule: Arc<Rule>,
        /// Its limit.
        limit: Limit,
        /// What the store decided.
        outcome: Outcome,
    },
}

/// The answer for a whole request: one decision per descriptor.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// In request order.
    pub descriptors: Vec<DescriptorDecision>,
    /// The domain is configured (for metric labels).
    pub known_domain: bool,
}

// === impl Limiter ===

impl Limiter {
    /// An engine over `rules` and `store`.
    pub fn new(rules: Rules, store: Arc<dyn CounterStore>) -> Self {
        Self {
            rules: Arc::new(ArcSwap::from_pointee(rules)),
            store,
            metrics: Metrics::new(),
            policy: FailurePolicy::default(),
            local: MemoryStore::new(LOCAL_FALLBACK_MAX_KEYS, Arc::new(SystemClock)),
            degraded_logged: Arc::default(),
            over_limit: None,
        }
    }

    /// Answers counters known to be over their limit from `cache`.
    pub fn with_over_limit_cache(mut self, cache: OverLimitCache) -> Self {
        self.over_limit = Some(Arc::new(cache));
        self
    }

    /// Sets what to answer when the store fails.
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The metrics this engine records.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The current rules.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    /// Replaces the rules atomically; calls in flight finish with the old ones.
    pub fn replace_rules(&self, rules: Rules) {
        self.rules.store(Arc::new(rules));
        // A changed limit could admit sooner than a cached denial says.
        if let Some(cache) = &self.over_limit {
            cache.clear();
        }
    }

    /// The counter store.
    pub fn store(&self) -> &Arc<dyn CounterStore> {
        &self.store
    }

    /// Decides `request`.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] when the store fails; nothing is decided then.
    pub async fn check(&self, request: &CheckRequest<'_>) -> Result<Decision, Error> {
        let rules = self.rules.load_full();
        let Some(tree) = rules.domain(request.domain) else {
            return Ok(Decision {
                descriptors: vec![DescriptorDecision::NoRule; request.descriptors.len()],
                known_domain: false,
            });
        };

        let mut matched: Vec<Option<Arc<Rule>>> = request
            .descriptors
            .iter()
            .map(|d| match d.limit_override {
                Some(limit) => Some(Arc::new(Rule::from_override(request.domain, limit))),
                None => tree.find(&d.entries).cloned(),
            })
            .collect();
        drop_replaced(&mut matched);

        // One key per counted descriptor; the hits borrow them.
        let counted: Vec<(usize, Limit, Vec<u8>)> = matched
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| {
                let rule = rule.as_ref()?;
                let limit = *rule.limited()?;
                let key = storage_key(
                    request.domain,
                    &request.descriptors[i].entries,
                    rule,
                    limit.algorithm.tag(),
                    limit.window_ms(),
                );
                Some((i, limit, key))
            })
            .collect();
        let hits: Vec<BatchHit<'_>> = counted
            .iter()
            .map(|(i, limit, key)| BatchHit {
                key,
                algorithm: limit.algorithm,
                quota: limit.quota(),
                hits: request.descriptors[*i].hits,
                enforced: request.enforcement == Enforcement::AsConfigured
                    && !matched[*i].as_ref().is_some_and(|r| r.shadow_mode),
                failure_policy: matched[*i]
                    .as_ref()
                    .and_then(|r| r.failure_policy)
                    .unwrap_or(self.policy),
            })
            .collect();
        let outcomes = self.apply(request.domain, &hits, request.mode).await?;
        if outcomes.len() != hits.len() {
            return Err(Error::Internal(format!(
                "store returned {} outcomes for {} hits",
                outcomes.len(),
                hits.len()
            )));
        }

        let mut applied: Vec<Option<(Limit, Outcome)>> = vec![None; matched.len()];
        for ((i, limit, _), outcome) in counted.iter().zip(outcomes) {
            if request.mode != Mode::DryRun
                && let Some(rule) = &matched[*i]
            {
                self.metrics.rule(
                    request.domain,
                    rule,
                    &request.descriptors[*i].entries,
                    request.descriptors[*i].hits,
                    limit.quota().burst,
                    &outcome,
                );
            }
            applied[*i] = Some((*limit, outcome));
        }
        let descriptors = matched
            .into_iter()
            .zip(applied)
            .map(|(rule, applied)| match (rule, applied) {
                (None, _) => DescriptorDecision::NoRule,
                (Some(rule), Some((limit, outcome))) => DescriptorDecision::Limited {
                    rule,
                    limit,
                    outcome,
                },
                (Some(rule), None) => DescriptorDecision::Unlimited { rule },
            })
            .collect();
        Ok(Decision {
            descriptors,
            known_domain: true,
        })
    }
}

impl Limiter {
    /// Applies `hits`, answering known denials from the over-limit cache and
    /// the rest with one store call.
    async fn apply(
        &self,
        domain: &str,
        hits: &[BatchHit<'_>],
        mode: Mode,
    ) -> Result<Vec<Outcome>, Error> {
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        // Upstream's stop-increment semantics need every descriptor judged
        // together, so that mode always asks the store.
        let Some(cache) = self
            .over_limit
            .as_deref()
            .filter(|_| mode != Mode::StopIncrementWhenOverLimit)
        else {
            return self.call_store(hits, mode, None).await;
        };
        let cached: Vec<Option<Outcome>> = hits
            .iter()
            .map(|hit| cache.get(hit.key, hit.hits))
            .collect();
        let from_cache = cached.iter().flatten().count();
        if from_cache == 0 {
            return self.call_store(hits, mode, Some(cache)).await;
        }
        self.metrics
            .over_limit_cache_hits(domain, from_cache as u64);
        let rest: Vec<BatchHit<'_>> = hits
            .iter()
            .zip(&cached)
            .filter(|(_, cached)| cached.is_none())
            .map(|(hit, _)| *hit)
            .collect();
        // A known enforced denial denies an all-or-nothing request: the other
        // descriptors are only judged, not consumed.
        let denied = hits
            .iter()
            .zip(&cached)
            .any(|(hit, cached)| cached.is_some() && hit.enforced);
        let rest_mode = if mode == Mode::AllOrNothing && denied {
            Mode::DryRun
        } else {
            mode
        };
        let mut from_store = if rest.is_empty() {
            Vec::new()
        } else {
            self.call_store(&rest, rest_mode, Some(cache)).await?
        }
        .into_iter();
        cached
            .into_iter()
            .map(|cached| cached.or_else(|| from_store.next()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Internal("store returned too few outcomes".to_owned()))
    }

    /// One store call, with the failure policy applied to its failure and its
    /// denials remembered in the over-limit cache.
    async fn call_store(
        &self,
        hits: &[BatchHit<'_>],
        mode: Mode,
        cache: Option<&OverLimitCache>,
    ) -> Result<Vec<Outcome>, Error> {
        let started = Instant::now();
        // A child of the RPC's span; an RPC without one (unsampled) gets none.
        let span = if tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            tracing::debug_span!(
                "store",
                backend = self.store.backend(),
                keys = hits.len(),
                error = Empty
            )
        };
        let result = self.store.apply(hits, mode).instrument(span.clone()).await;
        if let Err(error) = &result {
            span.record("error", tracing::field::display(error));
        }
        self.metrics
            .store_call(self.store.backend(), started.elapsed(), result.is_ok());
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            // Degraded answers are not the store's: never cached.
            Err(error) => return self.degrade(hits, mode, error).await,
        };
        if let Some(cache) = cache {
            for (hit, outcome) in hits.iter().zip(&outcomes) {
                // A key named twice in one request was judged after its own
                // earlier hits; its denial says nothing about it alone.
                let once = hits.iter().filter(|other| other.key == hit.key).count() == 1;
                if hit.enforced && once {
                    cache.remember(hit.key, hit.hits, outcome);
                }
            }
        }
        Ok(outcomes)
    }

    /// Answers by each hit's failure policy after the store failed with
    /// `error`. One `error` hit fails the whole request: a request has one
    /// answer, and that policy asks for the gateway's.
    async fn degrade(
        &self,
        hits: &[BatchHit<'_>],
        mode: Mode,
        error: StoreError,
    ) -> Result<Vec<Outcome>, Error> {
        if hits
            .iter()
            .any(|h| h.failure_policy == FailurePolicy::Error)
        {
            return Err(error.into());
        }
        let mut used: Vec<FailurePolicy> = hits.iter().map(|h| h.failure_policy).collect();
        used.sort_by_key(|p| p.as_str());
        used.dedup();
        for policy in &used {
            self.metrics.degraded(*policy);
        }
        self.log_degraded(&error, &used);
        // Nothing is known about the counters, so the answer says so: no
        // remaining hits claimed, no retry time promised.
        let mut outcomes: Vec<Outcome> = hits
            .iter()
            .map(|hit| Outcome {
                allowed: hit.failure_policy != FailurePolicy::Deny,
                remaining: 0,
                reset_after_ms: hit.quota.window_ms,
                retry_after_ms: None,
            })
            .collect();
        let local: Vec<BatchHit<'_>> = hits
            .iter()
            .filter(|h| h.failure_policy == FailurePolicy::Local)
            .copied()
            .collect();
        if !local.is_empty() {
            // A request already denied by a `deny` hit takes nothing from
            // the local counters unless each descriptor counts on its own.
            let denied = hits
                .iter()
                .any(|h| h.enforced && h.failure_policy == FailurePolicy::Deny);
            let local_mode = if denied && mode != Mode::Independent {
                Mode::DryRun
            } else {
                mode
            };
            let mut counted = self.local.apply(&local, local_mode).await?.into_iter();
            for (hit, outcome) in hits.iter().zip(&mut outcomes) {
                if hit.failure_policy == FailurePolicy::Local {
                    *outcome = counted.next().ok_or_else(|| {
                        Error::Internal("local store returned too few outcomes".to_owned())
                    })?;
                }
            }
        }
        Ok(outcomes)
    }

    fn log_degraded(&self, error: &StoreError, policies: &[FailurePolicy]) {
        let mut last = self
            .degraded_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() >= DEGRADED_LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(%error, ?policies, "store failing; answering by failure policy");
        }
    }
}

/// Applies `replaces`: every matched rule whose name another matched rule of
/// the same request replaces is treated as no rule (not counted).
fn drop_replaced(matched: &mut [Option<Arc<Rule>>]) {
    if matched.iter().flatten().all(|r| r.replaces.is_empty()) {
        return;
    }
    let replaced: HashSet<String> = matched
        .iter()
        .flatten()
        .flat_map(|r| r.replaces.iter().cloned())
        .collect();
    for slot in matched.iter_mut() {
        if slot
            .as_ref()
            .and_then(|r| r.name.as_ref())
            .is_some_and(|name| replaced.contains(name))
        {
            *slot = None;
        }
    }
}

// === impl Decision ===

impl Decision {
    /// Whether some enforced (non-shadow) descriptor is over its limit.
    pub fn over_limit(&self) -> bool {
        self.descriptors.iter().any(|d| match d {
            DescriptorDecision::Limited { rule, outcome, .. } => {
                !outcome.allowed && !rule.shadow_mode
            }
            _ => false,
        })
    }
}
