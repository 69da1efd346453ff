//! What an override is, as operators write it and as the store keeps it
//! (JSON): a domain, a descriptor of exact or key-only entries, the limit in
//! the rules file's own terms, and an optional expiry.

use serde::{Deserialize, Serialize};

/// One entry of an override's descriptor: an exact value, or key-only (any
/// value) when `value` is absent or empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// The descriptor key.
    pub key: String,
    /// The exact value; absent or empty means any value (key-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// The limit of an override, with the fields and meaning of a rules file's
/// `rate_limit` block (validated by the same code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Hits per window. Wider than the rules file's type on purpose: a value
    /// past its range is refused by the rules validation, with its message.
    pub requests_per_unit: u64,
    /// `second` … `year`.
    pub unit: String,
    /// The window spans this many units (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_multiplier: Option<u64>,
    /// `fixed_window` (default), `sliding_window` or `token_bucket`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Token bucket capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// `error`, `allow`, `deny` or `local` when the store fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<String>,
}

/// A stored override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// The domain; must be configured when the override is written.
    pub domain: String,
    /// The entries, outermost first.
    pub descriptor: Vec<EntrySpec>,
    /// The limit that replaces the rules file's for this descriptor.
    pub rate_limit: LimitSpec,
    /// Unix milliseconds after which the override no longer applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

// === impl EntrySpec ===

impl EntrySpec {
    /// The value, `None` for key-only (absent or empty, as in a rules file).
    pub fn exact_value(&self) -> Option<&str> {
        self.value.as_deref().filter(|v| !v.is_empty())
    }
}

// === impl Override ===

impl Override {
    /// The identity of the override: its domain and descriptor, encoded
    /// injectively (JSON of both), so two different descriptors never share
    /// an entry in the store.
    pub fn id(&self) -> String {
        id_of(&self.domain, &self.descriptor)
    }

    /// Whether the override no longer applies at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

/// The identity of the override for `domain` and `descriptor` (see
/// [`Override::id`]); key-only entries are one identity whether their value
/// is absent or empty.
pub fn id_of(domain: &str, descriptor: &[EntrySpec]) -> String {
    let entries: Vec<(&str, Option<&str>)> = descriptor
        .iter()
        .map(|e| (e.key.as_str(), e.exact_value()))
        .collect();
    serde_json::to_string(&(domain, entries)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: Option<&str>) -> EntrySpec {
        EntrySpec {
            key: key.to_owned(),
            value: value.map(str::to_owned),
        }
    }

    #[test]
    fn ids_are_injective_and_key_only_is_one_identity() {
        let a = id_of("d", &[entry("a_b", Some("c"))]);
        let b = id_of("d", &[entry("a", Some("b_c"))]);
        assert_ne!(a, b);
        assert_eq!(
            id_of("d", &[entry("k", None)]),
            id_of("d", &[entry("k", Some(""))])
        );
        assert_ne!(
            id_of("d", &[entry("k", None)]),
            id_of("d", &[entry("k", Some("null"))])
        );
    }
}
