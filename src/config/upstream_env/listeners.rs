//! The listeners: upstream's hosts and ports, the Prometheus address, the
//! gRPC connection age and TLS, and no two listeners on one port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::UpstreamMode;
use super::reader::Reader;
use crate::config::args::ServeArgs;

/// `host` and `port` variables as Go's `net.JoinHostPort` and `Listen`
/// take them: the host an IP address (or empty, or `localhost`), the port
/// 0 to 65535.
pub(super) fn listen_addr(
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
pub(super) fn listen_ip(host: &str) -> Result<IpAddr, String> {
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
pub(super) fn go_listen_addr(text: &str) -> Result<SocketAddr, String> {
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
pub(super) fn connection_age(env: &mut Reader<'_>, age: i64, grace: i64) -> Option<Duration> {
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
pub(super) fn grpc_tls(env: &mut Reader<'_>, args: &mut ServeArgs) {
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
pub(super) fn check_listeners(env: &mut Reader<'_>, args: &ServeArgs, mode: &UpstreamMode) {
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
