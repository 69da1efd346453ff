//! The protobuf actions a stream sends: assignments (always with a TTL in
//! whole seconds) and abandons, never an empty response.

use std::collections::HashMap;

use prost_types::Duration as ProtoDuration;

use super::super::allocator::Strategy;
use super::super::bucket::BucketKey;
use crate::proto::envoy::r#type::v3::{RateLimitStrategy, TokenBucket, rate_limit_strategy};
use crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::BucketAction;
use crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::{
    self, AbandonAction, QuotaAssignmentAction,
};
use crate::proto::envoy::service::rate_limit_quota::v3::{BucketId, RateLimitQuotaResponse};

pub(super) fn response(actions: Vec<BucketAction>) -> Option<RateLimitQuotaResponse> {
    (!actions.is_empty()).then_some(RateLimitQuotaResponse {
        bucket_action: actions,
    })
}

pub(super) fn abandon(bucket: HashMap<String, String>) -> BucketAction {
    BucketAction {
        bucket_id: Some(BucketId { bucket }),
        bucket_action: Some(bucket_action::BucketAction::AbandonAction(AbandonAction {})),
    }
}

/// An assignment; the TTL is always set, in whole seconds (Envoy reads an
/// unset TTL as zero and drops fractions).
pub(super) fn assign(key: &BucketKey, strategy: Strategy, ttl_seconds: u64) -> BucketAction {
    let strategy = match strategy {
        Strategy::AllowAll => rate_limit_strategy::Strategy::BlanketRule(
            rate_limit_strategy::BlanketRule::AllowAll as i32,
        ),
        Strategy::DenyAll => rate_limit_strategy::Strategy::BlanketRule(
            rate_limit_strategy::BlanketRule::DenyAll as i32,
        ),
        Strategy::TokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_seconds,
        } => rate_limit_strategy::Strategy::TokenBucket(TokenBucket {
            max_tokens,
            tokens_per_fill: Some(tokens_per_fill),
            fill_interval: Some(ProtoDuration {
                seconds: i64::try_from(fill_seconds).unwrap_or(i64::MAX),
                nanos: 0,
            }),
        }),
    };
    BucketAction {
        bucket_id: Some(BucketId {
            bucket: key.to_map(),
        }),
        bucket_action: Some(bucket_action::BucketAction::QuotaAssignmentAction(
            QuotaAssignmentAction {
                assignment_time_to_live: Some(ProtoDuration {
                    seconds: i64::try_from(ttl_seconds.max(1)).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
                rate_limit_strategy: Some(RateLimitStrategy {
                    strategy: Some(strategy),
                }),
            },
        )),
    }
}
