//! The admin HTTP port, for operators and orchestrators.
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | `200 ok` while the process runs |
//! | `/readyz` | `200 ready` when rules are loaded and the store answers a ping within its deadline; `503` with the reason otherwise |

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::limiter::Limiter;

/// The admin routes.
pub fn router(limiter: Limiter) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Arc::new(limiter))
}

async fn ready(State(limiter): State<Arc<Limiter>>) -> (StatusCode, String) {
    match limiter.store().ping().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {} store: {error}\n", limiter.store().backend()),
        ),
    }
}
