//! Every variable: its default, values it takes, and each refusal with its
//! message.

use super::*;
use crate::config::args::StoreKind;

/// The smallest environment that starts: statsd (upstream's default sink)
/// turned off.
const BASE: &[(&str, &str)] = &[("USE_STATSD", "false")];

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    BASE.iter()
        .chain(pairs)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ok(pairs: &[(&str, &str)]) -> UpstreamSettings {
    from_env(&env(pairs)).unwrap_or_else(|errors| panic!("{pairs:?} refused: {errors:?}"))
}

/// The messages `pairs` is refused with, for `variable` (which must be the
/// only variable refused).
fn refused(pairs: &[(&str, &str)], variable: &str) -> String {
    let errors = match from_env(&env(pairs)) {
        Ok(_) => panic!("{pairs:?} accepted"),
        Err(errors) => errors,
    };
    assert!(
        errors.iter().all(|e| e.variable == variable),
        "{pairs:?}: expected only {variable}, got {errors:?}"
    );
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_refused(pairs: &[(&str, &str)], variable: &str, needle: &str) {
    let message = refused(pairs, variable);
    assert!(message.starts_with(&format!("{variable}: ")), "{message}");
    assert!(message.contains(needle), "{pairs:?}: {message}");
}

const S: Duration = Duration::from_secs(1);

#[test]
fn defaults_are_upstreams() {
    let UpstreamSettings { serve, mode } = ok(&[]);
    assert_eq!(serve.grpc_addr, "0.0.0.0:8081".parse().unwrap());
    assert_eq!(mode.http_addr, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(mode.debug_addr, "0.0.0.0:6070".parse().unwrap());
    assert_eq!(mode.prometheus, None);
    assert_eq!(
        serve.config,
        PathBuf::from("/srv/runtime_data/current/config")
    );
    assert_eq!(mode.dot_files, DotFiles::Read);
    assert_eq!(serve.store, StoreKind::Redis);
    assert_eq!(
        serve.redis_url,
        "redis+unix:///var/run/nutcracker/ratelimit.sock"
    );
    assert_eq!(serve.redis_pool_size, 10);
    assert_eq!(serve.redis_connect_timeout, 10 * S);
    // The store deadline stays ratekeeper's own.
    assert_eq!(serve.store_timeout, Duration::from_millis(15));
    assert_eq!(serve.expiration_jitter_max, 300 * S);
    assert_eq!(serve.over_limit_cache_size, 0);
    assert!(!serve.stop_cache_key_increment_when_overlimit);
    assert!(!serve.shadow_mode);
    assert!(!serve.response_headers);
    assert_eq!(serve.log_format, LogFormat::Text);
    assert_eq!(mode.log_filter, "warn");
    assert_eq!(mode.config_health, ConfigHealth::StoreOnly);
    assert_eq!(mode.max_connection_age, Some(24 * 3600 * S));
    assert_eq!(serve.test_frozen_clock_ms, None);
    assert!(serve.tls_cert.is_none() && serve.redis_ca_cert.is_none());
    // Everything else is serve's default.
    assert_eq!(
        serve.failure_policy,
        crate::failure_policy::FailurePolicy::Error
    );
    assert_eq!(serve.max_in_flight, crate::limiter::DEFAULT_MAX_IN_FLIGHT);
}

#[test]
fn an_empty_environment_asks_for_statsd_and_is_refused() {
    let errors = from_env(&HashMap::new()).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0].to_string(),
        "USE_STATSD: true (the default) asks for a statsd sink, which ratekeeper does not have: \
         set USE_STATSD=false, and USE_PROMETHEUS=true to serve Prometheus metrics"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let errors = from_env(&env(&[
        ("PORT", "http"),
        ("REDIS_TYPE", "ring"),
        ("QUOTA_MODE", "maybe"),
        ("LOG_LEVEL", "loud"),
    ]))
    .unwrap_err();
    let variables: Vec<&str> = errors.iter().map(|e| e.variable.as_str()).collect();
    for variable in ["PORT", "REDIS_TYPE", "QUOTA_MODE", "LOG_LEVEL"] {
        assert!(variables.contains(&variable), "{variable}: {errors:?}");
    }
}

#[test]
fn booleans_parse_as_gos_strconv() {
    for (text, value) in [
        ("true", true),
        ("1", true),
        ("T", true),
        ("True", true),
        ("0", false),
        ("F", false),
        ("FALSE", false),
    ] {
        assert_eq!(
            ok(&[("SHADOW_MODE", text)]).serve.shadow_mode,
            value,
            "{text}"
        );
    }
    for text in ["yes", "on", "", " true", "2"] {
        assert_refused(&[("SHADOW_MODE", text)], "SHADOW_MODE", "is not a boolean");
    }
    // Set but empty is set, as for upstream: not a boolean.
    assert_refused(&[("USE_STATSD", "")], "USE_STATSD", "is not a boolean");
}

#[test]
fn every_value_parses_as_upstreams_or_is_refused() {
    for name in [
        "FORCE_START_WITHOUT_INITIAL_CONFIG",
        "RUNTIME_IGNOREDOTFILES",
        "RUNTIME_WATCH_ROOT",
        "MERGE_DOMAIN_CONFIG",
        "GRPC_SERVER_USE_TLS",
        "REDIS_TLS",
        "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
        "REDIS_HEALTH_CHECK_ACTIVE_CONNECTION",
        "REDIS_PERSECOND",
        "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT",
        "SHADOW_MODE",
        "QUOTA_MODE",
        "RESPONSE_DYNAMIC_METADATA",
        "LIMIT_RESPONSE_HEADERS_ENABLED",
        "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED",
        "DISABLE_STATS",
        "USE_STATSD",
        "USE_DOG_STATSD",
        "USE_PROMETHEUS",
        "PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS",
        "TRACING_ENABLED",
    ] {
        assert_refused(&[(name, "yes")], name, "'yes' is not a boolean");
    }
    for name in [
        "PORT",
        "GRPC_PORT",
        "DEBUG_PORT",
        "REDIS_POOL_SIZE",
        "REDIS_PIPELINE_LIMIT",
        "REDIS_CLUSTER_PIPELINE_PARALLELISM",
        "EXPIRATION_JITTER_MAX_SECONDS",
        "LOCAL_CACHE_SIZE_IN_BYTES",
    ] {
        assert_refused(&[(name, "1.5")], name, "'1.5' is not an integer");
    }
    for name in [
        "GRPC_MAX_CONNECTION_AGE",
        "GRPC_MAX_CONNECTION_AGE_GRACE",
        "REDIS_TIMEOUT",
        "REDIS_PIPELINE_WINDOW",
        "REDIS_STARTUP_INITIAL_INTERVAL",
        "REDIS_STARTUP_MAX_INTERVAL",
        "REDIS_STARTUP_MAX_ELAPSED_TIME",
    ] {
        assert_refused(&[(name, "10")], name, "missing unit in duration '10'");
    }
}

// === listeners ===

#[test]
fn listeners_take_hosts_and_ports() {
    let UpstreamSettings { serve, mode } = ok(&[
        ("HOST", "127.0.0.1"),
        ("PORT", "0x1F91"),
        ("GRPC_HOST", "::1"),
        ("GRPC_PORT", "9081"),
        ("DEBUG_HOST", "localhost"),
        ("DEBUG_PORT", "6071"),
    ]);
    assert_eq!(mode.http_addr, "127.0.0.1:8081".parse().unwrap());
    assert_eq!(serve.grpc_addr, "[::1]:9081".parse().unwrap());
    assert_eq!(mode.debug_addr, "127.0.0.1:6071".parse().unwrap());
    // An empty host is every interface, as Go's.
    assert_eq!(
        ok(&[("HOST", "")]).mode.http_addr,
        "0.0.0.0:8080".parse().unwrap()
    );
}

#[test]
fn bad_listeners_are_refused() {
    assert_refused(
        &[("HOST", "ratelimit.local")],
        "HOST",
        "is not an IP address",
    );
    assert_refused(
        &[("GRPC_HOST", "[::1]")],
        "GRPC_HOST",
        "is not an IP address",
    );
    assert_refused(&[("PORT", "70000")], "PORT", "70000 is not a port");
    assert_refused(&[("DEBUG_PORT", "-1")], "DEBUG_PORT", "is not a port");
    assert_refused(&[("GRPC_PORT", "grpc")], "GRPC_PORT", "is not an integer");
    assert_refused(&[("GRPC_PORT", "")], "GRPC_PORT", "is not an integer");
    assert_refused(
        &[("DEBUG_PORT", "8080")],
        "DEBUG_PORT",
        "is also PORT's listener",
    );
    assert_refused(
        &[("HOST", "127.0.0.1"), ("GRPC_PORT", "8080")],
        "PORT",
        "is also GRPC_PORT's listener",
    );
    // Different addresses on one port are fine.
    ok(&[
        ("HOST", "127.0.0.1"),
        ("DEBUG_HOST", "127.0.0.2"),
        ("DEBUG_PORT", "8080"),
    ]);
    assert_refused(
        &[("GRPC_UDS", "/tmp/rl.sock")],
        "GRPC_UDS",
        "unix socket is not supported",
    );
    ok(&[("GRPC_UDS", "")]);
    ok(&[("PROTO", "tcp")]);
    assert_refused(&[("PROTO", "udp")], "PROTO", "only tcp");
}

#[test]
fn connection_age_is_grpc_gos() {
    let age = |pairs: &[(&str, &str)]| ok(pairs).mode.max_connection_age;
    assert_eq!(
        age(&[
            ("GRPC_MAX_CONNECTION_AGE", "30s"),
            ("GRPC_MAX_CONNECTION_AGE_GRACE", "5s")
        ]),
        Some(30 * S)
    );
    assert_eq!(age(&[("GRPC_MAX_CONNECTION_AGE", "0")]), None);
    assert_refused(
        &[("GRPC_MAX_CONNECTION_AGE", "-1s")],
        "GRPC_MAX_CONNECTION_AGE",
        "is negative",
    );
    assert_refused(
        &[("GRPC_MAX_CONNECTION_AGE_GRACE", "1")],
        "GRPC_MAX_CONNECTION_AGE_GRACE",
        "missing unit",
    );
    assert_refused(
        &[("GRPC_MAX_CONNECTION_AGE", "1d")],
        "GRPC_MAX_CONNECTION_AGE",
        "unknown unit 'd'",
    );
}

#[test]
fn grpc_tls_needs_its_switch() {
    let serve = ok(&[
        ("GRPC_SERVER_USE_TLS", "true"),
        ("GRPC_SERVER_TLS_CERT", "/tls/cert.pem"),
        ("GRPC_SERVER_TLS_KEY", "/tls/key.pem"),
        ("GRPC_CLIENT_TLS_CACERT", "/tls/ca.pem"),
    ])
    .serve;
    assert_eq!(serve.tls_cert, Some("/tls/cert.pem".into()));
    assert_eq!(serve.tls_key, Some("/tls/key.pem".into()));
    assert_eq!(serve.tls_client_ca, Some("/tls/ca.pem".into()));
    assert_refused(
        &[
            ("GRPC_SERVER_USE_TLS", "true"),
            ("GRPC_SERVER_TLS_KEY", "/k"),
        ],
        "GRPC_SERVER_TLS_CERT",
        "is required with GRPC_SERVER_USE_TLS=true",
    );
    assert_refused(
        &[("GRPC_SERVER_TLS_CERT", "/c")],
        "GRPC_SERVER_TLS_CERT",
        "has no effect without GRPC_SERVER_USE_TLS=true",
    );
    assert_refused(
        &[("GRPC_CLIENT_TLS_CACERT", "/ca")],
        "GRPC_CLIENT_TLS_CACERT",
        "has no effect without GRPC_SERVER_USE_TLS=true",
    );
    assert_refused(
        &[
            ("GRPC_SERVER_USE_TLS", "true"),
            ("GRPC_SERVER_TLS_CERT", "/c"),
            ("GRPC_SERVER_TLS_KEY", "/k"),
            ("GRPC_CLIENT_TLS_SAN", "client.example"),
        ],
        "GRPC_CLIENT_TLS_SAN",
        "SAN is not supported",
    );
}

// === config ===

#[test]
fn the_rules_directory_is_root_subdirectory_appdirectory() {
    let config = |pairs: &[(&str, &str)]| ok(pairs).serve.config;
    assert_eq!(
        config(&[
            ("RUNTIME_ROOT", "/data"),
            ("RUNTIME_SUBDIRECTORY", "ratelimit")
        ]),
        PathBuf::from("/data/ratelimit/config")
    );
    assert_eq!(
        config(&[
            ("RUNTIME_ROOT", "/data"),
            ("RUNTIME_SUBDIRECTORY", "/ratelimit"),
            ("RUNTIME_APPDIRECTORY", "rules"),
        ]),
        PathBuf::from("/data/ratelimit/rules")
    );
    assert_eq!(
        config(&[
            ("RUNTIME_ROOT", "/data"),
            ("RUNTIME_APPDIRECTORY", ""),
            ("RUNTIME_WATCH_ROOT", "false"),
        ]),
        PathBuf::from("/data")
    );
    assert_refused(
        &[("RUNTIME_APPDIRECTORY", "")],
        "RUNTIME_APPDIRECTORY",
        "with RUNTIME_WATCH_ROOT=true upstream loads no file at all",
    );
    assert_refused(
        &[("RUNTIME_WATCH_ROOT", "no")],
        "RUNTIME_WATCH_ROOT",
        "is not a boolean",
    );
    assert_eq!(
        ok(&[("RUNTIME_IGNOREDOTFILES", "true")]).mode.dot_files,
        DotFiles::Skip
    );
    assert_eq!(
        ok(&[("RUNTIME_IGNOREDOTFILES", "false")]).mode.dot_files,
        DotFiles::Read
    );
    assert_refused(
        &[("RUNTIME_IGNOREDOTFILES", "yes")],
        "RUNTIME_IGNOREDOTFILES",
        "is not a boolean",
    );
}

#[test]
fn config_comes_from_files_only() {
    ok(&[("CONFIG_TYPE", "FILE")]);
    assert_refused(
        &[("CONFIG_TYPE", "GRPC_XDS_SOTW")],
        "CONFIG_TYPE",
        "is not supported: mount the rules as files",
    );
    assert_refused(
        &[("CONFIG_TYPE", "file")],
        "CONFIG_TYPE",
        "'file' is not a config type",
    );
    for name in XDS_VARIABLES {
        assert_refused(
            &[(name, "x")],
            name,
            "CONFIG_TYPE=GRPC_XDS_SOTW, which ratekeeper does not support",
        );
    }
    ok(&[("FORCE_START_WITHOUT_INITIAL_CONFIG", "true")]);
    ok(&[("FORCE_START_WITHOUT_INITIAL_CONFIG", "false")]);
    assert_refused(
        &[("FORCE_START_WITHOUT_INITIAL_CONFIG", "y")],
        "FORCE_START_WITHOUT_INITIAL_CONFIG",
        "is not a boolean",
    );
    assert!(
        !ok(&[("MERGE_DOMAIN_CONFIG", "false")])
            .serve
            .merge_domain_config
    );
    assert!(
        ok(&[("MERGE_DOMAIN_CONFIG", "true")])
            .serve
            .merge_domain_config
    );
    assert_refused(
        &[("MERGE_DOMAIN_CONFIG", "both")],
        "MERGE_DOMAIN_CONFIG",
        "is not a boolean",
    );
}

// === backend ===

#[test]
fn a_single_redis_over_tcp() {
    let url = |pairs: &[(&str, &str)]| {
        let mut all = vec![
            ("REDIS_SOCKET_TYPE", "tcp"),
            ("REDIS_URL", "redis.local:6380"),
        ];
        all.extend_from_slice(pairs);
        ok(&all).serve.redis_url
    };
    assert_eq!(url(&[]), "redis://redis.local:6380");
    assert_eq!(url(&[("REDIS_TYPE", "Single")]), "redis://redis.local:6380");
    assert_eq!(
        url(&[("REDIS_AUTH", "s3cret")]),
        "redis://:s3cret@redis.local:6380"
    );
    assert_eq!(
        url(&[("REDIS_AUTH", "alice:p@ss:word/")]),
        "redis://alice:p%40ss%3Aword%2F@redis.local:6380"
    );
    assert_eq!(url(&[("REDIS_TLS", "true")]), "rediss://redis.local:6380");
    assert_eq!(
        ok(&[("REDIS_SOCKET_TYPE", "tcp"), ("REDIS_URL", "[::1]:6379")])
            .serve
            .redis_url,
        "redis://[::1]:6379"
    );
}

#[test]
fn a_single_redis_over_a_unix_socket() {
    let url = |pairs: &[(&str, &str)]| ok(pairs).serve.redis_url;
    assert_eq!(
        url(&[("REDIS_URL", "/run/redis/redis server.sock")]),
        "redis+unix:///run/redis/redis%20server.sock"
    );
    assert_eq!(
        url(&[("REDIS_URL", "/run/r.sock"), ("REDIS_AUTH", "bob:pa&ss")]),
        "redis+unix:///run/r.sock?user=bob&pass=pa%26ss"
    );
    assert_refused(
        &[("REDIS_URL", "redis.sock")],
        "REDIS_URL",
        "is not an absolute socket path",
    );
    assert_refused(
        &[("REDIS_URL", "redis:6379")],
        "REDIS_URL",
        "for a TCP Redis set REDIS_SOCKET_TYPE=tcp",
    );
    assert_refused(
        &[("REDIS_TLS", "true")],
        "REDIS_TLS",
        "TLS over a unix socket is not supported",
    );
    assert_refused(
        &[("REDIS_SOCKET_TYPE", "udp")],
        "REDIS_SOCKET_TYPE",
        "'udp' is not a socket type",
    );
}

#[test]
fn redis_urls_are_upstreams_host_port() {
    for url in [
        "redis://r:6379",
        "r",
        "r:",
        "r:0",
        "r:port",
        ":6379",
        "a b:1",
        "user@r:6379",
        "::1:6379",
    ] {
        assert_refused(
            &[("REDIS_SOCKET_TYPE", "tcp"), ("REDIS_URL", url)],
            "REDIS_URL",
            "is not host:port",
        );
    }
}

#[test]
fn redis_sentinel() {
    let serve = ok(&[
        ("REDIS_TYPE", "SENTINEL"),
        ("REDIS_URL", "mymaster,s1:26379,s2:26380"),
        ("REDIS_AUTH", "app:master-pw"),
        ("REDIS_SENTINEL_AUTH", "sentinel-pw"),
    ])
    .serve;
    assert_eq!(serve.store, StoreKind::RedisSentinel);
    assert_eq!(serve.redis_sentinel_master.as_deref(), Some("mymaster"));
    assert_eq!(
        serve.redis_sentinel_nodes,
        [
            "redis://:sentinel-pw@s1:26379",
            "redis://:sentinel-pw@s2:26380"
        ]
    );
    assert_eq!(serve.redis_sentinel_master_username.as_deref(), Some("app"));
    assert_eq!(
        serve.redis_sentinel_master_password.as_deref(),
        Some("master-pw")
    );
    let tls = ok(&[
        ("REDIS_TYPE", "sentinel"),
        ("REDIS_URL", "m,s1:26379"),
        ("REDIS_TLS", "1"),
    ])
    .serve;
    assert_eq!(tls.redis_sentinel_nodes, ["rediss://s1:26379"]);
    assert_eq!(tls.redis_sentinel_master_password, None);
    for url in ["mymaster", ",s1:26379", "m,s1"] {
        assert_refused(
            &[("REDIS_TYPE", "sentinel"), ("REDIS_URL", url)],
            "REDIS_URL",
            "",
        );
    }
    assert_refused(
        &[
            ("REDIS_TYPE", "sentinel"),
            ("REDIS_URL", "m,s:1"),
            ("REDIS_SOCKET_TYPE", "unix"),
        ],
        "REDIS_SOCKET_TYPE",
        "unix has no effect with REDIS_TYPE=sentinel",
    );
    ok(&[
        ("REDIS_TYPE", "sentinel"),
        ("REDIS_URL", "m,s:1"),
        ("REDIS_SOCKET_TYPE", "tcp"),
    ]);
    assert_refused(
        &[("REDIS_SENTINEL_AUTH", "pw")],
        "REDIS_SENTINEL_AUTH",
        "has no effect with REDIS_TYPE=single",
    );
}

#[test]
fn redis_cluster() {
    let serve = ok(&[
        ("REDIS_TYPE", "cluster"),
        ("REDIS_URL", "n1:7000,n2:7001,n3:7002"),
        ("REDIS_AUTH", "pw"),
        ("REDIS_POOL_SIZE", "4"),
    ])
    .serve;
    assert_eq!(serve.store, StoreKind::RedisCluster);
    assert_eq!(
        serve.redis_cluster_nodes,
        [
            "redis://:pw@n1:7000",
            "redis://:pw@n2:7001",
            "redis://:pw@n3:7002"
        ]
    );
    assert_eq!(serve.redis_pool_size, 4);
    assert_refused(
        &[("REDIS_TYPE", "cluster"), ("REDIS_URL", "n1:7000,n2")],
        "REDIS_URL",
        "'n2' is not host:port",
    );
    assert_refused(
        &[
            ("REDIS_TYPE", "cluster"),
            ("REDIS_URL", "n1:7000"),
            ("REDIS_SOCKET_TYPE", "unix"),
        ],
        "REDIS_SOCKET_TYPE",
        "unix has no effect with REDIS_TYPE=cluster",
    );
    assert_refused(
        &[
            ("REDIS_TYPE", "cluster"),
            ("REDIS_URL", "n1:7000"),
            ("REDIS_SENTINEL_AUTH", "x"),
        ],
        "REDIS_SENTINEL_AUTH",
        "has no effect with REDIS_TYPE=cluster",
    );
    assert_refused(
        &[("REDIS_TYPE", "ring")],
        "REDIS_TYPE",
        "'ring' is not a Redis type; use single, sentinel or cluster",
    );
}

#[test]
fn backends_other_than_redis_are_refused() {
    ok(&[("BACKEND_TYPE", "redis")]);
    ok(&[("BACKEND_TYPE", "")]);
    assert_refused(
        &[("BACKEND_TYPE", "memcache")],
        "BACKEND_TYPE",
        "memcache is not supported",
    );
    assert_refused(
        &[("BACKEND_TYPE", "Redis")],
        "BACKEND_TYPE",
        "'Redis' is not a backend",
    );
    for name in backend::MEMCACHE_VARIABLES {
        assert_refused(&[(name, "m:11211")], name, "memcache backend");
    }
}

#[test]
fn redis_pool_and_timeouts() {
    assert_eq!(ok(&[("REDIS_POOL_SIZE", "3")]).serve.redis_pool_size, 3);
    assert_refused(
        &[("REDIS_POOL_SIZE", "0")],
        "REDIS_POOL_SIZE",
        "use at least 1",
    );
    assert_refused(
        &[("REDIS_POOL_SIZE", "ten")],
        "REDIS_POOL_SIZE",
        "is not an integer",
    );
    assert_eq!(
        ok(&[("REDIS_TIMEOUT", "1.5s")]).serve.redis_connect_timeout,
        Duration::from_millis(1500)
    );
    assert_refused(
        &[("REDIS_TIMEOUT", "0")],
        "REDIS_TIMEOUT",
        "must be above 0",
    );
    assert_refused(&[("REDIS_TIMEOUT", "10")], "REDIS_TIMEOUT", "missing unit");
    ok(&[
        ("REDIS_PIPELINE_WINDOW", "150us"),
        ("REDIS_PIPELINE_LIMIT", "8"),
    ]);
    assert_refused(
        &[("REDIS_PIPELINE_WINDOW", "150")],
        "REDIS_PIPELINE_WINDOW",
        "missing unit",
    );
    ok(&[("REDIS_CLUSTER_PIPELINE_PARALLELISM", "0")]);
    assert_refused(
        &[("REDIS_CLUSTER_PIPELINE_PARALLELISM", "-1")],
        "REDIS_CLUSTER_PIPELINE_PARALLELISM",
        "is negative",
    );
    ok(&[("REDIS_POOL_ON_EMPTY_BEHAVIOR", "WAIT")]);
    ok(&[("REDIS_POOL_ON_EMPTY_BEHAVIOR", "wait")]);
    assert_refused(
        &[("REDIS_POOL_ON_EMPTY_BEHAVIOR", "CREATE")],
        "REDIS_POOL_ON_EMPTY_BEHAVIOR",
        "only WAIT",
    );
    assert_refused(
        &[("REDIS_POOL_ON_EMPTY_BEHAVIOR", "block")],
        "REDIS_POOL_ON_EMPTY_BEHAVIOR",
        "'BLOCK' is not a pool behaviour",
    );
    ok(&[("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION", "true")]);
    ok(&[
        ("REDIS_STARTUP_INITIAL_INTERVAL", "1s"),
        ("REDIS_STARTUP_MAX_INTERVAL", "30s"),
        ("REDIS_STARTUP_MAX_ELAPSED_TIME", "0s"),
    ]);
    for name in [
        "REDIS_STARTUP_INITIAL_INTERVAL",
        "REDIS_STARTUP_MAX_INTERVAL",
        "REDIS_STARTUP_MAX_ELAPSED_TIME",
    ] {
        assert_refused(
            &[(name, "2m")],
            name,
            "ratekeeper does not wait for Redis before listening",
        );
    }
}

#[test]
fn a_per_second_redis_is_refused() {
    ok(&[("REDIS_PERSECOND", "false")]);
    assert_refused(
        &[("REDIS_PERSECOND", "true")],
        "REDIS_PERSECOND",
        "not supported",
    );
    for name in backend::PERSECOND_VARIABLES {
        assert_refused(
            &[(name, "x")],
            name,
            "REDIS_PERSECOND=true, which ratekeeper does not support",
        );
    }
}

#[test]
fn redis_tls_certificates_need_redis_tls() {
    let tcp = [("REDIS_SOCKET_TYPE", "tcp"), ("REDIS_URL", "r:6379")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut pairs = tcp.to_vec();
        pairs.extend_from_slice(extra);
        pairs
    };
    let serve = ok(&with(&[
        ("REDIS_TLS", "true"),
        ("REDIS_TLS_CACERT", "/ca.pem"),
        ("REDIS_TLS_CLIENT_CERT", "/c.pem"),
        ("REDIS_TLS_CLIENT_KEY", "/k.pem"),
    ]))
    .serve;
    assert_eq!(serve.redis_url, "rediss://r:6379");
    assert_eq!(serve.redis_ca_cert, Some("/ca.pem".into()));
    assert_eq!(serve.redis_client_cert, Some("/c.pem".into()));
    assert_eq!(serve.redis_client_key, Some("/k.pem".into()));
    for name in [
        "REDIS_TLS_CACERT",
        "REDIS_TLS_CLIENT_CERT",
        "REDIS_TLS_CLIENT_KEY",
    ] {
        assert_refused(
            &with(&[(name, "/x.pem")]),
            name,
            "has no effect without REDIS_TLS=true",
        );
    }
    assert_refused(
        &with(&[("REDIS_TLS", "true"), ("REDIS_TLS_CLIENT_CERT", "/c.pem")]),
        "REDIS_TLS_CLIENT_CERT",
        "needs REDIS_TLS_CLIENT_KEY",
    );
    assert_refused(
        &with(&[("REDIS_TLS", "true"), ("REDIS_TLS_CLIENT_KEY", "/k.pem")]),
        "REDIS_TLS_CLIENT_KEY",
        "needs REDIS_TLS_CLIENT_CERT",
    );
    ok(&with(&[("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", "false")]));
    assert_refused(
        &with(&[
            ("REDIS_TLS", "true"),
            ("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", "true"),
        ]),
        "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
        "always checks the Redis server's name",
    );
}

// === behaviour ===

#[test]
fn behaviour_switches() {
    let serve = ok(&[
        ("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "true"),
        ("SHADOW_MODE", "1"),
    ])
    .serve;
    assert!(serve.stop_cache_key_increment_when_overlimit);
    assert!(serve.shadow_mode);
    assert_refused(
        &[("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "sure")],
        "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT",
        "is not a boolean",
    );
    assert_eq!(
        ok(&[("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", "true")])
            .mode
            .config_health,
        ConfigHealth::NeedsDomain
    );
    assert_refused(
        &[("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", "yes")],
        "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED",
        "is not a boolean",
    );
}

#[test]
fn expiration_jitter_is_whole_seconds() {
    let jitter = |text| {
        ok(&[("EXPIRATION_JITTER_MAX_SECONDS", text)])
            .serve
            .expiration_jitter_max
    };
    assert_eq!(jitter("0"), Duration::ZERO);
    assert_eq!(jitter("60"), 60 * S);
    assert_refused(
        &[("EXPIRATION_JITTER_MAX_SECONDS", "-1")],
        "EXPIRATION_JITTER_MAX_SECONDS",
        "is negative",
    );
    assert_refused(
        &[("EXPIRATION_JITTER_MAX_SECONDS", "5s")],
        "EXPIRATION_JITTER_MAX_SECONDS",
        "is not an integer",
    );
}

#[test]
fn the_local_cache_size_becomes_entries() {
    let entries = |text| {
        ok(&[("LOCAL_CACHE_SIZE_IN_BYTES", text)])
            .serve
            .over_limit_cache_size
    };
    assert_eq!(entries("0"), 0);
    // freecache never has less than 512 KiB.
    assert_eq!(entries("1"), 4096);
    assert_eq!(entries("1048576"), 8192);
    assert_eq!(entries("0x100000"), 8192);
    assert_refused(
        &[("LOCAL_CACHE_SIZE_IN_BYTES", "-1")],
        "LOCAL_CACHE_SIZE_IN_BYTES",
        "is negative",
    );
    assert_refused(
        &[("LOCAL_CACHE_SIZE_IN_BYTES", "1MB")],
        "LOCAL_CACHE_SIZE_IN_BYTES",
        "is not an integer",
    );
}

#[test]
fn envoy_surface_settings_map_onto_their_flags() {
    let off = ok(&[
        ("QUOTA_MODE", "false"),
        ("RESPONSE_DYNAMIC_METADATA", "false"),
        ("LIMIT_RESPONSE_HEADERS_ENABLED", "false"),
    ]);
    assert!(!off.serve.quota_mode && !off.serve.response_dynamic_metadata);
    assert!(!off.serve.response_headers && !off.serve.draft_rate_limit_headers);
    assert!((off.serve.near_limit_ratio - 0.8).abs() < f32::EPSILON);

    let on = ok(&[
        ("QUOTA_MODE", "1"),
        ("RESPONSE_DYNAMIC_METADATA", "T"),
        ("LIMIT_RESPONSE_HEADERS_ENABLED", "true"),
        ("NEAR_LIMIT_RATIO", "0.5"),
    ]);
    assert!(on.serve.quota_mode && on.serve.response_dynamic_metadata);
    // Exactly upstream's three headers, under upstream's default names.
    assert!(on.serve.response_headers && !on.serve.draft_rate_limit_headers);
    assert_eq!(
        [
            on.serve.limit_header.as_str(),
            &on.serve.remaining_header,
            &on.serve.reset_header
        ],
        ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"]
    );
    assert!((on.serve.near_limit_ratio - 0.5).abs() < f32::EPSILON);

    let named = ok(&[
        ("LIMIT_RESPONSE_HEADERS_ENABLED", "true"),
        ("LIMIT_LIMIT_HEADER", "X-Limit"),
        ("LIMIT_REMAINING_HEADER", "X-Left"),
        ("LIMIT_RESET_HEADER", "X-Reset"),
    ]);
    assert_eq!(
        [
            named.serve.limit_header.as_str(),
            &named.serve.remaining_header,
            &named.serve.reset_header
        ],
        ["X-Limit", "X-Left", "X-Reset"]
    );

    for (value, message) in [
        ("0.9x", "'0.9x' is not a number"),
        ("1.5", "1.5 is out of range"),
        ("-0.1", "-0.1 is out of range"),
    ] {
        assert_refused(&[("NEAR_LIMIT_RATIO", value)], "NEAR_LIMIT_RATIO", message);
    }
    for name in [
        "LIMIT_LIMIT_HEADER",
        "LIMIT_REMAINING_HEADER",
        "LIMIT_RESET_HEADER",
    ] {
        assert_refused(
            &[(name, "X-Limit")],
            name,
            "LIMIT_RESPONSE_HEADERS_ENABLED=true, which is off",
        );
    }
}

#[test]
fn upstreams_keys_by_default_with_its_prefix_and_ratekeepers_on_request() {
    use crate::config::args::KeyLayoutKind;

    let default = ok(&[]);
    assert_eq!(default.serve.key_layout, KeyLayoutKind::EnvoyRatelimit);
    assert_eq!(default.serve.cache_key_prefix, None);
    let prefixed = ok(&[("CACHE_KEY_PREFIX", "rl:")]);
    assert_eq!(prefixed.serve.key_layout, KeyLayoutKind::EnvoyRatelimit);
    assert_eq!(prefixed.serve.cache_key_prefix.as_deref(), Some("rl:"));
    let explicit = ok(&[
        ("RATEKEEPER_KEY_LAYOUT", "envoy-ratelimit"),
        ("CACHE_KEY_PREFIX", "rl:"),
    ]);
    assert_eq!(explicit.serve.cache_key_prefix.as_deref(), Some("rl:"));
    let own = ok(&[("RATEKEEPER_KEY_LAYOUT", "ratekeeper")]);
    assert_eq!(own.serve.key_layout, KeyLayoutKind::Ratekeeper);
    assert_refused(
        &[
            ("RATEKEEPER_KEY_LAYOUT", "ratekeeper"),
            ("CACHE_KEY_PREFIX", "rl:"),
        ],
        "CACHE_KEY_PREFIX",
        "has no effect with RATEKEEPER_KEY_LAYOUT=ratekeeper",
    );
    assert_refused(
        &[("RATEKEEPER_KEY_LAYOUT", "mine")],
        "RATEKEEPER_KEY_LAYOUT",
        "'mine' is not a key layout",
    );
}

// === logs, metrics, tracing ===

#[test]
fn log_levels_are_logrus_names_in_any_case() {
    let filter = |level| ok(&[("LOG_LEVEL", level)]).mode.log_filter;
    assert_eq!(filter("trace"), "warn,ratekeeper=trace");
    assert_eq!(filter("DEBUG"), "warn,ratekeeper=debug");
    assert_eq!(filter("Info"), "warn,ratekeeper=info");
    assert_eq!(filter("warning"), "warn");
    assert_eq!(filter("WARN"), "warn");
    assert_eq!(filter("error"), "error");
    assert_eq!(filter("fatal"), "error");
    assert_eq!(filter("panic"), "error");
    assert_refused(
        &[("LOG_LEVEL", "verbose")],
        "LOG_LEVEL",
        "'verbose' is not a log level",
    );
    assert_eq!(
        ok(&[("LOG_FORMAT", "json")]).serve.log_format,
        LogFormat::Json
    );
    assert_eq!(
        ok(&[("LOG_FORMAT", "JSON")]).serve.log_format,
        LogFormat::Json
    );
    assert_eq!(
        ok(&[("LOG_FORMAT", "text")]).serve.log_format,
        LogFormat::Text
    );
    assert_refused(
        &[("LOG_FORMAT", "logfmt")],
        "LOG_FORMAT",
        "use text (the default) or json",
    );
}

#[test]
fn prometheus_is_the_metrics_sink() {
    let prometheus = |pairs: &[(&str, &str)]| {
        let mut all = vec![("USE_PROMETHEUS", "true")];
        all.extend_from_slice(pairs);
        ok(&all).mode.prometheus.unwrap()
    };
    assert_eq!(
        prometheus(&[]),
        PrometheusListener {
            addr: "0.0.0.0:9090".parse().unwrap(),
            path: "/metrics".into()
        }
    );
    assert_eq!(
        prometheus(&[("PROMETHEUS_ADDR", "127.0.0.1:9191")]).addr,
        "127.0.0.1:9191".parse().unwrap()
    );
    assert_eq!(
        prometheus(&[("PROMETHEUS_ADDR", "[::1]:9191")]).addr,
        "[::1]:9191".parse().unwrap()
    );
    assert_eq!(
        prometheus(&[("PROMETHEUS_PATH", "/stats/")]).path,
        "/stats/"
    );
    let with_prometheus = |name, value| vec![("USE_PROMETHEUS", "true"), (name, value)];
    assert_refused(
        &with_prometheus("PROMETHEUS_ADDR", ":http"),
        "PROMETHEUS_ADDR",
        "is not a port number",
    );
    assert_refused(
        &with_prometheus("PROMETHEUS_ADDR", "9090"),
        "PROMETHEUS_ADDR",
        "is not host:port",
    );
    assert_refused(
        &with_prometheus("PROMETHEUS_ADDR", "metrics.local:9090"),
        "PROMETHEUS_ADDR",
        "is not an IP address",
    );
    assert_refused(
        &with_prometheus("PROMETHEUS_PATH", "metrics"),
        "PROMETHEUS_PATH",
        "must start with /",
    );
    assert_refused(
        &with_prometheus("PROMETHEUS_ADDR", ":8080"),
        "PROMETHEUS_ADDR",
        "is also PORT's listener",
    );
    for name in ["PROMETHEUS_ADDR", "PROMETHEUS_PATH"] {
        assert_refused(
            &[(name, "x")],
            name,
            "has no effect without USE_PROMETHEUS=true",
        );
    }
    assert_refused(
        &[("USE_PROMETHEUS", "yes")],
        "USE_PROMETHEUS",
        "is not a boolean",
    );
}

#[test]
fn statsd_and_the_other_sinks_are_refused() {
    assert_refused(
        &[("USE_STATSD", "true")],
        "USE_STATSD",
        "true asks for a statsd sink",
    );
    for name in ["STATSD_HOST", "STATSD_PORT"] {
        assert_refused(&[(name, "x")], name, "ratekeeper has no statsd sink");
    }
    assert_refused(
        &[("USE_DOG_STATSD", "true")],
        "USE_DOG_STATSD",
        "DogStatsD is not supported",
    );
    assert_refused(
        &[("USE_DOG_STATSD_MOGRIFIERS", "A")],
        "USE_DOG_STATSD_MOGRIFIERS",
        "DogStatsD",
    );
    assert_refused(
        &[("DOG_STATSD_MOGRIFIER_A_PATTERN", "^x$")],
        "DOG_STATSD_MOGRIFIER_A_PATTERN",
        "DogStatsD",
    );
    assert_refused(&[("EXTRA_TAGS", "team:a")], "EXTRA_TAGS", "no extra labels");
    ok(&[("EXTRA_TAGS", "")]);
    assert_refused(
        &[("STATS_FLUSH_INTERVAL", "5s")],
        "STATS_FLUSH_INTERVAL",
        "current at every scrape",
    );
    assert_refused(
        &[("PROMETHEUS_MAPPER_YAML", "/m.yaml")],
        "PROMETHEUS_MAPPER_YAML",
        "metric names are its own",
    );
    ok(&[("PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS", "false")]);
    assert_refused(
        &[("PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS", "true")],
        "PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS",
        "in seconds",
    );
}

#[test]
fn disabled_stats_need_no_sink() {
    // USE_STATSD's default does not matter then.
    let disabled = [("DISABLE_STATS", "true")];
    let settings = from_env(
        &disabled
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .unwrap();
    assert_eq!(settings.mode.prometheus, None);
    assert_refused(
        &[("DISABLE_STATS", "true"), ("USE_PROMETHEUS", "true")],
        "USE_PROMETHEUS",
        "has no effect with DISABLE_STATS=true",
    );
    assert_refused(
        &[("DISABLE_STATS", "true"), ("PROMETHEUS_PATH", "/m")],
        "PROMETHEUS_PATH",
        "has no effect with DISABLE_STATS=true",
    );
    let errors = from_env(
        &[("DISABLE_STATS", "true"), ("USE_STATSD", "true")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .starts_with("USE_STATSD: has no effect with DISABLE_STATS=true"),
        "{errors:?}"
    );
}

#[test]
fn tracing_is_refused() {
    ok(&[("TRACING_ENABLED", "false")]);
    assert_refused(
        &[("TRACING_ENABLED", "true")],
        "TRACING_ENABLED",
        "--otlp-endpoint",
    );
    for name in [
        "TRACING_SERVICE_NAME",
        "TRACING_SERVICE_NAMESPACE",
        "TRACING_SERVICE_INSTANCE_ID",
        "TRACING_EXPORTER_PROTOCOL",
        "TRACING_SAMPLING_RATE",
    ] {
        assert_refused(&[(name, "x")], name, "TRACING_ENABLED=true");
    }
}

// === other variables ===

#[test]
fn ratekeepers_own_variables_are_refused_but_the_test_clock() {
    assert_refused(
        &[("RATEKEEPER_STORE", "memory")],
        "RATEKEEPER_STORE",
        "run `ratekeeper serve`",
    );
    assert_refused(
        &[("RUST_LOG", "debug")],
        "RUST_LOG",
        "set LOG_LEVEL instead",
    );
    assert_eq!(
        ok(&[(TEST_FROZEN_CLOCK_VAR, "1700000020000")])
            .serve
            .test_frozen_clock_ms,
        Some(1_700_000_020_000)
    );
    assert_refused(
        &[(TEST_FROZEN_CLOCK_VAR, "soon")],
        TEST_FROZEN_CLOCK_VAR,
        "not a number",
    );
    assert_eq!(
        ok(&[(TEST_STORE_TIMEOUT_VAR, "1s")]).serve.store_timeout,
        Duration::from_secs(1)
    );
    assert_refused(
        &[(TEST_STORE_TIMEOUT_VAR, "0s")],
        TEST_STORE_TIMEOUT_VAR,
        "above 0",
    );
    // Anything else is not ours to judge.
    ok(&[("HOME", "/root"), ("KUBERNETES_SERVICE_HOST", "10.0.0.1")]);
}

#[test]
fn every_variable_is_known_and_documented() {
    let known = known_variables();
    for name in [
        "HOST",
        "PORT",
        "GRPC_HOST",
        "GRPC_PORT",
        "DEBUG_HOST",
        "DEBUG_PORT",
        "RUNTIME_ROOT",
        "RUNTIME_SUBDIRECTORY",
        "RUNTIME_APPDIRECTORY",
        "RUNTIME_IGNOREDOTFILES",
        "RUNTIME_WATCH_ROOT",
        "MERGE_DOMAIN_CONFIG",
        "BACKEND_TYPE",
        "REDIS_SOCKET_TYPE",
        "REDIS_TYPE",
        "REDIS_URL",
        "REDIS_AUTH",
        "REDIS_TLS",
        "REDIS_POOL_SIZE",
        "REDIS_TIMEOUT",
        "SHADOW_MODE",
        "QUOTA_MODE",
        "LOCAL_CACHE_SIZE_IN_BYTES",
        "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT",
        "NEAR_LIMIT_RATIO",
        "CACHE_KEY_PREFIX",
        "EXPIRATION_JITTER_MAX_SECONDS",
        "LIMIT_RESPONSE_HEADERS_ENABLED",
        "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED",
        "RESPONSE_DYNAMIC_METADATA",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "USE_STATSD",
        "USE_PROMETHEUS",
        "PROMETHEUS_ADDR",
        "PROMETHEUS_PATH",
        "GRPC_SERVER_USE_TLS",
    ] {
        assert!(known.contains(&name), "{name}");
    }
    assert!(is_known("REDIS_SENTINEL_AUTH"));
    assert!(!is_known("HOME"));
    let guide = include_str!("../../../docs/migrating-from-envoy-ratelimit.md");
    let section = guide
        .split("## The upstream mode")
        .nth(1)
        .expect("the migration guide has the upstream mode's section")
        .split("\n## ")
        .next()
        .unwrap_or_default();
    for name in known
        .iter()
        .filter(|name| ![TEST_FROZEN_CLOCK_VAR, TEST_STORE_TIMEOUT_VAR].contains(name))
    {
        assert!(
            section.contains(&format!("`{name}`")),
            "the migration guide's table lacks {name}"
        );
    }
    assert!(section.contains("`DOG_STATSD_MOGRIFIER_*`"));
}
