//! Runtime overrides: a limit for one domain and descriptor (exact values,
//! or key-only levels) that replaces the rules file's without a redeploy.
//!
//! Precedence on every request: a limit the request itself carries (Envoy's
//! per-descriptor `limit`), then a stored override, then the YAML rule. The
//! request path pays nothing for this: the overrides in force are an
//! immutable [`OverrideSet`] behind an `ArcSwap`, compiled by the rules
//! loader into the same lookup trees as the YAML ([`compile`]). The set is
//! refreshed from its [`OverrideBackend`] when the backend's version moves
//! (polled by [`refresh::watch`]) or when a timed override expires. With the
//! memory store the overrides are this instance's own; with Redis they live
//! in Redis ([`redis`]) and every instance sees a write within one poll
//! interval.

pub mod backend;
pub mod compile;
pub mod model;
pub mod redis;
pub mod refresh;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

pub use backend::{MemoryOverrides, OverrideBackend, Put};
pub use model::{EntrySpec, LimitSpec, Override, id_of};
pub use redis::RedisOverrides;

use crate::clock::{Clock, SystemClock};
use crate::rules::matcher::EntryRef;
use crate::rules::{DescriptorTree, Rule};
use crate::store::StoreError;

/// The most overrides stored unless `--max-overrides` says otherwise.
pub const DEFAULT_MAX_OVERRIDES: usize = 10_000;

/// The overrides in force at one moment, compiled.
#[derive(Debug, Default)]
pub struct OverrideSet {
    /// In force (not expired), by id order.
    list: Vec<Override>,
    trees: HashMap<String, DescriptorTree>,
    /// The backend version this set was loaded at.
    version: u64,
    /// When the next timed override expires (Unix ms).
    next_expiry_ms: Option<u64>,
}

/// The handle the limiter and the admin API share: the set in force and the
/// backend it is loaded from. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Overrides {
    current: Arc<ArcSwap<OverrideSet>>,
    backend: Arc<dyn OverrideBackend>,
    clock: Arc<dyn Clock>,
    /// The last load, expired entries included, to rebuild the set when one
    /// expires without asking the backend again.
    loaded: Arc<Mutex<(u64, Vec<Override>)>>,
    /// The most overrides the backend may hold (`--max-overrides`).
    max: usize,
    /// One load at a time: the poll and an admin write reloading at once
    /// could otherwise install an older read after a newer one. A tokio
    /// mutex: held across the backend call.
    loading: Arc<tokio::sync::Mutex<()>>,
}

// === impl OverrideSet ===

impl OverrideSet {
    /// Compiles the overrides of `all` still in force at `now_ms`. An entry
    /// that no longer compiles (its rules changed shape under it, or another
    /// writer stored it) is left out and logged; the others apply.
    fn build(version: u64, mut all: Vec<Override>, now_ms: u64) -> Self {
        all.retain(|o| !o.expired(now_ms));
        all.sort_by_key(Override::id);
        let trees = compile::trees(&all).unwrap_or_else(|_| {
            let valid: Vec<Override> = all
                .iter()
                .filter(|o| match compile::validate(o) {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::warn!(id = %o.id(), %error, "invalid override skipped");
                        false
                    }
                })
                .cloned()
                .collect();
            compile::trees(&valid).unwrap_or_default()
        });
        let next_expiry_ms = all.iter().filter_map(|o| o.expires_at_ms).min();
        Self {
            list: all,
            trees,
            version,
            next_expiry_ms,
        }
    }

    /// The override rule for a request descriptor, if one applies.
    pub fn find(&self, domain: &str, entries: &[EntryRef<'_>]) -> Option<&Arc<Rule>> {
        if self.trees.is_empty() {
            return None;
        }
        self.trees.get(domain)?.find(entries)
    }

    /// The rules made from the overrides in force, by domain (for `/rules`).
    pub fn rules(&self) -> Vec<(&str, Arc<Rule>)> {
        let mut domains: Vec<_> = self.trees.iter().collect();
        domains.sort_by_key(|(domain, _)| *domain);
        let mut all = Vec::new();
        for (domain, tree) in domains {
            let mut rules = Vec::new();
            tree.collect_rules(&mut rules);
            all.extend(rules.into_iter().map(|rule| (domain.as_str(), rule)));
        }
        all
    }

    /// The overrides in force.
    pub fn list(&self) -> &[Override] {
        &self.list
    }

    /// The backend version this set was loaded at.
    pub fn version(&self) -> u64 {
        self.version
    }
}

// === impl Overrides ===

impl Overrides {
    /// Overrides kept in `backend`, expiring by `clock`.
    pub fn new(backend: Arc<dyn OverrideBackend>, clock: Arc<dyn Clock>) -> Self {
        Self {
            current: Arc::default(),
            backend,
            clock,
            loaded: Arc::default(),
            loading: Arc::default(),
            max: DEFAULT_MAX_OVERRIDES,
        }
    }

