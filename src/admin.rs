//! The admin HTTP port, for operators and orchestrators.
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | `200 ok` while the process runs |
//! | `/readyz` | `200 ready` when the instance can answer: the store answers a ping within its deadline, or it does not and no failure policy in force is `error` (`ready (degraded: …)`); `503` with the reason otherwise (see [`crate::readiness`]) |
//! | `/metrics` | Prometheus text exposition of [`crate::metrics`] |
//! | `/rules` | the loaded rules as JSON: domain, path, algorithm, limit, shadow and quota mode, metadata, source file; then the runtime overrides in force, with `source` `override` |
//! | `/admin/v1/…` | the authenticated admin API ([`crate::admin_api::http`]) |

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;

use crate::limiter::Limiter;
use crate::readiness::{NotReady, Readiness};
use crate::reload::ReloadStatus;
use crate::rules::{Rule, RuleLimit};

/// What the admin endpoints look at.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The engine: rules, store, metrics.
    pub limiter: Limiter,
    /// The last reload's outcome.
    pub reload: ReloadStatus,
    /// Whether to take traffic, from the readiness monitor.
    pub readiness: Readiness,
    /// RLQS buckets, for `/metrics` and `/debug/rlqs`.
    pub rlqs: crate::rlqs::Hub,
}

/// The metrics-only routes (`--metrics-addr`): `/metrics` and `/healthz`,
/// nothing that reveals rules, store errors or file paths, so this port can
/// be opened to a scraper while the admin port stays on loopback.
pub fn metrics_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(state))
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/rules", get(rules))
        .route("/debug/rlqs", get(debug_rlqs))
        .with_state(Arc::new(state))
}

async fn ready(State(state): State<Arc<AdminState>>) -> (StatusCode, String) {
    let backend = state.limiter.store().backend();
    match state.readiness.check() {
        Err(NotReady::ShuttingDown) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".to_owned(),
        ),
        Err(NotReady::Unchecked) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {backend} store not checked yet\n"),
        ),
        Err(NotReady::Store(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {backend} store: {error}\n"),
        ),
        Err(NotReady::NoConfig) => {
            let mut body =
                "not ready: no rate limit configuration with a domain is loaded\n".to_owned();
            if let Some(error) = state.reload.last_error() {
                body.push_str(&format!("last config refused: {error}\n"));
            }
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
        Ok(degraded) => {
            let mut body = match degraded {
                None => "ready\n".to_owned(),
                Some(detail) => format!("ready (degraded: {backend} {detail})\n"),
            };
            if let Some(error) = state.reload.last_error() {
                body.push_str(&format!(
                    "last config change refused (previous rules in force): {error}\n"
                ));
            }
            (StatusCode::OK, body)
        }
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.limiter.metrics().render() + &state.rlqs.render_metrics(),
    )
}

/// `/debug/rlqs`: every RLQS bucket subscribed on this instance with its
/// global limit, assigned shares, realised rate and subscribers.
async fn debug_rlqs(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    axum::Json(state.rlqs.debug_json())
}

/// One rule as `/rules` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct RuleView {
    domain: String,
    path: String,
    name: Option<String>,
    algorithm: Option<&'static str>,
    requests_per_unit: Option<u64>,
    unit: Option<&'static str>,
    unit_multiplier: Option<u64>,
    burst: Option<u64>,
    unlimited: bool,
    /// Every limit of the rule, the first one (shown above too) first;
    /// several for a descriptor with `rate_limits`, empty when unlimited.
    limits: Vec<LimitView>,
    shadow_mode: bool,
    quota_mode: bool,
    /// The descriptor's `metadata`, as loaded; `null` when it has none.
    metadata: Option<crate::rules::Metadata>,
    /// The rule's own failure policy; `null` follows `--failure-policy`.
    failure_policy: Option<&'static str>,
    replaces: Vec<String>,
    source: String,
    /// Set for a concurrency rule (leases).
    #[serde(skip_serializing_if = "Option::is_none")]
    concurrency: Option<crate::lease::ConcurrencyView>,
}

/// One limit of a rule as `/rules` shows it.
#[derive(Debug, Serialize)]
struct LimitView {
    algorithm: &'static str,
    requests_per_unit: u64,
    unit: &'static str,
    unit_multiplier: u64,
    burst: u64,
}

async fn rules(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let rules = state.limiter.rules();
    let mut views: Vec<RuleView> = rules
        .domains()
        .flat_map(|(domain, tree)| {
            let mut found = Vec::new();
            tree.collect_rules(&mut found);
            found.into_iter().map(move |rule| view(domain, &rule))
        })
        .collect();
    // Then the runtime overrides in force (`source` is `override`).
    let overrides = state.limiter.overrides().current();
    views.extend(
        overrides
            .rules()
            .into_iter()
            .map(|(domain, rule)| view(domain, &rule)),
    );
    axum::Json(views)
}

pub(crate) fn view(domain: &str, rule: &Rule) -> RuleView {
    let limit = match rule.limit {
        RuleLimit::Limited(limit) => Some(limit),
        RuleLimit::Unlimited | RuleLimit::Concurrency(_) => None,
    };
    RuleView {
        concurrency: rule.concurrency().map(crate::lease::ConcurrencyView::of),
        domain: domain.to_owned(),
        path: rule.path.clone(),
        name: rule.name.clone(),
        algorithm: limit.map(|l| l.algorithm.as_str()),
        requests_per_unit: limit.map(|l| l.requests_per_unit),
        unit: limit.map(|l| l.unit.as_str()),
        unit_multiplier: limit.map(|l| l.unit_multiplier),
        burst: limit.map(|l| l.quota().burst),
        unlimited: matches!(rule.limit, RuleLimit::Unlimited),
        limits: rule
            .limits()
            .map(|l| LimitView {
                algorithm: l.algorithm.as_str(),
                requests_per_unit: l.requests_per_unit,
                unit: l.unit.as_str(),
                unit_multiplier: l.unit_multiplier,
                burst: l.quota().burst,
            })
            .collect(),
        shadow_mode: rule.shadow_mode,
        quota_mode: rule.quota_mode,
        metadata: rule.metadata.as_deref().cloned(),
        failure_policy: rule.failure_policy.map(|p| p.as_str()),
        replaces: rule.replaces.clone(),
        source: rule.source.to_string(),
    }
}
