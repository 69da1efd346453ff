//! The lease table of one concurrency key, and every operation on a set of
//! them, as a pure function of (state, operation, limits, now).
//!
//! This is the specification: the memory store runs it under a lock, and
//! the Redis script (`leases.lua`) is its twin, tested against it on the
//! same sequences. A key holds:
//! - named leases (`Acquire`d with a lease id): permits, expiry and the
//!   fencing token they were granted with;
//! - anonymous slots, one permit each, taken by Envoy's positive hits;
//! - debts: one per permit Envoy was refused, each cancelling the negative
//!   hit Envoy sends for that refused request when its stream ends (Envoy
//!   sends it whether or not the request was admitted), so a refused request
//!   never frees a slot it never held.
//!
//! Everything expires: an entry whose expiry is at or before `now` is gone,
//! and purged on access. The fencing counter starts, for a key with no
//! state (never used, or dropped once idle: the memory store drops an empty
//! key, Redis lets an idle key's TTL run out), at `now_ms × 1000`, so tokens
//! keep increasing across that (as long as fewer than 1000 grants per
//! millisecond were made on average).

use std::collections::{BTreeMap, BTreeSet};

/// Most debts a key keeps: past it, a refused hit records none (memory per
/// key stays bounded; the cost is a negative hit that frees a slot early).
pub const MAX_DEBTS: usize = 10_000;

/// A named lease on one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// Permits held.
    pub permits: u64,
    /// When it expires (Unix ms).
    pub expires_at_ms: u64,
    /// The fencing token it was granted with.
    pub token: u64,
}

/// The state of one concurrency key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyState {
    /// Named leases by lease id.
    pub leases: BTreeMap<String, Holding>,
    /// Anonymous slots: (expiry ms, id).
    pub slots: BTreeSet<(u64, u64)>,
    /// Debts: (expiry ms, id).
    pub debts: BTreeSet<(u64, u64)>,
    /// The last fencing token or slot id handed out; 0 when the key has no
    /// state yet.
    pub fence: u64,
}

/// One operation over every key of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Take `permits` on every key under lease `id` for `ttl_ms`, all or
    /// nothing; a lease already held on every key is returned unchanged.
    Acquire {
        /// The lease id.
        id: String,
        /// Permits to take on each key.
        permits: u64,
        /// Lifetime of the lease.
        ttl_ms: u64,
    },
    /// Extend lease `id` to `now + ttl_ms` on every key.
    Renew {
        /// The lease id.
        id: String,
        /// New lifetime from now.
        ttl_ms: u64,
    },
    /// Drop lease `id` from every key.
    Release {
        /// The lease id.
        id: String,
    },
    /// Envoy's positive hit: `n` anonymous slots on every key for `ttl_ms`,
    /// all or nothing; refused, `n` debts on every key instead.
    Take {
        /// Slots to take.
        n: u64,
        /// Lifetime of the slots (and of the debts).
        ttl_ms: u64,
    },
    /// Envoy's negative hit: per key, `n` times, cancel a debt or else free
    /// the soonest-expiring slot; never below zero, never a named lease.
    Free {
        /// Slots to free.
        n: u64,
    },
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Acquire/Take granted, or Renew done.
    Granted = 1,
    /// Acquire/Take refused: some key lacks room.
    Denied = 2,
    /// Renew of a lease that is gone (released or expired).
    NotFound = 3,
    /// Release removed the lease; Free done.
    Released = 4,
    /// Release of a lease that was not held.
    AlreadyReleased = 5,
}

/// What an operation answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// How it ended.
    pub code: Code,
    /// Granted/renewed: when the lease expires on its first-to-expire key
    /// (Unix ms); 0 otherwise.
    pub expires_at_ms: u64,
    /// Denied: how long until the longest-waiting denying key has had a
    /// holder expire (a worst-case hint, assuming nobody releases); `None`
    /// when a denying key holds nothing that could expire.
    pub retry_after_ms: Option<u64>,
    /// Per key, in order.
    pub keys: Vec<KeyReply>,
}

/// What an operation answers for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyReply {
    /// Permits held after the operation.
    pub in_use: u64,
    /// Granted or renewed: the lease's fencing token on this key; 0 otherwise.
    pub token: u64,
    /// Permits purged as expired by this operation.
    pub expired: u64,
}

// === impl KeyState ===

impl KeyState {
    /// Permits held: named leases plus anonymous slots.
    pub fn in_use(&self) -> u64 {
        self.leases.values().map(|h| h.permits).sum::<u64>() + self.slots.len() as u64
    }

