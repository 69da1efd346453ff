//! One stream's behaviour with an injected clock and the memory registry:
//! demand from receive times, no re-send of an unchanged share, TTL
//! refresh, idle abandon, domain binding.

use std::collections::HashMap;
use std::sync::Arc;

use prost_types::Duration as ProtoDuration;

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::proto::envoy::service::rate_limit_quota::v3::BucketId;
use crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action;
use crate::proto::envoy::r#type::v3::rate_limit_strategy;
use crate::rlqs::registry::MemoryRegistry;
use crate::rlqs::rules::RlqsRuleDoc;

const T0: u64 = 1_000_000;

fn rules(limit: u32, ttl: u32) -> RlqsRules {
    let yaml = format!(
        "- {{bucket: [{{key: service, value: api}}], requests_per_unit: {limit}, unit: second, assignment_ttl_seconds: {ttl}}}"
    );
    let docs: Vec<RlqsRuleDoc> = serde_yaml_ng::from_str(&yaml).unwrap();
    let mut rules = RlqsRules::default();
    rules.add("t.yaml", "mesh", &docs).unwrap();
    rules
}

fn api() -> HashMap<String, String> {
    [("service".to_owned(), "api".to_owned())]
        .into_iter()
        .collect()
}

fn report(domain: &str, allowed: u64, elapsed_s: i64) -> RateLimitQuotaUsageReports {
    RateLimitQuotaUsageReports {
        domain: domain.to_owned(),
        bucket_quota_usages: vec![
            crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage {
                bucket_id: Some(BucketId { bucket: api() }),
                time_elapsed: Some(ProtoDuration {
                    seconds: elapsed_s,
                    nanos: 0,
                }),
                num_requests_allowed: allowed,
                num_requests_denied: 0,
            },
        ],
    }
}

struct Setup {
    clock: Arc<ManualClock>,
    registry: Arc<MemoryRegistry>,
    stream: StreamState,
}

fn setup(settings: RlqsSettings) -> Setup {
    let clock = Arc::new(ManualClock::new(T0));
    let registry = Arc::new(MemoryRegistry::new(clock.clone()));
    let stream = StreamState::new(
        "s1".into(),
        false,
        settings,
        Hub::default(),
        registry.clone(),
    );
    Setup {
        clock,
        registry,
        stream,
    }
}

fn tokens(response: &RateLimitQuotaResponse) -> Option<(u32, i64)> {
    match &response.bucket_action[0].bucket_action {
        Some(bucket_action::BucketAction::QuotaAssignmentAction(a)) => {
            let ttl = a.assignment_time_to_live.unwrap().seconds;
            match a.rate_limit_strategy?.strategy? {
                rate_limit_strategy::Strategy::TokenBucket(tb) => Some((tb.tokens_per_fill?, ttl)),
                _ => None,
            }
        }
        _ => None,
    }
}

#[tokio::test]
async fn demand_comes_from_receive_times_not_from_time_elapsed() {
    let mut s = setup(RlqsSettings::default());
    let rules = rules(100, 15);
    let now = s.clock.now_ms();
    let first = s
        .stream
        .report(report("mesh", 1, 0), &rules, now)
        .await
        .unwrap();
    assert_eq!(tokens(&first.unwrap()), Some((100, 15)));
    // 50 requests over 5 s by the server's clock, though Envoy claims 1 s.
    s.clock.advance(5_000);
    let now = s.clock.now_ms();
    s.stream
        .report(report("mesh", 50, 1), &rules, now)
        .await
        .unwrap();
    let probe = s
        .registry
        .exchange(
            "mesh",
            "probe",
            &[Report {
                bucket: BucketKey::new(&api()).unwrap().encode(),
                demand: None,
                allowed_rate: 0.0,
                held: Some(0.0),
            }],
            Timing {
                stale_ms: 60_000,
                learning_ms: 0,
            },
        )
        .await
        .unwrap();
    let me = probe.members[0].iter().find(|m| m.id == "s1").unwrap();
    assert_eq!(me.demand, Some(10.0));
    assert_eq!(me.allowed_rate, 10.0);
    assert_eq!(me.held, 100.0);
}

