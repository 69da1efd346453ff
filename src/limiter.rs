//! The engine both APIs share: match, build hits, one store call, decide.
//!
//! [`Limiter::check`] takes a request already validated and translated by the
//! API layer, finds each descriptor's rule (or its request-supplied limit
//! override), drops rules named by another matched rule's `replaces`, builds
//! one storage key per counted descriptor and hands the whole batch to the
//! store in one call. Descriptors without a limit never reach the store, so a
//! request that matches nothing is answered even when the store is down.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::rules::key::storage_key;
use crate::rules::matcher::EntryRef;
use crate::rules::{Limit, Rule, Rules};
use crate::store::CounterStore;

/// The decision engine: the current rules and the counter store.
#[derive(Debug, Clone)]
pub struct Limiter {
    /// Swapped whole on reload; readers never lock.
    rules: Arc<ArcSwap<Rules>>,
    store: Arc<dyn CounterStore>,
    metrics: Metrics,
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
        }
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
            })
            .collect();
        let outcomes = if hits.is_empty() {
            Vec::new()
        } else {
            let started = Instant::now();
            let result = self.store.apply(&hits, request.mode).await;
            self.metrics
                .store_call(self.store.backend(), started.elapsed(), result.is_ok());
            result?
        };
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
