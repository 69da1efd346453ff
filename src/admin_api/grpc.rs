//! `ratekeeper.v1.AdminService` on the gRPC port: the [`AdminApi`] operations,
//! translated to and from `proto/ratekeeper/v1/admin.proto`. The bearer
//! token travels as `authorization` metadata.

use tonic::{Request, Response, Status};

use super::auth::Refusal;
use super::{AdminApi, AdminAuth, Caller, PutOverride, Target};
use crate::overrides::{EntrySpec, LimitSpec, Override};
use crate::proto::ratekeeper::v1 as pb;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct AdminService {
    api: AdminApi,
    auth: AdminAuth,
}

impl AdminService {
    /// Serves `api` to callers `auth` admits.
    pub fn new(api: AdminApi, auth: AdminAuth) -> Self {
        Self { api, auth }
    }

    /// The service, ready to add to a tonic server.
    pub fn into_server(self) -> pb::admin_service_server::AdminServiceServer<Self> {
        pb::admin_service_server::AdminServiceServer::new(self)
    }

    fn admit<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        self.auth
            .check(request.remote_addr(), authorization)
            .map_err(|refusal| match refusal {
                Refusal::MissingToken | Refusal::WrongToken => {
                    Status::unauthenticated(refusal.to_string())
                }
                Refusal::NotLoopback => Status::permission_denied(refusal.to_string()),
            })
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminService {
    async fn put_override(
        &self,
        request: Request<pb::PutOverrideRequest>,
    ) -> Result<Response<pb::PutOverrideResponse>, Status> {
        let caller = self.admit(&request)?;
        let r = request.into_inner();
        let put = PutOverride {
            domain: r.domain,
            descriptor: entries(r.descriptor),
            rate_limit: limit(r.rate_limit.unwrap_or_default()),
            expires_in_seconds: nonzero(r.expires_in_seconds),
            expires_at_ms: nonzero(r.expires_at_ms),
        };
        let stored = self.api.put(&caller, put).await?;
        Ok(Response::new(pb::PutOverrideResponse {
            stored: Some(to_proto(stored)),
        }))
    }

    async fn get_override(
        &self,
        request: Request<pb::GetOverrideRequest>,
    ) -> Result<Response<pb::GetOverrideResponse>, Status> {
        self.admit(&request)?;
        let r = request.into_inner();
        let found = self.api.get(&target(r.domain, r.descriptor)).await?;
        let found = found.map(to_proto).ok_or_else(not_found)?;
        Ok(Response::new(pb::GetOverrideResponse {
            found: Some(found),
        }))
    }

    async fn list_overrides(
        &self,
        request: Request<pb::ListOverridesRequest>,
    ) -> Result<Response<pb::ListOverridesResponse>, Status> {
        self.admit(&request)?;
        let overrides = self.api.list().await?.into_iter().map(to_proto).collect();
        Ok(Response::new(pb::ListOverridesResponse { overrides }))
    }

    async fn delete_override(
        &self,
        request: Request<pb::DeleteOverrideRequest>,
    ) -> Result<Response<pb::DeleteOverrideResponse>, Status> {
        let caller = self.admit(&request)?;
        let r = request.into_inner();
        let deleted = self
            .api
            .delete(&caller, &target(r.domain, r.descriptor))
            .await?;
        let deleted = deleted.map(to_proto).ok_or_else(not_found)?;
        Ok(Response::new(pb::DeleteOverrideResponse {
            deleted: Some(deleted),
        }))
    }

    async fn inspect_counter(
        &self,
        request: Request<pb::InspectCounterRequest>,
    ) -> Result<Response<pb::InspectCounterResponse>, Status> {
        self.admit(&request)?;
        let r = request.into_inner();
        let asked = target(r.domain, r.descriptor);
        let seen = self.api.inspect(&asked, r.hits).await?;
        Ok(Response::new(pb::InspectCounterResponse {
            decision: seen.decision,
            overridden: seen.overridden,
            rule: seen.rule.as_ref().map(rule),
            configured_rule: seen.configured_rule.as_ref().map(rule),
            used: seen.used.unwrap_or(0),
            remaining: seen.remaining.unwrap_or(0),
            reset_after_ms: seen.reset_after_ms.unwrap_or(0),
            retry_after_ms: seen.retry_after_ms.unwrap_or(0),
        }))
    }

    async fn reset_counter(
        &self,
        request: Request<pb::ResetCounterRequest>,
    ) -> Result<Response<pb::ResetCounterResponse>, Status> {
        let caller = self.admit(&request)?;
        let r = request.into_inner();
        let report = self
            .api
            .reset(&caller, &target(r.domain, r.descriptor))
            .await?;
        Ok(Response::new(pb::ResetCounterResponse {
            keys: report.keys,
            deleted: report.deleted,
        }))
    }
}

fn not_found() -> Status {
    Status::not_found("no override for this domain and descriptor")
}

fn nonzero(value: u64) -> Option<u64> {
    (value != 0).then_some(value)
}

fn text(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

fn entries(entries: Vec<pb::AdminEntry>) -> Vec<EntrySpec> {
    entries
        .into_iter()
        .map(|e| EntrySpec {
            key: e.key,
            value: text(e.value),
        })
        .collect()
}

fn target(domain: String, descriptor: Vec<pb::AdminEntry>) -> Target {
    Target {
        domain,
        descriptor: entries(descriptor),
    }
}

fn limit(l: pb::AdminLimit) -> LimitSpec {
    LimitSpec {
        requests_per_unit: l.requests_per_unit,
        unit: l.unit,
        unit_multiplier: nonzero(l.unit_multiplier),
        algorithm: text(l.algorithm),
        burst: nonzero(l.burst),
        failure_policy: text(l.failure_policy),
    }
}

fn to_proto(o: Override) -> pb::AdminOverride {
    pb::AdminOverride {
        domain: o.domain,
        descriptor: o
            .descriptor
            .into_iter()
            .map(|e| pb::AdminEntry {
                key: e.key,
                value: e.value.unwrap_or_default(),
            })
            .collect(),
        rate_limit: Some(pb::AdminLimit {
            requests_per_unit: o.rate_limit.requests_per_unit,
            unit: o.rate_limit.unit,
            unit_multiplier: o.rate_limit.unit_multiplier.unwrap_or(0),
            algorithm: o.rate_limit.algorithm.unwrap_or_default(),
            burst: o.rate_limit.burst.unwrap_or(0),
            failure_policy: o.rate_limit.failure_policy.unwrap_or_default(),
        }),
        expires_at_ms: o.expires_at_ms.unwrap_or(0),
    }
}

/// A rule from its `/rules` JSON view.
fn rule(view: &serde_json::Value) -> pb::AdminRule {
    let text = |field: &str| view[field].as_str().unwrap_or_default().to_owned();
    let number = |field: &str| view[field].as_u64().unwrap_or(0);
    pb::AdminRule {
        path: text("path"),
        source: text("source"),
        unlimited: view["unlimited"].as_bool().unwrap_or(false),
        algorithm: text("algorithm"),
        requests_per_unit: number("requests_per_unit"),
        unit: text("unit"),
        unit_multiplier: number("unit_multiplier"),
        burst: number("burst"),
        failure_policy: text("failure_policy"),
    }
}
