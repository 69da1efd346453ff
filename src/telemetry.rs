//! Logging setup: one `tracing` subscriber for the process.
//!
//! The filter comes from `RUST_LOG` (default: `info` for ratekeeper, `warn`
//! for everything else). Nothing is logged at INFO per request; each RPC has
//! a span with its domain and decision for when DEBUG is on.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "warn,ratekeeper=info";

/// Installs the global subscriber. Safe to call more than once (later calls
/// are no-ops), so tests can call it freely.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
