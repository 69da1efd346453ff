//! One Redis endpoint — a single server, the master the sentinels name, or
//! one master of a cluster — as a few [`Lane`]s that concurrent requests
//! share round-robin, pipelined.
//!
//! A request takes the next lane with a live connection; only when none has
//! one does it wait (within its deadline) for its lane's connect. So one
//! lane being replaced never stalls the others, and a decision is exactly
//! one request to Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::coalesce::Job;
use super::lane::{Call, Lane, LaneSettings, Live};
use crate::store::StoreError;

/// The lanes of one endpoint.
#[derive(Debug)]
pub(crate) struct Node {
    lanes: Box<[Arc<Lane>]>,
    next: AtomicUsize,
}

impl Node {
    /// `count` lanes, starting to connect in the background at once.
    pub(crate) fn new(count: usize, settings: LaneSettings) -> Self {
        let settings = Arc::new(settings);
        let lanes: Box<[Arc<Lane>]> = (0..count.max(1))
            .map(|_| Lane::new(settings.clone()))
            .collect();
        if tokio::runtime::Handle::try_current().is_ok() {
            for lane in &lanes {
                let _ = lane.live_now();
            }
        }
        Self {
            lanes,
            next: AtomicUsize::new(0),
        }
    }

    /// The next lane with a live connection, with it; or else the next
    /// lane (whose connect the caller will wait for). Every lane is looked
    /// at once, so empty ones start connecting now rather than on their turn.
    fn pick(&self) -> (&Arc<Lane>, Option<Arc<Live>>) {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.lanes.len();
        let mut chosen = None;
        for i in 0..count {
            let lane = &self.lanes[(start + i) % count];
            if let Some(live) = lane.live_now() {
                chosen.get_or_insert((lane, Some(live)));
            }
        }
        chosen.unwrap_or((&self.lanes[start % count], None))
    }

    /// A direct call on a lane (callers bound the wait for a connect).
    ///
    /// # Errors
    ///
    /// [`StoreError::Connection`] when that lane backs off after failed
    /// connects.
    pub(crate) async fn call(&self) -> Result<Call<'_>, StoreError> {
        match self.pick() {
            (lane, Some(live)) => Ok(lane.call_on(live)),
            (lane, None) => lane.call().await,
        }
    }

    /// Queues a decision on a lane's batcher (callers bound the wait).
    ///
    /// # Errors
    ///
    /// As [`Node::call`].
    pub(crate) async fn submit(&self, job: Job) -> Result<(), StoreError> {
        match self.pick() {
            (_, Some(live)) => live.submit(job),
            (lane, None) => lane.submit(job).await,
        }
    }

    /// Lanes with a live connection now.
    pub(crate) fn live_lanes(&self) -> usize {
        self.lanes.iter().filter(|lane| lane.is_live()).count()
    }

    /// Replaces every connection (the endpoint now means another server).
    pub(crate) fn retire_all(&self, why: &str) {
        for lane in self.lanes.iter() {
            lane.retire_current(why);
        }
    }
}
