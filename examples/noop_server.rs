//! A baseline gRPC server with ratekeeper's protos that decides nothing: every
//! `ShouldAllow` is allowed and every Envoy `ShouldRateLimit` is `OK`, at once.
//!
//! It measures the gRPC ceiling of this machine (tonic, HTTP/2, protobuf and
//! the kernel's loopback), so ratekeeper's throughput can be stated as a
//! ratio of it: drive both with the same generator and flags and divide
//! (`benches/sidebyside.sh` uses an independent generator's own no-op).
//!
//! ```sh
//! cargo build --release --examples
//! target/release/examples/noop_server --addr 127.0.0.1:9081 --threads 2 &
//! target/release/examples/loadgen --addr http://127.0.0.1:9081 --api envoy
//! ```
//!
//! It stops on SIGINT (Ctrl-C) or SIGTERM.

use std::net::SocketAddr;
use std::num::NonZeroUsize;

use clap::Parser;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus,
};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use ratekeeper::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ratekeeper::proto::ratekeeper::v1::rate_limiter_server::{RateLimiter, RateLimiterServer};
use ratekeeper::proto::ratekeeper::v1::{
    Decision, DescriptorResult, ShouldAllowRequest, ShouldAllowResponse,
};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The same allocator as the ratekeeper binary, so the baseline measures the
/// same gRPC stack.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A gRPC server answering ratekeeper's two APIs without deciding anything.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9081")]
    addr: SocketAddr,
    /// Tokio worker threads (default: the CPUs this process may use), so the
    /// baseline can be held to the same CPU budget as ratekeeper.
    #[arg(long)]
    threads: Option<NonZeroUsize>,
}

/// Answers both services with "allowed", echoing one result per descriptor
/// so the response is the same shape (and encoding cost) as a real one.
#[derive(Debug, Clone, Copy, Default)]
struct Noop;

#[tonic::async_trait]
impl RateLimiter for Noop {
    async fn should_allow(
        &self,
        request: Request<ShouldAllowRequest>,
    ) -> Result<Response<ShouldAllowResponse>, Status> {
        let results = request
            .get_ref()
            .descriptors
            .iter()
            .map(|_| DescriptorResult {
                decision: Decision::Allowed.into(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(ShouldAllowResponse {
            allowed: true,
            results,
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let statuses = request
            .get_ref()
            .descriptors
            .iter()
            .map(|_| DescriptorStatus {
                code: Code::Ok.into(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(RateLimitResponse {
            overall_code: Code::Ok.into(),
            statuses,
            ..Default::default()
        }))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let threads = match args.threads {
        Some(threads) => threads.get(),
        None => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
    };
    // Built by hand rather than with `#[tokio::main]` so the worker count is
    // a flag: the baseline is only comparable under the same CPU budget.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(serve(args.addr, threads))
}

/// Serves both services on `addr` until SIGINT or SIGTERM.
async fn serve(addr: SocketAddr, threads: usize) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr).await?;
    println!(
        "noop_server listening on {} with {threads} worker threads",
        listener.local_addr()?
    );
    // Same listener setup as ratekeeper (`Server::serve`): Nagle off, as
    // small unary responses would otherwise wait for ACKs.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(RateLimiterServer::new(Noop))
        .add_service(RateLimitServiceServer::new(Noop))
        .serve_with_incoming_shutdown(incoming, ratekeeper::shutdown::signal())
        .await?;
    println!("noop_server stopped");
    Ok(())
}
