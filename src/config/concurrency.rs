//! The concurrency rule kind: `concurrency: N` with `lease_ttl` and
//! `max_lease_ttl` on a descriptor, instead of `rate_limit`.
//!
//! ```yaml
//! - key: tenant
//!   concurrency: 10        # permits held at once
//!   lease_ttl: 30s         # a lease's TTL when the caller asks for none
//!   max_lease_ttl: 5m      # the longest TTL a caller may ask for (default: lease_ttl)
//! ```
//!
//! This file only reads and checks those fields; the loader places the rule
//! in the tree like any other.

use std::time::Duration;

use super::file::DescriptorDoc;
use crate::rules::ConcurrencyLimit;

/// Longest lease TTL a rule may configure: a day. A lease is a claim on a
/// permit by a live holder; longer work renews.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(86_400);

/// Most permits a concurrency rule may hold at once (kept far below 2^53 so
/// the Redis script's doubles stay exact).
pub const MAX_CONCURRENCY: u64 = u32::MAX as u64;

/// The concurrency limit of the descriptor `doc` at YAML path `here`, or
/// `None` when it is not a concurrency rule.
///
/// # Errors
///
/// `(field path, reason)` for an invalid or incomplete concurrency rule.
pub fn limit(
    doc: &DescriptorDoc,
    here: &str,
) -> Result<Option<ConcurrencyLimit>, (String, String)> {
    let err = |field: &str, reason: String| Err((format!("{here}.{field}"), reason));
    let Some(max_in_flight) = doc.concurrency else {
        for (field, given) in [
            ("lease_ttl", doc.lease_ttl.is_some()),
            ("max_lease_ttl", doc.max_lease_ttl.is_some()),
        ] {
            if given {
                return err(field, format!("{field} is only valid with concurrency"));
            }
        }
        return Ok(None);
    };
    for (field, given) in [
        ("rate_limit", doc.rate_limit.is_some()),
        ("rate_limits", doc.rate_limits.is_some()),
    ] {
        if given {
            return err(
                "concurrency",
                format!("a descriptor has either {field} or concurrency, not both"),
            );
        }
    }
    for (field, given) in [
        ("shadow_mode", doc.shadow_mode.is_some()),
        ("quota_mode", doc.quota_mode.is_some()),
        ("share_threshold", doc.share_threshold == Some(true)),
    ] {
        if given {
            return err(
                field,
                format!("{field} is not supported on a concurrency rule"),
            );
        }
    }
    if max_in_flight == 0 {
        return err("concurrency", "must be at least 1".to_owned());
    }
    let Some(lease_ttl) = doc.lease_ttl.as_ref() else {
        return err(
            "lease_ttl",
            "a concurrency rule needs lease_ttl: how long a lease lives unless renewed, e.g. 30s"
                .to_owned(),
        );
    };
    let lease_ttl = match ttl(lease_ttl.as_str()) {
        Ok(ttl) => ttl,
        Err(reason) => return err("lease_ttl", reason),
    };
    let max_lease_ttl = match doc.max_lease_ttl.as_ref().map(|t| ttl(t.as_str())) {
        None => lease_ttl,
        Some(Ok(ttl)) => ttl,
        Some(Err(reason)) => return err("max_lease_ttl", reason),
    };
    if lease_ttl > max_lease_ttl {
        return err(
            "lease_ttl",
            format!(
                "lease_ttl {} is longer than max_lease_ttl {}",
                humantime::format_duration(lease_ttl),
                humantime::format_duration(max_lease_ttl)
            ),
        );
    }
    Ok(Some(ConcurrencyLimit {
        max_in_flight: u64::from(max_in_flight),
        lease_ttl_ms: lease_ttl.as_millis() as u64,
        max_lease_ttl_ms: max_lease_ttl.as_millis() as u64,
    }))
}

