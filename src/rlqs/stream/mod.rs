//! One RLQS stream: its bound domain, its subscriptions, the demand measured
//! per bucket from the server's own receive times, and what it last sent.
//!
//! A usage report updates demand, then one registry exchange returns every
//! subscriber of the reported buckets; the allocator divides each limit, and
//! an assignment goes out only when this stream's share changed or its TTL
//! needs extending (an identical token bucket keeps Envoy's bucket state).
//! Buckets idle for `abandon_after` reports, refused by a cap, or with a bad
//! id get an `AbandonAction`. Whatever happens, the stream never sends an
//! empty response or an action for a bucket it was not told about.

mod actions;
mod subscription;

use std::collections::HashMap;
use std::sync::Arc;

use self::actions::{abandon, assign, response};
use self::subscription::Subscription;
use super::RlqsSettings;
use super::allocator::{self, Strategy};
use super::bucket::BucketKey;
use super::hub::{BucketView, Hub, Refusal};
use super::registry::{Claim, Registry, Report, Timing};
use super::rules::{RlqsRule, RlqsRules};
use crate::Error;
use crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::BucketAction;
use crate::proto::envoy::service::rate_limit_quota::v3::{
    RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};

/// An assignment this stream means to send, before grown shares are
/// claimed.
#[derive(Debug)]
struct Plan {
    key: BucketKey,
    /// Tokens per fill to grant (lowered to what a claim got).
    granted: u64,
    /// Whether it grows the share held, and must be claimed first.
    claim: bool,
    /// Whether a zero grant means "wait for room" (not "deny").
    wait_if_zero: bool,
    pool: u64,
    burst: u64,
    fill_seconds: u64,
    ttl_seconds: u64,
}

/// One stream's state.
#[derive(Debug)]
pub struct StreamState {
    member: String,
    /// The member id is the client's own (it may reconnect under it): its
    /// registry entries outlive the stream and age out.
    persistent: bool,
    domain: Option<String>,
    /// When the last message arrived.
    last_message_ms: Option<u64>,
    /// The last registry call failed (an outage is logged once, not per call).
    registry_failing: bool,
    /// Refusal reasons already logged on this stream.
    refusals_logged: std::collections::HashSet<Refusal>,
    subscriptions: HashMap<BucketKey, Subscription>,
    settings: RlqsSettings,
    hub: Hub,
    registry: Arc<dyn Registry>,
}

// === impl StreamState ===

impl StreamState {
    /// A new stream known to the registry as `member`; `persistent` when
    /// that id is the client's own and survives the stream.
    pub fn new(
        member: String,
        persistent: bool,
        settings: RlqsSettings,
        hub: Hub,
        registry: Arc<dyn Registry>,
    ) -> Self {
        hub.stream(true);
        Self {
            member,
            persistent,
            domain: None,
            last_message_ms: None,
            registry_failing: false,
            refusals_logged: std::collections::HashSet::new(),
            subscriptions: HashMap::new(),
            settings,
            hub,
            registry,
        }
    }

