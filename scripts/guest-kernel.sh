#!/usr/bin/env bash
# Fetch and unpack Debian's amd64 kernel for the qemu guest harness (tests/guest/).
# The host kernel has no IPVS and cannot load modules, so IPVS is tested in a guest
# booting this kernel. Cached under .cache/guest-kernel/ (git-ignored); idempotent.
# Prints the directory holding vmlinuz + lib/modules/<ver>/ on success.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${KPROXY_GUEST_CACHE:-$PWD/.cache/guest-kernel}
mkdir -p "$CACHE"

if [ -f "$CACHE/ready" ]; then
  echo "$CACHE"
  exit 0
fi

# The metapackage names the current versioned image package.
meta=linux-image-amd64
pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -qq >/dev/null
  pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "guest-kernel: cannot resolve $meta" >&2; exit 1; }

tmp=$(mktemp -d "$CACHE/tmp.XXXXXX")
chmod 755 "$tmp"  # apt-get download runs as _apt when it can
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && chown _apt "$tmp" 2>/dev/null; apt-get download -qq "$pkg" >/dev/null)
deb=$(ls "$tmp"/*.deb)
dpkg -x "$deb" "$tmp/root"
ver=$(ls "$tmp/root/lib/modules")
rm -rf "$CACHE/root"
mv "$tmp/root" "$CACHE/root"
cp "$CACHE/root/boot/vmlinuz-$ver" "$CACHE/vmlinuz"
# Only the module tree is needed; drop docs and the rest.
rm -rf "$CACHE/root/usr" "$CACHE/root/boot"
depmod -b "$CACHE/root" "$ver"
echo "$ver" > "$CACHE/version"
touch "$CACHE/ready"
echo "$CACHE"
