//! What ends up in the store: counters of different descriptors never
//! collide (on both stores), and every Redis key is versioned, hash-tagged
//! and always carries an expiry (its window, plus jitter under a window). Also ACL
//! credentials in the Redis URL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ::redis::Commands;
use common::{Backend, RedisServer, T0, TestServer, TestStore, allow_request, redis_store, rules};
use ratekeeper::clock::ManualClock;
use tonic::Code;

const RULES: &str = r#"
domain: keys
descriptors:
  - key: a_b
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: x
    descriptors:
      - key: y
        rate_limit: {unit: hour, requests_per_unit: 1}
"#;

/// envoyproxy/ratelimit would key both of these `keys_a_b_c_<window>`, so
/// spending one would spend the other. Here each has its own counter.
async fn underscore_joined_descriptors_do_not_share_a_counter(backend: Backend) {
    let store = TestStore::new(backend, Arc::new(ManualClock::new(T0)));
    let server = TestServer::with(rules(&[RULES]), store.store.clone()).await;
    let mut client = server.client().await;
    let allowed = |entries: &'static [(&'static str, &'static str)]| {
        let mut client = client.clone();
        async move { common::allowed(&mut client, allow_request("keys", &[entries], 1)).await }
    };
    assert!(allowed(&[("a_b", "c")]).await);
    assert!(allowed(&[("a", "b_c")]).await);
    assert!(!allowed(&[("a_b", "c")]).await);
    assert!(!allowed(&[("a", "b_c")]).await);
    // Two levels vs one level with the joined value.
    assert!(allowed(&[("x", "1"), ("y", "2")]).await);
    assert!(allowed(&[("x", "1_y_2"), ("y", "")]).await);
    let response = client
        .should_allow(allow_request("keys", &[&[("x", "1"), ("y", "2")]], 1))
        .await
        .unwrap();
    assert!(!response.into_inner().allowed);
}

both_stores!(underscore_joined_descriptors_do_not_share_a_counter);

/// A redis-server of its own and a server with `yaml` on it, with the
/// store's default settings (expiry jitter included) on Redis's own clock.
async fn on_redis(yaml: &[&str]) -> (RedisServer, TestServer) {
    let redis = RedisServer::start();
    let store = redis_store(&redis.url(), Duration::from_secs(2));
    let server = TestServer::with(rules(yaml), Arc::new(store)).await;
    (redis, server)
}

