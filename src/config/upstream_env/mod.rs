//! envoyproxy/ratelimit's environment, read as upstream reads it, turned
//! into the settings `ratekeeper serve` uses ([`ServeArgs`]) plus what only
//! the upstream mode has ([`UpstreamMode`]: the HTTP and debug listeners,
//! the Prometheus listener, the config-health gate, …).
//!
//! Pure: [`from_env`] takes the environment as a map (the binary passes the
//! process's, tests a `HashMap`) and never reads anything else. Every
//! variable upstream knows is either honoured as upstream documents it or
//! refused with a message naming it and saying what to do instead; a
//! variable that would have no effect given the others is refused too.
//! Values parse as upstream's settings library parses them (Go's
//! `strconv.ParseBool`, `strconv.ParseInt` with base prefixes,
//! `time.ParseDuration`: [`super::go_syntax`]); a variable set to the empty
//! string counts as set, as there (so `USE_STATSD=` is not a boolean). All
//! problems are reported at once.

mod backend;
mod listeners;
mod reader;
mod telemetry;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args as _, FromArgMatches as _};

use super::args::{KeyLayoutKind, LogFormat, ServeArgs};
pub use super::load::DotFiles;
use listeners::{check_listeners, connection_age, grpc_tls, listen_addr};
use reader::Reader;
use telemetry::{log_filter, metrics, tracing_settings};

/// What one entry of the over-limit cache costs in memory, to turn
/// upstream's `LOCAL_CACHE_SIZE_IN_BYTES` into a number of entries: the
/// storage key (~70 bytes for a typical descriptor), the remembered denial
/// (40 bytes) and the hash map's own slot and control byte.
pub const OVER_LIMIT_CACHE_ENTRY_BYTES: i64 = 128;

/// Upstream's local cache (freecache) never has less than this: any size
/// above 0 gets at least 512 KiB.
pub const FREECACHE_MIN_BYTES: i64 = 512 * 1024;

/// The variable that freezes the clock in tests (the hidden
/// `--test-frozen-clock-ms`).
pub const TEST_FROZEN_CLOCK_VAR: &str = "RATEKEEPER_TEST_FROZEN_CLOCK_MS";

/// Tests only: the store deadline (`--store-timeout`, which upstream's
/// variables do not reach), so that an exactness test of a debug build on a
/// loaded machine is not failed by its 15 ms.
pub const TEST_STORE_TIMEOUT_VAR: &str = "RATEKEEPER_TEST_STORE_TIMEOUT";

/// The key layout (`--key-layout`). This mode counts in upstream's keys by
/// default, so that old and new instances enforce one limit while a
/// Deployment rolls from envoyproxy/ratelimit to ratekeeper;
/// `RATEKEEPER_KEY_LAYOUT=ratekeeper` leaves them once no old instance is
/// left. With the two test variables, the only `RATEKEEPER_` variables
/// this mode reads.
pub const KEY_LAYOUT_VAR: &str = "RATEKEEPER_KEY_LAYOUT";

/// Everything the upstream mode needs.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// The settings `serve` would have (the gRPC listener, the rules path,
    /// the store, the behaviour flags), everything else at `serve`'s defaults.
    pub serve: ServeArgs,
    /// What only this mode has.
    pub mode: UpstreamMode,
}

/// The settings only the upstream mode has.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamMode {
    /// `HOST:PORT`: `/healthcheck` and `/json`.
    pub http_addr: SocketAddr,
    /// `DEBUG_HOST:DEBUG_PORT`: `/rlconfig` and the admin routes.
    pub debug_addr: SocketAddr,
    /// `PROMETHEUS_ADDR` and `PROMETHEUS_PATH`, with `USE_PROMETHEUS=true`.
    pub prometheus: Option<PrometheusListener>,
    /// `HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED`.
    pub config_health: ConfigHealth,
    /// `RUNTIME_IGNOREDOTFILES`: whether rules files whose names start with
    /// `.` are read.
    pub dot_files: DotFiles,
    /// The log filter `LOG_LEVEL` asks for (tracing's filter syntax).
    pub log_filter: String,
    /// `GRPC_MAX_CONNECTION_AGE`; `None` keeps connections as long as
    /// clients do. (`_GRACE` is checked but not applied: a connection past
    /// its age closes once its calls have finished, see
    /// [`crate::Server::with_max_connection_age`].)
    pub max_connection_age: Option<Duration>,
}

/// Where Prometheus scrapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrometheusListener {
    /// The listener.
    pub addr: SocketAddr,
    /// The path metrics are served at (a path ending in `/` serves its
    /// whole subtree, as Go's HTTP mux does).
    pub path: String,
}

