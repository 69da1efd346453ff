//! Coalescing: the decisions waiting for a connection go to Redis as one
//! call.
//!
//! Each live connection has one batcher task. It takes every decision that
//! is waiting (up to [`MAX_DECISIONS`]) and sends them as one `FCALL` —
//! one per hash slot on a cluster node, pipelined — then hands each
//! decision its part of the answer, and takes what has queued meanwhile.
//! There are no timers: an idle connection sends a lone decision at once;
//! under load, the decisions that arrive while a call is out ride the next
//! one. Each decision keeps its own mode and atomicity (the script applies
//! them one after another) and its own answer; a failed or late call fails
//! only its own decisions. A call unanswered for the stall bound retires the
//! connection (the call is its own liveness probe).

use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot};

use super::ScriptTime;
use super::decide::{Code, Runner};
use super::encode::{Assembled, Encoded, Layout, assemble};
use super::lane::{Lane, Live};

/// Most decisions in one call: keeps any one call short for Redis's thread.
pub(crate) const MAX_DECISIONS: usize = 256;

/// What a call answers for one decision: `now` and its integers.
pub(crate) type Answer = Result<(i64, Vec<i64>), redis::RedisError>;

/// One decision waiting for a call.
#[derive(Debug)]
pub(crate) struct Job {
    pub decision: Encoded,
    /// The hash slot of its keys (0 off a cluster): a call holds one slot.
    pub slot: u16,
    pub answer: oneshot::Sender<Answer>,
}

/// What a batcher needs besides its connection.
#[derive(Debug)]
pub(crate) struct Batching {
    pub code: Arc<Code>,
    pub time: ScriptTime,
    /// How long a call may go unanswered before its connection counts as
    /// silent and is replaced.
    pub stall_timeout: Duration,
    /// How long a call may be out before new decisions pass its connection
    /// over for another (a node prefers its first lane: see `node`).
    pub late_after: Duration,
}

impl Batching {
    /// The batching of a store whose calls have `store_timeout` and whose
    /// keys get up to `expiry_jitter` more TTL. A call is silent past five
    /// deadlines (at least 250 ms): long enough for a slow Redis, short
    /// enough to replace a dead socket well within a second. It is late
    /// past a third of a deadline: decisions that go to another connection
    /// then still have two thirds of theirs.
    pub(crate) fn new(store_timeout: Duration, expiry_jitter: Duration) -> Arc<Self> {
        Arc::new(Self {
            code: Arc::new(Code::new()),
            time: ScriptTime::with_jitter(expiry_jitter),
            stall_timeout: (store_timeout * 5).max(Duration::from_millis(250)),
            late_after: store_timeout / 3,
        })
    }
}

/// Sends the jobs of `jobs` on `live`'s connection until the connection is
/// retired or dropped.
pub(crate) async fn run(
    lane: Weak<Lane>,
    live: Arc<Live>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    batching: Arc<Batching>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(32);
    while let Some(first) = jobs.recv().await {
        batch.push(first);
        while batch.len() < MAX_DECISIONS {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Callers that gave up (their deadline passed) need no call.
        batch.retain(|job| !job.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        if live.is_retired() {
            break;
        }
        let mut conn = live.connection();
        batch.sort_by_key(|job| job.slot);
        let groups = slot_groups(&batch);
        let decisions: Vec<&Encoded> = batch.iter().map(|job| &job.decision).collect();
        let calls: Vec<Assembled<'_>> = groups
            .iter()
            .map(|range| assemble(&decisions[range.clone()]))
            .collect();
        live.call_out();
        let result = tokio::time::timeout(
            batching.stall_timeout,
            send(&mut conn, live.runner(), &batching, &calls),
        )
        .await;
        live.call_back();
        // Why the connection must go, if it must: silence, a lost socket,
        // or a reply that says "wrong server" (READONLY after a failover
        // behind the endpoint...), whether for the whole round trip or for
        // one slot's call in it.
        let retire = match &result {
            Ok(Ok(replies)) => replies
                .iter()
                .filter_map(|reply| reply.as_ref().err())
                .find_map(super::lane::retire_reason),
            Ok(Err(error)) => super::lane::retire_reason(error),
            Err(_) => Some(format!(
                "silent: a call got no answer in {:?}",
                batching.stall_timeout
            )),
        };
        if let (Some(lane), Some(reason)) = (lane.upgrade(), retire) {
            lane.retire(&live, &reason);
        }
        let answers: Vec<Answer> = match result {
            Ok(Ok(replies)) => groups
                .iter()
                .zip(&calls)
                .zip(replies)
                .flat_map(|((range, call), reply)| {
                    share_out(&decisions[range.clone()], &call.layout, reply)
                })
                .collect(),
            Ok(Err(error)) => vec![Err(error); batch.len()],
            Err(_) => vec![
                Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "redis did not answer",
                )));
                batch.len()
            ],
        };
        // Redis's clock, for the windows the next calls expect.
        if let Some(Ok((now, _))) = answers.first() {
            batching.time.observe(*now);
        }
        drop(calls);
        drop(decisions);
        for (job, answer) in batch.drain(..).zip(answers) {
            let _ = job.answer.send(answer);
        }
    }
    fail(batch.drain(..), &retired_error());
}

