//! Shared test fixtures: a throwaway `redis-server` per test, an in-process
//! ratekeeper on a loopback port, and gRPC clients generated from our protos.
#![allow(dead_code, missing_docs)]

pub mod cluster;
pub mod coalescing;
pub mod fault_proxy;
pub mod pki;
pub mod process;
pub mod sentinel;
pub mod upstream;
pub mod upstream_emulator;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ratekeeper::clock::{Clock, ManualClock};
use ratekeeper::config::parse_rules_file;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry as EnvoyEntry;
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use ratekeeper::proto::ratekeeper::v1::{Descriptor, Entry, ShouldAllowRequest};
use ratekeeper::rules::Rules;
use ratekeeper::store::redis::RedisSettings;
use ratekeeper::store::{CounterStore, MemoryStore, RedisStore};
use ratekeeper::{Listeners, Server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// 40 s into a minute (1_700_000_000_000 ms is 20 s into one).
pub const T0: u64 = 1_700_000_020_000;

// ---------------------------------------------------------------- redis ---

/// A `redis-server` owned by one test, on a free loopback port, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    extra_args: Vec<String>,
    /// Serves TLS only, on `port`.
    tls: bool,
    /// Its working directory: a replica's full sync writes `dump.rdb`
    /// there, which a later server started in the same place would load.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a fresh server on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a fresh server with extra `redis-server` arguments.
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_on(free_port(), extra_args)
    }

    /// Starts a fresh server on `port`.
    pub fn start_on(port: u16, extra_args: &[&str]) -> Self {
        let mut server = RedisServer {
            child: None,
            port,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            tls: false,
            dir: tempfile::tempdir().unwrap(),
        };
        server.restart();
        server
    }

    /// Starts a server that speaks only TLS on a free port, with the
    /// certificate, key and CA (for client certificates) in `dir` as
    /// `server.crt`, `server.key` and `ca.crt`, plus extra arguments.
    pub fn start_tls(dir: &std::path::Path, extra_args: &[&str]) -> Self {
        let port = free_port();
        let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        let mut args = vec![
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            file("server.crt"),
            "--tls-key-file".to_owned(),
            file("server.key"),
            "--tls-ca-cert-file".to_owned(),
            file("ca.crt"),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let mut server = RedisServer {
            child: None,
            port,
            extra_args: args,
            tls: true,
            dir: tempfile::tempdir().unwrap(),
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// A synchronous connection for inspecting what the store wrote.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Starts the server again on the same port and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); install it (Debian: apt-get install redis-server) \
                     — the Redis tests need a real server and never skip"
                )
            });
        self.child = Some(child);
        if self.tls {
            wait_for_listener(self.port);
        } else {
            wait_for_redis(self.port);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls until `port` accepts connections (at most 10 s); Redis listens
/// only once it is ready to serve.
fn wait_for_listener(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not listen within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until a PING on `port` is answered (at most 10 s).
fn wait_for_redis(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut reply = [0u8; 64];
            // PONG, or an auth error from a server that requires a user: up either way.
            if stream.write_all(b"PING\r\n").is_ok()
                && let Ok(n) = stream.read(&mut reply)
                && (reply[..n].starts_with(b"+PONG") || reply[..n].starts_with(b"-NOAUTH"))
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not answer within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port that was free a moment ago, and never handed out before in this
/// test process (tests run in parallel, and a port picked by one must not be
/// picked again by another before its server binds it).
///
/// Picked below the kernel's ephemeral range: between this pick and the
/// server's bind, the kernel may hand an ephemeral port to any outgoing
/// connection (a client of another test), and the server would then fail
/// to bind. Ports below the range are only ever taken by an explicit bind.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let low = 10_000.min(ephemeral_start / 2);
    for _ in 0..10_000 {
        let port = fastrand::u16(low..ephemeral_start);
        if given.contains(&port) {
            continue;
        }
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port below the ephemeral range ({low}..{ephemeral_start})");
}

// --------------------------------------------------------------- stores ---

/// Which store a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
}

/// A store for a test, with its Redis server (if any) kept alive alongside.
pub struct TestStore {
    pub store: Arc<dyn CounterStore>,
    pub redis: Option<RedisServer>,
}

impl TestStore {
    /// A store of `backend` whose time is `clock` (Redis: injected into the script).
    pub fn new(backend: Backend, clock: Arc<ManualClock>) -> Self {
        match backend {
            Backend::Memory => TestStore {
                store: Arc::new(MemoryStore::new(100_000, clock)),
                redis: None,
            },
            Backend::Redis => {
                let redis = RedisServer::start();
                let store = redis_store(&redis.url(), Duration::from_secs(2))
                    .with_clock(clock as Arc<dyn Clock>);
                TestStore {
                    store: Arc::new(store),
                    redis: Some(redis),
                }
            }
        }
    }
}

/// A Redis store using Redis's own clock.
pub fn redis_store(url: &str, timeout: Duration) -> RedisStore {
    RedisStore::new(&RedisSettings {
        pool_size: 16,
        timeout,
        connect_timeout: Duration::from_millis(500),
        ..RedisSettings::new(url)
    })
    .unwrap()
}

/// Runs an async scenario once per backend, as two tests.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::Backend::Redis).await;
                }
            )*
        }
    };
}

