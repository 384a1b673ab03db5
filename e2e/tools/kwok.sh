#!/usr/bin/env bash
# Builds kwok (sigs.k8s.io/kwok/cmd/kwok: keeps fake Nodes Ready and moves the pods bound
# to them to Running, with no kubelet) and kube-scheduler (from e2e/tools/kube, the same
# Kubernetes release as build.sh's control plane: kwok binds no pods) into a cache outside
# the repo, keyed by the pinned versions, and prints the bin directory holding both.
# Next to it, ../stages.yaml: the Stages kwokctl gives kwok by default (node-initialize,
# node-heartbeat-with-lease, pod-ready, pod-complete, pod-delete) from the same kwok
# module, for `kwok --config` (the kwok binary alone has none). Reuses a complete cache.
#
#   e2e/tools/kwok.sh              # build or reuse; prints the bin dir on stdout
#   CVM_TOOLS_CACHE=DIR kwok.sh    # cache root (default ~/.cache/cvm-operator)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KWOK_VERSION=v0.8.0
K8S_VERSION=v1.34.4 # build.sh's; kube-scheduler comes from its module (e2e/tools/kube)

if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is missing; install Go 1.26 or newer (https://go.dev/doc/install) and put 'go' on PATH" >&2
  exit 3
fi

# The key covers the versions, the kube module (kube-scheduler's sources) and BUILD_REV
# (bump it when the build flags below change).
BUILD_REV=1
sum="$( (echo "$BUILD_REV $KWOK_VERSION $K8S_VERSION"; cat "$here"/kube/go.mod "$here"/kube/go.sum) \
  | sha256sum | cut -c1-12)"
root="${CVM_TOOLS_CACHE:-$HOME/.cache/cvm-operator}"
dir="$root/kwok-$KWOK_VERSION-$sum"
bin="$dir/bin"
want=(kwok kube-scheduler)
stages="$dir/stages.yaml"

complete() {
  local b
  for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done
  [ -s "$stages" ]
}
if complete; then
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
# One build at a time: parallel test binaries may all ask for it at once.
exec 9>"$dir/.build.lock"
flock 9
if complete; then
  echo "$bin"
  exit 0
fi
log="$dir/build.log"
: >"$log"
echo "building kwok $KWOK_VERSION and kube-scheduler $K8S_VERSION into $bin (log: $log); minutes when the Go build cache is cold" >&2

if [ ! -x "$bin/kwok" ]; then
  # go install of the tagged module: its own go.mod and go.sum, checked against sum.golang.org.
  gobin="$dir/.gobin"
  rm -rf "$gobin"
  echo "== go install sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >>"$log"
  if ! CGO_ENABLED=0 GOBIN="$gobin" go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >>"$log" 2>&1; then
    echo "error: building kwok failed; see the log: $log" >&2
    tail -n 20 "$log" >&2
    exit 4
  fi
  mv "$gobin/kwok" "$bin/kwok" # atomic: a half-written binary never counts as cached
  rm -rf "$gobin"
fi

if [ ! -x "$bin/kube-scheduler" ]; then
  major="${K8S_VERSION#v}"; major="${major%%.*}"
  minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
  # The same version stamps as build.sh.
  kv="k8s.io/component-base/version"
  kflags="-s -w -X $kv.gitVersion=$K8S_VERSION -X $kv.gitMajor=$major -X $kv.gitMinor=$minor -X $kv.gitTreeState=clean -X $kv.buildDate=1970-01-01T00:00:00Z"
  kflags="$kflags -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  tmp="$bin/.kube-scheduler.tmp"
  echo "== go build k8s.io/kubernetes/cmd/kube-scheduler" >>"$log"
  if ! (cd "$here/kube" && CGO_ENABLED=0 go build -trimpath -ldflags "$kflags" -o "$tmp" \
    k8s.io/kubernetes/cmd/kube-scheduler) >>"$log" 2>&1; then
    echo "error: building kube-scheduler failed; see the log: $log" >&2
    tail -n 20 "$log" >&2
    exit 4
  fi
  mv "$tmp" "$bin/kube-scheduler"
fi

if [ ! -s "$stages" ]; then
  moddir="$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" 2>>"$log" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  s="$moddir/kustomize/stage"
  files=("$s/node/fast/node-initialize.yaml" "$s/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml"
    "$s/pod/fast/pod-ready.yaml" "$s/pod/fast/pod-complete.yaml" "$s/pod/fast/pod-delete.yaml")
  for f in "${files[@]}"; do
    if [ ! -s "$f" ]; then
      echo "error: kwok $KWOK_VERSION's stage file $f is missing (module dir: '${moddir}')" >&2
      exit 4
    fi
  done
  tmp="$dir/.stages.tmp"
  for f in "${files[@]}"; do echo "---"; cat "$f"; done >"$tmp"
  mv "$tmp" "$stages"
fi
echo "$bin"
