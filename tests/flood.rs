//! A flood of 1,000,000 distinct descriptor values (a DDoS with random user
//! ids) through the real binary's in-memory store and over-limit cache:
//! resident memory levels off at the caps instead of growing with the
//! number of values, and metric labels do not grow with values either.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::http_get;
use common::process::Serve;
use ratekeeper::proto::ratekeeper::v1::{Descriptor, Entry, ShouldAllowRequest};

const VALUES: u64 = 1_000_000;
const PER_REQUEST: u64 = 500;
/// Above the 100,000 values of the first phase, so none of their counters is
/// evicted between their two sends (an evicted counter would count afresh).
const MAX_KEYS: &str = "150000";
const CACHE_SIZE: &str = "100000";
/// What the flood may cost in resident memory, all caps full (the figure
/// measured here is in the README). Linear growth would be ~270 MiB of
/// counters alone at a million values.
const RSS_BOUND_MIB: u64 = 160;

const RULES: &str = "domain: flood\ndescriptors:\n  - key: user\n    rate_limit: {unit: hour, requests_per_unit: 1}\n";

fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib / 1024
}

fn batch(first: u64) -> ShouldAllowRequest {
    ShouldAllowRequest {
        domain: "flood".to_owned(),
        descriptors: (first..first + PER_REQUEST)
            .map(|id| Descriptor {
                entries: vec![Entry {
                    key: "user".to_owned(),
                    value: format!("attacker-{id:07}"),
                }],
            })
            .collect(),
        cost: 1,
        dry_run: false,
        reservation_ttl: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_distinct_values_keep_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flood.yaml");
    std::fs::write(&config, RULES).unwrap();
    let mut serve = Serve::start(
        config.to_str().unwrap(),
        &[
            "--memory-max-keys",
            MAX_KEYS,
            "--over-limit-cache-size",
            CACHE_SIZE,
            "--max-descriptors",
            "1000",
            // Counted then denied by an hourly limit: no boundary may pass.
            "--test-frozen-clock-ms",
            "1700000020000",
        ],
    );
    let client = serve.client().await;
    let pid = serve.child.id();
    let at_start = rss_mib(pid);

    // Phase by phase, 4 callers each: every batch of fresh values is sent
    // twice, counted (allowed) then denied by the store, which the cache
    // remembers while it has room. The first 100,000 values fill the cache
    // exactly; the rest flood past both caps; finally the first values come
    // back once more and are denied from the cache without a store call.
    let cache_size: u64 = CACHE_SIZE.parse().unwrap();
    let phases = [
        (0, cache_size, vec![true, false]),
        (cache_size, VALUES / 2, vec![true, false]),
        (VALUES / 2, VALUES, vec![true, false]),
        (0, cache_size, vec![false]),
    ];
    let mut rss = Vec::new();
    for (from, to, expected) in phases {
        let next = Arc::new(AtomicU64::new(from));
        let expected = Arc::new(expected);
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let mut client = client.clone();
                let (next, expected) = (next.clone(), expected.clone());
                tokio::spawn(async move {
                    loop {
                        let first = next.fetch_add(PER_REQUEST, Ordering::Relaxed);
                        if first >= to {
                            break;
                        }
                        let request = batch(first);
                        let mut answers = Vec::new();
                        for _ in 0..expected.len() {
                            let reply = client.should_allow(request.clone()).await.unwrap();
                            answers.push(reply.into_inner().allowed);
                        }
                        assert_eq!(answers, *expected, "batch at {first}");
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await.unwrap();
        }
        rss.push(rss_mib(pid));
    }
    let (halfway, at_end) = (rss[1], rss[3]);

    let metrics = http_get(
        format!("127.0.0.1:{}", serve.admin_port).parse().unwrap(),
        "/metrics",
    )
    .await;
    let cache_hits: f64 = metrics
        .lines()
        .find(|l| l.starts_with("ratelimit_over_limit_cache_hits_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no cache hits in {metrics}"));
    println!(
        "flood of {VALUES} distinct values (caps: {MAX_KEYS} counters, {CACHE_SIZE} cached denials): \
         RSS {at_start} MiB at start, {halfway} MiB after half, {at_end} MiB after all (by phase: {rss:?}); \
         {cache_hits} descriptors denied from the over-limit cache; /metrics is {} bytes",
        metrics.len()
    );
    // The cache answered every returning value it had room for, and only those.
    assert_eq!(cache_hits, cache_size as f64, "cache hits");
    assert!(
        at_end <= RSS_BOUND_MIB,
        "RSS {at_end} MiB over {RSS_BOUND_MIB} MiB"
    );
    // Level at the caps: the second half of the values added (almost) nothing.
    assert!(
        at_end <= halfway + 16,
        "RSS still growing: {halfway} MiB after half, {at_end} MiB after all"
    );
    // No per-value metric series.
    assert!(
        !metrics.contains("attacker-"),
        "descriptor values in metrics"
    );
    assert!(
        metrics.len() < 64 * 1024,
        "/metrics is {} bytes",
        metrics.len()
    );
    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0));
}
