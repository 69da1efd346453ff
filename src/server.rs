//! The server: both gRPC APIs, health and reflection on one listener, the
//! admin HTTP port on another (and, in the upstream mode, envoyproxy/
//! ratelimit's HTTP, debug and Prometheus listeners: [`crate::upstream`]),
//! the readiness monitor and hot reload beside them, and graceful shutdown
//! in one order (readiness false, drain, stop accepting, let calls finish).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::admin_api::grpc::AdminService;
use crate::admin_api::{AdminApi, AdminAuth};
use crate::api::{
    DraftHeaders, DynamicMetadata, EnvoyCounting, EnvoyService, HeaderSettings, QuotaMode,
    RequestLimits, ResponseHeaders, ShadowMode, ShouldAllowService,
};
use crate::config::upstream_env::ConfigHealth;
use crate::lease::service::LeaseService;
use crate::limiter::{FailurePolicy, Limiter};
use crate::metrics::{Metrics, MetricsSettings};
use crate::overrides::Overrides;
use crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaServiceServer;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use crate::proto::ratekeeper::v1::leases_server::LeasesServer;
use crate::proto::ratekeeper::v1::rate_limiter_server::RateLimiterServer;
use crate::proto::ratekeeper::v1::reservation_service_server::ReservationServiceServer;
use crate::readiness::Readiness;
use crate::reload::{ReloadSettings, ReloadStatus};
use crate::reservation::service::SettleService;
use crate::rlqs::{Hub, MemoryRegistry, Registry as RlqsRegistry, RlqsService, RlqsSettings};
use crate::rules::Rules;
use crate::store::{CounterStore, OverLimitCache};
use crate::upstream::{self, UpstreamListeners};
use crate::{Error, admin, admin_api, overrides, proto, reload};

/// The listeners a server runs on, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// gRPC: both rate limit APIs and health.
    pub grpc: TcpListener,
    /// Admin HTTP, if wanted.
    pub admin: Option<TcpListener>,
    /// Metrics only (`/metrics`, `/healthz`), if wanted.
    pub metrics: Option<TcpListener>,
    /// envoyproxy/ratelimit's HTTP surface (the upstream mode), if wanted.
    pub upstream: Option<UpstreamListeners>,
}

