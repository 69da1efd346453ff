//! Applying all hits of one request together, with one [`Mode`].
//!
//! This is the whole decision a store makes for a request, written once as a
//! pure function over a [`StateView`]. The memory store runs it while holding
//! the locks of every key involved; the Redis script
//! (`store/redis/batch.lua`) is its line-by-line twin. Hits are evaluated in
//! request order, each seeing the writes of the hits before it (a request that
//! names one counter twice counts twice), then kept or rolled back as the mode
//! says.

use super::{AlgorithmKind, Outcome, Quota, State, Stored};

/// How the hits of one request are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Every hit is judged and counted on its own (Envoy's RLS semantics:
    /// a denied descriptor still counts when its algorithm counts rejections).
    Independent,
    /// The request is admitted only when every enforced hit is allowed; if
    /// not, nothing is written for any hit (`ShouldAllow`).
    AllOrNothing,
    /// Judge as [`Mode::AllOrNothing`] but never write.
    DryRun,
    /// Envoy with upstream's `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`: as
    /// [`Mode::Independent`], except that when any hit is over its limit only
    /// the over-limit hits are counted; the others are judged with 0 hits
    /// and left as they were.
    StopIncrementWhenOverLimit,
}

/// One hit of a batch: add `hits` to the counter at `key`.
#[derive(Debug, Clone, Copy)]
pub struct BatchHit<'a> {
    /// Storage key of the counter.
    pub key: &'a [u8],
    /// The algorithm that owns the counter's state.
    pub algorithm: AlgorithmKind,
    /// The limit.
    pub quota: Quota,
    /// How many hits to add (0 only checks).
    pub hits: u64,
    /// `false` for shadow-mode rules: judged and counted, but a denial does
    /// not deny the request.
    pub enforced: bool,
}

impl BatchHit<'_> {
    /// Whether `outcome`, this hit's answer, denies the request: the one
    /// definition every layer uses.
    pub fn denies(&self, outcome: &Outcome) -> bool {
        denies(outcome, self.enforced)
    }
}

/// Whether an answer denies its request: over the limit, and enforced (not
/// a shadow-mode rule, not global shadow mode).
pub fn denies(outcome: &Outcome, enforced: bool) -> bool {
    enforced && !outcome.allowed
}

