//! A load generator for ratekeeper (or `noop_server`, its baseline): drives
//! `ratekeeper.v1.RateLimiter/ShouldAllow` or Envoy's
//! `RateLimitService/ShouldRateLimit` over a few HTTP/2 connections and
//! reports throughput, latency percentiles and outcomes.
//!
//! It saturates at about 35k req/s on a 2-core machine — below what the
//! servers can serve — so it is for functional load (memory growth, tracing
//! overhead, the cluster at fixed rates), never for throughput ratios:
//! those come from `benches/sidebyside.sh` and an independent generator
//! that reports its own CPU.
//!
//! Two modes:
//! - closed loop (default): `--concurrency` tasks each send a request, await
//!   it and send the next, so the load adapts to the server (max throughput).
//! - open loop (`--rate R`): requests are scheduled every 1/R seconds whatever
//!   the server does and handed to `--concurrency` senders; latency is
//!   measured from the instant each request was *scheduled*, so a stalled
//!   server (or a queue at the senders) shows up in the percentiles instead of
//!   silently slowing the generator down (coordinated omission).
//!
//! ```sh
//! cargo build --release --examples
//! target/release/examples/noop_server --addr 127.0.0.1:9081 &
//! target/release/examples/loadgen --addr http://127.0.0.1:9081 --api envoy \
//!     --connections 4 --concurrency 64 --duration 10s --warmup 2s
//! target/release/examples/loadgen --addr http://127.0.0.1:8081 --api should-allow \
//!     --rate 20000 --keys 100000 --distribution zipf --zipf-exponent 1.1
//! ```
//!
//! Besides the human-readable summary it prints one line for scripts:
//! `RESULT api=envoy mode=closed rate=0 ... errors=0 dropped=0`.
//! It runs for `--warmup` + `--duration` (plus at most a second to collect
//! stragglers) and only ever talks to `--addr`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry as EnvoyEntry;
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code as EnvoyCode;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ratekeeper::proto::ratekeeper::v1 as pb;
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tonic::transport::{Channel, Endpoint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Most scheduled requests waiting for a free sender in open-loop mode;
/// beyond it a scheduled request is dropped (and counted) rather than letting
/// memory grow without bound against a server that stopped answering.
const MAX_QUEUED: usize = 100_000;

/// How long after the end of the measurement outstanding requests may still
/// finish before they are given up.
const GRACE: Duration = Duration::from_secs(1);

/// Latency histogram range in microseconds (1 µs .. 60 s) and precision.
const HIST_LOW_US: u64 = 1;
const HIST_HIGH_US: u64 = 60_000_000;
const HIST_SIGFIG: u8 = 3;

/// Base seed of the key samplers: runs are reproducible, and each task gets
/// its own stream so tasks do not hit the same keys in lockstep.
const SEED: u64 = 0x5EED_CAFE_F00D_u64;

/// Drives ratekeeper's gRPC APIs and reports throughput and latency.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Server to target (only this address is ever contacted).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    addr: String,
    /// Which RPC to drive: ratekeeper.v1 `ShouldAllow` or Envoy's `ShouldRateLimit`.
    #[arg(long, value_enum, default_value_t = Api::Envoy)]
    api: Api,
    /// Number of HTTP/2 connections (one channel each).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    connections: u64,
    /// Concurrent in-flight requests: closed loop, the tasks sending back to
    /// back; open loop (--rate), the senders taking scheduled requests (a
    /// request waiting for a free sender is timed from its intended instant).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// How long to measure, after the warmup (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long to send load before measuring; results in it are discarded.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Rate limit domain sent with every request.
    #[arg(long, default_value = "bench")]
    domain: String,
    /// Descriptor entry key (suffixed with the descriptor index when
    /// --descriptors > 1).
    #[arg(long, default_value = "user")]
    descriptor_key: String,
    /// Descriptors per request.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    descriptors: u64,
    /// Size of the value key space: each request uses a value in 0..K.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// How values are picked from the key space.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    distribution: Distribution,
    /// Exponent s of the Zipf distribution (P(rank k) ∝ 1/k^s).
    #[arg(long, default_value_t = 1.0)]
    zipf_exponent: f64,
    /// Target requests per second: switches to open-loop mode. Without it the
    /// load is closed-loop at --concurrency.
    #[arg(long)]
    rate: Option<f64>,
    /// Cost of each request (`cost` for ShouldAllow, `hits_addend` for Envoy).
    #[arg(long, default_value_t = 1)]
    cost: u32,
}

