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

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "warn,ratekeeper=info";

/// Whether this build can export spans (`--features otlp`).
pub const OTLP_BUILT_IN: bool = cfg!(feature = "otlp");

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

/// Installs the global subscriber: logs in `format`, and spans exported to
/// `otlp_endpoint` (an `http://` or `https://` URL of an OTLP/gRPC
/// collector) when given. The exporter must be built inside the Tokio
/// runtime that will serve. Later calls install nothing (tests call it
/// freely).
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
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
    #[cfg(feature = "otlp")]
    {
        let (exporter, layer) = otlp::Exporter::start(endpoint)?;
        let _ = registry.with(layer).try_init();
        Ok(Telemetry {
            exporter: Some(exporter),
        })
    }
    #[cfg(not(feature = "otlp"))]
    {
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
