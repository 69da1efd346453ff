//! Hot reload: the rules path is re-read every `interval`, and a changed,
//! valid set of files replaces the rules atomically.
//!
//! Polling the files' content, rather than watching file-system events,
//! sees every way a config changes — an edit in place, an atomic rename in
//! the same directory, a Kubernetes ConfigMap's `..data` symlink swap —
//! with no event to miss. A change that does not load keeps the last good
//! rules in force, logs why, counts a failure and shows it on `/readyz`; it
//! is reported once, not on every poll, and the report clears as soon as the
//! files are back to the ones in force or a good change applies. Reading and
//! compiling run off the request threads, and a panic in either is a refused
//! change like any other: the process and its rules stay. Calls in flight
//! finish with the rules they started with, and counters survive: storage
//! keys do not depend on the config version, so an unchanged rule keeps
//! counting. The upstream mode may start with no rules in force (its first
//! config did not load); the first valid config found then applies.

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::config::{ConfigSnapshot, DomainFiles, DotFiles, read_snapshot_with};
use crate::limiter::Limiter;
use crate::metrics::ReloadResult;
use crate::rules::Rules;

/// Where the rules come from and how often to look.
#[derive(Debug, Clone)]
pub struct ReloadSettings {
    /// The rules file or directory.
    pub path: PathBuf,
    /// Time between two looks.
    pub interval: Duration,
    /// The files the serving rules were compiled from. Changes are judged
    /// against them, so a change made between loading the rules and the
    /// first look is still applied. `None` when no rules are in force yet:
    /// the first valid files found apply.
    pub loaded: Option<ConfigSnapshot>,
    /// What to do with a domain in several files (`--merge-domain-config`),
    /// as when the rules were first loaded.
    pub domain_files: DomainFiles,
    /// Whether names starting with `.` are read.
    pub dot_files: DotFiles,
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

/// What one look at the files found.
enum Look {
    /// The files are the ones the rules in force came from.
    InForce,
    /// The files are the ones already refused.
    StillRefused,
    /// A change that compiled.
    Changed(ConfigSnapshot, Rules),
    /// A change that did not load; the files, if they could be read.
    Refused(Option<ConfigSnapshot>, String),
}

/// Polls until `stop` resolves.
pub async fn watch(
    settings: ReloadSettings,
    limiter: Limiter,
    status: ReloadStatus,
    stop: impl Future<Output = ()>,
) {
    let mut in_force = settings.loaded.clone().map(Arc::new);
    let mut refused: Option<Arc<ConfigSnapshot>> = None;
    let dot_files = settings.dot_files;
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticker.tick() => {}
        }
        let (path, domain_files) = (settings.path.clone(), settings.domain_files);
        let (known, bad) = (in_force.clone(), refused.clone());
        let look = off_thread(move || {
            let snapshot = read_snapshot_with(&path, dot_files).map_err(|e| e.to_string())?;
            Ok(if known.is_some_and(|known| *known == snapshot) {
                Look::InForce
            } else if bad.is_some_and(|bad| *bad == snapshot) {
                Look::StillRefused
            } else {
                match snapshot.compile_with(domain_files) {
                    Ok(rules) => Look::Changed(snapshot, rules),
                    Err(error) => Look::Refused(Some(snapshot), error.to_string()),
                }
            })
        })
        .await
        .unwrap_or_else(|error| Look::Refused(None, error));
        match look {
            Look::InForce => {
                refused = None;
                if status.last_error.swap(None).is_some() {
                    tracing::info!(path = %settings.path.display(), "config is back to the rules in force");
                }
            }
            Look::StillRefused => {}
            Look::Changed(snapshot, rules) => {
                limiter.replace_rules(rules);
                in_force = Some(Arc::new(snapshot));
                refused = None;
                status.last_error.store(None);
                limiter.metrics().config_reload(ReloadResult::Success);
                tracing::info!(path = %settings.path.display(), "rules reloaded");
            }
            Look::Refused(snapshot, message) => {
                refused = snapshot.map(Arc::new);
                // A file that stays unreadable fails every poll: say it once.
                if status.last_error().as_deref() != Some(&message) {
                    limiter.metrics().config_reload(ReloadResult::Failure);
                    if in_force.is_some() {
                        tracing::warn!(error = %message, "config change refused; the last good rules stay in force");
                    } else {
                        tracing::error!(error = %message, "config refused; no rules are loaded, so every call fails with 'no rate limit configuration loaded' until a valid config loads");
                    }
                    status.last_error.store(Some(Arc::new(message)));
                }
            }
        }
    }
}

/// Runs blocking work (file reads, compiling) on the blocking pool; a panic
/// in it comes back as an error naming it, never as a crash.
async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => Err(format!(
            "internal error while loading the rules (a bug; please report it): {}",
            panic_message(error.into_panic().as_ref())
        )),
        Err(error) => Err(format!("loading the rules was cancelled: {error}")),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_while_loading_is_an_error_not_a_crash() {
        let error = off_thread::<()>(|| panic!("compiler bug"))
            .await
            .unwrap_err();
        assert!(error.contains("compiler bug"), "{error}");
        let error = off_thread::<()>(|| panic!("{}", String::from("formatted")))
            .await
            .unwrap_err();
        assert!(error.contains("formatted"), "{error}");
        assert_eq!(off_thread(|| Ok(7)).await, Ok(7));
    }
}
