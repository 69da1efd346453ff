//! One lease operation with the failure policy applied: what both surfaces
//! (the `Leases` API and Envoy's negative hits) call.
//!
//! The store comes from the counter store ([`CounterStore::leases`]); when
//! the store fails, the service's `--failure-policy` answers as it does for
//! counting rules: `error` fails the call (`UNAVAILABLE`), `allow` grants
//! without recording anything, `deny` refuses (a Renew then reads as gone),
//! `local` applies the operation to this instance's own lease tables.
//! Release is never faked: under `allow` or `deny` its failure is an error,
//! so the caller retries it.
//!
//! [`CounterStore::leases`]: crate::store::CounterStore::leases

use std::sync::Arc;

use super::table::{Code, KeyReply, Op, Reply};
use super::{LeaseKey, LeaseStore, MemoryLeases};
use crate::clock::{Clock, SystemClock};
use crate::error::Error;
use crate::failure_policy::FailurePolicy;
use crate::limiter::Limiter;
use crate::store::StoreError;

/// Lease operations over a limiter's store, with its failure policy.
#[derive(Debug, Clone)]
pub struct LeaseEngine {
    limiter: Limiter,
    store: Option<Arc<dyn LeaseStore>>,
    /// The `local` failure policy's tables.
    local: MemoryLeases,
    clock: Arc<dyn Clock>,
}

// === impl LeaseEngine ===

impl LeaseEngine {
    /// The engine of `limiter`'s store.
    pub fn new(limiter: Limiter) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        Self {
            store: limiter.store().leases(),
            local: MemoryLeases::new(clock.clone()),
            limiter,
            clock,
        }
    }

    /// Whether the store keeps leases at all.
    pub fn is_supported(&self) -> bool {
        self.store.is_some()
    }

    /// The limiter (rules, metrics).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Applies `op` to `keys`.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] when the store failed and the policy does not
    /// answer instead, or when the store keeps no leases.
    pub async fn apply(&self, keys: &[LeaseKey], op: &Op) -> Result<Reply, Error> {
        let Some(store) = &self.store else {
            return Err(Error::Storage(StoreError::Backend(format!(
                "concurrency rules are not supported on the {} store",
                self.limiter.store().backend()
            ))));
        };
        let error = match store.apply(keys, op).await {
            Ok(reply) if reply.keys.len() == keys.len() => return Ok(reply),
            Ok(reply) => StoreError::Protocol(format!(
                "{} key replies for {} keys",
                reply.keys.len(),
                keys.len()
            )),
            Err(error) => error,
        };
        tracing::debug!(%error, "lease store call failed");
        let policy = self.limiter.failure_policy();
        let answer = match (policy, op) {
            (FailurePolicy::Error, _) | (_, Op::Release { .. })
                if policy != FailurePolicy::Local =>
            {
                return Err(Error::Storage(error));
            }
            (FailurePolicy::Local, _) => self.local.apply_now(keys, op),
            (FailurePolicy::Allow, _) => self.pretend(keys, op, true),
            _ => self.pretend(keys, op, false),
        };
        self.limiter.metrics().degraded(policy);
        Ok(answer)
    }

    /// The answer of a store that grants (or refuses) everything and
    /// records nothing.
    fn pretend(&self, keys: &[LeaseKey], op: &Op, grant: bool) -> Reply {
        let now = self.clock.now_ms();
        let (code, ttl_ms) = match op {
            Op::Acquire { ttl_ms, .. } | Op::Take { ttl_ms, .. } | Op::Renew { ttl_ms, .. } => {
                let code = match (grant, op) {
                    (true, _) => Code::Granted,
                    (false, Op::Renew { .. }) => Code::NotFound,
                    (false, _) => Code::Denied,
                };
                (code, *ttl_ms)
            }
            Op::Free { .. } | Op::Release { .. } => (Code::Released, 0),
        };
        Reply {
            code,
            expires_at_ms: if code == Code::Granted {
                now + ttl_ms
            } else {
                0
            },
            retry_after_ms: None,
            keys: vec![
                KeyReply {
                    in_use: 0,
                    token: 0,
                    expired: 0,
                };
                keys.len()
            ],
        }
    }
}
