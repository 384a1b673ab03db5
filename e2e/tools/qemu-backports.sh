#!/usr/bin/env bash
# Debian bookworm-backports' QEMU (10.0: it has the sev-snp-guest object; tdx-guest came
# in 10.1) unpacked into the cache beside the host's own QEMU, never installed: its three
# packages are downloaded through a private apt state; the libraries it links are the
# ones Debian stable's QEMU already brought (install-host-deps.sh), and a missing one is
# named. Prints the directory holding `qemu-system-x86_64` (a wrapper that sets the
# library path and the firmware directory).
#
#   e2e/tools/qemu-backports.sh      # stdout: DIR; DIR/qemu-system-x86_64 --version
set -euo pipefail
VERSION="1:10.0.2+ds-2+deb13u1~bpo12+1"
cache="${CVM_TOOLS_CACHE:-$HOME/.cache/cvm-operator}"
key="$(echo "$VERSION $(sha256sum "$0" | cut -c1-12)" | sha256sum | cut -c1-12)"
out="$cache/qemu-backports-$key"
log() { echo "qemu-backports: $*" >&2; }
mkdir -p "$cache"
exec 9>"$cache/qemu-backports.lock"
flock 9
if [ -x "$out/qemu-system-x86_64" ]; then
  echo "$out"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
kr=/usr/share/keyrings/debian-archive-keyring.gpg
mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)"
[ -n "$mirror" ] || mirror="$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null)"
[ -n "$mirror" ] || { log "error: no Debian mirror found in /etc/apt"; exit 3; }
{
  echo "deb [signed-by=$kr] $mirror bookworm main"
  echo "deb [signed-by=$kr] $mirror bookworm-backports main"
} > "$work/sources.list"
opts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o "Dir::Etc::sourceparts=-"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
      -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
log "downloading qemu-system-x86 $VERSION"
apt-get "${opts[@]}" update -qq >&2
(cd "$work" && apt-get "${opts[@]}" download -qq "qemu-system-x86=$VERSION" \
  "qemu-system-common=$VERSION" "qemu-system-data=$VERSION" >&2)
rm -rf "$out.tmp" && mkdir -p "$out.tmp/root"
for d in "$work"/*.deb; do dpkg-deb -x "$d" "$out.tmp/root"; done
r="$out.tmp/root"
[ -x "$r/usr/bin/qemu-system-x86_64" ] || { log "error: the download holds no qemu-system-x86_64"; exit 4; }
missing="$(ldd "$r/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}' | tr '\n' ' ')"
[ -z "$missing" ] || { log "error: QEMU $VERSION links libraries this host lacks: $missing(install Debian's qemu-system-x86 first: e2e/tools/install-host-deps.sh)"; exit 5; }
cat > "$out.tmp/qemu-system-x86_64" <<WRAP
#!/bin/sh
# bookworm-backports' QEMU $VERSION, unpacked here (e2e/tools/qemu-backports.sh).
root="\$(dirname "\$0")/root"
export LD_LIBRARY_PATH="\$root/usr/lib/x86_64-linux-gnu:\$root/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "\$root/usr/bin/qemu-system-x86_64" -L "\$root/usr/share/qemu" -L "\$root/usr/share/seabios" "\$@"
WRAP
chmod +x "$out.tmp/qemu-system-x86_64"
rm -rf "$out" && mv "$out.tmp" "$out"
# The wrapper refers to its own directory: it works from the final path.
log "QEMU: $("$out/qemu-system-x86_64" --version | head -n1)"
echo "$out"
