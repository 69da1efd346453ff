//! The per-domain lookup tree and the matching walk.
//!
//! Each level maps a descriptor key to its candidates: exact values, wildcard
//! patterns (in config order) and the key-only rule. A request descriptor walks
//! the tree one entry per level without backtracking, as envoyproxy/ratelimit
//! does. Keys and values are compared as separate strings, so the `key_value`
//! concatenation ambiguities of the reference implementation cannot occur.

use std::collections::HashMap;
use std::sync::Arc;

use super::Rule;

/// One entry of a request descriptor, borrowed from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    /// The descriptor key.
    pub key: &'a str,
    /// The runtime value.
    pub value: &'a str,
}

/// The compiled descriptors of one domain.
#[derive(Debug, Default, Clone)]
pub struct DescriptorTree {
    root: Level,
}

/// A configured descriptor: its rule (if any) and the next level.
#[derive(Debug, Default, Clone)]
pub struct Node {
    rule: Option<Arc<Rule>>,
    children: Level,
}

/// All descriptors configured at one depth, by key.
#[derive(Debug, Default, Clone)]
pub struct Level {
    keys: HashMap<String, Candidates>,
}

/// The descriptors of one key at one level.
#[derive(Debug, Default, Clone)]
struct Candidates {
    exact: HashMap<String, Node>,
    wildcards: Vec<(Pattern, Node)>,
    key_only: Option<Node>,
}

/// A value pattern in which each `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
}

/// Why a descriptor could not be added to a level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateDescriptor;

// === impl DescriptorTree ===

impl DescriptorTree {
    /// A tree whose top level is `root`.
    pub fn new(root: Level) -> Self {
        Self { root }
    }

    /// The rule for a request descriptor, if one applies.
    ///
    /// At each level the entry's exact value wins over the wildcard patterns
    /// (first match in config order), which win over the key-only rule. Once a
    /// candidate is chosen the walk never returns to try another. Only the
    /// node reached by the last entry can supply the rule; a node without one
    /// there is a whitelist (no limit).
    pub fn find(&self, entries: &[EntryRef<'_>]) -> Option<&Arc<Rule>> {
        let (last, parents) = entries.split_last()?;
        let mut level = &self.root;
        for entry in parents {
            level = &level.lookup(entry)?.children;
        }
        level.lookup(last)?.rule.as_ref()
    }

    /// Appends every rule of the tree to `out`, depth first.
    pub fn collect_rules(&self, out: &mut Vec<Arc<Rule>>) {
        self.root.collect_rules(out);
    }
}

// === impl Node ===

impl Node {
    /// A node with an optional rule and the next level of descriptors.
    pub fn new(rule: Option<Arc<Rule>>, children: Level) -> Self {
        Self { rule, children }
    }
}

// === impl Level ===

impl Level {
    /// Adds a descriptor with `key` and `value` (`None` or empty: key-only; a
    /// value containing `*`: wildcard).
    ///
    /// # Errors
    ///
    /// [`DuplicateDescriptor`] when a sibling with the same key and value (or
    /// the same pattern, or a second key-only rule for the key) exists.
    pub fn insert(
        &mut self,
        key: &str,
        value: Option<&str>,
        node: Node,
    ) -> Result<(), DuplicateDescriptor> {
        let candidates = self.keys.entry(key.to_owned()).or_default();
        match value.filter(|v| !v.is_empty()) {
            None if candidates.key_only.is_some() => Err(DuplicateDescriptor),
            None => {
                candidates.key_only = Some(node);
                Ok(())
            }
            Some(value) if value.contains('*') => {
                let pattern = Pattern::new(value);
                if candidates.wildcards.iter().any(|(p, _)| *p == pattern) {
                    return Err(DuplicateDescriptor);
                }
                candidates.wildcards.push((pattern, node));
                Ok(())
            }
            Some(value) => {
                if candidates.exact.contains_key(value) {
                    return Err(DuplicateDescriptor);
                }
                candidates.exact.insert(value.to_owned(), node);
                Ok(())
            }
        }
    }

