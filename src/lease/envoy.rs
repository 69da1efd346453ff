//! Concurrency rules and negative hits on Envoy's RLS path, which has no
//! lease ids.
//!
//! Envoy (1.38+) can send a request's descriptors twice: when the request
//! starts (positive hits) and, from a rate limit policy with
//! `apply_on_stream_done`, when its stream ends, with `is_negative_hits`.
//! For a concurrency rule, a positive hit takes anonymous slots (expiring
//! after the rule's `lease_ttl`, so slots leaked by a crashed Envoy or a lost
//! call come back) and a negative hit frees the soonest-expiring ones,
//! floored at zero. Envoy's filter sends the stream-done call from
//! `onDestroy` whether or not the request was admitted (envoyproxy/envoy
//! PR #37548), so a refused positive hit records a debt that the refused
//! request's own negative hit cancels, instead of freeing a slot held by
//! another request.
//!
//! Negative hits answer OK and are never counted as positive hits. On a
//! counting rule they are refunds: every limit of the rule takes the hits
//! back, never below zero ([`crate::algorithm::refund`]), in one store call
//! (not in the envoy-ratelimit key layout, and not for a descriptor that
//! carries a limit override).

use std::collections::HashMap;
use std::sync::Arc;

use super::table::{Code, Op};
use super::{LeaseEngine, LeaseKey, lease_key, metrics};
use crate::algorithm::{BatchHit, Outcome};
use crate::api::RequestLimits;
use crate::api::validate::check_cost;
use crate::error::Error;
use crate::failure_policy::FailurePolicy;
use crate::limiter::{Decision, DescriptorDecision};
use crate::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use crate::rules::{Limit, Rule, Unit, multi};

/// Whether descriptor `d` of `request` is a negative hit.
pub fn is_negative(request: &RateLimitRequest, d: usize) -> bool {
    request.descriptors[d].is_negative_hits
}

/// Completes `decision` (the limiter's, for the request's positive
/// descriptors in order) into the answer for every descriptor of `request`:
/// negative descriptors answer OK (freeing slots of concurrency rules), and
/// positive descriptors of concurrency rules take slots.
///
/// # Errors
///
/// [`Error`] for a malformed negative descriptor, or when the lease store
/// failed and the failure policy does not answer.
pub async fn complete(
    engine: &LeaseEngine,
    limits: &RequestLimits,
    request: &RateLimitRequest,
    decision: Decision,
) -> Result<Decision, Error> {
    let any_negative = request.descriptors.iter().any(|d| d.is_negative_hits);
    let any_concurrency = decision.descriptors.iter().any(
        |d| matches!(d, DescriptorDecision::Unlimited { rule } if rule.concurrency().is_some()),
    );
    if !any_negative && !any_concurrency {
        return Ok(decision);
    }
    let domain = request.domain.as_str();
    let mut positive = decision.descriptors.into_iter();
    // Per descriptor: its decision, or the rule and hits of a concurrency
    // descriptor still to be applied (positive: take, negative: free).
    let mut answers: Vec<DescriptorDecision> = Vec::with_capacity(request.descriptors.len());
    let mut takes: HashMap<u64, Group> = HashMap::new();
    let mut frees: HashMap<u64, Group> = HashMap::new();
    let rules = engine.limiter().rules();
    let layout = engine.limiter().store().key_layout();
    let mut refunds: Vec<(Vec<u8>, Limit, u64)> = Vec::new();
    for (d, descriptor) in request.descriptors.iter().enumerate() {
        let hits = match descriptor.hits_addend {
            Some(hits) => check_cost(&format!("descriptors[{d}].hits_addend"), hits)?,
            None => u64::from(request.hits_addend.max(1)),
        };
        let entries = limits.entries(
            d,
            descriptor
                .entries
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str())),
            0,
        )?;
        let rule = if descriptor.is_negative_hits {
            answers.push(DescriptorDecision::NoRule);
            let found = rules
                .domain(domain)
                .and_then(|tree| tree.find(&entries))
                .filter(|_| descriptor.limit.is_none());
            if let Some(rule) = found.filter(|rule| rule.concurrency().is_none()) {
                // A counting rule: its hits are taken back from every limit.
                for (n, limit) in rule.limits().enumerate() {
                    let key = multi::limit_key(&layout, domain, &entries, rule, n, limit);
                    refunds.push((key, *limit, hits));
                }
            }
            found.filter(|rule| rule.concurrency().is_some()).cloned()
        } else {
            let decided = positive.next().unwrap_or(DescriptorDecision::NoRule);
            let rule = match &decided {
                DescriptorDecision::Unlimited { rule } if rule.concurrency().is_some() => {
                    Some(rule.clone())
                }
                _ => None,
            };
            answers.push(decided);
            rule
        };
        let Some(rule) = rule else { continue };
        let Some(key) = lease_key(domain, &entries, &rule) else {
            continue;
        };
        let groups = if descriptor.is_negative_hits {
            &mut frees
        } else {
            &mut takes
        };
        groups.entry(hits).or_default().add(d, key, rule);
    }
    refund(engine, &refunds).await?;
    for (n, group) in frees {
        let reply = engine.apply(&group.keys, &Op::Free { n }).await?;
        record(engine, domain, &group, &reply);
    }
    for (n, group) in takes {
        let ttl_ms = group
            .keys
            .iter()
            .map(|k| k.limit.lease_ttl_ms)
            .min()
            .unwrap_or(0);
        let reply = engine.apply(&group.keys, &Op::Take { n, ttl_ms }).await?;
        record(engine, domain, &group, &reply);
        for (d, k) in group.descriptors {
            let limit = group.keys[k].limit;
            let in_use = reply.keys[k].in_use;
            answers[d] = DescriptorDecision::Limited {
                rule: group.rules[k].clone(),
                limit: Limit::fixed(limit.max_in_flight, Unit::Second),
                outcome: Outcome {
                    allowed: reply.code == Code::Granted,
                    remaining: limit.max_in_flight.saturating_sub(in_use),
                    reset_after_ms: limit.lease_ttl_ms,
                    retry_after_ms: reply.retry_after_ms.filter(|_| reply.code != Code::Granted),
                    used_before: in_use,
                },
            };
        }
    }
    Ok(Decision {
        descriptors: answers,
        known_domain: decision.known_domain,
    })
}

