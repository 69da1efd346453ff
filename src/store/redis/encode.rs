//! What one call to Redis carries, and how its reply is shared out.
//!
//! Each decision is encoded once, when it is queued ([`Encoded`]). A call's
//! decisions are then assembled into its keys and arguments
//! ([`assemble`]): every plain hit — a fixed window adding hits to a key
//! of its own in an independent decision, which is what Envoy's requests
//! are — joins a *run* of hits that share a window and a hit count, so a
//! run costs Redis five arguments whatever its length and nothing per hit
//! but its key (sent windowed, see [`Code::call`](super::decide::Code::call));
//! every other decision goes as it is (mode, count, six
//! arguments per hit) and is applied on its own. Plain hits of several
//! decisions on one key (a hot limit: a route's, a tenant's) go as one hit
//! of their sum: one `INCRBY` for the call, and each decision's count is
//! the one it would have found counted alone, in the call's order (a run's
//! hits are independent, so that is exactly their one-at-a-time answer).
//! The reply is split back into each decision's part in one shape, three
//! integers per hit ([`Layout::split`]), which `decide::outcomes` turns
//! into answers.

use crate::algorithm::{AlgorithmKind, BatchHit, Mode};

/// Integers per hit in a decision's part of the reply: allowed, and the
/// two numbers of the state its key had.
pub(crate) const REPLY_PER_HIT: usize = 3;

/// The argument that opens a run (decisions are opened by their mode, 0 to 3).
pub(crate) const RUN: u64 = 4;

/// One decision as calls carry it.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    keys: Vec<Vec<u8>>,
    form: Form,
}

#[derive(Debug, Clone)]
enum Form {
    /// Every hit joins a run.
    Plain(Vec<PlainHit>),
    /// Sent as it is: mode, number of hits, six per hit.
    Full(Vec<u64>),
}

#[derive(Debug, Clone, Copy)]
struct PlainHit {
    window_ms: u64,
    hits: u64,
    limit: u64,
}

/// A call's keys and arguments (after the time and TTL arguments), and
/// where each decision's answer is in the reply.
#[derive(Debug)]
pub(crate) struct Assembled<'d> {
    /// The runs' keys (counters, not yet windowed), run after run, then the
    /// other decisions' keys.
    pub keys: Vec<&'d [u8]>,
    /// The runs, in the order of their keys.
    pub runs: Vec<Run>,
    /// The other decisions' arguments.
    pub args: Vec<u64>,
    pub layout: Layout,
}

/// Plain hits sharing a window and a hit count: one group of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub window_ms: u64,
    pub hits: u64,
    /// Its keys: the next `len` of the call's.
    pub len: usize,
}

/// Where each decision's part of a reply is.
#[derive(Debug)]
pub(crate) struct Layout {
    /// Per plain hit, in the order of the decisions: its place in the reply
    /// (after `now`), and the hits later decisions added to its key in the
    /// same run entry (taken off the count there to give this hit's).
    run_place: Vec<(usize, u64)>,
    /// Integers of the runs (they come first).
    run_hits: usize,
    /// Integers the reply holds after `now`.
    len: usize,
}

/// A reply whose shape does not fit its call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ShapeError(pub String);

// === impl Encoded ===

