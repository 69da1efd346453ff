//! The real `ratekeeper` binary as a child process, for tests that need its
//! flags, exit codes, signals or resident memory.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use tonic::transport::Channel;

use super::free_port;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ratekeeper");

/// A `ratekeeper serve` child process, killed on drop if still running.
pub struct Serve {
    pub child: Child,
    pub grpc_port: u16,
    pub admin_port: u16,
}

impl Serve {
    /// Serves `config` with extra flags.
    pub fn start(config: &str, extra: &[&str]) -> Self {
        Self::start_with_env(config, extra, &[])
    }

    /// Serves `config` with extra flags and environment variables.
    pub fn start_with_env(config: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let grpc_port = free_port();
        let admin_port = free_port();
        // Addresses through the environment, to cover RATEKEEPER_* variables.
        let child = Command::new(BIN)
            .args(["serve", "--config", config])
            .args(extra)
            .env("RATEKEEPER_GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
            .env("RATEKEEPER_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Serve {
            child,
            grpc_port,
            admin_port,
        }
    }

    /// Connects, retrying while the process starts up (bounded).
    pub async fn client(&mut self) -> RateLimiterClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let endpoint =
                Channel::from_shared(format!("http://127.0.0.1:{}", self.grpc_port)).unwrap();
            if let Ok(channel) = endpoint.connect().await {
                return RateLimiterClient::new(channel);
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ratekeeper exited early with {status}: {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "ratekeeper did not listen within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit, keeping this runtime free so open
    /// client connections can answer the server's GOAWAY.
    pub async fn terminate(&mut self) -> (Option<i32>, Duration) {
        let started = Instant::now();
        sigterm(self.child.id());
        let deadline = started + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            assert!(Instant::now() < deadline, "no exit within 15 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stderr(&mut self) -> String {
        let mut out = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut out);
        }
        out
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM to `pid`.
pub fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid}");
}
