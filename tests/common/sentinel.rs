//! A Redis primary with one replica and three real sentinels
//! (`redis-server --sentinel`) watching it, each on free loopback ports;
//! optionally with passwords (the master's, the sentinels' own) and TLS
//! everywhere.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{RedisServer, free_port};

/// The master name the sentinels use.
pub const MASTER: &str = "mymaster";

/// A primary, a replica and three sentinels; all killed on drop.
pub struct SentinelSet {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinel_ports: Vec<u16>,
    sentinels: Vec<Child>,
    options: SentinelOptions,
    _dir: tempfile::TempDir,
}

/// How the set is protected.
#[derive(Clone, Default)]
pub struct SentinelOptions {
    /// The primary's and replica's password (`requirepass`, `masterauth`).
    pub master_password: Option<String>,
    /// The sentinels' own password (`requirepass` in sentinel mode).
    pub sentinel_password: Option<String>,
    /// Everything TLS-only.
    pub tls: Option<Tls>,
}

/// Certificates for a TLS-only set.
#[derive(Clone)]
pub struct Tls {
    /// Holds `server.crt`, `server.key` and `ca.crt`.
    pub dir: PathBuf,
    /// The CA, PEM.
    pub ca: String,
    /// A client certificate and key the CA signed, PEM.
    pub client: (String, String),
}

impl SentinelSet {
    /// Starts everything and waits until every sentinel knows the replica.
    pub fn start() -> Self {
        Self::start_with(SentinelOptions::default())
    }

    /// As [`SentinelSet::start`], with passwords or TLS.
    pub fn start_with(options: SentinelOptions) -> Self {
        let mut args: Vec<String> = Vec::new();
        if let Some(password) = &options.master_password {
            args.extend(["--requirepass".into(), password.clone()]);
            args.extend(["--masterauth".into(), password.clone()]);
        }
        let start = |extra: &[String]| {
            let all: Vec<&str> = args.iter().chain(extra).map(String::as_str).collect();
            match &options.tls {
                Some(tls) => RedisServer::start_tls(&tls.dir, &all),
                None => RedisServer::start_with(&all),
            }
        };
        let primary = start(&[]);
        let mut replica_args = vec![
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            primary.port.to_string(),
        ];
        if options.tls.is_some() {
            replica_args.extend(["--tls-replication".into(), "yes".into()]);
        }
        let replica = start(&replica_args);
        let dir = tempfile::tempdir().unwrap();
        let sentinel_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let sentinels = sentinel_ports
            .iter()
            .map(|port| {
                let conf = dir.path().join(format!("sentinel-{port}.conf"));
                std::fs::write(&conf, sentinel_conf(*port, primary.port, &options)).unwrap();
                Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server --sentinel")
            })
            .collect();
        let set = SentinelSet {
            primary,
            replica,
            sentinel_ports,
            sentinels,
            options,
            _dir: dir,
        };
        set.wait_until(
            Duration::from_secs(20),
            "the sentinels see the replica",
            |s| {
                s.sentinel_ports.iter().all(|port| {
                    s.sentinel_command::<Vec<redis::Value>>(*port, &["replicas", MASTER])
                        .is_some_and(|replicas| !replicas.is_empty())
                })
            },
        );
        set
    }

    /// The URL of every sentinel (with its password, and `rediss://` under
    /// TLS), comma-separated.
    pub fn nodes(&self) -> String {
        self.sentinel_ports
            .iter()
            .map(|p| self.sentinel_url(*p))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn sentinel_url(&self, port: u16) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.options.sentinel_password {
            Some(password) => format!("{scheme}://:{password}@127.0.0.1:{port}"),
            None => format!("{scheme}://127.0.0.1:{port}"),
        }
    }

    /// The master's port as the first sentinel reports it.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinel_command::<Option<(String, u16)>>(
            self.sentinel_ports[0],
            &["get-master-addr-by-name", MASTER],
        )
        .flatten()
        .map(|(_, port)| port)
    }

    /// Asks a sentinel to fail over now (no agreement needed).
    pub fn failover(&self) {
        let _: Option<String> =
            self.sentinel_command(self.sentinel_ports[0], &["failover", MASTER]);
    }

    /// `SENTINEL <args>` on the sentinel at `port`; `None` when it fails.
    pub fn sentinel_command<T: redis::FromRedisValue>(
        &self,
        port: u16,
        args: &[&str],
    ) -> Option<T> {
        let url = self.sentinel_url(port);
        let client = match &self.options.tls {
            Some(tls) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: Some(redis::ClientTlsConfig {
                        client_cert: tls.client.0.clone().into_bytes(),
                        client_key: tls.client.1.clone().into_bytes(),
                    }),
                    root_cert: Some(tls.ca.clone().into_bytes()),
                },
            ),
            None => redis::Client::open(url),
        }
        .ok()?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        redis::cmd("SENTINEL").arg(args).query(&mut conn).ok()
    }

    /// Polls `done` every 20 ms for at most `within`.
    pub fn wait_until(&self, within: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let started = Instant::now();
        while !done(self) {
            assert!(started.elapsed() < within, "{what}: not within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One sentinel's configuration file.
fn sentinel_conf(port: u16, primary: u16, options: &SentinelOptions) -> String {
    let mut text = match &options.tls {
        Some(tls) => {
            let file = |name: &str| tls.dir.join(name).display().to_string();
            format!(
                "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-replication yes\n",
                file("server.crt"),
                file("server.key"),
                file("ca.crt")
            )
        }
        None => format!("port {port}\n"),
    };
    text.push_str(&format!(
        "bind 127.0.0.1\ndaemonize no\n\
         sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
         sentinel down-after-milliseconds {MASTER} 1000\n\
         sentinel failover-timeout {MASTER} 3000\n\
         sentinel parallel-syncs {MASTER} 1\n"
    ));
    if let Some(password) = &options.master_password {
        text.push_str(&format!("sentinel auth-pass {MASTER} {password}\n"));
    }
    if let Some(password) = &options.sentinel_password {
        // Sentinels talk to each other with it too.
        text.push_str(&format!(
            "requirepass {password}\nsentinel sentinel-pass {password}\n"
        ));
    }
    text
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for sentinel in &mut self.sentinels {
            let _ = sentinel.kill();
            let _ = sentinel.wait();
        }
    }
}
