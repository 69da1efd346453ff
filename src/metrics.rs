//! Prometheus metrics: few, named once, bounded labels.
//!
//! Each [`Server`](crate::Server) owns its own recorder (no process-global
//! state), rendered by the admin port's `/metrics`. Labels are `surface`,
//! `domain` (configured domains only; anything else is `unknown`), `decision`,
//! `rule` (the rule's path in the config — never a runtime value unless the
//! rule sets `detailed_metric`) and `backend`. Per-value series are capped
//! ([`DEFAULT_MAX_DETAILED_SERIES`] distinct values in all): past the cap a
//! value is counted under its rule's own path and in
//! `ratelimit_detailed_metric_folded_total`, so callers cannot grow memory
//! or `/metrics` by sending new values.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `ratelimit_requests_total` | counter | surface, domain, decision | RPCs answered: `allowed`, `denied`, `invalid` (bad request), `error` (store failure), `shed` (refused with `RESOURCE_EXHAUSTED`: too many in flight) |
//! | `ratelimit_rule_hits_total` | counter | domain, rule | hits evaluated against the rule |
//! | `ratelimit_rule_allowed_total` | counter | domain, rule | hits within the limit |
//! | `ratelimit_rule_denied_total` | counter | domain, rule | hits over the limit (shadow rules included) |
//! | `ratelimit_rule_near_limit_total` | counter | domain, rule | allowed hits that took the counter above 80 % of its limit |
//! | `ratelimit_rule_shadow_denied_total` | counter | domain, rule | over-limit hits of shadow-mode rules, let through |
//! | `ratelimit_global_shadow_total` | counter | surface, domain | requests over the limit let through by `--shadow-mode` |
//! | `ratelimit_storage_duration_seconds` | histogram | backend | store call latency |
//! | `ratelimit_storage_errors_total` | counter | backend, reason | failed store calls, by `reason`: `timeout`, `connection`, `backend` (the server's own error), `protocol` (a reply the request could not use: a bug), `circuit_open` (answered without calling the store) |
//! | `ratelimit_config_reloads_total` | counter | result | config changes applied (`success`) or refused (`failure`) |
//! | `ratelimit_degraded_total` | counter | policy | requests answered by the failure policy because the store failed |
//! | `ratelimit_over_limit_cache_hits_total` | counter | domain | descriptors denied from the over-limit cache, without a store call |
//! | `ratelimit_detailed_metric_folded_total` | counter | domain | descriptors of `detailed_metric` rules counted under the rule's path because the per-value series cap was reached |

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::metrics::{Counter, Key, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::algorithm::Outcome;
use crate::failure_policy::FailurePolicy;
use crate::rules::Rule;
use crate::rules::matcher::EntryRef;
use crate::store::StoreError;

/// RPCs answered.
pub const REQUESTS_TOTAL: &str = "ratelimit_requests_total";
/// Hits evaluated per rule.
pub const RULE_HITS_TOTAL: &str = "ratelimit_rule_hits_total";
/// Hits within the limit per rule.
pub const RULE_ALLOWED_TOTAL: &str = "ratelimit_rule_allowed_total";
/// Hits over the limit per rule.
pub const RULE_DENIED_TOTAL: &str = "ratelimit_rule_denied_total";
/// Allowed hits above 80 % of the limit per rule.
pub const RULE_NEAR_LIMIT_TOTAL: &str = "ratelimit_rule_near_limit_total";
/// Over-limit hits of shadow rules.
pub const RULE_SHADOW_DENIED_TOTAL: &str = "ratelimit_rule_shadow_denied_total";
/// Requests let through by global shadow mode.
pub const GLOBAL_SHADOW_TOTAL: &str = "ratelimit_global_shadow_total";
/// Store call latency.
pub const STORAGE_DURATION_SECONDS: &str = "ratelimit_storage_duration_seconds";
/// Failed store calls.
pub const STORAGE_ERRORS_TOTAL: &str = "ratelimit_storage_errors_total";
/// Config reloads.
pub const CONFIG_RELOADS_TOTAL: &str = "ratelimit_config_reloads_total";
/// Requests answered by the failure policy.
pub const DEGRADED_TOTAL: &str = "ratelimit_degraded_total";
/// Descriptors denied from the over-limit cache.
pub const OVER_LIMIT_CACHE_HITS_TOTAL: &str = "ratelimit_over_limit_cache_hits_total";
/// Descriptors of detailed rules folded into their rule's series.
pub const DETAILED_METRIC_FOLDED_TOTAL: &str = "ratelimit_detailed_metric_folded_total";

/// Default cap on distinct per-value (`detailed_metric`) rule labels.
pub const DEFAULT_MAX_DETAILED_SERIES: usize = 1_000;

/// Share of a limit above which allowed hits count as near the limit (as
/// envoyproxy/ratelimit's default `NEAR_LIMIT_RATIO`).
const NEAR_LIMIT_RATIO: f64 = 0.8;

/// Store latency buckets, in seconds: the interesting range is well under
/// Envoy's 20 ms timeout.
const STORAGE_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Which API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `ratekeeper.v1.RateLimiter/ShouldAllow`.
    ShouldAllow,
    /// `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.
    Envoy,
}