/// The RPC being driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Api {
    /// `ratekeeper.v1.RateLimiter/ShouldAllow`.
    ShouldAllow,
    /// `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.
    Envoy,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::ShouldAllow => "should-allow",
            Api::Envoy => "envoy",
        }
    }
}

/// How request values are drawn from the key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Distribution {
    /// Every value equally likely.
    Uniform,
    /// A few hot values, a long tail (as real traffic per user/IP).
    Zipf,
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    validate(&args)?;
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

/// Rejects flag values clap cannot check on its own.
fn validate(args: &Args) -> Result<(), BoxError> {
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(format!("--rate must be a positive number, not {rate}").into());
    }
    if !(args.zipf_exponent.is_finite() && args.zipf_exponent >= 0.0) {
        return Err(format!(
            "--zipf-exponent must be a non-negative number, not {}",
            args.zipf_exponent
        )
        .into());
    }
    if args.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), BoxError> {
    let clients = connect(&args).await?;
    let workload = Arc::new(Workload::new(&args));
    // The clock starts once every connection is up, so connection setup
    // neither eats into the warmup nor shows in the latencies.
    let window = Window::starting_now(args.warmup, args.duration);
    let (stats, schedule) = match args.rate {
        None => (
            closed_loop(&clients, &workload, args.concurrency, window).await?,
            None,
        ),
        Some(rate) => {
            let (stats, schedule) =
                open_loop(&clients, &workload, rate, args.concurrency, window).await?;
            (stats, Some(schedule))
        }
    };
    report(&args, &stats, schedule.as_ref());
    Ok(())
}

/// Opens `--connections` separate HTTP/2 connections: one `Channel` each, as
/// a single channel multiplexes everything over one TCP connection.
async fn connect(args: &Args) -> Result<Vec<Client>, BoxError> {
    let endpoint = Endpoint::from_shared(args.addr.clone())?.tcp_nodelay(true);
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.addr))?;
        clients.push(Client::new(args.api, channel));
    }
    Ok(clients)
}

// === Timing ===

/// The phases of a run: warmup until `record_from`, measurement until `end`,
/// then outstanding requests may finish until `hard_stop`.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    record_from: Instant,
    end: Instant,
    hard_stop: Instant,
}

impl Window {
    fn starting_now(warmup: Duration, duration: Duration) -> Self {
        let start = Instant::now();
        let record_from = start + warmup;
        let end = record_from + duration;
        Self {
            start,
            record_from,
            end,
            hard_stop: end + GRACE,
        }
    }

    /// Whether a request sent (or scheduled) at `sent` is measured.
    fn records(&self, sent: Instant) -> bool {
        sent >= self.record_from && sent < self.end
    }
}

// === Workload ===

/// What to send: everything but the value is fixed for the run.
#[derive(Debug)]
struct Workload {
    domain: String,
    /// One entry key per descriptor.
    descriptor_keys: Vec<String>,
    cost: u32,
    sampler: KeySampler,
}

impl Workload {
    fn new(args: &Args) -> Self {
        let descriptor_keys = if args.descriptors == 1 {
            vec![args.descriptor_key.clone()]
        } else {
            (0..args.descriptors)
                .map(|i| format!("{}{i}", args.descriptor_key))
                .collect()
        };
        let sampler = match args.distribution {
            Distribution::Uniform => KeySampler::Uniform(args.keys),
            Distribution::Zipf => KeySampler::zipf(args.keys, args.zipf_exponent),
        };
        Self {
            domain: args.domain.clone(),
            descriptor_keys,
            cost: args.cost,
            sampler,
        }
    }

