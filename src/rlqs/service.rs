//! The tonic service `RateLimitQuotaService/StreamRateLimitQuotas`: one task
//! per stream runs its [`StreamState`], fed by the stream's messages, a
//! tick that re-reads the registry and the rules between reports (so room
//! others gave up, a newcomer, or a reload reach the stream within a tick,
//! not a report period), and the server's
//! shutdown (streams then end with `UNAVAILABLE`, and Envoys reconnect on
//! their next report, keeping their assignments until TTL meanwhile).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::RlqsSettings;
use super::hub::Hub;
use super::registry::Registry;
use super::stream::StreamState;
use crate::clock::Clock;
use crate::limiter::Limiter;
use crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaService;
use crate::proto::envoy::service::rate_limit_quota::v3::{
    RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};

/// The RLQS service; cheap to clone.
#[derive(Debug, Clone)]
pub struct RlqsService {
    limiter: Limiter,
    registry: Arc<dyn Registry>,
    hub: Hub,
    settings: RlqsSettings,
    clock: Arc<dyn Clock>,
    /// Names this instance's streams in the shared registry.
    instance: Arc<str>,
    next_stream: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
}

// === impl RlqsService ===

impl RlqsService {
    /// A service reading rules from `limiter`, registering subscribers in
    /// `registry`, measuring time with `clock` (monotonic), ending its
    /// streams when `stop` turns true.
    pub fn new(
        limiter: Limiter,
        registry: Arc<dyn Registry>,
        hub: Hub,
        settings: RlqsSettings,
        clock: Arc<dyn Clock>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            limiter,
            registry,
            hub,
            settings,
            clock,
            instance: Arc::from(format!("{:016x}", fastrand::u64(..))),
            next_stream: Arc::new(AtomicU64::new(0)),
            stop,
        }
    }
}

/// What woke a stream's task.
enum Event {
    Message(Option<Result<RateLimitQuotaUsageReports, Status>>),
    Tick,
    Stop,
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The request header that names the client (set it with the `GrpcService`'s
/// `initial_metadata` in Envoy, unique per Envoy): a stream that reconnects
/// under it, to any instance, keeps what its client holds.
pub const CLIENT_ID_HEADER: &str = "x-ratekeeper-rlqs-client";
/// Longest client id accepted.
pub const MAX_CLIENT_ID_BYTES: usize = 128;

/// The client id, if the stream carries one.
fn client_id(metadata: &tonic::metadata::MetadataMap) -> Result<Option<String>, Status> {
    let Some(value) = metadata.get(CLIENT_ID_HEADER) else {
        return Ok(None);
    };
    let id = value
        .to_str()
        .ok()
        .filter(|id| !id.is_empty() && id.len() <= MAX_CLIENT_ID_BYTES)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{CLIENT_ID_HEADER}: must be 1 to {MAX_CLIENT_ID_BYTES} visible ASCII characters"
            ))
        })?;
    Ok(Some(id.to_owned()))
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<RateLimitQuotaResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RateLimitQuotaService for RlqsService {
    type StreamRateLimitQuotasStream = ResponseStream;

    async fn stream_rate_limit_quotas(
        &self,
        request: Request<Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<Response<Self::StreamRateLimitQuotasStream>, Status> {
        let client = client_id(request.metadata())?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let persistent = client.is_some();
        let member = match client {
            Some(id) => format!("c:{id}"),
            None => format!(
                "s:{}-{}",
                self.instance,
                self.next_stream.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let mut state = StreamState::new(
            member,
            persistent,
            self.settings,
            self.hub.clone(),
            self.registry.clone(),
        );
        let service = self.clone();
        // The task ends with the stream (client gone, error, or shutdown);
        // its handle is not needed: it owns everything it touches.
        tokio::spawn(async move {
            let mut stop = service.stop.clone();
            // Ten ticks per re-read; a stream with a bucket waiting for room
            // looks on every tick, so it gets the room soon after it is left.
            let mut tick = tokio::time::interval(service.settings.reallocate_every / 10);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut ticks: u32 = 0;
            loop {
                let event = tokio::select! {
                    message = inbound.next() => Event::Message(message),
                    _ = tick.tick() => Event::Tick,
                    () = stopped(&mut stop) => Event::Stop,
                };
                let outcome = match event {
                    Event::Message(Some(Ok(message))) => {
                        let rules = service.limiter.rules();
                        state
                            .report(message, rules.rlqs(), service.clock.now_ms())
                            .await
                            .map_err(Status::from)
                    }
                    Event::Message(Some(Err(status))) => {
                        tracing::debug!(%status, "rlqs stream ended by the client");
                        break;
                    }
                    Event::Message(None) => break,
                    Event::Tick if state.is_silent(service.clock.now_ms()) => {
                        // Half-open: free its place in the registry.
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(
                                "no usage report for three report periods",
                            )))
                            .await;
                        break;
                    }
                    Event::Tick => {
                        ticks = ticks.wrapping_add(1);
                        if !ticks.is_multiple_of(10) && !state.is_waiting() {
                            continue;
                        }
                        let rules = service.limiter.rules();
                        Ok(state
                            .reallocate_all(rules.rlqs(), service.clock.now_ms())
                            .await)
                    }
                    Event::Stop => {
                        let _ = tx
                            .send(Err(Status::unavailable("server shutting down; reconnect")))
                            .await;
                        break;
                    }
                };
                match outcome {
                    Ok(Some(response)) => {
                        if tx.send(Ok(response)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(status) => {
                        tracing::warn!(%status, "rlqs stream refused");
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
            }
            state.close().await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
