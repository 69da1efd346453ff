//! One bucket of one stream: its demand, measured from the server's receive
//! times, and what was last sent for it.

use super::super::allocator::{self, Strategy};

/// Shortest interval a rate is measured over; shorter gaps (an Envoy's
/// immediate first report, a burst of messages) accumulate instead.
const MIN_MEASURE_MS: u64 = 200;

#[derive(Debug)]
pub(super) struct Subscription {
    /// The injective key in the registry.
    pub(super) encoded: String,
    /// Server receive time of the last measured report.
    pub(super) measured_ms: u64,
    /// Requests (allowed, denied) since then, when too soon to measure.
    pub(super) pending: (u64, u64),
    /// Smoothed demand, requests per second.
    pub(super) smoothed: Option<f64>,
    /// The demand the allocation uses (after the hysteresis band).
    pub(super) in_use: Option<f64>,
    /// Requests allowed per second, last measured.
    pub(super) allowed_rate: f64,
    /// Consecutive reports with no requests.
    pub(super) idle_reports: u32,
    /// The last strategy sent and when.
    pub(super) sent: Option<(Strategy, u64)>,
    /// The share that strategy grants, per second.
    pub(super) held: f64,
}

// === impl Subscription ===

impl Subscription {
    /// Takes a report's counts at `now_ms`: a new rate once enough time has
    /// passed since the last measurement (server receive times; Envoy's
    /// whole-second `time_elapsed` only when the receive times are too close).
    pub(super) fn measure(&mut self, (allowed, denied): (u64, u64), hint_ms: u64, now_ms: u64) {
        self.pending.0 = self.pending.0.saturating_add(allowed);
        self.pending.1 = self.pending.1.saturating_add(denied);
        if allowed == 0 && denied == 0 {
            self.idle_reports += 1;
        } else {
            self.idle_reports = 0;
        }
        let mut elapsed = now_ms.saturating_sub(self.measured_ms);
        if elapsed < MIN_MEASURE_MS {
            if hint_ms < MIN_MEASURE_MS {
                return;
            }
            elapsed = hint_ms;
        }
        let seconds = elapsed as f64 / 1_000.0;
        let (allowed, denied) = std::mem::take(&mut self.pending);
        let demand = (allowed.saturating_add(denied)) as f64 / seconds;
        self.allowed_rate = allowed as f64 / seconds;
        let smoothed = allocator::smoothed(self.smoothed, demand);
        self.smoothed = Some(smoothed);
        self.in_use = Some(allocator::settle(self.in_use, smoothed));
        self.measured_ms = now_ms;
    }

    /// Whether `strategy` must be sent: it differs from what was sent, or
    /// the TTL would run out before the report after next.
    pub(super) fn due(&self, strategy: Strategy, ttl_ms: u64, period_ms: u64, now_ms: u64) -> bool {
        match self.sent {
            None => true,
            Some((sent, at)) => {
                let refresh_after = ttl_ms.saturating_sub(2 * period_ms).min(ttl_ms / 2);
                sent != strategy || now_ms.saturating_sub(at) >= refresh_after
            }
        }
    }
}
