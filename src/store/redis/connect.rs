//! Making one Redis connection: where to (a URL, or the address the
//! sentinels name), how (`TCP_NODELAY`, TCP keepalive and a user timeout
//! on every socket, TLS, AUTH), and what it needs before serving (the code
//! loaded as a function library, or as a script where functions are not
//! available; so no request pays for defining it). Lanes
//! ([`super::lane`]) own the connections; there is no checkout pool.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo};

use super::decide::{Code, Runner};
use super::lane::{Connect, Connected};
use super::store_error;
use crate::store::StoreError;

/// Idle time before the first keepalive probe, and the interval between
/// probes: a peer that vanished is noticed even on an idle connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;
/// Sent data unacknowledged this long closes the socket (a backstop behind
/// the lanes' own stall probe).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket settings every Redis connection gets.
pub(crate) fn tcp_settings() -> TcpSettings {
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(
            TcpKeepalive::new()
                .with_time(KEEPALIVE_IDLE)
                .with_interval(KEEPALIVE_INTERVAL)
                .with_retries(KEEPALIVE_RETRIES),
        )
        .set_user_timeout(TCP_USER_TIMEOUT)
}

/// `info` pointed at another host and port, keeping its TLS settings and
/// credentials (for a master the sentinels named, or a cluster node).
pub(crate) fn retarget(info: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    info.clone().set_addr(addr)
}

/// A multiplexed connection to `info`, with the socket settings every
/// connection gets and none of redis-rs's own timeouts (by default 500 ms
/// per reply and 1 s to connect): the bounds on Redis calls are
/// ratekeeper's alone — the caller's deadline, `--redis-connect-timeout`
/// and the stall bound — so a Redis further away than those defaults is
/// served as configured. Every caller bounds the wait.
///
/// # Errors
///
/// [`StoreError`] as the connect failed.
pub(crate) async fn multiplexed(
    info: &ConnectionInfo,
) -> Result<MultiplexedConnection, StoreError> {
    let info = info.clone().set_tcp_settings(tcp_settings());
    let client = redis::Client::open(info).map_err(|e| store_error(&e))?;
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| store_error(&e))
}

/// Opens a connection to `info` and loads `code` on it.
///
/// # Errors
///
/// [`StoreError`] as the connect or the load failed.
pub(crate) async fn open(info: &ConnectionInfo, code: &Code) -> Result<Connected, StoreError> {
    let mut conn = multiplexed(info).await?;
    let runner = code.load(&mut conn).await.map_err(|e| store_error(&e))?;
    if runner == Runner::Script {
        report_script_fallback();
    }
    Ok(Connected { conn, runner })
}

/// Says once per process that Redis runs the code as a script.
fn report_script_fallback() {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "redis functions are unavailable (Redis before 7, or an ACL without FUNCTION): \
             running the decision code with EVALSHA instead of FCALL"
        );
    }
}

/// Connects to one configured address; its host name is resolved anew on
/// every connect, so a DNS name that moves to a new primary is followed.
#[derive(Debug)]
pub(crate) struct FixedConnector {
    pub info: ConnectionInfo,
    pub code: Arc<Code>,
}

#[async_trait]
impl Connect for FixedConnector {
    async fn connect(&self) -> Result<Connected, StoreError> {
        open(&self.info, &self.code).await
    }
}
