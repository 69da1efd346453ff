//! RLQS rules: the `rlqs:` section of a rules file, validated and compiled.
//!
//! Each entry names a bucket pattern (a set of `key` / `value` pairs, order
//! irrelevant; a missing value or one with `*` matches any value), one global
//! limit per unit shared by every Envoy subscribed to a matching bucket, a
//! burst and the assignment TTL. Patterns are compiled into the same
//! descriptor tree as the descriptor rules, with the entries sorted by key,
//! and a bucket (whose entries are sorted the same way) walks it with the
//! same matching: exact value before wildcard before key-only, no
//! backtracking, and a rule must name every key of the bucket. Every distinct
//! bucket id is its own global bucket, so `user` with no value gives each
//! user their own limit.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use super::bucket::BucketKey;
use crate::config::ConfigError;
use crate::config::file::Text;
use crate::rules::matcher::{EntryRef, Level};
use crate::rules::{DescriptorTree, Limit, Node, Rule, Unit};

/// Default assignment TTL: three of Envoy's 5 s report ticks.
pub const DEFAULT_TTL_SECONDS: u32 = 15;
/// Longest assignment TTL accepted.
pub const MAX_TTL_SECONDS: u32 = 3_600;

/// One entry of the `rlqs:` list, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlqsRuleDoc {
    /// Optional name, shown on `/debug/rlqs` and in metrics.
    pub name: Option<Text>,
    /// The bucket pattern; required, at least one entry.
    pub bucket: Option<Vec<BucketEntryDoc>>,
    /// The global limit per unit; required, at least 1.
    pub requests_per_unit: Option<u32>,
    /// `second`, `minute` or `hour`; required.
    pub unit: Option<Text>,
    /// Most tokens all Envoys together may hold (default `requests_per_unit`).
    pub burst: Option<u32>,
    /// How long an assignment holds, whole seconds (default 15).
    pub assignment_ttl_seconds: Option<u32>,
}

/// One `key` / `value` of a bucket pattern.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketEntryDoc {
    /// The bucket id key; required.
    pub key: Option<Text>,
    /// The value: exact, a `*` pattern, or absent for any value.
    pub value: Option<Text>,
}

/// A compiled RLQS rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RlqsRule {
    /// The domain it belongs to.
    pub domain: String,
    /// Its name, or its path when unnamed.
    pub name: String,
    /// Tokens admitted per fill, across all Envoys.
    pub requests_per_unit: u64,
    /// The fill interval (Envoy's `fill_interval`).
    pub unit: Unit,
    /// Most tokens all Envoys together may hold.
    pub burst: u64,
    /// Assignment TTL in whole seconds (≥ 1).
    pub ttl_seconds: u64,
}

/// Every domain's RLQS rules.
#[derive(Debug, Default, Clone)]
pub struct RlqsRules {
    domains: HashMap<String, DomainRules>,
}

/// One domain's compiled patterns and the rules they lead to.
#[derive(Debug, Default, Clone)]
struct DomainRules {
    /// Built from `trie` once the domain is complete.
    tree: DescriptorTree,
    trie: Trie,
    /// Rules by the path of their tree rule.
    rules: HashMap<String, Arc<RlqsRule>>,
}

/// The patterns while a domain is compiled: the descriptor tree cannot be
/// edited once built, and rules share prefixes.
#[derive(Debug, Default, Clone)]
struct Trie {
    rule: Option<Arc<Rule>>,
    children: Vec<((String, Option<String>), Trie)>,
}

// === impl RlqsRule ===

impl RlqsRule {
    /// The global limit in requests per second.
    pub fn rate_per_second(&self) -> f64 {
        self.requests_per_unit as f64 / self.unit.seconds() as f64
    }
}

// === impl RlqsRules ===