    /// Handles one usage report received at `now_ms`; returns the response
    /// to send, if any.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] when the domain is missing or changes: the
    /// stream must end.
    pub async fn report(
        &mut self,
        message: RateLimitQuotaUsageReports,
        rules: &RlqsRules,
        now_ms: u64,
    ) -> Result<Option<RateLimitQuotaResponse>, Error> {
        self.last_message_ms = Some(now_ms);
        let domain = match &self.domain {
            None if message.domain.is_empty() => {
                return Err(Error::invalid(
                    "domain",
                    "the first message of a stream must name its domain",
                ));
            }
            None => {
                self.domain = Some(message.domain.clone());
                message.domain.clone()
            }
            Some(bound) if !message.domain.is_empty() && *bound != message.domain => {
                return Err(Error::invalid(
                    "domain",
                    format!(
                        "this stream is bound to domain '{bound}'; open a new stream for domain '{}'",
                        message.domain
                    ),
                ));
            }
            Some(bound) => bound.clone(),
        };
        let mut actions = Vec::new();
        let mut touched = Vec::new();
        for usage in message.bucket_quota_usages {
            let map = usage.bucket_id.map(|id| id.bucket).unwrap_or_default();
            if map.is_empty() {
                // Nothing to answer to: Envoy drops actions for empty ids.
                self.hub.refused(&domain, Refusal::InvalidBucketId);
                continue;
            }
            let key = match BucketKey::new(&map) {
                Ok(key) => key,
                Err(error) => {
                    if self.first_refusal(Refusal::InvalidBucketId) {
                        tracing::warn!(%domain, %error, "rlqs bucket refused (logged once per stream; counted in ratekeeper_rlqs_refused_buckets_total)");
                    }
                    self.hub.refused(&domain, Refusal::InvalidBucketId);
                    actions.push(abandon(map));
                    continue;
                }
            };
            let counts = (usage.num_requests_allowed, usage.num_requests_denied);
            let hint_ms = usage
                .time_elapsed
                .map(|d| {
                    u64::try_from(d.seconds).unwrap_or(0) * 1_000
                        + u64::try_from(d.nanos).unwrap_or(0) / 1_000_000
                })
                .unwrap_or(0);
            if let Some(sub) = self.subscriptions.get_mut(&key) {
                sub.measure(counts, hint_ms, now_ms);
                if sub.idle_reports >= self.settings.abandon_after_idle_reports {
                    actions.push(abandon(key.to_map()));
                    self.drop_subscription(&domain, &key).await;
                    continue;
                }
            } else {
                if self.subscriptions.len() >= self.settings.max_buckets_per_stream {
                    if self.first_refusal(Refusal::StreamCap) {
                        tracing::warn!(%domain, bucket = %key, cap = self.settings.max_buckets_per_stream, "rlqs bucket refused: the stream has the most buckets allowed (--rlqs-max-buckets-per-stream)");
                    }
                    self.hub.refused(&domain, Refusal::StreamCap);
                    actions.push(abandon(key.to_map()));
                    continue;
                }
                if !self
                    .hub
                    .subscribe(&domain, &key, self.settings.max_buckets_per_domain)
                {
                    if self.first_refusal(Refusal::DomainCap) {
                        tracing::warn!(%domain, bucket = %key, cap = self.settings.max_buckets_per_domain, "rlqs bucket refused: the domain has the most buckets allowed (--rlqs-max-buckets-per-domain)");
                    }
                    self.hub.refused(&domain, Refusal::DomainCap);
                    actions.push(abandon(key.to_map()));
                    continue;
                }
                self.subscriptions.insert(
                    key.clone(),
                    Subscription {
                        encoded: key.encode(),
                        measured_ms: now_ms,
                        pending: (0, 0),
                        smoothed: None,
                        in_use: None,
                        allowed_rate: 0.0,
                        idle_reports: 0,
                        sent: None,
                        held: 0.0,
                    },
                );
            }
            if !touched.contains(&key) {
                touched.push(key);
            }
        }
        actions.extend(self.allocate(&domain, &touched, rules, now_ms).await);
        Ok(response(actions))
    }

    /// Whether this is the stream's first refusal for `reason` (each is
    /// logged once per stream: bucket ids come from client headers, and a
    /// flood of bad ones must not flood the log).
    fn first_refusal(&mut self, reason: Refusal) -> bool {
        self.refusals_logged.insert(reason)
    }

    /// Logs a registry failure once per outage.
    fn registry_failed(&mut self, domain: &str, error: &crate::store::StoreError) {
        if !std::mem::replace(&mut self.registry_failing, true) {
            tracing::warn!(%domain, %error, "rlqs registry unavailable; keeping the assignments in force");
        } else {
            tracing::debug!(%domain, %error, "rlqs registry still unavailable");
        }
    }

    /// Whether a limited bucket has had nothing sent yet (it waits for
    /// room the others are giving up).
    pub fn is_waiting(&self) -> bool {
        self.subscriptions.values().any(|sub| sub.sent.is_none())
    }

    /// Whether the client has said nothing for longer than a subscriber may
    /// stay silent (a half-open stream): the stream should end.
    pub fn is_silent(&self, now_ms: u64) -> bool {
        self.last_message_ms
            .is_some_and(|at| now_ms.saturating_sub(at) > self.settings.stale_ms())
    }

