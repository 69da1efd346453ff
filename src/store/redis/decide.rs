//! The Redis side of a decision: the code Redis runs (`ratekeeper.lua`, as
//! a function library or a script), the command that runs it on a call's
//! decisions (assembled by [`super::encode`]), and how each decision's
//! part of the answer becomes outcomes.
//!
//! The script only decides and writes (a run of plain fixed-window hits
//! only counts); it returns, per hit, whether it was allowed and the state
//! its key had when the decision began. The outcome
//! (remaining, reset, retry) is computed here by running the Rust algorithms
//! (`algorithm::apply_batch`) on those states, and their verdicts must match
//! the script's: a mismatch is a bug, answered as a protocol error. So the
//! Rust code is the spec in production too, and Lua stays small.

use redis::{Cmd, Script};

use super::ScriptTime;
use super::encode::{Assembled, REPLY_PER_HIT, RUN};
use crate::algorithm::{AlgorithmKind, BatchHit, Mode, Outcome, StateView, Stored, apply_batch};
use crate::rules::key;
use crate::store::StoreError;

/// The Lua source (see its header for KEYS, ARGV and the reply).
const BODY: &str = include_str!("ratekeeper.lua");

/// How a connection runs the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Runner {
    /// `FCALL` of the function library: nothing is defined per call.
    Function,
    /// `EVALSHA` of the script: where functions are unavailable (Redis
    /// before 7, or an ACL that forbids `FUNCTION`).
    Script,
}

/// The code in both forms, named after its own hash, so that ratekeeper
/// versions with different code coexist in one Redis during a rollout.
#[derive(Debug)]
pub(crate) struct Code {
    library: String,
    function: String,
    script: Script,
}

impl Code {
    pub(crate) fn new() -> Self {
        let version = Script::new(BODY).get_hash()[..16].to_owned();
        let function = format!("ratekeeper_decide_{version}");
        Self {
            library: format!(
                "#!lua name=ratekeeper_{version}\n{BODY}\nredis.register_function{{function_name='{function}', callback=decide_all}}\n"
            ),
            function,
            script: Script::new(&format!("{BODY}\nreturn decide_all(KEYS, ARGV)\n")),
        }
    }

    /// Makes the code available on `conn`, as a function library if Redis
    /// allows, else as a script.
    ///
    /// # Errors
    ///
    /// The error of loading the script when even that fails.
    pub(crate) async fn load(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<Runner> {
        let loaded: redis::RedisResult<String> = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.library)
            .query_async(conn)
            .await;
        match loaded {
            Ok(_) => Ok(Runner::Function),
            Err(error) if super::lane::retire_reason(&error).is_some() => Err(error),
            Err(error) => {
                tracing::debug!(%error, "redis functions unavailable; using EVALSHA");
                self.script.prepare_invoke().load_async(conn).await?;
                Ok(Runner::Script)
            }
        }
    }

    /// The call carrying `call`'s decisions, run by `runner`.
    pub(crate) fn call(&self, runner: Runner, time: &ScriptTime, call: &Assembled<'_>) -> Cmd {
        let mut cmd = match runner {
            Runner::Function => {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg(&self.function);
                cmd
            }
            Runner::Script => {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.script.get_hash());
                cmd
            }
        };
        let now = time.now_ms();
        // The window each run expects, so that its keys go windowed and the
        // script uses them as they are (see `run` in ratekeeper.lua).
        let expected = now.unwrap_or_else(|| time.expected_now_ms());
        cmd.arg(call.keys.len());
        let mut at = 0;
        let mut windowed = Vec::new();
        for run in &call.runs {
            let number = key::window_number(expected, run.window_ms);
            for key in &call.keys[at..at + run.len] {
                windowed.clear();
                windowed.extend_from_slice(key);
                key::push_window(&mut windowed, number);
                cmd.arg(windowed.as_slice());
            }
            at += run.len;
        }
        for key in &call.keys[at..] {
            cmd.arg(*key);
        }
        match now {
            Some(now) => cmd.arg(now),
            None => cmd.arg(""),
        };
        cmd.arg(time.jitter_ms()).arg(time.grace_ms());
        for run in &call.runs {
            cmd.arg(RUN)
                .arg(run.len)
                .arg(run.window_ms)
                .arg(run.hits)
                .arg(key::window_number(expected, run.window_ms));
        }
        for arg in &call.args {
            cmd.arg(*arg);
        }
        cmd
    }

    /// Whether `error` says the code is gone (a `SCRIPT FLUSH` or
    /// `FUNCTION FLUSH`, a new server) and must be loaded again.
    pub(crate) fn is_missing(error: &redis::RedisError) -> bool {
        error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
            || error
                .detail()
                .is_some_and(|d| d.contains("Function not found"))
    }
}

