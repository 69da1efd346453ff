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

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args as _, FromArgMatches as _};

use super::args::{LogFormat, ServeArgs, StoreKind};
use super::go_syntax::{parse_bool, parse_duration, parse_int};
pub use super::load::DotFiles;

/// What one entry of the over-limit cache costs in memory, to turn
/// upstream's `LOCAL_CACHE_SIZE_IN_BYTES` into a number of entries: the
/// storage key (~70 bytes for a typical descriptor), the remembered denial
/// (40 bytes) and the hash map's own slot and control byte.
pub const OVER_LIMIT_CACHE_ENTRY_BYTES: i64 = 128;

/// Upstream's local cache (freecache) never has less than this: any size
/// above 0 gets at least 512 KiB.
pub const FREECACHE_MIN_BYTES: i64 = 512 * 1024;

/// The variable that freezes the clock in tests (the hidden
/// `--test-frozen-clock-ms`); the only `RATEKEEPER_` variable this mode reads.
pub const TEST_FROZEN_CLOCK_VAR: &str = "RATEKEEPER_TEST_FROZEN_CLOCK_MS";

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

// === reading ===

/// The environment, with typed getters that record every variable they are
/// asked about and every problem they find (answering the default then, so
/// reading goes on and every problem is reported).
struct Reader<'a> {
    env: &'a HashMap<String, String>,
    errors: Vec<EnvError>,
    seen: Vec<&'static str>,
}

