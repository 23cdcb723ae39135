//! The fuzz targets' property checks, run by `scripts/test` without the
//! fuzzer's build: every checked-in seed of `fuzz/corpus/TARGET/`, then
//! about two seconds of mutations of them (bit flips, byte changes,
//! insertions, cuts and splices, from a seeded generator so a failure
//! repeats). Coverage-guided runs of the same checks, 10^6 executions
//! each, are `scripts/bench fuzz`. A failing input is written to the test's
//! directory for `cargo fuzz run TARGET FILE`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use drover_tests::TestDir;

const BUDGET: Duration = Duration::from_secs(2);

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{} has no seeds", dir.display());
    seeds
}

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(6) {
            0 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] = [0, 0xff, b'/', b'.', b'=', b'"', b'\n', b'['][rng.below(8)];
            }
            2 => {
                let junk: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                data.splice(at..at, junk);
            }
            3 => data.truncate(at),
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                data.splice(at..at, other[from..].iter().copied());
            }
            _ => {
                let end = (at + rng.below(64)).min(data.len());
                data.drain(at..end);
            }
        }
    }
    data
}

/// Seeds, then mutations until the budget is spent; returns the count.
fn exercise(target: &str, check: fn(&[u8])) -> u64 {
    let dir = TestDir::new();
    let seeds = corpus(target);
    let run = |input: &[u8]| {
        let failed = std::panic::catch_unwind(|| check(input)).is_err();
        if failed {
            let path = dir.path().join(format!("{target}-failing-input"));
            std::fs::write(&path, input).unwrap();
            panic!(
                "{target}: a property failed on the input saved at {}",
                path.display()
            );
        }
    };
    for seed in &seeds {
        run(seed);
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ target.len() as u64);
    let started = Instant::now();
    let mut runs = seeds.len() as u64;
    while started.elapsed() < BUDGET {
        run(&mutate(&mut rng, &seeds));
        runs += 1;
    }
    runs
}

#[test]
fn manifest() {
    assert!(exercise("manifest", drover_common::fuzzing::manifest) > 100);
}

#[test]
fn unpack() {
    assert!(exercise("unpack", drover_common::fuzzing::unpack) > 100);
}

#[test]
fn selector() {
    assert!(exercise("selector", drover_common::fuzzing::selector) > 100);
}

#[test]
fn pipeline() {
    assert!(exercise("pipeline", drover_coordinator::fuzzing::pipeline) > 100);
}

#[test]
fn agent_messages() {
    assert!(
        exercise(
            "agent_messages",
            drover_coordinator::fuzzing::agent_messages
        ) > 100
    );
}
