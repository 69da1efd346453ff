//! Overrides become rules through the rules file loader itself: each domain's
//! overrides are written out as a rules document (one nested descriptor per
//! override, shared prefixes merged) and compiled by
//! [`parse_rules_file`], so an override is validated exactly like a YAML
//! rule and matched by the same tree, with the same precedence among
//! overrides (exact value before key-only, level by level).

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};

use super::model::{LimitSpec, Override};
use crate::config::{ConfigError, parse_rules_file};
use crate::error::Error;
use crate::rules::DescriptorTree;

/// The `source` of every rule made from an override (shown by `/rules`).
pub const SOURCE: &str = "override";

/// Checks that `o` compiles as a rule, answering with the field at fault.
///
/// # Errors
///
/// [`Error::InvalidRequest`] naming `descriptor[i]…` or `rate_limit.…`.
pub fn validate(o: &Override) -> Result<(), Error> {
    if o.descriptor.is_empty() {
        return Err(Error::invalid("descriptor", "must not be empty"));
    }
    for (i, entry) in o.descriptor.iter().enumerate() {
        if entry.key.is_empty() {
            return Err(Error::invalid(
                format!("descriptor[{i}].key"),
                "must not be empty",
            ));
        }
        // A rules file reads `*` as a wildcard; an override names values.
        if entry.exact_value().is_some_and(|v| v.contains('*')) {
            return Err(Error::invalid(
                format!("descriptor[{i}].value"),
                "'*' is not allowed: an override names an exact value, or none for key-only",
            ));
        }
    }
    trees(std::slice::from_ref(o)).map(drop)
}

/// The rule trees of `overrides`, by domain.
///
/// # Errors
///
/// [`Error::InvalidRequest`] for the first override that does not compile.
pub fn trees(overrides: &[Override]) -> Result<HashMap<String, DescriptorTree>, Error> {
    let mut by_domain: BTreeMap<&str, Vec<&Override>> = BTreeMap::new();
    for o in overrides {
        by_domain.entry(&o.domain).or_default().push(o);
    }
    let mut trees = HashMap::with_capacity(by_domain.len());
    for (domain, list) in by_domain {
        let mut root = Trie::default();
        for o in list {
            root.insert(o);
        }
        let doc = json!({ "domain": domain, "descriptors": root.to_docs() });
        let text = serde_yaml_ng::to_string(&doc)
            .map_err(|e| Error::Internal(format!("override document: {e}")))?;
        let (_, tree) = parse_rules_file(SOURCE, &text).map_err(invalid)?;
        trees.insert(domain.to_owned(), tree);
    }
    Ok(trees)
}

/// Descriptor levels keyed by (key, value; empty for key-only).
#[derive(Debug, Default)]
struct Trie<'a> {
    children: BTreeMap<(&'a str, &'a str), Trie<'a>>,
    limit: Option<&'a LimitSpec>,
}

impl<'a> Trie<'a> {
    fn insert(&mut self, o: &'a Override) {
        let mut node = self;
        for entry in &o.descriptor {
            let value = entry.exact_value().unwrap_or_default();
            node = node.children.entry((&entry.key, value)).or_default();
        }
        node.limit = Some(&o.rate_limit);
    }

    fn to_docs(&self) -> Vec<Value> {
        self.children
            .iter()
            .map(|((key, value), node)| {
                let mut doc = Map::new();
                doc.insert("key".into(), json!(key));
                if !value.is_empty() {
                    doc.insert("value".into(), json!(value));
                }
                if let Some(limit) = node.limit {
                    doc.insert("rate_limit".into(), rate_limit_doc(limit));
                }
                if !node.children.is_empty() {
                    doc.insert("descriptors".into(), Value::Array(node.to_docs()));
                }
                Value::Object(doc)
            })
            .collect()
    }
}

fn rate_limit_doc(limit: &LimitSpec) -> Value {
    let mut doc = Map::new();
    doc.insert("unit".into(), json!(limit.unit));
    doc.insert("requests_per_unit".into(), json!(limit.requests_per_unit));
    let optional = [
        ("unit_multiplier", limit.unit_multiplier.map(|v| json!(v))),
        ("algorithm", limit.algorithm.as_ref().map(|v| json!(v))),
        ("burst", limit.burst.map(|v| json!(v))),
        (
            "failure_policy",
            limit.failure_policy.as_ref().map(|v| json!(v)),
        ),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            doc.insert(name.into(), value);
        }
    }
    Value::Object(doc)
}