    fn lookup(&self, entry: &EntryRef<'_>) -> Option<&Node> {
        let candidates = self.keys.get(entry.key)?;
        candidates
            .exact
            .get(entry.value)
            .or_else(|| {
                candidates
                    .wildcards
                    .iter()
                    .find(|(pattern, _)| pattern.matches(entry.value))
                    .map(|(_, node)| node)
            })
            .or(candidates.key_only.as_ref())
    }

    fn collect_rules(&self, out: &mut Vec<Arc<Rule>>) {
        let mut keys: Vec<_> = self.keys.iter().collect();
        keys.sort_by_key(|(key, _)| key.as_str());
        for (_, candidates) in keys {
            let mut exact: Vec<_> = candidates.exact.iter().collect();
            exact.sort_by_key(|(value, _)| value.as_str());
            let nodes = exact
                .into_iter()
                .map(|(_, node)| node)
                .chain(candidates.wildcards.iter().map(|(_, node)| node))
                .chain(candidates.key_only.as_ref());
            for node in nodes {
                out.extend(node.rule.iter().cloned());
                node.children.collect_rules(out);
            }
        }
    }
}

// === impl Pattern ===

impl Pattern {
    /// A pattern from config text such as `foo*`, `*bar` or `a*b*c`.
    pub fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
        }
    }

    /// Whether `value` matches: the text between stars must appear in order,
    /// the part before the first star is a prefix and the part after the last
    /// star a suffix; each star matches zero or more characters.
    pub fn matches(&self, value: &str) -> bool {
        let mut segments = self.text.split('*');
        let first = segments.next().unwrap_or("");
        let Some(mut rest) = value.strip_prefix(first) else {
            return false;
        };
        let mut segments = segments.peekable();
        while let Some(segment) = segments.next() {
            if segments.peek().is_none() {
                return rest.len() >= segment.len() && rest.ends_with(segment);
            }
            match rest.find(segment) {
                Some(at) => rest = &rest[at + segment.len()..],
                None => return false,
            }
        }
        // No star at all: the whole value had to equal the text.
        rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Limit, RuleLimit, StatsPath, Unit};

    fn rule(name: &str) -> Option<Arc<Rule>> {
        Some(Arc::new(Rule {
            name: Some(name.to_owned()),
            limit: RuleLimit::Limited(Limit::fixed(1, Unit::Second)),
            extra_limits: Vec::new(),
            replaces: vec![],
            shadow_mode: false,
            detailed_metric: false,
            quota_mode: false,
            metadata: None,
            stats: StatsPath::Levels(vec![]),
            path: name.to_owned(),
            source: Arc::from("test"),
            shared_values: vec![],
            failure_policy: None,
        }))
    }

    fn leaf(name: &str) -> Node {
        Node::new(rule(name), Level::default())
    }

    fn find<'t>(tree: &'t DescriptorTree, entries: &[(&str, &str)]) -> Option<&'t str> {
        let entries: Vec<EntryRef<'_>> = entries
            .iter()
            .map(|&(key, value)| EntryRef { key, value })
            .collect();
        tree.find(&entries).map(|r| r.name.as_deref().unwrap())
    }

    /// key1=value1 -> subkey1 (key-only, limited) and key1=value1 (limited);
    /// key2 (key-only) with key2=whitelisted (no limit); path=/api/* and
    /// path=/api/v2* wildcards; a two-level rule that ends in a node without a
    /// limit.
    fn tree() -> DescriptorTree {
        let mut root = Level::default();
        let mut children = Level::default();
        children.insert("subkey1", None, leaf("sub")).unwrap();
        root.insert("key1", Some("value1"), Node::new(rule("k1v1"), children))
            .unwrap();
        root.insert("key2", None, leaf("k2")).unwrap();
        root.insert("key2", Some("whitelisted"), Node::default())
            .unwrap();
        root.insert("path", Some("/api/*"), leaf("api")).unwrap();
        root.insert("path", Some("/api/v2*"), leaf("api-v2"))
            .unwrap();
        root.insert("path", Some("/api/exact"), leaf("exact"))
            .unwrap();
        let mut deeper = Level::default();
        deeper.insert("b", None, Node::default()).unwrap();
        root.insert("a", None, Node::new(None, deeper)).unwrap();
        DescriptorTree::new(root)
    }

    #[test]
    fn matching_follows_the_reference_rules() {
        let tree = tree();
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case<'_>] = &[
            (&[("key1", "value1")], Some("k1v1")),
            (&[("key1", "value1"), ("subkey1", "x")], Some("sub")),
            // More entries than the config path: no limit, no fallback.
            (
                &[("key1", "value1"), ("subkey1", "x"), ("deeper", "y")],
                None,
            ),
            (&[("key1", "other")], None),
            (&[("key2", "anything")], Some("k2")),
            // Empty value falls back to the key-only rule.
            (&[("key2", "")], Some("k2")),
            // A valued node without limit or children whitelists.
            (&[("key2", "whitelisted")], None),
            // Exact beats wildcard; first wildcard in config order wins.
            (&[("path", "/api/exact")], Some("exact")),
            (&[("path", "/api/v2/users")], Some("api")),
            (&[("path", "/api/")], Some("api")),
            (&[("path", "/other")], None),
            // Stopping at a node that only has children gives no limit.
            (&[("a", "1")], None),
            (&[("a", "1"), ("b", "2")], None),
            (&[("unknown", "x")], None),
            (&[], None),
        ];
        for (entries, expected) in cases {
            assert_eq!(find(&tree, entries), *expected, "entries {entries:?}");
        }
    }

    #[test]
    fn no_backtracking_after_an_exact_match() {
        let mut root = Level::default();
        let mut exact_children = Level::default();
        exact_children.insert("x", Some("1"), leaf("x1")).unwrap();
        root.insert("k", Some("v"), Node::new(None, exact_children))
            .unwrap();
        let mut key_only_children = Level::default();
        key_only_children.insert("x", None, leaf("any-x")).unwrap();
        root.insert("k", None, Node::new(None, key_only_children))
            .unwrap();
        let tree = DescriptorTree::new(root);
        assert_eq!(find(&tree, &[("k", "v"), ("x", "1")]), Some("x1"));
        // k=v matched exactly, so the key-only sibling is never tried.
        assert_eq!(find(&tree, &[("k", "v"), ("x", "2")]), None);
        assert_eq!(find(&tree, &[("k", "w"), ("x", "2")]), Some("any-x"));
    }

    #[test]
    fn keys_and_values_never_run_together() {
        // envoyproxy/ratelimit would treat key "a_b" (key-only) and key "a"
        // value "b" as the same slot; here they are distinct.
        let mut root = Level::default();
        root.insert("a_b", None, leaf("a_b")).unwrap();
        root.insert("a", Some("b"), leaf("a=b")).unwrap();
        let tree = DescriptorTree::new(root);
        assert_eq!(find(&tree, &[("a", "b")]), Some("a=b"));
        assert_eq!(find(&tree, &[("a_b", "")]), Some("a_b"));
        assert_eq!(find(&tree, &[("a_b", "zzz")]), Some("a_b"));
    }

    #[test]
    fn duplicates_are_refused() {
        let mut level = Level::default();
        level.insert("k", Some("v"), Node::default()).unwrap();
        assert_eq!(
            level.insert("k", Some("v"), Node::default()),
            Err(DuplicateDescriptor)
        );
        level.insert("k", None, Node::default()).unwrap();
        assert_eq!(
            level.insert("k", Some(""), Node::default()),
            Err(DuplicateDescriptor)
        );
        level.insert("k", Some("v*"), Node::default()).unwrap();
        assert_eq!(
            level.insert("k", Some("v*"), Node::default()),
            Err(DuplicateDescriptor)
        );
    }

    #[test]
    fn patterns_match_like_the_reference() {
        let cases = [
            ("foo*", "foo", true),
            ("foo*", "foobar", true),
            ("foo*", "fo", false),
            ("*bar", "bar", true),
            ("*bar", "foobar", true),
            ("*bar", "barfoo", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("*", "", true),
            ("*", "anything", true),
            ("x*y*", "xy", true),
            ("**", "z", true),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(
                Pattern::new(pattern).matches(value),
                expected,
                "{pattern} vs {value}"
            );
        }
    }
}
