//! The envoy-ratelimit key layout on one Redis (a fixed address, or the
//! master the sentinels name): see [`crate::store::envoy_layout`].
//!
//! A request whose limits all keep ratekeeper's keys goes the default way
//! (coalesced, [`super::decide_on`]). Any other request is one pipeline
//! per phase on one connection — upstream's commands, the script, and for
//! ratekeeper's own keys the usual function call — so a request is still
//! one round trip, and two only when an all-or-nothing or stop-increment
//! request mixes both kinds of keys (judged first, then applied:
//! [`crate::store::groups`]). These calls are direct, not coalesced: each
//! request's pipeline goes out as it comes, as upstream's do.

use redis::{Cmd, Value};

use super::coalesce::{Batching, share_out};
use super::decide::{Code, Runner};
use super::encode::{Assembled, Encoded, assemble};
use super::node::Node;
use super::{decide_on, outcomes_of, store_error};
use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::store::envoy_layout::{EnvoyLayout, Resolved, UpstreamCall};
use crate::store::{StoreError, groups};

/// One group of a phase: upstream's keys, or ratekeeper's own (the
/// index of its decision).
enum Part<'r> {
    Upstream(UpstreamCall<'r>),
    Own(usize),
}

/// A group of ratekeeper's own keys, as its function call carries it.
struct Own<'h> {
    hits: Vec<BatchHit<'h>>,
    mode: Mode,
    decision: Encoded,
}

/// Decides `hits` in `mode` on `node`, in `layout`.
///
/// # Errors
///
/// [`StoreError`] when Redis failed or answered something unusable.
pub(crate) async fn decide(
    node: &Node,
    batching: &Batching,
    layout: &EnvoyLayout,
    hits: &[BatchHit<'_>],
    mode: Mode,
) -> Result<Vec<Outcome>, StoreError> {
    let resolved = layout.resolve(hits);
    if !resolved.any_upstream() {
        return decide_on(node, 0, hits, mode)
            .await
            .map_err(|e| store_error(&e));
    }
    let (upstream, own) = resolved.partition();
    let groups: Vec<Vec<usize>> = [upstream, own]
        .into_iter()
        .filter(|group| !group.is_empty())
        .collect();
    groups::decide(hits, &groups, mode, |modes| {
        phase(node, batching, layout, &resolved, hits, &groups, modes)
    })
    .await
}

/// One phase: every group in its mode, in one pipeline.
async fn phase(
    node: &Node,
    batching: &Batching,
    layout: &EnvoyLayout,
    resolved: &Resolved,
    hits: &[BatchHit<'_>],
    groups: &[Vec<usize>],
    modes: Vec<Mode>,
) -> Result<Vec<Vec<Outcome>>, StoreError> {
    let mut owns: Vec<Own<'_>> = Vec::new();
    let parts: Vec<Part<'_>> = groups
        .iter()
        .zip(modes)
        .map(|(group, mode)| {
            if resolved.is_upstream(group[0]) {
                Part::Upstream(layout.call(resolved, hits, group, mode))
            } else {
                let own: Vec<BatchHit<'_>> = group.iter().map(|&i| hits[i]).collect();
                owns.push(Own {
                    decision: Encoded::new(&own, mode),
                    hits: own,
                    mode,
                });
                Part::Own(owns.len() - 1)
            }
        })
        .collect();
    let assembled: Vec<Assembled<'_>> = owns.iter().map(|own| assemble(&[&own.decision])).collect();
    let commands = |part: &Part<'_>, runner: Runner| match part {
        Part::Upstream(upstream) => upstream.commands(),
        Part::Own(j) => vec![batching.code.call(runner, &batching.time, &assembled[*j])],
    };

    let call = node.call().await?;
    let mut conn = call.connection();
    let sent: Vec<Vec<Cmd>> = parts
        .iter()
        .map(|part| commands(part, call.runner()))
        .collect();
    let mut replies = match pipeline(&mut conn, &sent).await {
        Ok(replies) => replies,
        Err(error) => {
            call.end(Some(&error));
            return Err(store_error(&error));
        }
    };
    // A part whose code the server lost (a SCRIPT or FUNCTION FLUSH) did
    // nothing: load it again and send that part alone.
    for (i, part) in parts.iter().enumerate() {
        let Some(Value::ServerError(error)) = replies[i].first() else {
            continue;
        };
        if !Code::is_missing(&redis::RedisError::from(error.clone())) {
            continue;
        }
        let runner = match part {
            Part::Upstream(upstream) => upstream
                .load_script(&mut conn)
                .await
                .map(|()| call.runner()),
            Part::Own(_) => batching.code.load(&mut conn).await,
        };
        let again = match runner {
            Ok(runner) => pipeline(&mut conn, &[commands(part, runner)]).await,
            Err(error) => Err(error),
        };
        match again {
            Ok(mut again) => replies[i] = again.swap_remove(0),
            Err(error) => {
                call.end(Some(&error));
                return Err(store_error(&error));
            }
        }
    }
    let first_error = replies.iter().flatten().find_map(|reply| match reply {
        Value::ServerError(error) => Some(redis::RedisError::from(error.clone())),
        _ => None,
    });
    call.end(first_error.as_ref());

    parts
        .iter()
        .zip(replies)
        .map(|(part, replies)| match part {
            Part::Upstream(upstream) => upstream.outcomes(replies),
            Part::Own(j) => own_outcomes(&owns[*j], &assembled[*j], replies),
        })
        .collect()
}

/// The outcomes of ratekeeper's own keys from their function call's reply.
fn own_outcomes(
    own: &Own<'_>,
    assembled: &Assembled<'_>,
    replies: Vec<Value>,
) -> Result<Vec<Outcome>, StoreError> {
    let reply = match <[Value; 1]>::try_from(replies) {
        Ok([Value::ServerError(error)]) => Err(redis::RedisError::from(error)),
        Ok([value]) => redis::from_redis_value::<Vec<i64>>(value).map_err(redis::RedisError::from),
        Err(replies) => {
            return Err(StoreError::Protocol(format!(
                "{} replies to one function call",
                replies.len()
            )));
        }
    };
    let (now, found) = share_out(&[&own.decision], &assembled.layout, reply)
        .swap_remove(0)
        .map_err(|e| store_error(&e))?;
    outcomes_of(&own.hits, own.mode, now, &found).map_err(|e| store_error(&e))
}

/// Sends every part's commands in one round trip; each part gets its
/// replies (a command's error is its reply).
async fn pipeline(
    conn: &mut redis::aio::MultiplexedConnection,
    parts: &[Vec<Cmd>],
) -> redis::RedisResult<Vec<Vec<Value>>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for command in parts.iter().flatten() {
        pipe.add_command(command.clone());
    }
    let mut values: std::vec::IntoIter<Value> =
        pipe.query_async::<Vec<Value>>(conn).await?.into_iter();
    Ok(parts
        .iter()
        .map(|commands| values.by_ref().take(commands.len()).collect())
        .collect())
}
