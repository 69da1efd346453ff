//! Prometheus metrics: few, named once, bounded labels.
//!
//! Each [`Server`](crate::Server) owns its own recorder (no process-global
//! state), rendered by the admin port's `/metrics`. Labels are `surface`,
//! `domain` (configured domains only; anything else is `unknown`), `decision`,
//! `rule` (the rule's stats key, as envoyproxy/ratelimit names its per-rule
//! stats: its path in the config, with runtime values only where the config
//! asks for them — `detailed_metric`, `value_to_metric` — or for a
//! request-supplied limit override; see [`stats_key`]) and `backend`.
//! Per-value series are capped ([`DEFAULT_MAX_DETAILED_SERIES`] distinct keys
//! in all): past the cap a descriptor is counted under its rule's own path
//! and in `ratelimit_detailed_metric_folded_total`, so callers cannot grow
//! memory or `/metrics` by sending new values.
//!
//! The per-rule counters split each descriptor's hits as upstream's
//! `total_hits`, `within_limit`, `near_limit`, `over_limit`,
//! `over_limit_with_local_cache` and `shadow_mode` do ([`RuleCounts`]):
//! a request that crosses the limit counts only its hits past the limit as
//! over, and those between the near-limit threshold
//! (`floor(limit × --near-limit-ratio)`) and the limit as near.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `ratelimit_requests_total` | counter | surface, domain, decision | RPCs answered: `allowed`, `denied`, `invalid` (bad request), `error` (store failure), `shed` (refused with `RESOURCE_EXHAUSTED`: too many in flight) |
//! | `ratelimit_rule_hits_total` | counter | domain, rule | hits evaluated against the rule (`total_hits`) |
//! | `ratelimit_rule_allowed_total` | counter | domain, rule | hits of descriptors within the limit (`within_limit`) |
//! | `ratelimit_rule_denied_total` | counter | domain, rule | hits past the limit, shadow rules included (`over_limit`) |
//! | `ratelimit_rule_near_limit_total` | counter | domain, rule | hits between the near-limit threshold and the limit (`near_limit`) |
//! | `ratelimit_rule_denied_from_cache_total` | counter | domain, rule | hits denied from the over-limit cache, also in `ratelimit_rule_denied_total` (`over_limit_with_local_cache`) |
//! | `ratelimit_rule_shadow_denied_total` | counter | domain, rule | hits past the limit of shadow-mode rules, let through (`shadow_mode`) |
//! | `ratelimit_global_shadow_total` | counter | surface, domain | requests over the limit let through by `--shadow-mode` |
//! | `ratelimit_storage_duration_seconds` | histogram | backend | store call latency |
//! | `ratelimit_storage_errors_total` | counter | backend, reason | failed store calls, by `reason`: `timeout`, `connection`, `backend` (the server's own error), `protocol` (a reply the request could not use: a bug), `circuit_open` (answered without calling the store) |
//! | `ratelimit_config_reloads_total` | counter | result | config changes applied (`success`) or refused (`failure`) |
//! | `ratelimit_degraded_total` | counter | policy | requests answered by the failure policy because the store failed |
//! | `ratelimit_over_limit_cache_hits_total` | counter | domain | descriptors denied from the over-limit cache, without a store call |
//! | `ratelimit_overrides` | gauge | | runtime overrides in force on this instance |
//! | `ratelimit_overrides_refresh_errors_total` | counter | | failed reads of the overrides store (the last overrides loaded stay in force) |
//! | `ratelimit_admin_writes_total` | counter | operation | admin API writes: `put_override`, `delete_override`, `reset` |
//! | `ratelimit_reservations_total` | counter | event | reservations `reserved` (opened by an admitted `ShouldAllow` with a TTL), `settled` (by `Settle`; retries not counted) and `expired` (found unsettled past their TTL: charged at their estimate) |
//! | `ratelimit_detailed_metric_folded_total` | counter | domain | descriptors whose stats key carries runtime values, counted under the rule's path because the per-value series cap was reached |
//!
//! The concurrency leases' metrics are in [`crate::lease::metrics`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::metrics::{Counter, Key, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::algorithm::Outcome;
use crate::failure_policy::FailurePolicy;
use crate::rules::matcher::EntryRef;
use crate::rules::stats_key::sanitise;
use crate::rules::{Rule, StatsKey, stats_key};
use crate::store::StoreError;

