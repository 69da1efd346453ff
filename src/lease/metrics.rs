//! The concurrency leases' metrics, registered in the server's own recorder.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `ratelimit_lease_granted_total` | counter | surface, domain | Acquires (and Envoy positive hits) granted |
//! | `ratelimit_lease_denied_total` | counter | surface, domain | Acquires (and Envoy positive hits) refused for lack of room |
//! | `ratelimit_lease_expired_total` | counter | domain | permits found expired (their holder neither released nor renewed) and purged |
//! | `ratelimit_lease_in_use` | gauge | domain, rule | permits held on the rule's key this instance touched last: exact for a rule with one key (a global cap), a sample for per-value rules |
//!
//! `surface` is `leases` (the `Leases` API) or `envoy`; `rule` is the
//! rule's configured path, never a runtime value.

use ::metrics::{Key, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::PrometheusRecorder;

use super::table::{Code, Reply};
use crate::metrics::Metrics;
use crate::rules::Rule;

/// Leases granted.
pub const LEASE_GRANTED_TOTAL: &str = "ratelimit_lease_granted_total";
/// Leases denied.
pub const LEASE_DENIED_TOTAL: &str = "ratelimit_lease_denied_total";
/// Permits purged as expired.
pub const LEASE_EXPIRED_TOTAL: &str = "ratelimit_lease_expired_total";
/// Permits held.
pub const LEASE_IN_USE: &str = "ratelimit_lease_in_use";

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Describes the lease metrics in `recorder` (at startup).
pub fn describe(recorder: &PrometheusRecorder) {
    let counter = |name: &'static str, text: &'static str| {
        recorder.describe_counter(name.into(), None, SharedString::const_str(text));
    };
    counter(
        LEASE_GRANTED_TOTAL,
        "Lease acquisitions (and Envoy slots) granted.",
    );
    counter(
        LEASE_DENIED_TOTAL,
        "Lease acquisitions (and Envoy slots) refused for lack of room.",
    );
    counter(
        LEASE_EXPIRED_TOTAL,
        "Permits found expired (neither released nor renewed) and purged.",
    );
    recorder.describe_gauge(
        LEASE_IN_USE.into(),
        None,
        SharedString::const_str("Permits held on the key of each concurrency rule last touched."),
    );
}

/// Records what `reply` says about an operation through `surface` on
/// `rules`' keys (in the reply's order) of `domain`.
pub fn record(
    metrics: &Metrics,
    surface: &'static str,
    domain: &str,
    rules: &[&Rule],
    reply: &Reply,
) {
    let recorder = metrics.recorder();
    let labels = || {
        vec![
            Label::new("surface", surface),
            Label::new("domain", domain.to_owned()),
        ]
    };
    let outcome = match reply.code {
        Code::Granted => Some(LEASE_GRANTED_TOTAL),
        Code::Denied => Some(LEASE_DENIED_TOTAL),
        _ => None,
    };
    if let Some(name) = outcome {
        recorder
            .register_counter(&Key::from_parts(name, labels()), &METADATA)
            .increment(1);
    }
    let expired: u64 = reply.keys.iter().map(|k| k.expired).sum();
    if expired > 0 {
        recorder
            .register_counter(
                &Key::from_parts(
                    LEASE_EXPIRED_TOTAL,
                    vec![Label::new("domain", domain.to_owned())],
                ),
                &METADATA,
            )
            .increment(expired);
    }
    for (rule, key) in rules.iter().zip(&reply.keys) {
        let labels = vec![
            Label::new("domain", domain.to_owned()),
            Label::new("rule", rule.path.clone()),
        ];
        recorder
            .register_gauge(&Key::from_parts(LEASE_IN_USE, labels), &METADATA)
            .set(key.in_use as f64);
    }
}
