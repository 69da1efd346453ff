//! Measures what one decision costs Redis, per algorithm: commands executed
//! (from `INFO commandstats`, which counts the commands a script runs too)
//! and requests sent by ratekeeper, per decision.
//!
//! ```sh
//! redis-server --port 6390 --save "" --appendonly no &
//! cargo run --release --example redis_cost -- redis://127.0.0.1:6390
//! ```
//!
//! It resets the server's statistics and writes keys under the `rk4:`
//! prefix: point it at a throwaway Redis.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ratekeeper::algorithm::{AlgorithmKind, BatchHit, Mode};
use ratekeeper::rules::key::storage_key;
use ratekeeper::rules::matcher::EntryRef;
use ratekeeper::rules::{Limit, Rule, RuleLimit, StatsPath, Unit};
use ratekeeper::store::redis::RedisSettings;
use ratekeeper::store::{CounterStore, RedisStore};

const DECISIONS: u64 = 10_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6390".to_owned());
    let store = RedisStore::new(&RedisSettings {
        timeout: Duration::from_secs(2),
        ..RedisSettings::new(url.clone())
    })?;
    let mut admin = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;

    println!(
        "| algorithm | descriptors per request | Redis commands per decision | of which | requests to Redis per decision | Redis time per decision (µs) |"
    );
    println!("|---|---|---|---|---|---|");
    for algorithm in [
        AlgorithmKind::FixedWindow,
        AlgorithmKind::SlidingWindow,
        AlgorithmKind::TokenBucket,
    ] {
        for descriptors in [1usize, 3] {
            let limit = Limit {
                requests_per_unit: 1_000_000,
                unit: Unit::Hour,
                unit_multiplier: 1,
                algorithm,
                burst: None,
            };
            let rule = Arc::new(Rule {
                name: None,
                limit: RuleLimit::Limited(limit),
                extra_limits: Vec::new(),
                replaces: vec![],
                shadow_mode: false,
                detailed_metric: false,
                quota_mode: false,
                metadata: None,
                stats: StatsPath::Levels(vec![]),
                path: "cost".into(),
                source: Arc::from("redis_cost"),
                shared_values: vec![],
                failure_policy: None,
            });
            let values: Vec<String> = (0..descriptors).map(|i| format!("user{i}")).collect();
            let keys: Vec<Vec<u8>> = values
                .iter()
                .map(|v| {
                    storage_key(
                        "cost",
                        &[EntryRef {
                            key: "user",
                            value: v,
                        }],
                        &rule,
                        algorithm.tag(),
                        limit.window_ms(),
                    )
                })
                .collect();
            let hits: Vec<BatchHit<'_>> = keys
                .iter()
                .map(|key| BatchHit {
                    key,
                    algorithm,
                    quota: limit.quota(),
                    hits: 1,
                    enforced: true,
                })
                .collect();
            // Warm up: load the script, open the pool's connections.
            store.apply(&hits, Mode::AllOrNothing).await?;
            redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async::<()>(&mut admin)
                .await?;
            for _ in 0..DECISIONS {
                store.apply(&hits, Mode::AllOrNothing).await?;
            }
            let (stats, script_usec) = command_stats(&mut admin).await?;
            let total: u64 = stats.values().sum();
            let per = |n: u64| n as f64 / DECISIONS as f64;
            let breakdown: Vec<String> = stats
                .iter()
                .map(|(name, calls)| format!("{name} {:.2}", per(*calls)))
                .collect();
            // Requests the client sent: one FCALL (EVALSHA where functions
            // are refused) per decision, plus any connection check (PING).
            let requests = ["fcall", "evalsha", "ping"]
                .iter()
                .map(|name| stats.get(*name).copied().unwrap_or(0))
                .sum::<u64>();
            println!(
                "| {} | {descriptors} | {:.2} | {} | {:.2} | {:.1} |",
                algorithm.as_str(),
                per(total),
                breakdown.join(", "),
                per(requests),
                per(script_usec)
            );
        }
    }
    Ok(())
}

/// `INFO commandstats` as command → calls (without INFO and CONFIG), and the
/// microseconds Redis spent running ratekeeper's code (`FCALL` or `EVALSHA`,
/// with every command it ran).
async fn command_stats(
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<(BTreeMap<String, u64>, u64), redis::RedisError> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut stats = BTreeMap::new();
    let mut script_usec = 0;
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let (name, fields) = rest.split_once(':').unwrap_or((rest, ""));
        // The admin connection's own commands are not part of the cost.
        if name == "info" || name.starts_with("config") {
            continue;
        }
        let field = |key: &str| -> u64 {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(key))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        if name == "fcall" || name == "evalsha" {
            script_usec += field("usec=");
        }
        stats.insert(name.to_owned(), field("calls="));
    }
    Ok((stats, script_usec))
}
