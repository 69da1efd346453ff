//! The series counted on every request, each registered once and then
//! reached by its handle.
//!
//! Registering a series hashes and compares its name and every label, and
//! building the labels allocates; done per request for the request counter,
//! the per-rule counters and the store latency, that was about 8 % of the
//! server's CPU at saturation (memory store). Here each series is looked up
//! by label values the request already holds (`&str`s, no allocation) and
//! registered the first time only; the work is done under the map's read
//! lock, so a request touches no shared reference count. Every map is
//! bounded by the config: the
//! domain label is a configured domain or `unknown`, the per-rule map holds
//! only rules whose stats key has no runtime value in it (emptied when the
//! config changes), and backends are a handful of constants.

use std::collections::HashMap;
use std::sync::{OnceLock, PoisonError, RwLock};

use ::metrics::{Counter, Histogram, Key, Label, Recorder};
use metrics_exporter_prometheus::PrometheusRecorder;

use super::{
    METADATA, RULE_ALLOWED_TOTAL, RULE_DENIED_FROM_CACHE_TOTAL, RULE_DENIED_TOTAL, RULE_HITS_TOTAL,
    RULE_NEAR_LIMIT_TOTAL, RULE_SHADOW_DENIED_TOTAL, RuleCounts,
};

/// The per-rule counters besides `ratelimit_rule_hits_total`, in the order
/// of [`RuleSeries::counts`]; each appears once it has something to count.
const RULE_SPLIT: [&str; 5] = [
    RULE_ALLOWED_TOTAL,
    RULE_NEAR_LIMIT_TOTAL,
    RULE_DENIED_TOTAL,
    RULE_DENIED_FROM_CACHE_TOTAL,
    RULE_SHADOW_DENIED_TOTAL,
];

/// Request counters of one domain label, by surface and decision (see
/// [`super::request_slot`]).
pub(super) type RequestSeries = [OnceLock<Counter>; REQUEST_SLOTS];
/// Surfaces × decisions.
pub(super) const REQUEST_SLOTS: usize = super::Surface::COUNT * super::RequestDecision::COUNT;

/// The handles of one server's metrics.
#[derive(Default)]
pub(super) struct Handles {
    /// `ratelimit_requests_total`, by domain label.
    requests: RwLock<HashMap<String, RequestSeries>>,
    /// Per-rule counters of rules with a static stats key, by domain and
    /// rule path.
    rules: RwLock<HashMap<String, HashMap<String, RuleSeries>>>,
    /// `ratelimit_storage_duration_seconds`, by backend.
    storage: RwLock<Vec<(&'static str, Histogram)>>,
}

impl Handles {
    /// Runs `f` on the request counters of `domain`, made the first time.
    pub(super) fn requests<R>(&self, domain: &str, f: impl FnOnce(&RequestSeries) -> R) -> R {
        if let Some(series) = read(&self.requests).get(domain) {
            return f(series);
        }
        let mut map = write(&self.requests);
        f(map.entry(domain.to_owned()).or_default())
    }

    /// Runs `f` on the per-rule counters of the rule at `path` in
    /// `domain`, made by `make` the first time; `false` (`f` not run,
    /// nothing kept) when `make` gives none.
    pub(super) fn rule(
        &self,
        domain: &str,
        path: &str,
        make: impl FnOnce() -> Option<RuleSeries>,
        f: impl FnOnce(&RuleSeries),
    ) -> bool {
        if let Some(series) = read(&self.rules).get(domain).and_then(|m| m.get(path)) {
            f(series);
            return true;
        }
        let Some(made) = make() else {
            return false;
        };
        let mut map = write(&self.rules);
        let paths = map.entry(domain.to_owned()).or_default();
        f(paths.entry(path.to_owned()).or_insert(made));
        true
    }

    /// Forgets the per-rule counters (not the series): the rules changed.
    pub(super) fn forget_rules(&self) {
        write(&self.rules).clear();
    }

    /// Runs `f` on the store latency histogram of `backend`, registered
    /// the first time.
    pub(super) fn storage(
        &self,
        backend: &'static str,
        register: impl FnOnce() -> Histogram,
        f: impl FnOnce(&Histogram),
    ) {
        let find =
            |list: &[(&'static str, Histogram)]| list.iter().position(|(b, _)| *b == backend);
        let list = read(&self.storage);
        if let Some(at) = find(&list) {
            return f(&list[at].1);
        }
        drop(list);
        let mut list = write(&self.storage);
        let at = find(&list).unwrap_or_else(|| {
            list.push((backend, register()));
            list.len() - 1
        });
        f(&list[at].1)
    }
}

/// The per-rule counters of one stats key.
pub(super) struct RuleSeries {
    labels: [Label; 2],
    hits: Counter,
    split: [OnceLock<Counter>; 5],
}

impl RuleSeries {
    /// The counters of `label` in `domain`; registers the hits counter (it
    /// shows from the first hit, even of a zero-hit check).
    pub(super) fn new(recorder: &PrometheusRecorder, domain: &str, label: String) -> Self {
        let labels = [
            Label::new("domain", domain.to_owned()),
            Label::new("rule", label),
        ];
        let hits = register(recorder, RULE_HITS_TOTAL, &labels);
        Self {
            labels,
            hits,
            split: Default::default(),
        }
    }

    /// Adds `counts`.
    pub(super) fn add(&self, recorder: &PrometheusRecorder, counts: &RuleCounts) {
        self.hits.increment(counts.total);
        for ((name, slot), count) in RULE_SPLIT.iter().zip(&self.split).zip(Self::counts(counts)) {
            if count > 0 {
                slot.get_or_init(|| register(recorder, name, &self.labels))
                    .increment(count);
            }
        }
    }

    fn counts(c: &RuleCounts) -> [u64; 5] {
        [c.within, c.near, c.over, c.over_from_cache, c.shadow]
    }
}

fn register(recorder: &PrometheusRecorder, name: &'static str, labels: &[Label]) -> Counter {
    recorder.register_counter(&Key::from_parts(name, labels.to_vec()), &METADATA)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
