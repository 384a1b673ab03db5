#!/usr/bin/env bash
# Builds the real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kubectl), etcd and helm from their Go modules into a cache outside the repo, keyed by
# the pinned versions, and prints the bin directory. Reuses the cache when complete.
#
#   e2e/tools/build.sh            # build or reuse; prints the bin dir on stdout
#   CVM_TOOLS_CACHE=DIR build.sh  # cache root (default ~/.cache/cvm-operator)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.19.5

if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is missing; install Go 1.26 or newer (https://go.dev/doc/install) and put 'go' on PATH" >&2
  exit 3
fi

# The key covers the pinned versions, every go.mod/go.sum and BUILD_REV (bump it when
# the build flags below change), so a version bump rebuilds and nothing else does.
BUILD_REV=1
sum="$( (echo "$BUILD_REV"; cat "$here"/kube/go.mod "$here"/kube/go.sum "$here"/etcd/go.mod \
  "$here"/etcd/go.sum "$here"/helm/go.mod "$here"/helm/go.sum) | sha256sum | cut -c1-12)"
root="${CVM_TOOLS_CACHE:-$HOME/.cache/cvm-operator}"
dir="$root/k8s-$K8S_VERSION-$sum"
bin="$dir/bin"
want=(kube-apiserver kube-controller-manager kubectl etcd helm)

complete=1
for b in "${want[@]}"; do [ -x "$bin/$b" ] || complete=0; done
if [ "$complete" = 1 ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$bin" "$dir/logs"
# One build at a time: parallel test binaries may all ask for the tools at once.
exec 9>"$dir/.build.lock"
flock 9
complete=1
for b in "${want[@]}"; do [ -x "$bin/$b" ] || complete=0; done
if [ "$complete" = 1 ]; then
  echo "$bin"
  exit 0
fi
log="$dir/logs/build.log"
: >"$log"
echo "building Kubernetes $K8S_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION into $bin (log: $log); this takes 10-20 minutes once" >&2

major="${K8S_VERSION#v}"; major="${major%%.*}"
minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
kv="k8s.io/component-base/version"
kflags="-s -w -X $kv.gitVersion=$K8S_VERSION -X $kv.gitMajor=$major -X $kv.gitMinor=$minor -X $kv.gitTreeState=clean -X $kv.buildDate=1970-01-01T00:00:00Z"
kflags="$kflags -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"

build() { # module-dir output package ldflags
  local mod="$1" out="$2" pkg="$3" flags="$4" tmp="$bin/.$2.tmp"
  echo "== go build $pkg" >>"$log"
  if ! (cd "$here/$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "$flags" -o "$tmp" "$pkg") >>"$log" 2>&1; then
    echo "error: building $out failed; see the log: $log" >&2
    tail -n 20 "$log" >&2
    exit 4
  fi
  mv "$tmp" "$bin/$out" # atomic: a half-written binary never counts as cached
}

[ -x "$bin/etcd" ] || build etcd etcd go.etcd.io/etcd/server/v3 "-s -w"
[ -x "$bin/helm" ] || build helm helm helm.sh/helm/v3/cmd/helm "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
[ -x "$bin/kube-apiserver" ] || build kube kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kflags"
[ -x "$bin/kube-controller-manager" ] || build kube kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kflags"
[ -x "$bin/kubectl" ] || build kube kubectl k8s.io/kubernetes/cmd/kubectl "$kflags"
echo "$bin"