/// How a request ended, for `ratelimit_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestDecision {
    /// Every descriptor passed.
    Allowed,
    /// Some descriptor was over its limit.
    Denied,
    /// The request was malformed.
    Invalid,
    /// The store failed.
    Error,
    /// Refused unseen: too many requests in flight.
    Shed,
}

/// How a config reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The new rules are in force.
    Success,
    /// The change was refused; the old rules stay.
    Failure,
}

/// The metrics of one server: a cheap-to-clone handle.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// The per-value labels admitted so far, at most `max_detailed`; a std
    /// mutex, held for one set operation.
    detailed: Mutex<HashSet<String>>,
    max_detailed: usize,
}

// === impl Metrics ===

impl Metrics {
    /// A fresh registry with every metric described.
    pub fn new() -> Self {
        Self::with_max_detailed_series(DEFAULT_MAX_DETAILED_SERIES)
    }

    /// A fresh registry keeping at most `max` per-value rule labels.
    pub fn with_max_detailed_series(max: usize) -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(STORAGE_DURATION_SECONDS.to_owned()),
                STORAGE_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        let describe = |name: &'static str, unit: Option<Unit>, text: &'static str| {
            recorder.describe_counter(name.into(), unit, SharedString::const_str(text));
        };
        describe(
            REQUESTS_TOTAL,
            None,
            "RPCs answered, by surface, domain and decision.",
        );
        describe(RULE_HITS_TOTAL, None, "Hits evaluated against each rule.");
        describe(RULE_ALLOWED_TOTAL, None, "Hits within each rule's limit.");
        describe(RULE_DENIED_TOTAL, None, "Hits over each rule's limit.");
        describe(
            RULE_NEAR_LIMIT_TOTAL,
            None,
            "Allowed hits above 80% of each rule's limit.",
        );
        describe(
            RULE_SHADOW_DENIED_TOTAL,
            None,
            "Over-limit hits of shadow-mode rules, let through.",
        );
        describe(
            GLOBAL_SHADOW_TOTAL,
            None,
            "Over-limit requests let through by global shadow mode.",
        );
        describe(
            STORAGE_ERRORS_TOTAL,
            None,
            "Store calls that failed or timed out.",
        );
        recorder.describe_histogram(
            STORAGE_DURATION_SECONDS.into(),
            Some(Unit::Seconds),
            SharedString::const_str("Store call latency."),
        );
        describe(
            CONFIG_RELOADS_TOTAL,
            None,
            "Config changes applied or refused.",
        );
        describe(
            DEGRADED_TOTAL,
            None,
            "Requests answered by the failure policy because the store failed.",
        );
        describe(
            OVER_LIMIT_CACHE_HITS_TOTAL,
            None,
            "Descriptors denied from the over-limit cache without a store call.",
        );
        describe(
            DETAILED_METRIC_FOLDED_TOTAL,
            None,
            "Descriptors of detailed_metric rules counted under the rule's path: the per-value series cap was reached.",
        );
        let handle = recorder.handle();
        Self {
            inner: Arc::new(Inner {
                recorder,
                handle,
                detailed: Mutex::default(),
                max_detailed: max,
            }),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.inner.handle.render()
    }

    /// Counts one answered RPC.
    pub fn request(&self, surface: Surface, domain: DomainLabel<'_>, decision: RequestDecision) {
        let labels = vec![
            Label::new("surface", surface.as_str()),
            Label::new("domain", domain.to_string()),
            Label::new("decision", decision.as_str()),
        ];
        self.counter(REQUESTS_TOTAL, labels).increment(1);
    }

    /// Counts a request let through by global shadow mode.
    pub fn global_shadow(&self, surface: Surface, domain: DomainLabel<'_>) {
        let labels = vec![
            Label::new("surface", surface.as_str()),
            Label::new("domain", domain.to_string()),
        ];
        self.counter(GLOBAL_SHADOW_TOTAL, labels).increment(1);
    }