    /// Whether nothing is held or owed (the state may be dropped).
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.slots.is_empty() && self.debts.is_empty()
    }

    /// Drops everything expired at `now`; the permits purged.
    pub fn purge(&mut self, now: u64) -> u64 {
        let mut purged = 0;
        self.leases.retain(|_, h| {
            let live = h.expires_at_ms > now;
            if !live {
                purged += h.permits;
            }
            live
        });
        let before = self.slots.len();
        self.slots.retain(|(expiry, _)| *expiry > now);
        purged += (before - self.slots.len()) as u64;
        self.debts.retain(|(expiry, _)| *expiry > now);
        purged
    }

    /// The next fencing token (or slot id).
    fn next_fence(&mut self, now: u64) -> u64 {
        if self.fence == 0 {
            self.fence = now.saturating_mul(1000);
        }
        self.fence += 1;
        self.fence
    }

    /// Time until the soonest holder expires, if any holds.
    fn soonest_expiry_in(&self, now: u64) -> Option<u64> {
        let lease = self.leases.values().map(|h| h.expires_at_ms).min();
        let slot = self.slots.first().map(|(expiry, _)| *expiry);
        lease.into_iter().chain(slot).min().map(|e| e - now)
    }
}

/// Applies `op` to `keys` (whose limits are `limits`) at `now`.
///
/// # Panics
///
/// When `keys` and `limits` differ in length (a caller bug).
pub fn apply(keys: &mut [KeyState], limits: &[u64], op: &Op, now: u64) -> Reply {
    assert_eq!(keys.len(), limits.len(), "one limit per key");
    let expired: Vec<u64> = keys.iter_mut().map(|k| k.purge(now)).collect();
    let mut reply = Reply {
        code: Code::Granted,
        expires_at_ms: 0,
        retry_after_ms: None,
        keys: Vec::new(),
    };
    let mut tokens = vec![0u64; keys.len()];
    match op {
        Op::Acquire {
            id,
            permits,
            ttl_ms,
        } => {
            let held: Vec<bool> = keys.iter().map(|k| k.leases.contains_key(id)).collect();
            let denied = denied(keys, limits, &held, *permits, now);
            if let Some(retry) = denied {
                reply.code = Code::Denied;
                reply.retry_after_ms = retry;
            } else {
                for (i, key) in keys.iter_mut().enumerate() {
                    if !held[i] {
                        let token = key.next_fence(now);
                        key.leases.insert(
                            id.clone(),
                            Holding {
                                permits: *permits,
                                expires_at_ms: now + ttl_ms,
                                token,
                            },
                        );
                    }
                    tokens[i] = key.leases[id].token;
                }
                reply.expires_at_ms = soonest_lease_expiry(keys, id);
            }
        }
        Op::Renew { id, ttl_ms } => {
            if keys.iter().all(|k| k.leases.contains_key(id)) {
                for (i, key) in keys.iter_mut().enumerate() {
                    let holding = key.leases.get_mut(id).expect("checked above");
                    holding.expires_at_ms = now + ttl_ms;
                    tokens[i] = holding.token;
                }
                reply.expires_at_ms = now + ttl_ms;
            } else {
                reply.code = Code::NotFound;
            }
        }
        Op::Release { id } => {
            let mut removed = false;
            for key in keys.iter_mut() {
                removed |= key.leases.remove(id).is_some();
            }
            reply.code = if removed {
                Code::Released
            } else {
                Code::AlreadyReleased
            };
        }
        Op::Take { n, ttl_ms } => {
            let held = vec![false; keys.len()];
            if let Some(retry) = denied(keys, limits, &held, *n, now) {
                reply.code = Code::Denied;
                reply.retry_after_ms = retry;
                for key in keys.iter_mut() {
                    for _ in 0..*n {
                        if key.debts.len() >= MAX_DEBTS {
                            break;
                        }
                        let id = key.next_fence(now);
                        key.debts.insert((now + ttl_ms, id));
                    }
                }
            } else {
                for key in keys.iter_mut() {
                    for _ in 0..*n {
                        let id = key.next_fence(now);
                        key.slots.insert((now + ttl_ms, id));
                    }
                }
                reply.expires_at_ms = now + ttl_ms;
            }
        }
        Op::Free { n } => {
            for key in keys.iter_mut() {
                for _ in 0..*n {
                    if key.debts.pop_first().is_none() && key.slots.pop_first().is_none() {
                        break;
                    }
                }
            }
            reply.code = Code::Released;
        }
    }
    reply.keys = keys
        .iter()
        .zip(tokens)
        .zip(expired)
        .map(|((key, token), expired)| KeyReply {
            in_use: key.in_use(),
            token,
            expired,
        })
        .collect();
    reply
}

