//! Command-line flags. Every flag can also be set through an environment
//! variable `RATEKEEPER_<FLAG>`; the flag wins when both are given. Boolean
//! variables take the usual spellings (`1`/`0`, `true`/`false`, `yes`/`no`,
//! `on`/`off`, any case). [`parse`] also refuses flags that would have no
//! effect with the others given, naming both (see [`conflicts`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::failure_policy::FailurePolicy;

/// Default gRPC listen address (the port envoyproxy/ratelimit uses).
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:8081";
/// Default admin HTTP listen address; loopback so it is not exposed by accident.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:8080";
/// Default Redis URL.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Default number of Redis connections per endpoint (see the store's).
pub const DEFAULT_REDIS_POOL_SIZE: usize = crate::store::redis::DEFAULT_POOL_SIZE;
/// Default store deadline: room for a Redis a few milliseconds away (6 ms
/// round trip plus jitter), and still under Envoy's 20 ms rate limit
/// timeout, so a failure-policy answer reaches Envoy before it gives up.
pub const DEFAULT_STORE_TIMEOUT: &str = "15ms";
/// Default expiry jitter: upstream's 300 s; taken modulo each key's window,
/// it spreads the end of a window's keys over the next window (at most 5
/// minutes), so Redis never blocks deleting them at once.
pub const DEFAULT_EXPIRATION_JITTER_MAX: &str = "300s";
/// Default deadline for opening a Redis connection.
pub const DEFAULT_REDIS_CONNECT_TIMEOUT: &str = "1s";
/// Default cap on live counters in the memory store.
pub const DEFAULT_MEMORY_MAX_KEYS: usize = crate::store::memory::DEFAULT_MAX_KEYS;
/// Default time between two looks at the rules files.
pub const DEFAULT_CONFIG_RELOAD_INTERVAL: &str = "1s";
/// Default time between readiness turning false and the listeners closing.
pub const DEFAULT_DRAIN_DELAY: &str = "0s";
/// Default time in-flight calls get to finish at shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: &str = "10s";

/// ratekeeper: a gRPC rate limit decision service.
#[derive(Debug, Parser)]
#[command(name = "ratekeeper", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the ShouldAllow and Envoy RLS APIs.
    Serve(Box<ServeArgs>),
    /// Validate a rules file or directory, print a summary and exit 0 (valid) or 1.
    CheckConfig {
        /// A rules file or a directory of them.
        path: PathBuf,

        /// Merge a domain found in several files into one tree, as `serve
        /// --merge-domain-config` does (envoyproxy/ratelimit's
        /// MERGE_DOMAIN_CONFIG); without it such a domain is refused.
        #[arg(long, env = "RATEKEEPER_MERGE_DOMAIN_CONFIG", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
        merge_domain_config: bool,

        /// Also list the runtime overrides stored in this Redis (a single
        /// node; no environment variable, so it is never reached by
        /// surprise). Without it they are not shown.
        #[arg(long)]
        redis_url: Option<String>,
    },
    /// Call a running ratekeeper's admin API (overrides, inspect, reset)
    /// over its admin HTTP port.
    Admin(crate::admin_api::client::AdminArgs),
    /// Serve in place of envoyproxy/ratelimit: its environment variables
    /// (RUNTIME_ROOT, REDIS_URL, USE_STATSD, …), its ports and HTTP
    /// endpoints; no flags. The same as running the binary as `ratelimit`.
    Upstream,
}

/// Where counters are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// In this process: no setup, per instance.
    Memory,
    /// In Redis: shared by every instance.
    Redis,
    /// In a Redis Cluster (`--redis-cluster-nodes`): shared by every instance.
    RedisCluster,
    /// In the Redis master that Redis Sentinel names (`--redis-sentinel-nodes`,
    /// `--redis-sentinel-master`), following its failovers.
    RedisSentinel,
}

/// How counters are keyed in a Redis store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyLayoutKind {
    /// ratekeeper's own keys: injective, versioned, hash-tagged.
    Ratekeeper,
    /// envoyproxy/ratelimit's keys and commands for every limit it can
    /// express, so old and new instances enforce one limit during a
    /// migration.
    EnvoyRatelimit,
}

