//! Rate limit response headers for the Envoy surface (opt-in), added through
//! `response_headers_to_add` so the gateway returns them to the client.
//!
//! - [`ResponseHeaders`] (`--response-headers`): exactly envoyproxy/ratelimit's
//!   three headers (names configurable as upstream allows; defaults
//!   `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`), for the
//!   one descriptor upstream picks ([`described`]).
//! - [`DraftHeaders`] (`--draft-rate-limit-headers`): the IETF httpapi
//!   draft's structured fields — `RateLimit-Policy` lists every limit that
//!   applied (`"name";q=<quota>;w=<window seconds>`) and `RateLimit` the
//!   picked one (`"name";r=<remaining>;t=<seconds to reset>`) — and
//!   `Retry-After` (seconds) when the request is over the limit and waiting
//!   can help.
//!
//! Both may be on; upstream's three come first.

use crate::api::ceil_seconds;
use crate::limiter::{DescriptorDecision, QuotaMode};
use crate::proto::envoy::config::core::v3::HeaderValue;

/// Names of upstream's three headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHeaders {
    /// Name of the header carrying the limit.
    pub limit: String,
    /// Name of the header carrying the hits left.
    pub remaining: String,
    /// Name of the header carrying the seconds until reset.
    pub reset: String,
}

/// Whether to add the IETF draft's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DraftHeaders {
    /// No draft headers.
    #[default]
    Off,
    /// `RateLimit-Policy`, `RateLimit` and, over the limit, `Retry-After`.
    On,
}

/// Which headers the Envoy surface adds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderSettings {
    /// Upstream's three headers, under these names.
    pub upstream: Option<ResponseHeaders>,
    /// The draft's headers.
    pub draft: DraftHeaders,
}

impl Default for ResponseHeaders {
    fn default() -> Self {
        Self {
            limit: "RateLimit-Limit".to_owned(),
            remaining: "RateLimit-Remaining".to_owned(),
            reset: "RateLimit-Reset".to_owned(),
        }
    }
}

// === impl HeaderSettings ===

impl HeaderSettings {
    /// The headers for a decided request; `over_limit` is the request's
    /// overall answer. Empty when no descriptor had a limit.
    pub fn for_decision(
        &self,
        descriptors: &[DescriptorDecision],
        quota: QuotaMode,
        over_limit: bool,
    ) -> Vec<HeaderValue> {
        if self.upstream.is_none() && self.draft == DraftHeaders::Off {
            return Vec::new();
        }
        let Some(picked) = described(descriptors, quota) else {
            return Vec::new();
        };
        let DescriptorDecision::Limited {
            rule,
            limit,
            outcome,
        } = &descriptors[picked]
        else {
            return Vec::new();
        };
        let reset = ceil_seconds(outcome.reset_after_ms);
        let mut headers = Vec::with_capacity(6);
        if let Some(names) = &self.upstream {
            headers.extend([
                header(&names.limit, limit.requests_per_unit.to_string()),
                header(&names.remaining, outcome.remaining.to_string()),
                header(&names.reset, reset.to_string()),
            ]);
        }
        if self.draft == DraftHeaders::On {
            // A descriptor with several limits lists each of them.
            let policies: Vec<String> = descriptors
                .iter()
                .filter_map(|d| match d {
                    DescriptorDecision::Limited { rule, .. } => Some(rule),
                    _ => None,
                })
                .flat_map(|rule| {
                    rule.limits().map(|limit| {
                        format!(
                            "{};q={};w={}",
                            sf_string(policy_name(rule)),
                            limit.requests_per_unit,
                            limit.window_ms() / 1_000
                        )
                    })
                })
                .collect();
            headers.push(header("RateLimit-Policy", policies.join(", ")));
            headers.push(header(
                "RateLimit",
                format!(
                    "{};r={};t={reset}",
                    sf_string(policy_name(rule)),
                    outcome.remaining
                ),
            ));
            if over_limit && let Some(wait) = retry_after_ms(descriptors, quota) {
                headers.push(header("Retry-After", ceil_seconds(wait).to_string()));
            }
        }
        headers
    }
}

/// The descriptor the headers describe, as upstream picks it: among those
/// with a limit, the fewest hits left (the first on ties); but an
/// over-limit descriptor that is not a quota descriptor wins (the last
/// such). `None` when nothing had a limit.
pub fn described(descriptors: &[DescriptorDecision], quota: QuotaMode) -> Option<usize> {
    let mut picked = None;
    // Upstream compares the wire's 32-bit remaining, starting from its maximum.
    let mut fewest = u32::MAX;
    for (i, descriptor) in descriptors.iter().enumerate() {
        if let DescriptorDecision::Limited { outcome, .. } = descriptor {
            let remaining = u32::try_from(outcome.remaining).unwrap_or(u32::MAX);
            if remaining < fewest {
                picked = Some(i);
                fewest = remaining;
            }
        }
        if descriptor.denies() && !descriptor.is_quota(quota) {
            picked = Some(i);
            fewest = 0;
        }
    }
    picked
}

