//! The backend: Redis single (TCP or a unix socket), Sentinel or Cluster,
//! from upstream's `REDIS_*` variables, with their credentials, TLS, pool
//! and connect timeout; memcache, a per-second Redis and upstream's own
//! connection tunables are refused or accepted as documented.

use std::time::Duration;

use super::reader::Reader;
use crate::config::args::{ServeArgs, StoreKind};
use crate::config::go_syntax::parse_duration;

/// Everything about Redis.
pub(super) fn redis(env: &mut Reader<'_>, args: &mut ServeArgs) {
    backend_type(env);
    connection_tunables(env, args);
    refuse_per_second_redis(env);
    let tls = env.bool("REDIS_TLS", false);
    if env.bool("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", false) {
        env.error(
            "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
            "is not supported: ratekeeper always checks the Redis server's name; use a \
             certificate for the host in REDIS_URL (REDIS_TLS_CACERT for a private CA) and remove it",
        );
    }
    deployment(env, args, tls);
    certificates(env, args, tls);
}

/// `BACKEND_TYPE`: Redis only.
fn backend_type(env: &mut Reader<'_>) {
    match env.string("BACKEND_TYPE", "redis").as_str() {
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
}

/// The pool size, the connect timeout, and upstream's tunables that
/// ratekeeper has no use for.
fn connection_tunables(env: &mut Reader<'_>, args: &mut ServeArgs) {
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
    // Pipelining tunables: ratekeeper always pipelines, coalesces the
    // decisions that wait together into one call and calls a request's
    // cluster slots in parallel, so there is nothing to tune.
    let _ = env.duration("REDIS_PIPELINE_WINDOW", "0");
    let _ = env.int("REDIS_PIPELINE_LIMIT", 0);
    let parallelism = env.int("REDIS_CLUSTER_PIPELINE_PARALLELISM", 1);
    if parallelism < 0 {
        env.error(
            "REDIS_CLUSTER_PIPELINE_PARALLELISM",
            format!(
                "{parallelism} is negative (ratekeeper calls every slot of a request in parallel anyway)"
            ),
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
}

/// `REDIS_PERSECOND` and its settings.
fn refuse_per_second_redis(env: &mut Reader<'_>) {
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
}

/// `REDIS_TYPE`, `REDIS_SOCKET_TYPE`, `REDIS_URL` and the credentials: the
/// store and where it is.
fn deployment(env: &mut Reader<'_>, args: &mut ServeArgs, tls: bool) {
    let socket_given = env.given("REDIS_SOCKET_TYPE");
    // `None` for a socket type that is refused (then REDIS_URL is not judged).
    let unix = match env.string("REDIS_SOCKET_TYPE", "unix").as_str() {
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
    let (user, password) = credentials(&env.string("REDIS_AUTH", ""));
    let sentinel_auth_given = env.given("REDIS_SENTINEL_AUTH");
    let sentinel_auth = env.string("REDIS_SENTINEL_AUTH", "");
    let scheme = if tls { "rediss" } else { "redis" };
    let credentials_at = userinfo(user.as_deref(), password.as_deref());
    let nodes = |env: &mut Reader<'_>, list: &[&str], credentials_at: &str| -> Vec<String> {
        list.iter()
            .filter_map(|node| match host_port(node) {
                Ok(addr) => Some(format!("{scheme}://{credentials_at}{addr}")),
                Err(message) => {
                    env.error("REDIS_URL", message);
                    None
                }
            })
            .collect()
    };
    let kind = kind.to_ascii_lowercase();
    if sentinel_auth_given && kind != "sentinel" {
        env.error(
            "REDIS_SENTINEL_AUTH",
            format!("has no effect with REDIS_TYPE={kind}; remove it"),
        );
    }
    // Sentinels and cluster nodes are reached over TCP: an explicit unix
    // socket type would do nothing.
    if socket_given && unix == Some(true) && kind != "single" {
        env.error(
            "REDIS_SOCKET_TYPE",
            format!(
                "unix has no effect with REDIS_TYPE={kind} (its nodes are reached over TCP); remove it or set tcp"
            ),
        );
    }
    match kind.as_str() {
        "single" => {
            args.store = StoreKind::Redis;
            match unix {
                Some(true) => {
                    if tls {
                        env.error(
                            "REDIS_TLS",
                            "TLS over a unix socket is not supported (REDIS_SOCKET_TYPE=unix); remove it or use tcp",
                        );
                    }
                    if !url.starts_with('/') {
                        env.error(
                            "REDIS_URL",
                            format!(
                                "'{url}' is not an absolute socket path (REDIS_SOCKET_TYPE=unix); for a TCP Redis set REDIS_SOCKET_TYPE=tcp and REDIS_URL=host:port"
                            ),
                        );
                    }
                    args.redis_url = unix_url(&url, user.as_deref(), password.as_deref());
                }
                Some(false) => match host_port(&url) {
                    Ok(addr) => args.redis_url = format!("{scheme}://{credentials_at}{addr}"),
                    Err(message) => env.error("REDIS_URL", message),
                },
                None => {}
            }
        }
        "sentinel" => {
            args.store = StoreKind::RedisSentinel;
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
            let sentinel_at = userinfo(sentinel_user.as_deref(), sentinel_password.as_deref());
            args.redis_sentinel_nodes = nodes(env, &sentinels, &sentinel_at);
            args.redis_sentinel_master = Some(master.to_owned());
            args.redis_sentinel_master_username = user;
            args.redis_sentinel_master_password = password;
        }
        "cluster" => {
            args.store = StoreKind::RedisCluster;
            let list: Vec<&str> = url.split(',').collect();
            args.redis_cluster_nodes = nodes(env, &list, &credentials_at);
        }
        other => env.error(
            "REDIS_TYPE",
            format!("'{other}' is not a Redis type; use single, sentinel or cluster"),
        ),
    }
}

/// `REDIS_TLS_*` files, with `REDIS_TLS=true` only.
fn certificates(env: &mut Reader<'_>, args: &mut ServeArgs, tls: bool) {
    let client_cert = env.string("REDIS_TLS_CLIENT_CERT", "");
    let client_key = env.string("REDIS_TLS_CLIENT_KEY", "");
    let ca_cert = env.string("REDIS_TLS_CACERT", "");
    if !tls {
        for (name, value) in [
            ("REDIS_TLS_CLIENT_CERT", &client_cert),
            ("REDIS_TLS_CLIENT_KEY", &client_key),
            ("REDIS_TLS_CACERT", &ca_cert),
        ] {
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

/// The memcache backend's settings.
pub(super) const MEMCACHE_VARIABLES: [&str; 9] = [
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
pub(super) const PERSECOND_VARIABLES: [&str; 12] = [
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
