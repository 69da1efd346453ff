//! `ratekeeper.v1.Leases`: Acquire, Renew and Release over the lease engine.
//!
//! Translates the wire messages (validating every field, with the same caps
//! as `ShouldAllow`), matches each descriptor against the domain's rules,
//! keeps those of concurrency rules (each key once, so a descriptor sent
//! twice cannot take its permits twice) and applies one operation to all of
//! them in one store call.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

use super::metrics;
use super::table::{Code, Op, Reply};
use super::{LeaseEngine, LeaseKey, clamp_ttl_ms, lease_key};
use crate::api::RequestLimits;
use crate::api::trace_context;
use crate::api::validate::check_cost;
use crate::error::Error;
use crate::limiter::Limiter;
use crate::proto::ratekeeper::v1 as pb;
use crate::proto::ratekeeper::v1::leases_server;
use crate::rules::Rule;

/// Longest caller-chosen lease id, in bytes.
pub const MAX_LEASE_ID_BYTES: usize = 128;

/// The `Leases` gRPC service.
#[derive(Debug, Clone)]
pub struct LeaseService {
    engine: LeaseEngine,
    limits: RequestLimits,
}

/// A request's concurrency keys: each distinct key once, with its rule, and
/// per request descriptor the index of its key (if it has one).
struct Matched {
    keys: Vec<LeaseKey>,
    rules: Vec<Arc<Rule>>,
    of_descriptor: Vec<Option<usize>>,
}

// === impl LeaseService ===

impl LeaseService {
    /// A service over `limiter`'s rules and store, refusing requests beyond
    /// `limits`.
    pub fn new(limiter: Limiter, limits: RequestLimits) -> Self {
        Self {
            engine: LeaseEngine::new(limiter),
            limits,
        }
    }

    /// Validates the domain and descriptors and finds their concurrency keys.
    fn matched(&self, domain: &str, descriptors: &[pb::Descriptor]) -> Result<Matched, Status> {
        if !self.engine.is_supported() {
            return Err(Status::unimplemented(format!(
                "concurrency leases are not supported on the {} store; use memory or redis",
                self.engine.limiter().store().backend()
            )));
        }
        self.limits.check_domain(domain)?;
        self.limits.check_descriptor_count(descriptors.len())?;
        let rules = self.engine.limiter().rules();
        if !rules.is_loaded() {
            return Err(Error::NoConfig.into());
        }
        let tree = rules.domain(domain);
        let mut matched = Matched {
            keys: Vec::new(),
            rules: Vec::new(),
            of_descriptor: Vec::with_capacity(descriptors.len()),
        };
        let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
        for (d, descriptor) in descriptors.iter().enumerate() {
            let entries = self.limits.entries(
                d,
                descriptor
                    .entries
                    .iter()
                    .map(|e| (e.key.as_str(), e.value.as_str())),
                1,
            )?;
            let found = tree
                .and_then(|tree| tree.find(&entries))
                .and_then(|rule| Some((rule.clone(), lease_key(domain, &entries, rule)?)));
            let index = found.map(|(rule, key)| {
                *seen.entry(key.key.clone()).or_insert_with(|| {
                    matched.keys.push(key);
                    matched.rules.push(rule);
                    matched.keys.len() - 1
                })
            });
            matched.of_descriptor.push(index);
        }
        if matched.keys.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no descriptor matches a concurrency rule in domain '{domain}'"
            )));
        }
        Ok(matched)
    }

    async fn apply(&self, domain: &str, matched: &Matched, op: &Op) -> Result<Reply, Status> {
        let reply = self.engine.apply(&matched.keys, op).await?;
        let rules: Vec<&Rule> = matched.rules.iter().map(|r| r.as_ref()).collect();
        metrics::record(
            self.engine.limiter().metrics(),
            "leases",
            domain,
            &rules,
            &reply,
        );
        Ok(reply)
    }
}

impl LeaseService {
    async fn acquire_lease(
        &self,
        request: pb::AcquireRequest,
    ) -> Result<pb::AcquireResponse, Status> {
        let matched = self.matched(&request.domain, &request.descriptors)?;
        let permits = check_cost("permits", request.permits.max(1))?;
        let ttl_ms = clamp_ttl_ms(&matched.keys, ttl_ms("ttl", request.ttl)?);
        let lease_id = match request.lease_id.as_str() {
            "" => new_lease_id(),
            id => check_lease_id(id)?.to_owned(),
        };
        let op = Op::Acquire {
            id: lease_id.clone(),
            permits,
            ttl_ms,
        };
        let reply = self.apply(&request.domain, &matched, &op).await?;
        let granted = reply.code == Code::Granted;
        // The tightest key: least room left.
        let tightest = (0..matched.keys.len())
            .min_by_key(|&i| {
                matched.keys[i]
                    .limit
                    .max_in_flight
                    .saturating_sub(reply.keys[i].in_use)
            })
            .unwrap_or(0);
        let first = matched
            .of_descriptor
            .iter()
            .flatten()
            .next()
            .copied()
            .unwrap_or(0);
        Span::current().record("granted", granted);
        Ok(pb::AcquireResponse {
            granted,
            lease_id,
            expires_at: granted.then(|| timestamp(reply.expires_at_ms)),
            limit: matched.keys[tightest].limit.max_in_flight,
            in_use: reply.keys[tightest].in_use,
            retry_after: reply
                .retry_after_ms
                .filter(|_| !granted)
                .map(|ms| duration(Duration::from_millis(ms))),
            fencing_token: reply.keys[first].token,
            statuses: statuses(&matched, &reply),
        })
    }

