//! Where overrides are kept: [`MemoryOverrides`] in this process (one
//! instance's own), or [`super::redis::RedisOverrides`] in the shared Redis.
//! Every write bumps a version number; instances poll it and reload when it
//! moves. A counter reset bumps it too, so every instance forgets its
//! over-limit cache.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;

use super::model::Override;
use crate::store::StoreError;

/// What [`OverrideBackend::put`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// Stored: the new version and the override it replaced.
    Stored(u64, Option<Override>),
    /// Nothing written: the override is new and the store already holds
    /// the most it may, even after dropping the expired ones.
    Full,
}

/// A versioned map of overrides by id.
#[async_trait]
pub trait OverrideBackend: Send + Sync + fmt::Debug {
    /// The current version; it changes with every write and reset.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store cannot be read.
    async fn version(&self) -> Result<u64, StoreError>;

    /// The version and every override, read at one moment.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store cannot be read.
    async fn load(&self) -> Result<(u64, Vec<Override>), StoreError>;

    /// Stores `o` under its id, unless it is new and `max` overrides are
    /// stored already; overrides expired at `now_ms` are dropped first to
    /// make room (the check and the write are one atomic step, so
    /// concurrent writers never pass `max` together).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store cannot be written; nothing changed then.
    async fn put(&self, o: &Override, max: usize, now_ms: u64) -> Result<Put, StoreError>;

    /// Removes the override `id`; the new version and what was removed.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store cannot be written.
    async fn delete(&self, id: &str) -> Result<(u64, Option<Override>), StoreError>;

    /// Moves the version without changing an override (after a reset).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store cannot be written.
    async fn bump(&self) -> Result<u64, StoreError>;

    /// `memory` or `redis`, for logs and `/rules`.
    fn kind(&self) -> &'static str;
}

/// Overrides of this instance alone.
#[derive(Debug, Default)]
pub struct MemoryOverrides {
    /// A std mutex: held for one map operation, never across an await.
    inner: Mutex<(u64, BTreeMap<String, Override>)>,
}

impl MemoryOverrides {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<String, Override>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl OverrideBackend for MemoryOverrides {
    async fn version(&self) -> Result<u64, StoreError> {
        Ok(self.lock().0)
    }

    async fn load(&self) -> Result<(u64, Vec<Override>), StoreError> {
        let inner = self.lock();
        Ok((inner.0, inner.1.values().cloned().collect()))
    }

    async fn put(&self, o: &Override, max: usize, now_ms: u64) -> Result<Put, StoreError> {
        let mut inner = self.lock();
        let id = o.id();
        if !inner.1.contains_key(&id) && inner.1.len() >= max {
            inner.1.retain(|_, stored| !stored.expired(now_ms));
            if inner.1.len() >= max {
                return Ok(Put::Full);
            }
        }
        inner.0 += 1;
        let before = inner.1.insert(id, o.clone());
        Ok(Put::Stored(inner.0, before))
    }

    async fn delete(&self, id: &str) -> Result<(u64, Option<Override>), StoreError> {
        let mut inner = self.lock();
        inner.0 += 1;
        let before = inner.1.remove(id);
        Ok((inner.0, before))
    }

    async fn bump(&self) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        inner.0 += 1;
        Ok(inner.0)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
