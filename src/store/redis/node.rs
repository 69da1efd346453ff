//! One Redis endpoint — a single server, the master the sentinels name, or
//! one master of a cluster — as a few [`Lane`]s that concurrent requests
//! share.
//!
//! A request goes to the first lane whose connection is live and not late
//! (its call out for less than a third of the store deadline): under load
//! the decisions wait together behind one connection's call and go out in
//! the next one, so calls are as full as they can be — a call's fixed cost
//! to Redis (reading, replying, waking up) is most of what a small one
//! costs. The other lanes stand by, connected: when the first is late
//! (slow, or silent until the stall bound retires it) new decisions go to
//! the next, and when every live lane is late they share them round-robin.
//! Only when no lane has a connection does a request wait (within its
//! deadline) for a connect. So one lane being replaced never stalls the
//! others, and a decision is exactly one request to Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::coalesce::Job;
use super::lane::{Call, Lane, LaneSettings, Live};
use crate::store::StoreError;

/// Every this many requests, a node looks at all its lanes.
const LOOK_AT_ALL_EVERY: usize = 64;

/// The lanes of one endpoint.
#[derive(Debug)]
pub(crate) struct Node {
    lanes: Box<[Arc<Lane>]>,
    next: AtomicUsize,
    /// A lane whose call is out longer than this is passed over.
    late_after: Duration,
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
            late_after: settings.batching.late_after,
        }
    }

    /// The first lane whose live connection is not late, with it; or the
    /// next live lane round-robin when all are late; or else the next lane
    /// (whose connect the caller will wait for). Every so often every lane
    /// is looked at, so standby lanes that lost their connection start
    /// connecting again without waiting to be needed.
    fn pick(&self) -> (&Arc<Lane>, Option<Arc<Live>>) {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let look_at_all = turn.is_multiple_of(LOOK_AT_ALL_EVERY);
        let count = self.lanes.len();
        let mut chosen = None;
        let mut any_live = false;
        for lane in self.lanes.iter() {
            if let Some(live) = lane.live_now() {
                any_live = true;
                if chosen.is_none() && !live.is_late(self.late_after) {
                    chosen = Some((lane, Some(live)));
                    if !look_at_all {
                        break;
                    }
                }
            }
        }
        if let Some(chosen) = chosen {
            return chosen;
        }
        if any_live {
            for i in 0..count {
                let lane = &self.lanes[(turn + i) % count];
                if let Some(live) = lane.live_now() {
                    return (lane, Some(live));
                }
            }
        }
        (&self.lanes[turn % count], None)
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
