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
use super::decide::{Code, Encoded, Runner};
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
}

impl Batching {
    /// The batching of a store whose calls have `store_timeout` and whose
    /// keys get up to `expiry_jitter` more TTL. A call is silent past five
    /// deadlines (at least 250 ms): long enough for a slow Redis, short
    /// enough to replace a dead socket well within a second.
    pub(crate) fn new(store_timeout: Duration, expiry_jitter: Duration) -> Arc<Self> {
        Arc::new(Self {
            code: Arc::new(Code::new()),
            time: ScriptTime::with_jitter(expiry_jitter),
            stall_timeout: (store_timeout * 5).max(Duration::from_millis(250)),
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
        let result = tokio::time::timeout(
            batching.stall_timeout,
            send(&mut conn, live.runner(), &batching, &batch, &groups),
        )
        .await;
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
        match result {
            Ok(Ok(replies)) => {
                let mut jobs = batch.drain(..);
                for (range, reply) in groups.iter().zip(replies) {
                    answer(jobs.by_ref().take(range.len()), reply);
                }
            }
            Ok(Err(error)) => fail(batch.drain(..), &error),
            Err(_) => fail(
                batch.drain(..),
                &redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "redis did not answer",
                )),
            ),
        }
    }
    fail(batch.drain(..), &retired_error());
}

/// Sends the groups of `batch` (one call per slot, pipelined in one round
/// trip) and returns each group's reply; the code is loaded again once if
/// the server lost it.
async fn send(
    conn: &mut MultiplexedConnection,
    runner: Runner,
    batching: &Batching,
    batch: &[Job],
    groups: &[std::ops::Range<usize>],
) -> redis::RedisResult<Vec<redis::RedisResult<Vec<i64>>>> {
    let replies = call(conn, runner, batching, batch, groups).await?;
    if replies
        .iter()
        .any(|reply| reply.as_ref().is_err_and(Code::is_missing))
    {
        // Loaded again the way the server now allows (an ACL may have
        // changed since the connection was made).
        let runner = batching.code.load(conn).await?;
        return call(conn, runner, batching, batch, groups).await;
    }
    Ok(replies)
}

/// One call per group of the batch, in one round trip.
async fn call(
    conn: &mut MultiplexedConnection,
    runner: Runner,
    batching: &Batching,
    batch: &[Job],
    groups: &[std::ops::Range<usize>],
) -> redis::RedisResult<Vec<redis::RedisResult<Vec<i64>>>> {
    let cmd = |range: &std::ops::Range<usize>| {
        batching.code.call(
            runner,
            &batching.time,
            batch[range.clone()].iter().map(|job| &job.decision),
        )
    };
    if let [only] = groups {
        // One slot: one command, and its error is the call's.
        return Ok(vec![cmd(only).query_async(conn).await]);
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for range in groups {
        pipe.add_command(cmd(range));
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

/// Hands each of `jobs` its part of one call's `reply`: `now`, then its
/// integers in order.
fn answer(jobs: impl Iterator<Item = Job>, reply: redis::RedisResult<Vec<i64>>) {
    let ints = match reply {
        Ok(ints) => ints,
        Err(error) => return fail(jobs, &error),
    };
    let Some(&now) = ints.first() else {
        return fail(jobs, &protocol_error("an empty reply"));
    };
    let mut at = 1;
    for job in jobs {
        let n = job.decision.reply_len();
        let answer = match ints.get(at..at + n) {
            Some(part) => Ok((now, part.to_vec())),
            None => Err(protocol_error("a reply too short for its decisions")),
        };
        at += n;
        let _ = job.answer.send(answer);
    }
}

fn protocol_error(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, what))
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