    fn should_allow(&self, value: u64) -> pb::ShouldAllowRequest {
        let value = value.to_string();
        pb::ShouldAllowRequest {
            domain: self.domain.clone(),
            descriptors: self
                .descriptor_keys
                .iter()
                .map(|key| pb::Descriptor {
                    entries: vec![pb::Entry {
                        key: key.clone(),
                        value: value.clone(),
                    }],
                })
                .collect(),
            cost: u64::from(self.cost),
            dry_run: false,
            reservation_ttl: None,
        }
    }

    fn envoy(&self, value: u64) -> RateLimitRequest {
        let value = value.to_string();
        RateLimitRequest {
            domain: self.domain.clone(),
            descriptors: self
                .descriptor_keys
                .iter()
                .map(|key| RateLimitDescriptor {
                    entries: vec![EnvoyEntry {
                        key: key.clone(),
                        value: value.clone(),
                    }],
                    ..Default::default()
                })
                .collect(),
            hits_addend: self.cost,
        }
    }
}

/// Picks the value index of a request.
#[derive(Debug)]
enum KeySampler {
    /// Uniform over 0..n.
    Uniform(u64),
    /// Zipf: `cdf[i]` is P(value <= i), so a uniform draw binary-searched in
    /// it lands on value i with probability ∝ 1/(i+1)^s. Precomputed once so
    /// sampling is O(log K) with no floating-point powers on the hot path.
    Zipf { cdf: Vec<f64> },
}

impl KeySampler {
    fn zipf(keys: u64, exponent: f64) -> Self {
        let mut cdf: Vec<f64> = (1..=keys)
            .scan(0.0, |sum, rank| {
                *sum += (rank as f64).powf(-exponent);
                Some(*sum)
            })
            .collect();
        let total = cdf.last().copied().unwrap_or(1.0);
        for p in &mut cdf {
            *p /= total;
        }
        KeySampler::Zipf { cdf }
    }

    fn sample(&self, rng: &mut SplitMix64) -> u64 {
        match self {
            // Multiply-shift instead of `%`: no division, no modulo bias.
            KeySampler::Uniform(n) => ((u128::from(rng.next_u64()) * u128::from(*n)) >> 64) as u64,
            KeySampler::Zipf { cdf } => {
                let u = rng.next_f64();
                // Rounding can leave the last entry a hair below 1.0: clamp.
                cdf.partition_point(|&p| p < u).min(cdf.len() - 1) as u64
            }
        }
    }
}