/// The outcomes of `hits` from the script's answer: `now` and three
/// integers per hit.
///
/// # Errors
///
/// [`StoreError::Protocol`] when the answer is malformed or the script
/// decided otherwise than the Rust algorithms would.
pub(crate) fn outcomes(
    hits: &[BatchHit<'_>],
    mode: Mode,
    now: i64,
    found: &[i64],
) -> Result<Vec<Outcome>, StoreError> {
    let non_negative =
        |v: i64| u64::try_from(v).map_err(|_| StoreError::Protocol(format!("negative value {v}")));
    if found.len() != hits.len() * REPLY_PER_HIT {
        return Err(StoreError::Protocol(format!(
            "expected {} integers, got {}",
            hits.len() * REPLY_PER_HIT,
            found.len()
        )));
    }
    let now = non_negative(now)?;
    let mut view = FoundView::default();
    for (hit, found) in hits.iter().zip(found.chunks_exact(REPLY_PER_HIT)) {
        let (x, y) = (non_negative(found[1])?, non_negative(found[2])?);
        view.seed(hit.key, found_state(hit, now, x, y));
    }
    let outcomes = apply_batch(&mut view, hits, mode, now);
    for (i, (outcome, found)) in outcomes
        .iter()
        .zip(found.chunks_exact(REPLY_PER_HIT))
        .enumerate()
    {
        if outcome.allowed != (found[0] == 1) {
            return Err(StoreError::Protocol(format!(
                "the script judged hit {i} otherwise than its Rust twin ({found:?} at {now})"
            )));
        }
    }
    Ok(outcomes)
}

/// The state a hit's key had, in the algorithms' form.
fn found_state(hit: &BatchHit<'_>, now: u64, x: u64, y: u64) -> Option<Stored> {
    if x == 0 && y == 0 {
        return None;
    }
    let state = match hit.algorithm {
        AlgorithmKind::FixedWindow | AlgorithmKind::SlidingWindow => {
            let w = hit.quota.window_ms;
            [now - now % w, x, y]
        }
        AlgorithmKind::TokenBucket => [x, y, 0],
    };
    Some(Stored {
        state,
        expires_at_ms: u64::MAX,
    })
}

/// The states a decision found, then changed as `apply_batch` goes (also
/// read by the envoy-ratelimit layout's script replies).
#[derive(Default)]
pub(crate) struct FoundView<'k> {
    states: Vec<(&'k [u8], Option<Stored>)>,
}

impl<'k> FoundView<'k> {
    /// The state `key` was found in (the first one seeded counts).
    pub(crate) fn seed(&mut self, key: &'k [u8], stored: Option<Stored>) {
        if !self.states.iter().any(|(k, _)| *k == key) {
            self.states.push((key, stored));
        }
    }
}

impl<'k> StateView<'k> for FoundView<'k> {
    fn load(&mut self, key: &'k [u8]) -> Option<Stored> {
        self.states
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, s)| *s)
    }

    fn store(&mut self, key: &'k [u8], stored: Option<Stored>) {
        match self.states.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = stored,
            None => self.states.push((key, stored)),
        }
    }
}
