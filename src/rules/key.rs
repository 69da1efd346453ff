//! Storage keys: an injective encoding of (domain, descriptor, limit shape).
//!
//! envoyproxy/ratelimit joins parts with `_`, so `("a_b", "c")` and
//! `("a", "b_c")` share a counter — a caller who controls a value can spend
//! someone else's quota. Here every variable part is length-prefixed and the
//! number of entries is written up front, so the encoding can be parsed back
//! uniquely and two different descriptors never share a key, whatever bytes
//! their values hold.
//!
//! Layout: `rk4:{<tag>}:d<len>:<domain>n<count>` then per entry
//! `k<len>:<key>` followed by `v<len>:<value>` (the runtime value) or
//! `p<len>:<pattern>` (a `share_threshold` wildcard), then `|<algorithm>|<window ms>`.
//! `rk4` versions the layout and the state format (`rk1` kept a hash, `rk2`
//! and `rk3` packed strings; `rk4` keeps sliding-window counts as hash
//! fields). A fixed window's count of one window lives at the counter's key
//! followed by `|<window number>` (the window's start over its length,
//! [`push_window`]): one integer per window, which a plain `INCRBY` counts
//! and its TTL removes.
//! `<tag>` is the 64-bit FNV-1a hash of the rest folded to 32 bits, in 8 hex
//! digits (16 before 2026-12-07: Redis hashes, compares and copies every
//! key's bytes at every step, and short keys cost it measurably less);
//! inside braces it is the Redis Cluster hash tag, so all state of one
//! descriptor lives on one slot, and it never contains a brace itself. It
//! only places keys: the body after it keeps them apart.

use super::Rule;
use super::matcher::EntryRef;

/// Prefix of every key; bump the version when the layout changes.
pub const KEY_PREFIX: &str = "rk4:";

