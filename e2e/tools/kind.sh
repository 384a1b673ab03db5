#!/usr/bin/env bash
# Real kind clusters without any image registry: builds a kind node image for Kubernetes
# v1.34.4 here (Go-built components, a debootstrapped Debian base, kind's own base-image
# files read from the kind module) and runs kind v0.33.0 against the private dockerd of
# e2e/tools/docker.sh, which it starts when needed.
#
#   e2e/tools/kind.sh image                        # build or reuse; stdout: the node image tag
#   e2e/tools/kind.sh create NAME KUBECONFIG [N]   # N nodes (default 3: 1 control plane + N-1 workers)
#   e2e/tools/kind.sh load NAME IMAGE...           # copy local docker images into every node
#   e2e/tools/kind.sh delete NAME
#
# Environment: CVM_TOOLS_CACHE (cache root, default ~/.cache/cvm-operator),
# CVM_KIND_IMAGE (node image for create instead of the built one, e.g. kind's published
# kindest/node:v1.34.0 on a machine with a network), CVM_DOCKER_HOST (a docker daemon of
# your own instead of docker.sh's private one),
# CVM_DEBIAN_MIRROR (debootstrap mirror instead of the one apt uses),
# CVM_KIND_READY_TIMEOUT (seconds create waits for Ready nodes, default 300).
# Progress goes to stderr, heavy output to log files in the cache; DOCKER_HOST is set
# from docker.sh for every docker and kind call.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION=v1.34.4
KIND_VERSION=v0.33.0
CRICTL_VERSION=v1.34.0   # cri-tools has no v1.34.4
COREDNS_VERSION=v1.12.1  # what kubeadm v1.34.4 lists
SUITE=bookworm
POD_SUBNET=10.244.0.0/16
# The node's userland: kind's base-image package list, mapped to Debian (containerd, runc
# and the CNI plugins come from Debian instead of kind's own builds).
PACKAGES=(systemd systemd-sysv dbus containerd runc containernetworking-plugins iptables
  nftables conntrack iproute2 mount procps kmod ca-certificates util-linux libseccomp2
  ethtool socat ebtables e2fsprogs udev libnss-systemd ipset jq)
# Bump when the build steps below change: GO_REV for the Go builds, BASE_REV for the
# rootfs steps, IMAGE_REV for component images and the node assembly.
GO_REV=1
BASE_REV=1
IMAGE_REV=2

root="${CVM_TOOLS_CACHE:-$HOME/.cache/cvm-operator}"
T0=$SECONDS

say() { printf '[kind.sh %4ss] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { echo "kind.sh: error: $*" >&2; exit 2; }
usage() {
  sed -n 's/^#   //p' "${BASH_SOURCE[0]}" >&2
  exit 64
}

hash12() { sha256sum | cut -c1-12; }

# --- docker and kind --------------------------------------------------------------------

# Every subcommand talks to docker.sh's daemon (its runtime wrapper is what makes
# privileged node containers work here), never to whatever DOCKER_HOST the caller has,
# unless CVM_DOCKER_HOST names a daemon on purpose.
setup_docker() {
  local line
  # A docker of the user's own (with a network: kind's published node image works too).
  if [ -n "${CVM_DOCKER_HOST:-}" ]; then
    export DOCKER_HOST="$CVM_DOCKER_HOST"
    docker info >/dev/null 2>&1 || die "no docker daemon answers at CVM_DOCKER_HOST=$CVM_DOCKER_HOST"
    return 0
  fi
  line="$(bash "$here/docker.sh" start)" || die "could not start the private dockerd (e2e/tools/docker.sh start)"
  case "$line" in export\ DOCKER_HOST=unix://*) ;; *) die "unexpected output from docker.sh start: $line" ;; esac
  export DOCKER_HOST="${line#export DOCKER_HOST=}"
  # Debian's docker CLI (matching the daemon's API) first on PATH, for this script and
  # for the docker calls kind makes; any other docker CLI works too.
  if [ -x /usr/bin/docker ]; then
    mkdir -p "$root/docker/bin"
    ln -sfn /usr/bin/docker "$root/docker/bin/docker"
    export PATH="$root/docker/bin:$PATH"
  fi
}

need_go() {
  command -v go >/dev/null 2>&1 \
    || die "the Go toolchain is missing; install Go 1.26 or newer (https://go.dev/doc/install) and put 'go' on PATH"
}

# kind from the Go module proxy, into the cache, first on PATH.
setup_kind() {
  local kbin="$root/kind-$KIND_VERSION/bin"
  if [ ! -x "$kbin/kind" ]; then
    need_go
    mkdir -p "$kbin"
    say "installing kind $KIND_VERSION (go install) into $kbin"
    if ! GOBIN="$kbin" go install "sigs.k8s.io/kind@$KIND_VERSION" >"$kbin/../install.log" 2>&1; then
      tail -n 20 "$kbin/../install.log" >&2
      die "go install sigs.k8s.io/kind@$KIND_VERSION failed; see $kbin/../install.log"
    fi
  fi
  export PATH="$kbin:$PATH"
}

# --- Go-built components -----------------------------------------------------------------

# Keyed by the versions, the three tool modules and GO_REV only, so a change to the image
# steps does not rebuild Go code.
go_sum="$( (echo "$GO_REV $K8S_VERSION $CRICTL_VERSION $COREDNS_VERSION"
  cat "$here"/kind/go.mod "$here"/kind/go.sum "$here"/crictl/go.mod "$here"/crictl/go.sum \
    "$here"/coredns/go.mod "$here"/coredns/go.sum) | hash12)"
