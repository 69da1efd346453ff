//! OTLP/gRPC span export (cargo feature `otlp`): a batch exporter on its own
//! thread, a `tracing` layer that turns ratekeeper's spans into OpenTelemetry
//! spans, and remote parents taken from the caller's `traceparent`.
//!
//! Which requests are traced is decided before their spans are built
//! ([`super::rpc_span_wanted`]): a request with a `traceparent` follows its
//! sampled flag, one without starts a new trace for `--otlp-sample-ratio` of
//! them. The SDK's own sampler (parent-based, or `OTEL_TRACES_SAMPLER`) then
//! sees only those.

use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;

/// One export (and the flush at shutdown) gives up after this long, so a
/// missing collector never holds the process.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// The running exporter.
#[derive(Debug)]
pub(super) struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Builds the exporter for `endpoint` and the layer that feeds it:
    /// ratekeeper's spans at every level and its warnings and errors as span
    /// events, whatever `RUST_LOG` says.
    pub(super) fn start<S>(
        endpoint: &str,
    ) -> anyhow::Result<(Self, impl Layer<S> + Send + Sync + 'static)>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|error| anyhow::anyhow!("--otlp-endpoint {endpoint}: {error}"))?;
        let service_name =
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "ratekeeper".to_owned());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service_name).build())
            .build();
        let tracer = provider.tracer("ratekeeper");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(filter_fn(|meta| {
                meta.target().starts_with("ratekeeper")
                    && (meta.is_span() || *meta.level() <= tracing::Level::WARN)
            }));
        Ok((Exporter { provider }, layer))
    }

    /// Exports what is buffered, then stops.
    pub(super) fn shutdown(self) {
        if let Err(error) = self.provider.shutdown_with_timeout(EXPORT_TIMEOUT) {
            tracing::warn!(%error, "OTLP exporter did not flush cleanly");
        }
    }
}

/// See [`super::set_remote_parent`]; the ids are already validated hex.
pub(super) fn set_remote_parent(
    span: &tracing::Span,
    trace_id: &str,
    parent_id: &str,
    sampled: bool,
) {
    let (Ok(trace_id), Ok(span_id)) = (TraceId::from_hex(trace_id), SpanId::from_hex(parent_id))
    else {
        return;
    };
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let remote = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    let parent = opentelemetry::Context::new().with_remote_span_context(remote);
    // Fails only when the span is disabled (DEBUG spans with export off) or
    // already entered; either way there is nothing to join.
    let _ = span.set_parent(parent);
}
