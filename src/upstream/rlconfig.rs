//! The text of `/rlconfig`: one line per configured limit, as
//! envoyproxy/ratelimit prints its loaded config (`<rule path>:
//! unit=<UNIT> requests_per_unit=<n>, shadow_mode: <bool>, quota_mode:
//! <bool>`). Upstream's order is its maps' (unspecified); here lines are
//! sorted by rule path. Pure.

use crate::rules::{RuleLimit, Rules, Unit};

/// The dump of `rules`; empty when there are none (or none loaded).
pub fn dump(rules: &Rules) -> String {
    // (rule path, line), sorted by path.
    let mut lines: Vec<(String, String)> = Vec::new();
    for rule in rules.all_rules() {
        // An unlimited rule has no unit (upstream prints UNKNOWN) and
        // ratekeeper keeps no count for it.
        let (unit, requests_per_unit) = match rule.limit {
            RuleLimit::Limited(limit) => (unit_name(limit.unit), limit.requests_per_unit),
            RuleLimit::Unlimited | RuleLimit::Concurrency(_) => ("UNKNOWN", 0),
        };
        let line = format!(
            "{}: unit={unit} requests_per_unit={requests_per_unit}, shadow_mode: {}, quota_mode: false\n",
            rule.path, rule.shadow_mode
        );
        lines.push((rule.path.clone(), line));
    }
    lines.sort();
    lines.into_iter().map(|(_, line)| line).collect()
}

/// The unit as upstream's enum names it.
fn unit_name(unit: Unit) -> &'static str {
    match unit {
        Unit::Second => "SECOND",
        Unit::Minute => "MINUTE",
        Unit::Hour => "HOUR",
        Unit::Day => "DAY",
        Unit::Week => "WEEK",
        Unit::Month => "MONTH",
        Unit::Year => "YEAR",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::parse_rules_file;

    #[test]
    fn one_line_per_limit_in_upstreams_format() {
        let (domain, tree) = parse_rules_file(
            "r.yaml",
            "domain: shop\n\
             descriptors:\n\
             \x20 - key: user\n\
             \x20   rate_limit: {unit: minute, requests_per_unit: 10}\n\
             \x20 - key: path\n\
             \x20   value: /login\n\
             \x20   shadow_mode: true\n\
             \x20   rate_limit: {unit: week, requests_per_unit: 3}\n\
             \x20   descriptors:\n\
             \x20     - key: ip\n\
             \x20       rate_limit: {unlimited: true}\n\
             \x20 - key: plan\n\
             \x20   value: free\n",
        )
        .unwrap();
        let rules = Rules::new(HashMap::from([(domain, tree)]));
        assert_eq!(
            dump(&rules),
            "shop.path_/login: unit=WEEK requests_per_unit=3, shadow_mode: true, quota_mode: false\n\
             shop.path_/login.ip: unit=UNKNOWN requests_per_unit=0, shadow_mode: false, quota_mode: false\n\
             shop.user: unit=MINUTE requests_per_unit=10, shadow_mode: false, quota_mode: false\n"
        );
        assert_eq!(dump(&Rules::not_loaded()), "");
    }
}