impl KeyLayoutKind {
    /// The name the flag takes.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyLayoutKind::Ratekeeper => "ratekeeper",
            KeyLayoutKind::EnvoyRatelimit => "envoy-ratelimit",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `ratekeeper serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Rules file, or a directory of rules files (envoyproxy/ratelimit YAML).
    #[arg(long, env = "RATEKEEPER_CONFIG")]
    pub config: PathBuf,

    /// gRPC listen address (ShouldAllow, Envoy RLS v3, health).
    #[arg(long, env = "RATEKEEPER_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: SocketAddr,

    /// Admin HTTP listen address (/healthz, /readyz).
    #[arg(long, env = "RATEKEEPER_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,

    /// Metrics-only HTTP listen address (`/metrics`, `/healthz`), for a
    /// scraper on the network while the admin port stays on loopback. Off
    /// when unset.
    #[arg(long, env = "RATEKEEPER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Counter store.
    #[arg(long, env = "RATEKEEPER_STORE", value_enum, default_value_t = StoreKind::Memory)]
    pub store: StoreKind,

    /// Redis URL: redis://[user:password@]host:port[/db], or rediss:// for TLS.
    #[arg(long, env = "RATEKEEPER_REDIS_URL", default_value = DEFAULT_REDIS_URL)]
    pub redis_url: String,

    /// Redis Cluster seed nodes for `--store redis-cluster`, comma-separated:
    /// host:port or redis://[user:password@]host:port (rediss:// for TLS).
    #[arg(long, env = "RATEKEEPER_REDIS_CLUSTER_NODES", value_delimiter = ',')]
    pub redis_cluster_nodes: Vec<String>,

    /// Sentinels for `--store redis-sentinel`, comma-separated: host:port or
    /// redis://[user:password@]host:port (the sentinels' own credentials;
    /// rediss:// for TLS to the sentinels and the master).
    #[arg(long, env = "RATEKEEPER_REDIS_SENTINEL_NODES", value_delimiter = ',')]
    pub redis_sentinel_nodes: Vec<String>,

    /// The master's name as the sentinels know it (`--store redis-sentinel`).
    #[arg(long, env = "RATEKEEPER_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// ACL user for the master the sentinels name, if it needs one.
    #[arg(long, env = "RATEKEEPER_REDIS_SENTINEL_MASTER_USERNAME")]
    pub redis_sentinel_master_username: Option<String>,

    /// Password for the master the sentinels name, if it needs one (prefer
    /// the environment variable to the flag: flags show in `ps`).
    #[arg(long, env = "RATEKEEPER_REDIS_SENTINEL_MASTER_PASSWORD")]
    pub redis_sentinel_master_password: Option<String>,

    /// PEM CA certificate to trust for a rediss:// URL instead of the public
    /// roots (a private CA).
    #[arg(long, env = "RATEKEEPER_REDIS_CA_CERT")]
    pub redis_ca_cert: Option<PathBuf>,

    /// PEM client certificate chain for a rediss:// Redis that requires
    /// client certificates.
    #[arg(
        long,
        env = "RATEKEEPER_REDIS_CLIENT_CERT",
        requires = "redis_client_key"
    )]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM private key of --redis-client-cert.
    #[arg(
        long,
        env = "RATEKEEPER_REDIS_CLIENT_KEY",
        requires = "redis_client_cert"
    )]
    pub redis_client_key: Option<PathBuf>,

    /// Redis connections; concurrent requests share them, pipelined.
    #[arg(long, env = "RATEKEEPER_REDIS_POOL_SIZE", default_value_t = DEFAULT_REDIS_POOL_SIZE,
          value_parser = parse_positive)]
    pub redis_pool_size: usize,

    /// Deadline of one store call (e.g. 10ms); past it the call fails with UNAVAILABLE.
    #[arg(long, env = "RATEKEEPER_STORE_TIMEOUT", default_value = DEFAULT_STORE_TIMEOUT, value_parser = parse_duration)]
    pub store_timeout: Duration,

    /// Deadline for opening one Redis connection.
    #[arg(long, env = "RATEKEEPER_REDIS_CONNECT_TIMEOUT", default_value = DEFAULT_REDIS_CONNECT_TIMEOUT, value_parser = parse_duration)]
    pub redis_connect_timeout: Duration,

    /// Redis stores: add up to this much (at random per call), and less than
    /// the key's window, to every key's TTL, so the keys of one window do
    /// not all expire at its end: Redis would block deleting them
    /// (envoyproxy/ratelimit's EXPIRATION_JITTER_MAX_SECONDS). A key never
    /// outlives its state by more than this. 0 turns it off. With
    /// `--key-layout envoy-ratelimit`, upstream's keys get whole seconds in
    /// `[0, this)`, as upstream draws them.
    #[arg(long, env = "RATEKEEPER_EXPIRATION_JITTER_MAX", default_value = DEFAULT_EXPIRATION_JITTER_MAX, value_parser = humantime::parse_duration)]
    pub expiration_jitter_max: Duration,

    /// Redis stores: `ratekeeper` keys, or `envoy-ratelimit`: count every
    /// limit envoyproxy/ratelimit can express in its keys with its commands,
    /// so that during a rolling migration old and new instances enforce one
    /// limit (its key collisions come back meanwhile; see the README).
    #[arg(long, env = "RATEKEEPER_KEY_LAYOUT", value_enum, default_value_t = KeyLayoutKind::Ratekeeper)]
    pub key_layout: KeyLayoutKind,

    /// With `--key-layout envoy-ratelimit`: prepended verbatim to every key
    /// (envoyproxy/ratelimit's CACHE_KEY_PREFIX; empty by default).
    #[arg(long, env = "RATEKEEPER_CACHE_KEY_PREFIX")]
    pub cache_key_prefix: Option<String>,

    /// Most live counters the memory store keeps.
    #[arg(long, env = "RATEKEEPER_MEMORY_MAX_KEYS", default_value_t = DEFAULT_MEMORY_MAX_KEYS,
          value_parser = parse_positive)]
    pub memory_max_keys: usize,

    /// Longest reservation (`ShouldAllow`'s `reservation_ttl`); longer ones
    /// are shortened to it.
    #[arg(long, env = "RATEKEEPER_MAX_RESERVATION_TTL", default_value = "1h", value_parser = parse_duration)]
    pub max_reservation_ttl: Duration,

    /// Most reservations open at once; past it, reserving is refused.
    #[arg(long, env = "RATEKEEPER_MAX_RESERVATIONS", default_value_t = crate::reservation::ledger::DEFAULT_MAX_OPEN,
          value_parser = parse_positive)]
    pub max_reservations: usize,

    /// Most descriptors in one request.
    #[arg(long, env = "RATEKEEPER_MAX_DESCRIPTORS", default_value_t = crate::api::DEFAULT_MAX_DESCRIPTORS,
          value_parser = parse_positive)]
    pub max_descriptors: usize,

    /// Most entries in one descriptor.
    #[arg(long, env = "RATEKEEPER_MAX_ENTRIES", default_value_t = crate::api::DEFAULT_MAX_ENTRIES,
          value_parser = parse_positive)]
    pub max_entries: usize,

    /// Longest domain, entry key or entry value, in bytes.
    #[arg(long, env = "RATEKEEPER_MAX_VALUE_BYTES", default_value_t = crate::api::DEFAULT_MAX_VALUE_BYTES,
          value_parser = parse_positive)]
    pub max_value_bytes: usize,

    /// Envoy API: when any descriptor of a request is over its limit, count
    /// only the over-limit ones (envoyproxy/ratelimit's
    /// STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT).
    #[arg(long, env = "RATEKEEPER_STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub stop_cache_key_increment_when_overlimit: bool,

    /// Global shadow mode: every request is answered OK; descriptors are still
    /// counted and their statuses reported (envoyproxy/ratelimit's SHADOW_MODE).
    #[arg(long, env = "RATEKEEPER_SHADOW_MODE", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub shadow_mode: bool,

    /// Envoy API: add envoyproxy/ratelimit's three rate limit headers to
    /// every answer (RateLimit-Limit/-Remaining/-Reset by default; upstream's
    /// LIMIT_RESPONSE_HEADERS_ENABLED), and nothing else.
    #[arg(long, env = "RATEKEEPER_RESPONSE_HEADERS", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub response_headers: bool,

    /// Envoy API: add the IETF httpapi draft's RateLimit-Policy and
    /// RateLimit headers to every answer, and Retry-After when over the
    /// limit (a ratekeeper extension; may be on with --response-headers).
    #[arg(long, env = "RATEKEEPER_DRAFT_RATE_LIMIT_HEADERS", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub draft_rate_limit_headers: bool,

    /// Envoy API: global quota mode (envoyproxy/ratelimit's QUOTA_MODE):
    /// every descriptor that is not unlimited is a quota descriptor, so a
    /// request is over the limit only when all of them are.
    #[arg(long, env = "RATEKEEPER_QUOTA_MODE", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub quota_mode: bool,

    /// Envoy API: add dynamic metadata to every answer (domain,
    /// descriptors, hits addends and the metadata of rules within their
    /// limit; envoyproxy/ratelimit's RESPONSE_DYNAMIC_METADATA).
    #[arg(long, env = "RATEKEEPER_RESPONSE_DYNAMIC_METADATA", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub response_dynamic_metadata: bool,

    /// Merge a domain found in several rules files into one tree
    /// (envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG); a descriptor defined in
    /// two of them is still refused. Without it such a domain is refused.
    #[arg(long, env = "RATEKEEPER_MERGE_DOMAIN_CONFIG", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub merge_domain_config: bool,

    /// Name of the limit header (upstream's LIMIT_LIMIT_HEADER).
    #[arg(
        long,
        env = "RATEKEEPER_LIMIT_HEADER",
        default_value = "RateLimit-Limit"
    )]
    pub limit_header: String,

    /// Name of the remaining header (upstream's LIMIT_REMAINING_HEADER).
    #[arg(
        long,
        env = "RATEKEEPER_REMAINING_HEADER",
        default_value = "RateLimit-Remaining"
    )]
    pub remaining_header: String,

    /// Name of the reset header (upstream's LIMIT_RESET_HEADER).
    #[arg(
        long,
        env = "RATEKEEPER_RESET_HEADER",
        default_value = "RateLimit-Reset"
    )]
    pub reset_header: String,

    /// What to answer for limited descriptors when the store fails: `error`
    /// (UNAVAILABLE, the gateway's failure mode decides), `allow`, `deny`, or
    /// `local` (count in this instance's memory until the store is back).
    #[arg(long, env = "RATEKEEPER_FAILURE_POLICY", default_value = "error", value_parser = failure_policy_parser())]
    pub failure_policy: FailurePolicy,

    /// Consecutive store failures after which the circuit breaker opens and
    /// answers by the failure policy without calling the store. Calls in
    /// flight together (one coalesced Redis call) fail as one.
    #[arg(long, env = "RATEKEEPER_BREAKER_FAILURES", default_value_t = crate::store::breaker::DEFAULT_THRESHOLD,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: u32,

    /// How long the open breaker waits before letting one call probe the store.
    #[arg(long, env = "RATEKEEPER_BREAKER_COOLDOWN", default_value = "200ms", value_parser = parse_duration)]
    pub breaker_cooldown: Duration,

    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, env = "RATEKEEPER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "RATEKEEPER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate: require client certificates signed by it (mTLS).
    #[arg(long, env = "RATEKEEPER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Largest encoded request, in bytes; larger ones are refused before decoding.
    #[arg(long, env = "RATEKEEPER_MAX_REQUEST_BYTES", default_value_t = crate::api::DEFAULT_MAX_REQUEST_BYTES,
          value_parser = parse_positive)]
    pub max_request_bytes: usize,

    /// Counters known to be over their limit kept in this process, answered
    /// without a store call until their retry time; 0 turns the cache off.
    #[arg(long, env = "RATEKEEPER_OVER_LIMIT_CACHE_SIZE", default_value_t = 0)]
    pub over_limit_cache_size: usize,

    /// OTLP/gRPC collector to export RPC and store spans to, e.g.
    /// `http://otel-collector:4317` (needs a build with `--features otlp`).
    /// Off when unset. `OTEL_SERVICE_NAME` names the service (default
    /// `ratekeeper`).
    #[arg(long, env = "RATEKEEPER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Share (0 to 1) of requests without a W3C `traceparent` that are
    /// traced and exported; a request with one follows its sampled flag.
    #[arg(long, env = "RATEKEEPER_OTLP_SAMPLE_RATIO", default_value_t = 1.0)]
    pub otlp_sample_ratio: f64,

