//! The envoy-ratelimit key layout in Redis: counting in envoyproxy/ratelimit's
//! own keys with its own commands, so that during a rolling migration old and
//! new instances enforce one limit.
//!
//! Every limit upstream can express (a fixed window of one unit) is counted
//! in upstream's key (`rules::envoy_key`); the others keep ratekeeper's keys
//! and code, since no old instance counts them. Upstream's keys are read and
//! written as upstream does:
//!
//! - **Time** is this host's clock in seconds, read once per request, as
//!   upstream reads its own: the window start is part of the key, so the
//!   windows agree with the old instances' exactly as far as the hosts'
//!   clocks agree (Redis's `TIME`, which ratekeeper's own keys use, could
//!   put a window boundary elsewhere than the old instances see it).
//! - **Envoy's independent hits** are exactly upstream's commands: per hit
//!   `INCRBY key hits` then `EXPIRE key unit + jitter` (jitter drawn from
//!   `[0, max)` whole seconds per key), pipelined, each decided from its
//!   `INCRBY` reply — a check of 0 hits included, which (as upstream's)
//!   creates the key at 0.
//! - **The other modes** (all-or-nothing and dry runs, upstream's
//!   stop-increment) run one Lua script on the same keys (`upstream.lua`):
//!   `GET`, decide, then `INCRBY` + `EXPIRE` for what is counted. A script is
//!   atomic in Redis and leaves the keys as upstream's commands would, so it
//!   mixes with old instances' `INCRBY`s. (Upstream's own stop-increment
//!   reads in one round trip and counts in another: a race this closes.)
//!
//! A request whose limits all live in one layout is one call; one that
//! mixes upstream's keys with ratekeeper's is decided in two groups
//! ([`crate::store::groups`]). What a call looks like on a single node and
//! on a cluster is in the stores (`redis::upstream_keys`,
//! `redis_cluster::upstream_keys`); this module builds the commands and reads
//! the replies.

use std::sync::Arc;

use redis::{Cmd, Script};

use crate::algorithm::Algorithm as _;
use crate::algorithm::{BatchHit, FixedWindow, Mode, Outcome, Stored, apply_batch};
use crate::clock::Clock;
use crate::rules::{KeyLayout, envoy_key};
use crate::store::StoreError;
use crate::store::redis::decide::FoundView;

/// The script of the modes upstream has no plain commands for.
const SCRIPT: &str = include_str!("upstream.lua");

/// Where upstream's keys are counted, and how.
pub struct EnvoyLayout {
    prefix: Arc<str>,
    clock: Arc<dyn Clock>,
    jitter_max_seconds: u64,
    script: Script,
}

/// A request's hits as this layout sees them: the time it is decided at,
/// and for each hit its upstream key, if its limit is upstream's.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub now_ms: u64,
    keys: Vec<Option<UpstreamKey>>,
}

#[derive(Debug)]
struct UpstreamKey {
    key: Vec<u8>,
    unit_seconds: u64,
}

/// Some upstream hits of one request, decided together in one mode: the
/// commands that carry them and how the replies become outcomes.
#[derive(Debug)]
pub(crate) struct UpstreamCall<'r> {
    /// The hits, each with its full upstream key.
    hits: Vec<BatchHit<'r>>,
    /// Per hit, the TTL its key gets: the unit plus jitter.
    ttls: Vec<u64>,
    mode: Mode,
    now_ms: u64,
    script: &'r Script,
}

// === impl EnvoyLayout ===

impl EnvoyLayout {
    /// Upstream's keys with `prefix` (its `CACHE_KEY_PREFIX`), windows by
    /// `clock`, and up to `jitter_max_seconds` (exclusive; whole seconds,
    /// its `EXPIRATION_JITTER_MAX_SECONDS`) added to each key's TTL.
    pub fn new(
        prefix: impl Into<Arc<str>>,
        clock: Arc<dyn Clock>,
        jitter_max_seconds: u64,
    ) -> Self {
        Self {
            prefix: prefix.into(),
            clock,
            jitter_max_seconds,
            script: Script::new(SCRIPT),
        }
    }

    /// The key layout the limiter must build keys in.
    pub fn key_layout(&self) -> KeyLayout {
        KeyLayout::EnvoyRatelimit {
            prefix: self.prefix.clone(),
        }
    }