#[tokio::test]
async fn redis_keys_are_versioned_tagged_and_always_expire() {
    let (redis, server) = on_redis(&[RULES]).await;
    let mut client = server.client().await;
    for entries in [
        &[("a", "1")][..],
        &[("a_b", "2")],
        &[("x", "1"), ("y", "2")],
    ] {
        client
            .should_allow(allow_request("keys", &[entries], 1))
            .await
            .unwrap();
    }
    // A denied all-or-nothing request writes nothing (a cost above the
    // limit is denied in any window, so no boundary can change this).
    let denied = client
        .should_allow(allow_request(
            "keys",
            &[&[("a", "new")], &[("a_b", "new")]],
            2,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!denied.allowed);
    // Neither does a dry run, nor a check that adds nothing.
    let mut dry = allow_request("keys", &[&[("a", "dry")]], 1);
    dry.dry_run = true;
    assert!(client.should_allow(dry).await.unwrap().into_inner().allowed);

    let mut conn = redis.connection();
    let mut keys: Vec<String> = conn.keys("*").unwrap();
    keys.sort();
    assert_eq!(keys.len(), 3, "{keys:?}");
    for key in &keys {
        assert!(
            key.starts_with("rk4:{") && key.as_bytes()[13] == b'}',
            "{key}"
        );
        let ttl: i64 = ::redis::cmd("PTTL").arg(key).query(&mut conn).unwrap();
        let window: i64 = if key.contains("|fw|3600000|") {
            3_600_000
        } else {
            60_000
        };
        // The default expiry jitter: less than a window (and 300 s) past
        // the window's end.
        assert!(
            ttl > 0 && ttl < window + window.min(300_000),
            "{key}: pttl {ttl}"
        );
    }
    assert!(
        keys.iter()
            .any(|k| k.contains("d4:keysn2k1:xv1:1k1:yv1:2|fw|3600000")),
        "{keys:?}"
    );
}

/// A run's keys come windowed for the window this host expects Redis to be
/// in. When Redis's clock says another window (a boundary passed on the
/// way, a host clock that is off), the hits still count in Redis's window,
/// never in the one the host guessed.
#[tokio::test]
async fn a_run_windowed_for_another_window_counts_in_redis_s_own() {
    const WINDOW: i64 = 60_000;
    let (redis, server) = on_redis(&[RULES]).await;
    // The first decision loads the code into Redis.
    let mut client = server.client().await;
    client
        .should_allow(allow_request("keys", &[&[("a", "load")]], 1))
        .await
        .unwrap();
    let mut conn = redis.connection();
    let function = decide_function(&mut conn);

    let counters = [
        "rk4:{skew}:d1:an1k1:av1:1|fw|60000",
        "rk4:{skew}:d1:an1k1:av1:2|fw|60000",
    ];
    let count = |key: &str, conn: &mut ::redis::Connection| -> Option<i64> {
        ::redis::cmd("GET").arg(key).query(conn).unwrap()
    };
    // A run of one hit on each counter, windowed for window number
    // `expected`, on Redis's clock ('' reads TIME): returns Redis's now and
    // the counts after.
    let run = |expected: i64, conn: &mut ::redis::Connection| -> Vec<i64> {
        let mut cmd = ::redis::cmd("FCALL");
        cmd.arg(&function).arg(counters.len());
        for counter in counters {
            cmd.arg(format!("{counter}|{expected}"));
        }
        cmd.arg("")
            .arg(0)
            .arg(0)
            .arg(4)
            .arg(counters.len())
            .arg(WINDOW)
            .arg(1)
            .arg(expected);
        cmd.query(conn).unwrap()
    };
    let window_of = |now: i64| now / WINDOW;

    // Ten windows behind Redis, then ten ahead, then Redis's own. Each run
    // adds one to the counts of Redis's window (a boundary passing between
    // runs starts them again).
    let mut last: Option<(i64, i64)> = None; // (window, count)
    for offset in [-10 * WINDOW, 10 * WINDOW, 0] {
        let guess = window_of(redis_now_ms(&mut conn)) + offset / WINDOW;
        let reply = run(guess, &mut conn);
        let start = window_of(reply[0]);
        let expected = match last {
            Some((window, count)) if window == start => count + 1,
            _ => 1,
        };
        assert_eq!(reply[1..], [expected, expected], "offset {offset}");
        for counter in counters {
            let own = format!("{counter}|{start}");
            let found = count(&own, &mut conn);
            let ttl: i64 = ::redis::cmd("PTTL").arg(&own).query(&mut conn).unwrap();
            // The window's key expires at its end: checked while Redis is
            // still in it (a boundary passing between the run and these
            // reads leaves only the reply to check).
            if window_of(redis_now_ms(&mut conn)) == start {
                assert_eq!(found, Some(expected), "{own}");
                assert!(ttl > 0 && ttl <= WINDOW, "{own}: pttl {ttl}");
            }
            if start != guess {
                let guessed = format!("{counter}|{guess}");
                assert_eq!(count(&guessed, &mut conn), None, "{guessed}");
            }
        }
        last = Some((start, expected));
    }
}

/// The script reuses its reply table from call to call: a call that failed
/// half-way (a key of the wrong type) leaves nothing behind in the next,
/// shorter call's reply.
#[tokio::test]
async fn a_call_that_failed_half_way_leaves_nothing_in_the_next_reply() {
    let (redis, server) = on_redis(&[RULES]).await;
    // The first decision loads the code into Redis.
    server
        .client()
        .await
        .should_allow(allow_request("keys", &[&[("a", "load")]], 1))
        .await
        .unwrap();
    let mut conn = redis.connection();
    let function = decide_function(&mut conn);
    // A fixed time (the code's injected-time argument): window number 1.
    let run = |keys: &[&str], conn: &mut ::redis::Connection| -> ::redis::RedisResult<Vec<i64>> {
        let mut cmd = ::redis::cmd("FCALL");
        cmd.arg(&function).arg(keys.len());
        for key in keys {
            cmd.arg(format!("{key}|1"));
        }
        cmd.arg(90_000)
            .arg(0)
            .arg(0)
            .arg(4)
            .arg(keys.len())
            .arg(60_000)
            .arg(1)
            .arg(1);
        cmd.query(conn)
    };
    // Eight hits, the sixth on a key that holds a hash: five counted, then
    // the call fails.
    let _: () = ::redis::cmd("HSET")
        .arg("rk4:{h}:wrong|fw|60000|1")
        .arg("f")
        .arg("v")
        .query(&mut conn)
        .unwrap();
    let mut keys: Vec<String> = (0..8).map(|i| format!("rk4:{{h}}:k{i}|fw|60000")).collect();
    keys[5] = "rk4:{h}:wrong|fw|60000".to_owned();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert!(run(&refs, &mut conn).is_err());
    // Then two hits: the time and two counts, nothing after them.
    assert_eq!(run(&refs[..2], &mut conn).unwrap(), [90_000, 2, 2]);
    assert_eq!(run(&refs[7..], &mut conn).unwrap(), [90_000, 1]);
}

/// The name of ratekeeper's decision function in `conn`'s Redis (loaded
/// by a first decision).
fn decide_function(conn: &mut ::redis::Connection) -> String {
    let libraries: Vec<::redis::Value> = ::redis::cmd("FUNCTION").arg("LIST").query(conn).unwrap();
    let listed = format!("{libraries:?}");
    listed
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .find(|word| word.starts_with("ratekeeper_decide_"))
        .unwrap_or_else(|| panic!("no decide function in {listed}"))
        .to_owned()
}

fn redis_now_ms(conn: &mut ::redis::Connection) -> i64 {
    let (seconds, micros): (i64, i64) = ::redis::cmd("TIME").query(conn).unwrap();
    seconds * 1000 + micros / 1000
}

/// With the default settings the keys of one window do not all expire at
/// its end (Redis would block deleting them all at once): each gets up to
/// 300 s more, and less than its own window, so a key of a short window
/// outlives it by less than its length.
#[tokio::test]
async fn default_expiry_jitter_spreads_a_windows_keys_within_their_window() {
    const SHORT: &str = r#"
domain: short
descriptors:
  - key: s
    rate_limit: {unit: second, unit_multiplier: 10, requests_per_unit: 100}
"#;
    let (redis, server) = on_redis(&[RULES, SHORT]).await;
    let mut client = server.client().await;
    let mut conn = redis.connection();
    let pttl = |key: &str, conn: &mut ::redis::Connection| -> i64 {
        ::redis::cmd("PTTL").arg(key).query(conn).unwrap()
    };
    let mut minute = Vec::new();
    let mut short = Vec::new();
    for i in 0..20 {
        let value = i.to_string();
        for (domain, entry) in [("keys", "a"), ("short", "s")] {
            client
                .should_allow(allow_request(domain, &[&[(entry, &value)]], 1))
                .await
                .unwrap();
        }
        // Read at once: a 10 s window's key may be gone 10 s later.
        let keys: Vec<String> = conn.keys(format!("*v{}:{value}|*", value.len())).unwrap();
        for key in keys {
            let ttl = pttl(&key, &mut conn);
            if key.contains("|fw|10000|") {
                short.push(ttl);
            } else {
                minute.push(ttl);
            }
        }
    }
    assert_eq!((minute.len(), short.len()), (20, 20));
    for ttl in &minute {
        assert!(*ttl > 0 && *ttl < 60_000 + 60_000, "pttl {ttl}");
    }
    // Without the bound, 300 s of jitter would give nearly all over 20 s.
    for ttl in &short {
        assert!(*ttl <= 10_000 + 10_000, "pttl {ttl}: {short:?}");
    }
    // Without jitter the minute keys would differ by the few ms the calls
    // took; 20 draws from a minute all landing within 100 ms of each other
    // is below 1e-50.
    let spread = minute.iter().max().unwrap() - minute.iter().min().unwrap();
    assert!(spread > 100, "{minute:?}");
}

#[tokio::test]
async fn redis_acl_credentials_in_the_url() {
    let redis = RedisServer::start_with(&[
        "--user", "default", "off", "--user", "limiter", "on", ">s3cret", "~*", "+@all",
    ]);
    let url = |password: &str| format!("redis://limiter:{password}@127.0.0.1:{}", redis.port);

    let good = TestServer::with(
        rules(&[RULES]),
        Arc::new(redis_store(&url("s3cret"), Duration::from_secs(2))),
    )
    .await;
    let response = good
        .client()
        .await
        .should_allow(allow_request("keys", &[&[("a", "1")]], 1))
        .await;
    assert!(response.unwrap().into_inner().allowed);

    let bad = TestServer::with(
        rules(&[RULES]),
        Arc::new(redis_store(&url("wrong"), Duration::from_secs(2))),
    )
    .await;
    let status = bad
        .client()
        .await
        .should_allow(allow_request("keys", &[&[("a", "1")]], 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// A decision is at most one request to Redis — one `FCALL`, whatever the
/// number of descriptors, shared with the decisions queued beside it — and
/// no per-request connection checks, even under concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_request_per_decision() {
    let (redis, server) = on_redis(&[RULES]).await;
    let client = server.client().await;
    // Warm up (loads the script), then count from zero.
    let mut warm = client.clone();
    warm.should_allow(allow_request("keys", &[&[("a", "w")]], 1))
        .await
        .unwrap();
    let mut conn = redis.connection();
    ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(&mut conn)
        .unwrap();

    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let mut client = client.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let a = format!("{t}-{i}");
                    let request = allow_request(
                        "keys",
                        &[&[("a", &a)], &[("a_b", &a)], &[("x", "1"), ("y", &a)]],
                        1,
                    );
                    client.should_allow(request).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .unwrap();
    let calls = |command: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    let fcalls = calls("fcall");
    assert!((1..=400).contains(&fcalls), "{info}");
    assert_eq!(calls("evalsha"), 0, "{info}");
    assert_eq!(calls("eval"), 0, "{info}");
    // No per-request connection check; the only PINGs are the readiness
    // monitor's, one a second whatever the traffic.
    assert_eq!(calls("unwatch"), 0, "{info}");
    assert!(calls("ping") <= 2, "{info}");
    // Inside the code: each of the three descriptors counted once per
    // decision (one INCRBY on its window's key), whatever the batching.
    assert_eq!(calls("incrby"), 1_200, "{info}");
    assert_eq!(calls("hincrby"), 0, "{info}");
}