/// Builds the storage key of `rule`'s counter for one request descriptor.
///
/// `algorithm` names the state layout (e.g. `fw`) and `window_ms` the limit's
/// window, so a rule that changes either starts from fresh state while a rule
/// that only changes its `requests_per_unit` keeps counting.
pub fn storage_key(
    domain: &str,
    entries: &[EntryRef<'_>],
    rule: &Rule,
    algorithm: &str,
    window_ms: u64,
) -> Vec<u8> {
    // One allocation, sized up front: this runs for every counted descriptor.
    let parts: usize = entries
        .iter()
        .map(|e| e.key.len() + e.value.len() + 12)
        .sum();
    let mut key = Vec::with_capacity(KEY_PREFIX.len() + TAG_LEN + 32 + domain.len() + parts);
    key.extend_from_slice(KEY_PREFIX.as_bytes());
    let tag_at = key.len();
    key.extend_from_slice(b"{00000000}:");
    let body_at = key.len();

    push_part(&mut key, b'd', domain);
    key.push(b'n');
    push_decimal(&mut key, entries.len() as u64);
    for (level, entry) in entries.iter().enumerate() {
        push_part(&mut key, b'k', entry.key);
        match rule.shared_values.get(level).and_then(Option::as_deref) {
            Some(pattern) => push_part(&mut key, b'p', pattern),
            None => push_part(&mut key, b'v', entry.value),
        }
    }
    key.push(b'|');
    key.extend_from_slice(algorithm.as_bytes());
    key.push(b'|');
    push_decimal(&mut key, window_ms);

    let hash = fnv1a(&key[body_at..]);
    let tag = (hash ^ (hash >> 32)) & 0xffff_ffff;
    for (i, slot) in key[tag_at + 1..tag_at + 9].iter_mut().enumerate() {
        *slot = HEX[((tag >> (28 - 4 * i)) & 0xf) as usize];
    }
    key
}

/// The number of the `window_ms`-long window holding `at_ms` (Unix ms):
/// its start over its length.
pub fn window_number(at_ms: u64, window_ms: u64) -> u64 {
    at_ms / window_ms.max(1)
}

/// Turns a fixed-window counter's key into the key of its window numbered
/// `number` ([`window_number`]): `|` and the number. The Lua code builds the
/// same (`window_key` in `store/redis/ratekeeper.lua`); the counter's key
/// ends with its window length, so the window's key is as injective as the
/// counter's.
pub fn push_window(key: &mut Vec<u8>, number: u64) {
    key.push(b'|');
    push_decimal(key, number);
}

/// The window length (ms) of a fixed-window counter's key (as
/// [`storage_key`] builds them with the algorithm `fw`), `None` for any
/// other key. Read from the end: the variable parts come before it.
pub fn fixed_window_ms(key: &[u8]) -> Option<u64> {
    let mut parts = key.rsplitn(3, |&b| b == b'|');
    let window = parts.next()?;
    if parts.next()? != b"fw" || parts.next().is_none() || window.is_empty() {
        return None;
    }
    std::str::from_utf8(window).ok()?.parse().ok()
}

/// Gives `key` the hash tag of `anchor` (both ratekeeper keys), so that it
/// lives on the same Redis Cluster slot. The body after the tag, which
/// alone keeps counters apart, is unchanged.
pub(crate) fn copy_tag(key: &mut [u8], anchor: &[u8]) {
    let tag = KEY_PREFIX.len()..KEY_PREFIX.len() + TAG_LEN;
    key[tag.clone()].copy_from_slice(&anchor[tag]);
}

/// Length of `{<8 hex digits>}:`.
pub(crate) const TAG_LEN: usize = 11;

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_part(out: &mut Vec<u8>, marker: u8, part: &str) {
    out.push(marker);
    push_decimal(out, part.len() as u64);
    out.push(b':');
    out.extend_from_slice(part.as_bytes());
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// 64-bit FNV-1a: tiny, stable across versions and platforms, good enough to
/// spread tags over cluster slots (it is not a security boundary; the key
/// body after the tag is what keeps counters apart).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::*;
    use crate::rules::{Limit, RuleLimit, StatsPath, Unit};

    fn rule(shared_values: Vec<Option<String>>) -> Rule {
        Rule {
            name: None,
            limit: RuleLimit::Limited(Limit::fixed(1, Unit::Minute)),
            extra_limits: Vec::new(),
            replaces: vec![],
            shadow_mode: false,
            detailed_metric: false,
            quota_mode: false,
            metadata: None,
            stats: StatsPath::Levels(vec![]),
            path: String::new(),
            source: Arc::from(""),
            shared_values,
            failure_policy: None,
        }
    }

    fn key(domain: &str, entries: &[(&str, &str)]) -> Vec<u8> {
        let entries: Vec<EntryRef<'_>> = entries
            .iter()
            .map(|&(key, value)| EntryRef { key, value })
            .collect();
        storage_key(domain, &entries, &rule(vec![]), "fw", 60_000)
    }

    #[test]
    fn underscore_joins_do_not_collide() {
        assert_ne!(key("d", &[("a_b", "c")]), key("d", &[("a", "b_c")]));
        assert_ne!(key("d_a", &[("b", "c")]), key("d", &[("a_b", "c")]));
        assert_ne!(
            key("d", &[("a", "b"), ("c", "d")]),
            key("d", &[("a", "b_c_d")])
        );
        assert_ne!(key("d", &[("k", "")]), key("d", &[("k_", "")]));
    }

    #[test]
    fn length_prefixes_defeat_crafted_values() {
        // A value that spells out the encoding of a following entry.
        assert_ne!(
            key("d", &[("a", "1v1:x"), ("b", "c")]),
            key("d", &[("a", "1"), ("b", "c")])
        );
        assert_ne!(
            key("d", &[("a", "bk1:c")]),
            key("d", &[("a", "b"), ("c", "")])
        );
    }

    #[test]
    fn keys_are_versioned_and_hash_tagged() {
        let key = String::from_utf8(key("dom", &[("user", "alice")])).unwrap();
        assert!(key.starts_with("rk4:{"), "{key}");
        let tag_end = key.find('}').unwrap();
        assert_eq!(tag_end, 5 + 8, "{key}");
        assert!(key.ends_with("|fw|60000"), "{key}");
        assert!(key.contains("d3:domn1k4:userv5:alice"), "{key}");
    }

    #[test]
    fn a_fixed_window_key_says_its_window_and_windows_keep_keys_apart() {
        let key = key("d", &[("user", "a|fw|5")]);
        assert_eq!(fixed_window_ms(&key), Some(60_000));
        let entries = [EntryRef {
            key: "user",
            value: "a|fw|5",
        }];
        let sliding = storage_key("d", &entries, &rule(vec![]), "sw", 60_000);
        assert_eq!(fixed_window_ms(&sliding), None);
        assert_eq!(fixed_window_ms(b"fw|60000"), None);
        assert_eq!(fixed_window_ms(b"x|fw|"), None);

        let mut first = key.clone();
        push_window(&mut first, window_number(1_700_000_040_000, 60_000));
        assert!(first.ends_with(b"|fw|60000|28333334"));
        let mut second = key.clone();
        push_window(&mut second, window_number(1_700_000_100_000, 60_000));
        assert_ne!(first, second);
    }

    #[test]
    fn window_and_algorithm_are_part_of_the_key() {
        let entries = [EntryRef {
            key: "k",
            value: "v",
        }];
        let r = rule(vec![]);
        assert_ne!(
            storage_key("d", &entries, &r, "fw", 1_000),
            storage_key("d", &entries, &r, "fw", 60_000)
        );
        assert_ne!(
            storage_key("d", &entries, &r, "fw", 1_000),
            storage_key("d", &entries, &r, "tb", 1_000)
        );
    }

    #[test]
    fn shared_wildcards_use_the_pattern_and_cannot_collide_with_values() {
        let shared = rule(vec![Some("foo*".to_owned())]);
        let a = storage_key(
            "d",
            &[EntryRef {
                key: "k",
                value: "foo1",
            }],
            &shared,
            "fw",
            1_000,
        );
        let b = storage_key(
            "d",
            &[EntryRef {
                key: "k",
                value: "foo2",
            }],
            &shared,
            "fw",
            1_000,
        );
        assert_eq!(a, b);
        let literal = key("d", &[("k", "foo*")]);
        assert_ne!(
            storage_key(
                "d",
                &[EntryRef {
                    key: "k",
                    value: "foo*"
                }],
                &shared,
                "fw",
                60_000
            ),
            literal
        );
    }

    #[test]
    fn many_similar_descriptors_get_distinct_keys() {
        let parts = ["", "a", "_", "a_", "_a", "a_b", "b", "1:", ":1", "v1:a"];
        let mut seen = HashSet::new();
        let mut count = 0;
        for k1 in parts.iter().filter(|k| !k.is_empty()) {
            for v1 in parts {
                for v2 in parts {
                    seen.insert(key("d", &[(k1, v1), ("x", v2)]));
                    seen.insert(key("d", &[(k1, &format!("{v1}{v2}"))]));
                    count += 2;
                }
            }
        }
        // Only the one-entry keys repeat (the same concatenation from several
        // splits); every two-entry key is unique and differs from all one-entry keys.
        let mut one_entry = HashSet::new();
        for k1 in parts.iter().filter(|k| !k.is_empty()) {
            for v1 in parts {
                for v2 in parts {
                    one_entry.insert((k1.to_string(), format!("{v1}{v2}")));
                }
            }
        }
        let keys = parts.len() - 1;
        assert_eq!(
            seen.len(),
            keys * parts.len() * parts.len() + one_entry.len()
        );
        assert!(count > seen.len());
    }
}