/// Whether health needs loaded rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConfigHealth {
    /// Health follows the store and shutdown only (upstream's default).
    #[default]
    StoreOnly,
    /// Also unhealthy until rules with at least one domain are loaded
    /// (`HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED=true`).
    NeedsDomain,
}

/// One refused variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvError {
    /// The variable at fault.
    pub variable: String,
    /// What is wrong, and what to do instead.
    pub message: String,
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.message)
    }
}

/// Reads upstream's settings from `env`.
///
/// # Errors
///
/// Every refused variable, each with its message.
pub fn from_env(env: &HashMap<String, String>) -> Result<UpstreamSettings, Vec<EnvError>> {
    let mut reader = Reader::new(env);
    match read(&mut reader) {
        Some(settings) if reader.errors.is_empty() => Ok(settings),
        _ => Err(reader.errors),
    }
}

/// Every variable this mode knows (upstream's, plus the test clock), for
/// documentation checks.
pub fn known_variables() -> Vec<&'static str> {
    let empty = HashMap::new();
    let mut reader = Reader::new(&empty);
    let _ = read(&mut reader);
    let mut names = reader.seen;
    names.sort_unstable();
    names.dedup();
    names
}

/// Whether `name` is one of the variables this mode reads.
pub fn is_known(name: &str) -> bool {
    known_variables().contains(&name)
}

