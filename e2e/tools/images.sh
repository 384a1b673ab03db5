#!/usr/bin/env bash
# Builds the cvm-operator, cvm-node-plugin and cvm-launcher images from static binaries with
# the private docker daemon (docker.sh), FROM scratch: nothing is pulled. Prints the
# image references on stdout, one a line, and their sizes on stderr.
#
#   e2e/tools/images.sh [TAG]     # default TAG: dev
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
tag="${1:-dev}"
target=x86_64-unknown-linux-gnu
# Cargo profile: `image` (unoptimised, quick to build) for dev and test clusters;
# CVM_IMAGE_PROFILE=release for the optimised binaries production images carry.
profile="${CVM_IMAGE_PROFILE:-image}"
start=$(date +%s)
say() { echo "images: [$(( $(date +%s) - start ))s] $*" >&2; }

command -v cargo >/dev/null 2>&1 || { echo "images: error: cargo is missing; install Rust (stable) first" >&2; exit 3; }
if [ -z "${DOCKER_HOST:-}" ]; then
  eval "$(bash "$here/docker.sh" start)"
fi
docker=/usr/bin/docker
[ -x "$docker" ] || docker=docker

say "building static binaries (profile $profile, target $target)"
# crt-static links glibc in: the binaries run FROM scratch. An explicit --target keeps
# build scripts and proc macros dynamic (they run on the host).
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --profile "$profile" --locked --quiet --target "$target" -p cvm-operator -p cvm-node-plugin) >&2
out="$repo/target/$target/$profile"
for b in cvm-operator cvm-node-plugin cvm-launcher; do
  if ! file_out="$(file -b "$out/$b" 2>/dev/null)"; then file_out=""; fi
  case "$file_out" in
    *dynamically*) echo "images: error: $out/$b is dynamically linked; it would not run FROM scratch" >&2; exit 4 ;;
  esac
done

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
build() { # name dockerfile
  local name="$1" dockerfile="$2"
  rm -rf "${ctx:?}"/*
  cp "$out/$name" "$ctx/"
  # The legacy builder: FROM scratch needs no BuildKit and no pull.
  DOCKER_BUILDKIT=0 "$docker" build -q -f "$dockerfile" -t "$name:$tag" "$ctx" >/dev/null
  echo "$name:$tag"
}
# The launcher's root: the static launcher and Debian's QEMU with the libraries it links
# and the firmware a direct-kernel boot reads (SeaBIOS, the linuxboot option ROMs).
launcher_root() { # dir
  local root="$1" qemu lib
  qemu="$(command -v qemu-system-x86_64)" || { echo "images: error: qemu-system-x86_64 is missing (run e2e/tools/install-host-deps.sh)" >&2; exit 3; }
  mkdir -p "$root/usr/local/bin" "$root/usr/bin" "$root/usr/share/qemu" "$root/usr/share/seabios"
  cp "$out/cvm-launcher" "$root/usr/local/bin/"
  cp -L "$qemu" "$root/usr/bin/qemu-system-x86_64"
  for lib in $(ldd "$qemu" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  # Debian builds TCG's accelerator as a module (accel-tcg-x86_64.so): hosts without KVM
  # (the test nodes) need it.
  local mods=/usr/lib/x86_64-linux-gnu/qemu
  if [ -d "$mods" ]; then
    mkdir -p "$root$mods"
    cp -L "$mods"/accel-*.so "$root$mods/" 2>/dev/null || true
  fi
  for f in kvmvapic.bin linuxboot.bin linuxboot_dma.bin multiboot.bin multiboot_dma.bin pvh.bin; do
    [ -e "/usr/share/qemu/$f" ] && cp -L "/usr/share/qemu/$f" "$root/usr/share/qemu/"
  done
  cp -L /usr/share/seabios/*.bin "$root/usr/share/seabios/" 2>/dev/null || true
  [ -s "$root/usr/share/seabios/bios-256k.bin" ] || { echo "images: error: /usr/share/seabios/bios-256k.bin is missing (Debian's seabios package)" >&2; exit 3; }
}

say "docker build"
build cvm-operator "$repo/operator/Dockerfile"
build cvm-node-plugin "$repo/node-plugin/Dockerfile"
rm -rf "${ctx:?}"/*
launcher_root "$ctx/root"
DOCKER_BUILDKIT=0 "$docker" build -q -f "$repo/node-plugin/launcher.Dockerfile" -t "cvm-launcher:$tag" "$ctx" >/dev/null
echo "cvm-launcher:$tag"
for i in cvm-operator cvm-node-plugin cvm-launcher; do
  say "$i:$tag $("$docker" image inspect -f '{{.Size}}' "$i:$tag" | awk '{printf "%.1f MB", $1/1e6}')"
done