impl Encoded {
    /// `hits` decided in `mode`.
    pub(crate) fn new(hits: &[BatchHit<'_>], mode: Mode) -> Self {
        let keys = hits.iter().map(|hit| hit.key.to_vec()).collect();
        let form = if is_plain(hits, mode) {
            Form::Plain(
                hits.iter()
                    .map(|hit| PlainHit {
                        window_ms: hit.quota.window_ms,
                        hits: hit.hits,
                        limit: hit.quota.limit,
                    })
                    .collect(),
            )
        } else {
            let mut args = Vec::with_capacity(2 + 6 * hits.len());
            args.push(mode_id(mode));
            args.push(hits.len() as u64);
            for hit in hits {
                args.extend([
                    u64::from(hit.algorithm.script_id()),
                    hit.quota.limit,
                    hit.quota.window_ms,
                    hit.quota.burst,
                    hit.hits,
                    u64::from(hit.enforced),
                ]);
            }
            Form::Full(args)
        };
        Self { keys, form }
    }

    /// Whether its hits go in runs.
    #[cfg(test)]
    fn is_run(&self) -> bool {
        matches!(self.form, Form::Plain(_))
    }
}

/// Whether every hit of a decision may join a run: each is counted whatever
/// the others answer (independent mode; with one hit, counting only
/// over-limit hits is the same thing), each is a fixed window that adds
/// hits (a check of 0 hits must not create a key), and no two share a key
/// (a run's hits are read in any order).
fn is_plain(hits: &[BatchHit<'_>], mode: Mode) -> bool {
    let counts_each = match mode {
        Mode::Independent => true,
        Mode::StopIncrementWhenOverLimit => hits.len() == 1,
        Mode::AllOrNothing | Mode::DryRun => false,
    };
    counts_each
        && hits
            .iter()
            .all(|hit| hit.algorithm == AlgorithmKind::FixedWindow && hit.hits > 0)
        && hits
            .iter()
            .enumerate()
            .all(|(i, hit)| hits[..i].iter().all(|other| other.key != hit.key))
}

/// The keys and arguments of one call carrying `decisions`: the runs first
/// (plain hits grouped by window and hits), then the other decisions in
/// their order.
pub(crate) fn assemble<'d>(decisions: &[&'d Encoded]) -> Assembled<'d> {
    // Every plain hit, in the order of the decisions: its key, window and
    // hits.
    let mut plain: Vec<(&[u8], u64, u64)> = Vec::new();
    let mut full_keys = 0;
    for decision in decisions {
        match &decision.form {
            Form::Plain(hits) => plain.extend(
                hits.iter()
                    .zip(&decision.keys)
                    .map(|(hit, key)| (key.as_slice(), hit.window_ms, hit.hits)),
            ),
            Form::Full(_) => full_keys += decision.keys.len(),
        }
    }
    let (entries, of_hit) = merge_keys(&plain);

    // The entries, grouped in runs by window and hits.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_unstable_by_key(|&e| (entries[e].window_ms, entries[e].hits, e));
    let mut keys = Vec::with_capacity(entries.len() + full_keys);
    let mut runs = Vec::new();
    let mut args = Vec::new();
    let mut entry_place = vec![0; entries.len()];
    for run in order.chunk_by(|&a, &b| {
        (entries[a].window_ms, entries[a].hits) == (entries[b].window_ms, entries[b].hits)
    }) {
        runs.push(Run {
            window_ms: entries[run[0]].window_ms,
            hits: entries[run[0]].hits,
            len: run.len(),
        });
        for &e in run {
            entry_place[e] = keys.len();
            keys.push(entries[e].key);
        }
    }
    let run_place = of_hit
        .iter()
        .map(|&(entry, later)| (entry_place[entry], later))
        .collect();
    let run_hits = keys.len();
    for decision in decisions {
        if let Form::Full(full) = &decision.form {
            keys.extend(decision.keys.iter().map(Vec::as_slice));
            args.extend_from_slice(full);
        }
    }
    Assembled {
        layout: Layout {
            run_place,
            run_hits,
            len: run_hits + full_keys * REPLY_PER_HIT,
        },
        keys,
        runs,
        args,
    }
}

/// One key of a call's runs: the sum of the plain hits on it.
#[derive(Debug, Clone, Copy)]
struct Entry<'d> {
    key: &'d [u8],
    window_ms: u64,
    hits: u64,
}