dir="$root/kind-node-$K8S_VERSION-$go_sum"
bin="$dir/bin"
log="$dir/logs/image.log"

go_build() { # module-dir output package ldflags
  local mod="$1" out="$2" pkg="$3" flags="$4" tmp="$bin/.$2.tmp" t=$SECONDS
  [ -x "$bin/$out" ] && return 0
  need_go
  say "go build $out ($pkg); several minutes when the Go build cache is cold"
  echo "== go build $pkg" >>"$log"
  if ! (cd "$here/$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "$flags" -o "$tmp" "$pkg") >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "building $out failed; see the log: $log"
  fi
  mv "$tmp" "$bin/$out" # atomic: a half-written binary never counts as cached
  say "built $out in $((SECONDS - t)) s"
}

build_components() {
  local major minor kv kflags
  major="${K8S_VERSION#v}"; major="${major%%.*}"
  minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
  # The same version stamps as build.sh.
  kv="k8s.io/component-base/version"
  kflags="-s -w -X $kv.gitVersion=$K8S_VERSION -X $kv.gitMajor=$major -X $kv.gitMinor=$minor -X $kv.gitTreeState=clean -X $kv.buildDate=1970-01-01T00:00:00Z"
  kflags="$kflags -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  go_build kind kubeadm k8s.io/kubernetes/cmd/kubeadm "$kflags"
  go_build kind kubelet k8s.io/kubernetes/cmd/kubelet "$kflags"
  go_build kind kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$kflags"
  go_build kind kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$kflags"
  go_build crictl crictl sigs.k8s.io/cri-tools/cmd/crictl "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION"
  go_build coredns coredns github.com/coredns/coredns "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"
  if [ ! -x "$bin/pause" ]; then
    # kubernetes' own pause.c, from the k8s.io/kubernetes module the tools build from.
    local kdir src tag
    kdir="$(cd "$here/kind" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
    src="$kdir/build/pause/linux/pause.c"
    [ -f "$src" ] || die "pause.c not found at $src"
    tag="$(sed -n 's/^TAG ?= *//p' "$kdir/build/pause/Makefile")"
    command -v gcc >/dev/null 2>&1 || die "gcc is missing (the pause binary is compiled here); run 'apt-get install gcc libc6-dev' (or e2e/tools/install-host-deps.sh)"
    if ! gcc -Os -Wall -Werror -static -DVERSION="v$tag-cvm" -o "$bin/.pause.tmp" "$src" >>"$log" 2>&1; then
      tail -n 20 "$log" >&2
      die "compiling pause.c failed (static linking needs libc6-dev); see $log"
    fi
    mv "$bin/.pause.tmp" "$bin/pause"
    say "built pause $tag from $src"
  fi
}

# --- the node image -----------------------------------------------------------------------

kind_module_dir() {
  # Outside any module: the module cache copy of exactly this kind version.
  (cd "$dir" && go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | jq -r .Dir)
}

# The suite's mirror from apt's own sources (deb822 .sources, then one-line .list).
debian_mirror() {
  if [ -n "${CVM_DEBIAN_MIRROR:-}" ]; then echo "$CVM_DEBIAN_MIRROR"; return 0; fi
  local f m=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    m="$(awk -v suite="$SUITE" '
      BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; suites = ""; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          l = $i
          if (l ~ /^[ \t]*#/) continue
          if (sub(/^Types:[ \t]*/, "", l)) types = l
          else if (sub(/^URIs:[ \t]*/, "", l)) uris = l
          else if (sub(/^Suites:[ \t]*/, "", l)) suites = l
          else if (sub(/^Enabled:[ \t]*/, "", l)) enabled = l
        }
        if (enabled == "no" || (" " types " ") !~ / deb / || (" " suites " ") !~ (" " suite " ")) next
        split(uris, u, " "); print u[1]; exit
      }' "$f")"
    [ -z "$m" ] || break
  done
  if [ -z "$m" ]; then
    m="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v suite="$SUITE" '
      $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == suite) { print $i; exit } }')"
  fi
  [ -n "$m" ] || die "no apt source for Debian $SUITE found in /etc/apt/sources.list or /etc/apt/sources.list.d; add one, or set CVM_DEBIAN_MIRROR"
  echo "$m"
}

