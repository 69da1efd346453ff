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
//! arguments per hit) and is applied on its own. The reply is split back
//! into each decision's part in one shape, three integers per hit
//! ([`Layout::split`]), which `decide::outcomes` turns into answers.

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
    /// (after `now`).
    run_place: Vec<usize>,
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
    // Every plain hit: (window, hits, its index among the plain hits).
    let mut plain: Vec<(u64, u64, usize)> = Vec::new();
    let mut plain_keys: Vec<&[u8]> = Vec::new();
    let mut full_keys = 0;
    for decision in decisions {
        match &decision.form {
            Form::Plain(hits) => {
                for (hit, key) in hits.iter().zip(&decision.keys) {
                    plain.push((hit.window_ms, hit.hits, plain.len()));
                    plain_keys.push(key);
                }
            }
            Form::Full(_) => full_keys += decision.keys.len(),
        }
    }
    plain.sort_unstable();

    let mut keys = Vec::with_capacity(plain.len() + full_keys);
    let mut runs = Vec::new();
    let mut args = Vec::new();
    let mut run_place = vec![0; plain.len()];
    for run in plain.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let (window_ms, hits, _) = run[0];
        runs.push(Run {
            window_ms,
            hits,
            len: run.len(),
        });
        for &(_, _, index) in run {
            run_place[index] = keys.len();
            keys.push(plain_keys[index]);
        }
    }
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
                    .flat_map(|(hit, &place)| {
                        // A run returns the count after the hits; the
                        // verdict is the fixed window's (rejected hits
                        // count too).
                        let after = ints[place];
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
    fn replies_of_the_wrong_shape_are_refused() {
        let a = Encoded::new(&[hit(b"a", FW, 60_000, 1)], Mode::Independent);
        let call = assemble(&[&a]);
        for reply in [&[][..], &[5][..], &[5, 1, 2][..]] {
            assert!(call.layout.split(&[&a], reply).is_err(), "{reply:?}");
        }
    }
}
