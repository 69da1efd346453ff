//! A real Redis Cluster on loopback for one test: 3 masters, each with one
//! replica (6 `redis-server` processes in cluster mode), created with
//! `redis-cli --cluster create`, killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::fault_proxy::FaultProxy;
use super::free_port;

/// The cluster; `nodes[i]` runs on `ports[i]`.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    /// With [`RedisCluster::start_behind_proxies`], the fault proxy in front
    /// of each node (`proxies[i]` for `ports[i]`); the nodes announce the
    /// proxies' ports to clients, so clients connect through them.
    pub proxies: Vec<FaultProxy>,
    _dir: tempfile::TempDir,
}

/// How fast a replica takes over a dead master: small, so the failover test
/// is quick.
const NODE_TIMEOUT_MS: u64 = 1_000;

impl RedisCluster {
    /// Starts 3 masters and 3 replicas and waits until every slot is served.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// As [`RedisCluster::start`], with a fault proxy in front of every node
    /// that clients reach it through (the cluster bus stays direct).
    pub fn start_behind_proxies() -> Self {
        Self::start_with(true)
    }

    fn start_with(proxied: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
        let proxies: Vec<FaultProxy> = if proxied {
            ports
                .iter()
                .map(|port| FaultProxy::start(([127, 0, 0, 1], *port).into()))
                .collect()
        } else {
            Vec::new()
        };
        let children = ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                // The cluster bus port defaults to port + 10000, which a
                // parallel test could pick too: take a free one instead.
                let bus_port = free_port();
                let announce: Vec<String> = match proxies.get(i) {
                    Some(proxy) => vec![
                        "--cluster-announce-port".into(),
                        proxy.port.to_string(),
                        "--cluster-announce-bus-port".into(),
                        bus_port.to_string(),
                    ],
                    None => Vec::new(),
                };
                let child = Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-port", &bus_port.to_string()])
                    .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                    .args(["--dbfilename", &format!("dump-{port}.rdb")])
                    .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                    // A replica takes over however long its link was down.
                    .args(["--cluster-replica-validity-factor", "0"])
                    .args(["--dir", dir.path().to_str().unwrap()])
                    .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                    .args(&announce)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start redis-server ({e})"));
                Some(child)
            })
            .collect();
        let cluster = RedisCluster {
            ports,
            children,
            proxies,
            _dir: dir,
        };
        for port in &cluster.ports {
            cluster.wait_for_node(*port);
        }
        let addresses: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian: redis-tools, installed with redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_until_ok(Duration::from_secs(30));
        cluster.wait_for_replicas(Duration::from_secs(30));
        cluster
    }

    /// Polls until every replica's link to its master is up (bounded), so
    /// a master can fail over from the start.
    fn wait_for_replicas(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let linked = self
                .live_ports()
                .filter_map(|port| {
                    node_connection(port)
                        .and_then(|mut c| {
                            redis::cmd("INFO")
                                .arg("replication")
                                .query::<String>(&mut c)
                        })
                        .ok()
                })
                .filter(|info| info.contains("role:slave"))
                .filter(|info| info.contains("master_link_status:up"))
                .count();
            if linked == 3 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replicas not linked within {within:?} ({linked} of 3)"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis://127.0.0.1:<port>` of every node, as seed nodes.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the master currently serving `key`'s slot.
    pub fn master_of(&self, key: &[u8]) -> u16 {
        let slot: i64 = self.command(&[b"CLUSTER", b"KEYSLOT", key]);
        let slots: redis::Value = self.command(&[b"CLUSTER", b"SLOTS"]);
        let redis::Value::Array(ranges) = slots else {
            panic!("CLUSTER SLOTS: {slots:?}")
        };
        for range in ranges {
            let redis::Value::Array(parts) = range else {
                continue;
            };
            let (redis::Value::Int(start), redis::Value::Int(end)) = (&parts[0], &parts[1]) else {
                continue;
            };
            if (*start..=*end).contains(&slot) {
                let redis::Value::Array(master) = &parts[2] else {
                    panic!("CLUSTER SLOTS master: {parts:?}")
                };
                let redis::Value::Int(port) = master[1] else {
                    panic!("CLUSTER SLOTS port: {master:?}")
                };
                return port as u16;
            }
        }
        panic!("no master serves slot {slot}")
    }

    /// Kills (SIGKILL) the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).unwrap();
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (SIGSTOP, `true`) or thaws (SIGCONT, `false`) every live
    /// node: connections stay open, nothing answers while frozen.
    pub fn hold(&self, frozen: bool) {
        let signal = if frozen { "-STOP" } else { "-CONT" };
        for child in self.children.iter().flatten() {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "kill {signal} {}", child.id());
        }
    }

    /// Calls of `command` that the node on `port` has served since its
    /// statistics were last reset.
    pub fn calls(&self, port: u16, command: &str) -> u64 {
        let mut connection = node_connection(port).unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut connection)
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.trim().parse().unwrap())
    }

    /// Resets every live node's statistics.
    pub fn reset_stats(&self) {
        for port in self.live_ports() {
            let mut connection = node_connection(port).unwrap();
            redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query::<()>(&mut connection)
                .unwrap();
        }
    }

    /// Polls until every live node reports `cluster_state:ok` (bounded).
    pub fn wait_until_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.live_ports().all(|port| {
                node_connection(port)
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster was not ok within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn live_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports
            .iter()
            .zip(&self.children)
            .filter(|(_, child)| child.is_some())
            .map(|(port, _)| *port)
    }

    fn wait_for_node(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while node_connection(port)
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one command on some live node.
    pub fn command<T: redis::FromRedisValue>(&self, args: &[&[u8]]) -> T {
        let port = self.live_ports().next().expect("a live node");
        let mut connection = node_connection(port).unwrap();
        let mut cmd = redis::cmd(std::str::from_utf8(args[0]).unwrap());
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut connection).unwrap()
    }

    /// A connection to the node on `port`.
    pub fn connection(&self, port: u16) -> redis::Connection {
        node_connection(port).unwrap()
    }

    /// Keys stored on the node on `port`.
    pub fn keys_on(&self, port: u16) -> Vec<Vec<u8>> {
        let mut connection = node_connection(port).unwrap();
        redis::cmd("KEYS").arg("*").query(&mut connection).unwrap()
    }
}

