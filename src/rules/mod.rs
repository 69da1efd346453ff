//! The loaded rules and how a request descriptor finds its limit.
//!
//! [`Rules`] is an immutable value built once by the config loader: one lookup
//! tree per domain ([`matcher`]). Matching is pure and follows
//! envoyproxy/ratelimit exactly: level by level, exact value before wildcard
//! before key-only, no backtracking, and only the node reached by the last
//! entry may carry the limit. [`key`] turns a match into the storage key of its
//! counter, or [`envoy_key`] into envoyproxy/ratelimit's, as the store's
//! [`KeyLayout`] says. Nothing here is async or reads a clock.

pub mod concurrency;
pub mod envoy_key;
pub mod key;
pub mod layout;
pub mod matcher;
pub mod multi;
pub mod stats_key;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

pub use concurrency::ConcurrencyLimit;
pub use layout::KeyLayout;
pub use matcher::{DescriptorTree, Node};
pub use stats_key::{LevelMatch, StatsKey, StatsLevel, StatsPath, stats_key};

use crate::algorithm::{AlgorithmKind, Quota};
use crate::failure_policy::FailurePolicy;

/// Largest number of hits a limit may admit per window. Counts are kept far
/// below 2^53 so the Redis scripts (Lua numbers are doubles) stay exact.
pub const MAX_REQUESTS_PER_UNIT: u64 = u32::MAX as u64;

/// The unit of a limit's period, with envoyproxy/ratelimit's lengths (MONTH is
/// 30 days and YEAR 365 days, counted from the Unix epoch, not the calendar).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// 1 second.
    Second,
    /// 60 seconds.
    Minute,
    /// 3,600 seconds.
    Hour,
    /// 86,400 seconds.
    Day,
    /// 7 days.
    Week,
    /// 30 days.
    Month,
    /// 365 days.
    Year,
}

/// Longest window a limit may have: ten 365-day years.
pub const MAX_WINDOW_SECONDS: u64 = 10 * 31_536_000;

/// A finite limit: `requests_per_unit` hits per `unit_multiplier` × `unit`,
/// counted by `algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Hits admitted per window (for the token bucket: the refill per window).
    pub requests_per_unit: u64,
    /// The unit of the window.
    pub unit: Unit,
    /// How many units one window spans (at least 1).
    pub unit_multiplier: u64,
    /// How hits are counted.
    pub algorithm: AlgorithmKind,
    /// Token bucket capacity; `None` means `requests_per_unit`. Only the
    /// token bucket has one.
    pub burst: Option<u64>,
}

/// What a rule does with the descriptors it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleLimit {
    /// Count against this limit.
    Limited(Limit),
    /// Always allow, never count.
    Unlimited,
    /// Cap the permits held at once (leases; see [`crate::lease`]). Not
    /// counted by `ShouldAllow`.
    Concurrency(ConcurrencyLimit),
}

/// A descriptor's `metadata`: a JSON-like map, returned in Envoy's dynamic
/// metadata (`--response-dynamic-metadata`) while the descriptor is within
/// its limit, and shown by `/rules`.
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// One configured (or request-supplied) limit, with everything needed to
/// decide and report on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The `rate_limit.name`, used by `replaces` and echoed in responses.
    pub name: Option<String>,
    /// The limit itself; with several limits (`rate_limits`), the first.
    pub limit: RuleLimit,
    /// The limits after the first of a descriptor with several
    /// (`rate_limits`), each counted in its own key; empty otherwise. A
    /// request passes only when every limit admits it (see [`multi`]).
    pub extra_limits: Vec<Limit>,
    /// Names of rules this one replaces when both match one request.
    pub replaces: Vec<String>,
    /// Counted and reported, but never denies the request.
    pub shadow_mode: bool,
    /// Report per-value metrics for this rule (kept for metrics; no effect on decisions).
    pub detailed_metric: bool,
    /// envoyproxy/ratelimit's `quota_mode`: on the Envoy API, an over-limit
    /// descriptor of this rule denies its request only when every quota
    /// descriptor of the request is over its limit.
    pub quota_mode: bool,
    /// The descriptor's `metadata`, if it has any.
    pub metadata: Option<Arc<Metadata>>,
    /// How the rule's metrics are named (its stats key, see [`stats_key`]).
    pub stats: StatsPath,
    /// Human-readable location of the rule: `domain.key_value.key`.
    pub path: String,
    /// The file the rule came from; empty for a request-supplied override.
    pub source: Arc<str>,
    /// Per descriptor level, the wildcard pattern that replaces the runtime
    /// value in the counter key (`share_threshold: true`), else `None`.
    pub shared_values: Vec<Option<String>>,
    /// What to answer for this rule when the store fails; `None` follows the
    /// service's `--failure-policy`.
    pub failure_policy: Option<FailurePolicy>,
}

/// All loaded rules: the domain trees, by domain name.
#[derive(Debug, Default, Clone)]
pub struct Rules {
    domains: HashMap<String, DescriptorTree>,
    /// No configuration has loaded yet: the upstream mode serves this way
    /// after a first config that did not load, and every decision fails
    /// until one does (as envoyproxy/ratelimit). `false` for every loaded
    /// set, empty or not.
    unloaded: bool,
    /// The RLQS rules (the files' `rlqs:` sections).
    rlqs: Arc<crate::rlqs::RlqsRules>,
}

// === impl Unit ===