# The node's iptables backend follows the host's (kind's entrypoint picks the mode that
# holds docker's rules), and kube-proxy's image uses the same.
iptables_mode() {
  case "$(iptables --version 2>/dev/null)" in *legacy*) echo legacy ;; *) echo nft ;; esac
}

# Unmounts anything left under DIR by an interrupted debootstrap, then removes it.
clean_dir() {
  local d="$1" m
  [ -e "$d" ] || return 0
  for m in $(findmnt -rn -o TARGET | grep -F "$d/" | sort -r); do umount -l "$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$d"
}

# Debian rootfs plus the steps of kind's images/base/Dockerfile; tagged by its inputs.
build_base() { # tag
  local tag="$1" kmod kf rootfs mirror t=$SECONDS
  command -v debootstrap >/dev/null 2>&1 \
    || die "debootstrap is missing; run 'apt-get install debootstrap' (or e2e/tools/install-host-deps.sh)"
  kmod="$(kind_module_dir)"; kf="$kmod/images/base/files"
  [ -d "$kf" ] || die "kind's base-image files not found at $kf"
  mirror="$(debian_mirror)"
  rootfs="$dir/work/rootfs"
  clean_dir "$rootfs"
  mkdir -p "$rootfs"
  say "debootstrap $SUITE (minbase + ${#PACKAGES[@]} packages) from apt's mirror; about a minute"
  echo "== debootstrap $SUITE $mirror" >>"$log"
  if ! debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    "$SUITE" "$rootfs" "$mirror" >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "debootstrap failed; see $log (the rootfs is left in $rootfs)"
  fi
  say "debootstrap done in $((SECONDS - t)) s; applying kind's base-image steps"

  # kind's COPY lines: scripts 0755, everything else 0644, directories as they are.
  local f
  install -m 0755 "$kf"/usr/local/bin/* "$rootfs/usr/local/bin/"
  mkdir -p "$rootfs/kind/bin" "$rootfs/LICENSES" "$rootfs/etc/containerd" \
    "$rootfs/etc/default" "$rootfs/etc/sysctl.d" "$rootfs/etc/systemd/system/kubelet.service.d"
  find "$kf/kind" -maxdepth 1 -type f -exec install -m 0644 {} "$rootfs/kind/" \;
  install -m 0755 "$kf"/kind/bin/* "$rootfs/kind/bin/"
  chmod 0755 "$rootfs/kind" "$rootfs/kind/bin"
  install -m 0644 "$kf"/LICENSES/* "$rootfs/LICENSES/"
  for f in "$kf"/etc/*; do [ -f "$f" ] && install -m 0644 "$f" "$rootfs/etc/"; done
  install -m 0644 "$kf"/etc/containerd/* "$rootfs/etc/containerd/"
  install -m 0644 "$kf"/etc/default/* "$rootfs/etc/default/"
  install -m 0644 "$kf"/etc/sysctl.d/* "$rootfs/etc/sysctl.d/"
  for f in "$kf"/etc/systemd/system/*; do [ -f "$f" ] && install -m 0644 "$f" "$rootfs/etc/systemd/system/"; done
  install -m 0644 "$kf"/etc/systemd/system/kubelet.service.d/* "$rootfs/etc/systemd/system/kubelet.service.d/"

  # kind's clean-up and unit pruning (systemd in a container: no tmpfiles, udev, getty).
  (
    cd "$rootfs"
    rm -rf var/cache/apt/archives/*.deb var/lib/apt/lists/* usr/share/doc/* usr/share/man/* tmp/* var/tmp/*
    find lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete
    rm -f lib/systemd/system/multi-user.target.wants/* etc/systemd/system/*.wants/* \
      lib/systemd/system/local-fs.target.wants/* lib/systemd/system/sockets.target.wants/*udev* \
      lib/systemd/system/sockets.target.wants/*initctl* lib/systemd/system/basic.target.wants/*
    echo "ReadKMsg=no" >>etc/systemd/journald.conf
    ln -sfn /usr/lib/systemd/systemd sbin/init
    mkdir -p etc/kubernetes/manifests
    # Debian's paths for what kind installs under /usr/local and /opt.
    for f in containerd ctr containerd-shim-runc-v2; do ln -sfn "/usr/bin/$f" "usr/local/bin/$f"; done
    mkdir -p opt/cni/bin
    for f in usr/lib/cni/*; do ln -sfn "/$f" "opt/cni/bin/${f##*/}"; done
    # An empty machine-id: the entrypoint makes a fresh one per node.
    : >etc/machine-id
    rm -f var/lib/dbus/machine-id
    chroot "$rootfs" systemctl enable kubelet.service containerd.service undo-mount-hacks.service
    chroot "$rootfs" systemctl mask systemd-binfmt.service
  ) >>"$log" 2>&1
  # kind's cri-base.json: containerd's default spec with the product-files hook, no rlimits.
  chroot "$rootfs" ctr oci spec \
    | jq '.hooks.createContainer[.hooks.createContainer | length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
    | jq 'del(.process.rlimits)' >"$rootfs/etc/containerd/cri-base.json"
  [ -s "$rootfs/etc/containerd/cri-base.json" ] || die "ctr oci spec in the rootfs produced nothing"

  say "importing the rootfs into docker"
  tar --numeric-owner -C "$rootfs" -c . | docker import - "$tag-rootfs" >>"$log"
  # docker import cannot set STOPSIGNAL, a Dockerfile FROM it can.
  printf '%s\n' "FROM $tag-rootfs" "ENV container=docker" "STOPSIGNAL SIGRTMIN+3" \
    'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' \
    | docker build -q -t "$tag" - >>"$log"
  docker rmi "$tag-rootfs" >>"$log" 2>&1 || true # only the tag: the layer is the base's
  clean_dir "$dir/work"
  say "base image $tag ready in $((SECONDS - t)) s"
}