    /// `hits` at this moment: each hit whose limit is upstream's gets its
    /// key (the limiter built its stem) for the current window.
    pub(crate) fn resolve(&self, hits: &[BatchHit<'_>]) -> Resolved {
        let now_ms = self.clock.now_ms();
        let keys = hits
            .iter()
            .map(|hit| {
                envoy_key::unit_seconds(hit.algorithm, hit.quota.window_ms).map(|unit_seconds| {
                    UpstreamKey {
                        key: envoy_key::window_key(hit.key, unit_seconds, now_ms / 1_000),
                        unit_seconds,
                    }
                })
            })
            .collect();
        Resolved { now_ms, keys }
    }

    /// The hits at `indexes` of `hits` (all upstream's in `resolved`) as one
    /// call in `mode`.
    pub(crate) fn call<'r>(
        &'r self,
        resolved: &'r Resolved,
        hits: &[BatchHit<'_>],
        indexes: &[usize],
        mode: Mode,
    ) -> UpstreamCall<'r> {
        // (Only upstream hits are given; another would be left out, and the
        // call's answer found short.)
        let (hits, ttls) = indexes
            .iter()
            .filter_map(|&i| Some((i, resolved.keys[i].as_ref()?)))
            .map(|(i, upstream)| {
                let hit = BatchHit {
                    key: &upstream.key,
                    algorithm: hits[i].algorithm,
                    quota: hits[i].quota,
                    hits: hits[i].hits,
                    enforced: hits[i].enforced,
                };
                (hit, upstream.unit_seconds + self.jitter())
            })
            .unzip();
        UpstreamCall {
            hits,
            ttls,
            mode,
            now_ms: resolved.now_ms,
            script: &self.script,
        }
    }

    /// Upstream's jitter: `[0, max)` seconds, none when max is 0.
    fn jitter(&self) -> u64 {
        match self.jitter_max_seconds {
            0 => 0,
            max => fastrand::u64(0..max),
        }
    }
}

impl std::fmt::Debug for EnvoyLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvoyLayout")
            .field("prefix", &self.prefix)
            .field("jitter_max_seconds", &self.jitter_max_seconds)
            .finish()
    }
}

// === impl Resolved ===

impl Resolved {
    /// Whether hit `i` counts in upstream's key.
    pub(crate) fn is_upstream(&self, i: usize) -> bool {
        self.keys[i].is_some()
    }

    /// Whether any hit counts in upstream's keys.
    pub(crate) fn any_upstream(&self) -> bool {
        self.keys.iter().any(Option::is_some)
    }

    /// The upstream key of hit `i`, if it has one.
    pub(crate) fn key(&self, i: usize) -> Option<&[u8]> {
        self.keys[i].as_ref().map(|k| k.key.as_slice())
    }

    /// The indexes of the upstream hits and of the others.
    pub(crate) fn partition(&self) -> (Vec<usize>, Vec<usize>) {
        (0..self.keys.len()).partition(|&i| self.is_upstream(i))
    }
}

// === impl UpstreamCall ===

