//! The YAML shape of a rules file, exactly as envoyproxy/ratelimit reads it.
//!
//! These types only describe the document; [`super::load`] validates them and
//! compiles them into [`Rules`](crate::rules::Rules). Unknown keys are refused
//! (`deny_unknown_fields`), so a typo such as `ratelimit:` or
//! `requestsperunit:` is an error instead of a silently missing limit.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// One rules file: a domain and its descriptor tree.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDoc {
    /// The domain; required and non-empty.
    pub domain: Option<Text>,
    /// Top-level descriptors; may be empty or absent.
    pub descriptors: Option<Vec<DescriptorDoc>>,
    /// ratekeeper extension: RLQS limits shared by Envoys (see docs/rlqs.md).
    pub rlqs: Option<Vec<crate::rlqs::rules::RlqsRuleDoc>>,
}

/// One descriptor node.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorDoc {
    /// The entry key; required and non-empty.
    pub key: Option<Text>,
    /// The entry value; absent or empty means "any value" (key-only). A `*`
    /// matches any run of characters.
    pub value: Option<Text>,
    /// The limit, if this node carries one.
    pub rate_limit: Option<RateLimitDoc>,
    /// ratekeeper extension: several limits on this node, every one of which
    /// must admit a request (instead of `rate_limit`, never with it).
    pub rate_limits: Option<Vec<RateLimitDoc>>,
    /// The next level.
    pub descriptors: Option<Vec<DescriptorDoc>>,
    /// Count and report, but never deny.
    pub shadow_mode: Option<bool>,
    /// Metrics per runtime value (metrics only).
    pub detailed_metric: Option<bool>,
    /// Metrics use the runtime value at this level (metrics only).
    pub value_to_metric: Option<bool>,
    /// All values matching this wildcard share one counter.
    pub share_threshold: Option<bool>,
    /// Quota mode (Envoy API): over the limit denies only when every quota
    /// descriptor of the request is.
    pub quota_mode: Option<bool>,
    /// Free-form map returned in Envoy's dynamic metadata while the
    /// descriptor is within its limit (`--response-dynamic-metadata`).
    pub metadata: Option<serde_yaml_ng::Value>,
    /// ratekeeper extension: a concurrency rule holding at most this many
    /// permits at once (instead of `rate_limit`; see `config::concurrency`).
    pub concurrency: Option<u32>,
    /// A concurrency rule's default lease TTL (`30s`).
    pub lease_ttl: Option<Text>,
    /// A concurrency rule's longest lease TTL (default: `lease_ttl`).
    pub max_lease_ttl: Option<Text>,
}

/// The `rate_limit` block of a descriptor.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitDoc {
    /// `second` … `year`, case-insensitive; required unless `unlimited`.
    pub unit: Option<Text>,
    /// Hits per unit; absent means 0 (every counted hit is over limit).
    pub requests_per_unit: Option<u32>,
    /// Never limit, never count.
    pub unlimited: Option<bool>,
    /// The rule's name, for `replaces` and responses.
    pub name: Option<Text>,
    /// Rules this one replaces when both match one request.
    pub replaces: Option<Vec<ReplacesDoc>>,
    /// ratekeeper extension: `fixed_window` (default), `sliding_window` or
    /// `token_bucket`.
    pub algorithm: Option<Text>,
    /// ratekeeper extension: the window spans this many units (default 1).
    pub unit_multiplier: Option<u32>,
    /// ratekeeper extension: token bucket capacity (default `requests_per_unit`).
    pub burst: Option<u32>,
    /// ratekeeper extension: `error`, `allow`, `deny` or `local` when the
    /// store fails (default: the service's `--failure-policy`).
    pub failure_policy: Option<Text>,
}

/// One entry of `replaces`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacesDoc {
    /// Name of the replaced rule.
    pub name: Option<Text>,
}

/// A scalar read as text. Like the reference, integers are accepted where a
/// string is expected (`value: 443`); floats, booleans, lists and maps are not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

// === impl Text ===

impl Text {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl Visitor<'_> for TextVisitor {
            type Value = Text;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }

        deserializer.deserialize_any(TextVisitor)
    }
}
