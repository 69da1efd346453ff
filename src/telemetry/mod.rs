//! Logging and tracing setup: one `tracing` subscriber for the process.
//!
//! Logs: the filter comes from `RUST_LOG` (default: `info` for ratekeeper,
//! `warn` for everything else). Nothing is logged at INFO per request; each
//! RPC has a DEBUG span with its domain and decision, and each store call a
//! child span. With the `otlp` cargo feature and `--otlp-endpoint`, those
//! spans are also exported over OTLP/gRPC, independently of the log filter,
//! so tracing does not need DEBUG logs.

#[cfg(feature = "otlp")]
mod otlp;

use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "warn,ratekeeper=info";

/// What the process installed; [`Telemetry::shutdown`] flushes spans not yet
/// exported.
#[derive(Debug, Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    exporter: Option<otlp::Exporter>,
}

impl Telemetry {
    /// Exports the spans still buffered (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(exporter) = self.exporter {
            exporter.shutdown();
        }
    }
}

/// Which requests get spans for export: set once OTLP export starts.
static EXPORT_SAMPLING: OnceLock<Sampling> = OnceLock::new();

/// Root traces (requests without a `traceparent`) kept: one in `every`
/// (0: none), counted, so the kept share is exact and costs no randomness.
#[derive(Debug)]
struct Sampling {
    every: u64,
    seen: AtomicU64,
}

impl Sampling {
    fn new(ratio: f64) -> Self {
        let every = if ratio <= 0.0 {
            0
        } else {
            (1.0 / ratio).round().max(1.0) as u64
        };
        Self {
            every,
            seen: AtomicU64::new(0),
        }
    }

    fn keep_root(&self) -> bool {
        self.every != 0
            && self
                .seen
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(self.every)
    }
}

/// Whether an RPC should build its span: when DEBUG logs would show it, or
/// when it will be exported — the caller's `traceparent` sampled flag
/// decides if it sent one (`parent_sampled`), else `--otlp-sample-ratio`.
/// Building spans nobody uses is most of what tracing costs (BENCHMARKS.md),
/// so unsampled requests build none.
pub fn rpc_span_wanted(parent_sampled: Option<bool>) -> bool {
    if tracing::enabled!(tracing::Level::DEBUG) {
        return true;
    }
    match (EXPORT_SAMPLING.get(), parent_sampled) {
        (None, _) => false,
        (Some(_), Some(sampled)) => sampled,
        (Some(sampling), None) => sampling.keep_root(),
    }
}

/// Installs the global subscriber: logs in `format`, and spans exported to
/// `otlp_endpoint` (an `http://` or `https://` URL of an OTLP/gRPC
/// collector) when given, for `sample_ratio` (0 to 1) of the requests that
/// carry no `traceparent`. The exporter must be built inside the Tokio
/// runtime that will serve. Later calls install nothing (tests call it
/// freely).
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    sample_ratio: f64,
) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    install(filter, format, otlp_endpoint, sample_ratio)
}

/// As [`init`], with the log filter given (the upstream mode's, from
/// `LOG_LEVEL`) instead of read from `RUST_LOG`.
///
/// # Errors
///
/// As [`init`].
pub fn init_with_filter(
    filter: &str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    sample_ratio: f64,
) -> anyhow::Result<Telemetry> {
    install(EnvFilter::new(filter), format, otlp_endpoint, sample_ratio)
}

fn install(
    filter: EnvFilter,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    sample_ratio: f64,
) -> anyhow::Result<Telemetry> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
    }
    .with_filter(filter);
    let registry = tracing_subscriber::registry().with(logs);

    let Some(endpoint) = otlp_endpoint else {
        let _ = registry.try_init();
        return Ok(Telemetry::default());
    };
    validate_endpoint(endpoint)?;
    if !(0.0..=1.0).contains(&sample_ratio) {
        anyhow::bail!("--otlp-sample-ratio {sample_ratio}: expected a number from 0 to 1");
    }
    let sampling = Sampling::new(sample_ratio);
    #[cfg(feature = "otlp")]
    {
        let (exporter, layer) = otlp::Exporter::start(endpoint)?;
        let _ = EXPORT_SAMPLING.set(sampling);
        let _ = registry.with(layer).try_init();
        Ok(Telemetry {
            exporter: Some(exporter),
        })
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = sampling;
        anyhow::bail!(
            "--otlp-endpoint: this ratekeeper was built without OTLP export; \
             build it with `--features otlp`"
        )
    }
}

/// Refuses endpoints the gRPC exporter could only fail on later, silently.
fn validate_endpoint(endpoint: &str) -> anyhow::Result<()> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"));
    match rest {
        Some(authority) if !authority.is_empty() && !authority.starts_with('/') => Ok(()),
        _ => anyhow::bail!(
            "--otlp-endpoint {endpoint:?}: expected the collector's OTLP/gRPC URL, \
             e.g. http://otel-collector:4317"
        ),
    }
}

/// Makes the caller's span (from a valid W3C `traceparent`) the parent of
/// `span`, which must not have been entered yet. Without OTLP export there
/// is no trace to join: a no-op.
pub fn set_remote_parent(span: &tracing::Span, trace_id: &str, parent_id: &str, sampled: bool) {
    #[cfg(feature = "otlp")]
    otlp::set_remote_parent(span, trace_id, parent_id, sampled);
    #[cfg(not(feature = "otlp"))]
    let _ = (span, trace_id, parent_id, sampled);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_sampling_keeps_exactly_its_share() {
        let kept = |ratio: f64| {
            let sampling = Sampling::new(ratio);
            (0..1_000).filter(|_| sampling.keep_root()).count()
        };
        assert_eq!(kept(1.0), 1_000);
        assert_eq!(kept(0.01), 10);
        assert_eq!(kept(0.25), 250);
        assert_eq!(kept(0.0), 0);
    }

    #[test]
    fn endpoints_must_be_http_urls_with_a_host() {
        for good in ["http://127.0.0.1:4317", "https://collector.example:4317"] {
            assert!(validate_endpoint(good).is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1:4317",
            "grpc://c:4317",
            "http://",
            "http:///x",
            "",
        ] {
            let error = validate_endpoint(bad).unwrap_err().to_string();
            assert!(error.contains("--otlp-endpoint"), "{bad}: {error}");
        }
    }
}