/// TLS for the gRPC listener, as PEM.
#[derive(Clone)]
pub struct TlsSettings {
    /// The server's certificate chain.
    pub cert_pem: Vec<u8>,
    /// The server's private key.
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl TlsSettings {
    /// The tonic server configuration.
    pub fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let config = tonic::transport::ServerTlsConfig::new().identity(identity);
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(tonic::transport::Certificate::from_pem(ca)),
            None => config,
        }
    }

    /// Checks that the certificate, key and CA can be used.
    ///
    /// # Errors
    ///
    /// [`Error::Config`]-like text naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        tonic::transport::Server::builder()
            .tls_config(self.server_config())
            .map(drop)
            .map_err(|e| format!("invalid TLS certificate, key or client CA: {e}"))
    }
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsSettings")
            .field("mtls", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// A configured ratekeeper server, ready to [`serve`](Server::serve).
#[derive(Debug, Clone)]
pub struct Server {
    limiter: Limiter,
    limits: RequestLimits,
    envoy_counting: EnvoyCounting,
    shadow: ShadowMode,
    headers: HeaderSettings,
    quota: QuotaMode,
    dynamic_metadata: DynamicMetadata,
    metrics: MetricsSettings,
    reload: Option<ReloadSettings>,
    drain_delay: Duration,
    readiness_interval: Duration,
    tls: Option<TlsSettings>,
    shutdown_timeout: Duration,
    config_health: ConfigHealth,
    /// gRPC connections older than this are sent a GOAWAY.
    max_connection_age: Option<Duration>,
    /// Who may use the admin API.
    admin_auth: AdminAuth,
    /// How often the overrides store's version is read.
    overrides_poll: Duration,
    /// RLQS: settings, the subscriber registry (`None`: in memory) and the
    /// clock that times reports.
    rlqs: RlqsSettings,
    rlqs_registry: Option<Arc<dyn RlqsRegistry>>,
    rlqs_clock: Arc<dyn crate::clock::Clock>,
}

// === impl Server ===

impl Server {
    /// A server deciding with `rules`, counting in `store`, with default
    /// request caps and a 10 s drain deadline.
    pub fn new(rules: Rules, store: Arc<dyn CounterStore>) -> Self {
        Self {
            limiter: Limiter::new(rules, store),
            limits: RequestLimits::default(),
            envoy_counting: EnvoyCounting::default(),
            shadow: ShadowMode::default(),
            headers: HeaderSettings::default(),
            quota: QuotaMode::default(),
            dynamic_metadata: DynamicMetadata::default(),
            metrics: MetricsSettings::default(),
            reload: None,
            drain_delay: Duration::ZERO,
            readiness_interval: Duration::from_secs(1),
            tls: None,
            shutdown_timeout: Duration::from_secs(10),
            config_health: ConfigHealth::StoreOnly,
            max_connection_age: None,
            admin_auth: AdminAuth::LoopbackOnly,
            overrides_poll: overrides::refresh::DEFAULT_POLL_INTERVAL,
            rlqs: RlqsSettings::default(),
            rlqs_registry: None,
            rlqs_clock: Arc::new(crate::clock::MonotonicClock::default()),
        }
    }

    /// Sets who may use the admin API (default: loopback callers only).
    pub fn with_admin_auth(mut self, auth: AdminAuth) -> Self {
        self.admin_auth = auth;
        self
    }

    /// Consults `overrides` before the rules, polling their store every
    /// `poll` for changes.
    pub fn with_overrides(mut self, overrides: Overrides, poll: Duration) -> Self {
        self.limiter = self.limiter.with_overrides(overrides);
        self.overrides_poll = poll;
        self
    }

    /// Runs RLQS with `settings`, sharing subscribers through `registry`
    /// (`None`: this instance's memory).
    pub fn with_rlqs(
        mut self,
        settings: RlqsSettings,
        registry: Option<Arc<dyn RlqsRegistry>>,
    ) -> Self {
        self.rlqs = settings;
        self.rlqs_registry = registry;
        self
    }

    /// Times RLQS reports with `clock` (tests move it by hand).
    pub fn with_rlqs_clock(mut self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        self.rlqs_clock = clock;
        self
    }

    /// Makes health (readiness, gRPC health, `/healthcheck`) also need
    /// rules with at least one domain (upstream's
    /// `HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED`).
    pub fn with_config_health(mut self, health: ConfigHealth) -> Self {
        self.config_health = health;
        self
    }

    /// Sends a GOAWAY to gRPC connections older than `age`, so clients
    /// reconnect (and re-resolve): the connection closes once its calls
    /// have finished (upstream's `GRPC_MAX_CONNECTION_AGE`). No grace bound
    /// is set: tonic, given one, sends no GOAWAY at all and only cuts the
    /// connection at age + grace.
    pub fn with_max_connection_age(mut self, age: Duration) -> Self {
        self.max_connection_age = Some(age);
        self
    }

    /// Sets the request caps.
    pub fn with_request_limits(mut self, limits: RequestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets which hits of an Envoy request are counted.
    pub fn with_envoy_counting(mut self, counting: EnvoyCounting) -> Self {
        self.envoy_counting = counting;
        self
    }

    /// Adds upstream's three rate limit headers to Envoy answers, under
    /// these names (off by default, as upstream).
    pub fn with_response_headers(mut self, headers: Option<ResponseHeaders>) -> Self {
        self.headers.upstream = headers;
        self
    }

    /// Adds the IETF draft's rate limit headers to Envoy answers.
    pub fn with_draft_rate_limit_headers(mut self, draft: DraftHeaders) -> Self {
        self.headers.draft = draft;
        self
    }

    /// Sets which descriptors of Envoy requests are quota descriptors.
    pub fn with_quota_mode(mut self, quota: QuotaMode) -> Self {
        self.quota = quota;
        self
    }

    /// Adds dynamic metadata to Envoy answers.
    pub fn with_dynamic_metadata(mut self, metadata: DynamicMetadata) -> Self {
        self.dynamic_metadata = metadata;
        self
    }

    /// Re-reads the rules from `settings.path` every `settings.interval` and
    /// applies valid changes.
    pub fn with_reload(mut self, settings: ReloadSettings) -> Self {
        self.reload = Some(settings);
        self
    }

    /// Sets how long the server keeps serving after shutdown begins, with
    /// readiness already false, before it stops accepting.
    pub fn with_drain_delay(mut self, delay: Duration) -> Self {
        self.drain_delay = delay;
        self
    }

    /// Sets how often the store is pinged for readiness (default 1 s).
    pub fn with_readiness_interval(mut self, interval: Duration) -> Self {
        self.readiness_interval = interval;
        self
    }

    /// Serves gRPC over TLS (and requires client certificates when
    /// `settings.client_ca_pem` is set).
    pub fn with_tls(mut self, settings: TlsSettings) -> Self {
        self.tls = Some(settings);
        self
    }

    /// Answers counters known to be over their limit from `cache`, without
    /// a store call.
    pub fn with_over_limit_cache(mut self, cache: OverLimitCache) -> Self {
        self.limiter = self.limiter.with_over_limit_cache(cache);
        self
    }

    /// Decides at most `max` requests at once; more are refused with
    /// `RESOURCE_EXHAUSTED` (`--max-in-flight`).
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.limiter = self.limiter.with_max_in_flight(max);
        self
    }

    /// Keeps at most `max` per-value rule labels; values past it are
    /// counted under their rule's path.
    pub fn with_max_detailed_series(mut self, max: usize) -> Self {
        self.metrics.max_detailed_series = max;
        self.limiter = self
            .limiter
            .with_metrics(Metrics::with_settings(self.metrics));
        self
    }

    /// Counts hits past `ratio` (0 to 1) of a limit as near it.
    pub fn with_near_limit_ratio(mut self, ratio: f32) -> Self {
        self.metrics.near_limit_ratio = ratio;
        self.limiter = self
            .limiter
            .with_metrics(Metrics::with_settings(self.metrics));
        self
    }

    /// Reads time from `clock` for the `local` failure policy's counters
    /// (tests move it by hand).
    pub fn with_clock(mut self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        self.limiter = self.limiter.with_clock(clock);
        self
    }

    /// Sets what to answer when the store fails (default: `UNAVAILABLE`).
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.limiter = self.limiter.with_failure_policy(policy);
        self
    }

    /// Sets global shadow mode.
    pub fn with_shadow_mode(mut self, shadow: ShadowMode) -> Self {
        self.shadow = shadow;
        self
    }

    /// Sets how long in-flight calls may take to finish after shutdown begins.
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// The engine, e.g. to swap rules.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Serves until `shutdown` resolves, then reports NOT_SERVING, stops
    /// accepting, lets in-flight calls finish (up to the drain deadline) and
    /// returns.
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] when a listener fails.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let (health, health_service) = tonic_health::server::health_reporter();
        // One check before serving, so health and /readyz are right from
        // the first request (a store that is down costs one store deadline).
        let readiness = match self.config_health {
            ConfigHealth::StoreOnly => Readiness::default(),
            ConfigHealth::NeedsDomain => Readiness::with_config_gate(self.limiter.clone()),
        };
        readiness.probe(&self.limiter, &health).await;
        // Overrides in force from the first request; a store that is down
        // leaves them to the poll.
        if let Err(error) = self.limiter.refresh_overrides().await {
            tracing::warn!(%error, "cannot load overrides yet; polling");
        }
        tracing::info!(
            overrides = self.limiter.overrides().backend().kind(),
            auth = self.admin_auth.describe(),
            "admin API"
        );

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };

        // Reflection (both protocol versions in use by grpcurl and friends)
        // lists our two APIs and health, so no proto files are needed.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| Error::Internal(format!("reflection: {e}")))?;

        let incoming = TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
        let mut builder = tonic::transport::Server::builder();
        if let Some(age) = self.max_connection_age {
            builder = builder.max_connection_age(age);
        }
        if let Some(tls) = &self.tls {
            builder = builder
                .tls_config(tls.server_config())
                .map_err(|e| Error::Internal(format!("tls: {e}")))?;
        }
        let envoy = EnvoyService::new(
            self.limiter.clone(),
            self.limits,
            self.envoy_counting,
            self.shadow,
        )
        .with_headers(self.headers.clone())
        .with_quota_mode(self.quota)
        .with_dynamic_metadata(self.dynamic_metadata);
        let rlqs_hub = Hub::default();
        let rlqs_registry = self.rlqs_registry.clone().unwrap_or_else(|| {
            Arc::new(MemoryRegistry::new(self.rlqs_clock.clone())) as Arc<dyn RlqsRegistry>
        });
        let rlqs = RlqsService::new(
            self.limiter.clone(),
            rlqs_registry,
            rlqs_hub.clone(),
            self.rlqs,
            self.rlqs_clock.clone(),
            stop_rx.clone(),
        );
        let grpc = builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                RateLimiterServer::new(ShouldAllowService::new(
                    self.limiter.clone(),
                    self.limits,
                    self.shadow,
                ))
                .max_decoding_message_size(self.limits.max_request_bytes),
            )
            .add_service(
                RateLimitServiceServer::new(envoy.clone())
                    .max_decoding_message_size(self.limits.max_request_bytes),
            )
            .add_service(
                LeasesServer::new(LeaseService::new(self.limiter.clone(), self.limits))
                    .max_decoding_message_size(self.limits.max_request_bytes),
            )
            .add_service(
                AdminService::new(
                    AdminApi::new(self.limiter.clone(), self.limits),
                    self.admin_auth.clone(),
                )
                .into_server()
                .max_decoding_message_size(self.limits.max_request_bytes),
            )
            .add_service(
                ReservationServiceServer::new(SettleService::new(
                    self.limiter.clone(),
                    self.limits,
                ))
                .max_decoding_message_size(self.limits.max_request_bytes),
            )
            // One report carries every bucket of an Envoy: room for the
            // per-stream cap's worth of them.
            .add_service(
                RateLimitQuotaServiceServer::new(rlqs)
                    .max_decoding_message_size(self.limits.max_request_bytes.max(16 << 20)),
            )
            .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));

        let reload_status = ReloadStatus::default();
        let admin_state = admin::AdminState {
            limiter: self.limiter.clone(),
            reload: reload_status.clone(),
            readiness: readiness.clone(),
            rlqs: rlqs_hub,
        };
        let monitoring = readiness.monitor(
            self.limiter.clone(),
            health.clone(),
            self.readiness_interval,
            stopped(stop_rx.clone()),
        );
        let polling_overrides = overrides::refresh::watch(
            self.limiter.clone(),
            self.overrides_poll,
            stopped(stop_rx.clone()),
        );
        let reloading = async {
            if let Some(settings) = self.reload.clone() {
                reload::watch(
                    settings,
                    self.limiter.clone(),
                    reload_status,
                    stopped(stop_rx.clone()),
                )
                .await;
            }
        };
        // Every HTTP listener: admin, metrics, and upstream's in that mode.
        let mut http_listeners: Vec<(TcpListener, axum::Router, &'static str)> = Vec::new();
        if let Some(listener) = listeners.admin {
            let admin_api = AdminApi::new(self.limiter.clone(), self.limits);
            let router = admin::router(admin_state.clone())
                .merge(admin_api::http::router(admin_api, self.admin_auth.clone()));
            http_listeners.push((listener, router, "admin"));
        }
        if let Some(listener) = listeners.metrics {
            http_listeners.push((
                listener,
                admin::metrics_router(admin_state.clone()),
                "metrics",
            ));
        }
        if let Some(upstream) = listeners.upstream {
            let router = upstream::http_router(
                envoy.clone(),
                readiness.clone(),
                self.limits.max_request_bytes,
            );
            http_listeners.push((upstream.http, router, "http"));
            let router = upstream::debug_router(admin_state.clone());
            http_listeners.push((upstream.debug, router, "debug"));
            if let Some((listener, path)) = upstream.prometheus {
                let router = upstream::prometheus_router(self.limiter.clone(), path);
                http_listeners.push((listener, router, "prometheus"));
            }
        }
        let admin = futures_util::future::try_join_all(http_listeners.into_iter().map(
            |(listener, router, name)| {
                let stop = stopped(stop_rx.clone());
                async move {
                    // With the peer's address: the admin API serves only
                    // loopback callers when no token is configured.
                    let service = router.into_make_service_with_connect_info::<SocketAddr>();
                    axum::serve(listener, service)
                        .with_graceful_shutdown(stop)
                        .await
                        .map_err(|e| Error::Internal(format!("{name} server: {e}")))
                }
            },
        ));
        let servers = async {
            let (grpc, admin, (), (), ()) =
                tokio::join!(grpc, admin, reloading, monitoring, polling_overrides);
            grpc.map_err(|e| Error::Internal(format!("grpc server: {e}")))?;
            admin.map(drop)
        };
        tokio::pin!(servers);

        tokio::select! {
            result = &mut servers => return result,
            () = shutdown => {}
        }
        // Readiness goes false first, while everything still serves, so load
        // balancers stop sending before the listeners close.
        readiness.begin_shutdown(&health).await;
        if !self.drain_delay.is_zero() {
            tokio::select! {
                result = &mut servers => return result,
                () = tokio::time::sleep(self.drain_delay) => {}
            }
        }
        let _ = stop_tx.send(true);
        match tokio::time::timeout(self.shutdown_timeout, servers).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(timeout = ?self.shutdown_timeout, "drain deadline reached; closing with calls in flight");
                Ok(())
            }
        }
    }
}
