//! Making one Redis connection: where to (a URL, or the address the
//! sentinels name), how (`TCP_NODELAY`, TCP keepalive and a user timeout
//! on every socket, TLS, AUTH), and what it needs before serving (the batch
//! script loaded, so no request pays for an `EVAL`). Lanes
//! ([`super::lane`]) own the connections; there is no checkout pool.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::{ConnectionAddr, ConnectionInfo};

use super::lane::Connect;
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

/// Opens a connection to `info` and loads `script` on it.
///
/// # Errors
///
/// [`StoreError`] as the connect or the load failed.
pub(crate) async fn open(
    info: &ConnectionInfo,
    script: &redis::Script,
) -> Result<MultiplexedConnection, StoreError> {
    let info = info.clone().set_tcp_settings(tcp_settings());
    let client = redis::Client::open(info).map_err(|e| store_error(&e))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| store_error(&e))?;
    script
        .prepare_invoke()
        .load_async(&mut conn)
        .await
        .map_err(|e| store_error(&e))?;
    Ok(conn)
}

/// Connects to one configured address; its host name is resolved anew on
/// every connect, so a DNS name that moves to a new primary is followed.
#[derive(Debug)]
pub(crate) struct FixedConnector {
    pub info: ConnectionInfo,
    pub script: Arc<redis::Script>,
}

#[async_trait]
impl Connect for FixedConnector {
    async fn connect(&self) -> Result<MultiplexedConnection, StoreError> {
        open(&self.info, &self.script).await
    }
}
