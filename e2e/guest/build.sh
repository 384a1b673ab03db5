#!/usr/bin/env bash
# Builds the test guest: Debian's 6.12 cloud kernel (bookworm-backports: configfs-tsm and
# the SEV/TDX guest drivers, vsock as modules), an initramfs with a static busybox, the
# modules its devices need, a static cvm-agent and e2e/guest/init. Cached outside the
# repo, keyed by the kernel version and the content of everything that goes in.
# Prints the directory holding vmlinuz and initrd.img.
#   e2e/guest/build.sh          build (or reuse) and print the directory
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
KERNEL_VERSION="6.12.95+deb12-cloud-amd64"
KERNEL_PKG_VERSION="6.12.95-1~bpo12+1"
cache="${CVM_TOOLS_CACHE:-$HOME/.cache/cvm-operator}"
target=x86_64-unknown-linux-gnu
log() { echo "guest: $*" >&2; }

[ -x /bin/busybox ] || { log "error: /bin/busybox (busybox-static) is missing: run e2e/tools/install-host-deps.sh"; exit 3; }

# The agent, static (it runs alone in the initramfs).
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --quiet --target "$target" -p cvm-agent) >&2
agent="$repo/target/$target/release/cvm-agent"

key="$( { echo "$KERNEL_VERSION $KERNEL_PKG_VERSION"; sha256sum "$here/init" "$here/build.sh" /bin/busybox "$agent" | cut -d' ' -f1; } | sha256sum | cut -c1-12)"
out="$cache/guest-$KERNEL_VERSION-$key"
# Tests build it from parallel threads: one builds, the others wait and reuse.
mkdir -p "$cache"
exec 9>"$cache/guest.lock"
flock 9
if [ -s "$out/initrd.img" ] && [ -s "$out/vmlinuz" ] && [ -s "$out/rootdisk.img" ]; then
  echo "$out"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The kernel package, from a private apt state (the host's sources are not touched).
deb_dir="$cache/debs"
mkdir -p "$deb_dir" "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
deb="$deb_dir/linux-image-${KERNEL_VERSION}_${KERNEL_PKG_VERSION}_amd64.deb"
if [ ! -s "$deb" ]; then
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" > "$work/apt/sources.list"
  opts=(-o "Dir::Etc::sourcelist=$work/apt/sources.list" -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
        -o "APT::Sandbox::User=root")
  log "downloading linux-image-$KERNEL_VERSION $KERNEL_PKG_VERSION"
  apt-get "${opts[@]}" update -qq >&2
  (cd "$work" && apt-get "${opts[@]}" download "linux-image-$KERNEL_VERSION=$KERNEL_PKG_VERSION" >&2)
  mv "$work"/linux-image-*.deb "$deb"
fi
dpkg-deb -x "$deb" "$work/kernel"
mods="$work/kernel/lib/modules/$KERNEL_VERSION/kernel"

root="$work/root"
mkdir -p "$root/bin" "$root/lib/modules" "$root/data"
cp /bin/busybox "$root/bin/busybox"
cp "$agent" "$root/bin/cvm-agent"
install -m 0755 "$here/init" "$root/init"
for m in fs/configfs/configfs drivers/virt/coco/tsm net/core/failover drivers/net/net_failover \
  drivers/net/virtio_net net/vmw_vsock/vsock net/vmw_vsock/vmw_vsock_virtio_transport_common \
  net/vmw_vsock/vmw_vsock_virtio_transport drivers/virt/coco/sev-guest/sev-guest \
  drivers/virt/coco/tdx-guest/tdx-guest; do
  xz -dc "$mods/$m.ko.xz" > "$root/lib/modules/$(basename "$m").ko"
done

mkdir -p "$out.tmp"
(cd "$root" && find . | sort | busybox cpio -o -H newc 2>/dev/null) | gzip -9 > "$out.tmp/initrd.img"
cp "$work/kernel/boot/vmlinuz-$KERNEL_VERSION" "$out.tmp/vmlinuz"
# The small writable root disk later work attaches (the guest serves its /content at
# /data): ext4, made from a directory, no mount and no root needed.
mkdir -p "$work/disk"
echo "cvm test guest data" > "$work/disk/content"
mkfs.ext4 -q -F -L cvm-data -d "$work/disk" "$out.tmp/rootdisk.img" 16M
rm -rf "$out" && mv "$out.tmp" "$out"
log "built $out ($(du -sh "$out" | cut -f1))"
echo "$out"