/// splitmix64: tiny, fast and good enough to pick keys; no crate needed.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// The `stream`-th generator of the run, distinct per task.
    fn for_stream(stream: u64) -> Self {
        Self(SEED ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// === Client ===

/// A client of the driven API, over one connection. Cloning is cheap (the
/// clone shares the connection).
#[derive(Debug, Clone)]
enum Client {
    ShouldAllow(RateLimiterClient<Channel>),
    Envoy(RateLimitServiceClient<Channel>),
}

/// What became of one request.
#[derive(Debug)]
enum Outcome {
    /// Allowed (`allowed: true` / `OK`).
    Allowed,
    /// Rate limited (`allowed: false` / `OVER_LIMIT`).
    Denied,
    /// An answer that is neither (Envoy `overall_code: UNKNOWN`).
    Undecided,
    /// A gRPC error (boxed: it is large and rare).
    Error(Box<tonic::Status>),
    /// Still outstanding at the hard stop.
    Unfinished,
}

impl Client {
    fn new(api: Api, channel: Channel) -> Self {
        match api {
            Api::ShouldAllow => Client::ShouldAllow(RateLimiterClient::new(channel)),
            Api::Envoy => Client::Envoy(RateLimitServiceClient::new(channel)),
        }
    }

    /// Sends one request for `value`, giving up at `deadline`.
    async fn call(&mut self, workload: &Workload, value: u64, deadline: Instant) -> Outcome {
        let call = async {
            match self {
                Client::ShouldAllow(client) => {
                    match client.should_allow(workload.should_allow(value)).await {
                        Ok(response) if response.get_ref().allowed => Outcome::Allowed,
                        Ok(_) => Outcome::Denied,
                        Err(status) => Outcome::Error(Box::new(status)),
                    }
                }
                Client::Envoy(client) => {
                    match client.should_rate_limit(workload.envoy(value)).await {
                        Ok(response) => match response.get_ref().overall_code() {
                            EnvoyCode::Ok => Outcome::Allowed,
                            EnvoyCode::OverLimit => Outcome::Denied,
                            EnvoyCode::Unknown => Outcome::Undecided,
                        },
                        Err(status) => Outcome::Error(Box::new(status)),
                    }
                }
            }
        };
        timeout_at(deadline, call)
            .await
            .unwrap_or(Outcome::Unfinished)
    }
}

// === Statistics ===

/// Results of one task (or, merged, of the run). Each task owns one so the
/// hot path never takes a shared lock.
#[derive(Debug)]
struct Stats {
    /// Latency in microseconds.
    latency: Histogram<u64>,
    allowed: u64,
    denied: u64,
    /// Failed requests by kind (gRPC code name, `Undecided`, `Unfinished`).
    errors: BTreeMap<String, Failures>,
}

/// How often one kind of failure happened, with the first message seen, as
/// the code alone rarely says what went wrong.
#[derive(Debug, Default)]
struct Failures {
    count: u64,
    example: String,
}

impl Stats {
    fn new() -> Self {
        Self {
            // The bounds are constants known to be valid.
            latency: Histogram::new_with_bounds(HIST_LOW_US, HIST_HIGH_US, HIST_SIGFIG)
                .unwrap_or_else(|e| unreachable!("invalid histogram bounds: {e}")),
            allowed: 0,
            denied: 0,
            errors: BTreeMap::new(),
        }
    }

    fn record(&mut self, latency: Duration, outcome: Outcome) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        // Saturating: a latency beyond 60 s counts as 60 s, not as lost.
        self.latency.saturating_record(us.max(HIST_LOW_US));
        match outcome {
            Outcome::Allowed => self.allowed += 1,
            Outcome::Denied => self.denied += 1,
            Outcome::Error(status) => {
                self.fail(format!("{:?}", status.code()), status.message());
            }
            Outcome::Undecided => self.fail("Undecided".to_owned(), "overall_code UNKNOWN"),
            Outcome::Unfinished => self.fail("Unfinished".to_owned(), "outstanding at hard stop"),
        }
    }

    fn fail(&mut self, kind: String, message: &str) {
        let failures = self.errors.entry(kind).or_default();
        if failures.count == 0 {
            failures.example = message.to_owned();
        }
        failures.count += 1;
    }

    fn merge(&mut self, other: Stats) -> Result<(), BoxError> {
        self.latency.add(&other.latency)?;
        self.allowed += other.allowed;
        self.denied += other.denied;
        for (kind, failures) in other.errors {
            let total = self.errors.entry(kind).or_default();
            if total.count == 0 {
                total.example = failures.example;
            }
            total.count += failures.count;
        }
        Ok(())
    }

    fn requests(&self) -> u64 {
        self.latency.len()
    }

    fn error_count(&self) -> u64 {
        self.errors.values().map(|f| f.count).sum()
    }
}

/// Waits for `tasks` until `deadline`, aborts the stragglers, and merges
/// what finished. Tasks stop themselves at the hard stop; this is the
/// backstop that keeps the run bounded whatever happens.
async fn join_until(tasks: Vec<JoinHandle<Stats>>, deadline: Instant) -> Result<Stats, BoxError> {
    let mut total = Stats::new();
    for mut task in tasks {
        match timeout_at(deadline, &mut task).await {
            Ok(stats) => total.merge(stats?)?,
            Err(_) => task.abort(),
        }
    }
    Ok(total)
}

// === Closed loop ===

/// `concurrency` tasks, spread round-robin over the connections, each
/// sending its next request as soon as the previous one is answered.
async fn closed_loop(
    clients: &[Client],
    workload: &Arc<Workload>,
    concurrency: u64,
    window: Window,
) -> Result<Stats, BoxError> {
    let tasks = (0..concurrency)
        .map(|task| {
            let client = clients[task as usize % clients.len()].clone();
            let rng = SplitMix64::for_stream(task);
            tokio::spawn(closed_loop_task(client, Arc::clone(workload), rng, window))
        })
        .collect();
    join_until(tasks, window.hard_stop + GRACE).await
}

async fn closed_loop_task(
    mut client: Client,
    workload: Arc<Workload>,
    mut rng: SplitMix64,
    window: Window,
) -> Stats {
    let mut stats = Stats::new();
    loop {
        let sent = Instant::now();
        if sent >= window.end {
            return stats;
        }
        let value = workload.sampler.sample(&mut rng);
        let outcome = client.call(&workload, value, window.hard_stop).await;
        let unfinished = matches!(outcome, Outcome::Unfinished);
        if window.records(sent) {
            stats.record(sent.elapsed(), outcome);
        }
        if unfinished {
            return stats;
        }
    }
}

// === Open loop ===

/// A scheduled request: when it should have been sent, and with which value.
#[derive(Debug)]
struct Job {
    intended: Instant,
    value: u64,
    measured: bool,
}

/// How well the scheduler kept to its schedule (measured requests only).
#[derive(Debug, Default, Clone, Copy)]
struct ScheduleStats {
    /// Requests not sent because their sender's queue was full.
    dropped: u64,
    /// Requests issued.
    issued: u64,
    /// Total and worst delay between a request's intended instant and its
    /// hand-off to the senders: the scheduler's own share of the latency.
    lag_total: Duration,
    lag_max: Duration,
}

impl ScheduleStats {
    fn lag_mean(&self) -> Duration {
        self.lag_total
            .checked_div(u32::try_from(self.issued).unwrap_or(u32::MAX))
            .unwrap_or_default()
    }
}

/// Issues requests at `rate` per second on a fixed schedule whatever the
/// server does. Due requests are dealt round-robin to `senders` tasks (spread
/// over the connections), each with its own queue — no lock shared by all of
/// them on the hot path. A request that waits in a queue because its sender
/// is busy is still timed from its intended instant, so the wait counts as
/// latency (no coordinated omission).
async fn open_loop(
    clients: &[Client],
    workload: &Arc<Workload>,
    rate: f64,
    senders: u64,
    window: Window,
) -> Result<(Stats, ScheduleStats), BoxError> {
    let per_sender = (MAX_QUEUED / senders as usize).max(1);
    let (queues, tasks): (Vec<_>, Vec<_>) = (0..senders)
        .map(|i| {
            let (tx, rx) = mpsc::channel::<Job>(per_sender);
            let client = clients[i as usize % clients.len()].clone();
            (
                tx,
                tokio::spawn(sender(client, Arc::clone(workload), rx, window)),
            )
        })
        .unzip();
    // Spawned, not awaited in place: `block_on` runs on a thread of its own,
    // which would compete with the runtime's workers for the CPU.
    let sampler = Arc::clone(workload);
    let schedule =
        tokio::spawn(async move { schedule(&sampler, rate, window, queues).await }).await?;
    let stats = join_until(tasks, window.hard_stop + GRACE).await?;
    Ok((stats, schedule))
}

/// One sender: takes due requests off its queue until it closes.
async fn sender(
    mut client: Client,
    workload: Arc<Workload>,
    mut queue: mpsc::Receiver<Job>,
    window: Window,
) -> Stats {
    let mut stats = Stats::new();
    loop {
        let Some(job) = queue.recv().await else {
            return stats;
        };
        let outcome = client.call(&workload, job.value, window.hard_stop).await;
        let unfinished = matches!(outcome, Outcome::Unfinished);
        if job.measured {
            stats.record(job.intended.elapsed(), outcome);
        }
        if unfinished {
            return stats;
        }
    }
}

/// The scheduler: request k is due at `start + k / rate`. It runs on the
/// runtime and polls the clock between the senders' work (`yield_now`)
/// instead of sleeping: tokio's timer has millisecond resolution, which would
/// add up to a millisecond to every measured latency, and waking the runtime
/// from a thread of its own costs more CPU than the requests themselves at
/// tens of thousands per second. The generator's core is busy either way.
async fn schedule(
    workload: &Workload,
    rate: f64,
    window: Window,
    queues: Vec<mpsc::Sender<Job>>,
) -> ScheduleStats {
    let mut rng = SplitMix64::for_stream(u64::MAX);
    let mut stats = ScheduleStats::default();
    let mut k = 0u64;
    loop {
        let now = Instant::now();
        loop {
            // Computed from k, not by adding intervals, so rounding never drifts.
            let intended = window.start + Duration::from_secs_f64(k as f64 / rate);
            if intended >= window.end {
                return stats;
            }
            if intended > now {
                break;
            }
            k += 1;
            let measured = window.records(intended);
            let job = Job {
                intended,
                value: workload.sampler.sample(&mut rng),
                measured,
            };
            if queues[k as usize % queues.len()].try_send(job).is_err() {
                stats.dropped += u64::from(measured);
                continue;
            }
            if measured {
                let lag = now.saturating_duration_since(intended);
                stats.issued += 1;
                stats.lag_total += lag;
                stats.lag_max = stats.lag_max.max(lag);
            }
        }
        tokio::task::yield_now().await;
    }
}

fn report(args: &Args, stats: &Stats, schedule: Option<&ScheduleStats>) {
    let dropped = schedule.map_or(0, |s| s.dropped);
    let measured = args.duration.as_secs_f64();
    let rps = stats.requests() as f64 / measured;
    let mode = if args.rate.is_some() {
        "open"
    } else {
        "closed"
    };
    let pct = |q: f64| stats.latency.value_at_quantile(q);

    println!(
        "{} {} against {}: {} connections, {}",
        args.api.name(),
        mode,
        args.addr,
        args.connections,
        match args.rate {
            Some(rate) => format!(
                "target {rate} req/s, {} senders, queue cap {MAX_QUEUED}",
                args.concurrency
            ),
            None => format!("concurrency {}", args.concurrency),
        }
    );
    println!(
        "  requests  {} in {measured}s = {rps:.1} req/s",
        stats.requests()
    );
    println!(
        "  latency   p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        stats.latency.max()
    );
    println!(
        "  outcomes  allowed {}  denied {}  errors {}  dropped {dropped}",
        stats.allowed,
        stats.denied,
        stats.error_count(),
    );
    for (kind, failures) in &stats.errors {
        println!(
            "  error     {kind} x{}: {}",
            failures.count, failures.example
        );
    }
    if let Some(schedule) = schedule {
        println!(
            "  scheduler lag (included in latency): mean {} µs  max {} µs",
            schedule.lag_mean().as_micros(),
            schedule.lag_max.as_micros()
        );
    }
    println!(
        "RESULT api={} mode={mode} rate={} connections={} concurrency={} duration_s={measured} \
         requests={} rps={rps:.1} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} \
         allowed={} denied={} errors={} dropped={}",
        args.api.name(),
        args.rate.unwrap_or(0.0),
        args.connections,
        // Open loop: the number of senders, an upper bound on in-flight requests.
        args.concurrency,
        stats.requests(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        stats.latency.max(),
        stats.allowed,
        stats.denied,
        stats.error_count(),
        dropped,
    );
}