impl UpstreamCall<'_> {
    /// Whether the call is the script (else plain `INCRBY` + `EXPIRE`).
    pub(crate) fn is_script(&self) -> bool {
        self.mode != Mode::Independent
    }

    /// Its hits.
    pub(crate) fn len(&self) -> usize {
        self.hits.len()
    }

    /// The commands of the whole call: one script call, or two commands per
    /// hit.
    pub(crate) fn commands(&self) -> Vec<Cmd> {
        if self.is_script() {
            vec![self.script_command()]
        } else {
            (0..self.hits.len())
                .flat_map(|i| self.counting_commands(i))
                .collect()
        }
    }

    /// Upstream's two commands for hit `i`.
    pub(crate) fn counting_commands(&self, i: usize) -> [Cmd; 2] {
        let hit = &self.hits[i];
        let mut incrby = redis::cmd("INCRBY");
        incrby.arg(hit.key).arg(hit.hits);
        let mut expire = redis::cmd("EXPIRE");
        expire.arg(hit.key).arg(self.ttls[i]);
        [incrby, expire]
    }

    /// The script's call (header of `upstream.lua`).
    pub(crate) fn script_command(&self) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(self.hits.len());
        for hit in &self.hits {
            cmd.arg(hit.key);
        }
        cmd.arg(script_mode(self.mode));
        for (hit, ttl) in self.hits.iter().zip(&self.ttls) {
            cmd.arg(hit.hits)
                .arg(hit.quota.limit)
                .arg(u8::from(hit.enforced))
                .arg(*ttl);
        }
        cmd
    }

    /// Loads the script on `conn` (after the server said it lacks it).
    ///
    /// # Errors
    ///
    /// The server's, when it refuses the script.
    pub(crate) async fn load_script(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        self.script.load_async(conn).await.map(drop)
    }

    /// The outcomes from the replies of [`UpstreamCall::commands`].
    ///
    /// # Errors
    ///
    /// The first command's error; [`StoreError::Protocol`] for replies of
    /// the wrong shape or a script that decided otherwise than the Rust
    /// algorithms.
    pub(crate) fn outcomes(&self, replies: Vec<redis::Value>) -> Result<Vec<Outcome>, StoreError> {
        if self.is_script() {
            let [reply] = <[redis::Value; 1]>::try_from(replies)
                .map_err(|r| StoreError::Protocol(format!("{} replies to one script", r.len())))?;
            let found: Vec<i64> = value(reply)?;
            return self.script_outcomes(&found);
        }
        if replies.len() != 2 * self.hits.len() {
            return Err(StoreError::Protocol(format!(
                "{} replies to {} INCRBY + EXPIRE",
                replies.len(),
                self.hits.len()
            )));
        }
        let mut replies = replies.into_iter();
        let mut outcomes = Vec::with_capacity(self.hits.len());
        for i in 0..self.hits.len() {
            let (incrby, expire) = (replies.next(), replies.next());
            let after: i64 = value(incrby.unwrap_or(redis::Value::Nil))?;
            let _: i64 = value(expire.unwrap_or(redis::Value::Nil))?;
            outcomes.push(self.counted(i, after));
        }
        Ok(outcomes)
    }

    /// Hit `i`'s outcome from its `INCRBY` reply (the count after it), as
    /// upstream decides: over the limit when the count passed it.
    pub(crate) fn counted(&self, i: usize, after: i64) -> Outcome {
        let hit = &self.hits[i];
        let before = u64::try_from(after).unwrap_or(0).saturating_sub(hit.hits);
        let state = [self.window_start(hit), before, 0];
        FixedWindow
            .evaluate(&hit.quota, state, hit.hits, self.now_ms)
            .outcome
    }

    /// The outcomes from the script's reply: two integers per hit.
    ///
    /// # Errors
    ///
    /// [`StoreError::Protocol`] for a reply of the wrong shape, or verdicts
    /// other than the Rust batch semantics give.
    pub(crate) fn script_outcomes(&self, found: &[i64]) -> Result<Vec<Outcome>, StoreError> {
        if found.len() != 2 * self.hits.len() {
            return Err(StoreError::Protocol(format!(
                "expected {} integers from the script, got {}",
                2 * self.hits.len(),
                found.len()
            )));
        }
        let mut view = FoundView::default();
        for (hit, reply) in self.hits.iter().zip(found.chunks_exact(2)) {
            let count = u64::try_from(reply[1])
                .map_err(|_| StoreError::Protocol(format!("a negative count {}", reply[1])))?;
            let stored = (count > 0).then_some(Stored {
                state: [self.window_start(hit), count, 0],
                expires_at_ms: u64::MAX,
            });
            view.seed(hit.key, stored);
        }
        let outcomes = apply_batch(&mut view, &self.hits, self.mode, self.now_ms);
        for (i, (outcome, reply)) in outcomes.iter().zip(found.chunks_exact(2)).enumerate() {
            if outcome.allowed != (reply[0] == 1) {
                return Err(StoreError::Protocol(format!(
                    "the script judged hit {i} otherwise than its Rust twin ({reply:?})"
                )));
            }
        }
        Ok(outcomes)
    }

    fn window_start(&self, hit: &BatchHit<'_>) -> u64 {
        self.now_ms - self.now_ms % hit.quota.window_ms
    }
}

fn script_mode(mode: Mode) -> u8 {
    match mode {
        Mode::AllOrNothing => 1,
        Mode::DryRun => 2,
        Mode::StopIncrementWhenOverLimit => 3,
        // Never scripted: upstream's own commands carry it.
        Mode::Independent => 0,
    }
}

