//! What to answer for a counted descriptor when the counter store fails:
//! set for the whole service (`--failure-policy`) and overridable per rule
//! (`rate_limit.failure_policy` in the YAML).

/// What to answer for counted descriptors when the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FailurePolicy {
    /// Fail the request (`UNAVAILABLE`), so the gateway's own failure mode
    /// decides (Envoy's `failure_mode_deny`).
    #[default]
    Error,
    /// Fail open: allow.
    Allow,
    /// Fail closed: deny.
    Deny,
    /// Count in this process's memory instead, per instance, until the store
    /// is back (the same rules and algorithms, limits no longer shared).
    Local,
}

impl FailurePolicy {
    /// Every policy, in the order the docs list them.
    pub const ALL: [FailurePolicy; 4] = [Self::Error, Self::Allow, Self::Deny, Self::Local];

    /// The name used in flags, YAML and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Local => "local",
        }
    }

    /// Parses a name as written in the YAML (case-sensitive, like the flag).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl std::fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for policy in FailurePolicy::ALL {
            assert_eq!(FailurePolicy::parse(policy.as_str()), Some(policy));
        }
        assert_eq!(FailurePolicy::parse("Allow"), None);
        assert_eq!(FailurePolicy::parse("open"), None);
    }
}