# FROM-scratch images under exactly the names kubeadm lists.
build_component_images() { # base-tag etcd-binary images...
  local base="$1" etcd="$2" ctx img name mode prev
  shift 2
  mode="$(iptables_mode)"
  for img in "$@"; do
    name="${img%:*}"; name="${name##*/}"
    ctx="$dir/work/img-$name"
    rm -rf "$ctx"; mkdir -p "$ctx"
    case "$name" in
      kube-apiserver|kube-controller-manager|kube-scheduler)
        # build.sh's apiserver and controller-manager; our scheduler.
        if [ -x "$K8S_BIN/$name" ]; then cp "$K8S_BIN/$name" "$ctx/$name"; else cp "$bin/$name" "$ctx/$name"; fi
        printf '%s\n' "FROM scratch" "ENV PATH=/usr/local/bin:/usr/bin:/bin" "COPY $name /usr/local/bin/$name" \
          "ENTRYPOINT [\"/usr/local/bin/$name\"]" >"$ctx/Dockerfile" ;;
      etcd)
        cp "$etcd" "$ctx/etcd"
        printf '%s\n' "FROM scratch" "ENV PATH=/usr/local/bin:/usr/bin:/bin" "COPY etcd /usr/local/bin/etcd" \
          'ENTRYPOINT ["/usr/local/bin/etcd"]' >"$ctx/Dockerfile" ;;
      coredns)
        cp "$bin/coredns" "$ctx/coredns"
        printf '%s\n' "FROM scratch" "COPY coredns /coredns" "EXPOSE 53 53/udp" 'ENTRYPOINT ["/coredns"]' >"$ctx/Dockerfile" ;;
      pause)
        cp "$bin/pause" "$ctx/pause"
        printf '%s\n' "FROM scratch" "COPY pause /pause" "USER 65535:65535" 'ENTRYPOINT ["/pause"]' >"$ctx/Dockerfile" ;;
      kube-proxy)
        # kube-proxy execs iptables (and nft, conntrack, ipset): Debian's binaries from
        # the base image with their libraries and xtables modules, collected by a
        # throw-away container (a build stage would leave a dangling image behind).
        cp "$bin/kube-proxy" "$ctx/kube-proxy"
        cat >"$ctx/collect.sh" <<'EOF'