/// A reply as `T`; a server error is the store's, anything else a protocol
/// error.
fn value<T: redis::FromRedisValue>(reply: redis::Value) -> Result<T, StoreError> {
    match reply {
        redis::Value::ServerError(error) => Err(crate::store::redis::store_error(
            &redis::RedisError::from(error),
        )),
        reply => redis::from_redis_value(reply)
            .map_err(|e| StoreError::Protocol(format!("unexpected reply: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::{AlgorithmKind, Quota};
    use crate::clock::ManualClock;

    const NOW_MS: u64 = 1_700_000_040_500;

    fn layout(jitter: u64) -> EnvoyLayout {
        EnvoyLayout::new("p:", Arc::new(ManualClock::new(NOW_MS)), jitter)
    }

    fn hit(
        stem: &'static [u8],
        algorithm: AlgorithmKind,
        window_ms: u64,
        hits: u64,
    ) -> BatchHit<'static> {
        BatchHit {
            key: stem,
            algorithm,
            quota: Quota {
                limit: 3,
                window_ms,
                burst: 3,
            },
            hits,
            enforced: true,
        }
    }

    #[test]
    fn only_upstreams_limits_get_upstreams_keys_for_the_current_window() {
        let hits = [
            hit(b"p:d_k_v_", AlgorithmKind::FixedWindow, 60_000, 1),
            hit(b"rk4:{x}", AlgorithmKind::TokenBucket, 60_000, 1),
            hit(b"p:d_k_w_", AlgorithmKind::FixedWindow, 3_600_000, 1),
        ];
        let resolved = layout(0).resolve(&hits);
        assert_eq!(resolved.key(0), Some(&b"p:d_k_v_1700000040"[..]));
        assert_eq!(resolved.key(1), None);
        assert_eq!(resolved.key(2), Some(&b"p:d_k_w_1699999200"[..]));
        assert_eq!(resolved.partition(), (vec![0, 2], vec![1]));
    }

    #[test]
    fn independent_hits_are_upstreams_commands_with_jittered_ttls() {
        let layout = layout(5);
        let hits = [hit(b"p:d_k_v_", AlgorithmKind::FixedWindow, 60_000, 2)];
        let resolved = layout.resolve(&hits);
        for _ in 0..50 {
            let call = layout.call(&resolved, &hits, &[0], Mode::Independent);
            let [incrby, expire] = call.counting_commands(0);
            assert_eq!(incrby.args_iter().count(), 3);
            let args = |cmd: &Cmd| -> Vec<Vec<u8>> {
                cmd.args_iter()
                    .map(|a| match a {
                        redis::Arg::Simple(bytes) => bytes.to_vec(),
                        _ => Vec::new(),
                    })
                    .collect()
            };
            assert_eq!(args(&incrby), [&b"INCRBY"[..], b"p:d_k_v_1700000040", b"2"]);
            let ttl: u64 = String::from_utf8(args(&expire)[2].clone())
                .unwrap()
                .parse()
                .unwrap();
            assert!((60..65).contains(&ttl), "{ttl}");
        }
    }

    #[test]
    fn counted_hits_are_judged_from_the_incrby_reply() {
        let layout = layout(0);
        let hits = [hit(b"p:d_k_v_", AlgorithmKind::FixedWindow, 60_000, 1)];
        let resolved = layout.resolve(&hits);
        let call = layout.call(&resolved, &hits, &[0], Mode::Independent);
        let at = call.counted(0, 3);
        assert!(at.allowed);
        assert_eq!(at.remaining, 0);
        // Half a second into the minute.
        assert_eq!(at.reset_after_ms, 59_500);
        let over = call.counted(0, 4);
        assert!(!over.allowed);
        assert_eq!(over.retry_after_ms, Some(59_500));
    }

    #[test]
    fn script_replies_are_checked_against_the_rust_semantics() {
        let layout = layout(0);
        let hits = [
            hit(b"p:a_", AlgorithmKind::FixedWindow, 60_000, 1),
            hit(b"p:b_", AlgorithmKind::FixedWindow, 60_000, 1),
        ];
        let resolved = layout.resolve(&hits);
        let call = layout.call(&resolved, &hits, &[0, 1], Mode::AllOrNothing);
        // a is full: denied; b found at 1, judged allowed, not taken.
        let outcomes = call.script_outcomes(&[0, 3, 1, 1]).unwrap();
        assert!(!outcomes[0].allowed && outcomes[1].allowed);
        assert_eq!(outcomes[1].remaining, 2);
        // A script that says otherwise is a protocol error.
        assert!(matches!(
            call.script_outcomes(&[1, 3, 1, 1]),
            Err(StoreError::Protocol(_))
        ));
        assert!(matches!(
            call.script_outcomes(&[1, 3]),
            Err(StoreError::Protocol(_))
        ));
    }
}
