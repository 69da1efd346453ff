//! The `ratekeeper` binary: parse flags, load rules, build the store, serve.
//! Run as `ratelimit` (or `ratekeeper upstream`), it reads
//! envoyproxy/ratelimit's environment instead of flags and adds upstream's
//! HTTP surface. Exit codes: 0 after a clean shutdown, 64 for bad flags,
//! settings or config, 1 for a runtime failure (e.g. a port already in use).

use std::collections::HashMap;
use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use ratekeeper::admin_api::AdminAuth;
use ratekeeper::api::{
    DraftHeaders, DynamicMetadata, EnvoyCounting, QuotaMode, RequestLimits, ResponseHeaders,
    ShadowMode,
};
use ratekeeper::clock::{Clock, ManualClock, SystemClock};
use ratekeeper::config::upstream_env::{self, UpstreamMode};
use ratekeeper::config::{
    CliError, Command, ConfigSnapshot, DomainFiles, DotFiles, KeyLayoutKind, ServeArgs, StoreKind,
    load_rules_with, read_snapshot_with,
};
use ratekeeper::overrides::{MemoryOverrides, OverrideBackend, Overrides, RedisOverrides};
use ratekeeper::reload::ReloadSettings;
use ratekeeper::reservation::Ledger;
use ratekeeper::rules::{RuleLimit, Rules};
use ratekeeper::store::envoy_layout::EnvoyLayout;
use ratekeeper::store::redis::sentinel::SentinelSettings;
use ratekeeper::store::redis::{RedisSettings, RedisTls};
use ratekeeper::store::redis_cluster::RedisClusterSettings;
use ratekeeper::store::{
    CircuitBreaker, CounterStore, MemoryStore, OverLimitCache, RedisClusterStore, RedisStore,
};
use ratekeeper::upstream::UpstreamListeners;
use ratekeeper::{Listeners, Server, TlsSettings, telemetry};

const EXIT_CONFIG: u8 = 64;

