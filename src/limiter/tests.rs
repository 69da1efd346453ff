//! The limiter's branchy parts — failure-policy answers, the over-limit
//! cache merge — over a scripted store and a manual clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::ManualClock;
use crate::config::parse_rules_file;
use crate::rules::Unit;
use crate::store::MemoryStore;
use crate::store::scripted::{Reply, ScriptedStore};

/// 40 s into a minute.
const T: u64 = 1_700_000_020_000;

const RULES: &str = r#"
domain: d
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: login
    rate_limit: {unit: minute, requests_per_unit: 2, failure_policy: deny}
  - key: local
    rate_limit: {unit: minute, requests_per_unit: 2, failure_policy: local}
  - key: strict
    rate_limit: {unit: minute, requests_per_unit: 2, failure_policy: error}
"#;

fn rules() -> Rules {
    let (domain, tree) = parse_rules_file("rules.yaml", RULES).unwrap();
    Rules::new(HashMap::from([(domain, tree)]))
}

fn limiter(store: Arc<dyn CounterStore>, policy: FailurePolicy) -> (Limiter, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T));
    let limiter = Limiter::new(rules(), store)
        .with_failure_policy(policy)
        .with_clock(clock.clone());
    (limiter, clock)
}

fn failing() -> Arc<dyn CounterStore> {
    Arc::new(ScriptedStore::new(Reply::Fail(StoreError::Timeout(
        Duration::from_millis(10),
    ))))
}

fn request<'a>(keys: &[(&'a str, &'a str)], mode: Mode) -> CheckRequest<'a> {
    CheckRequest {
        domain: "d",
        descriptors: keys
            .iter()
            .map(|&(key, value)| DescriptorInput {
                entries: vec![EntryRef { key, value }],
                limit_override: None,
                hits: 1,
            })
            .collect(),
        mode,
        enforcement: Enforcement::AsConfigured,
    }
}

