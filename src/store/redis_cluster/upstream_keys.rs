//! The envoy-ratelimit key layout on a Redis Cluster: see
//! [`crate::store::envoy_layout`].
//!
//! Upstream's keys carry no hash tag, so each lives on the slot of its whole
//! text, wherever that is. A request's upstream keys are grouped by slot,
//! and each group is one call to its slot's master — upstream's `INCRBY` +
//! `EXPIRE` pipelined, or the script — sent at once with the groups of
//! ratekeeper's own keys, which go as without the layout. Calls follow
//! redirections as every cluster call does; a pipeline of plain commands
//! redirected in part (its slot being migrated: keys still on the old node
//! are counted there, the others are asked of the new one) sends again only
//! what has not been done, so no hit is counted twice.

use redis::{Cmd, Value};

use super::topology::{Redirect, slot};
use super::{MAX_ATTEMPTS, RedisClusterStore, Target, redirected_too_often};
use crate::algorithm::{BatchHit, Mode, Outcome};
use crate::store::envoy_layout::{EnvoyLayout, UpstreamCall};
use crate::store::redis::decide::Code;
use crate::store::redis::no_connection;
use crate::store::{StoreError, groups};

/// One group of a request: its hits (indexes), their slot, and whether
/// they are upstream's keys.
struct Group {
    indexes: Vec<usize>,
    slot: u16,
    upstream: bool,
}

/// What a plain pipeline still has to do for one hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Todo {
    /// `INCRBY` and `EXPIRE`.
    Count,
    /// Only `EXPIRE` (its `INCRBY` was counted, then the key moved).
    Expire,
    Done,
}

