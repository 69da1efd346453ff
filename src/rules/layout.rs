//! Which key layout counters are stored in: ratekeeper's own ([`super::key`])
//! or envoyproxy/ratelimit's ([`super::envoy_key`]), for a rolling migration
//! in which old and new instances count in the same Redis.
//!
//! The store decides the layout (it alone knows how its keys are read and
//! written) and the limiter builds every key in it, so the two can never
//! disagree.

use std::sync::Arc;

use super::matcher::EntryRef;
use super::{Limit, Rule, envoy_key, key};

/// How storage keys are built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum KeyLayout {
    /// ratekeeper's injective, versioned, hash-tagged keys.
    #[default]
    Ratekeeper,
    /// envoyproxy/ratelimit's keys, for every limit upstream can express
    /// (a fixed window of one unit); the others keep ratekeeper's keys.
    EnvoyRatelimit {
        /// Prepended verbatim to every upstream key (upstream's
        /// `CACHE_KEY_PREFIX`).
        prefix: Arc<str>,
    },
}

impl KeyLayout {
    /// The storage key of `rule`'s counter (whose limit is `limit`) for one
    /// request descriptor. In the envoy-ratelimit layout a limit upstream
    /// can express gets upstream's key without its window start (the store
    /// appends it: [`envoy_key::window_key`]).
    pub fn key(
        &self,
        domain: &str,
        entries: &[EntryRef<'_>],
        rule: &Rule,
        limit: &Limit,
    ) -> Vec<u8> {
        match self {
            KeyLayout::EnvoyRatelimit { prefix }
                if envoy_key::unit_seconds(limit.algorithm, limit.window_ms()).is_some() =>
            {
                envoy_key::stem(prefix, domain, entries, rule)
            }
            _ => key::storage_key(
                domain,
                entries,
                rule,
                limit.algorithm.tag(),
                limit.window_ms(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::AlgorithmKind;
    use crate::rules::{RuleLimit, Unit};

    #[test]
    fn upstream_keys_only_for_limits_upstream_can_express() {
        let layout = KeyLayout::EnvoyRatelimit {
            prefix: Arc::from("p:"),
        };
        let entries = [EntryRef {
            key: "user",
            value: "alice",
        }];
        let key_of = |limit: Limit| {
            let rule = Rule {
                limit: RuleLimit::Limited(limit),
                ..Rule::from_override("dom", limit)
            };
            String::from_utf8(layout.key("dom", &entries, &rule, &limit)).unwrap()
        };
        assert_eq!(key_of(Limit::fixed(5, Unit::Minute)), "p:dom_user_alice_");
        let five_minutes = Limit {
            unit_multiplier: 5,
            ..Limit::fixed(5, Unit::Minute)
        };
        assert!(key_of(five_minutes).starts_with("rk4:{"));
        let bucket = Limit {
            algorithm: AlgorithmKind::TokenBucket,
            ..Limit::fixed(5, Unit::Minute)
        };
        assert!(key_of(bucket).starts_with("rk4:{"));
        let rule = Rule::from_override("dom", Limit::fixed(5, Unit::Minute));
        assert!(
            KeyLayout::Ratekeeper
                .key("dom", &entries, &rule, &Limit::fixed(5, Unit::Minute))
                .starts_with(b"rk4:{")
        );
    }
}
