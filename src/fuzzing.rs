//! Fuzz targets: the code that reads what users and gateways send, driven by
//! arbitrary bytes. Each target panics only when an invariant breaks.
//!
//! They are run two ways: coverage-guided by libFuzzer through the
//! cargo-fuzz crate in `fuzz/` (`fuzz/run.sh`, needs a nightly toolchain),
//! and on stable by `tests/fuzz_targets.rs`, which replays the committed
//! corpus and every crash ever found (`fuzz/regressions/`) and adds a
//! bounded run of seeded mutations, so a fixed crash stays fixed in CI.

use std::sync::{Arc, OnceLock};

use crate::config::parse_rules_file;
use crate::rules::key::storage_key;
use crate::rules::matcher::EntryRef;
use crate::rules::{DescriptorTree, Limit, Rule, Unit};

/// The rules file loader on arbitrary text: it must refuse or accept, never
/// panic, and what it accepts must be usable: a domain, and finite limits
/// with a positive window and a quota the algorithms can count exactly.
pub fn config_loader(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((domain, tree)) = parse_rules_file("fuzz.yaml", text) else {
        return;
    };
    assert!(!domain.is_empty(), "accepted an empty domain");
    let mut rules = Vec::new();
    tree.collect_rules(&mut rules);
    for rule in rules {
        // Two limits of one rule never share a counter.
        let shapes: Vec<_> = rule
            .limits()
            .map(|l| (l.algorithm, l.window_ms()))
            .collect();
        for (i, shape) in shapes.iter().enumerate() {
            assert!(!shapes[..i].contains(shape), "{}: shared window", rule.path);
        }
        for limit in rule.limits() {
            assert!(limit.window_ms() > 0, "{}: empty window", rule.path);
            let quota = limit.quota();
            assert!(
                quota.burst >= 1 || quota.limit == 0,
                "{}: no burst",
                rule.path
            );
        }
    }
}

/// Descriptor matching and storage keys on arbitrary descriptors: the
/// bytes are split (at `0xff`) into strings that make two descriptors of
/// key/value entries. Matching must not panic, and two different
/// descriptors must never get the same counter key.
pub fn matcher_and_keys(data: &[u8]) {
    let fields: Vec<String> = data
        .split(|b| *b == 0xff)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    let (left, right) = fields.split_at(fields.len() / 2);
    let (a, b) = (entries(left), entries(right));
    let tree = fuzz_tree();
    let _ = tree.find(&a);
    let _ = tree.find(&b);

    let rule = Rule::from_override("fuzz", Limit::fixed(10, Unit::Minute));
    let key_a = storage_key("fuzz", &a, &rule, "fw", 60_000);
    let key_b = storage_key("fuzz", &b, &rule, "fw", 60_000);
    assert_eq!(
        a == b,
        key_a == key_b,
        "keys must be equal exactly when descriptors are: {a:?} {b:?}"
    );
    // The cluster hash tag: `{` + 8 hex digits + `}` right after the prefix.
    let tag = &key_a[4..14];
    assert!(
        tag[0] == b'{' && tag[9] == b'}' && tag[1..9].iter().all(u8::is_ascii_hexdigit),
        "malformed hash tag in {key_a:?}"
    );
}

/// Pairs consecutive strings into entries (a lone last string is a key with
/// an empty value).
fn entries(fields: &[String]) -> Vec<EntryRef<'_>> {
    fields
        .chunks(2)
        .map(|pair| EntryRef {
            key: &pair[0],
            value: pair.get(1).map_or("", String::as_str),
        })
        .collect()
}

/// Rules with every kind of level: exact values, wildcards, key-only,
/// shared wildcards, nesting, unlimited.
fn fuzz_tree() -> Arc<DescriptorTree> {
    static TREE: OnceLock<Arc<DescriptorTree>> = OnceLock::new();
    TREE.get_or_init(|| {
        let text = r#"
domain: fuzz
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: a
    value: x
    rate_limit: {unlimited: true}
  - key: a
    value: "pre*"
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: b
    descriptors:
      - key: c
        value: "*"
        rate_limit: {unit: hour, requests_per_unit: 2, algorithm: token_bucket, burst: 4}
      - key: c
        value: "v"
        descriptors:
          - key: d
            rate_limit: {unit: day, requests_per_unit: 3, algorithm: sliding_window}
"#;
        let (_, tree) = parse_rules_file("fuzz.yaml", text).expect("the fuzz rules load");
        Arc::new(tree)
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_accept_their_seeds() {
        config_loader(include_bytes!("../examples/config.yaml"));
        config_loader(b"domain: d\ndescriptors: [{key: k, rate_limit: {unit: second}}]");
        matcher_and_keys(b"a\xffx\xffa\xffy");
        matcher_and_keys(b"b\xff\xffc\xffv\xffd\xff1\xffb\xff\xffc\xffv\xffd\xff1");
        matcher_and_keys(b"");
    }
}
