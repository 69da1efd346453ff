//! One scenario for every store: 64 concurrent decisions that share a hot
//! counter, in every mode, each of which must keep its own semantics when
//! the Redis stores coalesce them into a few calls.
//!
//! To make the coalescing certain rather than likely, the caller may hold
//! Redis (SIGSTOP) while every decision is queued — each decision future
//! is polled once, which queues its job — and release it afterwards: the
//! decisions then reach Redis as a handful of calls, and their answers must
//! still be exactly what one-at-a-time decisions would give.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use futures::future::{MaybeDone, maybe_done, poll_fn};
use ratekeeper::algorithm::{AlgorithmKind, BatchHit, Mode, Outcome, Quota};
use ratekeeper::store::CounterStore;

/// Concurrent callers.
pub const CALLERS: usize = 64;
/// The hot counter's limit: far fewer than the callers that count on it.
const HOT_LIMIT: u64 = 10;

const fn quota(limit: u64) -> Quota {
    Quota {
        limit,
        window_ms: 60_000,
        burst: limit,
    }
}

fn hit(key: &[u8], limit: u64, hits: u64) -> BatchHit<'_> {
    BatchHit {
        key,
        algorithm: AlgorithmKind::FixedWindow,
        quota: quota(limit),
        hits,
        enforced: true,
    }
}

/// What caller `i` asks, by `i % 5`: an all-or-nothing request that an
/// exhausted counter denies, a dry run, a plain count, an all-or-nothing
/// request with its own fresh counter, and upstream's stop-increment mode
/// with its own fresh counter.
fn mode_of(i: usize) -> Mode {
    match i % 5 {
        0 | 3 => Mode::AllOrNothing,
        1 => Mode::DryRun,
        2 => Mode::Independent,
        _ => Mode::StopIncrementWhenOverLimit,
    }
}

/// Where the scenario is, for the caller to hold Redis and count its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Primed (every connection the decisions need is up); the decisions
    /// are about to be queued.
    Queueing,
    /// Every decision is queued; none can have been answered while Redis
    /// was held.
    Queued,
    /// Every decision is answered; the follow-up checks come next.
    Answered,
}

/// Runs the scenario on `store`, with keys named by `key`; `at` is told
/// each [`Phase`].
pub async fn decisions_keep_their_semantics(
    store: &dyn CounterStore,
    key: impl Fn(&str) -> Vec<u8>,
    at: impl Fn(Phase),
) {
    let hot = key("hot");
    let spent = key("spent");
    let own: Vec<Vec<u8>> = (0..CALLERS).map(|i| key(&format!("own-{i}"))).collect();

    // Exhaust `spent`; touch every key, so every node's connection is up.
    let first = store.apply(&[hit(&spent, 1, 1)], Mode::Independent).await;
    assert!(first.unwrap()[0].allowed);
    for key in own.iter().chain([&hot]) {
        store.apply(&[hit(key, 1, 0)], Mode::DryRun).await.unwrap();
    }

    let requests: Vec<(Mode, Vec<BatchHit<'_>>)> = (0..CALLERS)
        .map(|i| {
            let hits = match i % 5 {
                0 => vec![hit(&hot, HOT_LIMIT, 1), hit(&spent, 1, 1)],
                1 | 2 => vec![hit(&hot, HOT_LIMIT, 1)],
                _ => vec![hit(&hot, HOT_LIMIT, 1), hit(&own[i], 1, 1)],
            };
            (mode_of(i), hits)
        })
        .collect();

    at(Phase::Queueing);
    type Decision<'a> = Pin<Box<dyn Future<Output = Vec<Outcome>> + Send + 'a>>;
    let mut decisions: Vec<MaybeDone<Decision<'_>>> = requests
        .iter()
        .map(|(mode, hits)| {
            let decision: Decision<'_> =
                Box::pin(async move { store.apply(hits, *mode).await.expect("a decision") });
            maybe_done(decision)
        })
        .collect();
    // One poll each queues every decision before any can be answered.
    poll_fn(|cx| {
        for decision in &mut decisions {
            let _ = Pin::new(decision).poll(cx);
        }
        Poll::Ready(())
    })
    .await;
    at(Phase::Queued);
    poll_fn(|cx| {
        let mut done = true;
        for decision in &mut decisions {
            done &= Pin::new(decision).poll(cx).is_ready();
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    let answers: Vec<Vec<Outcome>> = decisions
        .iter_mut()
        .map(|decision| Pin::new(decision).take_output().unwrap())
        .collect();
    at(Phase::Answered);

    let mut hot_taken = 0;
    for (i, outcomes) in answers.iter().enumerate() {
        let admitted = outcomes.iter().all(|o| o.allowed);
        match i % 5 {
            0 => assert!(!admitted, "caller {i}: the spent counter must deny"),
            1 => {}
            2 => hot_taken += u64::from(admitted),
            _ => {
                hot_taken += u64::from(outcomes[0].allowed);
                // Its own counter counted only when the hot one admitted.
                let left = store
                    .apply(&[hit(&own[i], 1, 0)], Mode::DryRun)
                    .await
                    .unwrap()[0]
                    .remaining;
                assert_eq!(
                    left,
                    u64::from(!outcomes[0].allowed),
                    "caller {i} ({:?}): {outcomes:?}",
                    mode_of(i)
                );
            }
        }
    }
    // Exact: the counting callers got the hot limit, no more, no less — so
    // no dry run and no denied all-or-nothing request took any of it.
    assert_eq!(hot_taken, HOT_LIMIT, "{answers:?}");
    let hot_left = store
        .apply(&[hit(&hot, HOT_LIMIT, 0)], Mode::DryRun)
        .await
        .unwrap();
    assert_eq!(hot_left[0].remaining, 0);
}
