#!/usr/bin/env bash
# Packages the test guest (build.sh's directory) as a containerDisk image, as KubeVirt
# ships VM disks: FROM scratch, the files under /disk/ (vmlinuz, initrd.img, rootdisk.img),
# tagged by the guest's content key so a changed guest is a new tag. Built with the
# private docker daemon (e2e/tools/docker.sh); nothing is pulled. Prints the image name.
#
#   e2e/guest/image.sh [GUEST_DIR]     # default: the output of build.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$(bash "$here/build.sh" | tail -n1)}"
for f in vmlinuz initrd.img rootdisk.img; do
  [ -s "$dir/$f" ] || { echo "image: error: $dir/$f is missing (run e2e/guest/build.sh)" >&2; exit 3; }
done
if [ -z "${DOCKER_HOST:-}" ]; then
  eval "$(bash "$here/../tools/docker.sh" start)"
fi
tag="cvm-test-guest:${dir##*-}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/disk"
cp "$dir/vmlinuz" "$dir/initrd.img" "$dir/rootdisk.img" "$ctx/disk/"
# KubeVirt's convention: the disk files are owned by its QEMU user (107).
printf 'FROM scratch\nCOPY --chown=107:107 disk/ /disk/\n' > "$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx" >/dev/null
echo "$tag"
