//! The loop that keeps an instance's overrides current: every interval, one
//! read of the backend's version (a `GET` in Redis); a full load only when it
//! moved. A change, or a reset anywhere, also empties the instance's
//! over-limit cache. So a write is in force on every instance within one
//! interval plus one load (documented as the propagation bound).

use std::future::Future;
use std::time::Duration;

use crate::limiter::Limiter;

/// Default poll interval (`--overrides-poll-interval`).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Polls until `stop` resolves. Failures are logged once when they start and
/// once when they end; the set in force stays meanwhile.
pub async fn watch(limiter: Limiter, interval: Duration, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticks.tick() => {}
        }
        match limiter.refresh_overrides().await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("overrides store answers again");
            }
            Ok(_) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "cannot refresh overrides; the last ones loaded stay in force");
            }
            Err(_) => {}
        }
    }
}