/// The loader's error as an admin request error: the path inside the
/// generated document becomes the override's own field (`rate_limit.unit`).
fn invalid(error: ConfigError) -> Error {
    match error {
        ConfigError::Invalid { path, reason, .. } => {
            let (field, reason) = match (path.rfind("rate_limit"), reason.rfind("rate_limit.")) {
                (Some(at), _) => (path[at..].to_owned(), reason),
                // serde's errors carry the path in the text.
                (None, Some(at)) => {
                    let rest = &reason[at..];
                    match rest.split_once(": ") {
                        Some((field, why)) => (field.to_owned(), why.to_owned()),
                        None => ("rate_limit".to_owned(), reason),
                    }
                }
                (None, None) => ("rate_limit".to_owned(), reason),
            };
            Error::invalid(field, reason)
        }
        other => Error::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overrides::model::EntrySpec;
    use crate::rules::matcher::EntryRef;
    use crate::rules::{RuleLimit, Unit};

    fn limit(n: u64, unit: &str) -> LimitSpec {
        LimitSpec {
            requests_per_unit: n,
            unit: unit.to_owned(),
            unit_multiplier: None,
            algorithm: None,
            burst: None,
            failure_policy: None,
        }
    }

    fn o(entries: &[(&str, Option<&str>)], limit: LimitSpec) -> Override {
        Override {
            domain: "api".to_owned(),
            descriptor: entries
                .iter()
                .map(|(k, v)| EntrySpec {
                    key: (*k).to_owned(),
                    value: v.map(str::to_owned),
                })
                .collect(),
            rate_limit: limit,
            expires_at_ms: None,
        }
    }

    fn field(error: Error) -> String {
        match error {
            Error::InvalidRequest { field, reason } => format!("{field}: {reason}"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn overrides_sharing_a_prefix_compile_into_one_tree() {
        let list = [
            o(&[("tenant", Some("acme"))], limit(10, "second")),
            o(
                &[("tenant", Some("acme")), ("path", None)],
                limit(3, "minute"),
            ),
            o(&[("tenant", None)], limit(1, "hour")),
        ];
        let trees = trees(&list).unwrap();
        let tree = &trees["api"];
        let find = |entries: &[(&str, &str)]| {
            let refs: Vec<EntryRef<'_>> = entries
                .iter()
                .map(|(key, value)| EntryRef { key, value })
                .collect();
            tree.find(&refs).map(|r| r.limit)
        };
        let limited = |n, unit| Some(RuleLimit::Limited(crate::rules::Limit::fixed(n, unit)));
        assert_eq!(find(&[("tenant", "acme")]), limited(10, Unit::Second));
        assert_eq!(
            find(&[("tenant", "acme"), ("path", "/x")]),
            limited(3, Unit::Minute)
        );
        assert_eq!(find(&[("tenant", "other")]), limited(1, Unit::Hour));
        assert_eq!(find(&[("user", "acme")]), None);
    }

    #[test]
    fn invalid_limits_name_the_field_as_the_rules_loader_does() {
        let bad_unit = o(&[("k", None)], limit(1, "fortnight"));
        assert_eq!(
            field(validate(&bad_unit).unwrap_err()),
            "rate_limit.unit: invalid rate limit unit 'fortnight'"
        );
        let huge = o(&[("k", None)], limit(1 << 40, "second"));
        let text = field(validate(&huge).unwrap_err());
        assert!(text.starts_with("rate_limit.requests_per_unit"), "{text}");
        let mut burst = limit(5, "second");
        burst.burst = Some(3);
        let text = field(validate(&o(&[("k", None)], burst)).unwrap_err());
        assert!(
            text.starts_with("rate_limit.burst: burst is only valid"),
            "{text}"
        );
        let star = o(&[("k", Some("a*"))], limit(1, "second"));
        assert!(field(validate(&star).unwrap_err()).starts_with("descriptor[0].value"));
    }
}
