#!/usr/bin/env bash
# Install what kproxy needs on a fresh Debian machine (as root), then build and
# install kproxy itself (editable). Idempotent: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(iptables nftables conntrack ipset iproute2 socat haproxy iperf3 apache2-utils)
# IPVS tests run in a qemu guest (tests/guest/): qemu, busybox for its initramfs,
# kmod (depmod, modprobe) for the kernel that scripts/guest-kernel.sh fetches.
DEB_PACKAGES+=(qemu-system-x86 busybox-static kmod ipvsadm)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" -c "import kproxy._core" 2>/dev/null || [ "${KPROXY_REBUILD:-1}" = 1 ]; then
  echo "setup: building and installing kproxy (pip install -e '.[dev]')"
  "$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'
fi
