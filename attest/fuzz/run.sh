#!/usr/bin/env bash
# Fuzz every SNP (and, once added, TDX) parser target for SECONDS each; fail on a panic.
#
#   attest/fuzz/run.sh 60
#
# With a nightly toolchain and cargo-fuzz installed this runs libFuzzer (coverage
# guided). Otherwise it falls back to the plain runner (src/bin/plain_fuzz.rs) on the
# stable toolchain: random and mutated inputs, no coverage guidance. It says which.
set -euo pipefail
secs="${1:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
targets=$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' Cargo.toml | grep -v -e '^cvm-attest-fuzz$' -e '^plain-fuzz$' || true)

if cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: libFuzzer via cargo-fuzz (nightly), ${secs}s per target"
    for t in $targets; do
        cargo +nightly fuzz run --features libfuzzer "$t" -- -max_total_time="$secs" -rss_limit_mb=2048
    done
else
    echo "fuzz: cargo-fuzz/nightly not available; plain stable runner, ${secs}s per target"
    cargo build --release --bin plain-fuzz
    for t in $targets; do
        ./target/release/plain-fuzz "$t" "$secs"
    done
fi
echo "fuzz: all targets ran ${secs}s without a panic"
