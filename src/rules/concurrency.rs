//! A concurrency rule's limit: how many permits may be held at once, and how
//! long a lease lives unless renewed.
//!
//! A counting rule admits so many hits per window; a concurrency rule admits
//! so many *held* permits at any instant, each taken by a lease that its
//! holder releases (or that expires, so a holder that dies frees its permits).
//! Pure: the TTL clamp is the only logic here.

/// The limit of a concurrency rule (`concurrency:` in the rules file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyLimit {
    /// Most permits held at once (at least 1).
    pub max_in_flight: u64,
    /// TTL of a lease whose request asks for none, and of an anonymous slot
    /// taken on Envoy's API, in milliseconds.
    pub lease_ttl_ms: u64,
    /// Longest TTL a lease may ask for, in milliseconds (at least
    /// `lease_ttl_ms`).
    pub max_lease_ttl_ms: u64,
}

// === impl ConcurrencyLimit ===

impl ConcurrencyLimit {
    /// The TTL a lease gets when it asks for `requested_ms` (0: the rule's
    /// default), clamped to the rule's maximum.
    pub fn clamp_ttl_ms(&self, requested_ms: u64) -> u64 {
        match requested_ms {
            0 => self.lease_ttl_ms,
            ms => ms.min(self.max_lease_ttl_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_defaults_and_clamps() {
        let limit = ConcurrencyLimit {
            max_in_flight: 3,
            lease_ttl_ms: 30_000,
            max_lease_ttl_ms: 60_000,
        };
        assert_eq!(limit.clamp_ttl_ms(0), 30_000);
        assert_eq!(limit.clamp_ttl_ms(5), 5);
        assert_eq!(limit.clamp_ttl_ms(90_000), 60_000);
    }
}