#!/bin/sh
# Copies binaries and everything ldd says they load into /ctx/userland, keeping their paths.
set -eu
mode="$1" out=/ctx/userland
copy() { [ -e "$out$1" ] || { mkdir -p "$out$(dirname "$1")"; cp -L "$1" "$out$1"; }; }
for f in /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi /usr/sbin/nft \
  /usr/sbin/conntrack /usr/sbin/ipset /usr/lib/*/xtables/*.so; do
  copy "$f"
  for l in $(ldd "$f" 2>/dev/null | awk '/=>/ { print $3 } /^[ \t]*\// { print $1 }'); do copy "$l"; done
done
for n in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -sf "xtables-$mode-multi" "$out/usr/sbin/$n"
  ln -sf xtables-nft-multi "$out/usr/sbin/$n-nft"
  ln -sf xtables-legacy-multi "$out/usr/sbin/$n-legacy"
done
for f in /etc/protocols /etc/services /etc/ethertypes; do [ ! -e "$f" ] || copy "$f"; done
mkdir -p "$out/run" "$out/tmp" "$out/var/lib"
EOF
        docker run --rm -v "$ctx:/ctx" --entrypoint sh "$base" /ctx/collect.sh "$mode" >>"$log" 2>&1 \
          || { tail -n 20 "$log" >&2; die "collecting kube-proxy's iptables userland from $base failed; see $log"; }
        printf '%s\n' "FROM scratch" "COPY userland/ /" \
          "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
          "COPY kube-proxy /usr/local/bin/kube-proxy" 'ENTRYPOINT ["/usr/local/bin/kube-proxy"]' >"$ctx/Dockerfile" ;;
      *) die "kubeadm lists an image this script does not know how to build: $img" ;;
    esac
    echo "== docker build $img" >>"$log"
    prev="$(docker image inspect -f '{{.Id}}' "$img" 2>/dev/null || true)"
    docker build -q -t "$img" "$ctx" >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "docker build of $img failed; see $log"; }
    # A moved tag leaves the previous build dangling; drop it unless something uses it.
    if [ -n "$prev" ] && [ "$prev" != "$(docker image inspect -f '{{.Id}}' "$img")" ]; then
      docker rmi "$prev" >>"$log" 2>&1 || true
    fi
  done
  say "component images built: $*"
}

# kind's buildImage(): run the base with sleep, add the binaries, version and manifests,
# import the images into the node's containerd pinned, commit.
assemble_node() { # node-tag base-tag pause-image images...
  local tag="$1" base="$2" pause="$3" cid f
  shift 3
  cid="cvm-kind-build-$$"
  docker rm -f -v "$cid" >/dev/null 2>&1 || true
  docker run -d --name "$cid" --entrypoint=sleep --security-opt seccomp=unconfined "$base" infinity >>"$log"
  # shellcheck disable=SC2064 # the id is fixed now
  trap "docker rm -f -v '$cid' >/dev/null 2>&1 || true" EXIT
  for f in kubelet kubeadm; do docker cp "$bin/$f" "$cid:/usr/bin/$f"; done
  docker cp "$K8S_BIN/kubectl" "$cid:/usr/bin/kubectl"
  docker cp "$bin/crictl" "$cid:/usr/local/bin/crictl"
  docker exec "$cid" sh -c 'chown root:root /usr/bin/kubelet /usr/bin/kubeadm /usr/bin/kubectl /usr/local/bin/crictl &&
    chmod 0755 /usr/bin/kubelet /usr/bin/kubeadm /usr/bin/kubectl /usr/local/bin/crictl'
  printf '%s' "$K8S_VERSION" | docker exec -i "$cid" sh -c 'cat >/kind/version'
  # Only the StorageClass of kind's storage manifest: its provisioner image is not here.
  docker exec "$cid" mkdir -p /kind/manifests
  cat <<'EOF' | docker exec -i "$cid" sh -c 'cat >/kind/manifests/default-storage.yaml'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: rancher.io/local-path
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
EOF
  # Our pause as the sandbox image; restrict_oom_score_adj because root here cannot lower
  # oom_score_adj (no CAP_SYS_RESOURCE) and runc fails otherwise.
  docker exec "$cid" sed -i -E \
    -e "s#^([[:space:]]*sandbox_image[[:space:]]*=[[:space:]]*).*#\1\"$pause\"#" \
    -e 's#restrict_oom_score_adj = false#restrict_oom_score_adj = true#' /etc/containerd/config.toml
  docker exec "$cid" grep -q "sandbox_image = \"$pause\"" /etc/containerd/config.toml \
    || die "could not set sandbox_image in the node's containerd config"
  docker exec "$cid" grep -q 'restrict_oom_score_adj = true' /etc/containerd/config.toml \
    || die "could not set restrict_oom_score_adj in the node's containerd config"

  say "importing $# images into the node's containerd"
  docker exec "$cid" bash -c 'nohup containerd >/var/log/build-containerd.log 2>&1 &'
  docker exec "$cid" bash -c 'for i in $(seq 1 50); do [ -S /run/containerd/containerd.sock ] && ctr version >/dev/null 2>&1 && exit 0; sleep 0.2; done; exit 1' \
    || die "containerd in the build container did not come up"
  docker save "$@" | docker exec -i "$cid" ctr -n k8s.io images import \
    --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests - >>"$log" 2>&1 \
    || { tail -n 20 "$log" >&2; die "ctr images import failed; see $log"; }
  local have img
  have="$(docker exec "$cid" ctr -n k8s.io images ls -q)"
  for img in "$@"; do
    grep -qxF "$img" <<<"$have" || die "image $img missing in the node's containerd after import"
  done
  # The exited containerd stays a zombie (sleep, PID 1, reaps nothing): wait for the
  # live one to go, so the commit sees its final state.
  docker exec "$cid" sh -c 'pkill containerd; for i in $(seq 1 100); do
      ps -e -o stat=,comm= | awk '\''$1 !~ /^Z/ && $2 == "containerd" { f = 1 } END { exit !f }'\'' || exit 0; sleep 0.2
    done; exit 1' || die "containerd in the build container did not stop"
  # Its sockets would only make docker commit complain (the node's /run is a tmpfs).
  docker exec "$cid" rm -rf /var/log/build-containerd.log /run/containerd
  docker commit \
    --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' \
    --change 'CMD []' \
    "$cid" "$tag" >>"$log"
  docker rm -f -v "$cid" >/dev/null
  trap - EXIT
}

cmd_image() {
  command -v jq >/dev/null 2>&1 || die "jq is missing; run 'apt-get install jq' (or e2e/tools/install-host-deps.sh)"
  setup_docker
  # build.sh's kubectl and etcd, and its control-plane binaries; its bin dir is keyed
  # by its own inputs, so it is part of this image's key.
  K8S_BIN="$(bash "$here/build.sh")" || die "e2e/tools/build.sh failed"
  local base_sum base_tag node_sum tag
  base_sum="$( (echo "$BASE_REV $SUITE $KIND_VERSION ${PACKAGES[*]}") | hash12)"
  base_tag="cvm-kind-base:$SUITE-$base_sum"
  node_sum="$( (echo "$IMAGE_REV $base_sum $go_sum $K8S_BIN $(iptables_mode)") | hash12)"
  tag="cvm-kind-node:$K8S_VERSION-$node_sum"
  if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "building the node image needs root (debootstrap, chroot)"
  mkdir -p "$bin" "$dir/logs"
  # One image build at a time: parallel tests may all ask for it at once.
  exec 8>"$root/.kind-image.lock"
  flock 8
  if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    return 0
  fi
  : >"$log"
  say "building node image $tag (log: $log); 8-12 minutes on 2 cores with a cold Go build cache, about 2 with a warm one"
  build_components
  if docker image inspect "$base_tag" >/dev/null 2>&1; then
    say "reusing base image $base_tag"
  else
    build_base "$base_tag"
  fi
  local images pause img
  mapfile -t images < <("$bin/kubeadm" config images list --kubernetes-version "$K8S_VERSION" 2>>"$log")
  [ "${#images[@]}" -gt 0 ] || die "kubeadm config images list printed nothing; see $log"
  pause=""
  for img in "${images[@]}"; do case "${img%:*}" in */pause) pause="$img" ;; esac; done
  [ -n "$pause" ] || die "kubeadm lists no pause image"
  build_component_images "$base_tag" "$K8S_BIN/etcd" "${images[@]}"
  assemble_node "$tag" "$base_tag" "$pause" "${images[@]}"
  clean_dir "$dir/work"
  # Older builds only cost disk; docker refuses (and we skip) those a container still uses.
  local old
  for old in $(docker images --format '{{.Repository}}:{{.Tag}}' | grep -E '^cvm-kind-(node|base):' || true); do
    [ "$old" = "$tag" ] || [ "$old" = "$base_tag" ] || docker rmi "$old" >>"$log" 2>&1 || true
  done
  say "node image $tag ready ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.2f GB", $1 / 1e9 }'))"
  echo "$tag"
}