// --------------------------------------------------------------- server ---

/// A server over one rules file and a fresh store of `backend`, at time T0
/// on a clock the test moves by hand.
pub struct Harness {
    pub server: TestServer,
    pub clock: Arc<ManualClock>,
    pub store: TestStore,
}

impl Harness {
    pub async fn start(backend: Backend, rules_yaml: &str) -> Self {
        let clock = Arc::new(ManualClock::new(T0));
        let store = TestStore::new(backend, clock.clone());
        let server = TestServer::with(rules(&[rules_yaml]), store.store.clone()).await;
        Harness {
            server,
            clock,
            store,
        }
    }
}

/// Rules from YAML documents, one per file.
pub fn rules(files: &[&str]) -> Rules {
    let mut domains = HashMap::new();
    for (i, text) in files.iter().enumerate() {
        let (domain, tree) = parse_rules_file(&format!("test{i}.yaml"), text).unwrap();
        domains.insert(domain, tree);
    }
    Rules::new(domains)
}

/// A ratekeeper serving on a loopback port, stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ratekeeper::Error>>>,
}

impl TestServer {
    /// Starts `server`, with the listeners bound before it is spawned.
    pub async fn start(server: Server) -> Self {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.serve(
            Listeners {
                grpc,
                admin: Some(admin),
                metrics: None,
                upstream: None,
            },
            async {
                let _ = rx.await;
            },
        ));
        TestServer {
            addr,
            admin_addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Starts a server over `rules` and `store`.
    pub async fn with(rules: Rules, store: Arc<dyn CounterStore>) -> Self {
        Self::start(Server::new(rules, store)).await
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> RateLimiterClient<Channel> {
        RateLimiterClient::new(self.channel().await)
    }

    pub async fn envoy(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::new(self.channel().await)
    }

    /// Signals shutdown and waits for the server to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

// ------------------------------------------------------------- requests ---

/// A `ShouldAllow` request for one-or-more descriptors given as entry lists.
pub fn allow_request(
    domain: &str,
    descriptors: &[&[(&str, &str)]],
    cost: u64,
) -> ShouldAllowRequest {
    ShouldAllowRequest {
        domain: domain.to_owned(),
        descriptors: descriptors
            .iter()
            .map(|entries| Descriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| Entry {
                        key: k.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
            })
            .collect(),
        cost,
        dry_run: false,
        reservation_ttl: None,
    }
}

/// Whether `ShouldAllow` allows `request`.
pub async fn allowed(client: &mut RateLimiterClient<Channel>, request: ShouldAllowRequest) -> bool {
    client
        .should_allow(request)
        .await
        .unwrap()
        .into_inner()
        .allowed
}

/// `retry_after` is exact: `wait_ms` − 1 later the request is still denied,
/// `wait_ms` later it is allowed.
pub async fn assert_retry_is_exact(
    client: &mut RateLimiterClient<Channel>,
    clock: &ManualClock,
    request: ShouldAllowRequest,
    wait_ms: u64,
) {
    clock.advance(wait_ms - 1);
    assert!(
        !allowed(client, request.clone()).await,
        "allowed 1 ms before retry_after"
    );
    clock.advance(1);
    assert!(allowed(client, request).await, "denied at retry_after");
}

/// An Envoy descriptor from entries.
pub fn envoy_descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| EnvoyEntry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        limit: None,
        hits_addend: None,
        is_negative_hits: false,
    }
}

/// An Envoy request for descriptors given as entry lists.
pub fn envoy_request(domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_owned(),
        descriptors: descriptors.iter().map(|d| envoy_descriptor(d)).collect(),
        hits_addend: 0,
    }
}

/// A minimal HTTP/1.1 GET; returns the whole response.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