impl RedisClusterStore {
    /// Decides `hits` in `mode`, in `layout`.
    pub(super) async fn decide_in_layout(
        &self,
        layout: &EnvoyLayout,
        hits: &[BatchHit<'_>],
        mode: Mode,
    ) -> Result<Vec<Outcome>, StoreError> {
        let resolved = layout.resolve(hits);
        if !resolved.any_upstream() {
            return self.decide(hits, mode).await;
        }
        let mut found: Vec<Group> = Vec::new();
        for (i, hit) in hits.iter().enumerate() {
            let (upstream, slot) = match resolved.key(i) {
                Some(key) => (true, slot(key)),
                None => (false, slot(hit.key)),
            };
            match found
                .iter_mut()
                .find(|g| g.upstream == upstream && g.slot == slot)
            {
                Some(group) => group.indexes.push(i),
                None => found.push(Group {
                    indexes: vec![i],
                    slot,
                    upstream,
                }),
            }
        }
        let indexes: Vec<Vec<usize>> = found.iter().map(|g| g.indexes.clone()).collect();
        groups::decide(hits, &indexes, mode, |modes| async {
            let calls = found.iter().zip(modes).map(|(group, mode)| {
                let resolved = &resolved;
                async move {
                    if group.upstream {
                        let call = layout.call(resolved, hits, &group.indexes, mode);
                        self.upstream_on(group.slot, &call).await
                    } else {
                        let own: Vec<BatchHit<'_>> =
                            group.indexes.iter().map(|&i| hits[i]).collect();
                        self.eval(&own, mode).await
                    }
                }
            });
            futures_util::future::try_join_all(calls).await
        })
        .await
    }

    /// One group of upstream's keys on `slot`, following redirections.
    async fn upstream_on(
        &self,
        slot: u16,
        call: &UpstreamCall<'_>,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut to = self.master_of(slot).await?;
        let mut last = None;
        let mut todo = vec![Todo::Count; call.len()];
        let mut counted: Vec<Option<Outcome>> = vec![None; call.len()];
        for _ in 0..MAX_ATTEMPTS {
            let error =
                if call.is_script() {
                    match send(&to, &[call.script_command()], Some(call)).await {
                        Ok(replies) => return call.outcomes(replies),
                        Err(error) => error,
                    }
                } else {
                    match count_on(&to, call, &mut todo, &mut counted).await {
                        Ok(()) => {
                            return counted.into_iter().collect::<Option<Vec<_>>>().ok_or_else(
                                || StoreError::Protocol("a hit was never counted".to_owned()),
                            );
                        }
                        Err(error) => error,
                    }
                };
            to = self.follow(slot, &error, &mut last).await?;
        }
        Err(redirected_too_often(slot, last))
    }
}

/// Sends what `todo` says on `to`, recording each hit as its replies come;
/// an error when something is left to do (the first error met).
async fn count_on(
    to: &Target,
    call: &UpstreamCall<'_>,
    todo: &mut [Todo],
    counted: &mut [Option<Outcome>],
) -> Result<(), redis::RedisError> {
    let pending: Vec<usize> = (0..todo.len()).filter(|&i| todo[i] != Todo::Done).collect();
    let commands: Vec<Cmd> = pending
        .iter()
        .flat_map(|&i| {
            let [incrby, expire] = call.counting_commands(i);
            match todo[i] {
                Todo::Count => vec![incrby, expire],
                Todo::Expire | Todo::Done => vec![expire],
            }
        })
        .collect();
    let mut replies = send(to, &commands, None).await?.into_iter();
    let mut first_error = None;
    for i in pending {
        if todo[i] == Todo::Count {
            match replies.next() {
                Some(Value::Int(after)) => {
                    counted[i] = Some(call.counted(i, after));
                    todo[i] = Todo::Expire;
                }
                Some(Value::ServerError(error)) => {
                    // Its EXPIRE failed alike: the key is not here.
                    replies.next();
                    first_error.get_or_insert(redis::RedisError::from(error));
                    continue;
                }
                other => return Err(unexpected(other)),
            }
        }
        match replies.next() {
            Some(Value::Int(_)) => todo[i] = Todo::Done,
            Some(Value::ServerError(error)) => {
                first_error.get_or_insert(redis::RedisError::from(error));
            }
            other => return Err(unexpected(other)),
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Sends `commands` to `to` in one pipeline (each after `ASKING` when the
/// slot is being migrated there) and returns their replies; the first
/// error among them is the call's. With `script`, a server that lost the
/// script gets it again and the commands once more.
async fn send(
    to: &Target,
    commands: &[Cmd],
    script: Option<&UpstreamCall<'_>>,
) -> Result<Vec<Value>, redis::RedisError> {
    let call = to.node.call().await.map_err(no_connection)?;
    let mut conn = call.connection();
    let mut result = pipeline(&mut conn, to.asking, commands).await;
    if let (Some(script), Ok([Value::ServerError(error)])) = (script, result.as_deref())
        && Code::is_missing(&redis::RedisError::from(error.clone()))
    {
        result = match script.load_script(&mut conn).await {
            Ok(()) => pipeline(&mut conn, to.asking, commands).await,
            Err(error) => Err(error),
        };
    }
    // A redirection says nothing about this connection.
    let error = match &result {
        Ok(replies) => replies.iter().find_map(|reply| match reply {
            Value::ServerError(error) => Some(redis::RedisError::from(error.clone())),
            _ => None,
        }),
        Err(error) => Some(error.clone()),
    };
    call.end(error.as_ref().filter(|e| Redirect::of(e).is_none()));
    let replies = result?;
    // The script's error is the call's (its keys moved, or it failed); a
    // plain pipeline's are sorted out per hit.
    if script.is_some()
        && let Some(error) = error
    {
        return Err(error);
    }
    Ok(replies)
}

async fn pipeline(
    conn: &mut redis::aio::MultiplexedConnection,
    asking: bool,
    commands: &[Cmd],
) -> redis::RedisResult<Vec<Value>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for command in commands {
        if asking {
            // ASKING holds for the next command only.
            pipe.cmd("ASKING").ignore();
        }
        pipe.add_command(command.clone());
    }
    pipe.query_async(conn).await
}

fn unexpected(reply: Option<Value>) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply to INCRBY or EXPIRE",
        format!("{reply:?}"),
    ))
}