    /// Re-reads the registry for every subscription with `rules` (between
    /// reports, and after a reload) and returns whatever changed.
    pub async fn reallocate_all(
        &mut self,
        rules: &RlqsRules,
        now_ms: u64,
    ) -> Option<RateLimitQuotaResponse> {
        let domain = self.domain.clone()?;
        let keys: Vec<BucketKey> = self.subscriptions.keys().cloned().collect();
        response(self.allocate(&domain, &keys, rules, now_ms).await)
    }

    /// Leaves the registry and the hub; call once the stream has ended.
    pub async fn close(mut self) {
        self.hub.stream(false);
        let Some(domain) = self.domain.take() else {
            return;
        };
        let buckets: Vec<String> = self
            .subscriptions
            .values()
            .map(|s| s.encoded.clone())
            .collect();
        for key in self.subscriptions.keys() {
            self.hub.unsubscribe(&domain, key);
        }
        if self.persistent {
            // The client may come back under its id, on any instance, still
            // enforcing what it holds: its entries stay until they age out.
            return;
        }
        if let Err(error) = self.registry.leave(&domain, &self.member, &buckets).await {
            // The entries age out after the stale time anyway.
            tracing::warn!(%domain, %error, "rlqs registry: could not remove a closed stream");
        }
    }

    async fn drop_subscription(&mut self, domain: &str, key: &BucketKey) {
        if let Some(sub) = self.subscriptions.remove(key) {
            self.hub.unsubscribe(domain, key);
            if let Err(error) = self
                .registry
                .leave(domain, &self.member, &[sub.encoded])
                .await
            {
                tracing::warn!(%domain, %error, "rlqs registry: could not remove an abandoned bucket");
            }
        }
    }

