//! The store latency histogram does not grow with the calls it records.
//!
//! The Prometheus recorder buffers every histogram sample until something
//! drains it; `/metrics` does, but many deployments never scrape, and a
//! server recording each store call had grown by about 20 bytes a request
//! (1 MiB/s at 50,000 req/s) for as long as it ran. Alone in its binary so
//! the process's resident memory is this test's.

use std::time::Duration;

use ratekeeper::metrics::Metrics;

/// Store calls recorded: unbuffered, 8 bytes each, about 32 MiB.
const CALLS: usize = 4_000_000;
/// What recording them may add to resident memory.
const GROWTH_BOUND_KIB: u64 = 8 * 1024;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[test]
fn recording_store_calls_without_a_scrape_keeps_memory_flat() {
    let metrics = Metrics::new();
    // The histogram's registration and first blocks, before measuring.
    for _ in 0..100_000 {
        metrics.store_call("memory", Duration::from_micros(40), None);
    }
    let before = rss_kib();
    for call in 0..CALLS {
        let took = Duration::from_micros(20 + (call % 200) as u64);
        metrics.store_call("memory", took, None);
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < GROWTH_BOUND_KIB,
        "{CALLS} store calls grew resident memory by {grown} KiB"
    );
    // Every call is still counted.
    let text = metrics.render();
    assert!(
        text.contains(&format!(
            "ratelimit_storage_duration_seconds_count{{backend=\"memory\"}} {}",
            CALLS + 100_000
        )),
        "{text}"
    );
}
