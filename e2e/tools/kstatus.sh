#!/usr/bin/env bash
# Builds `kstatus` (e2e/tools/kstatus: sigs.k8s.io/cli-utils' status.Compute, the rule
# Flux applies to `wait: true` and healthChecks) into a cache outside the repo, keyed by
# its sources, and prints the binary's path. Reuses the cache when it is there.
#
#   e2e/tools/kstatus.sh              # build or reuse; prints the binary path on stdout
#   CVM_TOOLS_CACHE=DIR kstatus.sh    # cache root (default ~/.cache/cvm-operator)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLI_UTILS_VERSION=v0.37.2

if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is missing; install Go 1.24 or newer (https://go.dev/doc/install) and put 'go' on PATH" >&2
  exit 3
fi

# The key covers the sources and BUILD_REV (bump it when the build flags below change).
BUILD_REV=1
src="$here/kstatus"
sum="$( (echo "$BUILD_REV"; cat "$src/go.mod" "$src/go.sum" "$src/main.go") | sha256sum | cut -c1-12)"
root="${CVM_TOOLS_CACHE:-$HOME/.cache/cvm-operator}"
dir="$root/kstatus-$CLI_UTILS_VERSION-$sum"
bin="$dir/kstatus"

if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$dir"
# One build at a time: parallel test binaries may all ask for it at once.
exec 9>"$dir/.build.lock"
flock 9
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
log="$dir/build.log"
echo "building kstatus (cli-utils $CLI_UTILS_VERSION) into $bin (log: $log)" >&2
tmp="$dir/.kstatus.tmp"
if ! (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp" .) >"$log" 2>&1; then
  echo "error: building kstatus failed; see the log: $log" >&2
  tail -n 20 "$log" >&2
  exit 4
fi
mv "$tmp" "$bin" # atomic: a half-written binary never counts as cached
echo "$bin"