/// The whole mapping. Every variable is read here, unconditionally, so
/// [`known_variables`] sees them all. `None` only when `serve`'s own
/// defaults do not parse (a bug, reported as an error).
fn read(env: &mut Reader<'_>) -> Option<UpstreamSettings> {
    refuse_foreign_variables(env);

    // --- config: the rules directory ---
    let config_type = env.string("CONFIG_TYPE", "FILE");
    match config_type.as_str() {
        "FILE" => {}
        "GRPC_XDS_SOTW" => env.error(
            "CONFIG_TYPE",
            "GRPC_XDS_SOTW (rules from an xDS server) is not supported: mount the rules as files \
             and use CONFIG_TYPE=FILE (the default)",
        ),
        other => env.error(
            "CONFIG_TYPE",
            format!("'{other}' is not a config type; use FILE (the default)"),
        ),
    }
    for name in XDS_VARIABLES {
        env.refuse_if_given(
            name,
            "it configures CONFIG_TYPE=GRPC_XDS_SOTW, which ratekeeper does not support",
        );
    }
    // With files, ratekeeper never waits for a first config either way: it
    // starts at once, without rules if they do not load.
    let _ = env.bool("FORCE_START_WITHOUT_INITIAL_CONFIG", false);
    let root = env.string("RUNTIME_ROOT", "/srv/runtime_data/current");
    let subdirectory = env.string("RUNTIME_SUBDIRECTORY", "");
    let app_directory = env.string("RUNTIME_APPDIRECTORY", "config");
    let dot_files = if env.bool("RUNTIME_IGNOREDOTFILES", false) {
        DotFiles::Skip
    } else {
        DotFiles::Read
    };
    // Both ways of watching reload on any change here: the files' content
    // is compared every second.
    let watch_root = env.bool("RUNTIME_WATCH_ROOT", true);
    if watch_root && app_directory.is_empty() {
        env.error(
            "RUNTIME_APPDIRECTORY",
            "is empty: with RUNTIME_WATCH_ROOT=true upstream loads no file at all; set it to the \
             directory under RUNTIME_ROOT/RUNTIME_SUBDIRECTORY that holds the rules",
        );
    }
    let config = config_dir(&root, &subdirectory, &app_directory);
    let merge_domain_config = env.bool("MERGE_DOMAIN_CONFIG", false);

    let mut args = match serve_defaults(&config) {
        Ok(args) => args,
        Err(message) => {
            env.error("RUNTIME_ROOT", message);
            return None;
        }
    };

    // --- listeners ---
    let grpc_addr = listen_addr(env, ("GRPC_HOST", "0.0.0.0"), ("GRPC_PORT", 8081));
    let http_addr = listen_addr(env, ("HOST", "0.0.0.0"), ("PORT", 8080));
    let debug_addr = listen_addr(env, ("DEBUG_HOST", "0.0.0.0"), ("DEBUG_PORT", 6070));
    let grpc_uds = env.string("GRPC_UDS", "");
    if !grpc_uds.is_empty() {
        env.error(
            "GRPC_UDS",
            "gRPC on a unix socket is not supported: remove it and use GRPC_HOST and GRPC_PORT",
        );
    }
    let proto = env.string("PROTO", "tcp");
    if proto != "tcp" {
        env.error(
            "PROTO",
            format!("'{proto}' is not supported; only tcp (the default)"),
        );
    }
    args.merge_domain_config = merge_domain_config;
    args.grpc_addr = grpc_addr;
    let max_age = env.duration("GRPC_MAX_CONNECTION_AGE", "24h");
    let max_age_grace = env.duration("GRPC_MAX_CONNECTION_AGE_GRACE", "1h");
    let max_connection_age = connection_age(env, max_age, max_age_grace);
    grpc_tls(env, &mut args);

    // --- backend ---
    backend::redis(env, &mut args);

    // --- behaviour ---
    key_layout(env, &mut args);
    let jitter = env.int("EXPIRATION_JITTER_MAX_SECONDS", 300);
    match u64::try_from(jitter) {
        Ok(seconds) => args.expiration_jitter_max = Duration::from_secs(seconds),
        Err(_) => env.error(
            "EXPIRATION_JITTER_MAX_SECONDS",
            format!("{jitter} is negative; use 0 (no jitter) or a number of seconds"),
        ),
    }
    let cache_bytes = env.int("LOCAL_CACHE_SIZE_IN_BYTES", 0);
    match cache_bytes {
        0 => {}
        bytes if bytes < 0 => env.error(
            "LOCAL_CACHE_SIZE_IN_BYTES",
            format!("{bytes} is negative; use 0 (off) or a size in bytes"),
        ),
        bytes => {
            let entries = bytes.max(FREECACHE_MIN_BYTES) / OVER_LIMIT_CACHE_ENTRY_BYTES;
            args.over_limit_cache_size = usize::try_from(entries).unwrap_or(usize::MAX);
        }
    }
    if let Some(text) = env.raw("NEAR_LIMIT_RATIO") {
        match text.parse::<f32>() {
            Ok(ratio) if (0.0..=1.0).contains(&ratio) => args.near_limit_ratio = ratio,
            Ok(_) => env.error(
                "NEAR_LIMIT_RATIO",
                format!("{text} is out of range: use a ratio from 0 to 1 (default 0.8)"),
            ),
            Err(_) => env.error("NEAR_LIMIT_RATIO", format!("'{text}' is not a number")),
        }
    }
    args.stop_cache_key_increment_when_overlimit =
        env.bool("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", false);
    args.shadow_mode = env.bool("SHADOW_MODE", false);
    args.quota_mode = env.bool("QUOTA_MODE", false);
    args.response_dynamic_metadata = env.bool("RESPONSE_DYNAMIC_METADATA", false);
    // Exactly upstream's three headers, named as upstream names them.
    args.response_headers = env.bool("LIMIT_RESPONSE_HEADERS_ENABLED", false);
    if args.response_headers {
        args.limit_header = env.string("LIMIT_LIMIT_HEADER", "RateLimit-Limit");
        args.remaining_header = env.string("LIMIT_REMAINING_HEADER", "RateLimit-Remaining");
        args.reset_header = env.string("LIMIT_RESET_HEADER", "RateLimit-Reset");
    } else {
        for name in [
            "LIMIT_LIMIT_HEADER",
            "LIMIT_REMAINING_HEADER",
            "LIMIT_RESET_HEADER",
        ] {
            env.refuse_if_given(
                name,
                "it names a header of LIMIT_RESPONSE_HEADERS_ENABLED=true, which is off: \
                 remove it, or set LIMIT_RESPONSE_HEADERS_ENABLED=true",
            );
        }
    }
    let config_health = if env.bool("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", false) {
        ConfigHealth::NeedsDomain
    } else {
        ConfigHealth::StoreOnly
    };

    // --- logs, metrics, tracing ---
    let log_filter = log_filter(env);
    match env
        .string("LOG_FORMAT", "text")
        .to_ascii_lowercase()
        .as_str()
    {
        "text" => args.log_format = LogFormat::Text,
        "json" => args.log_format = LogFormat::Json,
        other => env.error(
            "LOG_FORMAT",
            format!("'{other}' is not a log format; use text (the default) or json"),
        ),
    }
    let prometheus = metrics(env);
    tracing_settings(env);

    // --- tests ---
    if let Some(text) = env.raw(TEST_FROZEN_CLOCK_VAR) {
        match text.parse() {
            Ok(ms) => args.test_frozen_clock_ms = Some(ms),
            Err(_) => env.error(
                TEST_FROZEN_CLOCK_VAR,
                format!("'{text}' is not a number of milliseconds"),
            ),
        }
    }
    if env.given(TEST_STORE_TIMEOUT_VAR) {
        match u64::try_from(env.duration(TEST_STORE_TIMEOUT_VAR, "15ms")) {
            Ok(nanos) if nanos > 0 => args.store_timeout = Duration::from_nanos(nanos),
            _ => env.error(TEST_STORE_TIMEOUT_VAR, "must be above 0"),
        }
    }

    let mode = UpstreamMode {
        http_addr,
        debug_addr,
        prometheus,
        config_health,
        dot_files,
        log_filter,
        max_connection_age,
    };
    check_listeners(env, &args, &mode);
    Some(UpstreamSettings { serve: args, mode })
}

