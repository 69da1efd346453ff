//! The admin API: overrides (put, get, list, delete), inspecting a counter
//! and resetting it. [`AdminApi`] holds the operations once; [`grpc`] serves
//! them as `ratekeeper.v1.AdminService` on the gRPC port and [`http`] as JSON under
//! `/admin/v1/` on the admin port, both behind [`auth`]. [`client`] is the
//! `ratekeeper admin` command over the HTTP surface.
//!
//! Every write is logged at INFO under the `ratekeeper::audit` target with
//! who (the authenticated peer), what, and the state before and after.

pub mod auth;
pub mod client;
pub mod grpc;
pub mod http;

use serde::{Deserialize, Serialize};

use crate::admin::view;
use crate::algorithm::Mode;
use crate::api::RequestLimits;
use crate::error::Error;
use crate::limiter::{
    CheckRequest, DescriptorDecision, DescriptorInput, Enforcement, Limiter, Resolved,
};
use crate::overrides::{EntrySpec, LimitSpec, Override, Put, compile, id_of};
use crate::rules::matcher::EntryRef;
use crate::rules::{KeyLayout, Rule, multi};
use crate::store::StoreError;

pub use auth::{AdminAuth, Caller};

/// The operations, shared by both surfaces.
#[derive(Debug, Clone)]
pub struct AdminApi {
    limiter: Limiter,
    limits: RequestLimits,
}

/// A domain and one descriptor: what get, delete, inspect and reset name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// A configured domain.
    pub domain: String,
    /// The entries, outermost first (no value: key-only, for overrides).
    pub descriptor: Vec<EntrySpec>,
}

/// A put: the override and its expiry, absolute or relative.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutOverride {
    /// A configured domain.
    pub domain: String,
    /// Exact values or key-only entries.
    pub descriptor: Vec<EntrySpec>,
    /// The limit, as a rules file's `rate_limit`.
    pub rate_limit: LimitSpec,
    /// Expires this many seconds from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
    /// Expires at this Unix time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// An inspect question: a domain, a descriptor and the hits to ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectRequest {
    /// A configured domain.
    pub domain: String,
    /// The request descriptor's entries.
    pub descriptor: Vec<EntrySpec>,
    /// Hits to ask about (0 means 1).
    #[serde(default)]
    pub hits: u64,
}

impl InspectRequest {
    /// The domain and descriptor.
    pub fn target(&self) -> Target {
        Target {
            domain: self.domain.clone(),
            descriptor: self.descriptor.clone(),
        }
    }
}

/// What inspect answers: the rule in force, and the counter as the
/// algorithm reads it, without consuming.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Inspection {
    /// The domain.
    pub domain: String,
    /// `allowed`, `denied`, `no_rule` or `unlimited`: what a request of
    /// `hits` would be answered now.
    pub decision: String,
    /// Whether a stored override decides (else the rules file).
    pub overridden: bool,
    /// The rule in force, as `/rules` shows it.
    pub rule: Option<serde_json::Value>,
    /// The rules file's rule for the descriptor, when an override hides it.
    pub configured_rule: Option<serde_json::Value>,
    /// The hits the question was asked for.
    pub hits: u64,
    /// Hits (token bucket: tokens) used in the current window before now.
    pub used: Option<u64>,
    /// Hits left now (nothing is taken).
    pub remaining: Option<u64>,
    /// Milliseconds until the counter is full again.
    pub reset_after_ms: Option<u64>,
    /// When `hits` would be denied: milliseconds until they would pass.
    pub retry_after_ms: Option<u64>,
}

/// What reset did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResetReport {
    /// Counter keys named by the rule in force and the rules file's rule.
    pub keys: u64,
    /// How many of them existed and were deleted.
    pub deleted: u64,
}

// === impl AdminApi ===

impl AdminApi {
    /// The operations over `limiter`'s rules, overrides and store, refusing
    /// descriptors past `limits`.
    pub fn new(limiter: Limiter, limits: RequestLimits) -> Self {
        Self { limiter, limits }
    }

