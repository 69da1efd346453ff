//! Criterion benchmarks of the pure decision path and the memory store:
//! descriptor matching, storage key encoding, each algorithm's step, and the
//! memory store over a table of scenarios (key-space size, descriptors per
//! request, mode) with a seeded RNG so every run sees the same keys.
//!
//! ```sh
//! cargo bench --bench decision
//! ```

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::executor::block_on;
use ratekeeper::algorithm::{AlgorithmKind, BatchHit, Mode, Quota};
use ratekeeper::clock::ManualClock;
use ratekeeper::config::parse_rules_file;
use ratekeeper::rules::key::storage_key;
use ratekeeper::rules::matcher::EntryRef;
use ratekeeper::store::{CounterStore, MemoryStore};

const RULES: &str = r#"
domain: bench
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 100}
  - key: path
    value: /api/*
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 1000}
  - key: path
    value: /login
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: tenant
    value: acme
    descriptors:
      - key: plan
        value: gold
        descriptors:
          - key: user
            rate_limit: {unit: hour, requests_per_unit: 100000}
"#;

const NOW: u64 = 1_700_000_020_000;

/// splitmix64, seeded: the same keys on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn matching(c: &mut Criterion) {
    let (_, tree) = parse_rules_file("bench.yaml", RULES).unwrap();
    let cases: [(&str, Vec<EntryRef<'_>>); 4] = [
        (
            "key-only",
            vec![EntryRef {
                key: "remote_address",
                value: "10.1.2.3",
            }],
        ),
        (
            "exact",
            vec![EntryRef {
                key: "path",
                value: "/login",
            }],
        ),
        (
            "wildcard+child",
            vec![
                EntryRef {
                    key: "path",
                    value: "/api/v1/items",
                },
                EntryRef {
                    key: "user",
                    value: "alice",
                },
            ],
        ),
        (
            "three-levels",
            vec![
                EntryRef {
                    key: "tenant",
                    value: "acme",
                },
                EntryRef {
                    key: "plan",
                    value: "gold",
                },
                EntryRef {
                    key: "user",
                    value: "bob",
                },
            ],
        ),
    ];
    let mut group = c.benchmark_group("match");
    for (name, entries) in &cases {
        assert!(tree.find(entries).is_some(), "{name} must match");
        group.bench_function(*name, |b| {
            b.iter(|| black_box(tree.find(black_box(entries))))
        });
    }
    group.finish();
}

fn key_encoding(c: &mut Criterion) {
    let (_, tree) = parse_rules_file("bench.yaml", RULES).unwrap();
    let entries = [
        EntryRef {
            key: "tenant",
            value: "acme",
        },
        EntryRef {
            key: "plan",
            value: "gold",
        },
        EntryRef {
            key: "user",
            value: "bob-1234567890",
        },
    ];
    let rule = tree.find(&entries).unwrap().clone();
    c.bench_function("storage_key/3-entries", |b| {
        b.iter(|| {
            black_box(storage_key(
                "bench",
                black_box(&entries),
                &rule,
                "fw",
                3_600_000,
            ))
        })
    });
}

fn algorithms(c: &mut Criterion) {
    let quota = Quota {
        limit: 1_000,
        window_ms: 60_000,
        burst: 1_000,
    };
    let mut group = c.benchmark_group("algorithm");
    for kind in [
        AlgorithmKind::FixedWindow,
        AlgorithmKind::SlidingWindow,
        AlgorithmKind::TokenBucket,
    ] {
        let algorithm = kind.algorithm();
        let state = algorithm.evaluate(&quota, [0; 3], 10, NOW).admitted.state;
        group.bench_function(kind.as_str(), |b| {
            b.iter(|| black_box(algorithm.evaluate(&quota, black_box(state), 1, NOW + 250)))
        });
    }
    group.finish();
}

/// The memory store over a scenario table: key space × descriptors per request × mode.
fn memory_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_store");
    let scenarios = [
        ("hot-key", 1u64, 1usize, Mode::Independent),
        ("10k-keys", 10_000, 1, Mode::Independent),
        ("1m-keys", 1_000_000, 1, Mode::Independent),
        ("10k-keys-3-descriptors", 10_000, 3, Mode::AllOrNothing),
        ("10k-keys-dry-run", 10_000, 1, Mode::DryRun),
    ];
    for (name, key_space, descriptors, mode) in scenarios {
        let store = MemoryStore::new(2_000_000, Arc::new(ManualClock::new(NOW)));
        let mut rng = Rng(42);
        let keys: Vec<Vec<u8>> = (0..4096)
            .map(|_| format!("bench:{}", rng.next() % key_space).into_bytes())
            .collect();
        let quota = Quota {
            limit: u64::from(u32::MAX),
            window_ms: 60_000,
            burst: u64::from(u32::MAX),
        };
        let mut at = 0;
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let hits: Vec<BatchHit<'_>> = (0..descriptors)
                    .map(|d| BatchHit {
                        key: &keys[(at + d * 997) % keys.len()],
                        algorithm: AlgorithmKind::FixedWindow,
                        quota,
                        hits: 1,
                        enforced: true,
                    })
                    .collect();
                at = (at + 1) % keys.len();
                black_box(block_on(store.apply(&hits, mode)).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, matching, key_encoding, algorithms, memory_store);
criterion_main!(benches);
