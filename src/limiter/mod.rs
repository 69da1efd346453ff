//! The engine both APIs share: match, build hits, one store call, decide.
//!
//! [`Limiter::check`] takes a request already validated and translated by the
//! API layer, finds each descriptor's rule (or its request-supplied limit
//! override), drops rules named by another matched rule's `replaces`, builds
//! one storage key per counted descriptor (in the store's [`KeyLayout`]) and
//! hands the whole batch to the store in one call. Descriptors without a limit never reach the store, so a
//! request that matches nothing is answered even when the store is down.
//!
//! Its other jobs live beside it: [`admission`] sheds requests past the cap
//! on those in flight, [`cached`] answers counters known to be over their
//! limit without a store call, and [`degraded`] answers by failure policy
//! when the store fails.

mod admission;
mod cached;
mod degraded;
mod reserve;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::algorithm::{BatchHit, Mode, Outcome, denies};
use crate::clock::{Clock, SystemClock};
use crate::error::Error;
pub use crate::failure_policy::FailurePolicy;
use crate::metrics::{AnswerSource, Metrics};
use crate::overrides::Overrides;
use crate::reservation::Grant;
use crate::rules::matcher::EntryRef;
use crate::rules::{KeyLayout, Limit, Rule, Rules, multi};
use crate::store::{CounterStore, OverLimitCache, StoreError};
use admission::Admission;
pub use admission::DEFAULT_MAX_IN_FLIGHT;
use degraded::Degraded;

/// The decision engine: the current rules and the counter store.
#[derive(Debug, Clone)]
pub struct Limiter {
    /// Swapped whole on reload; readers never lock.
    rules: Arc<ArcSwap<Rules>>,
    store: Arc<dyn CounterStore>,
    /// How the store's keys are built: the store says.
    key_layout: KeyLayout,
    metrics: Metrics,
    /// Answers when the store fails.
    degraded: Degraded,
    /// Known denials, answered without a store call (opt-in).
    over_limit: Option<Arc<OverLimitCache>>,
    /// Requests in flight, and the cap past which more are shed.
    admission: Admission,
    /// Runtime overrides, consulted before the rules (see [`crate::overrides`]).
    overrides: Overrides,
}

/// The rules that apply to one descriptor (see [`Limiter::resolve`]).
#[derive(Debug, Clone)]
pub struct Resolved {
    /// A stored override, else the rules file's rule.
    pub applied: Option<Arc<Rule>>,
    /// The rules file's rule.
    pub configured: Option<Arc<Rule>>,
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

/// Which descriptors of an Envoy request are quota descriptors: over their
/// limit, they deny the request only when every quota descriptor is
/// (envoyproxy/ratelimit's quota mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuotaMode {
    /// Those whose rule sets `quota_mode: true`.
    #[default]
    PerRule,
    /// Every descriptor that is not unlimited, with a rule or without
    /// (`--quota-mode`, upstream's `QUOTA_MODE`).
    Global,
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
        /// Its limit; of a rule with several, the most restrictive one
        /// (see [`multi::fold`]).
        limit: Limit,
        /// What the store decided; of a rule with several limits, their
        /// folded answer.
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

/// A request's hits, with what to answer for each if the store fails.
#[derive(Debug)]
pub(crate) struct Batch<'k> {
    pub hits: Vec<BatchHit<'k>>,
    /// Per hit: the rule's failure policy, else the service's.
    pub policies: Vec<FailurePolicy>,
    pub mode: Mode,
}

// === impl Limiter ===

impl Limiter {
    /// An engine over `rules` and `store`.
    pub fn new(rules: Rules, store: Arc<dyn CounterStore>) -> Self {
        Self {
            rules: Arc::new(ArcSwap::from_pointee(rules)),
            key_layout: store.key_layout(),
            store,
            metrics: Metrics::new(),
            degraded: Degraded::new(FailurePolicy::default(), Arc::new(SystemClock)),
            over_limit: None,
            admission: Admission::new(DEFAULT_MAX_IN_FLIGHT),
            overrides: Overrides::default(),
        }
    }

