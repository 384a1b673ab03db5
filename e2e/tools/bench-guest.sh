#!/usr/bin/env bash
# The figures of a real guest on kind, in one run on this machine: apply -> launcher pod
# Running, apply -> the guest agent's first answer (the evidence in the CVM's status) and
# the same answer from a bare qemu-system-x86_64 of the same kernel and initrd, with
# their ratio (goal <= 1.5). Runs e2e/tests/kind_guest.rs, which also checks the path.
#
#   e2e/tools/bench-guest.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
cargo test -p cvm-e2e --test kind_guest -- --nocapture 2>&1 | tee /dev/stderr | grep '^figure:'