    /// Stores an override, validated as a rules file's rule.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] naming the field; [`Error::Storage`] when
    /// the overrides store fails. Nothing changes on error.
    pub async fn put(&self, caller: &Caller, request: PutOverride) -> Result<Override, Error> {
        self.check_target(&request.domain, &request.descriptor)?;
        let now = self.limiter.overrides().now_ms();
        let expires_at_ms = match (request.expires_in_seconds, request.expires_at_ms) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "expires_in_seconds",
                    "give expires_in_seconds or expires_at_ms, not both",
                ));
            }
            (Some(0), None) => {
                return Err(Error::invalid("expires_in_seconds", "must be at least 1"));
            }
            (Some(seconds), None) => Some(
                seconds
                    .checked_mul(1_000)
                    .and_then(|ms| ms.checked_add(now))
                    .ok_or_else(|| Error::invalid("expires_in_seconds", "is too large"))?,
            ),
            (None, Some(at)) if at <= now => {
                return Err(Error::invalid("expires_at_ms", "is in the past"));
            }
            (None, at) => at,
        };
        let o = Override {
            domain: request.domain,
            descriptor: request.descriptor,
            rate_limit: request.rate_limit,
            expires_at_ms,
        };
        compile::validate(&o)?;
        let overrides = self.limiter.overrides();
        let (version, before) = match overrides.backend().put(&o, overrides.max(), now).await? {
            Put::Stored(version, before) => (version, before),
            Put::Full => {
                return Err(Error::Full(format!(
                    "{} overrides are stored, the most --max-overrides allows; \
                     delete one or raise it",
                    overrides.max()
                )));
            }
        };
        audit(
            caller,
            "put_override",
            &o.id(),
            before.as_ref(),
            Some(&o),
            version,
        );
        self.limiter.metrics().admin_write("put_override");
        self.apply_locally().await;
        Ok(o)
    }

    /// The stored override for `target`, expired or not.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] for a bad target; [`Error::Storage`].
    pub async fn get(&self, target: &Target) -> Result<Option<Override>, Error> {
        self.check_target(&target.domain, &target.descriptor)?;
        let id = id_of(&target.domain, &target.descriptor);
        Ok(self.list_all().await?.into_iter().find(|o| o.id() == id))
    }

    /// Every stored override that has not expired, by id.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] when the overrides store fails.
    pub async fn list(&self) -> Result<Vec<Override>, Error> {
        let now = self.limiter.overrides().now_ms();
        let mut all = self.list_all().await?;
        all.retain(|o| !o.expired(now));
        Ok(all)
    }

    async fn list_all(&self) -> Result<Vec<Override>, StoreError> {
        let (_, mut all) = self.limiter.overrides().backend().load().await?;
        all.sort_by_key(Override::id);
        Ok(all)
    }

    /// Deletes the override for `target` (its domain may no longer be
    /// configured); what was deleted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] for a malformed target; [`Error::Storage`].
    pub async fn delete(
        &self,
        caller: &Caller,
        target: &Target,
    ) -> Result<Option<Override>, Error> {
        // The domain need not be configured any more: an override left
        // behind by a domain removed from the rules can still be deleted.
        self.check_shape(&target.domain, &target.descriptor)?;
        let id = id_of(&target.domain, &target.descriptor);
        let (version, before) = self.limiter.overrides().backend().delete(&id).await?;
        audit(
            caller,
            "delete_override",
            &id,
            before.as_ref(),
            None,
            version,
        );
        self.limiter.metrics().admin_write("delete_override");
        self.apply_locally().await;
        Ok(before)
    }

    /// What a request of `hits` on `target` would be answered now, and the
    /// counter behind it, without consuming anything.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] for a bad target or an unknown domain;
    /// [`Error::Storage`] when the store fails.
    pub async fn inspect(&self, target: &Target, hits: u64) -> Result<Inspection, Error> {
        let entries = self.check_target(&target.domain, &target.descriptor)?;
        let hits = crate::api::validate::check_cost("hits", hits.max(1))?;
        let configured = self.resolve(&target.domain, &entries)?.configured;
        let request = CheckRequest {
            domain: &target.domain,
            descriptors: vec![DescriptorInput {
                entries: entries.clone(),
                limit_override: None,
                hits,
            }],
            mode: Mode::DryRun,
            enforcement: Enforcement::AsConfigured,
        };
        let decision = self.limiter.check(&request).await?;
        let domain = target.domain.clone();
        let show = |rule: &Rule| serde_json::to_value(view(&domain, rule)).ok();
        let mut inspection = Inspection {
            domain: target.domain.clone(),
            decision: "no_rule".to_owned(),
            overridden: false,
            rule: None,
            configured_rule: None,
            hits,
            used: None,
            remaining: None,
            reset_after_ms: None,
            retry_after_ms: None,
        };
        let applied = decision.descriptors.into_iter().next();
        let rule = match &applied {
            Some(DescriptorDecision::Limited { rule, outcome, .. }) => {
                inspection.decision = if outcome.allowed { "allowed" } else { "denied" }.to_owned();
                inspection.used = Some(outcome.used_before);
                inspection.remaining = Some(outcome.remaining);
                inspection.reset_after_ms = Some(outcome.reset_after_ms);
                inspection.retry_after_ms = outcome.retry_after_ms;
                Some(rule)
            }
            Some(DescriptorDecision::Unlimited { rule }) => {
                inspection.decision = "unlimited".to_owned();
                Some(rule)
            }
            _ => None,
        };
        if let Some(rule) = rule {
            inspection.overridden = is_override(rule);
            inspection.rule = show(rule);
            if inspection.overridden {
                inspection.configured_rule = configured.as_deref().and_then(show);
            }
        }
        Ok(inspection)
    }

    /// Deletes exactly the counters of `target`: the keys of every limit of
    /// the rule in force and of the rules file's rule (they differ when an
    /// override changes the algorithm or window), computed from the rules, never
    /// searched for. Every instance forgets its cached denials: this one now,
    /// the others at their next overrides poll (the version moves).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] for a bad target, an unknown domain, or the
    /// envoy-ratelimit key layout; [`Error::Storage`] when the store fails.
    pub async fn reset(&self, caller: &Caller, target: &Target) -> Result<ResetReport, Error> {
        let entries = self.check_target(&target.domain, &target.descriptor)?;
        if matches!(self.limiter.key_layout(), KeyLayout::EnvoyRatelimit { .. }) {
            return Err(Error::invalid(
                "domain",
                "reset is not supported with --key-layout envoy-ratelimit (its keys carry the window start)",
            ));
        }
        let resolved = self.resolve(&target.domain, &entries)?;
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for rule in [resolved.applied, resolved.configured]
            .into_iter()
            .flatten()
        {
            // Every limit of a rule with several counts in a key of its own.
            for (index, limit) in rule.limits().enumerate() {
                let key = multi::limit_key(
                    self.limiter.key_layout(),
                    &target.domain,
                    &entries,
                    &rule,
                    index,
                    limit,
                );
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        // For the audit line: what the counter held (best effort; a store
        // that fails here fails the delete below too).
        let before = match self.inspect(target, 1).await {
            Ok(seen) => format!(
                "used {} of the rule in force, {} remaining",
                seen.used.unwrap_or(0),
                seen.remaining.unwrap_or(0)
            ),
            Err(error) => format!("unknown ({error})"),
        };
        let deleted = self.limiter.store().delete(&keys).await?;
        self.limiter.metrics().admin_write("reset");
        self.limiter.clear_over_limit_cache();
        let version = self.limiter.overrides().backend().bump().await?;
        let id = id_of(&target.domain, &target.descriptor);
        tracing::info!(
            target: "ratekeeper::audit",
            who = %caller,
            operation = "reset",
            id = %id,
            keys = keys.len(),
            deleted,
            before = %before,
            after = "counters deleted",
            version,
            "admin write"
        );
        Ok(ResetReport {
            keys: keys.len() as u64,
            deleted,
        })
    }

    /// Checks a domain and descriptor as a request's are checked, and that
    /// the domain is configured; borrows the entries for matching.
    fn check_target<'a>(
        &self,
        domain: &str,
        descriptor: &'a [EntrySpec],
    ) -> Result<Vec<EntryRef<'a>>, Error> {
        let entries = self.check_shape(domain, descriptor)?;
        if self.limiter.rules().domain(domain).is_none() {
            return Err(Error::invalid(
                "domain",
                format!("unknown domain '{domain}': no rules file defines it"),
            ));
        }
        Ok(entries)
    }

    /// Checks a domain and descriptor as a request's are checked.
    fn check_shape<'a>(
        &self,
        domain: &str,
        descriptor: &'a [EntrySpec],
    ) -> Result<Vec<EntryRef<'a>>, Error> {
        self.limits.check_domain(domain)?;
        let entries = self
            .limits
            .entries(
                0,
                descriptor
                    .iter()
                    .map(|e| (e.key.as_str(), e.exact_value().unwrap_or_default())),
                1,
            )
            .map_err(|e| match e {
                // Named as the admin request names it.
                Error::InvalidRequest { field, reason } => Error::invalid(
                    field.replacen("descriptors[0].entries", "descriptor", 1),
                    reason,
                ),
                other => other,
            })?;
        Ok(entries)
    }

    fn resolve(&self, domain: &str, entries: &[EntryRef<'_>]) -> Result<Resolved, Error> {
        self.limiter.resolve(domain, entries).ok_or_else(|| {
            Error::invalid(
                "domain",
                format!("unknown domain '{domain}': no rules file defines it"),
            )
        })
    }

    /// Puts a write in force on this instance at once (the others follow at
    /// their next poll). A failure here leaves it to the next poll.
    async fn apply_locally(&self) {
        if let Err(error) = self.limiter.refresh_overrides().await {
            tracing::warn!(%error, "override written, but not reloaded yet");
        }
    }
}

/// Whether `rule` was made from a stored override.
pub fn is_override(rule: &Rule) -> bool {
    &*rule.source == compile::SOURCE
}

/// Logs one admin write.
fn audit(
    caller: &Caller,
    operation: &str,
    id: &str,
    before: Option<&Override>,
    after: Option<&Override>,
    version: u64,
) {
    let json = |o: Option<&Override>| {
        o.and_then(|o| serde_json::to_string(o).ok())
            .unwrap_or_else(|| "null".to_owned())
    };
    tracing::info!(
        target: "ratekeeper::audit",
        who = %caller,
        operation,
        id,
        before = %json(before),
        after = %json(after),
        version,
        "admin write"
    );
}
