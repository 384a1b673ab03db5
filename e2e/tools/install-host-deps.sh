#!/usr/bin/env bash
# Installs what the host-side tests and the kind tooling need, from Debian's apt:
#   qemu-system-x86   QEMU for x86_64, used by cvm-host's QMP and process tests
#   docker.io         dockerd, containerd and runc for e2e/tools/docker.sh and kind.sh
#   debootstrap       the node image's base rootfs (kind.sh image)
#   iptables, jq      dockerd's networking; JSON edits in the runtime wrapper and kind.sh
#   gcc, libc6-dev    the static pause binary (kind.sh image)
#   busybox-static    a static busybox for FROM-scratch test images
#   lua5.1            runs the chart's Argo CD health script (e2e/tests/gitops.rs)
#   xz-utils          unpacks the test guest's kernel modules (e2e/guest/build.sh)
# Idempotent: only what is missing is installed, and apt is not touched when nothing is.
set -euo pipefail

# "probe package": the probe is a command name or an absolute path that the package
# provides; a package is wanted only when its probe is absent, so a tool installed some
# other way (e.g. a QEMU built from source) is left alone.
deps=(
  "qemu-system-x86_64 qemu-system-x86"
  "/usr/sbin/dockerd docker.io"
  "/usr/sbin/runc runc"
  "/usr/sbin/debootstrap debootstrap"
  "/usr/sbin/iptables iptables"
  "jq jq"
  "gcc gcc"
  "/usr/lib/x86_64-linux-gnu/libc.a libc6-dev"
  "/bin/busybox busybox-static"
  "lua5.1 lua5.1"
  "xz xz-utils"
  "/usr/sbin/mkfs.ext4 e2fsprogs"
)

have() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

missing=()
for d in "${deps[@]}"; do
  probe="${d%% *}" pkg="${d#* }"
  # Debian's dynamic busybox also ships /bin/busybox; only the static one works FROM
  # scratch, so that package is checked by name.
  if [ "$pkg" = busybox-static ] && have "$probe" \
    && ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
    missing+=("$pkg")
    continue
  fi
  have "$probe" || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-host-deps: everything already installed ($(qemu-system-x86_64 --version | head -n1); $(/usr/sbin/dockerd --version))"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-host-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-host-deps: $(qemu-system-x86_64 --version | head -n1); $(/usr/sbin/dockerd --version)"
