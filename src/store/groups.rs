//! Deciding a request whose hits fall into several groups, each atomic on
//! its own but not together: the hash slots of a Redis Cluster, and in the
//! envoy-ratelimit key layout upstream's keys beside ratekeeper's own.
//!
//! Every phase sends all groups at once (the caller decides how: in
//! parallel, or in one pipeline), each in its own mode:
//! - `Independent` (Envoy) and dry runs are exact, each group on its own;
//! - all-or-nothing (`ShouldAllow`) first judges every group without
//!   writing, and only when all admit does it apply them (each group
//!   all-or-nothing). A denied request therefore takes nothing. If another
//!   caller takes the last hit of some group between the two phases, the
//!   request is denied and the groups already applied keep their hits: a
//!   race can cost quota, never admit past a limit;
//! - upstream's stop-increment mode likewise judges first, then counts only
//!   the over-limit hits when there are any: their groups decide again by
//!   stop-increment, the others are only judged.

use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::store::StoreError;

/// Decides `hits`, split into `groups` (indexes into `hits`, every hit in
/// exactly one group), with `mode`. `phase` runs one phase: given a mode
/// per group, it returns the outcomes of each group's hits in the group's
/// order.
///
/// # Errors
///
/// The first phase's error, or [`StoreError::Protocol`] when a phase
/// answers with the wrong number of outcomes.
pub(crate) async fn decide<F, Fut>(
    hits: &[BatchHit<'_>],
    groups: &[Vec<usize>],
    mode: Mode,
    phase: F,
) -> Result<Vec<Outcome>, StoreError>
where
    F: Fn(Vec<Mode>) -> Fut,
    Fut: Future<Output = Result<Vec<Vec<Outcome>>, StoreError>>,
{
    let run = |modes: Vec<Mode>| async {
        let answered = phase(modes).await?;
        place(hits.len(), groups, answered)
    };
    let every = |mode| vec![mode; groups.len()];
    if groups.len() == 1 {
        return run(every(mode)).await;
    }
    match mode {
        Mode::Independent | Mode::DryRun => run(every(mode)).await,
        Mode::AllOrNothing => {
            let judged = run(every(Mode::DryRun)).await?;
            let admitted = !hits
                .iter()
                .zip(&judged)
                .any(|(hit, outcome)| hit.denies(outcome));
            if !admitted {
                return Ok(judged);
            }
            run(every(Mode::AllOrNothing)).await
        }
        Mode::StopIncrementWhenOverLimit => {
            let judged = run(every(Mode::DryRun)).await?;
            let over: Vec<bool> = judged.iter().map(|o| !o.allowed).collect();
            if !over.contains(&true) {
                return run(every(Mode::Independent)).await;
            }
            let modes = groups
                .iter()
                .map(|group| {
                    if group.iter().any(|&i| over[i]) {
                        Mode::StopIncrementWhenOverLimit
                    } else {
                        Mode::DryRun
                    }
                })
                .collect();
            run(modes).await
        }
    }
}

/// The outcomes of every group put back in the order of the hits.
fn place(
    len: usize,
    groups: &[Vec<usize>],
    answered: Vec<Vec<Outcome>>,
) -> Result<Vec<Outcome>, StoreError> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; len];
    if answered.len() != groups.len() {
        return Err(StoreError::Protocol(format!(
            "{} answers for {} groups",
            answered.len(),
            groups.len()
        )));
    }
    for (group, answer) in groups.iter().zip(answered) {
        if answer.len() != group.len() {
            return Err(StoreError::Protocol(format!(
                "{} outcomes for a group of {} hits",
                answer.len(),
                group.len()
            )));
        }
        for (&i, outcome) in group.iter().zip(answer) {
            outcomes[i] = Some(outcome);
        }
    }
    outcomes
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| StoreError::Protocol("a hit in no group".to_owned()))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::algorithm::{AlgorithmKind, Quota};

    fn hit(key: &'static [u8]) -> BatchHit<'static> {
        BatchHit {
            key,
            algorithm: AlgorithmKind::FixedWindow,
            quota: Quota {
                limit: 1,
                window_ms: 1_000,
                burst: 1,
            },
            hits: 1,
            enforced: true,
        }
    }

    fn outcome(allowed: bool) -> Outcome {
        Outcome {
            allowed,
            remaining: 0,
            reset_after_ms: 1,
            retry_after_ms: None,
            used_before: 0,
        }
    }

    /// Runs `mode` over two groups, `[0, 2]` and `[1]`, where each hit is
    /// allowed as `allowed` says; returns the phases' modes and the answer.
    async fn phases(mode: Mode, allowed: [bool; 3]) -> (Vec<Vec<Mode>>, Vec<bool>) {
        let hits = [hit(b"a"), hit(b"b"), hit(b"c")];
        let groups = vec![vec![0, 2], vec![1]];
        let seen = Mutex::new(Vec::new());
        let outcomes = decide(&hits, &groups, mode, |modes: Vec<Mode>| {
            seen.lock().unwrap().push(modes);
            let groups = &groups;
            async move {
                Ok(groups
                    .iter()
                    .map(|g| g.iter().map(|&i| outcome(allowed[i])).collect())
                    .collect())
            }
        })
        .await
        .unwrap();
        (
            seen.into_inner().unwrap(),
            outcomes.iter().map(|o| o.allowed).collect(),
        )
    }

    #[tokio::test]
    async fn each_mode_runs_its_phases() {
        use Mode::*;
        let (modes, answer) = phases(Independent, [true, false, true]).await;
        assert_eq!(modes, [[Independent, Independent]]);
        assert_eq!(answer, [true, false, true]);

        let (modes, _) = phases(AllOrNothing, [true, true, true]).await;
        assert_eq!(modes, [[DryRun, DryRun], [AllOrNothing, AllOrNothing]]);
        let (modes, answer) = phases(AllOrNothing, [true, false, true]).await;
        assert_eq!(modes, [[DryRun, DryRun]]);
        assert_eq!(answer, [true, false, true]);

        let (modes, _) = phases(StopIncrementWhenOverLimit, [true, true, true]).await;
        assert_eq!(modes, [[DryRun, DryRun], [Independent, Independent]]);
        let (modes, _) = phases(StopIncrementWhenOverLimit, [true, false, true]).await;
        assert_eq!(
            modes,
            [[DryRun, DryRun], [DryRun, StopIncrementWhenOverLimit]]
        );
    }

    #[tokio::test]
    async fn one_group_is_one_phase_in_the_requests_mode() {
        let hits = [hit(b"a")];
        let outcomes = decide(&hits, &[vec![0]], Mode::AllOrNothing, |modes| async move {
            assert_eq!(modes, [Mode::AllOrNothing]);
            Ok(vec![vec![outcome(true)]])
        })
        .await
        .unwrap();
        assert!(outcomes[0].allowed);
    }
}