    /// Exchanges demand with the registry for `keys` and returns the
    /// assignments to send.
    async fn allocate(
        &mut self,
        domain: &str,
        keys: &[BucketKey],
        rules: &RlqsRules,
        now_ms: u64,
    ) -> Vec<BucketAction> {
        let mut actions = Vec::new();
        let period_ms = self.settings.report_period_ms();
        // Buckets no rule limits are allowed, and kept out of the registry.
        let mut limited: Vec<(BucketKey, Arc<RlqsRule>)> = Vec::new();
        for key in keys {
            match rules.find(domain, key) {
                Some(rule) => limited.push((key.clone(), rule)),
                None => {
                    let ttl_ms = u64::from(super::rules::DEFAULT_TTL_SECONDS) * 1_000;
                    if let Some(sub) = self.subscriptions.get_mut(key)
                        && sub.due(Strategy::AllowAll, ttl_ms, period_ms, now_ms)
                    {
                        sub.sent = Some((Strategy::AllowAll, now_ms));
                        actions.push(assign(key, Strategy::AllowAll, ttl_ms / 1_000));
                    }
                    self.hub.update(domain, key, BucketView::default());
                }
            }
        }
        if limited.is_empty() {
            return actions;
        }
        let reports: Vec<Report> = limited
            .iter()
            .map(|(key, _)| {
                let sub = &self.subscriptions[key];
                Report {
                    bucket: sub.encoded.clone(),
                    demand: sub.in_use,
                    allowed_rate: sub.allowed_rate,
                    // Nothing sent on this stream yet: keep what the
                    // registry has (the same client's previous stream).
                    held: sub.sent.map(|_| sub.held),
                }
            })
            .collect();
        let learning_ms = limited
            .iter()
            .map(|(_, rule)| rule.ttl_seconds * 1_000)
            .max()
            .unwrap_or(0);
        let timing = Timing {
            stale_ms: self.settings.stale_ms(),
            learning_ms,
        };
        let exchange = match self
            .registry
            .exchange(domain, &self.member, &reports, timing)
            .await
        {
            Ok(exchange) => {
                if std::mem::take(&mut self.registry_failing) {
                    tracing::info!(%domain, "rlqs registry answers again");
                }
                exchange
            }
            Err(error) => {
                // Fail static: Envoys keep what they hold until its TTL;
                // extend what was sent, give nothing new.
                self.registry_failed(domain, &error);
                for (key, rule) in &limited {
                    let ttl_ms = rule.ttl_seconds * 1_000;
                    if let Some(sub) = self.subscriptions.get_mut(key)
                        && let Some((strategy, _)) = sub.sent
                        && sub.due(strategy, ttl_ms, period_ms, now_ms)
                    {
                        sub.sent = Some((strategy, now_ms));
                        actions.push(assign(key, strategy, rule.ttl_seconds));
                    }
                }
                return actions;
            }
        };
        let mut plans: Vec<Plan> = Vec::new();
        for ((key, rule), members) in limited.iter().zip(exchange.members) {
            let fill = rule.unit.seconds() as f64;
            let pool = rule.requests_per_unit;
            let demands: Vec<Option<f64>> =
                members.iter().map(|m| m.demand.map(|d| d * fill)).collect();
            let mut targets = allocator::fair_shares(pool, &demands);
            if exchange.learning {
                let cap = allocator::learning_cap(pool, members.len());
                for target in &mut targets {
                    *target = (*target).min(cap);
                }
            }
            let Some(me) = members.iter().position(|m| m.id == self.member) else {
                continue;
            };
            let others_held: f64 = members
                .iter()
                .filter(|m| m.id != self.member)
                .map(|m| m.held)
                .sum();
            let target = targets[me];
            let granted = allocator::grant(target, pool, others_held * fill);
            let Some(sub) = self.subscriptions.get_mut(key) else {
                continue;
            };
            if sub.sent.is_none() {
                // What this client was sent on a previous stream, if any.
                sub.held = members[me].held;
            }
            self.hub.update(
                domain,
                key,
                BucketView {
                    rule: Some(rule.name.clone()),
                    limit_per_second: rule.rate_per_second(),
                    assigned_per_second: others_held + granted as f64 / fill,
                    realised_per_second: members.iter().map(|m| m.allowed_rate).sum(),
                    subscribers: members.len(),
                    local_streams: 0,
                    learning: exchange.learning,
                },
            );
            if granted == 0 && target > 0 && sub.sent.is_none() {
                // No room yet: the others shrink on their next look. The
                // Envoy stays in its no-assignment behaviour meanwhile
                // rather than being denied everything.
                continue;
            }
            plans.push(Plan {
                claim: granted as f64 / fill > sub.held,
                wait_if_zero: target > 0,
                key: key.clone(),
                granted,
                pool,
                burst: rule.burst,
                fill_seconds: rule.unit.seconds(),
                ttl_seconds: rule.ttl_seconds,
            });
        }
        // A grown share is claimed atomically against what the others hold
        // before it is sent, so no two instances hand out the same room.
        let claims: Vec<Claim> = plans
            .iter()
            .filter(|plan| plan.claim)
            .filter_map(|plan| {
                Some(Claim {
                    bucket: self.subscriptions.get(&plan.key)?.encoded.clone(),
                    wanted: plan.granted,
                    pool: plan.pool,
                    fill_seconds: plan.fill_seconds,
                })
            })
            .collect();
        if !claims.is_empty() {
            match self
                .registry
                .hold(domain, &self.member, &claims, timing)
                .await
            {
                Ok(granted) => {
                    let mut granted = granted.into_iter();
                    for plan in plans.iter_mut().filter(|plan| plan.claim) {
                        plan.granted = plan.granted.min(granted.next().unwrap_or(0));
                    }
                }
                Err(error) => {
                    self.registry_failed(domain, &error);
                    plans.retain(|plan| !plan.claim);
                }
            }
        }
        for plan in plans {
            let Some(sub) = self.subscriptions.get_mut(&plan.key) else {
                continue;
            };
            if plan.granted == 0 && plan.wait_if_zero && sub.sent.is_none() {
                continue;
            }
            let strategy =
                allocator::encode(plan.granted, plan.pool, plan.burst, plan.fill_seconds);
            if sub.due(strategy, plan.ttl_seconds * 1_000, period_ms, now_ms) {
                sub.sent = Some((strategy, now_ms));
                sub.held = plan.granted as f64 / plan.fill_seconds as f64;
                actions.push(assign(&plan.key, strategy, plan.ttl_seconds));
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests;