    async fn renew_lease(&self, request: pb::RenewRequest) -> Result<pb::RenewResponse, Status> {
        let matched = self.matched(&request.domain, &request.descriptors)?;
        let id = required_lease_id(&request.lease_id)?;
        let ttl_ms = clamp_ttl_ms(&matched.keys, ttl_ms("ttl", request.ttl)?);
        let op = Op::Renew {
            id: id.to_owned(),
            ttl_ms,
        };
        let reply = self.apply(&request.domain, &matched, &op).await?;
        if reply.code != Code::Granted {
            return Err(Status::not_found(format!(
                "lease '{id}' is not held: it expired or was released"
            )));
        }
        let first = matched
            .of_descriptor
            .iter()
            .flatten()
            .next()
            .copied()
            .unwrap_or(0);
        Ok(pb::RenewResponse {
            expires_at: Some(timestamp(reply.expires_at_ms)),
            fencing_token: reply.keys[first].token,
        })
    }

    async fn release_lease(
        &self,
        request: pb::ReleaseRequest,
    ) -> Result<pb::ReleaseResponse, Status> {
        let matched = self.matched(&request.domain, &request.descriptors)?;
        let id = required_lease_id(&request.lease_id)?;
        let op = Op::Release { id: id.to_owned() };
        let reply = self.apply(&request.domain, &matched, &op).await?;
        let status = match reply.code {
            Code::Released => pb::ReleaseStatus::Released,
            _ => pb::ReleaseStatus::AlreadyReleased,
        };
        Span::current().record("released", status == pb::ReleaseStatus::Released);
        Ok(pb::ReleaseResponse {
            status: status.into(),
        })
    }
}

/// Each RPC in its span (a child of the caller's trace when it sends one).
#[tonic::async_trait]
impl leases_server::Leases for LeaseService {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let span = trace_context::rpc_span(request.metadata(), || {
            tracing::debug_span!(
                "Acquire",
                domain = %request.get_ref().domain,
                granted = Empty,
                trace_id = Empty,
            )
        });
        let request = request.into_inner();
        self.acquire_lease(request)
            .instrument(span)
            .await
            .map(Response::new)
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let span = trace_context::rpc_span(
            request.metadata(),
            || tracing::debug_span!("Renew", domain = %request.get_ref().domain, trace_id = Empty),
        );
        let request = request.into_inner();
        self.renew_lease(request)
            .instrument(span)
            .await
            .map(Response::new)
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let span = trace_context::rpc_span(request.metadata(), || {
            tracing::debug_span!(
                "Release",
                domain = %request.get_ref().domain,
                released = Empty,
                trace_id = Empty,
            )
        });
        let request = request.into_inner();
        self.release_lease(request)
            .instrument(span)
            .await
            .map(Response::new)
    }
}

fn statuses(matched: &Matched, reply: &Reply) -> Vec<pb::LeaseStatus> {
    matched
        .of_descriptor
        .iter()
        .map(|index| match index {
            None => pb::LeaseStatus::default(),
            Some(i) => pb::LeaseStatus {
                concurrency: true,
                limit: matched.keys[*i].limit.max_in_flight,
                in_use: reply.keys[*i].in_use,
                fencing_token: reply.keys[*i].token,
            },
        })
        .collect()
}

/// A requested TTL in ms; absent means 0 (the rule's default).
fn ttl_ms(field: &str, ttl: Option<prost_types::Duration>) -> Result<u64, Error> {
    let Some(ttl) = ttl else { return Ok(0) };
    if ttl.seconds < 0 || ttl.nanos < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    let ms = u64::try_from(ttl.seconds)
        .unwrap_or(u64::MAX)
        .saturating_mul(1_000)
        .saturating_add(u64::try_from(ttl.nanos).unwrap_or(0).div_ceil(1_000_000));
    Ok(ms)
}

fn check_lease_id(id: &str) -> Result<&str, Error> {
    if id.len() > MAX_LEASE_ID_BYTES {
        return Err(Error::invalid(
            "lease_id",
            format!(
                "{} bytes; at most {MAX_LEASE_ID_BYTES} are allowed",
                id.len()
            ),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::invalid(
            "lease_id",
            "must not contain control characters",
        ));
    }
    Ok(id)
}

fn required_lease_id(id: &str) -> Result<&str, Error> {
    if id.is_empty() {
        return Err(Error::invalid("lease_id", "must not be empty"));
    }
    check_lease_id(id)
}

/// A fresh lease id: 128 random bits in hex (unguessable enough that one
/// caller cannot release another's lease by guessing).
fn new_lease_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

fn timestamp(unix_ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(unix_ms / 1_000).unwrap_or(i64::MAX),
        nanos: i32::try_from((unix_ms % 1_000) * 1_000_000).unwrap_or(0),
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