mod handles;

/// RPCs answered.
pub const REQUESTS_TOTAL: &str = "ratelimit_requests_total";
/// Hits evaluated per rule.
pub const RULE_HITS_TOTAL: &str = "ratelimit_rule_hits_total";
/// Hits within the limit per rule.
pub const RULE_ALLOWED_TOTAL: &str = "ratelimit_rule_allowed_total";
/// Hits over the limit per rule.
pub const RULE_DENIED_TOTAL: &str = "ratelimit_rule_denied_total";
/// Hits near the limit per rule.
pub const RULE_NEAR_LIMIT_TOTAL: &str = "ratelimit_rule_near_limit_total";
/// Hits denied from the over-limit cache per rule.
pub const RULE_DENIED_FROM_CACHE_TOTAL: &str = "ratelimit_rule_denied_from_cache_total";
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
/// Reservations reserved, settled and expired.
pub const RESERVATIONS_TOTAL: &str = "ratelimit_reservations_total";

/// Runtime overrides in force.
pub const OVERRIDES: &str = "ratelimit_overrides";
/// Failed reads of the overrides store.
pub const OVERRIDES_REFRESH_ERRORS_TOTAL: &str = "ratelimit_overrides_refresh_errors_total";
/// Admin API writes.
pub const ADMIN_WRITES_TOTAL: &str = "ratelimit_admin_writes_total";

/// Default cap on distinct per-value (`detailed_metric`) rule labels.
pub const DEFAULT_MAX_DETAILED_SERIES: usize = 1_000;

/// Store calls recorded between two drains of the latency histogram.
///
/// The Prometheus recorder buffers each histogram sample until its upkeep
/// or a scrape folds them into the buckets: with neither, a server grew by
/// 16–20 bytes a store call for as long as it ran (1 MiB/s at 50,000
/// req/s). Draining every few thousand calls bounds the buffer, and spreads
/// the bucketing a scrape would otherwise do at once for every call since
/// the last one (about 5 ns each: a scrape after 16 s at 50,000 req/s took
/// 4.0–4.6 ms, 0.5–0.8 ms with these drains; BENCHMARKS.md) into drains of
/// about 20 µs, one call in 4,096 paying for one.
const DRAIN_EVERY: u32 = 4_096;

/// Default share of a limit above which hits count as near the limit
/// (envoyproxy/ratelimit's default `NEAR_LIMIT_RATIO`).
pub const DEFAULT_NEAR_LIMIT_RATIO: f32 = 0.8;

/// How a server's metrics are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricsSettings {
    /// Most distinct per-value rule keys (`--max-detailed-metric-series`).
    pub max_detailed_series: usize,
    /// Share (0 to 1) of a limit past which hits are near it
    /// (`--near-limit-ratio`).
    pub near_limit_ratio: f32,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            max_detailed_series: DEFAULT_MAX_DETAILED_SERIES,
            near_limit_ratio: DEFAULT_NEAR_LIMIT_RATIO,
        }
    }
}

/// Where a descriptor's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerSource {
    /// The store (or the failure policy standing in for it).
    Store,
    /// The over-limit cache, without a store call.
    OverLimitCache,
}

/// How one descriptor's hits split between the per-rule counters, as
/// envoyproxy/ratelimit splits them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounts {
    /// Every hit (`total_hits`).
    pub total: u64,
    /// Hits of a descriptor within its limit (`within_limit`).
    pub within: u64,
    /// Hits above the near-limit threshold and at most the limit (`near_limit`).
    pub near: u64,
    /// Hits past the limit (`over_limit`).
    pub over: u64,
    /// Hits denied from the over-limit cache (`over_limit_with_local_cache`).
    pub over_from_cache: u64,
    /// Hits past the limit of a shadow-mode rule (`shadow_mode`).
    pub shadow: u64,
}

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
    near_limit_ratio: f32,
    /// The series counted per request, registered once.
    handles: handles::Handles,
    /// Store calls recorded (wrapping): which of them drains the histogram.
    recorded: AtomicU32,
}