    /// Consults `overrides` before the rules.
    pub fn with_overrides(mut self, overrides: Overrides) -> Self {
        self.overrides = overrides;
        self
    }

    /// The runtime overrides.
    pub fn overrides(&self) -> &Overrides {
        &self.overrides
    }

    /// Refreshes the overrides from their store (see
    /// [`Overrides::refresh`]); when they changed or a counter was reset
    /// anywhere, the over-limit cache is emptied, since a cached denial may
    /// no longer hold.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the overrides store cannot be read.
    pub async fn refresh_overrides(&self) -> Result<bool, StoreError> {
        let changed = self.overrides.refresh().await.inspect_err(|_| {
            self.metrics.overrides_refresh_error();
        })?;
        if changed {
            self.clear_over_limit_cache();
            self.metrics
                .overrides(self.overrides.current().list().len());
        }
        Ok(changed)
    }

    /// Forgets every known denial (a limit changed or a counter was reset).
    pub fn clear_over_limit_cache(&self) {
        if let Some(cache) = &self.over_limit {
            cache.clear();
        }
    }

    /// The rule that applies to one descriptor without a request-supplied
    /// limit: a stored override, else the rules file's; and the rules
    /// file's own. `None` for an unknown domain.
    pub fn resolve(&self, domain: &str, entries: &[EntryRef<'_>]) -> Option<Resolved> {
        let rules = self.rules.load();
        let tree = rules.domain(domain)?;
        let configured = tree.find(entries).cloned();
        let applied = self
            .overrides
            .current()
            .find(domain, entries)
            .cloned()
            .or_else(|| configured.clone());
        Some(Resolved {
            applied,
            configured,
        })
    }

    /// The layout the store's keys are built in.
    pub fn key_layout(&self) -> &KeyLayout {
        &self.key_layout
    }

    /// Decides at most `max` requests at once; more are refused with
    /// [`Error::Overloaded`].
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.admission = Admission::new(max);
        self
    }

    /// Answers counters known to be over their limit from `cache`.
    pub fn with_over_limit_cache(mut self, cache: OverLimitCache) -> Self {
        self.over_limit = Some(Arc::new(cache));
        self
    }

