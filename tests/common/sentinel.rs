//! A Redis primary with one replica and three real sentinels
//! (`redis-server --sentinel`) watching it, each on free loopback ports.

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
    _dir: tempfile::TempDir,
}

impl SentinelSet {
    /// Starts everything and waits until every sentinel knows the replica.
    pub fn start() -> Self {
        let primary = RedisServer::start();
        let replica =
            RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
        let dir = tempfile::tempdir().unwrap();
        let sentinel_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let sentinels = sentinel_ports
            .iter()
            .map(|port| {
                let conf = dir.path().join(format!("sentinel-{port}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndaemonize no\n\
                         sentinel monitor {MASTER} 127.0.0.1 {} 2\n\
                         sentinel down-after-milliseconds {MASTER} 1000\n\
                         sentinel failover-timeout {MASTER} 3000\n\
                         sentinel parallel-syncs {MASTER} 1\n",
                        primary.port
                    ),
                )
                .unwrap();
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
            _dir: dir,
        };
        set.wait_until(
            Duration::from_secs(20),
            "the sentinels see the replica",
            |s| {
                s.sentinel_ports.iter().all(|port| {
                    sentinel_command::<Vec<redis::Value>>(*port, &["replicas", MASTER])
                        .is_some_and(|replicas| !replicas.is_empty())
                })
            },
        );
        set
    }

    /// `host:port` of every sentinel, comma-separated.
    pub fn nodes(&self) -> String {
        self.sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The master's port as the first sentinel reports it.
    pub fn master_port(&self) -> Option<u16> {
        sentinel_command::<Option<(String, u16)>>(
            self.sentinel_ports[0],
            &["get-master-addr-by-name", MASTER],
        )
        .flatten()
        .map(|(_, port)| port)
    }

    /// Asks a sentinel to fail over now (no agreement needed).
    pub fn failover(&self) {
        let _: Option<String> = sentinel_command(self.sentinel_ports[0], &["failover", MASTER]);
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

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for sentinel in &mut self.sentinels {
            let _ = sentinel.kill();
            let _ = sentinel.wait();
        }
    }
}

/// `SENTINEL <args>` on the sentinel at `port`; `None` when it fails.
pub fn sentinel_command<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> Option<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    redis::cmd("SENTINEL").arg(args).query(&mut conn).ok()
}
