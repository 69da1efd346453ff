//! A simulated Envoy RLQS client that behaves as Envoy's `rate_limit_quota`
//! filter does (not as the proto text says): the stream opens with the
//! first bucket; a new bucket sends one immediate single-bucket report
//! (count 1, `time_elapsed` 0); every tick sends ALL buckets, idle ones
//! included, with counters swapped to zero and `time_elapsed` in whole
//! seconds; TTLs and fill intervals are read as whole seconds and an unset
//! TTL as zero; only `blanket_rule` and `token_bucket` are enforced (a
//! `requests_per_time_unit` action is skipped); a token bucket re-sent with
//! the same `max_tokens`, `tokens_per_fill` and fill nanos only extends the
//! TTL, a different one starts at the old one's fill ratio; unknown buckets
//! in actions are skipped; abandon erases the bucket; a closed stream is
//! reopened on the next tick (that tick's counts are lost if it fails).
//! Without an assignment (or after it expired) requests are allowed, Envoy's
//! default. The tick is a parameter, so tests run faster than Envoy's 5 s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ratekeeper::proto::envoy::r#type::v3::rate_limit_strategy::{BlanketRule, Strategy};
use ratekeeper::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::BucketAction as Action;
use ratekeeper::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
use ratekeeper::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use ratekeeper::proto::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// A bucket id as a sorted list of entries.
pub type Bucket = Vec<(String, String)>;

pub fn bucket(entries: &[(&str, &str)]) -> Bucket {
    let mut b: Bucket = entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    b.sort();
    b
}

/// What a bucket enforces.
#[derive(Debug, Clone, PartialEq)]
pub enum Enforced {
    /// No assignment yet: Envoy's default, allow.
    None,
    Allow,
    Deny,
    Tokens {
        max_tokens: u32,
        tokens_per_fill: u32,
        fill_seconds: i64,
        fill_nanos: i32,
    },
}

#[derive(Debug)]
struct BucketState {
    enforced: Enforced,
    expires: Option<Instant>,
    tokens: f64,
    refilled: Instant,
    allowed: u64,
    denied: u64,
    last_report: Instant,
    ever_assigned: bool,
}

/// Counters a test reads.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Requests allowed under an assignment.
    pub admitted_assigned: u64,
    /// Requests allowed before the first assignment (outside the server's control).
    pub admitted_unassigned: u64,
    /// Requests decided after an assignment had expired (a gap).
    pub decided_expired: u64,
    pub denied: u64,
    pub abandoned: u64,
    /// Status of the last stream error, if any.
    pub last_error: Option<(tonic::Code, String)>,
    pub streams_opened: u64,
}

#[derive(Debug)]
struct State {
    buckets: HashMap<Bucket, BucketState>,
    demand: HashMap<Bucket, f64>,
    stats: Stats,
    targets: Vec<SocketAddr>,
    /// Sent as `x-ratekeeper-rlqs-client` (Envoy: the GrpcService's
    /// `initial_metadata`), if set.
    client_id: Option<String>,
    /// Next target index to connect to.
    target: usize,
    stopped: bool,
}

/// A handle on a running simulated Envoy.
#[derive(Debug, Clone)]
pub struct SimEnvoy {
    state: Arc<Mutex<State>>,
}

struct Stream {
    tx: mpsc::Sender<RateLimitQuotaUsageReports>,
    rx: Streaming<RateLimitQuotaResponse>,
}

impl SimEnvoy {
    /// Starts an Envoy of `domain` reporting every `tick` to `targets` (the
    /// first, then the next one whenever a stream fails).
    pub fn start(domain: &str, targets: Vec<SocketAddr>, tick: Duration) -> Self {
        let state = Arc::new(Mutex::new(State {
            buckets: HashMap::new(),
            demand: HashMap::new(),
            stats: Stats::default(),
            targets,
            client_id: None,
            target: 0,
            stopped: false,
        }));
        let sim = SimEnvoy { state };
        let runner = sim.clone();
        let domain = domain.to_owned();
        tokio::spawn(async move { runner.run(domain, tick).await });
        sim
    }

    /// Like [`SimEnvoy::start`], naming itself with `client_id` on every stream.
    pub fn start_with_id(
        domain: &str,
        targets: Vec<SocketAddr>,
        tick: Duration,
        client_id: &str,
    ) -> Self {
        let sim = Self::start(domain, targets, tick);
        sim.lock().client_id = Some(client_id.to_owned());
        sim
    }

    /// Sets the request rate (per second) sent into `bucket`.
    pub fn set_demand(&self, bucket: &Bucket, per_second: f64) {
        self.lock().demand.insert(bucket.clone(), per_second);
    }

