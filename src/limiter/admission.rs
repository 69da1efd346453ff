//! Load shedding: at most `max` requests are decided at once; one more is
//! refused at once with [`Error::Overloaded`] (gRPC `RESOURCE_EXHAUSTED`,
//! counted as `decision="shed"`) instead of queueing behind the others.
//!
//! A saturated server therefore answers every request promptly — decided,
//! or refused with a status the gateway's failure mode handles — rather
//! than letting latency pile up past the gateway's own timeout, where every
//! request would fail late.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::Error;

/// Default cap on requests decided at once: on one core at ~10 µs a
/// decision, 4,096 queued requests are ~40 ms of work, past which an Envoy
/// (20 ms timeout by default) would give up on them anyway.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4_096;

/// The requests being decided, shared by every clone of a limiter.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    in_flight: Arc<AtomicUsize>,
    max: usize,
}

/// A request's place among those in flight, given back on drop.
#[derive(Debug)]
pub(crate) struct Admitted(Arc<AtomicUsize>);

impl Admission {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            in_flight: Arc::new(AtomicUsize::new(0)),
            max: max.max(1),
        }
    }

    /// A place for one more request, unless `max` are in flight.
    pub(crate) fn admit(&self) -> Result<Admitted, Error> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let admitted = Admitted(self.in_flight.clone());
        if before >= self.max {
            return Err(Error::Overloaded { max: self.max });
        }
        Ok(admitted)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_cap_and_frees_places_on_drop() {
        let admission = Admission::new(2);
        let first = admission.admit().unwrap();
        let _second = admission.admit().unwrap();
        assert!(matches!(
            admission.admit(),
            Err(Error::Overloaded { max: 2 })
        ));
        drop(first);
        assert!(admission.admit().is_ok());
    }
}