fn node_connection(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(Duration::from_millis(500))
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl RedisCluster {
    /// The node id of the master on `port`.
    pub fn node_id(&self, port: u16) -> String {
        let mut connection = node_connection(port).unwrap();
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut connection)
            .unwrap()
    }

    /// Moves `slots` hash slots from the master on `from` to the master on
    /// `to` with `redis-cli --cluster reshard` (keys move with MIGRATE);
    /// returns once it is done.
    pub fn reshard(&self, from: u16, to: u16, slots: u32) -> std::process::Output {
        Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &self.node_id(from)])
            .args(["--cluster-to", &self.node_id(to)])
            .args(["--cluster-slots", &slots.to_string()])
            .args(["--cluster-yes"])
            .output()
            .unwrap()
    }

    /// The proxy of the node on `port`.
    pub fn proxy_of(&self, port: u16) -> &FaultProxy {
        let i = self.ports.iter().position(|p| *p == port).unwrap();
        &self.proxies[i]
    }

    /// Ports of the live masters.
    pub fn masters(&self) -> Vec<u16> {
        self.live_ports()
            .filter(|port| {
                node_connection(*port)
                    .and_then(|mut c| {
                        redis::cmd("INFO")
                            .arg("replication")
                            .query::<String>(&mut c)
                    })
                    .is_ok_and(|info| info.contains("role:master"))
            })
            .collect()
    }
}