// === impl Metrics ===

impl Metrics {
    /// A fresh registry with every metric described.
    pub fn new() -> Self {
        Self::with_max_detailed_series(DEFAULT_MAX_DETAILED_SERIES)
    }

    /// A fresh registry keeping at most `max` per-value rule labels.
    pub fn with_max_detailed_series(max: usize) -> Self {
        Self::with_settings(MetricsSettings {
            max_detailed_series: max,
            ..MetricsSettings::default()
        })
    }

    /// A fresh registry kept as `settings` say.
    pub fn with_settings(settings: MetricsSettings) -> Self {
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
        describe(
            RULE_ALLOWED_TOTAL,
            None,
            "Hits of descriptors within each rule's limit.",
        );
        describe(RULE_DENIED_TOTAL, None, "Hits past each rule's limit.");
        describe(
            RULE_NEAR_LIMIT_TOTAL,
            None,
            "Hits between each rule's near-limit threshold and its limit.",
        );
        describe(
            RULE_DENIED_FROM_CACHE_TOTAL,
            None,
            "Hits denied from the over-limit cache, without a store call.",
        );
        describe(
            RULE_SHADOW_DENIED_TOTAL,
            None,
            "Hits past the limit of shadow-mode rules, let through.",
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
            "Descriptors counted under their rule's path instead of a per-value key: the per-value series cap was reached.",
        );
        crate::lease::metrics::describe(&recorder);
        recorder.describe_gauge(
            OVERRIDES.into(),
            None,
            SharedString::const_str("Runtime overrides in force on this instance."),
        );
        describe(
            OVERRIDES_REFRESH_ERRORS_TOTAL,
            None,
            "Failed reads of the overrides store; the last overrides loaded stay in force.",
        );
        describe(ADMIN_WRITES_TOTAL, None, "Admin API writes, by operation.");
        describe(
            RESERVATIONS_TOTAL,
            None,
            "Reservations reserved, settled, and expired unsettled (charged at their estimate).",
        );
        let handle = recorder.handle();
        Self {
            inner: Arc::new(Inner {
                recorder,
                handle,
                detailed: Mutex::default(),
                max_detailed: settings.max_detailed_series,
                near_limit_ratio: settings.near_limit_ratio,
                handles: handles::Handles::default(),
                recorded: AtomicU32::new(0),
            }),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.inner.handle.render()
    }

    /// Counts one answered RPC.
    pub fn request(&self, surface: Surface, domain: DomainLabel<'_>, decision: RequestDecision) {
        let domain = domain.as_str();
        let slot = request_slot(surface, decision);
        self.inner.handles.requests(domain, |series| {
            series[slot]
                .get_or_init(|| {
                    let labels = vec![
                        Label::new("surface", surface.as_str()),
                        Label::new("domain", domain.to_owned()),
                        Label::new("decision", decision.as_str()),
                    ];
                    self.counter(REQUESTS_TOTAL, labels)
                })
                .increment(1)
        });
    }

    /// Counts a request let through by global shadow mode.
    pub fn global_shadow(&self, surface: Surface, domain: DomainLabel<'_>) {
        let labels = vec![
            Label::new("surface", surface.as_str()),
            Label::new("domain", domain.to_string()),
        ];
        self.counter(GLOBAL_SHADOW_TOTAL, labels).increment(1);
    }

    /// Counts the hits of one descriptor against its rule; `capacity` is
    /// what the counter holds (the limit, or a token bucket's burst).
    #[allow(clippy::too_many_arguments)]
    pub fn rule(
        &self,
        domain: &str,
        rule: &Rule,
        entries: &[EntryRef<'_>],
        hits: u64,
        capacity: u64,
        outcome: &Outcome,
        source: AnswerSource,
    ) {
        let counts = RuleCounts::split(
            hits,
            capacity,
            near_limit_threshold(capacity, self.inner.near_limit_ratio),
            outcome,
            source,
            rule.shadow_mode,
        );
        let recorder = &self.inner.recorder;
        // A rule whose stats key has no runtime value in it keeps its
        // counters; the others are looked up per request (and capped).
        if stats_key::is_static(rule) {
            let make = || match stats_key(domain, rule, entries) {
                StatsKey::Rule(label) => Some(handles::RuleSeries::new(recorder, domain, label)),
                // Matched from another domain than its own (rare): named
                // per request.
                StatsKey::PerValue(_) => None,
            };
            let add = |series: &handles::RuleSeries| series.add(recorder, &counts);
            if self.inner.handles.rule(domain, &rule.path, make, add) {
                return;
            }
        }
        let label = match stats_key(domain, rule, entries) {
            StatsKey::Rule(key) => key,
            StatsKey::PerValue(key) => self.per_value_label(domain, rule, key),
        };
        handles::RuleSeries::new(recorder, domain, label).add(recorder, &counts);
    }

    /// Records one store call, and its failure if it failed.
    pub fn store_call(&self, backend: &'static str, took: Duration, error: Option<&StoreError>) {
        let register = || {
            let labels = vec![Label::new("backend", backend)];
            let key = Key::from_parts(STORAGE_DURATION_SECONDS, labels);
            self.inner.recorder.register_histogram(&key, &METADATA)
        };
        let record = |histogram: &::metrics::Histogram| histogram.record(took.as_secs_f64());
        self.inner.handles.storage(backend, register, record);
        // One caller in DRAIN_EVERY drains (u32 wraps at a multiple of it).
        if self.inner.recorded.fetch_add(1, Ordering::Relaxed) % DRAIN_EVERY == DRAIN_EVERY - 1 {
            self.inner.handle.run_upkeep();
        }
        if let Some(error) = error {
            let labels = vec![
                Label::new("backend", backend),
                Label::new("reason", error.reason()),
            ];
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

    /// Counts `count` reservation events (`reserved`, `settled`, `expired`).
    pub fn reservations(&self, event: &'static str, count: u64) {
        if count > 0 {
            self.counter(RESERVATIONS_TOTAL, vec![Label::new("event", event)])
                .increment(count);
        }
    }

    /// Counts a request answered by the failure policy.
    pub fn degraded(&self, policy: FailurePolicy) {
        self.counter(DEGRADED_TOTAL, vec![Label::new("policy", policy.as_str())])
            .increment(1);
    }

    /// Sets the number of overrides in force.
    pub fn overrides(&self, count: usize) {
        self.inner
            .recorder
            .register_gauge(&Key::from_name(OVERRIDES), &METADATA)
            .set(count as f64);
    }

    /// Counts a failed read of the overrides store.
    pub fn overrides_refresh_error(&self) {
        self.counter(OVERRIDES_REFRESH_ERRORS_TOTAL, Vec::new())
            .increment(1);
    }

    /// Counts one admin API write.
    pub fn admin_write(&self, operation: &'static str) {
        self.counter(ADMIN_WRITES_TOTAL, vec![Label::new("operation", operation)])
            .increment(1);
    }

    /// Counts one config reload.
    pub fn config_reload(&self, result: ReloadResult) {
        let result = match result {
            ReloadResult::Success => {
                // Counters of rules that may be gone are not kept.
                self.inner.handles.forget_rules();
                "success"
            }
            ReloadResult::Failure => "failure",
        };
        self.counter(CONFIG_RELOADS_TOTAL, vec![Label::new("result", result)])
            .increment(1);
    }

    /// The per-value label, while the cap allows a new one; else the
    /// rule's own path, counted as folded.
    fn per_value_label(&self, domain: &str, rule: &Rule, label: String) -> String {
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
        sanitise(&rule.path)
    }

    /// The recorder, for metrics registered outside this module (leases).
    pub(crate) fn recorder(&self) -> &PrometheusRecorder {
        &self.inner.recorder
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

impl<'a> DomainLabel<'a> {
    /// The label's value.
    pub fn as_str(&self) -> &'a str {
        match self {
            DomainLabel::Known(domain) => domain,
            DomainLabel::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for DomainLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Surface, RequestDecision ===

/// Where the counter of `surface` and `decision` is kept among a domain's
/// request counters.
fn request_slot(surface: Surface, decision: RequestDecision) -> usize {
    surface.index() * RequestDecision::COUNT + decision.index()
}

impl Surface {
    const COUNT: usize = 2;

    fn index(self) -> usize {
        match self {
            Surface::ShouldAllow => 0,
            Surface::Envoy => 1,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Surface::ShouldAllow => "should_allow",
            Surface::Envoy => "envoy",
        }
    }
}

impl RequestDecision {
    const COUNT: usize = 5;

    fn index(self) -> usize {
        match self {
            RequestDecision::Allowed => 0,
            RequestDecision::Denied => 1,
            RequestDecision::Invalid => 2,
            RequestDecision::Error => 3,
            RequestDecision::Shed => 4,
        }
    }

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

/// `floor(capacity × ratio)`, computed in single precision as upstream
/// computes it (so the thresholds agree with its stats to the hit).
fn near_limit_threshold(capacity: u64, ratio: f32) -> u64 {
    (capacity as f32 * ratio).floor() as u64
}

// === impl RuleCounts ===

impl RuleCounts {
    /// Splits `hits` judged with `outcome` against `capacity`; hits past
    /// `near_threshold` and at most the capacity are near the limit.
    pub fn split(
        hits: u64,
        capacity: u64,
        near_threshold: u64,
        outcome: &Outcome,
        source: AnswerSource,
        shadow_rule: bool,
    ) -> Self {
        let mut counts = RuleCounts {
            total: hits,
            ..Self::default()
        };
        let before = outcome.used_before;
        let after = before.saturating_add(hits);
        if source == AnswerSource::OverLimitCache {
            counts.over = hits;
            counts.over_from_cache = hits;
        } else if outcome.allowed {
            counts.within = hits;
            if after > near_threshold {
                counts.near = after - before.max(near_threshold);
            }
        } else if before >= capacity || after <= capacity {
            // Already over before these hits (or an answer that says nothing
            // about the count): every hit is over.
            counts.over = hits;
        } else {
            counts.over = after - capacity;
            counts.near = capacity - before.max(near_threshold);
        }
        if shadow_rule && !outcome.allowed {
            counts.shadow = counts.over;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(allowed: bool, used_before: u64) -> Outcome {
        Outcome {
            allowed,
            remaining: 0,
            reset_after_ms: 1_000,
            retry_after_ms: None,
            used_before,
        }
    }

    fn split(hits: u64, before: u64, allowed: bool) -> RuleCounts {
        // Limit 10 at upstream's default ratio: near above 8.
        let threshold = near_limit_threshold(10, DEFAULT_NEAR_LIMIT_RATIO);
        RuleCounts::split(
            hits,
            10,
            threshold,
            &outcome(allowed, before),
            AnswerSource::Store,
            false,
        )
    }

    /// The value of the series of `name` with every label of `labels`.
    fn series(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        body.lines()
            .filter(|line| line.starts_with(&format!("{name}{{")))
            .find(|line| {
                labels
                    .iter()
                    .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
            })
            .and_then(|line| line.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    }

    #[test]
    fn every_surface_and_decision_has_its_own_request_counter() {
        let surfaces = [Surface::ShouldAllow, Surface::Envoy];
        let decisions = [
            RequestDecision::Allowed,
            RequestDecision::Denied,
            RequestDecision::Invalid,
            RequestDecision::Error,
            RequestDecision::Shed,
        ];
        let mut slots: Vec<usize> = surfaces
            .iter()
            .flat_map(|&s| decisions.iter().map(move |&d| request_slot(s, d)))
            .collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots, (0..handles::REQUEST_SLOTS).collect::<Vec<_>>());

        let metrics = Metrics::new();
        for _ in 0..2 {
            metrics.request(
                Surface::Envoy,
                DomainLabel::Known("m"),
                RequestDecision::Allowed,
            );
        }
        metrics.request(
            Surface::ShouldAllow,
            DomainLabel::Known("m"),
            RequestDecision::Denied,
        );
        metrics.request(
            Surface::Envoy,
            DomainLabel::Unknown,
            RequestDecision::Invalid,
        );
        let body = metrics.render();
        let requests = |surface, domain, decision| {
            let labels = [
                ("surface", surface),
                ("domain", domain),
                ("decision", decision),
            ];
            series(&body, REQUESTS_TOTAL, &labels)
        };
        assert_eq!(requests("envoy", "m", "allowed"), 2.0);
        assert_eq!(requests("should_allow", "m", "denied"), 1.0);
        assert_eq!(requests("envoy", "unknown", "invalid"), 1.0);
        assert_eq!(requests("should_allow", "m", "allowed"), 0.0);
    }

    #[test]
    fn a_rules_counters_count_on_across_reloads_and_apart_per_domain() {
        use crate::rules::{LevelMatch, Limit, StatsLevel, StatsPath, Unit};
        let mut rule = Rule::from_override("m", Limit::fixed(10, Unit::Minute));
        rule.stats = StatsPath::Levels(vec![StatsLevel {
            key: "user".into(),
            segment: "user".into(),
            matched: LevelMatch::KeyOnly,
            value_to_metric: false,
            shared: false,
        }]);
        rule.path = "m.user".into();
        let entries = [EntryRef {
            key: "user",
            value: "a",
        }];
        let metrics = Metrics::new();
        let count = |domain: &str, allowed: bool| {
            let outcome = outcome(allowed, if allowed { 0 } else { 10 });
            metrics.rule(
                domain,
                &rule,
                &entries,
                1,
                10,
                &outcome,
                AnswerSource::Store,
            );
        };
        count("m", true);
        count("m", true);
        metrics.config_reload(ReloadResult::Success);
        count("m", false);
        // The same rule matched in another domain has that domain's key.
        count("n", true);
        let body = metrics.render();
        let rule_series =
            |name, domain, key| series(&body, name, &[("domain", domain), ("rule", key)]);
        assert_eq!(rule_series(RULE_HITS_TOTAL, "m", "m.user"), 3.0);
        assert_eq!(rule_series(RULE_ALLOWED_TOTAL, "m", "m.user"), 2.0);
        assert_eq!(rule_series(RULE_DENIED_TOTAL, "m", "m.user"), 1.0);
        assert_eq!(rule_series(RULE_HITS_TOTAL, "n", "n.user"), 1.0);
        assert_eq!(rule_series(RULE_HITS_TOTAL, "n", "m.user"), 0.0);
    }

    #[test]
    fn hits_split_as_upstream_splits_them() {
        assert_eq!(near_limit_threshold(10, 0.8), 8);
        assert_eq!(near_limit_threshold(5, 0.8), 4);
        assert_eq!(near_limit_threshold(3, 0.8), 2);
        assert_eq!(near_limit_threshold(10, 1.0), 10);
        assert_eq!(near_limit_threshold(10, 0.0), 0);
        // Upstream's worked example: 11 single hits on a limit of 10.
        let mut sum = RuleCounts::default();
        for count in 0..11 {
            let c = split(1, count, count < 10);
            sum.total += c.total;
            sum.within += c.within;
            sum.near += c.near;
            sum.over += c.over;
        }
        assert_eq!((sum.total, sum.within, sum.near, sum.over), (11, 10, 2, 1));
        // One request of 5 at 7: 2 over, 2 near (9 and 10), none within.
        let c = split(5, 7, false);
        assert_eq!((c.within, c.near, c.over), (0, 2, 2));
        // Allowed from 6 to 9: only 9 is near.
        let c = split(3, 6, true);
        assert_eq!((c.within, c.near, c.over), (3, 1, 0));
        // Already over: every hit is over, none near.
        let c = split(4, 12, false);
        assert_eq!((c.near, c.over), (0, 4));
        // A check (0 hits) counts nothing.
        assert_eq!(split(0, 10, true).near, 0);
    }

    #[test]
    fn cached_and_shadow_denials_are_counted_apart() {
        let cached = RuleCounts::split(
            3,
            10,
            8,
            &outcome(false, 10),
            AnswerSource::OverLimitCache,
            true,
        );
        assert_eq!(
            cached,
            RuleCounts {
                total: 3,
                over: 3,
                over_from_cache: 3,
                shadow: 3,
                ..RuleCounts::default()
            }
        );
        let shadow = RuleCounts::split(5, 10, 8, &outcome(false, 7), AnswerSource::Store, true);
        assert_eq!((shadow.over, shadow.near, shadow.shadow), (2, 2, 2));
    }
}
