//! The stats key of a matched rule: the name its per-rule metrics carry,
//! built the way envoyproxy/ratelimit names its `ratelimit.service.rate_limit.<key>.*`
//! stats.
//!
//! A rule's own key is its path in the config (`domain.key_value.key`, a
//! wildcard level written with its pattern). Three things put runtime values
//! into the key instead: `detailed_metric` on the rule (every entry's value),
//! `value_to_metric` on a key-only or wildcard level (that level's value,
//! unless the level shares its counter with `share_threshold`), and a
//! request-supplied limit override (the request's entries). Such keys are
//! [`StatsKey::PerValue`], which the metrics layer caps, since callers choose
//! the values. Every key is sanitised as upstream does: `:` and `|` become
//! `_`, and so do the dots of anything shaped like an IPv4 address.

use super::Rule;
use super::matcher::EntryRef;

/// How a rule's stats key is derived, fixed when the rule is compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsPath {
    /// A request-supplied limit override: named after the request's entries.
    Override,
    /// A configured rule: one level per descriptor entry, root first.
    Levels(Vec<StatsLevel>),
}

/// One level of a configured rule's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsLevel {
    /// The level's entry key.
    pub key: String,
    /// The level's part of the rule path: `key`, `key_value` or `key_pattern`.
    pub segment: String,
    /// How a request entry matches this level.
    pub matched: LevelMatch,
    /// `value_to_metric: true` on this level.
    pub value_to_metric: bool,
    /// `share_threshold: true` on this level (its counter, and its stats
    /// key, use the pattern whatever the runtime value).
    pub shared: bool,
}

/// How a request entry matches one level of a rule's path. Each config node
/// is reached one way only, so this is known when the rule is compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelMatch {
    /// An exact value: the runtime value is the configured one.
    Exact,
    /// A wildcard pattern.
    Wildcard,
    /// Key only: any value.
    KeyOnly,
}

/// The stats key of one matched descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsKey {
    /// The rule's own key: one per configured rule, so bounded by the config.
    Rule(String),
    /// A key with runtime values in it; callers choose those, so the
    /// metrics layer caps how many distinct ones it keeps.
    PerValue(String),
}