/// mimalloc instead of the system allocator: each decision allocates a few
/// small, short-lived buffers (protobuf messages, keys), and glibc's malloc
/// was about a fifth of the server's CPU under load (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // envoyproxy/ratelimit's image runs /bin/ratelimit: ours links that
    // name to this binary, so swapping the image keeps the Deployment.
    if invoked_as_ratelimit(&argv) {
        if argv.len() > 1 {
            eprintln!(
                "ratelimit takes no arguments: like envoyproxy/ratelimit it reads its settings \
                 from environment variables (docs/migrating-from-envoy-ratelimit.md)"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        return upstream();
    }
    let cli = match ratekeeper::config::cli::parse(argv) {
        Ok(cli) => cli,
        Err(CliError::Display(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(CliError::Invalid(text)) => {
            eprint!("{}", text.trim_end());
            eprintln!();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::CheckConfig {
            path,
            merge_domain_config,
            redis_url,
        } => check_config(
            &path,
            domain_files(merge_domain_config),
            redis_url.as_deref(),
        ),
        Command::Serve(args) => serve(*args, &Mode::Serve),
        Command::Upstream => upstream(),
        Command::Admin(args) => ExitCode::from(ratekeeper::admin_api::client::run(args)),
    }
}

/// How the process was asked to serve.
#[derive(Debug)]
enum Mode {
    /// `ratekeeper serve`: flags and `RATEKEEPER_*` variables.
    Serve,
    /// In place of envoyproxy/ratelimit, from its environment.
    Upstream(Box<UpstreamMode>),
}

impl Mode {
    /// How the user named the setting `flag` stands for: the flag, or the
    /// upstream variable it came from.
    fn name(&self, flag: &'static str) -> &'static str {
        if matches!(self, Mode::Serve) {
            return flag;
        }
        match flag {
            "--grpc-addr" => "GRPC_HOST/GRPC_PORT",
            "--tls-cert" => "GRPC_SERVER_TLS_CERT",
            "--tls-key" => "GRPC_SERVER_TLS_KEY",
            "--tls-client-ca" => "GRPC_CLIENT_TLS_CACERT",
            "--redis-ca-cert" => "REDIS_TLS_CACERT",
            "--redis-client-cert" => "REDIS_TLS_CLIENT_CERT",
            "--redis-client-key" => "REDIS_TLS_CLIENT_KEY",
            "--redis-url"
            | "--redis-cluster-nodes"
            | "--redis-sentinel-nodes / --redis-sentinel-master" => "REDIS_URL",
            other => other,
        }
    }
}

/// Whether the binary was started under the name `ratelimit`.
fn invoked_as_ratelimit(argv: &[OsString]) -> bool {
    argv.first()
        .and_then(|program| std::path::Path::new(program).file_name())
        .is_some_and(|name| name == "ratelimit")
}

/// Serves from envoyproxy/ratelimit's environment.
fn upstream() -> ExitCode {
    let mut env = HashMap::new();
    let mut errors = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => {
                env.insert(name, value);
            }
            (Ok(name), Err(_))
                if upstream_env::is_known(&name) || name.starts_with("RATEKEEPER_") =>
            {
                errors.push(format!("{name}: is not valid UTF-8"));
            }
            // Not a variable this mode reads.
            _ => {}
        }
    }
    match upstream_env::from_env(&env) {
        Ok(settings) if errors.is_empty() => {
            serve(settings.serve, &Mode::Upstream(Box::new(settings.mode)))
        }
        result => {
            errors.extend(result.err().into_iter().flatten().map(|e| e.to_string()));
            eprintln!("invalid envoyproxy/ratelimit settings:");
            for error in errors {
                eprintln!("  {error}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `--merge-domain-config` as the loader takes it.
fn domain_files(merge: bool) -> DomainFiles {
    if merge {
        DomainFiles::Merge
    } else {
        DomainFiles::Refuse
    }
}

/// One limit as `check-config` prints it: `10 per second (fixed_window)`.
fn describe_limit(limit: &ratekeeper::rules::Limit) -> String {
    let per = match limit.unit_multiplier {
        1 => limit.unit.to_string(),
        n => format!("{n} × {}", limit.unit),
    };
    let burst = limit
        .burst
        .map(|b| format!(", burst {b}"))
        .unwrap_or_default();
    format!(
        "{} per {per} ({}{burst})",
        limit.requests_per_unit,
        limit.algorithm.as_str()
    )
}

fn check_config(
    path: &std::path::Path,
    domain_files: DomainFiles,
    redis_url: Option<&str>,
) -> ExitCode {
    match load_rules_with(path, domain_files) {
        Ok(rules) => {
            for (domain, _) in rules.domains() {
                println!("domain {domain}");
            }
            for rule in rules.all_rules() {
                let limit = match rule.limit {
                    RuleLimit::Limited(_) => rule
                        .limits()
                        .map(describe_limit)
                        .collect::<Vec<_>>()
                        .join(" and "),
                    RuleLimit::Unlimited => "unlimited".to_owned(),
                    RuleLimit::Concurrency(limit) => ratekeeper::lease::describe(&limit),
                };
                let shadow = if rule.shadow_mode { " (shadow)" } else { "" };
                let quota = if rule.quota_mode { " (quota)" } else { "" };
                let policy = rule
                    .failure_policy
                    .map(|p| format!(" (on store failure: {p})"))
                    .unwrap_or_default();
                println!("  {}: {limit}{shadow}{quota}{policy}", rule.path);
            }
            for rule in rules.rlqs().all() {
                println!(
                    "  rlqs {}: {}: {} per {} shared by all Envoys (burst {}, TTL {} s)",
                    rule.domain,
                    rule.name,
                    rule.requests_per_unit,
                    rule.unit,
                    rule.burst,
                    rule.ttl_seconds
                );
            }
            println!(
                "ok: {} domains, {} rules",
                rules.domains().count(),
                rules.all_rules().len()
            );
            print_overrides(redis_url);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("invalid config: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Lists the overrides stored in the Redis at `url`, or says why they are
/// not shown: they live in the store, which only `--redis-url` reaches.
fn print_overrides(url: Option<&str>) {
    let Some(url) = url else {
        println!(
            "runtime overrides are not shown: they live in the store (give --redis-url, or list them with `ratekeeper admin list`, GET /admin/v1/overrides or /rules)"
        );
        return;
    };
    let loaded = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|runtime| {
            runtime.block_on(async {
                let store = RedisStore::new(&RedisSettings::new(url)).map_err(|e| e.to_string())?;
                let redis = store.commands().ok_or("not a redis store")?;
                RedisOverrides::new(redis)
                    .load()
                    .await
                    .map_err(|e| e.to_string())
            })
        });
    match loaded {
        Ok((_, mut overrides)) => {
            overrides.sort_by_key(ratekeeper::overrides::Override::id);
            let now = SystemClock.now_ms();
            overrides.retain(|o| !o.expired(now));
            for o in &overrides {
                println!("override {}", serde_json::to_string(o).unwrap_or_default());
            }
            // Not the URL: it may hold a password.
            println!("{} runtime overrides in redis", overrides.len());
        }
        Err(error) => {
            println!("runtime overrides are not shown: cannot read them from redis: {error}");
        }
    }
}

/// The async runtime: one thread when the process may use one CPU (or
/// `--worker-threads 1`), where a current-thread runtime has no cross-thread
/// wakeups or work stealing to pay for; else a multi-thread runtime whose
/// workers are named `rk-worker` (and its blocking threads `rk-blocking`),
/// as `top -H` shows them.
fn runtime(args: &ServeArgs) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = args.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name_fn(move || {
                // The runtime starts its workers first; later threads are
                // its blocking pool's.
                static STARTED: AtomicUsize = AtomicUsize::new(0);
                if STARTED.fetch_add(1, Ordering::Relaxed) < threads {
                    "rk-worker".to_owned()
                } else {
                    "rk-blocking".to_owned()
                }
            })
            .enable_all()
            .build()
    }
}

fn serve(args: ServeArgs, mode: &Mode) -> ExitCode {
    let runtime = match runtime(&args) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's gRPC channel lives on this runtime.
    let telemetry = {
        let _runtime = runtime.enter();
        match mode {
            Mode::Serve => telemetry::init(
                args.log_format,
                args.otlp_endpoint.as_deref(),
                args.otlp_sample_ratio,
            ),
            Mode::Upstream(upstream) => telemetry::init_with_filter(
                &upstream.log_filter,
                args.log_format,
                args.otlp_endpoint.as_deref(),
                args.otlp_sample_ratio,
            ),
        }
    };
    let telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("invalid tracing settings: {error:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let code = serve_with(args, mode, &runtime);
    {
        let _runtime = runtime.enter();
        telemetry.shutdown();
    }
    code
}

fn serve_with(args: ServeArgs, mode: &Mode, runtime: &tokio::runtime::Runtime) -> ExitCode {
    if let Err(error) = ratekeeper::huge_pages::disable() {
        tracing::info!(%error, "transparent huge pages stay as the kernel sets them");
    }
    let dot_files = match mode {
        Mode::Serve => DotFiles::Skip,
        Mode::Upstream(upstream) => upstream.dot_files,
    };
    // The snapshot the rules come from is also hot reload's starting point.
    let loaded = read_snapshot_with(&args.config, dot_files).and_then(|snapshot| {
        let rules = snapshot.compile_with(domain_files(args.merge_domain_config))?;
        Ok((rules, snapshot))
    });
    let (rules, snapshot) = match (loaded, mode) {
        (Ok((rules, snapshot)), _) => (rules, Some(snapshot)),
        (Err(error), Mode::Serve) => {
            tracing::error!(%error, "invalid config");
            return ExitCode::from(EXIT_CONFIG);
        }
        // As envoyproxy/ratelimit: serve anyway, failing every call until a
        // valid config loads (hot reload reports why this one did not).
        (Err(_), Mode::Upstream(_)) => {
            tracing::warn!(
                config = %args.config.display(),
                "no valid rate limit configuration at startup: serving without one"
            );
            (Rules::not_loaded(), None)
        }
    };
    let tls = match tls_settings(&args, mode) {
        Ok(tls) => tls,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "invalid TLS settings");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The Redis pool spawns nothing until used, but building it needs a runtime.
    let store = match runtime.block_on(async { build_store(&args, mode) }) {
        Ok(store) => store,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "invalid store settings");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let admin = match admin_settings(&args, &store) {
        Ok(admin) => admin,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "invalid admin API settings");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match runtime.block_on(run(args, mode, (rules, snapshot), store, tls, admin)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "ratekeeper failed");
            ExitCode::FAILURE
        }
    }
}

/// Reads a file a flag names; errors say which flag.
fn read(path: &std::path::Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

fn tls_settings(args: &ServeArgs, mode: &Mode) -> anyhow::Result<Option<TlsSettings>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let settings = TlsSettings {
        cert_pem: read(cert, mode.name("--tls-cert"))?,
        key_pem: read(key, mode.name("--tls-key"))?,
        client_ca_pem: args
            .tls_client_ca
            .as_deref()
            .map(|ca| read(ca, mode.name("--tls-client-ca")))
            .transpose()?,
    };
    settings
        .validate()
        .map_err(anyhow::Error::msg)
        .with_context(|| {
            format!(
                "{} / {} / {}",
                mode.name("--tls-cert"),
                mode.name("--tls-key"),
                mode.name("--tls-client-ca")
            )
        })?;
    Ok(Some(settings))
}

/// Where overrides are kept (the counters' Redis, or this instance's
/// memory) and who may use the admin API.
fn admin_settings(
    args: &ServeArgs,
    store: &Arc<dyn CounterStore>,
) -> anyhow::Result<(Overrides, AdminAuth)> {
    let auth = match &args.admin_token_file {
        Some(path) => AdminAuth::from_token_file(&read(path, "--admin-token-file")?)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("--admin-token-file {}", path.display()))?,
        None => AdminAuth::LoopbackOnly,
    };
    // Every Redis store (single, Sentinel, Cluster) keeps them in Redis.
    let backend: Arc<dyn OverrideBackend> = match store.commands() {
        Some(redis) => Arc::new(RedisOverrides::new(redis)),
        None => Arc::new(MemoryOverrides::default()),
    };
    let overrides = Overrides::new(backend, Arc::new(SystemClock)).with_max(args.max_overrides);
    Ok((overrides, auth))
}

/// RLQS settings from the flags.
fn rlqs_settings(args: &ServeArgs) -> ratekeeper::rlqs::RlqsSettings {
    ratekeeper::rlqs::RlqsSettings {
        report_period: args.rlqs_report_period,
        max_buckets_per_stream: args.rlqs_max_buckets_per_stream,
        max_buckets_per_domain: args.rlqs_max_buckets_per_domain,
        abandon_after_idle_reports: args.rlqs_abandon_after_idle_reports,
        ..Default::default()
    }
}

/// Where RLQS subscribers are shared: the Redis of `--store redis`, so
/// instances divide one limit; otherwise this instance's memory.
fn rlqs_registry(
    args: &ServeArgs,
    mode: &Mode,
) -> anyhow::Result<Option<Arc<dyn ratekeeper::rlqs::Registry>>> {
    match args.store {
        StoreKind::Redis => {
            let tls = redis_tls(args, mode)?;
            let registry = ratekeeper::rlqs::RedisRegistry::with_tls(
                &args.redis_url,
                args.redis_connect_timeout,
                tls.as_ref(),
            )
            .context("--redis-url (RLQS registry)")?;
            Ok(Some(Arc::new(registry)))
        }
        StoreKind::Memory => Ok(None),
        _ => {
            tracing::warn!(
                "RLQS subscribers are shared through Redis only with --store redis; this instance divides its limits among its own streams"
            );
            Ok(None)
        }
    }
}

/// The clock decisions read: the system's, or the frozen one of
/// `--test-frozen-clock-ms`.
fn clock(args: &ServeArgs) -> Arc<dyn Clock> {
    match args.test_frozen_clock_ms {
        Some(ms) => Arc::new(ManualClock::new(ms)),
        None => Arc::new(SystemClock),
    }
}

fn build_store(args: &ServeArgs, mode: &Mode) -> anyhow::Result<Arc<dyn CounterStore>> {
    // A shared store fails as a whole: the breaker stops waiting on it.
    let with_breaker = |store: Arc<dyn CounterStore>| -> Arc<dyn CounterStore> {
        Arc::new(CircuitBreaker::new(
            store,
            args.breaker_failures,
            args.breaker_cooldown,
        ))
    };
    Ok(match args.store {
        StoreKind::Memory => Arc::new(MemoryStore::with_ledger(
            args.memory_max_keys,
            clock(args),
            Ledger::new(args.max_reservations, args.max_reservation_ttl),
        )),
        StoreKind::Redis => {
            let redis =
                RedisStore::new(&redis_settings(args, mode)?).context(mode.name("--redis-url"))?;
            let redis = match args.test_frozen_clock_ms {
                Some(_) => redis.with_clock(clock(args)),
                None => redis,
            };
            let redis = match envoy_layout(args) {
                Some(layout) => redis.with_envoy_layout(layout),
                None => redis,
            };
            let redis = redis.with_max_reservation_ttl(args.max_reservation_ttl);
            with_breaker(Arc::new(redis))
        }
        StoreKind::RedisSentinel => {
            let sentinels = SentinelSettings {
                nodes: args
                    .redis_sentinel_nodes
                    .iter()
                    .map(|node| node.trim().to_owned())
                    .filter(|node| !node.is_empty())
                    .collect(),
                master_name: args.redis_sentinel_master.clone().unwrap_or_default(),
                master_username: args.redis_sentinel_master_username.clone(),
                master_password: args.redis_sentinel_master_password.clone(),
            };
            let redis = RedisStore::with_sentinels(&redis_settings(args, mode)?, &sentinels)
                .context(mode.name("--redis-sentinel-nodes / --redis-sentinel-master"))?;
            let redis = match args.test_frozen_clock_ms {
                Some(_) => redis.with_clock(clock(args)),
                None => redis,
            };
            let redis = match envoy_layout(args) {
                Some(layout) => redis.with_envoy_layout(layout),
                None => redis,
            };
            let redis = redis.with_max_reservation_ttl(args.max_reservation_ttl);
            with_breaker(Arc::new(redis))
        }
        StoreKind::RedisCluster => {
            let nodes: Vec<String> = args
                .redis_cluster_nodes
                .iter()
                .map(|node| node.trim())
                .filter(|node| !node.is_empty())
                .map(|node| {
                    if node.contains("://") {
                        node.to_owned()
                    } else {
                        format!("redis://{node}")
                    }
                })
                .collect();
            let cluster = RedisClusterStore::new(&RedisClusterSettings {
                nodes,
                pool_size: args.redis_pool_size,
                timeout: args.store_timeout,
                connect_timeout: args.redis_connect_timeout,
                tls: redis_tls(args, mode)?,
                expiry_jitter: args.expiration_jitter_max,
            })
            .context(mode.name("--redis-cluster-nodes"))?;
            let cluster = match args.test_frozen_clock_ms {
                Some(_) => cluster.with_clock(clock(args)),
                None => cluster,
            };
            let cluster = match envoy_layout(args) {
                Some(layout) => cluster.with_envoy_layout(layout),
                None => cluster,
            };
            let cluster = cluster.with_max_reservation_ttl(args.max_reservation_ttl);
            with_breaker(Arc::new(cluster))
        }
    })
}

/// envoyproxy/ratelimit's keys, when `--key-layout envoy-ratelimit` asks for
/// them: windows from this host's clock (as upstream's), the jitter in whole
/// seconds (the flags refuse a fraction).
fn envoy_layout(args: &ServeArgs) -> Option<EnvoyLayout> {
    (args.key_layout == KeyLayoutKind::EnvoyRatelimit).then(|| {
        EnvoyLayout::new(
            args.cache_key_prefix.clone().unwrap_or_default(),
            clock(args),
            args.expiration_jitter_max.as_secs(),
        )
    })
}

/// The settings every Redis store shares, from the flags.
fn redis_settings(args: &ServeArgs, mode: &Mode) -> anyhow::Result<RedisSettings> {
    Ok(RedisSettings {
        url: args.redis_url.clone(),
        pool_size: args.redis_pool_size,
        timeout: args.store_timeout,
        connect_timeout: args.redis_connect_timeout,
        tls: redis_tls(args, mode)?,
        expiry_jitter: args.expiration_jitter_max,
    })
}

/// The certificates for `rediss://`, if any flag names one.
fn redis_tls(args: &ServeArgs, mode: &Mode) -> anyhow::Result<Option<RedisTls>> {
    let ca_pem = args
        .redis_ca_cert
        .as_deref()
        .map(|path| read(path, mode.name("--redis-ca-cert")))
        .transpose()?;
    let client_pem = match (&args.redis_client_cert, &args.redis_client_key) {
        (Some(cert), Some(key)) => Some((
            read(cert, mode.name("--redis-client-cert"))?,
            read(key, mode.name("--redis-client-key"))?,
        )),
        _ => None,
    };
    Ok((ca_pem.is_some() || client_pem.is_some()).then_some(RedisTls { ca_pem, client_pem }))
}

async fn run(
    args: ServeArgs,
    mode: &Mode,
    (rules, snapshot): (Rules, Option<ConfigSnapshot>),
    store: Arc<dyn CounterStore>,
    tls: Option<TlsSettings>,
    (overrides, admin_auth): (Overrides, AdminAuth),
) -> anyhow::Result<()> {
    // Before any port is bound: a SIGTERM from here on is a clean shutdown.
    let shutdown = ratekeeper::shutdown::signal();
    let bind = |addr: std::net::SocketAddr, name: &'static str| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {name} {addr}"))
    };
    let grpc = bind(args.grpc_addr, mode.name("--grpc-addr")).await?;
    // The upstream mode has upstream's listeners instead of the admin port
    // (whose routes it serves on the debug port).
    let (admin, metrics, upstream) = match mode {
        Mode::Serve => {
            let admin = bind(args.admin_addr, "--admin-addr").await?;
            let metrics = match args.metrics_addr {
                Some(addr) => Some(bind(addr, "--metrics-addr").await?),
                None => None,
            };
            (Some(admin), metrics, None)
        }
        Mode::Upstream(upstream) => {
            let prometheus = match &upstream.prometheus {
                Some(prometheus) => Some((
                    bind(prometheus.addr, "PROMETHEUS_ADDR").await?,
                    prometheus.path.clone(),
                )),
                None => None,
            };
            let listeners = UpstreamListeners {
                http: bind(upstream.http_addr, "HOST/PORT").await?,
                debug: bind(upstream.debug_addr, "DEBUG_HOST/DEBUG_PORT").await?,
                prometheus,
            };
            (None, None, Some(listeners))
        }
    };
    tracing::info!(
        grpc = %grpc.local_addr()?,
        admin = ?admin.as_ref().map(|l| l.local_addr()).transpose()?,
        http = ?upstream.as_ref().map(|l| l.http.local_addr()).transpose()?,
        debug = ?upstream.as_ref().map(|l| l.debug.local_addr()).transpose()?,
        store = store.backend(),
        key_layout = args.key_layout.as_str(),
        config = %args.config.display(),
        "ratekeeper serving"
    );
    let mut server = Server::new(rules, store).with_clock(clock(&args));
    if args.over_limit_cache_size > 0 {
        server = server.with_over_limit_cache(OverLimitCache::new(
            args.over_limit_cache_size,
            clock(&args),
        ));
    }
    if let Some(tls) = tls {
        server = server.with_tls(tls);
    }
    let dot_files = match mode {
        Mode::Serve => DotFiles::Skip,
        Mode::Upstream(upstream) => {
            server = server.with_config_health(upstream.config_health);
            if let Some(age) = upstream.max_connection_age {
                server = server.with_max_connection_age(age);
            }
            upstream.dot_files
        }
    };
    let server = server
        .with_request_limits(RequestLimits {
            max_descriptors: args.max_descriptors,
            max_entries: args.max_entries,
            max_value_bytes: args.max_value_bytes,
            max_request_bytes: args.max_request_bytes,
        })
        .with_envoy_counting(if args.stop_cache_key_increment_when_overlimit {
            EnvoyCounting::StopWhenOverLimit
        } else {
            EnvoyCounting::EveryHit
        })
        .with_shadow_mode(if args.shadow_mode {
            ShadowMode::Global
        } else {
            ShadowMode::Off
        })
        .with_response_headers(args.response_headers.then(|| ResponseHeaders {
            limit: args.limit_header.clone(),
            remaining: args.remaining_header.clone(),
            reset: args.reset_header.clone(),
        }))
        .with_draft_rate_limit_headers(if args.draft_rate_limit_headers {
            DraftHeaders::On
        } else {
            DraftHeaders::Off
        })
        .with_quota_mode(if args.quota_mode {
            QuotaMode::Global
        } else {
            QuotaMode::PerRule
        })
        .with_dynamic_metadata(if args.response_dynamic_metadata {
            DynamicMetadata::On
        } else {
            DynamicMetadata::Off
        })
        .with_reload(ReloadSettings {
            path: args.config.clone(),
            interval: args.config_reload_interval,
            loaded: snapshot,
            domain_files: domain_files(args.merge_domain_config),
            dot_files,
        })
        .with_drain_delay(args.drain_delay)
        .with_max_detailed_series(args.max_detailed_metric_series)
        .with_near_limit_ratio(args.near_limit_ratio)
        .with_max_in_flight(args.max_in_flight)
        .with_failure_policy(args.failure_policy)
        .with_shutdown_timeout(args.shutdown_timeout)
        .with_overrides(overrides, args.overrides_poll_interval)
        .with_admin_auth(admin_auth)
        .with_rlqs(rlqs_settings(&args), rlqs_registry(&args, mode)?);
    server
        .serve(
            Listeners {
                grpc,
                admin,
                metrics,
                upstream,
            },
            shutdown,
        )
        .await?;
    tracing::info!("ratekeeper stopped");
    Ok(())
}
