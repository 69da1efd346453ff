//! The gRPC surfaces: ratekeeper's own `ShouldAllow` ([`should_allow`]) and
//! Envoy's `ShouldRateLimit` ([`envoy`]), both thin translations onto one
//! [`Limiter`](crate::limiter::Limiter).
//!
//! Each surface validates its request against [`RequestLimits`] first
//! ([`validate`]), so a malformed or oversized request is refused with
//! `INVALID_ARGUMENT` naming the field before any matching or store work.

pub mod dynamic_metadata;
pub mod envoy;
pub mod headers;
pub mod should_allow;
pub mod trace_context;
pub mod validate;

use std::time::Duration;

use tonic::Status;

pub use dynamic_metadata::DynamicMetadata;
pub use envoy::{EnvoyCounting, EnvoyService};
pub use headers::{DraftHeaders, HeaderSettings, ResponseHeaders};
pub use should_allow::ShouldAllowService;

use crate::error::Error;
pub use crate::limiter::QuotaMode;
use crate::limiter::{Decision, Limiter};
use crate::metrics::{DomainLabel, RequestDecision, Surface};

/// Default cap on descriptors per request.
pub const DEFAULT_MAX_DESCRIPTORS: usize = 64;
/// Default cap on entries per descriptor.
pub const DEFAULT_MAX_ENTRIES: usize = 32;
/// Default cap on the length of a domain, key or value, in bytes.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024;
/// Default cap on the size of one encoded request, in bytes: far above any
/// real rate limit request (64 descriptors of 32 entries of 1 KiB would not
/// fit, but nothing legitimate comes close), far below tonic's 4 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Largest cost (hits) one request may add to one counter. Keeps every count
/// exact in Redis's Lua (doubles) and far from overflow.
pub const MAX_COST: u64 = u32::MAX as u64;

/// Caps on request size, checked before any work is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most descriptors in one request.
    pub max_descriptors: usize,
    /// Most entries in one descriptor.
    pub max_entries: usize,
    /// Longest domain, key or value, in bytes.
    pub max_value_bytes: usize,
    /// Largest encoded request, in bytes; a larger one is refused before it
    /// is decoded (`OUT_OF_RANGE`, as tonic reports it).
    pub max_request_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_descriptors: DEFAULT_MAX_DESCRIPTORS,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// Global shadow mode (`--shadow-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShadowMode {
    /// Over-limit requests are denied.
    #[default]
    Off,
    /// Every request is let through: counted and reported as usual (each
    /// descriptor's status unchanged), but the overall answer is always OK,
    /// as envoyproxy/ratelimit's `SHADOW_MODE`.
    Global,
}

/// A decided request, as the surfaces answer it.
#[derive(Debug)]
pub(crate) struct Answered {
    pub decision: Decision,
    /// The request is over its limit (as the surface judges it).
    pub over_limit: bool,
    /// Over the limit, but let through by global shadow mode.
    pub shadowed: bool,
}

impl Answered {
    /// Whether the request as a whole is denied.
    pub fn denied(&self) -> bool {
        self.over_limit && !self.shadowed
    }
}

/// Records how one RPC ended in the metrics and applies global shadow mode;
/// `over_limit` judges whether the decision is over the limit. Errors
/// become the `Status` to return.
pub(crate) fn finish(
    limiter: &Limiter,
    surface: Surface,
    domain: &str,
    shadow: ShadowMode,
    result: Result<Decision, Error>,
    over_limit: impl FnOnce(&Decision) -> bool,
) -> Result<Answered, Status> {
    let metrics = limiter.metrics();
    match result {
        Ok(decision) => {
            let label = if decision.known_domain {
                DomainLabel::Known(domain)
            } else {
                DomainLabel::Unknown
            };
            let over_limit = over_limit(&decision);
            let answered = Answered {
                shadowed: shadow == ShadowMode::Global && over_limit,
                over_limit,
                decision,
            };
            if answered.shadowed {
                metrics.global_shadow(surface, label);
            }
            let outcome = if answered.denied() {
                RequestDecision::Denied
            } else {
                RequestDecision::Allowed
            };
            metrics.request(surface, label, outcome);
            Ok(answered)
        }
        Err(error) => {
            let (outcome, label) = match &error {
                Error::InvalidRequest { .. } => (RequestDecision::Invalid, DomainLabel::Unknown),
                Error::Overloaded { .. } => (RequestDecision::Shed, DomainLabel::Unknown),
                _ if limiter.rules().domain(domain).is_some() => {
                    (RequestDecision::Error, DomainLabel::Known(domain))
                }
                _ => (RequestDecision::Error, DomainLabel::Unknown),
            };
            metrics.request(surface, label, outcome);
            Err(error.into())
        }
    }
}

/// Whole seconds for Envoy's `duration_until_reset`: rounded up, so a window
/// with time left never reads as 0.
pub(crate) fn ceil_seconds(ms: u64) -> u64 {
    ms.div_ceil(1_000)
}

/// A protobuf `Duration` from milliseconds.
pub(crate) fn duration_from_ms(ms: u64) -> prost_types::Duration {
    let d = Duration::from_millis(ms);
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