# --- clusters -----------------------------------------------------------------------------

kubectl_() { "$K8S_BIN/kubectl" --kubeconfig "$KCFG" "$@"; }

cluster_exists() { kind get clusters 2>/dev/null | grep -qxF "$1"; }

# Our CNI in place of kindnetd: each node gets a bridge conflist for its own podCIDR,
# routes to the other nodes' pod CIDRs via their node IPs, and a masquerade for pod
# traffic leaving the pod network.
setup_network() { # name nodes
  local name="$1" want="$2" lines n=0 t=$SECONDS
  while :; do
    lines="$(kubectl_ get nodes -o jsonpath='{range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}' 2>/dev/null || true)"
    n="$(awk 'NF == 3' <<<"$lines" | wc -l)"
    [ "$n" -ge "$want" ] && break
    [ $((SECONDS - t)) -lt 120 ] || die "only $n of $want nodes have a podCIDR after 120 s"
    sleep 1
  done
  local node cidr ip onode ocidr oip
  while read -r node cidr ip; do
    [ -n "$node" ] || continue
    jq -n --arg cidr "$cidr" '{
      cniVersion: "1.0.0", name: "cvm-bridge",
      plugins: [
        {type: "bridge", bridge: "cni0", isGateway: true, ipMasq: false, hairpinMode: true,
         ipam: {type: "host-local", ranges: [[{subnet: $cidr}]], routes: [{dst: "0.0.0.0/0"}]}},
        {type: "portmap", capabilities: {portMappings: true}}
      ]}' | docker exec -i "$node" sh -c 'mkdir -p /etc/cni/net.d &&
        cat >/etc/cni/net.d/.cvm-bridge.tmp && mv /etc/cni/net.d/.cvm-bridge.tmp /etc/cni/net.d/10-cvm-bridge.conflist'
    while read -r onode ocidr oip; do
      if [ -z "$onode" ] || [ "$onode" = "$node" ]; then continue; fi
      docker exec "$node" ip route replace "$ocidr" via "$oip" </dev/null
    done <<<"$lines"
    docker exec "$node" sh -c "iptables -t nat -C POSTROUTING -s $POD_SUBNET ! -d $POD_SUBNET -m comment --comment cvm-pod-egress -j MASQUERADE 2>/dev/null ||
      iptables -t nat -A POSTROUTING -s $POD_SUBNET ! -d $POD_SUBNET -m comment --comment cvm-pod-egress -j MASQUERADE" </dev/null
    say "network on $node: bridge cni0 $cidr, node IP $ip"
  done <<<"$lines"
}