impl<'a> Reader<'a> {
    fn new(env: &'a HashMap<String, String>) -> Self {
        Self {
            env,
            errors: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn raw(&mut self, name: &'static str) -> Option<&'a str> {
        self.seen.push(name);
        self.env.get(name).map(String::as_str)
    }

    /// Set at all, even to the empty string.
    fn given(&mut self, name: &'static str) -> bool {
        self.raw(name).is_some()
    }

    fn error(&mut self, name: &str, message: impl Into<String>) {
        self.errors.push(EnvError {
            variable: name.to_owned(),
            message: message.into(),
        });
    }

    fn string(&mut self, name: &'static str, default: &str) -> String {
        self.raw(name).unwrap_or(default).to_owned()
    }

    fn bool(&mut self, name: &'static str, default: bool) -> bool {
        match self.raw(name).map(parse_bool) {
            None => default,
            Some(Ok(value)) => value,
            Some(Err(message)) => {
                self.error(name, message);
                default
            }
        }
    }

    fn int(&mut self, name: &'static str, default: i64) -> i64 {
        match self.raw(name).map(|text| parse_int(text, 64)) {
            None => default,
            Some(Ok(value)) => value,
            Some(Err(message)) => {
                self.error(name, message);
                default
            }
        }
    }

    /// Nanoseconds.
    fn duration(&mut self, name: &'static str, default: &str) -> i64 {
        let parsed = match self.raw(name) {
            None => parse_duration(default),
            Some(text) => parse_duration(text),
        };
        parsed.unwrap_or_else(|message| {
            self.error(name, message);
            parse_duration(default).unwrap_or(0)
        })
    }

    /// A variable that only matters with a feature ratekeeper refuses
    /// (xDS, memcache, statsd, …): refused when set at all.
    fn refuse_if_given(&mut self, name: &'static str, why: &str) {
        if self.given(name) {
            self.error(name, format!("has no effect: {why}; remove it"));
        }
    }

    /// A behaviour another branch is adding as `flag`: refused when asked
    /// for until then.
    fn not_yet(&mut self, name: &'static str, value: &str, flag: &str) {
        self.error(
            name,
            format!("{value} is not supported yet (it will map to ratekeeper's {flag}); remove it"),
        );
    }
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
    if env.bool("MERGE_DOMAIN_CONFIG", false) {
        env.not_yet("MERGE_DOMAIN_CONFIG", "true", "--merge-domain-config");
    }

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
    args.grpc_addr = grpc_addr;
    let max_age = env.duration("GRPC_MAX_CONNECTION_AGE", "24h");
    let max_age_grace = env.duration("GRPC_MAX_CONNECTION_AGE_GRACE", "1h");
    let max_connection_age = connection_age(env, max_age, max_age_grace);
    grpc_tls(env, &mut args);

    // --- backend ---
    redis(env, &mut args);

    // --- behaviour ---
    let prefix = env.string("CACHE_KEY_PREFIX", "");
    if !prefix.is_empty() {
        // Wired with `layout`: args.key_layout = KeyLayout::EnvoyRatelimit;
        // args.cache_key_prefix = Some(prefix).
        env.not_yet(
            "CACHE_KEY_PREFIX",
            &format!("'{prefix}'"),
            "--key-layout envoy-ratelimit --cache-key-prefix",
        );
    }
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
            // ratekeeper's near-limit metric counts above 80 %.
            Ok(ratio) if (ratio - 0.8).abs() < f32::EPSILON => {}
            // Wired with `semantics`: args.near_limit_ratio = ratio;
            Ok(_) => env.not_yet("NEAR_LIMIT_RATIO", text, "--near-limit-ratio"),
            Err(_) => env.error("NEAR_LIMIT_RATIO", format!("'{text}' is not a number")),
        }
    }
    args.stop_cache_key_increment_when_overlimit =
        env.bool("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", false);
    args.shadow_mode = env.bool("SHADOW_MODE", false);
    if env.bool("QUOTA_MODE", false) {
        // Wired with `semantics`: args.quota_mode = true;
        env.not_yet("QUOTA_MODE", "true", "--quota-mode");
    }
    if env.bool("RESPONSE_DYNAMIC_METADATA", false) {
        // Wired with `semantics`: args.response_dynamic_metadata = true;
        env.not_yet(
            "RESPONSE_DYNAMIC_METADATA",
            "true",
            "--response-dynamic-metadata",
        );
    }
    let headers = env.bool("LIMIT_RESPONSE_HEADERS_ENABLED", false);
    if headers {
        // Wired with `semantics` (exactly upstream's three headers):
        // args.response_headers = true;
        env.not_yet(
            "LIMIT_RESPONSE_HEADERS_ENABLED",
            "true",
            "--response-headers",
        );
    }
    // Wired with the headers: args.limit_header (--limit-header),
    // args.remaining_header, args.reset_header.
    for name in [
        "LIMIT_LIMIT_HEADER",
        "LIMIT_REMAINING_HEADER",
        "LIMIT_RESET_HEADER",
    ] {
        env.refuse_if_given(
            name,
            "it names a header of LIMIT_RESPONSE_HEADERS_ENABLED=true, which is not supported yet",
        );
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

/// `RATEKEEPER_*` variables (but the test clock) and `RUST_LOG` would do
/// nothing here: this mode reads upstream's variables only.
fn refuse_foreign_variables(env: &mut Reader<'_>) {
    let mut foreign: Vec<&String> = env
        .env
        .keys()
        .filter(|name| {
            (name.starts_with("RATEKEEPER_") && *name != TEST_FROZEN_CLOCK_VAR)
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

// === listeners ===

/// `host` and `port` variables as Go's `net.JoinHostPort` and `Listen`
/// take them: the host an IP address (or empty, or `localhost`), the port
/// 0 to 65535.
fn listen_addr(
    env: &mut Reader<'_>,
    (host_var, host_default): (&'static str, &str),
    (port_var, port_default): (&'static str, i64),
) -> SocketAddr {
    let host = env.string(host_var, host_default);
    let port = env.int(port_var, port_default);
    let ip = listen_ip(&host).unwrap_or_else(|message| {
        env.error(host_var, message);
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    let port = u16::try_from(port).unwrap_or_else(|_| {
        env.error(port_var, format!("{port} is not a port (0 to 65535)"));
        0
    });
    SocketAddr::new(ip, port)
}

/// A host to listen on: an IP address; empty for every interface; or
/// `localhost`.
fn listen_ip(host: &str) -> Result<IpAddr, String> {
    match host {
        "" => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        "localhost" => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        _ => host.parse().map_err(|_| {
            format!("'{host}' is not an IP address (ratekeeper does not resolve names to listen on; use e.g. 0.0.0.0)")
        }),
    }
}

/// A Go listen address (`PROMETHEUS_ADDR`): `host:port`, the host empty
/// (every interface), an IP address (IPv6 in brackets) or `localhost`.
fn go_listen_addr(text: &str) -> Result<SocketAddr, String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("'{text}' is not host:port (e.g. :9090)"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip = listen_ip(host)?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("'{port}' in '{text}' is not a port number (0 to 65535)"))?;
    Ok(SocketAddr::new(ip, port))
}

/// `GRPC_MAX_CONNECTION_AGE` / `_GRACE`, as gRPC-Go takes them: 0 means no
/// limit.
fn connection_age(env: &mut Reader<'_>, age: i64, grace: i64) -> Option<Duration> {
    let mut nonnegative = |name: &'static str, nanos: i64| match u64::try_from(nanos) {
        Ok(nanos) => Some(Duration::from_nanos(nanos)),
        Err(_) => {
            env.error(
                name,
                "is negative; use 0 (no limit) or a duration such as 24h",
            );
            None
        }
    };
    let grace = nonnegative("GRPC_MAX_CONNECTION_AGE_GRACE", grace);
    let age = nonnegative("GRPC_MAX_CONNECTION_AGE", age)?;
    let _ = grace;
    (!age.is_zero()).then_some(age)
}

/// TLS on the gRPC listener.
fn grpc_tls(env: &mut Reader<'_>, args: &mut ServeArgs) {
    let use_tls = env.bool("GRPC_SERVER_USE_TLS", false);
    let cert = env.string("GRPC_SERVER_TLS_CERT", "");
    let key = env.string("GRPC_SERVER_TLS_KEY", "");
    let client_ca = env.string("GRPC_CLIENT_TLS_CACERT", "");
    let san = env.string("GRPC_CLIENT_TLS_SAN", "");
    if !use_tls {
        for (name, value) in [
            ("GRPC_SERVER_TLS_CERT", &cert),
            ("GRPC_SERVER_TLS_KEY", &key),
            ("GRPC_CLIENT_TLS_CACERT", &client_ca),
            ("GRPC_CLIENT_TLS_SAN", &san),
        ] {
            if !value.is_empty() {
                env.error(
                    name,
                    "has no effect without GRPC_SERVER_USE_TLS=true; remove it or set GRPC_SERVER_USE_TLS=true",
                );
            }
        }
        return;
    }
    for (name, value) in [
        ("GRPC_SERVER_TLS_CERT", &cert),
        ("GRPC_SERVER_TLS_KEY", &key),
    ] {
        if value.is_empty() {
            env.error(
                name,
                "is required with GRPC_SERVER_USE_TLS=true (a PEM file)",
            );
        }
    }
    if !san.is_empty() {
        env.error(
            "GRPC_CLIENT_TLS_SAN",
            "checking a client certificate's SAN is not supported: remove it (with \
             GRPC_CLIENT_TLS_CACERT every certificate that CA signed is accepted)",
        );
    }
    if cert.is_empty() || key.is_empty() {
        return;
    }
    args.tls_cert = Some(cert.into());
    args.tls_key = Some(key.into());
    if !client_ca.is_empty() {
        args.tls_client_ca = Some(client_ca.into());
    }
}

/// Two listeners on one port would fail to bind: say which variables.
fn check_listeners(env: &mut Reader<'_>, args: &ServeArgs, mode: &UpstreamMode) {
    let mut listeners = vec![
        ("GRPC_PORT", args.grpc_addr),
        ("PORT", mode.http_addr),
        ("DEBUG_PORT", mode.debug_addr),
    ];
    if let Some(prometheus) = &mode.prometheus {
        listeners.push(("PROMETHEUS_ADDR", prometheus.addr));
    }
    for (i, (name, addr)) in listeners.iter().enumerate() {
        for (other, other_addr) in &listeners[..i] {
            let overlap = addr.ip() == other_addr.ip()
                || addr.ip().is_unspecified()
                || other_addr.ip().is_unspecified();
            if addr.port() != 0 && addr.port() == other_addr.port() && overlap {
                env.error(
                    name,
                    format!(
                        "{addr} is also {other}'s listener ({other_addr}); give each listener its own port"
                    ),
                );
            }
        }
    }
}

// === backend ===

/// Redis: which deployment, where, with which credentials and TLS.
fn redis(env: &mut Reader<'_>, args: &mut ServeArgs) {
    let backend = env.string("BACKEND_TYPE", "redis");
    match backend.as_str() {
        "redis" | "" => {}
        "memcache" => env.error(
            "BACKEND_TYPE",
            "memcache is not supported: ratekeeper counts in Redis (BACKEND_TYPE=redis, the default)",
        ),
        other => env.error(
            "BACKEND_TYPE",
            format!("'{other}' is not a backend; use redis (the default)"),
        ),
    }
    for name in MEMCACHE_VARIABLES {
        env.refuse_if_given(
            name,
            "it configures the memcache backend, which ratekeeper does not support",
        );
    }

    let socket_given = env.given("REDIS_SOCKET_TYPE");
    let socket = env.string("REDIS_SOCKET_TYPE", "unix");
    // `None` for a socket type that is refused (then REDIS_URL is not judged).
    let unix = match socket.as_str() {
        "unix" => Some(true),
        "tcp" => Some(false),
        other => {
            env.error(
                "REDIS_SOCKET_TYPE",
                format!("'{other}' is not a socket type; use tcp or unix"),
            );
            None
        }
    };
    let kind = env.string("REDIS_TYPE", "SINGLE");
    let url = env.string("REDIS_URL", "/var/run/nutcracker/ratelimit.sock");
    let auth = env.string("REDIS_AUTH", "");
    let sentinel_auth_given = env.given("REDIS_SENTINEL_AUTH");
    let sentinel_auth = env.string("REDIS_SENTINEL_AUTH", "");
    let tls = env.bool("REDIS_TLS", false);
    let client_cert = env.string("REDIS_TLS_CLIENT_CERT", "");
    let client_key = env.string("REDIS_TLS_CLIENT_KEY", "");
    let ca_cert = env.string("REDIS_TLS_CACERT", "");
    if env.bool("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", false) {
        env.error(
            "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
            "is not supported: ratekeeper always checks the Redis server's name; use a \
             certificate for the host in REDIS_URL (REDIS_TLS_CACERT for a private CA) and remove it",
        );
    }
    let pool_size = env.int("REDIS_POOL_SIZE", 10);
    match usize::try_from(pool_size) {
        Ok(size) if size >= 1 => args.redis_pool_size = size,
        _ => env.error(
            "REDIS_POOL_SIZE",
            format!("{pool_size} connections: use at least 1"),
        ),
    }
    let timeout = env.duration("REDIS_TIMEOUT", "10s");
    match u64::try_from(timeout) {
        // A dial timeout: what ratekeeper gives one connect (in the
        // background). Each call keeps ratekeeper's own deadline
        // (--store-timeout, 15 ms).
        Ok(nanos) if nanos > 0 => args.redis_connect_timeout = Duration::from_nanos(nanos),
        _ => env.error(
            "REDIS_TIMEOUT",
            "must be above 0: ratekeeper bounds every connect (e.g. 10s, the default)",
        ),
    }
    // Pipelining tunables: ratekeeper always pipelines, and coalesces the
    // decisions that wait together into one call, so there is nothing to tune.
    let _ = env.duration("REDIS_PIPELINE_WINDOW", "0");
    let _ = env.int("REDIS_PIPELINE_LIMIT", 0);
    let parallelism = env.int("REDIS_CLUSTER_PIPELINE_PARALLELISM", 1);
    if parallelism < 0 {
        env.error(
            "REDIS_CLUSTER_PIPELINE_PARALLELISM",
            format!("{parallelism} is negative (ratekeeper calls every slot of a request in parallel anyway)"),
        );
    }
    match env
        .string("REDIS_POOL_ON_EMPTY_BEHAVIOR", "WAIT")
        .to_ascii_uppercase()
        .as_str()
    {
        // Requests wait for a connection within their deadline.
        "WAIT" => {}
        "CREATE" | "ERROR" => env.error(
            "REDIS_POOL_ON_EMPTY_BEHAVIOR",
            "only WAIT (the default) is supported, as in upstream's current releases",
        ),
        other => env.error(
            "REDIS_POOL_ON_EMPTY_BEHAVIOR",
            format!("'{other}' is not a pool behaviour; use WAIT (the default)"),
        ),
    }
    // ratekeeper's health follows the store all along, as upstream's does
    // with this set to true.
    let _ = env.bool("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION", false);
    for (name, default) in [
        ("REDIS_STARTUP_INITIAL_INTERVAL", "1s"),
        ("REDIS_STARTUP_MAX_INTERVAL", "30s"),
        ("REDIS_STARTUP_MAX_ELAPSED_TIME", "0"),
    ] {
        let given = env.given(name);
        let value = env.duration(name, default);
        if given && value != parse_duration(default).unwrap_or(0) {
            env.error(
                name,
                "is not supported: ratekeeper does not wait for Redis before listening; it \
                 connects in the background (backoff 25 ms to 1 s, never giving up) and \
                 /healthcheck answers 500 until Redis answers; remove it",
            );
        }
    }
    if env.bool("REDIS_PERSECOND", false) {
        env.error(
            "REDIS_PERSECOND",
            "a second Redis for per-second limits is not supported: remove it (every limit counts \
             in REDIS_URL's Redis)",
        );
    }
    for name in PERSECOND_VARIABLES {
        env.refuse_if_given(
            name,
            "it configures REDIS_PERSECOND=true, which ratekeeper does not support",
        );
    }

    let (scheme, user, password) = {
        let (user, password) = credentials(&auth);
        (if tls { "rediss" } else { "redis" }, user, password)
    };
    let credentials_at = userinfo(user.as_deref(), password.as_deref());
    match kind.to_ascii_lowercase().as_str() {
        "single" => {
            args.store = StoreKind::Redis;
            if unix == Some(true) {
                if tls {
                    env.error("REDIS_TLS", "TLS over a unix socket is not supported (REDIS_SOCKET_TYPE=unix); remove it or use tcp");
                }
                if !url.starts_with('/') {
                    env.error(
                        "REDIS_URL",
                        format!("'{url}' is not an absolute socket path (REDIS_SOCKET_TYPE=unix); for a TCP Redis set REDIS_SOCKET_TYPE=tcp and REDIS_URL=host:port"),
                    );
                }
                args.redis_url = unix_url(&url, user.as_deref(), password.as_deref());
            } else if unix == Some(false) {
                match host_port(&url) {
                    Ok(addr) => args.redis_url = format!("{scheme}://{credentials_at}{addr}"),
                    Err(message) => env.error("REDIS_URL", message),
                }
            }
            if sentinel_auth_given {
                env.error(
                    "REDIS_SENTINEL_AUTH",
                    "has no effect with REDIS_TYPE=single; remove it",
                );
            }
        }
        "sentinel" => {
            args.store = StoreKind::RedisSentinel;
            tcp_only(env, socket_given && unix == Some(true), "sentinel");
            let mut items = url.split(',');
            let master = items.next().unwrap_or_default();
            let sentinels: Vec<&str> = items.collect();
            if master.is_empty() || sentinels.is_empty() {
                env.error(
                    "REDIS_URL",
                    format!(
                        "'{url}' is not <master name>,<sentinel host:port>,… (REDIS_TYPE=sentinel)"
                    ),
                );
            }
            let (sentinel_user, sentinel_password) = credentials(&sentinel_auth);
            let sentinel_userinfo =
                userinfo(sentinel_user.as_deref(), sentinel_password.as_deref());
            args.redis_sentinel_nodes = sentinels
                .iter()
                .filter_map(|node| match host_port(node) {
                    Ok(addr) => Some(format!("{scheme}://{sentinel_userinfo}{addr}")),
                    Err(message) => {
                        env.error("REDIS_URL", message);
                        None
                    }
                })
                .collect();
            args.redis_sentinel_master = Some(master.to_owned());
            args.redis_sentinel_master_username = user;
            args.redis_sentinel_master_password = password;
        }
        "cluster" => {
            args.store = StoreKind::RedisCluster;
            tcp_only(env, socket_given && unix == Some(true), "cluster");
            args.redis_cluster_nodes = url
                .split(',')
                .filter_map(|node| match host_port(node) {
                    Ok(addr) => Some(format!("{scheme}://{credentials_at}{addr}")),
                    Err(message) => {
                        env.error("REDIS_URL", message);
                        None
                    }
                })
                .collect();
            if sentinel_auth_given {
                env.error(
                    "REDIS_SENTINEL_AUTH",
                    "has no effect with REDIS_TYPE=cluster; remove it",
                );
            }
        }
        other => env.error(
            "REDIS_TYPE",
            format!("'{other}' is not a Redis type; use single, sentinel or cluster"),
        ),
    }

    // Certificates, with REDIS_TLS only.
    let certificate_files = [
        ("REDIS_TLS_CLIENT_CERT", &client_cert),
        ("REDIS_TLS_CLIENT_KEY", &client_key),
        ("REDIS_TLS_CACERT", &ca_cert),
    ];
    if !tls {
        for (name, value) in certificate_files {
            if !value.is_empty() {
                env.error(
                    name,
                    "has no effect without REDIS_TLS=true; remove it or set REDIS_TLS=true",
                );
            }
        }
        return;
    }
    match (client_cert.is_empty(), client_key.is_empty()) {
        (true, false) => env.error(
            "REDIS_TLS_CLIENT_KEY",
            "needs REDIS_TLS_CLIENT_CERT as well",
        ),
        (false, true) => env.error(
            "REDIS_TLS_CLIENT_CERT",
            "needs REDIS_TLS_CLIENT_KEY as well",
        ),
        (false, false) => {
            args.redis_client_cert = Some(client_cert.into());
            args.redis_client_key = Some(client_key.into());
        }
        (true, true) => {}
    }
    if !ca_cert.is_empty() {
        args.redis_ca_cert = Some(ca_cert.into());
    }
}

/// Sentinels and cluster nodes are reached over TCP: an explicit
/// `REDIS_SOCKET_TYPE=unix` would do nothing.
fn tcp_only(env: &mut Reader<'_>, explicit_unix: bool, kind: &str) {
    if explicit_unix {
        env.error(
            "REDIS_SOCKET_TYPE",
            format!("unix has no effect with REDIS_TYPE={kind} (its nodes are reached over TCP); remove it or set tcp"),
        );
    }
}

/// Upstream's `REDIS_AUTH`: `password`, or `user:password` (split at the
/// first `:`).
fn credentials(auth: &str) -> (Option<String>, Option<String>) {
    match auth.split_once(':') {
        _ if auth.is_empty() => (None, None),
        Some((user, password)) => (Some(user.to_owned()), Some(password.to_owned())),
        None => (None, Some(auth.to_owned())),
    }
}

/// `user:password@` for a URL, percent-encoded.
fn userinfo(user: Option<&str>, password: Option<&str>) -> String {
    match (user, password) {
        (None, None) => String::new(),
        (user, password) => format!(
            "{}:{}@",
            percent_encode(user.unwrap_or_default()),
            percent_encode(password.unwrap_or_default())
        ),
    }
}

/// A `redis+unix://` URL for the socket at `path`.
fn unix_url(path: &str, user: Option<&str>, password: Option<&str>) -> String {
    let path: String = path
        .split('/')
        .map(percent_encode)
        .collect::<Vec<_>>()
        .join("/");
    let mut query = Vec::new();
    if let Some(user) = user {
        query.push(format!("user={}", percent_encode(user)));
    }
    if let Some(password) = password {
        query.push(format!("pass={}", percent_encode(password)));
    }
    if query.is_empty() {
        format!("redis+unix://{path}")
    } else {
        format!("redis+unix://{path}?{}", query.join("&"))
    }
}

/// Everything but RFC 3986's unreserved characters, percent-encoded.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Upstream's `host:port` (IPv6 in brackets), checked.
fn host_port(text: &str) -> Result<String, String> {
    let shape = || {
        format!(
            "'{text}' is not host:port (upstream's form, e.g. redis:6379; put credentials in \
             REDIS_AUTH and use REDIS_TLS=true for TLS)"
        )
    };
    if text.contains("://") || text.contains('@') || text.contains('/') {
        return Err(shape());
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(shape)?;
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let valid_host = match bare {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && !host.contains([':', ' ', '[', ']']),
    };
    match port.parse::<u16>() {
        Ok(port) if port > 0 && valid_host => Ok(format!("{host}:{port}")),
        _ => Err(shape()),
    }
}

// === logs, metrics, tracing ===

/// `LOG_LEVEL` as logrus reads it (any case), as a tracing filter:
/// ratekeeper's own logs at that level, its libraries' at that level or
/// `warn`, whichever says less (upstream's level covers its own logs).
fn log_filter(env: &mut Reader<'_>) -> String {
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
fn metrics(env: &mut Reader<'_>) -> Option<PrometheusListener> {
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
        "ratekeeper's metric names are its own (README, Metrics)",
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
fn tracing_settings(env: &mut Reader<'_>) {
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

/// The memcache backend's settings.
const MEMCACHE_VARIABLES: [&str; 9] = [
    "MEMCACHE_HOST_PORT",
    "MEMCACHE_SRV",
    "MEMCACHE_SRV_REFRESH",
    "MEMCACHE_MAX_IDLE_CONNS",
    "MEMCACHE_TLS",
    "MEMCACHE_TLS_CLIENT_CERT",
    "MEMCACHE_TLS_CLIENT_KEY",
    "MEMCACHE_TLS_CACERT",
    "MEMCACHE_TLS_SKIP_HOSTNAME_VERIFICATION",
];

/// The per-second Redis's settings.
const PERSECOND_VARIABLES: [&str; 12] = [
    "REDIS_PERSECOND_SOCKET_TYPE",
    "REDIS_PERSECOND_TYPE",
    "REDIS_PERSECOND_URL",
    "REDIS_PERSECOND_POOL_SIZE",
    "REDIS_PERSECOND_AUTH",
    "REDIS_PERSECOND_SENTINEL_AUTH",
    "REDIS_PERSECOND_TLS",
    "REDIS_PERSECOND_TIMEOUT",
    "REDIS_PERSECOND_PIPELINE_WINDOW",
    "REDIS_PERSECOND_PIPELINE_LIMIT",
    "REDIS_PERSECOND_CLUSTER_PIPELINE_PARALLELISM",
    "REDIS_PERSECOND_POOL_ON_EMPTY_BEHAVIOR",
];

#[cfg(test)]
mod tests;