/// Sends `calls` (one per slot, pipelined in one round trip) and returns
/// each one's reply; the code is loaded again once if the server lost it.
async fn send(
    conn: &mut MultiplexedConnection,
    runner: Runner,
    batching: &Batching,
    calls: &[Assembled<'_>],
) -> redis::RedisResult<Vec<redis::RedisResult<Vec<i64>>>> {
    let replies = call(conn, runner, batching, calls).await?;
    if replies
        .iter()
        .any(|reply| reply.as_ref().is_err_and(Code::is_missing))
    {
        // Loaded again the way the server now allows (an ACL may have
        // changed since the connection was made).
        let runner = batching.code.load(conn).await?;
        return call(conn, runner, batching, calls).await;
    }
    Ok(replies)
}

/// `calls` in one round trip.
async fn call(
    conn: &mut MultiplexedConnection,
    runner: Runner,
    batching: &Batching,
    calls: &[Assembled<'_>],
) -> redis::RedisResult<Vec<redis::RedisResult<Vec<i64>>>> {
    let cmd = |call| batching.code.call(runner, &batching.time, call);
    if let [only] = calls {
        // One slot: one command, and its error is the call's.
        return Ok(vec![cmd(only).query_async(conn).await]);
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for call in calls {
        pipe.add_command(cmd(call));
    }
    let values: Vec<redis::Value> = pipe.query_async(conn).await?;
    Ok(values
        .into_iter()
        .map(|value| match value {
            redis::Value::ServerError(error) => Err(redis::RedisError::from(error)),
            value => redis::from_redis_value(value).map_err(redis::RedisError::from),
        })
        .collect())
}

/// Each of `decisions` its part of one call's `reply`.
pub(crate) fn share_out(
    decisions: &[&Encoded],
    layout: &Layout,
    reply: redis::RedisResult<Vec<i64>>,
) -> Vec<Answer> {
    let parts = reply.and_then(|ints| {
        layout.split(decisions, &ints).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "a reply of the wrong shape",
                e.0,
            ))
        })
    });
    match parts {
        Ok((now, parts)) => parts.into_iter().map(|part| Ok((now, part))).collect(),
        Err(error) => vec![Err(error); decisions.len()],
    }
}

fn fail(jobs: impl Iterator<Item = Job>, error: &redis::RedisError) {
    for job in jobs {
        let _ = job.answer.send(Err(error.clone()));
    }
}

fn retired_error() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "the connection was retired",
    ))
}

/// The ranges of `batch` (sorted by slot) that share a slot.
fn slot_groups(batch: &[Job]) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..=batch.len() {
        if i == batch.len() || batch[i].slot != batch[start].slot {
            groups.push(start..i);
            start = i;
        }
    }
    groups
}