fn outcomes(decision: &Decision) -> Vec<(bool, u64)> {
    decision
        .descriptors
        .iter()
        .map(|d| match d {
            DescriptorDecision::Limited { outcome, .. } => (outcome.allowed, outcome.remaining),
            other => panic!("not limited: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn each_policy_answers_a_failed_store_as_it_says() {
    for (policy, want) in [
        (FailurePolicy::Allow, Some((true, 0))),
        (FailurePolicy::Deny, Some((false, 0))),
        (FailurePolicy::Local, Some((true, 1))),
        (FailurePolicy::Error, None),
    ] {
        let (limiter, _) = limiter(failing(), policy);
        let result = limiter
            .check(&request(&[("user", "a")], Mode::AllOrNothing))
            .await;
        match want {
            Some(want) => assert_eq!(outcomes(&result.unwrap()), [want], "{policy}"),
            None => assert!(matches!(result, Err(Error::Storage(_))), "{policy}"),
        }
    }
}

#[tokio::test]
async fn a_rules_own_policy_wins_and_one_error_fails_the_request() {
    let (limiter, _) = limiter(failing(), FailurePolicy::Allow);
    let decision = limiter
        .check(&request(
            &[("user", "a"), ("login", "a")],
            Mode::Independent,
        ))
        .await
        .unwrap();
    assert_eq!(outcomes(&decision), [(true, 0), (false, 0)]);
    let result = limiter
        .check(&request(
            &[("user", "a"), ("strict", "a")],
            Mode::Independent,
        ))
        .await;
    assert!(matches!(result, Err(Error::Storage(_))));
    assert!(!limiter.answers_without_store());
}

#[tokio::test]
async fn local_counting_is_exact_and_follows_the_clock() {
    let (limiter, clock) = limiter(failing(), FailurePolicy::Local);
    let check = |limiter: &Limiter| {
        let limiter = limiter.clone();
        async move {
            outcomes(
                &limiter
                    .check(&request(&[("user", "a")], Mode::AllOrNothing))
                    .await
                    .unwrap(),
            )[0]
        }
    };
    assert_eq!(check(&limiter).await, (true, 1));
    assert_eq!(check(&limiter).await, (true, 0));
    assert_eq!(check(&limiter).await, (false, 0));
    // The window ends 20 s later: counting starts over.
    clock.advance(20_000);
    assert_eq!(check(&limiter).await, (true, 1));
}

#[tokio::test]
async fn a_deny_answer_keeps_an_all_or_nothing_request_from_local_counters() {
    let (limiter, _) = limiter(failing(), FailurePolicy::Error);
    for _ in 0..3 {
        let decision = limiter
            .check(&request(
                &[("local", "a"), ("login", "a")],
                Mode::AllOrNothing,
            ))
            .await
            .unwrap();
        // Denied by `login`; `local` is judged but never consumed.
        assert_eq!(outcomes(&decision), [(true, 2), (false, 0)]);
    }
}

#[tokio::test]
async fn a_reply_the_request_cannot_use_is_answered_by_policy_for_that_request() {
    let store = Arc::new(
        ScriptedStore::new(Reply::Allow(1))
            .then(Reply::Fail(StoreError::Protocol("negative value".into()))),
    );
    let (limiter, _) = limiter(store.clone(), FailurePolicy::Allow);
    let first = limiter
        .check(&request(&[("user", "a")], Mode::AllOrNothing))
        .await
        .unwrap();
    assert_eq!(outcomes(&first), [(true, 0)]);
    let next = limiter
        .check(&request(&[("user", "a")], Mode::AllOrNothing))
        .await
        .unwrap();
    assert_eq!(
        outcomes(&next),
        [(true, 1)],
        "the next request asks the store"
    );
    assert_eq!(store.calls(), 2);
}

/// A limiter on the memory store with an over-limit cache, where `user=a`
/// (limit 2) has been sent 3 times in `mode`: denied and cached.
async fn over_limit_for_user_a(mode: Mode) -> Limiter {
    let clock = Arc::new(ManualClock::new(T));
    let store = Arc::new(MemoryStore::new(100, clock.clone()));
    let limiter =
        Limiter::new(rules(), store).with_over_limit_cache(OverLimitCache::new(100, clock));
    for _ in 0..3 {
        limiter
            .check(&request(&[("user", "a")], mode))
            .await
            .unwrap();
    }
    limiter
}

#[tokio::test]
async fn the_over_limit_cache_denies_only_under_the_limit_it_saw() {
    let limiter = over_limit_for_user_a(Mode::Independent).await;
    let mut with_override = request(&[("user", "a")], Mode::Independent);
    with_override.descriptors[0].limit_override = Some(Limit::fixed(1_000, Unit::Minute));
    let decision = limiter.check(&with_override).await.unwrap();
    // The store counted 3 (fixed windows count rejections): 4 of 1,000.
    assert_eq!(outcomes(&decision), [(true, 996)]);
    // The configured limit is still answered from the cache.
    let decision = limiter
        .check(&request(&[("user", "a")], Mode::Independent))
        .await
        .unwrap();
    assert_eq!(outcomes(&decision), [(false, 0)]);
    assert!(
        limiter
            .metrics()
            .render()
            .contains("ratelimit_over_limit_cache_hits_total")
    );
}

#[tokio::test]
async fn a_cached_denial_keeps_an_all_or_nothing_request_from_the_others() {
    let limiter = over_limit_for_user_a(Mode::AllOrNothing).await;
    for _ in 0..3 {
        let decision = limiter
            .check(&request(
                &[("user", "a"), ("user", "b")],
                Mode::AllOrNothing,
            ))
            .await
            .unwrap();
        assert_eq!(outcomes(&decision), [(false, 0), (true, 2)]);
    }
}

/// A decision of `(quota_mode, over)` limited descriptors plus the others given.
fn decision(limited: &[(bool, bool)], others: Vec<DescriptorDecision>) -> Decision {
    let limit = Limit::fixed(1, Unit::Minute);
    let mut descriptors: Vec<DescriptorDecision> = limited
        .iter()
        .map(|&(quota_mode, over)| {
            let mut rule = Rule::from_override("d", limit);
            rule.quota_mode = quota_mode;
            DescriptorDecision::Limited {
                rule: Arc::new(rule),
                limit,
                outcome: Outcome {
                    allowed: !over,
                    remaining: 0,
                    reset_after_ms: 1_000,
                    retry_after_ms: None,
                    used_before: 0,
                },
            }
        })
        .collect();
    descriptors.extend(others);
    Decision {
        descriptors,
        known_domain: true,
    }
}

#[test]
fn quota_descriptors_deny_only_together() {
    let unlimited = || DescriptorDecision::Unlimited {
        rule: Arc::new(Rule::from_override("d", Limit::fixed(1, Unit::Minute))),
    };
    use QuotaMode::{Global, PerRule};
    type Case = (
        &'static [(bool, bool)],
        Vec<DescriptorDecision>,
        QuotaMode,
        bool,
    );
    let cases: Vec<Case> = vec![
        // No quota descriptors: any over-limit descriptor denies.
        (&[(false, true), (false, false)], vec![], PerRule, true),
        (&[(false, false)], vec![], PerRule, false),
        // One quota over, another within: allowed.
        (&[(true, true), (true, false)], vec![], PerRule, false),
        // Every quota over: denied.
        (&[(true, true), (true, true)], vec![], PerRule, true),
        // A hard limit over denies whatever the quotas say.
        (&[(true, false), (false, true)], vec![], PerRule, true),
        // Global: every descriptor is a quota one...
        (&[(false, true), (false, false)], vec![], Global, false),
        (&[(false, true), (false, true)], vec![], Global, true),
        // ...including one without a rule, which is never over...
        (
            &[(false, true)],
            vec![DescriptorDecision::NoRule],
            Global,
            false,
        ),
        // ...but not an unlimited one.
        (&[(false, true)], vec![unlimited()], Global, true),
        // Without a rule and per rule: not a quota descriptor.
        (
            &[(true, true)],
            vec![DescriptorDecision::NoRule],
            PerRule,
            true,
        ),
        // Nothing limited at all.
        (&[], vec![DescriptorDecision::NoRule], Global, false),
    ];
    for (limited, others, quota, expected) in cases {
        let d = decision(limited, others);
        assert_eq!(
            d.over_limit_with_quotas(quota),
            expected,
            "{limited:?} {quota:?}"
        );
        // Quota mode never changes the plain judgement ShouldAllow uses.
        assert_eq!(d.over_limit(), limited.iter().any(|&(_, over)| over));
    }
}