    /// Counts the hits of one descriptor against its rule.
    pub fn rule(
        &self,
        domain: &str,
        rule: &Rule,
        entries: &[EntryRef<'_>],
        hits: u64,
        capacity: u64,
        outcome: &Outcome,
    ) {
        let rule_label = if rule.detailed_metric {
            self.detailed_label(domain, rule, entries)
        } else {
            rule.path.clone()
        };
        let labels = || {
            vec![
                Label::new("domain", domain.to_owned()),
                Label::new("rule", rule_label.clone()),
            ]
        };
        self.counter(RULE_HITS_TOTAL, labels()).increment(hits);
        if outcome.allowed {
            self.counter(RULE_ALLOWED_TOTAL, labels()).increment(hits);
            let used = capacity.saturating_sub(outcome.remaining);
            let threshold = (capacity as f64 * NEAR_LIMIT_RATIO) as u64;
            let near = used.saturating_sub(threshold).min(hits);
            if near > 0 {
                self.counter(RULE_NEAR_LIMIT_TOTAL, labels())
                    .increment(near);
            }
        } else {
            self.counter(RULE_DENIED_TOTAL, labels()).increment(hits);
            if rule.shadow_mode {
                self.counter(RULE_SHADOW_DENIED_TOTAL, labels())
                    .increment(hits);
            }
        }
    }

    /// Records one store call, and its failure if it failed.
    pub fn store_call(&self, backend: &'static str, took: Duration, error: Option<&StoreError>) {
        let labels = vec![Label::new("backend", backend)];
        self.inner
            .recorder
            .register_histogram(
                &Key::from_parts(STORAGE_DURATION_SECONDS, labels.clone()),
                &METADATA,
            )
            .record(took.as_secs_f64());
        if let Some(error) = error {
            let mut labels = labels;
            labels.push(Label::new("reason", error.reason()));
            self.counter(STORAGE_ERRORS_TOTAL, labels).increment(1);
        }
    }

    /// Counts descriptors denied from the over-limit cache.
    pub fn over_limit_cache_hits(&self, domain: &str, count: u64) {
        self.counter(
            OVER_LIMIT_CACHE_HITS_TOTAL,
            vec![Label::new("domain", domain.to_owned())],
        )
        .increment(count);
    }

    /// Counts a request answered by the failure policy.
    pub fn degraded(&self, policy: FailurePolicy) {
        self.counter(DEGRADED_TOTAL, vec![Label::new("policy", policy.as_str())])
            .increment(1);
    }

    /// Counts one config reload.
    pub fn config_reload(&self, result: ReloadResult) {
        let result = match result {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        };
        self.counter(CONFIG_RELOADS_TOTAL, vec![Label::new("result", result)])
            .increment(1);
    }

    /// The per-value label, while the cap allows a new one; else the
    /// rule's own path, counted as folded.
    fn detailed_label(&self, domain: &str, rule: &Rule, entries: &[EntryRef<'_>]) -> String {
        let label = detailed_path(domain, entries);
        let admitted = {
            let mut admitted = self
                .inner
                .detailed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            admitted.contains(&label)
                || (admitted.len() < self.inner.max_detailed && admitted.insert(label.clone()))
        };
        if admitted {
            return label;
        }
        self.counter(
            DETAILED_METRIC_FOLDED_TOTAL,
            vec![Label::new("domain", domain.to_owned())],
        )
        .increment(1);
        rule.path.clone()
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.inner
            .recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The `domain` label: the domain when it is configured, else `unknown`, so
/// callers cannot create label values at will.
#[derive(Debug, Clone, Copy)]
pub enum DomainLabel<'a> {
    /// A configured domain.
    Known(&'a str),
    /// Anything else (including requests refused before the lookup).
    Unknown,
}

impl std::fmt::Display for DomainLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainLabel::Known(domain) => f.write_str(domain),
            DomainLabel::Unknown => f.write_str("unknown"),
        }
    }
}

// === impl Surface, RequestDecision ===

impl Surface {
    fn as_str(self) -> &'static str {
        match self {
            Surface::ShouldAllow => "should_allow",
            Surface::Envoy => "envoy",
        }
    }
}

impl RequestDecision {
    fn as_str(self) -> &'static str {
        match self {
            RequestDecision::Allowed => "allowed",
            RequestDecision::Denied => "denied",
            RequestDecision::Invalid => "invalid",
            RequestDecision::Shed => "shed",
            RequestDecision::Error => "error",
        }
    }
}

/// `domain.key1_value1.key2_value2` with the runtime values: the per-value
/// label a rule opts into with `detailed_metric`.
fn detailed_path(domain: &str, entries: &[EntryRef<'_>]) -> String {
    let mut path = domain.to_owned();
    for entry in entries {
        path.push('.');
        path.push_str(entry.key);
        if !entry.value.is_empty() {
            path.push('_');
            path.push_str(entry.value);
        }
    }
    path
}