    /// Records into `metrics` (e.g. with another per-value series cap).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Sets what to answer when the store fails.
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.degraded = self.degraded.with_policy(policy);
        self
    }

    /// Reads time from `clock` for the `local` failure policy's counters
    /// (tests move it by hand).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.degraded = self.degraded.with_clock(clock);
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
        self.clear_over_limit_cache();
    }

    /// Forgets any cached denial of `keys` (their hits were refunded, so a
    /// denial known here may no longer hold).
    pub fn forget_denials<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        if let Some(cache) = &self.over_limit {
            for key in keys {
                cache.forget(key);
            }
        }
    }

    /// The service's failure policy (`--failure-policy`).
    pub fn failure_policy(&self) -> FailurePolicy {
        self.degraded.policy()
    }

    /// The counter store.
    pub fn store(&self) -> &Arc<dyn CounterStore> {
        &self.store
    }

    /// Whether every limit can be answered while the store is down: no
    /// failure policy in force (the service's, which also covers Envoy's
    /// request-supplied limits, or any rule's own) is `error`.
    pub fn answers_without_store(&self) -> bool {
        self.degraded.policy() != FailurePolicy::Error
            && !self
                .rules()
                .all_rules()
                .iter()
                .any(|rule| rule.failure_policy == Some(FailurePolicy::Error))
    }

    /// Decides `request`.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] when the store fails and a failure policy in force
    /// is `error`; nothing is decided then. [`Error::NoConfig`] while no
    /// configuration has loaded.
    pub async fn check(&self, request: &CheckRequest<'_>) -> Result<Decision, Error> {
        Ok(self.decide(request, None).await?.0)
    }

    /// Decides `request`, charging its hits through `reserve` (opening a
    /// reservation) when given, else with [`Limiter::apply`].
    async fn decide(
        &self,
        request: &CheckRequest<'_>,
        reserve: Option<&reserve::Reserve<'_>>,
    ) -> Result<(Decision, Option<Grant>), Error> {
        let _admitted = self.admission.admit()?;
        let rules = self.rules.load_full();
        if !rules.is_loaded() {
            return Err(Error::NoConfig);
        }
        let Some(tree) = rules.domain(request.domain) else {
            let decision = Decision {
                descriptors: vec![DescriptorDecision::NoRule; request.descriptors.len()],
                known_domain: false,
            };
            return Ok((decision, None));
        };

        // Precedence: the request's own limit, a stored override, the rules.
        let overrides = self.overrides.current();
        let mut matched: Vec<Option<Arc<Rule>>> = request
            .descriptors
            .iter()
            .map(|d| match d.limit_override {
                Some(limit) => Some(Arc::new(Rule::from_override(request.domain, limit))),
                None => overrides
                    .find(request.domain, &d.entries)
                    .or_else(|| tree.find(&d.entries))
                    .cloned(),
            })
            .collect();
        drop(overrides);
        drop_replaced(&mut matched);

        // One key per limit of each counted descriptor (a descriptor with
        // several limits has several); the hits borrow them.
        let counted: Vec<(usize, &Rule, Limit, Vec<u8>)> = matched
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| Some((i, rule.as_deref()?)))
            .flat_map(|(i, rule)| {
                rule.limits().enumerate().map(move |(n, limit)| {
                    let entries = &request.descriptors[i].entries;
                    let key =
                        multi::limit_key(&self.key_layout, request.domain, entries, rule, n, limit);
                    (i, rule, *limit, key)
                })
            })
            .collect();
        let batch = Batch {
            hits: counted
                .iter()
                .map(|(i, rule, limit, key)| BatchHit {
                    key,
                    algorithm: limit.algorithm,
                    quota: limit.quota(),
                    hits: request.descriptors[*i].hits,
                    enforced: request.enforcement == Enforcement::AsConfigured && !rule.shadow_mode,
                })
                .collect(),
            policies: counted
                .iter()
                .map(|(_, rule, _, _)| rule.failure_policy.unwrap_or(self.degraded.policy()))
                .collect(),
            mode: request.mode,
        };
        let (outcomes, sources, grant) = match reserve {
            None => {
                let (outcomes, sources) = self.apply(request.domain, &batch).await?;
                (outcomes, sources, None)
            }
            Some(reserve) => reserve.apply(self, request.domain, &batch).await?,
        };

        // The limits of one descriptor are adjacent: fold each run into the
        // descriptor's answer.
        let mut applied: Vec<Option<(Limit, Outcome)>> = vec![None; matched.len()];
        let mut at = 0;
        while at < counted.len() {
            let (i, rule, _, _) = &counted[at];
            let run = counted[at..].iter().take_while(|c| c.0 == *i).count();
            let (picked, outcome) = multi::fold(&outcomes[at..at + run]);
            let limit = counted[at + picked].2;
            if request.mode != Mode::DryRun {
                self.metrics.rule(
                    request.domain,
                    rule,
                    &request.descriptors[*i].entries,
                    request.descriptors[*i].hits,
                    limit.quota().burst,
                    &outcome,
                    sources[at + picked],
                );
            }
            applied[*i] = Some((limit, outcome));
            at += run;
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
        let decision = Decision {
            descriptors,
            known_domain: true,
        };
        Ok((decision, grant))
    }

    /// Applies `batch`: known denials from the over-limit cache, the rest
    /// with one store call. Says where each answer came from.
    async fn apply(
        &self,
        domain: &str,
        batch: &Batch<'_>,
    ) -> Result<(Vec<Outcome>, Vec<AnswerSource>), Error> {
        if batch.hits.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // Upstream's stop-increment semantics need every descriptor judged
        // together, so that mode always asks the store.
        match self
            .over_limit
            .as_deref()
            .filter(|_| batch.mode != Mode::StopIncrementWhenOverLimit)
        {
            Some(cache) => cached::apply(self, cache, domain, batch).await,
            None => {
                let outcomes = self.call_store(batch, None).await?;
                let sources = vec![AnswerSource::Store; outcomes.len()];
                Ok((outcomes, sources))
            }
        }
    }

    /// One store call, with the failure policy applied to its failure and its
    /// denials remembered in the over-limit cache.
    async fn call_store(
        &self,
        batch: &Batch<'_>,
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
                keys = batch.hits.len(),
                error = Empty
            )
        };
        let result = self
            .store
            .apply(&batch.hits, batch.mode)
            .instrument(span.clone())
            .await
            .and_then(|outcomes| {
                if outcomes.len() == batch.hits.len() {
                    Ok(outcomes)
                } else {
                    Err(StoreError::Protocol(format!(
                        "{} outcomes for {} hits",
                        outcomes.len(),
                        batch.hits.len()
                    )))
                }
            });
        if let Err(error) = &result {
            span.record("error", tracing::field::display(error));
        }
        self.metrics.store_call(
            self.store.backend(),
            started.elapsed(),
            result.as_ref().err(),
        );
        match result {
            Ok(outcomes) => {
                if let Some(cache) = cache {
                    cached::remember(cache, &batch.hits, &outcomes);
                }
                Ok(outcomes)
            }
            // Degraded answers are not the store's: never cached.
            Err(error) => self.degraded.answer(batch, error, &self.metrics).await,
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

// === impl DescriptorDecision, Decision ===

impl DescriptorDecision {
    /// Whether this descriptor denies its request: limited, over the limit,
    /// and its rule is not in shadow mode.
    pub fn denies(&self) -> bool {
        match self {
            DescriptorDecision::Limited { rule, outcome, .. } => denies(outcome, !rule.shadow_mode),
            DescriptorDecision::NoRule | DescriptorDecision::Unlimited { .. } => false,
        }
    }
}

impl DescriptorDecision {
    /// Whether this descriptor is a quota descriptor under `quota`. As
    /// upstream, global quota mode takes in descriptors without a rule
    /// (which are never over), but never unlimited ones.
    pub fn is_quota(&self, quota: QuotaMode) -> bool {
        match self {
            DescriptorDecision::Unlimited { .. } => false,
            DescriptorDecision::NoRule => quota == QuotaMode::Global,
            // A concurrency cap is never a quota: it always denies.
            DescriptorDecision::Limited { rule, .. } if rule.concurrency().is_some() => false,
            DescriptorDecision::Limited { rule, .. } => {
                quota == QuotaMode::Global || rule.quota_mode
            }
        }
    }
}

impl Decision {
    /// Whether some descriptor denies the request (global shadow mode aside).
    pub fn over_limit(&self) -> bool {
        self.descriptors.iter().any(DescriptorDecision::denies)
    }

    /// Whether the request is over its limit with quota descriptors, as the
    /// Envoy API judges it: some other descriptor denies, or there are
    /// quota descriptors and every one of them is over its limit.
    pub fn over_limit_with_quotas(&self, quota: QuotaMode) -> bool {
        let (mut quotas, mut quotas_over) = (0usize, 0usize);
        for descriptor in &self.descriptors {
            if descriptor.is_quota(quota) {
                quotas += 1;
                quotas_over += usize::from(descriptor.denies());
            } else if descriptor.denies() {
                return true;
            }
        }
        quotas > 0 && quotas_over == quotas
    }
}

#[cfg(test)]
mod tests;
