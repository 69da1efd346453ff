//! envoyproxy/ratelimit's HTTP surface, for the upstream mode (`ratekeeper
//! upstream`, or the binary run as `ratelimit`), on upstream's ports:
//!
//! | listener | path | answer |
//! |---|---|---|
//! | `HOST:PORT` | `/healthcheck` | `200 OK` when healthy, `500` with an empty body otherwise (see [`crate::readiness`]; with `HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED`, also rules with a domain) |
//! | `HOST:PORT` | `/json` | a `RateLimitRequest` in proto3 JSON ([`json`]): `200` (OK) or `429` (OVER_LIMIT) with the `RateLimitResponse` in proto3 JSON; `400 Bad Request` for a body that does not parse or a call that fails |
//! | `DEBUG_HOST:DEBUG_PORT` | `/rlconfig` | the loaded limits, one per line ([`rlconfig`]); also ratekeeper's admin routes (`/healthz`, `/readyz`, `/metrics`, `/rules`); any other path lists them |
//! | `PROMETHEUS_ADDR` | `PROMETHEUS_PATH` | the Prometheus metrics |
//!
//! Paths answer any method, as upstream's do.

pub mod json;
pub mod rlconfig;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState};
use crate::api::EnvoyService;
use crate::limiter::Limiter;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService as _;
use crate::readiness::Readiness;

/// The listeners of upstream's HTTP surface, bound by the caller.
#[derive(Debug)]
pub struct UpstreamListeners {
    /// `HOST:PORT`: `/healthcheck`, `/json`.
    pub http: TcpListener,
    /// `DEBUG_HOST:DEBUG_PORT`: `/rlconfig` and the admin routes.
    pub debug: TcpListener,
    /// `PROMETHEUS_ADDR` with the path metrics are served at, if wanted.
    pub prometheus: Option<(TcpListener, String)>,
}

/// What the `HOST:PORT` routes use.
#[derive(Debug, Clone)]
struct HttpState {
    envoy: EnvoyService,
    readiness: Readiness,
}

/// `/healthcheck` and `/json`; `/json` bodies over `max_request_bytes` are
/// refused as bad requests.
pub fn http_router(envoy: EnvoyService, readiness: Readiness, max_request_bytes: usize) -> Router {
    Router::new()
        .route("/healthcheck", any(healthcheck))
        .route("/json", any(json_call))
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .with_state(Arc::new(HttpState { envoy, readiness }))
}

/// `/rlconfig`, the admin routes, and an index of them for any other path.
pub fn debug_router(state: AdminState) -> Router {
    let limiter = state.limiter.clone();
    Router::new()
        .route("/rlconfig", any(rlconfig_dump))
        .with_state(limiter)
        .merge(admin::router(state))
        .fallback(index)
}

/// The metrics at `path` (a path ending in `/` also serves everything under
/// it, as Go's HTTP mux does); anything else is 404.
pub fn prometheus_router(limiter: Limiter, path: String) -> Router {
    let path: Arc<str> = Arc::from(path);
    Router::new().fallback(move |uri: Uri| {
        let (limiter, path) = (limiter.clone(), path.clone());
        async move {
            let wanted = uri.path();
            let served = wanted == &*path || (path.ends_with('/') && wanted.starts_with(&*path));
            if !served {
                return StatusCode::NOT_FOUND.into_response();
            }
            (
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                limiter.metrics().render(),
            )
                .into_response()
        }
    })
}

async fn healthcheck(State(state): State<Arc<HttpState>>) -> Response {
    if state.readiness.check().is_ok() {
        "OK".into_response()
    } else {
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}

async fn json_call(
    State(state): State<Arc<HttpState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request = match body
        .map_err(|e| e.to_string())
        .and_then(|body| json::parse_request(&body))
    {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(%error, "/json: bad request body");
            return bad_request();
        }
    };
    let response = match state
        .envoy
        .should_rate_limit(tonic::Request::new(request))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tracing::debug!(code = ?status.code(), message = status.message(), "/json: call failed");
            return bad_request();
        }
    };
    let body = match json::render_response(&response) {
        Ok(body) => body,
        Err(error) => {
            tracing::warn!(%error, "/json: the response has no JSON form");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                plain("Internal Server Error\n"),
            )
                .into_response();
        }
    };
    let status = match response.overall_code() {
        Code::OverLimit => StatusCode::TOO_MANY_REQUESTS,
        Code::Ok => StatusCode::OK,
        Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Upstream's answer to anything wrong with a `/json` call (Go's
/// `http.Error` with the status text).
fn bad_request() -> Response {
    (StatusCode::BAD_REQUEST, plain("Bad Request\n")).into_response()
}

fn plain(text: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        text,
    )
}

async fn rlconfig_dump(State(limiter): State<Limiter>) -> String {
    rlconfig::dump(&limiter.rules())
}

async fn index() -> &'static str {
    "/healthz: 200 while the process runs\n\
     /metrics: Prometheus metrics\n\
     /readyz: whether this instance can answer, and why not\n\
     /rlconfig: print out the currently loaded configuration for debugging\n\
     /rules: the loaded rules as JSON\n"
}
