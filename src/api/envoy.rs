//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, answering
//! exactly as envoyproxy/ratelimit does (same statuses, remaining counts and
//! reset durations), over the shared engine.
//!
//! Quota mode ([`QuotaMode`]) judges the overall code, the opt-in headers
//! ([`HeaderSettings`]) and dynamic metadata ([`DynamicMetadata`]) are added
//! to the answer, each as upstream does.
//!
//! Differences, all deliberate: bad input is `INVALID_ARGUMENT` and a store
//! failure `UNAVAILABLE` (upstream answers `UNKNOWN` for both); a limit
//! override with unit `UNKNOWN` is refused instead of crashing the process.

use tonic::{Request, Response, Status};
use tracing::Instrument as _;
use tracing::field::Empty;

use super::dynamic_metadata::{self, DynamicMetadata};
use super::headers::HeaderSettings;
use super::validate::check_cost;
use super::{Answered, RequestLimits, ShadowMode, ceil_seconds, finish, trace_context};
use crate::algorithm::Mode;
use crate::error::Error;
use crate::lease::LeaseEngine;
use crate::lease::envoy as lease_envoy;
use crate::limiter::{
    CheckRequest, DescriptorDecision, DescriptorInput, Enforcement, Limiter, QuotaMode,
};
use crate::metrics::Surface;
use crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit, rate_limit::Unit as ResponseUnit,
};
use crate::proto::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse, rate_limit_service_server,
};
use crate::proto::envoy::r#type::v3::RateLimitUnit;
use crate::rules::{Limit, MAX_REQUESTS_PER_UNIT, Unit};

/// `limit_remaining` of an unlimited descriptor, as upstream reports it.
const UNLIMITED_REMAINING: u32 = u32::MAX;

/// The Envoy `RateLimitService` gRPC service.
#[derive(Debug, Clone)]
pub struct EnvoyService {
    limiter: Limiter,
    limits: RequestLimits,
    counting: EnvoyCounting,
    shadow: ShadowMode,
    headers: HeaderSettings,
    quota: QuotaMode,
    metadata: DynamicMetadata,
    /// Concurrency rules' slots and negative hits.
    leases: LeaseEngine,
}

/// Which hits of an Envoy request are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EnvoyCounting {
    /// Every matched descriptor counts, over limit or not (upstream's default).
    #[default]
    EveryHit,
    /// When any descriptor is over its limit, only the over-limit ones count
    /// (upstream's `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT=true`), so a
    /// rejected request does not use up its other limits. Decided in the same
    /// atomic step, unlike upstream's separate read.
    StopWhenOverLimit,
}

// === impl EnvoyService ===

impl EnvoyService {
    /// A service deciding with `limiter`, refusing requests beyond `limits`,
    /// counting as `counting` says.
    pub fn new(
        limiter: Limiter,
        limits: RequestLimits,
        counting: EnvoyCounting,
        shadow: ShadowMode,
    ) -> Self {
        Self {
            leases: LeaseEngine::new(limiter.clone()),
            limiter,
            limits,
            counting,
            shadow,
            headers: HeaderSettings::default(),
            quota: QuotaMode::default(),
            metadata: DynamicMetadata::default(),
        }
    }

    /// Adds rate limit headers to every answer (`--response-headers`,
    /// `--draft-rate-limit-headers`).
    pub fn with_headers(mut self, headers: HeaderSettings) -> Self {
        self.headers = headers;
        self
    }

    /// Sets which descriptors are quota descriptors (`--quota-mode`).
    pub fn with_quota_mode(mut self, quota: QuotaMode) -> Self {
        self.quota = quota;
        self
    }