/// A TTL: a duration of at least 1 ms and at most [`MAX_LEASE_TTL`].
fn ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration '{text}' ({e}); write e.g. 30s or 5m"))?;
    if ttl.as_millis() == 0 {
        return Err("must be at least 1ms".to_owned());
    }
    if ttl > MAX_LEASE_TTL {
        return Err(format!(
            "'{text}' is longer than the maximum of {}",
            humantime::format_duration(MAX_LEASE_TTL)
        ));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use crate::config::load::parse_rules_file;
    use crate::rules::matcher::EntryRef;
    use crate::rules::{ConcurrencyLimit, RuleLimit};

    fn error(descriptor: &str) -> String {
        let text = format!("domain: d\ndescriptors:\n  - key: tenant\n{descriptor}");
        match parse_rules_file("rules.yaml", &text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_concurrency_rule_loads() {
        let text = "domain: d\ndescriptors:\n  - key: tenant\n    concurrency: 3\n    lease_ttl: 30s\n    max_lease_ttl: 5m\n";
        let (_, tree) = parse_rules_file("rules.yaml", text).unwrap();
        let rule = tree
            .find(&[EntryRef {
                key: "tenant",
                value: "a",
            }])
            .unwrap();
        assert_eq!(
            rule.limit,
            RuleLimit::Concurrency(ConcurrencyLimit {
                max_in_flight: 3,
                lease_ttl_ms: 30_000,
                max_lease_ttl_ms: 300_000,
            })
        );
        assert!(rule.limited().is_none());
    }

    #[test]
    fn max_lease_ttl_defaults_to_lease_ttl() {
        let text =
            "domain: d\ndescriptors:\n  - key: tenant\n    concurrency: 1\n    lease_ttl: 2s\n";
        let (_, tree) = parse_rules_file("rules.yaml", text).unwrap();
        let rule = tree
            .find(&[EntryRef {
                key: "tenant",
                value: "a",
            }])
            .unwrap();
        assert_eq!(rule.concurrency().unwrap().max_lease_ttl_ms, 2_000);
    }

    #[test]
    fn invalid_concurrency_rules_are_refused_with_their_field() {
        let cases = [
            (
                "    concurrency: 0\n    lease_ttl: 1s\n",
                "descriptors[0].concurrency",
                "at least 1",
            ),
            (
                "    concurrency: 2\n",
                "descriptors[0].lease_ttl",
                "needs lease_ttl",
            ),
            (
                "    concurrency: 2\n    lease_ttl: 1m\n    max_lease_ttl: 10s\n",
                "descriptors[0].lease_ttl",
                "longer than max_lease_ttl",
            ),
            (
                "    concurrency: 2\n    lease_ttl: soon\n",
                "descriptors[0].lease_ttl",
                "invalid duration",
            ),
            (
                "    concurrency: 2\n    lease_ttl: 0s\n",
                "descriptors[0].lease_ttl",
                "at least 1ms",
            ),
            (
                "    concurrency: 2\n    lease_ttl: 1s\n    max_lease_ttl: 2d\n",
                "descriptors[0].max_lease_ttl",
                "maximum",
            ),
            (
                "    concurrency: 2\n    lease_ttl: 1s\n    rate_limit:\n      unit: second\n      requests_per_unit: 1\n",
                "descriptors[0].concurrency",
                "not both",
            ),
            (
                "    concurrency: 2\n    lease_ttl: 1s\n    rate_limits:\n      - {unit: second, requests_per_unit: 1}\n",
                "descriptors[0].concurrency",
                "rate_limits or concurrency",
            ),
            (
                "    lease_ttl: 1s\n",
                "descriptors[0].lease_ttl",
                "only valid with concurrency",
            ),
            (
                "    max_lease_ttl: 1s\n",
                "descriptors[0].max_lease_ttl",
                "only valid with concurrency",
            ),
            (
                "    concurrency: 2\n    lease_ttl: 1s\n    shadow_mode: true\n",
                "descriptors[0].shadow_mode",
                "not supported",
            ),
            ("    concurrency: -1\n    lease_ttl: 1s\n", "", "invalid"),
        ];
        for (yaml, field, reason) in cases {
            let message = error(yaml);
            assert!(message.contains(field), "{yaml}: {message}");
            assert!(message.contains(reason), "{yaml}: {message}");
        }
    }
}