impl RlqsRules {
    /// Compiles one file's `rlqs:` entries into `domain`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the file, `rlqs[i].field` and why.
    pub fn add(
        &mut self,
        file: &str,
        domain: &str,
        docs: &[RlqsRuleDoc],
    ) -> Result<(), ConfigError> {
        let rules = self.domains.entry(domain.to_owned()).or_default();
        for (i, doc) in docs.iter().enumerate() {
            let at = format!("rlqs[{i}]");
            let err = |field: &str, reason: String| {
                ConfigError::invalid(file, &format!("{at}{field}"), reason)
            };
            let entries = doc.bucket.as_deref().unwrap_or_default();
            if entries.is_empty() {
                return Err(err(".bucket", "needs at least one key".into()));
            }
            let mut pattern: Vec<(String, Option<String>)> = Vec::new();
            for (j, entry) in entries.iter().enumerate() {
                let key = entry.key.as_ref().map(Text::as_str).unwrap_or_default();
                if key.is_empty() {
                    return Err(err(&format!(".bucket[{j}].key"), "is empty".into()));
                }
                if pattern.iter().any(|(k, _)| k == key) {
                    return Err(err(
                        &format!(".bucket[{j}].key"),
                        format!("key '{key}' appears twice; a bucket id has each key once"),
                    ));
                }
                let value = entry
                    .value
                    .as_ref()
                    .map(|v| v.as_str().to_owned())
                    .filter(|v| !v.is_empty());
                pattern.push((key.to_owned(), value));
            }
            pattern.sort();
            let unit_text = doc.unit.as_ref().map(Text::as_str).unwrap_or_default();
            let unit = match Unit::parse(unit_text) {
                Some(unit @ (Unit::Second | Unit::Minute | Unit::Hour)) => unit,
                _ => {
                    return Err(err(
                        ".unit",
                        format!("invalid unit '{unit_text}'; expected second, minute or hour"),
                    ));
                }
            };
            let requests_per_unit = u64::from(doc.requests_per_unit.unwrap_or(0));
            if requests_per_unit == 0 {
                return Err(err(".requests_per_unit", "must be at least 1".into()));
            }
            let burst = u64::from(doc.burst.unwrap_or(doc.requests_per_unit.unwrap_or(0)));
            if burst == 0 {
                return Err(err(".burst", "must be at least 1".into()));
            }
            let ttl = doc.assignment_ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
            if !(1..=MAX_TTL_SECONDS).contains(&ttl) {
                return Err(err(
                    ".assignment_ttl_seconds",
                    format!("must be 1 to {MAX_TTL_SECONDS} whole seconds, not {ttl}"),
                ));
            }
            let path = format!(
                "{domain}.rlqs.{}",
                pattern
                    .iter()
                    .map(|(k, v)| match v {
                        Some(v) => format!("{k}_{v}"),
                        None => k.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(".")
            );
            let name = doc
                .name
                .as_ref()
                .map(|n| n.as_str().to_owned())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| path.clone());
            let mut tree_rule = Rule::from_override(domain, Limit::fixed(requests_per_unit, unit));
            tree_rule.path = path.clone();
            tree_rule.source = Arc::from(file);
            if !rules.trie.insert(&pattern, Arc::new(tree_rule)) {
                return Err(err(".bucket", format!("duplicate bucket pattern '{path}'")));
            }
            rules.rules.insert(
                path,
                Arc::new(RlqsRule {
                    domain: domain.to_owned(),
                    name,
                    requests_per_unit,
                    unit,
                    burst,
                    ttl_seconds: u64::from(ttl),
                }),
            );
        }
        rules.tree = DescriptorTree::new(rules.trie.to_level());
        Ok(())
    }

    /// The rule for `bucket` in `domain`, if one matches.
    pub fn find(&self, domain: &str, bucket: &BucketKey) -> Option<Arc<RlqsRule>> {
        let rules = self.domains.get(domain)?;
        let entries: Vec<EntryRef<'_>> = bucket
            .entries()
            .iter()
            .map(|(key, value)| EntryRef { key, value })
            .collect();
        let rule = rules.tree.find(&entries)?;
        rules.rules.get(&rule.path).cloned()
    }

    /// Whether `domain` has any RLQS rule.
    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains
            .get(domain)
            .is_some_and(|d| !d.rules.is_empty())
    }

    /// Every rule, sorted by domain and name, for `/debug/rlqs`.
    pub fn all(&self) -> Vec<Arc<RlqsRule>> {
        let mut all: Vec<Arc<RlqsRule>> = self
            .domains
            .values()
            .flat_map(|d| d.rules.values().cloned())
            .collect();
        all.sort_by(|a, b| (&a.domain, &a.name).cmp(&(&b.domain, &b.name)));
        all
    }
}

// === impl Trie ===

impl Trie {
    /// Adds a rule at the end of `pattern`; false when one is there already.
    fn insert(&mut self, pattern: &[(String, Option<String>)], rule: Arc<Rule>) -> bool {
        let Some((first, rest)) = pattern.split_first() else {
            if self.rule.is_some() {
                return false;
            }
            self.rule = Some(rule);
            return true;
        };
        let index = match self.children.iter().position(|(entry, _)| entry == first) {
            Some(index) => index,
            None => {
                self.children.push((first.clone(), Trie::default()));
                self.children.len() - 1
            }
        };
        self.children[index].1.insert(rest, rule)
    }

