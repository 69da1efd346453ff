//! The real binary in envoyproxy/ratelimit's mode: started with upstream's
//! variables only (`env_clear()` plus `PATH`), its rules in a
//! `RUNTIME_ROOT`-shaped directory, listening on free loopback ports; and a
//! small HTTP/1.1 client for its endpoints.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::Channel;

use super::free_port;
use super::process::BIN;

/// Where the rules live: `RUNTIME_ROOT=<dir>/root`,
/// `RUNTIME_SUBDIRECTORY=ratelimit`, the files in `…/ratelimit/config`
/// (upstream's default `RUNTIME_APPDIRECTORY`).
pub struct RuntimeDir {
    dir: tempfile::TempDir,
}

impl RuntimeDir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root/ratelimit/config")).unwrap();
        RuntimeDir { dir }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The directory the rules files go in.
    pub fn config(&self) -> PathBuf {
        self.root().join("ratelimit/config")
    }

    /// Writes (or replaces, atomically) the rules file `name`.
    pub fn write(&self, name: &str, yaml: &str) {
        let temporary = self.config().join(format!(".{name}.tmp"));
        std::fs::write(&temporary, yaml).unwrap();
        std::fs::rename(&temporary, self.config().join(name)).unwrap();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.config().join(name)).unwrap();
    }

    /// The variables that point upstream at this directory.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("RUNTIME_ROOT".into(), self.root().display().to_string()),
            ("RUNTIME_SUBDIRECTORY".into(), "ratelimit".into()),
        ]
    }
}

/// How to start the binary.
#[derive(Clone, Copy)]
pub enum Invocation {
    /// `ratekeeper upstream`.
    Subcommand,
    /// Through a link named `ratelimit`, as upstream's image runs it.
    AsRatelimit,
}

/// A running upstream-mode process, killed on drop.
pub struct Upstream {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub debug: SocketAddr,
    _link: Option<tempfile::TempDir>,
}

/// The listener variables on free loopback ports, and `USE_STATSD=false`.
pub fn listener_env() -> (Vec<(String, String)>, [SocketAddr; 3]) {
    let ports = [free_port(), free_port(), free_port()];
    let env = vec![
        ("HOST".into(), "127.0.0.1".into()),
        ("PORT".into(), ports[0].to_string()),
        ("GRPC_HOST".into(), "127.0.0.1".into()),
        ("GRPC_PORT".into(), ports[1].to_string()),
        ("DEBUG_HOST".into(), "127.0.0.1".into()),
        ("DEBUG_PORT".into(), ports[2].to_string()),
        ("USE_STATSD".into(), "false".into()),
    ];
    let addrs = ports.map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
    (env, addrs)
}

/// `REDIS_*` for a single Redis over TCP.
pub fn single_redis_env(port: u16) -> Vec<(String, String)> {
    vec![
        ("REDIS_SOCKET_TYPE".into(), "tcp".into()),
        ("REDIS_URL".into(), format!("127.0.0.1:{port}")),
    ]
}

/// Pairs as owned strings.
pub fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs the binary with exactly `env` (plus `PATH`), returning the child.
pub fn spawn(
    invocation: Invocation,
    env: &[(String, String)],
    args: &[&str],
) -> (Child, Option<tempfile::TempDir>) {
    let (program, link): (PathBuf, _) = match invocation {
        Invocation::Subcommand => (PathBuf::from(BIN), None),
        Invocation::AsRatelimit => {
            let dir = tempfile::tempdir().unwrap();
            let link = dir.path().join("ratelimit");
            std::os::unix::fs::symlink(BIN, &link).unwrap();
            (link, Some(dir))
        }
    };
    let mut command = Command::new(&program);
    if matches!(invocation, Invocation::Subcommand) {
        command.arg("upstream");
    }
    let child = command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, link)
}

impl Upstream {
    /// Starts the binary with the listener variables, the rules directory's
    /// and `extra`; waits until `/healthcheck` answers (any status).
    pub async fn start(runtime: &RuntimeDir, extra: &[(String, String)]) -> Self {
        Self::start_as(Invocation::Subcommand, runtime, extra).await
    }

    pub async fn start_as(
        invocation: Invocation,
        runtime: &RuntimeDir,
        extra: &[(String, String)],
    ) -> Self {
        let (mut env, [http, grpc, debug]) = listener_env();
        env.extend(runtime.env());
        env.extend(extra.iter().cloned());
        let (child, link) = spawn(invocation, &env, &[]);
        let mut upstream = Upstream {
            child,
            grpc,
            http,
            debug,
            _link: link,
        };
        upstream.wait_listening().await;
        upstream
    }

    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(self.http).await.is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("exited early with {status}: {}", self.stderr());
            }
            assert!(Instant::now() < deadline, "not listening within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `/healthcheck`'s status.
    pub async fn health(&self) -> u16 {
        request(self.http, "GET", "/healthcheck", "").await.status
    }

    /// Polls `/healthcheck` until it answers `status` (at most 10 s).
    pub async fn wait_health(&self, status: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = request(self.http, "GET", "/healthcheck", "").await;
            if answer.status == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/healthcheck still {} after 10 s (wanted {status})",
                answer.status
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST /json` with `body`.
    pub async fn json(&self, body: &str) -> Answer {
        request(self.http, "POST", "/json", body).await
    }

    pub async fn envoy(&self) -> RateLimitServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        RateLimitServiceClient::new(channel)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// SIGTERM, then the exit code (at most 15 s).
    pub async fn terminate(&mut self) -> Option<i32> {
        super::process::sigterm(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "no exit within 15 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything written to stderr (after the process ended).
    pub fn stderr(&mut self) -> String {
        let mut out = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut out);
        }
        out
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary with `env` and returns its exit code and stderr; it must
/// exit on its own within 20 s (a refused start).
pub fn refused_start(
    invocation: Invocation,
    env: &[(String, String)],
    args: &[&str],
) -> (Option<i32>, String) {
    let (mut child, _link) = spawn(invocation, env, args);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return (status.code(), stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after 20 s; env {env:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request (`Connection: close`).
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return body;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}
