//! Stable-toolchain stand-in for libFuzzer: feeds a target random bytes and mutated
//! seeds (byte flips, truncations, splices) for a number of seconds. Not coverage
//! guided, so weaker than `cargo fuzz`; it still proves "no panic" on many inputs.
//!
//! Usage: plain-fuzz TARGET SECONDS

use std::panic;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: fast and good enough to pick mutations.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.below(8) == 0 {
        let len = rng.below(2048);
        return (0..len).map(|_| rng.next() as u8).collect();
    }
    let mut d = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(8) {
        match rng.below(5) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] = rng.next() as u8;
            }
            2 => d.truncate(rng.below(d.len() + 1)),
            3 => {
                let i = rng.below(d.len() + 1);
                let n = rng.below(16);
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(i..i, junk);
            }
            _ if !d.is_empty() => {
                // Interesting values at a random spot (lengths, tags, versions).
                let i = rng.below(d.len());
                d[i] = [0x00, 0x01, 0x02, 0x05, 0x30, 0x7F, 0x80, 0x81, 0x82, 0xFF][rng.below(10)];
            }
            _ => {}
        }
    }
    d
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(target), Some(secs)) = (args.get(1), args.get(2).and_then(|s| s.parse::<u64>().ok()))
    else {
        eprintln!(
            "usage: plain-fuzz TARGET SECONDS (targets: {:?})",
            cvm_attest_fuzz::TARGETS
        );
        std::process::exit(2);
    };
    if !cvm_attest_fuzz::TARGETS.contains(&target.as_str()) {
        eprintln!(
            "unknown target {target} (targets: {:?})",
            cvm_attest_fuzz::TARGETS
        );
        std::process::exit(2);
    }
    let seeds = cvm_attest_fuzz::seeds(target);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ std::process::id() as u64);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let input = mutate(&mut rng, &seeds);
        let result = panic::catch_unwind(|| cvm_attest_fuzz::run(target, &input));
        if result.is_err() {
            let path = format!("crash-{target}-{runs}.bin");
            let _ = std::fs::write(&path, &input);
            eprintln!("{target}: PANIC on input saved to {path}");
            std::process::exit(1);
        }
        runs += 1;
    }
    println!("{target}: {runs} inputs in {secs}s, no panic");
}
