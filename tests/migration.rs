//! The migration key layout (`--key-layout envoy-ratelimit`): every limit
//! envoyproxy/ratelimit can express is counted in upstream's keys with
//! upstream's commands, so a fleet of old and new instances enforces one
//! limit. The old instances are emulated towards Redis
//! (`common::upstream_emulator`: upstream's keys, `INCRBY` + `EXPIRE` pipelined,
//! decided from the `INCRBY` reply). Time is frozen — the test clock T0
//! in-process, the hidden `--test-frozen-clock-ms` flag for the binaries —
//! and the emulator uses the same time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::cluster::RedisCluster;
use common::process::Serve;
use common::sentinel::{MASTER, SentinelSet};
use common::upstream_emulator::{Limit, Status, Upstream};
use common::{RedisServer, T0, TestServer, allow_request, envoy_request, rules};
use futures::StreamExt as _;
use ratekeeper::Server;
use ratekeeper::api::EnvoyCounting;
use ratekeeper::clock::{Clock, ManualClock};
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ratekeeper::proto::ratekeeper::v1::ShouldAllowRequest;
use ratekeeper::store::envoy_layout::EnvoyLayout;
use tonic::transport::Channel;

const PREFIX: &str = "rl:";
/// A descriptor's entries.
type Entries<'a> = &'a [(&'a str, &'a str)];
/// T0 in Unix seconds: 40 s into a minute.
const NOW_S: u64 = T0 / 1_000;
const MINUTE: u64 = 60;
const HOUR: u64 = 3_600;

/// A ratekeeper in the envoy-ratelimit layout over a fresh Redis, and an
/// upstream instance on the same Redis.
struct Mixed {
    server: TestServer,
    redis: RedisServer,
    upstream: Upstream,
    _clock: Arc<ManualClock>,
}

impl Mixed {
    async fn start(rules_yaml: &str, jitter_max_seconds: u64, counting: EnvoyCounting) -> Self {
        let redis = RedisServer::start();
        let clock = Arc::new(ManualClock::new(T0));
        let store = common::redis_store(&redis.url(), Duration::from_secs(2))
            .with_clock(clock.clone() as Arc<dyn Clock>)
            .with_envoy_layout(EnvoyLayout::new(PREFIX, clock.clone(), jitter_max_seconds));
        let server =
            Server::new(rules(&[rules_yaml]), Arc::new(store)).with_envoy_counting(counting);
        let server = TestServer::start(server).await;
        let upstream = Upstream::on(&redis.url())
            .await
            .with_prefix(PREFIX)
            .with_jitter(jitter_max_seconds);
        Mixed {
            server,
            redis,
            upstream,
            _clock: clock,
        }
    }

    async fn envoy(&self, descriptors: &[&[(&str, &str)]], hits: u32) -> RateLimitResponse {
        let mut request = envoy_request("d", descriptors);
        request.hits_addend = hits;
        self.server
            .envoy()
            .await
            .should_rate_limit(request)
            .await
            .unwrap()
            .into_inner()
    }

    async fn allow(&self, descriptors: &[&[(&str, &str)]], cost: u64, dry_run: bool) -> bool {
        let request = ShouldAllowRequest {
            dry_run,
            ..allow_request("d", descriptors, cost)
        };
        self.server
            .client()
            .await
            .should_allow(request)
            .await
            .unwrap()
            .into_inner()
            .allowed
    }

    fn get(&self, key: &str) -> Option<u64> {
        redis::cmd("GET")
            .arg(key)
            .query(&mut self.redis.connection())
            .unwrap()
    }

    fn pttl(&self, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query(&mut self.redis.connection())
            .unwrap()
    }

    fn key(&self, entries: &[(&str, &str)], unit_seconds: u64) -> String {
        self.upstream.key("d", entries, unit_seconds, NOW_S)
    }
}

/// The Envoy answer's per-descriptor statuses in the emulator's terms.
fn statuses(response: &RateLimitResponse) -> Vec<Status> {
    response
        .statuses
        .iter()
        .map(|s| Status {
            over_limit: s.code == Code::OverLimit as i32,
            limit_remaining: u64::from(s.limit_remaining),
            duration_until_reset: s
                .duration_until_reset
                .as_ref()
                .map_or(0, |d| d.seconds as u64),
        })
        .collect()
}