/// Upstream's keys (and `CACHE_KEY_PREFIX`) unless `RATEKEEPER_KEY_LAYOUT`
/// says `ratekeeper` (see [`KEY_LAYOUT_VAR`]).
fn key_layout(env: &mut Reader<'_>, args: &mut ServeArgs) {
    let prefix = env.string("CACHE_KEY_PREFIX", "");
    match env.raw(KEY_LAYOUT_VAR) {
        None | Some("envoy-ratelimit") => {
            args.key_layout = KeyLayoutKind::EnvoyRatelimit;
            args.cache_key_prefix = (!prefix.is_empty()).then_some(prefix);
        }
        Some("ratekeeper") => {
            args.key_layout = KeyLayoutKind::Ratekeeper;
            if !prefix.is_empty() {
                env.error(
                    "CACHE_KEY_PREFIX",
                    format!(
                        "has no effect with {KEY_LAYOUT_VAR}=ratekeeper (ratekeeper's own keys): \
                         remove it, or count in upstream's keys"
                    ),
                );
            }
        }
        Some(other) => env.error(
            KEY_LAYOUT_VAR,
            format!(
                "'{other}' is not a key layout: use envoy-ratelimit (the default) or ratekeeper"
            ),
        ),
    }
}

/// `RATEKEEPER_*` variables (but the test clock and the key layout) and
/// `RUST_LOG` would do nothing here: this mode reads upstream's variables.
fn refuse_foreign_variables(env: &mut Reader<'_>) {
    let mut foreign: Vec<&String> = env
        .env
        .keys()
        .filter(|name| {
            (name.starts_with("RATEKEEPER_")
                && *name != TEST_FROZEN_CLOCK_VAR
                && *name != TEST_STORE_TIMEOUT_VAR
                && *name != KEY_LAYOUT_VAR)
                || *name == "RUST_LOG"
        })
        .collect();
    foreign.sort();
    for name in foreign {
        let message = if name == "RUST_LOG" {
            "has no effect in the envoyproxy/ratelimit mode: set LOG_LEVEL instead".to_owned()
        } else {
            "has no effect in the envoyproxy/ratelimit mode, which reads upstream's variables \
             only: remove it, or run `ratekeeper serve`"
                .to_owned()
        };
        env.error(name, message);
    }
}

/// `RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY`, joined as Go's
/// `filepath.Join` does (a leading `/` on a later part does not restart
/// the path).
fn config_dir(root: &str, subdirectory: &str, app_directory: &str) -> PathBuf {
    let mut path = PathBuf::from(root);
    for part in [subdirectory, app_directory] {
        let part = part.trim_start_matches('/');
        if !part.is_empty() {
            path.push(part);
        }
    }
    path
}

/// `serve`'s defaults for rules at `config`: clap's own parse, so every
/// flag (also those added later) starts exactly where `serve` starts. The
/// `RATEKEEPER_*` fallbacks are removed first, so the process environment
/// plays no part.
fn serve_defaults(config: &Path) -> Result<ServeArgs, String> {
    let command =
        ServeArgs::augment_args(clap::Command::new("serve")).mut_args(|arg| arg.env(None));
    let argv = [
        std::ffi::OsStr::new("serve"),
        std::ffi::OsStr::new("--config"),
        config.as_os_str(),
    ];
    let matches = command
        .try_get_matches_from(argv)
        .map_err(|e| format!("internal error building the settings: {e}"))?;
    ServeArgs::from_arg_matches(&matches)
        .map_err(|e| format!("internal error building the settings: {e}"))
}

/// The xDS client's settings.
const XDS_VARIABLES: [&str; 15] = [
    "CONFIG_GRPC_XDS_NODE_ID",
    "CONFIG_GRPC_XDS_NODE_METADATA",
    "CONFIG_GRPC_XDS_SERVER_URL",
    "CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL",
    "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS",
    "CONFIG_GRPC_XDS_SERVER_USE_TLS",
    "CONFIG_GRPC_XDS_CLIENT_TLS_CERT",
    "CONFIG_GRPC_XDS_CLIENT_TLS_KEY",
    "CONFIG_GRPC_XDS_SERVER_TLS_CACERT",
    "CONFIG_GRPC_XDS_SERVER_TLS_SAN",
    "XDS_CLIENT_BACKOFF_INITIAL_INTERVAL",
    "XDS_CLIENT_BACKOFF_MAX_INTERVAL",
    "XDS_CLIENT_BACKOFF_RANDOM_FACTOR",
    "XDS_CLIENT_BACKOFF_JITTER",
    "XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES",
];

#[cfg(test)]
mod tests;