    /// Stops the Envoy (its stream closes).
    pub fn stop(&self) {
        self.lock().stopped = true;
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// What `bucket` enforces now (`None` when the bucket is not cached).
    pub fn enforced(&self, bucket: &Bucket) -> Option<Enforced> {
        self.lock().buckets.get(bucket).map(|b| b.enforced.clone())
    }

    /// Tokens per second `bucket` may pass now (0 when denied, `None` when
    /// not limited).
    pub fn share(&self, bucket: &Bucket) -> Option<f64> {
        match self.enforced(bucket)? {
            Enforced::Tokens {
                tokens_per_fill,
                fill_seconds,
                ..
            } => Some(f64::from(tokens_per_fill) / fill_seconds.max(1) as f64),
            Enforced::Deny => Some(0.0),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    async fn connect(&self, domain: &str) -> Option<Stream> {
        let (addr, n) = {
            let state = self.lock();
            if state.targets.is_empty() {
                return None;
            }
            let i = state.target % state.targets.len();
            (state.targets[i], state.targets.len())
        };
        let _ = domain;
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await;
        let channel = match channel {
            Ok(channel) => channel,
            Err(_) => {
                let mut state = self.lock();
                state.target = (state.target + 1) % n;
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let mut client = RateLimitQuotaServiceClient::new(channel);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(id) = self.lock().client_id.clone() {
            request
                .metadata_mut()
                .insert("x-ratekeeper-rlqs-client", id.parse().unwrap());
        }
        match client.stream_rate_limit_quotas(request).await {
            Ok(response) => {
                self.lock().stats.streams_opened += 1;
                Some(Stream {
                    tx,
                    rx: response.into_inner(),
                })
            }
            Err(_) => {
                let mut state = self.lock();
                state.target = (state.target + 1) % n;
                None
            }
        }
    }

    async fn run(self, domain: String, tick: Duration) {
        let mut stream: Option<Stream> = None;
        let mut next_tick: Option<Instant> = None;
        let step = Duration::from_millis(10);
        let mut traffic = tokio::time::interval(step);
        traffic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut carry: HashMap<Bucket, f64> = HashMap::new();
        let mut last_step = Instant::now();
        loop {
            if self.lock().stopped {
                return;
            }
            let tick_at = next_tick.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep_until(tick_at) => {
                    next_tick = Some(tick_at + tick);
                    if stream.is_none() {
                        stream = self.connect(&domain).await;
                    }
                    let report = self.full_report(&domain);
                    if let Some(s) = &stream
                        && s.tx.send(report).await.is_err() {
                            stream = None;
                    }
                }
                _ = traffic.tick() => {
                    let now = Instant::now();
                    let dt = (now - last_step).as_secs_f64();
                    last_step = now;
                    let demand: Vec<(Bucket, f64)> = self.lock().demand.iter().map(|(b, d)| (b.clone(), *d)).collect();
                    for (bucket, rate) in demand {
                        let acc = carry.entry(bucket.clone()).or_default();
                        *acc += rate * dt;
                        while *acc >= 1.0 {
                            *acc -= 1.0;
                            if let Some(first) = self.decide(&bucket, now) {
                                // A new bucket: open the stream if need be,
                                // send its immediate report, start the timer.
                                if stream.is_none() {
                                    stream = self.connect(&domain).await;
                                }
                                if next_tick.is_none() {
                                    next_tick = Some(now + tick);
                                }
                                let report = RateLimitQuotaUsageReports {
                                    domain: domain.clone(),
                                    bucket_quota_usages: vec![first],
                                };
                                if let Some(s) = &stream
                                    && s.tx.send(report).await.is_err() {
                                        stream = None;
                                }
                            }
                        }
                    }
                }
                message = async {
                    match &mut stream {
                        Some(s) => s.rx.message().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match message {
                        Ok(Some(response)) => self.apply(response),
                        Ok(None) => stream = None,
                        Err(status) => {
                            let mut state = self.lock();
                            state.stats.last_error = Some((status.code(), status.message().to_owned()));
                            state.target += 1;
                            stream = None;
                        }
                    }
                }
            }
        }
    }

    /// Decides one request; returns the immediate report of a new bucket.
    fn decide(&self, bucket: &Bucket, now: Instant) -> Option<BucketQuotaUsage> {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(b) = state.buckets.get_mut(bucket) else {
            state.buckets.insert(
                bucket.clone(),
                BucketState {
                    enforced: Enforced::None,
                    expires: None,
                    tokens: 0.0,
                    refilled: now,
                    allowed: 0,
                    denied: 0,
                    last_report: now,
                    ever_assigned: false,
                },
            );
            state.stats.admitted_unassigned += 1;
            return Some(BucketQuotaUsage {
                bucket_id: Some(id(bucket)),
                time_elapsed: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                num_requests_allowed: 1,
                num_requests_denied: 0,
            });
        };
        if b.expires.is_some_and(|at| now >= at) {
            // Expired: back to the default (allow), as Envoy does.
            b.enforced = Enforced::None;
            b.expires = None;
        }
        let allowed = match &b.enforced {
            Enforced::None => {
                if b.ever_assigned {
                    state.stats.decided_expired += 1;
                } else {
                    state.stats.admitted_unassigned += 1;
                }
                b.allowed += 1;
                return None;
            }
            Enforced::Allow => true,
            Enforced::Deny => false,
            Enforced::Tokens {
                max_tokens,
                tokens_per_fill,
                fill_seconds,
                ..
            } => {
                let rate = f64::from(*tokens_per_fill) / (*fill_seconds).max(1) as f64;
                b.tokens = (b.tokens + rate * (now - b.refilled).as_secs_f64())
                    .min(f64::from(*max_tokens));
                b.refilled = now;
                if b.tokens >= 1.0 {
                    b.tokens -= 1.0;
                    true
                } else {
                    false
                }
            }
        };
        if allowed {
            b.allowed += 1;
            state.stats.admitted_assigned += 1;
        } else {
            b.denied += 1;
            state.stats.denied += 1;
        }
        None
    }

    /// Every cached bucket, counters swapped to zero.
    fn full_report(&self, domain: &str) -> RateLimitQuotaUsageReports {
        let now = Instant::now();
        let mut state = self.lock();
        let usages = state
            .buckets
            .iter_mut()
            .map(|(bucket, b)| {
                let elapsed = (now - b.last_report).as_secs() as i64;
                b.last_report = now;
                BucketQuotaUsage {
                    bucket_id: Some(id(bucket)),
                    // Whole seconds only, as Envoy sends.
                    time_elapsed: Some(prost_types::Duration {
                        seconds: elapsed,
                        nanos: 0,
                    }),
                    num_requests_allowed: std::mem::take(&mut b.allowed),
                    num_requests_denied: std::mem::take(&mut b.denied),
                }
            })
            .collect();
        RateLimitQuotaUsageReports {
            domain: domain.to_owned(),
            bucket_quota_usages: usages,
        }
    }

    fn apply(&self, response: RateLimitQuotaResponse) {
        let now = Instant::now();
        let mut state = self.lock();
        for action in response.bucket_action {
            let Some(bucket_id) = action.bucket_id else {
                continue;
            };
            let mut key: Bucket = bucket_id.bucket.into_iter().collect();
            key.sort();
            if key.is_empty() || !state.buckets.contains_key(&key) {
                continue; // Envoy logs and skips.
            }
            match action.bucket_action {
                Some(Action::AbandonAction(_)) => {
                    state.buckets.remove(&key);
                    state.stats.abandoned += 1;
                }
                Some(Action::QuotaAssignmentAction(assignment)) => {
                    // Whole seconds; unset is zero.
                    let ttl = assignment
                        .assignment_time_to_live
                        .map_or(0, |d| d.seconds.max(0) as u64);
                    let new = match assignment.rate_limit_strategy.and_then(|s| s.strategy) {
                        Some(Strategy::BlanketRule(rule))
                            if rule == BlanketRule::DenyAll as i32 =>
                        {
                            Enforced::Deny
                        }
                        Some(Strategy::BlanketRule(_)) => Enforced::Allow,
                        Some(Strategy::TokenBucket(tb)) => {
                            let fill = tb.fill_interval.unwrap_or_default();
                            Enforced::Tokens {
                                max_tokens: tb.max_tokens,
                                tokens_per_fill: tb.tokens_per_fill.unwrap_or(1),
                                fill_seconds: fill.seconds,
                                fill_nanos: fill.nanos,
                            }
                        }
                        // requests_per_time_unit: not enforced, skipped.
                        _ => continue,
                    };
                    let b = state.buckets.get_mut(&key).unwrap();
                    let same = match (&b.enforced, &new) {
                        (
                            Enforced::Tokens {
                                max_tokens: a,
                                tokens_per_fill: b1,
                                fill_nanos: c,
                                ..
                            },
                            Enforced::Tokens {
                                max_tokens: x,
                                tokens_per_fill: y,
                                fill_nanos: z,
                                ..
                            },
                        ) => a == x && b1 == y && c == z,
                        (old, new) => old == new,
                    };
                    if !same {
                        let ratio = match &b.enforced {
                            Enforced::Tokens { max_tokens, .. } if *max_tokens > 0 => {
                                (b.tokens / f64::from(*max_tokens)).clamp(0.0, 1.0)
                            }
                            _ => 1.0,
                        };
                        if let Enforced::Tokens { max_tokens, .. } = &new {
                            b.tokens = f64::from(*max_tokens) * ratio;
                        }
                        b.refilled = now;
                        b.enforced = new;
                    }
                    b.expires = Some(now + Duration::from_secs(ttl));
                    b.ever_assigned = true;
                }
                None => {}
            }
        }
    }
}

fn id(bucket: &Bucket) -> BucketId {
    BucketId {
        bucket: bucket.iter().cloned().collect(),
    }
}