/// How long until the request would pass if nobody else consumed: the
/// longest wait among the denying descriptors that are not quota
/// descriptors and, when every quota descriptor is over, the soonest of
/// theirs (one freed quota is enough). `None` when waiting cannot help.
fn retry_after_ms(descriptors: &[DescriptorDecision], quota: QuotaMode) -> Option<u64> {
    let mut longest = 0;
    let mut quotas = 0;
    let mut quotas_over = 0;
    let mut soonest_quota: Option<u64> = None;
    for descriptor in descriptors {
        let DescriptorDecision::Limited { outcome, .. } = descriptor else {
            quotas += usize::from(descriptor.is_quota(quota));
            continue;
        };
        if descriptor.is_quota(quota) {
            quotas += 1;
            if descriptor.denies() {
                quotas_over += 1;
                if let Some(wait) = outcome.retry_after_ms {
                    soonest_quota = Some(soonest_quota.map_or(wait, |s| s.min(wait)));
                }
            }
        } else if descriptor.denies() {
            longest = longest.max(outcome.retry_after_ms?);
        }
    }
    if quotas > 0 && quotas_over == quotas {
        longest = longest.max(soonest_quota?);
    }
    Some(longest)
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value,
        raw_value: Vec::new(),
    }
}

fn policy_name(rule: &crate::rules::Rule) -> &str {
    rule.name.as_deref().unwrap_or(&rule.path)
}

/// A structured-field string: quoted, with `"` and `\` escaped and anything
/// outside printable ASCII dropped (the syntax allows nothing else).
fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::algorithm::Outcome;
    use crate::rules::{Limit, Rule, Unit};

    fn limited(
        remaining: u64,
        allowed: bool,
        quota_mode: bool,
        retry: Option<u64>,
    ) -> DescriptorDecision {
        let limit = Limit::fixed(10, Unit::Minute);
        let mut rule = Rule::from_override("d", limit);
        rule.quota_mode = quota_mode;
        DescriptorDecision::Limited {
            rule: Arc::new(rule),
            limit,
            outcome: Outcome {
                allowed,
                remaining,
                reset_after_ms: 30_000,
                retry_after_ms: retry,
                used_before: 0,
            },
        }
    }

    #[test]
    fn structured_strings_are_escaped() {
        assert_eq!(sf_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(sf_string("naïve\n"), "\"nave\"");
    }

    #[test]
    fn the_described_descriptor_is_upstreams_pick() {
        let over = || limited(0, false, false, Some(5_000));
        let quota_over = || limited(0, false, true, Some(5_000));
        type Case = (Vec<DescriptorDecision>, QuotaMode, Option<usize>);
        let cases: Vec<Case> = vec![
            (vec![DescriptorDecision::NoRule], QuotaMode::PerRule, None),
            // Fewest left, the first on ties.
            (
                vec![
                    limited(5, true, false, None),
                    limited(2, true, false, None),
                    limited(2, true, false, None),
                ],
                QuotaMode::PerRule,
                Some(1),
            ),
            // An over-limit descriptor wins, the last one.
            (
                vec![
                    over(),
                    limited(0, true, false, None),
                    over(),
                    limited(0, true, false, None),
                ],
                QuotaMode::PerRule,
                Some(2),
            ),
            // A quota descriptor over its limit wins only as the fewest left.
            (
                vec![limited(3, true, false, None), quota_over()],
                QuotaMode::PerRule,
                Some(1),
            ),
            (
                vec![quota_over(), limited(0, true, false, None)],
                QuotaMode::PerRule,
                Some(0),
            ),
            (
                vec![limited(0, true, false, None), over()],
                QuotaMode::Global,
                Some(0),
            ),
        ];
        for (descriptors, quota, expected) in cases {
            assert_eq!(described(&descriptors, quota), expected, "{descriptors:?}");
        }
    }

    #[test]
    fn retry_after_waits_for_hard_limits_and_the_first_freed_quota() {
        let hard = |ms| limited(0, false, false, Some(ms));
        let quota = |ms| limited(0, false, true, Some(ms));
        assert_eq!(
            retry_after_ms(&[hard(1_000), hard(4_000)], QuotaMode::PerRule),
            Some(4_000)
        );
        assert_eq!(
            retry_after_ms(&[quota(3_000), quota(9_000)], QuotaMode::PerRule),
            Some(3_000)
        );
        assert_eq!(
            retry_after_ms(
                &[hard(5_000), quota(3_000), quota(9_000)],
                QuotaMode::PerRule
            ),
            Some(5_000)
        );
        // A hard denial that can never pass: no wait helps.
        assert_eq!(
            retry_after_ms(
                &[limited(0, false, false, None), hard(1)],
                QuotaMode::PerRule
            ),
            None
        );
        // Quotas not all over: only the hard limits count.
        assert_eq!(
            retry_after_ms(
                &[hard(2_000), quota(9_000), limited(4, true, true, None)],
                QuotaMode::PerRule
            ),
            Some(2_000)
        );
    }
}
