//! The registry of one instance, in memory: enough when one ratekeeper holds
//! every stream. It starts learning, as after any state loss.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Claim, Exchange, Member, Registry, Report, Timing, claimable};
use crate::clock::Clock;
use crate::store::StoreError;

/// Subscribers in a map, timed by an injected clock.
#[derive(Debug)]
pub struct MemoryRegistry {
    clock: Arc<dyn Clock>,
    /// When the registry started: the learning period runs from here.
    born_ms: u64,
    /// A std `Mutex`: held for map updates only, never across an await.
    buckets: Mutex<HashMap<(String, String), HashMap<String, Entry>>>,
}

#[derive(Debug, Clone)]
struct Entry {
    demand: Option<f64>,
    allowed_rate: f64,
    held: f64,
    seen_ms: u64,
}

// === impl MemoryRegistry ===

impl MemoryRegistry {
    /// An empty registry reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        let born_ms = clock.now_ms();
        Self {
            clock,
            born_ms,
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn exchange(
        &self,
        domain: &str,
        member: &str,
        reports: &[Report],
        timing: Timing,
    ) -> Result<Exchange, StoreError> {
        let now = self.clock.now_ms();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut members = Vec::with_capacity(reports.len());
        for report in reports {
            let entries = buckets
                .entry((domain.to_owned(), report.bucket.clone()))
                .or_default();
            let held = report
                .held
                .unwrap_or_else(|| entries.get(member).map_or(0.0, |e| e.held));
            entries.insert(
                member.to_owned(),
                Entry {
                    demand: report.demand,
                    allowed_rate: report.allowed_rate,
                    held,
                    seen_ms: now,
                },
            );
            entries.retain(|_, e| now.saturating_sub(e.seen_ms) <= timing.stale_ms);
            let mut list: Vec<Member> = entries
                .iter()
                .map(|(id, e)| Member {
                    id: id.clone(),
                    demand: e.demand,
                    allowed_rate: e.allowed_rate,
                    held: e.held,
                })
                .collect();
            list.sort_by(|a, b| a.id.cmp(&b.id));
            members.push(list);
        }
        // Buckets whose members all went stale are dropped with them.
        buckets.retain(|_, entries| {
            entries.retain(|_, e| now.saturating_sub(e.seen_ms) <= timing.stale_ms);
            !entries.is_empty()
        });
        Ok(Exchange {
            members,
            learning: now.saturating_sub(self.born_ms) < timing.learning_ms,
        })
    }

    async fn hold(
        &self,
        domain: &str,
        member: &str,
        claims: &[Claim],
        _timing: Timing,
    ) -> Result<Vec<u64>, StoreError> {
        let now = self.clock.now_ms();
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut granted = Vec::with_capacity(claims.len());
        for claim in claims {
            let entries = map
                .entry((domain.to_owned(), claim.bucket.clone()))
                .or_default();
            let fill = claim.fill_seconds.max(1) as f64;
            let others: f64 = entries
                .iter()
                .filter(|(id, _)| id.as_str() != member)
                .map(|(_, e)| e.held * fill)
                .sum();
            let tokens = claimable(claim, others);
            entries
                .entry(member.to_owned())
                .or_insert(Entry {
                    demand: None,
                    allowed_rate: 0.0,
                    held: 0.0,
                    seen_ms: now,
                })
                .held = tokens as f64 / fill;
            granted.push(tokens);
        }
        Ok(granted)
    }

    async fn leave(
        &self,
        domain: &str,
        member: &str,
        buckets: &[String],
    ) -> Result<(), StoreError> {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        for bucket in buckets {
            let key = (domain.to_owned(), bucket.clone());
            if let Some(entries) = map.get_mut(&key) {
                entries.remove(member);
                if entries.is_empty() {
                    map.remove(&key);
                }
            }
        }
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const TIMING: Timing = Timing {
        stale_ms: 15_000,
        learning_ms: 15_000,
    };

    fn report(bucket: &str, demand: f64) -> Report {
        Report {
            bucket: bucket.to_owned(),
            demand: Some(demand),
            allowed_rate: demand,
            held: Some(demand),
        }
    }

    #[tokio::test]
    async fn members_meet_expire_and_leave() {
        let clock = Arc::new(ManualClock::new(1_000));
        let registry = MemoryRegistry::new(clock.clone());
        let one = registry
            .exchange("d", "a", &[report("b", 1.0)], TIMING)
            .await
            .unwrap();
        assert!(one.learning);
        assert_eq!(one.members[0].len(), 1);
        let two = registry
            .exchange("d", "b", &[report("b", 2.0), report("c", 3.0)], TIMING)
            .await
            .unwrap();
        assert_eq!(
            two.members[0]
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(two.members[1].len(), 1);
        // Another domain is another bucket.
        let other = registry
            .exchange("e", "x", &[report("b", 1.0)], TIMING)
            .await
            .unwrap();
        assert_eq!(other.members[0].len(), 1);
        // "a" goes stale; learning is over.
        clock.advance(15_001);
        let three = registry
            .exchange("d", "b", &[report("b", 2.0)], TIMING)
            .await
            .unwrap();
        assert!(!three.learning);
        assert_eq!(three.members[0].len(), 1);
        // A report that does not know what it holds keeps what is recorded.
        let kept = registry
            .exchange(
                "d",
                "b",
                &[Report {
                    held: None,
                    ..report("b", 5.0)
                }],
                TIMING,
            )
            .await
            .unwrap();
        assert_eq!(kept.members[0][0].held, 2.0);
        // Claims only get what the others leave.
        let claim = |wanted| Claim {
            bucket: "b".into(),
            wanted,
            pool: 10,
            fill_seconds: 1,
        };
        registry
            .exchange("d", "z", &[report("b", 1.0)], TIMING)
            .await
            .unwrap();
        // "b" holds 2 of the 10 tokens.
        assert_eq!(
            registry.hold("d", "z", &[claim(9)], TIMING).await.unwrap(),
            [8]
        );
        assert_eq!(
            registry.hold("d", "z", &[claim(3)], TIMING).await.unwrap(),
            [3]
        );
        registry.leave("d", "z", &["b".to_owned()]).await.unwrap();
        registry.leave("d", "b", &["b".to_owned()]).await.unwrap();
        let four = registry
            .exchange("d", "c", &[report("b", 2.0)], TIMING)
            .await
            .unwrap();
        assert_eq!(
            four.members[0]
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
    }
}