/// The stats key for `rule` matched by `entries` in `domain`.
pub fn stats_key(domain: &str, rule: &Rule, entries: &[EntryRef<'_>]) -> StatsKey {
    let levels = match &rule.stats {
        StatsPath::Override => return StatsKey::PerValue(sanitise(&entries_key(domain, entries))),
        StatsPath::Levels(levels) => levels,
    };
    if rule.detailed_metric {
        return StatsKey::PerValue(sanitise(&detailed_key(domain, levels, entries)));
    }
    let mut key = String::with_capacity(rule.path.len() + 16);
    key.push_str(domain);
    for (level, entry) in levels.iter().zip(entries) {
        key.push('.');
        if level.shows_value() {
            push_entry(&mut key, entry);
        } else {
            key.push_str(&level.segment);
        }
    }
    if key == rule.path {
        StatsKey::Rule(sanitise(&key))
    } else {
        StatsKey::PerValue(sanitise(&key))
    }
}

/// Whether `rule`'s stats key is the same for every request it matches: no
/// runtime value goes into it, so it can be worked out once.
pub fn is_static(rule: &Rule) -> bool {
    match &rule.stats {
        StatsPath::Override => false,
        StatsPath::Levels(levels) => {
            !rule.detailed_metric && !levels.iter().any(StatsLevel::shows_value)
        }
    }
}

impl StatsLevel {
    /// Whether this level writes the request's value into the key
    /// (`value_to_metric` on a level the value is not fixed by).
    fn shows_value(&self) -> bool {
        self.value_to_metric
            && !self.shared
            && matches!(self.matched, LevelMatch::KeyOnly | LevelMatch::Wildcard)
    }
}

/// `detailed_metric`: every entry with its runtime value. Upstream writes
/// `key_value` even for an empty value (`key_`), except when some level
/// shares its counter, where shared levels show their pattern and empty
/// values drop the `_`.
fn detailed_key(domain: &str, levels: &[StatsLevel], entries: &[EntryRef<'_>]) -> String {
    let any_shared = levels.iter().any(|l| l.shared);
    let mut key = String::from(domain);
    for (i, entry) in entries.iter().enumerate() {
        key.push('.');
        match levels.get(i).filter(|l| l.shared) {
            Some(level) => key.push_str(&level.segment),
            None if any_shared => push_entry(&mut key, entry),
            None => {
                key.push_str(entry.key);
                key.push('_');
                key.push_str(entry.value);
            }
        }
    }
    key
}

/// `domain.k1_v1.k2_v2…`, an empty value dropping its `_`.
fn entries_key(domain: &str, entries: &[EntryRef<'_>]) -> String {
    let mut key = String::from(domain);
    for entry in entries {
        key.push('.');
        push_entry(&mut key, entry);
    }
    key
}

fn push_entry(key: &mut String, entry: &EntryRef<'_>) {
    key.push_str(entry.key);
    if !entry.value.is_empty() {
        key.push('_');
        key.push_str(entry.value);
    }
}

/// Upstream's stat name sanitising: `:` and `|` become `_`, then so do the
/// dots inside every run shaped like an IPv4 address (`\d{1,3}(\.\d{1,3}){3}`,
/// leftmost first).
pub fn sanitise(key: &str) -> String {
    let mut out: Vec<u8> = key
        .bytes()
        .map(|b| if b == b':' || b == b'|' { b'_' } else { b })
        .collect();
    let mut at = 0;
    while at < out.len() {
        match ipv4_at(&out, at, 0) {
            Some(end) => {
                for b in &mut out[at..end] {
                    if *b == b'.' {
                        *b = b'_';
                    }
                }
                at = end;
            }
            None => at += 1,
        }
    }
    // Only ASCII bytes were replaced by ASCII bytes.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The end of an IPv4-shaped run starting at `at` (group `group` of four),
/// preferring longer digit runs first as the reference's regex does.
fn ipv4_at(bytes: &[u8], at: usize, group: usize) -> Option<usize> {
    let digits = bytes[at..]
        .iter()
        .take(3)
        .take_while(|b| b.is_ascii_digit())
        .count();
    (1..=digits).rev().find_map(|n| {
        let end = at + n;
        if group == 3 {
            Some(end)
        } else if bytes.get(end) == Some(&b'.') {
            ipv4_at(bytes, end + 1, group + 1)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::rules::{Limit, RuleLimit, Unit};

    fn level(key: &str, value: Option<&str>, value_to_metric: bool, shared: bool) -> StatsLevel {
        let (segment, matched) = match value {
            None => (key.to_owned(), LevelMatch::KeyOnly),
            Some(v) if v.contains('*') => (format!("{key}_{v}"), LevelMatch::Wildcard),
            Some(v) => (format!("{key}_{v}"), LevelMatch::Exact),
        };
        StatsLevel {
            key: key.to_owned(),
            segment,
            matched,
            value_to_metric,
            shared,
        }
    }

    fn rule(levels: Vec<StatsLevel>, detailed_metric: bool) -> Rule {
        let path = std::iter::once("d".to_owned())
            .chain(levels.iter().map(|l| l.segment.clone()))
            .collect::<Vec<_>>()
            .join(".");
        Rule {
            name: None,
            limit: RuleLimit::Limited(Limit::fixed(1, Unit::Minute)),
            extra_limits: Vec::new(),
            replaces: vec![],
            shadow_mode: false,
            detailed_metric,
            quota_mode: false,
            metadata: None,
            shared_values: levels
                .iter()
                .map(|l| l.shared.then(|| l.segment.clone()))
                .collect(),
            stats: StatsPath::Levels(levels),
            path,
            source: Arc::from("test"),
            failure_policy: None,
        }
    }

    fn key(rule: &Rule, entries: &[(&str, &str)]) -> StatsKey {
        let entries: Vec<EntryRef<'_>> = entries
            .iter()
            .map(|&(key, value)| EntryRef { key, value })
            .collect();
        stats_key("d", rule, &entries)
    }

    #[test]
    fn a_key_is_static_exactly_when_no_value_reaches_it() {
        let rules = [
            rule(vec![level("user", None, false, false)], false),
            rule(vec![level("user", None, true, false)], false),
            rule(vec![level("path", Some("/f/*"), true, false)], false),
            rule(vec![level("path", Some("/f/*"), true, true)], false),
            rule(vec![level("path", Some("/f"), true, false)], false),
            rule(vec![level("user", None, false, false)], true),
        ];
        for rule in &rules {
            let a = key(rule, &[(rule_key(rule), "/f/a")]);
            let b = key(rule, &[(rule_key(rule), "/f/b")]);
            let same = a == b && matches!(a, StatsKey::Rule(_));
            assert_eq!(is_static(rule), same, "{}", rule.path);
        }
        assert!(!is_static(&Rule::from_override(
            "d",
            Limit::fixed(1, Unit::Minute)
        )));
    }

    fn rule_key(rule: &Rule) -> &str {
        match &rule.stats {
            StatsPath::Levels(levels) => &levels[0].key,
            StatsPath::Override => "",
        }
    }

    fn per_value(key: &str) -> StatsKey {
        StatsKey::PerValue(key.to_owned())
    }

    fn own(key: &str) -> StatsKey {
        StatsKey::Rule(key.to_owned())
    }

    #[test]
    fn plain_rules_use_their_config_path() {
        let r = rule(
            vec![
                level("route", Some("api"), false, false),
                level("user", None, false, false),
            ],
            false,
        );
        assert_eq!(
            key(&r, &[("route", "api"), ("user", "bob")]),
            own("d.route_api.user")
        );
        let wild = rule(vec![level("path", Some("/files/*"), false, false)], false);
        assert_eq!(key(&wild, &[("path", "/files/a")]), own("d.path_/files/*"));
    }

    #[test]
    fn value_to_metric_puts_the_runtime_value_of_its_level() {
        // Upstream's own example: route and http_method carry value_to_metric.
        let r = rule(
            vec![
                level("route", None, true, false),
                level("http_method", None, true, false),
                level("subject_id", None, false, false),
            ],
            false,
        );
        assert_eq!(
            key(
                &r,
                &[
                    ("route", "api"),
                    ("http_method", "GET"),
                    ("subject_id", "123")
                ]
            ),
            per_value("d.route_api.http_method_GET.subject_id")
        );
        // An empty runtime value leaves the key as configured.
        assert_eq!(
            key(
                &r,
                &[("route", ""), ("http_method", ""), ("subject_id", "1")]
            ),
            own("d.route.http_method.subject_id")
        );
        // A wildcard level shows the whole runtime value...
        let wild = rule(vec![level("path", Some("/files/*"), true, false)], false);
        assert_eq!(
            key(&wild, &[("path", "/files/a")]),
            per_value("d.path_/files/a")
        );
        // ...unless it shares its counter: then the pattern.
        let shared = rule(vec![level("path", Some("/files/*"), true, true)], false);
        assert_eq!(
            key(&shared, &[("path", "/files/a")]),
            own("d.path_/files/*")
        );
        // On an exact level the value is the configured one anyway.
        let exact = rule(vec![level("k", Some("v"), true, false)], false);
        assert_eq!(key(&exact, &[("k", "v")]), own("d.k_v"));
    }

    #[test]
    fn detailed_metric_wins_and_names_every_entry() {
        let r = rule(
            vec![
                level("route", None, true, false),
                level("user", None, false, false),
            ],
            true,
        );
        assert_eq!(
            key(&r, &[("route", "api"), ("user", "bob")]),
            per_value("d.route_api.user_bob")
        );
        // Upstream keeps the `_` of an empty value here.
        assert_eq!(
            key(&r, &[("route", ""), ("user", "bob")]),
            per_value("d.route_.user_bob")
        );
        // With a shared level: its pattern, and empty values drop the `_`.
        let shared = rule(
            vec![
                level("path", Some("/f/*"), false, true),
                level("user", None, false, false),
            ],
            true,
        );
        assert_eq!(
            key(&shared, &[("path", "/f/x"), ("user", "")]),
            per_value("d.path_/f/*.user")
        );
    }

    #[test]
    fn overrides_are_named_after_the_request_entries() {
        let r = Rule::from_override("d", Limit::fixed(5, Unit::Second));
        assert_eq!(key(&r, &[("a", "1"), ("b", "")]), per_value("d.a_1.b"));
    }

    #[test]
    fn keys_are_sanitised_like_upstream() {
        let r = rule(vec![level("remote_address", None, true, false)], false);
        assert_eq!(
            key(&r, &[("remote_address", "10.0.0.12")]),
            per_value("d.remote_address_10_0_0_12")
        );
        let cases = [
            ("a:b|c", "a_b_c"),
            (
                "ip 1.2.3.4 and 255.255.255.255",
                "ip 1_2_3_4 and 255_255_255_255",
            ),
            ("1234.5.6.7", "1234_5_6_7"),
            ("1.2.3", "1.2.3"),
            ("v1.2", "v1.2"),
            ("1.2.3.4.5", "1_2_3_4.5"),
            ("d.k_v", "d.k_v"),
        ];
        for (input, expected) in cases {
            assert_eq!(sanitise(input), expected, "{input}");
        }
    }
}
