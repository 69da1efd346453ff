//! envoyproxy/ratelimit's storage keys, for the migration key layout.
//!
//! Upstream counts a fixed window of one unit in the Redis key
//! `<CACHE_KEY_PREFIX><domain>_<key1>_<value1>_…_<keyN>_<valueN>_<window start>`:
//! the request's runtime values (a `share_threshold` wildcard writes its
//! pattern text instead), and the window's start in Unix seconds, floored to
//! the unit. Writing exactly these bytes is what lets old and new instances
//! count in one key during a rollout. The parts are joined with `_` and
//! nothing is escaped, so `("a_b", "c")` and `("a", "b_c")` share a key:
//! upstream's collision, kept on purpose in this layout (see [`super::key`]
//! for ratekeeper's own, injective keys).
//!
//! A key is built in two steps: the limiter builds the part that does not
//! depend on time ([`stem`]: everything but the window start), and the store
//! appends the start of the window it decides in ([`window_key`]), from the
//! one clock reading it decides the whole request with.

use super::Rule;
use super::Unit;
use super::matcher::EntryRef;
use crate::algorithm::AlgorithmKind;

/// The unit (in seconds) of a limit upstream can express, else `None`:
/// upstream counts only fixed windows one unit long. The limiter and the
/// store both ask this of a limit's algorithm and window, so they always
/// agree on which hits live in upstream's keys. A window spelled as
/// `unit × unit_multiplier` that is exactly one unit long (60 seconds, 24
/// hours) has upstream's windows, so it counts in upstream's key too.
pub fn unit_seconds(algorithm: AlgorithmKind, window_ms: u64) -> Option<u64> {
    if algorithm != AlgorithmKind::FixedWindow {
        return None;
    }
    Unit::ALL
        .into_iter()
        .map(Unit::seconds)
        .find(|seconds| seconds * 1_000 == window_ms)
}

/// Everything of upstream's key for one request descriptor but the window
/// start: `<prefix><domain>_` then `<key>_<value>_` per entry.
pub fn stem(prefix: &str, domain: &str, entries: &[EntryRef<'_>], rule: &Rule) -> Vec<u8> {
    let parts: usize = entries
        .iter()
        .map(|e| e.key.len() + e.value.len() + 2)
        .sum();
    let mut key = Vec::with_capacity(prefix.len() + domain.len() + 1 + parts + 20);
    key.extend_from_slice(prefix.as_bytes());
    key.extend_from_slice(domain.as_bytes());
    key.push(b'_');
    for (level, entry) in entries.iter().enumerate() {
        key.extend_from_slice(entry.key.as_bytes());
        key.push(b'_');
        let value = rule
            .shared_values
            .get(level)
            .and_then(Option::as_deref)
            .unwrap_or(entry.value);
        key.extend_from_slice(value.as_bytes());
        key.push(b'_');
    }
    key
}

/// The key of the window of `unit_seconds` that holds `now_seconds` (Unix
/// seconds): `stem` followed by the window's start, in decimal.
pub fn window_key(stem: &[u8], unit_seconds: u64, now_seconds: u64) -> Vec<u8> {
    let start = now_seconds - now_seconds % unit_seconds;
    let mut key = Vec::with_capacity(stem.len() + 20);
    key.extend_from_slice(stem);
    key.extend_from_slice(start.to_string().as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::rules::{Limit, RuleLimit, StatsPath};

    fn rule(shared_values: Vec<Option<String>>) -> Rule {
        Rule {
            name: None,
            limit: RuleLimit::Limited(Limit::fixed(1, Unit::Minute)),
            extra_limits: Vec::new(),
            replaces: vec![],
            shadow_mode: false,
            detailed_metric: false,
            path: String::new(),
            source: Arc::from(""),
            shared_values,
            failure_policy: None,
            quota_mode: false,
            metadata: None,
            stats: StatsPath::Levels(vec![]),
        }
    }

    fn key(prefix: &str, entries: &[(&str, &str)], rule: &Rule, unit: Unit, now: u64) -> String {
        let entries: Vec<EntryRef<'_>> = entries
            .iter()
            .map(|&(key, value)| EntryRef { key, value })
            .collect();
        let stem = stem(prefix, "domain", &entries, rule);
        String::from_utf8(window_key(&stem, unit.seconds(), now)).unwrap()
    }

    /// The keys upstream's own tests expect.
    #[test]
    fn keys_are_upstreams() {
        let plain = rule(vec![]);
        assert_eq!(
            key("", &[("key", "value")], &plain, Unit::Second, 1234),
            "domain_key_value_1234"
        );
        assert_eq!(
            key(
                "",
                &[("key2", "value2"), ("subkey2", "subvalue2")],
                &plain,
                Unit::Minute,
                1234
            ),
            "domain_key2_value2_subkey2_subvalue2_1200"
        );
        assert_eq!(
            key("", &[("key3", "value3")], &plain, Unit::Hour, 1_000_000),
            "domain_key3_value3_997200"
        );
        assert_eq!(
            key(
                "",
                &[("key3", "value3"), ("subkey3", "subvalue3")],
                &plain,
                Unit::Day,
                1_000_000
            ),
            "domain_key3_value3_subkey3_subvalue3_950400"
        );
        assert_eq!(
            key("prefix:", &[("key", "value")], &plain, Unit::Second, 1234),
            "prefix:domain_key_value_1234"
        );
        // An empty value leaves its two underscores.
        assert_eq!(
            key("", &[("key", "")], &plain, Unit::Second, 1234),
            "domain_key__1234"
        );
    }

    #[test]
    fn every_unit_floors_to_its_own_window() {
        let now = 1_700_000_040;
        let plain = rule(vec![]);
        for unit in Unit::ALL {
            let start = now - now % unit.seconds();
            assert_eq!(
                key("", &[("k", "v")], &plain, unit, now),
                format!("domain_k_v_{start}"),
                "{unit}"
            );
        }
        // Month and year are 30- and 365-day buckets from the epoch.
        assert_eq!(
            key("", &[("k", "v")], &plain, Unit::Month, now),
            "domain_k_v_1697760000"
        );
        assert_eq!(
            key("", &[("k", "v")], &plain, Unit::Year, now),
            "domain_k_v_1671408000"
        );
    }

    #[test]
    fn shared_wildcards_write_their_pattern() {
        let shared = rule(vec![None, Some("files/*".to_owned())]);
        assert_eq!(
            key(
                "",
                &[("user", "alice"), ("files", "files/a.pdf")],
                &shared,
                Unit::Second,
                1234
            ),
            "domain_user_alice_files_files/*_1234"
        );
    }

    #[test]
    fn underscore_joins_collide_as_upstreams_do() {
        let plain = rule(vec![]);
        assert_eq!(
            key("", &[("a_b", "c")], &plain, Unit::Second, 1),
            key("", &[("a", "b_c")], &plain, Unit::Second, 1)
        );
    }

    #[test]
    fn only_fixed_windows_of_one_unit_are_upstreams() {
        let fw = AlgorithmKind::FixedWindow;
        for unit in Unit::ALL {
            assert_eq!(
                unit_seconds(fw, unit.seconds() * 1_000),
                Some(unit.seconds())
            );
        }
        assert_eq!(unit_seconds(fw, 120_000), None);
        assert_eq!(unit_seconds(fw, 500), None);
        assert_eq!(unit_seconds(AlgorithmKind::SlidingWindow, 60_000), None);
        assert_eq!(unit_seconds(AlgorithmKind::TokenBucket, 60_000), None);
    }
}