/// The entries of `plain` hits (key, window, hits; in the order of the
/// decisions) — one per key — and per hit its entry and the hits later
/// hits add to it.
fn merge_keys<'d>(plain: &[(&'d [u8], u64, u64)]) -> (Vec<Entry<'d>>, Vec<(usize, u64)>) {
    // Sorting finds the hits that share a key without hashing every key;
    // the index keeps equal keys in decision order (and the sort in place).
    let mut by_key: Vec<usize> = (0..plain.len()).collect();
    by_key.sort_unstable_by_key(|&i| (plain[i].0, i));
    let mut entries = Vec::with_capacity(plain.len());
    let mut of_hit = vec![(0, 0); plain.len()];
    for same in by_key.chunk_by(|&a, &b| plain[a].0 == plain[b].0) {
        let (key, window_ms, _) = plain[same[0]];
        // Saturating, as the counts themselves are (a cost near u64::MAX).
        let total = same
            .iter()
            .fold(0u64, |sum, &i| sum.saturating_add(plain[i].2));
        let mut counted = 0u64;
        for &i in same {
            counted = counted.saturating_add(plain[i].2);
            of_hit[i] = (entries.len(), total.saturating_sub(counted));
        }
        entries.push(Entry {
            key,
            window_ms,
            hits: total,
        });
    }
    (entries, of_hit)
}

// === impl Layout ===

impl Layout {
    /// `now`, and each decision's part of `reply` (whose first integer is
    /// `now`) as three integers per hit, in the order of `decisions` (the
    /// ones the call was assembled from).
    ///
    /// # Errors
    ///
    /// [`ShapeError`] when the reply does not have the call's shape.
    pub(crate) fn split(
        &self,
        decisions: &[&Encoded],
        reply: &[i64],
    ) -> Result<(i64, Vec<Vec<i64>>), ShapeError> {
        let Some((&now, ints)) = reply.split_first() else {
            return Err(ShapeError("an empty reply".to_owned()));
        };
        if ints.len() != self.len {
            return Err(ShapeError(format!(
                "expected {} integers after the time, got {}",
                self.len,
                ints.len()
            )));
        }
        let mut places = self.run_place.iter();
        let mut full_at = self.run_hits;
        let parts = decisions
            .iter()
            .map(|decision| match &decision.form {
                Form::Plain(hits) => hits
                    .iter()
                    .zip(places.by_ref())
                    .flat_map(|(hit, &(place, later))| {
                        // A run returns the count after the hits; the
                        // verdict is the fixed window's (rejected hits
                        // count too).
                        let later = i64::try_from(later).unwrap_or(i64::MAX);
                        let after = ints[place].saturating_sub(later);
                        let taken = i64::try_from(hit.hits).unwrap_or(i64::MAX);
                        let allowed = u64::try_from(after).is_ok_and(|a| a <= hit.limit);
                        [i64::from(allowed), after.saturating_sub(taken), 0]
                    })
                    .collect(),
                Form::Full(_) => {
                    let n = decision.keys.len() * REPLY_PER_HIT;
                    full_at += n;
                    ints[full_at - n..full_at].to_vec()
                }
            })
            .collect();
        Ok((now, parts))
    }
}

