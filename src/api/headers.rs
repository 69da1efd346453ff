//! Rate limit response headers for the Envoy surface (opt-in), added through
//! `response_headers_to_add` so the gateway returns them to the client.
//!
//! - envoyproxy/ratelimit's three headers (names configurable as upstream
//!   allows; defaults `RateLimit-Limit`, `RateLimit-Remaining`,
//!   `RateLimit-Reset`), for the one descriptor upstream picks: the one with
//!   the fewest hits left, unless one is over its limit (then the last such).
//! - The IETF httpapi draft's structured fields: `RateLimit-Policy` lists
//!   every limit that applied (`"name";q=<quota>;w=<window seconds>`) and
//!   `RateLimit` the picked one (`"name";r=<remaining>;t=<seconds to reset>`).
//! - `Retry-After` (seconds) when the request is over the limit and waiting
//!   can help.

use crate::algorithm::denies;
use crate::api::ceil_seconds;
use crate::limiter::DescriptorDecision;
use crate::proto::envoy::config::core::v3::HeaderValue;

/// Which headers to add and under which names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHeaders {
    /// Name of the header carrying the limit.
    pub limit: String,
    /// Name of the header carrying the hits left.
    pub remaining: String,
    /// Name of the header carrying the seconds until reset.
    pub reset: String,
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

impl ResponseHeaders {
    /// The headers for a decided request; empty when no descriptor had a limit.
    pub fn for_decision(
        &self,
        descriptors: &[DescriptorDecision],
        over_limit: bool,
    ) -> Vec<HeaderValue> {
        let limited: Vec<_> = descriptors
            .iter()
            .filter_map(|d| match d {
                DescriptorDecision::Limited {
                    rule,
                    limit,
                    outcome,
                } => Some((rule, limit, outcome)),
                _ => None,
            })
            .collect();
        // Upstream's pick: fewest remaining (first on ties), but an enforced
        // over-limit descriptor wins (the last one).
        let Some(&(rule, limit, outcome)) = limited
            .iter()
            .rev()
            .find(|(rule, _, outcome)| denies(outcome, !rule.shadow_mode))
            .or_else(|| {
                limited
                    .iter()
                    .min_by_key(|(_, _, outcome)| outcome.remaining)
            })
        else {
            return Vec::new();
        };
        let reset = ceil_seconds(outcome.reset_after_ms);
        let policies: Vec<String> = limited
            .iter()
            .map(|(rule, limit, _)| {
                format!(
                    "{};q={};w={}",
                    sf_string(policy_name(rule)),
                    limit.requests_per_unit,
                    limit.window_ms() / 1_000
                )
            })
            .collect();
        let mut headers = vec![
            header(&self.limit, limit.requests_per_unit.to_string()),
            header(&self.remaining, outcome.remaining.to_string()),
            header(&self.reset, reset.to_string()),
            header("RateLimit-Policy", policies.join(", ")),
            header(
                "RateLimit",
                format!(
                    "{};r={};t={reset}",
                    sf_string(policy_name(rule)),
                    outcome.remaining
                ),
            ),
        ];
        if over_limit {
            let waits: Option<Vec<u64>> = limited
                .iter()
                .filter(|(rule, _, outcome)| denies(outcome, !rule.shadow_mode))
                .map(|(_, _, outcome)| outcome.retry_after_ms)
                .collect();
            if let Some(longest) = waits.and_then(|w| w.into_iter().max()) {
                headers.push(header("Retry-After", ceil_seconds(longest).to_string()));
            }
        }
        headers
    }
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
    use super::*;

    #[test]
    fn structured_strings_are_escaped() {
        assert_eq!(sf_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(sf_string("naïve\n"), "\"nave\"");
    }
}
