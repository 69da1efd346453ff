//! Logs (`LOG_LEVEL`, as a tracing filter), the stats sink (Prometheus or
//! none; statsd and DogStatsD refused) and tracing (refused).

use std::net::{Ipv4Addr, SocketAddr};

use super::PrometheusListener;
use super::listeners::go_listen_addr;
use super::reader::Reader;

/// `LOG_LEVEL` as logrus reads it (any case), as a tracing filter:
/// ratekeeper's own logs at that level, its libraries' at that level or
/// `warn`, whichever says less (upstream's level covers its own logs).
pub(super) fn log_filter(env: &mut Reader<'_>) -> String {
    let level = env.string("LOG_LEVEL", "WARN");
    let ours = match level.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        // tracing's most severe level: fatal and panic logs are errors.
        "error" | "fatal" | "panic" => "error",
        other => {
            env.error(
                "LOG_LEVEL",
                format!("'{other}' is not a log level; use trace, debug, info, warn, error, fatal or panic"),
            );
            "warn"
        }
    };
    match ours {
        "trace" | "debug" | "info" => format!("warn,ratekeeper={ours}"),
        _ => ours.to_owned(),
    }
}

/// The stats sink: Prometheus (`USE_STATSD=false USE_PROMETHEUS=true`), or
/// none; statsd and DogStatsD are refused.
pub(super) fn metrics(env: &mut Reader<'_>) -> Option<PrometheusListener> {
    let disabled = env.bool("DISABLE_STATS", false);
    let statsd_given = env.given("USE_STATSD");
    let statsd = env.bool("USE_STATSD", true);
    let dog_statsd = env.bool("USE_DOG_STATSD", false);
    let prometheus = env.bool("USE_PROMETHEUS", false);
    let addr_given = env.given("PROMETHEUS_ADDR");
    let addr = env.string("PROMETHEUS_ADDR", ":9090");
    let path_given = env.given("PROMETHEUS_PATH");
    let path = env.string("PROMETHEUS_PATH", "/metrics");
    for name in ["STATSD_HOST", "STATSD_PORT"] {
        env.refuse_if_given(name, "ratekeeper has no statsd sink (USE_STATSD=false, USE_PROMETHEUS=true serves Prometheus metrics)");
    }
    env.refuse_if_given(
        "USE_DOG_STATSD_MOGRIFIERS",
        "ratekeeper has no DogStatsD sink",
    );
    let mogrifiers: Vec<String> = env
        .env
        .keys()
        .filter(|name| name.starts_with("DOG_STATSD_MOGRIFIER_"))
        .cloned()
        .collect();
    for name in mogrifiers {
        env.error(
            &name,
            "has no effect: ratekeeper has no DogStatsD sink; remove it",
        );
    }
    let extra_tags = env.string("EXTRA_TAGS", "");
    if !extra_tags.is_empty() {
        env.error("EXTRA_TAGS", "is not supported: ratekeeper's metrics carry no extra labels (add them when scraping); remove it");
    }
    env.refuse_if_given(
        "STATS_FLUSH_INTERVAL",
        "ratekeeper's metrics are current at every scrape",
    );
    env.refuse_if_given(
        "PROMETHEUS_MAPPER_YAML",
        "ratekeeper's metric names are its own (docs/operations.md, Metrics)",
    );
    if env.bool("PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS", false) {
        env.error(
            "PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS",
            "is not supported: ratekeeper's durations are in seconds; remove it",
        );
    }

    if disabled {
        for (name, on) in [
            ("USE_PROMETHEUS", prometheus),
            ("USE_DOG_STATSD", dog_statsd),
            ("USE_STATSD", statsd && statsd_given),
        ] {
            if on {
                env.error(
                    name,
                    "has no effect with DISABLE_STATS=true; remove one of them",
                );
            }
        }
        if addr_given || path_given {
            let name = if addr_given {
                "PROMETHEUS_ADDR"
            } else {
                "PROMETHEUS_PATH"
            };
            env.error(name, "has no effect with DISABLE_STATS=true; remove it");
        }
        return None;
    }
    if statsd {
        let default = if statsd_given { "" } else { " (the default)" };
        env.error(
            "USE_STATSD",
            format!(
                "true{default} asks for a statsd sink, which ratekeeper does not have: \
                 set USE_STATSD=false, and USE_PROMETHEUS=true to serve Prometheus metrics"
            ),
        );
    }
    if dog_statsd {
        env.error(
            "USE_DOG_STATSD",
            "DogStatsD is not supported: set USE_DOG_STATSD=false, and USE_PROMETHEUS=true to \
             serve Prometheus metrics",
        );
    }
    if !prometheus {
        for (given, name) in [
            (addr_given, "PROMETHEUS_ADDR"),
            (path_given, "PROMETHEUS_PATH"),
        ] {
            if given {
                env.error(name, "has no effect without USE_PROMETHEUS=true; remove it or set USE_PROMETHEUS=true");
            }
        }
        return None;
    }
    let addr = go_listen_addr(&addr).unwrap_or_else(|message| {
        env.error("PROMETHEUS_ADDR", message);
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9090))
    });
    if !path.starts_with('/') {
        env.error(
            "PROMETHEUS_PATH",
            format!("'{path}' is not a path; it must start with / (e.g. /metrics)"),
        );
    }
    Some(PrometheusListener { addr, path })
}

/// Upstream's OpenTelemetry export is not available in this mode.
pub(super) fn tracing_settings(env: &mut Reader<'_>) {
    if env.bool("TRACING_ENABLED", false) {
        env.error(
            "TRACING_ENABLED",
            "is not supported in the envoyproxy/ratelimit mode: set it to false, or run \
             `ratekeeper serve --otlp-endpoint` (a build with the otlp feature)",
        );
    }
    for name in [
        "TRACING_SERVICE_NAME",
        "TRACING_SERVICE_NAMESPACE",
        "TRACING_SERVICE_INSTANCE_ID",
        "TRACING_EXPORTER_PROTOCOL",
        "TRACING_SAMPLING_RATE",
    ] {
        env.refuse_if_given(
            name,
            "it configures TRACING_ENABLED=true, which is not supported here",
        );
    }
}