    /// Holds at most `max` overrides: a new one past it is refused (each
    /// override is a lookup entry and a metrics series on every instance).
    #[must_use]
    pub fn with_max(mut self, max: usize) -> Self {
        self.max = max;
        self
    }

    /// The most overrides the backend may hold.
    pub fn max(&self) -> usize {
        self.max
    }

    /// This instance's own overrides, in memory.
    pub fn memory() -> Self {
        Self::new(Arc::new(MemoryOverrides::default()), Arc::new(SystemClock))
    }

    /// The set in force now.
    pub fn current(&self) -> arc_swap::Guard<Arc<OverrideSet>> {
        self.current.load()
    }

    /// The backend the overrides are kept in.
    pub fn backend(&self) -> &Arc<dyn OverrideBackend> {
        &self.backend
    }

    /// The time, as expiries are judged.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Loads every override from the backend and puts the set in force.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be read; the set in force stays.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.loading.lock().await;
        self.load_and_install().await
    }

    async fn load_and_install(&self) -> Result<(), StoreError> {
        let (version, all) = self.backend.load().await?;
        self.install(version, all);
        Ok(())
    }

    /// Reloads when the backend's version moved, or rebuilds when a timed
    /// override expired. Says whether the set in force changed (or a reset
    /// happened elsewhere: the version moved).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be read; the set in force stays.
    pub async fn refresh(&self) -> Result<bool, StoreError> {
        let _one_at_a_time = self.loading.lock().await;
        let version = self.backend.version().await?;
        let (seen, expired) = {
            let current = self.current.load();
            let expired = current
                .next_expiry_ms
                .is_some_and(|at| at <= self.clock.now_ms());
            (current.version, expired)
        };
        if version != seen {
            self.load_and_install().await?;
            return Ok(true);
        }
        if expired {
            let (version, all) = self.loaded_copy();
            self.install(version, all);
            return Ok(true);
        }
        Ok(false)
    }

    fn loaded_copy(&self) -> (u64, Vec<Override>) {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn install(&self, version: u64, all: Vec<Override>) {
        let set = OverrideSet::build(version, all.clone(), self.clock.now_ms());
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = (version, all);
        self.current.store(Arc::new(set));
    }
}

impl Default for Overrides {
    fn default() -> Self {
        Self::memory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn timed(value: &str, expires_at_ms: Option<u64>) -> Override {
        Override {
            domain: "api".to_owned(),
            descriptor: vec![EntrySpec {
                key: "tenant".to_owned(),
                value: Some(value.to_owned()),
            }],
            rate_limit: LimitSpec {
                requests_per_unit: 5,
                unit: "second".to_owned(),
                unit_multiplier: None,
                algorithm: None,
                burst: None,
                failure_policy: None,
            },
            expires_at_ms,
        }
    }

    #[tokio::test]
    async fn a_timed_override_leaves_the_set_when_it_expires() {
        let clock = Arc::new(ManualClock::new(1_000));
        let overrides = Overrides::new(Arc::new(MemoryOverrides::default()), clock.clone());
        overrides
            .backend()
            .put(&timed("a", Some(1_500)), 10, 1_000)
            .await
            .unwrap();
        overrides
            .backend()
            .put(&timed("b", None), 10, 1_000)
            .await
            .unwrap();
        assert!(overrides.refresh().await.unwrap());
        let entries = |v: &'static str| {
            [EntryRef {
                key: "tenant",
                value: v,
            }]
        };
        assert!(overrides.current().find("api", &entries("a")).is_some());
        assert!(!overrides.refresh().await.unwrap(), "nothing changed");
        clock.advance(500);
        assert!(overrides.refresh().await.unwrap());
        assert!(overrides.current().find("api", &entries("a")).is_none());
        assert!(overrides.current().find("api", &entries("b")).is_some());
        assert_eq!(overrides.current().list().len(), 1);
    }

    #[tokio::test]
    async fn a_full_store_refuses_a_new_override_until_one_expires() {
        let backend = MemoryOverrides::default();
        let stored = |put: Put| matches!(put, Put::Stored(..));
        assert!(stored(
            backend
                .put(&timed("a", Some(1_500)), 2, 1_000)
                .await
                .unwrap()
        ));
        assert!(stored(
            backend.put(&timed("b", None), 2, 1_000).await.unwrap()
        ));
        // Full: a new one is refused and nothing changes...
        assert_eq!(
            backend.put(&timed("c", None), 2, 1_000).await.unwrap(),
            Put::Full
        );
        assert_eq!(backend.version().await.unwrap(), 2);
        // ...but a stored one may still change.
        assert!(stored(
            backend
                .put(&timed("b", Some(9_000)), 2, 1_000)
                .await
                .unwrap()
        ));
        // Once `a` has expired it makes room.
        assert!(stored(
            backend.put(&timed("c", None), 2, 1_500).await.unwrap()
        ));
        let (_, all) = backend.load().await.unwrap();
        let mut ids: Vec<_> = all.iter().map(|o| o.descriptor[0].value.clone()).collect();
        ids.sort();
        assert_eq!(ids, [Some("b".to_owned()), Some("c".to_owned())]);
    }
}