impl Unit {
    /// Every unit, shortest first.
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// Length of the unit in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 604_800,
            Unit::Month => 2_592_000,
            Unit::Year => 31_536_000,
        }
    }

    /// The unit's name as written in config (lowercase).
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// Parses a unit name, case-insensitively, as envoyproxy/ratelimit does.
    pub fn parse(name: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|unit| unit.as_str().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Limit ===

impl Limit {
    /// A fixed window limit of `requests_per_unit` per one `unit`, as
    /// envoyproxy/ratelimit has it.
    pub fn fixed(requests_per_unit: u64, unit: Unit) -> Self {
        Self {
            requests_per_unit,
            unit,
            unit_multiplier: 1,
            algorithm: AlgorithmKind::FixedWindow,
            burst: None,
        }
    }

    /// Length of the window in milliseconds. The loader keeps it at most
    /// [`MAX_WINDOW_SECONDS`], so this cannot overflow.
    pub fn window_ms(&self) -> u64 {
        self.unit.seconds() * self.unit_multiplier * 1_000
    }

    /// The parameters the algorithm needs.
    pub fn quota(&self) -> Quota {
        Quota {
            limit: self.requests_per_unit,
            window_ms: self.window_ms(),
            burst: self.burst.unwrap_or(self.requests_per_unit),
        }
    }
}

// === impl Rule ===

impl Rule {
    /// The rule a request-supplied limit override stands for: no name, never
    /// shadow or quota, no metadata, matched regardless of the configuration.
    pub fn from_override(domain: &str, limit: Limit) -> Self {
        Self {
            name: None,
            limit: RuleLimit::Limited(limit),
            extra_limits: Vec::new(),
            replaces: Vec::new(),
            shadow_mode: false,
            detailed_metric: false,
            quota_mode: false,
            metadata: None,
            stats: StatsPath::Override,
            path: format!("{domain}.<override>"),
            source: Arc::from(""),
            shared_values: Vec::new(),
            failure_policy: None,
        }
    }

    /// The finite limit, unless the rule is unlimited.
    pub fn limited(&self) -> Option<&Limit> {
        match &self.limit {
            RuleLimit::Limited(limit) => Some(limit),
            RuleLimit::Unlimited | RuleLimit::Concurrency(_) => None,
        }
    }

    /// The concurrency limit, if this is a concurrency rule.
    pub fn concurrency(&self) -> Option<&ConcurrencyLimit> {
        match &self.limit {
            RuleLimit::Concurrency(limit) => Some(limit),
            RuleLimit::Limited(_) | RuleLimit::Unlimited => None,
        }
    }

    /// Every finite limit of the rule, the first one first: none for an
    /// unlimited rule, one for `rate_limit`, several for `rate_limits`.
    pub fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.limited().into_iter().chain(&self.extra_limits)
    }
}

// === impl Rules ===

impl Rules {
    /// Rules made of the given domain trees.
    pub fn new(domains: HashMap<String, DescriptorTree>) -> Self {
        Self {
            domains,
            unloaded: false,
            rlqs: Arc::default(),
        }
    }

    /// These rules with `rlqs` as their RLQS rules.
    pub fn with_rlqs(mut self, rlqs: crate::rlqs::RlqsRules) -> Self {
        self.rlqs = Arc::new(rlqs);
        self
    }

    /// The RLQS rules.
    pub fn rlqs(&self) -> &crate::rlqs::RlqsRules {
        &self.rlqs
    }

    /// The state before any configuration has loaded: no domains, and
    /// [`Rules::is_loaded`] false.
    pub fn not_loaded() -> Self {
        Self {
            domains: HashMap::new(),
            unloaded: true,
            rlqs: Arc::default(),
        }
    }

    /// Whether these rules came from a configuration that loaded (possibly
    /// with no domain at all).
    pub fn is_loaded(&self) -> bool {
        !self.unloaded
    }

    /// The tree of `domain`, if it is configured.
    pub fn domain(&self, domain: &str) -> Option<&DescriptorTree> {
        self.domains.get(domain)
    }

    /// The configured domains, sorted by name.
    pub fn domains(&self) -> impl Iterator<Item = (&str, &DescriptorTree)> {
        let mut domains: Vec<_> = self.domains.iter().map(|(k, v)| (k.as_str(), v)).collect();
        domains.sort_by_key(|(name, _)| *name);
        domains.into_iter()
    }

    /// Every rule of every domain, for summaries.
    pub fn all_rules(&self) -> Vec<Arc<Rule>> {
        let mut rules: Vec<Arc<Rule>> = Vec::new();
        for (_, tree) in self.domains() {
            tree.collect_rules(&mut rules);
        }
        rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse_case_insensitively() {
        assert_eq!(Unit::parse("MINUTE"), Some(Unit::Minute));
        assert_eq!(Unit::parse("Second"), Some(Unit::Second));
        assert_eq!(Unit::parse("week"), Some(Unit::Week));
        assert_eq!(Unit::parse("minutes"), None);
        assert_eq!(Unit::parse(""), None);
        assert_eq!(Unit::parse("unknown"), None);
    }

    #[test]
    fn unit_lengths_match_envoy_ratelimit() {
        let seconds: Vec<u64> = Unit::ALL.iter().map(|u| u.seconds()).collect();
        assert_eq!(seconds, [1, 60, 3600, 86400, 604800, 2592000, 31536000]);
    }
}