    /// The descriptor tree level of this node's children.
    fn to_level(&self) -> Level {
        let mut level = Level::default();
        for ((key, value), child) in &self.children {
            let node = Node::new(child.rule.clone(), child.to_level());
            // Children are unique by (key, value), so this cannot collide.
            let _ = level.insert(key, value.as_deref(), node);
        }
        level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(yaml: &str) -> Result<RlqsRules, String> {
        let docs: Vec<RlqsRuleDoc> = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        let mut rules = RlqsRules::default();
        rules
            .add("f.yaml", "mesh", &docs)
            .map_err(|e| e.to_string())?;
        Ok(rules)
    }

    fn bucket(entries: &[(&str, &str)]) -> BucketKey {
        BucketKey::new(
            &entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
        .unwrap()
    }

    const RULES: &str = r#"
- name: checkout
  bucket: [{key: service, value: checkout}]
  requests_per_unit: 100
  unit: second
- name: per-user
  bucket: [{key: user}, {key: service, value: "api-*"}]
  requests_per_unit: 60
  unit: minute
  burst: 120
  assignment_ttl_seconds: 30
"#;

    #[test]
    fn buckets_match_whatever_their_key_order() {
        let rules = compile(RULES).unwrap();
        let rule = rules
            .find("mesh", &bucket(&[("service", "checkout")]))
            .unwrap();
        assert_eq!(rule.name, "checkout");
        assert_eq!(rule.burst, 100);
        assert_eq!(rule.ttl_seconds, 15);
        let rule = rules
            .find("mesh", &bucket(&[("user", "u1"), ("service", "api-v1")]))
            .unwrap();
        assert_eq!(rule.name, "per-user");
        assert_eq!(
            (rule.requests_per_unit, rule.unit, rule.burst),
            (60, Unit::Minute, 120)
        );
        assert_eq!(rule.ttl_seconds, 30);
        assert!((rule.rate_per_second() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_rule_must_name_every_key_of_the_bucket() {
        let rules = compile(RULES).unwrap();
        assert!(
            rules
                .find("mesh", &bucket(&[("service", "other")]))
                .is_none()
        );
        assert!(
            rules
                .find("mesh", &bucket(&[("service", "checkout"), ("extra", "x")]))
                .is_none()
        );
        assert!(
            rules
                .find("other", &bucket(&[("service", "checkout")]))
                .is_none()
        );
    }

    #[test]
    fn bad_rules_are_refused_with_the_field() {
        let cases = [
            (
                "- {requests_per_unit: 1, unit: second}",
                "rlqs[0].bucket: needs at least one key",
            ),
            (
                "- {bucket: [{value: x}], requests_per_unit: 1, unit: second}",
                "rlqs[0].bucket[0].key: is empty",
            ),
            (
                "- {bucket: [{key: a}, {key: a}], requests_per_unit: 1, unit: second}",
                "appears twice",
            ),
            (
                "- {bucket: [{key: a}], requests_per_unit: 1, unit: day}",
                "rlqs[0].unit: invalid unit 'day'",
            ),
            (
                "- {bucket: [{key: a}], unit: second}",
                "rlqs[0].requests_per_unit: must be at least 1",
            ),
            (
                "- {bucket: [{key: a}], requests_per_unit: 1, unit: second, burst: 0}",
                "rlqs[0].burst",
            ),
            (
                "- {bucket: [{key: a}], requests_per_unit: 1, unit: second, assignment_ttl_seconds: 0}",
                "must be 1 to 3600",
            ),
            (
                "- {bucket: [{key: a}], requests_per_unit: 1, unit: second, ttl: 5}",
                "unknown field `ttl`",
            ),
            (
                "- {bucket: [{key: a}, {key: b}], requests_per_unit: 1, unit: second}\n- {bucket: [{key: b}, {key: a}], requests_per_unit: 2, unit: second}",
                "rlqs[1].bucket: duplicate bucket pattern 'mesh.rlqs.a.b'",
            ),
        ];
        for (yaml, want) in cases {
            let error = compile(yaml).unwrap_err();
            assert!(error.contains(want), "{yaml}\n=> {error}\nwant {want}");
        }
    }
}
