//! Answering from the over-limit cache: hits known to be denied are answered
//! locally, the rest go to the store in one call, and the store's denials
//! are remembered for next time.

use super::{Batch, Limiter};
use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::error::Error;
use crate::metrics::AnswerSource;
use crate::store::OverLimitCache;

/// Applies `batch`, answering cached denials without the store; says which
/// answers came from the cache.
pub(super) async fn apply(
    limiter: &Limiter,
    cache: &OverLimitCache,
    domain: &str,
    batch: &Batch<'_>,
) -> Result<(Vec<Outcome>, Vec<AnswerSource>), Error> {
    let cached: Vec<Option<Outcome>> = batch
        .hits
        .iter()
        .map(|hit| cache.get(hit.key, &hit.quota, hit.hits))
        .collect();
    let from_cache = cached.iter().flatten().count();
    if from_cache == 0 {
        let outcomes = limiter.call_store(batch, Some(cache)).await?;
        return Ok((outcomes, vec![AnswerSource::Store; batch.hits.len()]));
    }
    limiter
        .metrics
        .over_limit_cache_hits(domain, from_cache as u64);
    let mut rest = Batch {
        hits: Vec::with_capacity(batch.hits.len() - from_cache),
        policies: Vec::with_capacity(batch.hits.len() - from_cache),
        mode: batch.mode,
    };
    for ((hit, policy), cached) in batch.hits.iter().zip(&batch.policies).zip(&cached) {
        if cached.is_none() {
            rest.hits.push(*hit);
            rest.policies.push(*policy);
        }
    }
    // A known enforced denial denies an all-or-nothing request: the other
    // descriptors are only judged, not consumed.
    let denied = batch
        .hits
        .iter()
        .zip(&cached)
        .any(|(hit, cached)| cached.as_ref().is_some_and(|o| hit.denies(o)));
    if batch.mode == Mode::AllOrNothing && denied {
        rest.mode = Mode::DryRun;
    }
    let mut from_store = if rest.hits.is_empty() {
        Vec::new()
    } else {
        limiter.call_store(&rest, Some(cache)).await?
    }
    .into_iter();
    let sources = cached
        .iter()
        .map(|cached| match cached {
            Some(_) => AnswerSource::OverLimitCache,
            None => AnswerSource::Store,
        })
        .collect();
    let outcomes = cached
        .into_iter()
        .map(|cached| cached.or_else(|| from_store.next()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Internal("store returned too few outcomes".to_owned()))?;
    Ok((outcomes, sources))
}

/// Remembers the store's enforced denials among `outcomes`.
pub(super) fn remember(cache: &OverLimitCache, hits: &[BatchHit<'_>], outcomes: &[Outcome]) {
    for (hit, outcome) in hits.iter().zip(outcomes) {
        // A key named twice in one request was judged after its own
        // earlier hits; its denial says nothing about it alone.
        let once = hits.iter().filter(|other| other.key == hit.key).count() == 1;
        if hit.denies(outcome) && once {
            cache.remember(hit.key, &hit.quota, hit.hits, outcome);
        }
    }
}