    /// Adds dynamic metadata to every answer (`--response-dynamic-metadata`).
    pub fn with_dynamic_metadata(mut self, metadata: DynamicMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    fn translate<'a>(&self, request: &'a RateLimitRequest) -> Result<CheckRequest<'a>, Error> {
        self.limits.check_domain(&request.domain)?;
        self.limits
            .check_descriptor_count(request.descriptors.len())?;
        let request_hits = u64::from(request.hits_addend.max(1));
        // Negative hits are never counted as hits; lease::envoy answers them.
        let descriptors = request
            .descriptors
            .iter()
            .enumerate()
            .filter(|(d, _)| !lease_envoy::is_negative(request, *d))
            .map(|(d, descriptor)| {
                // Upstream accepts a descriptor without entries (it matches
                // nothing unless it carries a limit override).
                let entries = self.limits.entries(
                    d,
                    descriptor
                        .entries
                        .iter()
                        .map(|e| (e.key.as_str(), e.value.as_str())),
                    0,
                )?;
                // A per-descriptor addend, when present, wins, including 0
                // (check only); otherwise the request's, where 0 means 1.
                let hits = match descriptor.hits_addend {
                    Some(hits) => check_cost(&format!("descriptors[{d}].hits_addend"), hits)?,
                    None => request_hits,
                };
                let limit_override = descriptor
                    .limit
                    .as_ref()
                    .map(|limit| override_limit(d, limit))
                    .transpose()?;
                Ok(DescriptorInput {
                    entries,
                    limit_override,
                    hits,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(CheckRequest {
            domain: &request.domain,
            descriptors,
            mode: match self.counting {
                EnvoyCounting::EveryHit => Mode::Independent,
                EnvoyCounting::StopWhenOverLimit => Mode::StopIncrementWhenOverLimit,
            },
            // Every descriptor counts on this surface whatever enforces.
            enforcement: Enforcement::AsConfigured,
        })
    }
}

#[tonic::async_trait]
impl rate_limit_service_server::RateLimitService for EnvoyService {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let span = trace_context::rpc_span(request.metadata(), || {
            tracing::debug_span!(
                "ShouldRateLimit",
                domain = %request.get_ref().domain,
                overall_code = Empty,
                trace_id = Empty,
            )
        });
        self.decide(request.get_ref()).instrument(span).await
    }
}

impl EnvoyService {
    async fn decide(
        &self,
        request: &RateLimitRequest,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let result = match self.translate(request) {
            Ok(check) => match self.limiter.check(&check).await {
                Ok(decision) => {
                    lease_envoy::complete(&self.leases, &self.limits, request, decision).await
                }
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        let quota = self.quota;
        let answered = finish(
            &self.limiter,
            Surface::Envoy,
            &request.domain,
            self.shadow,
            result,
            |decision| decision.over_limit_with_quotas(quota),
        )?;
        let mut response = to_response(&answered);
        response.response_headers_to_add = self.headers.for_decision(
            &answered.decision.descriptors,
            quota,
            response.overall_code() == Code::OverLimit,
        );
        if self.metadata == DynamicMetadata::On {
            response.dynamic_metadata = Some(dynamic_metadata::build(request, &answered.decision));
        }
        tracing::Span::current().record("overall_code", response.overall_code().as_str_name());
        Ok(Response::new(response))
    }
}

fn override_limit(index: usize, limit: &RateLimitOverride) -> Result<Limit, Error> {
    let unit = match RateLimitUnit::try_from(limit.unit) {
        Ok(RateLimitUnit::Second) => Unit::Second,
        Ok(RateLimitUnit::Minute) => Unit::Minute,
        Ok(RateLimitUnit::Hour) => Unit::Hour,
        Ok(RateLimitUnit::Day) => Unit::Day,
        Ok(RateLimitUnit::Month) => Unit::Month,
        Ok(RateLimitUnit::Year) => Unit::Year,
        Ok(RateLimitUnit::Unknown) | Err(_) => {
            return Err(Error::invalid(
                format!("descriptors[{index}].limit.unit"),
                format!("unit {} is not a known rate limit unit", limit.unit),
            ));
        }
    };
    Ok(Limit::fixed(
        u64::from(limit.requests_per_unit).min(MAX_REQUESTS_PER_UNIT),
        unit,
    ))
}

fn to_response(answered: &Answered) -> RateLimitResponse {
    let statuses: Vec<DescriptorStatus> = answered
        .decision
        .descriptors
        .iter()
        .map(to_status)
        .collect();
    // Global shadow mode and quota mode leave the statuses as they are and
    // only judge the overall code, as upstream does.
    RateLimitResponse {
        overall_code: if answered.denied() {
            Code::OverLimit
        } else {
            Code::Ok
        }
        .into(),
        statuses,
        ..Default::default()
    }
}

fn to_status(decision: &DescriptorDecision) -> DescriptorStatus {
    // A shadow rule is counted and reported but never over limit.
    let code = if decision.denies() {
        Code::OverLimit
    } else {
        Code::Ok
    };
    match decision {
        DescriptorDecision::NoRule => DescriptorStatus {
            code: code.into(),
            ..Default::default()
        },
        DescriptorDecision::Unlimited { .. } => DescriptorStatus {
            code: code.into(),
            limit_remaining: UNLIMITED_REMAINING,
            ..Default::default()
        },
        // A concurrency rule has no window: no current_limit (its unit would
        // be made up), and the slots left as the remaining count.
        DescriptorDecision::Limited { rule, outcome, .. } if rule.concurrency().is_some() => {
            DescriptorStatus {
                code: code.into(),
                limit_remaining: u32::try_from(outcome.remaining).unwrap_or(u32::MAX),
                ..Default::default()
            }
        }
        DescriptorDecision::Limited {
            rule,
            limit,
            outcome,
        } => DescriptorStatus {
            code: code.into(),
            current_limit: Some(RateLimit {
                name: rule.name.clone().unwrap_or_default(),
                requests_per_unit: u32::try_from(limit.requests_per_unit).unwrap_or(u32::MAX),
                unit: response_unit(limit.unit).into(),
            }),
            limit_remaining: u32::try_from(outcome.remaining).unwrap_or(u32::MAX),
            duration_until_reset: Some(prost_types::Duration {
                seconds: i64::try_from(ceil_seconds(outcome.reset_after_ms)).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            quota: None,
        },
    }
}

fn response_unit(unit: Unit) -> ResponseUnit {
    match unit {
        Unit::Second => ResponseUnit::Second,
        Unit::Minute => ResponseUnit::Minute,
        Unit::Hour => ResponseUnit::Hour,
        Unit::Day => ResponseUnit::Day,
        Unit::Week => ResponseUnit::Week,
        Unit::Month => ResponseUnit::Month,
        Unit::Year => ResponseUnit::Year,
    }
}
