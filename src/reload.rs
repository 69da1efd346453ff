//! Hot reload: the rules path is re-read every `interval`, and a changed,
//! valid set of files replaces the rules atomically.
//!
//! Polling the files' content, rather than watching file-system events,
//! sees every way a config changes — an edit in place, an atomic rename in
//! the same directory, a Kubernetes ConfigMap's `..data` symlink swap —
//! with no event to miss. A change that does not load keeps the last good
//! rules in force, logs why, counts a failure and shows it on `/readyz`; it
//! is reported once, not on every poll. Calls in flight finish with the
//! rules they started with, and counters survive: storage keys do not depend
//! on the config version, so an unchanged rule keeps counting.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::config::{ConfigSnapshot, read_snapshot};
use crate::limiter::Limiter;
use crate::metrics::ReloadResult;

/// Where the rules come from and how often to look.
#[derive(Debug, Clone)]
pub struct ReloadSettings {
    /// The rules file or directory.
    pub path: PathBuf,
    /// Time between two looks.
    pub interval: Duration,
    /// The files the serving rules were compiled from. Changes are judged
    /// against them, so a change made between loading the rules and the
    /// first look is still applied.
    pub loaded: ConfigSnapshot,
}

/// The outcome of the last reload attempt, for `/readyz`.
#[derive(Debug, Default, Clone)]
pub struct ReloadStatus {
    last_error: Arc<ArcSwapOption<String>>,
}

impl ReloadStatus {
    /// Why the last changed config was refused, while it stays refused.
    pub fn last_error(&self) -> Option<Arc<String>> {
        self.last_error.load_full()
    }
}

/// Polls until `stop` resolves.
pub async fn watch(
    settings: ReloadSettings,
    limiter: Limiter,
    status: ReloadStatus,
    stop: impl Future<Output = ()>,
) {
    let mut last = settings.loaded.clone();
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticker.tick() => {}
        }
        let path = settings.path.clone();
        // File reads are blocking; keep them off the request threads.
        let Ok(read) = tokio::task::spawn_blocking(move || read_snapshot(&path)).await else {
            continue;
        };
        let outcome = match read {
            Ok(snapshot) if snapshot == last => continue,
            Ok(snapshot) => {
                let compiled = snapshot.compile();
                last = snapshot;
                compiled
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok(rules) => {
                limiter.replace_rules(rules);
                status.last_error.store(None);
                limiter.metrics().config_reload(ReloadResult::Success);
                tracing::info!(path = %settings.path.display(), "rules reloaded");
            }
            Err(error) => {
                let message = error.to_string();
                // A file that stays unreadable fails every poll: say it once.
                if status.last_error().as_deref() != Some(&message) {
                    limiter.metrics().config_reload(ReloadResult::Failure);
                    tracing::warn!(%error, "config change refused; the last good rules stay in force");
                    status.last_error.store(Some(Arc::new(message)));
                }
            }
        }
    }
}