    /// Most requests decided at once; more are refused at once with
    /// RESOURCE_EXHAUSTED (counted as decision="shed") rather than queued
    /// past the gateway's timeout.
    #[arg(long, env = "RATEKEEPER_MAX_IN_FLIGHT", default_value_t = crate::limiter::DEFAULT_MAX_IN_FLIGHT,
          value_parser = parse_positive)]
    pub max_in_flight: usize,

    /// Most distinct per-value metric labels kept (rules with
    /// `detailed_metric` or `value_to_metric`, limit overrides), over all
    /// rules; further values are counted under their rule's own path (and
    /// in ratelimit_detailed_metric_folded_total).
    #[arg(long, env = "RATEKEEPER_MAX_DETAILED_METRIC_SERIES", default_value_t = crate::metrics::DEFAULT_MAX_DETAILED_SERIES)]
    pub max_detailed_metric_series: usize,

    /// Share (0 to 1) of a limit past which hits count as near it in
    /// ratelimit_rule_near_limit_total (envoyproxy/ratelimit's NEAR_LIMIT_RATIO).
    #[arg(long, env = "RATEKEEPER_NEAR_LIMIT_RATIO", default_value = "0.8", value_parser = parse_ratio)]
    pub near_limit_ratio: f32,

    /// File holding the admin API's bearer token (overrides, inspect,
    /// reset; gRPC and the admin port). Without it the admin API serves
    /// loopback callers only.
    #[arg(long, env = "RATEKEEPER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// How often each instance reads the overrides' version in the store
    /// (one GET), reloading them when it moved: the bound on how long an
    /// override or a reset takes to reach every instance.
    #[arg(long, env = "RATEKEEPER_OVERRIDES_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub overrides_poll_interval: Duration,

    /// Most overrides stored (each is a lookup entry and a metrics series
    /// on every instance); a new one past it is refused until one is
    /// deleted or expires.
    #[arg(long, env = "RATEKEEPER_MAX_OVERRIDES", default_value_t = crate::overrides::DEFAULT_MAX_OVERRIDES,
          value_parser = parse_positive)]
    pub max_overrides: usize,

    /// Tests only: every decision reads this fixed time (Unix ms) instead of
    /// the clock — the memory store, the local fallback, the over-limit
    /// cache and the Redis scripts — so a multi-process test can count
    /// exactly without a window boundary passing. Never in production:
    /// windows would never end.
    #[arg(long, env = "RATEKEEPER_TEST_FROZEN_CLOCK_MS", hide = true)]
    pub test_frozen_clock_ms: Option<u64>,

    /// Threads serving requests (default: the CPUs this process may use).
    /// With one, the runtime is single-threaded, which on one CPU serves
    /// more than a multi-threaded one.
    #[arg(long, env = "RATEKEEPER_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,

    /// Log format.
    #[arg(long, env = "RATEKEEPER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How often the rules files are re-read; a valid change applies at once,
    /// an invalid one is refused and the last good rules stay.
    #[arg(long, env = "RATEKEEPER_CONFIG_RELOAD_INTERVAL", default_value = DEFAULT_CONFIG_RELOAD_INTERVAL, value_parser = parse_duration)]
    pub config_reload_interval: Duration,

    /// After SIGTERM/SIGINT, keep serving this long with readiness already
    /// false (so load balancers stop sending) before closing the listeners.
    #[arg(long, env = "RATEKEEPER_DRAIN_DELAY", default_value = DEFAULT_DRAIN_DELAY, value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,

    /// Time in-flight calls get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "RATEKEEPER_SHUTDOWN_TIMEOUT", default_value = DEFAULT_SHUTDOWN_TIMEOUT, value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// RLQS: the Envoys' usage report period (Envoy sends every 5 s,
    /// whatever its config says); a subscriber silent for 3 periods is gone.
    #[arg(long, env = "RATEKEEPER_RLQS_REPORT_PERIOD", default_value = "5s", value_parser = parse_duration)]
    pub rlqs_report_period: Duration,

    /// RLQS: most buckets one stream may subscribe to; more are abandoned.
    #[arg(long, env = "RATEKEEPER_RLQS_MAX_BUCKETS_PER_STREAM",
          default_value_t = crate::rlqs::DEFAULT_MAX_BUCKETS_PER_STREAM, value_parser = parse_positive)]
    pub rlqs_max_buckets_per_stream: usize,

    /// RLQS: most distinct buckets a domain may have on this instance; more
    /// are abandoned.
    #[arg(long, env = "RATEKEEPER_RLQS_MAX_BUCKETS_PER_DOMAIN",
          default_value_t = crate::rlqs::DEFAULT_MAX_BUCKETS_PER_DOMAIN, value_parser = parse_positive)]
    pub rlqs_max_buckets_per_domain: usize,

    /// RLQS: reports without requests after which a bucket is abandoned.
    #[arg(long, env = "RATEKEEPER_RLQS_ABANDON_AFTER_IDLE_REPORTS",
          default_value_t = crate::rlqs::DEFAULT_ABANDON_AFTER_IDLE_REPORTS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rlqs_abandon_after_idle_reports: u32,
}