/// Read and write access to counter states, for the duration of one batch.
/// `'k` is the lifetime of the batch's keys, so a view may keep them.
pub trait StateView<'k> {
    /// The live state at `key`, or `None` when absent or expired.
    fn load(&mut self, key: &'k [u8]) -> Option<Stored>;
    /// Replaces the state at `key`; `None` removes it.
    fn store(&mut self, key: &'k [u8], stored: Option<Stored>);
}

/// Applies `hits` to `view` at `now_ms` and returns one outcome per hit.
///
/// Only hits that add something write: a check (0 hits) never creates or
/// rewrites a key.
///
/// When the batch is not committed (a denied [`Mode::AllOrNothing`] request or
/// a [`Mode::DryRun`]), every write is undone and each outcome's `remaining`
/// and `reset_after_ms` describe the counter as it stands, since nothing was
/// taken; `allowed` and `retry_after_ms` still describe this request's hits.
pub fn apply_batch<'k>(
    view: &mut impl StateView<'k>,
    hits: &[BatchHit<'k>],
    mode: Mode,
    now_ms: u64,
) -> Vec<Outcome> {
    let first = pass(view, hits, |_| true, now_ms);
    match mode {
        Mode::Independent => first.outcomes,
        Mode::AllOrNothing if first.all_enforced_allowed => first.outcomes,
        Mode::AllOrNothing | Mode::DryRun => {
            let mut outcomes = first.outcomes;
            rollback(view, first.undo);
            for (hit, outcome) in hits.iter().zip(&mut outcomes) {
                let current = evaluate(hit, view.load(hit.key), 0, now_ms).outcome;
                outcome.remaining = current.remaining;
                outcome.reset_after_ms = current.reset_after_ms;
            }
            outcomes
        }
        Mode::StopIncrementWhenOverLimit => {
            let over: Vec<bool> = first.outcomes.iter().map(|o| !o.allowed).collect();
            if !over.contains(&true) {
                return first.outcomes;
            }
            rollback(view, first.undo);
            pass(view, hits, |i| over[i], now_ms).outcomes
        }
    }
}

/// What one pass over the hits did.
struct Pass<'k> {
    outcomes: Vec<Outcome>,
    /// State before each write, in write order.
    undo: Vec<(&'k [u8], Option<Stored>)>,
    all_enforced_allowed: bool,
}

/// Evaluates every hit in order, writing as it goes; hit `i` counts its hits
/// when `counts(i)`, else it is judged with 0 hits.
fn pass<'k>(
    view: &mut impl StateView<'k>,
    hits: &[BatchHit<'k>],
    counts: impl Fn(usize) -> bool,
    now_ms: u64,
) -> Pass<'k> {
    let mut done = Pass {
        outcomes: Vec::with_capacity(hits.len()),
        undo: Vec::with_capacity(hits.len()),
        all_enforced_allowed: true,
    };
    for (i, hit) in hits.iter().enumerate() {
        let before = view.load(hit.key);
        let counted = if counts(i) { hit.hits } else { 0 };
        let eval = evaluate(hit, before, counted, now_ms);
        if hit.denies(&eval.outcome) {
            done.all_enforced_allowed = false;
        }
        // A hit that adds nothing changes nothing: every algorithm reads its
        // state the same way whether or not it is rewritten, so a check
        // writes (and creates) no key.
        let write = if counted == 0 {
            None
        } else if eval.outcome.allowed {
            Some(eval.admitted)
        } else {
            eval.rejected
        };
        if let Some(write) = write {
            done.undo.push((hit.key, before));
            view.store(hit.key, Some(write));
        }
        done.outcomes.push(eval.outcome);
    }
    done
}

fn rollback<'k>(view: &mut impl StateView<'k>, undo: Vec<(&'k [u8], Option<Stored>)>) {
    for (key, before) in undo.into_iter().rev() {
        view.store(key, before);
    }
}

fn evaluate(
    hit: &BatchHit<'_>,
    stored: Option<Stored>,
    hits: u64,
    now_ms: u64,
) -> super::Evaluation {
    hit.algorithm
        .algorithm()
        .evaluate(&hit.quota, state_of(stored), hits, now_ms)
}