/// `None` when every key not already `held` has room for `permits`; else
/// `Some(retry hint)`: the longest of the denying keys' waits for their
/// soonest holder to expire (`None` inside when one of them holds nothing
/// that could expire, so waiting cannot help).
fn denied(
    keys: &[KeyState],
    limits: &[u64],
    held: &[bool],
    permits: u64,
    now: u64,
) -> Option<Option<u64>> {
    let mut denied = false;
    let mut retry = Some(0u64);
    for ((key, limit), held) in keys.iter().zip(limits).zip(held) {
        if *held || key.in_use().saturating_add(permits) <= *limit {
            continue;
        }
        denied = true;
        let wait = if permits > *limit {
            None
        } else {
            key.soonest_expiry_in(now)
        };
        retry = match (retry, wait) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    denied.then_some(retry)
}

fn soonest_lease_expiry(keys: &[KeyState], id: &str) -> u64 {
    keys.iter()
        .filter_map(|k| k.leases.get(id).map(|h| h.expires_at_ms))
        .min()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquire(id: &str, permits: u64, ttl_ms: u64) -> Op {
        Op::Acquire {
            id: id.to_owned(),
            permits,
            ttl_ms,
        }
    }

    #[test]
    fn grants_up_to_the_limit_then_denies_with_a_hint() {
        let mut keys = vec![KeyState::default()];
        let a = apply(&mut keys, &[2], &acquire("a", 1, 1_000), 10);
        assert_eq!(a.code, Code::Granted);
        assert_eq!(a.expires_at_ms, 1_010);
        assert_eq!(a.keys[0].token, 10_001);
        let b = apply(&mut keys, &[2], &acquire("b", 1, 2_000), 20);
        assert_eq!(
            (b.code, b.keys[0].in_use, b.keys[0].token),
            (Code::Granted, 2, 10_002)
        );
        let c = apply(&mut keys, &[2], &acquire("c", 1, 1_000), 30);
        assert_eq!(c.code, Code::Denied);
        assert_eq!(c.retry_after_ms, Some(980));
        assert_eq!(c.keys[0].in_use, 2);
    }

    #[test]
    fn acquire_is_idempotent_by_lease_id() {
        let mut keys = vec![KeyState::default()];
        let first = apply(&mut keys, &[1], &acquire("a", 1, 1_000), 0);
        let again = apply(&mut keys, &[1], &acquire("a", 1, 1_000), 5);
        assert_eq!(again.code, Code::Granted);
        assert_eq!(again.expires_at_ms, first.expires_at_ms);
        assert_eq!(again.keys[0].token, first.keys[0].token);
        assert_eq!(again.keys[0].in_use, 1);
    }

    #[test]
    fn all_or_nothing_across_keys() {
        let mut keys = vec![KeyState::default(), KeyState::default()];
        apply(&mut keys[1..], &[1], &acquire("x", 1, 1_000), 0);
        let r = apply(&mut keys, &[5, 1], &acquire("a", 1, 1_000), 1);
        assert_eq!(r.code, Code::Denied);
        assert_eq!(keys[0].in_use(), 0, "nothing taken on the key with room");
    }

    #[test]
    fn expired_leases_free_their_permits_and_cannot_be_renewed() {
        let mut keys = vec![KeyState::default()];
        apply(&mut keys, &[1], &acquire("a", 1, 100), 0);
        let renew = Op::Renew {
            id: "a".to_owned(),
            ttl_ms: 100,
        };
        assert_eq!(apply(&mut keys, &[1], &renew, 50).expires_at_ms, 150);
        let late = apply(&mut keys, &[1], &renew, 150);
        assert_eq!(late.code, Code::NotFound);
        assert_eq!(late.keys[0].expired, 1);
        assert_eq!(
            apply(&mut keys, &[1], &acquire("b", 1, 100), 150).code,
            Code::Granted
        );
    }

    #[test]
    fn release_never_frees_another_holder() {
        let mut keys = vec![KeyState::default()];
        apply(&mut keys, &[2], &acquire("a", 1, 1_000), 0);
        let release = |id: &str| Op::Release { id: id.to_owned() };
        assert_eq!(
            apply(&mut keys, &[2], &release("b"), 1).code,
            Code::AlreadyReleased
        );
        assert_eq!(keys[0].in_use(), 1);
        assert_eq!(
            apply(&mut keys, &[2], &release("a"), 1).code,
            Code::Released
        );
        assert_eq!(
            apply(&mut keys, &[2], &release("a"), 1).code,
            Code::AlreadyReleased
        );
    }

    #[test]
    fn negative_hits_floor_at_zero_and_cancel_refusals_first() {
        let mut keys = vec![KeyState::default()];
        let take = Op::Take {
            n: 1,
            ttl_ms: 1_000,
        };
        let free = Op::Free { n: 1 };
        assert_eq!(apply(&mut keys, &[1], &free, 0).keys[0].in_use, 0);
        assert_eq!(apply(&mut keys, &[1], &take, 0).code, Code::Granted);
        // Refused: a debt, which the refused request's own negative cancels.
        assert_eq!(apply(&mut keys, &[1], &take, 1).code, Code::Denied);
        assert_eq!(apply(&mut keys, &[1], &free, 2).keys[0].in_use, 1);
        assert_eq!(apply(&mut keys, &[1], &free, 3).keys[0].in_use, 0);
        assert_eq!(
            apply(&mut keys, &[1], &Op::Free { n: 5 }, 4).keys[0].in_use,
            0
        );
        // A named lease is never freed by an anonymous negative hit.
        apply(&mut keys, &[1], &acquire("a", 1, 1_000), 5);
        assert_eq!(apply(&mut keys, &[1], &free, 6).keys[0].in_use, 1);
    }

    #[test]
    fn fencing_tokens_keep_increasing_after_the_key_empties() {
        let mut keys = vec![KeyState::default()];
        let first = apply(&mut keys, &[1], &acquire("a", 1, 10), 0).keys[0].token;
        let second = apply(&mut keys, &[1], &acquire("b", 1, 10), 100).keys[0].token;
        assert!(second > first, "{second} > {first}");
    }
}