/// Takes `refunds` (key, limit, hits) back from their counters in one store
/// call. A failed refund fails the request only under the `error` policy;
/// otherwise it is dropped (the counters stay high: the safe side).
async fn refund(engine: &LeaseEngine, refunds: &[(Vec<u8>, Limit, u64)]) -> Result<(), Error> {
    if refunds.is_empty() {
        return Ok(());
    }
    let hits: Vec<BatchHit<'_>> = refunds
        .iter()
        .map(|(key, limit, hits)| BatchHit {
            key,
            algorithm: limit.algorithm,
            quota: limit.quota(),
            hits: *hits,
            enforced: true,
        })
        .collect();
    let limiter = engine.limiter();
    match limiter.store().refund(&hits).await {
        Ok(()) => {
            limiter.forget_denials(hits.iter().map(|hit| hit.key));
            Ok(())
        }
        Err(error) if limiter.failure_policy() == FailurePolicy::Error => {
            Err(Error::Storage(error))
        }
        Err(error) => {
            tracing::debug!(%error, "refund dropped: the store failed");
            limiter.metrics().degraded(limiter.failure_policy());
            Ok(())
        }
    }
}

/// Concurrency descriptors sharing one hit count: one store call.
#[derive(Default)]
struct Group {
    /// Distinct keys.
    keys: Vec<LeaseKey>,
    /// Their rules.
    rules: Vec<Arc<Rule>>,
    /// (descriptor index, key index).
    descriptors: Vec<(usize, usize)>,
}

impl Group {
    fn add(&mut self, d: usize, key: LeaseKey, rule: Arc<Rule>) {
        let k = match self.keys.iter().position(|k| k.key == key.key) {
            Some(k) => k,
            None => {
                self.keys.push(key);
                self.rules.push(rule);
                self.keys.len() - 1
            }
        };
        self.descriptors.push((d, k));
    }
}

fn record(engine: &LeaseEngine, domain: &str, group: &Group, reply: &super::Reply) {
    let rules: Vec<&Rule> = group.rules.iter().map(|r| r.as_ref()).collect();
    metrics::record(engine.limiter().metrics(), "envoy", domain, &rules, reply);
}
