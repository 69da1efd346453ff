//! What one instance knows about its RLQS buckets, shared by its streams:
//! how many distinct buckets each domain has here (the per-domain cap), and
//! per bucket the last allocation seen (global limit, sum of the shares
//! assigned, realised global rate from the reports, subscribers) for
//! `/metrics` and `/debug/rlqs`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::bucket::BucketKey;

/// The shared view; a cheap-clone handle.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    /// A std `Mutex`: held for map updates only, never across an await.
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    domains: HashMap<String, HashMap<BucketKey, BucketView>>,
    streams: u64,
    refused: BTreeMap<(String, &'static str), u64>,
}

/// One bucket as last allocated on this instance.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BucketView {
    /// The rule's name; `None` when no rule matches (allowed).
    pub rule: Option<String>,
    /// The global limit, requests per second.
    pub limit_per_second: f64,
    /// The sum of the shares assigned to every subscriber, per second.
    pub assigned_per_second: f64,
    /// The sum of the subscribers' measured allowed rates, per second.
    pub realised_per_second: f64,
    /// Subscribers across every instance sharing the registry.
    pub subscribers: usize,
    /// Streams of this instance subscribed.
    pub local_streams: usize,
    /// The registry was learning (after state loss) at the last allocation.
    pub learning: bool,
}

/// A bucket refused by a cap, or with a bad id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The stream has `--rlqs-max-buckets-per-stream` buckets.
    StreamCap,
    /// The domain has `--rlqs-max-buckets-per-domain` buckets here.
    DomainCap,
    /// The bucket id is invalid.
    InvalidBucketId,
}

/// One rule's buckets summed, for `/metrics`.
#[derive(Debug, Default)]
struct Totals {
    limit: f64,
    assigned: f64,
    realised: f64,
    subscribers: f64,
    buckets: f64,
}

/// A gauge's name, help and value.
type Gauge = (&'static str, &'static str, fn(&Totals) -> f64);

#[derive(Debug, Serialize)]
struct DebugBucket<'a> {
    domain: &'a str,
    bucket: String,
    #[serde(flatten)]
    view: &'a BucketView,
}

// === impl Refusal ===

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::StreamCap => "stream_cap",
            Refusal::DomainCap => "domain_cap",
            Refusal::InvalidBucketId => "invalid_bucket_id",
        }
    }
}

// === impl Hub ===

impl Hub {
    /// Counts a stream opened (`+1`) or closed (`-1`).
    pub fn stream(&self, opened: bool) {
        let mut inner = self.lock();
        if opened {
            inner.streams += 1;
        } else {
            inner.streams = inner.streams.saturating_sub(1);
        }
    }

    /// Adds a stream's subscription to `bucket`, unless the domain already
    /// has `cap` other buckets here.
    pub fn subscribe(&self, domain: &str, bucket: &BucketKey, cap: usize) -> bool {
        let mut inner = self.lock();
        let buckets = inner.domains.entry(domain.to_owned()).or_default();
        if let Some(view) = buckets.get_mut(bucket) {
            view.local_streams += 1;
            return true;
        }
        if buckets.len() >= cap {
            return false;
        }
        buckets.insert(
            bucket.clone(),
            BucketView {
                local_streams: 1,
                ..BucketView::default()
            },
        );
        true
    }

    /// Removes a stream's subscription to `bucket`.
    pub fn unsubscribe(&self, domain: &str, bucket: &BucketKey) {
        let mut inner = self.lock();
        if let Some(buckets) = inner.domains.get_mut(domain) {
            if let Some(view) = buckets.get_mut(bucket) {
                view.local_streams = view.local_streams.saturating_sub(1);
                if view.local_streams == 0 {
                    buckets.remove(bucket);
                }
            }
            if buckets.is_empty() {
                inner.domains.remove(domain);
            }
        }
    }

    /// Records the last allocation of `bucket` (local streams are kept).
    pub fn update(&self, domain: &str, bucket: &BucketKey, view: BucketView) {
        let mut inner = self.lock();
        if let Some(entry) = inner
            .domains
            .get_mut(domain)
            .and_then(|buckets| buckets.get_mut(bucket))
        {
            *entry = BucketView {
                local_streams: entry.local_streams,
                ..view
            };
        }
    }

    /// Counts a refused bucket.
    pub fn refused(&self, domain: &str, refusal: Refusal) {
        *self
            .lock()
            .refused
            .entry((domain.to_owned(), refusal.as_str()))
            .or_default() += 1;
    }

    /// One bucket's view, if it is subscribed here.
    pub fn bucket(&self, domain: &str, bucket: &BucketKey) -> Option<BucketView> {
        self.lock().domains.get(domain)?.get(bucket).cloned()
    }

