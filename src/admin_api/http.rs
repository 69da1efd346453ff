//! The admin API as JSON on the admin HTTP port, under `/admin/v1/`.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /admin/v1/overrides` | | the overrides in force |
//! | `PUT /admin/v1/overrides` | [`PutOverride`] | the stored override |
//! | `POST /admin/v1/overrides/get` | [`Target`] | the override, or 404 |
//! | `POST /admin/v1/overrides/delete` | [`Target`] | the deleted override, or 404 |
//! | `POST /admin/v1/inspect` | [`InspectRequest`] | [`super::Inspection`] |
//! | `POST /admin/v1/reset` | [`Target`] | [`super::ResetReport`] |
//!
//! Errors are `{"error": "<field>: <reason>"}` with 400 (bad input), 401/403
//! (authentication), 404, 503 (the store failed) or 500.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::auth::Refusal;
use super::{AdminApi, AdminAuth, Caller, InspectRequest, PutOverride, Target};
use crate::error::Error;

/// Largest admin request body accepted.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// A refusal before the operation ran: its status and message.
#[derive(Debug)]
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error(self.0, &self.1)
    }
}

#[derive(Debug)]
struct Shared {
    api: AdminApi,
    auth: AdminAuth,
}

/// The `/admin/v1/` routes. The server must be run with connect info
/// (`into_make_service_with_connect_info::<SocketAddr>`) for loopback-only
/// mode to admit anyone.
pub fn router(api: AdminApi, auth: AdminAuth) -> Router {
    Router::new()
        .route("/admin/v1/overrides", get(list).put(put))
        .route("/admin/v1/overrides/get", post(get_one))
        .route("/admin/v1/overrides/delete", post(delete))
        .route("/admin/v1/inspect", post(inspect))
        .route("/admin/v1/reset", post(reset))
        .with_state(Arc::new(Shared { api, auth }))
}

async fn list(State(s): State<Arc<Shared>>, request: Request) -> Result<Response, Failure> {
    admit(&s, &request)?;
    Ok(answer(s.api.list().await))
}

async fn put(State(s): State<Arc<Shared>>, request: Request) -> Result<Response, Failure> {
    let (caller, put) = body::<PutOverride>(&s, request).await?;
    Ok(answer(s.api.put(&caller, put).await))
}

async fn get_one(State(s): State<Arc<Shared>>, request: Request) -> Result<Response, Failure> {
    let (_, target) = body::<Target>(&s, request).await?;
    Ok(found(s.api.get(&target).await))
}

async fn delete(State(s): State<Arc<Shared>>, request: Request) -> Result<Response, Failure> {
    let (caller, target) = body::<Target>(&s, request).await?;
    Ok(found(s.api.delete(&caller, &target).await))
}

async fn inspect(State(s): State<Arc<Shared>>, request: Request) -> Result<Response, Failure> {
    let (_, ask) = body::<InspectRequest>(&s, request).await?;
    Ok(answer(s.api.inspect(&ask.target(), ask.hits).await))
}

async fn reset(State(s): State<Arc<Shared>>, request: Request) -> Result<Response, Failure> {
    let (caller, target) = body::<Target>(&s, request).await?;
    Ok(answer(s.api.reset(&caller, &target).await))
}

/// Authenticates the request.
fn admit(s: &Shared, request: &Request) -> Result<Caller, Failure> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    s.auth.check(peer, authorization).map_err(|refusal| {
        let status = match refusal {
            Refusal::MissingToken | Refusal::WrongToken => StatusCode::UNAUTHORIZED,
            Refusal::NotLoopback => StatusCode::FORBIDDEN,
        };
        Failure(status, refusal.to_string())
    })
}

/// Authenticates the request, then reads its JSON body.
async fn body<T: DeserializeOwned>(s: &Shared, request: Request) -> Result<(Caller, T), Failure> {
    let caller = admit(s, &request)?;
    let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            Failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body: larger than {MAX_BODY_BYTES} bytes"),
            )
        })?;
    let value = serde_json::from_slice(&bytes)
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("body: {e}")))?;
    Ok((caller, value))
}

fn answer<T: Serialize>(result: Result<T, Error>) -> Response {
    match result {
        Ok(value) => (StatusCode::OK, axum::Json(value)).into_response(),
        Err(e) => failure(&e),
    }
}

fn found<T: Serialize>(result: Result<Option<T>, Error>) -> Response {
    match result {
        Ok(Some(value)) => (StatusCode::OK, axum::Json(value)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no override for this domain and descriptor",
        ),
        Err(e) => failure(&e),
    }
}

fn failure(e: &Error) -> Response {
    let status = match e {
        Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
        // (The admin API makes no reservations; listed for completeness.)
        Error::Full(_) | Error::Reservation(_) => StatusCode::CONFLICT,
        Error::Storage(_) | Error::Overloaded { .. } | Error::NoConfig => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Error::Config(_) | Error::Internal(_) => {
            tracing::error!(error = %e, "admin API failed");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
        }
    };
    error(status, &e.to_string())
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| status.into_response())
}