/// Every key Redis writes, as (event, key) in order: keyspace notifications
/// report each `incrby`, `expire`, `hincrby`… however short the key lives.
async fn key_events(redis: &RedisServer) -> tokio::sync::mpsc::UnboundedReceiver<(String, String)> {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("KEA")
        .query(&mut redis.connection())
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe("__keyevent@0__:*").await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let event = message
                .get_channel_name()
                .trim_start_matches("__keyevent@0__:")
                .to_owned();
            let key: String = message.get_payload().unwrap();
            if tx.send((event, key)).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next `n` events (each within 10 s).
async fn next_events(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    n: usize,
) -> Vec<(String, String)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} events: {got:?}", got.len()))
            .unwrap();
        got.push(event);
    }
    got
}

fn counted(key: &str) -> Vec<(String, String)> {
    vec![
        ("incrby".to_owned(), key.to_owned()),
        ("expire".to_owned(), key.to_owned()),
    ]
}

// ------------------------------------------------------- keys and TTLs ---

const KEY_RULES: &str = r#"
domain: d
descriptors:
  - {key: unit, value: second, rate_limit: {unit: second, requests_per_unit: 10}}
  - {key: unit, value: minute, rate_limit: {unit: minute, requests_per_unit: 10}}
  - {key: unit, value: hour, rate_limit: {unit: hour, requests_per_unit: 10}}
  - {key: unit, value: day, rate_limit: {unit: day, requests_per_unit: 10}}
  - {key: unit, value: week, rate_limit: {unit: week, requests_per_unit: 10}}
  - {key: unit, value: month, rate_limit: {unit: month, requests_per_unit: 10}}
  - {key: unit, value: year, rate_limit: {unit: year, requests_per_unit: 10}}
  - key: tenant
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 10}
  - key: path
    value: /files/*
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 10}
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 10}
"#;

/// Each Envoy hit is upstream's `INCRBY` then `EXPIRE` of upstream's key:
/// the prefix, every entry, the window start of its unit (every unit), a
/// shared wildcard's pattern and any other wildcard's runtime value — and
/// nothing else is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_hits_write_upstreams_keys_with_upstreams_commands() {
    let mixed = Mixed::start(KEY_RULES, 0, EnvoyCounting::EveryHit).await;
    let mut events = key_events(&mixed.redis).await;
    let units = [
        ("second", 1),
        ("minute", 60),
        ("hour", 3_600),
        ("day", 86_400),
        ("week", 604_800),
        ("month", 2_592_000),
        ("year", 31_536_000),
    ];
    for (unit, seconds) in units {
        let response = mixed.envoy(&[&[("unit", unit)]], 1).await;
        assert_eq!(response.overall_code, Code::Ok as i32);
        let key = mixed.key(&[("unit", unit)], seconds);
        assert_eq!(next_events(&mut events, 2).await, counted(&key), "{unit}");
    }
    // The window starts as upstream computes them, written out.
    assert_eq!(
        mixed.key(&[("unit", "minute")], MINUTE),
        "rl:d_unit_minute_1699999980"
    );
    assert_eq!(
        mixed.key(&[("unit", "year")], 31_536_000),
        "rl:d_unit_year_1671408000"
    );

    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("tenant", "acme"), ("user", "a_b")],
            "rl:d_tenant_acme_user_a_b_1699999980",
        ),
        (&[("path", "/files/a.pdf")], "rl:d_path_/files/*_1699999980"),
        (&[("path", "/files/b.csv")], "rl:d_path_/files/*_1699999980"),
        (&[("path", "/api/users")], "rl:d_path_/api/users_1699999980"),
    ];
    for (entries, key) in cases {
        mixed.envoy(&[entries], 1).await;
        assert_eq!(
            next_events(&mut events, 2).await,
            counted(key),
            "{entries:?}"
        );
    }
    assert_eq!(mixed.get("rl:d_path_/files/*_1699999980"), Some(2));
    // Several descriptors: one pair each, in order (one pipeline).
    mixed
        .envoy(&[&[("unit", "hour")], &[("unit", "day")]], 2)
        .await;
    let hour = mixed.key(&[("unit", "hour")], HOUR);
    let day = mixed.key(&[("unit", "day")], 86_400);
    assert_eq!(
        next_events(&mut events, 4).await,
        [counted(&hour), counted(&day)].concat()
    );
    assert_eq!(mixed.get(&hour), Some(3));
}

/// TTL: the unit, plus upstream's jitter in whole seconds when it is on;
/// the script's writes (`ShouldAllow`) get the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_live_for_their_unit_plus_upstreams_jitter() {
    let plain = Mixed::start(KEY_RULES, 0, EnvoyCounting::EveryHit).await;
    plain.envoy(&[&[("unit", "minute")]], 1).await;
    plain.envoy(&[&[("unit", "hour")]], 1).await;
    assert!(plain.allow(&[&[("unit", "day")]], 1, false).await);
    for (unit, seconds) in [("minute", MINUTE), ("hour", HOUR), ("day", 86_400)] {
        let ttl = plain.pttl(&plain.key(&[("unit", unit)], seconds));
        let full = (seconds * 1_000) as i64;
        assert!(full - 2_000 < ttl && ttl <= full, "{unit}: {ttl}");
    }

    let jittered = Mixed::start(KEY_RULES, 300, EnvoyCounting::EveryHit).await;
    let mut longest = 0;
    for i in 0..40 {
        let user = format!("u{i}");
        let entries = [("tenant", "acme"), ("user", user.as_str())];
        if i % 2 == 0 {
            jittered.envoy(&[&entries], 1).await;
        } else {
            assert!(jittered.allow(&[&entries], 1, false).await);
        }
        let ttl = jittered.pttl(&jittered.key(&entries, MINUTE));
        assert!(58_000 < ttl && ttl <= 359_000, "{ttl}");
        // Whole seconds: EXPIRE, not PEXPIRE.
        longest = longest.max(ttl);
    }
    assert!(longest > 60_000, "no key got any jitter: {longest}");
}

// ------------------------------------------------------ both directions ---

const LIMIT_RULES: &str = r#"
domain: d
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: team
    rate_limit: {unit: hour, requests_per_unit: 3}
"#;

const USER: Limit = Limit {
    requests_per_unit: 5,
    unit_seconds: MINUTE,
};
const TEAM: Limit = Limit {
    requests_per_unit: 3,
    unit_seconds: HOUR,
};

/// The emulator reads what ratekeeper wrote and ratekeeper reads what the
/// emulator wrote, through both APIs, and both answer alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_shared_with_upstream_in_both_directions() {
    let mixed = Mixed::start(LIMIT_RULES, 0, EnvoyCounting::EveryHit).await;
    let user: &[(&str, &str)] = &[("user", "alice")];

    // ratekeeper counts 3, upstream goes on from there.
    let response = mixed.envoy(&[user], 3).await;
    let ours = statuses(&response);
    assert_eq!(ours[0].limit_remaining, 2);
    let theirs = mixed
        .upstream
        .should_rate_limit("d", &[(user, USER)], 1, NOW_S)
        .await;
    assert_eq!(
        theirs,
        [Status {
            over_limit: false,
            limit_remaining: 1,
            duration_until_reset: 20,
        }]
    );
    assert_eq!(ours[0].duration_until_reset, theirs[0].duration_until_reset);
    // upstream takes the last one; ratekeeper sees the limit reached.
    mixed
        .upstream
        .should_rate_limit("d", &[(user, USER)], 1, NOW_S)
        .await;
    assert!(!mixed.allow(&[user], 1, false).await);
    let response = mixed.envoy(&[user], 1).await;
    assert_eq!(response.overall_code, Code::OverLimit as i32);
    // A rejected Envoy hit counts, as upstream's do; a denied ShouldAllow
    // does not.
    assert_eq!(mixed.get(&mixed.key(user, MINUTE)), Some(6));

    // The other way: upstream counts 2, ShouldAllow takes the last one.
    let team: &[(&str, &str)] = &[("team", "blue")];
    mixed
        .upstream
        .should_rate_limit("d", &[(team, TEAM)], 2, NOW_S)
        .await;
    assert!(!mixed.allow(&[team], 2, false).await);
    assert!(mixed.allow(&[team], 1, false).await);
    let theirs = mixed
        .upstream
        .should_rate_limit("d", &[(team, TEAM)], 1, NOW_S)
        .await;
    assert!(theirs[0].over_limit);
    assert_eq!(mixed.get(&mixed.key(team, HOUR)), Some(4));
}

/// The script modes on upstream's keys: all-or-nothing takes nothing from
/// any key when one is full, a dry run writes nothing, and stop-increment
/// counts only the over-limit descriptor (decided in one atomic step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_or_nothing_dry_runs_and_stop_increment_on_upstreams_keys() {
    let user: &[(&str, &str)] = &[("user", "bob")];
    let team: &[(&str, &str)] = &[("team", "red")];

    let mixed = Mixed::start(LIMIT_RULES, 0, EnvoyCounting::EveryHit).await;
    mixed
        .upstream
        .should_rate_limit("d", &[(team, TEAM)], 3, NOW_S)
        .await;
    assert!(mixed.allow(&[user], 2, true).await, "dry run fits");
    assert!(!mixed.allow(&[user, team], 1, false).await, "team is full");
    assert_eq!(mixed.get(&mixed.key(user, MINUTE)), None, "nothing taken");
    assert!(mixed.allow(&[user], 2, false).await);
    assert_eq!(mixed.get(&mixed.key(user, MINUTE)), Some(2));
    assert_eq!(mixed.get(&mixed.key(team, HOUR)), Some(3));

    let stop = Mixed::start(LIMIT_RULES, 0, EnvoyCounting::StopWhenOverLimit).await;
    stop.upstream
        .should_rate_limit("d", &[(team, TEAM)], 3, NOW_S)
        .await;
    let response = stop.envoy(&[user, team], 1).await;
    let answer = statuses(&response);
    assert!(!answer[0].over_limit && answer[1].over_limit);
    // Judged, not counted: what is left before this request (as upstream's
    // INCRBY 0 reports it).
    assert_eq!(answer[0].limit_remaining, 5);
    assert_eq!(stop.get(&stop.key(user, MINUTE)), None, "user not counted");
    assert_eq!(stop.get(&stop.key(team, HOUR)), Some(4), "team counted");
    // With nothing over, every descriptor counts.
    let other: &[(&str, &str)] = &[("team", "green")];
    stop.envoy(&[user, other], 1).await;
    assert_eq!(stop.get(&stop.key(user, MINUTE)), Some(1));
    assert_eq!(stop.get(&stop.key(other, HOUR)), Some(1));
}

const OWN_RULES: &str = r#"
domain: d
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: bucket
    rate_limit: {unit: minute, requests_per_unit: 2, algorithm: token_bucket}
  - key: five
    rate_limit: {unit: minute, unit_multiplier: 5, requests_per_unit: 10}
  - key: sixty
    rate_limit: {unit: second, unit_multiplier: 60, requests_per_unit: 10}
"#;

/// Limits upstream cannot express (another algorithm, a window of several
/// units) keep ratekeeper's keys; a window of exactly one unit, however
/// spelled, is upstream's. A request mixing both kinds is decided in two
/// groups: all-or-nothing still takes nothing when one denies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_upstream_cannot_express_keep_ratekeepers_keys() {
    let mixed = Mixed::start(OWN_RULES, 0, EnvoyCounting::EveryHit).await;
    let user: &[(&str, &str)] = &[("user", "carol")];
    let bucket: &[(&str, &str)] = &[("bucket", "b")];
    let five: &[(&str, &str)] = &[("five", "f")];
    let sixty: &[(&str, &str)] = &[("sixty", "s")];

    let response = mixed.envoy(&[user, bucket, five, sixty], 1).await;
    assert_eq!(response.overall_code, Code::Ok as i32);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut mixed.redis.connection())
        .unwrap();
    let mut upstream: Vec<&String> = keys.iter().filter(|k| k.starts_with(PREFIX)).collect();
    upstream.sort();
    let mut expected = [mixed.key(user, MINUTE), mixed.key(sixty, MINUTE)];
    expected.sort();
    assert_eq!(upstream, expected.iter().collect::<Vec<_>>(), "{keys:?}");
    assert_eq!(
        keys.len(),
        4,
        "two upstream keys and two of ratekeeper's: {keys:?}"
    );
    assert_eq!(
        keys.iter().filter(|k| k.starts_with("rk4:{")).count(),
        2,
        "{keys:?}"
    );

    // The bucket has 1 left: a cost of 2 is denied and takes nothing from
    // the user's upstream key; a cost of 1 takes from both.
    assert!(!mixed.allow(&[user, bucket], 2, false).await);
    assert_eq!(mixed.get(&mixed.key(user, MINUTE)), Some(1));
    assert!(mixed.allow(&[user, bucket], 1, false).await);
    assert_eq!(mixed.get(&mixed.key(user, MINUTE)), Some(2));
    assert!(
        !mixed.allow(&[user, bucket], 1, false).await,
        "bucket empty"
    );
    assert_eq!(mixed.get(&mixed.key(user, MINUTE)), Some(2));

    // Redis forgets both kinds of code (SCRIPT FLUSH, FUNCTION FLUSH): each
    // part of a pipeline that found its code gone is loaded again and sent
    // once more, alone; the part that ran is not run twice.
    let mut conn = mixed.redis.connection();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query(&mut conn)
        .unwrap();
    let response = mixed.envoy(&[user, five], 1).await;
    assert_eq!(response.overall_code, Code::Ok as i32);
    assert_eq!(statuses(&response)[1].limit_remaining, 8, "five: 2 of 10");
    assert_eq!(mixed.get(&mixed.key(user, MINUTE)), Some(3));
    assert!(mixed.allow(&[user], 1, false).await);
    assert_eq!(mixed.get(&mixed.key(user, MINUTE)), Some(4));
}

/// Upstream's commands and nothing else: an Envoy request is one `INCRBY`
/// and one `EXPIRE` per descriptor, a `ShouldAllow` one script call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_costs_redis_upstreams_commands() {
    let mixed = Mixed::start(LIMIT_RULES, 0, EnvoyCounting::EveryHit).await;
    let user: &[(&str, &str)] = &[("user", "dave")];
    let team: &[(&str, &str)] = &[("team", "x")];
    // Loads the script once (the cache is the server's).
    assert!(mixed.allow(&[team], 1, true).await);
    let mut conn = mixed.redis.connection();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut conn)
        .unwrap();
    for _ in 0..10 {
        mixed.envoy(&[user, team], 1).await;
    }
    let (user2, team2): (Entries<'_>, Entries<'_>) = (&[("user", "erin")], &[("team", "y")]);
    for _ in 0..3 {
        assert!(mixed.allow(&[user2, team2], 1, false).await);
    }
    let calls = |command: &str| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut mixed.redis.connection())
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    assert_eq!(calls("incrby"), 20 + 6, "10 × 2 plain, 3 × 2 in the script");
    assert_eq!(calls("expire"), 20 + 6);
    assert_eq!(calls("evalsha"), 3);
    assert_eq!(calls("fcall"), 0);
    assert_eq!(calls("hincrby"), 0);
}

// ---------------------------------------------------------- mixed fleet ---

const FLEET_RULES: &str = r#"
domain: shared
descriptors:
  - key: tenant
    value: acme
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 300}
  - key: ip
    rate_limit: {unit: hour, requests_per_unit: 1000000}
"#;
const FROZEN_MS: &str = "1700000020000";
const FLEET_NOW_S: u64 = 1_700_000_020;
const CALLERS: usize = 64;
const CALLS_PER_CALLER: usize = 10;

/// What a fleet run saw.
#[derive(Debug)]
struct FleetRun {
    allowed: u64,
    /// Calls that counted in the keys whatever their answer (Envoy's and
    /// upstream's), plus admitted `ShouldAllow`s.
    counted: u64,
    user_count: u64,
    ip_count: u64,
}

/// Two ratekeeper binaries in the migration layout (one set by flags, one
/// by environment variables) and the upstream emulator, 64 callers spread
/// over the three, all sending the same two descriptors.
async fn mixed_fleet(store_flags: &[&str], upstream: Upstream) -> FleetRun {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rules.yaml");
    std::fs::write(&config, FLEET_RULES).unwrap();
    let config = config.to_str().unwrap();
    // Exactness, not latency, is under test: debug builds share two cores.
    let flags = [
        store_flags,
        &["--test-frozen-clock-ms", FROZEN_MS, "--store-timeout", "1s"],
    ]
    .concat();
    let by_flags = [
        &flags[..],
        &[
            "--key-layout",
            "envoy-ratelimit",
            "--cache-key-prefix",
            PREFIX,
        ],
    ]
    .concat();
    let mut instances = vec![
        Serve::start(config, &by_flags),
        Serve::start_with_env(
            config,
            &flags,
            &[
                ("RATEKEEPER_KEY_LAYOUT", "envoy-ratelimit"),
                ("RATEKEEPER_CACHE_KEY_PREFIX", PREFIX),
            ],
        ),
    ];
    let mut clients = Vec::new();
    for instance in &mut instances {
        let allow = instance.client().await;
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", instance.grpc_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push((allow, RateLimitServiceClient::new(channel)));
    }
    let upstream = upstream.with_prefix(PREFIX).with_jitter(300);
    let allowed = Arc::new(AtomicU64::new(0));
    let counted = Arc::new(AtomicU64::new(0));
    let user: &'static [(&str, &str)] = &[("tenant", "acme"), ("user", "u1")];
    let ip: &'static [(&str, &str)] = &[("ip", "10.0.0.1")];
    let mut callers = Vec::new();
    for caller in 0..CALLERS {
        let (allowed, counted) = (allowed.clone(), counted.clone());
        let target = caller % 3;
        let mut client = clients.get(target).cloned();
        let upstream = upstream.clone();
        callers.push(tokio::spawn(async move {
            for call in 0..CALLS_PER_CALLER {
                let (ok, counts) = match &mut client {
                    None => {
                        let limits = [
                            (
                                user,
                                Limit {
                                    requests_per_unit: 300,
                                    unit_seconds: HOUR,
                                },
                            ),
                            (
                                ip,
                                Limit {
                                    requests_per_unit: 1_000_000,
                                    unit_seconds: HOUR,
                                },
                            ),
                        ];
                        let statuses = upstream
                            .should_rate_limit("shared", &limits, 1, FLEET_NOW_S)
                            .await;
                        (statuses.iter().all(|s| !s.over_limit), true)
                    }
                    Some((_, envoy)) if (caller + call) % 2 == 0 => {
                        let response = envoy
                            .should_rate_limit(envoy_request("shared", &[user, ip]))
                            .await
                            .unwrap()
                            .into_inner();
                        (response.overall_code == Code::Ok as i32, true)
                    }
                    Some((allow, _)) => {
                        let reply = allow
                            .should_allow(allow_request("shared", &[user, ip], 1))
                            .await
                            .unwrap()
                            .into_inner();
                        (reply.allowed, reply.allowed)
                    }
                };
                if ok {
                    allowed.fetch_add(1, Ordering::Relaxed);
                }
                if counts {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    for instance in &mut instances {
        let (code, _) = instance.terminate().await;
        assert_eq!(code, Some(0), "{}", instance.stderr());
    }
    let count = |entries| {
        let key = upstream.key("shared", entries, HOUR, FLEET_NOW_S);
        let upstream = upstream.clone();
        async move { upstream.get(&key).await.unwrap_or(0) }
    };
    FleetRun {
        allowed: allowed.load(Ordering::Relaxed),
        counted: counted.load(Ordering::Relaxed),
        user_count: count(user).await,
        ip_count: count(ip).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_holds_one_limit_on_one_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let upstream = Upstream::on(&url).await;
    let run = mixed_fleet(&["--store", "redis", "--redis-url", &url], upstream).await;
    assert_eq!(run.allowed, 300, "{run:?}");
    assert_eq!(run.user_count, run.counted, "{run:?}");
    assert_eq!(run.ip_count, run.counted, "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_holds_one_limit_behind_sentinel() {
    let set = SentinelSet::start();
    let nodes = set.nodes();
    let upstream = Upstream::on(&set.primary.url()).await;
    let run = mixed_fleet(
        &[
            "--store",
            "redis-sentinel",
            "--redis-sentinel-nodes",
            &nodes,
            "--redis-sentinel-master",
            MASTER,
        ],
        upstream,
    )
    .await;
    assert_eq!(run.allowed, 300, "{run:?}");
    assert_eq!(run.user_count, run.counted, "{run:?}");
    assert_eq!(run.ip_count, run.counted, "{run:?}");
}

/// On a cluster each of upstream's keys lives on its own slot: the two
/// descriptors of a request are two groups, so a `ShouldAllow` judges both
/// before taking (a race can cost the `ip` key a hit, never admit past the
/// user's limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_holds_one_limit_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let nodes = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let upstream = Upstream::on_cluster(&cluster.ports)
        .await
        .with_prefix(PREFIX);
    let user_key = upstream.key(
        "shared",
        &[("tenant", "acme"), ("user", "u1")],
        HOUR,
        FLEET_NOW_S,
    );
    let ip_key = upstream.key("shared", &[("ip", "10.0.0.1")], HOUR, FLEET_NOW_S);
    assert_ne!(
        common::upstream_emulator::slot(user_key.as_bytes()),
        common::upstream_emulator::slot(ip_key.as_bytes()),
        "the test wants the two keys on two slots"
    );
    let run = mixed_fleet(
        &["--store", "redis-cluster", "--redis-cluster-nodes", &nodes],
        upstream,
    )
    .await;
    assert_eq!(run.allowed, 300, "{run:?}");
    assert_eq!(run.user_count, run.counted, "{run:?}");
    assert!(run.ip_count >= run.counted, "{run:?}");
    // Each key on the master of its own slot.
    for key in [user_key, ip_key] {
        let master = cluster.master_of(key.as_bytes());
        let keys = cluster.keys_on(master);
        assert!(
            keys.contains(&key.clone().into_bytes()),
            "{key} on {master}: {:?}",
            keys.iter()
                .map(|k| String::from_utf8_lossy(k))
                .collect::<Vec<_>>()
        );
    }
}

// ---------------------------------------------------- cluster migration ---

const TAGGED_RULES: &str = r#"
domain: d
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 100}
"#;

/// Upstream's keys take a hash tag from their values like any key: two
/// users whose values share `{t}` share a slot, so one request's two keys
/// are one group, one pipeline. While that slot migrates key by key, the
/// old node counts the key it still holds and redirects the other (`ASK`):
/// only the redirected key is sent again, so each hit counts once. A script
/// over keys split by the migration is refused by Redis (`TRYAGAIN`) until
/// the slot has moved: the request fails and counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrating_key_by_key_counts_each_hit_once() {
    let cluster = RedisCluster::start();
    let clock = Arc::new(ManualClock::new(T0));
    let store = cluster_store(&cluster, &clock);
    let server = TestServer::with(rules(&[TAGGED_RULES]), Arc::new(store)).await;
    let mut envoy = server.envoy().await;
    let mut allow = server.client().await;
    let (a, b): (Entries<'_>, Entries<'_>) = (&[("user", "{t}a")], &[("user", "{t}b")]);
    let upstream = Upstream::on_cluster(&cluster.ports)
        .await
        .with_prefix(PREFIX);
    let (key_a, key_b) = (
        upstream.key("d", a, HOUR, NOW_S),
        upstream.key("d", b, HOUR, NOW_S),
    );
    let slot = common::upstream_emulator::slot(key_a.as_bytes());
    assert_eq!(slot, common::upstream_emulator::slot(key_b.as_bytes()));
    let remaining = |response: RateLimitResponse| -> Vec<u32> {
        assert_eq!(response.overall_code, Code::Ok as i32, "{response:?}");
        response
            .statuses
            .iter()
            .map(|s| s.limit_remaining)
            .collect()
    };
    let both = || envoy_request("d", &[a, b]);
    assert_eq!(
        remaining(envoy.should_rate_limit(both()).await.unwrap().into_inner()),
        [99, 99]
    );

    // Start moving the slot, and move b only.
    let source = cluster.master_of(key_a.as_bytes());
    let target = cluster
        .masters()
        .into_iter()
        .find(|m| *m != source)
        .unwrap();
    let setslot = |port: u16, state: &str, node: u16| {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(cluster.node_id(node))
            .query(&mut cluster.connection(port))
            .unwrap();
    };
    setslot(target, "IMPORTING", source);
    setslot(source, "MIGRATING", target);
    let _: () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(target)
        .arg("")
        .arg(0)
        .arg(5_000)
        .arg("KEYS")
        .arg(&key_b)
        .query(&mut cluster.connection(source))
        .unwrap();

    // a is counted on the source, b asked of the target: once each.
    assert_eq!(
        remaining(envoy.should_rate_limit(both()).await.unwrap().into_inner()),
        [98, 98]
    );
    let get_on = |port: u16, key: &str| -> Option<u64> {
        let (value,): (Option<u64>,) = redis::pipe()
            .cmd("ASKING")
            .ignore()
            .cmd("GET")
            .arg(key)
            .query(&mut cluster.connection(port))
            .unwrap();
        value
    };
    assert_eq!(get_on(source, &key_a), Some(2));
    assert_eq!(get_on(target, &key_b), Some(2));
    assert_eq!(get_on(target, &key_a), None, "a was not counted again");

    // The script over the split slot: refused, nothing counted.
    let status = allow
        .should_allow(allow_request("d", &[a, b], 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(get_on(source, &key_a), Some(2));
    assert_eq!(get_on(target, &key_b), Some(2));

    // Finish the move: every node learns the slot's new owner.
    let _: () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(target)
        .arg("")
        .arg(0)
        .arg(5_000)
        .arg("KEYS")
        .arg(&key_a)
        .query(&mut cluster.connection(source))
        .unwrap();
    for port in cluster.masters() {
        setslot(port, "NODE", target);
    }
    assert_eq!(
        remaining(envoy.should_rate_limit(both()).await.unwrap().into_inner()),
        [97, 97]
    );
    assert!(
        allow
            .should_allow(allow_request("d", &[a, b], 1))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    assert_eq!(upstream_after_move(&cluster, &key_a, target), Some(4));
    assert_eq!(upstream_after_move(&cluster, &key_b, target), Some(4));
}

/// `key`'s count on the node on `port`, which now owns its slot.
fn upstream_after_move(cluster: &RedisCluster, key: &str, port: u16) -> Option<u64> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut cluster.connection(port))
        .unwrap()
}

/// On a cluster too, a request mixing upstream's keys with ratekeeper's
/// own is decided in groups (one per slot and kind): Envoy's hits count in
/// both, and all-or-nothing takes nothing when one group denies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_both_kinds_of_keys_are_decided_together() {
    let cluster = RedisCluster::start();
    let clock = Arc::new(ManualClock::new(T0));
    let store = cluster_store(&cluster, &clock);
    let server = TestServer::with(rules(&[OWN_RULES]), Arc::new(store)).await;
    let mut envoy = server.envoy().await;
    let mut allow = server.client().await;
    let upstream = Upstream::on_cluster(&cluster.ports)
        .await
        .with_prefix(PREFIX);
    let user: Entries<'_> = &[("user", "frank")];
    let bucket: Entries<'_> = &[("bucket", "c")];
    let user_key = upstream.key("d", user, MINUTE, NOW_S);

    let response = envoy
        .should_rate_limit(envoy_request("d", &[user, bucket]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        statuses(&response)
            .iter()
            .map(|s| s.limit_remaining)
            .collect::<Vec<_>>(),
        [4, 1]
    );
    let denied = allow
        .should_allow(allow_request("d", &[user, bucket], 2))
        .await
        .unwrap()
        .into_inner();
    assert!(!denied.allowed);
    assert_eq!(upstream.get(&user_key).await, Some(1), "nothing taken");
    assert!(
        allow
            .should_allow(allow_request("d", &[user, bucket], 1))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    assert_eq!(upstream.get(&user_key).await, Some(2));
    // A node that forgot the script gets it again.
    for master in cluster.masters() {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut cluster.connection(master))
            .unwrap();
    }
    assert!(
        allow
            .should_allow(allow_request("d", &[user], 1))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    assert_eq!(upstream.get(&user_key).await, Some(3));
    // The token bucket's key is ratekeeper's, hash-tagged.
    let own: usize = cluster
        .masters()
        .into_iter()
        .map(|m| {
            cluster
                .keys_on(m)
                .iter()
                .filter(|k| k.starts_with(b"rk4:{"))
                .count()
        })
        .sum();
    assert_eq!(own, 1);
}

/// A cluster store in the envoy-ratelimit layout at the test clock.
fn cluster_store(
    cluster: &RedisCluster,
    clock: &Arc<ManualClock>,
) -> ratekeeper::store::RedisClusterStore {
    ratekeeper::store::RedisClusterStore::new(
        &ratekeeper::store::redis_cluster::RedisClusterSettings {
            nodes: cluster.urls(),
            pool_size: 2,
            timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
            tls: None,
            expiry_jitter: Duration::ZERO,
        },
    )
    .unwrap()
    .with_clock(clock.clone() as Arc<dyn Clock>)
    .with_envoy_layout(EnvoyLayout::new(PREFIX, clock.clone(), 0))
}
