//! The `ratekeeper` binary: parse flags, load rules, build the store, serve.
//! Exit codes: 0 after a clean shutdown, 64 for bad flags or config, 1 for a
//! runtime failure (e.g. a port already in use).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use ratekeeper::api::{EnvoyCounting, RequestLimits, ResponseHeaders, ShadowMode};
use ratekeeper::clock::{Clock, ManualClock, SystemClock};
use ratekeeper::config::{
    CliError, Command, ConfigSnapshot, KeyLayoutKind, ServeArgs, StoreKind, load_rules,
    read_snapshot,
};
use ratekeeper::reload::ReloadSettings;
use ratekeeper::rules::RuleLimit;
use ratekeeper::store::envoy_layout::EnvoyLayout;
use ratekeeper::store::redis::sentinel::SentinelSettings;
use ratekeeper::store::redis::{RedisSettings, RedisTls};
use ratekeeper::store::redis_cluster::RedisClusterSettings;
use ratekeeper::store::{
    CircuitBreaker, CounterStore, MemoryStore, OverLimitCache, RedisClusterStore, RedisStore,
};
use ratekeeper::{Listeners, Server, TlsSettings, telemetry};

const EXIT_CONFIG: u8 = 64;

/// mimalloc instead of the system allocator: each decision allocates a few
/// small, short-lived buffers (protobuf messages, keys), and glibc's malloc
/// was about a fifth of the server's CPU under load (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match ratekeeper::config::cli::parse(std::env::args_os()) {
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
        Command::CheckConfig { path } => check_config(&path),
        Command::Serve(args) => serve(*args),
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match load_rules(path) {
        Ok(rules) => {
            for (domain, _) in rules.domains() {
                println!("domain {domain}");
            }
            for rule in rules.all_rules() {
                let limit = match rule.limit {
                    RuleLimit::Limited(limit) => {
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
                    RuleLimit::Unlimited => "unlimited".to_owned(),
                };
                let shadow = if rule.shadow_mode { " (shadow)" } else { "" };
                let policy = rule
                    .failure_policy
                    .map(|p| format!(" (on store failure: {p})"))
                    .unwrap_or_default();
                println!("  {}: {limit}{shadow}{policy}", rule.path);
            }
            println!(
                "ok: {} domains, {} rules",
                rules.domains().count(),
                rules.all_rules().len()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("invalid config: {error}");
            ExitCode::FAILURE
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

fn serve(args: ServeArgs) -> ExitCode {
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
        telemetry::init(
            args.log_format,
            args.otlp_endpoint.as_deref(),
            args.otlp_sample_ratio,
        )
    };
    let telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("invalid tracing settings: {error:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let code = serve_with(args, &runtime);
    {
        let _runtime = runtime.enter();
        telemetry.shutdown();
    }
    code
}

fn serve_with(args: ServeArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    // The snapshot the rules come from is also hot reload's starting point.
    let loaded = read_snapshot(&args.config).and_then(|snapshot| {
        let rules = snapshot.compile()?;
        Ok((rules, snapshot))
    });
    let (rules, snapshot) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            tracing::error!(%error, "invalid config");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tls = match tls_settings(&args) {
        Ok(tls) => tls,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "invalid TLS settings");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The Redis pool spawns nothing until used, but building it needs a runtime.
    let store = match runtime.block_on(async { build_store(&args) }) {
        Ok(store) => store,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "invalid store settings");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match runtime.block_on(run(args, (rules, snapshot), store, tls)) {
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

fn tls_settings(args: &ServeArgs) -> anyhow::Result<Option<TlsSettings>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let settings = TlsSettings {
        cert_pem: read(cert, "--tls-cert")?,
        key_pem: read(key, "--tls-key")?,
        client_ca_pem: args
            .tls_client_ca
            .as_deref()
            .map(|ca| read(ca, "--tls-client-ca"))
            .transpose()?,
    };
    settings.validate().map_err(anyhow::Error::msg)?;
    Ok(Some(settings))
}

/// The clock decisions read: the system's, or the frozen one of
/// `--test-frozen-clock-ms`.
fn clock(args: &ServeArgs) -> Arc<dyn Clock> {
    match args.test_frozen_clock_ms {
        Some(ms) => Arc::new(ManualClock::new(ms)),
        None => Arc::new(SystemClock),
    }
}

fn build_store(args: &ServeArgs) -> anyhow::Result<Arc<dyn CounterStore>> {
    // A shared store fails as a whole: the breaker stops waiting on it.
    let with_breaker = |store: Arc<dyn CounterStore>| -> Arc<dyn CounterStore> {
        Arc::new(CircuitBreaker::new(
            store,
            args.breaker_failures,
            args.breaker_cooldown,
        ))
    };
    Ok(match args.store {
        StoreKind::Memory => Arc::new(MemoryStore::new(args.memory_max_keys, clock(args))),
        StoreKind::Redis => {
            let redis = RedisStore::new(&redis_settings(args)?).context("--redis-url")?;
            let redis = match args.test_frozen_clock_ms {
                Some(_) => redis.with_clock(clock(args)),
                None => redis,
            };
            let redis = match envoy_layout(args) {
                Some(layout) => redis.with_envoy_layout(layout),
                None => redis,
            };
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
            let redis = RedisStore::with_sentinels(&redis_settings(args)?, &sentinels)
                .context("--redis-sentinel-nodes / --redis-sentinel-master")?;
            let redis = match args.test_frozen_clock_ms {
                Some(_) => redis.with_clock(clock(args)),
                None => redis,
            };
            let redis = match envoy_layout(args) {
                Some(layout) => redis.with_envoy_layout(layout),
                None => redis,
            };
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
                tls: redis_tls(args)?,
                expiry_jitter: args.expiration_jitter_max,
            })
            .context("--redis-cluster-nodes")?;
            let cluster = match args.test_frozen_clock_ms {
                Some(_) => cluster.with_clock(clock(args)),
                None => cluster,
            };
            let cluster = match envoy_layout(args) {
                Some(layout) => cluster.with_envoy_layout(layout),
                None => cluster,
            };
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
fn redis_settings(args: &ServeArgs) -> anyhow::Result<RedisSettings> {
    Ok(RedisSettings {
        url: args.redis_url.clone(),
        pool_size: args.redis_pool_size,
        timeout: args.store_timeout,
        connect_timeout: args.redis_connect_timeout,
        tls: redis_tls(args)?,
        expiry_jitter: args.expiration_jitter_max,
    })
}

/// The certificates for `rediss://`, if any flag names one.
fn redis_tls(args: &ServeArgs) -> anyhow::Result<Option<RedisTls>> {
    let ca_pem = args
        .redis_ca_cert
        .as_deref()
        .map(|path| read(path, "--redis-ca-cert"))
        .transpose()?;
    let client_pem = match (&args.redis_client_cert, &args.redis_client_key) {
        (Some(cert), Some(key)) => Some((
            read(cert, "--redis-client-cert")?,
            read(key, "--redis-client-key")?,
        )),
        _ => None,
    };
    Ok((ca_pem.is_some() || client_pem.is_some()).then_some(RedisTls { ca_pem, client_pem }))
}

async fn run(
    args: ServeArgs,
    (rules, snapshot): (ratekeeper::rules::Rules, ConfigSnapshot),
    store: Arc<dyn CounterStore>,
    tls: Option<TlsSettings>,
) -> anyhow::Result<()> {
    // Before any port is bound: a SIGTERM from here on is a clean shutdown.
    let shutdown = ratekeeper::shutdown::signal();
    let grpc = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("binding --grpc-addr {}", args.grpc_addr))?;
    let admin = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding --admin-addr {}", args.admin_addr))?;
    let metrics = match args.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --metrics-addr {addr}"))?,
        ),
        None => None,
    };
    tracing::info!(
        grpc = %grpc.local_addr()?,
        admin = %admin.local_addr()?,
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
        .with_reload(ReloadSettings {
            path: args.config.clone(),
            interval: args.config_reload_interval,
            loaded: snapshot,
        })
        .with_drain_delay(args.drain_delay)
        .with_max_detailed_series(args.max_detailed_metric_series)
        .with_max_in_flight(args.max_in_flight)
        .with_failure_policy(args.failure_policy)
        .with_shutdown_timeout(args.shutdown_timeout);
    server
        .serve(
            Listeners {
                grpc,
                admin: Some(admin),
                metrics,
            },
            shutdown,
        )
        .await?;
    tracing::info!("ratekeeper stopped");
    Ok(())
}