    /// `/debug/rlqs`: every bucket subscribed here, as JSON.
    pub fn debug_json(&self) -> serde_json::Value {
        let inner = self.lock();
        let mut buckets: Vec<DebugBucket<'_>> = inner
            .domains
            .iter()
            .flat_map(|(domain, buckets)| {
                buckets.iter().map(move |(key, view)| DebugBucket {
                    domain,
                    bucket: key.to_string(),
                    view,
                })
            })
            .collect();
        buckets.sort_by(|a, b| (a.domain, &a.bucket).cmp(&(b.domain, &b.bucket)));
        serde_json::json!({ "streams": inner.streams, "buckets": buckets })
    }

    /// The RLQS metrics in Prometheus' text format, summed per rule (bucket
    /// ids are client-chosen, so they are never labels).
    pub fn render_metrics(&self) -> String {
        let inner = self.lock();
        let mut per_rule: BTreeMap<(&str, &str), Totals> = BTreeMap::new();
        for (domain, buckets) in &inner.domains {
            for view in buckets.values() {
                let rule = view.rule.as_deref().unwrap_or("none");
                let entry = per_rule.entry((domain, rule)).or_default();
                entry.limit += view.limit_per_second;
                entry.assigned += view.assigned_per_second;
                entry.realised += view.realised_per_second;
                entry.subscribers += view.subscribers as f64;
                entry.buckets += 1.0;
            }
        }
        let mut out = String::new();
        let gauges: [Gauge; 5] = [
            (
                LIMIT,
                "RLQS global limit per second, summed over the rule's buckets subscribed here",
                |v| v.limit,
            ),
            (
                ASSIGNED,
                "sum of the shares assigned to all subscribers, per second",
                |v| v.assigned,
            ),
            (
                REALISED,
                "realised global rate: requests allowed per second as reported by all subscribers",
                |v| v.realised,
            ),
            (SUBSCRIBERS, "subscribers across all instances", |v| {
                v.subscribers
            }),
            (BUCKETS, "buckets subscribed on this instance", |v| {
                v.buckets
            }),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for ((domain, rule), v) in &per_rule {
                let _ = writeln!(
                    out,
                    "{name}{{domain=\"{}\",rule=\"{}\"}} {}",
                    escape(domain),
                    escape(rule),
                    value(v)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP {STREAMS} open RLQS streams\n# TYPE {STREAMS} gauge\n{STREAMS} {}",
            inner.streams
        );
        let _ = writeln!(
            out,
            "# HELP {REFUSED} RLQS buckets refused, by reason\n# TYPE {REFUSED} counter"
        );
        for ((domain, reason), n) in &inner.refused {
            let _ = writeln!(
                out,
                "{REFUSED}{{domain=\"{}\",reason=\"{reason}\"}} {n}",
                escape(domain)
            );
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Global limit per second.
pub const LIMIT: &str = "ratekeeper_rlqs_limit_per_second";
/// Sum of assigned shares per second.
pub const ASSIGNED: &str = "ratekeeper_rlqs_assigned_per_second";
/// Realised global rate.
pub const REALISED: &str = "ratekeeper_rlqs_realised_per_second";
/// Subscribers.
pub const SUBSCRIBERS: &str = "ratekeeper_rlqs_subscribers";
/// Buckets subscribed here.
pub const BUCKETS: &str = "ratekeeper_rlqs_buckets";
/// Open streams.
pub const STREAMS: &str = "ratekeeper_rlqs_streams";
/// Refused buckets.
pub const REFUSED: &str = "ratekeeper_rlqs_refused_buckets_total";

/// A Prometheus label value with `\`, `"` and newlines escaped.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(value: &str) -> BucketKey {
        BucketKey::new(&[("k".to_owned(), value.to_owned())].into_iter().collect()).unwrap()
    }

    #[test]
    fn the_domain_cap_counts_distinct_buckets() {
        let hub = Hub::default();
        assert!(hub.subscribe("d", &key("a"), 2));
        assert!(hub.subscribe("d", &key("a"), 2));
        assert!(hub.subscribe("d", &key("b"), 2));
        assert!(!hub.subscribe("d", &key("c"), 2));
        assert!(hub.subscribe("e", &key("c"), 2));
        hub.unsubscribe("d", &key("b"));
        assert!(hub.subscribe("d", &key("c"), 2));
        assert_eq!(hub.bucket("d", &key("a")).unwrap().local_streams, 2);
    }

    #[test]
    fn metrics_sum_per_rule_and_escape_labels() {
        let hub = Hub::default();
        hub.subscribe("d\"x", &key("a"), 10);
        hub.update(
            "d\"x",
            &key("a"),
            BucketView {
                rule: Some("r".into()),
                limit_per_second: 100.0,
                assigned_per_second: 100.0,
                realised_per_second: 42.5,
                subscribers: 3,
                ..BucketView::default()
            },
        );
        hub.refused("d\"x", Refusal::StreamCap);
        let text = hub.render_metrics();
        assert!(
            text.contains("ratekeeper_rlqs_realised_per_second{domain=\"d\\\"x\",rule=\"r\"} 42.5"),
            "{text}"
        );
        assert!(
            text.contains(
                "ratekeeper_rlqs_refused_buckets_total{domain=\"d\\\"x\",reason=\"stream_cap\"} 1"
            ),
            "{text}"
        );
    }
}