cmd_create() { # name kubeconfig [nodes]
  if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
  local name="$1" kcfg="$2" nodes="${3:-3}" image
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive number, not '$nodes'"
  [[ "$name" =~ ^[a-z0-9][a-z0-9.-]*$ ]] || die "NAME must be lower-case letters, digits, '.' and '-'"
  if [ -n "${CVM_KIND_IMAGE:-}" ]; then
    image="$CVM_KIND_IMAGE"
    setup_docker
    K8S_BIN="$(bash "$here/build.sh")" || die "e2e/tools/build.sh failed"
  else
    image="$(cmd_image)" # also sets up docker; K8S_BIN is set again below (subshell)
    K8S_BIN="$(bash "$here/build.sh")"
  fi
  setup_docker
  setup_kind
  cluster_exists "$name" && die "cluster '$name' already exists; run '$0 delete $name' first"
  mkdir -p "$(dirname "$kcfg")"
  local tmp cfg i
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064 # the path is fixed now
  trap "rm -rf '$tmp'" EXIT
  cfg="$tmp/kind.yaml"
  {
    echo "kind: Cluster"
    echo "apiVersion: kind.x-k8s.io/v1alpha4"
    echo "networking:"
    echo "  disableDefaultCNI: true"
    echo "  podSubnet: $POD_SUBNET"
    echo "nodes:"
    echo "- role: control-plane"
    for ((i = 1; i < nodes; i++)); do echo "- role: worker"; done
  } >"$cfg"
  local klog="$root/kind-$KIND_VERSION/create-$name.log" t=$SECONDS
  say "kind create cluster $name ($nodes nodes, image $image; log $klog)"
  if ! kind create cluster --name "$name" --image "$image" --config "$cfg" \
    --kubeconfig "$tmp/kubeconfig" >"$klog" 2>&1; then
    tail -n 30 "$klog" >&2
    die "kind create cluster failed; see $klog"
  fi
  local t_create=$((SECONDS - t))
  say "kind create took $t_create s"
  install -m 0600 "$tmp/kubeconfig" "$kcfg.tmp"
  mv "$kcfg.tmp" "$kcfg"
  KCFG="$kcfg"
  # The control plane takes workloads too.
  if kubectl_ get node "$name-control-plane" -o jsonpath='{.spec.taints[*].key}' | grep -qw node-role.kubernetes.io/control-plane; then
    kubectl_ taint nodes "$name-control-plane" node-role.kubernetes.io/control-plane:NoSchedule- >/dev/null
  fi
  setup_network "$name" "$nodes"
  local ready timeout="${CVM_KIND_READY_TIMEOUT:-300}"
  while :; do
    ready="$(kubectl_ get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c '^True$' || true)"
    [ "$ready" -ge "$nodes" ] && break
    if [ $((SECONDS - t)) -ge "$timeout" ]; then
      kubectl_ get nodes -o wide >&2 || true
      die "only $ready of $nodes nodes Ready after $timeout s; the cluster is left for inspection ('kind export logs --name $name', then '$0 delete $name')"
    fi
    sleep 1
  done
  local t_ready=$((SECONDS - t))
  # kind's --wait does not cover the default ServiceAccount, which pods need.
  until kubectl_ -n default get serviceaccount default >/dev/null 2>&1; do
    [ $((SECONDS - t)) -lt "$timeout" ] || die "no default ServiceAccount after $timeout s"
    sleep 0.5
  done
  say "cluster $name: kind create ${t_create} s, all $nodes nodes Ready at ${t_ready} s, default ServiceAccount at $((SECONDS - t)) s; kubeconfig $kcfg"
}

cmd_load() { # name images...
  [ $# -ge 2 ] || usage
  local name="$1" t=$SECONDS
  shift
  setup_docker
  setup_kind
  cluster_exists "$name" || die "no cluster named '$name'"
  kind load docker-image --name "$name" "$@" >&2
  say "loaded $* into $name in $((SECONDS - t)) s"
}

cmd_delete() { # name
  [ $# -eq 1 ] || usage
  local name="$1" t=$SECONDS tmp
  setup_docker
  setup_kind
  tmp="$(mktemp -d)"
  # A throw-away kubeconfig: kind would otherwise edit ~/.kube/config.
  kind delete cluster --name "$name" --kubeconfig "$tmp/kubeconfig" >&2
  rm -rf "$tmp"
  say "deleted $name in $((SECONDS - t)) s"
}

[ $# -ge 1 ] || usage
sub="$1"
shift
case "$sub" in
  image) [ $# -eq 0 ] || usage; cmd_image ;;
  create) cmd_create "$@" ;;
  load) cmd_load "$@" ;;
  delete) cmd_delete "$@" ;;
  *) usage ;;
esac
