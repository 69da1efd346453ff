//! `ratekeeper.v1.ReservationService/Settle`, and the checks of a reserving
//! `ShouldAllow` (its `reservation_ttl`).

use tonic::{Request, Response, Status};

use crate::api::RequestLimits;
use crate::api::validate::check_cost;
use crate::error::Error;
use crate::limiter::Limiter;
use crate::proto::ratekeeper::v1 as pb;

use super::SettleStatus;

/// Longest reservation id accepted (ours are at most 42 bytes).
pub const MAX_ID_BYTES: usize = 64;

/// The `ReservationService` gRPC service.
#[derive(Debug, Clone)]
pub struct SettleService {
    limiter: Limiter,
    limits: RequestLimits,
}

impl SettleService {
    /// A service settling through `limiter`'s store.
    pub fn new(limiter: Limiter, limits: RequestLimits) -> Self {
        Self { limiter, limits }
    }
}

#[tonic::async_trait]
impl pb::reservation_service_server::ReservationService for SettleService {
    async fn settle(
        &self,
        request: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let request = request.get_ref();
        self.limits.check_domain(&request.domain)?;
        let id = &request.reservation_id;
        if id.is_empty() {
            return Err(Error::invalid("reservation_id", "must not be empty").into());
        }
        if id.len() > MAX_ID_BYTES {
            return Err(Error::invalid(
                "reservation_id",
                format!("{} bytes; at most {MAX_ID_BYTES} are allowed", id.len()),
            )
            .into());
        }
        // Ours are `rsv-`, hex digits and a slot number: anything else never
        // names a reservation (nor reaches a storage key).
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(Error::invalid(
                "reservation_id",
                "not a reservation id: letters, digits and '-' only",
            )
            .into());
        }
        let actual = check_cost("actual_cost", request.actual_cost)?;
        let settled = self.limiter.settle(&request.domain, id, actual).await?;
        Ok(Response::new(pb::SettleResponse {
            status: match settled.status {
                SettleStatus::Settled => pb::SettleStatus::Settled,
                SettleStatus::AlreadySettled => pb::SettleStatus::AlreadySettled,
            }
            .into(),
            estimated_cost: settled.estimate,
            actual_cost: settled.actual,
        }))
    }
}

/// The reservation TTL a `ShouldAllow` asks for, in ms: `None` without
/// one.
///
/// # Errors
///
/// [`Error::InvalidRequest`] for `reservation_ttl`: not positive (under
/// 1 ms), malformed, or with `dry_run` (which charges nothing to reserve).
pub fn requested_ttl(request: &pb::ShouldAllowRequest) -> Result<Option<u64>, Error> {
    let Some(ttl) = &request.reservation_ttl else {
        return Ok(None);
    };
    let field = "reservation_ttl";
    if request.dry_run {
        return Err(Error::invalid(
            field,
            "a dry run charges nothing to reserve; send one or the other",
        ));
    }
    if !(0..1_000_000_000).contains(&ttl.nanos) || ttl.seconds < 0 {
        return Err(Error::invalid(
            field,
            "must be a positive, normalised duration",
        ));
    }
    let seconds = u64::try_from(ttl.seconds).unwrap_or(0);
    let nanos = u64::try_from(ttl.nanos).unwrap_or(0);
    let ms = seconds
        .saturating_mul(1_000)
        .saturating_add(nanos / 1_000_000);
    if ms == 0 {
        return Err(Error::invalid(field, "must be at least 1ms"));
    }
    Ok(Some(ms))
}