fn state_of(stored: Option<Stored>) -> State {
    stored.map_or([0; 3], |s| s.state)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A plain map; expiry is ignored because these tests stay in one window.
    #[derive(Default)]
    struct MapView(HashMap<Vec<u8>, Stored>);

    impl StateView<'_> for MapView {
        fn load(&mut self, key: &[u8]) -> Option<Stored> {
            self.0.get(key).copied()
        }
        fn store(&mut self, key: &[u8], stored: Option<Stored>) {
            match stored {
                Some(s) => self.0.insert(key.to_vec(), s),
                None => self.0.remove(key),
            };
        }
    }

    const NOW: u64 = 1_700_000_040_000;

    fn hit(key: &'static [u8], limit: u64, hits: u64, enforced: bool) -> BatchHit<'static> {
        BatchHit {
            key,
            algorithm: AlgorithmKind::FixedWindow,
            quota: Quota {
                limit,
                window_ms: 60_000,
                burst: limit,
            },
            hits,
            enforced,
        }
    }

    fn count(view: &MapView, key: &[u8]) -> u64 {
        view.0.get(key).map_or(0, |s| s.state[1])
    }

    #[test]
    fn independent_mode_counts_every_hit_including_rejected_ones() {
        let mut view = MapView::default();
        let batch = [hit(b"a", 1, 1, true), hit(b"b", 10, 1, true)];
        apply_batch(&mut view, &batch, Mode::Independent, NOW);
        let outcomes = apply_batch(&mut view, &batch, Mode::Independent, NOW);
        assert!(!outcomes[0].allowed);
        assert!(outcomes[1].allowed);
        assert_eq!((count(&view, b"a"), count(&view, b"b")), (2, 2));
    }

    #[test]
    fn all_or_nothing_writes_nothing_when_one_hit_is_denied() {
        let mut view = MapView::default();
        apply_batch(&mut view, &[hit(b"a", 1, 1, true)], Mode::AllOrNothing, NOW);
        let outcomes = apply_batch(
            &mut view,
            &[hit(b"a", 1, 1, true), hit(b"b", 10, 3, true)],
            Mode::AllOrNothing,
            NOW,
        );
        assert!(!outcomes[0].allowed);
        assert!(outcomes[1].allowed);
        // Nothing was taken from b, so it reports its full limit.
        assert_eq!(outcomes[1].remaining, 10);
        assert_eq!((count(&view, b"a"), count(&view, b"b")), (1, 0));
    }

    #[test]
    fn all_or_nothing_commits_when_every_enforced_hit_fits() {
        let mut view = MapView::default();
        let outcomes = apply_batch(
            &mut view,
            &[hit(b"a", 5, 2, true), hit(b"b", 1, 3, false)],
            Mode::AllOrNothing,
            NOW,
        );
        // b is a shadow rule: denied, but the request is admitted and b counts.
        assert!(outcomes[0].allowed && !outcomes[1].allowed);
        assert_eq!(outcomes[0].remaining, 3);
        assert_eq!((count(&view, b"a"), count(&view, b"b")), (2, 3));
    }

    #[test]
    fn dry_run_never_writes() {
        let mut view = MapView::default();
        let outcomes = apply_batch(&mut view, &[hit(b"a", 5, 2, true)], Mode::DryRun, NOW);
        assert!(outcomes[0].allowed);
        assert_eq!(outcomes[0].remaining, 5);
        assert!(view.0.is_empty());
    }

    #[test]
    fn stop_increment_counts_only_the_over_limit_hits() {
        let mut view = MapView::default();
        apply_batch(
            &mut view,
            &[hit(b"a", 1, 1, true), hit(b"b", 10, 1, true)],
            Mode::Independent,
            NOW,
        );
        // a is full: a counts (and is denied), b is judged but not counted.
        let outcomes = apply_batch(
            &mut view,
            &[hit(b"a", 1, 1, true), hit(b"b", 10, 1, true)],
            Mode::StopIncrementWhenOverLimit,
            NOW,
        );
        assert!(!outcomes[0].allowed && outcomes[1].allowed);
        assert_eq!(outcomes[1].remaining, 9);
        assert_eq!((count(&view, b"a"), count(&view, b"b")), (2, 1));
        // With nothing over the limit every hit counts.
        apply_batch(
            &mut view,
            &[hit(b"b", 10, 2, true)],
            Mode::StopIncrementWhenOverLimit,
            NOW,
        );
        assert_eq!(count(&view, b"b"), 3);
    }

    #[test]
    fn the_same_key_twice_counts_twice() {
        let mut view = MapView::default();
        let outcomes = apply_batch(
            &mut view,
            &[hit(b"a", 3, 2, true), hit(b"a", 3, 2, true)],
            Mode::AllOrNothing,
            NOW,
        );
        // 2 fits, 2 + 2 does not: the whole request is denied and a is untouched.
        assert!(outcomes[0].allowed && !outcomes[1].allowed);
        assert_eq!(count(&view, b"a"), 0);
        assert_eq!(outcomes[0].remaining, 3);
        let outcomes = apply_batch(
            &mut view,
            &[hit(b"a", 3, 1, true), hit(b"a", 3, 2, true)],
            Mode::AllOrNothing,
            NOW,
        );
        assert!(outcomes.iter().all(|o| o.allowed));
        assert_eq!(outcomes[1].remaining, 0);
        assert_eq!(count(&view, b"a"), 3);
    }
}