#[tokio::test]
async fn an_unchanged_share_is_not_re_sent_until_its_ttl_needs_extending() {
    let settings = RlqsSettings {
        report_period: std::time::Duration::from_secs(5),
        ..RlqsSettings::default()
    };
    let mut s = setup(settings);
    let rules = rules(100, 15);
    let now = s.clock.now_ms();
    assert!(
        s.stream
            .report(report("mesh", 1, 0), &rules, now)
            .await
            .unwrap()
            .is_some()
    );
    // Reports every 5 s with steady demand: nothing until 5 s before the
    // next-but-one report could miss the 15 s TTL (refresh after 5 s).
    s.clock.advance(4_000);
    let now = s.clock.now_ms();
    assert!(
        s.stream
            .report(report("mesh", 40, 4), &rules, now)
            .await
            .unwrap()
            .is_none()
    );
    s.clock.advance(1_000);
    let now = s.clock.now_ms();
    let refresh = s
        .stream
        .report(report("mesh", 10, 1), &rules, now)
        .await
        .unwrap();
    assert_eq!(tokens(&refresh.unwrap()), Some((100, 15)));
    // A reload that changes the limit is pushed without a report.
    let now = s.clock.now_ms();
    let pushed = s
        .stream
        .reallocate_all(&super::super::rules::RlqsRules::default(), now)
        .await;
    // No rule any more: the bucket is allowed.
    match &pushed.unwrap().bucket_action[0].bucket_action {
        Some(bucket_action::BucketAction::QuotaAssignmentAction(a)) => assert_eq!(
            a.rate_limit_strategy.unwrap().strategy,
            Some(rate_limit_strategy::Strategy::BlanketRule(
                rate_limit_strategy::BlanketRule::AllowAll as i32
            ))
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn idle_buckets_are_abandoned_after_the_configured_reports() {
    let settings = RlqsSettings {
        abandon_after_idle_reports: 2,
        ..RlqsSettings::default()
    };
    let mut s = setup(settings);
    let rules = rules(100, 15);
    let now = s.clock.now_ms();
    s.stream
        .report(report("mesh", 1, 0), &rules, now)
        .await
        .unwrap();
    s.clock.advance(5_000);
    let now = s.clock.now_ms();
    let once = s
        .stream
        .report(report("mesh", 0, 5), &rules, now)
        .await
        .unwrap();
    assert!(once.is_none_or(|r| !matches!(
        r.bucket_action[0].bucket_action,
        Some(bucket_action::BucketAction::AbandonAction(_))
    )));
    s.clock.advance(5_000);
    let now = s.clock.now_ms();
    let twice = s
        .stream
        .report(report("mesh", 0, 5), &rules, now)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        twice.bucket_action[0].bucket_action,
        Some(bucket_action::BucketAction::AbandonAction(_))
    ));
    assert!(s.stream.subscriptions.is_empty());
}

#[tokio::test]
async fn the_domain_is_bound_by_the_first_message() {
    let mut s = setup(RlqsSettings::default());
    let rules = rules(100, 15);
    let error = s
        .stream
        .report(report("", 1, 0), &rules, T0)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("must name its domain"),
        "{error}"
    );
    s.stream
        .report(report("mesh", 1, 0), &rules, T0)
        .await
        .unwrap();
    // Later messages may leave the domain out, but not change it.
    s.stream
        .report(report("", 1, 0), &rules, T0 + 1_000)
        .await
        .unwrap();
    let error = s
        .stream
        .report(report("other", 1, 0), &rules, T0 + 2_000)
        .await
        .unwrap_err();
    assert_eq!(
        tonic::Status::from(error).code(),
        tonic::Code::InvalidArgument
    );
}
