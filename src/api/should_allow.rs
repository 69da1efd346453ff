//! `ratekeeper.v1.RateLimiter/ShouldAllow`: all-or-nothing decisions for
//! services calling with a client generated from our proto.

use tonic::{Request, Response, Status};
use tracing::Instrument as _;
use tracing::field::Empty;

use super::validate::check_cost;
use super::{Answered, RequestLimits, ShadowMode, duration_from_ms, finish, trace_context};
use crate::algorithm::{AlgorithmKind, Mode};
use crate::error::Error;
use crate::limiter::{
    CheckRequest, Decision, DescriptorDecision, DescriptorInput, Enforcement, Limiter,
};
use crate::metrics::Surface;
use crate::proto::ratekeeper::v1 as pb;
use crate::reservation::service::requested_ttl;

/// The `RateLimiter` gRPC service.
#[derive(Debug, Clone)]
pub struct ShouldAllowService {
    limiter: Limiter,
    limits: RequestLimits,
    shadow: ShadowMode,
}

// === impl ShouldAllowService ===

impl ShouldAllowService {
    /// A service deciding with `limiter`, refusing requests beyond `limits`.
    pub fn new(limiter: Limiter, limits: RequestLimits, shadow: ShadowMode) -> Self {
        Self {
            limiter,
            limits,
            shadow,
        }
    }

    fn translate<'a>(
        &self,
        request: &'a pb::ShouldAllowRequest,
    ) -> Result<CheckRequest<'a>, Error> {
        self.limits.check_domain(&request.domain)?;
        self.limits
            .check_descriptor_count(request.descriptors.len())?;
        let hits = check_cost("cost", request.cost.max(1))?;
        let descriptors = request
            .descriptors
            .iter()
            .enumerate()
            .map(|(d, descriptor)| {
                let entries = self.limits.entries(
                    d,
                    descriptor
                        .entries
                        .iter()
                        .map(|e| (e.key.as_str(), e.value.as_str())),
                    1,
                )?;
                Ok(DescriptorInput {
                    entries,
                    limit_override: None,
                    hits,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(CheckRequest {
            domain: &request.domain,
            descriptors,
            mode: if request.dry_run {
                Mode::DryRun
            } else {
                Mode::AllOrNothing
            },
            // In global shadow mode nothing denies, so an over-limit request
            // is counted like any other.
            enforcement: match self.shadow {
                ShadowMode::Off => Enforcement::AsConfigured,
                ShadowMode::Global => Enforcement::ShadowAll,
            },
        })
    }
}

#[tonic::async_trait]
impl pb::rate_limiter_server::RateLimiter for ShouldAllowService {
    async fn should_allow(
        &self,
        request: Request<pb::ShouldAllowRequest>,
    ) -> Result<Response<pb::ShouldAllowResponse>, Status> {
        let span = trace_context::rpc_span(request.metadata(), || {
            tracing::debug_span!(
                "ShouldAllow",
                domain = %request.get_ref().domain,
                allowed = Empty,
                trace_id = Empty,
            )
        });
        self.decide(request.get_ref()).instrument(span).await
    }
}

impl ShouldAllowService {
    async fn decide(
        &self,
        request: &pb::ShouldAllowRequest,
    ) -> Result<Response<pb::ShouldAllowResponse>, Status> {
        let mut grant = None;
        let result = match self.translate(request) {
            Ok(check) => match requested_ttl(request) {
                Ok(None) => self.limiter.check(&check).await,
                Ok(Some(ttl_ms)) => self
                    .limiter
                    .reserve(&check, request.cost.max(1), ttl_ms)
                    .await
                    .map(|(decision, reserved)| {
                        grant = reserved;
                        decision
                    }),
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        let answered = finish(
            &self.limiter,
            Surface::ShouldAllow,
            &request.domain,
            self.shadow,
            result,
            // Quota mode is the Envoy API's: here every rule is a hard limit.
            Decision::over_limit,
        )?;
        let mut response = to_response(&answered);
        if let Some(grant) = grant {
            response.reservation_id = grant.id;
            response.reservation_ttl = Some(duration_from_ms(grant.ttl_ms));
        }
        tracing::Span::current().record("allowed", response.allowed);
        Ok(Response::new(response))
    }
}

fn to_response(answered: &Answered) -> pb::ShouldAllowResponse {
    let decision = &answered.decision;
    let allowed = !answered.denied();
    let results: Vec<pb::DescriptorResult> = decision.descriptors.iter().map(to_result).collect();
    // A caller retries the whole request, so it must wait for the slowest
    // enforced denial; if any of those can never pass, no wait helps.
    let retry_after = if allowed {
        None
    } else {
        decision
            .descriptors
            .iter()
            .filter(|d| d.denies())
            .filter_map(|d| match d {
                DescriptorDecision::Limited { outcome, .. } => Some(outcome.retry_after_ms),
                _ => None,
            })
            .try_fold(0, |longest, retry| retry.map(|ms| longest.max(ms)))
            .map(duration_from_ms)
    };
    pb::ShouldAllowResponse {
        allowed,
        results,
        retry_after,
        ..Default::default()
    }
}

fn to_result(decision: &DescriptorDecision) -> pb::DescriptorResult {
    match decision {
        DescriptorDecision::NoRule => pb::DescriptorResult {
            decision: pb::Decision::NoRule.into(),
            ..Default::default()
        },
        DescriptorDecision::Unlimited { rule } => pb::DescriptorResult {
            decision: pb::Decision::Allowed.into(),
            rule_name: rule.name.clone().unwrap_or_default(),
            // A concurrency rule is held through the Leases API, not
            // counted here: allowed, but not unlimited.
            unlimited: rule.concurrency().is_none(),
            shadow_mode: rule.shadow_mode,
            ..Default::default()
        },
        DescriptorDecision::Limited {
            rule,
            limit,
            outcome,
        } => pb::DescriptorResult {
            decision: if outcome.allowed {
                pb::Decision::Allowed
            } else {
                pb::Decision::Denied
            }
            .into(),
            rule_name: rule.name.clone().unwrap_or_default(),
            limit: limit.requests_per_unit,
            remaining: outcome.remaining,
            reset_after: Some(duration_from_ms(outcome.reset_after_ms)),
            retry_after: outcome.retry_after_ms.map(duration_from_ms),
            unlimited: false,
            shadow_mode: rule.shadow_mode,
            window: Some(duration_from_ms(limit.window_ms())),
            algorithm: match limit.algorithm {
                AlgorithmKind::FixedWindow => pb::Algorithm::FixedWindow,
                AlgorithmKind::SlidingWindow => pb::Algorithm::SlidingWindow,
                AlgorithmKind::TokenBucket => pb::Algorithm::TokenBucket,
            }
            .into(),
            burst: limit.quota().burst,
        },
    }
}
