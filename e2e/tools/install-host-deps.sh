#!/usr/bin/env bash
# Installs what the host-side tests need: QEMU for x86_64 (Debian's qemu-system-x86),
# used by cvm-host's QMP and process tests. Idempotent: does nothing when the binary is
# already there.
set -euo pipefail

if command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "install-host-deps: $(qemu-system-x86_64 --version | head -n1) already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends qemu-system-x86
echo "install-host-deps: $(qemu-system-x86_64 --version | head -n1)"
