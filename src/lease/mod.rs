//! Concurrency leases: caps on permits *held at once* rather than hits per
//! window (issue 15, part 1).
//!
//! A rule with `concurrency: N` ([`ConcurrencyLimit`]) admits at most N
//! permits at any instant. Services take them with the `ratekeeper.v1.Leases`
//! API ([`service`]): `Acquire` returns a lease id, an expiry and a fencing
//! token, `Renew` extends a live lease, `Release` gives it back; a holder
//! that dies frees its permits when its lease expires. Envoy, which has no
//! lease ids, takes anonymous slots with positive hits and frees them with
//! `is_negative_hits` ([`envoy`]).
//!
//! Every operation on every key of a request is one atomic step of a
//! [`LeaseStore`]: [`table`] is the pure specification, [`memory`] runs it
//! under a lock, [`redis`] runs its Lua twin in one script call.

pub mod engine;
pub mod envoy;
pub mod memory;
pub mod metrics;
pub mod redis;
pub mod service;
pub mod table;

use std::fmt;

use async_trait::async_trait;
use serde::Serialize;

pub use crate::rules::ConcurrencyLimit;
use crate::rules::Rule;
use crate::rules::key::{KEY_PREFIX, fnv1a, storage_key};
use crate::rules::matcher::EntryRef;
use crate::store::StoreError;
pub use engine::LeaseEngine;
pub use memory::MemoryLeases;
pub use redis::RedisLeases;
pub use table::{Code, KeyReply, Op, Reply};

/// Milliseconds every Redis key of a lease table outlives the longest lease
/// its rule allows, so a key never vanishes under a live entry.
pub const KEY_SLACK_MS: u64 = 60_000;

/// One concurrency key of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseKey {
    /// The storage key (injective, with a cluster hash tag).
    pub key: Vec<u8>,
    /// The rule's limit.
    pub limit: ConcurrencyLimit,
}

/// A backend that applies one lease operation to every key of a request in
/// one atomic step.
#[async_trait]
pub trait LeaseStore: Send + Sync + fmt::Debug {
    /// Applies `op` to `keys`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend failed or missed its deadline; then
    /// nothing is known about whether the operation took effect.
    async fn apply(&self, keys: &[LeaseKey], op: &Op) -> Result<Reply, StoreError>;

    /// Short backend name for logs and metrics.
    fn backend(&self) -> &'static str;
}

/// How `/rules` shows a concurrency rule.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ConcurrencyView {
    /// Permits held at once.
    pub max_in_flight: u64,
    /// Default lease TTL, in ms.
    pub lease_ttl_ms: u64,
    /// Longest lease TTL, in ms.
    pub max_lease_ttl_ms: u64,
}

// === impl ConcurrencyView ===

impl ConcurrencyView {
    /// The view of `limit`.
    pub fn of(limit: &ConcurrencyLimit) -> Self {
        Self {
            max_in_flight: limit.max_in_flight,
            lease_ttl_ms: limit.lease_ttl_ms,
            max_lease_ttl_ms: limit.max_lease_ttl_ms,
        }
    }
}

/// How `check-config` describes a concurrency rule.
pub fn describe(limit: &ConcurrencyLimit) -> String {
    let ms = |ms: u64| humantime::format_duration(std::time::Duration::from_millis(ms));
    format!(
        "{} held at once (concurrency; lease ttl {}, at most {})",
        limit.max_in_flight,
        ms(limit.lease_ttl_ms),
        ms(limit.max_lease_ttl_ms)
    )
}

/// The lease key of `rule` for one request descriptor. Leases always use
/// ratekeeper's key layout (upstream has no such state), with their own
/// algorithm tag so they never share a key with a counter. The hash tag is
/// the domain's, not the descriptor's: every concurrency key of a domain
/// lives on one Redis Cluster slot, so a request's grant across several
/// descriptors is one atomic script call there too (the price: one master
/// serves a domain's leases). The body after the tag keeps the key injective.
pub fn lease_key(domain: &str, entries: &[EntryRef<'_>], rule: &Rule) -> Option<LeaseKey> {
    let limit = *rule.concurrency()?;
    let counter_key = storage_key(domain, entries, rule, "lease", 0);
    // `rk4:{<tag>}:<body>`: the tag never holds a brace.
    let body_at = counter_key
        .windows(2)
        .position(|w| w == b"}:")
        .map_or(0, |at| at + 2);
    let mut key = format!("{KEY_PREFIX}{{lease-{:016x}}}:", fnv1a(domain.as_bytes())).into_bytes();
    key.extend_from_slice(&counter_key[body_at..]);
    Some(LeaseKey { key, limit })
}

/// The fewest TTL any of `keys`' rules allows for a request asking for
/// `requested_ms` (0: each rule's default).
pub fn clamp_ttl_ms(keys: &[LeaseKey], requested_ms: u64) -> u64 {
    keys.iter()
        .map(|k| k.limit.clamp_ttl_ms(requested_ms))
        .min()
        .unwrap_or(requested_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_rules_file;

    const RULES: &str = "domain: d\ndescriptors:\n  - key: a\n    concurrency: 1\n    lease_ttl: 1s\n  - key: b\n    concurrency: 1\n    lease_ttl: 1s\n";

    fn key(domain_rules: &str, domain: &str, entries: &[(&str, &str)]) -> Vec<u8> {
        let (_, tree) = parse_rules_file("r.yaml", domain_rules).unwrap();
        let entries: Vec<EntryRef<'_>> = entries
            .iter()
            .map(|(key, value)| EntryRef { key, value })
            .collect();
        lease_key(domain, &entries, tree.find(&entries).unwrap())
            .unwrap()
            .key
    }

    fn tag(key: &[u8]) -> &[u8] {
        let open = key.iter().position(|&b| b == b'{').unwrap();
        let close = key.iter().position(|&b| b == b'}').unwrap();
        &key[open..=close]
    }

    #[test]
    fn a_domains_lease_keys_share_one_tag_and_stay_distinct() {
        let a = key(RULES, "d", &[("a", "x")]);
        let a2 = key(RULES, "d", &[("a", "y")]);
        let b = key(RULES, "d", &[("b", "x")]);
        assert_eq!(tag(&a), tag(&b));
        assert_eq!(tag(&a), tag(&a2));
        assert_ne!(a, a2);
        assert_ne!(a, b);
        let other = RULES.replace("domain: d", "domain: e");
        assert_ne!(tag(&a), tag(&key(&other, "e", &[("a", "x")])));
        assert!(
            a.starts_with(b"rk4:{lease-"),
            "{}",
            String::from_utf8_lossy(&a)
        );
    }
}
