//! The fuzz targets on stable: every committed seed and every crash input
//! ever found (`fuzz/regressions/`) is replayed, then a bounded, seeded run
//! of mutations of those inputs. Coverage-guided fuzzing itself runs with
//! `fuzz/run.sh`; this keeps what it found fixed.

use std::path::Path;

use ratekeeper::fuzzing::{config_loader, matcher_and_keys};

/// Mutated inputs per target and test run.
const MUTATIONS: usize = 20_000;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut found = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n == ".keep") {
                continue;
            }
            found.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    found.sort();
    found
}

/// xorshift64*: a fixed sequence, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that matter to the targets: YAML syntax and the field separator.
const INTERESTING: &[u8] = b":-{}[]*&!|>'\"#\n \t,?%@`\xff0123456789";

fn mutate(rng: &mut Rng, seeds: &[(String, Vec<u8>)], input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(5) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 => input.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
            2 if at < input.len() => {
                let end = (at + 1 + rng.below(16)).min(input.len());
                input.drain(at..end);
            }
            3 => {
                // Splice in a piece of another seed.
                let other = &seeds[rng.below(seeds.len())].1;
                let from = rng.below(other.len());
                let to = (from + rng.below(64)).min(other.len());
                input.splice(at..at, other[from..to].iter().copied());
            }
            _ if at < input.len() => {
                // Repeat a piece: deep nesting, long values.
                let end = (at + 1 + rng.below(8)).min(input.len());
                let piece: Vec<u8> = input[at..end].to_vec();
                for _ in 0..rng.below(32) {
                    input.splice(at..at, piece.iter().copied());
                }
            }
            _ => {}
        }
    }
}

fn fuzz(target: &str, run: fn(&[u8])) {
    let seeds = inputs(target);
    assert!(!seeds.is_empty(), "no seeds for {target}");
    for (name, data) in &seeds {
        let result = std::panic::catch_unwind(|| run(data));
        assert!(result.is_ok(), "{target} panics on {name}");
    }
    let mut rng = Rng(0x5eed_f022_d00d ^ target.len() as u64);
    for round in 0..MUTATIONS {
        let mut input = seeds[rng.below(seeds.len())].1.clone();
        mutate(&mut rng, &seeds, &mut input);
        if std::panic::catch_unwind(|| run(&input)).is_err() {
            let saved = std::env::temp_dir().join(format!("{target}-crash-{round}"));
            std::fs::write(&saved, &input).unwrap();
            panic!(
                "{target} panicked on mutation {round}; input saved to {} — add it to fuzz/regressions/{target}/",
                saved.display()
            );
        }
    }
}

#[test]
fn config_loader_survives_its_corpus_and_mutations() {
    fuzz("config_loader", config_loader);
}

#[test]
fn matcher_and_keys_survive_their_corpus_and_mutations() {
    fuzz("matcher_and_keys", matcher_and_keys);
}