/// The policy names, listed in `--help` and checked like an enum.
fn failure_policy_parser() -> impl clap::builder::TypedValueParser<Value = FailurePolicy> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(FailurePolicy::ALL.map(FailurePolicy::as_str))
        .map(|name| FailurePolicy::parse(&name).unwrap_or_default())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 10ms, 2s, 1m)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(duration)
}

fn parse_ratio(text: &str) -> Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        Ok(_) => Err("must be between 0 and 1".to_owned()),
        Err(e) => Err(format!("{e} (a number between 0 and 1, e.g. 0.8)")),
    }
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let argv = ["ratekeeper", "serve"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(args) => Ok(*args),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_work_out_of_the_box() {
        let args = serve(&["--config", "rules.yaml"]).unwrap();
        assert_eq!(args.grpc_addr.port(), 8081);
        assert!(args.admin_addr.ip().is_loopback());
        assert_eq!(args.store, StoreKind::Memory);
        assert_eq!(args.store_timeout, Duration::from_millis(15));
        // The library's default is the flag's.
        let library = crate::store::redis::RedisSettings::new("redis://x");
        assert_eq!(args.expiration_jitter_max, library.expiry_jitter);
        assert_eq!(args.expiration_jitter_max, Duration::from_secs(300));
        assert_eq!(args.near_limit_ratio, 0.8);
        assert!(!args.quota_mode && !args.merge_domain_config);
        let bounds = serve(&["--config", "x", "--near-limit-ratio", "0"]).unwrap();
        assert_eq!(bounds.near_limit_ratio, 0.0);
        let bounds = serve(&["--config", "x", "--near-limit-ratio", "1"]).unwrap();
        assert_eq!(bounds.near_limit_ratio, 1.0);
        assert_eq!(args.key_layout, KeyLayoutKind::Ratekeeper);
        assert_eq!(args.cache_key_prefix, None);
    }

    #[test]
    fn key_layout_names_are_the_flags() {
        for kind in KeyLayoutKind::value_variants() {
            let value = kind.to_possible_value().unwrap();
            assert_eq!(value.get_name(), kind.as_str());
            let args = serve(&["--config", "r", "--key-layout", kind.as_str()]).unwrap();
            assert_eq!(args.key_layout, *kind);
        }
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--config"),
            (&["--config", "x", "--store", "etcd"], "--store"),
            (
                &["--config", "x", "--grpc-addr", "localhost"],
                "--grpc-addr",
            ),
            (
                &["--config", "x", "--store-timeout", "soon"],
                "--store-timeout",
            ),
            (
                &["--config", "x", "--store-timeout", "0s"],
                "--store-timeout",
            ),
            (
                &["--config", "x", "--redis-pool-size", "0"],
                "--redis-pool-size",
            ),
            (
                &["--config", "x", "--max-descriptors", "0"],
                "--max-descriptors",
            ),
            (&["--config", "x", "--log-format", "xml"], "--log-format"),
            (
                &["--config", "x", "--max-in-flight", "0"],
                "--max-in-flight",
            ),
            (
                &["--config", "x", "--worker-threads", "0"],
                "--worker-threads",
            ),
            (
                &["--config", "x", "--worker-threads", "many"],
                "--worker-threads",
            ),
            (
                &["--config", "x", "--near-limit-ratio", "1.5"],
                "--near-limit-ratio",
            ),
            (
                &["--config", "x", "--near-limit-ratio=-0.1"],
                "--near-limit-ratio",
            ),
            (
                &["--config", "x", "--near-limit-ratio", "NaN"],
                "--near-limit-ratio",
            ),
            (
                &["--config", "x", "--near-limit-ratio", "most"],
                "--near-limit-ratio",
            ),
        ];
        for (args, flag) in cases {
            let error = serve(args).unwrap_err().to_string();
            assert!(error.contains(flag), "{args:?}: {error}");
        }
    }
}
