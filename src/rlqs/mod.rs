//! Envoy's Rate Limit Quota Service (RLQS): Envoys enforce quotas locally and
//! stream usage reports; ratekeeper divides one global limit per bucket
//! among them by measured demand, and pushes each its share.
//!
//! ```text
//! Envoy ──usage reports──▶ service (one task per stream)
//!                            │ stream: domain, subscriptions, demand (receive times)
//!                            │ registry: every subscriber of the buckets (memory or Redis, one call)
//!                            │ allocator: max-min fair shares, headroom, hysteresis (pure)
//! Envoy ◀──assignments────── ┘ token buckets, whole-second TTLs; AbandonAction for idle buckets
//! ```
//!
//! Modules: [`bucket`] (canonical, injective bucket ids), [`rules`] (the
//! `rlqs:` section of the rules files), [`allocator`] (pure), [`registry`]
//! (memory and Redis), [`stream`] (one stream's state), [`service`] (the
//! tonic service), [`hub`] (this instance's view for `/metrics` and
//! `/debug/rlqs`).

pub mod allocator;
pub mod bucket;
pub mod hub;
pub mod registry;
pub mod rules;
pub mod service;
pub mod stream;

use std::time::Duration;

pub use hub::Hub;
pub use registry::{MemoryRegistry, RedisRegistry, Registry};
pub use rules::{RlqsRule, RlqsRules};
pub use service::RlqsService;

/// Default time between an Envoy's reports (hard-coded to 5 s in Envoy).
pub const DEFAULT_REPORT_PERIOD: Duration = Duration::from_secs(5);
/// Default cap on buckets per stream.
pub const DEFAULT_MAX_BUCKETS_PER_STREAM: usize = 1_000;
/// Default cap on distinct buckets per domain on one instance.
pub const DEFAULT_MAX_BUCKETS_PER_DOMAIN: usize = 10_000;
/// Default number of reports without requests before a bucket is abandoned.
pub const DEFAULT_ABANDON_AFTER_IDLE_REPORTS: u32 = 12;

/// How the service runs.
#[derive(Debug, Clone, Copy)]
pub struct RlqsSettings {
    /// The clients' report period; members silent for 3 periods are stale.
    pub report_period: Duration,
    /// Most buckets one stream may subscribe to.
    pub max_buckets_per_stream: usize,
    /// Most distinct buckets a domain may have on one instance.
    pub max_buckets_per_domain: usize,
    /// Reports without requests before a bucket is abandoned.
    pub abandon_after_idle_reports: u32,
    /// How often a stream, between its reports, re-reads the registry (and
    /// the rules) and pushes whatever changed: how fast room given up by
    /// others, or a reload, reaches it.
    pub reallocate_every: Duration,
}

impl Default for RlqsSettings {
    fn default() -> Self {
        Self {
            report_period: DEFAULT_REPORT_PERIOD,
            max_buckets_per_stream: DEFAULT_MAX_BUCKETS_PER_STREAM,
            max_buckets_per_domain: DEFAULT_MAX_BUCKETS_PER_DOMAIN,
            abandon_after_idle_reports: DEFAULT_ABANDON_AFTER_IDLE_REPORTS,
            reallocate_every: Duration::from_secs(1),
        }
    }
}

impl RlqsSettings {
    /// The report period in milliseconds.
    pub fn report_period_ms(&self) -> u64 {
        u64::try_from(self.report_period.as_millis()).unwrap_or(u64::MAX)
    }

    /// How long a silent member stays in the registry: three periods and
    /// a second of slack.
    pub fn stale_ms(&self) -> u64 {
        self.report_period_ms()
            .saturating_mul(3)
            .saturating_add(1_000)
    }
}
