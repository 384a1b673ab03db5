#!/usr/bin/env bash
# End-to-end check of kind.sh: a fresh cluster, a pod on every node from a FROM-scratch
# busybox image loaded with `kind.sh load`, then from one pod: the API server through the
# `kubernetes` Service, a pod on another node by its IP, and cluster DNS. Deletes the
# cluster at the end (also on failure) and, with --stop-docker, stops docker.sh's daemon.
#
#   e2e/tools/kind-smoke.sh [--stop-docker] [NODES]    # default 3 nodes
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
stop_docker=0
if [ "${1:-}" = --stop-docker ]; then stop_docker=1; shift; fi
nodes="${1:-3}"
name="cvm-smoke"
root="${CVM_TOOLS_CACHE:-$HOME/.cache/cvm-operator}"
T0=$SECONDS
say() { printf '[smoke %4ss] %s\n' "$((SECONDS - T0))" "$*" >&2; }
fail() { echo "kind-smoke: FAIL: $*" >&2; exit 1; }

# Static: a dynamic busybox has no libc in a FROM-scratch image.
if [ ! -x /bin/busybox ] || LC_ALL=C readelf -l /bin/busybox 2>/dev/null | grep -q interpreter; then
  fail "a static /bin/busybox is needed for the test image; run 'apt-get install busybox-static' (or e2e/tools/install-host-deps.sh)"
fi

eval "$(bash "$here/docker.sh" start)"
export PATH="$root/docker/bin:$PATH"
kubectl="$(bash "$here/build.sh")/kubectl"

# The test image: static busybox and its applet links, nothing else.
ctx="$(mktemp -d)"
kcfg="$ctx/kubeconfig"
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -f "$kcfg" ]; then
    "$kubectl" --kubeconfig "$kcfg" get nodes,pods -A -o wide >&2 || true
  fi
  bash "$here/kind.sh" delete "$name" || true
  rm -rf "$ctx"
  if [ "$stop_docker" = 1 ]; then bash "$here/docker.sh" stop || true; fi
  exit "$rc"
}
trap cleanup EXIT
mkdir -p "$ctx/img/bin"
cp /bin/busybox "$ctx/img/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$ctx/img/bin/$a"; done
printf '%s\n' "FROM scratch" "COPY bin/ /bin/" "ENV PATH=/bin" 'ENTRYPOINT ["/bin/sh"]' >"$ctx/img/Dockerfile"
image="cvm-test-busybox:$(sha256sum /bin/busybox | cut -c1-12)"
docker build -q -t "$image" "$ctx/img" >/dev/null
say "test image $image"

if bash "$here/kind.sh" delete "$name" >/dev/null 2>&1; then :; fi
bash "$here/kind.sh" create "$name" "$kcfg" "$nodes"
k() { "$kubectl" --kubeconfig "$kcfg" "$@"; }
k get nodes -o wide >&2
bash "$here/kind.sh" load "$name" "$image"

# One pod per node, pinned by nodeName; each serves its name over HTTP on 8080.
mapfile -t node_names < <(k get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
i=0
for n in "${node_names[@]}"; do
  cat <<EOF | k apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata:
  name: probe-$i
  labels: {app: cvm-smoke}
spec:
  nodeName: $n
  terminationGracePeriodSeconds: 0
  containers:
  - name: c
    image: $image
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "mkdir -p /www && echo probe-$i on $n >/www/index.html && exec httpd -f -p 8080 -h /www"]
EOF
  i=$((i + 1))
done
t=$SECONDS
k wait --for=condition=Ready pod -l app=cvm-smoke --timeout=120s >/dev/null || fail "probe pods not Ready"
say "${#node_names[@]} probe pods Ready in $((SECONDS - t)) s"
k get pods -l app=cvm-smoke -o wide >&2

last=$((${#node_names[@]} - 1))
svc_ip="$(k get service kubernetes -o jsonpath='{.spec.clusterIP}')"
out="$(k exec probe-$last -- wget -q -O- --no-check-certificate "https://$svc_ip:443/version")" \
  || fail "probe-$last could not reach the API server at https://$svc_ip:443"
grep -q '"gitVersion"' <<<"$out" || fail "unexpected answer from https://$svc_ip:443/version: $out"
say "probe-$last (on ${node_names[$last]}) -> https://$svc_ip:443/version: $(tr -d ' \n' <<<"$out" | grep -o '"gitVersion":"[^"]*"')"

if [ "$last" -gt 0 ]; then
  ip0="$(k get pod probe-0 -o jsonpath='{.status.podIP}')"
  out="$(k exec probe-$last -- wget -q -O- "http://$ip0:8080/")" || fail "probe-$last could not reach probe-0 at $ip0:8080"
  say "probe-$last (on ${node_names[$last]}) -> http://$ip0:8080/ on ${node_names[0]}: $out"
  ip1="$(k get pod probe-1 -o jsonpath='{.status.podIP}')"
  out="$(k exec probe-0 -- wget -q -O- "http://$ip1:8080/")" || fail "probe-0 could not reach probe-1 at $ip1:8080"
  say "probe-0 -> http://$ip1:8080/: $out"
fi

k -n kube-system wait --for=condition=Ready pod -l k8s-app=kube-dns --timeout=120s >/dev/null || fail "CoreDNS not Ready"
out="$(k exec probe-0 -- nslookup kubernetes.default.svc.cluster.local)" || fail "cluster DNS lookup failed: $out"
grep -q "$svc_ip" <<<"$out" || fail "DNS answered without $svc_ip: $out"
say "probe-0: kubernetes.default.svc.cluster.local resolves to $svc_ip"
say "PASS"