fn mode_id(mode: Mode) -> u64 {
    match mode {
        Mode::Independent => 0,
        Mode::AllOrNothing => 1,
        Mode::DryRun => 2,
        Mode::StopIncrementWhenOverLimit => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::Quota;

    fn hit(
        key: &'static [u8],
        algorithm: AlgorithmKind,
        window_ms: u64,
        hits: u64,
    ) -> BatchHit<'static> {
        BatchHit {
            key,
            algorithm,
            quota: Quota {
                limit: 10,
                window_ms,
                burst: 10,
            },
            hits,
            enforced: true,
        }
    }

    const FW: AlgorithmKind = AlgorithmKind::FixedWindow;

    #[test]
    fn only_independent_fixed_window_hits_on_distinct_keys_run() {
        let one = [hit(b"a", FW, 1_000, 1)];
        let two = [hit(b"a", FW, 1_000, 1), hit(b"b", FW, 60_000, 2)];
        let same_key = [hit(b"a", FW, 1_000, 1), hit(b"a", FW, 60_000, 1)];
        let check = [hit(b"a", FW, 1_000, 0)];
        let sliding = [hit(b"a", AlgorithmKind::SlidingWindow, 1_000, 1)];
        let stop = Mode::StopIncrementWhenOverLimit;
        for (hits, mode, runs) in [
            (&one[..], Mode::Independent, true),
            (&two[..], Mode::Independent, true),
            (&one[..], stop, true),
            (&two[..], stop, false),
            (&one[..], Mode::AllOrNothing, false),
            (&one[..], Mode::DryRun, false),
            (&same_key[..], Mode::Independent, false),
            (&check[..], Mode::Independent, false),
            (&sliding[..], Mode::Independent, false),
        ] {
            assert_eq!(Encoded::new(hits, mode).is_run(), runs, "{hits:?} {mode:?}");
        }
    }

    #[test]
    fn runs_group_hits_by_window_and_hits_then_full_decisions_follow() {
        let a = Encoded::new(&[hit(b"a", FW, 60_000, 1)], Mode::Independent);
        let b = Encoded::new(
            &[hit(b"b", FW, 1_000, 1), hit(b"c", FW, 60_000, 1)],
            Mode::Independent,
        );
        let full = Encoded::new(&[hit(b"d", FW, 60_000, 1)], Mode::AllOrNothing);
        let d = Encoded::new(&[hit(b"e", FW, 60_000, 2)], Mode::Independent);
        let decisions = [&a, &full, &b, &d];
        let call = assemble(&decisions);
        let keys: Vec<&[u8]> = vec![b"b", b"a", b"c", b"e", b"d"];
        assert_eq!(call.keys, keys);
        let run = |window_ms, hits, len| Run {
            window_ms,
            hits,
            len,
        };
        assert_eq!(
            call.runs,
            [
                run(1_000, 1, 1),  // b
                run(60_000, 1, 2), // a, c
                run(60_000, 2, 1), // e
            ]
        );
        assert_eq!(call.args, [1, 1, 1, 10, 60_000, 10, 1, 1]); // d, all or nothing

        // now; b a c e counted to 3 7 11 12; d found at 4, allowed.
        let reply = [1_000_000, 3, 7, 11, 12, 1, 4, 0];
        let (now, parts) = call.layout.split(&decisions, &reply).unwrap();
        assert_eq!(now, 1_000_000);
        assert_eq!(parts[0], [1, 6, 0]); // a: 7 after 1 hit
        assert_eq!(parts[1], [1, 4, 0]); // d as the script answered
        assert_eq!(parts[2], [1, 2, 0, 0, 10, 0]); // b: 3; c: 11 is over 10
        assert_eq!(parts[3], [0, 10, 0]); // e: 12 after 2 hits, over
    }

    #[test]
    fn hits_of_several_decisions_on_one_key_go_as_one_with_each_its_own_count() {
        let one = |key: &'static [u8], hits| {
            Encoded::new(&[hit(key, FW, 60_000, hits)], Mode::Independent)
        };
        let (a, b, c, d) = (one(b"k", 1), one(b"k", 1), one(b"l", 1), one(b"k", 2));
        let decisions = [&a, &b, &c, &d];
        let call = assemble(&decisions);
        // k once, with its four hits; l alone.
        let keys: Vec<&[u8]> = vec![b"l", b"k"];
        assert_eq!(call.keys, keys);
        let run = |hits, len| Run {
            window_ms: 60_000,
            hits,
            len,
        };
        assert_eq!(call.runs, [run(1, 1), run(4, 1)]);
        // k went from 7 to 11 (the limit is 10): a found 7, b 8, and d 9,
        // whose 2 hits go over; l went from 0 to 1.
        let (_, parts) = call.layout.split(&decisions, &[0, 1, 11]).unwrap();
        assert_eq!(
            parts,
            [vec![1, 7, 0], vec![1, 8, 0], vec![1, 0, 0], vec![0, 9, 0]]
        );
    }

    #[test]
    fn replies_of_the_wrong_shape_are_refused() {
        let a = Encoded::new(&[hit(b"a", FW, 60_000, 1)], Mode::Independent);
        let call = assemble(&[&a]);
        for reply in [&[][..], &[5][..], &[5, 1, 2][..]] {
            assert!(call.layout.split(&[&a], reply).is_err(), "{reply:?}");
        }
    }
}
